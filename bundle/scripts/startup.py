"""Start-up of the screening command without what screening never uses.

``import monai`` imports every MONAI submodule, and each of them imports the optional packages it finds installed:
MLflow, TensorBoard, pandas, pyplot and torchvision (with TorchDynamo), which the environment has for training and
MONAI Label: a third of the command's start-up. Marking them absent before MONAI is first imported makes MONAI's
``optional_import`` treat them as not installed, as on a lean install; nothing on the screening path calls them.
"""

from __future__ import annotations

import sys

UNUSED_BY_SCREENING = (
    "mlflow",
    "tensorboard",
    "tensorboardX",
    "torch.utils.tensorboard",
    "pandas",
    "matplotlib.pyplot",
    "torchvision",
    "monailabel",
)


def skip_unused_imports(modules: tuple[str, ...] = UNUSED_BY_SCREENING) -> list[str]:
    """Make ``import`` of each of ``modules`` fail (``ModuleNotFoundError``) in this process, unless already
    imported; returns the names it blocked. Call it before the first ``import monai``: afterwards MONAI holds
    the packages it found."""
    blocked = [name for name in modules if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's marker of a missing module
    return blocked
