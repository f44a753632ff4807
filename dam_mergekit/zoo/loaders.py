"""Read a CLIP zoo: task data, zero-shot heads, and the logits the whole project agrees on.

``clip_logits`` is the one definition of a CLIP prediction (see docs/zoo-format.md), used by the
zoo's own training, the evaluation and the calibration adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dam_mergekit.errors import DamError
from dam_mergekit.zoo.manifest import load_manifest, task_entry


class ClipHead(nn.Module):
    """Zero-shot head: frozen visual projection, then cosine against class-prompt embeddings."""

    def __init__(self, projection: torch.Tensor, classes: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("projection", projection.float())
        self.register_buffer("classes", classes.float())
        self.register_buffer("logit_scale", logit_scale.float().reshape(()))

    def forward(self, pooler_output: torch.Tensor) -> torch.Tensor:
        features = pooler_output @ self.projection.T
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.logit_scale * features @ self.classes.T


def load_head(zoo_dir: str | Path, task: str) -> ClipHead:
    """The head of one task from ``heads/<task>.safetensors``."""
    from safetensors.torch import load_file

    entry = task_entry(load_manifest(zoo_dir), task)
    path = Path(zoo_dir) / entry["head"]
    if not path.is_file():
        raise DamError(f"{path}: head file missing; rebuild the zoo")
    tensors = load_file(str(path))
    return ClipHead(tensors["projection"], tensors["classes"], tensors["logit_scale"])


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


def normalize_pixels(x01: torch.Tensor, normalize: dict) -> torch.Tensor:
    """``(x - mean) / std`` per channel, the CLIP input."""
    mean = torch.tensor(normalize["mean"], dtype=x01.dtype).view(1, -1, 1, 1)
    std = torch.tensor(normalize["std"], dtype=x01.dtype).view(1, -1, 1, 1)
    return (x01 - mean) / std


def clip_logits(vision_model: nn.Module, head: nn.Module, x01: torch.Tensor, normalize: dict):
    """logits = head(vision_model(normalize(x01)).pooler_output)."""
    pooled = vision_model(pixel_values=normalize_pixels(x01, normalize)).pooler_output
    return head(pooled)
