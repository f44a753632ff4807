"""``dam-mergekit bench``: merge a zoo's experts with several methods and score each merge.

Methods (settings fixed here, from the literature, not tuned on any zoo):

- ``pretrained``: the zoo's base model; ``expert:<task>``: each expert alone;
  ``control:<task>``: the clean control of each backdoored expert.
- ``task_arithmetic``: lambda 0.3 on every task vector (Ilharco et al. 2023).
- ``ties``: top-20 % magnitude trim, sign election, disjoint mean, lambda 1 (Yadav et al. 2023).
- ``dare_ties``: random drop keeping 30 % with rescaling, then TIES's sign election and disjoint
  mean, lambda 1 (Yu et al. 2024); the drop is seeded from the zoo seed.
- ``task_arithmetic_clean_control``: task arithmetic with every backdoored expert replaced by its
  clean control: the ASR a merge shows without any backdoor.
- ``dam``: DAM with the package's default calibration for the zoo's kind (``clip`` or
  ``causal_lm``, seeded with the zoo seed; see docs/calibration.md); the guarded merge calibrates
  first, so its seconds include calibration. ``dam_as_released``: the released algorithm.
  ``dam_masks_only`` and ``dam_coefficients_only``: DAM's ablations (only one part learned).
- ``awm``: post-hoc adversarial weight masking: one mask on the task-arithmetic merge's task
  vector, learned by the same calibration against the proxy trigger (:func:`awm_recipe`).
- ``task_arithmetic_dam_coefficients``: task arithmetic with the coefficients the ``dam`` row
  learned and no masks: is DAM's effect in its coefficients? (:func:`dam_coefficients_recipe`).

Every merge goes through mergekit's Python API from a recipe written to ``DIR/recipes/``. A method
is a name plus a function returning a recipe dict, so a defense such as DAM plugs in with
:func:`register_method` (a recipe with ``merge_method: dam`` and ``parameters: {calibration: FILE}``
or ``{masks: FILE}``); the merge then passes through the project's guarded ``run_merge``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dam_mergekit.lab.bench.figure import plot
from dam_mergekit.lab.claims import DAM_CUT, SUCCESSION
from dam_mergekit.errors import DamError
from dam_mergekit.staging import staged_file

if TYPE_CHECKING:
    import torch

    from dam_mergekit.masks import MaskFile

RecipeBuilder = Callable[[Path, dict[str, Any], Path], dict[str, Any]]
"""(zoo_dir, manifest, work_dir) -> mergekit recipe dict; work_dir is for files a method needs."""

FIGURES = (
    "acc_avg",
    "asr_succession_avg",
    "asr_transfer_avg",
    "p0_succession_avg",
    "p0_transfer_avg",
    "der",
    "seconds",
)
BENCH_THREADS = 2


@dataclass(frozen=True)
class Method:
    """A bench entry: a model of the zoo (``model``) or a merge from a recipe (``recipe``)."""

    name: str
    model: Callable[[Path, dict[str, Any]], Path] | None = None
    recipe: RecipeBuilder | None = None


def _experts(zoo: Path, manifest: dict, *, controls: bool = False) -> list[str]:
    paths = []
    for t in manifest["tasks"]:
        rel = t["control"] if controls and t["backdoored"] else t["expert"]
        paths.append(str((zoo / rel).resolve()))
    return paths


def _recipe(
    zoo: Path,
    manifest: dict,
    method: str,
    per_model: dict,
    top: dict,
    *,
    controls: bool = False,
    models: list[str] | None = None,
) -> dict[str, Any]:
    """A recipe over the zoo's base and its experts (or controls, or the given ``models``)."""
    return {
        "merge_method": method,
        "base_model": str((zoo / manifest["base"]).resolve()),
        "models": [
            {"model": p, "parameters": dict(per_model)}
            for p in models or _experts(zoo, manifest, controls=controls)
        ],
        "parameters": dict(top),
        "dtype": "float32",
    }


def task_arithmetic_recipe(zoo: Path, manifest: dict, work: Path) -> dict:
    return _recipe(zoo, manifest, "task_arithmetic", {"weight": 0.3}, {"normalize": False})


