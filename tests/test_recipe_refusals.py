"""Recipes that cannot merge wrongly: bad values and keys refused, finished merges never lost.

Each test reproduces one input that used to give a silently wrong, lost or traceback-laden merge.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_recipe
from test_mask_file import _rewrite_header
from test_mergekit_merge import init_masks, merge_in_process, mergekit_yaml

from dam_mergekit.cli import main as dam_cli
from dam_mergekit.errors import DamError

TENSOR = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture
def masks(llama_models, tmp_path) -> Path:
    path = tmp_path / "masks.safetensors"
    init_masks(
        write_recipe(tmp_path / "init.yml", llama_models, parameters={"masks": str(path)}), path
    )
    return path


def edited_recipe(tmp_path: Path, models, masks: Path, edit) -> Path:
    """The standard test recipe, with ``edit(recipe_dict)`` applied to its YAML."""
    path = write_recipe(tmp_path / "dam.yml", models, parameters={"masks": str(masks)})
    recipe = yaml.safe_load(path.read_text())
    edit(recipe)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def refused(recipe: Path, out: Path, match: str) -> str:
    with pytest.raises(DamError, match=match) as info:
        merge_in_process(recipe, out)
    assert "\n" not in str(info.value)
    assert not out.exists(), "a refused merge must leave no output"
    return str(info.value)


def validate_refuses(recipe: Path, masks: Path, match: str, capsys) -> None:
    assert dam_cli(["masks", "validate", str(masks), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and pytest.importorskip("re").search(match, err), err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["lambda", "weight"])
def test_non_finite_lambda_or_weight_is_refused(
    llama_models, masks, tmp_path, capsys, value, where
):
    def edit(recipe):
        if where == "lambda":
            recipe["parameters"]["lambda"] = value
        else:
            recipe["models"][1]["parameters"]["weight"] = value

    recipe = edited_recipe(tmp_path, llama_models, masks, edit)
    message = refused(recipe, tmp_path / "out", f"`{where}` is .*not finite")
    assert str(llama_models["b"]) in message or where == "lambda"
    validate_refuses(recipe, masks, "not finite", capsys)


def test_non_number_lambda_names_the_key(llama_models, masks, tmp_path):
    recipe = edited_recipe(
        tmp_path, llama_models, masks, lambda r: r["parameters"].update({"lambda": "abc"})
    )
    refused(recipe, tmp_path / "out", "`lambda` must be a number, got 'abc'")


def test_filtered_non_finite_lambda_is_refused(llama_models, masks, tmp_path):
    """A NaN hidden in one filter of a gradient/filter list is found on the tensor it hits."""
    lam = [{"filter": "mlp", "value": float("nan")}, {"value": 0.3}]
    recipe = edited_recipe(
        tmp_path, llama_models, masks, lambda r: r["parameters"].update({"lambda": lam})
    )
    assert "mlp" in refused(recipe, tmp_path / "out", "not finite")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r["parameters"].update(lamda=0.3), "unknown parameter `lamda`.*`lambda`"),
        (
            lambda r: r["models"][0]["parameters"].update(wieght=0.0),
            r"models\[0\].*unknown parameter `wieght`.*`weight`",
        ),
        (
            lambda r: r["models"][0]["parameters"].update({"lambda": 0.3}),
            "unknown parameter `lambda`.*global parameter",
        ),
    ],
)
def test_misspelled_or_misplaced_keys_are_refused(
    llama_models, masks, tmp_path, capsys, edit, match
):
    recipe = edited_recipe(tmp_path, llama_models, masks, edit)
    refused(recipe, tmp_path / "out", match)
    validate_refuses(recipe, masks, "unknown parameter", capsys)


def test_filtered_masks_is_a_clear_refusal(llama_models, masks, tmp_path):
    recipe = edited_recipe(
        tmp_path,
        llama_models,
        masks,
        lambda r: r["parameters"].update(masks=[{"filter": "mlp", "value": str(masks)}]),
    )
    message = refused(recipe, tmp_path / "out", "`masks` takes one path, not filters")
    assert "ConditionalParameter" not in message


def test_allow_pickle_must_be_a_boolean(llama_models, masks, tmp_path):
    """``allow_pickle: "false"`` (a string) used to switch pickle loading on."""
    recipe = edited_recipe(
        tmp_path, llama_models, masks, lambda r: r["parameters"].update(allow_pickle="false")
    )
    refused(recipe, tmp_path / "out", "`allow_pickle` must be true or false")


def relative_recipe(root: Path, llama_models) -> Path:
    """The README's layout: models/base, models/expert_a, ... and a recipe with relative paths."""
    for name in ("base", "a", "b"):
        shutil.copytree(llama_models[name], root / "models" / name)
    masks = "masks/dam.safetensors"
    models = {name: Path("models") / name for name in ("base", "a", "b")}
    recipe = write_recipe(root / "dam.yml", models, parameters={"lambda": 0.3, "masks": masks})
    (root / "masks").mkdir()
    return recipe


