"""One calibration run: the state on one device, or sharded by FSDP under ``torchrun``.

The choice lives here, above the loop and both states, so that none of them imports another.
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
    from dam_mergekit.calibrate.trainer import ONE_PROCESS, Calibrator, StateLayout

    layout, log = ONE_PROCESS, None
    if launched_world_size() > 1:
        from dam_mergekit.calibrate.sharded import ShardedState, join_process_group

        rank, world = join_process_group(config)
        layout = StateLayout(ShardedState, rank, world)
        if rank != 0:  # one process speaks for all
            progress, log = False, (lambda msg: None)
    calibrator = Calibrator(
        plan,
        config,
        mask_path=mask_path,
        allow_pickle=allow_pickle,
        progress=progress,
        log=log,
        layout=layout,
    )
    return calibrator.run(write=write)
