"""Per-quantizer error analysis: SQNR and cosine of each quantized tensor against its float twin,
isolated (only that quantizer acts) and cumulative (every quantizer up to it in execution order
acts), the model-output effect of both cases per group, and range statistics with warnings.

Cost: tensor metrics take two forwards per batch in all (isolated: the FP32 forward, where a hook on
each quantizer fake-quantizes its float input on the side and returns the input unchanged;
cumulative: the forward of the model as given, whose quantizer ``k`` sees exactly what quantizers
``< k`` made of the data, compared with the stored FP32 input of the same quantizer). The FP32
inputs of one chunk of images are stored between the two forwards; chunks are sized to
``memory_mb``. A quantizer called more than once per forward (a tied or reused module): its isolated
tensor error is its grid on the FP32 values of every call (its earlier calls' rounding does not reach
its later calls' inputs, as it would with only it acting: the tensor metric is its grid's error on
float data; the logit cases below do have its calls compound). Weights count once. Logit effects
cost one (prefix-reused, see :mod:`.engine`) forward per group and case.
Everything is accumulated as sums (float64), never as stored tensors.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .engine import ON, Engine, cosine, identity_quantizers, sqnr_db
from .groups import make_groups

P9999 = 1e-4  # the tail fraction above the "p99.99" statistic


@dataclass
class _Pair:
    """Sums comparing a quantized tensor ``y`` with its float twin ``x``."""

    sig: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    yy: float = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().double(), y.detach().double()
        self.sig += float((x * x).sum())
        self.noise += float(((y - x) ** 2).sum())
        self.dot += float((x * y).sum())
        self.yy += float((y * y).sum())

    def result(self) -> dict[str, float | None]:
        return {"sqnr_db": sqnr_db(self.sig, self.noise), "cosine": cosine(self.dot, self.sig, self.yy)}


@dataclass
class _Stats:
    """Statistics of a quantizer's float input and how its range fits it."""

    numel: int = 0
    zeros: int = 0
    clipped: int = 0
    lo: torch.Tensor | None = None  # per channel for per-channel quantizers, else scalar
    hi: torch.Tensor | None = None
    top: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    # |x| values kept: the p99.99 of N values is the (N * 1e-4 + 1)-th largest, and N is known only at
    # the end, so each call keeps as many as the expected total needs (``expected``: the trace's values
    # per image x images); the statistic is exact while no call dropped a value it would have needed
    expected: float = 0.0
    kept_min: float = math.inf  # fewest values kept by a truncation that dropped some

    def add(self, x: torch.Tensor, q) -> None:
        x = x.detach().float()
        self.numel += x.numel()
        self.zeros += int((x == 0).sum())
        axis = q.spec.axis if not q.spec.is_float else None
        if axis is not None and x.dim() > 0:
            ax = axis % x.dim()
            dims = [d for d in range(x.dim()) if d != ax]
            lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        else:
            lo, hi = x.min(), x.max()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if not q.spec.is_float and q.amax.numel():
            amin, amax = q.spec.kind.represented_range(q)
            if amax.numel() > 1 and axis is not None:
                shape = [1] * x.dim()
                shape[axis % x.dim()] = -1
                amin, amax = amin.reshape(shape), amax.reshape(shape)
            self.clipped += int(((x < amin) | (x > amax)).sum())
        k = max(int(self.numel * P9999), int(self.expected * P9999)) + 1
        vals = x.abs().flatten()
        if vals.numel() > k:
            self.kept_min = min(self.kept_min, k)
            vals = vals.topk(k).values
        cand = torch.cat([self.top, vals.cpu()])
        if cand.numel() > k:
            self.kept_min = min(self.kept_min, k)
            cand = cand.topk(k).values
        self.top = cand.sort(descending=True).values

    def result(self, q, clip_warn: float, outlier_warn: float) -> dict[str, Any]:
        absmax = float(torch.maximum(self.lo.abs().max(), self.hi.abs().max()))
        k = int(self.numel * P9999) + 1  # the k-th largest |x| is the p99.99 of |x|
        p = float(self.top[min(k, self.top.numel()) - 1]) if self.top.numel() else 0.0
        out = {"min": float(self.lo.min()), "max": float(self.hi.max()), "absmax": absmax, "p99_99": p,
               "outlier_ratio": absmax / p if p > 0 else None, "zero_fraction": self.zeros / max(self.numel, 1),
               "clip_fraction": None, "grid_use": None, "warnings": []}
        w = out["warnings"]
        if not q.spec.is_float and q.amax.numel():
            out["clip_fraction"] = self.clipped / max(self.numel, 1)
            amin, amax = (t.cpu() for t in q.spec.kind.represented_range(q))
            lo, hi = self.lo.cpu(), self.hi.cpu()
            width = (amax - amin).clamp_min(1e-12)
            used = (torch.minimum(hi, amax) - torch.maximum(lo, amin)).clamp_min(0) / width
            out["grid_use"] = float(used.mean())
            out["range"] = [float(amin.min()), float(amax.max())]
            if out["clip_fraction"] > clip_warn:
                w.append(f"range clips {100 * out['clip_fraction']:.3g}% of the values (> {100 * clip_warn:g}%)")
            if out["grid_use"] < 0.5:
                side = " (one-sided data on a symmetric grid: try symmetric: false)" if (
                    q.spec.symmetric and float(lo.min()) >= 0) else ""
                w.append(f"data spans only {100 * out['grid_use']:.0f}% of the grid: more than half of it is "
                         f"wasted{side}")
        if k > self.kept_min:  # more values than the trace expected (shapes changed between batches)
            w.append(f"p99.99 is a lower bound (outlier ratio an upper bound): {self.numel} values seen, "
                     f"{self.expected:.0f} expected")
        if out["outlier_ratio"] is not None and out["outlier_ratio"] > outlier_warn:
            w.append(f"outliers: max |x| is {out['outlier_ratio']:.1f}x its p99.99")
        return out


