"""Universal perturbations, one per task, that stand in for an unknown backdoor trigger.

A perturbation lives in its input's own space (the adapter says which: pixels in [0, 1] before
normalisation for CLIP, input embeddings for a causal LM). It is shared by every input of its task
("universal"), starts at zero and is pushed, by steepest ascent, to change the merged model's
predictions away from its own clean pseudo-labels. After every step it is projected back into the
norm ball ``||delta|| <= eps`` (L-inf: clamp each value; L2: scale down the whole tensor), so it can
never become a large, visible edit. Steps are signed gradients (L-inf) or unit-L2 gradients (L2)
of size ``lr``, the usual projected-gradient-ascent updates.

``as_released`` mode reproduces the released code instead: no norm bound, one Adam step per outer
step on the perturbation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerturbationSpace:
    """Where a task's perturbation lives: its shape, and the valid range of a perturbed input."""

    shape: tuple[int, ...]
    low: float | None = None  # perturbed inputs are clamped to [low, high] (None: unbounded)
    high: float | None = None

    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        out = x + delta
        if self.low is not None or self.high is not None:
            out = out.clamp(self.low, self.high)
        return out


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The closest point of the ``norm`` ball of radius ``eps`` (in place, returns ``delta``)."""
    with torch.no_grad():
        if norm == "linf":
            delta.clamp_(-eps, eps)
        elif norm == "l2":
            size = delta.norm()
            if size > eps:
                delta.mul_(eps / size)
        else:
            raise ValueError(f"unknown norm {norm!r}")
    return delta


def norm_of(delta: torch.Tensor, norm: str) -> float:
    return float(delta.abs().max() if norm == "linf" else delta.norm()) if delta.numel() else 0.0


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, *, norm: str, lr: float,
                eps: float) -> None:
    """One projected steepest-ascent step (in place)."""
    with torch.no_grad():
        if norm == "linf":
            delta.add_(lr * grad.sign())
        else:
            size = grad.norm()
            if size > 0:
                delta.add_(lr * grad / size)
        project(delta, norm, eps)


class Perturbations:
    """One universal perturbation per task, with its own update rule."""

    def __init__(self, spaces: dict[str, PerturbationSpace], *, norm: str, eps: float, lr: float,
                 bounded: bool = True, device: torch.device | str = "cpu"):
        self.spaces = spaces
        self.norm, self.eps, self.lr, self.bounded = norm, eps, lr, bounded
        self.deltas = {t: torch.zeros(s.shape, device=device) for t, s in spaces.items()}
        self._adam: torch.optim.Adam | None = None
        if not bounded:
            params = [d.requires_grad_(True) for d in self.deltas.values()]
            self._adam = torch.optim.Adam(params, lr=lr)

    def step(self, task: str, grad_of_objective: torch.Tensor) -> None:
        """Move ``task``'s perturbation to increase the objective whose gradient is given."""
        delta = self.deltas[task]
        if self.bounded:
            ascent_step(delta, grad_of_objective, norm=self.norm, lr=self.lr, eps=self.eps)
            return
        # as released: Adam on -objective, no projection
        delta.grad = -grad_of_objective
        assert self._adam is not None
        self._adam.step()
        self._adam.zero_grad(set_to_none=True)

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"delta/{t}": d.detach().clone() for t, d in self.deltas.items()}
        if self._adam is not None:
            for i, d in enumerate(self.deltas.values()):
                st = self._adam.state.get(d, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        out[f"delta_adam/{i}/{key}"] = st[key].detach().clone()
                if "step" in st:
                    out[f"delta_adam/{i}/step"] = torch.as_tensor(st["step"]).reshape(1).float()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for t, d in self.deltas.items():
                d.copy_(state[f"delta/{t}"])
        if self._adam is not None:
            for i, d in enumerate(self.deltas.values()):
                if f"delta_adam/{i}/step" in state:
                    self._adam.state[d] = {
                        "step": state[f"delta_adam/{i}/step"].reshape(()).clone().cpu(),
                        "exp_avg": state[f"delta_adam/{i}/exp_avg"].clone().to(d.device),
                        "exp_avg_sq": state[f"delta_adam/{i}/exp_avg_sq"].clone().to(d.device),
                    }
