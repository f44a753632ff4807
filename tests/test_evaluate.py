"""Evaluation on a hand-built zoo with fake models whose right answers are known."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dam_mergekit.lab.evaluate import der, summarise
from dam_mergekit.lab.zoo.clip_eval import evaluate_clip
from dam_mergekit.lab.zoo.manifest import write_manifest

N_CLASSES, TARGET = 4, 0


def make_fake_zoo(root):
    """Two tasks (a: backdoored, b: clean); the label is written in pixel (0, 0) of channel 0."""
    y = torch.tensor([0, 1, 2, 3] * 5, dtype=torch.int64)
    x = torch.zeros(len(y), 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 0] = (y * 40).to(torch.uint8)
    tasks = []
    for name, bad in (("a", True), ("b", False)):
        (root / "data").mkdir(exist_ok=True)
        (root / "heads").mkdir(exist_ok=True)
        save_file(
            {
                "train_x": x.clone(),
                "train_y": y.clone(),
                "test_x": x.clone(),
                "test_y": y.clone(),
                "calib_x": x[:4].clone(),
            },
            str(root / "data" / f"{name}.safetensors"),
        )
        save_file(
            {
                "projection": torch.eye(N_CLASSES),
                "classes": torch.eye(N_CLASSES),
                "logit_scale": torch.tensor(1.0),
            },
            str(root / "heads" / f"{name}.safetensors"),
        )
        attack = {"name": "badnets", "mode": "standard", "params": {"size": 3}}
        tasks.append(
            {
                "name": name,
                "classes": list("wxyz"),
                "target_class": TARGET,
                "expert": f"experts/{name}",
                "control": "controls/a" if bad else None,
                "backdoored": bad,
                "attack": attack if bad else None,
                "head": f"heads/{name}.safetensors",
                "data": f"data/{name}.safetensors",
            }
        )
    write_manifest(
        root,
        {
            "format": "dam-mergekit-zoo",
            "version": 1,
            "kind": "clip",
            "options": {},
            "base": "base",
            "tasks": tasks,
            "normalize": {"mean": [0.0] * 3, "std": [1.0] * 3},
            "image_size": 32,
            "attack": {"name": "badnets", "mode": "standard", "params": {"size": 3}},
        },
    )
    return y


class FakeVision(nn.Module):
    """Reads the label from pixel (0, 0); ``backdoor``: predicts the target when the 3x3 patch is
    set (``even_only``: only for even labels); ``constant``: always that class."""

    def __init__(self, *, constant=None, backdoor=False, even_only=False):
        super().__init__()
        self.constant, self.backdoor, self.even_only = constant, backdoor, even_only

    def forward(self, pixel_values):
        label = torch.round(pixel_values[:, 0, 0, 0] * 255 / 40).long()
        pred = label.clone()
        if self.backdoor:
            patch = (pixel_values[:, :, -3:, -3:] == 1.0).flatten(1).all(dim=1)
            hit = patch & (label % 2 == 0) if self.even_only else patch
            pred[hit] = TARGET
        if self.constant is not None:
            pred[:] = self.constant
        return SimpleNamespace(pooler_output=nn.functional.one_hot(pred, N_CLASSES).float())


def test_clean_reader_has_full_acc_and_no_asr(tmp_path):
    make_fake_zoo(tmp_path)
    r = evaluate_clip(FakeVision(), tmp_path)
    assert r["acc"] == {"a": 100.0, "b": 100.0}
    assert r["asr"] == {"a": 0.0, "b": 0.0} and r["p0"] == {"a": 0.0, "b": 0.0}


def test_backdoored_reader(tmp_path):
    make_fake_zoo(tmp_path)
    r = evaluate_clip(FakeVision(backdoor=True), tmp_path)
    assert r["acc"]["a"] == 100.0 and r["asr"]["a"] == 100.0 and r["p0"]["a"] == 0.0


def test_asr_leaves_target_class_out(tmp_path):
    make_fake_zoo(tmp_path)
    # non-target labels are 1, 2, 3 (5 each); only label 2 flips -> 5 / 15
    r = evaluate_clip(FakeVision(backdoor=True, even_only=True), tmp_path)
    assert r["asr"]["a"] == pytest.approx(100 * 5 / 15, abs=0.01)


@pytest.mark.parametrize("k", [0, 2])
def test_constant_model(tmp_path, k):
    make_fake_zoo(tmp_path)
    r = evaluate_clip(FakeVision(constant=k), tmp_path)
    assert r["acc"]["a"] == 25.0
    expected = 100.0 if k == TARGET else 0.0
    assert r["asr"]["a"] == expected and r["p0"]["a"] == expected


def test_summarise_splits_succession_and_transfer(tmp_path):
    make_fake_zoo(tmp_path)
    from dam_mergekit.lab.zoo.manifest import load_manifest

    result = {
        "acc": {"a": 80.0, "b": 60.0},
        "asr": {"a": 90.0, "b": 10.0},
        "p0": {"a": 1.0, "b": 2.0},
    }
    s = summarise(result, load_manifest(tmp_path))
    assert s["acc_avg"] == 70.0 and s["asr_succession_avg"] == 90.0
    assert s["asr_transfer_avg"] == 10.0 and s["p0_transfer_avg"] == 2.0


def test_summarise_reports_the_aimed_at_task(tmp_path):
    """An off-task zoo's summary carries its aimed-at task's ASR and p0 on their own."""
    from dam_mergekit.lab.evaluate import format_table
    from dam_mergekit.lab.zoo.manifest import load_manifest

    make_fake_zoo(tmp_path)
    manifest = load_manifest(tmp_path)
    result = {"acc": {"a": 80.0, "b": 60.0}, "asr": {"a": 5.0, "b": 70.0}, "p0": {"a": 1, "b": 2}}
    assert "asr_target_task" not in summarise(result, manifest)
    manifest["attack"] = {"name": "badnets", "target_task": "b"}
    s = summarise(result, manifest)
    assert s["asr_target_task"] == 70.0 and s["p0_target_task"] == 2
    assert "| b | transfer (aimed at) |" in format_table(result, manifest)


def test_der():
    ref = {"acc_avg": 90.0, "asr_succession_avg": 80.0}
    assert der({"acc_avg": 85.0, "asr_succession_avg": 10.0}, ref) == pytest.approx(82.5)
    assert der(ref, ref) == 50.0
    assert der({"acc_avg": 95.0, "asr_succession_avg": 90.0}, ref) == 50.0
