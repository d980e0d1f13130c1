"""Calibrators and their registry (``QuantSpec.calibrator`` / ``calibration.method`` name one).

A calibrator is three things: the mergeable statistics it collects (:class:`HistogramState`, whose
fixed power-of-two binning merges exactly across workers, or :class:`MaxState`), and how a range is
computed from them. Collect = ``state.update(x)``; merge = ``state.merge(other)`` (both on the state
classes, shared by every calibrator of a kind); compute = :meth:`Calibrator.compute_range`. Adding a
calibrator is one module with a subclass plus one :func:`register_calibrator` call.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ..registry import Registry
from .histogram import DEFAULT_BINS, HistogramState
from .maxcal import MaxState

if TYPE_CHECKING:  # pragma: no cover
    from ..formats import QuantSpec

Range = tuple[float, float]


class Calibrator:
    """Base class. ``statistics``: which state it reads; ``per_channel``: whether it can give
    per-channel ranges (weights; activations are per tensor apart from ``max``)."""

    name: str = ""
    statistics: Literal["histogram", "max"] = "histogram"
    per_channel: bool = False

    def new_state(self, spec: "QuantSpec", bins: int = DEFAULT_BINS) -> HistogramState | MaxState:
        """A fresh, empty collector for ``spec`` (``bins``: histogram resolution)."""
        if self.statistics == "histogram" and spec.axis is None:
            return HistogramState(bins)
        return MaxState(spec.axis)

    def compute_range(self, state: HistogramState, spec: "QuantSpec") -> Range:
        """``(lo, hi)`` for ``spec`` from a non-empty histogram (symmetric specs: ``(-a, a)``)."""
        raise NotImplementedError


_CALIBRATORS: Registry[Calibrator] = Registry("calibrator", base=Calibrator)


def register_calibrator(cal: Calibrator) -> Calibrator:
    """Register ``cal`` under ``cal.name``; ``ValueError`` if another class holds that name."""
    return _CALIBRATORS.register(cal)


def calibrator(name: str) -> Calibrator:
    """The calibrator registered as ``name``; ``ValueError`` listing the registered ones otherwise."""
    return _CALIBRATORS.get(name)


def calibrator_names() -> list[str]:
    return _CALIBRATORS.names()


# -- built-ins (the searches live in .search; imported lazily: search imports formats) -------------
class MaxCalibrator(Calibrator):
    """Observed min/max (per tensor or per channel)."""

    name = "max"
    statistics = "max"
    per_channel = True

    def compute_range(self, state, spec):
        from .search import _max_range

        return _max_range(state, spec)


class PercentileCalibrator(Calibrator):
    """The ``spec.percentile`` percentile of |x| (symmetric) or of each tail (asymmetric)."""

    name = "percentile"

    def compute_range(self, state, spec):
        from .search import _percentile_range

        return _percentile_range(state, spec)


class MSECalibrator(Calibrator):
    """Range minimizing the expected squared quantization error (rounding + clipping) on the
    histogram; weights: the same on the tensor itself (:func:`.search.tensor_mse_range`)."""

    name = "mse"
    per_channel = True
    gamma = 1.0

    def compute_range(self, state, spec):
        from .search import _mse_range

        return _mse_range(state, spec, gamma=self.gamma)


class TFEnhancedCalibrator(MSECalibrator):
    """AIMET's tf_enhanced (SQNR) search: clipping noise weighted by ``TF_ENHANCED_GAMMA``."""

    name = "tf_enhanced"
    per_channel = False

    @property
    def gamma(self) -> float:  # type: ignore[override]
        from .search import TF_ENHANCED_GAMMA

        return TF_ENHANCED_GAMMA


#: The entropy calibrator collects its histogram this many times finer than the reference grid it
#: searches (``calibration.bins``, ModelOpt's ``num_bins``), within ``_MAX_COLLECT_BINS``: re-binned
#: onto that grid, each of our bins then lands whole in one reference bin, as the value it counts did
#: in the reference's own histogram. At the same resolution, a point mass (integer or grid-valued data:
#: image pixels, an upstream quantizer's output) was spread over two reference bins, which made the
#: full range look lossy: ranges were cut to a third (``randint(-3, 4)``: 1.0 for 3.0).
ENTROPY_OVERSAMPLE = 8
_MAX_COLLECT_BINS = 1 << 17  # 2 MiB of int64 counts; 4x finer still at calibration.bins 32768


class EntropyCalibrator(Calibrator):
    """TensorRT's / ModelOpt's KL-divergence threshold search."""

    name = "entropy"

    def new_state(self, spec: "QuantSpec", bins: int = DEFAULT_BINS) -> HistogramState | MaxState:
        state = super().new_state(spec, bins)
        fine = max(1, min(ENTROPY_OVERSAMPLE, _MAX_COLLECT_BINS // bins))
        if isinstance(state, HistogramState) and fine > 1:
            return HistogramState(bins * fine, reference_bins=bins)
        return state

    def compute_range(self, state, spec):
        from .search import _entropy_range

        return _entropy_range(state, spec)


for _c in (MaxCalibrator, PercentileCalibrator, MSECalibrator, EntropyCalibrator, TFEnhancedCalibrator):
    register_calibrator(_c())
