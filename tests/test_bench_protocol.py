"""The lab's protocol: seed splits, calibration seeds apart from zoo seeds, the undefended rows a
defense is judged against, and the distill row (the calibration's clean objective alone)."""

import pytest

from dam_mergekit.errors import DamError
from dam_mergekit.lab.bench.report import against_best_undefended
from dam_mergekit.lab.bench.runner import calibration_seeds_for
from dam_mergekit.lab.protocol import (
    DEVELOPMENT_SEEDS,
    TEST_SEEDS,
    best_undefended,
    calibration_seed,
    seed_split,
)


def test_development_and_test_seeds_are_disjoint_and_named():
    assert not set(DEVELOPMENT_SEEDS) & set(TEST_SEEDS)
    assert [seed_split(s) for s in (0, 2, 3, 7, 8)] == [
        "development",
        "development",
        "test",
        "test",
        "extra",
    ]


def test_calibration_seeds_never_equal_the_zoo_seed():
    assert calibration_seeds_for([0, 3], None) == {0: calibration_seed(0), 3: calibration_seed(3)}
    assert all(calibration_seed(s) != s for s in range(100))
    assert calibration_seeds_for([0, 3], [7]) == {0: 7, 3: 7}
    assert calibration_seeds_for([0, 3], [5, 9]) == {0: 5, 3: 9}
    with pytest.raises(DamError, match="2 seeds for 3 zoo seeds"):
        calibration_seeds_for([0, 1, 2], [5, 9])
    with pytest.raises(DamError, match="calibration seed 3 equals its zoo seed"):
        calibration_seeds_for([0, 3], [5, 3])


def test_bench_refuses_a_seed_in_its_calibration_settings(tmp_path):
    from dam_mergekit.lab.bench.runner import _check_calibration

    with pytest.raises(DamError, match="--calib-seeds"):
        _check_calibration({"seed": 4})


def test_best_undefended_counts_distill_and_not_the_defenses():
    rows = {
        "task_arithmetic": {"acc_avg": 50.0},
        "distill": {"acc_avg": 68.0},
        "dam": {"acc_avg": 90.0},
        "task_arithmetic_clean_control": {"acc_avg": 95.0},
    }
    assert best_undefended(rows) == "distill"


def _run(asr, p0, acc):
    return {"asr_succession_avg": asr, "p0_succession_avg": p0, "acc_avg": acc}


def test_dam_is_reported_against_each_seeds_best_undefended_merge():
    ta = [_run(80.0, 2.0, 50.0), _run(80.0, 2.0, 70.0)]
    distill = [_run(70.0, 2.0, 68.0), _run(70.0, 2.0, 60.0)]
    dam = [_run(30.0, 2.0, 67.5), _run(30.0, 2.0, 65.0)]
    results = {
        "seeds": [0, 3],
        "methods": {
            "task_arithmetic": {"per_seed": ta},
            "distill": {"per_seed": distill},
            "dam": {"per_seed": dam},
        },
    }
    lines = against_best_undefended(results)
    assert lines[0].startswith("seed 0:") and "against distill" in lines[0]
    assert lines[0].endswith("holds")  # 40 points cut at 0.5 pp
    # seed 3: task arithmetic is the more accurate undefended merge, and dam costs 5 pp
    assert "against task_arithmetic" in lines[1] and lines[1].endswith("misses the cut")
    dam[0]["acc_avg"] = 66.0  # 2 pp below distill
    assert against_best_undefended(results)[0].endswith("misses the cut")


def test_distill_row_learns_the_clean_objective_alone(tmp_path):
    """alpha 0 searches no trigger: no flips, no perturbation, no safety loss in the history,
    while the masks and coefficients still learn."""
    from _calib_fixtures import FAST, write_clip_zoo, write_recipe

    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.lab.bench.methods import _LEARNED_MERGES
    from dam_mergekit.recipe.load import dam_settings, load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    zoo = write_clip_zoo(tmp_path)
    config = load_recipe(write_recipe(tmp_path, zoo, {**FAST, **_LEARNED_MERGES["distill"]}))
    cal = CalibrationConfig.load(dam_settings(config).calibration)
    assert cal.alpha == 0.0 and cal.perf_loss == "distill"
    result = Calibrator(plan_recipe(config), cal, progress=False).run(write=False)
    assert all(r["flips"] == 0.0 and r["L_safe"] == 0.0 for r in result.history)
    assert all(r[k] == 0.0 for r in result.history for k in r if k.startswith("delta_norm"))
    assert result.history[-1]["m1_keep"] < result.history[0]["m1_keep"]  # the masks learned
