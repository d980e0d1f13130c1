"""Quantized modules (only where an op cannot be intercepted: timm residual adds)."""
from .residual import RESIDUAL_QUANTIZERS, QuantResidualBlock, is_timm_block

__all__ = ["QuantResidualBlock", "RESIDUAL_QUANTIZERS", "is_timm_block"]
