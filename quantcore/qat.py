"""Quantization-aware training: prepare -> calibrate -> train -> convert, in one loop.

The same :func:`run_qat` runs in one process (``quantcore qat``), in every torchrun rank (TorchX
``qat`` component, Kubernetes), and as Ray Train's ``train_loop_per_worker`` (``jobs.ray_qat``):
:func:`quantcore.distributed.setup` joins whatever process group the launcher describes.

Steps:
  1. Start point: the FP32 model (built from the recipe, prepared and calibrated data-parallel:
     statistics merged exactly across ranks), or a PTQ checkpoint (``init``, a ``model.qc.pt``).
     Saved as ``OUT/ptq/model.qc.pt``; a resumed run starts from that file, never recalibrates.
  2. Ranges: ``qat.ranges: learned`` turns every calibrated integer quantizer into LSQ form
     (learnable scale, and zero point when asymmetric; Esser et al. 2020, gradient scale
     ``1/sqrt(N * qmax)``) initialized from calibration; ``frozen`` keeps the calibrated ranges.
     Weights always train through the straight-through estimator of torch's fake-quant ops.
  3. BatchNorm (CNNs): ``qat.bn: fold`` (default) trains the folded graph that is deployed; BN
     layers placement could not fold run with frozen statistics. ``freeze``: BN kept, statistics
     updated for ``bn_freeze_step`` steps then frozen (Jacob et al. 2018; Krishnamoorthi 2018).
  4. Loop: per-rank batches from :func:`quantcore.distributed.epoch_batches` (every sample once
     per epoch, equal step counts per rank, loss normalized by the global batch so K ranks'
     averaged gradient is the global batch's); the model's training transform, reseeded per
     ``(seed, epoch, sample)``; loss CE, KD (KL with temperature, seed 002) or DeiT distillation
     token (hard/soft, seed 004); SGD/AdamW, cosine/OneCycle with warm-up, autocast on GPU,
     gradient clipping; DistributedDataParallel when there is more than one rank.
  5. Checkpoints (model, quantizer state, optimizer, scheduler, grad scaler, every rank's RNG
     states, data position, step, metrics) every ``checkpoint_every`` steps and at each epoch end,
     atomically, with a SHA-256 trailer; on SIGTERM one more before exiting with
     :class:`Preempted` (exit 143). A restart resumes from the newest checkpoint that verifies
     (corrupt ones are skipped with a warning): bit-identical to an uninterrupted run on CPU.
  6. Convert (learned scale/zero point -> ranges), evaluate FP32 vs PTQ vs QAT sharded over the
     ranks, write ``OUT/<recipe>/model.qc.pt``, ``encodings.json``, ``report.json``/``.md``,
     ``training.png`` and ``metrics.jsonl`` (rank 0 only).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import api, distributed
from .checkpoint import CheckpointError
from .config import QATConfig, Recipe
from .errors import Preempted, UserError
from .io import storage
from .models import distilled_outputs, has_distillation_head, output_logits
from .train import one_cycle

log = logging.getLogger(__name__)

PREEMPTED_EXIT = Preempted.exit_code  # launchers retry it (user errors exit 2 and are not retried)
_CKPT_MAGIC = b"QCTRAIN1"
_CKPT_DIR = "checkpoints"


@dataclass
class QATOptions:
    device: str = "auto"
    num_workers: int | None = None  # None: qat.num_workers
    progress: bool = True
    checkpoint: str | None = None  # FP32 weights overriding recipe.model.checkpoint
    init: str | None = None  # start from this PTQ checkpoint (model.qc.pt) instead of calibrating
    resume: bool = True
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    eval_limit: int | None = None  # final evaluation on a stratified sample (None: whole split)
    eval_batch_size: int = 256
    on_log: Callable[[dict], None] | None = None  # every rank, same metrics (Ray Train: ray.train.report)
    handle_sigterm: bool = True


# ----------------------------------------------------------------------------------------- setup
def _qat_config(recipe: Recipe, opts: QATOptions) -> QATConfig:
    if recipe.qat is None:  # training without settings chosen for the model and data is a foot-gun
        raise UserError(f"recipe {recipe.name!r}: no qat: section; add one (epochs, batch_size, optimizer, "
                        f"distill, augment ...; every field has a default: 'qat: {{}}' takes them all)")
    cfg = recipe.qat
    upd = {k: v for k, v in (("epochs", opts.epochs), ("max_steps", opts.max_steps),
                             ("batch_size", opts.batch_size)) if v is not None}
    if opts.num_workers is not None:
        upd["num_workers"] = opts.num_workers
    return cfg.model_copy(update=upd) if upd else cfg


def _unlearnable_formats() -> str:
    """The registered formats without a learnable range, for messages."""
    from .quantizer_kinds import quantizer_kind, quantizer_kind_names

    return "formats " + ", ".join(n for n in quantizer_kind_names() if not quantizer_kind(n).supports_learnable)


def learnable_quantizers(model: nn.Module, learn_zero_point: bool = True) -> list[str]:
    """Turn every calibrated integer quantizer into its LSQ form (learnable scale, and zero point
    when asymmetric and ``learn_zero_point``); returns their names. Float-format quantizers (FP16,
    BF16, FP8 casts) have no range to learn, and kinds without a learnable form (e.g. log2 grids)
    keep their calibrated range frozen; both are left as they are."""
    from .placement import quantizers, unwrap

    qs = quantizers(model)
    names = []
    for name, q in qs.items():
        if (not q.spec.on_grid or q.amax.numel() == 0 or q.spec.learnable
                or not q.spec.kind.supports_learnable):
            continue
        q.make_learnable()
        q.zero_point.requires_grad_(bool(learn_zero_point and not q.spec.symmetric))
        _check_learns(name, q)
        names.append(name)
    # Quantizers that share one range (ft2's q/k/v) share one learned scale/zero point: the trained
    # model keeps the deployed constraint (same Parameter objects, so one optimizer entry each).
    for group in getattr(getattr(unwrap(model), "quantcore_placement", None), "share_groups", []) or []:
        members = [qs[n] for n in group if n in qs and qs[n].scale is not None]
        for m in members[1:]:
            m.scale, m.zero_point = members[0].scale, members[0].zero_point
    return names


def _check_learns(name: str, q) -> None:
    """A plug-in kind that declares ``supports_learnable`` must read ``quantizer.scale`` in fake_quant
    when the spec is learnable: otherwise QAT trains nothing for it and says nothing. Probed once on a
    ramp over the calibrated range (built-in kinds are tested)."""
    from .plugins import PluginError, is_plugin

    if not is_plugin(q.spec.kind):
        return
    c, axis = q.scale.numel(), q.spec.axis
    shape = [c] if axis is None or c == 1 else ([1] * axis + [c] if axis >= 0 else [c] + [1] * (-axis - 1))
    lo, hi = float(q.amin.min()), float(q.amax.max())
    x = torch.linspace(lo, hi, 64 * max(1, c)).reshape(64, *shape) if c > 1 else torch.linspace(lo, hi, 64)
    x = x.to(q.scale.device)
    with torch.enable_grad():
        y = q(x)
        grad = torch.autograd.grad(y.sum(), [q.scale], allow_unused=True)[0] if y.requires_grad else None
    if grad is None:
        k = type(q.spec.kind)
        raise PluginError(f"quantizer {name!r} (format {q.spec.format!r} = {k.__module__}.{k.__qualname__}) declares "
                          "supports_learnable, but its fake_quant does not use quantizer.scale when the spec is "
                          "learnable: QAT would learn nothing for it (read quantizer.scale/zero_point, or set "
                          "supports_learnable = False)")


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _bn_left_after_folding(fp32: nn.Module) -> bool:
    """Whether placement's BatchNorm folding (on a copy) leaves any BatchNorm in the model: pairs it
    cannot prove (BN after a concat or an add, BatchNorm1d after a Linear) stay and are trained."""
    from .fold import fold_batchnorm
    from .placement import default_example_input

    probe = copy.deepcopy(fp32).eval()
    try:
        fold_batchnorm(probe, default_example_input(probe))
    except UserError:
        return True  # the fold itself refuses: placement reports that, not this check
    return bool(_bn_modules(probe))


def _sync_bn_statistics(model: nn.Module, cfg: QATConfig) -> None:
    """Give every rank rank 0's BatchNorm running statistics (what DDP broadcasts before each forward,
    and what rank 0 saves). After a training step each rank holds its own update; without this the
    sharded validation and final evaluation would score each shard with a different model than the
    checkpoint. No-op for ``bn: fold`` (no BatchNorm left to update) and without a process group."""
    if cfg.bn == "fold" or not distributed.active():
        return
    for m in _bn_modules(model):
        distributed.broadcast_module(m)


def _check_bn_step_sizes(recipe: Recipe, cfg: QATConfig, model: nn.Module, n: int, world: int,
                         steps_per_epoch: int, total_steps: int, example_shape: list[int],
                         device: torch.device) -> None:
    """``qat.bn: train`` (or ``freeze`` before its step): a rank's step of one image (a per-rank batch of
    1, or the short last global batch split over the ranks, e.g. 5 images as 2/2/1; an empty share runs
    one placeholder image) gives a BatchNorm whose input is 1x1 spatially one value per channel, which
    training-mode BatchNorm refuses with a traceback: every launcher retry would calibrate and train up
    to that step again. Refused here, naming the layer, before the first step."""
    if cfg.bn == "fold" or len(example_shape) < 2:
        return
    gb = cfg.batch_size * world
    last = n % gb
    # the first step at which some rank has at most one image: (step index, its images on the smallest rank)
    if cfg.batch_size <= 1:
        first, k = 0, cfg.batch_size
    elif last and last // world <= 1:
        first, k = steps_per_epoch - 1, last // world
    else:
        return
    if first >= total_steps or (cfg.bn == "freeze" and cfg.bn_freeze_step <= first):
        return  # never reached (qat.max_steps), or statistics frozen by then: BatchNorm runs in eval mode
    from .placement import unwrap

    single = []

    def hook(mod, args):
        x = args[0] if args else None
        if isinstance(mod, nn.SyncBatchNorm) and world > 1:
            return  # its statistics are over every rank's images
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.numel() // max(x.shape[1], 1) <= 1 and not single:
            single.append(mod)

    inner = unwrap(model)
    names = {id(m): name for name, m in inner.named_modules()}
    handles = [m.register_forward_pre_hook(hook) for m in _bn_modules(inner)]
    try:
        with torch.no_grad(), api.eval_mode(inner):
            inner(torch.zeros([1] + example_shape[1:], device=device))
    finally:
        for h in handles:
            h.remove()
    if single:
        why = (f"qat.batch_size {cfg.batch_size}" if cfg.batch_size <= 1 else
               f"the last global batch of each epoch holds {last} of the {n} training images, split over {world} "
               f"rank(s), so a rank trains on {k} image(s){' (one placeholder)' if k == 0 else ''}")
        raise UserError(f"recipe {recipe.name!r}: qat.bn: {cfg.bn} trains BatchNorm statistics, but {why}, and "
                        f"{names.get(id(single[0]), '?')!r} then sees one value per channel (its input is 1x1), which "
                        "training-mode BatchNorm cannot normalize; choose qat.batch_size (or the number of ranks) so "
                        "every rank's share is at least 2 images, or set qat.bn: fold / freeze")


def _set_train_mode(model: nn.Module, cfg: QATConfig, step: int) -> None:
    model.train()
    frozen = cfg.bn == "fold" or (cfg.bn == "freeze" and step >= cfg.bn_freeze_step)
    if frozen:
        for m in _bn_modules(model):
            m.eval()


def _group_layout(model: nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each optimizer group, in order: recorded in a training checkpoint so a
    resume under other groups (another optimizer recipe, another quantcore) is refused rather than
    handing one tensor's momentum to another."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p), "?") for p in g["params"]] for g in opt.param_groups]


def _grouping_changed(saved: dict, opt: torch.optim.Optimizer) -> bool:
    """For checkpoints without a group layout: True when a saved optimizer state shape differs from
    its parameter's (same group sizes, other members)."""
    state = saved.get("state", {})
    ids = [i for g in saved.get("param_groups", []) for i in g.get("params", [])]
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in zip(ids, params):
        for v in state.get(i, {}).values():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                return True
    return False


