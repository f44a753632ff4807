"""Every recipe in recipes/ checked offline, the config-only estimator, and ``zoo import-clip``.

Recipes name local model directories (or hub ids) that a test machine does not have. Each one is
dry-run against stand-ins holding only a ``config.json`` copied from the real model's public
hyperparameters (tests/fixtures/); hub ids are resolved only when a user runs a recipe. The
paper-scale CLIP recipe is also run end to end, scaled down, on tiny transformers-4 checkpoints:
download layout -> ``convert hf4-vision`` -> ``zoo import-clip`` -> calibrate -> merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _hf4_fixtures import rewrite_as_hf4
from safetensors.torch import load_file

from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.calibrate.estimate import (
    estimate_recipe,
    peak_memory_bytes,
    shapes_from_config,
    step_activation_bytes,
)
from dam_mergekit.cli import main
from dam_mergekit.errors import DamError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
CLIP_CONFIG = FIXTURES / "clip-vit-base-patch32" / "config.json"
LLAMA_CONFIG = FIXTURES / "llama-3-8b" / "config.json"
FB_TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")


def _yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yml") if "merge_method" in _yaml(p))
CALIBRATIONS = sorted(p for p in (ROOT / "recipes").glob("*.yml") if p not in RECIPES)


def test_recipes_found_and_every_calibration_file_used():
    assert len(RECIPES) >= 4 and CALIBRATIONS
    used = {Path(_yaml(r)["parameters"]["calibration"]).name for r in RECIPES}
    assert {c.name for c in CALIBRATIONS} <= used


def _stand_in_config(adapter: str, out: Path) -> None:
    """A model directory holding only the config of the family the adapter calibrates."""
    out.mkdir(parents=True, exist_ok=True)
    if adapter == "clip":  # the converted vision tower, as `convert hf4-vision` writes it
        from dam_mergekit.convert.hf4 import target_config

        _, vision, _ = target_config(CLIP_CONFIG.parent)
        vision.to_json_file(str(out / "config.json"))
    else:
        (out / "config.json").write_text(LLAMA_CONFIG.read_text())


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_dry_run(recipe: Path, tmp_path: Path, monkeypatch):
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from dam_mergekit.method import register_methods
    from dam_mergekit.recipe.load import dam_settings, is_dam, load_recipe, mask_path_for

    monkeypatch.chdir(ROOT)
    raw = _yaml(recipe)
    config = load_recipe(recipe)  # mergekit's MergeConfiguration accepts it
    assert is_dam(config)
    settings = dam_settings(config)
    assert settings.calibration and Path(settings.calibration).is_file()
    mask_path_for(settings.masks, settings.calibration)
    register_methods()
    from mergekit.merge_methods import get

    get(config.merge_method)  # the method and its parameters exist
    assert config.tokenizer_source is None

    cal_raw = _yaml(Path(settings.calibration))
    torch.device(cal_raw.get("device", "cpu"))  # a valid device string, even if absent here
    data = str(cal_raw["data"])
    if not Path(data).exists():
        data = str(tmp_path / "data")
        Path(data).mkdir()
    device = cal_raw.get("device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    cal = CalibrationConfig.from_dict(
        {**cal_raw, "data": data, "device": device}, where=settings.calibration
    )

    # models: real local directories stay, missing ones (and hub ids) become config-only stand-ins
    swapped, refs = {}, [raw["base_model"]] + [m["model"] for m in raw["models"]]
    for i, ref in enumerate(refs):
        if not (Path(ref) / "config.json").is_file():
            swapped[ref] = str(tmp_path / "models" / f"m{i}")
            _stand_in_config(cal.adapter, Path(swapped[ref]))
    local = dict(raw)
    local["base_model"] = swapped.get(raw["base_model"], raw["base_model"])
    local["models"] = [{**m, "model": swapped.get(m["model"], m["model"])} for m in raw["models"]]
    local["parameters"] = {**raw["parameters"], "calibration": str(tmp_path / "cal.yml")}
    (tmp_path / "cal.yml").write_text(yaml.safe_dump({**cal_raw, "data": data}))
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(local))
    merge_config = MergeConfiguration.model_validate(local)
    if cal.adapter == "causal_lm":  # a JSON architecture: mergekit resolves it from configs alone
        arch = get_architecture_info(merge_config, MergeOptions())
        assert arch is not None
    est = estimate_recipe(tmp_path / "recipe.yml")
    assert est.experts == len(raw["models"]) and est.peak_memory_bytes > est.weights_bytes


def test_estimates_of_the_paper_scale_recipes(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    clip = estimate_recipe("recipes/dam-clip-vit-b32-8tasks.yml", config=CLIP_CONFIG)
    assert (clip.architecture, clip.parameters, clip.experts, clip.tasks) == (
        "CLIPVisionModel",
        87_456_000,
        8,
        8,
    )
    llama = estimate_recipe("recipes/dam-llama.yml", config=LLAMA_CONFIG)
    assert (llama.architecture, llama.parameters, llama.granularity) == (
        "LlamaForCausalLM",
        8_030_261_248,
        "row",
    )
    # the recipe's comment: memory streamed fits one 80 GB GPU; its weights alone are 59.8 GiB
    assert llama.memory == "streamed" and llama.weights_bytes < llama.peak_memory_bytes < 80 * 2**30
    assert clip.memory == "whole" and clip.peak_memory_bytes < 20 * 2**30  # one 24 GB GPU
    args = ["estimate", "recipes/dam-llama.yml", "--config", str(LLAMA_CONFIG)]
    assert main(args) == 0
    assert "estimated peak memory" in capsys.readouterr().out
    assert main(["estimate", "recipes/dam-llama.yml"]) == 2  # no local config: one line
    err = capsys.readouterr().err
    assert "pass --config" in err and err.count("\n") == 1


def test_estimate_formula_is_the_trainers(tmp_path):
    """The config-only estimate and Calibrator.estimate_memory give the same bytes."""
    from _calib_fixtures import write_clip_zoo, write_recipe

    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    zoo = write_clip_zoo(tmp_path)
    path = write_recipe(tmp_path, zoo, {"granularity": "row", "batch_size": 4})
    plan = plan_recipe(load_recipe(path))
    cal = CalibrationConfig.load(tmp_path / "dam-calibration.yml")
    trainer = Calibrator(plan, cal, progress=False)
    _, shapes = shapes_from_config(zoo / "base")
    assert shapes == plan.shapes()
    acts = step_activation_bytes(zoo / "base", "clip", 4)
    assert acts.training > acts.graph > 0 and acts.forward > 0
    expected = peak_memory_bytes(
        shapes.values(),
        experts=2,
        granularity="row",
        dual=True,
        activation_bytes=acts.training,
        graph_bytes=acts.graph,
        forward_bytes=acts.forward,
        tasks=2,
    )
    assert trainer.estimate_memory() == expected
    assert estimate_recipe(path).peak_memory_bytes == expected


def test_streamed_and_offload_estimates_are_the_trainers(tmp_path):
    """Per layout the config-only estimate is the trainer's; offload moves the stored weights to
    host memory, and a checkpointed step keeps less than a whole one."""
    from _calib_fixtures import write_clip_zoo, write_recipe

    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    zoo = write_clip_zoo(tmp_path)
    whole = step_activation_bytes(zoo / "base", "clip", 4)
    streamed = step_activation_bytes(zoo / "base", "clip", 4, checkpointed=True)
    assert 0 < streamed.training < whole.training
    figures = {}
    for memory in ("streamed", "offload"):
        settings = {"granularity": "row", "batch_size": 4, "memory": memory}
        path = write_recipe(tmp_path, zoo, settings, name=memory)
        plan = plan_recipe(load_recipe(path))
        cal = CalibrationConfig.load(tmp_path / f"{memory}-calibration.yml")
        trainer = Calibrator(plan, cal, progress=False)
        e = estimate_recipe(path)
        assert (trainer.estimate_memory(), trainer.host_bytes) == (
            e.peak_memory_bytes,
            e.host_bytes,
        )
        figures[memory] = e
    assert figures["streamed"].host_bytes == 0
    assert figures["offload"].host_bytes == figures["offload"].weights_bytes > 0
    assert figures["offload"].peak_memory_bytes < figures["streamed"].peak_memory_bytes


# -- zoo import-clip --------------------------------------------------------------------------------


def _tiny_clip(out: Path, seed: int = 0):
    """A tiny full CLIPModel with a word-level tokenizer, saved like a hub download."""
    from transformers import CLIPConfig, CLIPModel

    from dam_mergekit.lab.zoo.clip import build_tokenizer

    torch.manual_seed(seed)
    words = "a photo of the digit car scene texture sign house zero one two three".split()
    tokenizer = build_tokenizer([" ".join(words)])
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=3,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    clip.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return clip, tokenizer


def _images(root: Path, n: int, *, seed: int) -> Path:
    """A folder of PNGs of mixed sizes and modes (RGB, grayscale)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        shape = (20 + i, 30, 3) if i % 2 else (24, 18)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_import_clip_builds_what_the_clip_adapter_reads(tmp_path):
    from dam_mergekit.calibrate.adapters.clip import ClipAdapter

    clip, tokenizer = _tiny_clip(tmp_path / "clip")
    folder = _images(tmp_path / "imgs" / "cars", 5, seed=0)
    (tmp_path / "cars.txt").write_text("car\nhouse\n\nsign\n")
    arr = np.random.default_rng(1).integers(0, 256, (7, 28, 28), dtype=np.uint8)  # MNIST-like
    np.save(tmp_path / "digits.npy", arr)
    (tmp_path / "digits.json").write_text(json.dumps(["zero", "one", "two", "three"]))
    out = tmp_path / "calib"
    args = ["zoo", "import-clip", "--clip", str(tmp_path / "clip"), "--out", str(out)]
    args += ["--task", "cars", str(folder), str(tmp_path / "cars.txt")]
    args += ["--task", "digits", str(tmp_path / "digits.npy"), str(tmp_path / "digits.json")]
    args += ["--template", "a photo of a {}.", "--template", "a photo of the {}.", "--max-images"]
    assert main(args + ["6"]) == 0

    manifest = json.loads((out / "zoo.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["cars", "digits"]
    assert manifest["tasks"][0]["classes"] == ["car", "house", "sign"]
    cars = load_file(str(out / "data" / "cars.safetensors"))
    digits = load_file(str(out / "data" / "digits.safetensors"))
    assert set(cars) == {"calib_x"}  # no labels
    assert cars["calib_x"].shape == (5, 3, 16, 16) and cars["calib_x"].dtype == torch.uint8
    assert digits["calib_x"].shape == (6, 3, 16, 16)  # a seeded subset of 6 of the 7
    head = load_file(str(out / "heads" / "digits.safetensors"))
    with torch.no_grad():
        feats = []
        for template in ("a photo of a {}.", "a photo of the {}."):
            batch = tokenizer(
                [template.format(c) for c in ["zero", "one", "two", "three"]],
                padding=True,
                return_tensors="pt",
            )
            f = clip.get_text_features(**batch)
            f = f if isinstance(f, torch.Tensor) else f.pooler_output
            feats.append(torch.nn.functional.normalize(f, dim=-1))
        want = torch.nn.functional.normalize(torch.stack(feats).mean(0), dim=-1)
    torch.testing.assert_close(head["classes"], want)
    torch.testing.assert_close(head["projection"], clip.visual_projection.weight)
    torch.testing.assert_close(head["logit_scale"], clip.logit_scale.exp())

    adapter = ClipAdapter(str(out), {}, torch.device("cpu"))
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel(clip.config.vision_config).eval()
    vision.load_state_dict(clip.vision_model.state_dict())
    x = adapter.sample("digits", 3, torch.Generator().manual_seed(0))
    params = dict(vision.named_parameters())
    logits = adapter.logits(vision, params, "digits", x)
    with torch.no_grad():
        mean, std = (torch.tensor(adapter.normalize[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
        pixels = (x - mean) / std
        ref = clip.get_image_features(pixel_values=pixels)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
        ref = clip.logit_scale.exp() * torch.nn.functional.normalize(ref, dim=-1) @ want.T
    torch.testing.assert_close(logits, ref)  # the head is the CLIP zero-shot classifier


def test_import_clip_refuses_before_writing(tmp_path, capsys):
    _tiny_clip(tmp_path / "clip")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "c.txt").write_text("a\nb\n")
    base = ["zoo", "import-clip", "--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "o")]
    cases = [
        (["--task", "t", str(tmp_path / "obj.npy"), str(tmp_path / "c.txt")], "pickle"),
        (["--task", "t", str(tmp_path / "nothing"), str(tmp_path / "c.txt")], "not found"),
        (
            [
                "--task",
                "t",
                str(tmp_path / "obj.npy"),
                str(tmp_path / "c.txt"),
                "--template",
                "no slot",
            ],
            "'{}'",
        ),
        (["--task", "../t", str(tmp_path / "obj.npy"), str(tmp_path / "c.txt")], "task name"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and message in err[0], err
    not_clip = ["zoo", "import-clip", "--clip", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(not_clip + ["--task", "t", str(tmp_path / "c.txt"), str(tmp_path / "c.txt")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text((tmp_path / "clip" / "config.json").read_text())
    assert main(not_clip + ["--task", "t", str(tmp_path / "c.txt"), str(tmp_path / "c.txt")]) == 2
    assert "give an image folder or a .npy" in capsys.readouterr().err
    np.save(tmp_path / "ok.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    assert main(not_clip + ["--task", "t", str(tmp_path / "ok.npy"), str(tmp_path / "c.txt")]) == 2
    assert "no .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


# -- the paper-scale CLIP recipe, scaled down, on tiny transformers-4 checkpoints --------------------


def _save_hf4_vision(vision_state: dict, config, out: Path, noise: float, seed: int) -> None:
    """A CLIPVisionModel saved with transformers-4 names (``vision_model.*`` + position_ids)."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(vision_state[key] + noise * torch.randn(value.shape, generator=gen))
    model.save_pretrained(out)
    rewrite_as_hf4(out)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    """What the user's downloads look like, in miniature: hf/openai/... and hf/tanganke/..."""
    root = tmp_path_factory.mktemp("paper")
    clip, _ = _tiny_clip(root / "hf/openai/clip-vit-base-patch32")
    vision = {k: v for k, v in clip.vision_model.state_dict().items()}
    config = clip.config.vision_config
    config.architectures = ["CLIPVisionModel"]
    for i, task in enumerate(FB_TASKS):
        _save_hf4_vision(
            vision, config, root / f"hf/tanganke/clip-vit-base-patch32_{task}", 0.02, i
        )
        rng = np.random.default_rng(i)
        np.save(root / f"images-{task}.npy", rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8))
        (root / f"classes-{task}.txt").write_text("car\nsign\nhouse\n")
    _save_hf4_vision(vision, config, root / "hf/base-vision-hf4", 0.0, 99)
    return root


def _scaled_down(root: Path, *, models: dict[str, str] | None = None) -> Path:
    """The paper-scale recipe and its calibration file, copied with a few-step calibration."""
    recipe = _yaml(ROOT / "recipes/dam-clip-vit-b32-8tasks.yml")
    cal = _yaml(ROOT / "recipes/dam-clip-vit-b32-8tasks-calibration.yml")
    cal.update(steps=2, final_steps=1, batch_size=2, device="cpu", checkpoint_every=5)
    (root / "recipes").mkdir(exist_ok=True)
    (root / "recipes/cal.yml").write_text(yaml.safe_dump(cal))
    recipe["parameters"]["calibration"] = "recipes/cal.yml"
    if models:
        recipe["base_model"] = models.get(recipe["base_model"], recipe["base_model"])
        for m in recipe["models"]:
            m["model"] = models.get(m["model"], m["model"])
    path = root / "recipes" / ("unconverted.yml" if models else "scaled.yml")
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_paper_recipe_convert_then_merge_writes_every_tensor(downloads, monkeypatch):
    from mergekit.options import MergeOptions

    import dam_mergekit

    monkeypatch.chdir(downloads)
    hf = "hf/tanganke/clip-vit-base-patch32_"
    # the commands recipes/README.md documents, in the same layout
    assert (
        main(
            ["convert", "hf4-vision", "hf/openai/clip-vit-base-patch32", "models/clip-vit-b32/base"]
        )
        == 0
    )
    for task in FB_TASKS:
        assert main(["convert", "hf4-vision", hf + task, f"models/clip-vit-b32/{task}"]) == 0
    args = ["zoo", "import-clip", "--clip", "hf/openai/clip-vit-base-patch32"]
    for task in FB_TASKS:
        args += ["--task", task, f"images-{task}.npy", f"classes-{task}.txt"]
    assert main(args + ["--out", "data/clip-vit-b32-calib"]) == 0

    recipe = _scaled_down(downloads)
    dam_mergekit.run_merge(
        dam_mergekit.load_recipe(recipe), "out/merged", MergeOptions(copy_tokenizer=False)
    )
    merged = load_file("out/merged/model.safetensors")
    base = load_file("models/clip-vit-b32/base/model.safetensors")
    assert set(merged) == set(base) and len(merged) > 30
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert len(changed) > len(base) // 2  # task vectors were merged, not just the base copied
    assert Path("recipes/cal.masks.safetensors").is_file()


@pytest.mark.slow
def test_paper_recipe_without_conversion_fails_before_writing(downloads, monkeypatch):
    from mergekit.options import MergeOptions

    import dam_mergekit

    monkeypatch.chdir(downloads)
    if not Path("data/clip-vit-b32-calib").exists():  # this test may run alone
        args = ["zoo", "import-clip", "--clip", "hf/openai/clip-vit-base-patch32"]
        for task in FB_TASKS:
            args += ["--task", task, f"images-{task}.npy", f"classes-{task}.txt"]
        assert main(args + ["--out", "data/clip-vit-b32-calib"]) == 0
    hf = {f"models/clip-vit-b32/{t}": f"hf/tanganke/clip-vit-base-patch32_{t}" for t in FB_TASKS}
    hf["models/clip-vit-b32/base"] = "hf/base-vision-hf4"
    recipe = _scaled_down(downloads, models=hf)
    with pytest.raises(DamError, match=r"covers 0 of the base model's .*convert hf4-vision"):
        dam_mergekit.run_merge(
            dam_mergekit.load_recipe(recipe), "out/unconverted", MergeOptions(copy_tokenizer=False)
        )
    assert not Path("out/unconverted").exists()
