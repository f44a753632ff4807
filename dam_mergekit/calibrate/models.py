"""Load the base and expert tensors a recipe merges, checking that the experts fit the base."""

from __future__ import annotations

from pathlib import Path

import torch

from dam_mergekit.errors import DamError
from dam_mergekit.model_files import stored_tensors


def check_experts(
    shapes: dict[str, tuple], expert_dirs: list[tuple[str, str]], *, allow_pickle: bool = False
) -> None:
    """Every merged tensor must exist in every expert with the base's shape."""
    for ref, folder in expert_dirs:
        index = stored_tensors(folder, allow_pickle=allow_pickle)
        for name, shape in shapes.items():
            if name not in index:
                raise DamError(
                    f"expert {ref}: no tensor {name!r}; every expert must have the base "
                    "model's architecture (same tensor names and shapes)"
                )
            if tuple(index[name].shape) != tuple(shape):
                raise DamError(
                    f"expert {ref}: tensor {name!r} has shape {list(index[name].shape)}, "
                    f"the base has {list(shape)}; experts must share the base's "
                    "architecture"
                )


def load_tensors(
    model_dir: str, names: list[str], device: torch.device, *, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The named tensors of a model as float32 on ``device`` (read lazily, file by file)."""
    from safetensors import safe_open

    index = stored_tensors(model_dir, allow_pickle=allow_pickle)
    by_file: dict[Path, list[str]] = {}
    for name in names:
        if name not in index:
            raise DamError(f"{model_dir}: no tensor {name!r}")
        by_file.setdefault(index[name].file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in keys:
                out[key] = fh.get_tensor(key).to(device=device, dtype=torch.float32)
    return {name: out[name] for name in names}


class TensorReader:
    """One model's tensors, read one at a time in their stored dtype (headers read once).

    The calibration state is built tensor by tensor, so no whole model is ever held in float32
    besides what the state keeps.
    """

    def __init__(self, model_dir: str, *, allow_pickle: bool = False):
        self.model_dir = model_dir
        self.index = stored_tensors(model_dir, allow_pickle=allow_pickle)
        self._files: dict[Path, object] = {}

    def __call__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.index:
            raise DamError(f"{self.model_dir}: no tensor {name!r}")
        path = self.index[name].file
        if path not in self._files:
            self._files[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._files[path].get_tensor(name)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Let the files' mapped pages go (they are reopened when read again)."""
        self._files.clear()
