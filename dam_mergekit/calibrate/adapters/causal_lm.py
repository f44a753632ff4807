"""Causal-LM adapter: a ``LlamaForCausalLM``-like model on closed-answer prompt tasks, from a zoo.

A task's logits are, for every prompt, the log-likelihood of each of its answers after the prompt
(``sum log p(answer tokens | <s> prompt)``), the same closed-set scoring the LLM zoo evaluates with.
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
from dam_mergekit.calibrate.adapters.zoo import read_manifest, select_tasks
from dam_mergekit.calibrate.perturb import PerturbationSpace
from dam_mergekit.errors import DamError


class CausalLMAdapter(CalibrationAdapter):
    def __init__(self, data: str | list[str], options: dict[str, Any], device: torch.device):
        super().__init__(data, options, device)
        if not isinstance(data, str):
            raise DamError("the causal_lm adapter reads one zoo directory as `data`")
        self.zoo = Path(data)
        manifest = read_manifest(self.zoo)
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
        self._answer_ids = {
            t: self.tokenizer(a, add_special_tokens=False)["input_ids"]
            for t, a in self.answers.items()
        }
        return model

    def sample(self, task: str, batch_size: int, generator: torch.Generator) -> dict:
        if self.tokenizer is None:
            raise RuntimeError("load_model must run before sample")
        prompts = self.prompts[task]
        idx = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
        ids = self.tokenizer([prompts[i] for i in idx], add_special_tokens=True)["input_ids"]
        rows, starts, owners = [], [], []
        for a, answer in enumerate(self._answer_ids[task]):
            for p in ids:
                rows.append(p + answer)
                starts.append((len(p), len(answer)))
                owners.append(a)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        prompt_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, (start, n)) in enumerate(zip(rows, starts, strict=True)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            labels[i, start : start + n] = input_ids[i, start : start + n]
            prompt_mask[i, :start] = True
        dev = self.device
        return {
            "input_ids": input_ids.to(dev),
            "attention_mask": attention.to(dev),
            "labels": labels.to(dev),
            "prompt_mask": prompt_mask.to(dev),
            "n": len(ids),
            "answers": len(self._answer_ids[task]),
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
        logp = torch.log_softmax(out[:, :-1].float(), dim=-1)
        target = batch["labels"][:, 1:]
        keep = target != -100
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        scores = (picked * keep).sum(dim=1)  # [answers * n]
        return scores.view(batch["answers"], batch["n"]).T  # [n, answers]

    def activation_bytes(self, batch_size: int) -> int:
        from dam_mergekit.calibrate.estimate import causal_lm_activation_bytes

        answers = max(len(a) for a in self.answers.values())
        return causal_lm_activation_bytes(batch_size, answers, self.hidden or 256)
