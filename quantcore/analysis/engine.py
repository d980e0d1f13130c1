"""The evaluation engine behind error analysis, sensitivity and the mixed-precision search.

A *configuration* says, per quantizer, whether it acts and with which spec and range (the rest keep
the model's own state). :class:`Engine` evaluates many configurations on the same batches against
the FP32 outputs (every quantizer off) and returns, per configuration, top-1 (with labels), top-1
agreement with FP32, KL(FP32 || config) of the softmax outputs, logit SQNR and cosine.

Prefix reuse: everything a forward computes before the first quantizer whose state differs from a
reference run (FP32, or the model as given) is bit-identical to that reference. Modules that finish
before that point (whole transformer blocks, the patch embedding) return their output cached from the
reference forward of the same batch instead of recomputing it, so a configuration touching block j of
L costs about (L - j) / L of a forward. Only a shallow set of modules is cached (the items of the
model's largest ModuleList/Sequential and everything above them), which bounds the cache to a few
residual-stream tensors per batch.

Data parallel: :meth:`Engine.evaluate` splits the configurations over the ranks of an active
``torch.distributed`` group (results all-gathered) or over ``workers`` forked processes.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..evaluate import label_outside
from ..formats import QuantSpec
from ..models import output_logits
from ..placement import quantizers, unwrap
from ..quantizer import TensorQuantizer
from ..quantizer_kinds.base import contracted_size

#: Per-quantizer state of a configuration: ``None`` = off (float), else ``(spec, amin, amax)``;
#: ``amin``/``amax`` may be ``None`` to keep the quantizer's current range (spec unchanged then).
QState = tuple[QuantSpec, torch.Tensor, torch.Tensor] | None
Config = dict[str, Any]  # name -> QState, or name -> "on" (the model's own state)
ON = "on"

log = logging.getLogger(__name__)


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels or None)`` from a tensor, an ``(images, labels, ...)`` tuple or a dict."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"], batch.get("label")
    raise UserError(f"analysis batch must be a tensor, (images, labels) or {{'image': ...}}, got {type(batch).__name__}")


def check_workers(workers: Any, name: str = "workers") -> int:
    """``workers`` as a process count of at least 1 (UserError naming ``name`` otherwise; the CLI's
    ``--parallel`` has the same rule)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"{name}: a number of processes, at least 1; got {workers!r}")
    return workers


def check_images(x: torch.Tensor, what: str) -> None:
    """Refuse an empty or non-finite batch (UserError naming ``what``): an empty one has no figure to
    give, and one NaN/inf value turns every SQNR, KL and range statistic into -inf/nan that no budget
    check rejects (calibration refuses such data too)."""
    if x.dim() == 0 or x.shape[0] == 0 or x.numel() == 0:
        raise UserError(f"{what} is empty (shape {tuple(x.shape)}): every batch needs at least one image")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise UserError(f"{what} holds {bad} NaN/inf value(s) of {x.numel()} (shape {tuple(x.shape)}): "
                        "analysis needs finite images; check the data and its preprocessing")


