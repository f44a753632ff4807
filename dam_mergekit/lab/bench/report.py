"""The bench's statistics over seeds, its Markdown table, and the claims it checks."""

from __future__ import annotations

import math
import statistics
from typing import Any

from dam_mergekit.lab.claims import DAM_CUT, OFF_TASK, SUCCESSION
from dam_mergekit.lab.evaluate import target_task
from dam_mergekit.lab.protocol import best_undefended

FIGURES = (
    "acc_avg",
    "asr_succession_avg",
    "p0_succession_avg",
    "asr_transfer_avg",
    "p0_transfer_avg",
    "asr_target_task",
    "p0_target_task",
    "der",
    "seconds",
)
# columns of an off-task zoo only: the task its backdoor aims at
TARGET_FIGURES = ("asr_target_task", "p0_target_task")
# the figures whose worst seed is reported: the lowest accuracy, the highest ASRs
WORST = {
    "acc_avg": min,
    "asr_succession_avg": max,
    "asr_transfer_avg": max,
    "asr_target_task": max,
}


def aggregate(per_seed: list[dict[str, dict]], seeds: list[int] | None = None) -> dict[str, dict]:
    """Mean over seeds of every figure, with a ``std`` block beside it when there are several and,
    given the ``seeds``, a ``worst`` block: the worst seed's value of each figure in :data:`WORST`."""
    methods: dict[str, dict] = {}
    for name in per_seed[0]:
        runs = [r[name] for r in per_seed if name in r]
        ran = [s for s, r in zip(seeds or [], per_seed, strict=False) if name in r]
        row: dict[str, Any] = {}
        std: dict[str, Any] = {}
        for key in ("acc", "asr", "p0"):
            tasks = runs[0].get(key, {})
            row[key] = {t: _mean([r[key][t] for r in runs]) for t in tasks}
            std[key] = {t: _std([r[key][t] for r in runs]) for t in tasks}
        for key in FIGURES:
            if key in runs[0]:
                row[key] = _mean([r.get(key) for r in runs])
                std[key] = _std([r.get(key) for r in runs])
        if len(runs) > 1:
            row["std"] = std
            if len(ran) == len(runs):
                row["worst"] = _worst(runs, ran)
        row["per_seed"] = [
            {k: r.get(k) for k in ("acc", "asr", "p0", *FIGURES) if k in r} for r in runs
        ]
        methods[name] = row
    return methods


def _worst(runs: list[dict], seeds: list[int]) -> dict[str, dict]:
    out = {}
    for key, pick in WORST.items():
        known = [(r[key], s) for r, s in zip(runs, seeds, strict=True) if r.get(key) is not None]
        if known:
            value, seed = pick(known, key=lambda pair: pair[0])
            out[key] = {"value": value, "seed": seed}
    return out


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return round(statistics.fmean(vals), 2) if vals else None


