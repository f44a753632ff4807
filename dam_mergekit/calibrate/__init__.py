"""DAM calibration: learn M1, M2 and the coefficients of a dam recipe from unlabeled data.

Light on import: the trainer (torch, transformers) loads only when used.
"""

from __future__ import annotations

__all__ = ["CalibrationConfig", "calibrate", "ensure_masks"]


def __getattr__(name: str):
    if name == "CalibrationConfig":
        from dam_mergekit.calibrate.config import CalibrationConfig

        return CalibrationConfig
    if name == "calibrate":
        from dam_mergekit.calibrate.run import calibrate

        return calibrate
    if name == "ensure_masks":
        from dam_mergekit.calibrate.hook import ensure_masks

        return ensure_masks
    raise AttributeError(name)
