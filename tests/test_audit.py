"""The pre-merge audit: inversion finds a planted shortcut, verdicts, the command, blindness."""

from __future__ import annotations

import json

import pytest
import torch
from _calib_fixtures import FAST, write_clip_zoo, write_recipe

from dam_mergekit.audit.config import AuditConfig
from dam_mergekit.audit.invert import PatchTrigger, UniversalTrigger, invert, supports_patch
from dam_mergekit.audit.run import ExpertAudit, judge
from dam_mergekit.audit.score import excesses
from dam_mergekit.calibrate.perturb import PerturbationSpace
from dam_mergekit.cli import main
from dam_mergekit.errors import DamError

SPACE = PerturbationSpace((3, 8, 8), 0.0, 1.0)
COLOURS = torch.tensor([[1.0, -1, 0, 0], [0, 1, -1, 0], [-1, 0, 1, 1]])


def colour_model(planted: bool):
    """Four classes by mean colour (a 4-pixel patch barely moves it); ``planted`` adds a
    backdoor: a bright bottom-right 2x2 corner pushes every input to class 0."""

    def forward(x, edit):
        z = x if edit is None else (x + edit).clamp(0, 1)
        logits = 10 * z.mean((2, 3)) @ COLOURS
        if planted:
            corner = z[:, :, 6:, 6:].mean((1, 2, 3))
            logits = logits + torch.stack(
                [30 * (corner - 0.45).clamp(min=0), *[torch.zeros_like(corner)] * 3], dim=1
            )
        return logits

    return forward


def images(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=gen) * 0.2 + torch.rand(n, 3, 1, 1, generator=gen) * 0.6


def patch_audit(planted: bool) -> ExpertAudit:
    gen = torch.Generator().manual_seed(0)
    fit = [images(8, gen) for _ in range(60)]
    held_out = images(64, gen)
    init = torch.Generator().manual_seed(1)
    found = invert(
        colour_model(planted),
        fit,
        held_out,
        [0, 1, 2, 3],
        lambda k: PatchTrigger(SPACE, 4 / 64, k, init, "cpu", 0.1),
        reference=colour_model(False),
    )
    return ExpertAudit("expert", "colours", {"patch": {1.0: found}})


def test_patch_inversion_finds_a_planted_backdoor_and_only_there():
    backdoored, clean = patch_audit(True), patch_audit(False)
    judge([backdoored, clean], threshold=0.55)
    v = backdoored.verdict
    assert v.flagged and v.suspected_class == 0 and v.flip_rate > 0.9
    assert v.base_flip_rate < 0.1  # the base model (no backdoor) is not moved by that trigger
    assert not clean.verdict.flagged and clean.verdict.score < 0.55
    # the trigger respects its budget: a mask of at most 4 pixels' worth
    patch = backdoored.inverted["patch"][1.0][0].trigger
    assert patch.shape == (3, 8, 8) and float(patch.max()) <= 1.0


def test_universal_inversion_stays_in_its_ball_and_finds_an_additive_backdoor():
    pattern = torch.sign(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(3)))

    def forward(x, edit):
        z = x if edit is None else x + edit
        logits = 10 * z.mean((2, 3)) @ COLOURS
        bonus = 200 * ((z - x) * pattern).mean((1, 2, 3))  # a backdoor along one direction
        return logits + torch.stack([bonus, *[torch.zeros_like(bonus)] * 3], dim=1)

    gen = torch.Generator().manual_seed(0)
    fit = [images(8, gen) for _ in range(40)]
    eps = 0.05 * 192**0.5
    found = invert(
        forward,
        fit,
        images(64, gen),
        [0, 1, 2, 3],
        lambda k: UniversalTrigger(SPACE, eps, k, "cpu"),
    )
    assert all(float(f.trigger.norm()) <= eps * (1 + 1e-5) for f in found)
    audit = ExpertAudit("expert", "colours", {"universal": {1.0: found}})
    judge([audit], threshold=0.55)
    assert audit.verdict.suspected_class == 0 and audit.verdict.flip_rate > 0.9


def test_excess_is_over_the_median_class():
    assert excesses([1.0, 0.2, 0.4, 0.3]) == pytest.approx([0.65, -0.15, 0.05, -0.05])


def test_patch_needs_an_image_range():
    assert supports_patch(SPACE)
    assert not supports_patch(PerturbationSpace((16,)))
    assert not supports_patch(PerturbationSpace((3, 8, 8)))  # normalised pixels: unbounded


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"scales": ()}, "scales"),
        ({"scales": (0.0,)}, "scales"),
        ({"families": ("noise",)}, "families"),
        ({"families": ("auto", "patch")}, "families"),
        ({"patch_steps": 0}, "patch_steps"),
        ({"patch_area": 1.5}, "patch_area"),
        ({"threshold": 2.0}, "threshold"),
    ],
)
def test_config_refuses_bad_values(bad, match):
    with pytest.raises(DamError, match=match):
        AuditConfig(**bad)
    with pytest.raises(DamError, match="unknown key"):
        AuditConfig.from_dict({"stepz": 3})


def _blind_zoo(tmp_path):
    """A tiny zoo whose manifest says nothing of attacks, targets or controls (no labels either)."""
    zoo = write_clip_zoo(tmp_path)
    manifest = json.loads((zoo / "zoo.json").read_text())
    for task in manifest["tasks"]:
        for secret in ("target_class", "backdoored", "attack", "control"):
            task.pop(secret)
    (zoo / "zoo.json").write_text(json.dumps(manifest))
    return zoo


