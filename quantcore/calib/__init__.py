"""Calibration statistics (histogram / max) and range searches."""
from .histogram import DEFAULT_BINS, HistogramState
from .maxcal import MaxState

__all__ = ["DEFAULT_BINS", "HistogramState", "MaxState"]
