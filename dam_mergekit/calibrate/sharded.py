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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from dam_mergekit.calibrate import concrete
from dam_mergekit.calibrate.models import load_tensors
from dam_mergekit.calibrate.trainer import CalibrationResult, Calibrator
from dam_mergekit.errors import DamError
from dam_mergekit.merge import merge_tensor

BINARY = "binary"  # the extracted masks: keep where sigmoid(logit) >= 0.5


@dataclass(frozen=True)
class MaskDraw:
    """One relaxed sample of every mask, named by the noise generator's state before each draw."""

    m1: dict[str, torch.Tensor]
    m2: dict[str, torch.Tensor]
    grad: bool  # samples stay differentiable in the logits (the mask step)


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

    def _masks(self, masks, spec) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        if masks == BINARY:
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


class ShardedCalibrator(Calibrator):
    """:class:`Calibrator` with the per-tensor state in FSDP-sharded :class:`TensorState` s."""

    def __init__(self, plan, config, **kwargs):
        if not dist.is_available():
            raise DamError("sharded calibration needs torch.distributed, which this torch lacks")
        if config.train == "m2":
            raise DamError(
                "train: m2 (the bench's awm row) runs in one process; start it without torchrun"
            )
        kind = torch.device(config.device).type
        if kind not in ("cpu", "cuda"):
            raise DamError(f"sharded calibration runs on cpu or cuda, not {config.device!r}")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if kind == "cuda":  # one GPU per process: the launcher's local rank picks it
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            config.device = f"cuda:{local}"
        quiet = self.rank != 0
        if quiet:
            kwargs["progress"] = False
            kwargs["log"] = lambda msg: None
        super().__init__(plan, config, **kwargs)

    # -- state -------------------------------------------------------------------------------------
    def _init_state(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dev = self.device
        mesh = init_device_mesh(dev.type, (self.world,))
        self.model = self.adapter.load_model(self.base_dir)
        self.model.requires_grad_(False)
        self.pnames = self.adapter.parameter_names(self.model, self.names)
        for name in self.names:  # every forward swaps in merged tensors: free the model's own
            param = self.model.get_parameter(self.pnames[name])
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        # replays recorded noise states; the noise stream itself only advances in _draw, so a
        # merge recomputed in backward cannot disturb it
        self.replay_gen = torch.Generator(device=dev)
        self.states: dict[str, TensorState] = {}
        self.s1, self.s2 = {}, {}
        for name in self.names:  # one tensor at a time: no process ever holds the whole state
            base = self._load(self.base_dir, name)
            experts = torch.stack([self._load(d, name) for d in self.expert_dirs])
            s2 = self._logits(name, experts=self.n).detach() if self.dual else None
            state = TensorState(base, experts, self._logits(name).detach(), s2)
            scalars = {p for p in state.parameters() if p.dim() == 0}  # FSDP shards dim 0
            fully_shard(state, mesh=mesh, ignored_params=scalars or None)
            self.states[name] = state
            self.s1[name] = state.s1
            if state.s2 is not None:
                self.s2[name] = state.s2

    def _load(self, folder: str, name: str) -> torch.Tensor:
        return load_tensors(folder, [name], self.device, allow_pickle=self.allow_pickle)[name]

    def _spec(self, name: str, **extra) -> dict:
        return {
            "name": name,
            "generator": self.replay_gen,
            "temperature": self.cfg.temperature,
            "rescale": concrete.rescaling_applies(self.cfg.rescale, self.cfg.granularity),
            "weights": self.weights[name],
            "lam": self.lams[name],
            **extra,
        }

    def _teacher_params(self, task: str) -> dict[str, torch.Tensor]:
        index = self.teacher_of[task]
        with torch.no_grad():
            return {
                self.pnames[k]: self.states[k]("expert", spec={"index": index}) for k in self.names
            }

    # -- masks -------------------------------------------------------------------------------------
    def _draw(self, *, grad: bool) -> MaskDraw:
        """Advance the noise stream exactly as the one-process sample would, noting each state."""
        gen, dev = self.noise_gen, self.device
        states1, states2 = {}, {}
        for name, s in self.s1.items():
            states1[name] = gen.get_state()
            torch.rand(s.shape, generator=gen, device=dev, dtype=s.dtype)
        for name, s in self.s2.items():
            states2[name] = gen.get_state()
            torch.rand(s.shape, generator=gen, device=dev, dtype=s.dtype)
        return MaskDraw(states1, states2, grad)

    def _step_masks(self):
        return self._draw(grad=False), None

    def merged_params(self, m1, m2, coef, *, rescale=None, safe_copy: bool = False):
        """Merged parameters from a :class:`MaskDraw` or the extracted masks (``BINARY``).

        ``rescale`` is not read: each :class:`TensorState` computes the same factors from the
        masks it gathers (the one-process trainer passes them only to avoid recomputing them).
        """
        out, safe = {}, {}
        for k, name in enumerate(self.names):
            row = coef[k if coef.shape[0] > 1 else 0]
            result = self.states[name]("merge", m1, row, self._spec(name, safe_copy=safe_copy))
            if safe_copy:
                out[self.pnames[name]], safe[self.pnames[name]] = result
            else:
                out[self.pnames[name]] = result
        return (out, safe) if safe_copy else out

    def _mask_step(self) -> tuple[float, float]:
        cfg = self.cfg
        draw = self._draw(grad=True)
        if self.dual:  # M1 sees L_perf only: the perturbed forward uses a merge with M1 detached
            params, safe_params = self.merged_params(draw, None, self.coef.detach(), safe_copy=True)
        else:  # as released: one mask on both terms
            params = safe_params = self.merged_params(draw, None, self.coef.detach())
        batches = self._batches()
        perf = torch.zeros((), device=self.device)
        safe = torch.zeros((), device=self.device)
        for t in self.tasks:
            h, s = self._task_losses(params, t, batches[t], perturbed=True, safe_params=safe_params)
            perf, safe = perf + h, safe + s
        (perf + cfg.alpha * safe).backward()
        self.opt_m1.step()
        if self.opt_m2 is not None:
            self.opt_m2.step()
        self.opt_m1.zero_grad(set_to_none=True)
        if self.opt_m2 is not None:
            self.opt_m2.zero_grad(set_to_none=True)
        return perf.item(), safe.item()

    def extract(self):
        if self.dual:
            return BINARY, BINARY, None
        return self._draw(grad=False), {}, None

    def _final_tensors(self, m1, m2, rescale):
        for k, name in enumerate(self.names):
            with torch.no_grad():
                a, b, r, base, experts = self.states[name]("final", m1, spec=self._spec(name))
            yield k, name, a, b, r, base, experts

    # -- checkpoints and the run -------------------------------------------------------------------
    def checkpoint_path(self) -> Path | None:
        path = super().checkpoint_path()
        if path is None:
            return None
        return path.with_name(f"{path.name}.rank{self.rank}-of-{self.world}")

    def _save_checkpoint(self, step: int, key: str, history: list) -> None:
        super()._save_checkpoint(step, f"{key}-world{self.world}", history)

    def _try_resume(self, key: str):
        return super()._try_resume(f"{key}-world{self.world}")

    def run(self, *, write: bool = True) -> CalibrationResult:
        result = super().run(write=write and self.rank == 0)
        if write:
            path = self.checkpoint_path()
            if path is not None:
                path.unlink(missing_ok=True)
        dist.barrier()  # the mask file exists before any process goes on
        return result
