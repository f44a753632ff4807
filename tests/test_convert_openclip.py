"""open_clip <-> transformers CLIP vision conversion, on tiny open_clip models built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from dam_mergekit.cli import main  # noqa: E402
from dam_mergekit.convert.openclip import (  # noqa: E402
    convert_hf_to_openclip,
    convert_openclip_checkpoint,
    load_openclip_config,
    spec_from_openclip_config,
)
from dam_mergekit.errors import DamError  # noqa: E402

TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def tiny_config(quick_gelu: bool, **vision) -> dict:
    vision_cfg = {
        "image_size": 32,
        "patch_size": 8,
        "width": 64,
        "layers": 2,
        "head_width": 32,
        "mlp_ratio": 2.0,
        **vision,
    }
    return {
        "embed_dim": 48,
        "quick_gelu": quick_gelu,
        "vision_cfg": vision_cfg,
        "text_cfg": TEXT_CFG,
    }


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    """Two registered tiny open_clip configs: QuickGELU, and exact GELU with LayerNorm eps 1e-6."""
    root = tmp_path_factory.mktemp("ocfg")
    paths = {}
    for name, quick, extra in (
        ("dam-test-tiny-quick", True, {}),
        ("dam-test-tiny-gelu", False, {"norm_kwargs": {"eps": 1e-6}}),
    ):
        path = root / f"{name}.json"
        path.write_text(json.dumps(tiny_config(quick, **extra)))
        open_clip.add_model_config(path)
        paths[name] = path
    return paths


def make_model(name: str, seed: int):
    """A tiny open_clip CLIP with every parameter moved off its init (LN weights, biases too)."""
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def hf_image_embeds(model_dir: Path, x: torch.Tensor) -> torch.Tensor:
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(pixel_values=x).image_embeds


def save_sd(state: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("name", ["dam-test-tiny-quick", "dam-test-tiny-gelu"])
def test_image_features_equal_after_conversion_and_round_trip(configs, tmp_path, name):
    model = make_model(name, seed=1)
    ckpt = save_sd(model.state_dict(), tmp_path / "clip.safetensors")
    out = tmp_path / "hf"
    assert (
        main(["convert", "openclip", str(ckpt), str(out), "--model-config", str(configs[name])])
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == ("quick_gelu" if "quick" in name else "gelu")
    assert config["layer_norm_eps"] == (1e-5 if "quick" in name else 1e-6)
    x = images()
    with torch.no_grad():
        reference = model.encode_image(x)
    torch.testing.assert_close(hf_image_embeds(out, x), reference, atol=1e-4, rtol=0)

    back = tmp_path / "visual.safetensors"
    assert main(["convert", "hf-to-openclip", str(out), str(back)]) == 0
    from safetensors import safe_open

    with safe_open(str(back), "pt") as fh:
        stored_cfg = json.loads(fh.metadata()["open_clip_model_cfg"])
    source_cfg = json.loads(configs[name].read_text())
    assert stored_cfg["quick_gelu"] == source_cfg["quick_gelu"]
    assert spec_from_openclip_config(stored_cfg) == spec_from_openclip_config(source_cfg)
    fresh = make_model(name, seed=99)
    from safetensors.torch import load_file

    result = fresh.load_state_dict(load_file(str(back)), strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith("visual.")]
    for key, value in load_file(str(back)).items():
        assert torch.equal(value, model.state_dict()[key]), key
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().encode_image(x), reference, atol=1e-4, rtol=0)


def test_activation_is_taken_from_the_config(configs, tmp_path):
    """Forcing the other activation changes the features: the mapping is what makes them equal."""
    model = make_model("dam-test-tiny-quick", seed=2)
    ckpt = save_sd(model.state_dict(), tmp_path / "clip.safetensors")
    wrong = convert_openclip_checkpoint(
        ckpt, tmp_path / "wrong", model="dam-test-tiny-quick", quick_gelu=False
    )
    x = images()
    with torch.no_grad():
        reference = model.encode_image(x)
    assert not torch.allclose(hf_image_embeds(wrong, x), reference, atol=1e-4)


def test_state_dict_wrapper_without_visual_prefix_and_pickle_policy(configs, tmp_path):
    model = make_model("dam-test-tiny-gelu", seed=3)
    visual = {k: v for k, v in model.visual.state_dict().items()}  # no `visual.` prefix
    ckpt = tmp_path / "train.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": visual}, ckpt)
    with pytest.raises(DamError, match="--allow-pickle"):
        convert_openclip_checkpoint(ckpt, tmp_path / "no", model="dam-test-tiny-gelu")
    assert not (tmp_path / "no").exists()
    out = convert_openclip_checkpoint(
        ckpt, tmp_path / "hf", model="dam-test-tiny-gelu", allow_pickle=True
    )
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(
            hf_image_embeds(out, x), model.encode_image(x), atol=1e-4, rtol=0
        )
    # A whole pickled module (the task-vectors format) needs full unpickling: refused even so.
    whole = tmp_path / "module.pt"
    torch.save(model, whole)
    with pytest.raises(DamError, match="weights_only=True"):
        convert_openclip_checkpoint(
            whole, tmp_path / "mod", model="dam-test-tiny-gelu", allow_pickle=True
        )
    assert not (tmp_path / "mod").exists()


def test_model_prefix_and_existing_output(configs, tmp_path):
    model = make_model("dam-test-tiny-quick", seed=4)
    ckpt = save_sd(
        {f"model.{k}": v for k, v in model.state_dict().items()}, tmp_path / "enc.safetensors"
    )
    out = convert_openclip_checkpoint(ckpt, tmp_path / "hf", model="dam-test-tiny-quick")
    with pytest.raises(DamError, match="already exists"):
        convert_openclip_checkpoint(ckpt, out, model="dam-test-tiny-quick")
    convert_openclip_checkpoint(ckpt, out, model="dam-test-tiny-quick", force=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["enc.safetensors", "hf"]


def test_builtin_config_by_name():
    spec = spec_from_openclip_config(load_openclip_config(model="ViT-B-32-quickgelu"))
    assert (spec.width, spec.layers, spec.heads, spec.patch_size, spec.embed_dim) == (
        768,
        12,
        12,
        32,
        512,
    )
    assert spec.hidden_act == "quick_gelu"
    assert spec_from_openclip_config(load_openclip_config(model="ViT-B-32")).hidden_act == "gelu"
    with pytest.raises(DamError, match="built-in"):
        load_openclip_config(model="hf-hub:someone/model")


@pytest.mark.parametrize(
    "vision, what",
    [
        ({"attentional_pool": True}, "attentional pooling"),
        ({"pool_type": "avg"}, "pool_type='avg'"),
        ({"ls_init_value": 1e-4}, "LayerScale"),
        ({"no_ln_pre": True}, "no_ln_pre"),
        ({"qk_norm": True}, "custom attention blocks"),
        ({"timm_model_name": "vit_base_patch16_224"}, "timm visual tower"),
        ({"layers": [1, 1, 1, 1]}, "ModifiedResNet"),
        ({"act_kwargs": {"negative_slope": 0.1}}, "activation"),
    ],
)
def test_unsupported_variants_are_named(vision, what):
    with pytest.raises(DamError, match="unsupported open_clip variant") as err:
        spec_from_openclip_config(tiny_config(False, **vision))
    assert what in str(err.value)


def test_unsupported_variant_through_cli(tmp_path, capsys):
    cfg = tmp_path / "coca.json"
    cfg.write_text(json.dumps(tiny_config(False, attentional_pool=True)))
    ckpt = save_sd({"x": torch.zeros(1)}, tmp_path / "c.safetensors")
    assert (
        main(["convert", "openclip", str(ckpt), str(tmp_path / "out"), "--model-config", str(cfg)])
        == 2
    )
    assert "attentional pooling" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_must_match_checkpoint(configs, tmp_path):
    model = make_model("dam-test-tiny-quick", seed=5)
    ckpt = save_sd(model.state_dict(), tmp_path / "clip.safetensors")
    other = tmp_path / "wide.json"
    other.write_text(json.dumps(tiny_config(True, width=96)))
    with pytest.raises(DamError, match="shape"):
        convert_openclip_checkpoint(ckpt, tmp_path / "out", model_config=other)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_converted_models_merge_with_mergekit_and_reload(configs, tmp_path):
    """mergekit's own task_arithmetic covers every tensor and matches open_clip's."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    name = "dam-test-tiny-quick"
    models = {tag: make_model(name, seed) for tag, seed in (("base", 10), ("a", 11), ("b", 12))}
    dirs = {}
    for tag, model in models.items():
        ckpt = save_sd(model.state_dict(), tmp_path / f"{tag}.safetensors")
        dirs[tag] = convert_openclip_checkpoint(ckpt, tmp_path / tag, model=name)
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(dirs["base"]),
            "dtype": "float32",
            "models": [
                {"model": str(dirs[t]), "parameters": {"weight": w}}
                for t, w in (("a", 0.3), ("b", 0.6))
            ],
        }
    )
    out = tmp_path / "merged"
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, quiet=True))
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(load_file(str(dirs["base"] / "model.safetensors")))

    # The same task arithmetic done on the open_clip state dicts gives the same image features.
    sd = {tag: m.state_dict() for tag, m in models.items()}
    expected = make_model(name, seed=0)
    expected.load_state_dict(
        {
            k: sd["base"][k]
            + 0.3 * (sd["a"][k] - sd["base"][k])
            + 0.6 * (sd["b"][k] - sd["base"][k])
            for k in sd["base"]
        }
    )
    x = images(2)
    with torch.no_grad():
        reference = expected.eval().encode_image(x)
    torch.testing.assert_close(hf_image_embeds(out, x), reference, atol=1e-4, rtol=0)
    back = convert_hf_to_openclip(out, tmp_path / "merged.safetensors")
    assert len(load_file(str(back))) == len(models["base"].visual.state_dict())


def test_hf_to_openclip_needs_the_projection(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        )
    ).save_pretrained(tmp_path / "noproj")
    with pytest.raises(DamError, match="visual_projection.weight"):
        convert_hf_to_openclip(tmp_path / "noproj", tmp_path / "v.safetensors")
    assert not (tmp_path / "v.safetensors").exists()


def test_a_missing_or_broken_model_config_is_one_line(tmp_path):
    from dam_mergekit.convert.openclip import load_openclip_config

    with pytest.raises(DamError, match="model config not found"):
        load_openclip_config(model_config=tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DamError, match="bad.json: not valid JSON"):
        load_openclip_config(model_config=tmp_path / "bad.json")
