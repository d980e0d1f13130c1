"""Declarative, validated configuration: one recipe = model + placement + formats + calibration.

Recipes are YAML files; every model here forbids unknown fields, so a typo gives an error naming the
field (see :func:`quantcore.recipe.load_recipe`). ``version`` lets old saved recipes keep loading.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from ._model import Section
from .formats import CalibMethod, FormatName, QuantSpec, ScaleFormat
from .quantizer_kinds import quantizer_kind
from .recon.config import ReconstructionConfig


def _stored(info: ValidationInfo | None) -> bool:
    """Validating a recipe read back from a checkpoint (``context={"stored": True}``): it was accepted
    when the checkpoint was written, so refusals of options that cannot act (added since) must not
    make the checkpoint unreadable; they apply to recipes being run."""
    return bool(info is not None and info.context and info.context.get("stored"))

RECIPE_VERSION = 1
#: what ptq/calibrate/evaluate/qat/analyze/export write at the top of a run's output folder, beside each
#: recipe's <out>/<name>/ folder: no recipe may be named like one of them
RUN_FILES = frozenset({"report.json", "report.md", "per_class.png", "training.png", "metrics.jsonl", "checkpoints",
                       "ptq", "analysis.json", "analysis.md", "sqnr.png", "pareto.png", "search_recipe.yaml",
                       "export_report.json", "summary.json", "summary.md"})
_RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class _Strict(Section):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


#: the fields only an integer (or other range-based) grid reads; a float cast reads none of them
GRID_FIELDS = ("bits", "symmetric", "axis", "per_channel", "narrow_range", "block_size", "scale_format",
               "calibrator", "percentile")


class SpecPatch(_Strict):
    """Partial :class:`QuantSpec`: only the fields given are changed."""

    format: FormatName | None = None
    bits: int | None = Field(None, ge=2, le=16)
    symmetric: bool | None = None
    axis: int | None = None
    per_channel: bool | None = Field(None, description="shortcut: True = axis 0, False = per-tensor")
    narrow_range: bool | None = None
    block_size: int | None = Field(None, ge=2, description="format int_dynamic: consecutive elements of the slice "
                                   "the consuming product contracts sharing one run-time scale (unset: the whole "
                                   "slice, per token)")
    scale_format: ScaleFormat | None = Field(None, description="format int_dynamic: how each run-time scale is "
                                             "stored (unset: fp16)")
    calibrator: CalibMethod | None = None
    percentile: float | None = Field(None, gt=0.0, le=100.0)
    enabled: bool | None = None

    @model_validator(mode="after")
    def _applies(self, info: ValidationInfo) -> "SpecPatch":
        """Fields that cannot act on what the same patch asks for are refused, not dropped."""
        if _stored(info):
            return self
        if self.per_channel is False and self.axis is not None:
            raise ValueError(f"per_channel: false and axis: {self.axis} contradict each other; give one")
        if self.calibrator not in (None, "percentile") and self.percentile is not None:
            raise ValueError(f"percentile applies to calibrator percentile only, not {self.calibrator!r}")
        if self.format is not None and quantizer_kind(self.format).is_float:
            bad = self.grid_fields()
            if bad:
                raise ValueError(f"{', '.join(bad)}: not an option of format {self.format!r} (a float cast has "
                                 f"no integer grid, range or calibration)")
        return self

    def grid_fields(self) -> list[str]:
        """The grid fields this patch sets (a float cast reads none of them)."""
        return [k for k in GRID_FIELDS if getattr(self, k) is not None]

    def apply(self, spec: QuantSpec | dict[str, Any]) -> QuantSpec:
        """``spec`` (a QuantSpec, or its fields: validated once, with this patch) with this patch's fields."""
        upd = self.model_dump(exclude_none=True, exclude={"per_channel"})
        if self.per_channel is not None and "axis" not in upd:
            upd["axis"] = 0 if self.per_channel else None
        base = spec.model_dump() if isinstance(spec, QuantSpec) else spec
        if "format" in upd and not quantizer_kind(upd["format"]).supports_blocks:
            # the section's run-time block size and scale format belong to its format: a patch that picks
            # another format (an int/fp16 override of an int_dynamic section, a search choice) leaves them
            # behind (those the patch itself gives are refused by the format's own rule)
            base = {**base, **{k: None for k in ("block_size", "scale_format") if k not in upd}}
        return QuantSpec.model_validate({**base, **upd})


