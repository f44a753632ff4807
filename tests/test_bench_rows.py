"""The bench rows built on the calibration machinery: post-hoc AWM and task arithmetic with DAM's
coefficients, on the tiny calibration zoos (CLIP and LLM), merged through the bench's mergekit run
and checked against the merge formula computed here by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _calib_fixtures import write_clip_zoo, write_llm_zoo

from dam_mergekit.calibrate.models import load_tensors
from dam_mergekit.lab.bench import run_bench
from dam_mergekit.masks import MaskFile

# low initial logits and a large mask step, so that a few steps already drop mask entries
QUICK = {"steps": 3, "final_steps": 1, "batch_size": 4, "init_logit": 0.2, "lr_mask": 0.5}
CPU = torch.device("cpu")


@pytest.fixture(params=["clip", "llm"])
def zoo(request, tmp_path) -> Path:
    torch.set_num_threads(1)
    return (write_clip_zoo if request.param == "clip" else write_llm_zoo)(tmp_path / "z")


def _no_evaluation(model_dir: Path, zoo: Path) -> dict:
    """The merges are what these tests check; scores are the bench test's business."""
    tasks = [t["name"] for t in json.loads((zoo / "zoo.json").read_text())["tasks"]]
    return {key: dict.fromkeys(tasks, 50.0) for key in ("acc", "asr", "p0")}


def _bench(zoo: Path, out: Path, methods: list[str], capsys, calibration=QUICK) -> str:
    """Run the bench on ``methods``; returns what it printed to stderr (calibration notices)."""
    run_bench(zoo, out, only=methods, evaluate=_no_evaluation, calibration=calibration)
    return capsys.readouterr().err


def _models(zoo: Path, names: list[str]) -> tuple[dict, list[dict]]:
    manifest = json.loads((zoo / "zoo.json").read_text())
    base = load_tensors(str(zoo / manifest["base"]), names, CPU)
    experts = [load_tensors(str(zoo / t["expert"]), names, CPU) for t in manifest["tasks"]]
    return base, experts


def test_awm_masks_the_merged_task_vector(zoo, tmp_path, capsys):
    out = tmp_path / "bench"
    # a DAM-style override of the coefficient range must not reach awm: its settings are fixed
    dam_range = {**QUICK, "coef_range": [0.0, 0.3]}
    err = _bench(zoo, out, ["task_arithmetic", "awm"], capsys, calibration=dam_range)
    assert "the one expert" in err  # every task distils from the task-arithmetic merge
    work = out / "work" / "seed0"
    cal = yaml.safe_load((work / "awm-calibration.yml").read_text())
    assert {k: cal[k] for k in ("train", "coef_init", "coef_range", "rescale", "steps")} == {
        "train": "m2",
        "coef_init": 1.0,
        "coef_range": [1.0, 1.0],
        "rescale": False,
        "steps": QUICK["steps"],
    }
    masks = MaskFile(work / "awm-calibration.masks.safetensors")
    assert len(masks.experts) == 1 and masks.experts[0].model == str(
        (work / "awm-task-arithmetic").resolve()
    )
    names = masks.names
    base, experts = _models(zoo, names)
    merged = load_tensors(str(out / "models" / "seed0" / "awm"), names, CPU)
    ta_row = load_tensors(str(out / "models" / "seed0" / "task_arithmetic"), names, CPU)
    kept, total = 0.0, 0
    for name in names:
        assert masks.m1(name) is None  # M1 stays all-ones: the one trained mask is M2
        assert masks.coefficients(name).tolist() == [1.0]  # the merged vector at full size
        m2 = masks.m2(name, 0)
        keep = torch.ones(()) if m2 is None else m2.float()
        kept += float(keep.expand(base[name].shape).sum())
        total += base[name].numel()
        ta = base[name] + 0.3 * sum(e[name] - base[name] for e in experts)
        torch.testing.assert_close(ta_row[name], ta, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            merged[name], base[name] + keep * (ta - base[name]), rtol=0, atol=1e-6
        )
    assert 0 < kept < total  # the mask dropped part of the merged task vector, not all of it


def test_dam_coefficients_row_is_task_arithmetic_with_dams_coefficients(zoo, tmp_path, capsys):
    # with the dam row in the same run, its mask file is reused (calibrated once, by the dam row)
    err = _bench(zoo, tmp_path / "both", ["dam", "task_arithmetic_dam_coefficients"], capsys)
    assert err.count("calibrating") == 1
    # without it, the row calibrates the dam masks itself: the same run, so the same file
    out = tmp_path / "alone"
    err = _bench(zoo, out, ["task_arithmetic_dam_coefficients"], capsys)
    assert err.count("calibrating") == 1 and "dam-calibration.masks.safetensors" in err
    work = out / "work" / "seed0"
    dam = MaskFile(work / "dam-calibration.masks.safetensors")
    ones = MaskFile(work / "task_arithmetic_dam_coefficients.masks.safetensors")
    earlier = MaskFile(tmp_path / "both" / "work" / "seed0" / "dam-calibration.masks.safetensors")
    names = dam.names
    base, experts = _models(zoo, names)
    merged = load_tensors(
        str(out / "models" / "seed0" / "task_arithmetic_dam_coefficients"), names, CPU
    )
    rescaled = False
    for name in names:
        torch.testing.assert_close(dam.coefficients(name), earlier.coefficients(name))
        assert ones.m1(name) is None and all(ones.m2(name, i) is None for i in range(2))
        # the written coefficient is c_i / mean(M1 * M2_i): multiply the kept share back in
        kept = torch.tensor([dam.kept_fraction(name, i) for i in range(len(experts))])
        learned = dam.coefficients(name) * kept
        rescaled |= bool((kept < 1).any())
        assert ((learned >= 0) & (learned <= 0.3 + 1e-6)).all()  # DAM's coef_range
        torch.testing.assert_close(ones.coefficients(name), learned)
        expected = base[name] + sum(
            c * (e[name] - base[name]) for c, e in zip(learned, experts, strict=True)
        )
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    assert rescaled  # the masks dropped entries, so dividing the rescaling out mattered


def test_learned_coefficients_refuses_a_file_calibration_did_not_write(tmp_path):
    """Only a mode-dam calibration says which rescaling is folded into its coefficients."""
    from dam_mergekit.errors import DamError
    from dam_mergekit.lab.bench import learned_coefficients
    from dam_mergekit.masks import MaskSet, ModelRecord, write_mask_file

    path = write_mask_file(
        tmp_path / "init.masks.safetensors",
        MaskSet(),
        base=ModelRecord("base", "sha256:0"),
        experts=[ModelRecord("expert", "sha256:1")],
        tensor_shapes={"w": [2, 2]},
        settings={"source": "masks init"},
    )
    with pytest.raises(DamError, match="not a mask file of a mode-dam calibration"):
        learned_coefficients(MaskFile(path))
