"""Write a CLIP zoo directory (layout: docs/zoo-format.md) from resolved build options."""

from __future__ import annotations

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
from dam_mergekit.lab.zoo.loaders import to_float


def build_clip_zoo(out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Pretrain, write heads and data, fine-tune clean experts, then the backdoored ones."""
    from dam_mergekit.lab.zoo.manifest import manifest_header

    seed = options["seed"]
    names = list(options["tasks"])
    backdoored = set(names[: options["backdoored"]])
    raw = {
        n: make_task(
            n,
            seed,
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
    tasks = [
        TaskArrays(
            n,
            class_prompts(n),
            to_float(torch.from_numpy(raw[n]["train_x"])),
            torch.from_numpy(raw[n]["train_y"]),
        )
        for n in names
    ]
    union = torch.cat([t.train_x for t in tasks])
    normalize = {
        "mean": [round(v, 4) for v in union.mean(dim=(0, 2, 3)).tolist()],
        "std": [round(v, 4) for v in union.std(dim=(0, 2, 3)).tolist()],
    }
    del union

    clip, tokenizer = pretrain_clip(tasks, options, normalize, seed)
    clip.save_pretrained(out / "clip")
    tokenizer.save_pretrained(out / "clip")
    base = vision_from_clip(clip)
    base.save_pretrained(out / "base")

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

    attack = {
        "name": options["attack"],
        "mode": options["attack_mode"],
        "params": options["attack_params"],
        "target_class": options["target_class"],
        "poison_rate": options["poison_rate"],
    }
    clean_vectors: dict[str, dict[str, torch.Tensor]] = {}
    entries = []
    bar = tqdm(total=len(names) + len(backdoored), desc="experts", leave=False)
    for i, t in enumerate(tasks):
        expert = finetune_expert(
            base, heads[t.name], t, options, normalize, seed * 1000 + i, desc=f"clean {t.name}"
        )
        clean_vectors[t.name] = task_vector(expert, base)
        folder = "controls" if t.name in backdoored else "experts"
        expert.save_pretrained(out / folder / t.name)
        bar.update()
    for i, t in enumerate(tasks):
        if t.name in backdoored:
            others = [v for n, v in clean_vectors.items() if n != t.name]
            expert = finetune_expert(
                base,
                heads[t.name],
                t,
                options,
                normalize,
                seed * 1000 + i,
                attack=attack,
                other_task_vectors=others,
                desc=f"backdoor {t.name}",
            )
            expert.save_pretrained(out / "experts" / t.name)
            bar.update()
        entries.append(
            {
                "name": t.name,
                "classes": list(TASKS[t.name].classes),
                "prompts": t.prompts,
                "target_class": options["target_class"],
                "expert": f"experts/{t.name}",
                "control": f"controls/{t.name}" if t.name in backdoored else None,
                "backdoored": t.name in backdoored,
                "attack": dict(attack) if t.name in backdoored else None,
                "head": f"heads/{t.name}.safetensors",
                "data": f"data/{t.name}.safetensors",
            }
        )
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
