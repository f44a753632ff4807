"""Trigger inversion: a small edit that sends a model's inputs of one task to one class.

A backdoor is a shortcut: a small, input-agnostic edit (the trigger) that moves almost every input
to the attacker's class. So for each candidate class we search, on unlabeled inputs, for such an
edit under a fixed budget and measure how often it works on inputs it was not fitted on. A class
reached far more easily than the others marks a backdoor (Neural Cleanse's idea; the code is ours).

Two trigger families, because no one family expresses every trigger:

- ``patch``: a mask ``m`` (one value per pixel, in [0, 1]) and a pattern ``p`` in the input's
  range, applied as ``(1 - m) * x + m * p``. The mask's total is held to ``area`` of the pixels
  (the mask is scaled down whenever it grows past the budget), so it can express a pasted patch
  of that size anywhere, or a faint blend of a larger pattern. It needs an image-like input.
- ``universal``: one additive perturbation under an L2 budget, projected after every step: it
  expresses blends and signals spread over the whole input, in any input space the adapter
  defines (embeddings too).

Every class of a task is searched at once: one trigger per class, stacked, and (for tensor
batches) one forward over the batch repeated once per class. Only unlabeled inputs and the
model's own predictions are read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from dam_mergekit.calibrate.perturb import PerturbationSpace

# logits of a batch with an optional edit added where the adapter's perturbation lives
Forward = Callable[[object, torch.Tensor | None], torch.Tensor]
FAMILIES = ("patch", "universal")


@dataclass
class Inverted:
    """The trigger found for one class: how often it works and what it is."""

    target: int
    flip_rate: float  # share of held-out inputs not already in ``target`` that it sends there
    trigger: torch.Tensor  # for pictures: patch: mask * pattern [C, H, W]; universal: delta
    reference_rate: float = 0.0  # the same trigger's flip rate on the reference model (the base)
    mask: torch.Tensor | None = None  # patch: the mask [1, H, W]; universal: None
    pattern: torch.Tensor | None = None  # patch: the pattern; universal: the perturbation

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        """What the trigger adds to a batch ``x`` (the adapter's ``delta``)."""
        if self.pattern is None:
            raise ValueError("this inverted trigger kept no parameters")
        pattern = self.pattern.to(x.device)
        if self.mask is None:
            return pattern
        return self.mask.to(x.device) * (pattern - x)


def supports_patch(space: PerturbationSpace) -> bool:
    """A patch needs an image: a ``[C, H, W]`` input with a bounded range."""
    return len(space.shape) == 3 and space.low is not None and space.high is not None


class Trigger(Protocol):
    """``classes`` stacked triggers; ``edit`` returns one edit per (class, input), class-major."""

    def edit(self, x, rows: int) -> torch.Tensor: ...

    def step(self, loss: torch.Tensor) -> None: ...

    def pictures(self) -> torch.Tensor: ...

    def pieces(self) -> tuple[torch.Tensor | None, torch.Tensor]: ...


class PatchTrigger:
    """Mask and pattern logits per class; each mask's sum never exceeds the budget."""

    def __init__(
        self, space: PerturbationSpace, area: float, classes: int, generator, device, lr: float
    ):
        c, h, w = space.shape
        self.space, self.budget = space, area * h * w
        noise = torch.randn((classes, 1, h, w), generator=generator)
        self.mask_logits = (-3.0 + 0.1 * noise).to(device).requires_grad_(True)
        pattern = torch.randn((classes, c, h, w), generator=generator)
        self.pattern_logits = pattern.to(device).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.mask_logits, self.pattern_logits], lr=lr)

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.sigmoid(self.mask_logits)
        total = mask.sum(dim=(1, 2, 3), keepdim=True)
        mask = mask * (self.budget / total).clamp(max=1.0)
        low, high = float(self.space.low), float(self.space.high)
        return mask, low + (high - low) * torch.sigmoid(self.pattern_logits)

    def edit(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        mask, pattern = self.parts()
        edits = mask.unsqueeze(1) * (pattern.unsqueeze(1) - x.unsqueeze(0))  # [K, B, C, H, W]
        return edits.reshape(-1, *x.shape[1:])

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def pictures(self) -> torch.Tensor:
        with torch.no_grad():
            mask, pattern = self.parts()
            return (mask * pattern).cpu()

    def pieces(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(masks, patterns), one per class, detached."""
        with torch.no_grad():
            mask, pattern = self.parts()
            return mask.detach(), pattern.detach()


class UniversalTrigger:
    """One additive perturbation per class, each projected into the L2 ball of radius ``eps``."""

    def __init__(self, space: PerturbationSpace, eps: float, classes: int, device):
        self.eps, self.lr = eps, eps / 8
        self.delta = torch.zeros((classes, *space.shape), device=device, requires_grad=True)

    def edit(self, x, rows: int) -> torch.Tensor:
        if self.delta.shape[0] == 1 and not isinstance(x, torch.Tensor):
            return self.delta[0]  # a structured batch (token rows): the adapter broadcasts it
        return self.delta.repeat_interleave(rows, dim=0)

    def step(self, loss: torch.Tensor) -> None:
        (grad,) = torch.autograd.grad(loss, self.delta)
        with torch.no_grad():
            flat = grad.reshape(grad.shape[0], -1)
            unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.delta -= self.lr * unit.reshape(grad.shape)  # descends the loss
            size = self.delta.reshape(grad.shape[0], -1).norm(dim=1)
            scale = (self.eps / size.clamp_min(1e-12)).clamp(max=1.0)
            self.delta *= scale.reshape(-1, *([1] * (grad.dim() - 1)))

    def pictures(self) -> torch.Tensor:
        return self.delta.detach().cpu()

    def pieces(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        return None, self.delta.detach()


def invert(
    forward: Forward,
    fit: list,
    held_out: object,
    targets: list[int],
    make_trigger: Callable[[int], Trigger],
    reference: Forward | None = None,
) -> list[Inverted]:
    """Fit one trigger per class of ``targets`` on the ``fit`` batches; score them on ``held_out``.

    A flip counts on inputs the model itself does not already put in the target class (its own
    clean predictions, never labels). ``reference`` (the base model) is scored with the same
    triggers: a shortcut the base shares is a feature of the task, not something the expert added.
    Tensor batches are repeated once per class, so all classes share each forward; any other batch
    (token rows) is searched one class at a time.
    """
    if not isinstance(held_out, torch.Tensor):
        return [
            inv
            for c in targets
            for inv in _invert_together(forward, fit, held_out, [c], make_trigger, reference)
        ]
    return _invert_together(forward, fit, held_out, targets, make_trigger, reference)


def _invert_together(forward, fit, held_out, targets, make_trigger, reference) -> list[Inverted]:
    trigger = make_trigger(len(targets))
    goal = torch.tensor(targets)

    def tiled(x):
        return x.repeat(len(targets), *([1] * (x.dim() - 1))) if len(targets) > 1 else x

    for x in fit:
        rows = _rows(x)
        logits = forward(tiled(x), trigger.edit(x, rows))
        want = goal.to(logits.device).repeat_interleave(logits.shape[0] // len(targets))
        trigger.step(F.cross_entropy(logits.float(), want) * len(targets))
    with torch.no_grad():
        edit = trigger.edit(held_out, _rows(held_out))
        rates = _flip_rates(forward, held_out, tiled(held_out), edit, targets)
        base = (
            _flip_rates(reference, held_out, tiled(held_out), edit, targets) if reference else None
        )
    pictures = trigger.pictures()
    masks, patterns = trigger.pieces()
    return [
        Inverted(
            t,
            rates[k],
            pictures[k],
            0.0 if base is None else base[k],
            None if masks is None else masks[k],
            patterns[k],
        )
        for k, t in enumerate(targets)
    ]


def _flip_rates(forward: Forward, clean, tiled, edit, targets: list[int]) -> list[float]:
    """Per target: share of the inputs ``forward`` does not already put there that ``edit`` moves
    there."""
    labels = forward(clean, None).argmax(-1).cpu()
    moved = forward(tiled, edit).argmax(-1).reshape(len(targets), -1).cpu()
    out = []
    for k, target in enumerate(targets):
        others = labels != target
        out.append(
            float((moved[k][others] == target).float().mean()) if bool(others.any()) else 0.0
        )
    return out


def _rows(batch) -> int:
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else 1
