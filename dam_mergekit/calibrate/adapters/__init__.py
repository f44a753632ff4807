"""Calibration adapters: model family specifics (data, forward, where the perturbation lives)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

import torch

from dam_mergekit.calibrate.adapters.base import CalibrationAdapter
from dam_mergekit.errors import DamError

BUILTIN = {
    "clip": "dam_mergekit.calibrate.adapters.clip:ClipAdapter",
    "causal_lm": "dam_mergekit.calibrate.adapters.causal_lm:CausalLMAdapter",
}


def adapter_class(name: str) -> type[CalibrationAdapter]:
    """The adapter class for a built-in name or a ``package.module:Class`` import path."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise DamError(f"unknown adapter {name!r}; use {', '.join(BUILTIN)} or 'module:Class'")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise DamError(f"adapter {name!r} cannot be imported ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, CalibrationAdapter)):
        raise DamError(f"adapter {name!r} is not a subclass of "
                       "dam_mergekit.calibrate.adapters.base.CalibrationAdapter")
    return cls


def make_adapter(name: str, data: Any, options: dict, device: torch.device) -> CalibrationAdapter:
    return adapter_class(name)(data, options, device)


__all__ = ["BUILTIN", "CalibrationAdapter", "adapter_class", "make_adapter"]
