"""Training loops for the LLM zoo: LM pretraining, answer fine-tuning and the merge-aware attack.

The merge-aware attack (a simple stand-in for merge-robust backdoors such as BadMerging or Merge
Hijacking, not their method) takes every step's loss twice: on the expert itself and on a
simulated task-arithmetic merge ``base + s * (theta - base) + sum_j c_j * tau_j`` with
``s ~ U(s_min, s_max)`` and each other expert's task vector ``tau_j`` included with probability
1/2 at ``c_j ~ U(s_min, s_max)``. Gradients reach ``theta`` through the merge, so the backdoor is
learned to survive down-scaling and mixing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from dam_mergekit.lab.zoo.merge_aware import MERGE_SCALE, draw_scale
from dam_mergekit.lab.zoo.tokenizer import PromptBatch, answer_token_logprobs, collate

Row = tuple[list[int], int, int]


@dataclass
class MergeSimulator:
    """Samples simulated merges around the expert in training (the attacker's model of a merge)."""

    base: dict[str, torch.Tensor]
    others: list[dict[str, torch.Tensor]]  # other experts' task vectors
    scale_range: tuple[float, float] = MERGE_SCALE
    scale_draw: str = "uniform"  # the expert's own scale; log-uniform: merge_aware.draw_scale

    def merged(
        self, params: dict[str, torch.Tensor], gen: torch.Generator
    ) -> dict[str, torch.Tensor]:
        lo, hi = self.scale_range
        if self.scale_draw == "uniform":  # this zoo's own uniform draw, as before the option
            scale = lo + (hi - lo) * torch.rand((), generator=gen).item()
        else:
            scale = draw_scale(lo, hi, self.scale_draw, gen)
        coefs = []
        for _ in self.others:
            keep = torch.rand((), generator=gen).item() < 0.5
            draw = lo + (hi - lo) * torch.rand((), generator=gen).item()
            coefs.append(draw if keep else 0.0)
        out = {}
        for name, theta in params.items():
            merged = self.base[name] + scale * (theta - self.base[name])
            for coef, tau in zip(coefs, self.others, strict=True):
                if coef:
                    merged = merged + coef * tau[name]
            out[name] = merged
        return out


def _sequence_loss(logits: torch.Tensor, batch: PromptBatch, full_lm: bool) -> torch.Tensor:
    """Mean next-token loss on answer tokens (fine-tuning) or on every real token (pretraining)."""
    if full_lm:
        target = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            ignore_index=-100,
        )
    n_tokens = batch.answer_len.sum().clamp_min(1)
    return -answer_token_logprobs(logits, batch.labels).sum() / n_tokens


def train(
    model: torch.nn.Module,
    rows: Sequence[Row],
    *,
    pad_id: int,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    full_lm: bool = False,
    desc: str = "train",
    simulator: MergeSimulator | None = None,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay on random batches of ``rows``; returns losses.

    With ``simulator`` every step adds the loss of a sampled simulated merge (merge-aware attack).
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay
        cosine = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)).item())
        return min(1.0, (step + 1) / warmup) * cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    names = [n for n, _ in model.named_parameters()]
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        batch = collate([rows[rng.randrange(len(rows))] for _ in range(batch_size)], pad_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = _sequence_loss(logits, batch, full_lm)
        if simulator is not None:
            params = dict(zip(names, model.parameters(), strict=True))
            merged = simulator.merged(params, gen)
            merged_logits = functional_call(
                model,
                merged,
                (),
                {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
            ).logits
            loss = loss + _sequence_loss(merged_logits, batch, full_lm)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


def task_vector(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """theta - base for every parameter (detached)."""
    return {n: (p.detach() - base[n]).clone() for n, p in model.named_parameters()}
