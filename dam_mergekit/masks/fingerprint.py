"""Fingerprints of model checkpoints: what a mask file was learned for.

A fingerprint hashes every weight file's safetensors header (names, dtypes, shapes, offsets) and a
few byte windows of every tensor (its start, middle and end). That is cheap (about 12 KiB read per
tensor, whatever its size) and tells apart a base from its fine-tuned experts, whose weights differ
almost everywhere. It guards against using masks with the wrong models by mistake; it is not a
cryptographic commitment to every byte (an adversary who edits bytes between the windows is not
detected; hash every byte with ``fingerprint_model(path, full=True)`` for that).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

from dam_mergekit.errors import DamError

WINDOW = 4096
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_cache: dict[tuple[str, bool], tuple[tuple, str]] = {}
_lock = threading.Lock()


def weight_files(model_dir: str | os.PathLike, *, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint files of a local model directory, refusing pickle unless allowed."""
    root = Path(model_dir)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(root.glob("*.safetensors"))
        if not files:
            pickles = sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles and not allow_pickle:
                raise DamError(
                    f"{root}: only pickle checkpoints ({pickles[0].name}); pickle can run code on "
                    "load. Convert to .safetensors, or set `allow_pickle: true` in the recipe's "
                    "parameters if you trust the file"
                )
            files = pickles
    else:
        raise DamError(f"{root}: no such model directory or file")
    if not files:
        raise DamError(f"{root}: no weight files (*.safetensors) found")
    return files


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file and the offset where its data starts."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as err:
        raise DamError(f"{path}: not a readable safetensors file ({err})") from None
    return header, 8 + size


def fingerprint_model(
    model_dir: str | os.PathLike, *, allow_pickle: bool = False, full: bool = False
) -> str:
    """A stable hex digest of a model's weights (cached per file set, size and mtime)."""
    files = weight_files(model_dir, allow_pickle=allow_pickle)
    stamp = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(Path(model_dir).resolve()), full)
    with _lock:
        hit = _cache.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            if full or path.suffix != ".safetensors":
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
                continue
            header, start = read_safetensors_header(path)
            digest.update(json.dumps(header, sort_keys=True).encode())
            for name in sorted(k for k in header if k != "__metadata__"):
                begin, end = header[name]["data_offsets"]
                for offset, size in _windows(begin, end):
                    fh.seek(start + offset)
                    digest.update(fh.read(size))
    value = "sha256:" + digest.hexdigest()
    with _lock:
        _cache[key] = (stamp, value)
    return value


def _windows(begin: int, end: int) -> list[tuple[int, int]]:
    """(offset, size) reads covering a tensor's start, middle and end (all of a small one)."""
    length = end - begin
    if length <= 3 * WINDOW:
        return [(begin, length)]
    return [(begin, WINDOW), (begin + (length - WINDOW) // 2, WINDOW), (end - WINDOW, WINDOW)]
