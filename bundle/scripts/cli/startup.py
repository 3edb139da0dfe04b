"""Start-up of the screening command without what screening never uses, and without collecting its garbage.

``import monai`` imports every MONAI submodule, and each of them imports the optional packages it finds installed:
MLflow, TensorBoard, pandas, pyplot and torchvision (with TorchDynamo), which the environment has for training and
MONAI Label, SciPy's signal module (for an ultrasound transform) and requests (for downloads): a third of the
command's start-up. Marking them absent before MONAI is first imported makes MONAI's ``optional_import`` treat
them as not installed, as on a lean install; nothing on the screening path calls them. Ignite imports
``torch.distributed.optim`` (FSDP, DTensor and SymPy: 0.65 s of CPU time) only to recognise a
ZeroRedundancyOptimizer when it saves a checkpoint, which screening never does: a stand-in module takes its place.

Start-up also creates some 700,000 objects, and Python's cyclic garbage collector walks all of them in each full
pass: during the imports (0.8 s of 4.3 s of CPU time, measured on ircadb1_1's command) and at the exit (1.2 s).
The collector is paused for the imports, and what they made is kept out of every later pass (``gc.freeze``).
"""

from __future__ import annotations

import gc
import sys
from types import ModuleType

UNUSED_BY_SCREENING = (
    "mlflow",
    "tensorboard",
    "tensorboardX",
    "torch.utils.tensorboard",
    "pandas",
    "matplotlib.pyplot",
    "torchvision",
    "monailabel",
    "scipy.signal",
    "requests",
)


def skip_unused_imports(modules: tuple[str, ...] = UNUSED_BY_SCREENING) -> list[str]:
    """Make ``import`` of each of ``modules`` fail (``ModuleNotFoundError``) in this process, unless already
    imported; returns the names it blocked. Call it before the first ``import monai``: afterwards MONAI holds
    the packages it found."""
    blocked = [name for name in modules if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's marker of a missing module
    return blocked


def stand_in_for_distributed_optim() -> bool:
    """Put the stand-in for ``torch.distributed.optim`` in place, unless it is imported; returns whether it did."""
    if "torch.distributed.optim" in sys.modules:
        return False
    stand_in = ModuleType("torch.distributed.optim", "Stand-in of the screening command (scripts.cli.startup).")
    stand_in.ZeroRedundancyOptimizer = type("ZeroRedundancyOptimizer", (), {})  # type: ignore[attr-defined]
    sys.modules[stand_in.__name__] = stand_in
    return True


def begin() -> None:
    """Before the command's imports: skip the unused packages and pause the garbage collector."""
    skip_unused_imports()
    stand_in_for_distributed_optim()
    gc.disable()


def end() -> None:
    """After the command's imports: keep what they made out of every later collection, and collect again."""
    gc.freeze()
    gc.enable()
