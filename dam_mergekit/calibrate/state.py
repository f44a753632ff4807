"""Where a calibration's state lives: the seam between the training loop and its memory layout.

A state holds the mask logits, the base and expert tensors and the model the adapter runs, and
forms merged parameters from a mask draw and the coefficients with
:func:`dam_mergekit.merge.merge_tensor`. :class:`LocalState` keeps everything whole on one device;
:class:`dam_mergekit.calibrate.sharded.ShardedState` shards it across processes with FSDP. Both
have the methods of :class:`CalibrationState` with the same signatures and return types, so the
loop (``trainer.py``) and the objectives (``objectives.py``) never ask which one they have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from dam_mergekit.calibrate import concrete
from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.merge import merge_deltas

Params = dict[str, torch.Tensor]  # module parameter name -> tensor, for functional_call
# (clean-forward parameters, perturbed-forward parameters) -> each task's (L_perf, L_safe)
MaskLosses = Callable[[Params, Params], Iterable[tuple[torch.Tensor, torch.Tensor]]]


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

    def gradients(
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


class TensorState(nn.Module):
    """One merged tensor's calibration state: its base, its task vectors, its mask logits.

    The base is held in its file's dtype (lossless) and the task vectors ``[n, ...]`` in
    ``delta_dtype``; both are cast to float32 per use. The mask samples are replayed from
    recorded noise states rather than stored. FSDP may shard the module.
    """

    def __init__(self, base: torch.Tensor, deltas: torch.Tensor, s1, s2):
        super().__init__()
        self.base = nn.Parameter(base, requires_grad=False)
        self.deltas = nn.Parameter(deltas, requires_grad=False)
        self.s1 = nn.Parameter(s1)
        self.s2 = nn.Parameter(s2) if s2 is not None else None

    def forward(self, what: str, masks=None, coef=None, spec: dict | None = None):
        """``merge``: the merged tensor (and, with ``spec["safe_copy"]``, one with M1 detached);
        ``expert``: expert ``spec["index"]``; ``final``: the masks, rescaling and base the mask
        file and the final merge need."""
        if what == "expert":
            dev = self.s1.device  # the base and task vectors may live elsewhere (offload)
            return self.base.detach().to(dev, torch.float32) + self.deltas[
                spec["index"]
            ].detach().to(dev, torch.float32)
        if what == "final":
            a, b = self._masks(masks, spec)
            r = self._rescale(a, b, spec)
            b = None if b is None else [x.detach().clone() for x in b]
            return a.detach().clone(), b, r.detach(), self.base.detach().float().clone()
        return self._merge(masks, coef, spec)

    def _masks(self, masks: MaskDraw, spec) -> tuple[torch.Tensor | None, list | None]:
        """M1 (None while frozen, outside the extracted masks) and the M2s of this tensor."""
        if masks.binary:
            if spec["m1_frozen"]:
                a = torch.ones(self.s1.shape, device=self.s1.device)
            else:
                a = concrete.binarize(self.s1).float()
            b = None if self.s2 is None else list(concrete.binarize(self.s2).float().unbind(0))
            return a, b
        gen, name, temperature = spec["generator"], spec["name"], spec["temperature"]
        a = b = None
        if name in masks.m1:
            gen.set_state(masks.m1[name])
            a = concrete.sample(self.s1, temperature, gen)
        if self.s2 is not None:
            gen.set_state(masks.m2[name])
            b = list(concrete.sample(self.s2, temperature, gen).unbind(0))
        if not masks.grad:
            a = None if a is None else a.detach()
            b = None if b is None else [x.detach() for x in b]
        return a, b

    def _rescale(self, a, b, spec) -> torch.Tensor:
        n = self.deltas.shape[0]
        return concrete.rescale_factors(
            a, b if b is not None else [None] * n, enabled=spec["rescale"]
        )

    def _merge(self, masks, coef, spec):
        a, b = self._masks(masks, spec)
        base = self.base.to(self.s1.device, torch.float32)

        def merged(m1):
            c = coef * self._rescale(m1, b, spec)
            return merge_deltas(
                base,
                self.deltas,
                spec["weights"],
                lam=spec["lam"],
                m1=m1,
                m2=b,
                coefficients=c,
                lean=spec.get("lean", False),
            )

        detached = None if a is None else a.detach()
        if spec.get("safe_copy"):
            return merged(a), merged(detached)
        return merged(detached if spec.get("m1_detached") else a)


def free_weights(model: nn.Module, names) -> None:
    """Drop the model's own copy of the merged tensors: every forward swaps merged ones in."""
    for name in names:
        param = model.get_parameter(name)
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