class Override(_Strict):
    """Per-name policy. ``match`` is a glob on module names (``blocks.4.mlp.fc2``) or quantizer
    names (``blocks.*.attn.softmax_input_quantizer``). Later overrides win."""

    match: str = Field(min_length=1)
    float: bool | None = Field(None, description="true: leave matching modules in float (no quantizers at all); "
                               "false: quantize them even where the placement family keeps them float by default "
                               "(a ViT's patch embedding and head); unset: no decision (a saved recipe keeps it unset)")
    spec: SpecPatch | None = Field(None, description="change bits/format/symmetry/calibrator/enabled")
    enabled: bool | None = Field(None, description="shortcut for spec.enabled")

    @model_validator(mode="after")
    def _one_enabled(self, info: ValidationInfo) -> "Override":
        if self.enabled is not None and self.spec is not None and self.spec.enabled is not None \
                and self.enabled != self.spec.enabled:
            raise ValueError(f"override {self.match!r}: enabled: {self.enabled} and spec.enabled: {self.spec.enabled} "
                             "contradict each other; give one")
        if _stored(info):
            return self
        # settings this same override keeps from acting are refused, not recorded as if they applied
        fields = [f"spec.{k}" for k in (self.spec.model_fields_set if self.spec is not None else ())
                  if k != "enabled" and getattr(self.spec, k) is not None]
        if self.float:
            given = fields + (["enabled"] if self.enabled is not None else []) + \
                (["spec.enabled"] if self.spec is not None and self.spec.enabled is not None else [])
            if given:
                raise ValueError(f"override {self.match!r}: float: true leaves the matching modules without "
                                 f"quantizers, so {', '.join(given)} cannot act; drop them, or drop float: true")
        disabled = self.enabled is False or (self.spec is not None and self.spec.enabled is False)
        if disabled and fields:
            raise ValueError(f"override {self.match!r}: enabled: false switches the matching quantizers off, so "
                             f"{', '.join(fields)} cannot act; drop them, or set them in an override that "
                             f"enables those quantizers")
        return self


def _known_source(name: str) -> str:
    if name != "auto":
        from .model_sources import SOURCES

        SOURCES.get(name)  # ValueError listing the registered model sources
    return name


class ModelConfig(_Strict):
    name: str = Field(min_length=1, description="timm name, 'torchvision:<name>', a registered builder, or a "
                      "Hugging Face save_pretrained directory (local/s3://)")
    source: Annotated[str, AfterValidator(_known_source)] = Field(
        "auto", description="a registered model source (builder, timm, torchvision, hf, npz, ...) or 'auto': "
        "picked from model.name / model.checkpoint (quantcore.model_sources)")
    pretrained: bool = Field(False, description="load the library's pretrained weights (needs a local file or hub)")
    checkpoint: str | None = Field(None, description="local path, file:// or s3:// URI of FP32 weights: a torch "
                                   "state_dict, safetensors, or a Google ViT .npz (source npz)")
    pretrained_file: str | None = Field(None, description="timm pretrained_cfg overlay: weights file")
    num_classes: int | None = Field(None, ge=1)
    in_chans: int | None = Field(None, ge=1)
    img_size: int | None = Field(None, ge=1)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra builder arguments")

    @model_validator(mode="after")
    def _one_weights_file(self) -> "ModelConfig":
        # both name the FP32 weights; create_model would load model.checkpoint and never open the other
        if self.checkpoint and self.pretrained_file:
            raise ValueError(f"model.checkpoint ({self.checkpoint}) and model.pretrained_file "
                             f"({self.pretrained_file}) both give the weights: keep one")
        return self


