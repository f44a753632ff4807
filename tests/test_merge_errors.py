"""Every refusal: a one-line error naming file, tensor and fix, before anything is written."""

import shutil

import pytest
import torch
from conftest import write_recipe
from test_mask_file import _rewrite_header
from test_mergekit_merge import init_masks, merge_in_process, mergekit_yaml

from dam_mergekit.errors import DamError
from dam_mergekit.masks import MaskFile, MaskSet, write_mask_file

TENSOR = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture
def setup(llama_models, tmp_path):
    masks = tmp_path / "masks.safetensors"
    recipe = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks)})
    init_masks(recipe, masks)
    return recipe, masks, tmp_path / "out"


def refused(recipe, out, match):
    with pytest.raises(DamError, match=match) as info:
        merge_in_process(recipe, out)
    assert "\n" not in str(info.value)
    assert not out.exists(), "a refused merge must leave no output directory"
    return str(info.value)


def test_recipe_without_masks_or_calibration(llama_models, tmp_path):
    recipe = write_recipe(tmp_path / "dam.yml", llama_models)
    refused(recipe, tmp_path / "out", "needs `parameters: {masks: FILE}`.*never falls back")


def test_missing_mask_file(setup):
    recipe, masks, out = setup
    masks.unlink()
    refused(recipe, out, "mask file not found")


def test_truncated_mask_file(setup):
    recipe, masks, out = setup
    data = masks.read_bytes()
    masks.write_bytes(data[: len(data) // 2])
    refused(recipe, out, "truncated or corrupt")


def write_soft_m1(masks):
    """Rewrite the mask file with a soft M1 of 0.5 for TENSOR (stored as float, not bits)."""
    mf = MaskFile(masks)
    shapes = {n: mf.shape(n) for n in mf.names}
    write_mask_file(
        masks,
        MaskSet(m1={TENSOR: torch.full(shapes[TENSOR], 0.5)}),
        base=mf.base,
        experts=mf.experts,
        tensor_shapes=shapes,
    )


def _soft_file(masks, value):
    """Replace TENSOR's M1 with a soft mask, then poke ``value`` into it behind the writer's back."""
    write_soft_m1(masks)

    def poke(header, tensors):
        tensors[f"m1/{TENSOR}"][0, 0] = value

    _rewrite_header(masks, poke)


@pytest.mark.parametrize("value, match", [(float("nan"), "NaN or inf"), (2.0, r"outside \[0, 1\]")])
def test_bad_mask_values(setup, value, match):
    recipe, masks, out = setup
    _soft_file(masks, value)
    message = refused(recipe, out, match)
    assert TENSOR in message and str(masks) in message


def test_wrong_shape(setup):
    recipe, masks, out = setup
    _soft_file(masks, 0.5)

    def reshape(header, tensors):
        header["tensors"][TENSOR]["shape"] = [3, 3]
        header["tensors"][TENSOR]["m1"]["shape"] = [3, 3]
        tensors[f"m1/{TENSOR}"] = torch.full((3, 3), 0.5)

    _rewrite_header(masks, reshape)
    assert TENSOR in refused(recipe, out, "made for shape \\[3, 3\\]")


def test_unknown_tensor_name(setup):
    recipe, masks, out = setup
    mf = MaskFile(masks)
    shapes = {n: mf.shape(n) for n in mf.names} | {"vision_model.extra.weight": [4]}
    write_mask_file(masks, MaskSet(), base=mf.base, experts=mf.experts, tensor_shapes=shapes)
    refused(recipe, out, "unknown tensor name 'vision_model.extra.weight'")


def test_fingerprint_mismatch_for_base_and_expert(setup, clip_models, llama_models, tmp_path):
    recipe, masks, out = setup
    other = tmp_path / "clip_masks.safetensors"
    clip_recipe = write_recipe(tmp_path / "clip.yml", clip_models, parameters={"masks": str(other)})
    init_masks(clip_recipe, other)
    shutil.copy(other, masks)
    refused(recipe, out, "fingerprint mismatch for the base model")
    swapped = dict(llama_models, b=tmp_path / "expert_b_copy")
    shutil.copytree(llama_models["a"], swapped["b"])  # same weights as expert a, not b
    init_masks(recipe, masks.with_name("fresh.safetensors"))
    shutil.copy(masks.with_name("fresh.safetensors"), masks)
    recipe2 = write_recipe(tmp_path / "swapped.yml", swapped, parameters={"masks": str(masks)})
    refused(recipe2, out, "fingerprint mismatch: no masks for expert")


def test_vocabulary_permutation_is_refused(llama_models, tmp_path):
    masks = tmp_path / "m.safetensors"
    recipe = write_recipe(
        tmp_path / "dam.yml",
        llama_models,
        parameters={"masks": str(masks)},
        extra={"tokenizer_source": "base"},
    )
    refused(recipe, tmp_path / "out", "tokenizer_source.*misalign")


def test_merge_under_torchrun_is_refused(setup, monkeypatch):
    """torchrun would start one merge per process into one output directory."""
    recipe, _, out = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused(recipe, out, "under torchrun, run `dam-mergekit calibrate RECIPE`")


def test_pickle_checkpoints_are_refused_unless_allowed(llama_models, tmp_path, capsys):
    from safetensors.torch import load_file

    from dam_mergekit.cli import main as dam_cli

    pickled = tmp_path / "pickled_expert"
    shutil.copytree(llama_models["b"], pickled)
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    masks = tmp_path / "m.safetensors"
    models = dict(llama_models, b=pickled)
    recipe = write_recipe(tmp_path / "dam.yml", models, parameters={"masks": str(masks)})
    assert dam_cli(["masks", "init", str(recipe), "--out", str(masks)]) == 2
    assert "only pickle checkpoints" in capsys.readouterr().err and not masks.exists()
    trusted = write_recipe(
        tmp_path / "trusted.yml", models, parameters={"masks": str(masks), "allow_pickle": True}
    )
    init_masks(trusted, masks)
    refused(recipe, tmp_path / "out", "only pickle checkpoints.*allow_pickle")
    merged = merge_in_process(trusted, tmp_path / "out")
    assert len(merged) == len(state)


def test_failure_during_the_merge_removes_partial_output(setup, monkeypatch):
    recipe, masks, out = setup
    import dam_mergekit.method as method

    real = method.merge_tensor
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated failure in the middle of the merge")
        return real(*args, **kwargs)

    monkeypatch.setattr(method, "merge_tensor", flaky)
    with pytest.raises(RuntimeError, match="simulated failure"):
        merge_in_process(recipe, out)
    assert not out.exists()


def test_stock_command_prints_the_error_and_writes_nothing(setup):
    recipe, masks, out = setup
    masks.write_bytes(masks.read_bytes()[:100])
    proc = mergekit_yaml(recipe, out)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and errors[0].startswith("mergekit-yaml: error: ")
    assert "truncated or corrupt mask file" in errors[0] and str(masks) in errors[0]
    assert "Traceback" not in proc.stderr and proc.returncode == 2
    assert not out.exists()
