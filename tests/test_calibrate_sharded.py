"""Calibration under torchrun (a CPU process group of 2) against the one-process run.

FSDP-sharded state (``DAM_CALIBRATION_PARALLEL=state``): with ``alpha: 0`` both compute every
gradient in the same order, so the mask files must be equal. With the safety term the sharded
state sums M2's two gradient terms in one backward (the one-process trainer in two), which moves
the coefficients by float rounding only.

Data-parallel (the default): each process runs half of every batch and the gradients are summed,
so only the order of floating-point sums differs from one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _calib_fixtures import FAST, write_clip_zoo, write_llm_zoo, write_recipe

from dam_mergekit.calibrate.hook import ensure_masks
from dam_mergekit.masks import MaskFile
from dam_mergekit.recipe.load import dam_settings, load_recipe, mask_path_for
from dam_mergekit.recipe.plan import plan_recipe

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("_sharded_worker.py")


def _one_process(recipe: Path) -> Path:
    """Calibrate in this process, on one thread like each torchrun process (sums depend on it)."""
    config = load_recipe(recipe)
    settings = dam_settings(config)
    path = mask_path_for(settings.masks, settings.calibration)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert ensure_masks(plan_recipe(config), path, settings.calibration, progress=False)
    finally:
        torch.set_num_threads(threads)
    return Path(path)


def _sharded(
    recipe: Path, *extra: str, check: bool = True, parallel: str = "state"
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DAM_CALIBRATION_PARALLEL=parallel)
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--standalone", str(WORKER), str(recipe), *extra]
    proc = subprocess.run(
        cmd, env=env, cwd=recipe.parent, capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# The output does not depend on an attention key bias (softmax is invariant to adding the same
# q . b to every key), so its gradient is rounding noise, which Adam turns into lr-sized steps:
# its coefficients are free under any change of summation order and are not compared.
KEY_BIAS = "self_attn.k_proj.bias"


def _compare(a: Path, b: Path, *, skip_key_bias: bool = False) -> tuple[float, int, float]:
    """(largest coefficient difference, relative where above 1; differing mask entries; smallest
    kept fraction)."""
    one, two = MaskFile(a), MaskFile(b)
    assert one.names == two.names and one.settings == two.settings
    worst, differ, kept = 0.0, 0, 1.0
    for name in one.names:
        if not (skip_key_bias and name.endswith(KEY_BIAS)):
            a, b = one.coefficients(name), two.coefficients(name)
            # relative above 1: a tensor whose masks dropped everything carries its coefficient
            # times the rescaling's 1 / eps, where float32 keeps ~7 digits
            diff = ((a - b).abs() / a.abs().clamp_min(1.0)).max()
            worst = max(worst, float(diff))
        pairs = [(one.m1(name), two.m1(name))]
        pairs += [(one.m2(name, i), two.m2(name, i)) for i in range(len(one.experts))]
        for x, y in pairs:
            assert (x is None) == (y is None), name
            if x is not None:
                differ += int((x != y).sum())
        kept = min(kept, one.kept_fraction(name))
    return worst, differ, kept


def _pair(tmp_path: Path, zoo: Path, settings: dict) -> tuple[Path, Path]:
    one = write_recipe(tmp_path, zoo, settings, name="one")
    two = write_recipe(tmp_path, zoo, settings, name="two")
    return one, two


def _both(
    tmp_path: Path, zoo: Path, settings: dict, parallel: str = "state"
) -> tuple[float, int, float]:
    """Calibrate one recipe in this process and its twin under torchrun; compare the mask files."""
    one, two = _pair(tmp_path, zoo, settings)
    expected = _one_process(one)
    _sharded(two, parallel=parallel)
    return _compare(
        expected, tmp_path / "two-calibration.masks.safetensors", skip_key_bias=parallel == "data"
    )


def test_sharded_equals_one_process_without_safety_term(tmp_path):
    zoo = write_clip_zoo(tmp_path)
    worst, differ, kept = _both(tmp_path, zoo, dict(FAST, steps=6, init_logit=0.3, alpha=0.0))
    assert kept < 1.0  # the masks did drop something, so equal masks mean something
    assert differ == 0 and worst == 0.0
    assert not list(tmp_path.glob("*.ckpt.safetensors*"))  # each process removed its checkpoint


def test_sharded_matches_one_process_with_safety_term(tmp_path):
    zoo = write_clip_zoo(tmp_path)
    worst, differ, kept = _both(tmp_path, zoo, dict(FAST, steps=6, init_logit=0.3, alpha=3.0))
    assert kept < 1.0
    assert differ == 0 and worst < 2e-2


def test_sharded_causal_lm_row_masks(tmp_path):
    zoo = write_llm_zoo(tmp_path)
    settings = dict(FAST, steps=4, granularity="row", init_logit=0.2, alpha=0.0)
    worst, differ, _ = _both(tmp_path, zoo, settings)
    assert differ == 0 and worst == 0.0


def test_sharded_run_resumes_from_its_shard_checkpoints(tmp_path):
    zoo = write_clip_zoo(tmp_path)
    settings = dict(FAST, steps=6, init_logit=0.3, alpha=0.0, checkpoint_every=2)
    one, two = _pair(tmp_path, zoo, settings)
    expected = _one_process(one)
    crashed = _sharded(two, "4", check=False)
    assert crashed.returncode != 0
    shards = sorted(p.name for p in tmp_path.glob("two-calibration.masks.safetensors.ckpt*"))
    assert shards == [
        "two-calibration.masks.safetensors.ckpt.safetensors.rank0-of-2",
        "two-calibration.masks.safetensors.ckpt.safetensors.rank1-of-2",
    ]
    assert not (tmp_path / "two-calibration.masks.safetensors").exists()
    resumed = _sharded(two)
    assert "resuming from" in resumed.stderr and "at step 4" in resumed.stderr
    worst, differ, _ = _compare(expected, tmp_path / "two-calibration.masks.safetensors")
    assert differ == 0 and worst == 0.0


@pytest.mark.parametrize("perf_loss", ["distill", "infomax"])
def test_data_parallel_matches_one_process(tmp_path, perf_loss):
    """The default settings (targeted trigger search, a batch statistic) and infomax (another):
    the losses see the whole batch in every process, so only summation order differs (measured:
    coefficients within 7e-6, masks equal)."""
    zoo = write_clip_zoo(tmp_path)
    settings = dict(FAST, steps=6, init_logit=0.3, alpha=3.0, perf_loss=perf_loss)
    worst, differ, kept = _both(tmp_path, zoo, settings, parallel="data")
    assert kept < 1.0
    assert differ == 0 and worst < 1e-4
    assert not list(tmp_path.glob("*.ckpt.safetensors*"))


def test_data_parallel_causal_lm_splits_prompts_in_every_answer_block(tmp_path):
    zoo = write_llm_zoo(tmp_path)
    settings = dict(FAST, steps=4, granularity="row", init_logit=0.2, alpha=1.0, batch_size=3)
    worst, differ, _ = _both(tmp_path, zoo, settings, parallel="data")
    assert differ == 0 and worst < 1e-4


def test_an_unknown_parallel_mode_is_refused(tmp_path):
    zoo = write_clip_zoo(tmp_path)
    _, two = _pair(tmp_path, zoo, dict(FAST))
    proc = _sharded(two, check=False, parallel="pipeline")
    assert proc.returncode != 0
    assert "DAM_CALIBRATION_PARALLEL='pipeline'" in proc.stderr + proc.stdout


def test_sharded_memory_estimate_falls_with_processes():
    from dam_mergekit.calibrate.estimate import peak_memory_bytes

    shapes = [(512, 512)] * 24 + [(512,)] * 24
    kwargs = dict(experts=4, granularity="element", dual=True, activation_bytes=0, tasks=4)
    one = peak_memory_bytes(shapes, **kwargs)
    two = peak_memory_bytes(shapes, world_size=2, **kwargs)
    eight = peak_memory_bytes(shapes, world_size=8, **kwargs)
    assert one > two > eight
    floor = 2 * sum(torch.Size(s).numel() for s in shapes) * 4  # merged tensors and their grads
    assert eight > floor
