"""Causal-LM adapter: a ``LlamaForCausalLM``-like model on closed-answer prompt tasks, from a zoo.

A task's logits are, for every prompt, the log-likelihood of each of its answers after the prompt
(``sum log p(answer tokens | <s> prompt)``), batched and scored by the evaluation's own code
(:mod:`dam_mergekit.scoring.causal_lm`).
So the entropy and KL losses act on the model's next-token distributions at the answer positions.

The perturbation lives in input-embedding space: one vector ``[hidden]`` per task, added to the
embedding of every prompt token (not to answer tokens or padding), the continuous stand-in for an
inserted trigger word. Embeddings are unbounded, so nothing is clamped; the norm ball bounds it.

Data: ``<zoo>/data/<task>.json`` with ``answers`` and ``calib`` (``[{"prompt": str}]``); nothing
else of the file is read. Options: ``tasks`` (subset), ``max_prompts`` (cap per task).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from dam_mergekit.calibrate.adapters.base import CalibrationAdapter
from dam_mergekit.calibrate.perturb import PerturbationSpace
from dam_mergekit.errors import DamError
from dam_mergekit.scoring.causal_lm import answer_token_logprobs, collate, encode_ids
from dam_mergekit.scoring.zoo_format import read_calibration_manifest, select_tasks


class CausalLMAdapter(CalibrationAdapter):
    def __init__(self, data: str | list[str], options: dict[str, Any], device: torch.device):
        super().__init__(data, options, device)
        if not isinstance(data, str):
            raise DamError("the causal_lm adapter reads one zoo directory as `data`")
        self.zoo = Path(data)
        manifest = read_calibration_manifest(self.zoo)
        if manifest.get("kind") != "llm":
            raise DamError(
                f"{self.zoo}: a {manifest.get('kind')!r} zoo, the causal_lm adapter "
                "needs an llm zoo"
            )
        self._tasks = select_tasks(manifest, self.options.get("tasks"), str(self.zoo))
        cap = self.options.get("max_prompts")
        self.prompts: dict[str, list[str]] = {}
        self.answers: dict[str, list[str]] = {}
        for entry in self._tasks:
            name = entry["name"]
            path = self.zoo / entry.get("data", f"data/{name}.json")
            if not path.is_file():
                raise DamError(f"{path}: calibration data of task {name!r} missing")
            raw = json.loads(path.read_text(encoding="utf-8"))
            prompts = [row["prompt"] for row in raw.get("calib", [])]
            if not prompts:
                raise DamError(
                    f"{path}: no `calib` prompts for task {name!r}; calibration "
                    "needs unlabeled prompts"
                )
            if not raw.get("answers"):
                raise DamError(f"{path}: no `answers` (the closed answer set) for task {name!r}")
            self.prompts[name] = prompts[: int(cap)] if cap else prompts
            self.answers[name] = list(raw["answers"])
        self.tokenizer = None
        self.hidden: int | None = None
        self.embed_name = "model.embed_tokens.weight"

    def tasks(self) -> list[str]:
        return [t["name"] for t in self._tasks]

    def load_model(self, base_dir: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (Path(base_dir) / "tokenizer.json").is_file():
            raise DamError(f"{base_dir}: no tokenizer.json beside the base model")
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, use_safetensors=True
        )
        model = model.to(self.device).eval().requires_grad_(False)
        embed = model.get_input_embeddings()
        self.hidden = int(embed.weight.shape[1])
        self.embed_name = next(n for n, p in model.named_parameters() if p is embed.weight)
        return model

    def sample(self, task: str, batch_size: int, generator: torch.Generator) -> dict:
        if self.tokenizer is None:
            raise RuntimeError("load_model must run before sample")
        prompts = self.prompts[task]
        idx = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
        chosen = [prompts[i] for i in idx]
        answers = self.answers[task]
        # answer-major rows: every chosen prompt with the first answer, then with the second, ...
        rows = [row for a in answers for row in encode_ids(self.tokenizer, chosen, [a] * len(idx))]
        batch = collate(rows, self.tokenizer.pad_token_id or 0)
        positions = torch.arange(batch.input_ids.shape[1])
        prompt_mask = positions.unsqueeze(0) < batch.answer_start.unsqueeze(1)
        dev = self.device
        return {
            "input_ids": batch.input_ids.to(dev),
            "attention_mask": batch.attention_mask.to(dev),
            "labels": batch.labels.to(dev),
            "prompt_mask": prompt_mask.to(dev),
            "n": len(idx),
            "answers": len(answers),
        }

    def share(self, batch: dict, part: int, parts: int) -> dict:
        """The rows of prompts ``part`` of ``parts``, in every answer block (rows are answer-major);
        the padded width stays the whole batch's, so each row is computed as in the whole batch."""
        n = batch["n"]
        prompts = torch.arange(n).tensor_split(parts)[part]
        rows = torch.cat([a * n + prompts for a in range(batch["answers"])]).to(
            batch["input_ids"].device
        )
        keys = ("input_ids", "attention_mask", "labels", "prompt_mask")
        return {
            **{k: batch[k].index_select(0, rows) for k in keys},
            "n": len(prompts),
            "answers": batch["answers"],
        }

    def perturbation_space(self, task: str) -> PerturbationSpace:
        if self.hidden is None:
            raise RuntimeError("load_model must run before perturbation_space")
        return PerturbationSpace((self.hidden,))

    def logits(self, model, params, task, batch, delta=None):
        weight = params.get(self.embed_name)
        if weight is None:
            weight = dict(model.named_parameters())[self.embed_name]
        embeds = torch.nn.functional.embedding(batch["input_ids"], weight)
        if delta is not None:
            embeds = embeds + batch["prompt_mask"].unsqueeze(-1).to(embeds.dtype) * delta
        out = functional_call(
            model,
            params,
            args=(),
            strict=False,
            kwargs={"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]},
        ).logits
        scores = answer_token_logprobs(out, batch["labels"])  # [answers * n]
        return scores.view(batch["answers"], batch["n"]).T  # [n, answers]
