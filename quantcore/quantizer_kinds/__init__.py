"""Quantizer kinds and their registry (``QuantSpec.format`` names a registered kind).

Built-in: ``int`` (uniform affine, :mod:`.affine`), ``fp16``/``bf16``/``fp8_e4m3``/``fp8_e5m2``
(cast round-trips, :mod:`.floatcast`). A new kind is one module that subclasses
:class:`QuantizerKind` and calls :func:`register_quantizer_kind`, imported here.
"""
from .base import QuantizerKind, Range, quantizer_kind, quantizer_kind_names, register_quantizer_kind
from . import affine, floatcast  # noqa: F401,E402 - registers the built-in kinds
from . import log2  # noqa: F401,E402 - log2 / log_sqrt2 (FQ-ViT, RepQ-ViT)
from . import twin  # noqa: F401,E402 - twin_int (PTQ4ViT)
from . import dynamic  # noqa: F401,E402 - int_dynamic (run-time scales per token / block)
from .floatcast import FLOAT_DTYPES  # noqa: E402

__all__ = ["FLOAT_DTYPES", "QuantizerKind", "Range", "quantizer_kind", "quantizer_kind_names",
           "register_quantizer_kind"]
