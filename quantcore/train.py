"""Plain FP32 training / fine-tuning of a classifier (single process). QAT will reuse this loop."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .config import TrainConfig
from .models import output_logits


@dataclass
class TrainResult:
    epochs: int
    steps: int
    seconds: float
    final_loss: float


def one_cycle(opt: torch.optim.Optimizer, max_lr: float | list[float], total_steps: int,
              pct_start: float, cycle_momentum: bool = True) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's OneCycleLR, with the warm-up fraction nudged so both phases last at least part of a
    step: ``pct_start * total_steps`` at or below 1 makes OneCycleLR divide by zero on its first
    ``step()`` (a short run: 1,000 images in batches of 256 for one epoch is 4 steps). At least 2
    steps are scheduled. ``cycle_momentum=False`` leaves the optimizer's momentum/betas as they are
    (torch's default writes 0.85-0.95 over them)."""
    total = max(int(total_steps), 2)
    pct = min(max(pct_start, 1.5 / total), 1.0 - 0.5 / total)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=pct,
                                               cycle_momentum=cycle_momentum)


def train_classifier(model: nn.Module, epoch_batches: Callable[[int], Iterable], steps_per_epoch: int,
                     cfg: TrainConfig, device: str | torch.device = "cpu",
                     on_epoch: Callable[[int, float], None] | None = None) -> TrainResult:
    """AdamW + OneCycle; ``epoch_batches(epoch)`` yields ``(images, labels[, ...])`` for that epoch."""
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = one_cycle(opt, cfg.lr, cfg.epochs * steps_per_epoch, cfg.pct_start)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, steps, loss_val = time.perf_counter(), 0, math.nan
    for epoch in range(cfg.epochs):
        running, n = 0.0, 0
        for batch in epoch_batches(epoch):
            if steps >= cfg.epochs * steps_per_epoch:
                break
            x, y = batch[0].to(device), batch[1].to(device)
            if cfg.hflip:
                flip = torch.rand(x.shape[0], generator=gen) < 0.5
                x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
            loss = loss_fn(output_logits(model(x)), y)  # a Hugging Face model returns a ModelOutput
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            running += loss.item() * y.numel()
            n += y.numel()
        loss_val = running / max(n, 1)
        if on_epoch is not None:
            on_epoch(epoch, loss_val)
    model.eval()
    return TrainResult(cfg.epochs, steps, time.perf_counter() - t0, loss_val)
