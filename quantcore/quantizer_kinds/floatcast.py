"""Float formats (FP16, BF16, FP8 E4M3/E5M2): a cast round-trip, no range and no calibration.

FP16_32 in recipes is FP16 weights and inputs with FP32 accumulation: a cast on both, which is what
these quantizers do (the matmul itself runs in the model's dtype).
"""
from __future__ import annotations

import torch

from .base import QuantizerKind, register_quantizer_kind

#: format name -> torch dtype; FP8 only where this torch has the dtypes.
FLOAT_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
if hasattr(torch, "float8_e4m3fn"):
    FLOAT_DTYPES["fp8_e4m3"] = torch.float8_e4m3fn
if hasattr(torch, "float8_e5m2"):
    FLOAT_DTYPES["fp8_e5m2"] = torch.float8_e5m2


class FloatCast(QuantizerKind):
    """``x.to(dtype).to(x.dtype)``: rounding to the format's nearest value, overflow to inf."""

    name = "float"
    is_float = True

    def fake_quant(self, quantizer, x: torch.Tensor) -> torch.Tensor:
        return x.to(FLOAT_DTYPES[quantizer.spec.format]).to(x.dtype)


register_quantizer_kind(FloatCast(), *FLOAT_DTYPES)
