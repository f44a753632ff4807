"""Calibration data for the ``clip`` adapter from real, local images (``zoo import-clip``).

The ``clip`` adapter reads a zoo directory (docs/zoo-format.md): unlabeled ``calib_x`` images and
one frozen zero-shot head per task. This module builds such a directory from image folders or
``.npy`` arrays plus class-name lists. The heads come from the base ``CLIPModel``'s text tower
(read from a local directory, safetensors only): every class name is put into each prompt
template, the normalised text embeddings are averaged over templates and normalised again.

Images get CLIP's preprocessing geometry (shorter side resized to the model's image size with
bicubic filtering, then a centre crop) and are stored as uint8; the mean/std normalisation is
recorded in the manifest and applied by the adapter. Labels are never read. The output is written
to a temporary directory and renamed at the end, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dam_mergekit.errors import DamError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# OpenAI CLIP's preprocessing statistics (used when the CLIP directory has no preprocessor config)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TaskSource:
    """One task: its name, unlabeled images (a folder or a ``.npy`` file) and class-name list."""

    name: str
    images: Path
    classes: Path


def read_class_names(path: Path) -> list[str]:
    """Class names from a text file (one per line) or a JSON list of strings."""
    if not path.is_file():
        raise DamError(f"{path}: class-name file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise DamError(f"{path}: not valid JSON ({err})") from None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise DamError(f"{path}: expected a JSON list of class-name strings")
    else:
        names = [line.strip() for line in text.splitlines()]
    names = [n.strip() for n in names if n.strip()]
    if len(names) < 2:
        raise DamError(f"{path}: needs at least two class names, found {len(names)}")
    if len(set(names)) != len(names):
        raise DamError(f"{path}: class names repeat (each class needs its own name)")
    return names


def _to_square(image, size: int):
    """CLIP's geometry: shorter side to ``size`` (bicubic), then the central ``size`` square."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _array_images(path: Path) -> np.ndarray:
    """A ``.npy`` array as uint8 ``[N, H, W, C]`` (pickled object arrays are refused)."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as err:
        raise DamError(
            f"{path}: not a plain numeric .npy array; pickle is refused ({err})"
        ) from None
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise DamError(f"{path}: expected images [N, H, W(, C)] or [N, C, H, W], got {arr.shape}")
    if arr.shape[-1] not in (1, 3) and arr.shape[1] in (1, 3):
        arr = np.transpose(arr, (0, 2, 3, 1))
    if arr.shape[-1] not in (1, 3):
        raise DamError(f"{path}: images need 1 or 3 channels, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        values = np.asarray(arr, dtype=np.float32)
        if values.min() < 0 or values.max() > 1:
            raise DamError(f"{path}: float images must lie in [0, 1]")
        return np.round(values * 255).astype(np.uint8)
    raise DamError(f"{path}: images must be uint8 or float in [0, 1], got {arr.dtype}")


def load_images(source: Path, size: int, max_images: int, seed: int) -> torch.Tensor:
    """Up to ``max_images`` images (a seeded random subset) as uint8 ``[N, 3, size, size]``."""
    from PIL import Image, UnidentifiedImageError

    rng = random.Random(seed)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DamError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        if len(files) > max_images:
            files = sorted(rng.sample(files, max_images))
        images = []
        for path in files:
            try:
                with Image.open(path) as img:
                    images.append(np.asarray(_to_square(img, size)))
            except (UnidentifiedImageError, OSError) as err:
                raise DamError(f"{path}: cannot be read as an image ({err})") from None
    elif source.suffix == ".npy":
        arr = _array_images(source)
        if arr.shape[0] == 0:
            raise DamError(f"{source}: holds no images")
        index = sorted(rng.sample(range(arr.shape[0]), min(max_images, arr.shape[0])))
        images = []
        for i in index:
            pixels = np.asarray(arr[i])
            pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
            images.append(np.asarray(_to_square(Image.fromarray(pixels), size)))
    else:
        raise DamError(f"{source}: give an image folder or a .npy array (pickle files are refused)")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _text_features(clip, tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    limit = int(clip.config.text_config.max_position_embeddings)
    batch = tokenizer(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    out = clip.get_text_features(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    )
    if not isinstance(out, torch.Tensor):  # some transformers versions return a model output
        out = out.pooler_output
    return torch.nn.functional.normalize(out.float(), dim=-1)


@torch.no_grad()
def zero_shot_head(
    clip, tokenizer, classes: Sequence[str], templates: Sequence[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """The head file's tensors: projection, template-averaged class embeddings, logit scale."""
    per_template = [
        _text_features(clip, tokenizer, [t.format(c) for c in classes], device) for t in templates
    ]
    embeds = torch.nn.functional.normalize(torch.stack(per_template).mean(0), dim=-1)
    return {
        "projection": clip.visual_projection.weight.detach().float().cpu().contiguous(),
        "classes": embeds.cpu().contiguous(),
        "logit_scale": clip.logit_scale.detach().exp().clamp(max=100).float().cpu(),
    }


def _normalisation(clip_dir: Path) -> dict[str, list[float]]:
    path = clip_dir / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if "image_mean" in cfg and "image_std" in cfg:
            return {"mean": list(cfg["image_mean"]), "std": list(cfg["image_std"])}
    return {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}