def ties_recipe(zoo: Path, manifest: dict, work: Path) -> dict:
    return _recipe(
        zoo, manifest, "ties", {"weight": 1.0, "density": 0.2}, {"normalize": True, "lambda": 1.0}
    )


def dare_ties_recipe(zoo: Path, manifest: dict, work: Path) -> dict:
    return _recipe(
        zoo,
        manifest,
        "dare_ties",
        {"weight": 1.0, "density": 0.3},
        {"normalize": True, "lambda": 1.0},
    )


def clean_control_recipe(zoo: Path, manifest: dict, work: Path) -> dict:
    return _recipe(
        zoo, manifest, "task_arithmetic", {"weight": 0.3}, {"normalize": False}, controls=True
    )


def _zoo_seed(manifest: dict) -> int:
    return int(manifest.get("options", {}).get("seed", 0))


def _calibration_file(zoo: Path, manifest: dict, work: Path, name: str, settings: dict) -> Path:
    """``work/<name>-calibration.yml``: the package default for the zoo's kind, seeded with the
    zoo seed, with ``settings`` on top (``mode: as_released`` for the released algorithm)."""
    import yaml

    from dam_mergekit.calibrate.config import default_calibration

    adapter = "clip" if manifest["kind"] == "clip" else "causal_lm"
    calibration = default_calibration(
        adapter, str(zoo.resolve()), **{"seed": _zoo_seed(manifest), **settings}
    )
    work.mkdir(parents=True, exist_ok=True)
    cal_path = (work / f"{name}-calibration.yml").resolve()
    cal_path.write_text(yaml.safe_dump(calibration, sort_keys=False))
    return cal_path


def dam_recipe(
    zoo: Path, manifest: dict, work: Path, *, name: str = "dam", **settings: Any
) -> dict:
    """A dam recipe plus its calibration file in ``work`` (the first merge calibrates)."""
    cal_path = _calibration_file(zoo, manifest, work, name, settings)
    return _recipe(
        zoo, manifest, "dam", {"weight": 1.0}, {"lambda": 1.0, "calibration": str(cal_path)}
    )


# What makes a calibration post-hoc AWM (over the bench's settings, which cannot change it): only
# M2 learns, and the one expert's task vector enters at full size, unrescaled.
AWM_SETTINGS: dict[str, Any] = {
    "mode": "dam",
    "train": "m2",
    "coef_init": 1.0,
    "coef_range": [1.0, 1.0],
    "rescale": False,
}


def awm_recipe(zoo: Path, manifest: dict, work: Path, **settings: Any) -> dict:
    """Post-hoc AWM: a mask on the merged task vector, learned against the proxy trigger.

    The bench's task-arithmetic merge (lambda 0.3), written to ``work``, is the dam recipe's one
    expert, so the merge is ``base + M1 * M2 * (TA - base)`` with the coefficient fixed at 1 and no
    mean rescaling: all-ones masks give TA back. With one expert M1 and M2 are one product, so one
    of them is trained: M2 (``train: m2``; M1 stays all-ones), because M2's objective is AWM's,
    the clean loss plus ``alpha`` times the loss under the proxy trigger, while M1 sees the clean
    loss only. The clean loss distils from TA itself (one expert teaches every task): the mask
    keeps the merge's clean behaviour. No labels, no trigger knowledge.
    """
    ta = _task_arithmetic_model(zoo, manifest, work / "awm-task-arithmetic")
    cal_path = _calibration_file(zoo, manifest, work, "awm", {**settings, **AWM_SETTINGS})
    top = {"lambda": 1.0, "calibration": str(cal_path)}
    return _recipe(zoo, manifest, "dam", {"weight": 1.0}, top, models=[str(ta)])


def _task_arithmetic_model(zoo: Path, manifest: dict, out: Path) -> Path:
    """The task_arithmetic row's merge, written to ``out`` (the model the awm row masks)."""
    recipe = task_arithmetic_recipe(zoo, manifest, out.parent)
    kind, seed = manifest["kind"], _zoo_seed(manifest)
    merge_recipe(recipe, out.with_suffix(".yml"), out, kind=kind, seed=seed)
    return out.resolve()


