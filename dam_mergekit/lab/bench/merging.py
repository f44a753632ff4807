"""One merge of the bench: a recipe written to disk, then merged by mergekit through the project's
guarded ``run_merge`` (used by the methods, for a model a method builds on, and by the runner)."""

from __future__ import annotations

import shutil
from pathlib import Path


def merge_recipe(recipe: dict, recipe_path: Path, out: Path, *, kind: str, seed: int) -> None:
    """Write the recipe, then merge it with mergekit (through the project's guarded run_merge)."""
    import torch
    import yaml
    from mergekit.options import MergeOptions

    from dam_mergekit.lab.kinds import zoo_kind
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.run import run_merge

    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    config = load_recipe(recipe_path)
    torch.manual_seed(seed)
    options = MergeOptions(
        copy_tokenizer=zoo_kind(kind).copy_tokenizer,
        random_seed=seed,
        quiet=True,
        write_model_card=False,
    )
    if out.exists():
        shutil.rmtree(out)
    run_merge(config, str(out), options)
