"""``zoo.json``: the manifest that bench, book, calibration and tests read a zoo through.

The layout is documented in docs/zoo-format.md. Writing is atomic (temp file, then rename), and
reading checks the fields every consumer relies on, so a hand-made zoo of real checkpoints fails
with one clear line instead of a KeyError deep inside an evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def options_hash(options: dict[str, Any]) -> str:
    """A stable hash of the build options (and the format version): the zoo's cache key."""
    from dam_mergekit import __version__

    blob = json.dumps({"options": options, "format": VERSION, "code": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_manifest(zoo_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``zoo_dir/zoo.json`` atomically after checking it."""
    check_manifest(manifest, where=str(zoo_dir))
    path = Path(zoo_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(zoo_dir: str | Path) -> dict[str, Any]:
    """Read and check ``zoo_dir/zoo.json``."""
    path = Path(zoo_dir) / MANIFEST
    if not path.is_file():
        raise DamError(f"{path}: no zoo manifest; build a zoo with `dam-mergekit zoo build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DamError(f"{path}: not valid JSON ({err}); rebuild the zoo") from None
    check_manifest(manifest, where=str(path))
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


def manifest_header(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    from dam_mergekit import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "options": options,
        "base": "base",
        "tasks": [],
        "created_by": f"dam-mergekit {__version__}",
    }
