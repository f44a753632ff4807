"""Fingerprints tell models apart and notice edits."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dam_mergekit.errors import DamError
from dam_mergekit.masks.fingerprint import fingerprint_model


def test_fingerprints_distinguish_models_and_are_stable(llama_models, tmp_path):
    fps = {k: fingerprint_model(p) for k, p in llama_models.items()}
    assert len(set(fps.values())) == 3 and all(v.startswith("sha256:") for v in fps.values())
    copy = tmp_path / "copy"
    shutil.copytree(llama_models["a"], copy)
    assert fingerprint_model(copy) == fps["a"]


def test_an_edited_tensor_changes_the_fingerprint(llama_models, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(llama_models["a"], copy)
    before = fingerprint_model(copy)
    state = load_file(copy / "model.safetensors")
    state["model.norm.weight"][3] += 1.0  # a small tensor: hashed whole
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint_model(copy) != before
    assert fingerprint_model(copy, full=True) != fingerprint_model(llama_models["a"], full=True)


def test_refusals(tmp_path):
    with pytest.raises(DamError, match="no such model"):
        fingerprint_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DamError, match="no weight files"):
        fingerprint_model(tmp_path / "empty")
    (tmp_path / "pickle").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "pickle" / "pytorch_model.bin")
    with pytest.raises(DamError, match="only pickle checkpoints"):
        fingerprint_model(tmp_path / "pickle")
    assert fingerprint_model(tmp_path / "pickle", allow_pickle=True).startswith("sha256:")
