"""Calibration optimises exactly the prediction the evaluation scores, for every built-in adapter."""

from __future__ import annotations

import pytest
import torch
from test_llm_zoo import TINY as TINY_LLM
from zoo_fixtures import tiny_zoo  # noqa: F401

from dam_mergekit.calibrate.adapters import make_adapter
from dam_mergekit.errors import DamError
from dam_mergekit.lab.zoo import llm
from dam_mergekit.lab.zoo.clip_eval import evaluate_clip, load_vision_model
from dam_mergekit.lab.zoo.loaders import clip_logits, load_head, load_task_data
from dam_mergekit.scoring.zoo_format import load_manifest, read_calibration_manifest

CPU = torch.device("cpu")


def test_clip_adapter_logits_are_the_evaluation_s(tiny_zoo):  # noqa: F811
    """Accuracy from the adapter's logits on the test split equals evaluate_clip's accuracy."""
    manifest = load_manifest(tiny_zoo)
    adapter = make_adapter("clip", str(tiny_zoo), {"split": "test_x"}, CPU)
    expert = next(t for t in manifest["tasks"] if t["backdoored"])
    model = adapter.load_model(str(tiny_zoo / expert["expert"]))
    eval_model = load_vision_model(tiny_zoo / expert["expert"])
    reference = evaluate_clip(eval_model, tiny_zoo)
    for task in adapter.tasks():
        images = adapter.images[task].float() / 255.0
        with torch.no_grad():
            logits = adapter.logits(model, {}, task, images)
        with torch.no_grad():  # the evaluation's own call, on the evaluation's own loaders
            evaluated = clip_logits(
                eval_model, load_head(tiny_zoo, task), images, manifest["normalize"]
            )
        torch.testing.assert_close(logits, evaluated)
        labels = load_task_data(tiny_zoo, task)["test_y"]
        accuracy = round(100.0 * float((logits.argmax(-1) == labels).float().mean()), 2)
        assert accuracy == reference["acc"][task], task


@pytest.fixture(scope="module")
def llm_zoo(tmp_path_factory):
    return llm.build_llm_zoo(tmp_path_factory.mktemp("zoo") / "llm", dict(TINY_LLM))


def test_causal_lm_adapter_scores_are_the_evaluation_s(llm_zoo):
    """The adapter's [prompts, answers] scores equal score_answers, which evaluate_llm argmaxes."""
    adapter = make_adapter("causal_lm", str(llm_zoo), {}, CPU)
    model = adapter.load_model(str(llm_zoo / "experts" / adapter.tasks()[0]))
    for task in adapter.tasks():
        batch = adapter.sample(task, 6, torch.Generator().manual_seed(3))
        picked = torch.randint(
            len(adapter.prompts[task]), (6,), generator=torch.Generator().manual_seed(3)
        ).tolist()
        prompts = [adapter.prompts[task][i] for i in picked]
        with torch.no_grad():
            scores = adapter.logits(model, {}, task, batch)
        reference = llm.score_answers(model, adapter.tokenizer, prompts, adapter.answers[task])
        torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-5)


def test_one_manifest_reader_for_calibration_and_evaluation(tiny_zoo, llm_zoo, tmp_path):  # noqa: F811
    assert read_calibration_manifest(tiny_zoo)["tasks"] == load_manifest(tiny_zoo)["tasks"]
    assert llm.load_llm_manifest(llm_zoo) == load_manifest(llm_zoo, kind="llm")
    with pytest.raises(DamError, match="a clip zoo where an llm zoo is needed"):
        llm.load_llm_manifest(tiny_zoo)
    with pytest.raises(DamError, match="calibration data is not a zoo"):
        read_calibration_manifest(tmp_path)
