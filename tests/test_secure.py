"""``dam-mergekit secure`` on the recipe shapes mergekit documents for task-arithmetic methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dam_mergekit.cli import main
from dam_mergekit.errors import DamError
from dam_mergekit.recipe.load import load_recipe
from dam_mergekit.secure import CALIBRATION_KEYS, calibration_path_for, secure_recipe

# mergekit README's ties example: per-model density/weight, gradients, a filter list, globals.
README_TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

TASK_ARITHMETIC = """
merge_method: task_arithmetic
base_model: base
models:
  - model: base
  - model: expert_a
    parameters: {weight: 0.7}
  - model: expert_b
    parameters:
      weight: [{filter: self_attn, value: [0.2, 0.8]}, {value: 0.5}]
parameters:
  lambda: 0.8
dtype: float32
out_dtype: bfloat16
"""

# Global per-input parameters (no per-model blocks), as in mergekit's DARE examples.
DARE_TIES = """
merge_method: dare_ties
base_model: base
models:
  - model: expert_a
  - model: expert_b
parameters:
  density: 0.53
  weight: 0.4
  int8_mask: true
  rescale: true
dtype: bfloat16
"""


def secure(text: str, calibration: str = "dam.calibration.yml"):
    return secure_recipe(yaml.safe_load(text), calibration, source="in.yml")


def test_readme_ties_keeps_weights_drops_density_and_says_so():
    out = secure(README_TIES)
    src = yaml.safe_load(README_TIES)
    recipe = out.recipe
    assert recipe["merge_method"] == "dam"
    assert recipe["base_model"] == src["base_model"]
    assert recipe["dtype"] == "float16"
    assert recipe["parameters"] == {"calibration": "dam.calibration.yml"}
    assert [m["parameters"] for m in recipe["models"]] == [
        {"weight": m["parameters"]["weight"]} for m in src["models"]
    ]
    config = load_recipe(recipe)
    assert config.merge_method == "dam"
    dropped = [n for n in out.notes if "density" in n and "dropped" in n]
    assert len(dropped) == 3 and "models[0] (psmathur/orca_mini_v3_13b)" in dropped[0]
    assert any("int8_mask true dropped" in n for n in out.notes)
    assert any(
        n.startswith("parameters: normalize true (set in the recipe) dropped") for n in out.notes
    )
    assert any(n.startswith("ties:") and "sign election" in n for n in out.notes)
    assert all("\n" not in n for n in out.notes)


def test_task_arithmetic_carries_over_without_loss():
    out = secure(TASK_ARITHMETIC)
    src = yaml.safe_load(TASK_ARITHMETIC)
    assert out.notes == []
    assert out.recipe["models"] == src["models"]
    assert out.recipe["parameters"] == {"calibration": "dam.calibration.yml", "lambda": 0.8}
    assert (out.recipe["dtype"], out.recipe["out_dtype"]) == ("float32", "bfloat16")
    load_recipe(out.recipe)


def test_dare_ties_global_parameters():
    out = secure(DARE_TIES)
    assert out.recipe["parameters"] == {"calibration": "dam.calibration.yml", "weight": 0.4}
    assert out.recipe["models"] == [{"model": "expert_a"}, {"model": "expert_b"}]
    assert sorted(n.split(" ")[1] for n in out.notes if n.startswith("parameters:")) == [
        "density",
        "int8_mask",
        "rescale",
    ]
    assert not any("normalize" in n for n in out.notes)  # dare_ties does not normalize
    assert any(n.startswith("dare_ties:") for n in out.notes)
    load_recipe(out.recipe)


def test_ties_default_normalize_is_reported_with_the_weight_sum():
    text = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: [{filter: mlp, value: 0.7}, {value: 1.0}]}
  - model: b
    parameters: {weight: 1.0, density: 0.4}
"""
    out = secure(text)
    normalize = [n for n in out.notes if "normalize" in n]
    assert len(normalize) == 1
    assert "the ties default" in normalize[0] and "by 1.5" in normalize[0]
    assert any(
        'density [{"filter": "mlp", "value": 0.7}, {"value": 1.0}] dropped' in n for n in out.notes
    )
    explicit_off = secure(
        text.replace("base_model: base", "base_model: base\nparameters: {normalize: false}")
    )
    assert not any("normalize" in n for n in explicit_off.notes)
    per_tensor = secure(
        text.replace(
            "base_model: base",
            "base_model: base\nparameters:\n"
            "  normalize: [{filter: mlp, value: false}, {value: true}]",
        )
    )
    assert [n for n in per_tensor.notes if "normalize" in n][0].startswith(
        'parameters: normalize [{"filter": "mlp", "value": false}, {"value": true}] (set in'
    )


