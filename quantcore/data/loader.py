"""DataLoader helpers that keep skipped samples visible across worker processes.

Datasets opened with ``skip_bad=True`` return a :class:`~quantcore.data.errors.Skipped` marker for a
bad sample. :func:`collate_skip` drops those from the batch and returns their records next to it, so
they travel back from worker processes with the batch; :class:`SkipAwareLoader` (from
:func:`make_loader`) yields ``(images, labels, skipped_names)`` and accumulates every record in
``loader.skipped`` - the dataset's own :class:`SkipLog`, which also holds what was skipped while the
dataset was indexed. A batch whose samples were all skipped is not yielded; its names are reported
with the next yielded batch (and are always in ``loader.skipped``).

Every batch of indices :func:`make_loader` hands a worker is a :class:`Batch` that also names the
batch the same worker gets next (``DataLoader`` deals batches to its workers in turn), so a dataset
with ``__getitems__`` (zip shards on S3) can fetch it while this one decodes.
"""
from __future__ import annotations

import os
import signal

from collections import deque
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, Subset
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


class Batch(list):
    """Indices of one batch; ``ahead``: the indices of the batch the same worker is expected to get
    next (``None`` at the end). A plain list to every consumer that ignores ``ahead``."""

    def __init__(self, indices: Iterable[int] = (), ahead: list[int] | None = None) -> None:
        super().__init__(indices)
        self.ahead = ahead

    def __reduce__(self):  # keep ``ahead`` through the worker index queues
        return (Batch, (list(self), self.ahead))


class LookaheadBatchSampler:
    """Wraps a batch sampler: yields :class:`Batch` ``k`` with ``ahead`` = batch ``k + num_workers``
    (the next one for the same worker under ``DataLoader``'s round-robin; the next one at all with
    no workers). Buffers ``num_workers`` batches of indices."""

    def __init__(self, batch_sampler: Iterable[list[int]], num_workers: int) -> None:
        self.batch_sampler = batch_sampler
        self.batch_size = getattr(batch_sampler, "batch_size", None)
        self.stride = max(1, int(num_workers))

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        buf: deque[list[int]] = deque()
        for b in self.batch_sampler:
            buf.append(list(b))
            if len(buf) > self.stride:
                yield Batch(buf.popleft(), buf[self.stride - 1])
        while buf:
            b = buf.popleft()
            yield Batch(b, buf[self.stride - 1] if len(buf) >= self.stride else None)


class _BatchSubset(Subset):
    """``Subset`` that maps a :class:`Batch`'s ``ahead`` too."""

    def __getitems__(self, indices: Sequence[int]) -> list:
        ahead = getattr(indices, "ahead", None)
        mapped = Batch((self.indices[i] for i in indices),
                       [self.indices[i] for i in ahead] if ahead is not None else None)
        get = getattr(self.dataset, "__getitems__", None)
        return get(mapped) if callable(get) else [self.dataset[i] for i in mapped]


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
        return self.loader.batch_size or getattr(self.loader.batch_sampler, "batch_size", None)

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
    skipped_names)``; shuffling, if asked, is seeded so runs are reproducible. Batches carry the
    next batch of the same worker (:class:`LookaheadBatchSampler`) for read-ahead."""
    ds = _BatchSubset(dataset, list(indices)) if indices is not None else dataset
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
        if multiprocessing_context is not None:
            kw["multiprocessing_context"] = multiprocessing_context
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    sampler = RandomSampler(ds, generator=gen) if shuffle else SequentialSampler(ds)
    batches = LookaheadBatchSampler(BatchSampler(sampler, batch_size, drop_last), num_workers)
    if num_workers > 0:
        kw["worker_init_fn"] = leave_signal_group
    dl = DataLoader(ds, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_skip,
                    pin_memory=pin_memory, generator=gen, **kw)
    return SkipAwareLoader(dl)


def leave_signal_group(_worker_id: int) -> None:
    """Run in each DataLoader worker: its own process group, so a SIGTERM (or SIGINT) sent to the
    job's group (torchrun forwarding to a rank, ``kill -TERM -PGID``, Ctrl-C) reaches only the main
    process, which checkpoints (QAT) or stops the loader; a worker killed under the loop made it raise
    "DataLoader worker exited unexpectedly" instead; a SIGTERM sent to the worker itself ends it only
    :data:`WORKER_SIGTERM_GRACE_S` later, for the same reason. Workers still end with their parent (the
    loader shuts them down; an orphan notices its parent is gone)."""
    if hasattr(os, "setpgid"):
        try:
            os.setpgid(0, 0)
        except OSError:  # not permitted here (e.g. a session leader): keep the default
            pass
    # a SIGTERM sent to every process by PID (systemd's control-group stop, Slurm's scancel) reaches the
    # worker anyway: it is the main process's to act on (QAT checkpoints the step it is in), so the worker
    # outlives it by WORKER_SIGTERM_GRACE_S, then ends (SIGALRM's default action); the loader's own
    # terminate() of a stuck worker is a SIGTERM too and ends it the same way
    signal.signal(signal.SIGTERM, _end_later)


#: seconds a DataLoader worker lives on after a SIGTERM (:func:`leave_signal_group`)
WORKER_SIGTERM_GRACE_S = 30


def _end_later(_signum: int, _frame: Any) -> None:
    if signal.getitimer(signal.ITIMER_REAL)[0] == 0:  # the first SIGTERM starts the clock, later ones do not
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a handler inherited from the parent must not catch it
        signal.alarm(WORKER_SIGTERM_GRACE_S)