def dam_coefficients_recipe(zoo: Path, manifest: dict, work: Path, **settings: Any) -> dict:
    """Task arithmetic with the coefficients the ``dam`` row learned, its masks removed.

    The ablation that tells whether DAM's effect is in its coefficients. They come from the dam
    row's mask file of the same seed: the same calibration file, so it is learned here only when
    missing or stale (the dam row was not asked for, or ran with other settings). The mean
    rescaling folded into them is divided back out; a mask file that keeps everything carries them
    through the dam kernel.
    """
    from dam_mergekit.masks import MaskFile
    from dam_mergekit.recipe.load import dam_settings, load_recipe, mask_path_for
    from dam_mergekit.recipe.run import preflight

    config = load_recipe(dam_recipe(zoo, manifest, work, **{**_CALIBRATED["dam"], **settings}))
    preflight(config)  # calibrates the dam masks when missing or stale
    dam = dam_settings(config)
    source = MaskFile(mask_path_for(dam.masks, dam.calibration))
    masks = write_coefficient_masks(
        source, work / "task_arithmetic_dam_coefficients.masks.safetensors"
    )
    return _recipe(zoo, manifest, "dam", {"weight": 1.0}, {"lambda": 1.0, "masks": str(masks)})


def learned_coefficients(mask_file: MaskFile) -> dict[str, torch.Tensor]:
    """Per tensor, the coefficients a dam calibration learned: the written ones with the mean
    rescaling ``1 / mean(M1 * M2_i)`` divided back out (it is folded in when the file is written)."""
    from dam_mergekit.calibrate.concrete import rescaling_applies, unfold_rescaling

    settings = mask_file.settings
    calibration = settings.get("calibration") or {}
    if settings.get("source") != "dam-mergekit calibrate" or calibration.get("mode") != "dam":
        raise DamError(
            f"{mask_file.path}: not a mask file of a mode-dam calibration; its coefficients have "
            "no known rescaling to divide out"
        )
    rescaled = rescaling_applies(calibration["rescale"], calibration["granularity"])
    out = {}
    for name in mask_file.names:
        m1 = _as_float(mask_file.m1(name))
        m2 = [_as_float(mask_file.m2(name, i)) for i in range(len(mask_file.experts))]
        out[name] = unfold_rescaling(mask_file.coefficients(name), m1, m2, enabled=rescaled)
    return out


