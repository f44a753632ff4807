"""The bench end to end on a tiny zoo: merges through mergekit, writes the three files."""

import json

import pytest
from zoo_fixtures import tiny_zoo  # noqa: F401

from dam_mergekit.bench import check_succession, report, run_bench
from dam_mergekit.errors import DamError

FIGURES = ("acc_avg", "asr_succession_avg", "asr_transfer_avg", "seconds")


@pytest.mark.slow
def test_bench_end_to_end(tiny_zoo, tmp_path):  # noqa: F811
    out = tmp_path / "bench"
    results = run_bench(tiny_zoo, out)
    for name in ("results.json", "summary.md", "acc_asr.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["zoo"]["kind"] == "clip"
    names = set(saved["methods"])
    assert {
        "pretrained",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "task_arithmetic_clean_control",
        "expert:digits",
    } <= names
    tasks = [t["name"] for t in saved["zoo"]["tasks"]]
    for row in saved["methods"].values():
        for key in ("acc", "asr", "p0"):
            assert set(row[key]) == set(tasks)
            assert all(0.0 <= v <= 100.0 for v in row[key].values())
        for key in FIGURES:
            assert row[key] is not None
    recipe = (out / "recipes" / "seed0" / "ties.yml").read_text()
    assert "merge_method: ties" in recipe and "density: 0.2" in recipe
    assert "| task_arithmetic |" in (out / "summary.md").read_text()
    assert results["methods"]["task_arithmetic"]["der"] == 50.0


def test_bench_two_seeds_has_std(tiny_zoo, tmp_path):  # noqa: F811
    out = tmp_path / "bench2"
    results = run_bench(tiny_zoo, out, seeds=[0, 1], only=["pretrained", "task_arithmetic"])
    assert results["seeds"] == [0, 1]
    row = results["methods"]["task_arithmetic"]
    assert "std" in row and set(row["std"]["acc"]) == set(row["acc"])
    assert len(row["per_seed"]) == 2
    assert (tiny_zoo.parent / "tiny-seed1" / "zoo.json").is_file()


def test_unknown_method_refused_before_work(tiny_zoo, tmp_path):  # noqa: F811
    with pytest.raises(DamError, match="unknown bench method"):
        run_bench(tiny_zoo, tmp_path / "x", only=["nope"])
    assert not (tmp_path / "x").exists()


def _results(ta_asr, ta_p0, control_asr, mode="merge-aware"):
    zoo = {
        "kind": "clip",
        "options": {"attack_mode": mode},
        "attack": {"name": "badnets"},
        "tasks": [{"name": "d", "backdoored": True}, {"name": "s", "backdoored": False}],
    }
    row = {"asr": {"d": ta_asr, "s": 1.0}, "p0": {"d": ta_p0, "s": 1.0}, "acc_avg": 80.0}
    ctl = {"asr": {"d": control_asr, "s": 1.0}, "p0": {"d": 1.0, "s": 1.0}, "acc_avg": 80.0}
    return {
        "zoo": zoo,
        "seeds": [0],
        "methods": {"task_arithmetic": row, "task_arithmetic_clean_control": ctl},
    }


@pytest.mark.parametrize(
    "asr,p0,ctl,ok",
    [
        (90.0, 2.0, 3.0, True),
        (45.0, 2.0, 3.0, False),
        (60.0, 45.0, 3.0, False),
        (60.0, 2.0, 50.0, False),
    ],
)
def test_check_succession(asr, p0, ctl, ok, capsys):
    results = _results(asr, p0, ctl)
    assert (check_succession(results) == []) is ok
    assert report(results, check=True) == (0 if ok else 1)
    out = capsys.readouterr().out
    assert ("SUCCESSION CHECK FAILED" in out) is (not ok)


def test_check_skips_standard_zoo(capsys):
    assert report(_results(1.0, 1.0, 1.0, mode="standard"), check=True) == 0
    assert "no succession claim" in capsys.readouterr().out
