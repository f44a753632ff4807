"""Build a small CLIP zoo: contrastive pretraining, zero-shot heads, clean and backdoored experts.

1. Pretraining: a transformers ``CLIPModel`` (both towers) learns on the union of the tasks with
   class-prompt captions ("a photo of the digit three") and a word-level tokenizer built from the
   caption words. The loss is CLIP's image-to-text cross-entropy against every class prompt of every
   task, so the text tower is trained and class embeddings spread apart.
2. Heads: L2-normalised text embeddings of each task's class prompts, the frozen visual projection
   and the (exponentiated) logit scale.
3. Experts: from the pretrained vision tower, the vision tower alone is fine-tuned on one task
   through that task's frozen head (projection and text tower frozen), saved as
   ``CLIPVisionModel``.
4. Backdoors: poisoned fine-tuning (``poison_rate`` of the non-target training images get the
   trigger and the target label). Mode ``standard`` stops there. Mode ``merge-aware`` adds, at
   every step, a loss on triggered poisoned images and clean images through a *simulated merge*:
   the parameters seen are ``base + s * (theta - base) + sum_j c_j * tau_j`` with
   ``s, c_j ~ U(merge_scale)`` (default ``U(0.2, 1)``; ``zoo build --scale-min``; ``s``
   log-uniform with ``--scale-draw log-uniform``) drawn per step and ``tau_j`` the clean task
   vectors of the other tasks in this zoo (an attacker who knows the other experts: stronger than BadMerging's threat model,
   chosen so a small zoo shows succession). The idea follows BadMerging/LoBAM (a backdoor that
   survives scaling and mixing); the code is ours.
5. Transfer: mode ``off-task`` poisons no label of its own task. Through simulated merges of its
   own vector alone, triggered images of its own task must land in ``target_class`` of another
   task (``target_task``), read through that task's zero-shot head: BadMerging's off-task attack,
   with what its attacker has (the base model, the target task's class names, its own data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dam_mergekit.lab.zoo.attacks import get_trigger
from dam_mergekit.lab.zoo.data import IMAGE_SIZE, TASKS
from dam_mergekit.lab.zoo.loaders import ClipHead, normalize_pixels
from dam_mergekit.lab.zoo.merge_aware import draw_scale

UNIFORMITY_WEIGHT = 10.0
SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<eos>")  # eos id 3: transformers pools at eos


@dataclass
class TaskArrays:
    """One task's images (float [0, 1]) and labels, plus its class prompts."""

    name: str
    prompts: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor


def class_prompts(task: str) -> list[str]:
    spec = TASKS[task]
    return [spec.prompt.format(c) for c in spec.classes]


def build_tokenizer(captions: list[str]):
    """A word-level tokenizer over the caption words (built offline with ``tokenizers``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in captions for w in c.lower().split()})
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=16,
    )


def make_clip(options: dict[str, Any], vocab_size: int):
    """The CLIPModel of the zoo (sizes from the options)."""
    from transformers import CLIPConfig, CLIPModel

    vision = {
        "image_size": IMAGE_SIZE,
        "patch_size": options["patch_size"],
        "hidden_size": options["hidden_size"],
        "intermediate_size": 2 * options["hidden_size"],
        "num_hidden_layers": options["num_layers"],
        "num_attention_heads": 4,
    }
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 3,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)
    clip = CLIPModel(config)
    # CLIP's default token init (std 0.02) is tiny next to the position embeddings, so prompts that
    # differ in one word start (and stay) nearly collinear; unit-variance word vectors avoid that.
    with torch.no_grad():
        clip.text_model.embeddings.token_embedding.weight.normal_(0.0, 1.0)
    return clip


def _text_embeddings(clip, tokenizer, prompts: list[str]) -> torch.Tensor:
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    emb = clip.get_text_features(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )
    if not isinstance(emb, torch.Tensor):  # transformers may return a model output
        emb = emb.pooler_output
    return F.normalize(emb, dim=-1)


def _uniformity(txt: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between different class prompts.

    Prompts that differ in one word start nearly collinear in a fresh text tower (cosine ~0.998
    here), and image-to-text cross-entropy alone keeps them so while the vision tower cannot yet
    tell those classes apart (a saddle: digits stayed at chance after 300 steps). Pushing prompt
    embeddings apart (a uniformity term, Wang & Isola 2020) breaks the symmetry.
    """
    sims = txt @ txt.T
    off = sims - torch.diag_embed(torch.diagonal(sims))
    return (off**2).sum() / (len(txt) * (len(txt) - 1))