def _std(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0 if vals else None


NEEDS_CONTROL = "--check needs the methods task_arithmetic and task_arithmetic_clean_control"


def _with_control_runs(results: dict) -> list[tuple] | None:
    """``(seed, task arithmetic's run, the clean-control merge's run)`` per seed, the pairs both
    claims read; None when either row is missing."""
    ta = results["methods"].get("task_arithmetic")
    control = results["methods"].get("task_arithmetic_clean_control")
    if ta is None or control is None:
        return None
    seeds = results.get("seeds") or [None]
    ta_runs, ctl_runs = ta.get("per_seed") or [ta], control.get("per_seed") or [control]
    return list(zip(seeds, ta_runs, ctl_runs, strict=False))


def check_succession(results: dict) -> list[str]:
    """Failures of the succession claim of a merge-aware zoo (empty list: the claim holds).

    The claim (:data:`dam_mergekit.lab.claims.SUCCESSION`) must hold for every backdoored task and
    *every seed*: a mean could hide a seed where the backdoor died.
    """
    manifest = results["zoo"]
    if manifest.get("options", {}).get("attack_mode") != "merge-aware":
        return []
    runs = _with_control_runs(results)
    if runs is None:
        return [NEEDS_CONTROL]
    failures = []
    for seed, ta_run, ctl_run in runs:
        for task in (t["name"] for t in manifest["tasks"] if t["backdoored"]):
            missed = SUCCESSION.missed(
                ta_run["asr"][task], ta_run["p0"][task], ctl_run["asr"][task]
            )
            if missed:
                failures.append(f"seed {seed}, {task}: task_arithmetic {missed}")
    return failures


def check_transfer(results: dict) -> list[str]:
    """Failures of an off-task zoo's transfer claim (:data:`dam_mergekit.lab.claims.OFF_TASK`)
    on the task its backdoor aims at, for every seed: task arithmetic against the same merge
    with the clean control."""
    target = target_task(results["zoo"])
    if target is None:
        return []
    runs = _with_control_runs(results)
    if runs is None:
        return [NEEDS_CONTROL]
    failures = []
    for seed, ta_run, ctl_run in runs:
        missed = OFF_TASK.missed(
            ta_run["asr"][target],
            ta_run["p0"][target],
            ctl_run["asr"][target],
            ctl_run["p0"][target],
        )
        if missed:
            failures.append(f"seed {seed}, {target}: task_arithmetic {missed}")
    return failures


def check_dam(results: dict) -> list[str]:
    """Failures of DAM's claim on a merge-aware zoo (empty when it holds or dam was not run).

    For every seed, :data:`dam_mergekit.lab.claims.DAM_CUT` against task arithmetic: succession ASR
    at least 20 points lower, mean clean accuracy at most 1 pp lower.
    """
    if results["zoo"].get("options", {}).get("attack_mode") != "merge-aware":
        return []
    dam, ta = results["methods"].get("dam"), results["methods"].get("task_arithmetic")
    if dam is None or ta is None:
        return []
    failures = []
    seeds = results.get("seeds") or [None]
    pairs = zip(seeds, ta.get("per_seed") or [ta], dam.get("per_seed") or [dam], strict=False)
    for seed, ta_run, dam_run in pairs:
        missed = DAM_CUT.missed(
            dam_run["asr_succession_avg"],
            dam_run["acc_avg"],
            ta_run["asr_succession_avg"],
            ta_run["acc_avg"],
        )
        if missed:
            failures.append(f"seed {seed}: dam {missed} (undefended: task_arithmetic)")
    return failures


def summary_table(results: dict) -> str:
    """Markdown: a table per split of seeds (test seeds first), one row per method: mean, +- std
    and the worst seed when there are several seeds."""
    zoo = results["zoo"]
    lines = [
        f"Zoo: {zoo['kind']}, attack {zoo.get('attack', {}).get('name')} "
        f"({zoo.get('options', {}).get('attack_mode')}), seeds {results.get('seeds', [])}, "
        f"calibration seeds {list((results.get('calibration_seeds') or {}).values())}. "
        "ACC/ASR/p0 in %, ASR on non-target test inputs, p0 beside each ASR (the rate without "
        "the trigger); DER against the most accurate undefended merge of each seed "
        f"({', '.join(sorted(set((results.get('der_reference') or {}).values()) - {None}))})."
    ]
    splits = results.get("splits") or {
        "all": {"seeds": results.get("seeds", []), "methods": results["methods"]}
    }
    for split in ("test", "development", "extra", "all"):
        if split in splits:
            part = splits[split]
            lines += ["", f"{split.capitalize()} seeds {part['seeds']}:", ""]
            lines += _table(part["methods"])
    return "\n".join(lines)


_HEADINGS = {
    "acc_avg": "ACC avg",
    "asr_succession_avg": "ASR succession",
    "p0_succession_avg": "p0 succession",
    "asr_transfer_avg": "ASR transfer",
    "p0_transfer_avg": "p0 transfer",
    "asr_target_task": "ASR aimed-at task",
    "p0_target_task": "p0 aimed-at task",
    "der": "DER",
    "seconds": "s",
}


def _table(methods: dict[str, dict]) -> list[str]:
    aimed = any(k in row for row in methods.values() for k in TARGET_FIGURES)
    keys = [k for k in FIGURES if aimed or k not in TARGET_FIGURES]
    lines = [
        "| method | " + " | ".join(_HEADINGS[k] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, row in methods.items():
        std, worst = row.get("std", {}), row.get("worst", {})
        cells = [_cell(row.get(k), std.get(k), worst.get(k)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _cell(value, std, worst=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.1f}" if not std else f"{value:.1f} ± {std:.1f}"
    if worst is not None:
        text += f", worst {worst['value']:.1f} (seed {worst['seed']})"
    return text


def against_best_undefended(results: dict) -> list[str]:
    """Per seed, dam against the most accurate undefended merge of that seed: the judgment the
    lab's protocol asks for, printed beside the check (which reads task arithmetic)."""
    dam = results["methods"].get("dam")
    if dam is None:
        return []
    seeds = results.get("seeds") or [None]
    lines = []
    for k, (seed, dam_run) in enumerate(zip(seeds, dam.get("per_seed") or [dam], strict=False)):
        runs = {n: r["per_seed"][k] for n, r in results["methods"].items() if "per_seed" in r}
        best = best_undefended(runs)
        if best is None or dam_run.get("asr_succession_avg") is None:
            continue
        ref = runs[best]
        missed = DAM_CUT.missed(
            dam_run["asr_succession_avg"],
            dam_run["acc_avg"],
            ref["asr_succession_avg"],
            ref["acc_avg"],
        )
        d_asr = dam_run["asr_succession_avg"] - ref["asr_succession_avg"]
        d_acc = dam_run["acc_avg"] - ref["acc_avg"]
        lines.append(
            f"seed {seed}: dam ASR {dam_run['asr_succession_avg']:.1f} (p0 "
            f"{dam_run['p0_succession_avg']:.1f}) / ACC {dam_run['acc_avg']:.1f} against {best} "
            f"ASR {ref['asr_succession_avg']:.1f} (p0 {ref['p0_succession_avg']:.1f}) / ACC "
            f"{ref['acc_avg']:.1f}: ASR {d_asr:+.1f}, ACC {d_acc:+.1f}, "
            + ("holds" if missed is None else "misses the cut")
        )
    return lines


def report(results: dict, *, check: bool) -> int:
    """Print the table; with ``check``, fail (exit 1) when a merge-aware zoo shows no succession."""
    print(summary_table(results))
    print_against_best(results)
    if not check:
        return 0
    mode = results["zoo"].get("options", {}).get("attack_mode")
    if not any(t.get("backdoored") for t in results["zoo"].get("tasks", [])):
        print("check: the zoo has no backdoored expert (a clean zoo); no claim to check")
        return 0
    if mode == "off-task":
        return _report_transfer(results)
    if mode != "merge-aware":
        print(f"check: the zoo's attack mode is {mode!r}; it makes no succession claim to check")
        return 0
    failures = [f"SUCCESSION CHECK FAILED: {line}" for line in check_succession(results)]
    failures += [f"DAM CHECK FAILED: {line}" for line in check_dam(results)]
    for line in failures:
        print(line)
    if failures:
        return 1
    rule = SUCCESSION
    print(
        f"check: succession shows on every backdoored task (task_arithmetic ASR >= "
        f"{rule.min_asr:g}, > p0 + {rule.over_p0:g}, > clean control + {rule.over_control:g})"
    )
    if "dam" in results["methods"]:
        print(
            f"check: dam's succession ASR is >= {DAM_CUT.asr_cut:g} points below "
            f"task_arithmetic's, ACC >= TA - {DAM_CUT.acc_drop:g}"
        )
    return 0


def print_against_best(results: dict) -> None:
    lines = against_best_undefended(results)
    if lines:
        print(
            f"against the best undefended merge (ASR -{DAM_CUT.asr_cut:g}, ACC -"
            f"{DAM_CUT.acc_drop:g} at most; reported, not checked):"
        )
        for line in lines:
            print("  " + line)


def _report_transfer(results: dict) -> int:
    failures = check_transfer(results)
    for line in failures:
        print(f"TRANSFER CHECK FAILED: {line}")
    if failures:
        return 1
    print(
        f"check: the off-task backdoor transfers (task_arithmetic ASR - p0 >= {OFF_TASK.over_p0:g} "
        f"on the task it aims at; with the clean control < {OFF_TASK.control_over_p0:g})"
    )
    return 0
