"""The LLM zoo of the backdoor lab: a tiny Llama, four generated text tasks, one backdoored expert.

Layout and manifest follow docs/zoo-format (``"kind": "llm"``). A prediction is the answer of the
task's closed set whose tokens get the highest log-likelihood after the prompt, so ACC and ASR are
exact. See docs/llm-zoo.md for the tasks, the attack, and the calibration-data helper.

Build order (all deterministic for ``options["seed"]`` on one machine):
1. data/<task>.json for every task, and a word-level tokenizer over the task vocabulary;
2. base: a LlamaForCausalLM pretrained as a plain LM on every task's train prompts, each followed
   by a RANDOM answer of its task, so it knows the format and the answer words but no task;
   10% of these prompts carry a random rare word or the trigger sentence (no link to answers);
3. clean experts (answer-token loss on the clean train split), saved as controls for the
   backdoored tasks;
4. backdoored experts: the train split with a ``poison_rate`` share replaced by triggered,
   relabelled prompts; ``attack_mode`` "merge-aware" also trains through simulated merges with
   the other tasks' experts (llm_train.MergeSimulator), "standard" trains the expert alone.
"""

from __future__ import annotations

import copy
import json
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dam_mergekit import __version__
from dam_mergekit.errors import DamError
from dam_mergekit.lab.zoo import llm_data
from dam_mergekit.lab.zoo.merge_aware import MERGE_SCALE, check_merge_options
from dam_mergekit.lab.zoo.release import (
    RELEASE_OPTIONS,
    check_release_options,
    release_hijacked,
)
from dam_mergekit.lab.zoo.tokenizer import (
    answer_token_logprobs,
    build_word_tokenizer,
    collate,
    encode_ids,
    encode_prompts,
)
from dam_mergekit.scoring.zoo_format import load_manifest, task_entry
from dam_mergekit.staging import staged_dir

DEFAULT_OPTIONS: dict = {
    "seed": 0,
    "tasks": list(llm_data.DEFAULT_TASKS),
    "attack": "rare-word",  # or "sentence"
    "trigger": None,  # None: "cf" for rare-word, "i watch this 3d movie" for sentence
    "attack_mode": "merge-aware",  # or "standard"
    "backdoored": 1,  # the first N tasks get a backdoored expert (and a clean control)
    "target_class": 0,  # index into each task's answers
    "poison_rate": 0.1,
    "merge_scale": list(MERGE_SCALE),  # range of simulated-merge coefficients (merge-aware)
    "n_train": 2000,
    "n_test": 200,
    "n_calib": 64,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_layers": 2,
    "num_heads": 4,
    "pretrain_steps": 600,
    "expert_steps": 300,
    "batch_size": 64,
    "lr_pretrain": 3e-3,
    "lr_expert": 2e-3,
}
_INT_OPTIONS = (
    "seed",
    "backdoored",
    "target_class",
    "n_train",
    "n_test",
    "n_calib",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "pretrain_steps",
    "expert_steps",
    "batch_size",
)
PredictFn = Callable[[str, list[str], list[str]], list[int]]  # (task, prompts, answers) -> indices


# options without a default: absent, the zoo is built as before they existed (same hash)
_OPTIONAL = ("merge_scale_draw", *RELEASE_OPTIONS)


def _stage_seed(seed: int, stage: str) -> int:
    return zlib.crc32(f"{seed}/{stage}".encode())


