"""Writing ``zoo.json`` and the zoo's cache key; reading it is :mod:`dam_mergekit.scoring.zoo_format`.

The layout is documented in docs/zoo-format.md. Writing is checked, then atomic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dam_mergekit.scoring.zoo_format import (  # noqa: F401  (the readers keep their old home)
    FORMAT,
    MANIFEST,
    VERSION,
    check_manifest,
    load_manifest,
    task_entry,
)
from dam_mergekit.staging import staged_file


def options_hash(options: dict[str, Any]) -> str:
    """A stable hash of the build options (and the format version): the zoo's cache key."""
    from dam_mergekit import __version__

    blob = json.dumps({"options": options, "format": VERSION, "code": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_manifest(zoo_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``zoo_dir/zoo.json`` atomically after checking it."""
    check_manifest(manifest, where=str(zoo_dir))
    path = Path(zoo_dir) / MANIFEST
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


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
