"""Quantizer placement: which tensors of a model get a TensorQuantizer.

Entry points: :func:`place_quantizers` (in place; returns a :class:`PlacementResult`, also stored as
``model.quantcore_placement``), :func:`quantizers` (name -> TensorQuantizer), :func:`detect_family`
and :func:`default_example_input`. How ops are found and quantized: :mod:`.probe`, :mod:`.intercept`.
"""
from .core import (ROOT_INPUT_QUANTIZER, PlacementResult, default_example_input, detect_family,
                   place_quantizers, quantizers, unequal_shared_ranges, unify_shared_ranges, unwrap)
from .families import DEFAULT_KEEP_FLOAT, FAMILIES
from .intercept import ATTENTION_QUANTIZERS
from .vit import ModeSettings, mode_settings

__all__ = [
    "ATTENTION_QUANTIZERS",
    "DEFAULT_KEEP_FLOAT",
    "FAMILIES",
    "ModeSettings",
    "PlacementResult",
    "ROOT_INPUT_QUANTIZER",
    "default_example_input",
    "detect_family",
    "mode_settings",
    "place_quantizers",
    "quantizers",
    "unequal_shared_ranges",
    "unify_shared_ranges",
    "unwrap",
]
