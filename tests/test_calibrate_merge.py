"""End to end: the model calibration computes in memory is the model mergekit writes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _calib_fixtures import FAST, write_clip_zoo, write_llm_zoo, write_recipe
from safetensors.torch import load_file

from dam_mergekit.calibrate.hook import ensure_masks
from dam_mergekit.masks import MaskFile
from dam_mergekit.masks.registry import forget
from dam_mergekit.recipe.load import dam_settings, load_recipe, mask_path_for
from dam_mergekit.recipe.plan import plan_recipe


def _merge_options():
    from mergekit.options import MergeOptions

    return MergeOptions(copy_tokenizer=False, lazy_unpickle=False)


def _calibrate_and_merge(tmp_path, recipe_path):
    """Calibrate through the guarded run_merge (as mergekit-yaml does) and return both models."""
    from dam_mergekit.recipe.run import run_merge

    config = load_recipe(recipe_path)
    settings = dam_settings(config)
    mask_path = mask_path_for(settings.masks, settings.calibration)
    plan = plan_recipe(config)
    result = ensure_masks(plan, mask_path, settings.calibration, progress=False)
    assert result is not None and result.mask_path is not None
    forget()
    out = tmp_path / "merged"
    run_merge(config, str(out), _merge_options())  # the guard finds the masks fresh
    written = {}
    for f in sorted(out.glob("*.safetensors")):
        written.update(load_file(str(f)))
    return result, written, plan, mask_path


def _assert_same(result, written):
    assert set(result.merged) <= set(written)
    for name, tensor in result.merged.items():
        torch.testing.assert_close(written[name].float(), tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_in_memory_merge_equals_mergekit_output_clip(tmp_path):
    zoo = write_clip_zoo(tmp_path)
    for data in (zoo / "data").glob("*.safetensors"):  # unlabeled: calibration must not need y
        assert set(load_file(str(data))) == {"calib_x"}
    recipe = write_recipe(tmp_path, zoo, FAST)
    result, written, plan, mask_path = _calibrate_and_merge(tmp_path, recipe)
    _assert_same(result, written)
    # the merge is not a no-op: calibration moved the coefficients and masked something
    names = [t.name for t in plan.float_tensors]
    assert result.masks.coefficients[names[0]].shape == (2,)
    mf = MaskFile(mask_path)
    assert mf.settings["source"] == "dam-mergekit calibrate"
    assert mf.settings["calibration"]["mode"] == "dam"
    assert not torch.allclose(
        written[names[-1]], load_file(str(zoo / "base" / "model.safetensors"))[names[-1]]
    )
    # binary masks: written as bits (or all-ones), never soft
    for spec in mf.header["tensors"].values():
        assert all(s["kind"] in ("bits", "ones") for s in [spec["m1"], *spec["m2"]])
    # fresh masks are not recomputed; changed settings are
    config = load_recipe(recipe)
    cal = dam_settings(config).calibration
    assert ensure_masks(plan, mask_path, cal, progress=False) is None
    data = yaml.safe_load(open(cal))
    data["alpha"] = 0.5
    open(cal, "w").write(yaml.safe_dump(data))
    assert ensure_masks(plan, mask_path, cal, progress=False) is not None


@pytest.mark.slow
def test_as_released_runs_and_matches_mergekit(tmp_path):
    zoo = write_clip_zoo(tmp_path)
    recipe = write_recipe(
        tmp_path, zoo, {**FAST, "mode": "as_released", "init_logit": 0.0, "coef_range": [0.0, 10.0]}
    )
    result, written, _, mask_path = _calibrate_and_merge(tmp_path, recipe)
    _assert_same(result, written)
    mf = MaskFile(mask_path)
    kinds = {s["m1"]["kind"] for s in mf.header["tensors"].values()}
    assert "float" in kinds  # one continuous mask sample, as released
    assert all(s["kind"] == "ones" for t in mf.header["tensors"].values() for s in t["m2"])


@pytest.mark.slow
def test_in_memory_merge_equals_mergekit_output_causal_lm(tmp_path):
    zoo = write_llm_zoo(tmp_path)
    recipe = write_recipe(tmp_path, zoo, {**FAST, "eps": 0.5, "granularity": "row"})
    result, written, _, mask_path = _calibrate_and_merge(tmp_path, recipe)
    _assert_same(result, written)
    history = json.loads(open(str(mask_path) + ".history.json").read())["history"]
    assert all(r[f"delta_norm_{t}"] <= 0.5 + 1e-5 for r in history for t in ("sentiment", "topic"))


@pytest.mark.slow
def test_cli_calibrate(tmp_path, capsys):
    from dam_mergekit.cli import main

    zoo = write_clip_zoo(tmp_path)
    recipe = write_recipe(tmp_path, zoo, FAST)
    assert main(["calibrate", str(recipe), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["calibrate", str(recipe), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_audit_inside_calibration_reaches_mask_file_inspect_and_card(tmp_path, capsys):
    """``audit:`` runs the pre-merge audit first; its verdicts are in the mask file, in
    ``masks inspect`` and in the merged model's card."""
    from dam_mergekit.cli import main

    zoo = write_clip_zoo(tmp_path)
    audit = {"patch_steps": 4, "universal_steps": 4, "held_out": 16}
    recipe = write_recipe(tmp_path, zoo, {**FAST, "audit": audit})
    result, _, plan, mask_path = _calibrate_and_merge(tmp_path, recipe)
    assert [e["task"] for e in result.audit["experts"]] == ["alpha", "beta"]
    stored = MaskFile(mask_path)
    assert stored.audit == json.loads(json.dumps(result.audit))
    assert stored.settings["calibration"]["audit"] == audit  # part of what makes masks stale
    capsys.readouterr()
    assert main(["masks", "inspect", str(mask_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("  audit clean") + out.count("  audit SUSPICIOUS") == 2
    assert "audit flagged" in out
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "## Defense-Aware Merging" in card
    for e in result.audit["experts"]:
        assert f"`{e['expert']}`" in card
    # without the setting, no audit runs and the recorded settings stay as before
    plain = write_recipe(tmp_path, zoo, FAST, name="plain")
    settings = dam_settings(load_recipe(plain))
    again = ensure_masks(
        plan_recipe(load_recipe(plain)),
        mask_path_for(settings.masks, settings.calibration),
        settings.calibration,
        progress=False,
    )
    assert again.audit is None and "audit" not in again.settings["calibration"]
