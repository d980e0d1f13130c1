"""quantcore: post-training quantization of vision models (INT8/INT4/FP16/FP8 fake quantization).

Public API (see README): ``load_recipe``, ``build_model``, ``prepare``, ``calibrate``, ``collect``,
``finalize``, ``convert``, ``calibration_state``, ``merge_calibration_states``, ``load_calibration_state``,
``set_quantization``, ``quantization_disabled``, ``quantizers``, ``encodings``, ``save``, ``load``.
Names resolve lazily so ``import quantcore.io`` does not pay for torch/timm.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CalibrationResult": "api", "build_model": "api", "calibrate": "api", "calibration_state": "api",
    "collect": "api", "convert": "api", "encodings": "api", "finalize": "api", "load": "api", "load_calibration_state": "api",
    "merge_calibration_states": "api", "prepare": "api", "quantization_disabled": "api", "save": "api",
    "set_quantization": "api", "CheckpointError": "checkpoint", "Recipe": "config", "QuantSpec": "formats",
    "quantizers": "placement", "TensorQuantizer": "quantizer", "RecipeError": "recipe",
    "builtin_recipes": "recipe", "load_recipe": "recipe", "CalibrationError": "errors", "UserError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'quantcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
