"""Offline model zoos for the backdoor lab (format: docs/zoo-format.md).

Light on import: the loader names below import torch only when first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "load_manifest": "dam_mergekit.lab.zoo.manifest",
    "write_manifest": "dam_mergekit.lab.zoo.manifest",
    "load_task_data": "dam_mergekit.lab.zoo.loaders",
    "load_head": "dam_mergekit.lab.zoo.loaders",
    "ClipHead": "dam_mergekit.lab.zoo.loaders",
    "clip_logits": "dam_mergekit.lab.zoo.loaders",
    "build_zoo": "dam_mergekit.lab.zoo.build",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dam_mergekit.lab.zoo' has no attribute {name!r}")