def error_analysis(model: nn.Module, batches: Iterable | Engine, *, groups: Any = "quantizer",
                   logits: bool = True, memory_mb: float = 512.0, clip_warn: float = 1e-3,
                   outlier_warn: float = 20.0, workers: int = 1,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Error analysis of a calibrated model on ``batches`` (images or ``(images, labels)``).

    Returns a JSON-ready dict: ``order`` (active quantizers in execution order), ``quantizers``
    (name -> ``kind``, ``spec``, ``position``, ``isolated``/``cumulative`` ``{sqnr_db, cosine}`` of
    the tensor, ``stats``: min/max/absmax/p99.99 of |x|/``outlier_ratio``/``zero_fraction``/
    ``clip_fraction``/``grid_use`` and ``warnings``), ``groups`` (group -> quantizers and the logit
    metrics of the ``isolated`` and ``cumulative`` case, see :class:`~.engine.LogitStats`; only with
    ``logits``), ``model`` (the metrics of the model as given), ``warnings`` and ``timings_s``.

    ``groups``: ``"quantizer"``, ``"module"``, ``"block"`` or a list of globs (see
    :func:`~.groups.make_groups`), the granularity of the logit cases. SQNR is in dB (``None`` =
    identical tensors). ``progress``: called with each batch's image count, once in the tensor pass
    and once in the logit pass (``2 * images`` in all). Raises :class:`~quantcore.errors.UserError`
    for an unknown glob."""
    t0 = time.perf_counter()
    eng = batches if isinstance(batches, Engine) else Engine(model, batches)
    eng.require_quantized()
    qs = {n: eng.qs[n] for n in eng.order}
    iso = {n: _Pair() for n in qs}
    cum = {n: _Pair() for n in qs}
    images = sum(x.shape[0] for x, _ in eng.batches)
    stats = {n: _Stats(expected=eng.trace.numel_per_image.get(n, 0.0) * images if q.kind == "activation" else 0.0)
             for n, q in qs.items()}
    per_image = sum(4 * eng.trace.numel_per_image.get(n, 0) for n, q in qs.items() if q.kind == "activation")
    chunk = max(1, int(memory_mb * 2**20 // max(per_image, 1)))
    weights_done: set[str] = set()

    for x, _ in eng.batches:
        for i in range(0, x.shape[0], chunk):
            xc = x[i:i + chunk]
            store: dict[str, list[torch.Tensor]] = {n: [] for n in qs}

            def on_float(name, mod, t, y):
                if mod.kind == "weight" and name in weights_done:
                    return  # one tensor: measured once; its cumulative error is its isolated one
                iso[name].add(t, y)
                stats[name].add(t, mod)
                if mod.kind == "activation":
                    store[name].append(t.detach().clone())

            with torch.no_grad(), identity_quantizers(qs, on_float):
                eng._forward(xc, {})  # the model as given, each quantizer's output replaced by its input
            weights_done.update(n for n, q in qs.items() if q.kind == "weight")

            def on_base(name, mod, args, out):
                if store[name]:
                    cum[name].add(store[name].pop(0), out)

            hooks = [q.register_forward_hook((lambda n: lambda m, a, o: on_base(n, m, a, o))(n))
                     for n, q in qs.items()]
            try:
                eng._forward(xc, {})
            finally:
                for h in hooks:
                    h.remove()
            del store
        if progress is not None:
            progress(x.shape[0])
    t_tensor = time.perf_counter() - t0

    # weights: one tensor, counted once above; their cumulative error is their isolated one
    res_q: dict[str, Any] = {}
    warnings: list[str] = []
    for n, q in qs.items():
        st = stats[n].result(q, clip_warn, outlier_warn)
        cum_res = iso[n].result() if q.kind == "weight" else cum[n].result()
        res_q[n] = {"kind": q.kind, "spec": q.spec.short(), "bits": None if q.spec.is_float else q.spec.bits,
                    "position": eng.order.index(n), "isolated": iso[n].result(), "cumulative": cum_res,
                    "stats": st}
        warnings += [f"{n}: {w}" for w in st["warnings"]]

    out: dict[str, Any] = {"order": list(eng.order), "quantizers": res_q, "warnings": warnings}
    t1 = time.perf_counter()
    if logits:
        grp = make_groups(eng, groups)
        pos = {n: eng.trace.qpos.get(n, math.inf) for n in eng.order}
        configs: dict[str, dict] = {"__base__": {}}
        for g, members in grp.items():
            mset = set(members)
            configs[f"iso:{g}"] = {n: None for n in eng.active if n not in mset}
            last = max(pos[m] for m in members)
            configs[f"cum:{g}"] = {n: None for n in eng.active if pos.get(n, math.inf) > last}
        m = eng.evaluate(configs, workers=workers, progress=progress)
        out["model"] = m["__base__"]
        out["groups"] = {g: {"quantizers": members, "isolated": m[f"iso:{g}"], "cumulative": m[f"cum:{g}"]}
                         for g, members in grp.items()}
        out["group_by"] = groups if isinstance(groups, str) else list(groups)
    out["timings_s"] = {"tensor": t_tensor, "logits": time.perf_counter() - t1, "total": time.perf_counter() - t0}
    out["images"] = sum(x.shape[0] for x, _ in eng.batches)
    out["chunk_images"] = chunk
    return out


def isolated_config(eng: Engine, members: Iterable[str]) -> dict:
    """Configuration with only ``members`` acting (every other active quantizer off)."""
    mset = set(members)
    return {n: (ON if n in mset else None) for n in eng.active}