def test_tokenizer_source_is_dropped_because_dam_refuses_it():
    out = secure(TASK_ARITHMETIC + "tokenizer_source: base\n")
    assert "tokenizer_source" not in out.recipe
    assert any(n.startswith("tokenizer_source dropped") for n in out.notes)


@pytest.mark.parametrize(
    "text, match",
    [
        (TASK_ARITHMETIC.replace("task_arithmetic", "slerp"), "merge_method is 'slerp'"),
        (TASK_ARITHMETIC.replace("task_arithmetic", "linear"), "merge_method is 'linear'"),
        (TASK_ARITHMETIC.replace("base_model: base\n", ""), "no base_model"),
        (
            """
merge_method: ties
base_model: base
slices:
  - sources:
      - {model: a, layer_range: [0, 2], parameters: {weight: 1.0}}
      - {model: base, layer_range: [0, 2]}
""",
            "`slices` are not supported",
        ),
    ],
)
def test_refusals(text, match):
    with pytest.raises(DamError, match=match):
        secure(text)


def test_cli_writes_both_files_and_reports_one_line_each(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("ties.yml").write_text(README_TIES)
    assert main(["secure", "ties.yml", "out/dam.yml"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("secure: ") for line in err)
    config = load_recipe("out/dam.yml")
    assert config.parameters["calibration"] == "out/dam.calibration.yml"
    skeleton = yaml.safe_load(Path("out/dam.calibration.yml").read_text())
    assert tuple(skeleton) == CALIBRATION_KEYS
    assert skeleton["data"] == ""  # left for the user; calibration refuses to start without it
    assert "# Not carried over:" in Path("out/dam.yml").read_text()
    # refusing to overwrite, then --force
    assert main(["secure", "ties.yml", "out/dam.yml"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["secure", "ties.yml", "out/dam.yml", "--force"]) == 0


def test_cli_refusal_writes_nothing(tmp_path, capsys):
    src = tmp_path / "slerp.yml"
    src.write_text(TASK_ARITHMETIC.replace("task_arithmetic", "slerp"))
    assert main(["secure", str(src), str(tmp_path / "dam.yml")]) == 2
    assert "slerp" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slerp.yml"]


def test_adapter_guessed_from_a_local_base(tmp_path):
    for arch, adapter in (
        ("CLIPVisionModelWithProjection", "clip"),
        ("LlamaForCausalLM", "causal_lm"),
    ):
        base = tmp_path / arch
        base.mkdir()
        (base / "config.json").write_text(json.dumps({"architectures": [arch]}))
        out = secure(TASK_ARITHMETIC.replace("base_model: base", f"base_model: {base}"))
        assert yaml.safe_load(out.calibration_text)["adapter"] == adapter
        assert f"adapter: {adapter}\n" in out.calibration_text  # no TODO when known


def test_skeleton_is_a_valid_calibration_file_once_data_is_set(tmp_path):
    config_mod = pytest.importorskip("dam_mergekit.calibrate.config")
    settings = yaml.safe_load(secure(TASK_ARITHMETIC).calibration_text)
    settings["data"] = str(tmp_path)
    config_mod.CalibrationConfig.from_dict(settings, where="skeleton")


def test_calibration_path_for():
    assert calibration_path_for("r/x.yml") == Path("r/x.calibration.yml")
    assert calibration_path_for("x.yaml") == Path("x.calibration.yml")


def test_causal_lm_skeleton_has_the_causal_lm_defaults(tmp_path):
    """The skeleton used to carry CLIP's 150 steps and element masks into an LLM merge."""
    from dam_mergekit.calibrate.config import default_calibration

    base = tmp_path / "llama"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    out = secure(TASK_ARITHMETIC.replace("base_model: base", f"base_model: {base}"))
    skeleton = yaml.safe_load(out.calibration_text)
    expected = default_calibration("causal_lm", "")
    assert skeleton["granularity"] == "row"
    assert {k: skeleton[k] for k in skeleton if k != "data"} == {
        k: expected[k] for k in skeleton if k != "data"
    }
    recipe_file = Path(__file__).parents[1] / "recipes" / "dam-llama-calibration.yml"
    recipe = yaml.safe_load(recipe_file.read_text())
    for key in ("steps", "final_steps", "batch_size", "granularity"):
        assert skeleton[key] == recipe[key], key
