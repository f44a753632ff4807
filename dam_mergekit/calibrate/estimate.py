"""What a calibration run costs, from shapes alone (``dam-mergekit estimate``).

``peak_memory_bytes`` is the trainer's peak-memory formula (``Calibrator.estimate_memory``) as a
function of tensor shapes, so it runs from a model's ``config.json`` without any weights: the
model is built on the meta device and only its float state-dict shapes are read. The activations of
one task's step are measured the same way: the built-in adapter's clean and perturbed forwards and
their backward run on fake tensors, and torch's MemTracker reports their peak
(``step_activation_bytes``).

The formula follows the state's layout (:mod:`dam_mergekit.calibrate.state`): the base in its
file's dtype, the task vectors in ``delta_dtype``, the mask logits with their two Adam moments
in float32 (their gradients only while the merge is backwarded), the merged parameters of one step and their gradients (twice with two
masks: the perturbed forwards run on an M1-detached view with a gradient of its own), one teacher
formed whole, one tensor's merge formed again with its graph, and one task's clean and perturbed
forwards with their backward (tasks are backwarded one at a time).
``benchmarks/bench_calibration.py --sizes`` prints it beside the measured peak.

Compute is counted in forward-pass equivalents (a backward costs two): per task and outer step the
trainer runs the coefficient step (2 forwards, 2 backwards), the perturbation step (1 + 1 forwards,
1 backward) and the mask step (2 forwards, 2 backwards), plus one teacher forward in each of the
coefficient and mask steps with ``perf_loss: distill`` (the default): 18 batch passes; a final
coefficient step is 11. ``memory: streamed`` and ``offload`` run every checkpointed forward again in
its backward: 4 more passes per step (the coefficient and mask steps' forwards), 2 per final
step. A forward costs about ``2 * weights * tokens`` FLOPs. Time is that divided
by an assumed sustained throughput: a lower bound that ignores the per-step merge and Python
overhead, and a guess about the device, not a measurement.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from dam_mergekit.errors import DamError

BYTES_PER_FLOAT = 4  # what is computed (merged tensors, logits, moments) is float32
PASSES_PER_STEP = 18  # forward equivalents per task and batch row, one outer step
PASSES_PER_FINAL_STEP = 11
RECOMPUTES_PER_STEP, RECOMPUTES_PER_FINAL_STEP = 4, 2  # memory streamed or offload
ASSUMED_TFLOPS = 50.0  # sustained float32/TF32 throughput for the time guess (an H100-class GPU)
LM_PROMPT_TOKENS = 64  # the causal_lm adapter's activation estimate assumes this prompt length


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def peak_memory_bytes(
    shapes: Iterable[Sequence[int]],
    *,
    experts: int,
    granularity: str,
    dual: bool,
    activation_bytes: int,
    tasks: int,
    graph_bytes: int = 0,
    forward_bytes: int = 0,
    world_size: int = 1,
    base_bytes: int = BYTES_PER_FLOAT,
    delta_bytes: int = BYTES_PER_FLOAT,
    distills: bool = True,
) -> int:
    """Bytes a calibration run needs at its peak, per process.

    ``activation_bytes`` is the peak of one task's clean and perturbed forwards and their
    backward, ``graph_bytes`` what one forward's graph keeps and ``forward_bytes`` the peak of one
    forward without a graph (the teacher's), all from :func:`step_activation_bytes`: tasks are backwarded one at a time, so ``tasks`` does not
    multiply them. With ``world_size > 1`` (the FSDP-sharded state) base, task
    vectors and logits are split ``world_size`` ways and one tensor is gathered whole at a time.
    """
    from dam_mergekit.calibrate.concrete import logit_shape

    shapes = [tuple(s) for s in shapes]
    params = sum(_numel(s) for s in shapes)
    largest = max((_numel(s) for s in shapes), default=0)
    logits = sum(_numel(logit_shape(s, granularity)) for s in shapes)
    logits *= (1 + experts) if dual else 1
    # the logits and their two Adam moments; the logits' gradients exist only while the merge is
    # backwarded (they are dropped after each mask step)
    logit_bytes = logits * BYTES_PER_FLOAT
    state = params * base_bytes + params * experts * delta_bytes + logit_bytes * 3
    if world_size > 1:  # this process's shards, plus one tensor gathered whole
        state = state / world_size + largest * (base_bytes + experts * delta_bytes)
        logit_bytes = logit_bytes / world_size
    merged = params * BYTES_PER_FLOAT  # one step's merged tensors
    # their gradients, twice with two masks (the perturbed forwards' M1-detached view)
    grads = merged * (2 if dual else 1)
    teacher = merged if distills else 0  # one task's expert, formed whole, during its forwards
    remerge = largest * experts * 5 * BYTES_PER_FLOAT  # one tensor's merge formed with its graph
    del tasks  # one task's forwards are alive at a time
    # the tasks' forwards and backward, then the merge's backward, one after the other
    during_tasks = activation_bytes + grads  # the task's backward, into the leaves
    if distills:  # the teacher's forward after the clean one; it lives through the perturbed one
        during_tasks = max(
            during_tasks, graph_bytes + teacher + forward_bytes, 2 * graph_bytes + teacher
        )
    return int(state + merged + max(during_tasks, grads + remerge + logit_bytes))


def streamed_peak_bytes(
    shapes: dict[str, Sequence[int]],
    *,
    experts: int,
    granularity: str,
    dual: bool,
    activation_bytes: int,
    offload: bool = False,
    base_bytes: int = BYTES_PER_FLOAT,
    delta_bytes: int = BYTES_PER_FLOAT,
) -> tuple[int, int]:
    """``(device bytes, host bytes)`` at the peak of ``memory: streamed`` (host 0) or
    ``memory: offload`` (:mod:`dam_mergekit.calibrate.streamed`), one process.

    ``activation_bytes`` is one task's step measured as streamed runs it
    (:func:`step_activation_bytes` with ``checkpointed``): it holds the merged tensors outside the
    blocks (formed by the clean and by the perturbed forward, kept by the ops that read them until
    the task's backward) and one block's merged tensors and their gradients while it is
    recomputed. Besides them the device holds the logits (two Adam moments, one gradient), the
    base and task vectors (with ``offload``: one tensor's, on its way) and the temporaries of one
    tensor's merge backward.
    """
    from dam_mergekit.calibrate.concrete import logit_shape

    logit_sizes = [_numel(logit_shape(s, granularity)) for s in shapes.values()]
    logits = sum(logit_sizes) * ((1 + experts) if dual else 1)
    sizes = [_numel(s) for s in shapes.values()]
    stored = sum(sizes) * (base_bytes + experts * delta_bytes)
    largest = max(sizes, default=0)
    device = logits * BYTES_PER_FLOAT * 4
    device += largest * (base_bytes + experts * delta_bytes) if offload else stored
    # one merge's backward: its incoming gradient and products, and the mask samples' graph
    device += largest * BYTES_PER_FLOAT * 3
    device += max(logit_sizes, default=0) * (1 + experts) * BYTES_PER_FLOAT * 3
    return int(device + activation_bytes), int(stored if offload else 0)


def layout_peak_bytes(
    shapes: dict[str, Sequence[int]],
    *,
    memory: str,
    activations: StepActivations,
    experts: int,
    granularity: str,
    dual: bool,
    tasks: int,
    world_size: int = 1,
    base_bytes: int = BYTES_PER_FLOAT,
    delta_bytes: int = BYTES_PER_FLOAT,
    distills: bool = True,
) -> tuple[int, int]:
    """``(peak bytes of a process's device, bytes offloaded to host memory)`` for a memory
    layout: the one formula the trainer's check and ``dam-mergekit estimate`` both use."""
    if memory == "whole":
        peak = peak_memory_bytes(
            shapes.values(),
            experts=experts,
            granularity=granularity,
            dual=dual,
            activation_bytes=activations.training,
            graph_bytes=activations.graph,
            forward_bytes=activations.forward,
            tasks=tasks,
            world_size=world_size,
            base_bytes=base_bytes,
            delta_bytes=delta_bytes,
            distills=distills,
        )
        return peak, 0
    return streamed_peak_bytes(
        shapes,
        experts=experts,
        granularity=granularity,
        dual=dual,
        activation_bytes=activations.training,
        offload=memory == "offload",
        base_bytes=base_bytes,
        delta_bytes=delta_bytes,
    )


class StepActivations(NamedTuple):
    """Activation bytes of one task's step: the peak of its clean and perturbed forwards with
    their backward (``training``), what one forward's graph keeps (``graph``), and the peak of
    one forward without a graph, as the teacher's runs (``forward``)."""

    training: int
    graph: int
    forward: int


NO_ACTIVATIONS = StepActivations(0, 0, 0)


def step_activation_bytes(
    config: str | Path,
    adapter: str,
    batch_size: int,
    *,
    image_shape=None,
    answers: int = 2,
    checkpointed: bool = False,
) -> StepActivations:
    """One task's step activations beyond the weights and their gradients: the built-in
    ``adapter``'s forward run on fake tensors (shapes only, nothing computed) of the model
    ``config`` describes, its peak measured by torch's MemTracker. ``checkpointed``: with every
    block under activation checkpointing, as ``memory: streamed`` runs them."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, cls, model_config = _model_class_and_config(config)
    with FakeTensorMode():
        model = cls(model_config)
        if checkpointed:
            _as_formed_weights(model)
        else:
            model.requires_grad_(True)  # merged weights require grad: every op saves its inputs
        forward = _fake_forward(model, adapter, batch_size, image_shape, answers)
        tracker = _peak_tracker(model)
        with tracker:
            clean = forward(0.0).sum()
            graph = _beyond_weights(tracker, "current")
            tracker.reset_mod_stats()  # the model runs twice in one step; the peak stays
            perturbed = forward(0.01).sum()
            (clean + perturbed).backward()
        training = _beyond_weights(tracker)
        tracker = _peak_tracker(model)
        with tracker, torch.no_grad():
            forward(0.0)
        return StepActivations(training, graph, _beyond_weights(tracker))


def _peak_tracker(model):
    """torch's MemTracker for ``model``, keeping the whole step's peak only: its per-module peaks
    visit every module on every allocation, which grows with depth squared (minutes for a
    32-layer model under checkpointing)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

    tracker = PeakTracker()
    tracker.track_external(model)
    return tracker


def _as_formed_weights(model) -> None:
    """Run ``model`` as ``memory: streamed`` does: every weight formed when its module reads it
    (here ``weight * scale``, ``scale`` the one leaf: no weight-sized gradient stays) and every
    block checkpointed, so the formed weights count where they live (outside the blocks: until
    the backward; inside: during a block's forward or recompute)."""
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    from dam_mergekit.calibrate.streamed import checkpoint_blocks, no_context

    class Scaled(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight * scale

    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    scale = torch.ones((), requires_grad=True)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    checkpoint_blocks(model, names, lambda: no_context)
    for pname in names:  # a tied weight is formed by each module that reads it
        module_name, _, attr = pname.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, attr).detach()
        delattr(module, attr)  # a buffer: the tracker counts it with the weights, no grad hooks
        module.register_buffer(attr, weight)
        parametrize.register_parametrization(module, attr, Scaled(), unsafe=True)


def _fake_forward(model, adapter: str, batch_size: int, image_shape, answers: int):
    """The built-in adapter's forward on a fake batch (``shift`` stands for the perturbation)."""
    import torch

    if adapter == "clip":
        size = int(model.config.image_size)
        c, h, w = image_shape or (int(model.config.num_channels), size, size)
        x = torch.rand((batch_size, c, h, w))

        def forward(shift: float):
            return model(pixel_values=x + shift).pooler_output

        return forward
    if adapter == "causal_lm":
        hidden = int(model.get_input_embeddings().weight.shape[1])
        embeds = torch.rand((batch_size * answers, LM_PROMPT_TOKENS, hidden))

        def forward(shift: float):
            out = model(inputs_embeds=embeds + shift).logits
            return torch.log_softmax(out[:, :-1].float(), dim=-1)[..., 0]

        return forward
    raise DamError(f"adapter {adapter!r}: activations are known for clip and causal_lm only")


def _beyond_weights(tracker, when: str = "peak") -> int:
    from torch.distributed._tools.mem_tracker import _MemRefType

    peak = next(iter(tracker.get_tracker_snapshot(when).values()))
    weights = (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.GRAD)
    return int(peak["Total"] - sum(peak.get(k, 0) for k in weights))


def adapter_activation_bytes(
    adapter, name: str, base_dir: str, batch_size: int, *, checkpointed: bool = False
) -> StepActivations:
    """One task's step activations for a calibration's adapter: measured on fake tensors of the
    base's config.json for the built-in adapters; from a user adapter's per-forward estimate
    else."""
    if name == "clip":
        shape = tuple(adapter.perturbation_space(adapter.tasks()[0]).shape)
        return step_activation_bytes(
            base_dir, name, batch_size, image_shape=shape, checkpointed=checkpointed
        )
    if name == "causal_lm":
        answers = max(len(a) for a in adapter.answers.values())
        return step_activation_bytes(
            base_dir, name, batch_size, answers=answers, checkpointed=checkpointed
        )
    one = int(adapter.activation_bytes(batch_size))
    return StepActivations(training=2 * one, graph=one, forward=one)


def meta_model_from_config(path: str | Path):
    """``(architecture, model on the meta device)`` that a model's config describes.

    ``path`` is a ``config.json`` or a directory holding one. A full ``CLIPModel`` config gives
    its vision tower (``CLIPVisionModel``), which is what the CLIP recipes merge.
    """
    import torch

    arch, cls, config = _model_class_and_config(path)
    try:
        with torch.device("meta"):
            return arch, cls(config)
    except (ValueError, TypeError, KeyError) as err:
        raise DamError(f"{path}: cannot build the model from its config ({err})") from None


def _model_class_and_config(path: str | Path):
    """``(architecture, transformers class, its config)`` from a ``config.json`` (or its folder)."""
    import transformers

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise DamError(f"{file}: no config.json to estimate from")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DamError(f"{file}: not valid JSON ({err})") from None
    model_type = raw.get("model_type")
    try:
        if model_type == "clip":
            arch = "CLIPVisionModel"
            config = transformers.CLIPVisionConfig(**raw.get("vision_config", {}))
        else:
            arch = (raw.get("architectures") or [None])[0]
            rest = {k: v for k, v in raw.items() if k != "model_type"}
            config = transformers.AutoConfig.for_model(str(model_type), **rest)
        cls = getattr(transformers, str(arch), None)
        if cls is None:
            raise DamError(f"{file}: architecture {arch!r} is not a transformers model class")
    except (ValueError, TypeError, KeyError) as err:
        raise DamError(f"{file}: cannot build the model from its config ({err})") from None
    return arch, cls, config


def shapes_from_config(path: str | Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """``(architecture, {tensor: shape})`` of the float tensors a model's config describes."""
    arch, model = meta_model_from_config(path)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    return arch, shapes


@dataclass
class Estimate:
    """The numbers ``dam-mergekit estimate`` prints."""

    architecture: str
    tensors: int
    parameters: int
    experts: int
    tasks: int
    granularity: str
    batch_size: int
    steps: int
    final_steps: int
    peak_memory_bytes: int  # of one process when processes > 1
    weights_bytes: int  # the base and the task vectors as held, part of the peak
    forward_flops: float  # one input, one forward
    total_flops: float
    assumed_tflops: float
    hours_at_assumed: float
    step_seconds_at_assumed: float = 0.0  # one outer step (every task), at the assumed throughput
    processes: int = 1  # FSDP-sharded calibration (torchrun); every process runs every batch
    memory: str = "whole"  # the calibration's memory layout
    host_bytes: int = 0  # what ``memory: offload`` keeps in host memory (not in the peak)


def estimate(
    shapes: dict[str, tuple[int, ...]],
    *,
    architecture: str,
    adapter: str,
    experts: int,
    tasks: int,
    granularity: str = "element",
    batch_size: int = 16,
    steps: int = 150,
    final_steps: int = 50,
    dual: bool = True,
    raw_config: dict[str, Any] | None = None,
    answers: int = 2,
    assumed_tflops: float = ASSUMED_TFLOPS,
    processes: int = 1,
    activations: StepActivations = NO_ACTIVATIONS,
    base_bytes: int = BYTES_PER_FLOAT,
    delta_bytes: int = BYTES_PER_FLOAT,
    distills: bool = True,
    memory: str = "whole",
) -> Estimate:
    """Memory and compute of calibrating ``experts`` models of these shapes on ``tasks`` tasks;
    ``activations`` are one task's step (:func:`step_activation_bytes`, with the blocks
    checkpointed unless ``memory`` is ``whole``)."""
    cfg = raw_config or {}
    params = sum(_numel(s) for s in shapes.values())
    if adapter == "clip":
        vision = cfg.get("vision_config", cfg)
        size, patch = int(vision.get("image_size", 224)), int(vision.get("patch_size", 32))
        tokens, rows = (size // patch) ** 2 + 1, batch_size
    elif adapter == "causal_lm":
        tokens, rows = LM_PROMPT_TOKENS, batch_size * answers
    else:
        raise DamError(f"adapter {adapter!r}: the estimate knows clip and causal_lm only")
    matmul = sum(_numel(s) for n, s in shapes.items() if len(s) >= 2 and "embed" not in n)
    forward = 2.0 * matmul * tokens
    per_step, per_final = PASSES_PER_STEP, PASSES_PER_FINAL_STEP
    if memory != "whole":
        per_step, per_final = per_step + RECOMPUTES_PER_STEP, per_final + RECOMPUTES_PER_FINAL_STEP
    passes = rows * tasks * (steps * per_step + final_steps * per_final)
    total = forward * passes
    peak, host = layout_peak_bytes(
        shapes,
        memory=memory,
        experts=experts,
        granularity=granularity,
        dual=dual,
        activations=activations,
        tasks=tasks,
        world_size=processes,
        base_bytes=base_bytes,
        delta_bytes=delta_bytes,
        distills=distills,
    )
    return Estimate(
        architecture=architecture,
        tensors=len(shapes),
        parameters=params,
        experts=experts,
        tasks=tasks,
        granularity=granularity,
        batch_size=batch_size,
        steps=steps,
        final_steps=final_steps,
        peak_memory_bytes=peak,
        weights_bytes=params * (base_bytes + experts * delta_bytes),
        forward_flops=forward,
        total_flops=total,
        assumed_tflops=assumed_tflops,
        hours_at_assumed=total / (assumed_tflops * 1e12) / 3600,
        step_seconds_at_assumed=forward * rows * tasks * per_step / (assumed_tflops * 1e12),
        processes=processes,
        memory=memory,
        host_bytes=host,
    )


def estimate_recipe(
    recipe: str | Path,
    *,
    config: str | Path | None = None,
    tasks: int | None = None,
    answers: int = 2,
    assumed_tflops: float = ASSUMED_TFLOPS,
    processes: int = 1,
) -> Estimate:
    """The estimate for a dam recipe and its calibration file; no weights or data are read."""
    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.recipe.load import read_yaml

    if processes < 1:
        raise DamError(f"processes must be >= 1, got {processes}")

    raw = read_yaml(recipe, "recipe")
    if not isinstance(raw, dict) or not raw.get("base_model"):
        raise DamError(f"{recipe}: not a recipe with a `base_model`")
    base = str(raw["base_model"])
    experts = [m.get("model") for m in raw.get("models") or [] if m.get("model") != base]
    if not experts:
        raise DamError(f"{recipe}: lists no expert models")
    calibration = (raw.get("parameters") or {}).get("calibration")
    if not calibration:
        raise DamError(f"{recipe}: no `parameters: {{calibration: FILE}}` to estimate")
    settings = read_yaml(calibration, "calibration file")
    if not isinstance(settings, dict):
        raise DamError(f"{calibration}: a calibration file is a YAML mapping of settings")
    data = settings.get("data")
    # The data and the device need not exist here: the estimate reads neither.
    cal = CalibrationConfig.from_dict(
        {**settings, "data": ".", "device": "cpu"}, where=str(calibration)
    )
    if processes > 1 and cal.memory != "whole":
        raise DamError(
            f"{calibration}: memory {cal.memory} runs in one process or data-parallel; "
            "--processes estimates the sharded state, which forms merged tensors whole"
        )
    source = Path(config) if config else Path(base)
    if not (source / "config.json").is_file() and not source.is_file():
        raise DamError(
            f"{source}: no local config.json for the base model; pass --config with a copy of "
            "its config.json (hub ids are not resolved here)"
        )
    file = source / "config.json" if source.is_dir() else source
    model_config = json.loads(file.read_text(encoding="utf-8"))
    architecture, shapes = shapes_from_config(file)
    if tasks is None:
        wanted = cal.adapter_options.get("tasks")
        manifest = Path(str(data)) / "zoo.json" if isinstance(data, str) else None
        if wanted:
            tasks = len(wanted)
        elif manifest is not None and manifest.is_file():
            tasks = len(json.loads(manifest.read_text(encoding="utf-8")).get("tasks", []))
        else:
            tasks = len(experts)
    return estimate(
        shapes,
        architecture=architecture,
        adapter=cal.adapter,
        experts=len(experts),
        tasks=tasks,
        granularity=cal.granularity,
        batch_size=cal.batch_size,
        steps=cal.steps,
        final_steps=cal.final_steps,
        dual=cal.mode == "dam",
        raw_config=model_config,
        answers=answers,
        assumed_tflops=assumed_tflops,
        processes=processes,
        activations=step_activation_bytes(
            file, cal.adapter, cal.batch_size, answers=answers, checkpointed=cal.memory != "whole"
        ),
        base_bytes=dtype_bytes(model_config.get("torch_dtype") or model_config.get("dtype")),
        delta_bytes=dtype_bytes(cal.delta_dtype),
        distills=cal.mode == "dam" and cal.perf_loss == "distill",
        memory=cal.memory,
    )


def dtype_bytes(name: str | None) -> int:
    """Bytes per value of a dtype named as in config.json (``bfloat16``) or safetensors (``BF16``);
    float32 when unset or unknown."""
    return 2 if str(name).lower() in ("bfloat16", "float16", "bf16", "f16", "half") else 4


def format_estimate(e: Estimate, name: str) -> str:
    gib = 2**30
    if e.processes > 1:
        where = f"per process, state sharded over {e.processes} processes"
    elif e.memory == "offload":
        where = f"on the device; base+expert weights in host memory: {e.host_bytes / gib:.1f} GiB"
    else:
        where = f"of which base+expert weights {e.weights_bytes / gib:.1f} GiB"
    return (
        f"{name}: {e.architecture}, {e.tensors} tensors, {e.parameters / 1e6:.1f}M parameters, "
        f"{e.experts} experts, {e.tasks} tasks, granularity {e.granularity}, batch {e.batch_size}, "
        f"{e.steps}+{e.final_steps} steps\n"
        f"  estimated peak memory {e.peak_memory_bytes / gib:.1f} GiB with memory: {e.memory} "
        f"({where})\n"
        f"  compute {e.total_flops / 1e15:.1f} PFLOP ({e.forward_flops / 1e9:.1f} GFLOP per "
        f"input forward): at least {e.hours_at_assumed * 60:.0f} min, "
        f"{e.step_seconds_at_assumed:.2g} s per step, at an assumed "
        f"{e.assumed_tflops:.0f} TFLOP/s (FLOPs only; a lower bound)"
    )


def _positive(kind: type):
    """An argparse type: a number of ``kind`` greater than zero (a one-line usage error else)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="memory and compute of a recipe's calibration, from config.json alone",
        description="Estimate a dam recipe's calibration (the trainer's memory formula) from the "
        "base model's config.json; no weights, data or GPU needed.",
    )
    p.add_argument("recipe", help="a dam recipe with `parameters: {calibration: FILE}`")
    p.add_argument("--config", help="the base model's config.json (default: BASE/config.json)")
    p.add_argument(
        "--tasks", type=_positive(int), help="calibration tasks (default: from data, or experts)"
    )
    p.add_argument("--answers", type=_positive(int), default=2, help="causal_lm: answers per task")
    p.add_argument(
        "--tflops", type=_positive(float), default=ASSUMED_TFLOPS, help="assumed sustained TFLOP/s"
    )
    p.add_argument(
        "--processes",
        type=_positive(int),
        default=1,
        help="peak memory of one process of a sharded calibration (torchrun --nproc-per-node N)",
    )
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=_cmd_estimate)


def _cmd_estimate(args: argparse.Namespace) -> int:
    e = estimate_recipe(
        args.recipe,
        config=args.config,
        tasks=args.tasks,
        answers=args.answers,
        assumed_tflops=args.tflops,
        processes=args.processes,
    )
    print(json.dumps(asdict(e), indent=2) if args.json else format_estimate(e, args.recipe))
    return 0
