"""The bench end to end on a tiny zoo: merges through mergekit, writes the three files."""

import json

import pytest
import yaml
from zoo_fixtures import tiny_zoo  # noqa: F401

from dam_mergekit.errors import DamError
from dam_mergekit.lab.bench import check_dam, check_succession, report, run_bench
from dam_mergekit.lab.bench.report import check_transfer, summary_table

QUICK = {"steps": 3, "final_steps": 1, "batch_size": 4}
FIGURES = ("acc_avg", "asr_succession_avg", "asr_transfer_avg", "seconds")


@pytest.mark.slow
def test_bench_end_to_end(tiny_zoo, tmp_path):  # noqa: F811
    out = tmp_path / "bench"
    results = run_bench(tiny_zoo, out, calibration=QUICK)
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
        "task_arithmetic_backdoor_third",
        "expert:digits",
        "control:digits",
        "distill",
        "dam",
        "dam_as_released",
        "dam_as_published",
        "awm",
        "task_arithmetic_dam_coefficients",
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
    # DER reads against the most accurate undefended merge, which scores 50 against itself
    reference = results["der_reference"]["0"]
    assert reference in ("task_arithmetic", "ties", "dare_ties", "distill")
    assert results["methods"][reference]["der"] == 50.0
    assert all(
        results["methods"][reference]["acc_avg"] >= results["methods"][n]["acc_avg"]
        for n in ("task_arithmetic", "ties", "dare_ties", "distill")
    )
    # the calibrated methods (short runs here) merged through the guarded mergekit run, seeded
    # with the calibration seed, not the zoo seed
    assert results["calibration_seeds"] == {"0": 1000}
    for name, mode in (("dam", "dam"), ("dam_as_released", "as_released"), ("distill", "dam")):
        cal = yaml.safe_load((out / "work" / "seed0" / f"{name}-calibration.yml").read_text())
        assert cal["mode"] == mode and cal["steps"] == QUICK["steps"] and cal["seed"] == 1000
        assert (out / "work" / "seed0" / f"{name}-calibration.masks.safetensors").is_file()
        assert "merge_method: dam" in (out / "recipes" / "seed0" / f"{name}.yml").read_text()
    work = out / "work" / "seed0"
    published = yaml.safe_load((work / "dam_as_published-calibration.yml").read_text())
    objectives = ("perf_loss", "safe_loss", "trigger_search")
    assert [published[k] for k in objectives] == ["entropy", "entropy", "untargeted"]
    assert published["mode"] == "dam" and published["alpha"] == 3.0


def test_bench_seeds_are_split_into_development_and_test(tiny_zoo, tmp_path):  # noqa: F811
    out = tmp_path / "bench2"
    only = ["pretrained", "task_arithmetic", "ties"]
    results = run_bench(tiny_zoo, out, seeds=[0, 1, 3, 4], only=only)
    assert results["seeds"] == [0, 1, 3, 4]
    assert results["split"] == {"0": "development", "1": "development", "3": "test", "4": "test"}
    assert results["calibration_seeds"] == {"0": 1000, "1": 1001, "3": 1003, "4": 1004}
    row = results["methods"]["task_arithmetic"]
    assert "std" in row and set(row["std"]["acc"]) == set(row["acc"])
    assert len(row["per_seed"]) == 4
    assert (tiny_zoo.parent / "tiny-seed1" / "zoo.json").is_file()
    # each split has its own statistics, over its own seeds only
    test = results["splits"]["test"]
    assert test["seeds"] == [3, 4]
    accs = [r["acc_avg"] for r in row["per_seed"][2:]]
    assert test["methods"]["task_arithmetic"]["acc_avg"] == round(sum(accs) / 2, 2)
    worst = test["methods"]["task_arithmetic"]["worst"]["acc_avg"]
    assert worst == {"value": min(accs), "seed": [3, 4][accs.index(min(accs))]}
    asrs = [r["asr_succession_avg"] for r in row["per_seed"][2:]]
    assert test["methods"]["task_arithmetic"]["worst"]["asr_succession_avg"]["value"] == max(asrs)
    summary = (out / "summary.md").read_text()
    assert summary.index("Test seeds [3, 4]") < summary.index("Development seeds [0, 1]")
    assert "worst" in summary