def _vision_image_size(clip_dir: Path) -> int:
    path = clip_dir / "config.json"
    if not path.is_file():
        raise DamError(f"{clip_dir}: no config.json (expected a full CLIPModel directory)")
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["vision_config"]["image_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DamError(
            f"{path}: no vision_config.image_size; the zero-shot heads need a full CLIPModel "
            "(model_type clip, e.g. openai/clip-vit-base-patch32)"
        ) from None


def load_clip(clip_dir: Path, device: torch.device):
    """The full ``CLIPModel`` and its tokenizer from a local directory (safetensors only)."""
    from transformers import AutoTokenizer, CLIPModel

    if not clip_dir.is_dir():
        raise DamError(f"{clip_dir}: no such CLIP model directory")
    if not any(clip_dir.glob("*.safetensors")):
        raise DamError(
            f"{clip_dir}: no .safetensors weights (pickle checkpoints are refused); download "
            "the model's safetensors files"
        )
    config_path = clip_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if config.get("model_type") != "clip":
        raise DamError(
            f"{clip_dir}: model_type {config.get('model_type')!r}; the zero-shot heads need the "
            "full CLIPModel (model_type clip, e.g. openai/clip-vit-base-patch32) with its text tower"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(clip_dir))
        clip = CLIPModel.from_pretrained(str(clip_dir), use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise DamError(f"{clip_dir}: cannot load the CLIP model or its tokenizer ({err})") from None
    return clip.to(device).eval(), tokenizer


def import_clip(
    out: str | Path,
    clip_dir: str | Path,
    tasks: Sequence[TaskSource],
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    max_images: int = 512,
    seed: int = 0,
    image_size: int | None = None,
    device: str = "cpu",
    force: bool = False,
) -> Path:
    """Write a calibration-only CLIP zoo at ``out``; every input is checked before writing."""
    from safetensors.torch import save_file

    from dam_mergekit.convert._io import atomic_output, check_output_free
    from dam_mergekit.lab.zoo.manifest import write_manifest

    out, clip_dir = Path(out), Path(clip_dir)
    check_output_free(out, force=force)
    _check_sources(tasks, templates, max_images)
    classes = {t.name: read_class_names(t.classes) for t in tasks}
    dev = torch.device(device)
    size = image_size or _vision_image_size(clip_dir)
    images = {t.name: load_images(t.images, size, max_images, seed) for t in tasks}
    clip, tokenizer = load_clip(clip_dir, dev)
    heads = {
        t.name: zero_shot_head(clip, tokenizer, classes[t.name], templates, dev) for t in tasks
    }
    options = {
        "source": "zoo import-clip",
        "clip": str(clip_dir),
        "templates": list(templates),
        "max_images": max_images,
        "seed": seed,
    }
    manifest = _calibration_manifest(tasks, classes, options, _normalisation(clip_dir), size)
    with atomic_output(out, force=force) as tmp:
        (tmp / "data").mkdir()
        (tmp / "heads").mkdir()
        for t in tasks:
            save_file({"calib_x": images[t.name]}, str(tmp / "data" / f"{t.name}.safetensors"))
            save_file(heads[t.name], str(tmp / "heads" / f"{t.name}.safetensors"))
        write_manifest(tmp, manifest)
    return out


def _check_sources(tasks: Sequence[TaskSource], templates: Sequence[str], max_images: int) -> None:
    """Refuse bad task names, templates and image counts, and missing images, before any work."""
    if not tasks:
        raise DamError("give at least one --task NAME IMAGES CLASSES")
    names = [t.name for t in tasks]
    for name in names:
        if not _TASK_NAME.match(name):
            raise DamError(f"task name {name!r}: use letters, digits, '_', '-' and '.' only")
    if len(set(names)) != len(names):
        raise DamError(f"task names repeat: {names}")
    if not templates or any("{}" not in t for t in templates):
        raise DamError("every prompt template needs one '{}' for the class name")
    if max_images < 1:
        raise DamError(f"--max-images must be >= 1, got {max_images}")
    for task in tasks:
        if not task.images.exists():
            raise DamError(f"{task.images}: images of task {task.name!r} not found")


def _calibration_manifest(
    tasks: Sequence[TaskSource],
    classes: dict[str, list[str]],
    options: dict[str, Any],
    normalize: dict[str, list[float]],
    image_size: int,
) -> dict[str, Any]:
    """zoo.json of a calibration-only zoo: no models (the recipe names base and experts)."""
    from dam_mergekit import __version__
    from dam_mergekit.lab.zoo.manifest import FORMAT, VERSION

    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": "clip",
        "calibration_only": True,  # no models: the recipe names base and experts
        "options": options,
        "base": None,
        "tasks": [
            {
                "name": t.name,
                "classes": classes[t.name],
                "target_class": None,
                "expert": None,
                "control": None,
                "backdoored": None,
                "attack": None,
                "head": f"heads/{t.name}.safetensors",
                "data": f"data/{t.name}.safetensors",
                "images_from": str(t.images),
            }
            for t in tasks
        ],
        "normalize": normalize,
        "image_size": image_size,
        "created_by": f"dam-mergekit {__version__}",
    }
