"""Load the base and expert tensors a recipe merges, checking that the experts fit the base."""

from __future__ import annotations

from pathlib import Path

import torch

from dam_mergekit.errors import DamError
from dam_mergekit.masks.fingerprint import read_safetensors_header, weight_files


def tensor_index(model_dir: str, *, allow_pickle: bool = False) -> dict[str, tuple[Path, tuple]]:
    """name -> (file, shape) from the safetensors headers of a model directory."""
    index: dict[str, tuple[Path, tuple]] = {}
    for path in weight_files(model_dir, allow_pickle=allow_pickle):
        if path.suffix != ".safetensors":
            raise DamError(f"{path}: calibration reads .safetensors checkpoints only")
        header, _ = read_safetensors_header(path)
        for key, value in header.items():
            if key != "__metadata__":
                index[key] = (path, tuple(value["shape"]))
    return index


def check_experts(shapes: dict[str, tuple], expert_dirs: list[tuple[str, str]], *,
                  allow_pickle: bool = False) -> None:
    """Every merged tensor must exist in every expert with the base's shape."""
    for ref, folder in expert_dirs:
        index = tensor_index(folder, allow_pickle=allow_pickle)
        for name, shape in shapes.items():
            if name not in index:
                raise DamError(f"expert {ref}: no tensor {name!r}; every expert must have the base "
                               "model's architecture (same tensor names and shapes)")
            if tuple(index[name][1]) != tuple(shape):
                raise DamError(f"expert {ref}: tensor {name!r} has shape {list(index[name][1])}, "
                               f"the base has {list(shape)}; experts must share the base's "
                               "architecture")


def load_tensors(model_dir: str, names: list[str], device: torch.device, *,
                 allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The named tensors of a model as float32 on ``device`` (read lazily, file by file)."""
    from safetensors import safe_open

    index = tensor_index(model_dir, allow_pickle=allow_pickle)
    by_file: dict[Path, list[str]] = {}
    for name in names:
        if name not in index:
            raise DamError(f"{model_dir}: no tensor {name!r}")
        by_file.setdefault(index[name][0], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in keys:
                out[key] = fh.get_tensor(key).to(device=device, dtype=torch.float32)
    return {name: out[name] for name in names}
