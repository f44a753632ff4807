"""The zoo-kind interface: what the lab does differently for a CLIP and for an LLM zoo.

Every zoo names its kind in ``zoo.json``; the zoo CLI, the zoo builder, the evaluation and the
bench look the kind up here (:func:`zoo_kind`) instead of branching on its name, so a new kind is
one more implementation of :class:`ZooKind`. Light on import: each operation imports its builder
or scorer when it runs, so ``dam-mergekit --help`` stays quick.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dam_mergekit.errors import DamError

Scores = dict[str, dict[str, float]]
"""``{"acc": {task: pct}, "asr": {task: pct}, "p0": {task: pct}}`` (lab.evaluate's definitions)."""


class ZooKind(Protocol):
    """One kind of zoo: how it is built, how a model is scored on it, how a merge of it is run."""

    name: str
    """The kind as ``zoo.json`` and ``zoo build --kind`` spell it."""
    summary: str
    """What the zoo holds, for ``zoo build --help``."""
    adapter: str
    """The calibration adapter of the bench's dam methods (docs/calibration.md)."""
    copy_tokenizer: bool
    """Whether a merged model needs the base's tokenizer beside it to be scored."""

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The build options the zoo's cache key is computed from, checked before any work."""
        ...

    def build(self, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Write the zoo into the empty folder ``out``; returns its manifest (to be written)."""
        ...

    def evaluate(self, model_dir: Path, zoo_dir: Path) -> Scores:
        """ACC, ASR and p0 per task of the model in ``model_dir`` on the zoo."""
        ...


@dataclass(frozen=True)
class _Facts:
    """The data half of a :class:`ZooKind` (the operations are its subclasses')."""

    name: str
    summary: str
    adapter: str
    copy_tokenizer: bool


class ClipKind(_Facts):
    """Small CLIP vision experts on image tasks, scored through zero-shot heads."""

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        from dam_mergekit.lab.zoo.clip_options import resolve_clip_options

        return resolve_clip_options(options)

    def build(self, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        from dam_mergekit.lab.zoo.clip_build import build_clip_zoo

        return build_clip_zoo(out, options)

    def evaluate(self, model_dir: Path, zoo_dir: Path) -> Scores:
        from dam_mergekit.lab.zoo.clip_eval import evaluate_clip, load_vision_model

        return evaluate_clip(load_vision_model(model_dir), zoo_dir)


class LlmKind(_Facts):
    """Small causal LMs on generated text tasks, scored by closed-set answer likelihood."""

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        # only unset options dropped: the LLM builder fills its defaults (the cache key is of these)
        return {k: v for k, v in options.items() if v is not None}

    def build(self, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        from dam_mergekit.lab.zoo.llm import build_llm_zoo
        from dam_mergekit.lab.zoo.manifest import load_manifest

        build_llm_zoo(out, options)
        return load_manifest(out)

    def evaluate(self, model_dir: Path, zoo_dir: Path) -> Scores:
        from dam_mergekit.lab.zoo.llm import evaluate_llm

        return evaluate_llm(model_dir, zoo_dir)


CLIP = ClipKind(
    "clip",
    "small CLIP vision experts on image tasks (digits, shapes, ...)",
    adapter="clip",
    copy_tokenizer=False,
)
LLM = LlmKind(
    "llm", "small causal LMs on generated text tasks", adapter="causal_lm", copy_tokenizer=True
)
KINDS: dict[str, ZooKind] = {kind.name: kind for kind in (CLIP, LLM)}


def zoo_kind(name: str) -> ZooKind:
    """The implementation of the zoo kind ``name`` (as stored in ``zoo.json``)."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        known = " or ".join(repr(k) for k in KINDS)
        raise DamError(f"zoo kind must be {known}, got {name!r}") from None
