"""The CLIP prediction of a zoo task: a vision tower, then the task's frozen zero-shot head.

logits = logit_scale * normalize(pooler_output @ projection.T) @ classes.T, with
pooler_output = vision(pixel_values) and pixel_values = (x - mean) / std for x in [0, 1]
(docs/zoo-format.md). The zoo's training, the evaluation and the calibration adapter all call
:func:`clip_logits`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dam_mergekit.errors import DamError

HEAD_KEYS = ("projection", "classes", "logit_scale")


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


def read_head(path: str | Path) -> ClipHead:
    """A head file (``heads/<task>.safetensors``) as a :class:`ClipHead`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DamError(f"{path}: zero-shot head missing; rebuild the zoo")
    tensors = load_file(str(path))
    missing = [key for key in HEAD_KEYS if key not in tensors]
    if missing:
        raise DamError(f"{path}: head lacks {missing[0]!r}")
    return ClipHead(*(tensors[key] for key in HEAD_KEYS))


def normalize_pixels(x01: torch.Tensor, normalize: dict) -> torch.Tensor:
    """``(x - mean) / std`` per channel, the CLIP input."""
    mean = torch.tensor(normalize["mean"], dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    std = torch.tensor(normalize["std"], dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    return (x01 - mean) / std


def clip_logits(
    vision_model: nn.Module,
    head: nn.Module,
    x01: torch.Tensor,
    normalize: dict,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """logits = head(vision_model(normalize(x01)).pooler_output).

    ``params`` replaces the model's own parameters (``torch.func.functional_call``): how
    calibration evaluates a merge it is still learning.
    """
    return normalized_clip_logits(vision_model, head, normalize_pixels(x01, normalize), params)


def normalized_clip_logits(
    vision_model: nn.Module,
    head: nn.Module,
    pixels: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`clip_logits` of inputs already normalised (a perturbation added after it)."""
    if params is None:
        return head(vision_model(pixel_values=pixels).pooler_output)
    from torch.func import functional_call

    out = functional_call(
        vision_model, params, args=(), kwargs={"pixel_values": pixels}, strict=False
    )
    return head(out.pooler_output)
