"""Stand-in for mergekit's ``tests/common.py``, which the 0.1.5 sdist does not ship.

``scripts/run-mergekit-suite.sh`` installs this file as ``tests/common.py`` next to the sdist's own
tests, so that mergekit's suite can run against the installed mergekit (with dam-mergekit's start-up
hook on). Written for this project from what the test files need; nothing is copied from mergekit.

What the tests rely on:
- each ``make_*`` builds a tiny random model, writes it with
  ``save_pretrained(safe_serialization=True)`` (one ``model.safetensors``, float32) into ``path``
  (created if missing) and returns the path as ``str`` (tests use it in f-strings and configs);
- ``make_picollama``: hidden size 32 (tests check embedding shapes ``(vocab, 32)``), 2 layers;
- ``make_gpt2size``: GPT-2 layout with 12 layers (a test stacks layers 0-12 twice and expects 24);
  it is narrow here, not GPT-2's real width, since no test looks at the width;
- ``make_picoLlaVa``: a LLaVA (CLIP vision tower + Llama) that has no mergekit JSON definition, so
  tests merge it with ``auto_arch=True``;
- ``run_and_check_merge``: merges into a temporary folder, checks the output, calls ``validate``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import mergekit.merge
import torch
from mergekit.architecture import arch_info_for_config
from mergekit.architecture.auto import infer_architecture_info
from mergekit.architecture.base import ModelArchitecture
from mergekit.config import MergeConfiguration
from mergekit.io import LazyTensorLoader
from mergekit.options import MergeOptions
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
)

SINGLE_SHARD = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def _save(model: PreTrainedModel, path: str | os.PathLike) -> str:
    """Write ``model`` as safetensors into ``path`` and return the folder as a string."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _tiny_llama_config(vocab_size: int) -> LlamaConfig:
    # 16 heads of width 2: many heads keeps per-head code paths honest at a tiny size.
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_hidden_layers=2,
        max_position_embeddings=128,
    )


def make_picollama(path: str | os.PathLike, vocab_size: int = 64) -> str:
    """A 2-layer Llama with hidden size 32 and ``vocab_size`` tokens."""
    return _save(LlamaForCausalLM(_tiny_llama_config(vocab_size)), path)


def make_picogranite(path: str | os.PathLike, vocab_size: int = 64) -> str:
    """A 2-layer Granite model (Llama-like, with Granite's extra scaling settings)."""
    config = GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=128,
    )
    return _save(GraniteForCausalLM(config), path)


def make_gpt2size(path: str | os.PathLike) -> str:
    """GPT-2's layer count (12) at a tiny width: enough for the layer-stacking test."""
    config = GPT2Config(
        vocab_size=64,
        n_positions=128,
        n_embd=32,
        n_layer=12,
        n_head=4,
        bos_token_id=0,  # GPT-2's 50256 lies outside the tiny vocabulary
        eos_token_id=0,
    )
    return _save(GPT2LMHeadModel(config), path)


def make_picoLlaVa(path: str | os.PathLike) -> str:  # noqa: N802 - name fixed by mergekit's tests
    """A tiny LLaVA: a 2-layer CLIP vision tower, a projector and a 2-layer Llama."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = _tiny_llama_config(vocab_size=64)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=text.vocab_size - 1,
        vision_feature_layer=-1,
    )
    return _save(LlavaForConditionalGeneration(config), path)


def _architecture(
    config: MergeConfiguration, output_config: PretrainedConfig, auto_arch: bool
) -> ModelArchitecture:
    """The architecture the output must follow: JSON-defined, or inferred from the inputs."""
    if auto_arch:
        base = config.base_model
        inputs = tuple(m for m in config.referenced_models() if m != base)
        return infer_architecture_info(inputs, base, MergeOptions())
    arch = arch_info_for_config(output_config)
    if arch is None:
        raise AssertionError(
            f"no mergekit architecture definition for {output_config.architectures}; "
            "pass auto_arch=True for models without one"
        )
    return arch


def _check_no_nan(out_dir: str) -> None:
    loader = LazyTensorLoader.from_disk(out_dir, lazy_unpickle=False)
    for name in sorted(loader.index.tensor_paths):
        tensor = loader.get_tensor(name)
        if tensor.is_floating_point():
            assert not torch.isnan(tensor).any(), f"merged tensor {name} contains NaN"


def _check_weights_present(config: MergeConfiguration, out_dir: str, auto_arch: bool) -> None:
    output_config = AutoConfig.from_pretrained(out_dir)
    arch = _architecture(config, output_config, auto_arch)
    written = set(LazyTensorLoader.from_disk(out_dir).index.tensor_paths)
    missing = []
    for weight in arch.all_weights(output_config):
        if weight.optional:
            continue
        names = {weight.name, *(weight.aliases or ()), *(weight.tied_names or ())}
        if not names & written:
            missing.append(weight.name)
    assert not missing, f"merge output lacks required weights: {missing}"


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Callable[[str], object] | None = None,
    index_json_name: str | None = None,
    auto_arch: bool = False,
) -> None:
    """Run ``config`` through ``mergekit.merge.run_merge`` and check what it wrote.

    Checks: a weights file (single shard or ``index_json_name`` index) and ``config.json`` exist;
    no floating tensor holds NaN (``check_nan``); every non-optional weight of the architecture is
    present under its name, an alias or a tied name (``check_tensors``); then ``validate(out_dir)``.
    """
    index_name = index_json_name or SHARD_INDEX
    with tempfile.TemporaryDirectory(prefix="mergekit-suite-out-") as out_dir:
        # looked up at call time: the function a user gets, hooks included
        mergekit.merge.run_merge(config, out_dir, options=MergeOptions())
        out = Path(out_dir)
        single = index_name.removesuffix(".index.json")
        assert (out / index_name).exists() or (out / single).exists(), (
            f"merge wrote no weights ({index_name} or {single}) in {out_dir}"
        )
        assert (out / "config.json").exists(), "merge wrote no config.json"
        if check_nan:
            _check_no_nan(out_dir)
        if check_tensors:
            _check_weights_present(config, out_dir, auto_arch)
        if validate is not None:
            validate(out_dir)
