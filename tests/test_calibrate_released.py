"""Mode as_released follows the released algorithm: its step counts and learning rates as the
mode's defaults, the inner sample reused by the mask step, a new optimizer at its own learning
rate for the final stage, and the perturbation on normalised pixels for the clip adapter."""

import pytest
import torch
from _calib_fixtures import FAST, write_clip_zoo, write_recipe

from dam_mergekit.calibrate.config import RELEASED_SETTINGS, CalibrationConfig, default_calibration
from dam_mergekit.calibrate.trainer import Calibrator
from dam_mergekit.errors import DamError
from dam_mergekit.recipe.load import dam_settings, load_recipe
from dam_mergekit.recipe.plan import plan_recipe

RELEASED = {k: v for k, v in RELEASED_SETTINGS.items() if k not in ("steps", "final_steps")}


def _calibrator(tmp_path, settings: dict, options: dict | None = None) -> Calibrator:
    zoo = write_clip_zoo(tmp_path)
    extra = {"adapter_options": options} if options else {}
    config = load_recipe(write_recipe(tmp_path, zoo, {**FAST, **settings, **extra}))
    cal = CalibrationConfig.load(dam_settings(config).calibration)
    return Calibrator(plan_recipe(config), cal, progress=False)


def test_the_modes_defaults_are_the_releases():
    cal = default_calibration("clip", "zoo", mode="as_released")
    assert (cal["steps"], cal["final_steps"]) == (1000, 1000)
    assert (cal["lr_coef"], cal["lr_coef_final"]) == (1.0, 0.001)
    assert cal["adapter_options"] == {"perturb": "normalized"}
    assert (
        "perturb"
        not in default_calibration("causal_lm", "zoo", mode="as_released")["adapter_options"]
    )
    # the new setting, unset, is not recorded: earlier mask files keep their fingerprint
    assert "lr_coef_final" not in default_calibration("clip", "zoo")
    assert "lr_coef_final" not in CalibrationConfig(data="zoo").settings()


def test_lr_coef_final_belongs_to_as_released(tmp_path):
    with pytest.raises(DamError, match="lr_coef_final is a setting of mode as_released"):
        _calibrator(tmp_path, {"lr_coef_final": 0.01})
    with pytest.raises(DamError, match="lr_coef_final must be a number > 0"):
        _calibrator(tmp_path, {**RELEASED, "lr_coef_final": 0})


@pytest.mark.parametrize(("mode", "draws_per_step"), [("as_released", 1), ("dam", 2)])
def test_the_mask_step_reuses_the_inner_sample_as_released(
    tmp_path, monkeypatch, mode, draws_per_step
):
    from dam_mergekit.calibrate.state import LocalState

    settings = {**RELEASED} if mode == "as_released" else {}
    calib = _calibrator(tmp_path, {**settings, "steps": 3, "final_steps": 0})
    draws, mask_samples = [], []
    original_draw, original_gradients = LocalState.draw, LocalState.gradients

    def draw(self, *, grad):
        sample = original_draw(self, grad=grad)
        draws.append(sample)
        return sample

    def gradients(self, masks, *args, **kwargs):
        mask_samples.append(masks)
        return original_gradients(self, masks, *args, **kwargs)

    monkeypatch.setattr(LocalState, "draw", draw)
    monkeypatch.setattr(LocalState, "gradients", gradients)
    calib.run(write=False)
    extraction = 1 if mode == "as_released" else 0  # its stored mask is one more sample
    mask_samples = [m for m in mask_samples if m.grad]  # the coefficient steps' are detached
    assert len(draws) == 3 * draws_per_step + extraction and len(mask_samples) == 3
    inner = draws[: 3 * draws_per_step : draws_per_step]
    reused = [any(m is d for d in inner) for m in mask_samples]
    assert all(reused) is (mode == "as_released")


def test_the_final_stage_starts_a_new_optimizer_at_its_own_rate(tmp_path):
    calib = _calibrator(tmp_path, {**RELEASED, "steps": 2, "final_steps": 2})
    result = calib.run(write=False)
    optimizer = calib.optimizers["c"]
    assert optimizer.param_groups[0]["lr"] == RELEASED["lr_coef_final"]
    assert int(optimizer.state[calib.coef]["step"]) == 2  # only the final stage's steps
    coefficients = [v for r in result.history for k, v in r.items() if k.startswith("coef_")]
    assert min(coefficients) >= 0.0


def test_clip_perturbation_on_normalised_pixels(tmp_path):
    from dam_mergekit.scoring.clip import normalize_pixels, normalized_clip_logits

    calib = _calibrator(tmp_path, {}, {"perturb": "normalized"})
    calib._setup()
    adapter = calib.adapter
    model = adapter.load_model(calib.base_dir)  # the state's model holds no weights of its own
    task = calib.tasks[0]
    x = adapter.sample(task, 4, torch.Generator().manual_seed(0))
    space = adapter.perturbation_space(task)
    assert space.low is None and space.high is None  # unclamped
    delta = torch.full(space.shape, 3.0)  # far outside what [0, 1] pixels allow
    got = adapter.logits(model, None, task, x, delta)
    pixels = normalize_pixels(x, adapter.normalize) + delta
    want = normalized_clip_logits(model, adapter.heads[task], pixels)
    assert torch.allclose(got, want)
    in_pixel_space = _calibrator(tmp_path / "p", {}).adapter
    clamped = in_pixel_space.logits(model, None, task, x, delta)
    assert not torch.allclose(got, clamped)
    assert torch.allclose(
        adapter.logits(model, None, task, x), in_pixel_space.logits(model, None, task, x)
    )


def test_an_unknown_perturbation_space_is_refused(tmp_path):
    with pytest.raises(DamError, match="adapter option perturb must be one of pixels, normalized"):
        _calibrator(tmp_path, {}, {"perturb": "logits"})
