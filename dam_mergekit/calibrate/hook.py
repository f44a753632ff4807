"""Recipe -> "are the masks fresh?" -> calibrate -> mask file.

The guarded merge (``dam_mergekit.recipe.run.preflight``) calls :func:`ensure_masks` for a recipe
with ``parameters: {calibration: FILE}``. The mask file is (re)learned when it is missing, cannot be
read, was made for other models (fingerprints), another recipe (tensor names, weights, lambda),
other data, or other calibration settings; otherwise nothing happens.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from dam_mergekit.calibrate.adapters.base import data_fingerprint
from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.errors import DamError

LOG = logging.getLogger(__name__)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def stale_reason(
    plan, mask_path: str | Path, config: CalibrationConfig, *, allow_pickle: bool = False
) -> str | None:
    """Why the mask file must be (re)learned, or None when it is fresh."""
    from dam_mergekit.calibrate.trainer import model_records, plan_digest
    from dam_mergekit.masks import MaskFile
    from dam_mergekit.masks.file import CALIBRATED

    path = Path(mask_path)
    if not path.is_file():
        return "the mask file does not exist"
    try:
        mf = MaskFile(path)
    except DamError as err:
        return f"the mask file cannot be read ({err})"
    settings = mf.settings
    if settings.get("source") != CALIBRATED:
        return f"the mask file was not made by calibration (source: {settings.get('source')!r})"
    base, experts = model_records(plan, allow_pickle=allow_pickle)
    if mf.base.fingerprint != base.fingerprint:
        return "the base model changed (fingerprint)"
    if sorted(e.fingerprint for e in mf.experts) != sorted(e.fingerprint for e in experts):
        return "the experts changed (fingerprints)"
    if set(mf.names) != {t.name for t in plan.float_tensors}:
        return "the recipe merges other tensors"
    if settings.get("recipe") != plan_digest(plan):
        return "the recipe's weights or lambda changed"
    if not _same(settings.get("calibration"), config.settings()):
        return "the calibration settings changed"
    if settings.get("data") != data_fingerprint(config.data):
        return "the calibration data changed"
    return None


def ensure_masks(
    plan,
    mask_path: str,
    calibration_path: str,
    options=None,
    *,
    force: bool = False,
    progress: bool = True,
):
    """Learn the mask file when it is missing or stale; return the CalibrationResult or None."""
    from dam_mergekit.calibrate.launch import is_main_process
    from dam_mergekit.calibrate.run import calibrate
    from dam_mergekit.recipe.load import dam_settings

    config = CalibrationConfig.load(calibration_path)
    allow_pickle = dam_settings(plan.config).allow_pickle
    reason = "forced" if force else stale_reason(plan, mask_path, config, allow_pickle=allow_pickle)
    if reason is None:
        LOG.info("%s is up to date with %s", mask_path, calibration_path)
        return None
    if is_main_process():
        print(
            f"dam-mergekit: calibrating {mask_path} from {calibration_path}: {reason}",
            file=sys.stderr,
        )
    return calibrate(plan, config, mask_path, allow_pickle=allow_pickle, progress=progress)
