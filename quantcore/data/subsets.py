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


def class_quotas(counts: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """How many of ``n`` samples each class gets, for a class-stratified sample of a dataset whose class
    ``c`` has ``counts[c]`` samples (pure integer arithmetic: identical on every machine).

    Proportional (largest remainder: ``quota_c = n * counts[c] / sum(counts)`` rounded so the total is
    exactly ``n``), never more than a class has, and every non-empty class gets at least one when
    ``n >= `` the number of non-empty classes (taken from the classes furthest above their quota). Ties
    are broken by a ``seed``-ed permutation of the classes, not by class order, so with ``n`` below the
    number of classes the represented classes are spread over all labels. ``n >= sum(counts)``: all.
    """
    counts = [int(c) for c in counts]
    total = sum(counts)
    if n >= total:
        return list(counts)
    if n <= 0:
        return [0] * len(counts)
    rank = np.empty(len(counts), dtype=np.int64)
    rank[np.random.default_rng([int(seed), 0x5157]).permutation(len(counts))] = np.arange(len(counts))
    nonempty = [c for c in range(len(counts)) if counts[c]]
    floor = 1 if n >= len(nonempty) else 0
    got = [min(counts[c], max(floor, n * counts[c] // total)) if counts[c] else 0 for c in range(len(counts))]
    # surplus_c = got_c * total - n * counts_c (exact integer "got minus quota", scaled by total)
    need = n - sum(got)
    while need:
        step = 1 if need > 0 else -1
        ok = [c for c in nonempty if (got[c] < counts[c] if step > 0 else got[c] > floor)]
        key = lambda c: (step * (got[c] * total - n * counts[c]), rank[c])  # noqa: E731
        # give to the class furthest below its quota / take from the one furthest above it
        for c in sorted(ok, key=key)[: abs(need)]:
            got[c] += step
        need = n - sum(got)
    return got


def stratified_subset(dataset: Any, n: int, seed: int = 0) -> list[int]:
    """``min(n, len)`` indices (ascending) forming a class-stratified random sample, deterministic in
    ``seed`` and independent of machine and worker count (it depends only on ``dataset.labels``).

    Class ``c`` contributes :func:`class_quotas` ``[c]`` samples, drawn as in :func:`per_class_subset`
    (its own generator seeded by ``(seed, c)``), so every class is represented when ``n`` is at least
    the number of non-empty classes and the class mix follows the dataset's.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    labels = np.asarray(_labels_of(dataset), dtype=np.int64)
    if len(labels) == 0:
        return []
    k = max(int(getattr(dataset, "num_classes", 0) or 0), int(labels.max()) + 1)
    quotas = class_quotas(np.bincount(labels, minlength=k).tolist(), int(n), seed)
    out: list[int] = []
    for c, q in enumerate(quotas):
        if q:
            idx = np.flatnonzero(labels == c)
            pick = np.random.default_rng([int(seed), c]).permutation(len(idx))[:q]
            out.extend(idx[pick].tolist())
    return sorted(out)


LIMIT_METHOD = ("class-stratified random sample: per-class counts proportional to the split's "
                "(largest remainder, every class at least one when the limit allows), seeded")


def limit_subset(dataset: Any, limit: int | None, seed: int = 0) -> tuple[list[int] | None, dict | None]:
    """Indices and a report entry for evaluating on at most ``limit`` samples.

    ``limit`` ``None``/``0``, or ``>= len(dataset)``: ``(None, None)`` (the whole split). Otherwise
    :func:`stratified_subset` and ``{"selected", "of", "method", "seed", "classes_represented",
    "num_classes"}`` for ``report.json`` (``report.md`` prints it), so a subset is never mistaken for
    the whole split. A negative ``limit`` raises :class:`DataError`.
    """
    if limit is None or int(limit) == 0:
        return None, None
    if int(limit) < 0:
        raise DataError(f"limit must be >= 0 (0 = the whole split), got {limit}",
                        file=getattr(dataset, "uri", None))
    total = _len_of(dataset)
    if int(limit) >= total:
        return None, None
    idx = stratified_subset(dataset, int(limit), seed)
    labels = _labels_of(dataset)
    present = {labels[i] for i in idx}
    k = getattr(dataset, "num_classes", None) or len(set(labels))
    info = {"selected": len(idx), "of": total, "method": LIMIT_METHOD, "seed": int(seed),
            "classes_represented": len(present), "num_classes": int(k)}
    return idx, info


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