class LocalState:
    """One :class:`TensorState` per planned tensor, whole on this device: the one-process state.

    :class:`dam_mergekit.calibrate.sharded.ShardedState` is the same state with each
    :class:`TensorState` sharded by FSDP (:meth:`place`).
    """

    rank, world = 0, 1
    shards_state = splits_data = False

    def __init__(self, inputs: StateInputs, adapter: Any, device: torch.device):
        from dam_mergekit.calibrate.models import TensorReader

        self.inputs, self.device = inputs, device
        cfg = inputs.config
        self.m1_frozen = cfg.train == "m2"  # exactly all-ones, never sampled
        self.noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        # replays recorded noise states; the noise stream itself only advances in draw(), so a
        # merge recomputed in backward cannot disturb it
        self.replay = torch.Generator(device=device)
        self.model = adapter.load_model(inputs.base_dir)
        self.model.requires_grad_(False)
        self.pnames = adapter.parameter_names(self.model, inputs.names)
        free_weights(self.model, self.pnames.values())
        read = {"allow_pickle": inputs.allow_pickle}
        self.readers = [TensorReader(d, **read) for d in (inputs.base_dir, *inputs.expert_dirs)]
        self.states: dict[str, TensorState] = {}
        self.m1_logits: dict[str, torch.Tensor] = {}
        self.m2_logits: dict[str, torch.Tensor] = {}
        for name in inputs.names:  # one tensor at a time: no whole model is held besides these
            state = self.place(self._tensor_state(name))
            self.states[name] = state
            self.m1_logits[name] = state.s1
            if state.s2 is not None:
                self.m2_logits[name] = state.s2
        for reader in self.readers:
            reader.close()

    def storage_device(self) -> torch.device:
        """Where the base and the task vectors live (the logits live on ``self.device``)."""
        return self.device

    def _tensor_state(self, name: str) -> TensorState:
        inputs, dev, store = self.inputs, self.device, self.storage_device()
        base = self.readers[0](name)
        base32 = base.to(device=store, dtype=torch.float32)
        delta_dtype = getattr(torch, inputs.config.delta_dtype or "float32")
        deltas = torch.stack(
            [(r(name).to(device=store, dtype=torch.float32) - base32) for r in self.readers[1:]]
        ).to(delta_dtype)
        n = len(self.readers) - 1
        m2 = inputs.initial_logits(name, dev, n) if inputs.two_masks else None
        stored = base.dtype if base.is_floating_point() else torch.float32
        return TensorState(
            base.to(device=store, dtype=stored), deltas, inputs.initial_logits(name, dev), m2
        )

    def place(self, state: TensorState) -> TensorState:
        """Where a tensor's state lives: here, whole."""
        return state

    def _spec(self, name: str, **extra) -> dict:
        return {
            "name": name,
            "generator": self.replay,
            "temperature": self.inputs.config.temperature,
            "rescale": self.inputs.rescale_on,
            "weights": self.inputs.weights[name],
            "lam": self.inputs.lams[name],
            "m1_frozen": self.m1_frozen,
            **extra,
        }

    def draw(self, *, grad: bool) -> MaskDraw:
        """Advance the noise stream as one sample of every mask would, noting each state."""
        gen, dev = self.noise, self.device
        states1, states2 = {}, {}
        for name, s in ({} if self.m1_frozen else self.m1_logits).items():
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
        """Module parameters of the merged model: values, no graph."""
        with torch.no_grad():
            return self._merge(masks, coef, safe_copy=False)[0]

    def gradients(self, masks, coef, losses, *, alpha, m1_learns_safety):
        """Backward every task's ``L_perf + alpha * L_safe`` into the mask logits (when ``masks``
        are differentiable) and the coefficients (when ``coef`` requires grad).

        Two stages. The tasks' forwards run on merged tensors made leaves, and each task is
        backwarded into them as it comes, so one task's activations are alive at a time. Then
        each tensor's merge is formed again with its graph and backwarded from the leaves'
        gradients, so the merge's intermediates (every expert's masked task vector) exist for
        one tensor at a time. Unless M1 learns the safety term, the perturbed forwards run on a
        copy merged with M1 detached, so M1's gradient is that of L_perf alone."""
        copy = masks.grad and not m1_learns_safety
        leaves = {k: v.requires_grad_(True) for k, v in self.merged_params(masks, coef).items()}
        # the copy has the same values; a view of them is a leaf of its own
        safe_leaves = (
            {k: v.detach().requires_grad_(True) for k, v in leaves.items()} if copy else leaves
        )
        sums = backward_per_task(losses(leaves, safe_leaves), alpha)
        for k, name in enumerate(self.inputs.names):
            pname = self.pnames[name]
            outs = [leaves[pname]] + ([safe_leaves[pname]] if copy else [])
            grads = [t.grad for t in outs]
            if all(g is None for g in grads):
                continue
            spec = self._spec(name, safe_copy=copy)
            merged = self.states[name]("merge", masks, coefficient_row(coef, k), spec)
            merged = list(merged) if copy else [merged]
            pairs = [(m, g) for m, g in zip(merged, grads, strict=True) if g is not None]
            if pairs and pairs[0][0].requires_grad:
                torch.autograd.backward([m for m, _ in pairs], [g for _, g in pairs])
            for t in outs:
                t.grad = None
        return sums

    def expert_params(self, index: int) -> Params:
        with torch.no_grad():
            return {
                self.pnames[k]: self.states[k]("expert", spec={"index": index})
                for k in self.inputs.names
            }

    def final_tensors(self, masks: MaskDraw) -> Iterator[FinalTensor]:
        """Each tensor's final values; the experts are read again from their files, so the
        merge computed from them is exact whatever ``delta_dtype`` held."""
        for name in self.inputs.names:
            with torch.no_grad():
                m1, m2, r, base = self.states[name]("final", masks, spec=self._spec(name))
            experts = [reader(name).float() for reader in self.readers[1:]]
            yield FinalTensor(name, m1, m2, r, base, experts)

    def share(self, batch: Any) -> Any:
        return batch

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def all_sum(self, tensors: list[torch.Tensor]) -> None:
        """One process holds every gradient already."""

    def finish(self) -> None:
        """Nothing to wait for in one process."""


def backward_per_task(
    per_task: Iterable[tuple[torch.Tensor, torch.Tensor]], alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward each task's ``L_perf + alpha * L_safe`` as it comes, accumulating gradients
    (into the merged tensors' leaves: one task's activations are alive at a time)."""
    perf_sum = safe_sum = None
    for perf, safe in per_task:
        loss = perf + alpha * safe
        if loss.requires_grad:
            loss.backward()
        perf_sum = perf.detach() if perf_sum is None else perf_sum + perf.detach()
        safe_sum = safe.detach() if safe_sum is None else safe_sum + safe.detach()
    if perf_sum is None:
        raise ValueError("no task losses to differentiate")
    return perf_sum, safe_sum


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly FSDP-sharded) tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (all of it, unless FSDP sharded it)."""
    return t.to_local() if hasattr(t, "to_local") else t
