"""``build_zoo``: options in, a zoo directory out; cached by a hash of the options, never partial.

The zoo is written into a temporary sibling directory and renamed into place at the end, so an
interrupted build leaves no half zoo. A second build with the same options finds the hash in the
existing ``zoo.json`` and returns at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dam_mergekit.errors import DamError
from dam_mergekit.lab.zoo.manifest import load_manifest, options_hash, write_manifest
from dam_mergekit.staging import staged_dir

LOG = logging.getLogger(__name__)


def resolve_options(options: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults for the kind and check values before anything is written."""
    from dam_mergekit.lab.kinds import zoo_kind

    return zoo_kind(options.get("kind", "clip")).resolve_options(options)


def build_zoo(out_dir: str | Path, options: dict[str, Any] | None = None, *, force: bool = False):
    """Build (or find cached) the zoo for ``options`` at ``out_dir``; returns the path."""
    from dam_mergekit.lab.kinds import zoo_kind

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
    with staged_dir(out) as tmp:
        manifest = zoo_kind(options["kind"]).build(tmp, options)
        manifest["options_hash"] = digest
        write_manifest(tmp, manifest)
    return out
