"""Merged weights formed inside the forward (``memory: streamed`` and ``memory: offload``).

The one-process state (:class:`~dam_mergekit.calibrate.state.LocalState`) forms every merged
tensor once per step and keeps them, with their gradients, for the whole step: three float32
copies of the model besides the state. At LLM scale that is most of the peak. Here no merged
tensor outlives the module that uses it:

- each merged parameter is a parametrization of its module, formed from its
  :class:`~dam_mergekit.calibrate.state.TensorState` when the module reads it, from the masks and
  coefficients of the forward that runs (the *binding*);
- every block of the model (an entry of a ``ModuleList``: a transformer layer) runs under
  activation checkpointing, so its merged weights and activations are dropped after its forward
  and formed again in its backward; a tensor outside the blocks (embeddings, heads, norms) lives
  as long as the ops that read it keep it;
- each merge's backward recomputes its products from the stored task vectors
  (``merge_deltas(lean=True)``) rather than keeping float32 copies of them;
- the gradients reach the mask logits and coefficients directly: nothing model-sized is a leaf.

With ``offload`` the base and the task vectors stay in host memory and each tensor's are copied
to the device when it is formed, so the device holds the logits, one block's working set and the
activations. The result is that of ``memory: whole`` up to floating-point summation order; the
price is compute: every forward merges, and every block merges again in its backward.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from dam_mergekit.calibrate.state import (
    LocalState,
    MaskDraw,
    Params,
    StateInputs,
    TensorState,
    backward_per_task,
    coefficient_row,
)

BLOCK = re.compile(r"^(.*?\.\d+)\.")


@dataclass(frozen=True)
class Binding:
    """What the merged weights of one forward are: a merge (masks and coefficients, with M1
    detached for the perturbed forward of the mask step), or expert ``expert`` (a teacher)."""

    masks: MaskDraw | None = None
    coef: torch.Tensor | None = None
    m1_detached: bool = False
    expert: int | None = None
    in_block: bool = False  # inside a checkpointed block's forward or recompute


class StreamedParams(dict):
    """The parameters of a streamed forward: an empty mapping (``functional_call`` swaps nothing
    in, the parametrizations form each weight) that forms a tensor when one is asked for by name
    (the causal-LM adapter reads its embedding to add the perturbation after it)."""

    def __init__(self, state: StreamedState, binding: Binding):
        super().__init__()
        self.state, self.binding = state, binding

    def get(self, pname: str, default: Any = None) -> Any:
        name = self.state.planned.get(pname)
        if name is None:
            return default
        with self.state.bound(self.binding):
            return self.state.form(name)


def bound(params: Any):
    """The context a forward under ``params`` runs in (a binding, for streamed parameters)."""
    if isinstance(params, StreamedParams):
        return params.state.bound(params.binding)
    return no_context()


@contextmanager
def no_context() -> Iterator[None]:
    yield


class MergedWeight(nn.Module):
    """A parametrization that ignores the stored (freed) parameter and forms the merged one."""

    def __init__(self, state: StreamedState, name: str):
        super().__init__()
        self.name = name
        object.__setattr__(self, "state", state)  # not a submodule

    def forward(self, _stored: torch.Tensor) -> torch.Tensor:
        return self.state.form(self.name)


class StreamedState(LocalState):
    """The one-process state with each merged weight formed inside the module that reads it."""

    def __init__(self, inputs: StateInputs, adapter: Any, device: torch.device):
        self.offload = inputs.config.memory == "offload"
        super().__init__(inputs, adapter, device)
        self.planned = {pname: name for name, pname in self.pnames.items()}
        self.index = {name: k for k, name in enumerate(inputs.names)}
        self.binding: Binding | None = None
        install(self.model, self)

    def storage_device(self) -> torch.device:
        """Where the base and task vectors live: host memory with ``offload``."""
        return torch.device("cpu") if self.offload else self.device

    def place(self, state: TensorState) -> TensorState:
        if self.offload and self.device.type == "cuda":  # pinned: copies overlap compute
            state.base.data = state.base.data.pin_memory()
            state.deltas.data = state.deltas.data.pin_memory()
        return state

    @contextmanager
    def bound(self, binding: Binding, **changes: Any) -> Iterator[None]:
        before, self.binding = self.binding, replace(binding, **changes) if changes else binding
        try:
            yield
        finally:
            self.binding = before

    def recompute_context(self) -> Callable | None:
        """The binding a block starting now must be recomputed under (None: no recompute)."""
        binding = self.binding
        if binding is None or binding.in_block:
            return None
        return lambda: self.bound(binding, in_block=True)

    def form(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of the bound forward: merged, or an expert's."""
        binding = self.binding
        if binding is None:
            raise RuntimeError(f"merged weight {name} read outside a calibration forward")
        state = self.states[name]
        if binding.expert is not None:
            return state("expert", spec={"index": binding.expert})
        row = coefficient_row(binding.coef, self.index[name])
        # lean: the merge's backward keeps the mask factors only, not [n, ...] float32 copies
        spec = self._spec(name, m1_detached=binding.m1_detached, lean=True)
        return state("merge", binding.masks, row, spec)

    def merged_params(self, masks: MaskDraw, coef: torch.Tensor) -> Params:
        return StreamedParams(self, Binding(masks.detached(), coef.detach()))

    def expert_params(self, index: int) -> Params:
        return StreamedParams(self, Binding(expert=index))

    def gradients(self, masks, coef, losses, *, alpha, m1_learns_safety):
        """Backward every task's ``L_perf + alpha * L_safe`` straight into the mask logits and
        coefficients (through the merges its forwards formed); with two masks the perturbed
        forwards merge with M1 detached, so M1's gradient is that of L_perf alone."""
        params = StreamedParams(self, Binding(masks, coef))
        safe = params
        if masks.grad and not m1_learns_safety:
            safe = StreamedParams(self, Binding(masks, coef, m1_detached=True))
        return backward_per_task(losses(params, safe), alpha)


