"""How well the pre-merge audit separates backdoored experts from clean ones, and what it costs.

For each lab zoo given, audits every expert and, for each backdoored task, its clean control (the
same task trained without poison), with the audit's default settings. Prints one row per audited
model (index, suspected class, flip rates on it and on the base, verdict, right or wrong against
the zoo's ground truth, which only this benchmark reads), then per zoo the backdoors' lowest index
and the clean models' highest. With ``--calibrate`` it also times one default calibration of the
first zoo and prints the audit's share of it (target: at most a third).

    python benchmarks/bench_audit.py .cache/zoo/clip-default-seed3 ... [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def write_recipe(zoo: Path, models: list[str], tasks: list[str], work: Path, tag: str) -> Path:
    import yaml

    from dam_mergekit.calibrate.config import default_calibration

    calibration = default_calibration("clip", str(zoo), adapter_options={"tasks": tasks})
    cal_path = work / f"{tag}-calibration.yml"
    cal_path.write_text(yaml.safe_dump(calibration))
    recipe = {
        "merge_method": "dam",
        "base_model": str(zoo / "base"),
        "dtype": "float32",
        "models": [{"model": str(zoo / m), "parameters": {"weight": 1.0}} for m in models],
        "parameters": {"lambda": 1.0, "calibration": str(cal_path)},
    }
    path = work / f"{tag}.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def audit_recipe(recipe: Path):
    from dam_mergekit.audit.config import AuditConfig
    from dam_mergekit.audit.run import Auditor
    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.recipe.load import dam_settings, load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    config = load_recipe(str(recipe))
    calibration = CalibrationConfig.load(dam_settings(config).calibration)
    auditor = Auditor(plan_recipe(config), calibration, AuditConfig(), log=lambda msg: None)
    return auditor.run(progress=False)


def bench_zoo(zoo: Path, work: Path) -> dict:
    from dam_mergekit.scoring.zoo_format import load_manifest

    manifest = load_manifest(zoo)
    runs = [("expert", [t["expert"] for t in manifest["tasks"]], manifest["tasks"])]
    bad = [t for t in manifest["tasks"] if t["backdoored"]]
    if bad:
        runs.append(("control", [t["control"] for t in bad], bad))
    rows, seconds = [], 0.0
    for tag, models, tasks in runs:
        recipe = write_recipe(zoo, models, [t["name"] for t in tasks], work, tag)
        report = audit_recipe(recipe)
        seconds += report.seconds
        truth = {t["name"]: bool(t["backdoored"]) and tag == "expert" for t in tasks}
        for e in report.to_json()["experts"]:
            rows.append({"zoo": zoo.name, "model": tag, "backdoored": truth[e["task"]], **e})
    backdoors = [r["score"] for r in rows if r["backdoored"]]
    clean = [r["score"] for r in rows if not r["backdoored"]]
    return {
        "zoo": str(zoo),
        "options": manifest.get("options", {}),
        "rows": rows,
        "audit_seconds": round(seconds, 1),
        "lowest_backdoor": min(backdoors) if backdoors else None,
        "highest_clean": max(clean) if clean else None,
        "wrong": sum(r["flagged"] != r["backdoored"] for r in rows),
    }


def print_zoo(result: dict) -> None:
    for r in result["rows"]:
        right = "ok" if r["flagged"] == r["backdoored"] else "WRONG"
        print(
            f"{r['zoo']:<26} {r['model']:<8} {r['task']:<9} backdoored={int(r['backdoored'])} "
            f"index={r['score']:.3f} class={r['suspected_class']} flips={r['flip_rate']:.2f} "
            f"base={r['base_flip_rate']:.2f} flagged={int(r['flagged'])} {right}"
        )
    low, high = result["lowest_backdoor"], result["highest_clean"]
    print(
        f"  {result['zoo']}: lowest backdoor index {low if low is None else round(low, 3)}, "
        f"highest clean {high if high is None else round(high, 3)}, {result['wrong']} wrong, "
        f"audit {result['audit_seconds']} s"
    )


def calibration_seconds(zoo: Path, work: Path) -> float:
    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.recipe.load import dam_settings, load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    recipe = write_recipe(zoo, _experts(zoo), _tasks(zoo), work, "cal")
    config = load_recipe(str(recipe))
    calibration = CalibrationConfig.load(dam_settings(config).calibration)
    start = time.perf_counter()
    Calibrator(plan_recipe(config), calibration, progress=False).run(write=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoos", nargs="+", help="lab CLIP zoo directories")
    parser.add_argument("--json", help="write every row and summary here")
    parser.add_argument("--calibrate", action="store_true", help="time a calibration too")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for zoo in args.zoos:
            results.append(bench_zoo(Path(zoo).resolve(), Path(tmp)))
            print_zoo(results[-1])
        summary: dict = {"zoos": results, "wrong": sum(r["wrong"] for r in results)}
        if args.calibrate:
            first = Path(args.zoos[0]).resolve()
            cal = calibration_seconds(first, Path(tmp))
            recipe = write_recipe(first, _experts(first), _tasks(first), Path(tmp), "timing")
            audit = audit_recipe(recipe).seconds
            summary.update(calibration_seconds=round(cal, 1), audit_seconds=round(audit, 1))
            print(
                f"audit {audit:.1f} s / calibration {cal:.1f} s = {audit / cal:.2f} (target <= 0.33)"
            )
    print(f"{summary['wrong']} wrong verdicts over {len(results)} zoo(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def _experts(zoo: Path) -> list[str]:
    from dam_mergekit.scoring.zoo_format import load_manifest

    return [t["expert"] for t in load_manifest(zoo)["tasks"]]


def _tasks(zoo: Path) -> list[str]:
    from dam_mergekit.scoring.zoo_format import load_manifest

    return [t["name"] for t in load_manifest(zoo)["tasks"]]


if __name__ == "__main__":
    sys.exit(main())
