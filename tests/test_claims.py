"""One statement of each claim: the bench and the LLM zoo check apply the same margins."""

from __future__ import annotations

import json

import pytest

from dam_mergekit.errors import DamError
from dam_mergekit.lab.claims import DAM_CUT, EXPERTS, OFF_TASK, SUCCESSION, TRANSFER
from dam_mergekit.lab.zoo.llm_check import check_succession


@pytest.mark.parametrize(
    "asr, p0, control, holds",
    [
        (80, 10, 5, True),
        (49, 0, 0, False),  # too low
        (60, 45, 0, False),  # the merge predicts the target anyway (p0)
        (60, 0, 45, False),  # the clean-control merge shows the same ASR
        (50, 29.9, 29.9, True),
    ],
)
def test_succession_rule(asr, p0, control, holds):
    assert (SUCCESSION.missed(asr, p0, control) is None) is holds


@pytest.mark.parametrize(
    "asr, acc, holds", [(40, 80, True), (41, 80, False), (10, 78.9, False), (10, 79, True)]
)
def test_defense_rule(asr, acc, holds):
    assert (DAM_CUT.missed(asr, acc, undefended_asr=60, undefended_acc=80) is None) is holds


@pytest.mark.parametrize(
    "asr, p0, shows", [(30, 20, True), (29.9, 20, False), (5, 10, False), (100, 0, True)]
)
def test_transfer_rule(asr, p0, shows):
    """Transfer: the trigger adds 10 points or more over p0 on a clean task (book chapter 3)."""
    assert (TRANSFER.missed(asr, p0) is None) is shows


@pytest.mark.parametrize(
    "asr, p0, control_asr, control_p0, shows",
    [
        (60, 30, 12, 5, True),
        (59.9, 30, 5, 5, False),  # the trigger adds under 30 points
        (90, 10, 25, 15, False),  # the clean control adds 10: not the backdoor's doing
        (90, 10, 24.9, 15, True),
    ],
)
def test_off_task_rule(asr, p0, control_asr, control_p0, shows):
    """Off-task transfer: +30 over p0 on the aimed-at task, the clean control under +10."""
    assert (OFF_TASK.missed(asr, p0, control_asr, control_p0) is None) is shows


def test_expert_rule():
    assert EXPERTS.learned(70, 50) and not EXPERTS.learned(69.9, 50)
    assert EXPERTS.planted(90) and not EXPERTS.planted(89.9)
    assert EXPERTS.like_control(80, 85) and not EXPERTS.like_control(80, 85.1)


def _llm_zoo_manifest(tmp_path):
    task = {
        "name": "sentiment",
        "classes": ["positive", "negative"],
        "target_class": 0,
        "expert": "experts/sentiment",
        "control": "controls/sentiment",
        "backdoored": True,
        "attack": {"name": "rare_word"},
        "data": "data/sentiment.json",
    }
    manifest = {"format": "dam-mergekit-zoo", "version": 1, "kind": "llm", "options": {}}
    manifest.update(base="base", tasks=[task])
    (tmp_path / "zoo.json").write_text(json.dumps(manifest))
    return tmp_path


def _report(merge_asr, merge_p0, control_asr):
    def scores(acc, asr, p0):
        return {"acc": {"sentiment": acc}, "asr": {"sentiment": asr}, "p0": {"sentiment": p0}}

    merge = {"lambda": 0.3, "weight": 1.0}
    merge["backdoored"] = scores(90, merge_asr, merge_p0)
    merge["clean"] = scores(90, control_asr, 5)
    models = {
        "base": scores(50, 0, 0),
        "experts/sentiment": scores(95, 99, 2),
        "controls/sentiment": scores(94, 3, 2),
    }
    return {"models": models, "merges": [merge]}


def test_llm_check_uses_the_bench_rule(tmp_path):
    zoo = _llm_zoo_manifest(tmp_path)
    assert check_succession(_report(80, 10, 5), zoo)
    # 25 points over p0: enough for the shared rule (+20), refused by the LLM check's old +30
    assert check_succession(_report(60, 35, 5), zoo)
    # above the clean-control merge, but by less than the rule's 20 points
    with pytest.raises(DamError, match="control \\+ 20"):
        check_succession(_report(60, 10, 45), zoo)
