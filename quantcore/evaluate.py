"""Accuracy of several models on the same data in ONE pass: top-1/top-5, per-class accuracy, and
agreement / logit SQNR of each model against a reference (the FP32 model)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

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


class _Acc:
    def __init__(self, num_classes: int) -> None:
        self.correct1 = 0
        self.correct5 = 0
        self.agree = 0
        self.sig = 0.0
        self.noise = 0.0
        self.class_correct = torch.zeros(num_classes, dtype=torch.int64)


@torch.no_grad()
def evaluate_models(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], batches: Iterable,
                    num_classes: int, reference: str | None = None, device: str | torch.device = "cpu",
                    progress: Callable[[int], None] | None = None) -> dict[str, ModelScore]:
    """Evaluate every model on each batch as it arrives (one pass over the data).

    ``models`` maps a name to a callable returning logits (a module, or a closure that toggles
    quantization on a shared prepared model). ``batches`` yields ``(images, labels[, ...])``.
    """
    if reference is not None and reference not in models:
        raise ValueError(f"reference model {reference!r} is not among {list(models)}")
    for m in models.values():
        if isinstance(m, nn.Module):
            m.eval()
    accs = {n: _Acc(num_classes) for n in models}
    class_count = torch.zeros(num_classes, dtype=torch.int64)
    total = 0
    k = min(5, num_classes)
    for batch in batches:
        images, labels = batch[0].to(device), batch[1].to(device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
            raise UserError(f"evaluation data: label {bad} is outside [0, {num_classes}) (the dataset's classes)")
        logits = {n: fn(images).float() for n, fn in models.items()}
        ref = logits.get(reference) if reference else None
        ref_top1 = ref.argmax(1) if ref is not None else None
        class_count += torch.bincount(labels.cpu(), minlength=num_classes)
        for n, out in logits.items():
            a = accs[n]
            if out.shape[-1] != num_classes:
                raise UserError(f"model.num_classes: model {n!r} gives {out.shape[-1]} logits, but the evaluation "
                                f"data has {num_classes} classes; set model.num_classes: {num_classes} (and "
                                f"weights trained for them)")
            topk = out.topk(k, dim=1).indices
            hit1 = topk[:, 0] == labels
            a.correct1 += int(hit1.sum())
            a.correct5 += int((topk == labels[:, None]).any(1).sum())
            a.class_correct += torch.bincount(labels[hit1].cpu(), minlength=num_classes)
            if ref is not None:
                a.agree += int((topk[:, 0] == ref_top1).sum())
                a.sig += float((ref.double() ** 2).sum())
                a.noise += float(((out.double() - ref.double()) ** 2).sum())
        total += labels.numel()
        if progress is not None:
            progress(labels.numel())
    scores = {}
    for n, a in accs.items():
        s = ModelScore(n, total, 100.0 * a.correct1 / max(total, 1), 100.0 * a.correct5 / max(total, 1))
        s.per_class = [100.0 * float(c) / float(t) if t else float("nan")
                       for c, t in zip(a.class_correct, class_count)]
        if reference is not None:
            s.agreement = 100.0 * a.agree / max(total, 1)
            s.sqnr_db = math.inf if a.noise == 0 else 10.0 * math.log10(a.sig / a.noise) if a.sig else -math.inf
        scores[n] = s
    return scores


def quant_toggle(model: nn.Module, quantized: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running a prepared model with fake quantization on or off (one copy of weights)."""
    from .api import set_quantization

    def run(x: torch.Tensor) -> torch.Tensor:
        set_quantization(model, quantized)
        return model(x)

    return run
