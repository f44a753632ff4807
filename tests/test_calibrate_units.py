"""Calibration pieces: Concrete masks, perturbation bounds, refusals before training, determinism
and resuming from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _calib_fixtures import FAST, write_clip_zoo, write_recipe

from dam_mergekit.calibrate import concrete
from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.calibrate.perturb import Perturbations, PerturbationSpace, project
from dam_mergekit.calibrate.trainer import Calibrator
from dam_mergekit.errors import DamError
from dam_mergekit.recipe.load import dam_settings, load_recipe, mask_path_for
from dam_mergekit.recipe.plan import plan_recipe

# -- Concrete masks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("granularity", "shape", "expected"),
    [
        ("element", (4, 3), (4, 3)),
        ("row", (4, 3), (4, 1)),
        ("row", (5,), (5,)),
        ("row", (2, 3, 4), (2, 1, 1)),
        ("tensor", (4, 3), ()),
        ("element", (), ()),
    ],
)
def test_logit_shapes(granularity, shape, expected):
    assert concrete.logit_shape(shape, granularity) == expected
    m2 = concrete.init_logits(shape, granularity, 1.0, experts=3)
    assert m2.shape == (3, *expected)
    torch.broadcast_shapes(expected, shape)  # every mask broadcasts to its tensor


def test_concrete_sample_and_extraction():
    logits = torch.tensor([-4.0, -0.1, 0.0, 0.1, 4.0], requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    sample = concrete.sample(logits, 0.5, gen)
    assert ((sample > 0) & (sample < 1)).all()
    sample.sum().backward()
    assert logits.grad is not None and (logits.grad > 0).all()
    assert concrete.binarize(logits).tolist() == [False, False, True, True, True]


def test_rescale_factors():
    m1 = torch.tensor([1.0, 1.0, 0.0, 0.0])
    m2 = [torch.tensor([1.0, 0.0, 1.0, 1.0]), None]
    r = concrete.rescale_factors(m1, m2, enabled=True)
    torch.testing.assert_close(r, torch.tensor([4.0, 2.0]))
    assert concrete.rescale_factors(m1, m2, enabled=False).tolist() == [1.0, 1.0]
    # a scalar (tensor-granularity) mask is never rescaled: m / mean(m) would cancel it
    assert concrete.rescale_factors(torch.tensor(0.3), [None], enabled=True).tolist() == [1.0]


# -- perturbations ---------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_perturbation_stays_in_its_norm_ball(norm):
    space = PerturbationSpace((3, 4, 4), low=0.0, high=1.0)
    pert = Perturbations({"t": space}, norm=norm, eps=0.1, lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        pert.step("t", torch.randn(3, 4, 4, generator=gen) * 100)
        d = pert.deltas["t"]
        size = d.abs().max() if norm == "linf" else d.norm()
        assert size <= 0.1 + 1e-6
    assert size > 0.09  # it does move to the boundary under large gradients
    x = torch.rand(2, 3, 4, 4)
    out = space.apply(x, torch.full((3, 4, 4), 5.0))
    assert out.min() >= 0 and out.max() <= 1


def test_project_l2():
    d = torch.ones(4) * 3
    project(d, "l2", 1.0)
    assert abs(float(d.norm()) - 1.0) < 1e-6


# -- refusals before training ---------------------------------------------------------------


def _setup(tmp_path, **overrides):
    zoo = write_clip_zoo(tmp_path)
    recipe = write_recipe(tmp_path, zoo, {**FAST, **overrides})
    config = load_recipe(recipe)
    settings = dam_settings(config)
    return zoo, plan_recipe(config), settings.calibration, mask_path_for(None, settings.calibration)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"eps": 0}, "eps must be"),
        ({"eps": -1.0}, "eps must be"),
        ({"adapter": "nonsense"}, "unknown adapter"),
        ({"adapter": "no_such_module_xyz:Adapter"}, "cannot be imported"),
        ({"device": "cuda:3"}, "device"),
        ({"data": "does/not/exist"}, "not found"),
        ({"granularity": "column"}, "granularity"),
        ({"colour": 1}, "unknown setting"),
        ({"memory_budget_gb": 1e-9}, "calibration needs about"),
    ],
)
def test_refusals_before_training(tmp_path, override, message):
    from dam_mergekit.calibrate.hook import ensure_masks

    _, plan, cal, mask = _setup(tmp_path, **override)
    with pytest.raises(DamError, match=message):
        ensure_masks(plan, mask, cal, progress=False)
    assert not (tmp_path / "dam-calibration.masks.safetensors").exists()


def test_yaml_exponent_strings_are_numbers():
    cfg = CalibrationConfig.from_dict({"data": ".", "lr_coef": "1e-3", "eps": "5e-1"})
    assert cfg.lr_coef == 1e-3 and cfg.eps == 0.5
    with pytest.raises(DamError, match="lr_mask must be a number"):
        CalibrationConfig.from_dict({"data": ".", "lr_mask": "fast"})


def test_cuda_refused_when_absent(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: 'cuda' is a valid device here")
    _, _, cal, _ = _setup(tmp_path, device="cuda")
    with pytest.raises(DamError, match="CUDA is not available"):
        CalibrationConfig.load(cal)


def test_empty_calibration_data_refused(tmp_path):
    from safetensors.torch import save_file

    from dam_mergekit.calibrate.hook import ensure_masks

    zoo, plan, cal, mask = _setup(tmp_path)
    save_file(
        {"calib_x": torch.zeros((0, 3, 8, 8), dtype=torch.uint8)},
        str(zoo / "data" / "alpha.safetensors"),
    )
    with pytest.raises(DamError, match="empty"):
        ensure_masks(plan, mask, cal, progress=False)


def test_expert_of_another_architecture_refused(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    zoo = write_clip_zoo(tmp_path)
    other = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        )
    )
    other.save_pretrained(tmp_path / "other")
    recipe = write_recipe(
        tmp_path, zoo, FAST, experts=[str(zoo / "experts" / "alpha"), str(tmp_path / "other")]
    )
    config = load_recipe(recipe)
    cal = CalibrationConfig.load(dam_settings(config).calibration)
    with pytest.raises(DamError, match="architecture|shape"):
        Calibrator(plan_recipe(config), cal, progress=False)


# -- determinism and resume ---------------------------------------------------------------


def _run(plan, cal_path, mask_path=None, **kw):
    cfg = CalibrationConfig.load(cal_path)
    return Calibrator(plan, cfg, mask_path=mask_path, progress=False, **kw).run(
        write=mask_path is not None
    )


def test_deterministic_for_a_seed(tmp_path):
    _, plan, cal, _ = _setup(tmp_path, steps=3, final_steps=1)
    a, b = _run(plan, cal), _run(plan, cal)
    for name in a.merged:
        assert torch.equal(a.merged[name], b.merged[name])
        assert torch.equal(a.masks.coefficients[name], b.masks.coefficients[name])
    data = yaml.safe_load(open(cal))
    data["seed"] = 1
    open(cal, "w").write(yaml.safe_dump(data))
    c = _run(plan, cal)
    assert any(not torch.equal(a.merged[n], c.merged[n]) for n in a.merged)


def test_resume_from_checkpoint(tmp_path, monkeypatch):
    _, plan, cal, mask = _setup(tmp_path, steps=6, final_steps=1, checkpoint_every=2)
    reference = _run(plan, cal)  # uninterrupted, nothing written

    calls = {"n": 0}
    original = Calibrator.mask_step

    def crash_at_five(self, sample=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, sample)

    monkeypatch.setattr(Calibrator, "mask_step", crash_at_five)
    with pytest.raises(KeyboardInterrupt):
        _run(plan, cal, mask)
    monkeypatch.setattr(Calibrator, "mask_step", original)
    ckpt = tmp_path / "dam-calibration.masks.safetensors.ckpt.safetensors"
    assert ckpt.is_file() and not (tmp_path / "dam-calibration.masks.safetensors").exists()
    resumed = _run(plan, cal, mask)
    assert resumed.resumed_from == 4
    assert not ckpt.exists()  # removed once the masks are written
    for name in reference.merged:
        torch.testing.assert_close(resumed.merged[name], reference.merged[name], rtol=0, atol=0)
    # a checkpoint made with other settings is not used
    monkeypatch.setattr(Calibrator, "mask_step", crash_at_five)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        _run(plan, cal, mask)
    monkeypatch.setattr(Calibrator, "mask_step", original)
    data = yaml.safe_load(open(cal))
    data["alpha"] = 0.25
    open(cal, "w").write(yaml.safe_dump(data))
    assert _run(plan, cal, mask).resumed_from == 0


def test_granularity_shapes_in_the_mask_file(tmp_path):
    from dam_mergekit.masks import MaskFile

    for gran in ("row", "tensor"):
        sub = tmp_path / gran
        sub.mkdir()
        _, plan, cal, mask = _setup(sub, granularity=gran, init_logit=-0.5, steps=1, final_steps=0)
        result = _run(plan, cal, mask)
        mf = MaskFile(mask)
        for t in plan.float_tensors:
            want = concrete.logit_shape(t.shape, gran)
            assert tuple(result.masks.m1[t.name].shape) == want
            m1 = mf.m1(t.name)
            assert m1 is None or tuple(m1.shape) == want


def test_infomax_penalises_collapse_that_entropy_rewards():
    from dam_mergekit.calibrate.adapters.base import entropy, infomax

    collapsed = torch.tensor([[9.0, 0.0, 0.0]] * 6)  # every input confidently class 0
    spread = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]] * 2)
    assert torch.isclose(entropy(collapsed), entropy(spread))
    assert infomax(collapsed) > infomax(spread) + 1.0


# -- perf_loss: distill and trigger_search: targeted ------------------------------------------


def test_distill_rewards_the_expert_not_confidence():
    from dam_mergekit.calibrate.adapters.base import distill, entropy

    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    wrong_but_sure = torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0]])
    assert entropy(wrong_but_sure) < entropy(teacher)  # what entropy minimisation chases
    assert distill(teacher, teacher).abs() < 1e-6
    assert distill(wrong_but_sure, teacher) > distill(teacher, teacher) + 1.0


def test_distill_pairs_tasks_with_their_own_experts(tmp_path):
    import shutil

    zoo, plan, cal, _ = _setup(tmp_path, perf_loss="distill", steps=2, final_steps=1)
    calib = Calibrator(plan, CalibrationConfig.load(cal), progress=False)
    experts = [Path(str(e)).name for e in plan.experts]
    assert {t: experts[i] for t, i in calib.teacher_of.items()} == {t: t for t in calib.tasks}
    result = calib.run(write=False)
    assert result.history[0]["L_perf"] >= 0  # a KL, not an entropy

    # experts named otherwise: paired in recipe order when the numbers agree ...
    renamed = []
    for i, name in enumerate(experts):
        shutil.copytree(zoo / "experts" / name, tmp_path / f"model-{i}")
        renamed.append(str(tmp_path / f"model-{i}"))
    recipe = write_recipe(
        tmp_path, zoo, {**FAST, "perf_loss": "distill"}, name="renamed", experts=renamed
    )
    settings = dam_settings(load_recipe(recipe))
    plan2 = plan_recipe(load_recipe(recipe))
    logs = []
    calib = Calibrator(
        plan2, CalibrationConfig.load(settings.calibration), progress=False, log=logs.append
    )
    assert calib.teacher_of == {t: i for i, t in enumerate(calib.tasks)}
    assert any("recipe order" in line for line in logs)
    # ... and refused when they do not
    data = yaml.safe_load(open(settings.calibration))
    data["adapter_options"] = {"tasks": calib.tasks[:1]}
    open(settings.calibration, "w").write(yaml.safe_dump(data))
    with pytest.raises(DamError, match="each task needs its own expert"):
        Calibrator(plan2, CalibrationConfig.load(settings.calibration), progress=False)


def test_distill_with_one_expert_teaches_every_task(tmp_path):
    """One expert (the bench's awm row: the task-arithmetic merge) is every task's teacher."""
    zoo = write_clip_zoo(tmp_path)
    recipe = write_recipe(
        tmp_path, zoo, {**FAST, "perf_loss": "distill"}, experts=[str(zoo / "experts" / "beta")]
    )
    logs = []
    calib = Calibrator(
        plan_recipe(load_recipe(recipe)),
        CalibrationConfig.load(dam_settings(load_recipe(recipe)).calibration),
        progress=False,
        log=logs.append,
    )
    assert calib.teacher_of == {"alpha": 0, "beta": 0}
    assert any("own expert of every task (alpha, beta)" in line for line in logs)
    assert calib.run(write=False).history[0]["L_perf"] >= 0


def test_train_m2_learns_m2_only(tmp_path):
    """``train: m2``: M1 is written all-ones (even from a negative init_logit) and never sampled,
    the coefficients stay at coef_init; only M2 moves."""
    _, plan, cal, _ = _setup(tmp_path, train="m2", init_logit=-0.5, rescale=False)
    calib = Calibrator(plan, CalibrationConfig.load(cal), progress=False)
    result = calib.run(write=False)
    assert all(bool(m.all()) for m in result.masks.m1.values())
    assert all(bool((s == -0.5).all()) for s in calib.state.m1_logits.values())
    assert any(bool((s != -0.5).any()) for s in calib.state.m2_logits.values())
    assert all(torch.equal(c, torch.full((2,), 0.3)) for c in result.masks.coefficients.values())
    assert {h["m1_keep"] for h in result.history} == {1.0}


def test_targeted_trigger_search_pushes_towards_the_favoured_class():
    from types import SimpleNamespace

    from dam_mergekit.calibrate.objectives import DefenseObjective, ReleasedObjective

    objective = DefenseObjective(SimpleNamespace(trigger_search="targeted", perf_loss="distill"))
    adv = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.0], [0.0, 1.5, 0.2]], requires_grad=True)
    pseudo = torch.tensor([0, 1, 1])
    (grad,) = torch.autograd.grad(objective.trigger_objective(adv, pseudo), adv)
    # class 1 is favoured by the batch: ascending the objective raises its logit for every input
    assert (grad[:, 1] > 0).all() and (grad[:, [0, 2]] <= 0).all()
    objective.cfg.trigger_search = "untargeted"  # as published: away from the pseudo-labels
    (grad,) = torch.autograd.grad(objective.trigger_objective(adv, pseudo), adv)
    assert grad[0, 0] < 0 and grad[1, 1] < 0
    # the released algorithm always searches away from the pseudo-labels
    released = ReleasedObjective(SimpleNamespace(trigger_search="targeted"))
    (grad,) = torch.autograd.grad(released.trigger_objective(adv, pseudo), adv)
    assert grad[0, 0] < 0 and grad[1, 1] < 0


@pytest.mark.parametrize(
    ("recipe_file", "adapter"),
    [("recipes/dam-calibration.yml", "clip"), ("recipes/dam-llm-calibration.yml", "causal_lm")],
)
def test_shipped_calibration_files_hold_the_package_defaults(recipe_file, adapter):
    """The bench calibrates with default_calibration; the recipes must describe the same run."""
    from dam_mergekit.calibrate.config import default_calibration

    root = Path(__file__).resolve().parent.parent
    shipped = yaml.safe_load((root / recipe_file).read_text())
    defaults = CalibrationConfig(**default_calibration(adapter, shipped["data"])).settings()
    assert CalibrationConfig(**shipped).settings() == defaults


def test_planned_tensor_order_is_the_same_in_every_process(tmp_path):
    """mergekit plans tensors in set order (it changes with PYTHONHASHSEED); calibration draws its
    masks tensor by tensor, so the plan must sort them, or the same seed gives other masks."""
    import os
    import subprocess
    import sys

    _, plan, _, _ = _setup(tmp_path)
    recipe = tmp_path / "dam.yml"
    code = (
        "import sys; from dam_mergekit.recipe.load import load_recipe; "
        "from dam_mergekit.recipe.plan import plan_recipe; "
        "print(','.join(t.name for t in plan_recipe(load_recipe(sys.argv[1])).float_tensors))"
    )
    orders = set()
    for hash_seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code, str(recipe)], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        orders.add(out.stdout.strip().splitlines()[-1])
    assert orders == {",".join(t.name for t in plan.float_tensors)}


def test_ablations_learn_only_their_part(tmp_path):
    """train: masks keeps every coefficient at coef_init; train: coefficients keeps all-ones masks."""
    _, plan, cal, _ = _setup(tmp_path, steps=3, final_steps=2, init_logit=0.2)
    data = yaml.safe_load(open(cal))

    def run(part):
        open(cal, "w").write(yaml.safe_dump({**data, "train": part}))
        calib = Calibrator(plan, CalibrationConfig.load(cal), progress=False)
        return calib, calib.run(write=False)

    calib, masks_only = run("masks")
    assert torch.all(calib.coef == data.get("coef_init", 0.3))
    assert any(not bool(m.all()) for m in masks_only.masks.m1.values())  # the masks did learn
    calib, coefs_only = run("coefficients")
    assert all(bool(m.all()) for m in coefs_only.masks.m1.values())
    assert all(bool(m.all()) for ms in coefs_only.masks.m2.values() for m in ms)
    assert not torch.all(calib.coef == data.get("coef_init", 0.3))  # the coefficients did learn

    open(cal, "w").write(yaml.safe_dump({**data, "train": "masks", "mode": "as_released"}))
    with pytest.raises(DamError, match="ablation of mode dam"):
        CalibrationConfig.load(cal)


def test_the_state_holds_task_vectors_and_no_model_copy(tmp_path):
    """The one-process state keeps the base, the task vectors in delta_dtype and the logits; the
    model the adapter runs holds none of the merged tensors itself."""
    _, plan, cal, _ = _setup(tmp_path, delta_dtype="bfloat16")
    calib = Calibrator(plan, CalibrationConfig.load(cal), progress=False)
    calib._setup()
    state = calib.state
    for name, tensor_state in state.states.items():
        assert tensor_state.deltas.dtype == torch.bfloat16
        assert tensor_state.deltas.shape == (calib.n, *calib.shapes[name])
        assert tensor_state.base.dtype == torch.float32  # the file's dtype: lossless
        assert state.model.get_parameter(state.pnames[name]).numel() == 0
    # the teacher is base + task vector: the expert up to bfloat16 rounding of its delta
    expert = state.expert_params(0)
    reader = state.readers[1]
    for name in calib.names:
        true = reader(name).float()
        assert torch.allclose(expert[state.pnames[name]], true, atol=2e-3, rtol=0)


def test_bfloat16_task_vectors_learn_the_float32_masks(tmp_path):
    """delta_dtype bfloat16 against float32 on the test zoo (settings that make masks drop
    entries): at most 1 % of mask entries differ, each learned coefficient (the rescaling
    unfolded) is within one Adam step (lr_coef 0.01), and each expert's mean within 1e-3."""
    _, plan, cal, _ = _setup(tmp_path, steps=6, final_steps=2, init_logit=0.3)
    exact = _run(plan, cal)
    data = yaml.safe_load(open(cal))
    data["delta_dtype"] = "bfloat16"
    open(cal, "w").write(yaml.safe_dump(data))
    narrow = _run(plan, cal)
    assert narrow.settings["calibration"]["delta_dtype"] == "bfloat16"
    assert "delta_dtype" not in exact.settings["calibration"]  # old mask files keep their key
    differ = total = 0
    for name in exact.masks.m1:
        learned = []
        for run in (exact, narrow):
            m1, m2 = run.masks.m1[name], run.masks.m2[name]
            learned.append(
                concrete.unfold_rescaling(
                    run.masks.coefficients[name], m1.float(), [m.float() for m in m2], enabled=True
                )
            )
        assert float((learned[0] - learned[1]).abs().max()) <= 0.01, name
        pairs = [(exact.masks.m1[name], narrow.masks.m1[name])]
        pairs += list(zip(exact.masks.m2[name], narrow.masks.m2[name], strict=True))
        for a, b in pairs:
            differ += int((a != b).sum())
            total += a.numel()
    assert 0 < total and differ / total <= 0.01
    last_exact, last_narrow = exact.history[-1], narrow.history[-1]
    for i in range(len(plan.experts)):
        assert abs(last_exact[f"coef_{i}"] - last_narrow[f"coef_{i}"]) <= 1e-3


def test_an_unknown_delta_dtype_is_refused(tmp_path):
    _, plan, cal, mask = _setup(tmp_path, delta_dtype="int8")
    with pytest.raises(DamError, match="delta_dtype must be one of float32, bfloat16"):
        CalibrationConfig.load(cal).check()
