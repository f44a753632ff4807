"""Mask files opened once per process and bound to the models of a merge.

mergekit runs the kernel once per tensor, possibly in several threads (``--multi-gpu``): the first
call for a mask file opens it and checks the fingerprints of the base and of every expert; later
calls reuse that under a lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Sequence
from pathlib import Path

from dam_mergekit.errors import DamError
from dam_mergekit.masks.file import MaskFile
from dam_mergekit.masks.fingerprint import fingerprint_model

_lock = threading.Lock()
_bound: dict[tuple, BoundMaskFile] = {}


class BoundMaskFile:
    """A :class:`MaskFile` whose experts are matched to the merge's models by fingerprint."""

    def __init__(self, mask_file: MaskFile, positions: dict[str, int]):
        self.file = mask_file
        self._positions = positions

    def expert_position(self, ref: Hashable) -> int:
        return self._positions[str(ref)]

    def __getattr__(self, name: str):  # m1, m2, coefficients, header, ...
        return getattr(self.file, name)


def model_location(ref: Hashable) -> str:
    """Local directory of a mergekit ModelReference (or of a plain path)."""
    if hasattr(ref, "local_path"):
        from dam_mergekit.model_files import model_dir

        return model_dir(ref)
    return str(ref)


def bind(
    mask_file: MaskFile, base: Hashable, experts: Sequence[Hashable], *, allow_pickle: bool = False
) -> BoundMaskFile:
    """Check that ``mask_file`` was made for exactly these models and map each expert to its slot."""
    where = mask_file.path
    base_fp = fingerprint_model(model_location(base), allow_pickle=allow_pickle)
    if base_fp != mask_file.base.fingerprint:
        raise DamError(
            f"{where}: fingerprint mismatch for the base model {base} (the masks were learned for "
            f"{mask_file.base.model}); re-create the mask file for this recipe"
        )
    records = mask_file.experts
    taken: set[int] = set()
    positions: dict[str, int] = {}
    for ref in experts:
        fp = fingerprint_model(model_location(ref), allow_pickle=allow_pickle)
        slots = [i for i, r in enumerate(records) if r.fingerprint == fp and i not in taken]
        if not slots:
            named = any(r.model == str(ref) for r in records)
            why = (
                f"the weights of {ref} changed since the masks were learned"
                if named
                else f"the file covers {', '.join(r.model for r in records)}"
            )
            raise DamError(
                f"{where}: fingerprint mismatch: no masks for expert {ref} ({why}); re-create "
                "the mask file for this recipe"
            )
        same_name = [i for i in slots if records[i].model == str(ref)]
        slot = (same_name or slots)[0]
        taken.add(slot)
        positions[str(ref)] = slot
    return BoundMaskFile(mask_file, positions)


def masks_for(
    path: str | os.PathLike,
    base: Hashable,
    experts: Sequence[Hashable],
    *,
    allow_pickle: bool = False,
) -> BoundMaskFile:
    """The bound mask file for a merge, opened and checked on first use, then cached."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = None
    key = (str(resolved), stamp, str(base), tuple(sorted(str(e) for e in experts)))
    with _lock:
        hit = _bound.get(key)
        if hit is None:
            hit = bind(MaskFile(path), base, experts, allow_pickle=allow_pickle)
            _bound[key] = hit
        return hit


def forget() -> None:
    """Drop every cached mask file (tests, and notebooks that rewrite a mask file in place)."""
    with _lock:
        _bound.clear()
