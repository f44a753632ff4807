"""zoo.json round trip and one-line refusals of broken manifests."""

import json

import pytest

from dam_mergekit.errors import DamError
from dam_mergekit.lab.zoo.manifest import load_manifest, options_hash, write_manifest


def _manifest():
    return {
        "format": "dam-mergekit-zoo",
        "version": 1,
        "kind": "clip",
        "options": {"seed": 0, "attack": "badnets"},
        "base": "base",
        "tasks": [
            {
                "name": "digits",
                "classes": ["0", "1"],
                "target_class": 0,
                "expert": "experts/digits",
                "control": "controls/digits",
                "backdoored": True,
                "attack": {"name": "badnets", "mode": "merge-aware"},
                "head": "heads/digits.safetensors",
                "data": "data/digits.safetensors",
            }
        ],
        "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "image_size": 32,
        "created_by": "test",
    }


def test_round_trip(tmp_path):
    write_manifest(tmp_path, _manifest())
    assert load_manifest(tmp_path) == _manifest()
    assert not list(tmp_path.glob("*.tmp"))


def test_refuses_missing_control(tmp_path):
    bad = _manifest()
    bad["tasks"][0]["control"] = None
    (tmp_path / "zoo.json").write_text(json.dumps(bad))
    with pytest.raises(DamError, match="no clean control"):
        load_manifest(tmp_path)


def test_refuses_missing_file_and_wrong_format(tmp_path):
    with pytest.raises(DamError, match="no zoo manifest"):
        load_manifest(tmp_path)
    (tmp_path / "zoo.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DamError, match="not a dam-mergekit-zoo"):
        load_manifest(tmp_path)


def test_options_hash_depends_on_options():
    assert options_hash({"seed": 0}) == options_hash({"seed": 0})
    assert options_hash({"seed": 0}) != options_hash({"seed": 1})
