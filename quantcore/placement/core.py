"""``place_quantizers``: put TensorQuantizers into a float model, in place."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..config import Override, PlacementConfig
from ..fold import fold_batchnorm
from ..formats import QuantSpec
from ..nn.attention import ATTENTION_QUANTIZERS, QuantAttention, check_attention, is_timm_attention
from ..nn.layers import QUANT_LAYERS
from ..nn.residual import RESIDUAL_QUANTIZERS, QuantResidualBlock, check_block, is_timm_block
from ..quantizer import TensorQuantizer
from .families import DEFAULT_KEEP_FLOAT, FAMILIES, detect_family, in_scope, transformer_scopes
from .generic import is_linear, is_quantizable_layer, module_refs, quantize_layer, set_module
from .overrides import apply_quantizer_rules, build_rules, check_all_matched, decide_float, mark_module_hits
from .vit import block_weight_spec, mode_settings

ROOT_INPUT_QUANTIZER = "input_quantizer"


@dataclass
class PlacementResult:
    """What :func:`place_quantizers` did (also stored as ``model.quantcore_placement``).

    ``quantizers``: full dotted names of every TensorQuantizer, in module order. ``share_groups``:
    quantizers that must end with one common range (the union of their calibrated ranges).
    ``folded_bn``: ``(conv, bn)`` pairs folded. ``float_modules``: Linear/Conv/Attention modules (and
    residual blocks when ``quantize_residual``) deliberately left float.
    """

    family: str
    mode: str | None
    quantizers: list[str] = field(default_factory=list)
    share_groups: list[list[str]] = field(default_factory=list)
    folded_bn: list[tuple[str, str]] = field(default_factory=list)
    float_modules: list[str] = field(default_factory=list)


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every TensorQuantizer in ``model`` by full dotted name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def _quantize_model_input(module: nn.Module, args: tuple):
    """Forward pre-hook: fake-quantize the first positional input with ``module.input_quantizer``."""
    q = module._modules.get(ROOT_INPUT_QUANTIZER)
    if q is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    return (q(args[0]),) + tuple(args[1:])


def _add_root_input_quantizer(model: nn.Module, act_spec: QuantSpec, bins: int) -> None:
    q = TensorQuantizer(act_spec, "activation", bins)
    # Registered first so that it leads quantizers(model) and the state_dict.
    model._modules = {ROOT_INPUT_QUANTIZER: q, **model._modules}
    model.register_forward_pre_hook(_quantize_model_input)


def _check_fresh(model: nn.Module) -> None:
    if getattr(model, "quantcore_placement", None) is not None:
        raise ValueError("place_quantizers was already applied to this model")
    quant_types = tuple(set(QUANT_LAYERS.values())) + (TensorQuantizer, QuantAttention, QuantResidualBlock)
    found = [n or "<root>" for n, m in model.named_modules() if isinstance(m, quant_types)]
    if found:
        raise ValueError(f"the model already contains quantized modules {found[:5]}; place quantizers "
                         "on a float model")
    if is_quantizable_layer(model) or is_timm_attention(model) or is_timm_block(model):
        raise ValueError(f"the model itself is a {type(model).__name__}; wrap it in a container "
                         "(e.g. nn.Sequential) so it can be replaced in place")


@dataclass
class _Planned:
    name: str
    module: nn.Module
    kind: str  # "layer" | "attention" | "block"
    specs: dict[str, QuantSpec]  # attribute -> spec of the quantizers it gets
    softmax_input: bool = False


def place_quantizers(model: nn.Module, placement: PlacementConfig, weight_spec: QuantSpec,
                     act_spec: QuantSpec, overrides: Iterable[Override] = (), bins: int = 2048,
                     example_input: torch.Tensor | None = None) -> PlacementResult:
    """Insert quantizers into ``model`` in place and return what was done.

    ``weight_spec`` is used for every weight quantizer (per-channel along axis 0 when its axis is 0;
    in transformer blocks the ft1/ft2 mode sets the axis); ``act_spec`` for every activation
    quantizer. ``overrides`` (recipe order, later wins) can leave modules float or patch quantizer
    specs. ``example_input`` verifies BatchNorm folding (cnn family).

    Everything is planned and validated (attention/block structure, override matches) before the
    model is touched, so a ValueError leaves the model as it was.
    """
    _check_fresh(model)
    overrides = list(overrides)
    family = detect_family(model) if placement.family == "auto" else placement.family
    if family not in FAMILIES:
        raise ValueError(f"unknown placement family {family!r} (expected one of {FAMILIES} or 'auto')")
    attn_family = family in ("vit", "cnn")
    has_attention = any(is_timm_attention(m) for m in model.modules())
    if family == "vit" and not has_attention:
        raise ValueError("family 'vit' needs timm Attention modules, and this model has none "
                         "(use family 'generic' or 'auto')")

    rules = build_rules(placement.keep_float, DEFAULT_KEEP_FLOAT[family], overrides)
    mark_module_hits([n for n, _ in model.named_modules() if n], rules)
    settings = mode_settings(placement) if family == "vit" or (attn_family and has_attention) else None
    scopes = transformer_scopes(model) if settings is not None else []

    # -- plan (the model is not modified) --------------------------------------------------------
    plan: list[_Planned] = []
    float_modules: list[str] = []
    any_block = False
    for name, mod in model.named_modules():  # pre-order, shared modules once (first name)
        if not name:
            continue
        if is_quantizable_layer(mod):
            kind = "layer"
        elif attn_family and is_timm_attention(mod):
            kind = "attention"
        elif placement.quantize_residual and is_timm_block(mod):
            kind, any_block = "block", True
        else:
            continue
        # vit family defaults: only Linears are quantized (convs, e.g. in blocks, stay float). An
        # explicit keep_float list replaces all defaults.
        default_float = (family == "vit" and placement.keep_float is None and kind == "layer"
                         and not is_linear(mod))
        if decide_float(name, rules, default_float):
            float_modules.append(name)
            continue
        scoped = settings is not None and in_scope(name, scopes)
        if kind == "layer":
            wspec = block_weight_spec(weight_spec, settings, name) if scoped and is_linear(mod) else weight_spec
            specs = {"input_quantizer": act_spec, "weight_quantizer": wspec}
            if scoped and settings.gemm_output and is_linear(mod):
                specs["output_quantizer"] = act_spec
            plan.append(_Planned(name, mod, kind, specs))
        elif kind == "attention":
            check_attention(mod, name)
            specs = {a: act_spec for a in ATTENTION_QUANTIZERS
                     if a != "softmax_input_quantizer" or settings.softmax_input}
            plan.append(_Planned(name, mod, kind, specs, softmax_input=settings.softmax_input))
        else:
            check_block(mod, name)
            plan.append(_Planned(name, mod, kind, {a: act_spec for a in RESIDUAL_QUANTIZERS}))
    if placement.quantize_residual and not any_block:
        raise ValueError("quantize_residual is set, but the model has no timm vision_transformer.Block "
                         "whose residual adds quantcore can quantize")

    root_input = False
    if placement.quantize_model_input:
        root_input = True
        if family == "cnn":
            # The first conv's input quantizer already quantizes the image.
            first = next((n for n, m in model.named_modules() if isinstance(m, _ConvNd)), None)
            root_input = not any(p.name == first and p.kind == "layer" for p in plan)
        if root_input and hasattr(model, ROOT_INPUT_QUANTIZER):
            raise ValueError(f"the model already has an attribute {ROOT_INPUT_QUANTIZER!r}; cannot add "
                             "the model-input quantizer")

    planned_specs: dict[str, QuantSpec] = {}
    if root_input:
        planned_specs[ROOT_INPUT_QUANTIZER] = act_spec
    for p in plan:
        for attr, spec in p.specs.items():
            planned_specs[f"{p.name}.{attr}"] = spec
    final_specs, remove, spec_hits = apply_quantizer_rules(planned_specs, rules)
    check_all_matched(rules, spec_hits)
    removed = set(remove)

    # -- apply -------------------------------------------------------------------------------------
    folded: list[tuple[str, str]] = []
    if family == "cnn" and placement.fold_bn:
        folded = fold_batchnorm(model, example_input)

    refs = module_refs(model)
    share_groups: list[list[str]] = []
    for p in plan:
        if p.kind == "layer":
            new = quantize_layer(p.module, p.specs["input_quantizer"], p.specs["weight_quantizer"],
                                 p.specs.get("output_quantizer"), bins)
        elif p.kind == "attention":
            new = QuantAttention.from_float(p.module, act_spec, softmax_input=p.softmax_input, bins=bins,
                                            name=p.name)
            if settings.share_qkv:
                share_groups.append([f"{p.name}.{a}" for a in ("q_quantizer", "k_quantizer", "v_quantizer")])
        else:
            new = QuantResidualBlock.from_float(p.module, act_spec, bins=bins, name=p.name)
        for attr in p.specs:
            qname = f"{p.name}.{attr}"
            if qname in removed:
                setattr(new, attr, None)
            else:
                q = getattr(new, attr)
                if q.spec != final_specs[qname]:
                    q.set_spec(final_specs[qname])
        for ref in refs[id(p.module)]:
            set_module(model, ref, new)
    if root_input and ROOT_INPUT_QUANTIZER not in removed:
        _add_root_input_quantizer(model, final_specs[ROOT_INPUT_QUANTIZER], bins)

    names = list(quantizers(model))
    present = set(names)
    groups = [[q for q in g if q in present] for g in share_groups]
    result = PlacementResult(
        family=family,
        mode=settings.mode if settings is not None else None,
        quantizers=names,
        share_groups=[g for g in groups if len(g) > 1],
        folded_bn=folded,
        float_modules=float_modules,
    )
    model.quantcore_placement = result
    return result
