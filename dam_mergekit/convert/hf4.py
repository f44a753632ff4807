"""transformers-4 CLIP vision directories -> the tensor names transformers 5 (and mergekit) use.

transformers 4 saved ``CLIPVisionModel`` weights as ``vision_model.embeddings...``; transformers 5
names the same model's tensors ``embeddings...`` (``CLIPVisionModelWithProjection`` keeps
``vision_model.`` in both). transformers 5 still loads the old names, but mergekit 0.1.5 plans the
merge from the new ones, finds none of them in the checkpoint, writes no weights at all and exits 0.
This module renames the tensors to exactly what ``model.state_dict()`` gives in the installed
transformers, found by building the model from its own ``config.json`` on the meta device. It also
extracts the vision tower of a full ``CLIPModel`` directory.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from dam_mergekit.convert._io import PICKLE_SUFFIXES, atomic_output, read_model_dir
from dam_mergekit.errors import DamError

LOG = logging.getLogger(__name__)
OLD_PREFIX = "vision_model."
SUPPORTED = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def target_config(model_dir: Path, architecture: str | None = None):
    """The architecture to write and its vision config, read from the input's config.json.

    A full ``CLIPModel`` (model_type ``clip``, e.g. ``openai/clip-vit-base-patch32``, the base of
    FusionBench's CLIP experts) yields its vision tower: ``CLIPVisionModel`` unless asked for
    ``CLIPVisionModelWithProjection``.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise DamError(f"{model_dir}: cannot read config.json ({err})") from None
    if config.model_type == "clip":
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        arch = architecture or "CLIPVisionModel"
    elif config.model_type == "clip_vision_model":
        vision = config
        arch = architecture or next(iter(getattr(config, "architectures", None) or []), None)
    else:
        raise DamError(f"{model_dir}: model_type {config.model_type!r}; hf4-vision converts CLIP "
                       "vision models (clip_vision_model) and full CLIP models (clip) only")
    if arch not in SUPPORTED:
        raise DamError(f"{model_dir}: architecture {arch!r}; expected one of "
                       f"{', '.join(SUPPORTED)}")
    vision.architectures = [arch]
    return arch, vision, config.model_type == "clip"


def expected_state_dict_shapes(arch: str, vision_config) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of ``model.state_dict()`` in the installed transformers (meta device)."""
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, arch)(vision_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rename_to_current(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                      where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors under the expected names, and the names dropped (non-persistent buffers)."""
    renamed: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in tensors.items():
        candidates = [key, key[len(OLD_PREFIX):] if key.startswith(OLD_PREFIX) else None,
                      OLD_PREFIX + key]
        target = next((c for c in candidates if c is not None and c in expected), None)
        if target is None:
            if key.endswith("position_ids"):  # a buffer transformers rebuilds; not a weight
                dropped.append(key)
                continue
            raise DamError(f"{where}: tensor {key!r} matches no tensor of the model that "
                           "config.json describes")
        if target in renamed:
            raise DamError(f"{where}: two tensors map to {target!r}")
        if tuple(value.shape) != expected[target]:
            raise DamError(f"{where}: {key} has shape {tuple(value.shape)}, config.json implies "
                           f"{expected[target]}")
        renamed[target] = value.contiguous()
    missing = sorted(set(expected) - set(renamed))
    if missing:
        raise DamError(f"{where}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    return renamed, dropped


def convert_hf4_vision(in_dir: str | Path, out_dir: str | Path, *, architecture: str | None = None,
                       allow_pickle: bool = False, force: bool = False) -> Path:
    """Copy a CLIP vision model directory with its tensors renamed for transformers 5.

    ``architecture`` (``CLIPVisionModel`` or ``CLIPVisionModelWithProjection``) overrides the one
    in config.json; for a full CLIP model it picks which vision model to extract.
    """
    from safetensors.torch import save_file

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if out_dir.exists() and in_dir.resolve() == out_dir.resolve():
        raise DamError(f"{out_dir}: the output must differ from the input directory")
    arch, vision_config, full_clip = target_config(in_dir, architecture)
    expected = expected_state_dict_shapes(arch, vision_config)
    tensors = read_model_dir(in_dir, allow_pickle=allow_pickle)
    if full_clip:  # keep the vision tower (and its projection when the target has one)
        tensors = {k: v for k, v in tensors.items() if k.startswith(OLD_PREFIX)
                   or (k == "visual_projection.weight" and "visual_projection.weight" in expected)}
    renamed, dropped = rename_to_current(tensors, expected, str(in_dir))
    with atomic_output(out_dir, force=force) as tmp:
        for path in in_dir.iterdir():
            if path.is_file() and path.suffix not in (".safetensors", *PICKLE_SUFFIXES) \
                    and path.name not in WEIGHT_INDEXES and path.name != "config.json":
                shutil.copy2(path, tmp / path.name)
        vision_config.save_pretrained(tmp)
        save_file(renamed, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    LOG.info("%s: %d tensors written for %s, %d buffer(s) dropped", out_dir, len(renamed), arch,
             len(dropped))
    return out_dir
