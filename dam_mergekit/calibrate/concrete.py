"""Relaxed-Bernoulli (binary Concrete) masks: logits, samples, mean rescaling, final extraction.

One logit tensor per merged tensor for M1 (shared by all experts) and one per expert for M2. The
logit shape depends on the granularity:

- ``element``: the tensor's own shape (one keep decision per value);
- ``row``: ``[rows, 1, ...]`` (one per output row; a 1-D tensor is one per value);
- ``tensor``: ``[]`` (one per tensor).

A training sample is ``sigmoid((s + log u - log(1 - u)) / T)`` with ``u ~ U(0, 1)``; it is
differentiable in ``s`` (reparameterised). The released code divides each tensor's mask by its mean
so that the masked task vector keeps its overall size; here that factor ``1 / mean(M1 * M2_i)`` is
applied to expert ``i``'s coefficient instead of the mask, which is the same product in the merge
formula and keeps every mask in [0, 1]. For ``tensor`` granularity the rescaling would cancel the
mask (``m / mean(m) = 1``), so it is not applied there.

Final extraction (``dam`` mode): a value is kept when its keep probability ``sigmoid(s) >= 0.5``
(``s >= 0``), for M1 and each M2 separately; the written masks are binary, and the mean rescaling
is folded into the written coefficients: ``c_i * numel / sum(M1 * M2_i)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def logit_shape(shape: Sequence[int], granularity: str) -> tuple[int, ...]:
    """Shape of the mask logits for a tensor of ``shape`` (broadcasts to it)."""
    shape = tuple(int(s) for s in shape)
    if granularity == "element":
        return shape
    if granularity == "row":
        if len(shape) == 0:
            return ()
        return (shape[0],) + (1,) * (len(shape) - 1)
    if granularity == "tensor":
        return ()
    raise ValueError(f"unknown granularity {granularity!r}")


def init_logits(
    shape: Sequence[int],
    granularity: str,
    value: float,
    *,
    experts: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits filled with ``value``; with ``experts > 0`` one slice per expert (M2)."""
    base = logit_shape(shape, granularity)
    full = (experts,) + base if experts else base
    return torch.full(full, float(value), dtype=torch.float32, device=device)


def sample(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A relaxed-Bernoulli sample in (0, 1), differentiable in ``logits``."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def keep_probability(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits)


def binarize(logits: torch.Tensor) -> torch.Tensor:
    """The extraction rule: keep where ``sigmoid(logit) >= 0.5`` (bool, logit shape)."""
    return logits >= 0


def rescaling_applies(rescale: bool, granularity: str) -> bool:
    """Whether the mean rescaling is on: ``rescale`` set, and never for whole-tensor masks."""
    return bool(rescale) and granularity != "tensor"


def rescale_factors(
    m1: torch.Tensor | None, m2: Sequence[torch.Tensor | None], *, enabled: bool, eps: float = 1e-6
) -> torch.Tensor:
    """``1 / mean(M1 * M2_i)`` per expert (ones when disabled or for scalar masks).

    The mean over the logit-shaped product equals the mean over the full tensor, because
    broadcasting repeats every value the same number of times.
    """
    n = len(m2)
    ref = m1 if m1 is not None else next((m for m in m2 if m is not None), None)
    if not enabled or ref is None:
        device = ref.device if ref is not None else "cpu"
        return torch.ones(n, device=device)
    out = []
    for m in m2:
        keep = m1 if m is None else (m if m1 is None else m1 * m)
        if keep is None or keep.dim() == 0:
            out.append(torch.ones((), device=ref.device))
        else:
            out.append(1.0 / keep.float().mean().clamp_min(eps))
    return torch.stack(out)


def unfold_rescaling(
    coefficients: torch.Tensor,
    m1: torch.Tensor | None,
    m2: Sequence[torch.Tensor | None],
    *,
    enabled: bool,
) -> torch.Tensor:
    """The learned coefficients behind written ones (which have :func:`rescale_factors` folded in).

    The same factors from the same binary masks, so this inverts the folding up to float rounding.
    """
    return coefficients / rescale_factors(m1, m2, enabled=enabled).to(coefficients)


def kept_fraction(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else 1.0


def numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)
