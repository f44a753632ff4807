"""The mask file: one safetensors file holding M1, M2 and the coefficients of a DAM merge.

Layout (see docs/mask-format.md for the full specification):

- ``m1/<tensor>``: the task-shared mask of one output tensor;
- ``m2/<i>/<tensor>``: the backdoor-detection mask of expert ``i``, or ``m2/shared/<tensor>``;
- ``coef/<tensor>``: float32 ``[n_experts]``, the learned coefficient of each expert;
- header metadata ``dam_mergekit``: JSON with the format version, the fingerprints of the base and
  of every expert, and for each tensor its shape and how each mask is stored.

A binary mask is stored bit-packed (``uint8``, 1 bit per value); a soft mask as float16/float32;
a mask that keeps everything is not stored at all (``"ones"``). Masks may have the tensor's shape or
any shape that broadcasts to it (``[rows, 1]`` for row masks, ``[]`` for a whole-tensor mask).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dam_mergekit import __version__
from dam_mergekit.errors import DamError
from dam_mergekit.masks.bits import is_binary, pack_bits, unpack_bits
from dam_mergekit.staging import staged_file

FORMAT = "dam-mergekit-masks"
FORMAT_VERSION = 1
METADATA_KEY = "dam_mergekit"
SHARED = "shared"
CALIBRATED = "dam-mergekit calibrate"  # settings["source"] of a mask file calibration wrote
# Coefficients a mask file may hold: calibration clamps inside it (as_released learns up to 10).
COEFFICIENT_RANGE = (0.0, 10.0)


@dataclass(frozen=True)
class ModelRecord:
    """A model as the mask file knows it: the recipe's reference and its fingerprint."""

    model: str
    fingerprint: str


@dataclass
class MaskSet:
    """Masks and coefficients in memory, keyed by mergekit's output tensor names.

    ``m1[name]``: task-shared mask; absent means keep everything.
    ``m2[name]``: a list with one mask (or None) per expert, or one tensor shared by all experts.
    ``coefficients[name]``: one value per expert; absent means 1.
    """

    m1: dict[str, torch.Tensor] = field(default_factory=dict)
    m2: dict[str, torch.Tensor | list[torch.Tensor | None]] = field(default_factory=dict)
    coefficients: dict[str, torch.Tensor] = field(default_factory=dict)