def _known_family(name: str) -> str:
    if name != "auto":
        from .placement.families import family_plan

        family_plan(name)  # ValueError listing the registered families
    return name


class PlacementConfig(_Strict):
    family: Annotated[str, AfterValidator(_known_family)] = Field(
        "auto", description="a registered family (vit, cnn, generic, ...) or 'auto'")
    mode: Literal["ft1", "ft2"] = Field("ft1", description="ViT mode as in FasterTransformer")
    quantize_softmax_input: bool | None = Field(None, description="default: ft2 only")
    quantize_gemm_output: bool | None = Field(None, description="default: ft2 only")
    share_qkv_range: bool | None = Field(
        None, description="one range for the q/k/v that are their GEMM's output as it is, shared with that "
                          "GEMM's output quantizer; default: ft2 only")
    quantize_residual: bool = Field(False, description="quantize both inputs of residual adds")
    quantize_model_input: bool = Field(False, description="quantize the image fed to the model: when the first "
                                       "layer reads it directly, that layer's input quantizer does (other readers of "
                                       "the image, such as a skip connection, keep it float); otherwise a quantizer "
                                       "on the model's own input")
    fold_bn: bool = Field(True, description="fold BatchNorm into the preceding conv before calibration")
    keep_float: list[str] | None = Field(None, description="module globs left float; None = family default")
    reparam_layernorm: bool = Field(False, description="RepQ-ViT: fold per-channel post-LayerNorm ranges into the "
                                    "LayerNorm affine and the next Linear(s) before calibration (one extra FP32 pass), "
                                    "so their inputs quantize per tensor (quantcore.transforms.reparam)")


class QuantFormats(_Strict):
    weights: SpecPatch = Field(default_factory=lambda: SpecPatch(bits=8, symmetric=True, per_channel=True))
    activations: SpecPatch = Field(default_factory=lambda: SpecPatch(bits=8, symmetric=True))


def _known_backend(name: str) -> str:
    from .backends import backend

    backend(name)  # ValueError listing the registered backends
    return name


#: fields every quantcore dump has spelled out since the first version (dump_recipe writes all
#: fields), by section: a recipe file naming them all is read as a dump (Recipe._calibration_applies)
_DUMPED = {"": frozenset({"version", "name", "description", "placement", "quant", "calibration", "overrides"}),
           "placement": frozenset({"family", "mode", "quantize_softmax_input", "quantize_gemm_output",
                                   "share_qkv_range", "quantize_residual", "quantize_model_input", "fold_bn"}),
           "calibration": frozenset({"method", "percentile", "weights_method", "num_batches", "batch_size",
                                     "images_per_class", "bins", "seed"})}


def _looks_dumped(recipe: Any) -> bool:
    """True when ``recipe`` (read from a file) spells out every field a quantcore dump always wrote."""
    return all(fields <= (getattr(recipe, section) if section else recipe).model_fields_set
               for section, fields in _DUMPED.items())


class CalibrationConfig(_Strict):
    method: CalibMethod = "percentile"
    percentile: float = Field(99.99, gt=0.0, le=100.0)
    weights_method: CalibMethod = "max"
    num_batches: int | None = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    images_per_class: int | None = Field(None, ge=1, description="calibration subset, e.g. 2 per class")
    bins: int = Field(2048, ge=64, le=65536)
    seed: int = 0
    backend: Annotated[str, AfterValidator(_known_backend)] = Field(
        "native", description="the engine that computes the ranges of quantcore's quantizers: native, modelopt "
        "(NVIDIA ModelOpt's calibrators), aimet (AIMET QuantSim) - quantcore.backends")

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


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum, as FasterTransformer's QAT) or adamw")
    lr: float = Field(1e-4, gt=0, description="peak learning rate of the model weights")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    nesterov: bool = False
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw only")
    weight_decay: float = Field(0.0, ge=0, description="not applied to biases, norms and quantizer ranges")
    range_lr: float | None = Field(None, gt=0, description="learning rate of learned scales/zero points "
                                   "(default: lr). sgd: as it is; adamw: relative - a scale steps by about "
                                   "range_lr x its calibrated value, a zero point by range_lr x the grid width")

    @model_validator(mode="after")
    def _applies(self, info: ValidationInfo) -> "OptimizerConfig":
        if _stored(info):
            return self
        # (set to a non-default value: a dumped recipe carries every field)
        only = {"sgd": ("betas",), "adamw": ("momentum", "nesterov")}[self.name]
        bad = sorted(k for k in only if getattr(self, k) != type(self).model_fields[k].default)
        if bad:
            raise ValueError(f"{', '.join(bad)}: not an option of optimizer {self.name!r}")
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: true needs momentum > 0 (Nesterov momentum without momentum is plain SGD)")
        return self


