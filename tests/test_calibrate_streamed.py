"""``memory: streamed`` and ``memory: offload``: merged weights formed inside the forward.

They must learn what ``memory: whole`` learns (the same masks; coefficients up to float
summation order), keep no merged weight of a block beyond its forward, and be refused where they
cannot run.
"""

from __future__ import annotations

import re

import pytest
import torch
from _calib_fixtures import FAST, write_clip_zoo, write_llm_zoo, write_recipe

from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.calibrate.streamed import StreamedState, block_of
from dam_mergekit.calibrate.trainer import Calibrator
from dam_mergekit.errors import DamError
from dam_mergekit.merge import merge_deltas
from dam_mergekit.recipe.load import dam_settings, load_recipe
from dam_mergekit.recipe.plan import plan_recipe


def _calibrator(tmp_path, zoo, settings, name):
    recipe = write_recipe(tmp_path, zoo, settings, name=name)
    config = load_recipe(recipe)
    cal = CalibrationConfig.load(dam_settings(config).calibration)
    return Calibrator(plan_recipe(config), cal, progress=False)


def _run_all(tmp_path, zoo, settings, layouts):
    return {
        m: _calibrator(tmp_path, zoo, {**settings, "memory": m}, m).run(write=False)
        for m in layouts
    }


# A key bias shifts every attention logit of a query by the same amount, so softmax cancels it
# and its gradient is zero up to rounding; Adam scales that rounding noise to a full step, so its
# coefficient depends on summation order and is left out of the comparison.
UNDETERMINED = re.compile(r"k_proj\.bias$")


def _agree(a, b) -> float:
    """Largest coefficient difference (relative above 1); asserts equal masks and settings."""
    assert a.settings == b.settings  # the layout is not recorded: same fingerprint
    worst = 0.0
    for name in a.masks.m1:
        assert torch.equal(a.masks.m1[name], b.masks.m1[name]), name
        for x, y in zip(a.masks.m2[name], b.masks.m2[name], strict=True):
            assert torch.equal(x, y), name
        if UNDETERMINED.search(name):
            continue
        x, y = a.masks.coefficients[name], b.masks.coefficients[name]
        worst = max(worst, float(((x - y).abs() / x.abs().clamp_min(1.0)).max()))
    return worst


def test_streamed_and_offload_learn_the_whole_masks(tmp_path):
    zoo = write_clip_zoo(tmp_path)
    settings = dict(FAST, steps=4, final_steps=2, init_logit=0.3, alpha=3.0)
    runs = _run_all(tmp_path, zoo, settings, ("whole", "streamed", "offload"))
    whole = runs["whole"]
    kept = [float(m.float().mean()) for m in whole.masks.m1.values()]
    assert min(kept) < 1.0  # masks dropped entries, so equal masks mean something
    for layout in ("streamed", "offload"):
        assert _agree(whole, runs[layout]) < 1e-4, layout
        for name, tensor in whole.merged.items():
            if UNDETERMINED.search(name):
                continue
            assert torch.allclose(tensor, runs[layout].merged[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_causal_lm_row_masks(tmp_path, tied):
    """Row masks, the safety term, distillation; a tied embedding is formed once, as what the
    head is tied to."""
    zoo = write_llm_zoo(tmp_path, config={"tie_word_embeddings": tied})
    settings = dict(FAST, steps=3, granularity="row", init_logit=0.2, alpha=1.0, batch_size=3)
    runs = _run_all(tmp_path, zoo, settings, ("whole", "streamed"))
    assert _agree(runs["whole"], runs["streamed"]) < 1e-4


def test_a_block_keeps_no_merged_weight_beyond_its_forward(tmp_path):
    """A task's forward under the streamed state saves, outside the checkpointed blocks, none of
    the merged weights a block formed; the blocks form them again in the backward."""
    zoo = write_clip_zoo(tmp_path)
    calib = _calibrator(tmp_path, zoo, dict(FAST, memory="streamed"), "streamed")
    calib._setup()
    state = calib.state
    assert isinstance(state, StreamedState)
    in_block = {n for n in calib.names if block_of(state.pnames[n]) is not None}
    assert in_block and len(in_block) < len(calib.names)  # blocks, and tensors outside them
    formed: dict[str, int] = {}
    block_tensors: list[torch.Tensor] = []  # held, so that no later tensor reuses their memory
    original = state.form

    def counting(name):
        out = original(name)
        if state.binding.expert is not None:  # the teacher's forward: no graph, no recompute
            return out
        formed[name] = formed.get(name, 0) + 1
        if name in in_block:
            block_tensors.append(out)
        return out

    state.form = counting
    saved: list[int] = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    masks = state.draw(grad=True)
    task = calib.tasks[0]
    x = calib.batches()[task]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        params = state.merged_params(masks, calib.coef)  # values only: a perturbation's forward
        grad_params = type(params)(state, type(params.binding)(masks, calib.coef))
        perf, _ = calib.task_losses(grad_params, task, x, perturbed=False)
    block_storage = {t.untyped_storage().data_ptr() for t in block_tensors}
    assert saved and block_storage and not block_storage & set(saved)
    forward_counts = dict(formed)
    perf.backward()
    for name in in_block:  # formed in the forward, then again in the block's recompute
        assert formed[name] == 2 * forward_counts[name], name
    assert all(s.grad is not None for s in state.m1_logits.values())
    assert calib.coef.grad is not None and state.binding is None
    for name in calib.names:  # the model holds no copy of a merged weight
        module, _, attr = state.pnames[name].rpartition(".")
        stored = state.model.get_submodule(module).parametrizations[attr].original
        assert stored.numel() == 0


def test_unknown_memory_layout_and_sharding_are_refused(tmp_path):
    from dam_mergekit.calibrate.sharded import check_shardable

    zoo = write_clip_zoo(tmp_path)
    with pytest.raises(DamError, match="memory must be one of whole, streamed, offload"):
        _calibrator(tmp_path, zoo, dict(FAST, memory="disk"), "bad")
    cal = _calibrator(tmp_path, zoo, dict(FAST, memory="offload"), "offload").cfg
    with pytest.raises(DamError, match="memory: offload .* sharded state"):
        check_shardable(cal)


@pytest.mark.parametrize("mask_shape", [(6, 5), (6, 1), (1, 1)])
def test_lean_merge_has_the_same_values_and_gradients(mask_shape):
    torch.manual_seed(0)
    base, deltas = torch.randn(6, 5), torch.randn(3, 6, 5).to(torch.bfloat16)
    s1 = torch.randn(mask_shape, requires_grad=True)
    s2 = torch.randn(3, *mask_shape, requires_grad=True)
    coef = torch.rand(3, requires_grad=True)
    grad = torch.randn(6, 5)
    results = []
    for lean in (False, True):
        merged = merge_deltas(
            base,
            deltas,
            [1.0, 0.5, 2.0],
            lam=0.7,
            m1=torch.sigmoid(s1),
            m2=list(torch.sigmoid(s2).unbind(0)),
            coefficients=coef,
            lean=lean,
        )
        results.append((merged, *torch.autograd.grad(merged, (s1, s2, coef), grad)))
    assert torch.equal(results[0][0], results[1][0])  # the kernel's values, bit for bit
    for plain, lean in zip(results[0][1:], results[1][1:], strict=True):
        assert torch.allclose(plain, lean, atol=1e-6, rtol=1e-5)