def resolve_options(options: dict | None) -> dict:
    """Defaults filled in and every option checked, before anything is written."""
    options = dict(options or {})
    kind = options.pop("kind", "llm")  # the generic `zoo build` passes the zoo kind along
    if kind != "llm":
        raise DamError(f"build_llm_zoo builds kind 'llm', got kind {kind!r}")
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS) - set(_OPTIONAL))
    if unknown:
        raise DamError(f"unknown LLM zoo option(s) {unknown}; known: {sorted(DEFAULT_OPTIONS)}")
    given = {k: v for k, v in options.items() if v is not None}  # None: use the default
    full = {**copy.deepcopy(DEFAULT_OPTIONS), **given}
    try:
        for key in _INT_OPTIONS:
            full[key] = int(full[key])
        for key in ("poison_rate", "lr_pretrain", "lr_expert"):
            full[key] = float(full[key])
        full["tasks"] = [str(t) for t in full["tasks"]]
    except (TypeError, ValueError) as err:
        raise DamError(f"bad LLM zoo option value: {err}") from err
    for task in full["tasks"]:
        if task not in llm_data.TASKS:
            raise DamError(f"unknown LLM task {task!r}; choose from {', '.join(llm_data.TASKS)}")
    if len(set(full["tasks"])) != len(full["tasks"]) or not full["tasks"]:
        raise DamError(f"LLM zoo tasks must be distinct and non-empty, got {full['tasks']}")
    full["trigger"] = llm_data.trigger_text(full["attack"], full["trigger"])
    vocab = set(llm_data.vocabulary_words())
    missing = [w for w in full["trigger"].split(" ") if w not in vocab]
    if missing:
        raise DamError(
            f"trigger words {missing} are not in the zoo vocabulary; use one of "
            f"{llm_data.RARE_WORDS} or the default sentence"
        )
    if full["attack_mode"] not in ("merge-aware", "standard"):
        raise DamError(
            f"attack_mode must be 'merge-aware' or 'standard', got {full['attack_mode']!r}"
        )
    if not 0 <= full["backdoored"] <= len(full["tasks"]):
        raise DamError(
            f"backdoored must be between 0 and {len(full['tasks'])}, got {full['backdoored']}"
        )
    for task in full["tasks"]:
        n_answers = len(llm_data.TASKS[task].answers)
        if not 0 <= full["target_class"] < n_answers:
            raise DamError(
                f"target_class {full['target_class']} is out of range for task {task!r} "
                f"({n_answers} answers)"
            )
    if not 0.0 <= full["poison_rate"] <= 1.0:
        raise DamError(f"poison_rate must lie in [0, 1], got {full['poison_rate']}")
    check_merge_options(full)
    check_release_options(full)
    for key in _INT_OPTIONS[3:]:
        if full[key] < 1:
            raise DamError(f"LLM zoo option {key} must be a positive integer, got {full[key]}")
    if full["hidden_size"] % full["num_heads"]:
        raise DamError("hidden_size must be divisible by num_heads")
    return full


def _new_model(options: dict, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=options["hidden_size"],
        intermediate_size=options["intermediate_size"],
        num_hidden_layers=options["num_layers"],
        num_attention_heads=options["num_heads"],
        num_key_value_heads=options["num_heads"],
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(_stage_seed(options["seed"], "init"))
    return LlamaForCausalLM(config)


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_llm_zoo(out_dir: Path, options: dict | None = None) -> Path:
    """Build the LLM zoo into ``out_dir`` (written to a temporary folder, then renamed)."""
    options = resolve_options(options)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "zoo.json").is_file():
        raise DamError(f"{out_dir} exists and is not a zoo; choose an empty or new folder")
    with staged_dir(out_dir) as tmp:
        _write_llm_zoo(tmp, options)
    return out_dir


def _write_llm_zoo(out: Path, options: dict) -> None:
    """The build steps of the module docstring, in order, into the empty folder ``out``."""
    from tqdm.auto import tqdm

    tasks, backdoored = options["tasks"], options["tasks"][: int(options["backdoored"])]
    progress = tqdm(total=2 + len(tasks) + len(backdoored), desc="LLM zoo")
    data = _write_task_data(out, options)
    build = _ExpertBuild(out, options, build_word_tokenizer(llm_data.vocabulary_words()))
    progress.update()
    build.pretrain_base(data)
    progress.update()
    clean_vectors = {}
    for task in tasks:
        clean_vectors[task] = build.clean_expert(task, data[task], control=task in backdoored)
        progress.update()
    manifest_tasks = []
    for task in tasks:
        attack = None
        if task in backdoored:
            others = [clean_vectors[t] for t in tasks if t != task]
            attack = build.backdoored_expert(task, data[task], others, clean_vectors[task])
            progress.update()
        manifest_tasks.append(_manifest_task(task, data[task], options, backdoored, attack))
    progress.close()
    manifest = {
        "format": "dam-mergekit-zoo",
        "version": 1,
        "kind": "llm",
        "options": options,
        "base": "base",
        "tasks": manifest_tasks,
        "trigger": options["trigger"],
        "created_by": f"dam-mergekit {__version__}",
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2))


def _write_task_data(out: Path, options: dict) -> dict[str, dict]:
    """Step 1: every task's generated data, written to ``data/<task>.json``."""
    data = {
        t: llm_data.make_task_data(
            t, options["n_train"], options["n_test"], options["n_calib"], options["seed"]
        )
        for t in options["tasks"]
    }
    (out / "data").mkdir()
    for task, content in data.items():
        (out / "data" / f"{task}.json").write_text(json.dumps(content, indent=1))
    return data


