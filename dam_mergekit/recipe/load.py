"""Read a mergekit recipe and the DAM settings it carries."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dam_mergekit.errors import DamError

METHOD_NAMES = ("dam", "defense_aware_merging")


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """A YAML file's content, or a one-line DamError naming the file (``what``: "recipe", ...)."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamError(f"{path}: {what} not found") from None
    except yaml.YAMLError as err:
        raise DamError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None


def load_recipe(source: str | os.PathLike | dict[str, Any]):
    """A ``MergeConfiguration`` from a YAML path or a dict, with a one-line error when invalid."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    if isinstance(source, dict):
        data, where = source, "recipe"
    else:
        data, where = read_yaml(source, "recipe"), str(source)
    try:
        return MergeConfiguration.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise DamError(f"{where}: invalid mergekit recipe at {loc}: {first.get('msg')}") from None


def is_dam(config) -> bool:
    return config.merge_method in METHOD_NAMES


@dataclass(frozen=True)
class DamSettings:
    """The global DAM parameters of a recipe (per-tensor overrides are resolved by the planner)."""

    masks: str | None
    calibration: str | None
    allow_pickle: bool = False


def dam_settings(config) -> DamSettings:
    """The global settings, checked: one path each (no filters), a true/false ``allow_pickle``."""
    from dam_mergekit.recipe.params import check_flag

    params = dict(config.parameters or {})
    masks, calibration = params.get("masks"), params.get("calibration")
    for key, value in (("masks", masks), ("calibration", calibration)):
        if isinstance(value, list):
            raise DamError(
                f"recipe parameter `{key}` takes one path, not filters or a list: one mask file "
                "covers every tensor of the merge (cut a tensor with its masks instead)"
            )
        if value is not None and not isinstance(value, str):
            raise DamError(f"recipe parameter `{key}` must be one path, got {value!r}")
    allow_pickle = check_flag(params.get("allow_pickle", False), "allow_pickle", "recipe")
    return DamSettings(masks=masks, calibration=calibration, allow_pickle=allow_pickle)


def mask_path_for(masks: str | None, calibration: str | None) -> str:
    """Where a recipe's masks live: ``masks`` if given, else next to the calibration file."""
    if masks:
        return masks
    if calibration:
        return str(Path(calibration).with_suffix("")) + ".masks.safetensors"
    raise DamError(
        "a `dam` recipe needs `parameters: {masks: FILE}` (a mask file) or "
        "`parameters: {calibration: FILE}` (to learn one); DAM never falls back to plain task "
        "arithmetic"
    )


def load_calibrated_recipe(path: str, why: str):
    """A dam recipe that names a calibration file, and its DAM settings; else a one-line error
    ending in ``why`` (what the caller needs the calibration file for)."""
    config = load_recipe(path)
    if not is_dam(config):
        raise DamError(f"{path}: merge_method is {config.merge_method!r}, not dam")
    settings = dam_settings(config)
    if settings.calibration is None:
        raise DamError(f"{path}: no `parameters: {{calibration: FILE}}`; {why}")
    return config, settings
