"""One calibration run: on one device, or under ``torchrun`` data-parallel or FSDP-sharded.

The choice lives here, above the loop and both states, so that none of them imports another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dam_mergekit.calibrate.launch import join_process_group, launched_world_size, parallel_mode

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

    Under ``torchrun`` with more than one process each process runs its share of every batch
    (:mod:`dam_mergekit.calibrate.data_parallel`), or with ``DAM_CALIBRATION_PARALLEL=state``
    keeps its shard of the state (:mod:`dam_mergekit.calibrate.sharded`); the masks are the
    same (up to floating-point summation order).
    """
    from dam_mergekit.calibrate.trainer import ONE_PROCESS, Calibrator

    layout, log = ONE_PROCESS, None
    if launched_world_size() > 1:
        layout = _process_layout(config)
        if layout.rank != 0:  # one process speaks for all
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


def _process_layout(config: CalibrationConfig):
    """Under torchrun: split every batch (``data``) or shard the state (``state``)."""
    from dam_mergekit.calibrate.trainer import StateLayout

    if parallel_mode() == "state":
        from dam_mergekit.calibrate.sharded import ShardedState, check_shardable

        check_shardable(config)
        state = ShardedState
    else:
        from dam_mergekit.calibrate.data_parallel import DataParallelState

        state = DataParallelState
    rank, world = join_process_group(config)
    return StateLayout(state, rank, world)
