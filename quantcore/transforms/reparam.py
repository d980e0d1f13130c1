"""RepQ-ViT's post-LayerNorm scale reparameterization (Li et al. 2023, ICCV, sec. 3.2).

Post-LayerNorm activations have very different ranges per channel, which per-tensor quantization of
the next Linear's input handles badly, and per-channel activation quantization does not map onto a
GEMM. RepQ-ViT calibrates per channel, then folds the per-channel scale and offset into the
LayerNorm affine and the consuming Linear(s), so that the deployed activation is quantized per tensor.

With per-channel ranges ``[min_c, max_c]`` of the post-LN activation ``X`` (over the calibration data),
per-channel steps ``s_c = (max_c - min_c) / (2**B - 1)`` and zero points ``z_c = -min_c / s_c``, the
targets are the means ``s~ = mean(s_c)``, ``z~ = mean(z_c)``, and (the reference code's variables)::

    r_c = s_c / s~                     b_c = min_c / r_c - (-z~ * s~)
    LayerNorm:  gamma' = gamma / r     beta' = beta / r - b          (so X' = X / r - b)
    Linear:     W'     = W * r (columns)    bias' = bias + W' @ b     (so W' X' + bias' = W X + bias)

Every channel of ``X'`` then spans exactly ``[-z~ s~, -z~ s~ + (2**B - 1) s~]``; the factor
``2**B - 1`` cancels, so the transform does not depend on the bit width. One deviation from the
reference (zkkli/RepQ-ViT ``test_quant.py``): zero points are not rounded, so the channel ranges
become exactly equal instead of equal up to one step, and the per-channel ranges are the observed
min/max (a :class:`~quantcore.calib.maxcal.MaxState` per LayerNorm) rather than a per-channel
percentile search.

Layouts: which LayerNorm feeds which Linear(s) is a fact of the block's forward, so it is registered
per block class (:func:`register_layernorm_layout`): timm ``Block`` (``norm1 -> attn.qkv``, ``norm2 ->
mlp.fc1``) and Hugging Face ``ViTLayer`` (``layernorm_before -> q/k/v``, ``layernorm_after -> fc1``, in
the transformers 4 and 5 module names). The statistics pass also checks that each consumer receives
the LayerNorm's output tensor itself; a mismatch is an error naming both modules.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..calib.maxcal import MaxState
from ..errors import PlacementError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerNormLayout:
    """A block class whose forward feeds a LayerNorm straight into Linear(s), and nothing else.

    ``matches(module)``: whether ``module`` is such a block. ``pairs``: ``(norm attribute path,
    alternatives)``, each alternative a tuple of Linear attribute paths (the first alternative whose
    modules all exist is used: module names differ between library versions)."""

    name: str
    matches: Callable[[nn.Module], bool]
    pairs: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]


@dataclass
class LayerNormPair:
    """One LayerNorm and the Linear(s) that consume its output (module names in the model)."""

    norm_name: str
    norm: nn.LayerNorm
    consumer_names: list[str]
    consumers: list[nn.Linear]


@dataclass
class ReparamResult:
    """What :func:`reparam_layernorm` did: the pairs folded, the statistics pass, what was left."""

    pairs: list[str] = field(default_factory=list)  # "norm -> consumer, ..." per folded LayerNorm
    skipped: list[dict[str, str]] = field(default_factory=list)  # LayerNorms outside any layout
    batches: int = 0
    images: int = 0
    stats_s: float = 0.0  # the extra FP32 pass over the calibration batches
    ratio_spread: dict[str, float] = field(default_factory=dict)  # max(r)/min(r) per LayerNorm

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


LAYOUTS: list[LayerNormLayout] = []


def register_layernorm_layout(layout: LayerNormLayout) -> LayerNormLayout:
    """Add a block layout (later registrations are tried first). Returns it."""
    LAYOUTS.insert(0, layout)
    return layout


def _is_timm_block(m: nn.Module) -> bool:
    vt = sys.modules.get("timm.models.vision_transformer")
    return vt is not None and isinstance(m, vt.Block)


def _is_hf_vit_layer(m: nn.Module) -> bool:
    """Hugging Face ``ViTLayer`` and ``DeiTLayer`` (the same pre-norm block, the same names)."""
    for mod, cls in (("transformers.models.vit.modeling_vit", "ViTLayer"),
                     ("transformers.models.deit.modeling_deit", "DeiTLayer")):
        hf = sys.modules.get(mod)
        if hf is not None and isinstance(m, getattr(hf, cls)):
            return True
    return False


register_layernorm_layout(LayerNormLayout(
    "timm Block", _is_timm_block, (("norm1", (("attn.qkv",),)), ("norm2", (("mlp.fc1",),)))))
register_layernorm_layout(LayerNormLayout(
    "transformers ViTLayer/DeiTLayer", _is_hf_vit_layer,
    (("layernorm_before", (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                           ("attention.attention.query", "attention.attention.key", "attention.attention.value"))),
     ("layernorm_after", (("mlp.fc1",), ("intermediate.dense",))))))


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def find_layernorm_pairs(model: nn.Module) -> tuple[list[LayerNormPair], list[dict[str, str]]]:
    """Every (LayerNorm, consuming Linears) pair of the registered layouts, and the LayerNorms that
    are in none (``{"name", "reason"}``: final norms before a float head, unknown blocks).

    Raises :class:`~quantcore.errors.PlacementError` naming the module when a matched block's norm
    is not an affine ``nn.LayerNorm``, its consumers are not ``nn.Linear`` with a bias, or the model
    has no pair at all."""
    from ..placement import unwrap

    inner = unwrap(model)
    pairs: list[LayerNormPair] = []
    covered: set[str] = set()
    for name, mod in inner.named_modules():
        layout = next((lay for lay in LAYOUTS if lay.matches(mod)), None)
        if layout is None:
            continue
        pre = f"{name}." if name else ""
        for norm_path, alternatives in layout.pairs:
            norm = _get(mod, norm_path)
            where = f"{pre}{norm_path}"
            if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
                raise PlacementError(f"placement.reparam_layernorm: {where!r} in {layout.name} {name!r} is "
                                     f"{type(norm).__name__}, not an nn.LayerNorm with weight and bias")
            alt = next((a for a in alternatives if all(_get(mod, p) is not None for p in a)), None)
            if alt is None:
                raise PlacementError(f"placement.reparam_layernorm: {layout.name} {name!r} has none of the "
                                     f"expected consumers of {norm_path} ({' | '.join(', '.join(a) for a in alternatives)})")
            cons = [_get(mod, p) for p in alt]
            for p, c in zip(alt, cons):
                if not isinstance(c, nn.Linear) or c.bias is None:
                    raise PlacementError(f"placement.reparam_layernorm: {pre + p!r} ({type(c).__name__}) must be an "
                                         f"nn.Linear with a bias to absorb the LayerNorm shift of {where!r}")
            pairs.append(LayerNormPair(where, norm, [f"{pre}{p}" for p in alt], cons))
            covered.add(where)
    skipped = [{"name": n, "reason": "not in a registered block layout (LayerNorm -> Linear): left as is"}
               for n, m in inner.named_modules() if isinstance(m, nn.LayerNorm) and n not in covered]
    if not pairs:
        raise PlacementError(f"placement.reparam_layernorm: {type(inner).__name__} has no LayerNorm -> Linear "
                             f"pair of a registered layout ({', '.join(lay.name for lay in LAYOUTS)}); "
                             f"LayerNorms found: {[s['name'] for s in skipped][:6]}")
    return pairs, skipped


@torch.no_grad()
def collect_channel_ranges(model: nn.Module, pairs: list[LayerNormPair], batches: Iterable,
                           max_batches: int | None = None, first: dict | None = None
                           ) -> tuple[dict[str, MaxState], int, int]:
    """One FP32 pass (quantization off): per-channel min/max of every pair's LayerNorm output, and
    a check that each consumer receives that very tensor. Merged exactly across ranks under
    ``torch.distributed``. Returns ``(states by norm name, batches, images)``. ``first``: a dict that
    receives this rank's first batch (``"x"``) and the model's float outputs on it (``"out"``)."""
    from .. import distributed
    from ..api import _device, _images, quantization_disabled

    states = {p.norm_name: MaxState(axis=-1) for p in pairs}
    last: dict[str, torch.Tensor] = {}
    handles = []

    def on_norm(name: str):
        def hook(_m, _inp, out):
            states[name].update(out)
            last[name] = out
        return hook

    def on_consumer(norm_name: str, cname: str):
        def hook(_m, args):
            if not args or args[0] is not last.get(norm_name):
                raise PlacementError(f"placement.reparam_layernorm: {cname!r} does not receive the output of "
                                     f"{norm_name!r} directly (the block's forward changes it in between), so "
                                     f"the LayerNorm scale cannot be folded into it")
        return hook

    for p in pairs:
        handles.append(p.norm.register_forward_hook(on_norm(p.norm_name)))
        for cname, c in zip(p.consumer_names, p.consumers):
            handles.append(c.register_forward_pre_hook(on_consumer(p.norm_name, cname)))
    dev = _device(model)
    n_b = n_i = 0
    try:
        with quantization_disabled(model):
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                x = _images(batch).to(dev, non_blocking=True)
                out = model(x)
                if first is not None and not first:
                    from ..placement.probe import model_outputs

                    first.update(x=x, out=[t.clone() for t in model_outputs(out)])
                last.clear()
                n_b, n_i = n_b + 1, n_i + x.shape[0]
    finally:
        for h in handles:
            h.remove()
    if distributed.active():
        gathered = distributed.all_gather_object(({k: s.to_dict() for k, s in states.items()}, (n_b, n_i)))
        states = {k: MaxState.from_dict(gathered[0][0][k]) for k in states}
        for g in gathered[1:]:
            for k in states:
                states[k].merge(MaxState.from_dict(g[0][k]))
        n_b, n_i = sum(g[1][0] for g in gathered), sum(g[1][1] for g in gathered)
    return states, n_b, n_i


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """A new Parameter object: the old one may be shared with the FP32 model (WeightSharing)."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))