class ScheduleConfig(_Strict):
    name: Literal["cosine", "onecycle", "constant", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from warmup_start x lr (cosine/constant/linear)")
    warmup_start: float = Field(0.01, ge=0, le=1)
    min_lr: float = Field(0.0, ge=0, description="end of the cosine/linear decay (absolute)")
    pct_start: float = Field(0.25, gt=0, lt=1, description="onecycle: warm-up fraction")

    @model_validator(mode="after")
    def _applies(self, info: ValidationInfo) -> "ScheduleConfig":
        if _stored(info):
            return self
        # (set to a non-default value: a dumped recipe carries every field)
        unused = {"onecycle": ("warmup_steps", "warmup_start", "min_lr"), "constant": ("min_lr", "pct_start"),
                  "cosine": ("pct_start",), "linear": ("pct_start",)}[self.name]
        bad = sorted(k for k in unused if getattr(self, k) != type(self).model_fields[k].default)
        if bad:
            raise ValueError(f"{', '.join(bad)}: not an option of schedule {self.name!r}")
        if self.warmup_steps == 0 and self.warmup_start != type(self).model_fields["warmup_start"].default:
            raise ValueError(f"warmup_start: {self.warmup_start} is set but warmup_steps is 0 (no warm-up to start)")
        return self


class DistillConfig(_Strict):
    """Knowledge distillation from a float teacher (seed 002: KL, T=3; seed 004: DeiT with a CNN)."""

    kind: Literal["none", "kd", "logit_mse", "deit_hard", "deit_soft"] = Field(
        "none", description="kd: KL(student/T || teacher/T) * T^2 on the logits; logit_mse: mean squared "
        "error of the logits (KD's T->inf limit, Kim et al. 2021; matches the teacher's decisions best, "
        "temperature unused); deit_*: DeiT distillation token (timm *_distilled_* models, transformers "
        "DeiTForImageClassificationWithTeacher) trained on the teacher's hard label or its soft KL")
    teacher: ModelConfig | None = Field(None, description="the teacher model; None = the FP32 model being "
                                        "quantized (self-distillation)")
    temperature: float = Field(3.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="loss = (1-alpha) * CE(label) + alpha * distillation")

    @model_validator(mode="after")
    def _temperature_applies(self, info: ValidationInfo) -> "DistillConfig":
        if _stored(info):
            return self
        # compared with the default, not model_fields_set: stored recipes are dumped with every field
        if self.temperature != type(self).model_fields["temperature"].default and \
                self.kind in ("none", "logit_mse", "deit_hard"):
            raise ValueError(f"distill.temperature does not apply to kind {self.kind} (only kd and deit_soft)")
        return self


class AugmentConfig(_Strict):
    """The training transform: the model's own data config (mean/std/size/interpolation) through
    timm's ``create_transform(is_training=True)``; ``none`` uses the eval transform (no augmentation)."""

    kind: Literal["model", "none"] = "model"
    scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect range")
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float | None = Field(None, ge=0)
    auto_augment: str | None = Field(None, description="timm auto-augment policy, e.g. rand-m9-mstd0.5")
    re_prob: float = Field(0.0, ge=0, le=1, description="random erasing probability")


class QATConfig(_Strict):
    """Quantization-aware training: the one loop of ``quantcore qat`` (single process, torchrun ranks,
    Ray Train workers). Batch size is per rank; the global batch is ``batch_size x world size``."""

    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps in all")
    batch_size: int = Field(32, ge=1, description="per rank")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    ranges: Literal["frozen", "learned"] = Field(
        "learned", description="learned: LSQ-style learnable scale (and zero point when asymmetric) "
        "initialized from calibration (AIMET range learning; with calibration.method tf_enhanced that is "
        "its clamped initialization); frozen: calibrated ranges kept, weights trained through the STE")
    learn_zero_point: bool = Field(True, description="asymmetric quantizers also learn their zero point")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    clip_grad_norm: float | None = Field(None, gt=0)
    amp: Literal["auto", "off", "fp16", "bf16"] = Field(
        "auto", description="autocast: auto = bf16 on a GPU that supports it (else fp16 with a grad scaler), "
        "off on CPU")
    compile: bool = Field(
        False, description="torch.compile the training forward/backward (quantizers included): fake quantization "
        "is many small elementwise ops, which the compiler fuses; on a GPU the eager QAT step is bound by their "
        "launches (docs/benchmarks.md). Costs a compilation at the start (tens of seconds to minutes)")
    bn: Literal["fold", "freeze", "train"] = Field(
        "fold", description="fold: BatchNorm folded into the conv before calibration (placement.fold_bn) so "
        "training sees the deployed graph; freeze: unfolded BN with running statistics frozen from "
        "bn_freeze_step on; train: BN statistics keep updating")
    bn_freeze_step: int = Field(0, ge=0, description="bn: freeze - optimizer steps before the statistics freeze")
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints (and each epoch end)")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1, description="steps between validation runs (also at each epoch end)")
    eval_limit: int | None = Field(None, ge=1, description="periodic validation on a stratified sample of N images")
    num_workers: int = Field(2, ge=0, description="DataLoader workers per rank")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "QATConfig":
        if _stored(info):
            return self
        if self.bn != "freeze" and self.bn_freeze_step:
            raise ValueError("bn_freeze_step is for bn: freeze only")
        if self.distill.kind == "none" and self.distill.teacher is not None:
            raise ValueError("distill.teacher is set but distill.kind is none")
        if self.distill.kind == "none" and self.distill.alpha != DistillConfig.model_fields["alpha"].default:
            raise ValueError("distill.alpha is set but distill.kind is none (the loss is cross-entropy alone)")
        if self.ranges == "frozen" and self.optimizer.range_lr is not None:
            raise ValueError("optimizer.range_lr is set but ranges: frozen learns no ranges")
        if self.ranges == "frozen" and self.learn_zero_point != type(self).model_fields["learn_zero_point"].default:
            raise ValueError("learn_zero_point is set but ranges: frozen learns no ranges")
        if self.distill.kind != "none" and self.distill.alpha == 0:
            raise ValueError(f"distill.alpha: 0 gives distillation ({self.distill.kind}) no weight: the teacher "
                             "would run for nothing; use distill.kind: none")
        if self.distill.kind != "none" and self.distill.alpha == 1 and self.label_smoothing:
            raise ValueError(f"label_smoothing is set but distill.alpha: 1 leaves no label term in the loss "
                             f"({self.distill.kind} alone)")
        if self.augment.kind == "none":
            bad = sorted(k for k, f in AugmentConfig.model_fields.items()
                         if k != "kind" and getattr(self.augment, k) != f.default)
            if bad:
                raise ValueError(f"augment.{', augment.'.join(bad)}: set but augment.kind is none (the eval "
                                 f"transform, no augmentation)")
        if self.schedule.min_lr > self.optimizer.lr:
            raise ValueError(f"schedule.min_lr {self.schedule.min_lr:g} is above optimizer.lr "
                             f"{self.optimizer.lr:g}: the decay would raise the learning rate")
        return self


def recipe_name_problem(name: str, stored: bool = False) -> str | None:
    """Why ``name`` cannot name a recipe (the message), or None. ``stored``: a checkpoint's recipe,
    written before the folder rules existed (only 'fp32' is refused there)."""
    if name == "fp32":
        return "name: 'fp32' is reserved for the FP32 reference in reports; choose another name"
    if not stored and not _RECIPE_NAME.match(name):
        # it becomes the folder <out>/<name>/: '../x' or '.' would write into another run's folder
        return (f"name {name!r}: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit (it "
                "names the output folder <out>/<name>/)")
    if not stored and name.lower() in RUN_FILES:
        # <out>/<name>/ would take the place of a file the run writes beside it, after all the work
        return f"name {name!r}: a run writes <out>/{name} itself (its reports, plots, checkpoints); choose another name"
    return None


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
    qat: QATConfig | None = Field(None, description="quantization-aware training after calibration (quantcore qat)")
    reconstruction: ReconstructionConfig | None = Field(
        None, description="AdaRound/BRECQ weight rounding learned right after calibration (quantcore.recon)")

    @model_validator(mode="after")
    def _version(self, info: ValidationInfo) -> "Recipe":
        if self.version > RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is newer than this quantcore ({RECIPE_VERSION})")
        problem = recipe_name_problem(self.name, stored=_stored(info))
        if problem:
            raise ValueError(problem)
        qa = self.quant.activations
        if qa.per_channel or qa.axis is not None:  # first: the calibrator's own per-channel rule would mislead
            raise ValueError("quant.activations: per_channel/axis is for weights only (an activation's axis 0 "
                             "is the batch); remove it")
        for section, spec in (("quant.weights", self.weight_spec), ("quant.activations", self.activation_spec)):
            try:
                spec()
            except ValidationError as err:  # the combined spec is wrong: name the section, not QuantSpec
                msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
                if section == "quant.weights" and not self.quant.weights.calibrator:
                    section += f" with calibration.weights_method {self.calibration.weights_method!r}"
                raise ValueError(f"{section}: {msgs}") from None
        for section, patch, spec in (("quant.weights", self.quant.weights, self.weight_spec()),
                                     ("quant.activations", self.quant.activations, self.activation_spec())):
            if patch.percentile is not None and not spec.is_float and spec.calibrator != "percentile" \
                    and not _stored(info):
                raise ValueError(f"{section}.percentile: its calibrator is {spec.calibrator!r} (calibration."
                                 f"{'weights_method' if section == 'quant.weights' else 'method'}); percentile "
                                 f"applies to calibrator percentile only")
        if self.activation_spec().axis is not None:
            raise ValueError("quant.activations: per_channel/axis is for weights only (an activation's axis 0 "
                             "is the batch); remove it")
        if self.qat is not None and self.qat.bn == "fold" and not self.placement.fold_bn:
            raise ValueError("qat.bn: fold needs placement.fold_bn: true (or set qat.bn: freeze/train)")
        return self

    @model_validator(mode="after")
    def _calibration_applies(self, info: ValidationInfo) -> "Recipe":
        """``calibration`` fields written in the recipe that no quantizer can read are refused, not
        dropped: in a recipe file whatever their value (``method: percentile`` beside
        ``quant.activations.calibrator: max`` too, though percentile is the default), in any other dict
        when they differ from the default (``Recipe.model_validate(r.model_dump())`` round-trips). A
        recipe file whose ``calibration`` spells out every field is a dump (older quantcore versions
        wrote the inert defaults too) and is read as a dict.
        :func:`~quantcore.recipe.dump_recipe` leaves such fields out, so a dump (``show-recipe``,
        ``search_recipe.yaml``) loads again as a file."""
        if _stored(info):
            return self
        c, defaults = self.calibration, CalibrationConfig()
        # a recipe file: every field written counts, whatever its value; any other dict (a model_dump
        # handed between processes spells out every default) is compared with the defaults
        written = bool(info is not None and info.context and info.context.get("written"))
        if written and _looks_dumped(self):
            # every field spelled out: a dump (show-recipe, search_recipe.yaml) of an older quantcore,
            # which wrote the inert defaults too; its values are compared with the defaults, as a dict's
            written = False
        given = c.model_fields_set if written else {f for f in type(c).model_fields
                                                    if getattr(c, f) != getattr(defaults, f)}
        for field, why in self.inert_calibration_fields().items():
            if field in given:
                raise ValueError(why)
        return self

    def inert_calibration_fields(self) -> dict[str, str]:
        """``calibration`` fields that act on nothing in this recipe -> why (the overrides' calibrators
        count as readers, so a field some quantizer uses is never listed)."""
        c = self.calibration
        qa, qw = self.quant.activations, self.quant.weights
        over = [o.spec.calibrator for o in self.overrides if o.spec is not None and o.spec.calibrator]
        out: dict[str, str] = {}
        for field, patch, section in (("method", qa, "quant.activations"), ("weights_method", qw, "quant.weights")):
            if patch.calibrator and patch.calibrator != getattr(c, field):
                out[field] = (f"calibration.{field}: {getattr(c, field)!r} and {section}.calibrator: "
                              f"{patch.calibrator!r} contradict each other ({section}.calibrator wins, so "
                              f"calibration.{field} would act on nothing); give one")
        # a section whose format is a float cast (fp16, bf16, fp8) has no range, so no calibrator reads for
        # it; unless an override turns some of its quantizers into an integer grid (they keep its calibrator)
        from .quantizer_kinds import quantizer_kind

        to_grid = any(o.spec is not None and o.spec.format is not None and not quantizer_kind(o.spec.format).is_float
                      for o in self.overrides)
        sections = {"quant.activations": (qa, c.method, "method"),
                    "quant.weights": (qw, c.weights_method, "weights_method")}
        own = {}  # section -> (its calibrator, its own percentile), for the sections that calibrate
        for section, (patch, method, field) in sections.items():
            fmt = patch.format or "int"
            if quantizer_kind(fmt).is_float and not to_grid:
                out.setdefault(field, f"calibration.{field}: {method!r} cannot act: {section} is format {fmt!r}, a "
                                      f"float cast with no range to calibrate; remove it")
            else:
                own[section] = (patch.calibrator or method, patch.percentile)
        readers = {cal for cal, _ in own.values()} | set(over)
        # calibration.percentile is read by a section whose calibrator is percentile and which sets no
        # percentile of its own (weights too: Recipe.weight_spec), and by overrides to percentile
        replaced = [f"{k}.percentile" for k, (cal, pct) in own.items() if cal == "percentile" and pct is not None]
        read = any(cal == "percentile" and pct is None for cal, pct in own.values()) or "percentile" in over
        if not read:
            why = (f"{' and '.join(replaced)} {'replaces' if len(replaced) == 1 else 'replace'} it" if replaced
                   else f"no quantizer uses calibrator percentile (calibrators: {', '.join(sorted(readers)) or 'none'})")
            out["percentile"] = f"calibration.percentile: {c.percentile} cannot act: {why}; remove it"
        from .calib.registry import calibrator

        if not any(calibrator(r).statistics == "histogram" for r in readers):
            out["bins"] = (f"calibration.bins: {c.bins} cannot act: no quantizer uses a histogram calibrator "
                           f"(calibrators: {', '.join(sorted(readers)) or 'none'}); remove it")
        if c.images_per_class and c.num_batches is not None:  # num_batches: null says "not this way"
            out["num_batches"] = (f"calibration.images_per_class: {c.images_per_class} and num_batches: "
                                  f"{c.num_batches} both choose the calibration images (images_per_class wins); "
                                  "give one")
        return out

    def weight_spec(self) -> QuantSpec:
        # validated with the patch only: per_channel: false makes a per-tensor calibrator valid
        base = {**QuantSpec(axis=0).model_dump(), "calibrator": self.calibration.weights_method,
                "percentile": self.calibration.percentile}
        return self.quant.weights.apply(base)

    def activation_spec(self) -> QuantSpec:
        base = QuantSpec(calibrator=self.calibration.method, percentile=self.calibration.percentile,
                         symmetric=True)
        return self.quant.activations.apply(base)
