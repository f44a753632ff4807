"""Checks on a merge plan that mergekit itself does not make."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from dam_mergekit.errors import DamError
from dam_mergekit.masks.fingerprint import weight_files
from dam_mergekit.model_files import StoredTensor, stored_tensors

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def check_plan_covers_base(
    plan_tensor_names: Iterable[str],
    base_dir: str | os.PathLike,
    *,
    stored: Mapping[str, StoredTensor] | None = None,
) -> None:
    """Refuse a plan that would write fewer weights than the base model holds.

    mergekit plans from the tensor names the installed transformers expects. When a checkpoint
    uses other names (a transformers-4 ``CLIPVisionModel`` saved as ``vision_model.*``), it plans
    tensors that no input holds, skips them as optional, and exits 0 having merged nothing.
    Every floating-point tensor of the base must be in the plan; integer buffers (such as
    ``position_ids``, which transformers rebuilds) are exempt. ``stored`` is the base's tensor
    table when the caller has read it already.
    """
    if stored is None:
        stored = stored_tensors(str(base_dir))
    planned = set(plan_tensor_names)
    weights = {name for name, t in stored.items() if t.dtype in FLOAT_DTYPES}
    missing = sorted(weights - planned)
    if not missing:
        return
    hint = ""
    if any(name.startswith("vision_model.") for name in missing):
        hint = (
            " They look like transformers-4 CLIP vision names: convert the models with "
            "`dam-mergekit convert hf4-vision IN OUT` first."
        )
    raise DamError(
        f"{base_dir}: the merge plan covers {len(weights) - len(missing)} of the base model's "
        f"{len(weights)} weight tensors; {len(missing)} would not be merged or written (e.g. "
        f"{missing[0]!r}).{hint}"
    )


def check_experts_match_base(
    base: Mapping[str, StoredTensor], expert_dir: str, *, allow_pickle: bool = False
) -> None:
    """Refuse an expert whose weights have other shapes than the base's (another architecture).

    mergekit would fail half-way through the merge with advice that does not apply to ``dam``;
    calibration, ``masks init`` and ``masks validate`` should all say it first, in one line.
    Pickle-only experts (allowed by ``allow_pickle``) have no header to read and are skipped.
    """
    files = weight_files(expert_dir, allow_pickle=allow_pickle)
    if any(f.suffix != ".safetensors" for f in files):
        return
    expert = stored_tensors(expert_dir)
    for name, tensor in base.items():
        other = expert.get(name)
        if other is not None and tuple(other.shape) != tuple(tensor.shape):
            raise DamError(
                f"{expert_dir}: tensor {name!r} has shape {list(other.shape)}, the base model's "
                f"has {list(tensor.shape)}; dam merges experts fine-tuned from the same base "
                "architecture only"
            )


def looks_local(path: str) -> bool:
    """A model path that cannot be a hub repository id (``org/name``)."""
    return path.startswith((".", "/", "~", "\\")) or path.count("/") > 1 or ":" in path[:3]


def check_local_paths_exist(models: Iterable) -> None:
    """Name a missing model directory at once, instead of ten hub retries and network advice.

    A path that cannot be a hub id must exist. An ``org/name`` path that is not a local directory
    is a hub repository: with the hub offline (``HF_HUB_OFFLINE=1``) it must already be cached.
    """
    for ref in models:
        path = str(ref.model.path)
        if os.path.exists(os.path.expanduser(path)):
            continue
        if looks_local(path):
            raise DamError(f"{path}: model directory not found; check the path in the recipe")
        if _hub_offline() and not _in_hub_cache(path, ref.model.revision):
            raise DamError(
                f"{path}: no such local directory, and the hub is offline (HF_HUB_OFFLINE=1) with "
                "no cached copy; fix the path, or download the model first"
            )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False
    return isinstance(found, str)
