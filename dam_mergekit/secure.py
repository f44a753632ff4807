"""``dam-mergekit secure IN.yml OUT.yml``: a task-arithmetic-family recipe, made backdoor-aware.

A ``task_arithmetic``, ``ties`` or ``dare_ties`` recipe already names everything DAM needs (base,
experts, weights, lambda). ``secure`` keeps those, switches the method to ``dam`` and adds a
calibration file skeleton; the masks DAM learns there take the place of TIES's trimming and sign
election and of DARE's random drop. Whatever has no DAM counterpart is dropped and reported, one
line each, so that nothing changes meaning silently.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dam_mergekit.errors import DamError
from dam_mergekit.recipe.load import read_yaml
from dam_mergekit.staging import staged_files

SOURCE_METHODS = ("task_arithmetic", "ties", "dare_ties")
KEPT_PARAMETERS = ("weight", "lambda")
# normalize defaults of mergekit 0.1.5's generalized task arithmetic
DEFAULT_NORMALIZE = {"task_arithmetic": False, "ties": True, "dare_ties": False}
METHOD_NOTES = {
    "ties": "ties: TIES's magnitude trimming (density) and sign election have no dam "
    "counterpart; the masks learned by calibration decide which task-vector entries stay",
    "dare_ties": "dare_ties: DARE's random drop with rescaling (density, rescale) and TIES's sign "
    "election have no dam counterpart; the masks learned by calibration decide which "
    "task-vector entries stay",
}
WHY = {
    "density": "dam learns which entries to keep (its masks) instead of keeping a fixed fraction",
    "rescale": "dam keeps no random drop to rescale for",
    "int8_mask": "a memory option of the sign election, which dam does not do",
    "normalize": "dam does not divide by the sum of the weights",
}
TOP_LEVEL_KEPT = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "chat_template",
)
# the settings a calibration skeleton spells out, with the adapter's package defaults
CALIBRATION_KEYS = (
    "adapter",
    "data",
    "steps",
    "final_steps",
    "batch_size",
    "alpha",
    "eps",
    "granularity",
)


@dataclass
class Secured:
    """The dam recipe, the calibration skeleton's text, and one note per thing not carried over."""

    recipe: dict[str, Any]
    calibration_text: str
    notes: list[str] = field(default_factory=list)