# -- metrics ----------------------------------------------------------------------------------------
@dataclass
class LogitStats:
    """Sums over samples (mergeable by addition) of one configuration against FP32 logits."""

    count: int = 0
    labelled: int = 0
    correct: int = 0
    fp32_correct: int = 0
    gained: int = 0  # labelled samples FP32 gets wrong and the configuration right
    lost: int = 0  # ... FP32 right and the configuration wrong (delta_top1 = gained - lost)
    agree: int = 0
    kl: float = 0.0  # sum over samples of KL(p_fp32 || p_config), nats
    sig: float = 0.0  # sum of squared FP32 logits
    noise: float = 0.0  # sum of squared logit differences
    dot: float = 0.0
    qq: float = 0.0

    @torch.no_grad()
    def update(self, out: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor | None) -> None:
        out, ref = out.double().flatten(1), ref.double().flatten(1)
        self.count += out.shape[0]
        top, rtop = out.argmax(1), ref.argmax(1)
        self.agree += int((top == rtop).sum())
        if labels is not None:
            lab = labels.to(out.device)
            c = out.shape[1]
            bad = label_outside(lab, c)
            if bad is not None:
                raise UserError(f"analysis data: label {bad} is outside the model's {c} classes [0, {c}) (data "
                                "for another label set, or model.num_classes too small)")
            self.labelled += lab.numel()
            self.correct += int((top == lab).sum())
            self.fp32_correct += int((rtop == lab).sum())
            hit, fhit = top == lab, rtop == lab
            self.gained += int((hit & ~fhit).sum())
            self.lost += int((fhit & ~hit).sum())
        lr, lo = torch.log_softmax(ref, 1), torch.log_softmax(out, 1)
        self.kl += float((lr.exp() * (lr - lo)).sum())
        self.sig += float((ref * ref).sum())
        self.noise += float(((out - ref) ** 2).sum())
        self.dot += float((out * ref).sum())
        self.qq += float((out * out).sum())

    def merge(self, o: "LogitStats") -> "LogitStats":
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(o, k))
        return self

    def metrics(self) -> dict[str, float | int | None]:
        """``top1``/``fp32_top1``/``delta_top1`` (points; None without labels), ``gained``/``lost``
        (images whose top-1 became right/wrong; their difference makes ``delta_top1``), ``agreement``
        (%), ``kl`` (mean nats per sample), ``sqnr_db`` (None = identical logits), ``cosine``."""
        n = max(self.count, 1)
        top1 = 100.0 * self.correct / self.labelled if self.labelled else None
        f32 = 100.0 * self.fp32_correct / self.labelled if self.labelled else None
        return {"count": self.count, "top1": top1, "fp32_top1": f32,
                "delta_top1": None if top1 is None else top1 - f32,
                "gained": self.gained if self.labelled else None, "lost": self.lost if self.labelled else None,
                "agreement": 100.0 * self.agree / n, "kl": self.kl / n, "sqnr_db": sqnr_db(self.sig, self.noise),
                "cosine": cosine(self.dot, self.sig, self.qq)}


def sqnr_db(sig: float, noise: float) -> float | None:
    """10 log10(signal / noise) in dB; ``None`` for zero noise (identical tensors: +inf)."""
    if noise <= 0:
        return None
    return 10.0 * math.log10(sig / noise) if sig > 0 else -math.inf


def cosine(dot: float, aa: float, bb: float) -> float:
    return dot / math.sqrt(aa * bb) if aa > 0 and bb > 0 else (1.0 if aa == bb else 0.0)


# -- structure of the forward -----------------------------------------------------------------------
def _cache_depth(model: nn.Module) -> int:
    """Depth (dots + 1) of the items of the model's largest ModuleList/Sequential (timm ``blocks.3``:
    2); 1 when there is none."""
    best, depth = 1, 1
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > best:
            best, depth = len(m), (name.count(".") + 2 if name else 1)
    return depth


@dataclass
class Trace:
    """Execution order of one forward: ``order`` (quantizer names by first call), ``qpos`` (name ->
    position of its first call among all events), ``ends`` (cacheable module -> position of its end),
    activation ``numel_per_image`` per quantizer, and ``macs``: multiply-accumulates per image of
    every product op (linear, conv, matmul/bmm/baddbmm, two-operand einsum, fused attention) keyed by
    the quantizers whose outputs its two operands are (``None``: an operand no quantizer feeds)."""

    order: list[str] = field(default_factory=list)
    qpos: dict[str, int] = field(default_factory=dict)
    ends: dict[str, int] = field(default_factory=dict)
    numel_per_image: dict[str, float] = field(default_factory=dict)
    #: per quantizer, the size of what the product consuming its tensor contracts (a Linear input's
    #: features; the last dimension where no product consumes it): the slice run-time scales cover
    last_dim: dict[str, int] = field(default_factory=dict)
    macs: dict[tuple[str | None, str | None], float] = field(default_factory=dict)