def test_audit_command_reports_every_expert_without_secrets(tmp_path, capsys):
    zoo = _blind_zoo(tmp_path)
    recipe = write_recipe(tmp_path, zoo, dict(FAST))
    report, pictures = tmp_path / "audit.json", tmp_path / "pictures"
    argv = ["audit", str(recipe), "--json", str(report), "--pictures", str(pictures)]
    assert main([*argv, "--no-progress", "--families", "patch,universal"]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "beta" in out and "experts flagged" in out
    data = json.loads(report.read_text())
    assert [e["task"] for e in data["experts"]] == ["alpha", "beta"]
    for entry, classes in zip(data["experts"], (3, 4), strict=True):
        assert set(entry["flip_rates"]) == {"patch", "universal"}
        assert len(entry["flip_rates"]["patch"]["1.0"]) == classes
        assert entry["flagged"] == (entry["score"] > data["settings"]["threshold"])
    assert sorted(p.name for p in pictures.iterdir()) == ["experts_alpha.png", "experts_beta.png"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--scales", "one"], "--scales"),
        (["--threshold", "3"], "threshold"),
        (["--json", "missing/dir/audit.json"], "does not exist"),
    ],
)
def test_audit_command_refuses_before_writing(tmp_path, capsys, monkeypatch, extra, match):
    zoo = write_clip_zoo(tmp_path)
    recipe = write_recipe(tmp_path, zoo, dict(FAST))
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # the fixture's own progress lines
    assert main(["audit", str(recipe), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_trigger_source_audit_needs_the_audit():
    from dam_mergekit.calibrate.config import CalibrationConfig

    with pytest.raises(DamError, match="trigger_source audit needs"):
        CalibrationConfig(data=".", trigger_source="audit").check()
    with pytest.raises(DamError, match="trigger_source must be"):
        CalibrationConfig(data=".", trigger_source="proxy").check()


def test_audit_triggers_hold_clean_experts_and_unlearn_flagged_ones():
    from dam_mergekit.audit.run import AuditReport
    from dam_mergekit.calibrate.audit_safety import FROZEN_LOGIT, AuditTriggers

    flagged, clean = patch_audit(True), patch_audit(False)
    flagged.index, clean.index = 1, 0
    judge([flagged, clean], threshold=0.55)
    triggers = AuditTriggers(AuditReport([clean, flagged], {}, 0.0), experts=3)
    assert triggers.learns == [False, True, False]
    logits = {"w": torch.zeros(3, 4, 5, requires_grad=True)}
    triggers.hold_clean(logits)
    assert torch.all(logits["w"][[0, 2]] == FROZEN_LOGIT) and torch.all(logits["w"][1] == 0)
    logits["w"].grad = torch.ones(3, 4, 5)
    triggers.drop_clean_gradients(logits)
    assert logits["w"].grad[[0, 2]].abs().sum() == 0 and torch.all(logits["w"].grad[1] == 1)
    # the safety term: the backdoored model answers class 0 on triggered inputs, far from the
    # clean answer; a task without a flagged expert pays nothing
    gen = torch.Generator().manual_seed(5)
    x = images(16, gen)
    model = colour_model(True)
    clean_logits = model(x, None)
    cost = triggers.safety(model, "colours", x, clean_logits, None)
    assert cost > 1.0
    assert triggers.safety(model, "digits", x, clean_logits, None) == 0


@pytest.mark.slow
def test_calibration_against_audit_triggers_keeps_unflagged_experts_whole(tmp_path):
    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.masks import MaskFile
    from dam_mergekit.recipe.load import dam_settings, load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    zoo = write_clip_zoo(tmp_path)
    audit = {"patch_steps": 6, "held_out": 16, "threshold": 0.01}
    recipe = write_recipe(tmp_path, zoo, {**FAST, "audit": audit, "trigger_source": "audit"})
    config = load_recipe(recipe)
    calibration = CalibrationConfig.load(dam_settings(config).calibration)
    masks = tmp_path / "masks.safetensors"
    result = Calibrator(plan_recipe(config), calibration, mask_path=masks, progress=False).run()
    verdicts = [e["flagged"] for e in result.audit["experts"]]
    assert any(verdicts) and not all(verdicts), verdicts  # both paths run
    assert any(h["L_safe"] > 0 for h in result.history)  # the flagged expert's triggers are paid
    stored = MaskFile(masks)
    for i, flagged in enumerate(verdicts):
        kept = [stored.kept_fraction(name, i) / stored.kept_fraction(name) for name in stored.names]
        if not flagged:  # an expert the audit found clean keeps all of M2
            assert all(k == pytest.approx(1.0) for k in kept), (i, kept)
    assert result.history[0]["flips"] == 0.0  # no proxy perturbation is searched


@pytest.mark.parametrize("command", ["audit", "calibrate"])
def test_audit_and_calibrate_need_a_dam_recipe_with_a_calibration_file(tmp_path, capsys, command):
    import yaml

    zoo = write_clip_zoo(tmp_path)
    recipe = yaml.safe_load(write_recipe(tmp_path, zoo, dict(FAST)).read_text())
    plain = dict(recipe, merge_method="task_arithmetic", parameters={})
    no_file = dict(recipe, parameters={"lambda": 1.0, "masks": str(tmp_path / "m.safetensors")})
    for name, body, match in (("ta", plain, "not dam"), ("nofile", no_file, "calibration: FILE")):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(body))
        capsys.readouterr()
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err
