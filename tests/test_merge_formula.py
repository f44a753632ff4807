"""The one merge formula: exact task arithmetic with full masks, base with empty masks."""

import pytest
import torch
from mergekit.merge_methods import get, merge_tensors

from dam_mergekit.merge import merge_tensor


def _tensors(seed=0, shape=(7, 5), n=3):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_ones_masks_equal_task_arithmetic_bitwise(lam):
    base, experts = _tensors()
    weights = [0.5, 0.25, 0.8]
    ta = merge_tensors(
        [base, *experts],
        get("task_arithmetic"),
        base_index=0,
        parameters={"weight": {i + 1: w for i, w in enumerate(weights)}, "lambda": lam},
    )
    ones = torch.ones_like(base)
    ours = merge_tensor(
        base, experts, weights, lam=lam, m1=ones, m2=[ones] * 3, coefficients=torch.ones(3)
    )
    assert torch.equal(ours, ta)
    assert torch.equal(merge_tensor(base, experts, weights, lam=lam), ta)


def test_zero_mask_gives_base_and_masks_broadcast():
    base, experts = _tensors()
    out = merge_tensor(base, experts, [1, 1, 1], m1=torch.zeros(()))
    assert torch.equal(out, base)
    rows = torch.tensor([[1.0], [0], [1], [0], [1], [0], [1]])
    out = merge_tensor(base, experts, [1, 1, 1], m1=rows)
    assert torch.equal(out[1], base[1]) and not torch.equal(out[0], base[0])


def test_per_expert_mask_and_coefficient_remove_one_expert():
    base, experts = _tensors()
    full = torch.ones_like(base)
    without_b = merge_tensor(base, experts, [1, 1, 1], m2=[full, torch.zeros_like(base), full])
    by_coef = merge_tensor(base, experts, [1, 1, 1], coefficients=torch.tensor([1.0, 0.0, 1.0]))
    only_ac = merge_tensor(base, [experts[0], experts[2]], [1, 1])
    torch.testing.assert_close(without_b, only_ac)
    torch.testing.assert_close(by_coef, only_ac)


def test_gradients_reach_masks_and_coefficients():
    base, experts = _tensors()
    m1 = torch.full(base.shape, 0.5, requires_grad=True)
    coef = torch.ones(3, requires_grad=True)
    merge_tensor(base, experts, [1, 1, 1], m1=m1, coefficients=coef).pow(2).sum().backward()
    assert m1.grad is not None and m1.grad.abs().sum() > 0
    assert coef.grad is not None and coef.grad.abs().sum() > 0


def test_wrong_counts_are_refused():
    base, experts = _tensors()
    with pytest.raises(ValueError, match="3 per-model values"):
        merge_tensor(base, experts, [1, 1])
    with pytest.raises(ValueError, match="2 backdoor masks for 3 experts"):
        merge_tensor(base, experts, [1, 1, 1], m2=[None, None])


def test_kernel_path_leaves_its_inputs_alone_and_matches_the_differentiable_one():
    """mergekit's call (no gradient) scales one buffer in place; the trainer's keeps a graph."""
    base, experts = _tensors(seed=1)
    kept = [base.clone(), *(e.clone() for e in experts)]
    m1 = (torch.rand(base.shape[0], 1) > 0.3).float()
    m2 = [(torch.rand(base.shape) > 0.5).float() for _ in experts]
    coefficients = torch.tensor([0.2, 0.7, 0.4])
    args = dict(lam=0.3, m1=m1, m2=m2, coefficients=coefficients)
    plain = merge_tensor(base, experts, [0.5, 1.0, 0.8], **args)
    assert all(torch.equal(a, b) for a, b in zip(kept, [base, *experts], strict=True))
    learned = coefficients.clone().requires_grad_()
    graphed = merge_tensor(base, experts, [0.5, 1.0, 0.8], **{**args, "coefficients": learned})
    assert graphed.requires_grad and not plain.requires_grad
    assert torch.equal(plain, graphed.detach())
    graphed.sum().backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0