def _param_groups(model: nn.Module, cfg: QATConfig) -> list[dict]:
    """Optimizer parameter groups: decayed weights, undecayed biases/norms, and the learned ranges.

    With SGD every range parameter takes ``range_lr`` as it is (LSQ's gradient scale conditions it).
    With AdamW the step of a parameter is about its learning rate whatever the gradient, and scales
    span orders of magnitude (a weight scale ~1e-3, an activation scale ~1e-1): one absolute rate
    either freezes the large ones or blows up the small ones (measured: a per-tensor weight scale
    grew 9x in one epoch at 1e-3). So under AdamW ``range_lr`` is relative, as with TQT's log-domain
    thresholds (Jain et al., 2019): a scale steps by about ``range_lr`` times its calibrated value
    (per-channel: the mean over its channels), a
    zero point by ``range_lr`` times the grid width in codes. Quantizers are bucketed by calibrated
    scale (factors of sqrt(2)), so a few groups carry every range. The calibrated range
    (``amin``/``amax``) is fixed until :func:`quantcore.convert`, so a resumed run rebuilds the same
    groups."""
    from .quantizer import TensorQuantizer

    o = cfg.optimizer
    range_lr = o.range_lr or o.lr
    buckets: dict[float, list] = {}
    qparams = set()
    for m in model.modules():
        if not isinstance(m, TensorQuantizer):
            continue
        # a shared range (ft2's q/k/v) is one parameter in several quantizers: give it one group
        own = [p for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in qparams]
        qparams.update(id(p) for p in m.parameters(recurse=False))
        for p in own:
            lr = range_lr
            if o.name == "adamw":
                if p is m.scale:
                    s0, _ = m.scale_zero_point()  # from the calibrated range: unchanged by training
                    ref = float(s0.abs().float().mean().clamp_min(1e-12))
                    lr = range_lr * 2.0 ** (round(2 * math.log2(ref)) / 2)
                else:  # zero point, in codes
                    qmin, qmax = m.spec.qrange()
                    lr = range_lr * (qmax - qmin)
            buckets.setdefault(lr, []).append(p)
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in qparams:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay, "lr": o.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": o.lr}]
    groups += [{"params": ps, "weight_decay": 0.0, "lr": lr} for lr, ps in sorted(buckets.items())]
    return [g for g in groups if g["params"]]


def _optimizer(groups: list[dict], cfg: QATConfig) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)


def _scheduler(opt: torch.optim.Optimizer, cfg: QATConfig, total_steps: int):
    s = cfg.schedule
    if s.name == "onecycle":
        # the recipe's optimizer.momentum / betas act: torch would cycle them over 0.85-0.95
        return one_cycle(opt, [g["lr"] for g in opt.param_groups], total_steps, s.pct_start, cycle_momentum=False)
    floor = s.min_lr / cfg.optimizer.lr
    warm = s.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return s.warmup_start + (1.0 - s.warmup_start) * step / warm
        if s.name == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        if s.name == "linear":
            return floor + (1.0 - floor) * (1.0 - t)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _amp_dtype(cfg: QATConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[cfg.amp]


# ----------------------------------------------------------------------------------------- data
class SeededSamples(torch.utils.data.Dataset):
    """``dataset[(epoch, index)]`` with python's and torch's global RNGs seeded from ``(seed, epoch,
    index)`` around the item (restored afterwards): the random augmentation of a sample does not
    depend on the worker, the batch it falls in or whether the run was resumed."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        h = int.from_bytes(hashlib.blake2b(f"{self.seed}/{epoch}/{index}".encode(), digest_size=8).digest(), "big")
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        random.seed(h)
        torch.default_generator.manual_seed(h & ((1 << 63) - 1))  # torch.manual_seed also seeds CUDA: 90x slower
        try:
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)


def _train_loader(samples: SeededSamples, batches: list[list[int]], epoch: int, workers: int):
    from torch.utils.data import DataLoader

    from .data.loader import collate_skip, leave_signal_group

    keyed = [[(epoch, i) for i in b] for b in batches]
    # own generator: creating the iterator must not draw from the global RNG (resumes are bit-identical)
    return DataLoader(samples, batch_sampler=keyed, num_workers=workers, collate_fn=collate_skip,
                      generator=torch.Generator().manual_seed(epoch),
                      worker_init_fn=leave_signal_group if workers > 0 else None)


# ----------------------------------------------------------------------------------------- losses
def _kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Per-sample KL(teacher/T || student/T) * T^2 (Hinton et al. 2015)."""
    log_p = F.log_softmax(student.float() / t, dim=-1)
    log_q = F.log_softmax(teacher.float() / t, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1) * (t * t)


def per_sample_loss(out: Any, labels: torch.Tensor, teacher_logits: torch.Tensor | None, cfg: QATConfig) -> torch.Tensor:
    """The training loss of each sample (shape ``(N,)``), as ``qat.distill`` says."""
    d = cfg.distill
    if d.kind in ("deit_hard", "deit_soft"):
        cls, dist_out = distilled_outputs(out)
        base = F.cross_entropy(cls.float(), labels, reduction="none", label_smoothing=cfg.label_smoothing)
        if d.kind == "deit_hard":
            extra = F.cross_entropy(dist_out.float(), teacher_logits.argmax(-1), reduction="none")
        else:
            extra = _kl(dist_out, teacher_logits, d.temperature)
        return (1 - d.alpha) * base + d.alpha * extra
    logits = output_logits(out)  # a Hugging Face ModelOutput, a timm distilled tuple, or the tensor
    base = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=cfg.label_smoothing)
    if d.kind == "kd":
        return (1 - d.alpha) * base + d.alpha * _kl(logits, teacher_logits, d.temperature)
    if d.kind == "logit_mse":
        return (1 - d.alpha) * base + d.alpha * (logits.float() - teacher_logits.float()).pow(2).mean(-1)
    return base


# ----------------------------------------------------------------------------------------- checkpoints
def _ckpt_uri(out: str, step: int) -> str:
    return storage.join(out, _CKPT_DIR, f"step-{step:09d}.pt")


def encode_train_state(state: dict[str, Any]) -> bytes:
    """``torch.save`` bytes + magic + SHA-256 of those bytes: a partial or altered file never verifies."""
    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    return body + _CKPT_MAGIC + hashlib.sha256(body).digest()


def decode_train_state(data: bytes, uri: str) -> dict[str, Any]:
    tail = len(_CKPT_MAGIC) + 32
    if len(data) < tail or data[-tail:-32] != _CKPT_MAGIC:
        raise CheckpointError(f"training checkpoint {uri} is incomplete (no trailer)")
    body = data[:-tail]
    if hashlib.sha256(body).digest() != data[-32:]:
        raise CheckpointError(f"training checkpoint {uri} failed its SHA-256 check")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"training checkpoint {uri} cannot be read: {err}") from None


def check_start(init: str | None, checkpoint: str | None) -> None:
    """What a run starts from: ``--init`` (a calibrated checkpoint) or ``--checkpoint`` (FP32 weights), not
    both. Raises :class:`UserError`."""
    if init and checkpoint:
        raise UserError(f"--init {init} and --checkpoint {checkpoint}: give one (--init starts from a calibrated "
                        "checkpoint and its own FP32 weights; --checkpoint calibrates FP32 weights)")


def _torchrun_restart() -> int:
    """How many times torchrun has restarted this run's ranks in place (``TORCHELASTIC_RESTART_COUNT``;
    0 outside torchrun): a restart is the same run, so ``--no-resume`` must not discard its checkpoints."""
    try:
        return max(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), 0)
    except ValueError:
        return 0


_DISCARD_MARK = "no-resume-run"


def _run_id() -> str:
    """torchrun's ``TORCHELASTIC_RUN_ID``; without one that names a run ("none": torchrun without
    --rdzv-id or --standalone) the torchrun agent's launch (its host and log folder, else its process
    id), which its in-place restarts share and a new invocation does not; "" outside torchrun."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id.lower() != "none":
        return run_id
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return ""
    import socket

    # the agent's log folder for this launch (a fresh temporary folder, the same for its restarts:
    # <log dir>/attempt_<restart>/<local rank>/error.json), else the agent's process id (the ranks' parent)
    err = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    launch = err.split(f"{os.sep}attempt_", 1)[0] if f"{os.sep}attempt_" in err else f"pid {os.getppid()}"
    return f"agent {socket.gethostname()} {launch}"


def _discarded_by_this_run(out: str) -> bool:
    """True when ``OUT/checkpoints/no-resume-run`` names this torchrun run (``TORCHELASTIC_RUN_ID``):
    its first start discarded the previous run's checkpoints, so what is there now is its own."""
    run_id = _run_id()
    try:
        return bool(run_id) and storage.read_bytes(storage.join(out, _CKPT_DIR, _DISCARD_MARK)).decode() == run_id
    except (FileNotFoundError, UnicodeDecodeError):
        return False


def _mark_discarded(out: str) -> None:
    """Record, after discarding, which torchrun run did (nothing outside torchrun: no restarts)."""
    run_id = _run_id()
    if run_id:
        storage.write_bytes(storage.join(out, _CKPT_DIR, _DISCARD_MARK), run_id.encode())


def _unmark_discarded(out: str) -> None:
    """Drop an earlier run's marker before discarding (a run reusing its id must not find it)."""
    storage.delete(storage.join(out, _CKPT_DIR, _DISCARD_MARK), missing_ok=True)


_OWNER = "run-owner"


