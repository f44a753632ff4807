"""``dam-mergekit audit RECIPE``: which experts carry a backdoor, before anything is merged."""

from __future__ import annotations

import argparse
from pathlib import Path

from dam_mergekit.errors import DamError


def add_parser(sub: argparse._SubParsersAction) -> None:
    aud = sub.add_parser(
        "audit",
        help="invert triggers on each expert of a dam recipe and flag the suspicious ones",
        description="For each expert of a dam recipe, search its own task's unlabeled inputs "
        "for a small trigger (a patch, or a universal perturbation) that sends them to one "
        "class, for every class, on the expert merged alone with the base at a few scales. An "
        "anomaly index across experts and classes flags the experts with a backdoor-like "
        "shortcut (docs/audit.md). Reads the recipe's calibration file for the data.",
    )
    aud.add_argument("recipe", help="a dam recipe with `parameters: {calibration: FILE}`")
    aud.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    aud.add_argument(
        "--pictures", metavar="DIR", help="save each image expert's suspected trigger as PNG"
    )
    aud.add_argument("--scales", help="comma-separated expert scales (default 1.0)")
    aud.add_argument(
        "--families",
        help="trigger families: auto (default: patch on images, universal elsewhere) or a "
        "comma-separated choice of patch, universal",
    )
    aud.add_argument(
        "--threshold", type=float, help="excess flip rate that flags an expert (default 0.55)"
    )
    aud.add_argument("--seed", type=int, help="seed of the inputs and trigger starts (default 0)")
    aud.add_argument("--device", help="torch device (default: the calibration file's)")
    aud.add_argument("--no-progress", action="store_true", help="no progress bar")
    aud.set_defaults(func=cmd_audit)


def config_from_args(args: argparse.Namespace, device: str):
    from dam_mergekit.audit.config import AuditConfig

    raw: dict = {"device": args.device or device}
    if args.seed is not None:
        raw["seed"] = args.seed
    if args.threshold is not None:
        raw["threshold"] = args.threshold
    if args.scales:
        try:
            raw["scales"] = tuple(float(s) for s in args.scales.split(","))
        except ValueError:
            raise DamError(
                f"--scales must be comma-separated numbers, got {args.scales!r}"
            ) from None
    if args.families:
        raw["families"] = tuple(f.strip() for f in args.families.split(","))
    return AuditConfig.from_dict(raw, where="audit options")


def cmd_audit(args: argparse.Namespace) -> int:
    from dam_mergekit.audit.report import format_table, save_pictures, write_json
    from dam_mergekit.audit.run import Auditor
    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.recipe.load import load_calibrated_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    recipe, settings = load_calibrated_recipe(args.recipe, "the audit reads its data")
    calibration = CalibrationConfig.load(settings.calibration)
    config = config_from_args(args, calibration.device)
    check_outputs(args.json, args.pictures)
    plan = plan_recipe(recipe, allow_pickle=settings.allow_pickle)
    report = Auditor(plan, calibration, config).run(progress=not args.no_progress)
    print(format_table(report))
    if args.json:
        write_json(report, Path(args.json))
        print(f"wrote {args.json}")
    if args.pictures:
        for path in save_pictures(report, Path(args.pictures)):
            print(f"wrote {path}")
    return 0


def check_outputs(json_path: str | None, pictures: str | None) -> None:
    """Refuse unusable output paths before the (long) audit runs."""
    if json_path is not None:
        target = Path(json_path)
        if target.is_dir():
            raise DamError(f"--json {json_path}: is a directory")
        if not target.parent.resolve().is_dir():
            raise DamError(f"--json {json_path}: folder {target.parent} does not exist")
    if pictures is not None and Path(pictures).exists() and not Path(pictures).is_dir():
        raise DamError(f"--pictures {pictures}: exists and is not a directory")
