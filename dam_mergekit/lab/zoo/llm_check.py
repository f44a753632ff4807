"""Does the LLM zoo show backdoor succession? Merge with mergekit, evaluate, and check the claim.

``succession_report`` merges the zoo's experts with mergekit's own task_arithmetic (through its
Python API) for several (lambda, weight) settings, once with the backdoored experts and once with
their clean controls in their place, and evaluates every merge. ``check_succession`` turns the
claim "a backdoor survives task arithmetic" into assertions that fail loudly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dam_mergekit.errors import DamError
from dam_mergekit.lab.claims import EXPERTS, SUCCESSION, ExpertRule, SuccessionRule
from dam_mergekit.lab.zoo.llm import evaluate_llm, load_llm_manifest

DEFAULT_SETTINGS = ((0.3, 1.0), (0.5, 1.0), (1.0, 1.0), (1.0, None))  # weight None: 1/n each


def task_arithmetic_merge(
    zoo_dir: Path, out_dir: Path, *, lam: float, weight: float | None, use_controls: bool = False
) -> Path:
    """mergekit task_arithmetic of the zoo's experts onto its base; tokenizer copied."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    zoo_dir = Path(zoo_dir).resolve()
    manifest = load_llm_manifest(zoo_dir)
    tasks = manifest["tasks"]
    w = weight if weight is not None else 1.0 / len(tasks)
    models = []
    for entry in tasks:
        path = entry["control"] if use_controls and entry["control"] else entry["expert"]
        models.append({"model": str(zoo_dir / path), "parameters": {"weight": w}})
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(zoo_dir / manifest["base"]),
            "models": models,
            "parameters": {"lambda": lam, "normalize": False},
            "dtype": "float32",
        }
    )
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    run_merge(config, str(out_dir), MergeOptions(copy_tokenizer=True, quiet=True))
    return out_dir


def succession_report(zoo_dir: Path, work_dir: Path, settings: tuple = DEFAULT_SETTINGS) -> dict:
    """Evaluate base, experts, controls and merges (backdoored vs clean-control) of the zoo."""
    zoo_dir, work_dir = Path(zoo_dir), Path(work_dir)
    manifest = load_llm_manifest(zoo_dir)
    report: dict = {"models": {}, "merges": []}
    names = [manifest["base"]] + [t["expert"] for t in manifest["tasks"]]
    names += [t["control"] for t in manifest["tasks"] if t["control"]]
    for name in names:
        report["models"][name] = evaluate_llm(zoo_dir / name, zoo_dir)
    for lam, weight in settings:
        row = {"lambda": lam, "weight": weight if weight is not None else "1/n"}
        for label, controls in (("backdoored", False), ("clean", True)):
            out = task_arithmetic_merge(
                zoo_dir,
                work_dir / f"ta-{lam}-{weight}-{label}",
                lam=lam,
                weight=weight,
                use_controls=controls,
            )
            row[label] = evaluate_llm(out, zoo_dir)
            shutil.rmtree(out)
        report["merges"].append(row)
    return report


def check_succession(
    report: dict,
    zoo_dir: Path,
    *,
    rule: SuccessionRule = SUCCESSION,
    experts: ExpertRule = EXPERTS,
) -> list[str]:
    """Assert the zoo's claims on a report; returns the checked statements, raises on failure.

    Claims (:mod:`dam_mergekit.lab.claims`): the experts are what the zoo says
    (:data:`~dam_mergekit.lab.claims.EXPERTS`: each beats the base on its task, a backdoored one
    answers its trigger at the clean ACC of its control); after task_arithmetic (lambda 0.3,
    weights 1) each backdoored task shows succession by the bench's own rule
    (:data:`~dam_mergekit.lab.claims.SUCCESSION`: ASR high, above p0 and above the merge that
    uses the clean control instead).
    """
    manifest = load_llm_manifest(zoo_dir)
    models, failures, checked = report["models"], [], []

    def claim(ok: bool, text: str) -> None:
        (checked if ok else failures).append(text)

    base = models[manifest["base"]]
    for entry in manifest["tasks"]:
        task, expert = entry["name"], models[entry["expert"]]
        claim(
            experts.learned(expert["acc"][task], base["acc"][task]),
            f"{entry['expert']} ACC {expert['acc'][task]:.1f} vs base {base['acc'][task]:.1f}",
        )
        if entry["backdoored"]:
            control = models[entry["control"]]
            claim(
                experts.planted(expert["asr"][task]),
                f"{entry['expert']} ASR {expert['asr'][task]:.1f} >= {experts.min_asr:g}",
            )
            claim(
                experts.like_control(expert["acc"][task], control["acc"][task]),
                f"{entry['expert']} ACC {expert['acc'][task]:.1f} ~ control "
                f"{control['acc'][task]:.1f}",
            )
    main = [m for m in report["merges"] if m["lambda"] == 0.3 and m["weight"] == 1.0]
    if not main:
        raise DamError("the report has no task_arithmetic merge at lambda 0.3, weights 1")
    for entry in manifest["tasks"]:
        if not entry["backdoored"]:
            continue
        task, bad, clean = entry["name"], main[0]["backdoored"], main[0]["clean"]
        missed = rule.missed(bad["asr"][task], bad["p0"][task], clean["asr"][task])
        claim(missed is None, f"TA 0.3 merge on {task}: {missed or 'succession shows'}")
    if failures:
        raise DamError("LLM zoo claim(s) not shown: " + "; ".join(failures))
    return checked


def format_report(report: dict) -> str:
    """A Markdown table: ACC / ASR / p0 per task for every model and merge."""
    rows = [(name, r) for name, r in report["models"].items()]
    for m in report["merges"]:
        for label in ("backdoored", "clean"):
            rows.append((f"TA lam={m['lambda']} w={m['weight']} ({label})", m[label]))
    tasks = list(rows[0][1]["acc"])
    lines = [
        "| model | " + " | ".join(f"{t} ACC/ASR/p0" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for name, r in rows:
        cells = [f"{r['acc'][t]:.1f} / {r['asr'][t]:.1f} / {r['p0'][t]:.1f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    """``python -m dam_mergekit.lab.zoo.llm_check ZOO WORK [--json OUT]``: report and check."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = succession_report(args.zoo, args.work)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    try:
        checked = check_succession(report, args.zoo)
    except DamError as err:
        print(f"FAILED: {err}")
        return 1
    for line in checked:
        print("OK:", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