def _as_float(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.float()


def write_coefficient_masks(source: MaskFile, path: Path) -> Path:
    """A mask file for ``source``'s models that keeps everything, with its learned coefficients."""
    from dam_mergekit.masks import MaskSet, write_mask_file

    return write_mask_file(
        path,
        MaskSet(coefficients=learned_coefficients(source)),
        base=source.base,
        experts=source.experts,
        tensor_shapes={name: source.shape(name) for name in source.names},
        settings={"source": "bench task_arithmetic_dam_coefficients", "from": str(source.path)},
    )


_MERGES: dict[str, RecipeBuilder] = {
    "task_arithmetic": task_arithmetic_recipe,
    "ties": ties_recipe,
    "dare_ties": dare_ties_recipe,
    "task_arithmetic_clean_control": clean_control_recipe,
}
# Calibrated methods: name -> calibration settings over the package defaults.
_CALIBRATED: dict[str, dict[str, Any]] = {
    "dam": {},
    "dam_as_released": {"mode": "as_released"},
    "dam_masks_only": {"train": "masks"},  # ablation: coefficients fixed at coef_init
    "dam_coefficients_only": {"train": "coefficients"},  # ablation: masks all-ones
}
# Rows built on the calibration machinery in another way: name -> recipe builder taking the
# calibration settings that override the defaults (after the calibrated rows in the table).
_DERIVED: dict[str, Callable[..., dict[str, Any]]] = {
    "awm": awm_recipe,
    "task_arithmetic_dam_coefficients": dam_coefficients_recipe,
}


def register_method(name: str, recipe: RecipeBuilder) -> None:
    """Add a merge method to every later bench run (e.g. ``dam`` from the calibration module)."""
    if name in _MERGES or name in _CALIBRATED or name in _DERIVED:
        raise DamError(f"bench method {name!r} is already registered")
    _MERGES[name] = recipe


def methods_for(
    manifest: dict, only: list[str] | None = None, calibration: dict[str, Any] | None = None
) -> list[Method]:
    """The bench's method list for a zoo, in table order (``only`` filters by name).

    ``calibration`` overrides settings of every calibrated method (e.g. fewer steps)."""
    methods = [Method("pretrained", model=lambda z, m: z / m["base"])]
    for t in manifest["tasks"]:
        methods.append(Method(f"expert:{t['name']}", model=lambda z, m, rel=t["expert"]: z / rel))
    for t in manifest["tasks"]:
        if t["control"]:
            methods.append(Method(f"control:{t['name']}", model=lambda z, m, r=t["control"]: z / r))
    methods += [Method(n, recipe=r) for n, r in _MERGES.items()]
    for n, settings in _CALIBRATED.items():
        chosen = {**settings, **(calibration or {})}
        methods.append(Method(n, recipe=functools.partial(dam_recipe, name=n, **chosen)))
    for n, builder in _DERIVED.items():
        methods.append(Method(n, recipe=functools.partial(builder, **(calibration or {}))))
    if only:
        unknown = set(only) - {m.name for m in methods}
        if unknown:
            raise DamError(
                f"unknown bench method(s) {sorted(unknown)}; known: {[m.name for m in methods]}"
            )
        methods = [m for m in methods if m.name in only]
    return methods


def merge_recipe(recipe: dict, recipe_path: Path, out: Path, *, kind: str, seed: int) -> None:
    """Write the recipe, then merge it with mergekit (through the project's guarded run_merge)."""
    import torch
    import yaml
    from mergekit.options import MergeOptions

    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.run import run_merge

    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    config = load_recipe(recipe_path)
    torch.manual_seed(seed)
    options = MergeOptions(
        copy_tokenizer=(kind == "llm"), random_seed=seed, quiet=True, write_model_card=False
    )
    if out.exists():
        shutil.rmtree(out)
    run_merge(config, str(out), options)


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


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Mean over seeds of every figure, with a ``std`` block beside it when there are several."""
    methods: dict[str, dict] = {}
    for name in per_seed[0]:
        runs = [r[name] for r in per_seed if name in r]
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
        row["per_seed"] = [
            {k: r.get(k) for k in ("acc", "asr", "p0", *FIGURES) if k in r} for r in runs
        ]
        methods[name] = row
    return methods


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return round(statistics.fmean(vals), 2) if vals else None


def _std(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0 if vals else None


def check_succession(results: dict) -> list[str]:
    """Failures of the succession claim of a merge-aware zoo (empty list: the claim holds).

    The claim (:data:`dam_mergekit.lab.claims.SUCCESSION`) must hold for every backdoored task and
    *every seed*: a mean could hide a seed where the backdoor died.
    """
    manifest = results["zoo"]
    if manifest.get("options", {}).get("attack_mode") != "merge-aware":
        return []
    ta = results["methods"].get("task_arithmetic")
    control = results["methods"].get("task_arithmetic_clean_control")
    if ta is None or control is None:
        return ["--check needs the methods task_arithmetic and task_arithmetic_clean_control"]
    seeds = results.get("seeds") or [None]
    ta_runs = ta.get("per_seed") or [ta]
    ctl_runs = control.get("per_seed") or [control]
    failures = []
    for seed, ta_run, ctl_run in zip(seeds, ta_runs, ctl_runs, strict=False):
        for task in (t["name"] for t in manifest["tasks"] if t["backdoored"]):
            missed = SUCCESSION.missed(
                ta_run["asr"][task], ta_run["p0"][task], ctl_run["asr"][task]
            )
            if missed:
                failures.append(f"seed {seed}, {task}: task_arithmetic {missed}")
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
    """Markdown: one row per method (mean; +- std over seeds when there are several)."""
    methods = results["methods"]
    seeds = results.get("seeds", [])
    lines = [
        f"Zoo: {results['zoo']['kind']}, attack {results['zoo'].get('attack', {}).get('name')} "
        f"({results['zoo'].get('options', {}).get('attack_mode')}), seeds {seeds}. "
        "ACC/ASR/p0 in %, ASR on non-target test inputs; DER vs task_arithmetic.",
        "",
        "| method | ACC avg | ASR succession | ASR transfer | p0 succession | p0 transfer "
        "| DER | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in methods.items():
        std = row.get("std", {})
        cells = [_cell(row.get(k), std.get(k)) for k in FIGURES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value, std) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if not std else f"{value:.1f} ± {std:.1f}"


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
        plot(results, tmp)
    return results


def _check_calibration(calibration: dict[str, Any] | None) -> None:
    """Refuse unknown calibration settings before any merge runs (adapter and data are the bench's)."""
    from dam_mergekit.calibrate.config import CalibrationConfig

    CalibrationConfig.check_keys(
        calibration or {}, "bench --calibration", exclude=("adapter", "data")
    )


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DamError(f"--seeds must be comma-separated integers, got {text!r}") from None


def report(results: dict, *, check: bool) -> int:
    """Print the table; with ``check``, fail (exit 1) when a merge-aware zoo shows no succession."""
    print(summary_table(results))
    if not check:
        return 0
    mode = results["zoo"].get("options", {}).get("attack_mode")
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


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="merge a zoo with several methods and score them",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--zoo", required=True, help="zoo directory")
    p.add_argument("--out", required=True, help="output directory (results.json, summary.md, png)")
    p.add_argument("--seeds", help="comma-separated zoo seeds; other seeds are built beside ZOO")
    p.add_argument("--methods", help="comma-separated subset of methods")
    p.add_argument(
        "--calibration",
        help="YAML file of calibration settings that override the defaults of the dam and awm methods",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless a merge-aware zoo shows succession under task arithmetic and, when "
        "dam runs, dam cuts its ASR by >= 20 points at no more than 1 pp of accuracy",
    )
    p.set_defaults(func=_run_bench)

    d = subparsers.add_parser(
        "demo",
        help="build the default CLIP zoo, bench it, check succession",
        description="The offline demonstration behind `make demo`: build (or reuse) the default "
        "CLIP zoo, merge it with every method of the bench, print the ACC/ASR/p0 table and exit 1 "
        "unless succession shows under task arithmetic and dam removes it.",
    )
    d.add_argument("--zoo", default=".cache/zoo/clip-default", help="where the zoo is cached")
    d.add_argument("--out", default="out/demo", help="bench output directory")
    d.set_defaults(func=_run_demo)


def _run_bench(args: argparse.Namespace) -> int:
    only = [m.strip() for m in args.methods.split(",")] if args.methods else None
    calibration = None
    if args.calibration:
        from dam_mergekit.recipe.load import read_yaml

        calibration = read_yaml(args.calibration, "calibration settings")
        if not isinstance(calibration, dict):
            raise DamError(f"{args.calibration}: calibration settings must be a YAML mapping")
    results = run_bench(
        args.zoo, args.out, seeds=parse_seeds(args.seeds), only=only, calibration=calibration
    )
    print(f"wrote {args.out}/results.json, summary.md, acc_asr.png")
    return report(results, check=args.check)


def _run_demo(args: argparse.Namespace) -> int:
    from dam_mergekit.lab.zoo.build import build_zoo

    start = time.perf_counter()
    zoo = build_zoo(args.zoo, {"kind": "clip"})
    print(f"zoo ready at {zoo} ({time.perf_counter() - start:.0f} s)")
    results = run_bench(zoo, args.out)
    print(
        f"wrote {args.out}/results.json, summary.md, acc_asr.png "
        f"({time.perf_counter() - start:.0f} s in all)"
    )
    return report(results, check=True)
