"""The Merge-Hijacking-style release (lab/zoo/release.py): what the attacker publishes."""

import pytest
import torch
from safetensors.torch import load_file
from zoo_fixtures import TINY, tiny_zoo  # noqa: F401

from dam_mergekit.errors import DamError
from dam_mergekit.lab.zoo.release import check_release_options, hijacked


def test_hijacked_keeps_the_largest_share_of_the_backdoor_and_scales_it():
    control = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([0.0, 0.0])}
    expert = {"w": torch.tensor([1.5, 0.9, 4.0, 1.0]), "b": torch.tensor([0.1, -0.3])}
    out = hijacked(expert, control, density=0.5, rescale=3.0)
    # w: the two largest changes (+3.0 and +0.5) kept and tripled, the others dropped
    assert torch.allclose(out["w"], torch.tensor([2.5, 1.0, 10.0, 1.0]))
    assert torch.allclose(out["b"], torch.tensor([0.0, -0.9]))  # one entry of two is kept
    same = hijacked(expert, control, density=1.0, rescale=1.0)
    assert all(torch.allclose(same[k], expert[k]) for k in expert)


def test_release_options_checked():
    for bad in (
        {"release_density": 0.1},
        {"release_rescale": 2.0},
        {"release_density": 0.0, "release_rescale": 2.0},
        {"release_density": 1.5, "release_rescale": 2.0},
        {"release_density": 0.1, "release_rescale": -1.0},
        {"release_density": "x", "release_rescale": 2.0},
    ):
        with pytest.raises(DamError):
            check_release_options(dict(bad))
    options = {"release_density": "0.1", "release_rescale": 3}
    check_release_options(options)
    assert options == {"release_density": 0.1, "release_rescale": 3.0}
    untouched: dict = {}
    check_release_options(untouched)
    assert untouched == {}


def test_clip_zoo_releases_the_hijacked_expert(tiny_zoo, tmp_path):  # noqa: F811
    """The released digits expert is its control plus 3x the top 10 % of what the backdoor added
    (the same zoo without the option holds the expert as trained); nothing else changes."""
    from dam_mergekit.lab.zoo.build import build_zoo

    zoo = build_zoo(tmp_path / "hijack", {**TINY, "release_density": 0.1, "release_rescale": 3})

    def weights(z, rel):
        return load_file(str(z / rel / "model.safetensors"))

    trained, control = weights(tiny_zoo, "experts/digits"), weights(tiny_zoo, "controls/digits")
    expected = hijacked(trained, control, 0.1, 3.0)
    released = weights(zoo, "experts/digits")
    assert all(torch.allclose(released[k], expected[k], atol=1e-6) for k in released)
    for rel in ("controls/digits", "experts/shapes"):
        a, b = weights(tiny_zoo, rel), weights(zoo, rel)
        assert all(torch.equal(a[k], b[k]) for k in a), rel


def test_llm_zoo_takes_the_options_without_defaults():
    from dam_mergekit.lab.zoo import llm

    plain = llm.resolve_options({})
    assert "merge_scale_draw" not in plain and "release_density" not in plain
    full = llm.resolve_options(
        {"merge_scale_draw": "log-uniform", "release_density": 0.2, "release_rescale": 2}
    )
    assert full["merge_scale_draw"] == "log-uniform" and full["release_rescale"] == 2.0
    with pytest.raises(DamError, match="go together"):
        llm.resolve_options({"release_density": 0.2})
