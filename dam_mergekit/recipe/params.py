"""The parameters of a ``dam`` recipe: known keys only, and numbers that are numbers.

mergekit passes unknown parameter keys through silently and never looks at the values of known ones
before the kernel runs: ``lamda: 0.3`` merges at lambda 1, and ``lambda: .nan`` writes an all-NaN
model. A defense that ships a silently wrong merge is worse than none, so a ``dam`` recipe is
checked here, key by key, before anything is planned or written.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from dam_mergekit.errors import DamError

# Keys of the `dam` method (see DamMerge.spec): global ones, and those a model entry may set.
GLOBAL_KEYS = ("masks", "calibration", "lambda", "allow_pickle", "weight")
MODEL_KEYS = ("weight",)
NUMBER_KEYS = ("lambda", "weight")


def check_recipe_keys(config, where: str = "recipe") -> None:
    """Refuse a parameter key the ``dam`` method does not read, or a number that is not one."""
    _check_keys(config.parameters, GLOBAL_KEYS, f"{where}: parameters")
    for i, entry in enumerate(config.models or ()):
        _check_keys(entry.parameters, MODEL_KEYS, f"{where}: models[{i}] ({entry.model})")
    for i, block in enumerate(config.slices or ()):
        _check_keys(block.parameters, GLOBAL_KEYS, f"{where}: slices[{i}].parameters")
        for j, source in enumerate(block.sources):
            _check_keys(source.parameters, MODEL_KEYS, f"{where}: slices[{i}].sources[{j}]")


def _check_keys(params: Mapping[str, Any] | None, known: Iterable[str], where: str) -> None:
    known = tuple(known)
    for key, value in (params or {}).items():
        if key in NUMBER_KEYS:
            _check_setting(value, key, where)
        if key in known:
            continue
        close = difflib.get_close_matches(key, GLOBAL_KEYS, n=1, cutoff=0.6)
        if close and close[0] in known:
            hint = f"did you mean `{close[0]}`?"
        elif close:
            hint = f"`{close[0]}` is a global parameter: move it under the recipe's `parameters`"
        else:
            hint = f"the dam method reads {', '.join(f'`{k}`' for k in known)} here"
        raise DamError(f"{where}: unknown parameter `{key}` (dam would ignore it); {hint}")


def _check_setting(value: Any, key: str, where: str) -> None:
    """A number, a gradient (list of numbers) or filters (``{filter, value}``) of those."""
    if isinstance(value, list):
        for item in value:
            inner = getattr(item, "value", item)
            label = f"{where} (filter {item.filter!r})" if hasattr(item, "filter") else where
            for number in inner if isinstance(inner, list) else [inner]:
                finite_number(number, key, label)
        return
    finite_number(value, key, where)


def finite_number(value: Any, key: str, where: str) -> float:
    """``value`` as a float, or a one-line DamError naming ``key`` when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DamError(f"{where}: `{key}` must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise DamError(
            f"{where}: `{key}` is {number} (not finite): the merged model would be all NaN or inf; "
            "give a finite number"
        )
    return number


def check_flag(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise DamError(f"{where}: `{key}` must be true or false, got {value!r}")
    return value
