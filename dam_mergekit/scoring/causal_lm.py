"""The causal-LM prediction of a zoo task: the log-likelihood of each answer of a closed set.

For a prompt and its task's answers, the score of an answer is
``sum log p(answer tokens | <s> prompt)``; the predicted answer is the best score. Evaluation
(``dam_mergekit.lab.zoo.llm.score_answers``), the zoo's training loss and the calibration adapter all
batch with :func:`encode_ids` / :func:`collate` and score with :func:`answer_token_logprobs`.

A trainer gets, for a batch of prompts (and optionally answers), the input ids and the position
where the answer starts from :func:`encode_prompts`: the next-token distribution at
``answer_start - 1`` is the model's distribution over the answer's first token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PromptBatch:
    """A right-padded batch of ``<s> prompt [answer] [</s>]``.

    ``answer_start[i]`` is the index of the answer's first token in row i (= the prompt length
    with ``<s>``); ``logits[i, answer_start[i] - 1]`` predicts it. ``answer_len[i]`` is 0 when no
    answer was given. ``labels`` holds the answer token ids and -100 elsewhere (shifted loss is
    taken by :func:`answer_token_logprobs`, not by transformers).
    """

    input_ids: torch.Tensor  # [N, T] int64
    attention_mask: torch.Tensor  # [N, T] int64
    answer_start: torch.Tensor  # [N] int64
    answer_len: torch.Tensor  # [N] int64
    labels: torch.Tensor  # [N, T] int64, -100 outside answers


def encode_ids(
    tokenizer, prompts: Sequence[str], answers: Sequence[str] | None = None, add_eos: bool = False
) -> list[tuple[list[int], int, int]]:
    """Token ids of each ``<s> prompt [answer] [</s>]`` with (answer_start, answer_len)."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    answer_ids = (
        [[] for _ in prompts]
        if answers is None
        else tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    )
    eos = [tokenizer.eos_token_id] if add_eos else []
    return [(p + a + eos, len(p), len(a)) for p, a in zip(prompt_ids, answer_ids, strict=True)]


def collate(rows: Sequence[tuple[list[int], int, int]], pad_id: int) -> PromptBatch:
    """Right-pad encoded rows into a :class:`PromptBatch`."""
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, start, n_answer) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        labels[i, start : start + n_answer] = input_ids[i, start : start + n_answer]
    return PromptBatch(
        input_ids,
        attention_mask,
        torch.tensor([s for _, s, _ in rows], dtype=torch.long),
        torch.tensor([n for _, _, n in rows], dtype=torch.long),
        labels,
    )


def encode_prompts(
    tokenizer, prompts: Sequence[str], answers: Sequence[str] | None = None, add_eos: bool = False
) -> PromptBatch:
    """Batch prompts (and answers) for a causal LM; see :class:`PromptBatch` for positions."""
    return collate(encode_ids(tokenizer, prompts, answers, add_eos), tokenizer.pad_token_id)


def answer_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of log p(answer tokens | prefix) from full-sequence logits [N, T, V]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


def answer_first_token_ids(tokenizer, answers: Sequence[str]) -> list[int]:
    """The id of each answer's first token (one per answer; the zoo's answers are one word)."""
    return [ids[0] for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]]


def logits_at_answer(logits: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """Next-token logits [N, V] at the position that predicts each row's first answer token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.answer_start.to(logits.device) - 1]
