"""Calibration data: a ``--calib`` spec turned into token sequences."""

from moemerge.calibration.data import (
    CalibrationSet,
    check_calibration_size,
    check_spec,
    load_calibration,
    load_tokens,
)

__all__ = ["CalibrationSet", "check_calibration_size", "check_spec", "load_calibration", "load_tokens"]
