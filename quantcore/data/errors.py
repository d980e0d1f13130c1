"""Errors and skip bookkeeping for datasets.

Every problem with input data raises :class:`DataError` whose message names the offending file (and the
zip shard or map line where that applies). With ``skip_bad=True`` a dataset does not raise for a bad
*sample*; it returns a :class:`Skipped` marker instead, which :func:`quantcore.data.collate_skip` drops
from the batch while reporting its name, and records it in ``dataset.skipped`` (a :class:`SkipLog`).
Nothing is dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from ..errors import UserError


class DataError(UserError):
    """Bad or inconsistent input data. The message always names the file (and shard / line).

    The constructor accepts a single message positionally so that the exception survives being
    re-raised by a DataLoader worker (``ExceptionWrapper`` rebuilds it as ``DataError(msg)``).
    """

    def __init__(self, message: str, *, file: str | None = None, shard: str | None = None,
                 line: int | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.shard = shard
        self.line = line


@dataclass(frozen=True)
class SkipRecord:
    """One skipped sample (or map line / zip member that could not become a sample)."""

    name: str
    reason: str
    index: int = -1  # dataset index, -1 when the entry never became a sample (e.g. unlabelled member)

    def as_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason, "index": self.index}


@dataclass(frozen=True)
class Skipped:
    """Marker returned by ``dataset[i]`` in ``skip_bad`` mode instead of ``(image, label)``."""

    index: int
    name: str
    reason: str

    def record(self) -> SkipRecord:
        return SkipRecord(self.name, self.reason, self.index)


class SkipLog:
    """Ordered, de-duplicated (by name) record of skipped samples.

    Adding the same name twice keeps the first record, so a skip seen both in a worker-free
    ``__getitem__`` and again by the loader wrapper is counted once.
    """

    def __init__(self, records: Iterable[SkipRecord] = ()) -> None:
        self._by_name: dict[str, SkipRecord] = {}
        for r in records:
            self.add(r)

    def add(self, record: SkipRecord | Skipped) -> None:
        if isinstance(record, Skipped):
            record = record.record()
        self._by_name.setdefault(record.name, record)

    def extend(self, records: Iterable[SkipRecord | Skipped]) -> None:
        for r in records:
            self.add(r)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def reason(self, name: str) -> str:
        return self._by_name[name].reason

    def as_list(self) -> list[dict]:
        return [r.as_dict() for r in self._by_name.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[SkipRecord]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def __repr__(self) -> str:
        return f"SkipLog({len(self)} skipped: {self.names[:5]}{'...' if len(self) > 5 else ''})"
