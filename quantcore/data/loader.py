"""DataLoader helpers that keep skipped samples visible across worker processes.

Datasets opened with ``skip_bad=True`` return a :class:`~quantcore.data.errors.Skipped` marker for a
bad sample. :func:`collate_skip` drops those from the batch and returns their records next to it, so
they travel back from worker processes with the batch; :class:`SkipAwareLoader` (from
:func:`make_loader`) yields ``(images, labels, skipped_names)`` and accumulates every record in
``loader.skipped`` - the dataset's own :class:`SkipLog`, which also holds what was skipped while the
dataset was indexed. A batch whose samples were all skipped is not yielded; its names are reported
with the next yielded batch (and are always in ``loader.skipped``).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data._utils.collate import default_collate

from .errors import SkipLog, Skipped, SkipRecord


def collate_skip(batch: Sequence[Any]) -> tuple[Any, torch.Tensor, list[SkipRecord]]:
    """``[(img, label) | Skipped, ...]`` -> ``(images | None, labels, [SkipRecord, ...])``."""
    good = [b for b in batch if not isinstance(b, Skipped)]
    skipped = [b.record() for b in batch if isinstance(b, Skipped)]
    if not good:
        return None, torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(good)
    return images, torch.as_tensor(labels, dtype=torch.long), skipped


def _base_dataset(ds: Any) -> Any:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


class SkipAwareLoader:
    """Iterable over ``(images, labels, skipped_names)``; ``.skipped`` is the complete :class:`SkipLog`."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        base = _base_dataset(loader.dataset)
        log = getattr(base, "skipped", None)
        self.skipped: SkipLog = log if isinstance(log, SkipLog) else SkipLog()

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def batch_size(self):
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        carry: list[str] = []
        it = iter(self.loader)
        try:
            for images, labels, records in it:
                self.skipped.extend(records)
                names = carry + [r.name for r in records]
                if images is None:
                    carry = names
                    continue
                carry = []
                yield images, labels, names
        except BaseException:  # error in a worker or the consumer stopped early: stop workers now
            _shutdown(self.loader, it)
            raise


def _shutdown(loader: DataLoader, it: Any) -> None:
    """Stop worker processes promptly (left to garbage collection, torch may wait ~10 s for them)."""
    shut = getattr(it, "_shutdown_workers", None)
    if shut is None:
        return
    try:
        shut()
    finally:
        if getattr(loader, "_iterator", None) is it:  # persistent workers: make the next epoch start fresh
            loader._iterator = None


def make_loader(dataset: Any, batch_size: int, num_workers: int = 0, indices: Sequence[int] | None = None, *,
                shuffle: bool = False, seed: int = 0, drop_last: bool = False, pin_memory: bool = False,
                persistent_workers: bool = False, prefetch_factor: int | None = None,
                multiprocessing_context: Any = None) -> SkipAwareLoader:
    """DataLoader over ``dataset`` (or ``Subset(dataset, indices)``) yielding ``(images, labels,
    skipped_names)``; shuffling, if asked, is seeded so runs are reproducible."""
    ds = Subset(dataset, list(indices)) if indices is not None else dataset
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
        if multiprocessing_context is not None:
            kw["multiprocessing_context"] = multiprocessing_context
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    dl = DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate_skip,
                    drop_last=drop_last, pin_memory=pin_memory, generator=gen, **kw)
    return SkipAwareLoader(dl)