@torch.no_grad()
def apply_layernorm_reparam(pair: LayerNormPair, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Fold per-channel ranges ``lo``/``hi`` (``(C,)``, of the LayerNorm output) into ``pair``'s
    LayerNorm affine and consumers (new Parameter objects; the float function is unchanged up to
    rounding). Returns ``r`` (``(C,)``, float64). Raises PlacementError on a channel-count mismatch."""
    norm = pair.norm
    c = norm.weight.numel()
    if lo.numel() != c or hi.numel() != c:
        raise PlacementError(f"placement.reparam_layernorm: {pair.norm_name!r} has {c} channels but its output "
                             f"statistics have {lo.numel()}")
    lo64, hi64 = lo.double().cpu(), hi.double().cpu()
    width = hi64 - lo64
    # a constant channel has no range to scale; keep it from dividing by zero (its gamma is ~0 anyway)
    width = width.clamp_min(max(float(width.mean()), 1e-12) * 1e-6)
    s_t = width.mean()
    r = width / s_t
    z_t = (-lo64 / width).mean()  # zero points in units of the step (the 2**B - 1 factor cancels)
    b = lo64 / r + z_t * s_t      # = act_min / r - target_min, target_min = -z~ s~
    dev = norm.weight.device
    r_d, b_d = r.to(dev), b.to(dev)
    _replace(norm, "weight", norm.weight.double() / r_d)
    _replace(norm, "bias", norm.bias.double() / r_d - b_d)
    for lin in pair.consumers:
        w = lin.weight.double() * r_d[None, :]
        _replace(lin, "bias", lin.bias.double() + w @ b_d)
        _replace(lin, "weight", w)
    return r


def _not_plain(pair: LayerNormPair) -> str | None:
    """Why ``pair`` cannot be folded by its parameters alone (None: it can): a parametrization recomputes
    a weight the fold would replace. (A forward of its own, a gated norm or a LoRA branch, is caught by
    the output check of :func:`_verified_pairs`: timm's LayerNorm subclass computes the same function.)"""
    for name, mod in ((pair.norm_name, pair.norm), *zip(pair.consumer_names, pair.consumers)):
        if getattr(mod, "parametrizations", None):
            return f"{name!r} has a parametrization ({', '.join(mod.parametrizations)}) that recomputes its weights"
    return None


def _verified_pairs(model: nn.Module, pairs: list[LayerNormPair], states: dict[str, MaxState], first: dict
                    ) -> tuple[list[LayerNormPair], list[dict[str, str]]]:
    """The pairs whose fold keeps the model's float outputs on the first calibration batch (as
    BatchNorm folding checks its pairs), and ``{"name", "reason"}`` for the others: something else reads
    the LayerNorm's output (timm's gated attention reads ``norm1`` in ``attn.gate``) or a consumer's
    input. All together first; on a mismatch each alone. The model is left as it was."""
    from ..api import quantization_disabled
    from ..fold import _mismatch, split_by_check

    if not first:
        return pairs, []

    def changes(ps: list[LayerNormPair]) -> str:
        saved = [(m, n, getattr(m, n)) for p in ps for m in (p.norm, *p.consumers) for n in ("weight", "bias")]
        try:
            for p in ps:
                apply_layernorm_reparam(p, states[p.norm_name].min, states[p.norm_name].max)
            with quantization_disabled(model):
                return _mismatch(model, (first["x"],), first["out"], _RTOL, _ATOL)
        finally:
            for m, n, v in reversed(saved):
                setattr(m, n, v)

    good, bad, problem = split_by_check(pairs, changes)
    if problem:
        raise PlacementError(f"placement.reparam_layernorm: the pairs {[p.norm_name for p in good][:6]} each keep the "
                             "model's float outputs but not together; leave it off (placement.reparam_layernorm: false)")
    return good, [{"name": p.norm_name, "reason": why.replace("folding", "the reparameterization") +
                   f" on the first calibration batch: {p.norm_name!r} or {', '.join(p.consumer_names)} computes "
                   "something else than nn.LayerNorm / nn.Linear (a forward of its own), or something else reads "
                   "the LayerNorm's output"} for p, why in bad]


# the fold is exact up to float32 rounding of the rescaled weights (~1e-6 of the output scale on a ViT-B)
_RTOL, _ATOL = 1e-3, 1e-4


def reparam_layernorm(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> ReparamResult:
    """RepQ-ViT reparameterization of every registered LayerNorm -> Linear pair of ``model``, from
    one extra FP32 pass over ``batches`` (a one-shot iterator is materialized: it is read again by
    the calibration that follows). Returns a :class:`ReparamResult`; ``model.quantcore_reparam``
    records it. Raises PlacementError (naming the module) on an unsupported layout."""
    t0 = time.perf_counter()
    pairs, skipped = find_layernorm_pairs(model)
    own = [(p, _not_plain(p)) for p in pairs]  # a forward of its own: the fold's algebra does not hold
    kept = [p for p, why in own if why is None]
    left = [{"name": p.norm_name, "reason": why} for p, why in own if why is not None]
    first: dict = {}
    states, n_b, n_i = collect_channel_ranges(model, kept, batches, max_batches, first) if kept else ({}, 0, 0)
    for p in kept:
        if states[p.norm_name].min is None:
            raise PlacementError(f"placement.reparam_layernorm: {p.norm_name!r} saw no calibration data")
    kept, changed = _verified_pairs(model, kept, states, first)
    from .. import distributed

    if distributed.active():  # each rank checked its own first batch: one verdict for all (a union)
        seen = {c["name"]: c for g in distributed.all_gather_object(changed) for c in g}
        changed = list(seen.values())
        kept = [p for p in kept if p.norm_name not in seen]
    left += changed
    if not kept:
        raise PlacementError("placement.reparam_layernorm: no LayerNorm -> Linear pair can be folded: "
                             + "; ".join(f"{s['name']}: {s['reason']}" for s in left[:3]))
    for s in left:  # the option was asked for: each pair it does not apply to is said
        log.warning("placement.reparam_layernorm: %s left as it is: %s", s["name"], s["reason"])
    res = ReparamResult(skipped=skipped + left, batches=n_b, images=n_i)
    for p in kept:
        st = states[p.norm_name]
        r = apply_layernorm_reparam(p, st.min, st.max)
        res.pairs.append(f"{p.norm_name} -> {', '.join(p.consumer_names)}")
        res.ratio_spread[p.norm_name] = float(r.max() / r.min()) if math.isfinite(float(r.min())) else math.inf
    res.stats_s = time.perf_counter() - t0
    if skipped:
        log.info("reparam_layernorm: LayerNorms left as they are: %s", ", ".join(s["name"] for s in skipped))
    from ..placement import unwrap

    unwrap(model).quantcore_reparam = res
    return res
