"""``dam-mergekit bench``: merge a zoo's experts with several methods and score each merge.

Also ``dam-mergekit demo``, the offline demonstration behind ``make demo``. The methods are listed
in :mod:`dam_mergekit.lab.bench.methods`.
"""

from __future__ import annotations

import argparse
import time

from dam_mergekit.errors import DamError
from dam_mergekit.lab.bench.methods import methods_for
from dam_mergekit.lab.bench.report import report
from dam_mergekit.lab.bench.runner import run_bench
from dam_mergekit.lab.claims import DAM_CUT

# Rows the demo leaves to `bench`: the released algorithm runs its own 1000 + 1000 steps, which
# would take the demo past ten minutes on two cores.
DEMO_LEAVES_OUT = ("dam_as_released", "dam_audit")
# The demo's rows on the transfer zoo: the merges people run, the clean control, and DAM.
DEMO_TRANSFER_ROWS = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "task_arithmetic_clean_control",
    "dam",
)


def parse_seeds(text: str | None, option: str = "--seeds") -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DamError(f"{option} must be comma-separated integers, got {text!r}") from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="merge a zoo with several methods and score them",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--zoo", required=True, help="zoo directory")
    p.add_argument("--out", required=True, help="output directory (results.json, summary.md, png)")
    p.add_argument(
        "--seeds",
        help="comma-separated zoo seeds (0-2 development, 3-7 test); other seeds are built "
        "beside ZOO",
    )
    p.add_argument(
        "--calib-seeds",
        help="calibration seeds: one for every zoo seed, or one per zoo seed (default: 1000 + the "
        "zoo seed; never the zoo seed itself)",
    )
    p.add_argument("--methods", help="comma-separated subset of methods")
    p.add_argument(
        "--calibration",
        help="YAML file of calibration settings that override the defaults of the dam and awm methods",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless a merge-aware zoo shows succession under task arithmetic and, when "
        f"dam runs, dam cuts its ASR by >= {DAM_CUT.asr_cut:g} points at no more than "
        f"{DAM_CUT.acc_drop:g} pp of accuracy",
    )
    p.set_defaults(func=_run_bench)

    d = subparsers.add_parser(
        "demo",
        help="build the default CLIP zoo, bench it, check succession",
        description="The offline demonstration behind `make demo`: build (or reuse) the default "
        "CLIP zoo, merge it with the bench's methods (the released algorithm's reproduction is "
        "left to `bench`), print the ACC/ASR/p0 table and exit 1 "
        "unless succession shows under task arithmetic and dam removes it.",
    )
    d.add_argument("--zoo", default=".cache/zoo/clip-default", help="where the zoo is cached")
    d.add_argument("--out", default="out/demo", help="bench output directory")
    d.add_argument(
        "--off-task-zoo",
        default=".cache/zoo/clip-off-task",
        help="where the transfer zoo (zoo build --attack-mode off-task) is cached",
    )
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
        args.zoo,
        args.out,
        seeds=parse_seeds(args.seeds),
        only=only,
        calibration=calibration,
        calibration_seeds=parse_seeds(args.calib_seeds, "--calib-seeds"),
    )
    print(f"wrote {args.out}/results.json, summary.md, acc_asr.png")
    return report(results, check=args.check)


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dam_mergekit.lab.zoo.build import build_zoo
    from dam_mergekit.lab.zoo.clip_options import OFF_TASK_ZOO
    from dam_mergekit.lab.zoo.manifest import load_manifest

    start = time.perf_counter()
    zoo = build_zoo(args.zoo, {"kind": "clip"})
    print(f"zoo ready at {zoo} ({time.perf_counter() - start:.0f} s)")
    names = [m.name for m in methods_for(load_manifest(zoo))]
    results = run_bench(zoo, args.out, only=[n for n in names if n not in DEMO_LEAVES_OUT])
    print(f"(left to dam-mergekit bench: {', '.join(DEMO_LEAVES_OUT)})")
    print(f"wrote {args.out}/results.json, summary.md, acc_asr.png")
    succession = report(results, check=True)
    print("\nTransfer: the same zoo with BadMerging's off-task attack (the digits expert's trigger")
    print("aims at class 0 of shapes, whose expert is clean)")
    off_zoo = build_zoo(args.off_task_zoo, OFF_TASK_ZOO)
    off_out = str(Path(args.out) / "off-task")
    off = run_bench(off_zoo, off_out, only=list(DEMO_TRANSFER_ROWS))
    print(f"wrote {off_out}/results.json, summary.md, acc_asr.png")
    transfer = report(off, check=True)
    print(f"demo: {time.perf_counter() - start:.0f} s in all")
    return max(succession, transfer)
