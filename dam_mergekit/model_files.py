"""What a model directory holds, read without loading a tensor: where it is and its tensors' shapes.

Below the recipe planner, the kernel's mask registry and calibration, which all need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from dam_mergekit.errors import DamError
from dam_mergekit.masks.fingerprint import read_safetensors_header, weight_files


def model_dir(ref) -> str:
    """A local directory for a mergekit ``ModelReference`` (downloads hub models, as mergekit does)."""
    if ref.lora is not None:
        raise DamError(f"{ref}: LoRA inputs are not supported by dam; merge the adapter first")
    return ref.local_path()


class StoredTensor(NamedTuple):
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "F32"


def stored_tensors(model_dir: str, *, allow_pickle: bool = False) -> dict[str, StoredTensor]:
    """Every tensor of a model directory, from its safetensors headers (no tensor data read)."""
    table: dict[str, StoredTensor] = {}
    for path in weight_files(model_dir, allow_pickle=allow_pickle):
        if path.suffix != ".safetensors":
            raise DamError(f"{path}: dam reads tensor shapes from .safetensors checkpoints only")
        header, _ = read_safetensors_header(path)
        for key, value in header.items():
            if key != "__metadata__":
                table[key] = StoredTensor(path, tuple(value["shape"]), value["dtype"])
    return table
