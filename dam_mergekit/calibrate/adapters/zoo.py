"""Minimal readers of the zoo format (docs/zoo-format.md) for the calibration adapters.

Only what calibration needs: the manifest, a task's unlabeled calibration inputs and a CLIP head.
Labels are never read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dam_mergekit.errors import DamError


def read_manifest(zoo_dir: str | Path) -> dict[str, Any]:
    path = Path(zoo_dir) / "zoo.json"
    if not path.is_file():
        raise DamError(f"{zoo_dir}: calibration data is not a zoo (no zoo.json); build it with "
                       "`dam-mergekit zoo build` or point `data` at a zoo directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DamError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != "dam-mergekit-zoo" or not manifest.get("tasks"):
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