def write_mask_file(
    path: str | os.PathLike,
    masks: MaskSet,
    *,
    base: ModelRecord,
    experts: Sequence[ModelRecord],
    tensor_shapes: Mapping[str, Sequence[int]],
    settings: Mapping[str, Any] | None = None,
    soft_dtype: torch.dtype = torch.float32,
    audit: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``masks`` atomically (temporary file, then rename) and return the path.

    ``tensor_shapes`` lists every tensor the file covers, with the shape of the tensor itself.
    Every mask is checked (shape broadcasts, finite, within [0, 1]) before anything is written.
    """
    path = Path(path)
    n = len(experts)
    known = set(tensor_shapes)
    for kind, table in (("m1", masks.m1), ("m2", masks.m2), ("coef", masks.coefficients)):
        extra = sorted(set(table) - known)
        if extra:
            raise DamError(f"{path}: {kind} mask for {extra[0]!r}, which is not in tensor_shapes")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    shared = any(isinstance(v, torch.Tensor) for v in masks.m2.values())
    if shared and any(not isinstance(v, torch.Tensor) for v in masks.m2.values()):
        raise DamError(f"{path}: m2 must be shared by all experts for every tensor, or for none")
    for name, shape in tensor_shapes.items():
        shape = [int(s) for s in shape]
        entry: dict[str, Any] = {"shape": shape}
        entry["m1"] = _store(tensors, f"m1/{name}", masks.m1.get(name), shape, soft_dtype, path)
        m2 = masks.m2.get(name)
        if shared:
            entry["m2"] = [_store(tensors, f"m2/{SHARED}/{name}", m2, shape, soft_dtype, path)]
        else:
            if m2 is not None and len(m2) != n:
                raise DamError(f"{path}: {name}: {len(m2)} m2 masks for {n} experts")
            per = m2 if m2 is not None else [None] * n
            entry["m2"] = [
                _store(tensors, f"m2/{i}/{name}", m, shape, soft_dtype, path)
                for i, m in enumerate(per)
            ]
        coef = masks.coefficients.get(name)
        if coef is not None:
            coef = torch.as_tensor(coef, dtype=torch.float32).detach().reshape(-1).cpu()
            check_coefficients(coef, n, f"{path}: {name}")
            tensors[f"coef/{name}"] = coef.contiguous()
        entries[name] = entry
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"dam-mergekit {__version__}",
        "base": asdict(base),
        "experts": [asdict(e) for e in experts],
        "m2_shared": shared,
        "settings": dict(settings or {}),
        "tensors": entries,
    }
    if audit is not None:  # the pre-merge audit's report (verdict per expert)
        header["audit"] = dict(audit)
    with staged_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header)})
    return path


def _store(
    out: dict[str, torch.Tensor],
    key: str,
    mask: torch.Tensor | None,
    shape: list[int],
    soft_dtype: torch.dtype,
    path: Path,
) -> dict[str, Any]:
    """Check one mask, add its stored form to ``out`` and return its header entry."""
    if mask is None:
        return {"kind": "ones"}
    mask = torch.as_tensor(mask).detach().cpu()
    name = key.split("/", 2)[-1] if key.startswith("m2/") else key[3:]
    _check_broadcast(list(mask.shape), shape, f"{path}: {name}: mask")
    if mask.dtype != torch.bool:
        mask = mask.float()
        if not torch.isfinite(mask).all():
            raise DamError(f"{path}: {name}: mask has NaN or inf values")
        if (mask < 0).any() or (mask > 1).any():
            raise DamError(f"{path}: {name}: mask values must lie in [0, 1]")
    if is_binary(mask):
        if mask.numel() and bool(mask.all()):
            return {"kind": "ones"}
        out[key] = pack_bits(mask)
        return {"kind": "bits", "shape": list(mask.shape)}
    out[key] = mask.to(soft_dtype).contiguous()
    return {"kind": "float", "shape": list(mask.shape)}


def _stored_shape(spec: dict[str, Any]) -> list[int]:
    """The on-disk shape of a mask entry: packed bytes for bits, the mask itself otherwise."""
    if spec["kind"] == "bits":
        return [(math.prod(spec["shape"]) + 7) // 8]
    return list(spec["shape"])


def check_coefficients(coef: torch.Tensor, n: int, where: str) -> None:
    """``n`` finite, non-negative coefficients, or a one-line DamError.

    The stored value is the learned coefficient times the mean rescaling ``1 / mean(M1 * M2_i)``,
    so it may exceed :data:`COEFFICIENT_RANGE` where masks cut much; ``masks validate`` bounds the
    product with the kept fraction instead (:func:`check_effective_coefficients`).
    """
    if coef.numel() != n:
        raise DamError(f"{where}: {coef.numel()} coefficients for {n} experts; re-create the file")
    if not torch.isfinite(coef).all():
        raise DamError(f"{where}: coefficients have NaN or inf; re-create the mask file")
    if (coef < 0).any():
        raise DamError(
            f"{where}: coefficients {_rounded(coef)} are negative (calibration never learns "
            "such values); re-create the mask file"
        )


def check_effective_coefficients(coef: torch.Tensor, kept: Sequence[float], where: str) -> None:
    """Coefficient times kept fraction (the scale of the expert's whole task vector) in range."""
    high = COEFFICIENT_RANGE[1]
    effective = coef * torch.tensor(list(kept), dtype=coef.dtype)
    if (effective > high * (1 + 1e-4)).any():
        raise DamError(
            f"{where}: coefficients {_rounded(coef)} at kept fractions {_rounded(kept)} scale a "
            f"task vector by more than {high:g} (calibration never learns such values); "
            "re-create the mask file"
        )


def _rounded(values) -> list[float]:
    return [round(float(v), 4) for v in values]


def _check_broadcast(mask_shape: list[int], shape: list[int], what: str) -> None:
    ok = len(mask_shape) <= len(shape) and all(
        m in (1, s) for m, s in zip(reversed(mask_shape), reversed(shape), strict=False)
    )
    if not ok:
        raise DamError(
            f"{what} has shape {mask_shape}, which does not broadcast to the tensor's shape "
            f"{shape}; re-create the mask file for these models"
        )


class MaskFile:
    """Lazy, thread-safe reader: one tensor at a time, never the whole file in memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise DamError(
                f"{self.path}: not a regular file (a directory or a device); give the path of a "
                "mask file (.safetensors)"
            )
        if not self.path.is_file():
            raise DamError(
                f"{self.path}: mask file not found; create it with `dam-mergekit calibrate` "
                "or `dam-mergekit masks init`"
            )
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            raw = (self._handle.metadata() or {}).get(METADATA_KEY)
            header = json.loads(raw) if raw else None
        except Exception as err:  # safetensors raises its own error types
            raise DamError(
                f"{self.path}: truncated or corrupt mask file ({err}); re-create it"
            ) from None
        if not header or header.get("format") != FORMAT:
            raise DamError(f"{self.path}: not a dam-mergekit mask file (no {METADATA_KEY} header)")
        if header.get("format_version") != FORMAT_VERSION:
            raise DamError(
                f"{self.path}: mask format version {header.get('format_version')}, this "
                f"dam-mergekit reads version {FORMAT_VERSION}; upgrade dam-mergekit"
            )
        self.header = header
        self._keys = set(self._handle.keys())
        self._lock = threading.Lock()
        self._check_layout()

    # -- header ---------------------------------------------------------------------------------
    @property
    def base(self) -> ModelRecord:
        return ModelRecord(**self.header["base"])

    @property
    def experts(self) -> list[ModelRecord]:
        return [ModelRecord(**e) for e in self.header["experts"]]

    @property
    def audit(self) -> dict[str, Any] | None:
        """The pre-merge audit's report, when the calibration ran one."""
        return self.header.get("audit")

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.header.get("settings", {}))

    @property
    def names(self) -> list[str]:
        return list(self.header["tensors"])

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name)["shape"])

    # -- tensors --------------------------------------------------------------------------------
    def m1(self, name: str) -> torch.Tensor | None:
        """The task-shared mask of ``name`` (None: keeps everything)."""
        return self._load(f"m1/{name}", self._entry(name)["m1"], name)

    def m2(self, name: str, expert: int) -> torch.Tensor | None:
        """The backdoor-detection mask of expert ``expert`` for ``name`` (None: keeps everything)."""
        specs = self._entry(name)["m2"]
        if self.header.get("m2_shared"):
            return self._load(f"m2/{SHARED}/{name}", specs[0], name)
        return self._load(f"m2/{expert}/{name}", specs[expert], name)

    def coefficients(self, name: str) -> torch.Tensor:
        """float32 ``[n_experts]``; ones where the file stores none."""
        self._entry(name)
        key = f"coef/{name}"
        if key not in self._keys:
            return torch.ones(len(self.header["experts"]))
        with self._lock:
            return self._handle.get_tensor(key).float()

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self.header["tensors"][name]
        except KeyError:
            raise DamError(
                f"{self.path}: no masks for tensor {name!r}; the file was made for other models "
                "or another recipe, re-create it (dam-mergekit calibrate / masks init)"
            ) from None

    def _load(self, key: str, spec: dict[str, Any], name: str) -> torch.Tensor | None:
        kind = spec["kind"]
        if kind == "ones":
            return None
        with self._lock:
            stored = self._handle.get_tensor(key)
        if kind == "bits":
            try:
                return unpack_bits(stored, tuple(spec["shape"]))
            except ValueError as err:
                raise DamError(f"{self.path}: {name}: corrupt bit-packed mask ({err})") from None
        return stored

    def _check_layout(self) -> None:
        """Header and stored tensors must agree; cheap (reads no tensor data)."""
        n = len(self.header["experts"])
        expected: set[str] = set()
        for name, entry in self.header["tensors"].items():
            specs = entry.get("m2", [])
            want = 1 if self.header.get("m2_shared") else n
            if len(specs) != want:
                raise DamError(f"{self.path}: {name}: {len(specs)} m2 entries, expected {want}")
            stored = [(f"m1/{name}", entry["m1"])]
            if self.header.get("m2_shared"):
                stored.append((f"m2/{SHARED}/{name}", specs[0]))
            else:
                stored += [(f"m2/{i}/{name}", s) for i, s in enumerate(specs)]
            for key, spec in stored:
                if spec["kind"] != "ones":
                    if key not in self._keys:
                        raise DamError(f"{self.path}: header names {key!r} but the file lacks it")
                    _check_broadcast(spec["shape"], entry["shape"], f"{self.path}: {name}: mask")
                    self._check_stored_shape(key, _stored_shape(spec))
                    expected.add(key)
            if f"coef/{name}" in self._keys:
                self._check_stored_shape(f"coef/{name}", [n])
                expected.add(f"coef/{name}")
        stray = sorted(self._keys - expected)
        if stray:
            raise DamError(
                f"{self.path}: stored tensor {stray[0]!r} is not described in the header"
            )

    def _check_stored_shape(self, key: str, want: list[int]) -> None:
        """A stored tensor must have the shape its header entry implies (reads no data)."""
        got = list(self._handle.get_slice(key).get_shape())
        if got != want:
            raise DamError(
                f"{self.path}: stored tensor {key!r} has shape {got}, its header implies {want}; "
                "the file is corrupt, re-create it"
            )

    def kept_fraction(self, name: str, expert: int | None = None) -> float:
        """Share of the tensor's values kept by M1 (or by M1*M2_expert), soft masks counted."""
        shape = self.shape(name)
        numel = math.prod(shape)
        if numel == 0:
            return 1.0
        keep = self.m1(name)
        keep = torch.ones(()) if keep is None else keep.float()
        if expert is not None:
            m2 = self.m2(name, expert)
            if m2 is not None:
                keep = keep * m2.float()
        return float(keep.expand(shape).float().mean()) if keep.dim() else float(keep)