def one_process_state(config) -> type:
    """The state one process builds for ``config``'s memory layout."""
    return LocalState if config.memory == "whole" else StreamedState


def install(model: nn.Module, state: StreamedState) -> None:
    """Make every merged parameter a :class:`MergedWeight` and checkpoint every block."""
    if getattr(model.config, "use_cache", None):  # a cache would grow on every recompute
        model.config.use_cache = False
    merged = set(state.planned)
    checkpoint_blocks(model, merged, state.recompute_context)
    owners: dict[int, str] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), pname)
    for pname, param in list(model.named_parameters(remove_duplicate=False)):
        first = owners[id(param)]  # a tied weight is formed as the tensor it is tied to
        if first not in merged:
            continue
        module_name, _, attr = pname.rpartition(".")
        module = model.get_submodule(module_name)
        parametrize.register_parametrization(
            module, attr, MergedWeight(state, state.planned[first]), unsafe=True
        )


def block_of(pname: str) -> str | None:
    """The block a parameter belongs to: the module path up to its first numeric part (an entry of
    a ``ModuleList``, a transformer layer), or None for what lies outside every block."""
    match = BLOCK.match(pname)
    return match.group(1) if match else None


def checkpoint_blocks(
    model: nn.Module, pnames: Iterable[str], capture: Callable[[], Callable | None]
) -> None:
    """Run every block that holds one of ``pnames`` under activation checkpointing.

    ``capture()``, called as a block starts, gives the context its recompute must run in (the
    binding of the forward being recomputed: one task's backward covers a clean and a perturbed
    forward), or None to run the block as it is."""
    for prefix in sorted({b for b in map(block_of, pnames) if b is not None}):
        _checkpoint_block(model.get_submodule(prefix), capture)


def _checkpoint_block(block: nn.Module, capture: Callable[[], Callable | None]) -> None:
    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        context = capture() if torch.is_grad_enabled() else None
        if context is None:
            return inner(*args, **kwargs)

        def run(*a: Any, **k: Any) -> Any:
            with context():
                return inner(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    block.forward = forward
