"""Checks on a merge plan that mergekit itself does not make."""

from __future__ import annotations

import os
from collections.abc import Iterable

from dam_mergekit.errors import DamError

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def base_tensor_names(base_dir: str | os.PathLike) -> dict[str, str]:
    """``{name: safetensors dtype}`` of every tensor stored in a model directory."""
    from dam_mergekit.masks.fingerprint import read_safetensors_header, weight_files

    names: dict[str, str] = {}
    for path in weight_files(base_dir):
        header, _ = read_safetensors_header(path)
        names.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return names


def check_plan_covers_base(plan_tensor_names: Iterable[str], base_dir: str | os.PathLike) -> None:
    """Refuse a plan that would write fewer weights than the base model holds.

    mergekit plans from the tensor names the installed transformers expects. When a checkpoint
    uses other names (a transformers-4 ``CLIPVisionModel`` saved as ``vision_model.*``), it plans
    tensors that no input holds, skips them as optional, and exits 0 having merged nothing.
    Every floating-point tensor of the base must be in the plan; integer buffers (such as
    ``position_ids``, which transformers rebuilds) are exempt.
    """
    planned = set(plan_tensor_names)
    stored = base_tensor_names(base_dir)
    weights = {name for name, dtype in stored.items() if dtype in FLOAT_DTYPES}
    missing = sorted(weights - planned)
    if not missing:
        return
    hint = ""
    if any(name.startswith("vision_model.") for name in missing):
        hint = (" They look like transformers-4 CLIP vision names: convert the models with "
                "`dam-mergekit convert hf4-vision IN OUT` first.")
    raise DamError(
        f"{base_dir}: the merge plan covers {len(weights) - len(missing)} of the base model's "
        f"{len(weights)} weight tensors; {len(missing)} would not be merged or written (e.g. "
        f"{missing[0]!r}).{hint}"
    )
