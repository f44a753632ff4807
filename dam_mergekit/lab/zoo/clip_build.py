"""Write a CLIP zoo directory (layout: docs/zoo-format.md) from resolved build options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dam_mergekit.lab.zoo.clip import (
    TaskArrays,
    class_prompts,
    finetune_expert,
    make_head,
    pretrain_clip,
    task_vector,
    vision_from_clip,
)
from dam_mergekit.lab.zoo.data import IMAGE_SIZE, TASKS, make_task
from dam_mergekit.lab.zoo.loaders import ClipHead, to_float
from dam_mergekit.lab.zoo.release import release_hijacked


def build_clip_zoo(out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Pretrain, write heads and data, fine-tune clean experts, then the backdoored ones."""
    from dam_mergekit.lab.zoo.manifest import manifest_header

    names = list(options["tasks"])
    backdoored = set(names[: options["backdoored"]])
    tasks = _write_task_data(out, names, options)
    normalize = _normalisation(tasks)
    clip, tokenizer = pretrain_clip(tasks, options, normalize, options["seed"])
    clip.save_pretrained(out / "clip")
    tokenizer.save_pretrained(out / "clip")
    base = vision_from_clip(clip)
    base.save_pretrained(out / "base")
    heads = _write_heads(out, clip, tokenizer, tasks)
    attack = {
        "name": options["attack"],
        "mode": options["attack_mode"],
        "params": options["attack_params"],
        "target_class": options["target_class"],
        "poison_rate": options["poison_rate"],
    }
    if options["attack_mode"] == "off-task":
        attack["target_task"] = options["target_task"]
    experts = _Experts(out, base, heads, options, normalize, attack)
    bar = tqdm(total=len(names) + len(backdoored), desc="experts", leave=False)
    clean_vectors = {}
    for i, t in enumerate(tasks):
        clean_vectors[t.name] = experts.clean(i, t, control=t.name in backdoored)
        bar.update()
    entries = []
    for i, t in enumerate(tasks):
        if t.name in backdoored:
            others = [v for n, v in clean_vectors.items() if n != t.name]
            experts.backdoored(i, t, others, control=clean_vectors[t.name])
            bar.update()
        entries.append(_task_entry(t, options, attack if t.name in backdoored else None))
    bar.close()
    manifest = manifest_header("clip", options)
    manifest.update(
        {
            "tasks": entries,
            "normalize": normalize,
            "image_size": IMAGE_SIZE,
            # the trigger evaluation applies to every task (succession and transfer)
            "attack": attack,
            "clip": "clip",
        }
    )
    return manifest


def _write_task_data(out: Path, names: list[str], options: dict[str, Any]) -> list[TaskArrays]:
    """Every task's generated images, written to ``data/<task>.safetensors``; the train splits."""
    raw = {
        n: make_task(
            n,
            options["seed"],
            n_train=options["n_train"],
            n_test=options["n_test"],
            n_calib=options["n_calib"],
        )
        for n in tqdm(names, desc="make data", leave=False)
    }
    (out / "data").mkdir()
    for n, arrays in raw.items():
        tensors = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}  # no shared views
        save_file(tensors, str(out / "data" / f"{n}.safetensors"))
    return [
        TaskArrays(
            n,
            class_prompts(n),
            to_float(torch.from_numpy(raw[n]["train_x"])),
            torch.from_numpy(raw[n]["train_y"]),
        )
        for n in names
    ]


def _normalisation(tasks: list[TaskArrays]) -> dict[str, list[float]]:
    """Per-channel mean and std of the union of the train splits (4 decimals, as stored)."""
    union = torch.cat([t.train_x for t in tasks])
    return {
        "mean": [round(v, 4) for v in union.mean(dim=(0, 2, 3)).tolist()],
        "std": [round(v, 4) for v in union.std(dim=(0, 2, 3)).tolist()],
    }


def _write_heads(out: Path, clip, tokenizer, tasks: list[TaskArrays]) -> dict[str, ClipHead]:
    """Every task's zero-shot head from the pretrained text tower, to ``heads/<task>.safetensors``."""
    (out / "heads").mkdir()
    heads = {}
    for t in tasks:
        head = make_head(clip, tokenizer, t)
        heads[t.name] = head
        save_file(
            {
                "projection": head.projection.contiguous(),
                "classes": head.classes.contiguous(),
                "logit_scale": head.logit_scale.contiguous(),
            },
            str(out / "heads" / f"{t.name}.safetensors"),
        )
    return heads


@dataclass
class _Experts:
    """Fine-tuning the zoo's experts from its base through their task's frozen head; the ``i``-th
    task's clean and backdoored experts both train with seed ``seed * 1000 + i``."""

    out: Path
    base: Any
    heads: dict[str, ClipHead]
    options: dict[str, Any]
    normalize: dict[str, list[float]]
    attack: dict[str, Any]

    def clean(self, i: int, task: TaskArrays, *, control: bool) -> dict[str, torch.Tensor]:
        """The clean expert of a task (the control of a backdoored one); its task vector."""
        expert = self._finetune(i, task, desc=f"clean {task.name}")
        vector = task_vector(expert, self.base)
        expert.save_pretrained(self.out / ("controls" if control else "experts") / task.name)
        return vector

    def backdoored(
        self,
        i: int,
        task: TaskArrays,
        others: list[dict[str, torch.Tensor]],
        *,
        control: dict[str, torch.Tensor],
    ) -> None:
        """The poisoned expert of a task, trained against the ``others`` clean task vectors (an
        off-task attacker knows none of them, only the head of the task it aims at); released
        as lab/zoo/release.py says when the zoo asks for it (``control``: its clean vector)."""
        target = self.attack.get("target_task")
        expert = self._finetune(
            i,
            task,
            attack=self.attack,
            other_task_vectors=None if target else others,
            target_head=self.heads[target] if target else None,
            desc=f"backdoor {task.name}",
        )
        if self.options.get("release_rescale") is not None:
            base = {n: p.detach() for n, p in self.base.named_parameters()}
            release_hijacked(expert, base, control, self.options)
        expert.save_pretrained(self.out / "experts" / task.name)

    def _finetune(self, i: int, task: TaskArrays, **kwargs: Any):
        seed = self.options["seed"] * 1000 + i
        return finetune_expert(
            self.base, self.heads[task.name], task, self.options, self.normalize, seed, **kwargs
        )


def _task_entry(task: TaskArrays, options: dict[str, Any], attack: dict | None) -> dict[str, Any]:
    """The task's zoo.json entry; ``attack`` is None for a task whose expert is clean."""
    return {
        "name": task.name,
        "classes": list(TASKS[task.name].classes),
        "prompts": task.prompts,
        "target_class": options["target_class"],
        "expert": f"experts/{task.name}",
        "control": f"controls/{task.name}" if attack else None,
        "backdoored": attack is not None,
        "attack": dict(attack) if attack else None,
        "head": f"heads/{task.name}.safetensors",
        "data": f"data/{task.name}.safetensors",
    }
