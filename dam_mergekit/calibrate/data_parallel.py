"""Data-parallel calibration: ``torchrun --nproc-per-node N -m dam_mergekit.cli calibrate RECIPE``.

Every process holds the whole state (as one process does) and samples the same batches from the
same seeded stream, then runs only its share of each batch (``adapter.share``). The logits of all
shares are gathered into the whole batch's logits, in which only this process's rows are
differentiable, and every loss is computed on the whole batch in every process, so losses with
batch statistics (``infomax``, the ``targeted`` trigger search) are the one-process ones. Summing
the gradients over processes then gives the whole batch's gradient, and each process takes the
same optimizer step: the result is the one-process result up to floating-point summation order,
and the forward and backward work per process falls with N.

Memory per process does not fall (that is what ``parallel: state``, FSDP sharding, is for).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dam_mergekit.calibrate.state import MaskDraw, Params, StateInputs
from dam_mergekit.calibrate.streamed import one_process_state


class DataParallelState:
    """The one-process state (whole or streamed) in every process, each computing its share of every batch."""

    shards_state, splits_data = False, True

    def __init__(self, inputs: StateInputs, adapter: Any, device: torch.device):
        self.whole = one_process_state(inputs.config)(inputs, adapter, device)
        self.adapter = adapter
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.model, self.pnames, self.noise = self.whole.model, self.whole.pnames, self.whole.noise
        self.m1_logits, self.m2_logits = self.whole.m1_logits, self.whole.m2_logits

    def draw(self, *, grad: bool) -> MaskDraw:
        return self.whole.draw(grad=grad)

    def binary(self) -> MaskDraw:
        return self.whole.binary()

    def merged_params(self, masks: MaskDraw, coef: torch.Tensor) -> Params:
        return self.whole.merged_params(masks, coef)

    def gradients(self, masks, coef, losses, *, alpha, m1_learns_safety):
        perf, safe = self.whole.gradients(
            masks, coef, losses, alpha=alpha, m1_learns_safety=m1_learns_safety
        )
        logits = [*self.m1_logits.values(), *self.m2_logits.values()]
        self.all_sum([p.grad for p in logits if p.grad is not None])
        return perf, safe

    def expert_params(self, index: int) -> Params:
        return self.whole.expert_params(index)

    def final_tensors(self, masks: MaskDraw):
        return self.whole.final_tensors(masks)

    def share(self, batch: Any) -> Any:
        return self.adapter.share(batch, self.rank, self.world)

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """The whole batch's logits: the other processes' shares (constants here) and this one's."""
        sizes = torch.tensor([logits.shape[0]], device=logits.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(self.world)]
        dist.all_gather(all_sizes, sizes)
        rows = [int(n) for n in torch.cat(all_sizes).tolist()]
        padded = logits.detach().new_zeros((max(rows), *logits.shape[1:]))  # gloo: equal sizes
        padded[: logits.shape[0]] = logits.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        parts = [part[:n] for part, n in zip(parts, rows, strict=True)]
        parts[self.rank] = logits
        return torch.cat(parts)

    def all_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum in place over processes: each process's gradient is that of its own share."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def finish(self) -> None:
        dist.barrier()  # the mask file exists before any process goes on
