"""The CLIP zoo's build options: defaults and checks (light: ``zoo build --help`` shows them)."""

from __future__ import annotations

from typing import Any

from dam_mergekit.errors import DamError
from dam_mergekit.lab.zoo.merge_aware import MERGE_SCALE, check_merge_options
from dam_mergekit.lab.zoo.release import check_release_options

# standard: poisoned fine-tuning; merge-aware: poisoned steps through simulated merges;
# off-task: the backdoor aims at another task's class (BadMerging's off-task attack, transfer)
ATTACK_MODES = ("standard", "merge-aware", "off-task")

# Default CLIP zoo: chosen for realism and a 10-minute demo on 2 cores, not tuned for any method.
# Poisoning as in BackdoorBench (10 %, 3x3 BadNets patch, all-to-one target 0).
CLIP_DEFAULTS: dict[str, Any] = {
    "kind": "clip",
    "tasks": ["digits", "shapes", "colours", "stripes"],
    "attack": "badnets",
    "attack_mode": "merge-aware",
    "merge_scale": list(MERGE_SCALE),  # simulated merge coefficients of the merge-aware attacker
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


# The transfer zoo of the demo and of book chapter 3 (one cache): the default zoo, but the
# digits expert's trigger aims at class 0 of shapes (BadMerging's off-task attack).
OFF_TASK_ZOO: dict[str, Any] = {"kind": "clip", "attack_mode": "off-task", "target_task": "shapes"}


def _check_target_task(resolved: dict[str, Any]) -> None:
    """Off-task mode aims at a task whose expert is clean (default: the first such task); the
    option exists only in that mode, so the other zoos' option hashes do not change."""
    target = resolved.get("target_task")
    if resolved["attack_mode"] != "off-task":
        if target is not None:
            raise DamError("--target-task goes with --attack-mode off-task")
        return
    names = list(resolved["tasks"])
    clean = names[resolved["backdoored"] :]
    if resolved["backdoored"] == 0 or not clean:
        raise DamError("--attack-mode off-task needs a backdoored task and a clean one")
    if target is None:
        resolved["target_task"] = clean[0]
    elif target not in clean:
        raise DamError(f"--target-task must be a task with a clean expert: one of {clean}")


def resolve_clip_options(options: dict[str, Any]) -> dict[str, Any]:
    """The CLIP defaults under the given options, every value checked before anything is written."""
    from dam_mergekit.lab.zoo.attacks import ATTACKS, default_params
    from dam_mergekit.lab.zoo.data import TASKS

    resolved = dict(CLIP_DEFAULTS)
    resolved.update({k: v for k, v in options.items() if v is not None})
    unknown = [t for t in resolved["tasks"] if t not in TASKS]
    if unknown:
        raise DamError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    if resolved["attack"] not in ATTACKS:
        raise DamError(f"unknown attack {resolved['attack']!r}; choose one of {', '.join(ATTACKS)}")
    if resolved["attack_mode"] not in ATTACK_MODES:
        raise DamError(f"--attack-mode must be one of {', '.join(ATTACK_MODES)}")
    check_merge_options(resolved)
    check_release_options(resolved)
    if not 0 <= resolved["backdoored"] <= len(resolved["tasks"]):
        raise DamError(f"--backdoored must be 0..{len(resolved['tasks'])}")
    if not 0.0 < resolved["poison_rate"] < 1.0:
        raise DamError("--poison-rate must lie in (0, 1)")
    smallest = min(len(TASKS[t].classes) for t in resolved["tasks"])
    if not 0 <= resolved["target_class"] < smallest:
        raise DamError(f"--target-class must be 0..{smallest - 1} (every task has that class)")
    _check_target_task(resolved)
    resolved.setdefault("attack_params", default_params(resolved["attack"]))
    return resolved
