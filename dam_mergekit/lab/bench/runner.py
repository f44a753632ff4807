"""Running a zoo through the bench's methods: one zoo per seed, every method merged and scored,
the results written as results.json, summary.md and acc_asr.png."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dam_mergekit.errors import DamError
from dam_mergekit.lab.bench.merging import merge_recipe
from dam_mergekit.lab.bench.methods import methods_for
from dam_mergekit.lab.bench.report import aggregate, summary_table
from dam_mergekit.lab.protocol import SPLITS, best_undefended, calibration_seed, seed_split
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
    """Evaluate every method on one zoo; returns ``{method: evaluation + averages + seconds}``.

    Each row's DER is taken against the most accurate undefended merge of this zoo."""
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
    reference = best_undefended(rows)
    if reference is not None:
        from dam_mergekit.lab.evaluate import der

        for row in rows.values():
            row["der"] = der(row, rows[reference])
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
                zoo.parent / f"{zoo.name}-seed{s}",
                # the kind too: an LLM zoo's options do not carry it (the build would be CLIP's)
                {**manifest["options"], "kind": manifest["kind"], "seed": s},
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
    calibration_seeds: list[int] | None = None,
) -> dict:
    """Bench a zoo (and its seed siblings); writes results.json, summary.md and acc_asr.png.

    ``calibration_seeds``: one for every zoo seed, or one each (default: the protocol's
    :func:`~dam_mergekit.lab.protocol.calibration_seed`). The results say which seeds are
    development and which test seeds, with statistics for each split on its own."""
    import torch

    from dam_mergekit.lab.zoo.manifest import load_manifest

    zoo, out = Path(zoo), Path(out)
    manifest = load_manifest(zoo)
    methods_for(manifest, only)  # refuse unknown names before any work
    _check_calibration(calibration)
    own = manifest["options"].get("seed", 0)
    calib_seeds = calibration_seeds_for(seeds or [own], calibration_seeds)
    zoos = zoos_for_seeds(zoo, seeds)  # zoo builds use the caller's thread settings
    torch.set_num_threads(BENCH_THREADS)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = [
        bench_zoo(
            z,
            out,
            seed=s,
            only=only,
            evaluate=evaluate,
            calibration={**(calibration or {}), "seed": calib_seeds[s]},
        )
        for s, z in zoos.items()
    ]
    results = {
        "zoo": manifest,
        "seeds": list(zoos),
        "zoos": {str(s): str(z) for s, z in zoos.items()},
        "calibration_seeds": {str(s): c for s, c in calib_seeds.items()},
        "split": {str(s): seed_split(s) for s in zoos},
        "der_reference": {
            str(s): best_undefended(rows) for s, rows in zip(zoos, per_seed, strict=True)
        },
        "methods": aggregate(per_seed, list(zoos)),
        "splits": _by_split(list(zoos), per_seed),
    }
    with staged_file(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with staged_file(out / "summary.md") as tmp:
        tmp.write_text("# Bench summary\n\n" + summary_table(results) + "\n")
    with staged_file(out / "acc_asr.png") as tmp:
        from dam_mergekit.lab.bench.figure import plot

        plot(results, tmp)
    return results


def calibration_seeds_for(seeds: list[int], given: list[int] | None) -> dict[int, int]:
    """Zoo seed -> calibration seed: ``given`` (one for all, or one per zoo seed in order), else
    the protocol's default; a calibration seed equal to its zoo seed is refused."""
    if not given:
        chosen = {s: calibration_seed(s) for s in seeds}
    elif len(given) in (1, len(seeds)):
        chosen = dict(zip(seeds, given * len(seeds) if len(given) == 1 else given, strict=True))
    else:
        raise DamError(
            f"--calib-seeds gives {len(given)} seeds for {len(seeds)} zoo seeds; give one for "
            "all or one per zoo seed"
        )
    for zoo_seed, calib in chosen.items():
        if calib == zoo_seed:
            raise DamError(
                f"calibration seed {calib} equals its zoo seed; the lab's protocol keeps them "
                "apart (docs/lab.md, 'Protocol')"
            )
    return chosen


def _by_split(seeds: list[int], per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """The statistics of each split of seeds on its own (development, test, extra)."""
    out = {}
    for split in SPLITS:
        chosen = [
            (s, rows) for s, rows in zip(seeds, per_seed, strict=True) if seed_split(s) == split
        ]
        if chosen:
            out[split] = {
                "seeds": [s for s, _ in chosen],
                "methods": aggregate([rows for _, rows in chosen], [s for s, _ in chosen]),
            }
    return out


def _check_calibration(calibration: dict[str, Any] | None) -> None:
    """Refuse unknown calibration settings before any merge runs (adapter and data are the bench's,
    the seed is set by calibration seeds)."""
    from dam_mergekit.calibrate.config import CalibrationConfig

    CalibrationConfig.check_keys(
        calibration or {}, "bench --calibration", exclude=("adapter", "data")
    )
    if "seed" in (calibration or {}):
        raise DamError("bench --calibration: set the calibration seed with --calib-seeds")
