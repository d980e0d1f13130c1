"""Transformer placement as in NVIDIA FasterTransformer's ViT INT8 modes.

* ``ft1``: per-channel weights (axis 0, the default of ``quant.weights``; a recipe's per-tensor
  request is kept); quantizers on GEMM inputs (qkv/proj/fc1/fc2 inputs and
  weights, q/k for ``Q@K^T``, softmax output and v for ``attn@V``); no softmax-input, residual or
  GEMM-output quantizers.
* ``ft2``: per-tensor weights; additionally the softmax input and the output of every block Linear
  (qkv, proj, fc1, fc2) are quantized, and those of q/k/v that reach the attention only moved or
  split share one range (a share group whose union range the calibration finalize sets) with the
  output quantizer(s) of the GEMM(s) that produce them: FasterTransformer's fused QKV GEMM writes one
  int8 tensor with one scale, so the values are rounded once, not twice. A q/k/v scaled, normalized
  or otherwise transformed on the way keeps a range of its own (a placement note names it).

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
    """The mode's weight granularity for a Linear inside a transformer block.

    ft2 quantizes these weights per tensor (its definition). ft1's per-channel granularity (axis 0) is
    the default of ``quant.weights``, so any other granularity there (``per_channel: false``, another
    axis) was asked for by the recipe and is kept, never silently replaced. Raises PlacementError when
    the weight format cannot be quantized per tensor under ft2."""
    if weight_spec.is_float or weight_spec.axis is None or settings.weight_axis is not None:
        return weight_spec
    try:
        return QuantSpec.model_validate({**weight_spec.model_dump(), "axis": None})
    except ValueError as e:
        errs = e.errors() if isinstance(e, ValidationError) else []
        why = "; ".join(str(x.get("msg", "")).removeprefix("Value error, ") for x in errs) or str(e)
        raise PlacementError(f"quant.weights: placement mode {settings.mode} quantizes the weights of transformer-block "
                             f"Linears per tensor, e.g. {name!r}, and the weight spec {weight_spec.short()} cannot: "
                             f"{why}. Use placement.mode ft1, or another weight format") from None
