"""Calibration with its state sharded by torch FSDP, for models whose calibration does not fit
one device: ``torchrun --nproc-per-node N -m dam_mergekit.cli calibrate RECIPE``.

A calibration holds the base, every expert and, for element masks, ``1 + n`` logit tensors with
two Adam moments each: for ``n`` experts about ``4n + 4`` copies of the model. Here each merged
tensor's state (base, stacked experts, M1 and M2 logits) is one module sharded by FSDP2
(``torch.distributed.fsdp.fully_shard``): a process keeps ``1/N`` of it, FSDP gathers a tensor
while it is merged and again to differentiate the merge (which is recomputed rather than stored),
reduce-scatters the mask gradients, and Adam steps each shard in place.

Every process runs the same calibration batches (sharded state, replicated data), so the result
is the one-process result (tested on a CPU process group of 2): memory per process falls with N,
time does not. Coefficients and perturbations are small and replicated. Mask samples are drawn
from the same noise stream, in the same order, as the one-process trainer: what is recorded per
tensor is the generator's state before its draw, not the draw, so no step holds all masks at once.
Process 0 writes the mask file; each process checkpoints its own shards.

:class:`ShardedState` is the one-process state (:class:`dam_mergekit.calibrate.state.LocalState`,
built of the same per-tensor :class:`~dam_mergekit.calibrate.state.TensorState` modules) with each
module sharded as it is built: the loop and the objectives are the one-process ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.calibrate.state import LocalState, StateInputs, TensorState
from dam_mergekit.errors import DamError


def check_shardable(config: CalibrationConfig) -> None:
    """Refuse, before anything is loaded, what the sharded state cannot run."""
    if config.memory != "whole":
        raise DamError(
            f"memory: {config.memory} forms merged weights inside the forward, which the sharded "
            "state does not; use it in one process or with DAM_CALIBRATION_PARALLEL=data"
        )
    if config.train == "m2":
        raise DamError(
            "train: m2 (the bench's awm row) cannot shard its state; run it in one process or "
            "with DAM_CALIBRATION_PARALLEL=data"
        )


class ShardedState(LocalState):
    """The per-tensor state with every :class:`TensorState` sharded by FSDP2 as it is built."""

    shards_state, splits_data = True, False

    def __init__(self, inputs: StateInputs, adapter, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mesh = init_device_mesh(device.type, (self.world,))
        super().__init__(inputs, adapter, device)

    def place(self, state: TensorState) -> TensorState:
        """Shard the state's tensors over the processes (FSDP shards dim 0; scalars stay)."""
        from torch.distributed.fsdp import fully_shard

        scalars = {p for p in state.parameters() if p.dim() == 0}
        fully_shard(state, mesh=self.mesh, ignored_params=scalars or None)
        return state

    def all_sum(self, tensors: list[torch.Tensor]) -> None:
        """FSDP reduces the mask gradients itself; coefficients and perturbations are replicated
        and see the same batches in every process."""

    def finish(self) -> None:
        dist.barrier()  # the mask file exists before any process goes on
