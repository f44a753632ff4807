"""THE merge formula, written once.

    theta = theta0 + lambda * sum_i w_i * c_i * (M1 * M2_i * tau_i),   tau_i = theta_i - theta0

The mergekit kernel calls it on one tensor; the calibration trainer calls it on differentiable
tensors. Sharing this function is what makes "the model calibration saw is the model mergekit
writes" true by construction.

The order of operations follows mergekit's ``task_arithmetic`` exactly (delta, times weight, sum over
models, times lambda, plus base), so that all-ones masks with unit coefficients reproduce it bit for
bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_tensor(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    *,
    lam: float | torch.Tensor = 1.0,
    m1: torch.Tensor | None = None,
    m2: Sequence[torch.Tensor | None] | None = None,
    coefficients: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one tensor from its base and expert versions.

    ``m1`` and each ``m2[i]`` broadcast against the tensor (element, row or tensor granularity);
    ``None`` means "keep everything". ``weights`` are the recipe's per-model weights, and
    ``coefficients`` the learned per-model scalars (default 1). Gradients flow to every tensor
    argument, so the trainer can pass mask samples and coefficients that require grad.
    """
    if len(experts) == 0:
        return base
    if _needs_grad(base, *experts, weights, lam, m1, *(m2 or ()), coefficients):
        deltas = torch.stack([e - base for e in experts])
        in_place = False
    else:  # mergekit's kernel: one buffer, filled and scaled in place, as task_arithmetic does
        deltas = base.new_empty((len(experts), *base.shape))
        for index, expert in enumerate(experts):
            deltas[index] = expert - base
        in_place = True
    return merge_deltas(
        base, deltas, weights, lam=lam, m1=m1, m2=m2, coefficients=coefficients, _in_place=in_place
    )


def merge_deltas(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    *,
    lam: float | torch.Tensor = 1.0,
    m1: torch.Tensor | None = None,
    m2: Sequence[torch.Tensor | None] | None = None,
    coefficients: Sequence[float] | torch.Tensor | None = None,
    lean: bool = False,
    _in_place: bool = False,
) -> torch.Tensor:
    """:func:`merge_tensor` from the stacked task vectors ``[n, ...]`` (``theta_i - theta0``).

    The calibration keeps task vectors rather than experts, possibly in a narrower dtype than
    the base; they are cast to the base's dtype here, per use. ``lean`` gives the same values
    with a backward that keeps no task-vector-sized intermediate (:class:`_LeanMaskedSum`).
    ``_in_place`` (for :func:`merge_tensor`'s own buffer, with no gradient) overwrites ``deltas``.
    """
    n = deltas.shape[0]
    keep = _keep_masks(m1, m2, n, base.dim())
    scale = _per_model(weights, n, base)
    if coefficients is not None:
        scale = _per_model(coefficients, n, base) * scale
    while scale.dim() < deltas.dim():
        scale = scale.unsqueeze(-1)
    if lean:
        mixed = _LeanMaskedSum.apply(deltas, keep, scale, base)
    else:
        mixed = _masked_sum(deltas, keep, scale, base, in_place=_in_place)
    if not (isinstance(lam, (int, float)) and lam == 1):
        mixed = mixed.mul_(lam) if _in_place else mixed * lam
    return (base + mixed).to(base.dtype)


def _masked_sum(deltas, keep, scale, base, *, in_place: bool = False) -> torch.Tensor:
    """``sum_i keep_i * scale_i * delta_i``, in the order task arithmetic sums."""
    deltas = deltas.to(device=base.device, dtype=base.dtype)
    if in_place:  # no [n, ...] temporaries: the merge of a large tensor stays at one buffer
        if keep is not None:
            deltas.mul_(keep)
        return deltas.mul_(scale).sum(dim=0)
    if keep is not None:
        deltas = deltas * keep
    return (deltas * scale).sum(dim=0)


class _LeanMaskedSum(torch.autograd.Function):
    """:func:`_masked_sum` whose backward recomputes each expert's product from the stored task
    vectors instead of saving ``[n, ...]`` float32 copies: at LLM scale those copies of the
    largest tensor (an embedding) are larger than everything else the backward needs."""

    @staticmethod
    def forward(ctx, deltas, keep, scale, base):
        ctx.save_for_backward(deltas, keep, scale)
        ctx.has_keep = keep is not None
        ctx.like = (base.device, base.dtype)
        with torch.no_grad():
            return _masked_sum(deltas, keep, scale, base)

    @staticmethod
    def backward(ctx, grad):
        deltas, keep, scale = ctx.saved_tensors
        grad_keep = grad_scale = None
        want_keep = ctx.has_keep and ctx.needs_input_grad[1]
        if want_keep:
            grad_keep = torch.empty_like(keep)
        if ctx.needs_input_grad[2]:
            grad_scale = torch.empty_like(scale)
        for i in range(deltas.shape[0]):
            product = grad * deltas[i].to(*ctx.like)
            if want_keep:
                grad_keep[i] = _sum_to(product * scale[i], keep.shape[1:])
            if grad_scale is not None:
                masked = product if keep is None else product * keep[i]
                grad_scale[i] = _sum_to(masked, scale.shape[1:])
        return None, grad_keep, grad_scale, None


def _needs_grad(*values) -> bool:
    """Whether autograd must see the merge (the trainer), rather than mergekit's plain kernel."""
    return torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in values
    )


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` summed down to a broadcastable ``shape`` (the reverse of broadcasting)."""
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [
        lead + k for k, s in enumerate(shape) if s == 1 and t.shape[lead + k] != 1
    ]
    return t.sum(dim=dims, keepdim=True).reshape(shape) if dims else t.reshape(shape)


def _keep_masks(
    m1: torch.Tensor | None, m2: Sequence[torch.Tensor | None] | None, n: int, dim: int
) -> torch.Tensor | None:
    """Combine M1 and the per-model M2 into one ``[n, ...]`` factor (None when nothing is masked)."""
    if m2 is not None and len(m2) != n:
        raise ValueError(f"got {len(m2)} backdoor masks for {n} experts")
    per_model = [m for m in (m2 or [None] * n)]
    if m1 is None and all(m is None for m in per_model):
        return None
    rows = []
    for m in per_model:
        if m is None:
            rows.append(m1 if m1 is not None else None)
        else:
            rows.append(m if m1 is None else m1 * m)
    ref = next(r for r in rows if r is not None)
    rows = [r if r is not None else torch.ones_like(ref) for r in rows]
    shape = torch.broadcast_shapes(*(r.shape for r in rows))
    shape = (1,) * (dim - len(shape)) + tuple(shape)  # align trailing dims, as broadcasting does
    return torch.stack([r.expand(shape) for r in rows])


def _per_model(values: Sequence[float] | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        out = values.to(device=like.device, dtype=like.dtype)
    else:
        out = torch.tensor(list(values), dtype=like.dtype, device=like.device)
    if out.shape != (n,):
        raise ValueError(f"expected {n} per-model values, got shape {tuple(out.shape)}")
    return out
