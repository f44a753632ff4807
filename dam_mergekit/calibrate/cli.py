"""``dam-mergekit calibrate RECIPE``: learn a recipe's mask file without merging."""

from __future__ import annotations

import argparse
import os

from dam_mergekit.calibrate.launch import PARALLEL_ENV, PARALLEL_MODES, is_main_process


def add_parser(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser(
        "calibrate",
        help="learn the masks of a dam recipe (no merge)",
        description="Learn the masks of a dam recipe without merging. Under torchrun "
        "--nproc-per-node N -m dam_mergekit.cli calibrate RECIPE each of the N processes runs "
        "its share of every batch (--parallel data), or keeps 1/N of the calibration state "
        "with torch FSDP (--parallel state) (docs/calibration.md).",
    )
    cal.add_argument("recipe", help="a dam recipe with `parameters: {calibration: FILE}`")
    cal.add_argument(
        "--force", action="store_true", help="calibrate even when the mask file is up to date"
    )
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal.add_argument(
        "--parallel",
        choices=sorted(PARALLEL_MODES),
        help="under torchrun: split every batch (data, the default: faster) or shard the state "
        f"(state: less memory per process); sets {PARALLEL_ENV}",
    )
    cal.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from dam_mergekit.calibrate.hook import ensure_masks
    from dam_mergekit.recipe.load import load_calibrated_recipe, mask_path_for
    from dam_mergekit.recipe.plan import plan_recipe

    if args.parallel:
        os.environ[PARALLEL_ENV] = args.parallel
    config, settings = load_calibrated_recipe(args.recipe, "nothing to calibrate")
    allow_pickle = settings.allow_pickle
    plan = plan_recipe(config, allow_pickle=allow_pickle)
    path = mask_path_for(settings.masks, settings.calibration)
    result = ensure_masks(
        plan, path, settings.calibration, force=args.force, progress=not args.no_progress
    )
    if not is_main_process():
        return 0
    if result is None:
        print(f"{path} is up to date (use --force to calibrate again)")
    else:
        t = result.timings
        print(f"wrote {path}: {len(result.masks.coefficients)} tensors, {t.get('total', 0):.1f} s")
    return 0
