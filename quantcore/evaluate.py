"""Accuracy of several models on the same data in ONE pass: top-1/top-5, per-class accuracy, and
agreement / logit SQNR of each model against a reference (the FP32 model).

Data parallel: :class:`EvalAccumulator` holds only sums (integer counts, float64 signal/noise
energies), so shards evaluated by different ranks merge exactly (:meth:`EvalAccumulator.merge`,
:meth:`EvalAccumulator.all_reduce`). :func:`evaluate_models` all-reduces by itself when a
``torch.distributed`` group is active, so K ranks that each pass their shard of the data all return
the figures of one process that saw everything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import UserError


@dataclass
class ModelScore:
    name: str
    count: int = 0
    top1: float = 0.0
    top5: float = 0.0
    per_class: list[float] = field(default_factory=list)
    agreement: float | None = None  # top-1 agreement with the reference, %
    sqnr_db: float | None = None  # logit SQNR against the reference, dB

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class EvalAccumulator:
    """Mergeable statistics of one evaluation pass of several models (named ``names``).

    Integer counts (CPU int64): ``total`` images, ``class_count[c]``, and per model (rows in
    ``names`` order) ``correct1``, ``correct5``, ``agree`` (top-1 equal to the reference's) and
    ``class_correct[m, c]``. Float64 sums per model: ``sig`` (reference logit energy) and ``noise``
    (energy of the difference to the reference). All are sums over samples, so accumulators of
    disjoint shards merge by addition: counts exactly, energies up to float64 summation order.
    """

    def __init__(self, names: Sequence[str], num_classes: int, reference: str | None = None) -> None:
        names = list(names)
        if reference is not None and reference not in names:
            raise ValueError(f"reference model {reference!r} is not among {names}")
        m, c = len(names), int(num_classes)
        self.names, self.num_classes, self.reference = names, c, reference
        self.total = torch.zeros(1, dtype=torch.int64)
        self.class_count = torch.zeros(c, dtype=torch.int64)
        self.correct1 = torch.zeros(m, dtype=torch.int64)
        self.correct5 = torch.zeros(m, dtype=torch.int64)
        self.agree = torch.zeros(m, dtype=torch.int64)
        self.class_correct = torch.zeros(m, c, dtype=torch.int64)
        self.sig = torch.zeros(m, dtype=torch.float64)
        self.noise = torch.zeros(m, dtype=torch.float64)

    def _ints(self) -> list[torch.Tensor]:
        return [self.total, self.class_count, self.correct1, self.correct5, self.agree, self.class_correct]

    def _floats(self) -> list[torch.Tensor]:
        return [self.sig, self.noise]

    def _check_labels(self, labels: torch.Tensor) -> None:
        c = self.num_classes
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
            bad = int(labels[(labels < 0) | (labels >= c)][0])
            raise UserError(f"evaluation data: label {bad} is outside [0, {c}) (the dataset's classes)")

    @torch.no_grad()
    def update(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Add one batch: ``logits[name]`` of shape ``(N, num_classes)`` for every model, ``labels`` (N,)."""
        c = self.num_classes
        self._check_labels(labels)
        ref = logits[self.reference].double() if self.reference is not None else None
        ref_top1 = ref.argmax(1) if ref is not None else None
        k = min(5, c)
        labels_cpu = labels.cpu()
        self.class_count += torch.bincount(labels_cpu, minlength=c)
        self.total += labels.numel()
        for i, n in enumerate(self.names):
            out = logits[n]
            if out.shape[-1] != c:
                raise UserError(f"model.num_classes: model {n!r} gives {out.shape[-1]} logits, but the evaluation "
                                f"data has {c} classes; set model.num_classes: {c} (and "
                                f"weights trained for them)")
            out = out.float()
            topk = out.topk(k, dim=1).indices
            hit1 = topk[:, 0] == labels
            self.correct1[i] += int(hit1.sum())
            self.correct5[i] += int((topk == labels[:, None]).any(1).sum())
            self.class_correct[i] += torch.bincount(labels_cpu[hit1.cpu()], minlength=c)
            if ref is not None:
                self.agree[i] += int((topk[:, 0] == ref_top1).sum())
                self.sig[i] += float((ref ** 2).sum())
                self.noise[i] += float(((out.double() - ref) ** 2).sum())

    def _check_compatible(self, other: "EvalAccumulator") -> None:
        if (other.names, other.num_classes, other.reference) != (self.names, self.num_classes, self.reference):
            raise ValueError(f"cannot merge evaluations of different models/classes: {self.names}/"
                             f"{self.num_classes}/{self.reference} vs {other.names}/{other.num_classes}/"
                             f"{other.reference}")

    def merge(self, other: "EvalAccumulator") -> "EvalAccumulator":
        """Add ``other`` (a disjoint shard of the same evaluation) into this accumulator; returns self."""
        self._check_compatible(other)
        for a, b in zip(self._ints() + self._floats(), other._ints() + other._floats()):
            a += b
        return self

    def all_reduce(self) -> "EvalAccumulator":
        """Sum this accumulator over all ranks of the active process group, in place (the identity
        without one). Every rank must call it, with accumulators of the same models and classes.
        One int64 and one float64 collective; returns self."""
        from . import distributed

        if not distributed.active():
            return self
        for parts, dtype in ((self._ints(), torch.int64), (self._floats(), torch.float64)):
            flat = torch.cat([p.reshape(-1) for p in parts]).to(dtype)
            distributed.all_reduce(flat, "sum")
            offset = 0
            for p in parts:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        return self

    def state_dict(self) -> dict[str, Any]:
        """Plain-tensor state (e.g. to send with ``all_gather_object`` or store in a checkpoint)."""
        return {"names": list(self.names), "num_classes": self.num_classes, "reference": self.reference,
                "ints": [t.clone() for t in self._ints()], "floats": [t.clone() for t in self._floats()]}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "EvalAccumulator":
        acc = cls(d["names"], d["num_classes"], d["reference"])
        for a, b in zip(acc._ints() + acc._floats(), list(d["ints"]) + list(d["floats"])):
            a.copy_(b)
        return acc

    def scores(self) -> dict[str, ModelScore]:
        """Percentages (and SQNR in dB) from the sums; per-class NaN for a class without images."""
        total = int(self.total)
        counts = self.class_count.tolist()
        out = {}
        for i, n in enumerate(self.names):
            s = ModelScore(n, total, 100.0 * int(self.correct1[i]) / max(total, 1),
                           100.0 * int(self.correct5[i]) / max(total, 1))
            s.per_class = [100.0 * float(c) / float(t) if t else float("nan")
                           for c, t in zip(self.class_correct[i].tolist(), counts)]
            if self.reference is not None:
                sig, noise = float(self.sig[i]), float(self.noise[i])
                s.agreement = 100.0 * int(self.agree[i]) / max(total, 1)
                s.sqnr_db = math.inf if noise == 0 else 10.0 * math.log10(sig / noise) if sig else -math.inf
            out[n] = s
        return out


@torch.no_grad()
def evaluate_models(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], batches: Iterable,
                    num_classes: int, reference: str | None = None, device: str | torch.device = "cpu",
                    progress: Callable[[int], None] | None = None, *, sync: bool | None = None,
                    accumulator: EvalAccumulator | None = None) -> dict[str, ModelScore]:
    """Evaluate every model on each batch as it arrives (one pass over the data).

    ``models`` maps a name to a callable returning logits (a module, or a closure that toggles
    quantization on a shared prepared model). ``batches`` yields ``(images, labels[, ...])``.

    Data parallel: with ``sync`` (default: whenever a ``torch.distributed`` group of more than one
    rank is active) every rank passes ITS OWN shard of the data and the statistics are all-reduced
    after the pass, so every rank returns the scores of the union of the shards: top-1, top-5,
    per-class accuracy, agreement and ``count`` are computed from identical integer counts (exactly
    the single-process figures), SQNR from float64 energy sums that equal the single-process ones up
    to summation order (relative difference ~1e-15). "Exactly" presumes each image gets the logits it
    would get in the single process: the same batches (kernels may round in the last bit differently
    for another batch size; :mod:`quantcore.pipeline` shards whole batches for this reason), or a
    model whose rounding does not change a top-k decision. Every rank must call it
    (a rank with an empty shard passes no batches); ``sync=False`` evaluates only the local data.
    ``accumulator``: add into this :class:`EvalAccumulator` (e.g. several passes merged later)
    instead of a fresh one; it is all-reduced in place when syncing.
    """
    if reference is not None and reference not in models:
        raise ValueError(f"reference model {reference!r} is not among {list(models)}")
    for m in models.values():
        if isinstance(m, nn.Module):
            m.eval()
    acc = accumulator if accumulator is not None else EvalAccumulator(list(models), num_classes, reference)
    if (acc.names, acc.num_classes, acc.reference) != (list(models), int(num_classes), reference):
        raise ValueError("accumulator was made for other models/classes/reference")
    for batch in batches:
        images, labels = batch[0].to(device), batch[1].to(device)
        acc._check_labels(labels)
        acc.update({n: fn(images) for n, fn in models.items()}, labels)
        if progress is not None:
            progress(labels.numel())
    from . import distributed

    if sync if sync is not None else distributed.active():
        acc.all_reduce()
    return acc.scores()


def quant_toggle(model: nn.Module, quantized: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running a prepared model with fake quantization on or off (one copy of weights)."""
    from .api import set_quantization

    def run(x: torch.Tensor) -> torch.Tensor:
        set_quantization(model, quantized)
        return model(x)

    return run