def test_readme_recipe_merges_offline_with_a_model_card(llama_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = relative_recipe(tmp_path, llama_models)
    init_masks(Path("dam.yml"), Path("masks/dam.safetensors"))
    proc = mergekit_yaml(recipe, Path("out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert "dam-partial" not in (out / "README.md").read_text()  # named after out, not staging
    assert not [p for p in tmp_path.iterdir() if "dam-partial" in p.name]


def _fail_the_card(monkeypatch):
    import mergekit.merge as merge

    def broken_card(*args, **kwargs):
        raise RuntimeError("simulated failure after the tensors were written")

    # the failure comes after the card: saving the tokenizer's tag-along files
    monkeypatch.setattr(merge, "_copy_tagalong_files", broken_card)


def test_failure_after_the_tensors_leaves_the_old_output_as_it_was(
    llama_models, masks, tmp_path, monkeypatch
):
    recipe = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks)})
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous merge")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_the_card(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        merge_in_process(recipe, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if "dam-partial" in p.name) == []


def test_failure_after_the_tensors_leaves_no_folder(llama_models, masks, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks)})
    _fail_the_card(monkeypatch)
    with pytest.raises(RuntimeError):
        merge_in_process(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "dam-partial" in p.name]


def test_a_merge_into_an_existing_folder_replaces_its_files_and_keeps_others(
    llama_models, masks, tmp_path
):
    recipe = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks)})
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    merged = merge_in_process(recipe, out)
    assert TENSOR in merged and (out / "notes.txt").read_text() == "mine"


def test_stock_command_refusal_is_one_line_and_verbose_keeps_the_traceback(
    llama_models, masks, tmp_path
):
    recipe = edited_recipe(
        tmp_path, llama_models, masks, lambda r: r["parameters"].update(lamda=0.3)
    )
    for exe in ("mergekit-yaml", "mergekit-dam-yaml"):
        proc = mergekit_yaml(recipe, tmp_path / "out", exe=exe)
        lines = [line for line in proc.stderr.splitlines() if "deprecated" not in line]
        assert proc.returncode == 2 and lines == [f"{exe}: error: {lines[0].split(': ', 2)[2]}"]
        assert "lamda" in lines[0] and not (tmp_path / "out").exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    import subprocess

    from test_mergekit_merge import BIN

    proc = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(recipe), str(tmp_path / "out"), "-v"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_yaml_errors_are_one_line_in_the_wrapper(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: dam\nmodels: [\n")
    proc = mergekit_yaml(bad, tmp_path / "out", exe="mergekit-dam-yaml")
    lines = [line for line in proc.stderr.splitlines() if "deprecated" not in line]
    assert proc.returncode == 2 and len(lines) == 1 and "not valid YAML" in lines[0]


def test_expert_of_another_architecture_is_refused_before_merging(llama_models, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(llama_models["base"])
    config.intermediate_size = 56
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wide", safe_serialization=True)
    models = dict(llama_models, b=tmp_path / "wide")
    masks = tmp_path / "m.safetensors"
    recipe = write_recipe(tmp_path / "dam.yml", models, parameters={"masks": str(masks)})
    assert dam_cli(["masks", "init", str(recipe), "--out", str(masks)]) == 2
    err = capsys.readouterr().err
    assert "wide" in err and "same base architecture" in err and not masks.exists()


def test_stored_shape_disagreeing_with_header_is_refused(llama_models, masks, tmp_path, capsys):
    from test_merge_errors import write_soft_m1

    write_soft_m1(masks)

    def shrink(header, tensors):
        tensors[f"m1/{TENSOR}"] = torch.full((2, 2), 0.5)

    _rewrite_header(masks, shrink)
    assert dam_cli(["masks", "inspect", str(masks)]) == 2
    assert "has shape [2, 2], its header implies" in capsys.readouterr().err
    recipe = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks)})
    refused(recipe, tmp_path / "out", "has shape \\[2, 2\\]")


@pytest.mark.parametrize(
    "coefficients, match",
    [([-5.0, 1.0], "are negative"), ([1.0, 1e6], "by more than 10"), ([1.0], "1 coeff")],
)
def test_out_of_range_or_short_coefficients_are_refused(
    llama_models, masks, tmp_path, coefficients, match
):
    def poke(header, tensors):
        tensors[f"coef/{TENSOR}"] = torch.tensor(coefficients)

    _rewrite_header(masks, poke)
    recipe = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks)})
    refused(recipe, tmp_path / "out", match if len(coefficients) == 2 else "has shape \\[1\\]")


