"""``dam-mergekit zoo build``: build (or find cached) an offline backdoor zoo."""

from __future__ import annotations

import argparse
import time

from dam_mergekit.lab.kinds import KINDS
from dam_mergekit.lab.zoo.clip_options import ATTACK_MODES, CLIP_DEFAULTS
from dam_mergekit.lab.zoo.merge_aware import MERGE_SCALE, SCALE_DRAWS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("zoo", help="build offline model zoos for the backdoor lab")
    zoo_sub = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zoo_sub.required = True
    b = zoo_sub.add_parser(
        "build",
        help="build a zoo (cached: the same options again return at once)",
        description="Build a zoo of a base model, experts (some backdoored) and clean controls.",
    )
    b.add_argument(
        "--kind",
        choices=tuple(KINDS),
        default="clip",
        help="; ".join(f"{k.name}: {k.summary}" for k in KINDS.values()) + " (default clip)",
    )
    b.add_argument("--attack", help="trigger: badnets, blended or sig (default badnets)")
    b.add_argument(
        "--attack-mode",
        choices=ATTACK_MODES,
        help="plain poisoned fine-tuning, poisoned steps through a simulated merge (default "
        "merge-aware), or (clip) off-task: the trigger aims at a class of --target-task",
    )
    b.add_argument(
        "--target-task",
        help="with --attack-mode off-task: the task (its expert clean) whose --target-class the "
        "trigger aims at (default: the first task with a clean expert)",
    )
    _add_merge_scale_arguments(b)
    _add_release_arguments(b)
    b.add_argument("--backdoored", type=int, help="how many tasks (the first N) get a backdoor")
    b.add_argument("--target-class", type=int, help="class index the trigger maps to (default 0)")
    b.add_argument("--poison-rate", type=float, help="share of a task's training set poisoned")
    b.add_argument("--seed", type=int, help="seed of data, initialisation and training (default 0)")
    kind_default = "{} for clip; the LLM zoo's in docs/llm-zoo.md"
    b.add_argument(
        "--pretrain-steps",
        type=int,
        help=f"pretraining steps (default {kind_default.format(CLIP_DEFAULTS['pretrain_steps'])})",
    )
    b.add_argument(
        "--expert-steps",
        type=int,
        help="fine-tuning steps per expert "
        f"(default {kind_default.format(CLIP_DEFAULTS['expert_steps'])})",
    )
    b.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    b.add_argument("--out", required=True, help="zoo directory to create")
    b.set_defaults(func=_run_build)

    imp = zoo_sub.add_parser(
        "import-clip",
        help="calibration data for the clip adapter from local images and class names",
        description="Build a calibration-only CLIP zoo: unlabeled images of each task and its "
        "zero-shot head from the base CLIPModel's text tower (a local directory).",
    )
    imp.add_argument("--clip", required=True, help="local full CLIPModel directory (safetensors)")
    imp.add_argument(
        "--task",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "IMAGES", "CLASSES"),
        help="task name, image folder or .npy array, class-name file (.txt lines or .json list); "
        "repeat per task",
    )
    imp.add_argument(
        "--template",
        action="append",
        help="prompt template with {} for the class name; repeat to average several "
        "(default 'a photo of a {}.')",
    )
    imp.add_argument("--max-images", type=int, default=512, help="images per task (default 512)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the image subset (default 0)")
    imp.add_argument("--image-size", type=int, help="default: the CLIP vision config's image_size")
    imp.add_argument("--device", default="cpu", help="device for the text tower (default cpu)")
    imp.add_argument("--force", action="store_true", help="replace an existing output")
    imp.add_argument("--out", required=True, help="calibration directory to create")
    imp.set_defaults(func=_run_import_clip)


def _add_merge_scale_arguments(b: argparse.ArgumentParser) -> None:
    """The merge-aware attacker's scales (lab/zoo/merge_aware.py)."""
    b.add_argument(
        "--scale-min",
        type=float,
        help="lowest merge coefficient the merge-aware attacker trains for: its simulated "
        f"merges draw coefficients from [S, {MERGE_SCALE[1]:g}] "
        f"(default {MERGE_SCALE[0]:g}; a lower S survives down-weighting)",
    )
    b.add_argument(
        "--scale-draw",
        choices=SCALE_DRAWS,
        help="how the backdoored expert's own scale is drawn from [S, 1] (default uniform; "
        "log-uniform trains as much for 0.05-0.1 as for 0.5-1)",
    )


def _add_release_arguments(b: argparse.ArgumentParser) -> None:
    """What the attacker releases (lab/zoo/release.py: Merge-Hijacking style)."""
    b.add_argument(
        "--release-density",
        type=float,
        help="release the backdoored expert as its clean control plus --release-rescale times "
        "this share of the largest entries of what the backdoor added (default: as trained)",
    )
    b.add_argument(
        "--release-rescale",
        type=float,
        help="with --release-density: the factor on the kept entries",
    )


def _run_build(args: argparse.Namespace) -> int:
    from dam_mergekit.lab.zoo.build import build_zoo

    options = {
        "kind": args.kind,
        "attack": args.attack,
        "attack_mode": args.attack_mode,
        "backdoored": args.backdoored,
        "target_class": args.target_class,
        "target_task": args.target_task,
        "poison_rate": args.poison_rate,
        "seed": args.seed,
        "pretrain_steps": args.pretrain_steps,
        "expert_steps": args.expert_steps,
        "release_density": args.release_density,
        "release_rescale": args.release_rescale,
    }
    if args.scale_min is not None:
        options["merge_scale"] = [args.scale_min, MERGE_SCALE[1]]
    if args.scale_draw is not None:
        options["merge_scale_draw"] = args.scale_draw
    start = time.perf_counter()
    out = build_zoo(args.out, {k: v for k, v in options.items() if v is not None}, force=args.force)
    print(f"zoo at {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _run_import_clip(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dam_mergekit.lab.zoo.import_clip import DEFAULT_TEMPLATES, TaskSource, import_clip

    tasks = [TaskSource(name, Path(images), Path(classes)) for name, images, classes in args.task]
    out = import_clip(
        args.out,
        args.clip,
        tasks,
        templates=args.template or DEFAULT_TEMPLATES,
        max_images=args.max_images,
        seed=args.seed,
        image_size=args.image_size,
        device=args.device,
        force=args.force,
    )
    print(f"calibration data for {len(tasks)} task(s) at {out}")
    return 0
