"""``dam-mergekit zoo build``: build (or find cached) an offline backdoor zoo."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("zoo", help="build offline model zoos for the backdoor lab")
    zoo_sub = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zoo_sub.required = True
    b = zoo_sub.add_parser(
        "build",
        help="build a zoo (cached: the same options again return at once)",
        description="Build a zoo of a base model, experts (some backdoored) and clean controls.",
    )
    b.add_argument("--kind", choices=("clip", "llm"), default="clip")
    b.add_argument("--attack", help="trigger: badnets, blended or sig (default badnets)")
    b.add_argument(
        "--attack-mode",
        choices=("standard", "merge-aware"),
        help="plain poisoned fine-tuning or poisoned steps through a simulated merge "
        "(default merge-aware)",
    )
    b.add_argument("--backdoored", type=int, help="how many tasks (the first N) get a backdoor")
    b.add_argument("--target-class", type=int, help="class index the trigger maps to (default 0)")
    b.add_argument("--poison-rate", type=float, help="share of a task's training set poisoned")
    b.add_argument("--seed", type=int, help="seed of data, initialisation and training (default 0)")
    b.add_argument("--pretrain-steps", type=int, help="CLIP pretraining steps (default 300)")
    b.add_argument("--expert-steps", type=int, help="fine-tuning steps per expert (default 300)")
    b.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    b.add_argument("--out", required=True, help="zoo directory to create")
    b.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from dam_mergekit.zoo.build import build_zoo

    options = {
        "kind": args.kind,
        "attack": args.attack,
        "attack_mode": args.attack_mode,
        "backdoored": args.backdoored,
        "target_class": args.target_class,
        "poison_rate": args.poison_rate,
        "seed": args.seed,
        "pretrain_steps": args.pretrain_steps,
        "expert_steps": args.expert_steps,
    }
    start = time.perf_counter()
    out = build_zoo(args.out, {k: v for k, v in options.items() if v is not None}, force=args.force)
    print(f"zoo at {out} ({time.perf_counter() - start:.1f} s)")
    return 0
