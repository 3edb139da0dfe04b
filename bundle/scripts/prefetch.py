"""Reading the next scan while the current one is screened: a DataLoader whose workers preprocess cases ahead of
the screening loop, and a dataset that turns an unreadable scan into an error record instead of an exception, so
that one bad file neither stops the loader nor the batch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from monai.data import DataLoader, Dataset


class ScanDataset(Dataset):
    """``monai.data.Dataset`` of screening cases (``{"image": path}``) whose item is the preprocessed case with
    ``load_s`` (seconds spent reading and preprocessing it, wherever that ran), or ``{"image": path, "error":
    "Type: message"}`` (the root cause) when it cannot be read or preprocessed."""

    def _transform(self, index: int) -> dict:
        start = time.perf_counter()
        try:
            item = dict(super()._transform(index))
        except Exception as e:  # a bad scan is reported by the caller, the loader goes on
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            return {"image": str(self.data[index]["image"]), "error": f"{type(cause).__name__}: {cause}"}
        item["load_s"] = time.perf_counter() - start
        return item


def prefetched_cases(cases: Sequence[dict], preprocessing: Callable, num_workers: int = 1) -> Iterator[dict]:
    """Each of ``cases`` preprocessed, in order, as a batch of one (collated, as a DataLoader yields it) or as an
    error record (``{"image": [path], "error": [message]}``). With ``num_workers`` >= 1, worker processes read
    up to ``num_workers`` cases ahead while the caller screens the current one (one scan ahead per worker bounds
    the memory); 0 reads each case when it is asked for."""
    loader = DataLoader(
        ScanDataset(list(cases), preprocessing),
        batch_size=1,
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=1 if num_workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader
