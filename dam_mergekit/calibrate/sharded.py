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

:class:`ShardedState` is this layout's side of the state seam (:mod:`dam_mergekit.calibrate.state`):
the loop and the objectives are the one-process ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from dam_mergekit.calibrate import concrete
from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.calibrate.models import load_tensors
from dam_mergekit.calibrate.state import (
    FinalTensor,
    MaskDraw,
    Params,
    StateInputs,
    coefficient_row,
)
from dam_mergekit.errors import DamError
from dam_mergekit.merge import merge_tensor


class TensorState(nn.Module):
    """One merged tensor's calibration state; FSDP shards it, the forward merges it."""

    def __init__(self, base: torch.Tensor, experts: torch.Tensor, s1, s2):
        super().__init__()
        self.base = nn.Parameter(base, requires_grad=False)
        self.experts = nn.Parameter(experts, requires_grad=False)
        self.s1 = nn.Parameter(s1)
        self.s2 = nn.Parameter(s2) if s2 is not None else None

    def forward(self, what: str, masks=None, coef=None, spec: dict | None = None):
        """``merge``: the merged tensor (and, with ``spec["safe_copy"]``, one with M1 detached);
        ``expert``: a copy of expert ``spec["index"]``; ``final``: copies of everything the mask
        file and the final merge need."""
        if what == "expert":
            return self.experts[spec["index"]].detach().clone()
        if what == "final":
            a, b = self._masks(masks, spec)
            r = self._rescale(a, b, spec)
            experts = [e.detach().clone() for e in self.experts.unbind(0)]
            b = None if b is None else [x.detach().clone() for x in b]
            return a.detach().clone(), b, r.detach(), self.base.detach().clone(), experts
        if torch.is_grad_enabled():  # recompute the merge in backward instead of storing it
            return checkpoint(self._merge, masks, coef, spec, use_reentrant=False)
        return self._merge(masks, coef, spec)

    def _masks(self, masks: MaskDraw, spec) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        if masks.binary:
            a = concrete.binarize(self.s1).float()
            b = None if self.s2 is None else list(concrete.binarize(self.s2).float().unbind(0))
            return a, b
        gen, name, temperature = spec["generator"], spec["name"], spec["temperature"]
        gen.set_state(masks.m1[name])
        a = concrete.sample(self.s1, temperature, gen)
        b = None
        if self.s2 is not None:
            gen.set_state(masks.m2[name])
            b = list(concrete.sample(self.s2, temperature, gen).unbind(0))
        if not masks.grad:
            a = a.detach()
            b = None if b is None else [x.detach() for x in b]
        return a, b

    def _rescale(self, a, b, spec) -> torch.Tensor:
        n = self.experts.shape[0]
        return concrete.rescale_factors(
            a, b if b is not None else [None] * n, enabled=spec["rescale"]
        )

    def _merge(self, masks, coef, spec):
        a, b = self._masks(masks, spec)
        experts = list(self.experts.unbind(0))

        def merged(m1):
            c = coef * self._rescale(m1, b, spec)
            return merge_tensor(
                self.base, experts, spec["weights"], lam=spec["lam"], m1=m1, m2=b, coefficients=c
            )

        if spec.get("safe_copy"):
            return merged(a), merged(a.detach())
        return merged(a)


def check_shardable(config: CalibrationConfig) -> None:
    """Refuse, before anything is loaded, what the sharded state cannot run."""
    if config.train == "m2":
        raise DamError(
            "train: m2 (the bench's awm row) cannot shard its state; run it in one process or "
            "with DAM_CALIBRATION_PARALLEL=data"
        )


class ShardedState:
    """The per-tensor state in FSDP-sharded :class:`TensorState` s, one per planned tensor."""

    shards_state, splits_data = True, False

    def __init__(self, inputs: StateInputs, adapter, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.inputs, self.device = inputs, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.noise = torch.Generator(device=device).manual_seed(inputs.config.seed + 1)
        # replays recorded noise states; the noise stream itself only advances in draw(), so a
        # merge recomputed in backward cannot disturb it
        self.replay = torch.Generator(device=device)
        mesh = init_device_mesh(device.type, (self.world,))
        self.model = adapter.load_model(inputs.base_dir)
        self.model.requires_grad_(False)
        self.pnames = adapter.parameter_names(self.model, inputs.names)
        for name in inputs.names:  # every forward swaps in merged tensors: free the model's own
            param = self.model.get_parameter(self.pnames[name])
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.states: dict[str, TensorState] = {}
        self.m1_logits: dict[str, torch.Tensor] = {}
        self.m2_logits: dict[str, torch.Tensor] = {}
        n = len(inputs.expert_dirs)
        for name in inputs.names:  # one tensor at a time: no process ever holds the whole state
            base = self._load(inputs.base_dir, name)
            experts = torch.stack([self._load(d, name) for d in inputs.expert_dirs])
            m2 = inputs.initial_logits(name, device, n) if inputs.two_masks else None
            state = TensorState(base, experts, inputs.initial_logits(name, device), m2)
            scalars = {p for p in state.parameters() if p.dim() == 0}  # FSDP shards dim 0
            fully_shard(state, mesh=mesh, ignored_params=scalars or None)
            self.states[name] = state
            self.m1_logits[name] = state.s1
            if state.s2 is not None:
                self.m2_logits[name] = state.s2

    def _load(self, folder: str, name: str) -> torch.Tensor:
        return load_tensors(folder, [name], self.device, allow_pickle=self.inputs.allow_pickle)[
            name
        ]

    def _spec(self, name: str, **extra) -> dict:
        return {
            "name": name,
            "generator": self.replay,
            "temperature": self.inputs.config.temperature,
            "rescale": self.inputs.rescale_on,
            "weights": self.inputs.weights[name],
            "lam": self.inputs.lams[name],
            **extra,
        }

    def draw(self, *, grad: bool) -> MaskDraw:
        """Advance the noise stream exactly as the one-process sample would, noting each state."""
        gen, dev = self.noise, self.device
        states1, states2 = {}, {}
        for name, s in self.m1_logits.items():
            states1[name] = gen.get_state()
            torch.rand(s.shape, generator=gen, device=dev, dtype=s.dtype)
        for name, s in self.m2_logits.items():
            states2[name] = gen.get_state()
            torch.rand(s.shape, generator=gen, device=dev, dtype=s.dtype)
        return MaskDraw(states1, states2, grad=grad)

    def binary(self) -> MaskDraw:
        return MaskDraw({}, {}, binary=True)  # each TensorState binarizes its own logits

    def _merge(self, masks: MaskDraw, coef: torch.Tensor, *, safe_copy: bool):
        out: Params = {}
        safe: Params = {}
        for k, name in enumerate(self.inputs.names):
            row = coefficient_row(coef, k)
            result = self.states[name]("merge", masks, row, self._spec(name, safe_copy=safe_copy))
            if safe_copy:
                out[self.pnames[name]], safe[self.pnames[name]] = result
            else:
                out[self.pnames[name]] = result
        return out, safe

    def merged_params(self, masks: MaskDraw, coef: torch.Tensor) -> Params:
        return self._merge(masks, coef, safe_copy=False)[0]

    def mask_gradients(self, masks, coef, losses, *, alpha, m1_learns_safety):
        """One backward; unless M1 learns the safety term, the perturbed forward runs on a merge
        with M1 detached, so M1's gradient is that of L_perf alone."""
        if m1_learns_safety:
            params = safe_params = self.merged_params(masks, coef)
        else:
            params, safe_params = self._merge(masks, coef, safe_copy=True)
        perf, safe = losses(params, safe_params)
        (perf + alpha * safe).backward()
        return perf, safe

    def expert_params(self, index: int) -> Params:
        with torch.no_grad():
            return {
                self.pnames[k]: self.states[k]("expert", spec={"index": index})
                for k in self.inputs.names
            }

    def final_tensors(self, masks: MaskDraw):
        for name in self.inputs.names:
            with torch.no_grad():
                m1, m2, r, base, experts = self.states[name]("final", masks, spec=self._spec(name))
            yield FinalTensor(name, m1, m2, r, base, experts)

    def share(self, batch):
        return batch  # every process runs the whole batch (sharded state, replicated data)

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def all_sum(self, tensors: list[torch.Tensor]) -> None:
        """FSDP reduces the mask gradients itself; coefficients and perturbations are replicated
        and see the same batches in every process."""

    def finish(self) -> None:
        dist.barrier()  # the mask file exists before any process goes on
