"""Reading ``zoo.json``, the manifest through which bench, book, calibration and tests see a zoo.

The layout is documented in docs/zoo-format.md. Reading checks the fields every consumer relies
on, so a hand-made zoo of real checkpoints fails with one clear line instead of a KeyError deep
inside an evaluation. Writing zoos is the lab's business (``dam_mergekit.lab.zoo.manifest``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dam_mergekit.errors import DamError

FORMAT = "dam-mergekit-zoo"
VERSION = 1
MANIFEST = "zoo.json"
_TASK_KEYS = (
    "name",
    "classes",
    "target_class",
    "expert",
    "control",
    "backdoored",
    "attack",
    "data",
)


def load_manifest(zoo_dir: str | Path, *, kind: str | None = None) -> dict[str, Any]:
    """Read and check ``zoo_dir/zoo.json`` (of the given ``kind``, when one is asked for)."""
    path = Path(zoo_dir) / MANIFEST
    if not path.is_file():
        raise DamError(f"{path}: no zoo manifest; build a zoo with `dam-mergekit zoo build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DamError(f"{path}: not valid JSON ({err}); rebuild the zoo") from None
    check_manifest(manifest, where=str(path))
    if kind is not None and manifest["kind"] != kind:
        raise DamError(
            f"{path}: a {manifest['kind']} zoo where an {kind} zoo is needed; build one with "
            f"`dam-mergekit zoo build --kind {kind}`"
        )
    return manifest


def check_manifest(manifest: dict[str, Any], *, where: str) -> None:
    """Raise DamError naming the first missing or wrong field."""
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DamError(f"{where}: not a {FORMAT} v{VERSION} manifest; rebuild the zoo")
    if manifest.get("kind") not in ("clip", "llm"):
        raise DamError(f"{where}: kind must be 'clip' or 'llm', got {manifest.get('kind')!r}")
    for key in ("options", "base", "tasks"):
        if key not in manifest:
            raise DamError(f"{where}: manifest lacks {key!r}; rebuild the zoo")
    if not manifest["tasks"]:
        raise DamError(f"{where}: manifest lists no tasks")
    for task in manifest["tasks"]:
        missing = [k for k in _TASK_KEYS if k not in task]
        if manifest["kind"] == "clip" and "head" not in task:
            missing.append("head")
        if missing:
            raise DamError(f"{where}: task {task.get('name')!r} lacks {missing}; rebuild the zoo")
        if task["backdoored"] and not task["control"]:
            raise DamError(f"{where}: backdoored task {task['name']!r} has no clean control")
    if manifest["kind"] == "clip":
        for key in ("normalize", "image_size"):
            if key not in manifest:
                raise DamError(f"{where}: clip manifest lacks {key!r}; rebuild the zoo")


def task_entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """The manifest entry of one task."""
    for task in manifest["tasks"]:
        if task["name"] == name:
            return task
    names = [t["name"] for t in manifest["tasks"]]
    raise DamError(f"zoo has no task {name!r}; tasks are {names}")


def read_calibration_manifest(zoo_dir: str | Path) -> dict[str, Any]:
    """The manifest as calibration needs it: tasks and their inputs, no models, no labels.

    Looser than :func:`load_manifest`: a calibration-only zoo (``zoo import-clip``) has no
    experts, controls or attacks to check.
    """
    path = Path(zoo_dir) / "zoo.json"
    if not path.is_file():
        raise DamError(
            f"{zoo_dir}: calibration data is not a zoo (no zoo.json); build it with "
            "`dam-mergekit zoo build` or point `data` at a zoo directory"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DamError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT or not manifest.get("tasks"):
        raise DamError(f"{path}: not a dam-mergekit zoo manifest, or it lists no tasks")
    return manifest


def select_tasks(manifest: dict[str, Any], wanted: list[str] | None, where: str) -> list[dict]:
    tasks = manifest["tasks"]
    if not wanted:
        return list(tasks)
    by_name = {t["name"]: t for t in tasks}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise DamError(f"{where}: task {missing[0]!r} is not in the zoo (tasks: {sorted(by_name)})")
    return [by_name[w] for w in wanted]
