"""Transformer placement as in NVIDIA FasterTransformer's ViT INT8 modes.

* ``ft1``: per-channel weights (axis 0); quantizers on GEMM inputs (qkv/proj/fc1/fc2 inputs and
  weights, q/k for ``Q@K^T``, softmax output and v for ``attn@V``); no softmax-input, residual or
  GEMM-output quantizers.
* ``ft2``: per-tensor weights; additionally the softmax input and the output of every block Linear
  (qkv, proj, fc1, fc2) are quantized, and q/k/v of each attention share one range (a share group
  whose union range the calibration finalize sets).

``PlacementConfig.quantize_softmax_input`` / ``quantize_gemm_output`` / ``share_qkv_range`` override the
mode defaults when not None; ``quantize_residual`` adds quantizers on both inputs of both residual adds
of every timm ``Block`` (independent of the mode).
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from ..config import PlacementConfig
from ..errors import PlacementError
from ..formats import QuantSpec


@dataclass(frozen=True)
class ModeSettings:
    mode: str
    weight_axis: int | None
    softmax_input: bool
    gemm_output: bool
    share_qkv: bool


def mode_settings(placement: PlacementConfig) -> ModeSettings:
    mode = placement.mode
    if mode not in ("ft1", "ft2"):
        raise PlacementError(f"unknown ViT placement mode {mode!r} (expected 'ft1' or 'ft2')")
    ft2 = mode == "ft2"

    def pick(value: bool | None) -> bool:
        return ft2 if value is None else bool(value)

    return ModeSettings(mode=mode, weight_axis=None if ft2 else 0,
                        softmax_input=pick(placement.quantize_softmax_input),
                        gemm_output=pick(placement.quantize_gemm_output),
                        share_qkv=pick(placement.share_qkv_range))


def block_weight_spec(weight_spec: QuantSpec, settings: ModeSettings, name: str) -> QuantSpec:
    """The mode's weight granularity for a Linear inside a transformer block."""
    if weight_spec.is_float or weight_spec.axis == settings.weight_axis:
        return weight_spec
    try:
        return QuantSpec.model_validate({**weight_spec.model_dump(), "axis": settings.weight_axis})
    except ValueError as e:
        errs = e.errors() if isinstance(e, ValidationError) else []
        why = "; ".join(str(x.get("msg", "")).removeprefix("Value error, ") for x in errs) or str(e)
        need = "per channel (axis 0)" if settings.weight_axis is not None else "per tensor"
        other = "ft2 (per-tensor weights)" if settings.weight_axis is not None else "ft1 (per-channel weights)"
        default = " (the default of transformer models)" if settings.mode == "ft1" else ""
        raise PlacementError(f"quant.weights: placement mode {settings.mode}{default} quantizes the weights of transformer-block Linears {need}, e.g. {name!r}, "
                             f"and the weight spec {weight_spec.short()} cannot: {why}. Use placement.mode "
                             f"{other}, or another weight format") from None