@pytest.mark.parametrize("path", ["./missing", "models/missing_one", "/nonexistent/base"])
def test_missing_local_model_path_is_named_at_once(
    llama_models, masks, tmp_path, monkeypatch, path
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = dict(llama_models, b=path)
    recipe = write_recipe(tmp_path / "dam.yml", models, parameters={"masks": str(masks)})
    message = refused(recipe, tmp_path / "out", "not found|no such local directory")
    assert path in message


def test_output_path_problems_are_refused_before_anything_runs(llama_models, masks, tmp_path):
    recipe = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks)})
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    with pytest.raises(DamError, match="output path is a file"):
        merge_in_process(recipe, a_file)
    assert a_file.read_text() == "not a folder"


def test_a_read_only_output_folder_is_refused_before_anything_runs(
    llama_models, masks, tmp_path, monkeypatch
):
    """A read-only file system (or a folder without write permission) is found in the pre-flight.

    Root ignores mode bits, so the file system's answer is simulated where it says "writable".
    """
    recipe = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(masks)})
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    real_access = os.access
    if real_access(locked, os.W_OK):
        monkeypatch.setattr(
            os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
        )
    try:
        with pytest.raises(DamError, match="cannot write the merged model here"):
            merge_in_process(recipe, locked / "out")
        assert list(locked.iterdir()) == [] and not (tmp_path / "out").exists()
    finally:
        locked.chmod(0o700)


def test_a_directory_as_mask_file_says_so(llama_models, tmp_path):
    folder = tmp_path / "masks_dir"
    folder.mkdir()
    recipe = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(folder)})
    refused(recipe, tmp_path / "out", "not a regular file")


def test_fingerprint_mismatch_of_a_changed_expert_says_it_changed(llama_models, masks, tmp_path):
    changed = tmp_path / "models" / "b"
    shutil.copytree(llama_models["b"], changed)
    models = dict(llama_models, b=changed)
    masks = tmp_path / "moved.safetensors"
    moved = write_recipe(tmp_path / "moved.yml", models, parameters={"masks": str(masks)})
    init_masks(moved, masks)
    shutil.rmtree(changed)
    shutil.copytree(llama_models["a"], changed)  # same path, other weights
    assert "changed since the masks were learned" in refused(
        moved, tmp_path / "out", "fingerprint mismatch"
    )


def test_a_duplicate_expert_is_named(llama_models, masks, tmp_path):
    recipe = edited_recipe(
        tmp_path, llama_models, masks, lambda r: r["models"].append(dict(r["models"][0]))
    )
    message = refused(recipe, tmp_path / "out", "listed twice in `models`")
    assert str(llama_models["a"]) in message and "slices" not in message


def test_an_adapter_that_cannot_be_imported_names_the_calibration_file(tmp_path):
    from dam_mergekit.calibrate.config import CalibrationConfig

    path = tmp_path / "cal.yml"
    path.write_text("adapter: no_such_pkg.mod:Adapter\ndata: .\n")
    with pytest.raises(DamError, match=r"cal\.yml: adapter 'no_such_pkg.mod:Adapter' cannot be"):
        CalibrationConfig.load(path).check()


@pytest.mark.parametrize("flag", [["--tflops", "0"], ["--tasks", "-1"], ["--processes", "0"]])
def test_estimate_refuses_non_positive_numbers(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as info:
        dam_cli(["estimate", str(tmp_path / "r.yml"), *flag])
    assert info.value.code == 2 and "must be greater than 0" in capsys.readouterr().err


@pytest.fixture
def group_readable_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_mask_files_and_merges_are_readable_by_others(llama_models, tmp_path, group_readable_umask):
    """Staged outputs used to keep tempfile's 0600/0700: a shared model folder could not read them."""
    path = tmp_path / "shared" / "masks.safetensors"
    recipe = write_recipe(tmp_path / "dam.yml", llama_models, parameters={"masks": str(path)})
    init_masks(recipe, path)
    assert path.stat().st_mode & 0o777 == 0o644
    out = tmp_path / "shared" / "merged"
    merge_in_process(recipe, out)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("umask, file_mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_staged_files_follow_the_umask(tmp_path, umask, file_mode):
    from dam_mergekit.staging import current_umask, staged_file

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with staged_file(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"x")
            tmp.chmod(0o600)  # as safetensors leaves it
        assert (tmp_path / "x.bin").stat().st_mode & 0o777 == file_mode
    finally:
        os.umask(old)
