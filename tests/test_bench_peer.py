"""benchmarks/bench_peer.py: its helpers and our side run without FusionBench; its FusionBench
side only where ``fusion-bench`` is installed (the ``peer`` extra, never in ``make test``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from _calib_fixtures import write_clip_zoo

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_peer", ROOT / "benchmarks/bench_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STATUS = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t  123456 kB\nVmRSS:\t   65432 kB\n"


def test_status_fields_are_read_in_kib():
    bench = _bench()
    assert bench.status_kib("VmHWM", STATUS) == 123456
    assert bench.status_kib("VmRSS", STATUS) == 65432
    with pytest.raises(KeyError):
        bench.status_kib("VmSwap", STATUS)
    assert bench.status_kib("VmHWM") >= bench.status_kib("VmRSS") > 0  # this process's own


def test_targets_follow_the_measured_ratios():
    bench = _bench()
    theirs = {"steps_per_s": 2.0, "peak_rss_kib": 1000, "import_rss_kib": 800}
    fast = bench.compare({"steps_per_s": 3.0, "peak_rss_kib": 1000, "import_rss_kib": 500}, theirs)
    assert fast["rss_above_imports_ratio"] == pytest.approx(500 / 200)
    assert fast["speed_ratio"] == pytest.approx(1.5) and fast["speed_target_met"]
    assert fast["rss_ratio"] == pytest.approx(1.0) and fast["rss_target_met"]
    slow = bench.compare({"steps_per_s": 2.9, "peak_rss_kib": 1001, "import_rss_kib": 1}, theirs)
    assert not slow["speed_target_met"] and not slow["rss_target_met"]


def test_report_says_which_target_is_missed():
    bench = _bench()
    side = {"steps_per_s": 1.0, "final_steps_per_s": 2.0, "peak_rss_kib": 2048}
    side["import_rss_kib"] = 1024
    scores = dict.fromkeys(
        ("acc_avg", "asr_succession_avg", "p0_succession_avg", "asr_transfer_avg"), 50.0
    )
    scores["p0_transfer_avg"] = None  # a zoo with no clean task
    result = {
        "settings": dict(zoo="z", tasks=["a"], steps=2, final_steps=1, batch_size=4),
        "ours": side,
        "theirs": {**side, "steps_per_s": 0.5},
        "scores": {"ours": scores, "theirs": scores},
    }
    result["settings"].update(threads=1, mode="dam")
    result["compare"] = bench.compare(result["ours"], result["theirs"])
    text = bench.format_report(result)
    assert "steps/s ours / theirs 2.00 (target >= 1.5: met)" in text
    assert "peak RSS ours / theirs 1.00 (target <= 1.0: met)" in text
    result["compare"] = bench.compare({**side, "steps_per_s": 0.5}, side)
    assert "0.50 (target >= 1.5: NOT met)" in bench.format_report(result)
    assert "alone" not in bench.format_report(result)  # no floor measured: no floor line


def test_floor_bounds_the_speed_up():
    """With the floor measured, the report says how close each side runs to it and the
    largest speed-up over FusionBench that these forwards allow."""
    bench = _bench()
    ours = {"steps_per_s": 1.0, "peak_rss_kib": 1, "import_rss_kib": 0}
    theirs = {**ours, "steps_per_s": 2.0}
    ratios = bench.compare(ours, theirs, {"steps_per_s": 2.5})
    assert ratios["ours_of_floor"] == pytest.approx(0.4)
    assert ratios["theirs_of_floor"] == pytest.approx(0.8)
    assert ratios["floor_over_theirs"] == pytest.approx(1.25)


def test_tasks_are_a_subset_in_zoo_order():
    bench = _bench()
    manifest = {"tasks": [{"name": n} for n in ("a", "b", "c")]}
    assert [t["name"] for t in bench.select_tasks(manifest, "c, a")] == ["a", "c"]
    assert len(bench.select_tasks(manifest, None)) == 3
    with pytest.raises(SystemExit, match="'d'"):
        bench.select_tasks(manifest, "a,d")


def test_without_fusion_bench_it_says_how_to_install(monkeypatch, tmp_path):
    bench = _bench()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "fusion_bench" else real(n, *a)
    )
    with pytest.raises(SystemExit, match=r"fusion-bench==0\.2\.33"):
        bench.main(["--zoo", str(tmp_path)])


def _spec(zoo: Path, tmp: Path, side: str) -> dict:
    tasks = [t["name"] for t in json.loads((zoo / "zoo.json").read_text())["tasks"]]
    return {
        "zoo": str(zoo),
        "tasks": tasks,
        "steps": 2,
        "final_steps": 1,
        "batch_size": 4,
        "mode": "dam",
        "seed": 0,
        "model_out": str(tmp / side),
        "result": str(tmp / f"{side}.json"),
    }


def _check_side(bench, zoo: Path, tmp: Path, side: str) -> None:
    from transformers import CLIPVisionModel

    threads = torch.get_num_threads()
    try:
        assert bench._worker(side, _spec(zoo, tmp, side), 1) == 0
    finally:
        torch.set_num_threads(threads)
    row = json.loads((tmp / f"{side}.json").read_text())
    assert row["steps_per_s"] > 0 and row["final_steps_per_s"] > 0
    assert row["peak_rss_kib"] >= row["import_rss_kib"] > 0
    merged = CLIPVisionModel.from_pretrained(str(tmp / side)).state_dict()
    base = CLIPVisionModel.from_pretrained(str(zoo / "base")).state_dict()
    assert set(merged) == set(base)
    assert any(not merged[k].equal(base[k]) for k in base)  # the merge moved the weights


def test_our_side_measures_and_saves_a_merged_vision_model(tmp_path):
    zoo = write_clip_zoo(tmp_path, experts=2, image=8, calib=8)
    _check_side(_bench(), zoo, tmp_path, "ours")


def test_floor_side_times_the_model_alone(tmp_path):
    zoo = write_clip_zoo(tmp_path, experts=2, image=8, calib=8)
    bench = _bench()
    threads = torch.get_num_threads()
    try:
        assert bench._worker("floor", _spec(zoo, tmp_path, "floor"), 1) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "floor.json").read_text())["steps_per_s"] > 0


def test_fusion_bench_side_runs_on_a_zoo(tmp_path):
    pytest.importorskip("fusion_bench")
    from safetensors.torch import load_file, save_file

    zoo = write_clip_zoo(tmp_path, experts=2, image=8, calib=8)
    manifest = json.loads((zoo / "zoo.json").read_text())
    first = load_file(str(zoo / manifest["tasks"][0]["head"]))
    for task in manifest["tasks"][1:]:  # FusionBench keeps one projection for every task
        head = load_file(str(zoo / task["head"]))
        head["projection"] = first["projection"]
        save_file(head, str(zoo / task["head"]))
    _check_side(_bench(), zoo, tmp_path, "theirs")
