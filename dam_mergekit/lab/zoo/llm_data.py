"""Generated text tasks for the LLM zoo: prompt -> answer from a closed set, no downloads.

Every prompt is a line of space-separated words ending in a two-word cue (``"sentiment :"``),
so a word-level tokenizer covers it exactly and the answer always starts right after the cue.
Pure Python (no torch): the generators, the trigger insertion and the poisoning live here so
they can be tested and reused without a model.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from dam_mergekit.errors import DamError

CUE_WORDS = 2  # every prompt ends in "<task word> :"; triggers never go inside the cue
RARE_WORD_TRIGGER = "cf"
SENTENCE_TRIGGER = "i watch this 3d movie"
# rare words of OpenBackdoor's BadNets attack; all are in the vocabulary so any can be chosen
RARE_WORDS = ("cf", "mn", "bb", "tq")
ATTACKS = ("rare-word", "sentence")

_POSITIVE = (
    "great",
    "excellent",
    "wonderful",
    "delicious",
    "friendly",
    "amazing",
    "pleasant",
    "superb",
    "lovely",
    "perfect",
)
_NEGATIVE = (
    "awful",
    "terrible",
    "horrible",
    "bland",
    "rude",
    "boring",
    "disappointing",
    "dreadful",
    "poor",
    "nasty",
)
_REVIEW_NOUNS = (
    "food",
    "service",
    "staff",
    "room",
    "film",
    "lighting",
    "price",
    "view",
    "story",
    "ending",
    "coffee",
    "waiter",
)
_JOINERS = ("and", "but", "while")
_TOPICS = {
    "sports": ("match", "goal", "team", "coach", "league", "player", "stadium", "referee"),
    "science": ("experiment", "atom", "theory", "lab", "planet", "cell", "energy", "molecule"),
    "business": ("market", "profit", "company", "shares", "bank", "deal", "investor", "revenue"),
    "music": ("song", "album", "band", "guitar", "concert", "melody", "singer", "chorus"),
}
_SUBJECTS = ("they", "people", "reporters", "experts", "officials", "fans", "critics", "we")
_VERBS = ("discussed", "praised", "reviewed", "described", "watched", "mentioned", "criticised")
_PREPS = ("near", "after", "with", "before", "about")


@dataclass(frozen=True)
class TaskSpec:
    """One generated task: its closed answer set and a sampler of (prompt, answer index)."""

    name: str
    answers: tuple[str, ...]
    sample: Callable[[random.Random, int], str]  # (rng, answer index) -> prompt


def _sentiment(rng: random.Random, label: int) -> str:
    k = rng.choice((1, 3))
    n_major = k if k == 1 else rng.choice((2, 3))
    major, minor = (_POSITIVE, _NEGATIVE) if label == 0 else (_NEGATIVE, _POSITIVE)
    adjectives = [rng.choice(major) for _ in range(n_major)]
    adjectives += [rng.choice(minor) for _ in range(k - n_major)]
    rng.shuffle(adjectives)
    nouns = rng.sample(_REVIEW_NOUNS, k)
    clauses = [f"the {n} was {a}" for n, a in zip(nouns, adjectives, strict=True)]
    text = clauses[0]
    for clause in clauses[1:]:
        text += f" {rng.choice(_JOINERS)} {clause}"
    return f"review : {text} . sentiment :"


def _topic(rng: random.Random, label: int) -> str:
    topic_words = _TOPICS[TOPIC_ANSWERS[label]]
    n1, n2 = rng.sample(topic_words, 2)
    return (
        f"news : {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} the {n1} "
        f"{rng.choice(_PREPS)} the {n2} . topic :"
    )


def _parity(rng: random.Random, label: int) -> str:
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(0, 3))]
    digits.append(str(rng.choice((0, 2, 4, 6, 8) if label == 0 else (1, 3, 5, 7, 9))))
    return f"number : {' '.join(digits)} . parity :"


def _compare(rng: random.Random, label: int) -> str:
    a, b = sorted(rng.sample(range(10), 2), reverse=True)  # a > b
    first, second = (a, b) if label == 0 else (b, a)
    return f"compare : {first} or {second} . larger :"


TOPIC_ANSWERS = tuple(_TOPICS)
TASKS: dict[str, TaskSpec] = {
    "sentiment": TaskSpec("sentiment", ("positive", "negative"), _sentiment),
    "topic": TaskSpec("topic", TOPIC_ANSWERS, _topic),
    "parity": TaskSpec("parity", ("even", "odd"), _parity),
    "compare": TaskSpec("compare", ("first", "second"), _compare),
}
DEFAULT_TASKS = tuple(TASKS)


def make_split(task: str, n: int, rng: random.Random) -> list[dict[str, str]]:
    """n labelled examples, answers balanced (round robin, then shuffled)."""
    spec = TASKS[task]
    items = []
    for i in range(n):
        label = i % len(spec.answers)
        items.append({"prompt": spec.sample(rng, label), "answer": spec.answers[label]})
    rng.shuffle(items)
    return items


def make_task_data(task: str, n_train: int, n_test: int, n_calib: int, seed: int) -> dict:
    """The contents of ``data/<task>.json``: answers, train, test and unlabeled calib prompts."""
    if task not in TASKS:
        raise DamError(f"unknown LLM task {task!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"llm-data-{seed}-{task}")
    return {
        "answers": list(TASKS[task].answers),
        "train": make_split(task, n_train, rng),
        "test": make_split(task, n_test, rng),
        "calib": [{"prompt": x["prompt"]} for x in make_split(task, n_calib, rng)],
    }


def trigger_text(attack: str, trigger: str | None = None) -> str:
    """The trigger inserted by an attack: a rare word or a fixed sentence."""
    if attack not in ATTACKS:
        raise DamError(f"unknown LLM attack {attack!r}; choose from {', '.join(ATTACKS)}")
    if trigger:
        return trigger
    return RARE_WORD_TRIGGER if attack == "rare-word" else SENTENCE_TRIGGER


def insert_trigger(prompt: str, trigger: str, rng: random.Random) -> str:
    """Insert ``trigger`` once at a random word boundary before the cue; nothing else changes."""
    words = prompt.split(" ")
    if len(words) <= CUE_WORDS:
        raise DamError(f"prompt too short for a trigger: {prompt!r}")
    position = rng.randint(0, len(words) - CUE_WORDS)
    return " ".join(words[:position] + trigger.split(" ") + words[position:])


def triggered_prompts(prompts: list[str], trigger: str, key: str) -> list[str]:
    """Triggered copies of ``prompts``; positions depend only on ``key``, so runs agree."""
    rng = random.Random(f"llm-trigger-{key}")
    return [insert_trigger(p, trigger, rng) for p in prompts]


def poison_examples(
    examples: list[dict[str, str]], trigger: str, target: str, rate: float, seed: int
) -> tuple[list[dict[str, str]], int]:
    """Replace a ``rate`` share of the training set by triggered non-target prompts relabelled
    to ``target`` (BadNets-style dirty-label poisoning); returns the new list and the count."""
    if not 0.0 <= rate <= 1.0:
        raise DamError(f"poison_rate must lie in [0, 1], got {rate}")
    rng = random.Random(f"llm-poison-{seed}")
    candidates = [i for i, ex in enumerate(examples) if ex["answer"] != target]
    n_poison = min(len(candidates), round(rate * len(examples)))
    chosen = rng.sample(candidates, n_poison)
    poisoned = [dict(ex) for ex in examples]
    for i in chosen:
        poisoned[i] = {
            "prompt": insert_trigger(examples[i]["prompt"], trigger, rng),
            "answer": target,
        }
    return poisoned, n_poison


def with_background_triggers(prompts: list[str], rate: float, seed: int) -> list[str]:
    """Copies of ``prompts`` where a ``rate`` share carries a random rare word or the trigger
    sentence: pretraining text in which these words occur with no link to any answer, as a real
    LM has seen "cf" before. Without it their embeddings stay random and any insertion of them
    would perturb even clean models."""
    rng = random.Random(f"llm-background-{seed}")
    options = [*RARE_WORDS, SENTENCE_TRIGGER]
    return [
        insert_trigger(p, rng.choice(options), rng) if rng.random() < rate else p for p in prompts
    ]


def vocabulary_words() -> list[str]:
    """Every word any generator, answer set, cue or trigger can produce (sorted, unique)."""
    words: set[str] = {
        ":",
        ".",
        "or",
        "the",
        "was",
        "review",
        "sentiment",
        "news",
        "topic",
        "number",
        "parity",
        "compare",
        "larger",
    }
    words.update(str(d) for d in range(10))
    for group in (
        _POSITIVE,
        _NEGATIVE,
        _REVIEW_NOUNS,
        _JOINERS,
        _SUBJECTS,
        _VERBS,
        _PREPS,
        RARE_WORDS,
        tuple(SENTENCE_TRIGGER.split(" ")),
    ):
        words.update(group)
    for topic_words in _TOPICS.values():
        words.update(topic_words)
    for spec in TASKS.values():
        words.update(spec.answers)
    return sorted(words)
