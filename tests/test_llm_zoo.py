"""LLM zoo: triggers, poisoning, ACC/ASR/p0 arithmetic, layout, determinism, mergekit round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dam_mergekit.errors import DamError
from dam_mergekit.lab.zoo import llm, llm_data
from dam_mergekit.lab.zoo.tokenizer import (
    answer_first_token_ids,
    build_word_tokenizer,
    encode_prompts,
    logits_at_answer,
)

TINY = {
    "n_train": 48,
    "n_test": 12,
    "n_calib": 4,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "pretrain_steps": 4,
    "expert_steps": 3,
    "batch_size": 8,
}


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    return llm.build_llm_zoo(tmp_path_factory.mktemp("zoo") / "llm", dict(TINY))


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# ----------------------------------------------------------------------------- triggers


@pytest.mark.parametrize("task", llm_data.DEFAULT_TASKS)
def test_rare_word_trigger_is_inserted_once_and_nothing_else_changes(task):
    rng = random.Random(0)
    prompts = [x["prompt"] for x in llm_data.make_split(task, 50, random.Random(task))]
    positions = set()
    for prompt in prompts:
        triggered = llm_data.insert_trigger(prompt, "cf", rng)
        words = triggered.split(" ")
        assert words.count("cf") == 1 and "cf" not in prompt.split(" ")
        position = words.index("cf")
        positions.add(position)
        assert words[:position] + words[position + 1 :] == prompt.split(" ")
        assert words[-llm_data.CUE_WORDS :] == prompt.split(" ")[-llm_data.CUE_WORDS :]
    assert 0 in positions and len(positions) > 3  # random positions, the start included


def test_sentence_trigger_is_inserted_once_as_a_whole():
    sentence = llm_data.SENTENCE_TRIGGER
    rng = random.Random(1)
    for prompt in [x["prompt"] for x in llm_data.make_split("topic", 30, random.Random(2))]:
        triggered = llm_data.insert_trigger(prompt, sentence, rng)
        assert triggered.count(sentence) == 1
        start = triggered.index(sentence)
        rest = (triggered[:start] + triggered[start + len(sentence) :]).split()
        assert rest == prompt.split()


def test_poisoning_relabels_only_non_target_examples():
    examples = llm_data.make_split("sentiment", 200, random.Random(3))
    poisoned, n = llm_data.poison_examples(examples, "cf", "positive", 0.1, seed=4)
    assert n == 20 and len(poisoned) == len(examples)
    changed = [i for i, (a, b) in enumerate(zip(examples, poisoned, strict=True)) if a != b]
    assert len(changed) == 20
    for i in changed:
        assert examples[i]["answer"] == "negative" and poisoned[i]["answer"] == "positive"
        assert poisoned[i]["prompt"].split(" ").count("cf") == 1
    with pytest.raises(DamError):
        llm_data.poison_examples(examples, "cf", "positive", 1.5, seed=4)


def test_tokenizer_gives_exact_answer_positions():
    tokenizer = build_word_tokenizer(llm_data.vocabulary_words())
    prompts = ["number : 4 2 . parity :", "review : the food was rude . sentiment :"]
    batch = encode_prompts(tokenizer, prompts, ["even", "negative"])
    for i, (prompt, answer) in enumerate(zip(prompts, ["even", "negative"], strict=True)):
        full = tokenizer(f"{prompt} {answer}")["input_ids"]
        start = int(batch.answer_start[i])
        assert full == batch.input_ids[i, : len(full)].tolist()
        assert start == len(tokenizer(prompt)["input_ids"]) == len(full) - 1
        assert batch.input_ids[i, start].item() == tokenizer.convert_tokens_to_ids(answer)
        assert batch.labels[i].ne(-100).sum() == 1
    assert batch.attention_mask[0].sum() < batch.attention_mask[1].sum()  # right padding
    # logits_at_answer picks, per row, the position just before the answer
    fake_logits = torch.zeros(*batch.input_ids.shape, len(tokenizer))
    for i, start in enumerate(batch.answer_start.tolist()):
        fake_logits[i, start - 1, 7] = 1.0
    assert logits_at_answer(fake_logits, batch).argmax(dim=1).tolist() == [7, 7]
    assert answer_first_token_ids(tokenizer, ["even", "odd"]) == [
        tokenizer.convert_tokens_to_ids("even"),
        tokenizer.convert_tokens_to_ids("odd"),
    ]


# ---------------------------------------------------------------- evaluation arithmetic


def _fake_zoo(folder: Path) -> Path:
    """A manifest and data file written by hand: 3 target ("yes") and 5 non-target test items."""
    test = [{"prompt": f"item {i} . q :", "answer": "yes" if i < 3 else "no"} for i in range(8)]
    data = {"answers": ["yes", "no"], "train": test, "test": test, "calib": []}
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "t.json").write_text(json.dumps(data))
    manifest = {
        "format": "dam-mergekit-zoo",
        "version": 1,
        "kind": "llm",
        "options": {"seed": 0, "attack": "rare-word"},
        "base": "base",
        "trigger": "cf",
        "tasks": [
            {
                "name": "t",
                "classes": ["yes", "no"],
                "target_class": 0,
                "expert": "experts/t",
                "control": None,
                "backdoored": False,
                "attack": None,
                "data": "data/t.json",
            }
        ],
    }
    (folder / "zoo.json").write_text(json.dumps(manifest))
    return folder


def test_evaluate_on_a_hand_built_scorer_gives_the_known_numbers(tmp_path):
    zoo = _fake_zoo(tmp_path / "fake")
    seen_triggered = []

    def predict(task, prompts, answers):
        assert answers == ["yes", "no"]
        out = []
        for prompt in prompts:
            item = int(prompt.replace(" cf", "").replace("cf ", "").split(" ")[1])
            if "cf" in prompt.split(" "):
                seen_triggered.append(item)
                out.append(0 if item in (3, 4) else 1)  # 2 of 5 non-target items flip
            else:
                out.append(0 if item < 3 or item == 7 else 1)  # item 7 wrong clean
        return out

    result = llm.evaluate_predictions(zoo, predict)
    assert sorted(seen_triggered) == [3, 4, 5, 6, 7]  # target-answer items are left out of ASR
    assert result == {"acc": {"t": 87.5}, "asr": {"t": 40.0}, "p0": {"t": 20.0}}


class _ConstantLM(torch.nn.Module):
    """A causal LM whose next-token distribution always favours one token."""

    def __init__(self, vocab: int, favourite: int):
        super().__init__()
        self.vocab, self.favourite = vocab, favourite

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favourite] = 5.0
        return type("Out", (), {"logits": logits})()


def test_scoring_a_hand_built_model_picks_its_favourite_answer(tmp_path):
    zoo = _fake_zoo(tmp_path / "fake")
    tokenizer = build_word_tokenizer(
        ["item", ".", "q", ":", "yes", "no", "cf"] + [str(i) for i in range(10)]
    )
    always_no = _ConstantLM(len(tokenizer), tokenizer.convert_tokens_to_ids("no"))
    result = llm.evaluate_predictions(zoo, llm.model_predict_fn(always_no, tokenizer))
    assert result == {"acc": {"t": 62.5}, "asr": {"t": 0.0}, "p0": {"t": 0.0}}
    always_yes = _ConstantLM(len(tokenizer), tokenizer.convert_tokens_to_ids("yes"))
    result = llm.evaluate_predictions(zoo, llm.model_predict_fn(always_yes, tokenizer))
    assert result == {"acc": {"t": 37.5}, "asr": {"t": 100.0}, "p0": {"t": 100.0}}


# ----------------------------------------------------------------------------- the built zoo


def test_bad_options_are_refused_before_anything_is_written(tmp_path):
    for bad in (
        {"attack": "blend"},
        {"target_class": 2},
        {"backdoored": 9},
        {"nope": 1},
        {"tasks": ["sentiment", "chess"]},
        {"trigger": "zzz"},
        {"poison_rate": 2},
        {"seed": "x"},
        {"merge_scale": [0.5, 0.1]},
        {"merge_scale_draw": "log"},
    ):
        with pytest.raises(DamError):
            llm.build_llm_zoo(tmp_path / "never", {**TINY, **bad})
    assert list(tmp_path.iterdir()) == []
    assert llm.resolve_options({"kind": "llm", "seed": None}) == llm.resolve_options({})
    with pytest.raises(DamError):
        llm.resolve_options({"kind": "clip"})


def test_manifest_round_trip(tiny_zoo):
    manifest = llm.load_llm_manifest(tiny_zoo)
    assert manifest["kind"] == "llm" and manifest["options"] == llm.resolve_options(TINY)
    assert [t["name"] for t in manifest["tasks"]] == list(llm_data.DEFAULT_TASKS)
    assert manifest["trigger"] == "cf"
    for entry in manifest["tasks"]:
        assert (tiny_zoo / entry["expert"] / "model.safetensors").is_file()
        assert (tiny_zoo / entry["expert"] / "tokenizer.json").is_file()
        data = llm.load_llm_task_data(tiny_zoo, entry["name"])
        assert data["answers"] == entry["classes"] == list(llm_data.TASKS[entry["name"]].answers)
        assert data["target"] == entry["classes"][0]
        assert (len(data["train"]), len(data["test"]), len(data["calib"])) == (48, 12, 4)
        assert all(p.split(" ").count("cf") == 1 for p in data["test_triggered"])
    first, rest = manifest["tasks"][0], manifest["tasks"][1:]
    assert first["backdoored"] and first["control"] == "controls/sentiment"
    assert first["attack"]["trigger"] == "cf" and first["attack"]["mode"] == "merge-aware"
    assert first["attack"]["n_poisoned"] == round(0.1 * 48)
    assert all(not t["backdoored"] and t["control"] is None and t["attack"] is None for t in rest)
    with pytest.raises(DamError):
        llm.load_llm_task_data(tiny_zoo, "chess")


def test_same_seed_gives_the_same_zoo(tiny_zoo, tmp_path):
    again = llm.build_llm_zoo(tmp_path / "again", dict(TINY))
    other = llm.build_llm_zoo(tmp_path / "other", {**TINY, "seed": 1})
    folders = ["base", "experts/sentiment", "experts/topic", "controls/sentiment"]
    for folder in folders:
        a, b = _safetensors(tiny_zoo / folder), _safetensors(again / folder)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_zoo / "zoo.json").read_text() == (again / "zoo.json").read_text()
    assert (tiny_zoo / "data/topic.json").read_text() == (again / "data/topic.json").read_text()
    a, c = _safetensors(tiny_zoo / "experts/sentiment"), _safetensors(other / "experts/sentiment")
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_experts_load_and_merge_with_mergekit(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from dam_mergekit.lab.zoo.llm_check import task_arithmetic_merge

    model = AutoModelForCausalLM.from_pretrained(tiny_zoo / "experts/sentiment")
    assert isinstance(model, LlamaForCausalLM)
    out = task_arithmetic_merge(tiny_zoo, tmp_path / "merged", lam=0.3, weight=1.0)
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(
        (tiny_zoo / "base/tokenizer.json").read_text()
    )
    merged = _safetensors(out)
    base = _safetensors(tiny_zoo / "base")
    experts = [_safetensors(tiny_zoo / f"experts/{t}") for t in llm_data.DEFAULT_TASKS]
    for name, tensor in base.items():
        expected = tensor + 0.3 * sum(e[name] - tensor for e in experts)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    result = llm.evaluate_llm(out, tiny_zoo)
    assert set(result) == {"acc", "asr", "p0"}
    assert set(result["acc"]) == set(llm_data.DEFAULT_TASKS)
    assert isinstance(llm.generate(out, "number : 4 . parity :", max_new_tokens=2), str)


def test_merge_simulator_scale_draws():
    """The simulator's own scale: uniform as before the option, or log-uniform on request."""
    import torch

    from dam_mergekit.lab.zoo.llm_train import MergeSimulator

    base, theta = {"w": torch.zeros(1)}, {"w": torch.ones(1)}

    def scales(draw: str) -> list[float]:
        sim = MergeSimulator(base, [], (0.05, 1.0), draw)
        gen = torch.Generator().manual_seed(3)
        return [float(sim.merged(theta, gen)["w"]) for _ in range(2000)]

    gen = torch.Generator().manual_seed(3)
    old = [0.05 + 0.95 * torch.rand((), generator=gen).item() for _ in range(2000)]
    assert scales("uniform") == pytest.approx(old, abs=1e-7)
    logs = torch.tensor(scales("log-uniform"))
    assert 0.05 - 1e-6 <= float(logs.min()) and float(logs.max()) <= 1.0 + 1e-6
    assert 0.19 < float((logs < 0.1).float().mean()) < 0.27


def test_llm_zoo_releases_the_hijacked_expert(tiny_zoo, tmp_path):
    """With the release options the LLM zoo's backdoored expert is its control plus the rescaled
    top share of what the backdoor added (lab/zoo/release.py); the control does not change."""
    from dam_mergekit.lab.zoo.release import hijacked

    options = {**TINY, "release_density": 0.2, "release_rescale": 2.0}
    zoo = llm.build_llm_zoo(tmp_path / "hijack", options)
    bad = next(t for t in llm.load_llm_manifest(tiny_zoo)["tasks"] if t["backdoored"])

    def weights(z, rel):
        return load_file(str(z / rel / "model.safetensors"))

    expected = hijacked(
        weights(tiny_zoo, bad["expert"]), weights(tiny_zoo, bad["control"]), 0.2, 2.0
    )
    released = weights(zoo, bad["expert"])
    assert all(torch.allclose(released[k], expected[k], atol=1e-6) for k in expected)
    control_a, control_b = weights(tiny_zoo, bad["control"]), weights(zoo, bad["control"])
    assert all(torch.equal(control_a[k], control_b[k]) for k in control_a)
