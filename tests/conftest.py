"""Tiny models built offline, once per test session (mergekit-style fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _perturbed_copies(model, root: Path, names: list[str], scale: float = 0.02) -> list[Path]:
    """Save ``model`` as the base and noisy copies of it as experts (like fine-tuned models)."""
    paths = []
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                if not param.is_floating_point():
                    continue
                noise = torch.randn(param.shape, generator=gen) * scale if i else 0.0
                param.copy_(base_state[key] + noise)
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def llama_models(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    root = tmp_path_factory.mktemp("llama")
    base, a, b = _perturbed_copies(LlamaForCausalLM(config), root, ["base", "expert_a", "expert_b"])
    return {"base": base, "a": a, "b": b}


@pytest.fixture(scope="session")
def clip_models(tmp_path_factory) -> dict[str, Path]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    root = tmp_path_factory.mktemp("clip")
    base, a, b = _perturbed_copies(CLIPVisionModel(config), root, ["base", "expert_a", "expert_b"])
    return {"base": base, "a": a, "b": b}


def write_recipe(
    path: Path,
    models: dict[str, Path],
    method: str = "dam",
    parameters: dict | None = None,
    weights=(0.7, 0.4),
    extra: dict | None = None,
) -> Path:
    """A mergekit recipe over base + experts a, b."""
    import yaml

    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["a"]), "parameters": {"weight": weights[0]}},
            {"model": str(models["b"]), "parameters": {"weight": weights[1]}},
        ],
        "dtype": "float32",
    }
    if parameters:
        recipe["parameters"] = parameters
    recipe.update(extra or {})
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
