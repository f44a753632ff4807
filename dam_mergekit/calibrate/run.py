"""One calibration run: the single-process trainer, or the sharded one under ``torchrun``.

The choice lives here, above both trainers, so that neither imports the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dam_mergekit.calibrate.launch import launched_world_size

if TYPE_CHECKING:
    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.calibrate.trainer import CalibrationResult


def calibrate(
    plan,
    config: CalibrationConfig,
    mask_path=None,
    *,
    allow_pickle: bool = False,
    progress: bool = True,
    write: bool = True,
) -> CalibrationResult:
    """Run one calibration (all checks before training) and write the mask file.

    Under ``torchrun`` with more than one process the state is sharded by FSDP
    (:mod:`dam_mergekit.calibrate.sharded`); the masks are the same.
    """
    from dam_mergekit.calibrate.trainer import Calibrator

    cls = Calibrator
    if launched_world_size() > 1:
        from dam_mergekit.calibrate.sharded import ShardedCalibrator

        cls = ShardedCalibrator
    return cls(plan, config, mask_path=mask_path, allow_pickle=allow_pickle, progress=progress).run(
        write=write
    )
