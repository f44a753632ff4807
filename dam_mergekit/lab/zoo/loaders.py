"""Read a CLIP zoo: task data and zero-shot heads.

The prediction itself (``clip_logits``, ``ClipHead``) is :mod:`dam_mergekit.scoring.clip`, shared
with calibration; it is importable from here as before.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dam_mergekit.errors import DamError
from dam_mergekit.scoring.clip import (  # noqa: F401  (public names of this module)
    ClipHead,
    clip_logits,
    normalize_pixels,
    read_head,
)
from dam_mergekit.scoring.zoo_format import load_manifest, task_entry


def load_head(zoo_dir: str | Path, task: str) -> ClipHead:
    """The head of one task from ``heads/<task>.safetensors``."""
    return read_head(Path(zoo_dir) / task_entry(load_manifest(zoo_dir), task)["head"])


def load_task_data(zoo_dir: str | Path, task: str) -> dict[str, torch.Tensor]:
    """Images ``train_x``, ``test_x``, ``calib_x`` (uint8 [N, 3, H, W]); labels (int64)."""
    from safetensors.torch import load_file

    entry = task_entry(load_manifest(zoo_dir), task)
    path = Path(zoo_dir) / entry["data"]
    if not path.is_file():
        raise DamError(f"{path}: data file missing; rebuild the zoo")
    return load_file(str(path))


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [0, 1]."""
    return x_uint8.float() / 255.0
