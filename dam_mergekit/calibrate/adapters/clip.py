"""CLIP adapter: a ``CLIPVisionModel`` with each task's frozen zero-shot head, from a zoo.

The logits are the evaluation's own (:func:`dam_mergekit.scoring.clip.clip_logits`).
By default the perturbation is added to x (pixel space, before normalisation) and x + delta is
clamped to [0, 1], so a perturbed input is always a valid image. With ``perturb: normalized`` it
is added, unclamped, to the normalised pixels, as the released DAM code does (mode
``as_released`` sets it).

Options (``adapter_options``): ``tasks`` (subset of the zoo's tasks), ``split`` (the unlabeled
images to use, default ``calib_x``), ``perturb`` (``pixels`` or ``normalized``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dam_mergekit.calibrate.adapters.base import CalibrationAdapter
from dam_mergekit.calibrate.perturb import PerturbationSpace
from dam_mergekit.errors import DamError
from dam_mergekit.scoring.clip import (
    ClipHead,
    clip_logits,
    normalize_pixels,
    normalized_clip_logits,
    read_head,
)
from dam_mergekit.scoring.zoo_format import read_calibration_manifest, select_tasks

PERTURB_SPACES = ("pixels", "normalized")


class ClipAdapter(CalibrationAdapter):
    def __init__(self, data: str | list[str], options: dict[str, Any], device: torch.device):
        super().__init__(data, options, device)
        if not isinstance(data, str):
            raise DamError("the clip adapter reads one zoo directory as `data`")
        self.zoo = Path(data)
        manifest = read_calibration_manifest(self.zoo)
        if manifest.get("kind") != "clip":
            raise DamError(
                f"{self.zoo}: a {manifest.get('kind')!r} zoo, the clip adapter needs a clip zoo"
            )
        split = self.options.get("split", "calib_x")
        if split not in ("calib_x", "test_x", "train_x"):
            raise DamError(
                f"adapter option split must be calib_x, test_x or train_x, got {split!r}"
            )
        self.perturb = self.options.get("perturb", "pixels")
        if self.perturb not in PERTURB_SPACES:
            raise DamError(
                f"adapter option perturb must be one of {', '.join(PERTURB_SPACES)}, got "
                f"{self.perturb!r}"
            )
        self._tasks = select_tasks(manifest, self.options.get("tasks"), str(self.zoo))
        self.normalize = manifest.get("normalize") or {"mean": [0.0] * 3, "std": [1.0] * 3}
        self.images: dict[str, torch.Tensor] = {}
        self.heads: dict[str, ClipHead] = {}
        for entry in self._tasks:
            name = entry["name"]
            self.images[name] = _read_tensor(self.zoo / entry["data"], split, name)
            if self.images[name].shape[0] == 0:
                raise DamError(
                    f"{self.zoo / entry['data']}: {split} of task {name!r} is empty; "
                    "calibration needs unlabeled inputs"
                )
            self.heads[name] = read_head(self.zoo / entry["head"]).to(device)

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
        shape = tuple(self.images[task].shape[1:])
        if self.perturb == "normalized":
            return PerturbationSpace(shape)
        return PerturbationSpace(shape, low=0.0, high=1.0)

    def logits(self, model, params, task, batch, delta=None):
        head = self.heads[task]
        if delta is not None and self.perturb == "normalized":
            pixels = self.perturbation_space(task).apply(
                normalize_pixels(batch, self.normalize), delta
            )
            return normalized_clip_logits(model, head, pixels, params=params)
        x = batch if delta is None else self.perturbation_space(task).apply(batch, delta)
        return clip_logits(model, head, x, self.normalize, params=params)


def _read_tensor(path: Path, key: str, task: str) -> torch.Tensor:
    from safetensors import safe_open

    if not path.is_file():
        raise DamError(f"{path}: calibration data of task {task!r} missing")
    with safe_open(str(path), framework="pt") as fh:
        if key not in fh.keys():
            raise DamError(f"{path}: no {key!r} images (unlabeled calibration inputs) for {task!r}")
        return fh.get_tensor(key)