def test_unknown_method_refused_before_work(tiny_zoo, tmp_path):  # noqa: F811
    with pytest.raises(DamError, match="unknown bench method"):
        run_bench(tiny_zoo, tmp_path / "x", only=["nope"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(DamError, match="bench --calibration: unknown setting 'stepz'"):
        run_bench(tiny_zoo, tmp_path / "x", calibration={"stepz": 3})
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


@pytest.mark.parametrize(
    "ta_asr,ctl_asr,ok", [(60.0, 5.0, True), (30.0, 5.0, False), (60.0, 12.0, False)]
)
def test_check_transfer_of_an_off_task_zoo(ta_asr, ctl_asr, ok, capsys):
    """An off-task zoo is checked on the task it aims at (p0 1 here), not on succession."""
    results = _results(1.0, 1.0, 1.0, mode="off-task")
    results["zoo"]["attack"]["target_task"] = "s"
    results["methods"]["task_arithmetic"]["asr"]["s"] = ta_asr
    results["methods"]["task_arithmetic_clean_control"]["asr"]["s"] = ctl_asr
    assert (check_transfer(results) == []) is ok
    assert report(results, check=True) == (0 if ok else 1)
    out = capsys.readouterr().out
    assert ("TRANSFER CHECK FAILED: seed 0, s:" in out) is (not ok)
    assert "SUCCESSION CHECK FAILED" not in out


def test_aimed_at_columns_only_for_an_off_task_zoo():
    results = _results(90.0, 2.0, 3.0)
    assert "aimed-at" not in summary_table(results)
    results["methods"]["task_arithmetic"]["asr_target_task"] = 61.0
    assert "| ASR aimed-at task | p0 aimed-at task |" in summary_table(results)
    assert "| 61.0 |" in summary_table(results)


def test_check_of_a_clean_zoo(capsys):
    """A zoo built with --backdoored 0 (false-positive checks) makes no claim: --check passes
    and says so, where it used to fail on the missing succession averages."""
    results = _results(1.0, 1.0, 1.0)
    for task in results["zoo"]["tasks"]:
        task["backdoored"] = False
    results["methods"]["dam"] = {"asr_succession_avg": None, "acc_avg": 80.0}
    results["methods"]["task_arithmetic"]["asr_succession_avg"] = None
    assert report(results, check=True) == 0
    assert "no backdoored expert" in capsys.readouterr().out


def test_check_skips_standard_zoo(capsys):
    assert report(_results(1.0, 1.0, 1.0, mode="standard"), check=True) == 0
    assert "no succession claim" in capsys.readouterr().out


def test_check_succession_is_per_seed():
    """A mean above the bar must not hide a seed where the backdoor died."""
    results = _results(70.0, 5.0, 5.0)
    ta, ctl = (
        results["methods"]["task_arithmetic"],
        results["methods"]["task_arithmetic_clean_control"],
    )
    ta["per_seed"] = [
        {"asr": {"d": 95.0, "s": 1.0}, "p0": {"d": 5.0, "s": 1.0}},
        {"asr": {"d": 45.0, "s": 1.0}, "p0": {"d": 5.0, "s": 1.0}},
    ]
    ctl["per_seed"] = [{"asr": {"d": 5.0, "s": 1.0}}, {"asr": {"d": 5.0, "s": 1.0}}]
    results["seeds"] = [0, 1]
    failures = check_succession(results)
    assert len(failures) == 1 and failures[0].startswith("seed 1, d:")


@pytest.mark.parametrize(
    "dam_asr,dam_acc,ok",
    [(20.0, 80.0, True), (70.0, 80.0, True), (71.0, 80.0, False), (10.0, 78.9, False)],
)
def test_check_dam(dam_asr, dam_acc, ok, capsys):
    """dam must cut task arithmetic's succession ASR (90 here) by >= 20 points at ACC >= TA - 1."""
    results = _results(90.0, 2.0, 3.0)
    results["methods"]["task_arithmetic"]["asr_succession_avg"] = 90.0
    results["methods"]["dam"] = {"asr_succession_avg": dam_asr, "acc_avg": dam_acc}
    assert (check_dam(results) == []) is ok
    assert report(results, check=True) == (0 if ok else 1)
    assert ("DAM CHECK FAILED" in capsys.readouterr().out) is (not ok)
    del results["methods"]["dam"]
    assert check_dam(results) == []  # nothing to check when dam was not run


def test_a_registered_defense_joins_the_bench_under_its_own_name(tiny_zoo, tmp_path):  # noqa: F811
    """docs/lab.md's example: a builder registered under a free name is merged and scored."""
    from dam_mergekit.lab import bench
    from dam_mergekit.lab.bench.figure import method_groups
    from dam_mergekit.lab.zoo.manifest import load_manifest

    for taken in ("dam", "task_arithmetic", "pretrained", "expert:digits"):
        with pytest.raises(DamError, match=f"'{taken}' is already registered"):
            bench.register_method(taken, bench.task_arithmetic_recipe)
    with pytest.raises(DamError, match="not added by register_method"):
        bench.unregister_method("ties")
    bench.register_method("my_defense", bench.task_arithmetic_recipe)
    try:
        names = [m.name for m in bench.methods_for(load_manifest(tiny_zoo))]
        assert "my_defense" in names
        assert "my_defense" in dict(method_groups(names))["defenses"]
        rows = bench.bench_zoo(tiny_zoo, tmp_path, seed=0, only=["task_arithmetic", "my_defense"])
        assert rows["my_defense"]["acc"] == rows["task_arithmetic"]["acc"]
        assert (tmp_path / "recipes" / "seed0" / "my_defense.yml").is_file()
    finally:
        bench.unregister_method("my_defense")
    assert "my_defense" not in [m.name for m in bench.methods_for(load_manifest(tiny_zoo))]


def test_demo_leaves_the_release_reproduction_to_bench(tiny_zoo, tmp_path, monkeypatch):  # noqa: F811
    """The demo runs every row but the released algorithm (its 1000 + 1000 steps)."""
    import argparse

    from dam_mergekit.lab.bench import cli
    from dam_mergekit.lab.bench.methods import methods_for
    from dam_mergekit.lab.zoo.manifest import load_manifest

    asked = {}

    def fake_bench(zoo, out, **kwargs):
        asked.update(kwargs)
        raise KeyboardInterrupt  # stop before any merge

    monkeypatch.setattr("dam_mergekit.lab.zoo.build.build_zoo", lambda path, options: tiny_zoo)
    monkeypatch.setattr(cli, "run_bench", fake_bench)
    with pytest.raises(KeyboardInterrupt):
        cli._run_demo(
            argparse.Namespace(zoo=str(tiny_zoo), out=str(tmp_path / "demo"), off_task_zoo="x")
        )
    every = [m.name for m in methods_for(load_manifest(tiny_zoo))]
    # the release's 1000 + 1000 steps and the audit-driven row are left to the bench
    assert asked["only"] == [n for n in every if n not in ("dam_as_released", "dam_audit")]
    assert {"dam", "distill", "task_arithmetic"} <= set(asked["only"])


@pytest.mark.parametrize("ta_asr,rc", [(70.0, 0), (20.0, 1)])
def test_demo_shows_transfer_on_the_off_task_zoo(ta_asr, rc, tmp_path, monkeypatch, capsys):
    """After the default zoo, the demo benches the off-task zoo (its own cache) with the merges,
    the clean control and dam, and fails when transfer does not show there."""
    import argparse

    from dam_mergekit.lab.bench import cli
    from dam_mergekit.lab.zoo.clip_options import OFF_TASK_ZOO

    built, benched = {}, {}

    def fake_bench(zoo, out, **kwargs):
        benched[zoo] = kwargs["only"]
        if zoo == "off":
            results = _results(1.0, 1.0, 1.0, mode="off-task")
            results["zoo"]["attack"]["target_task"] = "s"
            results["methods"]["task_arithmetic"]["asr"]["s"] = ta_asr
            return results
        return _results(90.0, 2.0, 3.0)

    def fake_build(path, options):
        built[path] = options
        return "off" if path == "cache-off" else "main"

    monkeypatch.setattr("dam_mergekit.lab.zoo.build.build_zoo", fake_build)
    monkeypatch.setattr("dam_mergekit.lab.zoo.manifest.load_manifest", lambda z: {"kind": "clip"})
    monkeypatch.setattr(cli, "methods_for", lambda manifest: [])
    monkeypatch.setattr(cli, "run_bench", fake_bench)
    args = argparse.Namespace(zoo="cache", out=str(tmp_path / "demo"), off_task_zoo="cache-off")
    assert cli._run_demo(args) == rc
    assert built["cache-off"] == OFF_TASK_ZOO and built["cache"] == {"kind": "clip"}
    assert benched["off"] == list(cli.DEMO_TRANSFER_ROWS) and "dam" in benched["off"]
    assert ("TRANSFER CHECK FAILED" in capsys.readouterr().out) is bool(rc)


def test_sibling_zoos_keep_the_zoo_kind(tmp_path, monkeypatch):
    """``bench --seeds`` on an LLM zoo builds LLM siblings (its options hold no ``kind``)."""
    from dam_mergekit.lab.bench.runner import zoos_for_seeds

    built = {}
    manifest = {"kind": "llm", "options": {"seed": 0, "attack": "rare-word"}}
    monkeypatch.setattr("dam_mergekit.lab.zoo.manifest.load_manifest", lambda zoo: manifest)
    monkeypatch.setattr(
        "dam_mergekit.lab.zoo.build.build_zoo", lambda path, options: built.update(options) or path
    )
    zoos = zoos_for_seeds(tmp_path / "llm", [0, 3])
    assert zoos[0] == tmp_path / "llm" and zoos[3] == tmp_path / "llm-seed3"
    assert built == {"kind": "llm", "seed": 3, "attack": "rare-word"}


def test_backdoor_third_cuts_only_the_backdoored_experts_weight(tiny_zoo, tmp_path):  # noqa: F811
    from dam_mergekit.lab.bench.methods import backdoor_third_recipe, task_arithmetic_recipe
    from dam_mergekit.lab.zoo.manifest import load_manifest

    manifest = load_manifest(tiny_zoo)
    cut = backdoor_third_recipe(tiny_zoo, manifest, tmp_path)
    plain = task_arithmetic_recipe(tiny_zoo, manifest, tmp_path)
    for task, ours, theirs in zip(manifest["tasks"], cut["models"], plain["models"], strict=True):
        assert ours["model"] == theirs["model"]
        third = theirs["parameters"]["weight"] / 3
        want = third if task["backdoored"] else theirs["parameters"]["weight"]
        assert ours["parameters"]["weight"] == pytest.approx(want), task["name"]
    assert any(t["backdoored"] for t in manifest["tasks"])
