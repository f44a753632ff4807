"""`dam-mergekit masks init | inspect | validate`."""

import json

import torch
from conftest import write_recipe

from dam_mergekit.cli import main
from dam_mergekit.masks import MaskFile, MaskSet, write_mask_file


def test_init_inspect_validate(clip_models, tmp_path, capsys):
    masks = tmp_path / "m.safetensors"
    recipe = write_recipe(tmp_path / "dam.yml", clip_models, parameters={"masks": str(masks)})
    assert main(["masks", "init", str(recipe), "--out", str(masks), "--value", "0"]) == 0
    assert main(["masks", "init", str(recipe), "--out", str(masks)]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    mf = MaskFile(masks)
    assert mf.base.model == str(clip_models["base"]) and len(mf.experts) == 2
    assert all(mf.kept_fraction(n) == 0.0 for n in mf.names)

    # keep the first row of one tensor for expert 1 only, and give expert 0 coefficient 0.5
    name = "encoder.layers.0.mlp.fc1.weight"
    shapes = {n: mf.shape(n) for n in mf.names}
    row = torch.zeros(shapes[name][0], 1)
    row[0] = 1
    write_mask_file(
        masks,
        MaskSet(m2={name: [torch.zeros(1), row]}, coefficients={name: torch.tensor([0.5, 1.0])}),
        base=mf.base,
        experts=mf.experts,
        tensor_shapes=shapes,
    )
    capsys.readouterr()
    assert main(["masks", "inspect", str(masks), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    by_name = {r["tensor"]: r for r in info["tensors"]}
    assert by_name[name]["kept"] == [0.0, 1 / shapes[name][0]]
    assert by_name[name]["coef"] == [0.5, 1.0]
    assert info["m1_kept"] == 1.0
    assert main(["masks", "inspect", str(masks)]) == 0
    table = capsys.readouterr().out
    assert "M1 keeps 100.0%" in table and name in table

    assert main(["masks", "validate", str(masks), "--recipe", str(recipe)]) == 0
    assert capsys.readouterr().out.startswith(f"ok {masks}")
    other = tmp_path / "other.safetensors"
    assert main(["masks", "validate", str(other), "--recipe", str(recipe)]) == 2
    assert "does not use" in capsys.readouterr().err


def test_validate_catches_a_mask_file_for_other_models(clip_models, llama_models, tmp_path, capsys):
    masks = tmp_path / "m.safetensors"
    clip = write_recipe(tmp_path / "clip.yml", clip_models, parameters={"masks": str(masks)})
    llama = write_recipe(tmp_path / "llama.yml", llama_models, parameters={"masks": str(masks)})
    assert main(["masks", "init", str(clip), "--out", str(masks)]) == 0
    assert main(["masks", "validate", str(masks), "--recipe", str(llama)]) == 2
    assert "fingerprint mismatch" in capsys.readouterr().err


def test_experts_follow_the_recipe_order(llama_models, tmp_path):
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    for order in (("a", "b"), ("b", "a")):
        models = {
            "base": llama_models["base"],
            "a": llama_models[order[0]],
            "b": llama_models[order[1]],
        }
        recipe = write_recipe(tmp_path / "r.yml", models, parameters={"masks": "m.safetensors"})
        plan = plan_recipe(load_recipe(recipe))
        assert [str(e) for e in plan.experts] == [str(llama_models[k]) for k in order]


def test_validate_a_recipe_that_names_a_calibration_file(clip_models, tmp_path, capsys):
    calibration = tmp_path / "calib.yml"
    recipe = write_recipe(
        tmp_path / "dam.yml", clip_models, parameters={"calibration": str(calibration)}
    )
    derived = tmp_path / "calib.masks.safetensors"
    assert main(["masks", "init", str(recipe), "--out", str(derived)]) == 0
    capsys.readouterr()
    assert main(["masks", "validate", str(derived), "--recipe", str(recipe)]) == 0
    assert capsys.readouterr().out.startswith(f"ok {derived}")


def test_unreadable_recipes_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: dam\nmodels: [\n")
    for recipe, message in ((bad, "not valid YAML"), (tmp_path / "none.yml", "recipe not found")):
        assert main(["masks", "init", str(recipe), "--out", str(tmp_path / "m.safetensors")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