def _einsum_macs(eq: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
    """Output elements x the sizes of the summed-out indices (two operands)."""
    lhs = eq.replace(" ", "").split("->")[0].split(",")
    rhs = eq.replace(" ", "").split("->")[1] if "->" in eq else None
    sizes: dict[str, int] = {}
    for spec, t in zip(lhs, (a, b)):
        head, _, tail = spec.partition("...")
        for i, ch in enumerate(head):
            sizes[ch] = t.shape[i]
        for i, ch in enumerate(reversed(tail)):
            sizes[ch] = t.shape[t.dim() - 1 - i]
    kept = set(rhs) if rhs is not None else {c for c in sizes if "".join(lhs).count(c) == 1}
    return float(out.numel()) * math.prod(n for c, n in sizes.items() if c not in kept)


def _product_ops() -> dict[Callable, tuple[int, int]]:
    from ..placement.intercept import BADDBMM_OPS, MATMUL_OPS

    ops = {f: (0, 1) for f in MATMUL_OPS}
    ops.update({f: (1, 2) for f in BADDBMM_OPS})
    ops.update({f: (1, 2) for f in (torch.addmm, torch.Tensor.addmm, torch.addbmm, torch.Tensor.addbmm)})
    return ops


#: product ops with two activation/weight operands -> their positions (out = ... a @ b)
_PRODUCT_OPS = _product_ops()

#: ops that hand a quantized tensor on in the same representation (the integer GEMM that consumes it
#: folds a scalar factor into its rescale): ``(q * scale) @ k.transpose(-2, -1)`` is q x k
_KEEPS_GRID = {"transpose", "permute", "reshape", "view", "contiguous", "repeat_interleave", "expand",
               "flatten", "unflatten", "unsqueeze", "squeeze", "clone", "t", "mT", "swapaxes", "movedim"}
_SCALAR_OPS = {"mul", "__mul__", "__rmul__", "div", "__truediv__"}


class _MacCounter(torch.overrides.TorchFunctionMode):
    """Counts the MACs of every product op into ``tr.macs``, attributed to the quantizers that fed
    its operands (``source``; ``mark`` records a view or scalar multiple of a quantizer's output as
    that quantizer's). Outermost mode: it sees the ops the placement's own mode emits, with the
    operands already quantized."""

    def __init__(self, tr: "Trace", batch: int, source: Callable[[Any], str | None],
                 mark: Callable[[torch.Tensor, str], None]) -> None:
        super().__init__()
        self.tr, self.batch, self.source, self.mark = tr, batch, source, mark

    def _follow(self, func, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        name = getattr(func, "__name__", "")
        if name not in _KEEPS_GRID and name not in _SCALAR_OPS:
            return
        rest = list(args[1:]) + list(kwargs.values())
        if name in _SCALAR_OPS and not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rest):
            return
        if args and self.source(args[0]) is not None and not any(isinstance(r, torch.Tensor) for r in rest):
            self.mark(out, self.source(args[0]))

    def _add(self, a: Any, b: Any, macs: float) -> None:
        key = (self.source(a), self.source(b))
        self.tr.macs[key] = self.tr.macs.get(key, 0.0) + macs / self.batch

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        from ..placement.intercept import SEE_THROUGH, see_through

        kwargs = kwargs or {}
        if func in SEE_THROUGH:  # nn.MultiheadAttention's function: count the products inside it
            with self:
                return see_through(func)(*args, **kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self._follow(func, args, kwargs, out)
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        from ..placement.intercept import (EINSUM_OPS, SDPA_OPS, TRANSPOSED_CONV_OPS, WEIGHTED_OPS,
                                           einsum_operands)

        def arg(i: int, *names: str) -> Any:  # positional, else by keyword (torch.bmm(a, mat2=b))
            if i < len(args):
                return args[i]
            return next((kwargs[n] for n in names if n in kwargs), None)

        if func in _PRODUCT_OPS:
            i, j = _PRODUCT_OPS[func]
            a, b = arg(i, "input", "batch1", "mat1"), arg(j, "other", "mat2", "batch2")
            if isinstance(a, torch.Tensor) and a.dim() >= 1:
                self._add(a, b, float(out.numel()) * a.shape[-1])
        elif func in WEIGHTED_OPS or func in TRANSPOSED_CONV_OPS:
            x, w = arg(0, "input"), arg(1, "weight")
            if not isinstance(w, torch.Tensor):
                return
            per = w.numel() if w.dim() == 1 else w[0].numel()  # in_features, in/groups x kernel
            if func in TRANSPOSED_CONV_OPS and isinstance(x, torch.Tensor):
                self._add(x, w, float(x.numel()) * per)  # each input element meets out/groups x kernel
            else:
                self._add(x, w, float(out.numel()) * per)
        elif func in EINSUM_OPS and einsum_operands(args) is not None:
            eq, (a, b) = einsum_operands(args)
            self._add(a, b, _einsum_macs(eq, a, b, out))
        elif func in SDPA_OPS:  # fused: no quantizer acts there (the placement takes it apart otherwise)
            q, k, v = arg(0, "query"), arg(1, "key"), arg(2, "value")
            self._add(q, k, float(q.numel()) * k.shape[-2])
            self._add(None, v, float(out.numel()) * k.shape[-2])


@torch.no_grad()
def trace_forward(model: nn.Module, x: torch.Tensor) -> Trace:
    """Run ``x`` once with every quantizer off and record the execution order (forward pre-hooks on
    the TensorQuantizers, forward hooks on the other modules) and the MACs of every product op."""
    inner = unwrap(model)
    qs = quantizers(inner)
    depth = _cache_depth(inner)
    tr, counter, calls, hooks = Trace(), [0], {}, []
    batch = x.shape[0]

    def qpre(name):
        def f(mod, args, kwargs):
            if name not in tr.qpos:
                tr.qpos[name] = counter[0]
                tr.order.append(name)
            counter[0] += 1
            t = args[0] if args else None
            if isinstance(t, torch.Tensor):
                # what the consuming product contracts (None: the last dimension)
                tr.last_dim[name] = contracted_size(kwargs.get("dims"), t.shape)
                if mod.kind == "activation":  # every call's values
                    tr.numel_per_image[name] = tr.numel_per_image.get(name, 0.0) + t.numel() / batch
                else:  # one stored tensor, however often a tied/shared module uses it
                    tr.numel_per_image[name] = float(t.numel())
        return f

    def mend(name, mod):
        def f(m, args, out):
            counter[0] += 1
            calls[name] = calls.get(name, 0) + 1
            tr.ends[name] = counter[0]
        return f

    # what each quantizer handed on (its input: identity_quantizers), by address and size; the
    # tensors are kept alive so no later tensor reuses an address while the trace runs
    fed: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}

    def mark(t: torch.Tensor, name: str) -> None:
        fed[(t.data_ptr(), t.numel())] = (name, t)

    def seen(name, mod, x, y):
        if isinstance(x, torch.Tensor):
            mark(x, name)

    def source(t: Any) -> str | None:  # k.transpose(-2, -1) keeps k's address and size
        hit = fed.get((t.data_ptr(), t.numel())) if isinstance(t, torch.Tensor) else None
        return hit[0] if hit is not None else None

    try:
        for n, m in inner.named_modules():
            if isinstance(m, TensorQuantizer):
                hooks.append(m.register_forward_pre_hook(qpre(n), with_kwargs=True))
            elif n:
                hooks.append(m.register_forward_hook(mend(n, m)))
        with identity_quantizers(qs, seen), _MacCounter(tr, batch, source, mark):  # quantizers run, float downstream
            inner(x)
    finally:
        for h in hooks:
            h.remove()
    # cacheable: called once, shallow, holding parameters or buffers (identity-like modules are
    # cheaper to rerun than to copy)
    mods = dict(inner.named_modules())
    tr.ends = {n: p for n, p in tr.ends.items() if calls[n] == 1 and n.count(".") < depth
               and not isinstance(mods[n], TensorQuantizer)
               and (next(mods[n].parameters(), None) is not None or next(mods[n].buffers(), None) is not None)}
    return tr


class identity_quantizers:
    """Context manager: every acting quantizer still runs (the placement calls only quantizers that
    act) but a forward hook hands its *input* on, so the model computes in float; ``fn(name, module,
    x, y)`` sees each quantizer's float input ``x`` and quantized output ``y``."""

    def __init__(self, qs: dict[str, TensorQuantizer], fn: Callable | None = None) -> None:
        self.qs, self.fn, self.hooks = qs, fn, []

    def __enter__(self) -> "identity_quantizers":
        for n, q in self.qs.items():
            def hook(mod, args, out, name=n):
                if self.fn is not None:
                    self.fn(name, mod, args[0], out)
                return args[0]
            self.hooks.append(q.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.hooks:
            h.remove()


# -- applying configurations --------------------------------------------------------------------------
class _Applied:
    """Context manager: set the quantizers' state as ``config`` says, restore on exit."""

    def __init__(self, qs: dict[str, TensorQuantizer], config: Config, base_on: dict[str, bool],
                 share_groups: Sequence[Sequence[str]] = ()) -> None:
        self.qs, self.config, self.base_on, self.share = qs, config, base_on, share_groups
        self.saved: list[tuple[TensorQuantizer, bool, QuantSpec, torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> "_Applied":
        for n, q in self.qs.items():
            self.saved.append((q, q.quantize, q.spec, q.amin, q.amax))
            st = self.config.get(n, ON)
            if st is None:
                q.quantize = False
            elif st == ON:
                q.quantize = self.base_on[n]
            else:
                spec, lo, hi = st
                q.quantize = True
                if lo is not None:
                    q.spec, q.amin, q.amax = spec, lo, hi
        for group in self.share:  # as api.finalize: one common range, from the members that quantize
            members = [self.qs[n] for n in group if n in self.qs and self.qs[n].quantize
                       and not self.qs[n].spec.is_float and self.qs[n].amax.numel()]
            if len(members) > 1 and any(self.config.get(n, ON) != ON for n in group):
                lo = torch.stack([m.amin.min() for m in members]).min()
                hi = torch.stack([m.amax.max() for m in members]).max()
                for m in members:
                    m.set_range(lo, hi)
        return self

    def __exit__(self, *exc: Any) -> None:
        for q, on, spec, lo, hi in self.saved:
            q.quantize, q.spec, q.amin, q.amax = on, spec, lo, hi


class _Cached:
    """Context manager: the given modules return cached outputs (clones) instead of running."""

    def __init__(self, mods: dict[str, nn.Module], outputs: dict[str, Any]) -> None:
        self.mods, self.outputs = mods, outputs

    def __enter__(self) -> "_Cached":
        for n, out in self.outputs.items():
            self.mods[n].forward = (lambda o: (lambda *a, **k: _clone(o)))(out)
        return self

    def __exit__(self, *exc: Any) -> None:
        for n in self.outputs:
            self.mods[n].__dict__.pop("forward", None)


def _clone(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.clone()
    if isinstance(o, tuple):
        return tuple(_clone(v) for v in o)
    if isinstance(o, list):
        return [_clone(v) for v in o]
    return o


# -- the engine ----------------------------------------------------------------------------------------
class Engine:
    """Evaluates configurations of a prepared, calibrated model on fixed batches.

    ``batches``: iterable of image tensors ``(N, C, H, W)`` or ``(images, labels)``; it is read into a
    list once (keep it to what fits in memory, e.g. a few thousand small images or 8 ViT-B images).
    The model's own state (which quantizers act, their specs and ranges) is the *base*; FP32 = every
    quantizer off. ``device`` defaults to the model's.
    """

    def __init__(self, model: nn.Module, batches: Iterable, device: torch.device | str | None = None) -> None:
        self.model = unwrap(model).eval()
        p = next(self.model.parameters(), None)
        self.device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
        self.batches = [tuple(t.to(self.device) if t is not None else None for t in split_batch(b)) for b in batches]
        if not self.batches:
            raise UserError("analysis data: no batches (check --data/--split/--limit)")
        for i, (x, _) in enumerate(self.batches):
            check_images(x, f"analysis data: batch {i}")
        self.qs = quantizers(self.model)
        self.base_on = {n: q.quantize for n, q in self.qs.items()}
        self.base_active = {n: q.active for n, q in self.qs.items()}  # changes its tensor as given
        self.active = [n for n, a in self.base_active.items() if a]
        self.trace = trace_forward(self.model, self.batches[0][0][:2])
        self.order = [n for n in self.trace.order if n in self.active]
        self.mods = dict(self.model.named_modules())
        placement = getattr(self.model, "quantcore_placement", None)
        self.share_groups = list(getattr(placement, "share_groups", []) or [])
        self._fp32_logits: list[torch.Tensor] | None = None
        self._quantized_checked = False

    def require_quantized(self) -> None:
        """Refuse a model in which no quantizer acts, or whose activation quantizers all lack a range
        (never calibrated, or calibrated on no data): every figure would be FP32's or the weights' alone,
        and a search on it reports its budget met with nothing searched. UserError naming the first
        quantizers; a few unreached ones (a branch the calibration did not take) are a warning, once."""
        if self._quantized_checked:
            return
        if not self.qs:
            raise UserError("analysis: the model has no quantizers (prepare placed none: no quantizable layer "
                            "such as Linear, Conv or matmul, or the recipe keeps every one float); nothing to "
                            "analyze or search")
        uncal = [n for n, q in self.qs.items() if q.spec.enabled and q.quantize and not q.is_calibrated]
        names = f"{', '.join(repr(n) for n in uncal[:3])}{', ...' if len(uncal) > 3 else ''}"
        acts = [n for n, q in self.qs.items() if q.kind == "activation" and q.spec.enabled and not q.spec.is_float]
        if uncal and (not self.active or set(acts) <= set(uncal)):
            raise UserError(f"analysis: {len(uncal)} quantizer(s) have no range ({names}): the model is not "
                            "calibrated, or its calibration saw no data; run quantcore.calibrate on calibration "
                            "images first")
        if not self.active:
            raise UserError("analysis: no quantizer of the model acts (quantization switched off, e.g. "
                            "set_quantization(model, False)); nothing to analyze or search")
        if uncal:
            log.warning(
                "analysis: %d quantizer(s) have no range and pass values through (%s): the calibration did "
                "not reach them; the figures leave them out", len(uncal), names)
        self._quantized_checked = True

    # which quantizers a configuration changes, against the FP32 and the base run
    def _first_change(self, config: Config, reference: str) -> float:
        """Execution position of the first quantizer whose effect under ``config`` differs from the
        reference run (``"fp32"``: all off; ``"base"``: the model as given); inf when none does."""
        unknown = sorted(set(config) - set(self.qs))
        if unknown:
            raise UserError(f"configuration names quantizer(s) {unknown[:5]} this model lacks")
        pos = math.inf
        for n, st in config.items() if reference == "base" else ((n, config.get(n, ON)) for n in self.qs):
            off = st is None or (st == ON and not self.base_active[n])
            differs = (not off) if reference == "fp32" else not (st == ON or (off and not self.base_active[n]))
            if differs:
                pos = min(pos, self.trace.qpos.get(n, math.inf))
        return pos

    def _cacheable_before(self, pos: float) -> list[str]:
        done = {n for n, e in self.trace.ends.items() if e < pos}
        return [n for n in done if not any(n.startswith(a + ".") for a in done if a != n)]

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, config: Config | None, capture: Sequence[str] = (),
                 cached: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        outs, hooks = {}, []
        for n in capture:
            hooks.append(self.mods[n].register_forward_hook(
                # a copy now: an in-place op after the module (Hardswish(inplace=True)) would
                # otherwise change the stored output, and a replay would apply it twice
                (lambda name: lambda m, a, o: outs.__setitem__(name, _clone(o)))(n)))
        try:
            if config is None:  # FP32
                cfg = {n: None for n in self.qs}
            else:
                cfg = config
            with _Applied(self.qs, cfg, self.base_on, self.share_groups), _Cached(self.mods, cached or {}):
                y = output_logits(self.model(x))  # HF ModelOutput, timm distilled tuple -> logits
        finally:
            for h in hooks:
                h.remove()
        return y, outs

    def evaluate(self, configs: dict[str, Config], workers: int = 1,
                 progress: Callable[[int], None] | None = None) -> dict[str, dict[str, Any]]:
        """Metrics (see :meth:`LogitStats.metrics`) of every configuration, FP32 as reference.

        Under an active ``torch.distributed`` group each rank evaluates every world-th configuration
        and the results are all-gathered; otherwise ``workers > 1`` forks that many processes (each
        with ``torch.get_num_threads() // workers`` threads). Results do not depend on the split."""
        from .. import distributed

        check_workers(workers)
        names = list(configs)
        if distributed.active() and distributed.world_size() > 1:
            mine = names[distributed.rank()::distributed.world_size()]
            part = self._evaluate({n: configs[n] for n in mine}, progress)
            out: dict[str, dict[str, Any]] = {}
            for p in distributed.all_gather_object(part):
                out.update(p)
            return {n: out[n] for n in names}
        if workers > 1 and len(names) > 1:
            out = self._evaluate_forked(configs, workers)
            if progress is not None:  # the forked processes cannot report: all at once
                progress(sum(x.shape[0] for x, _ in self.batches))
            return out
        return self._evaluate(configs, progress)

    def _evaluate_forked(self, configs: dict[str, Config], workers: int) -> dict[str, dict[str, Any]]:
        import multiprocessing as mp

        global _FORK_STATE
        names = list(configs)
        parts = [names[i::workers] for i in range(workers)]
        _FORK_STATE = (self, configs, max(1, torch.get_num_threads() // workers))
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                results = pool.map(_forked_part, [p for p in parts if p])
        finally:
            _FORK_STATE = None
        out: dict[str, dict[str, Any]] = {}
        for r in results:
            out.update(r)
        return {n: out[n] for n in names}

    @torch.no_grad()
    def _evaluate(self, configs: dict[str, Config], progress: Callable[[int], None] | None = None
                  ) -> dict[str, dict[str, Any]]:
        stats = {n: LogitStats() for n in configs}
        plan = {}
        for n, c in configs.items():
            pf, pb = self._first_change(c, "fp32"), self._first_change(c, "base")
            ref = "fp32" if pf >= pb else "base"
            pos = max(pf, pb)
            plan[n] = (ref, pos, self._cacheable_before(pos) if pos != math.inf else None)
        need = {r: sorted({m for ref, _, mods in plan.values() if ref == r and mods for m in mods})
                for r in ("fp32", "base")}
        for i, (x, y) in enumerate(self.batches):
            ref_logits, ref_out = {}, {}
            ref_logits["fp32"], ref_out["fp32"] = self._forward(x, None, need["fp32"])
            if not bool(torch.isfinite(ref_logits["fp32"]).all()):
                raise UserError(f"analysis data: batch {i}: the FP32 model gives NaN/inf logits (finite "
                                "images): no figure can be measured against it; check the model's weights")
            if need["base"] or any(ref == "base" and pos == math.inf for ref, pos, _ in plan.values()):
                ref_logits["base"], ref_out["base"] = self._forward(x, {}, need["base"])
            for n, c in configs.items():
                ref, pos, mods = plan[n]
                if pos == math.inf:  # identical to a reference run
                    out = ref_logits[ref]
                else:
                    out, _ = self._forward(x, c, cached={m: ref_out[ref][m] for m in mods})
                if not bool(torch.isfinite(out).all()):
                    # NaN logits give nan KL and an arbitrary argmax that a budget check would pass
                    raise UserError(f"configuration {n!r} gives NaN/inf logits on analysis batch {i} (the "
                                    "FP32 model's are finite): a float cast overflowing (fp16 above 65504), or "
                                    "a quantizer range that does not fit its values")
                stats[n].update(out, ref_logits["fp32"], y)
            if progress is not None:
                progress(x.shape[0])
        return {n: s.metrics() for n, s in stats.items()}

    @torch.no_grad()
    def logits(self, config: Config | None) -> list[torch.Tensor]:
        """The logits of every batch under ``config`` (``None`` = FP32), full forwards (no cache)."""
        return [self._forward(x, config)[0] for x, _ in self.batches]


_FORK_STATE: tuple[Engine, dict[str, Config], int] | None = None


def _forked_part(names: list[str]) -> dict[str, dict[str, Any]]:
    eng, configs, threads = _FORK_STATE
    torch.set_num_threads(threads)  # this worker process's own pool
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return eng._evaluate({n: configs[n] for n in names})
