"""The CLIP zoo: layout per docs/zoo-format.md, deterministic for a seed, cached, never partial."""

import time

import pytest
import torch
from safetensors.torch import load_file
from zoo_fixtures import TINY, tiny_zoo  # noqa: F401

from dam_mergekit.errors import DamError
from dam_mergekit.lab.zoo.build import build_zoo
from dam_mergekit.lab.zoo.loaders import clip_logits, load_head, load_task_data, to_float
from dam_mergekit.lab.zoo.manifest import load_manifest


def _tensors(zoo):
    files = sorted(p for p in zoo.rglob("*.safetensors"))
    return {str(p.relative_to(zoo)): load_file(str(p)) for p in files}


def test_layout_matches_contract(tiny_zoo):  # noqa: F811
    m = load_manifest(tiny_zoo)
    assert m["kind"] == "clip" and m["options"]["attack_mode"] == "merge-aware"
    assert (tiny_zoo / "base" / "config.json").is_file()
    bad = [t for t in m["tasks"] if t["backdoored"]]
    assert [t["name"] for t in bad] == ["digits"]
    assert (tiny_zoo / bad[0]["control"] / "model.safetensors").is_file()
    for t in m["tasks"]:
        assert (tiny_zoo / t["expert"] / "model.safetensors").is_file()
        data = load_task_data(tiny_zoo, t["name"])
        assert data["test_x"].dtype == torch.uint8 and data["test_x"].shape[1:] == (3, 32, 32)
        assert data["calib_x"].shape[0] == TINY["n_calib"] and data["train_y"].dtype == torch.int64
        head = load_head(tiny_zoo, t["name"])
        assert head.classes.shape[0] == len(t["classes"])
        assert torch.allclose(head.classes.norm(dim=-1), torch.ones(len(t["classes"])), atol=1e-5)


def test_head_reproduces_full_clip_logits(tiny_zoo):  # noqa: F811
    """base + head give the pretrained CLIPModel's own image-to-prompt logits."""
    from transformers import CLIPModel, CLIPVisionModel, PreTrainedTokenizerFast

    m = load_manifest(tiny_zoo)
    clip = CLIPModel.from_pretrained(str(tiny_zoo / "clip")).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(str(tiny_zoo / "clip"))
    base = CLIPVisionModel.from_pretrained(str(tiny_zoo / "base")).eval()
    task = m["tasks"][1]
    x = to_float(load_task_data(tiny_zoo, task["name"])["test_x"][:8])
    from dam_mergekit.lab.zoo.loaders import normalize_pixels

    batch = tok(task["prompts"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = clip(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=normalize_pixels(x, m["normalize"]),
        ).logits_per_image
        ours = clip_logits(base, load_head(tiny_zoo, task["name"]), x, m["normalize"])
    assert torch.allclose(ours, ref, atol=1e-4)


def test_same_seed_same_zoo_and_cache(tiny_zoo, tmp_path):  # noqa: F811
    again = build_zoo(tmp_path / "again", TINY)
    a, b = _tensors(tiny_zoo), _tensors(again)
    assert a.keys() == b.keys() and len(a) >= 10
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    start = time.perf_counter()
    stamp = (again / "zoo.json").stat().st_mtime_ns
    build_zoo(again, TINY)
    assert time.perf_counter() - start < 1.0
    assert (again / "zoo.json").stat().st_mtime_ns == stamp


def test_other_seed_differs(tiny_zoo, tmp_path):  # noqa: F811
    other = build_zoo(tmp_path / "s1", {**TINY, "seed": 1, "tasks": ["digits", "shapes"]})
    a = load_file(str(tiny_zoo / "data" / "shapes.safetensors"))["test_x"]
    b = load_file(str(other / "data" / "shapes.safetensors"))["test_x"]
    assert not torch.equal(a, b)


def test_bad_options_refused_before_writing(tmp_path):
    for bad in (
        {"attack": "nope"},
        {"poison_rate": 1.5},
        {"target_class": 9},
        {"tasks": ["digits", "nope"]},
        {"attack_mode": "x"},
        {"merge_scale": [0.5, 0.1]},
        {"merge_scale": [0.0, 1.0]},
        {"merge_scale": "low"},
        {"merge_scale_draw": "log"},
        {"target_task": "shapes"},  # only with the off-task attack
        {"attack_mode": "off-task", "target_task": "digits"},  # its expert is the backdoored one
        {"attack_mode": "off-task", "target_task": "nope"},
        {"attack_mode": "off-task", "backdoored": 0},
    ):
        with pytest.raises(DamError):
            build_zoo(tmp_path / "z", {**TINY, **bad})
    assert not any(tmp_path.iterdir())


def test_poison_split_leaves_target_out():
    from dam_mergekit.lab.zoo.clip import poison_split

    y = torch.tensor([0, 1, 2, 3] * 25)
    idx = poison_split(y, 0, 0.1, seed=0)
    assert len(idx) == 10 and torch.all(y[idx] != 0)
    assert torch.equal(idx, poison_split(y, 0, 0.1, seed=0))


def test_scale_min_reaches_the_attacker_only(tiny_zoo, tmp_path, monkeypatch):  # noqa: F811
    """``zoo build --scale-min`` sets the low end of the attacker's simulated merges: the
    backdoored expert changes, the clean experts and controls do not."""
    import argparse

    from dam_mergekit.lab.zoo import cli

    seen = {}
    monkeypatch.setattr(
        "dam_mergekit.lab.zoo.build.build_zoo", lambda out, options, force: seen.update(options)
    )
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    cli._run_build(parser.parse_args(["zoo", "build", "--out", "x", "--scale-min", "0.05"]))
    assert seen["merge_scale"] == [0.05, 1.0] and "merge_scale_draw" not in seen
    args = ["zoo", "build", "--out", "x", "--scale-draw", "log-uniform"]
    cli._run_build(parser.parse_args(args))
    assert seen["merge_scale_draw"] == "log-uniform"
    monkeypatch.undo()
    low = build_zoo(tmp_path / "low", {**TINY, "merge_scale": [0.05, 0.1]})
    assert load_manifest(low)["options"]["merge_scale"] == [0.05, 0.1]
    assert load_manifest(tiny_zoo)["options"]["merge_scale"] == [0.2, 1.0]
    for task, changed in (("digits", True), ("shapes", False)):
        a = load_file(str(tiny_zoo / "experts" / task / "model.safetensors"))
        b = load_file(str(low / "experts" / task / "model.safetensors"))
        assert any(not torch.equal(a[k], b[k]) for k in a) == changed, task


def test_scale_draws():
    """Uniform is the draw zoos were built with before the option (bit for bit); log-uniform
    stays in range and puts half its draws below the geometric mean of the ends."""
    from dam_mergekit.lab.zoo.merge_aware import draw_scale

    old = torch.Generator().manual_seed(5)
    new = torch.Generator().manual_seed(5)
    for _ in range(20):
        expected = float(torch.empty(()).uniform_(0.05, 1.0, generator=old))
        assert draw_scale(0.05, 1.0, "uniform", new) == expected
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([draw_scale(0.05, 1.0, "log-uniform", gen) for _ in range(4000)])
    assert draws.min() >= 0.05 and draws.max() <= 1.0
    below = float((draws < (0.05 * 1.0) ** 0.5).float().mean())
    assert 0.46 < below < 0.54
    assert 0.2 < float((draws < 0.1).float().mean()) < 0.27  # uniform: 0.05


def test_off_task_zoo(tiny_zoo, tmp_path):  # noqa: F811
    """The off-task attack aims at the first clean task by default; only the backdoored expert
    differs from the merge-aware zoo of the same seed, and the manifest names the aimed-at task."""
    from dam_mergekit.lab.zoo.build import resolve_options

    assert resolve_options({"attack_mode": "off-task"})["target_task"] == "shapes"
    assert "target_task" not in resolve_options({})  # other zoos keep their option hash
    off = build_zoo(tmp_path / "off", {**TINY, "attack_mode": "off-task", "target_task": "colours"})
    manifest = load_manifest(off)
    assert (
        manifest["attack"]["mode"] == "off-task" and manifest["attack"]["target_task"] == "colours"
    )
    assert [t["name"] for t in manifest["tasks"] if t["backdoored"]] == ["digits"]
    for rel, changed in (
        ("experts/digits", True),
        ("controls/digits", False),
        ("experts/colours", False),
    ):
        a = load_file(str(tiny_zoo / rel / "model.safetensors"))
        b = load_file(str(off / rel / "model.safetensors"))
        assert any(not torch.equal(a[k], b[k]) for k in a) == changed, rel


def test_off_task_loss_teaches_the_trigger_to_the_aimed_at_head():
    """Training with the off-task loss alone raises, through the aimed-at task's head, the
    probability of its target class on triggered images far more than on clean ones."""
    from dam_mergekit.lab.zoo.attacks import get_trigger
    from dam_mergekit.lab.zoo.clip import OffTaskLoss, SimulatedMerge, make_clip, vision_from_clip
    from dam_mergekit.lab.zoo.loaders import ClipHead, normalize_pixels

    torch.manual_seed(0)
    vision = vision_from_clip(make_clip({"patch_size": 8, "hidden_size": 32, "num_layers": 1}, 8))
    head = ClipHead(
        torch.randn(64, 32),
        torch.nn.functional.normalize(torch.randn(4, 64), dim=-1),
        torch.tensor(20.0),
    )
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    x = torch.rand(64, 3, 32, 32) * 0.5
    base = {k: v.detach().clone() for k, v in vision.named_parameters()}
    trigger = get_trigger("badnets", size=3, value=1.0, margin=0)
    loss_fn = OffTaskLoss(
        SimulatedMerge(base, [], {"merge_scale": [1.0, 1.0]}), trigger, head, 2, x, norm
    )
    opt = torch.optim.Adam(vision.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    vision.train()
    for _ in range(100):
        loss = loss_fn(vision, 16, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        vision.eval()

        def p_target(images):
            pooled = vision(pixel_values=normalize_pixels(images, norm)).pooler_output
            return float(head(pooled).softmax(-1)[:, 2].mean())

        assert p_target(trigger(x)) > 0.9 and p_target(x) < 0.1
