"""What mergekit will merge for a recipe: every output tensor, its shape and resolved parameters.

The names come from mergekit's own planner (``MergePlanner.plan_in_memory``), so they are exactly
the ``group.metadata.name`` values the kernel will see. Calibration, ``masks init`` and
``masks validate`` all read tensor names from here and nowhere else.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from dam_mergekit.errors import DamError
from dam_mergekit.model_files import model_dir, stored_tensors
from dam_mergekit.recipe.checks import (
    FLOAT_DTYPES,
    check_experts_match_base,
    check_local_paths_exist,
    check_plan_covers_base,
)
from dam_mergekit.recipe.params import check_recipe_keys, finite_number

DTYPE_DEPRECATION = "`torch_dtype` is deprecated"


class _DropDtypeDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return DTYPE_DEPRECATION not in record.getMessage()


def quiet_dtype_deprecation() -> None:
    """Drop the ``torch_dtype`` deprecation transformers 5 prints on each merge and plan.

    mergekit 0.1.5 sets ``config.torch_dtype`` on the output config; the user can do nothing
    about it, and a warning on every command teaches people to ignore warnings.
    """
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _DropDtypeDeprecation) for f in logger.filters):
        logger.addFilter(_DropDtypeDeprecation())


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    is_float: bool
    parameters: dict[str, Any]  # shared parameters resolved for this tensor (masks, lambda, ...)
    weights: dict[str, float]  # expert reference -> resolved `weight`


@dataclass
class RecipePlan:
    config: Any  # mergekit MergeConfiguration (normalised copy)
    base: Any  # ModelReference
    experts: list[Any]  # ModelReference, in recipe order
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def float_tensors(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.is_float]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.float_tensors}


def plan_recipe(config, options=None, *, allow_pickle: bool = False) -> RecipePlan:
    """Plan ``config`` with mergekit (no tensor is loaded or written) and list its output tensors."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from dam_mergekit.method import register_methods

    register_methods()
    quiet_dtype_deprecation()
    options = options or MergeOptions()
    config = copy.deepcopy(config)
    if config.base_model is None:
        raise DamError("a `dam` recipe needs `base_model`: task vectors are taken against it")
    check_recipe_keys(config)
    listed = [str(entry.model) for entry in config.models or ()]
    twice = next((m for i, m in enumerate(listed) if m in listed[:i]), None)
    if twice is not None:
        raise DamError(
            f"recipe: {twice} is listed twice in `models`; list each expert once (a larger "
            "`weight` gives it more say)"
        )
    experts = experts_in_recipe_order(config)  # before the planner rewrites `models`
    check_local_paths_exist([config.base_model, *experts])
    try:
        arch_info = get_architecture_info(config, options)
        LoaderCache().setup(options=options)
        out_cfg = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
        # plan_to_disk only builds task objects: nothing is written to the (unused) path
        tasks = MergePlanner(config, arch_info, options, out_cfg).plan_to_disk("unused-by-dam")
    except DamError:
        raise
    except (OSError, RuntimeError, ValueError) as err:
        raise DamError(f"mergekit could not plan this recipe: {err}") from None

    base = config.base_model
    header_shapes = stored_tensors(model_dir(base), allow_pickle=allow_pickle)
    tensors, covered = [], set()
    order = {n: i for i, n in enumerate(header_shapes)}
    positions: dict[str, int] = {}
    for target in tasks:
        task = getattr(target, "tensor_task", None)
        if task is None or not hasattr(task, "output_weight"):
            continue  # finalize / tokenizer tasks
        weight = task.output_weight
        name = weight.name
        stored = next((n for n in (name, *(weight.aliases or ())) if n in header_shapes), None)
        info = header_shapes.get(stored) if stored else None
        if info is None:
            if weight.optional:
                continue
            raise DamError(f"{base.model.path}: tensor {name!r} not found in the base model")
        _, shape, dtype = info
        params = dict(task.parameters.items())
        finite_number(params.get("lambda", 1.0), "lambda", f"recipe: tensor {name}")
        weights = {
            str(ref): finite_number(values.get("weight", 1.0), "weight", f"recipe: {ref}: {name}")
            for ref, values in task.input_parameters.items()
            if ref != base
        }
        tensors.append(PlannedTensor(name, shape, dtype in FLOAT_DTYPES, params, weights))
        positions[name] = order[stored]
        covered.add(stored)
    check_plan_covers_base(covered, model_dir(base), stored=header_shapes)
    for expert in experts:
        check_experts_match_base(header_shapes, model_dir(expert), allow_pickle=allow_pickle)
    # mergekit's task order follows set iteration, which changes between processes; calibration
    # draws its random masks tensor by tensor, so it needs one stable order: the base model's
    tensors.sort(key=lambda t: positions[t.name])
    return RecipePlan(config=config, base=base, experts=experts, tensors=tensors)


def experts_in_recipe_order(config) -> list:
    """The non-base models in the order the recipe lists them (then any others, sorted).

    mergekit's ``referenced_models()`` returns a set's order, which changes between processes;
    mask files, calibration digests and reports need one stable order.
    """
    base = config.base_model
    ordered = []
    for entry in config.models or ():
        if entry.model != base and entry.model not in ordered:
            ordered.append(entry.model)
    rest = [m for m in config.referenced_models() if m != base and m not in ordered]
    return ordered + sorted(rest, key=str)
