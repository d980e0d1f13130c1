"""Declarative, validated configuration: one recipe = model + placement + formats + calibration.

Recipes are YAML files; every model here forbids unknown fields, so a typo gives an error naming the
field (see :func:`quantcore.recipe.load_recipe`). ``version`` lets old saved recipes keep loading.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .formats import CalibMethod, FormatName, QuantSpec

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpecPatch(_Strict):
    """Partial :class:`QuantSpec`: only the fields given are changed."""

    format: FormatName | None = None
    bits: int | None = Field(None, ge=2, le=16)
    symmetric: bool | None = None
    axis: int | None = None
    per_channel: bool | None = Field(None, description="shortcut: True = axis 0, False = per-tensor")
    narrow_range: bool | None = None
    calibrator: CalibMethod | None = None
    percentile: float | None = Field(None, gt=0.0, le=100.0)
    enabled: bool | None = None

    def apply(self, spec: QuantSpec) -> QuantSpec:
        upd = self.model_dump(exclude_none=True, exclude={"per_channel"})
        if self.per_channel is not None and "axis" not in upd:
            upd["axis"] = 0 if self.per_channel else None
        return QuantSpec.model_validate({**spec.model_dump(), **upd})


class Override(_Strict):
    """Per-name policy. ``match`` is a glob on module names (``blocks.4.mlp.fc2``) or quantizer
    names (``blocks.*.attn.softmax_input_quantizer``). Later overrides win."""

    match: str = Field(min_length=1)
    float: bool = Field(False, description="leave matching modules in float (no quantizers at all)")
    spec: SpecPatch | None = Field(None, description="change bits/format/symmetry/calibrator/enabled")
    enabled: bool | None = Field(None, description="shortcut for spec.enabled")


class ModelConfig(_Strict):
    name: str = Field(min_length=1, description="timm name, 'torchvision:<name>', or a registered builder")
    source: Literal["auto", "timm", "torchvision"] = "auto"
    pretrained: bool = Field(False, description="load the library's pretrained weights (needs a local file or hub)")
    checkpoint: str | None = Field(None, description="local path, file:// or s3:// URI of FP32 weights")
    pretrained_file: str | None = Field(None, description="timm pretrained_cfg overlay: weights file")
    num_classes: int | None = Field(None, ge=1)
    in_chans: int | None = Field(None, ge=1)
    img_size: int | None = Field(None, ge=1)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra builder arguments")


class PlacementConfig(_Strict):
    family: Literal["auto", "vit", "cnn", "generic"] = "auto"
    mode: Literal["ft1", "ft2"] = Field("ft1", description="ViT mode as in FasterTransformer")
    quantize_softmax_input: bool | None = Field(None, description="default: ft2 only")
    quantize_gemm_output: bool | None = Field(None, description="default: ft2 only")
    share_qkv_range: bool | None = Field(None, description="one range for q/k/v; default: ft2 only")
    quantize_residual: bool = Field(False, description="quantize both inputs of residual adds")
    quantize_model_input: bool = Field(False, description="quantize the image fed to the model")
    fold_bn: bool = Field(True, description="fold BatchNorm into the preceding conv before calibration")
    keep_float: list[str] | None = Field(None, description="module globs left float; None = family default")


class QuantFormats(_Strict):
    weights: SpecPatch = Field(default_factory=lambda: SpecPatch(bits=8, symmetric=True, per_channel=True))
    activations: SpecPatch = Field(default_factory=lambda: SpecPatch(bits=8, symmetric=True))


class CalibrationConfig(_Strict):
    method: CalibMethod = "percentile"
    percentile: float = Field(99.99, gt=0.0, le=100.0)
    weights_method: Literal["max", "mse"] = "max"
    num_batches: int | None = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    images_per_class: int | None = Field(None, ge=1, description="calibration subset, e.g. 2 per class")
    bins: int = Field(2048, ge=64, le=65536)
    seed: int = 0

    @model_validator(mode="after")
    def _even_bins(self) -> "CalibrationConfig":
        if self.bins % 2:
            raise ValueError("bins must be even")
        return self


class TrainConfig(_Strict):
    """Plain FP32 training / fine-tuning (single process; QAT comes later)."""

    epochs: int = Field(12, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    pct_start: float = Field(0.25, gt=0, lt=1, description="OneCycle warm-up fraction")
    hflip: bool = Field(True, description="random horizontal flips")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    num_workers: int = Field(0, ge=0)
    seed: int = 0


class Recipe(_Strict):
    version: int = RECIPE_VERSION
    name: str = "custom"
    description: str = ""
    model: ModelConfig | None = Field(None, description="the FP32 model to build; optional only for "
                                      "quantcore.prepare(my_module, recipe) on a model you built yourself")
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    quant: QuantFormats = Field(default_factory=QuantFormats)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    overrides: list[Override] = Field(default_factory=list)
    train: TrainConfig | None = None

    @model_validator(mode="after")
    def _version(self) -> "Recipe":
        if self.version > RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is newer than this quantcore ({RECIPE_VERSION})")
        if self.name == "fp32":
            raise ValueError("name: 'fp32' is reserved for the FP32 reference in reports; choose another name")
        for section, spec in (("quant.weights", self.weight_spec), ("quant.activations", self.activation_spec)):
            try:
                spec()
            except ValidationError as err:  # the combined spec is wrong: name the section, not QuantSpec
                msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
                raise ValueError(f"{section}: {msgs}") from None
        if self.activation_spec().axis is not None:
            raise ValueError("quant.activations: per_channel/axis is for weights only (an activation's axis 0 "
                             "is the batch); remove it")
        return self

    def weight_spec(self) -> QuantSpec:
        base = QuantSpec(calibrator=self.calibration.weights_method, axis=0)
        return self.quant.weights.apply(base)

    def activation_spec(self) -> QuantSpec:
        base = QuantSpec(calibrator=self.calibration.method, percentile=self.calibration.percentile,
                         symmetric=True)
        return self.quant.activations.apply(base)
