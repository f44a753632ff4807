"""The bench's methods: recipe builders, the mask-file surgery of the coefficient ablation, and
the registry of method names.

Methods (settings fixed here, from the literature, not tuned on any zoo):

- ``pretrained``: the zoo's base model; ``expert:<task>``: each expert alone;
  ``control:<task>``: the clean control of each backdoored expert.
- ``task_arithmetic``: lambda 0.3 on every task vector (Ilharco et al. 2023).
- ``ties``: top-20 % magnitude trim, sign election, disjoint mean, lambda 1 (Yadav et al. 2023).
- ``dare_ties``: random drop keeping 30 % with rescaling, then TIES's sign election and disjoint
  mean, lambda 1 (Yu et al. 2024); the drop is seeded from the zoo seed.
- ``task_arithmetic_clean_control``: task arithmetic with every backdoored expert replaced by its
  clean control: the ASR a merge shows without any backdoor.
- ``task_arithmetic_backdoor_third``: task arithmetic with each backdoored expert's weight cut
  to a third (0.1): a probe of whether the attack survives down-weighting (it reads which expert
  is backdoored, so it is never a baseline a defense is judged against).
- ``distill``: the calibration's clean objective alone (``alpha: 0``: no safety term, hence no
  trigger search): masks and coefficients learned by distilling each task's expert. The
  undefended merge that ``dam`` modifies, so the one its cost is read against.
- ``dam``: DAM with the package's default calibration for the zoo's kind (``clip`` or
  ``causal_lm``; see docs/calibration.md), seeded with the zoo's calibration seed
  (:func:`dam_mergekit.lab.protocol.calibration_seed`, or ``bench --calib-seeds``); the guarded
  merge calibrates first, so its seconds include calibration. ``dam_as_released``: the released
  algorithm (its own 1000 + 1000 steps); ``dam_as_published``: DAM's two masks with the
  published objectives (clean and perturbed entropy, untargeted trigger search).
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

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dam_mergekit.errors import DamError
from dam_mergekit.lab.bench.merging import merge_recipe
from dam_mergekit.lab.protocol import DOWN_WEIGHTED, calibration_seed

if TYPE_CHECKING:
    import torch

    from dam_mergekit.masks import MaskFile

RecipeBuilder = Callable[[Path, dict[str, Any], Path], dict[str, Any]]
"""(zoo_dir, manifest, work_dir) -> mergekit recipe dict; work_dir is for files a method needs."""


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


def backdoor_third_recipe(zoo: Path, manifest: dict, work: Path) -> dict:
    recipe = task_arithmetic_recipe(zoo, manifest, work)
    for entry, task in zip(recipe["models"], manifest["tasks"], strict=True):
        if task["backdoored"]:
            entry["parameters"]["weight"] /= 3
    return recipe


def _zoo_seed(manifest: dict) -> int:
    return int(manifest.get("options", {}).get("seed", 0))


def _calibration_file(zoo: Path, manifest: dict, work: Path, name: str, settings: dict) -> Path:
    """``work/<name>-calibration.yml``: the package default for the zoo's kind, seeded with the
    zoo's calibration seed, with ``settings`` on top (``mode: as_released`` for the released
    algorithm; ``seed`` when the bench was given calibration seeds)."""
    import yaml

    from dam_mergekit.calibrate.config import default_calibration
    from dam_mergekit.lab.kinds import zoo_kind

    adapter = zoo_kind(manifest["kind"]).adapter
    calibration = default_calibration(
        adapter, str(zoo.resolve()), **{"seed": calibration_seed(_zoo_seed(manifest)), **settings}
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
    DOWN_WEIGHTED: backdoor_third_recipe,
}
# Undefended merges learned by the calibration: name -> settings over the package defaults.
_LEARNED_MERGES: dict[str, dict[str, Any]] = {"distill": {"alpha": 0.0}}
# Calibrated defenses: name -> calibration settings over the package defaults.
_CALIBRATED: dict[str, dict[str, Any]] = {
    "dam": {},
    "dam_as_released": {"mode": "as_released"},
    # DAM's two masks with the published objectives (the package's other settings)
    "dam_as_published": {
        "perf_loss": "entropy",
        "safe_loss": "entropy",
        "trigger_search": "untargeted",
    },
    # M2 learned against the pre-merge audit's inverted triggers; only flagged experts' M2 learn
    "dam_audit": {"audit": True, "trigger_source": "audit"},
    "dam_masks_only": {"train": "masks"},  # ablation: coefficients fixed at coef_init
    "dam_coefficients_only": {"train": "coefficients"},  # ablation: masks all-ones
}
# Rows built on the calibration machinery in another way: name -> recipe builder taking the
# calibration settings that override the defaults (after the calibrated rows in the table).
_DERIVED: dict[str, Callable[..., dict[str, Any]]] = {
    "awm": awm_recipe,
    "task_arithmetic_dam_coefficients": dam_coefficients_recipe,
}


_BUILT_IN = frozenset(_MERGES)


def register_method(name: str, recipe: RecipeBuilder) -> None:
    """Add a merge method (e.g. a defense) to every later bench run, under a name of its own.

    ``recipe(zoo_dir, manifest, work_dir)`` returns a mergekit recipe dict (docs/lab.md)."""
    taken = any(name in table for table in (_MERGES, _LEARNED_MERGES, _CALIBRATED, _DERIVED))
    if taken or name == "pretrained" or name.startswith(("expert:", "control:")):
        raise DamError(f"bench method {name!r} is already registered")
    _MERGES[name] = recipe


def unregister_method(name: str) -> None:
    """Remove a method :func:`register_method` added (the built-in ones stay)."""
    if name in _BUILT_IN or name not in _MERGES:
        raise DamError(f"bench method {name!r} was not added by register_method")
    del _MERGES[name]


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
    for n, settings in {**_LEARNED_MERGES, **_CALIBRATED}.items():
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
