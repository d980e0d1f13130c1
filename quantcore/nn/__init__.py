"""Quantized modules."""
from .attention import ATTENTION_QUANTIZERS, QuantAttention, is_timm_attention
from .layers import QUANT_LAYERS, QuantConv1d, QuantConv2d, QuantLinear, quant_class_for
from .residual import RESIDUAL_QUANTIZERS, QuantResidualBlock, is_timm_block

__all__ = [
    "ATTENTION_QUANTIZERS",
    "QUANT_LAYERS",
    "QuantAttention",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantResidualBlock",
    "RESIDUAL_QUANTIZERS",
    "is_timm_attention",
    "is_timm_block",
    "quant_class_for",
]
