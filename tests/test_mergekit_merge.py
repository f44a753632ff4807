"""End to end through mergekit: the stock `mergekit-yaml`, the wrapper, and the Python API."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file

from dam_mergekit.cli import main as dam_cli
from dam_mergekit.masks import MaskFile, MaskSet, write_mask_file
from dam_mergekit.recipe.load import load_recipe
from dam_mergekit.recipe.run import run_merge

BIN = Path(sys.executable).parent


def mergekit_yaml(recipe: Path, out: Path, *, exe: str = "mergekit-yaml", env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [str(BIN / exe), str(recipe), str(out), "--no-copy-tokenizer", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def merge_in_process(recipe: Path, out: Path):
    from mergekit.options import MergeOptions

    run_merge(load_recipe(recipe), str(out), MergeOptions(copy_tokenizer=False, quiet=True))
    return load_file(out / "model.safetensors")


def init_masks(recipe: Path, out: Path, value: int = 1) -> Path:
    assert dam_cli(["masks", "init", str(recipe), "--out", str(out), "--value", str(value)]) == 0
    return out


@pytest.fixture(params=["llama", "clip"])
def models(request, llama_models, clip_models):
    return {"llama": llama_models, "clip": clip_models}[request.param]


def test_stock_mergekit_yaml_ones_masks_equal_task_arithmetic_bitwise(models, tmp_path):
    masks = tmp_path / "masks.safetensors"
    dam = write_recipe(
        tmp_path / "dam.yml", models, parameters={"masks": str(masks), "lambda": 0.6}
    )
    ta = write_recipe(
        tmp_path / "ta.yml", models, method="task_arithmetic", parameters={"lambda": 0.6}
    )
    init_masks(dam, masks)
    for recipe, out in ((dam, tmp_path / "out_dam"), (ta, tmp_path / "out_ta")):
        proc = mergekit_yaml(recipe, out)
        assert proc.returncode == 0, proc.stderr[-2000:]
    ours, reference = (load_file(tmp_path / d / "model.safetensors") for d in ("out_dam", "out_ta"))
    assert ours.keys() == reference.keys() and len(ours) > 10
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    card = (tmp_path / "out_dam" / "README.md").read_text()
    assert "DAM (Defense-Aware Merging)" in card and "arxiv.org/abs/2410.13910" in card


def test_zero_masks_give_the_base(models, tmp_path):
    masks = tmp_path / "zero.safetensors"
    dam = write_recipe(tmp_path / "dam.yml", models, parameters={"masks": str(masks)})
    init_masks(dam, masks, value=0)
    merged = merge_in_process(dam, tmp_path / "out")
    base = load_file(models["base"] / "model.safetensors")
    assert merged.keys() == base.keys()
    for name, tensor in base.items():
        assert torch.equal(merged[name], tensor), name


def test_mask_zeroing_one_tensor_leaves_exactly_that_tensor_at_base(llama_models, tmp_path):
    masks = tmp_path / "one.safetensors"
    dam = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks)})
    init_masks(dam, masks)
    mf = MaskFile(masks)
    target = "model.layers.1.mlp.up_proj.weight"
    shapes = {n: mf.shape(n) for n in mf.names}
    write_mask_file(
        masks,
        MaskSet(m1={target: torch.zeros(shapes[target])}),
        base=mf.base,
        experts=mf.experts,
        tensor_shapes=shapes,
    )
    merged = merge_in_process(dam, tmp_path / "out")
    base = load_file(llama_models["base"] / "model.safetensors")
    for name, tensor in base.items():
        assert torch.equal(merged[name], tensor) == (name == target), name


def test_wrapper_merges_without_the_hook_and_output_reloads(clip_models, llama_models, tmp_path):
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    for kind, models in (("clip", clip_models), ("llama", llama_models)):
        masks = tmp_path / f"{kind}.safetensors"
        dam = write_recipe(tmp_path / f"{kind}.yml", models, parameters={"masks": str(masks)})
        init_masks(dam, masks)
        out = tmp_path / f"out_{kind}"
        proc = mergekit_yaml(dam, out, exe="mergekit-dam-yaml", env={"DAM_MERGEKIT_AUTOLOAD": "0"})
        assert proc.returncode == 0, proc.stderr[-2000:]
    vision = CLIPVisionModel.from_pretrained(tmp_path / "out_clip")
    pooled = vision(pixel_values=torch.rand(2, 3, 16, 16)).pooler_output
    assert pooled.shape == (2, 32) and torch.isfinite(pooled).all()
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "out_llama")
    logits = lm(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_stock_command_without_hook_does_not_know_dam(llama_models, tmp_path):
    masks = tmp_path / "m.safetensors"
    dam = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks)})
    init_masks(dam, masks)
    proc = mergekit_yaml(dam, tmp_path / "out", env={"DAM_MERGEKIT_AUTOLOAD": "0"})
    assert proc.returncode != 0 and "Unimplemented merge method dam" in proc.stderr


def test_alias_and_filters_work(llama_models, tmp_path):
    """`defense_aware_merging` is the same kernel; `lambda` can vary per tensor with a filter."""
    masks = tmp_path / "m.safetensors"
    lam = [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]
    dam = write_recipe(
        tmp_path / "dam.yml",
        llama_models,
        method="defense_aware_merging",
        parameters={"masks": str(masks), "lambda": lam},
    )
    init_masks(dam, masks)
    merged = merge_in_process(dam, tmp_path / "out")
    base = load_file(llama_models["base"] / "model.safetensors")
    assert all(torch.equal(merged[n], t) == ("mlp" in n) for n, t in base.items())


def test_gradient_lists_resolve_per_layer(llama_models, tmp_path):
    """`lambda: [0, 1]` interpolates over layers as in mergekit: layer 0 stays at the base."""
    masks = tmp_path / "m.safetensors"
    dam = write_recipe(
        tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks), "lambda": [0.0, 1.0]}
    )
    init_masks(dam, masks)
    merged = merge_in_process(dam, tmp_path / "out")
    base = load_file(llama_models["base"] / "model.safetensors")
    layer0 = [n for n in base if ".layers.0." in n]
    layer1 = [n for n in base if ".layers.1." in n]
    assert layer0 and all(torch.equal(merged[n], base[n]) for n in layer0)
    assert layer1 and not any(torch.equal(merged[n], base[n]) for n in layer1)
