"""Reading checkpoints safely and writing converted outputs all-or-nothing."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from dam_mergekit.errors import DamError
from dam_mergekit.staging import publish, temp_sibling

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_tensor_file(path: Path, *, allow_pickle: bool = False) -> dict:
    """A checkpoint's top-level object: safetensors always, torch files only when allowed.

    Torch files are read with ``weights_only=True`` even when allowed, so a file that needs
    arbitrary unpickling (a whole pickled module) is refused rather than executed.
    """
    if not path.is_file():
        raise DamError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise DamError(f"{path}: not a readable safetensors file ({err})") from None
    if not allow_pickle:
        raise DamError(
            f"{path}: a torch pickle file; pickle can run code on load. Convert it to "
            ".safetensors, or pass --allow-pickle if you trust it (it is still read with "
            "weights_only=True)"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError and friends
        raise DamError(
            f"{path}: cannot be read with weights_only=True ({str(err).splitlines()[0]}); it "
            "probably pickles a whole model object: in an environment you trust, save its "
            "state_dict() to .safetensors and convert that"
        ) from None


def read_model_dir(model_dir: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a transformers model directory (one or several shards)."""
    if not model_dir.is_dir():
        raise DamError(f"{model_dir}: no such model directory")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not files:
        raise DamError(f"{model_dir}: no weight files (*.safetensors) found")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        loaded = load_tensor_file(path, allow_pickle=allow_pickle)
        if not isinstance(loaded, dict):
            raise DamError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
        tensors.update(loaded)
    return tensors


def check_output_free(out: Path, *, force: bool) -> None:
    if out.exists() and not force:
        raise DamError(f"{out}: already exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool = False, is_dir: bool = True) -> Iterator[Path]:
    """A temporary sibling of ``out`` to fill; renamed to ``out`` only if the block succeeds."""
    check_output_free(out, force=force)
    tmp = temp_sibling(out, is_dir=is_dir)
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
