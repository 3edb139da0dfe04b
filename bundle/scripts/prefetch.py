"""Reading the next scan while the current one is screened: a DataLoader whose workers read cases ahead of the
screening loop, and a dataset that turns an unreadable scan into an error record instead of an exception, so that
one bad file neither stops the loader nor the batch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from monai.data import DataLoader, Dataset
from monai.data.utils import no_collation


def root_cause(error: BaseException) -> str:
    """``"Type: message"`` of the exception at the end of ``error``'s chain of causes (what a user can act on,
    without MONAI's "applying transform" wrappers)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


class ScanDataset(Dataset):
    """``monai.data.Dataset`` of screening cases (``{"image": path, ...}``) whose item is the case as its
    transform reads it, with ``load_s`` (seconds spent reading it, wherever that ran), or ``{"image": path,
    "error": "Type: message"}`` (the root cause) when it cannot be read."""

    def _transform(self, index: int) -> dict:
        start = time.perf_counter()
        try:
            item = dict(super()._transform(index))
        except Exception as e:  # a bad scan is reported by the caller, the loader goes on
            return {"image": str(self.data[index]["image"]), "error": root_cause(e)}
        item["load_s"] = time.perf_counter() - start
        return item


def prefetched_cases(cases: Sequence[dict], read: Callable[[dict], dict], num_workers: int = 1) -> Iterator[dict]:
    """Each of ``cases`` as ``read`` (e.g. a preprocessing ``Compose``) returns it, in order and not collated
    (an item may hold what a batch cannot, such as DICOM headers), or as an error record (see
    :class:`ScanDataset`). With ``num_workers`` >= 1, worker processes read up to ``num_workers`` cases ahead
    while the caller screens the current one (one scan ahead per worker bounds the memory); 0 reads each case
    when it is asked for."""
    loader = DataLoader(
        ScanDataset(list(cases), read),
        batch_size=None,
        collate_fn=no_collation,
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=1 if num_workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader
