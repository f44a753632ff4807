"""transformers-4 CLIP vision directories: the silent empty merge, its check, and the renaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _hf4_fixtures import rewrite_as_hf4
from safetensors.torch import load_file, save_file

from dam_mergekit.cli import main
from dam_mergekit.convert.hf4 import convert_hf4_vision
from dam_mergekit.errors import DamError
from dam_mergekit.recipe.checks import check_plan_covers_base

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=8,
    projection_dim=24,
)


def save_hf4(cls_name: str, out: Path, seed: int) -> Path:
    """A tiny CLIP vision model saved as transformers 4 did: ``vision_model.*`` + position_ids."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.CLIPVisionConfig(**VISION))
    model.save_pretrained(out)
    rewrite_as_hf4(out)
    (out / "preprocessor_config.json").write_text("{}")
    return out


def planned_names(config) -> list[str]:
    """The output tensors mergekit plans for a recipe (its own planner, via plan_recipe)."""
    from dam_mergekit.recipe.plan import plan_recipe

    return [t.name for t in plan_recipe(config).tensors]


def recipe(dirs: dict[str, Path]):
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(dirs["base"]),
            "dtype": "float32",
            "models": [{"model": str(dirs[t]), "parameters": {"weight": 0.5}} for t in ("a", "b")],
        }
    )


@pytest.fixture(scope="module")
def hf4_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf4")
    return {
        tag: save_hf4("CLIPVisionModel", root / tag, seed)
        for tag, seed in (("base", 0), ("a", 1), ("b", 2))
    }


@pytest.mark.slow
def test_hf4_merge_is_caught_then_converted_merge_is_complete(hf4_dirs, tmp_path):
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    # The pitfall itself: stock mergekit writes no weights from transformers-4 names.
    run_merge(
        recipe(hf4_dirs), str(tmp_path / "empty"), MergeOptions(copy_tokenizer=False, quiet=True)
    )
    assert not list((tmp_path / "empty").glob("*.safetensors"))
    with pytest.raises(DamError, match="covers 0 of the base model's .* hf4-vision"):
        planned_names(recipe(hf4_dirs))  # every dam plan (masks init, merge) is checked

    new = {tag: convert_hf4_vision(d, tmp_path / f"new-{tag}") for tag, d in hf4_dirs.items()}
    names = planned_names(recipe(new))
    check_plan_covers_base(names, new["base"])
    out = tmp_path / "merged"
    run_merge(recipe(new), str(out), MergeOptions(copy_tokenizer=False, quiet=True))
    merged = load_file(str(out / "model.safetensors"))
    sd = {tag: load_file(str(d / "model.safetensors")) for tag, d in new.items()}
    assert set(merged) == set(sd["base"]) == set(names)
    for key, value in merged.items():
        expected = (
            sd["base"][key]
            + 0.5 * (sd["a"][key] - sd["base"][key])
            + 0.5 * (sd["b"][key] - sd["base"][key])
        )
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls_name", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_renamed_to_what_transformers_5_state_dict_gives(tmp_path, cls_name):
    import transformers

    src = save_hf4(cls_name, tmp_path / "old", seed=3)
    assert main(["convert", "hf4-vision", str(src), str(tmp_path / "new")]) == 0
    new = tmp_path / "new"
    model = getattr(transformers, cls_name).from_pretrained(new).eval()
    stored = load_file(str(new / "model.safetensors"))
    assert set(stored) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(stored[key], value), key
    assert (new / "preprocessor_config.json").is_file()
    reference = getattr(transformers, cls_name).from_pretrained(src).eval()  # v5 reads v4 names
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        key = "image_embeds" if cls_name.endswith("Projection") else "pooler_output"
        torch.testing.assert_close(model(pixel_values=x)[key], reference(pixel_values=x)[key])


def test_bad_inputs_write_nothing(tmp_path):
    src = save_hf4("CLIPVisionModel", tmp_path / "old", seed=4)
    state = load_file(str(src / "model.safetensors"))
    state["vision_model.extra.weight"] = torch.zeros(2)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(DamError, match="vision_model.extra.weight"):
        convert_hf4_vision(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["CLIPModel"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(DamError, match="architecture 'CLIPModel'"):
        convert_hf4_vision(src, tmp_path / "out")


def test_check_plan_covers_base_counts_weights_not_buffers(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file(
        {
            "a.weight": torch.zeros(2, 2),
            "b.bias": torch.zeros(2),
            "embeddings.position_ids": torch.arange(3),
        },
        str(base / "model.safetensors"),
    )
    check_plan_covers_base(["a.weight", "b.bias"], base)  # int buffer exempt
    check_plan_covers_base(["a.weight", "b.bias", "unrelated"], base)
    with pytest.raises(DamError, match="covers 1 of the base model's 2 weight tensors"):
        check_plan_covers_base(["a.weight"], base)
    with pytest.raises(DamError, match="covers 0 of"):
        check_plan_covers_base([], base)


@pytest.mark.parametrize("arch", [None, "CLIPVisionModelWithProjection"])
def test_vision_tower_extracted_from_a_full_clip_model(tmp_path, arch):
    """FusionBench's base is a full CLIPModel (openai/clip-vit-base-patch32), not a vision one."""
    import transformers

    torch.manual_seed(5)
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = {k: v for k, v in VISION.items() if k != "projection_dim"}
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    ).eval()
    clip.save_pretrained(tmp_path / "clip")
    args = ["convert", "hf4-vision", str(tmp_path / "clip"), str(tmp_path / "vision")]
    assert main(args + (["--architecture", arch] if arch else [])) == 0
    cls = getattr(transformers, arch or "CLIPVisionModel")
    model = cls.from_pretrained(tmp_path / "vision").eval()
    stored = load_file(str(tmp_path / "vision" / "model.safetensors"))
    assert set(stored) == set(model.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if arch:
            expected = clip.get_image_features(pixel_values=x)
            expected = getattr(expected, "pooler_output", expected)
            torch.testing.assert_close(model(pixel_values=x).image_embeds, expected)
        else:
            torch.testing.assert_close(
                model(pixel_values=x).pooler_output, clip.vision_model(pixel_values=x).pooler_output
            )
