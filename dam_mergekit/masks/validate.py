"""Check mask files against what mergekit will merge, before any tensor is written."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dam_mergekit.errors import DamError
from dam_mergekit.masks.file import check_coefficients, check_effective_coefficients
from dam_mergekit.masks.registry import BoundMaskFile, masks_for
from dam_mergekit.recipe.load import mask_path_for


@dataclass
class MaskFileReport:
    path: str
    tensors: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)


def validate_plan(
    plan, *, allow_pickle: bool = False, scan_values: bool = True
) -> list[MaskFileReport]:
    """Every mask file a planned recipe uses: right models, right names and shapes, sane values.

    Raises :class:`DamError` with a one-line message at the first problem.
    """
    by_file: dict[str, list] = {}
    for tensor in plan.float_tensors:
        path = mask_path_for(tensor.parameters.get("masks"), tensor.parameters.get("calibration"))
        by_file.setdefault(path, []).append(tensor)
    reports = []
    for path, tensors in by_file.items():
        bound = masks_for(path, plan.base, plan.experts, allow_pickle=allow_pickle)
        if len(bound.experts) != len(plan.experts):
            raise DamError(
                f"{path}: made for {len(bound.experts)} experts, the recipe merges "
                f"{len(plan.experts)}; re-create the mask file for this recipe"
            )
        planned = {t.name for t in tensors}
        unknown = sorted(set(bound.names) - {t.name for t in plan.tensors})
        if unknown:
            raise DamError(
                f"{path}: unknown tensor name {unknown[0]!r} (mergekit will not merge a tensor of "
                "that name from this recipe); the file was made for another architecture or recipe"
            )
        for tensor in tensors:
            _check_tensor(bound, tensor, path, scan_values)
        reports.append(MaskFileReport(path, sorted(planned), [str(e) for e in plan.experts]))
    return reports


def _check_tensor(bound: BoundMaskFile, tensor, path: str, scan_values: bool) -> None:
    name = tensor.name
    if name not in bound.names:
        raise DamError(
            f"{path}: no masks for tensor {name!r}; re-create the mask file for this recipe "
            "(dam-mergekit calibrate, or masks init for a hand-made start)"
        )
    if tuple(bound.shape(name)) != tuple(tensor.shape):
        raise DamError(
            f"{path}: {name}: the masks were made for shape {bound.shape(name)}, the model's "
            f"tensor has shape {list(tensor.shape)}; re-create the mask file for these models"
        )
    if not scan_values:
        return
    masks = [bound.m1(name)] + [bound.m2(name, i) for i in range(len(bound.experts))]
    for mask in masks:
        if mask is None or mask.dtype == torch.bool:
            continue
        mask = mask.float()
        if not torch.isfinite(mask).all():
            raise DamError(f"{path}: {name}: mask has NaN or inf values; re-create the mask file")
        if (mask < 0).any() or (mask > 1).any():
            raise DamError(f"{path}: {name}: mask values outside [0, 1]; re-create the mask file")
    coef, n = bound.coefficients(name), len(bound.experts)
    check_coefficients(coef, n, f"{path}: {name}")
    kept = [bound.kept_fraction(name, i) for i in range(n)]
    check_effective_coefficients(coef, kept, f"{path}: {name}")
