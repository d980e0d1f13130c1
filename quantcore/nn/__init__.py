"""Quantized modules."""
from .layers import QUANT_LAYERS, QuantConv1d, QuantConv2d, QuantLinear, quant_class_for

__all__ = ["QUANT_LAYERS", "QuantConv1d", "QuantConv2d", "QuantLinear", "quant_class_for"]
