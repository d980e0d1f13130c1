"""The ``reconstruction:`` section of a recipe: AdaRound weight rounding, layer by layer or per block.

Pure data (no torch import): :mod:`quantcore.config` imports it for ``Recipe.reconstruction``.
Defaults follow BRECQ / QDrop (Li et al. 2021, Wei et al. 2022): Adam at 1e-3 on the rounding
variables, regularizer weight 0.01, beta annealed 20 -> 2 after 20 % warm-up, batch 32.
"""
from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from .._model import Section

#: reconstruction units: one weighted layer at a time, or a whole block (BRECQ)
RECON_MODES = ("layer", "block")


class ReconstructionConfig(Section):
    """Reconstruction-based PTQ after calibration (``quantcore.recon.reconstruct``).

    Each unit (a layer, or a transformer/residual block in ``block`` mode) learns whether each weight
    rounds down or up (AdaRound, Nagel et al. 2020) so that its output on the calibration images,
    computed from the quantized-so-far model's inputs, matches the FP32 model's output. The chosen
    grid points are written into the weight parameters; ranges are not changed.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["adaround"] = "adaround"
    mode: Literal["layer", "block"] = Field(
        "block", description="layer: each weighted layer alone (AdaRound); block: all layers of a block "
        "(nearest item of a ModuleList/Sequential, e.g. a ViT Block) together against the block output (BRECQ); "
        "layers outside any block are done one by one")
    modules: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                               description="globs on the names of the modules whose weights are reconstructed")
    loss: Literal["mse", "fisher"] = Field(
        "mse", description="mse: squared error of the unit output; fisher: each output element weighted by the "
        "squared gradient of the FP32 model's cross-entropy to its own predicted class (diagonal Fisher, as "
        "BRECQ), so outputs the prediction does not depend on (a ViT's patch tokens after the last block) "
        "count for nothing")
    iterations: int = Field(1000, ge=1, description="optimizer steps per unit (layer or block)")
    batch_size: int = Field(32, ge=1, description="images per step (all ranks together)")
    num_images: int = Field(1024, ge=1, description="calibration images used at most (all ranks together)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the rounding variables")
    reg_weight: float = Field(0.01, ge=0, description="lambda of the rounding regularizer")
    beta_start: float = Field(20.0, gt=0, description="regularizer exponent at the end of warm-up")
    beta_end: float = Field(2.0, gt=0, description="regularizer exponent at the last step")
    warmup: float = Field(0.2, ge=0, lt=1, description="fraction of the steps without the regularizer")
    act_quant: bool = Field(True, description="activation quantizers on while reconstructing (inputs "
                            "from the quantized model and the unit's own activation quantizers)")
    act_ranges: Literal["fixed", "learned"] = Field(
        "fixed", description="learned: the step size of each integer activation quantizer inside the unit is "
        "learned with the rounding (LSQ, as BRECQ/QDrop do at W4A4) and written back into its range")
    act_lr: float = Field(1e-3, gt=0, description="Adam learning rate of learned activation step sizes, "
                          "relative to each one's calibrated step size (Adam steps ~lr whatever the gradient, "
                          "and step sizes differ by orders of magnitude between quantizers)")
    drop_prob: float = Field(0.0, ge=0, le=1, description="QDrop: probability that an activation quantizer "
                             "inside the unit passes an element through unquantized during optimization "
                             "(0.5 in Wei et al. 2022; 0 = off)")
    seed: int = Field(0, description="seed of the batch sampling (and QDrop masks)")

    @model_validator(mode="after")
    def _check(self) -> "ReconstructionConfig":
        if self.beta_end > self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must not exceed beta_start ({self.beta_start}): "
                             "beta anneals downwards")
        if self.act_ranges == "learned" and not self.act_quant:
            raise ValueError("act_ranges: learned ranges need act_quant: true")
        if self.drop_prob > 0 and not self.act_quant:
            raise ValueError("drop_prob: QDrop drops activation quantization, so it needs act_quant: true")
        if self.batch_size > self.num_images:
            raise ValueError(f"batch_size ({self.batch_size}) is larger than num_images ({self.num_images})")
        bad = [m for m in self.modules if not m.strip()]
        if bad:
            raise ValueError("modules: empty glob")
        return self
