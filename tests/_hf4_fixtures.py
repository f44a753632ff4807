"""Checkpoints in the transformers-4 layout, built offline (the FusionBench hub experts' layout)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def rewrite_as_hf4(out: Path) -> Path:
    """Rename a saved CLIP vision model's tensors as transformers 4 did: ``vision_model.*`` (the
    projection keeps its own name), plus the ``position_ids`` buffer and an old version tag."""
    state = load_file(str(out / "model.safetensors"))
    old = {
        k if k.startswith(("vision_model.", "visual_projection")) else f"vision_model.{k}": v
        for k, v in state.items()
    }
    old["vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)
    save_file(old, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["transformers_version"] = "4.40.0"
    (out / "config.json").write_text(json.dumps(config))
    return out
