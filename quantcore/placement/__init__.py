"""Quantizer placement: which tensors of a model get a TensorQuantizer, per model family.

Entry points: :func:`place_quantizers` (in place; returns a :class:`PlacementResult`, also stored as
``model.quantcore_placement``), :func:`quantizers` (name -> TensorQuantizer) and
:func:`detect_family`.
"""
from .core import ROOT_INPUT_QUANTIZER, PlacementResult, place_quantizers, quantizers
from .families import DEFAULT_KEEP_FLOAT, FAMILIES, detect_family, transformer_scopes
from .vit import ModeSettings, mode_settings

__all__ = [
    "DEFAULT_KEEP_FLOAT",
    "FAMILIES",
    "ModeSettings",
    "PlacementResult",
    "ROOT_INPUT_QUANTIZER",
    "detect_family",
    "mode_settings",
    "place_quantizers",
    "quantizers",
    "transformer_scopes",
]
