"""The ``dam`` merge method for mergekit: a small kernel over one ``TensorGroup``.

It reads the masks of ``group.metadata.name`` from the mask file and calls the one merge formula in
:mod:`dam_mergekit.merge`. Planning, fingerprints and mask I/O live elsewhere.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from dam_mergekit.errors import DamError
from dam_mergekit.masks.registry import masks_for
from dam_mergekit.merge import merge_tensor
from dam_mergekit.recipe.load import mask_path_for

LOG = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2410.13910"
PRIMARY_NAME = "dam"
ALIAS_NAME = "defense_aware_merging"


@dataclass(frozen=True)
class DamMerge(GroupMergeMethod):
    """Masked task arithmetic: ``base + lambda * sum_i w_i c_i (M1 * M2_i * tau_i)``."""

    method_name: str = PRIMARY_NAME

    @cached_property
    def spec(self) -> MergeMethodSpec:
        shared = ParameterScope.SHARED
        return MergeMethodSpec(
            name=self.method_name,
            pretty_name="DAM (Defense-Aware Merging)",
            reference_url=PAPER_URL,
            parameters=(
                ParameterSpec(
                    "masks",
                    str | None,
                    shared,
                    default=None,
                    description="mask file (safetensors) with M1, M2 and coefficients",
                ),
                ParameterSpec(
                    "calibration",
                    str | None,
                    shared,
                    default=None,
                    description="calibration file used to learn the masks",
                ),
                ParameterSpec(
                    "lambda",
                    float,
                    shared,
                    default=1.0,
                    description="scale of the merged task vector",
                ),
                ParameterSpec(
                    "allow_pickle",
                    bool,
                    shared,
                    default=False,
                    description="accept pickle checkpoints when fingerprinting",
                ),
                ParameterSpec(
                    "weight",
                    float,
                    ParameterScope.NON_BASE,
                    default=1.0,
                    description="per-model weight of its task vector",
                ),
            ),
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        path = mask_path_for(parameters["masks"], parameters["calibration"])
        mask_file = masks_for(
            path, group.base.id, [e.id for e in entries], allow_pickle=parameters["allow_pickle"]
        )
        name = group.metadata.name
        index = [mask_file.expert_position(e.id) for e in entries]
        like = {"device": base.device, "dtype": base.dtype}
        m1 = _to(mask_file.m1(name), like)
        m2 = [_to(mask_file.m2(name, i), like) for i in index]
        coefficients = mask_file.coefficients(name)[index]
        weights = [parameters["weight"][e.id] for e in entries]
        return merge_tensor(
            base,
            [e.tensor for e in entries],
            weights,
            lam=parameters["lambda"],
            m1=m1,
            m2=m2,
            coefficients=coefficients,
        )


def _to(mask: torch.Tensor | None, like: dict[str, Any]) -> torch.Tensor | None:
    return None if mask is None else mask.to(**like)


def register_methods() -> None:
    """Make ``dam`` and ``defense_aware_merging`` known to mergekit; safe to call again.

    A different method already registered as ``dam`` (the acronym also names Arcee's unrelated
    Differentiable Adaptive Merging) is an error that points to the unambiguous alias.
    """
    registered = {m.spec.name: m for m in merge_methods.registered_methods()}
    for name in (ALIAS_NAME, PRIMARY_NAME):
        existing = registered.get(name)
        if existing is None:
            merge_methods.register(DamMerge(method_name=name))
        elif type(existing).__qualname__ != DamMerge.__qualname__:
            raise DamError(
                f"another merge method is already registered as {name!r} "
                f"({type(existing).__module__}.{type(existing).__qualname__}); use "
                f"`merge_method: {ALIAS_NAME}` for Defense-Aware Merging"
            )


# The start-up hook fired while this module was still being imported: finish its job now.
if getattr(sys.modules.get("dam_mergekit._autoload"), "REGISTER_PENDING", False):
    register_methods()
