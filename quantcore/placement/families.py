"""Model families and their defaults.

The family is detected from what the model computes (:func:`quantcore.placement.core.detect_family`),
not from its class: ``vit`` (attention, at most a patch-embedding convolution), ``cnn`` (convolutions
with BatchNorm; attention inside still quantized) and ``generic``.
"""
from __future__ import annotations

FAMILIES = ("vit", "cnn", "generic")

#: Module globs left float by default (``PlacementConfig.keep_float = None``). A glob also covers
#: the matched module's descendants. With the default, the vit family also leaves every convolution
#: float (the patch embedding); the cnn and generic families quantize every Linear/Conv. Names cover
#: timm (``patch_embed``, ``head``), torchvision (``conv_proj``, ``heads``) and Hugging Face
#: (``embeddings``, ``classifier``) ViTs. An explicit ``keep_float`` list replaces all of these.
DEFAULT_KEEP_FLOAT: dict[str, list[str]] = {
    "vit": ["patch_embed", "head", "head_dist", "attn_pool", "conv_proj", "heads", "*.embeddings",
            "classifier", "distillation_classifier", "cls_classifier"],
    "cnn": [],
    "generic": [],
}