def calibration_path_for(out: str | os.PathLike) -> Path:
    """``x.yml`` -> ``x.calibration.yml`` (beside the recipe)."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix in (".yml", ".yaml") else out.name
    return out.with_name(f"{stem}.calibration.yml")


def secure_recipe(raw: dict[str, Any], calibration: str, *, source: str = "recipe") -> Secured:
    """Turn a parsed task_arithmetic/ties/dare_ties recipe into a dam recipe."""
    from dam_mergekit.recipe.load import load_recipe

    if not isinstance(raw, dict):
        raise DamError(f"{source}: a mergekit recipe is a YAML mapping")
    method = raw.get("merge_method")
    if method not in SOURCE_METHODS:
        raise DamError(
            f"{source}: merge_method is {method!r}; secure converts "
            f"{', '.join(SOURCE_METHODS)} recipes only (dam is masked task arithmetic)"
        )
    for key in ("slices", "modules"):
        if raw.get(key):
            raise DamError(
                f"{source}: recipes with `{key}` are not supported by secure; "
                "rewrite it with a `models:` list (dam merges whole models)"
            )
    if not raw.get("base_model"):
        raise DamError(
            f"{source}: no base_model; dam (like task arithmetic) takes task vectors "
            "against a base model, so add `base_model:`"
        )
    load_recipe(raw)  # one clear line for anything else mergekit would reject

    notes: list[str] = []
    if method in METHOD_NOTES:
        notes.append(METHOD_NOTES[method])
    out: dict[str, Any] = {"merge_method": "dam", "base_model": raw["base_model"]}
    base = str(raw["base_model"])
    models = []
    for i, entry in enumerate(raw.get("models") or []):
        entry = copy.deepcopy(entry)
        params = entry.pop("parameters", None) or {}
        where = f"models[{i}] ({entry.get('model')})"
        kept = _keep_parameters(params, where, method, notes)
        if kept:
            entry["parameters"] = kept
        models.append(entry)
    out["models"] = models
    global_params = _keep_parameters(
        dict(raw.get("parameters") or {}), "parameters", method, notes, global_scope=True
    )
    given = raw.get("parameters") or {}
    normalize = given.get("normalize", DEFAULT_NORMALIZE[method])
    if normalize is not False:
        how = "set in the recipe" if "normalize" in given else f"the {method} default"
        notes.append(_normalize_note(normalize, how, raw, base))
    out["parameters"] = {"calibration": calibration, **global_params}
    for key in ("dtype", "out_dtype", "chat_template"):
        if raw.get(key) is not None:
            out[key] = raw[key]
    for key in ("tokenizer_source", "tokenizer"):
        if raw.get(key) is not None:
            notes.append(
                f"{key} dropped: it permutes embedding rows before the kernel and would "
                "misalign dam's masks; align tokenizers before calibration"
            )
    for key in sorted(
        set(raw) - set(TOP_LEVEL_KEPT) - {"tokenizer_source", "tokenizer", "slices", "modules"}
    ):
        notes.append(f"{key} dropped: not a setting secure knows how to carry into a dam recipe")
    load_recipe(out)
    experts = [str(m.get("model")) for m in models if str(m.get("model")) != base]
    return Secured(out, calibration_skeleton(source, experts, _guess_adapter(base)), notes)


def _keep_parameters(
    params: dict[str, Any], where: str, method: str, notes: list[str], *, global_scope: bool = False
) -> dict[str, Any]:
    kept = {}
    for name, value in params.items():
        if name in KEPT_PARAMETERS:
            kept[name] = value
        elif name == "normalize" and global_scope:
            continue  # reported once, with the sum of the weights, by the caller
        elif name in WHY:
            if name == "normalize" and value is False:
                continue
            if name == "rescale" and value is False:
                continue
            notes.append(f"{where}: {name} {_show(value)} dropped: {WHY[name]}")
        else:
            notes.append(f"{where}: {name} {_show(value)} dropped: not a parameter of {method}")
    return kept


def _normalize_note(value: Any, how: str, raw: dict[str, Any], base: str) -> str:
    total = _weight_sum(raw, base)
    hint = (
        f"; to keep about the same size divide `weight` (or `lambda`) by {total:g}, the sum "
        "of the weights"
        if total
        else "; scale `weight` or `lambda` to keep the size"
    )
    return f"parameters: normalize {_show(value)} ({how}) dropped: {WHY['normalize']}{hint}"


def _weight_sum(raw: dict[str, Any], base: str) -> float | None:
    """The sum of the experts' scalar weights, or None when any weight varies per tensor."""
    default = (raw.get("parameters") or {}).get("weight")
    total = 0.0
    for entry in raw.get("models") or []:
        if str(entry.get("model")) == base:
            continue
        weight = (entry.get("parameters") or {}).get("weight", default)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            return None
        total += float(weight)
    return total or None


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _guess_adapter(base: str) -> str | None:
    """``clip`` or ``causal_lm`` from a local base model's config.json; None when unknown."""
    path = Path(base) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    archs = " ".join(config.get("architectures") or [])
    if "CLIP" in archs or str(config.get("model_type", "")).startswith("clip"):
        return "clip"
    if "ForCausalLM" in archs:
        return "causal_lm"
    return None


def _calibration_defaults(adapter: str) -> dict[str, Any]:
    """The calibration stage's own defaults for ``adapter`` (causal_lm differs from clip)."""
    from dam_mergekit.calibrate.config import default_calibration

    defaults = default_calibration(adapter, "")
    return {key: defaults[key] for key in CALIBRATION_KEYS}