def _claim_out(out: str, ctx: distributed.DistContext) -> str:
    """Record in ``OUT/checkpoints/run-owner`` which run writes this ``--out`` now (rank 0; every rank
    returns the token): torchrun's run id (the same across its in-place restarts), else a new random
    token. The file keeps the earlier claims, one per line, the current one last. An in-place restart
    of a run that had claimed ``--out`` and lost it to another run since is refused on every rank
    (taking it back would stop that run and resume from its checkpoints)."""
    import uuid

    token, refused = _run_id() or f"start {uuid.uuid4().hex}", ""
    if ctx.is_main:
        claims = _claims(out)
        if _torchrun_restart() > 0 and token in claims and claims[-1] != token:
            refused = _taken(out, claims[-1], token)
        elif not claims or claims[-1] != token:
            text = "\n".join([*claims[-99:], token]) + "\n"
            storage.write_bytes(storage.join(out, _CKPT_DIR, _OWNER), text.encode())
    token, refused = distributed.broadcast_object((token, refused))  # rank 0's token: one per run
    if refused:
        raise UserError(refused)
    return token


def _take_over_out(out: str, ctx: distributed.DistContext, resume: bool) -> None:
    """What a run that has just claimed ``--out`` (:func:`_claim_out`) removes there, on rank 0:
    ``--no-resume``'s earlier checkpoints (the old run's must not outrank this one's), and on local
    storage the temp files of checkpoint writes killed mid-way (this rank is the run's only checkpoint
    writer and has not started writing; on S3 an unfinished multipart upload is the bucket's lifecycle
    rule's to abort: listing them needs a permission many policies lack)."""
    if not ctx.is_main:
        return
    if not resume:  # start over
        _unmark_discarded(out)
        discard_checkpoints(out)
        _mark_discarded(out)
    if not storage.parse_uri(out).is_s3:
        try:
            left = storage.cleanup_incomplete_writes(storage.join(out, _CKPT_DIR), older_than_s=0)
        except OSError as err:
            left = 0
            log.warning("could not remove unfinished checkpoint writes under %s: %s", out, err)
        if left:
            log.info("removed %d unfinished checkpoint write(s) of an earlier start under %s", left,
                     storage.join(out, _CKPT_DIR))


def _claims(out: str) -> list[str]:
    try:
        text = storage.read_bytes(storage.join(out, _CKPT_DIR, _OWNER)).decode(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.split("\n") if line]


def _owner_of(out: str) -> str | None:
    claims = _claims(out)
    return claims[-1] if claims else None


def _taken(out: str, now: str, token: str) -> str:
    return (f"--out {out}: another run started writing here after this one ({now!r}, this run {token!r}); this "
            "run stops without writing, so that neither overwrites nor prunes the other's checkpoints. Give each "
            "run its own --out")


def _check_owner(out: str, token: str, ctx: distributed.DistContext) -> None:
    """Before a checkpoint or the run's results are written: refused on every rank when another run has
    claimed ``--out`` since this one did (two runs given one --out would overwrite and prune each other's
    checkpoints, and the later one's results replace the earlier one's without a word)."""
    msg = ""
    if ctx.is_main:
        now = _owner_of(out)
        msg = _taken(out, now, token) if now is not None and now != token else ""
    msg = distributed.broadcast_object(msg)
    if msg:
        raise UserError(msg)


def discard_checkpoints(out: str) -> int:
    """Delete the training checkpoints under ``OUT/checkpoints`` (``--no-resume``: start over), with a
    warning saying how many; returns that number."""
    old = list_checkpoints(out)
    if old:
        log.warning("--no-resume: removing %d training checkpoint(s) of the previous run under %s/%s",
                    len(old), out, _CKPT_DIR)
    for _s, uri in old:
        storage.delete(uri)
    return len(old)


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """``[(step, uri), ...]`` newest first."""
    found = []
    for uri in storage.list_uris(storage.join(out, _CKPT_DIR), suffix=".pt"):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("step-") and name[5:-3].isdigit():
            found.append((int(name[5:-3]), uri))
    return sorted(found, reverse=True)


def latest_checkpoint(out: str, unverified: set[str] | None = None) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint under ``OUT/checkpoints`` that verifies; corrupt ones are skipped with a
    warning (never loaded) and added to ``unverified``."""
    for _step, uri in list_checkpoints(out):
        try:
            return uri, decode_train_state(storage.read_bytes(uri), uri)
        except (CheckpointError, FileNotFoundError) as err:
            log.warning("skipping training checkpoint %s: %s", uri, err)
            if unverified is not None:
                unverified.add(uri)
    return None


def _rng_state(device: torch.device) -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
          "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((st["python_version"], tuple(st["python"]), st["python_gauss"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


# ----------------------------------------------------------------------------------------- SIGTERM
class _Sigterm:
    """Remembers a SIGTERM instead of dying, so the loop can checkpoint first (main thread only:
    elsewhere, e.g. inside a Ray Train worker thread, Ray's own failure handling applies)."""

    def __init__(self, enabled: bool) -> None:
        self.flag = False
        self.prev = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.enabled:
            self.prev = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self.prev)


class _SigtermOutsideSteps(_Sigterm):
    """Outside the training steps (start-up, calibration, the final evaluation) a SIGTERM still ends
    the process as the signal does (exit 143, so a launcher retries), but says so first: nothing is
    checkpointed at that point, a restart resumes from the latest checkpoint under --out, if any."""

    def _handle(self, signum, frame) -> None:
        import sys

        print("preempted: SIGTERM outside the training steps (start-up, calibration or final evaluation): "
              "no checkpoint written now; a restart resumes from the latest checkpoint under --out, or starts "
              "over when there is none", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


# ----------------------------------------------------------------------------------------- the loop
@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    consumed: int = 0  # samples of this epoch's permutation done (all ranks)
    metrics: list[dict] = field(default_factory=list)
    train_s: float = 0.0  # training time of earlier invocations of this run (resumes add theirs)


def run_qat(recipe: Recipe, train: Any, evald: Any | None, out: str, opts: QATOptions | None = None) -> dict:
    """Quantization-aware training of ``recipe`` on ``train`` (a :class:`~quantcore.pipeline.DataSpec`),
    validated and reported on ``evald``; artifacts under ``out`` (local path or s3:// prefix).

    Returns the report dict (same on every rank). Raises :class:`Preempted` after a SIGTERM
    checkpoint, :class:`~quantcore.errors.UserError` for a bad recipe/data/option.
    """
    opts = opts or QATOptions()
    ctx = distributed.setup(opts.device)
    try:
        with _SigtermOutsideSteps(opts.handle_sigterm):
            return _run(recipe, train, evald, out, opts, ctx)
    finally:
        distributed.teardown(ctx)


def _ptq_uri(out: str) -> str:
    """Where a run keeps its calibrated start (written once it has claimed ``--out``, read on resume)."""
    return storage.join(out, "ptq", "model.qc.pt")


def _start_point(recipe: Recipe, cfg: QATConfig, train: Any, opts: QATOptions, ctx: distributed.DistContext,
                 out: str, resuming: bool, eval_classes: int | None = None
                 ) -> tuple[nn.Module, nn.Module, dict, nn.Module | None, dict | None]:
    """(FP32 model, calibrated model, calibration info, teacher, what to save with the calibrated model
    as ``OUT/ptq/model.qc.pt``: None when resuming), on ``ctx.device``. Everything that can be refused
    (distillation, teacher, BatchNorm options) is checked before calibrating. Nothing is written: the
    caller saves the start once the run has claimed ``--out``."""
    from .data import class_names, eval_transform, make_loader, open_dataset
    from .pipeline import _calibration_indices, random_weights_warning

    if opts.init:
        model = api.load(opts.init)
        _check_init(recipe, model.quantcore_recipe, opts.init)
        if (model.quantcore_meta.get("extra") or {}).get("qat"):
            raise UserError(f"--init {opts.init}: this checkpoint was trained by QAT, so its float path is the "
                            "trained weights, not the FP32 model: they would be the teacher (distillation from the "
                            "model itself) and the report's fp32 row. Start from that run's PTQ checkpoint "
                            "(<its --out>/ptq/model.qc.pt) or the FP32 weights (--checkpoint); to train longer, run QAT "
                            "again from that start with more qat.epochs into a new --out (a run's schedule spans its "
                            "epochs, so an --out is not resumed with another count)")
        if getattr(model.quantcore_recipe, "reconstruction", None) is not None:
            raise UserError(f"--init {opts.init}: its weights were rewritten by reconstruction (AdaRound/BRECQ) onto "
                            "their grid, so its float path is not the FP32 model the teacher and the report need; "
                            "start from the FP32 weights instead (--checkpoint, or the recipe's model.checkpoint): "
                            "the recipe's reconstruction runs again when QAT calibrates")
        fp32 = copy.deepcopy(model)
        api.set_quantization(fp32, False)  # the checkpoint's own float path
        fp32 = fp32.to(ctx.device).eval()
        teacher = _prechecks(cfg, fp32, ctx.device, eval_classes)
        info = dict(model.quantcore_meta.get("extra", {}).get("calibration") or {}, init=opts.init)
        info.pop("start_warnings", None)  # a QAT run's own, never the start's
        from .placement import unequal_shared_ranges, unify_shared_ranges

        unequal = unequal_shared_ranges(model)
        if unequal:  # the trained model must keep the deployed constraint: one range per group
            unify_shared_ranges(model)
            info["start_warnings"] = [
                f"--init {opts.init}: quantizers {', '.join(g)} were calibrated with different ranges (by an older "
                f"quantcore) but share one range here: QAT starts them from the union of their ranges, and the PTQ "
                f"figures are those of the unified model" for g in unequal]
        # (the warnings are this run's, not the checkpoint's)
        ptq_extra = None if resuming else {"calibration": {k: v for k, v in info.items() if k != "start_warnings"}}
        return fp32, model.to(ctx.device), info, teacher, ptq_extra
    if recipe.model is None:
        raise UserError(f"recipe {recipe.name!r}: model.name is missing (no model: section) and no --init "
                        f"checkpoint was given: there is no model to train")
    torch.manual_seed(cfg.seed)  # a randomly initialized model is the same on every rank
    fp32 = api.build_model(recipe).to(ctx.device).eval()
    if getattr(fp32, "quantcore_weights", "") is None and ctx.is_main:
        log.warning(random_weights_warning(recipe, seed=cfg.seed))
    teacher = _prechecks(cfg, fp32, ctx.device, eval_classes, fold_bn=recipe.placement.fold_bn)
    if resuming:
        try:
            model = api.load(_ptq_uri(out)).to(ctx.device)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; it is the calibrated start of the run whose training checkpoints are "
                                  f"under {out}/checkpoints: restore it, or start over with --no-resume or "
                                  f"another --out") from None
        return fp32, model, dict(model.quantcore_meta.get("extra", {}).get("calibration") or {}), teacher, None
    ds = open_dataset(train.uri, train.split, eval_transform(fp32), layout=train.layout, skip_bad=train.skip_bad,
                      cache_dir=train.cache_dir)
    # whole batches per rank: each rank computes exactly the batches one process would (bitwise ranges)
    idx = distributed.shard_batches(_calibration_indices(ds, recipe), recipe.calibration.batch_size)
    model = api.prepare(copy.deepcopy(fp32), recipe)
    loader = make_loader(ds, recipe.calibration.batch_size, _workers(opts, recipe), indices=idx)
    res = api.calibrate(model, loader)  # + the recipe's reparam/reconstruction
    from .pipeline import _dedupe, _gather_skipped

    cal_skipped = _gather_skipped(_dedupe([_skip_dict(s) for s in loader.skipped.as_list()]))
    used = api.calibrators_used(model)  # what ran, after quant sections and overrides
    info = {"method": api.method_summary(used), "weights_method": api.method_summary(used, "weight"),
            "calibrators": used, "uri": storage.absolute(train.uri), "split": train.split, "images": res.images,
            "skipped": cal_skipped,
            "batches": res.batches, "seed": recipe.calibration.seed, "collect_s": res.collect_s,
            "finalize_s": res.finalize_s, "uncalibrated": res.uncalibrated,
            "fp32_weights": getattr(fp32, "quantcore_weights", "given"), "classes": class_names(ds),
            **res.transforms}
    return fp32, model, info, teacher, {"calibration": copy.deepcopy(info)}


