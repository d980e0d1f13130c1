"""Reconstruction-based PTQ: AdaRound weight rounding per layer or per block (BRECQ), QDrop optional.

    quantcore.calibrate(model, batches)
    quantcore.recon.reconstruct(model, batches, ReconstructionConfig(mode="block"))

A recipe's ``reconstruction:`` section makes the pipeline (``quantcore ptq``, ``quantcore qat``) run it
right after calibration. Only :mod:`.config` is imported eagerly: :mod:`quantcore.config` needs it,
and :mod:`.adaround` needs the rest of quantcore.
"""
from __future__ import annotations

from typing import Any

from .config import RECON_MODES, ReconstructionConfig

__all__ = ["RECON_MODES", "ReconstructionConfig", "ReconstructionResult", "reconstruct"]


def __getattr__(name: str) -> Any:  # PEP 562: the torch side on first use
    if name in ("reconstruct", "ReconstructionResult"):
        from . import adaround

        return getattr(adaround, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
