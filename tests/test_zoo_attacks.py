"""Triggers are placed and blended exactly as documented, and never modify their input."""

import math

import torch

from dam_mergekit.lab.zoo.attacks import badnets, blend_pattern, blended, get_trigger, sig


def _batch():
    return torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_badnets_pastes_square_at_bottom_right_only():
    x = _batch()
    before = x.clone()
    out = badnets(x, size=3, value=1.0)
    assert torch.equal(x, before)
    assert torch.all(out[..., 29:32, 29:32] == 1.0)
    changed = (out != x).any(dim=(0, 1))
    assert not changed[:29, :].any() and not changed[:, :29].any()


def test_badnets_margin_and_value():
    x = torch.zeros(2, 3, 32, 32)
    out = badnets(x, size=4, value=0.5, margin=2)
    assert torch.all(out[..., 26:30, 26:30] == 0.5)
    assert out.sum() == 0.5 * 2 * 3 * 16


def test_blended_is_alpha_mix_with_fixed_pattern():
    x = _batch()
    pattern = blend_pattern((3, 32, 32))
    assert torch.equal(pattern, blend_pattern((3, 32, 32)))  # fixed
    out = blended(x, alpha=0.2)
    assert torch.allclose(out, 0.8 * x + 0.2 * pattern)
    assert torch.allclose(blended(x, alpha=0.0), x)


def test_sig_adds_horizontal_sinusoid_then_clips():
    x = torch.full((1, 3, 32, 32), 0.5)
    out = sig(x, delta=0.1, frequency=6.0)
    for j in (0, 3, 17):
        expected = 0.5 + 0.1 * math.sin(2 * math.pi * j * 6 / 32)
        assert torch.allclose(out[..., :, j], torch.tensor(expected), atol=1e-6)
    assert torch.all(sig(torch.ones(1, 3, 4, 4), delta=0.5) <= 1.0)


def test_get_trigger_passes_params():
    x = _batch()
    assert torch.equal(get_trigger("badnets", size=4)(x), badnets(x, size=4))
