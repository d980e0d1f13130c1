"""Deterministic calibration subsets and data-parallel sharding of index lists (no image decoding:
only ``dataset.labels`` / ``len(dataset)`` are used)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import DataError


def _labels_of(dataset_or_labels: Any) -> list[int]:
    labels = getattr(dataset_or_labels, "labels", None)
    if labels is None:
        labels = dataset_or_labels
    return [int(y) for y in labels]


def _len_of(dataset_or_len: Any) -> int:
    return int(dataset_or_len) if isinstance(dataset_or_len, (int, np.integer)) else len(dataset_or_len)


def per_class_subset(dataset: Any, n_per_class: int, seed: int = 0, *, classes: Sequence[int] | None = None,
                     allow_fewer: bool = False) -> list[int]:
    """``n_per_class`` random indices of every class (ascending order), deterministic in ``seed``.

    Each class draws from its own generator seeded by ``(seed, class)``, so the picks of one class do
    not change when other classes gain or lose samples. A class with fewer samples raises
    :class:`DataError` unless ``allow_fewer`` (then all of its samples are taken). ``classes`` limits
    the classes (default: all ``0..num_classes-1``, or the labels present).
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    labels = np.asarray(_labels_of(dataset), dtype=np.int64)
    if classes is None:
        k = getattr(dataset, "num_classes", None)
        classes = range(k) if k is not None else sorted(set(labels.tolist()))
    out: list[int] = []
    for c in classes:
        idx = np.flatnonzero(labels == int(c))
        if len(idx) < n_per_class and not allow_fewer:
            name = getattr(dataset, "classes", None)
            cname = f" ({name[int(c)]})" if name is not None and int(c) < len(name) else ""
            raise DataError(f"class {int(c)}{cname} has {len(idx)} samples, fewer than n_per_class={n_per_class}"
                            f"{' in ' + dataset.uri if hasattr(dataset, 'uri') else ''}",
                            file=getattr(dataset, "uri", None))
        rng = np.random.default_rng([int(seed), int(c)])
        pick = rng.permutation(len(idx))[:n_per_class]
        out.extend(idx[pick].tolist())
    return sorted(out)


def random_subset(dataset: Any, n: int, seed: int = 0) -> list[int]:
    """``min(n, len)`` distinct random indices in random (seeded) order."""
    total = _len_of(dataset)
    perm = np.random.default_rng(int(seed)).permutation(total)
    return perm[: max(0, min(int(n), total))].tolist()


def first_batches(dataset: Any, n_batches: int, batch_size: int, seed: int = 0) -> list[int]:
    """Indices of the first ``n_batches`` batches of a seeded shuffle: ``n_batches * batch_size`` random
    distinct indices (fewer if the dataset is smaller), in shuffle order. ``dataset`` may be a length."""
    if n_batches < 0 or batch_size < 1:
        raise ValueError(f"need n_batches >= 0 and batch_size >= 1, got {n_batches}, {batch_size}")
    return random_subset(dataset, n_batches * batch_size, seed)


def shard_indices(indices: Sequence[int] | int, rank: int, world_size: int) -> list[int]:
    """Contiguous, balanced slice of ``indices`` for ``rank`` of ``world_size`` workers.

    The slices of ranks ``0..world_size-1`` are disjoint, cover ``indices`` exactly and in order, and
    differ in length by at most one (the first ``len % world_size`` ranks get one extra). Contiguity
    keeps each worker on few zip shards. ``indices`` may be an int ``n`` meaning ``range(n)``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    idx = list(range(indices)) if isinstance(indices, (int, np.integer)) else [int(i) for i in indices]
    q, r = divmod(len(idx), world_size)
    start = rank * q + min(rank, r)
    return idx[start: start + q + (1 if rank < r else 0)]
