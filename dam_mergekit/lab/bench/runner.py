"""Running a zoo through the bench's methods: one zoo per seed, every method merged and scored,
the results written as results.json, summary.md and acc_asr.png."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dam_mergekit.lab.bench.merging import merge_recipe
from dam_mergekit.lab.bench.methods import methods_for
from dam_mergekit.lab.bench.report import aggregate, summary_table
from dam_mergekit.staging import staged_file

BENCH_THREADS = 2


def bench_zoo(
    zoo: Path,
    out: Path,
    *,
    seed: int,
    only: list[str] | None = None,
    evaluate=None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, dict]:
    """Evaluate every method on one zoo; returns ``{method: evaluation + averages + seconds}``."""
    from tqdm.auto import tqdm

    from dam_mergekit.lab.evaluate import evaluate_model, summarise
    from dam_mergekit.lab.zoo.manifest import load_manifest

    evaluate = evaluate or evaluate_model
    manifest = load_manifest(zoo)
    rows: dict[str, dict] = {}
    for method in tqdm(
        methods_for(manifest, only, calibration), desc=f"bench seed {seed}", leave=False
    ):
        start = time.perf_counter()
        if method.model is not None:
            model_dir = method.model(zoo, manifest)
        else:
            model_dir = out / "models" / f"seed{seed}" / method.name
            recipe = method.recipe(zoo, manifest, out / "work" / f"seed{seed}")
            merge_recipe(
                recipe,
                out / "recipes" / f"seed{seed}" / f"{method.name}.yml",
                model_dir,
                kind=manifest["kind"],
                seed=seed,
            )
        result = evaluate(model_dir, zoo)
        rows[method.name] = {
            **result,
            **summarise(result, manifest),
            "seconds": round(time.perf_counter() - start, 2),
        }
    if "task_arithmetic" in rows:
        from dam_mergekit.lab.evaluate import der

        for row in rows.values():
            row["der"] = der(row, rows["task_arithmetic"])
    return rows


def zoos_for_seeds(zoo: Path, seeds: list[int] | None) -> dict[int, Path]:
    """One zoo per seed: the given zoo for its own seed, siblings ``<zoo>-seed<s>`` built from the
    same options for the others (cached like every zoo build)."""
    from dam_mergekit.lab.zoo.build import build_zoo
    from dam_mergekit.lab.zoo.manifest import load_manifest

    manifest = load_manifest(zoo)
    own = manifest["options"].get("seed", 0)
    if not seeds:
        return {own: zoo}
    zoos = {}
    for s in seeds:
        if s == own:
            zoos[s] = zoo
        else:
            zoos[s] = build_zoo(
                zoo.parent / f"{zoo.name}-seed{s}", {**manifest["options"], "seed": s}
            )
    return zoos


def run_bench(
    zoo: str | Path,
    out: str | Path,
    *,
    seeds: list[int] | None = None,
    only: list[str] | None = None,
    evaluate=None,
    calibration: dict[str, Any] | None = None,
) -> dict:
    """Bench a zoo (and its seed siblings); writes results.json, summary.md and acc_asr.png."""
    import torch

    from dam_mergekit.lab.zoo.manifest import load_manifest

    zoo, out = Path(zoo), Path(out)
    manifest = load_manifest(zoo)
    methods_for(manifest, only)  # refuse unknown names before any work
    _check_calibration(calibration)
    zoos = zoos_for_seeds(zoo, seeds)  # zoo builds use the caller's thread settings
    torch.set_num_threads(BENCH_THREADS)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = [
        bench_zoo(z, out, seed=s, only=only, evaluate=evaluate, calibration=calibration)
        for s, z in zoos.items()
    ]
    results = {
        "zoo": manifest,
        "seeds": list(zoos),
        "zoos": {str(s): str(z) for s, z in zoos.items()},
        "methods": aggregate(per_seed),
    }
    with staged_file(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with staged_file(out / "summary.md") as tmp:
        tmp.write_text("# Bench summary\n\n" + summary_table(results) + "\n")
    with staged_file(out / "acc_asr.png") as tmp:
        from dam_mergekit.lab.bench.figure import plot

        plot(results, tmp)
    return results


def _check_calibration(calibration: dict[str, Any] | None) -> None:
    """Refuse unknown calibration settings before any merge runs (adapter and data are the bench's)."""
    from dam_mergekit.calibrate.config import CalibrationConfig

    CalibrationConfig.check_keys(
        calibration or {}, "bench --calibration", exclude=("adapter", "data")
    )
