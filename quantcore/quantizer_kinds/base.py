"""Quantizer kinds: what a :class:`~quantcore.quantizer.TensorQuantizer` does with a calibrated range.

A kind is registered under one or more ``QuantSpec.format`` names. The TensorQuantizer module keeps
what every kind shares (the range buffers, the mergeable calibration collector, the calibrate /
quantize switches, state_dict handling); the kind supplies the grid: how the range is searched, how a
tensor is fake-quantized, which spec fields apply, and what ``encodings.json`` records. Adding a kind
is one module with a subclass plus one :func:`register_quantizer_kind` call (see
``quantcore/quantizer_kinds/affine.py`` and ``floatcast.py`` for the built-ins).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover - typing only (formats imports this package)
    from ..calib.histogram import HistogramState
    from ..formats import QuantSpec
    from ..quantizer import TensorQuantizer

Range = tuple[float, float]


def contracted_dims(dims: "int | tuple[int, ...] | None", ndim: int) -> tuple[int, ...]:
    """The dimensions a product contracts in a tensor of ``ndim`` dimensions, as sorted non-negative
    indices without repeats; ``None``: the last one. Raises ``ValueError`` for an index outside the
    tensor (a call site's mistake, never wrapped around to another dimension)."""
    given = (dims,) if isinstance(dims, int) else tuple(dims) if dims else (-1,)
    if ndim == 0:
        return ()
    bad = [d for d in given if not -ndim <= d < ndim]
    if bad:
        raise ValueError(f"contracted dimension(s) {bad} outside a {ndim}-D tensor")
    return tuple(sorted({d % ndim for d in given}))


def contracted_size(dims: "int | tuple[int, ...] | None", shape: "tuple[int, ...] | torch.Size") -> int:
    """How many values one slice along the contracted ``dims`` of a tensor of ``shape`` holds (the K one
    run-time scale covers without blocks); 1 for a 0-d tensor."""
    k = 1
    for d in contracted_dims(dims, len(shape)):
        k *= int(shape[d])
    return k


class QuantizerKind:
    """Base of every quantizer kind. Subclasses override what differs from a uniform integer grid.

    Class attributes:
        is_float: a cast round-trip (FP16/BF16/FP8): no range, never calibrated.
        supports_learnable: QAT may learn this kind's range (LSQ-style scale/zero point).
        supports_per_channel: per-channel (``axis``) ranges are meaningful.
        supports_asymmetric: ``symmetric: false`` is meaningful.
        supports_blocks: ``block_size`` and ``scale_format`` are meaningful (run-time scales per block of
            the dimension a product contracts); such a kind's ``fake_quant`` also takes ``dims`` (see
            :meth:`~quantcore.quantizer.TensorQuantizer.forward`).
        calibrators: the calibrator names this kind accepts (``None``: every registered one).
    """

    name: str = ""
    is_float: bool = False
    supports_learnable: bool = False
    supports_per_channel: bool = True
    supports_asymmetric: bool = True
    supports_blocks: bool = False
    calibrators: tuple[str, ...] | None = None

    def validate(self, spec: "QuantSpec") -> None:
        """Raise ``ValueError`` (naming the spec field) for a combination this kind cannot do."""
        if self.is_float:  # a cast reads no grid field (a recipe that sets one for it is refused there)
            return
        for field, lacks in (("block_size", "no run-time block scales"),
                             ("scale_format", "no run-time scales to store")):
            if getattr(spec, field) is not None and not self.supports_blocks:
                blocks = [n for n in quantizer_kind_names() if quantizer_kind(n).supports_blocks]
                raise ValueError(f"{field}: format {spec.format!r} has {lacks} (formats that take {field}: {blocks})")
        if spec.axis is not None and not self.supports_per_channel:
            raise ValueError(f"format {spec.format!r} has per-tensor ranges only (remove axis/per_channel)")
        if not spec.symmetric and not self.supports_asymmetric:
            raise ValueError(f"format {spec.format!r} does not take symmetric: false")
        if spec.learnable and not self.supports_learnable:
            raise ValueError(f"format {spec.format!r} has no learnable (QAT) range")
        if self.calibrators is not None and spec.calibrator not in self.calibrators:
            raise ValueError(f"format {spec.format!r} takes calibrator one of {list(self.calibrators)}, "
                             f"not {spec.calibrator!r}")

    def qrange(self, spec: "QuantSpec") -> tuple[int, int]:
        """Integer code range ``(quant_min, quant_max)`` of the grid."""
        if spec.symmetric:
            top = 2 ** (spec.bits - 1) - 1
            return (-top if spec.narrow_range else -top - 1), top
        return 0, 2**spec.bits - 1

    def compute_range(self, state: "HistogramState", spec: "QuantSpec") -> Range:
        """Range ``(lo, hi)`` from a histogram, by the spec's calibrator. Kinds whose grid is not
        uniform override this to search for their own grid's error (the calibrators' searches model a
        uniform grid)."""
        from ..calib import calibrator

        return calibrator(spec.calibrator).compute_range(state, spec)

    def extremes_range(self, lo, hi, spec: "QuantSpec"):
        """Range from the extremes a ``max`` statistics state saw (floats, or ``(C,)`` tensors per
        channel). Default: ``(lo, hi)``; a kind whose grid only takes some inputs raises ValueError
        here, as its :meth:`compute_range` does for a histogram, so calibration refuses what the grid
        cannot carry instead of the first forward after it."""
        return lo, hi

    def grid_range(self, lo: "torch.Tensor", hi: "torch.Tensor", spec: "QuantSpec"):
        """``(lo, hi, at_floor)``: the range ``(lo, hi)`` (shape ``()`` or ``(C,)``, zero inside) as
        this kind's grid represents it, and per element whether the grid is at its floor. A kind whose
        parameters have a floor widens a range below it here, so ``min``/``max`` in ``encodings.json``
        describe the grid actually applied. Default: unchanged, no floor."""
        return lo, hi, torch.zeros_like(lo, dtype=torch.bool)

    def represented_range(self, quantizer: "TensorQuantizer"):
        """``(lo, hi)`` float32 tensors (shape of the range buffers): the interval the grid covers,
        outside of which values are clipped (what clipping and grid-use statistics compare against).
        Default: the stored range."""
        return quantizer.amin.float(), quantizer.amax.float()

    def tensor_range(self, x: "torch.Tensor", spec: "QuantSpec"):
        """One-shot range of a tensor the quantizer sees whole (weights): ``(lo, hi)`` tensors of shape
        ``()`` or ``(C,)``, or ``None`` to use the calibrator's statistics of ``x``. Default: the MSE
        search on the tensor itself for calibrator ``mse`` (uniform grid)."""
        if spec.calibrator == "mse":
            from ..calib.search import tensor_mse_range

            return tensor_mse_range(x, spec)
        return None

    def fake_quant(self, quantizer: "TensorQuantizer", x: "torch.Tensor") -> "torch.Tensor":
        """Quantize-dequantize ``x`` (float32, any shape) with ``quantizer``'s range; differentiable
        (straight-through) where QAT needs it. Returns a float32 tensor shaped like ``x``."""
        raise NotImplementedError

    def encoding(self, quantizer: "TensorQuantizer") -> dict[str, Any]:
        """Kind-specific fields of this quantizer's ``encodings.json`` row (a calibrated one)."""
        return {}


_KINDS: Registry[QuantizerKind] = Registry("quantizer format", base=QuantizerKind)


def register_quantizer_kind(kind: QuantizerKind, *names: str) -> QuantizerKind:
    """Register ``kind`` under ``names`` (default: ``kind.name``), the ``QuantSpec.format`` values
    that select it. Raises ``ValueError`` if a name is taken by another kind."""
    return _KINDS.register(kind, *names)


def quantizer_kind(name: str) -> QuantizerKind:
    """The kind registered for format ``name``; ``ValueError`` listing the registered ones otherwise."""
    return _KINDS.get(name)


def quantizer_kind_names() -> list[str]:
    return _KINDS.names()
