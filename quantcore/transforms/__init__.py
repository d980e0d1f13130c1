"""Model transforms that keep the float function and make a model easier to quantize.

:mod:`.reparam`: RepQ-ViT's post-LayerNorm scale reparameterization (``placement.reparam_layernorm``).
"""
from .reparam import (LAYOUTS, LayerNormLayout, LayerNormPair, ReparamResult, apply_layernorm_reparam,
                      collect_channel_ranges, find_layernorm_pairs, register_layernorm_layout, reparam_layernorm)

__all__ = ["LAYOUTS", "LayerNormLayout", "LayerNormPair", "ReparamResult", "apply_layernorm_reparam",
           "collect_channel_ranges", "find_layernorm_pairs", "register_layernorm_layout", "reparam_layernorm"]
