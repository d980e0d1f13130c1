"""Calibration statistics (histogram / max), the calibrator registry and range searches."""
from .histogram import DEFAULT_BINS, HistogramState
from .maxcal import MaxState
from .registry import Calibrator, calibrator, calibrator_names, register_calibrator

__all__ = ["DEFAULT_BINS", "Calibrator", "HistogramState", "MaxState", "calibrator", "calibrator_names",
           "register_calibrator"]
