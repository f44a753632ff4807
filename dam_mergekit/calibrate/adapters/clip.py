"""CLIP adapter: a ``CLIPVisionModel`` with each task's frozen zero-shot head, from a zoo.

logits = logit_scale * normalize(pooler_output @ projection.T) @ classes.T, with
pooler_output = vision(pixel_values) and pixel_values = (x - mean) / std for x in [0, 1].
The perturbation is added to x (pixel space, before normalisation) and x + delta is clamped to
[0, 1], so a perturbed input is always a valid image.

Options (``adapter_options``): ``tasks`` (subset of the zoo's tasks), ``split`` (the unlabeled
images to use, default ``calib_x``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dam_mergekit.calibrate.adapters.base import CalibrationAdapter
from dam_mergekit.calibrate.adapters.zoo import read_manifest, select_tasks
from dam_mergekit.calibrate.perturb import PerturbationSpace
from dam_mergekit.errors import DamError


class ClipAdapter(CalibrationAdapter):
    def __init__(self, data: str | list[str], options: dict[str, Any], device: torch.device):
        super().__init__(data, options, device)
        if not isinstance(data, str):
            raise DamError("the clip adapter reads one zoo directory as `data`")
        self.zoo = Path(data)
        manifest = read_manifest(self.zoo)
        if manifest.get("kind") != "clip":
            raise DamError(
                f"{self.zoo}: a {manifest.get('kind')!r} zoo, the clip adapter needs a clip zoo"
            )
        split = self.options.get("split", "calib_x")
        if split not in ("calib_x", "test_x", "train_x"):
            raise DamError(
                f"adapter option split must be calib_x, test_x or train_x, got {split!r}"
            )
        self._tasks = select_tasks(manifest, self.options.get("tasks"), str(self.zoo))
        norm = manifest.get("normalize") or {"mean": [0.0] * 3, "std": [1.0] * 3}
        self.mean = torch.tensor(norm["mean"], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(norm["std"], device=device).view(1, -1, 1, 1)
        self.images: dict[str, torch.Tensor] = {}
        self.heads: dict[str, dict[str, torch.Tensor]] = {}
        for entry in self._tasks:
            name = entry["name"]
            self.images[name] = _read_tensor(self.zoo / entry["data"], split, name)
            if self.images[name].shape[0] == 0:
                raise DamError(
                    f"{self.zoo / entry['data']}: {split} of task {name!r} is empty; "
                    "calibration needs unlabeled inputs"
                )
            self.heads[name] = _read_head(self.zoo / entry["head"], device)

    def tasks(self) -> list[str]:
        return [t["name"] for t in self._tasks]

    def load_model(self, base_dir: str) -> torch.nn.Module:
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(base_dir, dtype=torch.float32)
        return model.to(self.device).eval().requires_grad_(False)

    def sample(self, task: str, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        images = self.images[task]
        idx = torch.randint(images.shape[0], (batch_size,), generator=generator)
        return (images[idx].float() / 255.0).to(self.device)

    def perturbation_space(self, task: str) -> PerturbationSpace:
        return PerturbationSpace(tuple(self.images[task].shape[1:]), low=0.0, high=1.0)

    def logits(self, model, params, task, batch, delta=None):
        x = batch if delta is None else self.perturbation_space(task).apply(batch, delta)
        pixels = (x - self.mean) / self.std
        pooled = functional_call(
            model, params, args=(), kwargs={"pixel_values": pixels}, strict=False
        ).pooler_output
        head = self.heads[task]
        features = F.normalize(pooled @ head["projection"].T, dim=-1)
        return head["logit_scale"] * features @ head["classes"].T

    def activation_bytes(self, batch_size: int) -> int:
        from dam_mergekit.calibrate.estimate import clip_activation_bytes

        return clip_activation_bytes(batch_size, next(iter(self.images.values())).shape[1:])


def _read_tensor(path: Path, key: str, task: str) -> torch.Tensor:
    from safetensors import safe_open

    if not path.is_file():
        raise DamError(f"{path}: calibration data of task {task!r} missing")
    with safe_open(str(path), framework="pt") as fh:
        if key not in fh.keys():
            raise DamError(f"{path}: no {key!r} images (unlabeled calibration inputs) for {task!r}")
        return fh.get_tensor(key)


def _read_head(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise DamError(f"{path}: zero-shot head missing")
    head = load_file(str(path))
    for key in ("projection", "classes", "logit_scale"):
        if key not in head:
            raise DamError(f"{path}: head lacks {key!r}")
    return {k: head[k].float().to(device) for k in ("projection", "classes", "logit_scale")}
