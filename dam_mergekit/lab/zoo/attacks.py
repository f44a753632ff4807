"""Backdoor triggers: pure functions on float image batches [N, 3, H, W] in [0, 1].

Each returns a new tensor (the input is never modified) and depends only on its arguments, so the
training code, the evaluation and the tests all see exactly the same trigger. Defaults follow
BackdoorBench's CIFAR-10 settings where one exists.

- ``badnets``: a solid square patch (default 3x3, white) pasted at the bottom-right corner
  (Gu et al. 2017).
- ``blended``: ``(1 - alpha) * x + alpha * pattern`` with a fixed pattern (default: uniform
  noise from a fixed seed, alpha 0.2) (Chen et al. 2017).
- ``sig``: a horizontal sinusoid added to every row, ``x + delta * sin(2 pi j f / W)``, clipped
  to [0, 1] (Barni et al. 2019: delta 20/255, f 6). Used here as a poison-label trigger like the
  others (the original is clean-label).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ATTACKS = ("badnets", "blended", "sig")


def badnets(x: torch.Tensor, *, size: int = 3, value: float = 1.0, margin: int = 0) -> torch.Tensor:
    """Paste a ``size`` x ``size`` square of ``value`` in every channel, ``margin`` px from the
    bottom-right corner."""
    out = x.clone()
    h, w = x.shape[-2:]
    top, left = h - margin - size, w - margin - size
    out[..., top : top + size, left : left + size] = value
    return out


def blend_pattern(shape: tuple[int, int, int], seed: int = 1234) -> torch.Tensor:
    """The fixed blending pattern: uniform noise [3, H, W] from its own generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen)


def blended(
    x: torch.Tensor, *, alpha: float = 0.2, pattern: torch.Tensor | None = None
) -> torch.Tensor:
    """Alpha-blend the fixed pattern into every image."""
    if pattern is None:
        pattern = blend_pattern(tuple(x.shape[-3:]))
    return (1.0 - alpha) * x + alpha * pattern.to(x.dtype)


def sig(x: torch.Tensor, *, delta: float = 20 / 255, frequency: float = 6.0) -> torch.Tensor:
    """Add a horizontal sinusoidal signal (the same for every row and channel), then clip."""
    w = x.shape[-1]
    cols = torch.arange(w, dtype=x.dtype)
    signal = delta * torch.sin(2 * math.pi * cols * frequency / w)
    return (x + signal).clamp(0.0, 1.0)


def get_trigger(name: str, **params) -> Callable[[torch.Tensor], torch.Tensor]:
    """The trigger function ``x -> x_triggered`` for an attack name and its parameters."""
    funcs = {"badnets": badnets, "blended": blended, "sig": sig}
    if name not in funcs:
        from dam_mergekit.errors import DamError

        raise DamError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    func = funcs[name]

    def apply(x: torch.Tensor) -> torch.Tensor:
        return func(x, **params)

    return apply


def default_params(name: str) -> dict:
    """The parameters a zoo records for each attack (so the manifest says exactly what was used)."""
    return {
        "badnets": {"size": 3, "value": 1.0, "margin": 0},
        "blended": {"alpha": 0.2},
        "sig": {"delta": round(20 / 255, 6), "frequency": 6.0},
    }[name]
