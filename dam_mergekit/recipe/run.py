"""The guarded merge: check everything before mergekit writes, leave nothing behind on failure.

``install_guard()`` puts :func:`run_merge` in place of mergekit's own ``run_merge`` (in
``mergekit.merge`` and in the ``mergekit-yaml`` script module) so that the stock command checks a
``dam`` recipe before the first tensor is written. Recipes of other methods pass straight through.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from dam_mergekit.errors import DamError
from dam_mergekit.recipe.load import dam_settings, is_dam, mask_path_for
from dam_mergekit.staging import publish_into, temp_sibling

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
    allow_pickle = settings.allow_pickle
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
    out = Path(out_path)
    check_output_path(out)
    preflight(merge_config, options)
    with staged_output(out) as staging, _card_for(out.name):
        result = original(merge_config, str(staging), options, config_source)
        _add_card_section(staging, merge_config)
        return result


def _add_card_section(folder: Path, merge_config) -> None:
    """The mask file's story (kept fractions, audit verdicts) at the end of mergekit's card."""
    from dam_mergekit.masks.card import card_section

    settings = dam_settings(merge_config)
    card = folder / "README.md"
    if card.is_file():
        section = card_section(mask_path_for(settings.masks, settings.calibration))
        card.write_text(card.read_text(encoding="utf-8") + section, encoding="utf-8")


def check_output_path(out: Path) -> None:
    """Refuse an output mergekit could not write, before calibration spends any time."""
    if out.exists() and not out.is_dir():
        raise DamError(f"{out}: the output path is a file; give a directory to merge into")
    folder = out if out.exists() else out.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise DamError(f"{folder}: cannot write the merged model here (read-only or no permission)")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Merge into a hidden sibling folder, then publish it into ``out``; on failure drop it.

    A merge that fails at any point (model card included) leaves ``out`` exactly as it was, or
    absent if it was. On success the new files replace their namesakes in ``out`` and any other
    file already there stays, as with a plain mergekit run.
    """
    staging = temp_sibling(out, is_dir=True, tag="dam-partial-")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        LOG.warning("merge failed: %s was left as it was", out)
        raise
    publish_into(staging, out)


@contextlib.contextmanager
def _card_for(name: str) -> Iterator[None]:
    """mergekit's model card, named after the real output, and never a lost merge.

    mergekit asks the hub whether a path with one ``/`` (``models/base``) is a repository, which
    raises offline after every tensor is written. A path that exists here is local; a card that
    still fails becomes a short card and a warning, since the merged weights are fine.
    """
    import mergekit.card as card
    import mergekit.merge as merge

    generate, is_hf = merge.generate_card, card.is_hf

    def local_first(path: str) -> bool:
        return False if os.path.exists(path) else is_hf(path)

    def safe_card(*args, **kwargs) -> str:
        kwargs["name"] = name
        try:
            return generate(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the card is documentation, the merge is done
            LOG.warning("could not write mergekit's model card (%s); wrote a short one", err)
            return f"# {name}\n\nMerged with dam-mergekit (Defense-Aware Merging).\n"

    merge.generate_card, card.is_hf = safe_card, local_first
    try:
        yield
    finally:
        merge.generate_card, card.is_hf = generate, is_hf


def _mergekit_merge():
    """``mergekit.merge``, also while it is still being imported (the start-up hook runs then)."""
    from importlib import import_module

    return import_module("mergekit.merge")


def _original_run_merge():
    current = _mergekit_merge().run_merge
    return getattr(current, _GUARD_MARK, current)


def install_guard() -> None:
    """Register the methods and route mergekit's ``run_merge`` through :func:`run_merge`."""
    from dam_mergekit.method import register_methods
    from dam_mergekit.recipe.plan import quiet_dtype_deprecation

    register_methods()
    quiet_dtype_deprecation()
    merge_module = _mergekit_merge()
    original = _original_run_merge()

    @functools.wraps(original)
    def guarded(merge_config, out_path, options, config_source=None):
        return run_merge(merge_config, out_path, options, config_source)

    setattr(guarded, _GUARD_MARK, original)
    merge_module.run_merge = guarded
    script = sys.modules.get("mergekit.scripts.run_yaml")
    if script is not None:
        script.run_merge = one_line_errors(guarded)


def one_line_errors(run):
    """``run`` for a command line: a refusal is one line on stderr and exit 2, no traceback.

    ``-v`` (INFO logging or more) keeps the traceback for whoever needs it.
    """

    @functools.wraps(run)
    def command(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        except DamError as err:
            if logging.getLogger().isEnabledFor(logging.INFO):
                raise
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mergekit-yaml"
            print(f"{prog}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    setattr(command, _GUARD_MARK, getattr(run, _GUARD_MARK, run))
    return command