# Fields of a recipe that may change between a run and its resumption (they do not change the
# trained weights); anything else is another run and is refused.
_RESUMABLE_CHANGES = ("eval_every", "eval_limit", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers",
                      "compile")  # compile: the same math (to rounding); a run whose compilation fails resumes eagerly


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    return [] if a == b else [path or "<recipe>"]


def _check_same_run(stored_json: str, recipe: Recipe, uri: str) -> None:
    stored = json.loads(stored_json)
    now = recipe.model_dump(mode="json")
    for d in (stored, now):
        # neither changes what is trained; a file named after its stem, renamed between a preemption and
        # the retry (or an unnamed one stored as 'custom'), resumes
        d.pop("description", None)
        d.pop("name", None)
        for k in _RESUMABLE_CHANGES:
            (d.get("qat") or {}).pop(k, None)
    diff = _diff(stored, now)
    if diff:
        raise CheckpointError(f"--out holds training checkpoints of another run ({uri}): the recipe differs in "
                              f"{', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}; resuming would mix both. "
                              f"Use another --out, or --no-resume to discard them")


def _data_identity(train: Any) -> dict[str, Any]:
    """What decides the training samples (a cache directory does not)."""
    return {"uri": _location(str(train.uri)), "split": str(train.split),
            "layout": str(getattr(train, "layout", "auto")), "skip_bad": bool(getattr(train, "skip_bad", False))}


def _location(uri: str) -> str:
    """The data's location however it is spelled (``d``, ``./d/``, ``file:///abs/d``: one folder)."""
    try:
        return storage.location(uri)
    except ValueError:
        return uri


def _sample_identity(ds: Any) -> dict[str, Any]:
    """How many samples the training split holds and a SHA-256 of their names and labels: images
    added, removed or relabelled under the same URI make another run (the epoch's order and the
    schedule's length depend on them). An image rewritten under its own name is not detected."""
    h = hashlib.sha256()
    for name, label in zip(getattr(ds, "samples", []), getattr(ds, "labels", [])):
        h.update(f"{name}\t{label}\n".encode("utf-8", "surrogateescape"))  # undecodable names: their bytes
    return {"samples": len(ds), "index_sha256": h.hexdigest()}


def _start_identity(init: str | None, fp32: nn.Module, teacher: nn.Module | None = None) -> dict[str, Any]:
    """What the run starts from: the ``--init`` checkpoint (or none), a digest of the FP32 weights
    (the float reference, and the teacher by default) and of a separate teacher's weights, so a resume
    cannot swap any of them."""
    from .checkpoint import _digest

    out = {"init": None if init is None else str(init), "fp32_sha256": _digest({}, fp32.state_dict())}
    try:  # the student's own preprocessing (an HF preprocessor_config.json, a timm data config): the final
        # evaluation reads it again, so a resume after it changed would report on other inputs
        from .data import describe_transform

        seen = describe_transform(fp32)
        out["student_inputs"] = {k: seen[k] for k in sorted(seen) if k not in ("decoder", "source")}
    except Exception:  # noqa: BLE001 - a model without a transform quantcore can describe: not compared
        pass
    if teacher is not None and teacher is not fp32:
        inner = teacher.inner if isinstance(teacher, TeacherInputs) else teacher  # its weights, not the wrapper's
        out["teacher_sha256"] = _digest({}, inner.state_dict())
        out["teacher_inputs"] = teacher.describe() if isinstance(teacher, TeacherInputs) else None
    return out


def _check_same_start(state: dict[str, Any], start: dict[str, Any], uri: str) -> None:
    stored = state.get("start")
    if stored is None:  # written before the start was recorded
        return
    if (stored.get("init") is None) != (start["init"] is None):  # the same file may be spelled otherwise
        raise CheckpointError(f"--out holds training checkpoints of a run started from --init "
                              f"{stored.get('init')!r} ({uri}); this one gives --init {start['init']!r}: "
                              f"resuming would train another model. Give the same --init, another --out, "
                              f"or --no-resume to discard them")
    if stored.get("fp32_sha256") != start["fp32_sha256"]:
        what = ("from another --init checkpoint (its weights or calibrated ranges differ" if start["init"] else
                "from other FP32 weights (recipe model.checkpoint / --checkpoint")
        raise CheckpointError(f"--out holds training checkpoints of a run {what}; {uri}): the "
                              f"{'--init checkpoint' if start['init'] else 'model weights'} changed since; resuming "
                              f"would mix both. Restore them, use another --out, or --no-resume to discard them")
    if "student_inputs" in stored and stored["student_inputs"] != start.get("student_inputs"):
        was, now = stored["student_inputs"], start.get("student_inputs") or {}
        diff = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        raise CheckpointError(f"--out holds training checkpoints of a run whose model read its images otherwise "
                              f"({'; '.join(diff[:4])}; {uri}): its preprocessing (the model's data config, an HF "
                              f"preprocessor_config.json) changed since, and the rest of the run and its report would "
                              f"use the new one. Restore it, use another --out, or --no-resume to discard them")
    if "teacher_inputs" in start and stored.get("teacher_inputs") != start["teacher_inputs"]:
        # (a run started before the mapping existed fed the teacher the student's images as they are)
        raise CheckpointError(f"--out holds training checkpoints of a run whose teacher saw its inputs otherwise "
                              f"({stored.get('teacher_inputs') or 'the student images as they are'}; now "
                              f"{start['teacher_inputs'] or 'as they are'}; {uri}): resuming would train the rest "
                              f"of the run on another teacher signal. Use another --out, or --no-resume to "
                              f"discard them")
    if "teacher_sha256" in start and stored.get("teacher_sha256", start["teacher_sha256"]) != start["teacher_sha256"]:
        raise CheckpointError(f"--out holds training checkpoints of a run distilled from other teacher weights "
                              f"({uri}): the weights of qat.distill.teacher changed since; resuming would train "
                              f"the rest of the run on another teacher. Restore them, use another --out, or "
                              f"--no-resume to discard them")


def _check_same_data(state: dict[str, Any], data_id: dict[str, Any], world_size: int, uri: str) -> None:
    """A resume must see the run's own samples and ranks: another split, dataset or rank count would
    continue the stored data position and RNG streams on other data (mixing both runs silently).
    Keys of ``data_id`` the checkpoint does not hold are not compared (older checkpoints)."""
    stored = state.get("data")
    if stored is not None:
        # a stored URI is compared as a location: checkpoints before 2026-12-03 hold it as spelled
        diff = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in data_id.items() if k in stored and
                (_location(str(stored[k])) if k == "uri" else stored.get(k)) != v]
        if diff:
            raise CheckpointError(f"--out holds training checkpoints of a run on other data ({uri}): "
                                  f"{'; '.join(diff)}; resuming would mix both. Use the same data, another "
                                  f"--out, or --no-resume to discard them")
    ws = int(state.get("world_size", world_size))
    if ws != world_size:
        raise CheckpointError(f"training checkpoint {uri} was written by {ws} rank(s), this run has {world_size}: "
                              f"the global batch, data order and per-rank RNG streams would change mid-run. "
                              f"Resume with {ws} rank(s), or start over with --no-resume or another --out")


def _prune_checkpoints(out: str, step: int, keep: int, unverified: set[str] = frozenset()) -> None:
    """Keep the checkpoint just written (``step``) and the ``keep - 1`` newest before it. Files that
    did not verify when this run started (``unverified``; every file with a higher step is one, or it
    would have been resumed) are left in place for inspection and never count against ``keep``, so they
    cannot push a valid checkpoint out."""
    older = [(s, u) for s, u in list_checkpoints(out) if s < step and u not in unverified]
    for _s, old in older[max(keep - 1, 0):]:
        storage.delete(old)