def calibration_skeleton(source: str, experts: list[str], adapter: str | None) -> str:
    """A commented calibration file for the secured recipe; ``data`` is left for the user."""
    d = _calibration_defaults(adapter or "clip")
    adapter_line = (
        f"adapter: {adapter}"
        if adapter
        else f"adapter: {d['adapter']}  # TODO: check; the base model's config.json did not tell"
    )
    expert_lines = "\n".join(f"#   - {e}" for e in experts) or "#   (none listed)"
    lines = [
        f"# DAM calibration settings for the recipe secured from {source} (dam-mergekit secure).",
        "# The merge learns its masks from this file first (mergekit-dam-yaml RECIPE OUT), then",
        "# merges. Paths are relative to the directory you run the merge from. Experts:",
        expert_lines,
        "",
        "# Which model family runs the forward/backward passes: clip (CLIP vision models),",
        "# causal_lm, or 'package.module:Class' for your own adapter.",
        adapter_line,
        "# TODO: unlabelled calibration inputs for every expert's task (a zoo directory, or the",
        "# paths your adapter reads). Calibration refuses to start while this is empty.",
        f"data: {json.dumps(d['data'])}",
        "# Alternating optimisation steps (merging coefficients, proxy trigger, shared mask M1,",
        "# backdoor masks M2).",
        f"steps: {d['steps']}",
        "# Coefficient-only steps with the learned masks fixed, after the alternating ones.",
        f"final_steps: {d['final_steps']}",
        "# Calibration inputs per task per step.",
        f"batch_size: {d['batch_size']}",
        "# Weight of the safety term: the loss on inputs carrying the synthesized proxy trigger.",
        f"alpha: {d['alpha']}",
        "# Norm bound of the proxy trigger (a universal perturbation, in the adapter's input",
        "# space); `norm: l2` or `norm: linf` picks the norm.",
        f"eps: {d['eps']}",
        "# Mask granularity: element (one entry per weight, as in the paper), row (one per",
        "# output row: what causal LMs default to, element masks of an LLM do not fit) or tensor.",
        f"granularity: {d['granularity']}",
        "",
    ]
    return "\n".join(lines)


def recipe_text(secured: Secured, source: str) -> str:
    header = [f"# dam recipe written by `dam-mergekit secure` from {source}."]
    if secured.notes:
        header.append("# Not carried over:")
        header += [f"#   - {note}" for note in secured.notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(secured.recipe, sort_keys=False)


def secure_file(src: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Secured:
    """Write ``out`` (the dam recipe) and ``out``'s calibration skeleton, both or neither."""
    src, out = Path(src), Path(out)
    calib = calibration_path_for(out)
    if out.resolve() == src.resolve():
        raise DamError(f"{out}: the output must not overwrite the input recipe")
    for path in (out, calib):
        if path.exists() and not force:
            raise DamError(f"{path}: already exists; pass --force to replace it")
    raw = read_yaml(src, "recipe")
    secured = secure_recipe(raw, str(calib), source=str(src))
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_files(calib, out) as (calib_tmp, out_tmp):
        calib_tmp.write_text(secured.calibration_text, encoding="utf-8")
        out_tmp.write_text(recipe_text(secured, str(src)), encoding="utf-8")
    return secured


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "secure",
        help="turn a task_arithmetic/ties/dare_ties recipe into a dam recipe plus a "
        "calibration file skeleton",
        description="Rewrite RECIPE (task_arithmetic, ties or dare_ties) as a dam recipe at OUT "
        "with the same models, weights and lambda, and write OUT.calibration.yml beside it: the "
        "calibration settings for the experts' architecture, with `data` left for you to fill in.",
    )
    parser.add_argument("recipe", help="mergekit recipe (task_arithmetic, ties or dare_ties)")
    parser.add_argument(
        "out",
        help="dam recipe to write; the calibration skeleton goes to OUT.calibration.yml beside it",
    )
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    parser.set_defaults(func=cmd_secure)


def cmd_secure(args: argparse.Namespace) -> int:
    secured = secure_file(args.recipe, args.out, force=args.force)
    for note in secured.notes:
        print(f"secure: {note}", file=sys.stderr)
    print(
        f"wrote {args.out} and {calibration_path_for(args.out)} (fill in `data`, then run "
        f"mergekit-dam-yaml {args.out} OUT_DIR)"
    )
    return 0
