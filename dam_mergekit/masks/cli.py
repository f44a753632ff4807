"""``dam-mergekit masks init | inspect | validate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dam_mergekit.errors import DamError


def add_parser(sub: argparse._SubParsersAction) -> None:
    masks = sub.add_parser("masks", help="create, inspect and validate mask files")
    msub = masks.add_subparsers(dest="masks_command", metavar="ACTION")
    msub.required = True

    init = msub.add_parser("init", help="a mask file that keeps everything (1) or nothing (0)")
    init.add_argument("recipe", help="a dam recipe (mergekit YAML)")
    init.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    init.add_argument(
        "--value",
        type=int,
        choices=(0, 1),
        default=1,
        help="1 keeps every task-vector entry (task arithmetic), 0 keeps none (base)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_init)

    inspect = msub.add_parser("inspect", help="kept fraction per tensor and model, fingerprints")
    inspect.add_argument("file", help="mask file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(func=cmd_inspect)

    validate = msub.add_parser("validate", help="check a mask file against a recipe, no merge")
    validate.add_argument("file", help="mask file")
    validate.add_argument("--recipe", required=True, help="the dam recipe it is meant for")
    validate.set_defaults(func=cmd_validate)


def _plan(recipe: str):
    from dam_mergekit.recipe.load import dam_settings, is_dam, load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    config = load_recipe(recipe)
    if not is_dam(config):
        raise DamError(f"{recipe}: merge_method is {config.merge_method!r}, not dam")
    allow_pickle = dam_settings(config).allow_pickle
    return plan_recipe(config, allow_pickle=allow_pickle), allow_pickle


def cmd_init(args: argparse.Namespace) -> int:
    from dam_mergekit.masks import MaskSet, ModelRecord, fingerprint_model, write_mask_file
    from dam_mergekit.model_files import model_dir

    out = Path(args.out)
    if out.exists() and not args.force:
        raise DamError(f"{out}: already exists; pass --force to overwrite it")
    plan, allow_pickle = _plan(args.recipe)

    def record(ref) -> ModelRecord:
        return ModelRecord(str(ref), fingerprint_model(model_dir(ref), allow_pickle=allow_pickle))

    shapes = plan.shapes()
    masks = MaskSet()
    if args.value == 0:
        masks.m1 = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in shapes.items()}
    write_mask_file(
        out,
        masks,
        base=record(plan.base),
        experts=[record(e) for e in plan.experts],
        tensor_shapes=shapes,
        settings={"source": "masks init", "value": args.value, "recipe": args.recipe},
    )
    print(f"wrote {out}: {len(shapes)} tensors, {len(plan.experts)} experts, keep={args.value}")
    return 0


def summarize(path: str) -> dict:
    """Kept fractions (weighted by parameter count), models and settings of a mask file."""
    import math

    from dam_mergekit.masks import MaskFile

    mf = MaskFile(path)
    n = len(mf.experts)
    rows, total, kept_m1, kept_model = [], 0, 0.0, [0.0] * n
    for name in mf.names:
        numel = math.prod(mf.shape(name))
        m1 = mf.kept_fraction(name)
        per = [mf.kept_fraction(name, i) for i in range(n)]
        coef = mf.coefficients(name).tolist()
        rows.append({"tensor": name, "numel": numel, "m1_kept": m1, "kept": per, "coef": coef})
        total += numel
        kept_m1 += m1 * numel
        kept_model = [k + p * numel for k, p in zip(kept_model, per, strict=True)]
    total = max(total, 1)
    return {
        "path": str(path),
        "base": mf.header["base"],
        "experts": mf.header["experts"],
        "m2_shared": mf.header.get("m2_shared", False),
        "settings": mf.settings,
        "audit": mf.audit,
        "m1_kept": kept_m1 / total,
        "kept_per_model": [k / total for k in kept_model],
        "tensors": rows,
    }


def audit_verdicts(audit: dict | None) -> dict[str, str]:
    """Each audited expert's verdict as a short suffix for its line."""
    out = {}
    for e in (audit or {}).get("experts", []):
        if "score" in e:
            word = "SUSPICIOUS" if e["flagged"] else "clean"
            out[e["expert"]] = (
                f"  audit {word} (index {e['score']:.2f}, class {e['suspected_class']})"
            )
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    info = summarize(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"mask file {info['path']}")
    print(f"  base    {info['base']['model']}  {info['base']['fingerprint'][:23]}")
    verdicts = audit_verdicts(info["audit"])
    for i, e in enumerate(info["experts"]):
        print(
            f"  expert {i} {e['model']}  {e['fingerprint'][:23]}  "
            f"kept {100 * info['kept_per_model'][i]:.1f}% (M1*M2){verdicts.get(e['model'], '')}"
        )
    if info["audit"] is not None:
        flagged = info["audit"].get("flagged", [])
        print(
            f"  audit flagged {len(flagged)} expert(s) before merging{': ' if flagged else ''}"
            + ", ".join(flagged)
        )
    print(
        f"  M1 keeps {100 * info['m1_kept']:.1f}% of task-vector entries"
        f"{'; M2 shared by all experts' if info['m2_shared'] else ''}"
    )
    print(f"  settings {json.dumps(info['settings'], sort_keys=True)}")
    width = max([len(r["tensor"]) for r in info["tensors"]] + [6])
    head = "  ".join(f"M1*M2[{i}]" for i in range(len(info["experts"])))
    print(f"\n{'tensor':<{width}}  {'params':>10}  {'M1':>6}  {head}  coef")
    for r in info["tensors"]:
        per = "  ".join(f"{100 * k:>8.1f}%" for k in r["kept"])
        coef = ",".join(f"{c:.3g}" for c in r["coef"])
        print(
            f"{r['tensor']:<{width}}  {r['numel']:>10}  {100 * r['m1_kept']:>5.1f}%  {per}  {coef}"
        )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from dam_mergekit.masks.validate import validate_plan
    from dam_mergekit.recipe.load import mask_path_for

    plan, allow_pickle = _plan(args.recipe)
    used = {
        mask_path_for(t.parameters.get("masks"), t.parameters.get("calibration"))
        for t in plan.float_tensors
    }
    if not any(Path(u).resolve() == Path(args.file).resolve() for u in used):
        raise DamError(
            f"{args.recipe}: does not use {args.file} (its masks: {sorted(map(str, used))})"
        )
    reports = validate_plan(plan, allow_pickle=allow_pickle)
    for report in reports:
        print(
            f"ok {report.path}: {len(report.tensors)} tensors, {len(report.experts)} experts "
            "match the recipe's models"
        )
    return 0