def _check_init(recipe: Recipe, stored: Recipe, uri: str) -> None:
    """``--init``: the checkpoint must be the recipe's model, placement and formats (its calibration is
    used as it is)."""
    a, b = stored.model_dump(mode="json"), recipe.model_dump(mode="json")
    for d in (a, b):
        for k in ("checkpoint", "pretrained", "pretrained_file"):
            (d.get("model") or {}).pop(k, None)
    diff = [f for key in ("model", "placement", "quant", "overrides") for f in _diff(a.get(key), b.get(key), key)]
    if recipe.model is None:
        diff = [f for f in diff if not f.startswith("model")]
    if diff:
        def at(d: Any, path: str) -> Any:
            for k in path.split("."):
                d = d.get(k) if isinstance(d, dict) else None
            return d

        said = "; ".join(f"{f}: {json.dumps(at(a, f))} in the checkpoint, {json.dumps(at(b, f))} here"
                         for f in diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        whose = (f"another version of recipe {recipe.name!r}" if stored.name == recipe.name else
                 f"recipe {stored.name!r}, not {recipe.name!r},")
        raise UserError(f"--init {uri}: the checkpoint was calibrated with {whose} with other settings ({said}); "
                        f"pass the recipe it was made with plus your qat: section")


def _skip_dict(s: Any) -> dict:
    return s.as_dict() if hasattr(s, "as_dict") else dict(s)


def _may_learn(recipe: Recipe) -> bool:
    """Whether any format the recipe uses (its two specs or an override's) has a learnable range."""
    from .quantizer_kinds import quantizer_kind

    fmts = {recipe.weight_spec().format, recipe.activation_spec().format}
    fmts |= {o.spec.format for o in recipe.overrides if o.spec is not None and o.spec.format is not None}
    return any(quantizer_kind(f).supports_learnable for f in fmts)


def _prechecks(cfg: QATConfig, fp32: nn.Module, device: torch.device, eval_classes: int | None = None,
               fold_bn: bool = False) -> nn.Module | None:
    """Refuse options that cannot apply to this model, and build the teacher (checking it can take the
    student's input and gives as many logits) - before any calibration or training. ``eval_classes``:
    the evaluation data's class count, which the model's logits must match (a model with class names
    maps the data's folders by name instead: checked when the data is read)."""
    from .data import model_label_names
    from .placement import unwrap

    if eval_classes is not None and model_label_names(unwrap(fp32)) is None:
        from .placement import default_example_input

        with torch.no_grad():
            got = output_logits(fp32(default_example_input(fp32))).shape[-1]
        if got != eval_classes:
            raise UserError(f"model.num_classes: the model gives {got} logits, but the evaluation data "
                            f"(--eval-data/--eval-split) has {eval_classes} classes; set model.num_classes: "
                            f"{eval_classes} (and weights trained for them), or evaluate on data of this model's "
                            f"{got} classes")
    if cfg.distill.kind.startswith("deit") and not has_distillation_head(fp32):
        raise UserError(f"qat.distill.kind {cfg.distill.kind}: the model has no distillation token with its own "
                        f"head (use a timm *_distilled_* model such as deit_tiny_distilled_patch16_224, or a "
                        f"transformers DeiTForImageClassificationWithTeacher)")
    if cfg.bn != "fold" and not _bn_modules(fp32):
        raise UserError(f"qat.bn: {cfg.bn}: the model has no BatchNorm layer; remove the setting (bn: fold)")
    if cfg.bn != "fold" and fold_bn and not _bn_left_after_folding(fp32):
        raise UserError(f"qat.bn: {cfg.bn} trains BatchNorm layers, but placement.fold_bn: true (the default) "
                        f"folds all {len(_bn_modules(fp32))} of this model's into their convolutions before "
                        f"calibration, leaving none to {'freeze' if cfg.bn == 'freeze' else 'train'}: set "
                        f"placement.fold_bn: false, or qat.bn: fold")
    teacher = _teacher(cfg, fp32, device)
    if teacher is not None and teacher is not fp32:
        from .placement import default_example_input

        x = default_example_input(fp32)
        with torch.no_grad():
            want = output_logits(fp32(x)).shape[-1]
            try:
                got = output_logits(teacher(x.to(device))).shape[-1]
            except Exception as err:
                raise UserError(f"qat.distill.teacher: {cfg.distill.teacher.name} cannot take the student's "
                                f"input {tuple(x.shape)} (the teacher sees the student's images, in its own "
                                f"normalization and input size): {type(err).__name__}: {err}") from None
        if got != want:
            raise UserError(f"qat.distill.teacher: {cfg.distill.teacher.name} gives {got} logits, the student {want}: "
                            f"a teacher must be trained on the student's classes (its num_classes, or "
                            f"kwargs.num_classes, and its weights)")
    return teacher


def _workers(opts: QATOptions, recipe: Recipe) -> int:
    if opts.num_workers is not None:
        return opts.num_workers
    return recipe.qat.num_workers if recipe.qat else 0


class TeacherInputs(nn.Module):
    """A distillation teacher fed the student's images re-expressed in the teacher's own preprocessing:
    ``(N, C, H, W)`` student-normalized images -> the teacher's mean/std (exact: a per-channel affine
    map ``x * std_s / std_t + (mean_s - mean_t) / std_t``) and, when the input sizes differ, resized to
    the teacher's (``F.interpolate`` with its interpolation, antialiased; an approximation of its own
    resize-and-crop pipeline). ``inner`` is the teacher itself (its weights, its digest)."""

    def __init__(self, inner: nn.Module, scale: torch.Tensor | None, shift: torch.Tensor | None,
                 size: tuple[int, int] | None, interpolation: str) -> None:
        super().__init__()
        self.inner = inner
        self._affine = None if scale is None else (scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1))
        self.size, self.interpolation = size, interpolation

    def describe(self) -> str:
        """What the mapping does, in words (recorded with a run's checkpoints)."""
        parts = []
        if self._affine is not None:
            scale, shift = self._affine
            parts.append(f"x*{[round(float(v), 6) for v in scale.flatten()]}"
                         f"+{[round(float(v), 6) for v in shift.flatten()]}")
        if self.size is not None:
            parts.append(f"resized to {self.size[0]}x{self.size[1]} ({self.interpolation})")
        return ", ".join(parts)

    def forward(self, x: torch.Tensor) -> Any:
        if self._affine is not None:
            scale, shift = self._affine
            x = x * scale.to(x.device, x.dtype) + shift.to(x.device, x.dtype)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode=self.interpolation, align_corners=False, antialias=True)
        return self.inner(x)


def _config_describes_weights(mcfg: Any, teacher: nn.Module) -> bool:
    """Whether the teacher's data config says how its weights were trained: torchvision weights, a
    Hugging Face processor, a builder's own config, timm pretrained weights or a user's
    ``kwargs.pretrained_cfg_overlay``; not timm's default for the architecture under weights from
    ``model.checkpoint`` (a CNN trained on 28x28 images still says 224 there)."""
    from .data.transforms import has_data_config
    from .model_sources import resolve_source

    if not has_data_config(teacher):
        return False
    try:
        source, _ = resolve_source(mcfg)
    except Exception:  # noqa: BLE001 - it was built from this config a moment ago; be conservative
        return False
    if source.name != "timm":
        return True
    overlay = (getattr(mcfg, "kwargs", None) or {}).get("pretrained_cfg_overlay") or {}
    return bool(mcfg.pretrained or mcfg.pretrained_file or any(k in overlay for k in ("mean", "std", "input_size")))


def _teacher_inputs(teacher: nn.Module, fp32: nn.Module, name: str,
                    describes_weights: bool | None = None) -> nn.Module:
    """``teacher`` wrapped in :class:`TeacherInputs` when its preprocessing differs from the student's
    (what the student's images are normalized and sized by); as is when they agree, or when the
    teacher's data config does not say how its weights were trained (``describes_weights`` False:
    :func:`_config_describes_weights`; None: whenever it has one), said once when it differs. Raises
    UserError when the channel counts differ (nothing maps one onto the other)."""
    from .data.transforms import describe_transform, has_data_config
    from .placement import unwrap

    if describes_weights is None:
        describes_weights = has_data_config(teacher)
    if not has_data_config(teacher):
        log.warning("qat.distill.teacher: %s carries no preprocessing config (timm pretrained_cfg, torchvision "
                    "weights, Hugging Face processor), so it sees the student's images as they are; give it "
                    "one (a timm name, torchvision:<name> or an HF directory) if it was trained on other "
                    "normalization or size", name)
        return teacher
    s, t = describe_transform(unwrap(fp32)), describe_transform(teacher)
    cs, ct = int(s["input_size"][0]), int(t["input_size"][0])
    if cs != ct:
        raise UserError(f"qat.distill.teacher: {name} takes {ct}-channel images, the student {cs}-channel ones; "
                        f"a teacher must see the student's images")
    ms, ss = torch.tensor(s["mean"], dtype=torch.float64), torch.tensor(s["std"], dtype=torch.float64)
    mt, st = torch.tensor(t["mean"], dtype=torch.float64), torch.tensor(t["std"], dtype=torch.float64)
    renorm = not (torch.equal(ms, mt) and torch.equal(ss, st))
    size_s, size_t = tuple(int(v) for v in s["input_size"][1:]), tuple(int(v) for v in t["input_size"][1:])
    resize = size_s != size_t
    if not renorm and not resize:
        return teacher
    if not describes_weights:
        log.warning("qat.distill.teacher: %s has weights from model.checkpoint and timm's default preprocessing "
                    "for its architecture (%s, mean/std %s/%s), which says nothing about how they were trained: "
                    "it sees the student's images as they are (%s, mean/std %s/%s). If it was trained otherwise, "
                    "say how in its kwargs.pretrained_cfg_overlay {input_size, mean, std}, and its inputs are "
                    "mapped to that", name, "x".join(map(str, t["input_size"])), t["mean"], t["std"],
                    "x".join(map(str, s["input_size"])), s["mean"], s["std"])
        return teacher
    said = []
    if renorm:
        said.append(f"renormalized from the student's mean/std {s['mean']}/{s['std']} to its own {t['mean']}/"
                    f"{t['std']} (exact)")
    interp = t.get("interpolation") if t.get("interpolation") in ("bilinear", "bicubic") else "bilinear"
    if resize:
        said.append(f"resized from {size_s[0]}x{size_s[1]} to its input size {size_t[0]}x{size_t[1]} ({interp}, "
                    f"antialiased; its own pipeline would resize and crop the original image instead)")
    (log.warning if resize else log.info)("qat.distill.teacher: %s sees the student's images %s", name,
                                          " and ".join(said))
    return TeacherInputs(teacher, (ss / st).float() if renorm else None, ((ms - mt) / st).float() if renorm else None,
                         size_t if resize else None, interp)


def _teacher(cfg: QATConfig, fp32: nn.Module, device: torch.device) -> nn.Module | None:
    if cfg.distill.kind == "none":
        return None
    if cfg.distill.teacher is None:
        t = fp32
    else:
        from .models import create_model

        try:
            t = create_model(cfg.distill.teacher)
        except UserError as err:
            raise UserError(f"qat.distill.teacher: {err}") from None
        if getattr(t, "quantcore_weights", "") is None:
            raise UserError(f"qat.distill.teacher: {cfg.distill.teacher.name} has no weights (set checkpoint, "
                            f"pretrained or pretrained_file): a random teacher would teach noise")
    t = t.to(device).eval()
    if t is not fp32:  # (the FP32 model is copied into the student later: its flags must stay as they are)
        for p in t.parameters():
            p.requires_grad_(False)
        t = _teacher_inputs(t, fp32, cfg.distill.teacher.name, _config_describes_weights(cfg.distill.teacher, t))
    return t


