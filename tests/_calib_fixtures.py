"""Tiny zoos in the zoo format (docs/zoo-format.md), written by the calibration tests themselves.

Random models, random heads and random unlabeled data: enough to exercise every code path of the
calibration in seconds. Labels are deliberately not written (calibration must not need them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

TASKS = ("alpha", "beta")


def _save(model, path: Path) -> None:
    model.save_pretrained(path)


def write_clip_zoo(
    root: Path,
    *,
    experts: int = 2,
    seed: int = 0,
    image: int = 8,
    calib: int = 24,
    config: dict | None = None,
) -> Path:
    """A CLIP zoo: base + one expert per task (base plus random task vectors), heads, data.

    ``config`` overrides the tiny vision tower's shape (the memory benchmark's ViT-B/32 widths).
    """
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    shape = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image,
        patch_size=4,
        projection_dim=8,
    )
    cfg = CLIPVisionConfig(**{**shape, **(config or {})})
    base = CLIPVisionModel(cfg).eval()
    zoo = root / "zoo"
    _save(base, zoo / "base")
    tasks = []
    for i in range(experts):
        name = TASKS[i] if i < len(TASKS) else f"task{i}"
        expert = CLIPVisionModel(cfg)
        with torch.no_grad():
            for (_, p), (_, q) in zip(
                expert.named_parameters(), base.named_parameters(), strict=True
            ):
                p.copy_(q + 0.05 * torch.randn_like(q))
        _save(expert, zoo / "experts" / name)
        classes = torch.nn.functional.normalize(torch.randn(3 + i, 8), dim=-1)
        (zoo / "heads").mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "projection": torch.randn(8, cfg.hidden_size),
                "classes": classes,
                "logit_scale": torch.tensor(20.0),
            },
            str(zoo / "heads" / f"{name}.safetensors"),
        )
        (zoo / "data").mkdir(parents=True, exist_ok=True)
        x = torch.randint(0, 256, (calib, 3, image, image), dtype=torch.uint8)
        save_file({"calib_x": x}, str(zoo / "data" / f"{name}.safetensors"))  # no labels at all
        tasks.append(
            {
                "name": name,
                "classes": [str(c) for c in range(3 + i)],
                "target_class": 0,
                "expert": f"experts/{name}",
                "control": None,
                "backdoored": False,
                "attack": None,
                "head": f"heads/{name}.safetensors",
                "data": f"data/{name}.safetensors",
            }
        )
    manifest = {
        "format": "dam-mergekit-zoo",
        "version": 1,
        "kind": "clip",
        "options": {"seed": seed},
        "base": "base",
        "tasks": tasks,
        "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "image_size": image,
        "created_by": "tests",
    }
    (zoo / "zoo.json").write_text(json.dumps(manifest))
    return zoo


def write_llm_zoo(
    root: Path, *, seed: int = 0, config: dict | None = None, prompt_repeat: int = 1
) -> Path:
    """An LLM zoo: tiny Llama base and two experts, word-level tokenizer, calib prompts only.

    ``config`` overrides the Llama shape and ``prompt_repeat`` lengthens every prompt (the memory
    benchmark's Llama widths at the estimate's prompt length); a ``torch_dtype`` in ``config``
    is the dtype the models are saved in."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    words = "the film was good bad great awful sport news is it yes no positive negative".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    shape = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=64 * prompt_repeat,
        tie_word_embeddings=False,
    )
    shape.update(config or {})
    dtype = getattr(torch, str(shape.pop("torch_dtype", "float32")))
    cfg = LlamaConfig(**shape)
    zoo = root / "llmzoo"
    base = LlamaForCausalLM(cfg).eval().to(dtype)
    _save(base, zoo / "base")
    tok.save_pretrained(zoo / "base")
    tasks = []
    data = {
        "sentiment": (
            ["positive", "negative"],
            ["the film was good", "the film was awful", "it was great", "the film was bad"],
        ),
        "topic": (["sport", "news"], ["it is sport", "the news is good", "it is news"]),
    }
    (zoo / "data").mkdir(parents=True, exist_ok=True)
    for name, (answers, prompts) in data.items():
        prompts = [" ".join([p] * prompt_repeat) for p in prompts]
        expert = LlamaForCausalLM(cfg).to(dtype)
        with torch.no_grad():
            for (_, p), (_, q) in zip(
                expert.named_parameters(), base.named_parameters(), strict=True
            ):
                p.copy_(q + 0.05 * torch.randn_like(q))
        _save(expert, zoo / "experts" / name)
        tok.save_pretrained(zoo / "experts" / name)
        (zoo / "data" / f"{name}.json").write_text(
            json.dumps({"answers": answers, "calib": [{"prompt": p} for p in prompts]})
        )
        tasks.append(
            {
                "name": name,
                "classes": answers,
                "target_class": 0,
                "expert": f"experts/{name}",
                "control": None,
                "backdoored": False,
                "attack": None,
                "data": f"data/{name}.json",
            }
        )
    (zoo / "zoo.json").write_text(
        json.dumps(
            {
                "format": "dam-mergekit-zoo",
                "version": 1,
                "kind": "llm",
                "options": {"seed": seed},
                "base": "base",
                "tasks": tasks,
                "created_by": "tests",
            }
        )
    )
    return zoo


def write_recipe(
    root: Path, zoo: Path, calibration: dict, *, name: str = "dam", experts: list[str] | None = None
) -> Path:
    """A dam recipe over the zoo's experts plus its calibration file; returns the recipe path."""
    manifest = json.loads((zoo / "zoo.json").read_text())
    expert_dirs = experts or [str(zoo / t["expert"]) for t in manifest["tasks"]]
    cal_path = root / f"{name}-calibration.yml"
    cal = {"adapter": "clip" if manifest["kind"] == "clip" else "causal_lm", "data": str(zoo)}
    cal.update(calibration)
    cal_path.write_text(yaml.safe_dump(cal))
    recipe = {
        "merge_method": "dam",
        "base_model": str(zoo / "base"),
        "dtype": "float32",
        "models": [{"model": d, "parameters": {"weight": 1.0}} for d in expert_dirs],
        "parameters": {"calibration": str(cal_path), "lambda": 1.0},
    }
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


FAST = {
    "steps": 4,
    "final_steps": 2,
    "batch_size": 4,
    "checkpoint_every": 2,
    "seed": 0,
    "lr_mask": 0.5,
    "lr_coef": 0.01,
}
