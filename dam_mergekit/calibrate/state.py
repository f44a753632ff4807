"""Where a calibration's state lives: the seam between the training loop and its memory layout.

A state holds the mask logits, the base and expert tensors and the model the adapter runs, and
forms merged parameters from a mask draw and the coefficients with
:func:`dam_mergekit.merge.merge_tensor`. :class:`LocalState` keeps everything whole on one device;
:class:`dam_mergekit.calibrate.sharded.ShardedState` shards it across processes with FSDP. Both
have the methods of :class:`CalibrationState` with the same signatures and return types, so the
loop (``trainer.py``) and the objectives (``objectives.py``) never ask which one they have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from dam_mergekit.calibrate import concrete
from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.calibrate.models import load_tensors
from dam_mergekit.merge import merge_tensor

Params = dict[str, torch.Tensor]  # module parameter name -> tensor, for functional_call
# (clean-forward parameters, perturbed-forward parameters) -> (L_perf, L_safe)
MaskLosses = Callable[[Params, Params], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MaskDraw:
    """One draw of every mask, per planned tensor name: M1, and the M2s stacked ``[n, ...]``.

    A local state stores the masks themselves; a sharded state stores what recreates them (the
    noise generator's state before each draw), since no process may hold every mask at once.
    ``binary`` marks the extracted masks (keep where sigmoid(logit) >= 0.5).
    """

    m1: dict[str, torch.Tensor]
    m2: dict[str, torch.Tensor]
    grad: bool = False  # differentiable in the logits (the mask step)
    binary: bool = False

    def detached(self) -> MaskDraw:
        """The same draw, not differentiable (a sharded state's noise states replay it)."""
        if not self.grad:
            return self
        m1 = {k: v.detach() for k, v in self.m1.items()}
        m2 = {k: v.detach() for k, v in self.m2.items()}
        return MaskDraw(m1, m2, grad=False, binary=self.binary)


class FinalTensor(NamedTuple):
    """One tensor's final values, on the cpu side of the state: what the mask file is made of."""

    name: str
    m1: torch.Tensor | None
    m2: list[torch.Tensor] | None
    rescale: torch.Tensor  # per-expert factors 1 / mean(M1 * M2_i), or ones
    base: torch.Tensor
    experts: list[torch.Tensor]


@dataclass(frozen=True)
class StateInputs:
    """What a state is built from: the planned tensors, the model folders and the settings."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    weights: dict[str, list[float]]  # per tensor, each expert's recipe weight
    lams: dict[str, float]  # per tensor, the recipe's lambda
    base_dir: str
    expert_dirs: list[str]
    config: CalibrationConfig
    two_masks: bool  # M1 plus one M2 per expert (mode dam); else one shared mask
    allow_pickle: bool = False

    @property
    def rescale_on(self) -> bool:
        return concrete.rescaling_applies(self.config.rescale, self.config.granularity)

    def initial_logits(self, name: str, device, experts: int = 0) -> torch.Tensor:
        """Initial mask logits of one tensor (M1; M2 with ``experts``), not yet trainable."""
        cfg = self.config
        return concrete.init_logits(
            self.shapes[name], cfg.granularity, cfg.init_logit, experts=experts, device=device
        )


class CalibrationState(Protocol):
    """The operations the loop and the objectives need from where the state lives.

    ``share``, ``gather`` and ``all_sum`` are where data parallelism lives: this process's share of
    a sampled batch, the whole batch's logits from every process's share (the local part stays
    differentiable), and an in-place sum over processes of gradients computed from the shares.
    """

    rank: int  # this process
    world: int  # processes sharing the calibration
    shards_state: bool  # each process keeps 1/world of the state (FSDP)
    splits_data: bool  # each process runs 1/world of every batch
    model: torch.nn.Module
    pnames: dict[str, str]  # planned tensor name -> module parameter name
    noise: torch.Generator  # the Concrete noise stream (checkpointed)
    m1_logits: dict[str, torch.Tensor]  # trainable, possibly sharded
    m2_logits: dict[str, torch.Tensor]  # empty with one shared mask

    def draw(self, *, grad: bool) -> MaskDraw: ...

    def binary(self) -> MaskDraw: ...

    def merged_params(self, masks: MaskDraw, coef: torch.Tensor) -> Params: ...

    def mask_gradients(
        self,
        masks: MaskDraw,
        coef: torch.Tensor,
        losses: MaskLosses,
        *,
        alpha: float,
        m1_learns_safety: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def expert_params(self, index: int) -> Params: ...

    def final_tensors(self, masks: MaskDraw) -> Iterator[FinalTensor]: ...

    def share(self, batch: Any) -> Any: ...

    def gather(self, logits: torch.Tensor) -> torch.Tensor: ...

    def all_sum(self, tensors: list[torch.Tensor]) -> None: ...

    def finish(self) -> None: ...


def coefficient_row(coef: torch.Tensor, k: int) -> torch.Tensor:
    """Tensor ``k``'s coefficients: its own row (``coefficients: layer``) or the one shared row."""
    return coef[k if coef.shape[0] > 1 else 0]


def unstack(m2: torch.Tensor | None) -> list[torch.Tensor] | None:
    return None if m2 is None else list(m2.unbind(0))


class LocalState:
    """The whole state on one device: the one-process calibration."""

    rank, world = 0, 1
    shards_state = splits_data = False

    def __init__(self, inputs: StateInputs, adapter: Any, device: torch.device):
        self.inputs, self.device = inputs, device
        cfg, names = inputs.config, inputs.names
        self.m1_frozen = cfg.train == "m2"  # exactly all-ones, never sampled
        self.noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        load = {"allow_pickle": inputs.allow_pickle}
        self.base = load_tensors(inputs.base_dir, names, device, **load)
        self.experts = [load_tensors(d, names, device, **load) for d in inputs.expert_dirs]
        self.model = adapter.load_model(inputs.base_dir)
        self.pnames = adapter.parameter_names(self.model, names)
        n = len(inputs.expert_dirs)
        self.m1_logits = {k: inputs.initial_logits(k, device).requires_grad_(True) for k in names}
        self.m2_logits = (
            {k: inputs.initial_logits(k, device, n).requires_grad_(True) for k in names}
            if inputs.two_masks
            else {}
        )

    def draw(self, *, grad: bool) -> MaskDraw:
        """Concrete samples of M1 (none while it is frozen) and of every M2, in tensor order."""
        temperature = self.inputs.config.temperature
        m1 = (
            {}
            if self.m1_frozen
            else {k: concrete.sample(s, temperature, self.noise) for k, s in self.m1_logits.items()}
        )
        m2 = {k: concrete.sample(s, temperature, self.noise) for k, s in self.m2_logits.items()}
        if not grad:
            m1 = {k: v.detach() for k, v in m1.items()}
            m2 = {k: v.detach() for k, v in m2.items()}
        return MaskDraw(m1, m2, grad=grad)

    def binary(self) -> MaskDraw:
        """The extracted masks; a frozen M1 is all-ones whatever its logits."""
        with torch.no_grad():
            m1 = {
                k: (
                    torch.ones_like(s, dtype=torch.bool) if self.m1_frozen else concrete.binarize(s)
                ).float()
                for k, s in self.m1_logits.items()
            }
            m2 = {k: concrete.binarize(s).float() for k, s in self.m2_logits.items()}
        return MaskDraw(m1, m2, binary=True)

    def _rescale(self, m1, m2: list | None) -> torch.Tensor:
        n = len(self.experts)
        return concrete.rescale_factors(m1, m2 or [None] * n, enabled=self.inputs.rescale_on)

    def merged_params(self, masks: MaskDraw, coef: torch.Tensor) -> Params:
        """Module parameters of the merged model (differentiable in masks and coefficients)."""
        out = {}
        for k, name in enumerate(self.inputs.names):
            m1, m2 = masks.m1.get(name), unstack(masks.m2.get(name))
            out[self.pnames[name]] = merge_tensor(
                self.base[name],
                [e[name] for e in self.experts],
                self.inputs.weights[name],
                lam=self.inputs.lams[name],
                m1=m1,
                m2=m2,
                coefficients=coefficient_row(coef, k) * self._rescale(m1, m2),
            )
        return out

    def mask_gradients(self, masks, coef, losses, *, alpha, m1_learns_safety):
        """Set the logits' gradients; M1 sees the safety term only if ``m1_learns_safety``.

        Two ``autograd.grad`` calls on one forward: M1 gets the gradient of L_perf, every M2 that
        of L_perf + alpha * L_safe.
        """
        params = self.merged_params(masks, coef)
        perf, safe = losses(params, params)
        m1 = list(self.m1_logits.values())
        m2 = list(self.m2_logits.values())
        if m1_learns_safety:
            grads = torch.autograd.grad(perf + alpha * safe, m1 + m2, allow_unused=True)
            for p, g in zip(m1 + m2, grads, strict=True):
                p.grad = g
            return perf, safe
        g_perf = torch.autograd.grad(perf, m1 + m2, retain_graph=True, allow_unused=True)
        g_safe = (
            torch.autograd.grad(alpha * safe, m2, allow_unused=True)
            if alpha > 0 and safe.requires_grad
            else [None] * len(m2)
        )
        for p, g in zip(m1, g_perf[: len(m1)], strict=True):
            p.grad = g
        for p, g, gs in zip(m2, g_perf[len(m1) :], g_safe, strict=True):
            p.grad = g if gs is None else (gs if g is None else g + gs)
        return perf, safe

    def expert_params(self, index: int) -> Params:
        return {self.pnames[k]: self.experts[index][k] for k in self.inputs.names}

    def final_tensors(self, masks: MaskDraw) -> Iterator[FinalTensor]:
        with torch.no_grad():
            for name in self.inputs.names:
                m1, m2 = masks.m1.get(name), unstack(masks.m2.get(name))
                yield FinalTensor(
                    name,
                    m1,
                    m2,
                    self._rescale(m1, m2),
                    self.base[name],
                    [e[name] for e in self.experts],
                )

    def share(self, batch: Any) -> Any:
        return batch

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def all_sum(self, tensors: list[torch.Tensor]) -> None:
        """One process holds every gradient already."""

    def finish(self) -> None:
        """Nothing to wait for in one process."""


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly FSDP-sharded) tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (all of it, unless FSDP sharded it)."""
    return t.to_local() if hasattr(t, "to_local") else t
