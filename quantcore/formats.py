"""What a quantizer does to a tensor: integer grid or float cast, bits, symmetry, axis.

A :class:`QuantSpec` is pure data (a validated pydantic model) so that recipes, checkpoints and
``encodings.json`` all describe quantizers the same way.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

FormatName = Literal["int", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2"]
CalibMethod = Literal["max", "percentile", "mse", "entropy", "tf_enhanced"]

# Float formats are cast round-trips; FP8 only where this torch has the dtypes.
FLOAT_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
if hasattr(torch, "float8_e4m3fn"):
    FLOAT_DTYPES["fp8_e4m3"] = torch.float8_e4m3fn
if hasattr(torch, "float8_e5m2"):
    FLOAT_DTYPES["fp8_e5m2"] = torch.float8_e5m2


class QuantSpec(BaseModel):
    """Descriptor of one quantizer (what, not how)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: FormatName = "int"
    bits: int = Field(8, ge=2, le=16, description="integer bits (ignored for float formats)")
    symmetric: bool = True
    axis: int | None = Field(None, description="channel axis for per-channel ranges; None = per-tensor")
    narrow_range: bool = Field(False, description="symmetric grid without the most negative code")
    calibrator: CalibMethod = "max"
    percentile: float = Field(99.99, gt=0.0, le=100.0)
    learnable: bool = Field(False, description="use torch's learnable fake-quant ops (QAT)")
    enabled: bool = True

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.format != "int" and self.format not in FLOAT_DTYPES:
            raise ValueError(f"format {self.format!r} needs a torch with that dtype")
        if self.format == "int" and self.axis is not None and self.calibrator not in ("max", "mse"):
            raise ValueError("per-channel ranges support calibrator 'max' or 'mse' (weights) only")
        if self.narrow_range and not self.symmetric:
            raise ValueError("narrow_range applies to symmetric quantizers only")
        return self

    @property
    def is_float(self) -> bool:
        return self.format != "int"

    def qrange(self) -> tuple[int, int]:
        """Integer code range (quant_min, quant_max)."""
        if self.symmetric:
            top = 2 ** (self.bits - 1) - 1
            return (-top if self.narrow_range else -top - 1), top
        return 0, 2**self.bits - 1

    def short(self) -> str:
        if self.is_float:
            return self.format
        kind = "sym" if self.symmetric else "asym"
        gran = f"ch{self.axis}" if self.axis is not None else "tensor"
        return f"int{self.bits}/{kind}/{gran}/{self.calibrator}"