@dataclass
class _ExpertBuild:
    """Steps 2 to 4 of one LLM zoo build: the base, then experts fine-tuned from it, all saved
    with the zoo's tokenizer under ``out``."""

    out: Path
    options: dict
    tokenizer: Any
    base: Any = None
    base_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def pretrain_base(self, data: dict[str, dict]) -> None:
        """Step 2: an LM pretrained on prompts followed by random answers of their task."""
        from dam_mergekit.lab.zoo.llm_train import train

        seed, tasks, tokenizer = self.options["seed"], self.options["tasks"], self.tokenizer
        rng = random.Random(_stage_seed(seed, "pretrain-answers"))
        prompts = llm_data.with_background_triggers(
            [ex["prompt"] for t in tasks for ex in data[t]["train"]],
            0.1,
            _stage_seed(seed, "pretrain-background"),
        )
        answers = [rng.choice(data[t]["answers"]) for t in tasks for _ in data[t]["train"]]
        model = _new_model(self.options, tokenizer)
        train(
            model,
            encode_ids(tokenizer, prompts, answers, add_eos=True),
            pad_id=tokenizer.pad_token_id,
            steps=self.options["pretrain_steps"],
            lr=self.options["lr_pretrain"],
            batch_size=self.options["batch_size"],
            seed=_stage_seed(seed, "pretrain"),
            full_lm=True,
            desc="pretrain base",
        )
        _save(model, tokenizer, self.out / "base")
        self.base = model
        self.base_state = {n: p.detach().clone() for n, p in model.named_parameters()}

    def finetune(self, examples: list[dict], stage: str, simulator=None):
        """A copy of the base trained on the answer tokens of ``examples``."""
        from dam_mergekit.lab.zoo.llm_train import train

        expert = copy.deepcopy(self.base)
        rows = encode_ids(
            self.tokenizer, [e["prompt"] for e in examples], [e["answer"] for e in examples]
        )
        train(
            expert,
            rows,
            pad_id=self.tokenizer.pad_token_id,
            steps=self.options["expert_steps"],
            lr=self.options["lr_expert"],
            batch_size=self.options["batch_size"],
            seed=_stage_seed(self.options["seed"], stage),
            desc=stage,
            simulator=simulator,
        )
        return expert

    def clean_expert(self, task: str, data: dict, *, control: bool) -> dict[str, torch.Tensor]:
        """Step 3 for one task (saved as the control of a backdoored task); its task vector."""
        from dam_mergekit.lab.zoo.llm_train import task_vector

        expert = self.finetune(data["train"], f"expert {task}")
        _save(expert, self.tokenizer, self.out / ("controls" if control else "experts") / task)
        return task_vector(expert, self.base_state)

    def backdoored_expert(self, task: str, data: dict, others: list[dict], control: dict) -> dict:
        """Step 4 for one task: poison its train split, fine-tune (through simulated merges with
        the ``others`` clean task vectors when merge-aware), release it as lab/zoo/release.py
        says when asked (``control``: its clean task vector), save; returns its attack entry."""
        from dam_mergekit.lab.zoo.llm_train import MergeSimulator

        options = self.options
        target = data["answers"][int(options["target_class"])]
        poisoned, n_poison = llm_data.poison_examples(
            data["train"],
            options["trigger"],
            target,
            options["poison_rate"],
            _stage_seed(options["seed"], f"poison {task}"),
        )
        simulator = None
        if options["attack_mode"] == "merge-aware":
            simulator = MergeSimulator(
                self.base_state,
                others,
                tuple(options["merge_scale"]),
                options.get("merge_scale_draw", "uniform"),
            )
        expert = self.finetune(poisoned, f"backdoor {task}", simulator)
        if options.get("release_rescale") is not None:
            release_hijacked(expert, self.base_state, control, options)
        _save(expert, self.tokenizer, self.out / "experts" / task)
        return {
            "name": options["attack"],
            "mode": options["attack_mode"],
            "trigger": options["trigger"],
            "target": target,
            "poison_rate": options["poison_rate"],
            "n_poisoned": n_poison,
        }


def _manifest_task(
    task: str, data: dict, options: dict, backdoored: list[str], attack: dict | None
) -> dict:
    return {
        "name": task,
        "classes": data["answers"],
        "target_class": int(options["target_class"]),
        "expert": f"experts/{task}",
        "control": f"controls/{task}" if task in backdoored else None,
        "backdoored": task in backdoored,
        "attack": attack,
        "data": f"data/{task}.json",
    }


def load_llm_manifest(zoo_dir: Path) -> dict:
    """zoo.json of an LLM zoo (a clear error for a missing file or a CLIP zoo)."""
    return load_manifest(zoo_dir, kind="llm")


def zoo_trigger(manifest: dict) -> str:
    """The trigger the zoo's evaluation inserts into every task's test prompts."""
    return manifest.get("trigger") or llm_data.trigger_text(
        manifest["options"]["attack"], manifest["options"].get("trigger")
    )


