"""``build_zoo``: options in, a zoo directory out; cached by a hash of the options, never partial.

The zoo is written into a temporary sibling directory and renamed into place at the end, so an
interrupted build leaves no half zoo. A second build with the same options finds the hash in the
existing ``zoo.json`` and returns at once.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from dam_mergekit.errors import DamError
from dam_mergekit.lab.zoo.manifest import load_manifest, options_hash, write_manifest
from dam_mergekit.staging import publish, temp_sibling

LOG = logging.getLogger(__name__)

# Default CLIP zoo: chosen for realism and a 10-minute demo on 2 cores, not tuned for any method.
# Poisoning as in BackdoorBench (10 %, 3x3 BadNets patch, all-to-one target 0).
CLIP_DEFAULTS: dict[str, Any] = {
    "kind": "clip",
    "tasks": ["digits", "shapes", "colours", "stripes"],
    "attack": "badnets",
    "attack_mode": "merge-aware",
    "backdoored": 1,
    "target_class": 0,
    "poison_rate": 0.1,
    "seed": 0,
    "n_train": 1200,
    "n_test": 480,
    "n_calib": 200,
    "patch_size": 8,
    "hidden_size": 128,
    "num_layers": 3,
    "batch_size": 64,
    "pretrain_steps": 200,
    "pretrain_lr": 1e-3,
    "expert_steps": 500,
    "expert_lr": 2e-4,
}


def resolve_options(options: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults for the kind and check values before anything is written."""
    from dam_mergekit.lab.zoo.attacks import ATTACKS, default_params
    from dam_mergekit.lab.zoo.data import TASKS

    kind = options.get("kind", "clip")
    if kind == "llm":
        return {k: v for k, v in options.items() if v is not None}
    if kind != "clip":
        raise DamError(f"zoo kind must be 'clip' or 'llm', got {kind!r}")
    resolved = dict(CLIP_DEFAULTS)
    resolved.update({k: v for k, v in options.items() if v is not None})
    unknown = [t for t in resolved["tasks"] if t not in TASKS]
    if unknown:
        raise DamError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    if resolved["attack"] not in ATTACKS:
        raise DamError(f"unknown attack {resolved['attack']!r}; choose one of {', '.join(ATTACKS)}")
    if resolved["attack_mode"] not in ("standard", "merge-aware"):
        raise DamError("--attack-mode must be 'standard' or 'merge-aware'")
    if not 0 <= resolved["backdoored"] <= len(resolved["tasks"]):
        raise DamError(f"--backdoored must be 0..{len(resolved['tasks'])}")
    if not 0.0 < resolved["poison_rate"] < 1.0:
        raise DamError("--poison-rate must lie in (0, 1)")
    smallest = min(len(TASKS[t].classes) for t in resolved["tasks"])
    if not 0 <= resolved["target_class"] < smallest:
        raise DamError(f"--target-class must be 0..{smallest - 1} (every task has that class)")
    resolved.setdefault("attack_params", default_params(resolved["attack"]))
    return resolved


def build_zoo(out_dir: str | Path, options: dict[str, Any] | None = None, *, force: bool = False):
    """Build (or find cached) the zoo for ``options`` at ``out_dir``; returns the path."""
    options = resolve_options(dict(options or {}))
    out = Path(out_dir)
    digest = options_hash(options)
    if out.exists() and not force:
        if (out / "zoo.json").is_file():
            try:
                cached = load_manifest(out)
            except DamError:
                cached = {}
            if cached.get("options_hash") == digest:
                LOG.info("zoo at %s is up to date (options hash %s)", out, digest)
                return out
        if any(out.iterdir()) and not (out / "zoo.json").is_file():
            raise DamError(f"{out}: exists and is not a zoo; choose another --out or remove it")
    tmp = temp_sibling(out, is_dir=True)
    try:
        if options["kind"] == "llm":
            try:
                from dam_mergekit.lab.zoo.llm import build_llm_zoo
            except ImportError as err:
                raise DamError(
                    f"this dam-mergekit has no LLM zoo builder ({err}); use --kind clip"
                ) from None
            build_llm_zoo(tmp, options)
            manifest = load_manifest(tmp)
        else:
            from dam_mergekit.lab.zoo.clip_build import build_clip_zoo

            manifest = build_clip_zoo(tmp, options)
        manifest["options_hash"] = digest
        write_manifest(tmp, manifest)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
