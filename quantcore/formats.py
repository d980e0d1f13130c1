"""What a quantizer does to a tensor: integer grid or float cast, bits, symmetry, axis.

A :class:`QuantSpec` is pure data (a validated pydantic model) so that recipes, checkpoints and
``encodings.json`` all describe quantizers the same way.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from ._model import Section

from .calib.registry import calibrator, calibrator_names
from .quantizer_kinds import FLOAT_DTYPES, quantizer_kind, quantizer_kind_names
from .quantizer_kinds.dynamic import SCALE_FORMATS


def _known_format(name: str) -> str:
    quantizer_kind(name)  # ValueError listing the registered formats
    return name


def _known_calibrator(name: str) -> str:
    calibrator(name)
    return name


#: A registered quantizer kind (``quantcore.quantizer_kinds``): int, fp16, bf16, fp8_e4m3, fp8_e5m2, ...
FormatName = Annotated[str, AfterValidator(_known_format)]
#: A registered calibrator (``quantcore.calib.registry``): max, percentile, mse, entropy, tf_enhanced, ...
CalibMethod = Annotated[str, AfterValidator(_known_calibrator)]

#: How a run-time scale is stored (format ``int_dynamic``): the keys of ``quantizer_kinds.dynamic.SCALE_FORMATS``
ScaleFormat = Literal[tuple(SCALE_FORMATS)]  # type: ignore[valid-type]

__all__ = ["FLOAT_DTYPES", "CalibMethod", "FormatName", "QuantSpec", "ScaleFormat", "calibrator_names",
           "quantizer_kind_names"]


class QuantSpec(Section):
    """Descriptor of one quantizer (what, not how)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    format: FormatName = "int"
    bits: int = Field(8, ge=2, le=16, description="integer bits (integer formats only: given with a float format it is refused)")
    symmetric: bool = True
    axis: int | None = Field(None, description="channel axis for per-channel ranges; None = per-tensor")
    narrow_range: bool = Field(False, description="symmetric grid without the most negative code")
    block_size: int | None = Field(None, ge=2, description="format int_dynamic: consecutive elements of the slice "
                                   "the consuming product contracts (a token's features) that share one run-time "
                                   "scale; None = the whole slice (per token)")
    scale_format: ScaleFormat | None = Field(
        None, description="format int_dynamic: how each run-time scale is stored (unset: fp16); see "
        "quantcore/quantizer_kinds/dynamic.py")
    calibrator: CalibMethod = "max"
    percentile: float = Field(99.99, gt=0.0, le=100.0)
    learnable: bool = Field(False, description="use torch's learnable fake-quant ops (QAT)")
    enabled: bool = True

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        kind = quantizer_kind(self.format)
        kind.validate(self)  # first: a kind's own rule (no per-channel ranges at all) says more
        if not kind.is_float and self.axis is not None and not calibrator(self.calibrator).per_channel:
            per_ch = [n for n in calibrator_names() if calibrator(n).per_channel]
            raise ValueError(f"per-channel ranges support calibrator {per_ch} only, not {self.calibrator!r}")
        if self.narrow_range and not self.symmetric:
            raise ValueError("narrow_range applies to symmetric quantizers only")
        return self

    @property
    def kind(self):
        """The registered :class:`~quantcore.quantizer_kinds.QuantizerKind` of ``format``."""
        return quantizer_kind(self.format)

    @property
    def is_float(self) -> bool:
        """A cast round-trip (no range, no calibration)."""
        return quantizer_kind(self.format).is_float

    @property
    def on_grid(self) -> bool:
        """Enabled and not a float cast: it rounds to a grid whose range calibration sets."""
        return self.enabled and not self.is_float

    def qrange(self) -> tuple[int, int]:
        """Integer code range (quant_min, quant_max) of the kind's grid."""
        return quantizer_kind(self.format).qrange(self)

    def short(self) -> str:
        if self.is_float:
            return self.format
        kind = "sym" if self.symmetric else "asym"
        gran = f"ch{self.axis}" if self.axis is not None else "tensor"
        if quantizer_kind(self.format).supports_blocks:  # run-time scales: per token or per block
            gran = "token" if self.block_size is None else f"block{self.block_size}"
            if self.scale_format not in (None, "fp16"):  # the default stays out of every table's rows
                gran += f"@{self.scale_format}"
        # the registered kind by name: a 4-bit log2 or twin grid is not int4
        grid = f"int{self.bits}" if self.format == "int" else f"{self.format}:{self.bits}b"
        return f"{grid}/{kind}/{gran}/{self.calibrator}"
