"""The guarded merge: check everything before mergekit writes, leave nothing behind on failure.

``install_guard()`` puts :func:`run_merge` in place of mergekit's own ``run_merge`` (in
``mergekit.merge`` and in the ``mergekit-yaml`` script module) so that the stock command checks a
``dam`` recipe before the first tensor is written. Recipes of other methods pass straight through.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

from dam_mergekit.errors import DamError
from dam_mergekit.recipe.load import dam_settings, is_dam, mask_path_for

LOG = logging.getLogger(__name__)
_GUARD_MARK = "__dam_mergekit_guard__"


def preflight(config, options=None):
    """Everything that can be checked before merging; returns the plan of a ``dam`` recipe."""
    from dam_mergekit.calibrate.launch import launched_world_size
    from dam_mergekit.masks.validate import validate_plan
    from dam_mergekit.recipe.plan import plan_recipe

    if config.tokenizer_source is not None or config.tokenizer is not None:
        raise DamError(
            "`tokenizer_source`/`tokenizer` permute vocabulary rows before the kernel, which would "
            "misalign the masks of embedding tensors; remove them from the dam recipe and align "
            "tokenizers before calibration"
        )
    if launched_world_size() > 1:
        raise DamError(
            "the merge runs in one process (mergekit's --cuda/--multi-gpu spread it over GPUs); "
            "under torchrun, run `dam-mergekit calibrate RECIPE` (sharded calibration) and then "
            "mergekit-yaml without torchrun"
        )
    settings = dam_settings(config)
    allow_pickle = bool((config.parameters or {}).get("allow_pickle", False))
    plan = plan_recipe(config, options, allow_pickle=allow_pickle)
    path = mask_path_for(settings.masks, settings.calibration)
    if settings.calibration is not None:
        _calibrate_if_needed(plan, path, settings.calibration, options)
    validate_plan(plan, allow_pickle=allow_pickle)
    return plan


def _calibrate_if_needed(plan, mask_path: str, calibration: str, options) -> None:
    try:
        from dam_mergekit.calibrate.hook import ensure_masks
    except ImportError:
        if Path(mask_path).is_file():
            return
        raise DamError(
            f"{mask_path}: mask file missing and this dam-mergekit cannot calibrate "
            f"({calibration} given); create masks with `dam-mergekit masks init`"
        ) from None
    ensure_masks(plan, mask_path, calibration, options)


def run_merge(merge_config, out_path: str, options=None, config_source: str | None = None):
    """mergekit's ``run_merge`` with DAM's pre-flight checks and all-or-nothing output."""
    from mergekit.options import MergeOptions

    from dam_mergekit.method import register_methods

    register_methods()
    options = options or MergeOptions()
    original = _original_run_merge()
    if not is_dam(merge_config):
        return original(merge_config, out_path, options, config_source)
    preflight(merge_config, options)
    out = Path(out_path)
    existed = out.exists()
    before = set(os.listdir(out)) if existed else set()
    try:
        return original(merge_config, out_path, options, config_source)
    except BaseException:
        _remove_new_output(out, existed, before)
        raise


def _remove_new_output(out: Path, existed: bool, before: set[str]) -> None:
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in set(os.listdir(out)) - before:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    LOG.warning("merge failed: removed the files it had written to %s", out)


def _mergekit_merge():
    """``mergekit.merge``, also while it is still being imported (the start-up hook runs then)."""
    from importlib import import_module

    return import_module("mergekit.merge")


def _original_run_merge():
    current = _mergekit_merge().run_merge
    return getattr(current, _GUARD_MARK, current)


def install_guard() -> None:
    """Register the methods and route mergekit's ``run_merge`` through :func:`run_merge`."""
    import sys

    from dam_mergekit.method import register_methods

    register_methods()
    merge_module = _mergekit_merge()
    original = _original_run_merge()

    @functools.wraps(original)
    def guarded(merge_config, out_path, options, config_source=None):
        return run_merge(merge_config, out_path, options, config_source)

    setattr(guarded, _GUARD_MARK, original)
    merge_module.run_merge = guarded
    script = sys.modules.get("mergekit.scripts.run_yaml")
    if script is not None:
        script.run_merge = guarded