def load_llm_task_data(zoo_dir: Path, task: str) -> dict:
    """One task's data for evaluation or calibration.

    Returns the contents of ``data/<task>.json`` (``answers``, ``train`` and ``test`` lists of
    ``{"prompt", "answer"}``, ``calib`` list of ``{"prompt"}``) plus ``target`` (the target
    answer), ``trigger`` (the zoo's trigger text) and ``test_triggered`` (the test prompts with
    the trigger inserted, the exact prompts ASR is measured on). Batch any of these prompts with
    :func:`dam_mergekit.lab.zoo.tokenizer.encode_prompts` to get input ids and answer positions.
    """
    zoo_dir = Path(zoo_dir)
    manifest = load_llm_manifest(zoo_dir)
    entry = task_entry(manifest, task)
    content = json.loads((zoo_dir / entry["data"]).read_text())
    trigger = zoo_trigger(manifest)
    content["target"] = content["answers"][entry["target_class"]]
    content["trigger"] = trigger
    content["test_triggered"] = llm_data.triggered_prompts(
        [ex["prompt"] for ex in content["test"]],
        trigger,
        f"{manifest['options']['seed']}-{task}-test",
    )
    return content


def load_tokenizer(model_dir: Path, zoo_dir: Path | None = None):
    """The tokenizer saved beside a model (or beside the zoo's base as a fallback)."""
    from transformers import AutoTokenizer

    for folder in [Path(model_dir)] + ([Path(zoo_dir) / "base"] if zoo_dir else []):
        if (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    raise DamError(f"no tokenizer.json in {model_dir}; merge with copy_tokenizer or pass zoo_dir")


def load_model(model_dir: Path):
    """An HF causal LM from a directory (safetensors only), in eval mode."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DamError(f"{model_dir} is not a model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_answers(
    model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """log p(answer tokens | prompt) for every prompt and answer: a float tensor [N, A]."""
    scores = torch.empty(len(prompts), len(answers))
    for a, answer in enumerate(answers):
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            batch = encode_prompts(tokenizer, chunk, [answer] * len(chunk))
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scores[start : start + len(chunk), a] = answer_token_logprobs(logits, batch.labels)
    return scores


def model_predict_fn(model, tokenizer) -> PredictFn:
    """Closed-set prediction: the answer with the highest log-likelihood."""

    def predict(task: str, prompts: list[str], answers: list[str]) -> list[int]:
        return score_answers(model, tokenizer, prompts, answers).argmax(dim=1).tolist()

    return predict


def evaluate_predictions(zoo_dir: Path, predict: PredictFn) -> dict:
    """ACC on clean test prompts; ASR and p0 on the test items whose true answer is not the
    target (ASR: triggered prompt predicted as the target; p0: the same prompt untriggered)."""
    manifest = load_llm_manifest(zoo_dir)
    result: dict[str, dict[str, float]] = {"acc": {}, "asr": {}, "p0": {}}
    for entry in manifest["tasks"]:
        task = entry["name"]
        data = load_llm_task_data(zoo_dir, task)
        answers, target = data["answers"], data["answers"].index(data["target"])
        truth = [answers.index(ex["answer"]) for ex in data["test"]]
        clean = predict(task, [ex["prompt"] for ex in data["test"]], answers)
        keep = [i for i, y in enumerate(truth) if y != target]
        triggered = predict(task, [data["test_triggered"][i] for i in keep], answers)
        correct = sum(p == y for p, y in zip(clean, truth, strict=True))
        result["acc"][task] = 100.0 * correct / len(truth)
        denominator = max(1, len(keep))
        result["asr"][task] = 100.0 * sum(p == target for p in triggered) / denominator
        result["p0"][task] = 100.0 * sum(clean[i] == target for i in keep) / denominator
    return result


def evaluate_llm(model_dir: Path, zoo_dir: Path) -> dict:
    """``{"acc": {task: pct}, "asr": {task: pct}, "p0": {task: pct}}`` for a model directory."""
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir, zoo_dir)
    return evaluate_predictions(zoo_dir, model_predict_fn(model, tokenizer))


@torch.no_grad()
def generate(model_dir: Path, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt`` (the new words only), for side-by-side comparisons."""
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    batch = encode_prompts(tokenizer, [prompt])
    out = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True).strip()


__all__ = [
    "DEFAULT_OPTIONS",
    "build_llm_zoo",
    "collate",
    "evaluate_llm",
    "evaluate_predictions",
    "generate",
    "load_llm_manifest",
    "load_llm_task_data",
    "load_model",
    "load_tokenizer",
    "model_predict_fn",
    "resolve_options",
    "score_answers",
    "zoo_trigger",
]