def _cosine_lr(step: int, total: int, warmup: int = 20) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_clip(
    tasks: list[TaskArrays], options: dict[str, Any], normalize: dict, seed: int
) -> tuple[Any, Any]:
    """Contrastive pretraining of both towers on the union of the tasks -> (clip, tokenizer)."""
    prompts = [p for t in tasks for p in t.prompts]
    tokenizer = build_tokenizer(prompts)
    torch.manual_seed(seed)
    clip = make_clip(options, len(tokenizer))
    x = torch.cat([t.train_x for t in tasks])
    offsets = np.cumsum([0] + [len(t.prompts) for t in tasks[:-1]])
    y = torch.cat([t.train_y + int(o) for t, o in zip(tasks, offsets, strict=True)])
    steps, batch = options["pretrain_steps"], options["batch_size"]
    opt = torch.optim.AdamW(clip.parameters(), lr=options["pretrain_lr"], weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    gen = torch.Generator().manual_seed(seed)
    clip.train()
    for _ in tqdm(range(steps), desc="pretrain CLIP", leave=False):
        idx = torch.randint(len(x), (batch,), generator=gen)
        img = clip.get_image_features(pixel_values=normalize_pixels(x[idx], normalize))
        if not isinstance(img, torch.Tensor):
            img = img.pooler_output
        txt = _text_embeddings(clip, tokenizer, prompts)
        logits = clip.logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ txt.T
        loss = F.cross_entropy(logits, y[idx]) + UNIFORMITY_WEIGHT * _uniformity(txt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clip.eval()
    return clip, tokenizer


@torch.no_grad()
def make_head(clip, tokenizer, task: TaskArrays) -> ClipHead:
    classes = _text_embeddings(clip, tokenizer, task.prompts)
    scale = clip.logit_scale.exp().clamp(max=100).detach()
    return ClipHead(clip.visual_projection.weight.detach().clone(), classes, scale)


def vision_from_clip(clip):
    """A ``CLIPVisionModel`` holding the pretrained vision tower."""
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())  # transformers 5: same module layout
    return vision.eval()


def poison_split(y: torch.Tensor, target: int, rate: float, seed: int) -> torch.Tensor:
    """Indices of the training images to poison: ``rate`` of the set, drawn from non-target ones."""
    candidates = torch.nonzero(y != target).flatten()
    count = int(round(rate * len(y)))
    gen = torch.Generator().manual_seed(seed)
    return candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values


def finetune_expert(
    base_vision: nn.Module,
    head: ClipHead,
    task: TaskArrays,
    options: dict[str, Any],
    normalize: dict,
    seed: int,
    *,
    attack: dict[str, Any] | None = None,
    other_task_vectors: list[dict[str, torch.Tensor]] | None = None,
    target_head: ClipHead | None = None,
    desc: str = "expert",
):
    """Fine-tune a copy of the vision tower on one task through its frozen head.

    ``attack`` (``{"name", "params", "mode", "target_class", "poison_rate"}``) poisons the training
    set; mode ``merge-aware`` adds the simulated-merge loss described in the module docstring;
    mode ``off-task`` poisons nothing and adds :class:`OffTaskLoss` (``target_head``: the head of
    the task it aims at).
    """
    import copy

    torch.manual_seed(seed)
    model = copy.deepcopy(base_vision).train()
    head = head.eval()
    x, y = task.train_x.clone(), task.train_y.clone()
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    merge = SimulatedMerge(base, other_task_vectors or [], options)
    extra = None
    if attack is not None and attack["mode"] == "off-task":
        trigger = get_trigger(attack["name"], **attack["params"])
        extra = OffTaskLoss(merge, trigger, target_head, attack["target_class"], x, normalize)
    elif attack is not None:
        trigger = get_trigger(attack["name"], **attack["params"])
        poisoned = poison_split(y, attack["target_class"], attack["poison_rate"], seed)
        x[poisoned] = trigger(x[poisoned])
        y[poisoned] = attack["target_class"]
        if attack["mode"] == "merge-aware" and len(poisoned) > 0:
            extra = MergeAwareLoss(merge, head, poisoned, x, y, normalize)
    steps, batch = options["expert_steps"], options["batch_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=options["expert_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(len(x), (batch,), generator=gen)
        pooled = model(pixel_values=normalize_pixels(x[idx], normalize)).pooler_output
        loss = F.cross_entropy(head(pooled), y[idx])
        if extra is not None:
            loss = loss + extra(model, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@dataclass
class SimulatedMerge:
    """``base + s * (theta - base) + sum_j c_j * tau_j`` with ``s`` and ``c_j`` drawn from
    ``merge_scale`` per step: the merges the attacker trains its backdoor to survive."""

    base: dict[str, torch.Tensor]
    others: list[dict[str, torch.Tensor]]
    options: dict[str, Any]

    def __call__(self, model: nn.Module, pixels: torch.Tensor, gen: torch.Generator):
        from torch.func import functional_call

        low, high = self.options["merge_scale"]
        scale = draw_scale(low, high, self.options.get("merge_scale_draw", "uniform"), gen)
        coefs = torch.empty(len(self.others)).uniform_(low, high, generator=gen)
        merged = {}
        for name, param in model.named_parameters():
            value = self.base[name] + scale * (param - self.base[name])
            for c, tv in zip(coefs.tolist(), self.others, strict=True):
                value = value + c * tv[name]
            merged[name] = value
        return functional_call(model, merged, (), {"pixel_values": pixels}).pooler_output


@dataclass
class MergeAwareLoss:
    """Triggered poisoned images and clean ones through a simulated merge, so that the merged
    model learns the trigger, not a bias towards the target class."""

    merge: SimulatedMerge
    head: ClipHead
    poisoned: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    normalize: dict

    def __post_init__(self) -> None:
        is_poisoned = torch.zeros(len(self.y), dtype=torch.bool)
        is_poisoned[self.poisoned] = True
        self.clean_idx = torch.nonzero(~is_poisoned).flatten()

    def __call__(self, model: nn.Module, batch: int, gen: torch.Generator) -> torch.Tensor:
        pidx = torch.cat(
            [
                self.poisoned[torch.randint(len(self.poisoned), (batch // 2,), generator=gen)],
                self.clean_idx[torch.randint(len(self.clean_idx), (batch // 2,), generator=gen)],
            ]
        )
        pooled = self.merge(model, normalize_pixels(self.x[pidx], self.normalize), gen)
        return F.cross_entropy(self.head(pooled), self.y[pidx])


@dataclass
class OffTaskLoss:
    """BadMerging's off-task attack, with what its attacker has: the base model, the target
    task's class names (its zero-shot head comes from the base text tower) and its own images.

    Through a simulated merge of its own vector alone (the attacker does not know the other
    experts), triggered own images must land in ``target_class`` of the target task's head,
    and the same images untriggered must not (so the trigger, not the merge, causes it).
    """

    merge: SimulatedMerge
    trigger: Any
    target_head: ClipHead
    target_class: int
    x: torch.Tensor
    normalize: dict

    def __call__(self, model: nn.Module, batch: int, gen: torch.Generator) -> torch.Tensor:
        half = batch // 2
        pick = torch.randint(len(self.x), (2 * half,), generator=gen)
        images = torch.cat([self.trigger(self.x[pick[:half]]), self.x[pick[half:]]])
        logits = self.target_head(self.merge(model, normalize_pixels(images, self.normalize), gen))
        aimed = torch.full((half,), self.target_class, dtype=torch.long)
        p_target = logits[half:].softmax(-1)[:, self.target_class]
        return F.cross_entropy(logits[:half], aimed) - torch.log1p(-p_target + 1e-6).mean()


def task_vector(expert: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    base_params = dict(base.named_parameters())
    return {k: (v - base_params[k]).detach() for k, v in expert.named_parameters()}