def _run(recipe: Recipe, train: Any, evald: Any | None, out: str, opts: QATOptions,
         ctx: distributed.DistContext) -> dict:
    from .data import (DataError, class_mismatch, class_names, label_notes, model_label_names, open_dataset,
                       unused_files, unused_files_warning)
    from .data.transforms import train_transform
    from .placement import unwrap

    from .pipeline import _with_checkpoint, check_cache_dir, check_out

    check_start(opts.init, opts.checkpoint)
    cfg = _qat_config(recipe, opts)
    recipe = recipe.model_copy(update={"qat": cfg})
    if cfg.ranges == "learned" and not _may_learn(recipe):  # before calibrating; checked again on the model
        raise UserError(f"recipe {recipe.name!r}: qat.ranges: learned (the default), but none of its formats "
                        f"has a learnable range ({_unlearnable_formats()}); set "
                        "qat.ranges: frozen" + (" and drop optimizer.range_lr" if cfg.optimizer.range_lr else ""))
    if not opts.init:
        recipe = _with_checkpoint(recipe, opts.checkpoint)
    check_cache_dir(train, evald)
    check_out(out)
    dev = ctx.device
    if cfg.compile:
        _check_compiler(recipe, dev)
    # --no-resume under a torchrun restart resumes only once this run's first start has discarded the
    # old checkpoints (its marker): a rank that died before that would otherwise resume the old run
    resume = opts.resume or (_torchrun_restart() > 0 and _discarded_by_this_run(out))
    if resume and not opts.resume:
        log.info("--no-resume: restart %d of this run by torchrun, which resumes from the run's own checkpoints "
                 "(the earlier ones were discarded at its first start)", _torchrun_restart())
    # (--no-resume's discard and the removal of unfinished writes wait for this run's claim of --out: a run
    # refused at start-up must not delete what another run writes there)
    unverified: set[str] = set()  # checkpoint files skipped as corrupt: never pruned, never counted
    found = latest_checkpoint(out, unverified) if (resume and ctx.is_main) else None
    ckpt_uri = distributed.broadcast_object(found[0] if found else None)
    if ckpt_uri is not None and found is None:  # other ranks read the one rank 0 chose
        found = (ckpt_uri, decode_train_state(storage.read_bytes(ckpt_uri), ckpt_uri))
    state_in = found[1] if found else None
    data_id = _data_identity(train)
    if state_in is not None:
        _check_same_run(state_in["recipe"], recipe, ckpt_uri)
        _check_same_data(state_in, data_id, ctx.world_size, ckpt_uri)
        if ctx.is_main:
            log.warning("resuming from %s (step %d)", ckpt_uri, state_in["step"])

    eval_classes = None
    if evald is not None:  # a missing evaluation split (or class count) is found now, not after training
        eval_classes = open_dataset(evald.uri, evald.split, None, layout=evald.layout, skip_bad=evald.skip_bad,
                                    cache_dir=evald.cache_dir).num_classes
    fp32, model, cal_info, teacher, ptq_extra = _start_point(recipe, cfg, train, opts, ctx, out,
                                                             resuming=state_in is not None, eval_classes=eval_classes)
    start_id = _start_identity(opts.init, fp32, teacher)
    if state_in is not None:
        _check_same_start(state_in, start_id, ckpt_uri)
    ptq_model = copy.deepcopy(model).eval()
    for p in ptq_model.parameters():
        p.requires_grad_(False)
    learned = learnable_quantizers(model, cfg.learn_zero_point) if cfg.ranges == "learned" else []
    if cfg.ranges == "learned" and not learned:
        raise UserError(f"recipe {recipe.name!r}: qat.ranges: learned (the default), but no quantizer of this "
                        "model has a learnable range (float casts such as fp16/bf16, or grids without one); set "
                        "qat.ranges: frozen" + (" and drop optimizer.range_lr" if cfg.optimizer.range_lr else ""))
    if learned and not cfg.learn_zero_point and all(api.quantizers(model)[n].spec.symmetric for n in learned):
        raise UserError(f"recipe {recipe.name!r}: qat.learn_zero_point: false, but every quantizer with a learned "
                        "range is symmetric (zero point 0, never learned); drop learn_zero_point")
    model.to(dev)
    if cfg.distill.kind.startswith("deit") and hasattr(unwrap(model), "set_distilled_training"):
        unwrap(model).set_distilled_training(True)  # timm; transformers' DeiT always returns both heads

    ds = open_dataset(train.uri, train.split, train_transform(unwrap(model), cfg.augment), layout=train.layout,
                      skip_bad=train.skip_bad, cache_dir=train.cache_dir, label_names=model_label_names(unwrap(fp32)))
    samples = SeededSamples(ds, cfg.seed)
    n = len(ds)
    data_id = {**data_id, **_sample_identity(ds)}
    if state_in is not None:
        _check_same_data(state_in, data_id, ctx.world_size, ckpt_uri)
    gb = cfg.batch_size * ctx.world_size
    steps_per_epoch = (n + gb - 1) // gb
    total_steps = cfg.epochs * steps_per_epoch
    # settings that do not act as written: logged (once, not per resume) and kept for the report
    setup_warnings: list[str] = []

    def setup_warning(msg: str) -> None:
        setup_warnings.append(msg)
        if ctx.is_main and state_in is None:
            log.warning("%s", msg)

    for msg in cal_info.pop("start_warnings", []):
        setup_warning(msg)
    if learned:  # quantizers on a grid with no learnable form keep their calibrated range: said, not silent
        frozen = {}
        for qn, qq in api.quantizers(model).items():
            if qq.spec.on_grid and qq.is_calibrated and not qq.spec.kind.supports_learnable:
                frozen.setdefault(qq.spec.format, []).append(qn)
        for fmt, qnames in frozen.items():
            setup_warning(f"qat.ranges: learned: {len(qnames)} quantizer(s) of format {fmt!r} have no learnable "
                          f"range and keep their calibrated one (e.g. {qnames[0]!r}); only format 'int' "
                          f"quantizers learn theirs")

    if cfg.max_steps is not None:
        if cfg.max_steps > total_steps:
            setup_warning(f"qat.max_steps {cfg.max_steps}: the run has {total_steps} steps ({cfg.epochs} epochs x "
                          f"{steps_per_epoch} steps of {min(gb, n)} images over {ctx.world_size} rank(s)), so the cap "
                          f"is never reached; it trains {total_steps}")
        total_steps = min(total_steps, cfg.max_steps)
    example_shape = list(getattr(unwrap(model).quantcore_placement, "example_input_shape", []) or [])
    _check_bn_step_sizes(recipe, cfg, model, n, ctx.world_size, steps_per_epoch, total_steps, example_shape, dev)

    net: nn.Module = model
    if ctx.is_distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                  static_graph=True)
        if torch.distributed.get_backend() == "gloo" and ctx.world_size > 2:  # (2 ranks: a + b either way)
            net.register_comm_hook(None, distributed.ordered_mean_hook)
    if cfg.compile:  # training forward/backward only: validation, checkpoints and the report use `model`
        net = compile_for_training(net)
    opt = _optimizer(_param_groups(model, cfg), cfg)
    sched = _scheduler(opt, cfg, total_steps)
    amp = _amp_dtype(cfg, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    st = _State()
    torch.manual_seed(cfg.seed + 7919 * ctx.rank)  # dropout / drop-path streams differ per rank
    random.seed(cfg.seed + 7919 * ctx.rank)
    if state_in is not None:
        if set(state_in.get("learned", [])) != set(learned):
            raise CheckpointError(f"training checkpoint {ckpt_uri} was written with other learned quantizers "
                                  f"(recipe qat.ranges changed?); start a new --out or pass --no-resume")
        from .checkpoint import load_state_strict

        load_state_strict(model, state_in["model"], ckpt_uri)
        groups = _group_layout(model, opt)
        older = ("it was written by an older quantcore (its optimizer parameter groups differ from this version's); "
                 "finish it with that version, or start a new --out or pass --no-resume")
        if "param_groups" in state_in and state_in["param_groups"] != groups:
            raise CheckpointError(f"training checkpoint {ckpt_uri}: the optimizer's parameter groups differ from "
                                  f"this run's (recipe qat.optimizer or the quantizers changed?); start a new --out "
                                  f"or pass --no-resume")
        if "param_groups" not in state_in and _grouping_changed(state_in["optimizer"], opt):
            # same group count and sizes, other members: loading would give momentum to the wrong tensors
            raise CheckpointError(f"training checkpoint {ckpt_uri} cannot be resumed: {older}")
        try:
            opt.load_state_dict(state_in["optimizer"])
            sched.load_state_dict(state_in["scheduler"])
            scaler.load_state_dict(state_in["scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"training checkpoint {ckpt_uri} cannot be resumed: {older} ({err})") from None
        rngs = state_in["rng"]
        if len(rngs) == ctx.world_size:
            _set_rng_state(rngs[ctx.rank], dev)
        st = _State(int(state_in["step"]), int(state_in["epoch"]), int(state_in["consumed"]),
                    list(state_in["metrics"]), float(state_in.get("train_s", 0.0)))
    if cfg.bn == "freeze" and cfg.bn_freeze_step >= total_steps:
        setup_warning(f"qat.bn_freeze_step {cfg.bn_freeze_step} >= the run's {total_steps} steps: the BatchNorm "
                      f"statistics never freeze (bn: freeze acts as bn: train)")
    if gb > n:
        setup_warning(f"qat.batch_size {cfg.batch_size} x {ctx.world_size} rank(s) = {gb} is larger than the {n} "
                      f"training images: each epoch is one step of {n} images (the global batch)")
    if cfg.schedule.warmup_steps and cfg.schedule.warmup_steps >= total_steps:
        setup_warning(f"qat.schedule.warmup_steps {cfg.schedule.warmup_steps} >= the run's {total_steps} steps: the "
                      f"learning rate never leaves its warm-up ramp")
    # validation runs at eval_every steps and at epoch ends, never at the last step (the final evaluation)
    validates = evald is not None and ((cfg.eval_every is not None and cfg.eval_every < total_steps)
                                       or steps_per_epoch < total_steps)
    asked = [f"{k} {getattr(cfg, k)}" for k in ("eval_every", "eval_limit") if getattr(cfg, k) is not None]
    if asked and not validates:
        why = ("no evaluation data" if evald is None else
               f"eval_every >= the run's {total_steps} steps and one epoch" if cfg.eval_every is not None else
               f"no eval_every and the run's {total_steps} steps are one epoch")
        setup_warning(f"qat.{' and qat.'.join(asked)}: no validation runs during training ({why}); only the final "
                      f"evaluation, on " + ("all images" if opts.eval_limit is None else
                                             f"{opts.eval_limit} images (--eval-limit)"))

    workers = _workers(opts, recipe)
    progress = _progress(total_steps, st.step, opts.progress and ctx.is_main)
    metrics_uri = storage.join(out, "metrics.jsonl")

    window = {"loss": 0.0, "n": 0.0, "images": 0.0, "t": time.perf_counter()}
    if state_in is not None and state_in.get("log_window") and len(state_in["log_window"]) == ctx.world_size:
        # the loss logged next averages the steps since the last log line, those before the restart too
        window.update(loss=float(state_in["log_window"][ctx.rank][0]), n=float(state_in["log_window"][ctx.rank][1]))
    t_train = time.perf_counter()

    # training images skipped (--skip-bad), this rank's, plus every rank's up to the resumed checkpoint
    train_skipped: dict[tuple, dict] = {(r.get("name"), r.get("reason")): r
                                        for r in (state_in or {}).get("train_skipped", [])}

    def all_train_skipped() -> list[dict]:
        from .pipeline import _gather_skipped

        return _gather_skipped(list(train_skipped.values()))

    def save_checkpoint() -> str:
        _sync_bn_statistics(model, cfg)  # a resumed rank continues from the statistics rank 0 saved
        skipped_now = all_train_skipped()
        rngs = distributed.all_gather_object(_rng_state(dev))
        windows = distributed.all_gather_object((window["loss"], window["n"]))
        uri = _ckpt_uri(out, st.step)
        _check_owner(out, owner, ctx)
        if ctx.is_main:
            state = {"format": "quantcore.train-state/1", "step": st.step, "epoch": st.epoch,
                     "consumed": st.consumed, "world_size": ctx.world_size, "learned": learned,
                     "param_groups": _group_layout(model, opt),
                     "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                     "rng": rngs, "metrics": st.metrics, "recipe": json.dumps(recipe.model_dump(mode="json")),
                     "data": data_id, "start": start_id, "log_window": windows, "train_skipped": skipped_now,
                     "train_s": st.train_s + time.perf_counter() - t_train}
            storage.write_bytes(uri, encode_train_state(state))
            unverified.discard(uri)  # a corrupt file of the same step was just replaced
            _prune_checkpoints(out, st.step, cfg.keep_checkpoints, unverified)
            _write_metrics(metrics_uri, st.metrics)
        distributed.barrier()
        return uri

    eval_ctx = _EvalContext(evald, fp32, opts, workers) if evald is not None else None
    # how the data's labels map to the model's classes (open_dataset logged it): kept for the report
    setup_warnings += [f"training data: {n}" for n in label_notes(ds)]
    setup_warnings += [f"evaluation data: {n}" for n in label_notes(eval_ctx.ds)] if eval_ctx is not None else []
    named = (class_names(ds), class_names(eval_ctx.ds)) if eval_ctx is not None else (None, None)
    diff = class_mismatch(*named) if None not in named else None  # made-up names: nothing to compare
    if diff:  # training labels and evaluation labels must be the same classes: label i is class i in both
        raise DataError(f"the training data ({train.uri} split {train.split!r}) and the evaluation data ({evald.uri} "
                        f"split {evald.split!r}) label their classes differently: {diff}; every top-1 would be "
                        "scored against shifted labels. Give both splits the same class folders (or pack them "
                        "with one class list)", file=evald.uri)
    owner = _claim_out(out, ctx)  # every start-up check passed: this run writes --out from here on
    _take_over_out(out, ctx, resume)
    if ptq_extra is not None:  # the calibrated start, written only now that --out is this run's
        if ctx.is_main:
            api.save(ptq_model, _ptq_uri(out), extra=ptq_extra)
        distributed.barrier()
    flag = torch.zeros(2)  # [SIGTERM seen, training diverged], max over ranks
    with _Sigterm(opts.handle_sigterm) as sigterm, progress:
        while st.step < total_steps:
            batches = distributed.epoch_batches(n, cfg.batch_size, ctx.world_size, ctx.rank, cfg.seed, st.epoch,
                                                start=st.consumed)
            loader = _train_loader(samples, [b for b, _ in batches], st.epoch, workers)
            _set_train_mode(net, cfg, st.step)
            for (_idx, global_count), (images, labels, skipped) in zip(batches, loader):
                norm_count = global_count
                if train.skip_bad:  # the loss averages the images the step really has, all ranks together
                    for s in skipped or []:
                        r = _skip_dict(s)
                        train_skipped.setdefault((r.get("name"), r.get("reason")), r)
                    good = torch.tensor([0.0 if images is None else float(images.shape[0])])
                    norm_count = max(int(distributed.all_reduce(good, "sum").item()), 1)
                loss_sum = _train_step(net, teacher, images, labels, norm_count, ctx, cfg, opt, sched, scaler,
                                       amp, example_shape, model)
                st.step += 1
                st.consumed += global_count
                # with FP16's grad scaler a non-finite step is skipped (weights untouched); otherwise the
                # weights are NaN from here on: stop, on every rank, before anything is saved or logged
                bad = not math.isfinite(loss_sum)
                flag[1] = float(bad and (not scaler.is_enabled() or not _finite_parameters(model)))
                if not bad:  # a step the grad scaler skipped has no loss to average
                    window["loss"] += loss_sum
                    window["n"] += 0 if images is None else images.shape[0]
                if cfg.bn == "freeze" and st.step == cfg.bn_freeze_step:
                    _set_train_mode(net, cfg, st.step)
                progress.update(1)
                last = st.step >= total_steps
                if st.step % cfg.log_every == 0 or last:
                    m = _log_metrics(st, window, opt, ctx, n)
                    progress.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                    if opts.on_log is not None:
                        opts.on_log(dict(m))
                # not at an epoch's last step: the epoch end validates (once)
                if eval_ctx is not None and cfg.eval_every and st.step % cfg.eval_every == 0 and not last \
                        and st.consumed < n:
                    _validate(st, eval_ctx, model, cfg, ctx, opts, n)
                    _set_train_mode(net, cfg, st.step)
                flag[0] = float(sigterm.flag)
                flags = distributed.all_reduce(flag, "max")
                if flags[1] > 0:
                    raise Diverged(st.step, float(opt.param_groups[0]["lr"]), recipe.name,
                                   _latest_saved(out, st.step))
                if flags[0] > 0:
                    uri = save_checkpoint()
                    raise Preempted(st.step, uri)
                if st.step % cfg.checkpoint_every == 0 or last:  # last: a restart during the final
                    save_checkpoint()                             # evaluation does not train again
                if last:
                    break
            if st.consumed >= n:  # epoch finished
                st.epoch += 1
                st.consumed = 0
                if eval_ctx is not None and st.step < total_steps:
                    _validate(st, eval_ctx, model, cfg, ctx, opts, n)
                    _set_train_mode(net, cfg, st.step)
                if st.step < total_steps:
                    save_checkpoint()
    if st.consumed >= n:  # resumed from the final checkpoint, written before its epoch was counted
        st.epoch, st.consumed = st.epoch + 1, 0
    model.eval()
    _sync_bn_statistics(model, cfg)  # every rank evaluates the model rank 0 saves
    _representable_scales(model)
    api.convert(model)
    if cfg.distill.kind.startswith("deit") and hasattr(unwrap(model), "set_distilled_training"):
        unwrap(model).set_distilled_training(False)
    train_s = st.train_s + time.perf_counter() - t_train  # every invocation's training, not start-up
    cal_info = {**cal_info, "train_skipped": all_train_skipped(),
                "train_unused": (unused_files_warning(ds), unused_files(ds))}  # popped by _finish
    cal_info["setup_warnings"] = setup_warnings  # popped by _finish into the report's warnings
    cal_info["train_images"] = n  # popped by _finish: the global batch actually used
    _check_owner(out, owner, ctx)  # the results of a run whose --out another run took are not written
    return _finish(recipe, cfg, fp32, ptq_model, model, train, evald, out, opts, ctx, st, cal_info, learned,
                   train_s)


def compile_for_training(net: nn.Module) -> nn.Module:
    """``torch.compile`` of the training forward/backward (``qat.compile``). With float-cast quantizers
    (FP16/BF16 formats) Inductor is told to keep eager's rounding of low-precision casts: by default it
    elides a ``float32 -> float16/bfloat16 -> float32`` round trip, which is the whole of such a quantizer
    (``x.to(fp16).to(x.dtype)``), so the compiled model would train in FP32 while the deployed one runs
    FP16. So do plug-in kinds (their ``fake_quant`` may cast). Built-in integer grids round explicitly and
    compile with the defaults (what docs/benchmarks.md measured). Returns torch's ``OptimizedModule``
    around ``net`` (compilation happens at its first call; errors then are Inductor's)."""
    from .plugins import is_plugin

    casts = any(q.spec.enabled and (q.spec.kind.is_float or is_plugin(q.spec.kind))
                for q in api.quantizers(net).values())
    return torch.compile(net, options={"emulate_precision_casts": True} if casts else None)


def _check_compiler(recipe: Recipe, device: torch.device) -> None:
    """``qat.compile``: compile a tiny function on ``device`` first, so a machine that cannot (no C++
    compiler for the CPU, no Triton for the GPU) is told before calibration, naming the field, instead
    of failing at the first training step with Inductor's traceback."""
    try:
        torch.compile(lambda t: t * 2.0 + 1.0)(torch.ones(4, device=device))
    except Exception as err:  # noqa: BLE001 - any backend failure means the option cannot apply here
        why = " ".join(str(err).split())[:300]  # Inductor's messages run over many lines
        raise UserError(f"recipe {recipe.name!r}: qat.compile: true, but torch.compile cannot build code on "
                        f"this machine ({type(err).__name__}: {why}); install what it "
                        "names (a C++ compiler on the CPU, Triton on a GPU) or set qat.compile: false") from None


def _train_step(net, teacher, images, labels, global_count, ctx, cfg, opt, sched, scaler, amp, example_shape,
                model) -> float:
    dev = ctx.device
    empty = images is None or images.shape[0] == 0
    if empty:  # this rank's share of a short last batch is empty: run a zero-weight step (DDP needs one)
        images = torch.zeros([1] + example_shape[1:], device=dev)
        labels = torch.zeros(1, dtype=torch.long, device=dev)
    else:
        images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
    ac = torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    # the zero-weight step's placeholder image must not move BatchNorm running statistics
    kept = [(b, b.detach().clone()) for m in _bn_modules(model) if m.training for b in m.buffers()] if empty else []
    with ac:
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(images)
                t_logits = output_logits(t_out).float()  # a Hugging Face teacher returns a ModelOutput
        out = net(images)
        per = per_sample_loss(out, labels, t_logits, cfg)
    with torch.no_grad():
        for b, saved in kept:
            b.copy_(saved)
    # sum / global batch * world: DDP's gradient average then equals the global batch's mean gradient
    weight = 0.0 if empty else float(ctx.world_size) / float(global_count)
    loss = per.sum() * weight
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.clip_grad_norm is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
    scaler.step(opt)
    scaler.update()
    sched.step()
    _clamp_ranges(model)
    return 0.0 if empty else float(per.detach().sum())


@torch.no_grad()
def _clamp_ranges(model: nn.Module) -> None:
    """Keep learned scales positive and zero points on the grid (torch's learnable ops need it)."""
    from .quantizer import _MIN_SCALE, TensorQuantizer

    for q in model.modules():
        if isinstance(q, TensorQuantizer) and q.scale is not None:
            q.scale.clamp_(min=_MIN_SCALE)
            lo, hi = q.spec.qrange()
            q.zero_point.clamp_(lo, hi)


@torch.no_grad()
def _representable_scales(model: nn.Module) -> None:
    """Once, after the last step: each learned scale becomes one that ``convert`` writes back exactly
    (:func:`~quantcore.quantizer.representable_scale`, at most one float32 ulp away), so the learnable
    model and the converted one compute the same. Not per step: it would add ~6 % to a QAT step."""
    from .quantizer import TensorQuantizer, representable_scale

    for q in model.modules():
        if isinstance(q, TensorQuantizer) and q.scale is not None:
            lo, hi = q.spec.qrange()
            q.scale.copy_(representable_scale(q.scale.float(), q.zero_point.round(), lo, hi, q.spec.symmetric))


def _log_metrics(st: _State, window: dict, opt, ctx, n: int) -> dict:
    t = torch.tensor([window["loss"], window["n"]], dtype=torch.float64)
    distributed.all_reduce(t)
    dt = max(time.perf_counter() - window["t"], 1e-9)
    # a window of FP16 steps the grad scaler all skipped has no loss: NaN here, null in metrics.jsonl
    m = {"step": st.step, "epoch": st.epoch + st.consumed / max(n, 1),
         "loss": float(t[0] / t[1]) if t[1] > 0 else math.nan,
         "lr": float(opt.param_groups[0]["lr"]), "images_per_s": float(t[1]) / dt, "time": time.time()}
    st.metrics.append(m)
    window.update(loss=0.0, n=0.0, t=time.perf_counter())
    return m


class _progress:
    """A tqdm bar over optimizer steps on rank 0 (no-op elsewhere)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="qat", unit="step", dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)

    def set_postfix(self, **kw) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw, refresh=False)


def _write_metrics(uri: str, metrics: list[dict]) -> None:
    """JSON lines, strict JSON: a non-finite number (a window of skipped FP16 steps) is written as null."""
    def strict(m: dict) -> dict:
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}

    storage.write_bytes(uri, "".join(json.dumps(strict(m), allow_nan=False) + "\n" for m in metrics).encode())


def _finite_parameters(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _latest_saved(out: str, step: int) -> str | None:
    """The newest training checkpoint before ``step`` (for the divergence message), None if none."""
    try:
        found = [(s, uri) for s, uri in list_checkpoints(out) if s < step]
    except Exception:  # noqa: BLE001 - only a hint in an error message
        return None
    return max(found)[1] if found else None


class Diverged(UserError):
    """The QAT loss became inf/NaN and the weights with it: the recipe's step sizes, not a transient
    fault (a restart would diverge again from the last checkpoint), hence a user error (exit 2)."""

    def __init__(self, step: int, lr: float, recipe: str, last: str | None) -> None:
        self.step = step
        super().__init__(
            f"recipe {recipe!r}: the QAT loss became inf/NaN at step {step} (lr {lr:.3g}) and the weights with it: "
            "training diverged. Lower qat.optimizer.lr or qat.optimizer.range_lr, set qat.clip_grad_norm, or "
            "check the data; nothing of this step was saved"
            + (f" (the last checkpoint, {last}, is from before it; start over with --no-resume after "
               "changing the recipe)" if last else ""))


# ----------------------------------------------------------------------------------------- evaluation
class _EvalContext:
    """The validation data, opened once (eval transform of the FP32 model)."""

    def __init__(self, evald: Any, fp32: nn.Module, opts: QATOptions, workers: int) -> None:
        from .data import eval_transform, model_label_names, open_dataset
        from .placement import unwrap

        self.spec = evald
        self.ds = open_dataset(evald.uri, evald.split, eval_transform(fp32), layout=evald.layout,
                               skip_bad=evald.skip_bad, cache_dir=evald.cache_dir,
                               label_names=model_label_names(unwrap(fp32)))
        self.opts, self.workers = opts, workers

    def loader(self, limit: int | None):
        from .data import limit_subset, make_loader

        indices, subset = limit_subset(self.ds, limit)
        mine = distributed.shard_batches(indices if indices is not None else len(self.ds), self.opts.eval_batch_size)
        return make_loader(self.ds, self.opts.eval_batch_size, self.workers, indices=mine), subset


def _validate(st: _State, ev: _EvalContext, model: nn.Module, cfg: QATConfig, ctx, opts: QATOptions,
              n: int) -> None:
    from .evaluate import evaluate_models

    _sync_bn_statistics(model, cfg)  # every rank's shard is scored with the model rank 0 saves
    model.eval()
    with torch.random.fork_rng(devices=[]):  # validation must not shift the training RNG streams
        loader, _ = ev.loader(cfg.eval_limit)
        scores = evaluate_models({"qat": model}, loader, ev.ds.num_classes, device=ctx.device)
    m = {"step": st.step, "epoch": st.epoch + st.consumed / max(n, 1), "val_top1": scores["qat"].top1, "val_count": scores["qat"].count,
         "time": time.time()}
    st.metrics.append(m)
    if opts.on_log is not None:
        opts.on_log(dict(m))


def _finish(recipe, cfg, fp32, ptq_model, model, train, evald, out, opts, ctx, st, cal_info, learned,
            train_s) -> dict:
    from .data import describe_transform, unused_files, unused_files_warning
    from .evaluate import evaluate_models
    from .pipeline import _write_json, random_weights_warning
    from .report import build_report, per_class_plot, report_markdown

    name = recipe.name
    scores, data_info, skipped, notes = {}, {}, [], []
    t0 = time.perf_counter()
    if evald is not None:
        ev = _EvalContext(evald, fp32, opts, _workers(opts, recipe))
        loader, subset = ev.loader(opts.eval_limit)
        models = {"fp32": fp32, f"{name}:ptq": ptq_model, name: model}
        scores = evaluate_models(models, loader, ev.ds.num_classes, reference="fp32", device=ctx.device)
        skipped = [r for part in distributed.all_gather_object(loader.skipped.as_list()) for r in part]
        data_info = {"eval_uri": storage.absolute(evald.uri), "eval_split": evald.split, "eval_count": scores["fp32"].count,
                     "eval_subset": subset, "num_classes": ev.ds.num_classes}
        unused = unused_files(ev.ds)
        if unused:
            data_info["unused_files"] = unused
            notes.append(f"evaluation data: {unused_files_warning(ev.ds)}")
    data_info.update({"train_uri": train.uri, "train_split": train.split})
    train_note, train_unused = cal_info.pop("train_unused", None) or (None, [])
    if train_unused:
        data_info["train_unused_files"] = train_unused
        notes.insert(0, f"training data: {train_note}")
    from .pipeline import _dedupe

    # calibration, training and evaluation images skipped (--skip-bad), each named once
    skipped = _dedupe([_skip_dict(r) for r in
                       list(cal_info.get("skipped") or []) + list(cal_info.pop("train_skipped", None) or [])
                       + skipped])
    setup_warnings = cal_info.pop("setup_warnings", [])
    warnings = [random_weights_warning(recipe)] if cal_info.get("fp32_weights", "") is None else []
    warnings += setup_warnings + notes
    n_train = cal_info.pop("train_images", None)
    gb = cfg.batch_size * ctx.world_size
    qat_info = {"steps": st.step, "epochs_done": st.epoch, "world_size": ctx.world_size,
                # images per step: the configured batch x ranks, or all training images when they are fewer
                "global_batch": min(gb, n_train) if n_train else gb, "learned_quantizers": len(learned),
                "config": cfg.model_dump(mode="json"), "train_s": train_s, "metrics": "metrics.jsonl"}
    art = {}
    rep = build_report(model=recipe.model.name if recipe.model else type(model).__name__,
                       recipe=recipe.model_dump(mode="json"), scores=scores, reference="fp32" if scores else None,
                       data=data_info, calibration=cal_info,
                       timings={"train": train_s, "evaluate": time.perf_counter() - t0}, skipped=skipped,
                       warnings=warnings,
                       extra={"qat": qat_info, "transform": describe_transform(fp32), "device": str(ctx.device),
                              "variants": {name: {"placement": model.quantcore_placement.as_dict()}}})
    if ctx.is_main:
        base = storage.join(out, name)
        art = {"checkpoint": storage.join(base, "model.qc.pt"), "encodings": storage.join(base, "encodings.json"),
               "ptq_checkpoint": _ptq_uri(out)}
        extra = {"calibration": cal_info, "qat": qat_info}
        api.save(model, art["checkpoint"], extra=extra)
        _write_json(art["encodings"], api.encodings(model, extra=extra))
        rep["variants"][name]["artifacts"] = art
        rep["plots"] = ["training.png"] + (["per_class.png"] if scores else [])
        storage.write_bytes(storage.join(out, "training.png"), training_plot(st.metrics, name))
        if scores:
            storage.write_bytes(storage.join(out, "per_class.png"), per_class_plot(rep))
        _write_json(storage.join(out, "report.json"), rep)
        md = report_markdown(rep) + _training_markdown(qat_info, st.metrics)
        storage.write_bytes(storage.join(out, "report.md"), md.encode("utf-8", "backslashreplace"))
        _write_metrics(storage.join(out, "metrics.jsonl"), st.metrics)
    distributed.barrier()
    return rep


def _training_markdown(info: dict, metrics: list[dict]) -> str:
    losses = [m for m in metrics if "loss" in m]
    vals = [m for m in metrics if "val_top1" in m]
    lines = ["", "## Quantization-aware training", "",
             f"{info['steps']} steps on {info['world_size']} rank(s), global batch {info['global_batch']}, "
             f"{info['learned_quantizers']} learned ranges, {info['train_s']:.0f} s."]
    cfg = info.get("config") or {}
    bn, at = cfg.get("bn"), cfg.get("bn_freeze_step")
    # what happened to the BatchNorms the placement kept (folded ones are in the placement line)
    if bn == "freeze" and isinstance(at, int) and at < info["steps"]:
        lines.append("BatchNorm statistics frozen from the first step (qat.bn: freeze, bn_freeze_step 0)." if at == 0
                     else f"BatchNorm statistics updated for {at} steps, then frozen (qat.bn: freeze).")
    elif bn == "freeze":
        lines.append(f"BatchNorm statistics updated at every step: qat.bn_freeze_step {at} was not reached in "
                     f"{info['steps']} steps.")
    elif bn == "train":
        lines.append("BatchNorm statistics updated at every step (qat.bn: train).")
    if losses:
        lines.append(f"Loss {losses[0]['loss']:.4f} (step {losses[0]['step']}) -> {losses[-1]['loss']:.4f} "
                     f"(step {losses[-1]['step']}); {losses[-1]['images_per_s']:.0f} images/s at the end.")
    if vals:
        lines.append("Validation top-1: " + ", ".join(f"step {m['step']}: {m['val_top1']:.2f}%" for m in vals) + ".")
    return "\n".join(lines) + "\n"


def training_plot(metrics: list[dict], title: str) -> bytes:
    """Loss (and validation top-1 when measured) against the optimizer step, PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    pts = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if pts:
        ax.plot(*zip(*pts), label="training loss", color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    vals = [(m["step"], m["val_top1"]) for m in metrics if "val_top1" in m]
    if vals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*vals), "o-", color="C1", label="validation top-1")
        ax2.set_ylabel("top-1 %")
    ax.set_title(f"QAT: {title}", parse_math=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
