"""The DAM calibration loop: learn M1, M2 and the coefficients from unlabeled data.

Model-agnostic: an adapter supplies batches and a functional forward; the merged parameters are
built every step with :func:`dam_mergekit.merge.merge_tensor` (the formula mergekit's kernel uses)
and swapped into the model with ``torch.func.functional_call``.

One outer step (mode ``dam``):

1. sample M1 and every M2 from their Concrete logits;
2. coefficient step (inner, AdaMerging-style, masks detached) on
   ``L_perf + alpha * L_safe``, then clamp to ``coef_range``. The safety term is part of
   this step on purpose: clean entropy alone rewards a confidently backdoored expert;
3. perturbation step: each task's universal perturbation ascends its ``trigger_search`` objective
   (towards the class the perturbed batch favours, or away from the merge's own clean
   predictions), projected into its norm ball;
4. mask steps on one forward: M1 descends ``L_perf`` (``perf_loss``: by default the KL from each
   task's own expert on clean inputs; entropy as published); every M2 descends
   ``L_perf + alpha * L_safe`` with ``L_safe = sum_t KL(f(x_t) || f(x_t + delta_t))`` (or the
   entropy on perturbed inputs, as released). The clean term stays in M2's objective so that an
   M2 entry is only dropped when that does not cost clean performance.

Then the masks are extracted (binary, see :mod:`concrete`), and ``final_steps`` coefficient steps
(same safe objective, perturbation still updated) adapt the coefficients to the binary masks.

Ablations (``train``): ``masks`` skips the coefficient steps, ``coefficients`` the mask steps;
``m2`` also holds M1 at exactly all-ones, so one mask learns (the bench's post-hoc AWM row).

Mode ``as_released`` is the released code's algorithm: one shared mask, unbounded perturbation
(Adam), entropy on perturbed inputs, coefficients reset and stepped on clean entropy only, a
final entropy-only AdaMerging on one continuous mask sample. It is there for comparison.

No labels and no trigger knowledge are used anywhere.

The loop is :meth:`Calibrator.run`; what each step minimises is the mode's objective
(:mod:`objectives`), where the state lives (one device, or FSDP shards) is the state
(:mod:`state`, :mod:`sharded`), and resuming is :mod:`checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dam_mergekit.calibrate import checkpoint
from dam_mergekit.calibrate.adapters import make_adapter
from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.calibrate.estimate import adapter_activation_bytes, dtype_bytes, layout_peak_bytes
from dam_mergekit.calibrate.models import check_experts
from dam_mergekit.calibrate.objectives import MaskDraw, Step, objective_for
from dam_mergekit.calibrate.pairing import task_experts
from dam_mergekit.calibrate.perturb import Perturbations
from dam_mergekit.calibrate.state import StateInputs, coefficient_row, full
from dam_mergekit.calibrate.streamed import bound, one_process_state
from dam_mergekit.errors import DamError
from dam_mergekit.masks import MaskSet, ModelRecord, fingerprint_model, write_mask_file
from dam_mergekit.masks.file import CALIBRATED
from dam_mergekit.merge import merge_tensor
from dam_mergekit.model_files import stored_tensors
from dam_mergekit.staging import staged_file


@dataclass(frozen=True)
class StateLayout:
    """Which state a run builds, and this process's place among those that share it."""

    state: type | None = None  # None: the one-process state of the config's memory layout
    rank: int = 0
    world: int = 1


ONE_PROCESS = StateLayout()


@dataclass
class CalibrationResult:
    """What a calibration produced: masks as written, and the merged model computed in memory."""

    masks: MaskSet
    merged: dict[str, torch.Tensor]  # planned tensor name -> merged tensor (cpu, float32)
    settings: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    mask_path: Path | None = None
    resumed_from: int = 0
    audit: dict[str, Any] | None = None  # the pre-merge audit's report, when one ran


def plan_digest(plan) -> str:
    """What the recipe contributes to the masks: tensor names, shapes, weights and lambda."""
    rows = []
    for t in plan.float_tensors:
        weights = [t.weights.get(str(e), 1.0) for e in plan.experts]
        rows.append([t.name, list(t.shape), weights, float(t.parameters.get("lambda", 1.0))])
    return "sha256:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:32]


def model_records(plan, *, allow_pickle: bool = False) -> tuple[ModelRecord, list[ModelRecord]]:
    from dam_mergekit.model_files import model_dir

    def record(ref) -> ModelRecord:
        return ModelRecord(str(ref), fingerprint_model(model_dir(ref), allow_pickle=allow_pickle))

    return record(plan.base), [record(e) for e in plan.experts]


class Calibrator:
    """Sets up (all checks first), estimates memory, trains, extracts and writes the masks."""

    def __init__(
        self,
        plan,
        config: CalibrationConfig,
        *,
        mask_path: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
        log=None,
        layout: StateLayout = ONE_PROCESS,
    ):
        from dam_mergekit.model_files import model_dir

        config.check()
        self.cfg, self.plan, self.layout = config, plan, layout
        self.mask_path = Path(mask_path) if mask_path is not None else None
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.device = torch.device(config.device)
        tensors = list(plan.float_tensors)
        if not tensors:
            raise DamError("the recipe merges no floating-point tensors; nothing to calibrate")
        if not plan.experts:
            raise DamError("the recipe has no experts to merge")
        self.names = [t.name for t in tensors]
        self.shapes = {t.name: tuple(t.shape) for t in tensors}
        self.n = len(plan.experts)
        self.base_dir = model_dir(plan.base)
        self.expert_dirs = [model_dir(e) for e in plan.experts]
        self.allow_pickle = allow_pickle
        check_experts(
            self.shapes,
            list(zip(map(str, plan.experts), self.expert_dirs, strict=True)),
            allow_pickle=allow_pickle,
        )
        self.adapter = make_adapter(
            config.adapter, config.data, config.adapter_options, self.device
        )
        self.tasks = self.adapter.tasks()
        if not self.tasks:
            raise DamError(f"{config.data}: the calibration data has no tasks")
        self.objective = objective_for(config)
        self.inputs = StateInputs(
            names=self.names,
            shapes=self.shapes,
            weights={
                t.name: [float(t.weights.get(str(e), 1.0)) for e in plan.experts] for t in tensors
            },
            lams={t.name: float(t.parameters.get("lambda", 1.0)) for t in tensors},
            base_dir=self.base_dir,
            expert_dirs=self.expert_dirs,
            config=config,
            two_masks=self.objective.two_masks,
            allow_pickle=allow_pickle,
        )
        self.learn_coef = config.train in ("both", "coefficients")
        self.audit_triggers = None  # the audit's triggers, with trigger_source: audit
        if config.trigger_source == "audit" and layout.world > 1:
            raise DamError("trigger_source audit runs in one process; calibrate without torchrun")
        self.teacher_of = self._teachers() if self.objective.distills else {}

    def _teachers(self) -> dict[str, int]:
        """Each task's own expert, the teacher of ``perf_loss: distill``."""
        return task_experts(
            self.tasks,
            list(map(str, self.plan.experts)),
            list(self.expert_dirs),
            lambda msg: self.log(f"calibration: perf_loss distill: {msg}"),
        )

    @property
    def state_class(self) -> type:
        return self.layout.state or one_process_state(self.cfg)

    # -- memory ------------------------------------------------------------------------------------
    host_bytes = 0

    def estimate_memory(self) -> int:
        """Bytes the run needs on its device at the peak, per process (:func:`layout_peak_bytes`);
        what ``memory: offload`` keeps in host memory is ``self.host_bytes``."""
        state, world = self.state_class, self.layout.world
        batch = -(-self.cfg.batch_size // world) if state.splits_data else self.cfg.batch_size
        stored = stored_tensors(self.base_dir, allow_pickle=self.allow_pickle)
        memory = self.cfg.memory
        acts = adapter_activation_bytes(
            self.adapter, self.cfg.adapter, self.base_dir, batch, checkpointed=memory != "whole"
        )
        peak, self.host_bytes = layout_peak_bytes(
            self.shapes,
            memory=memory,
            activations=acts,
            experts=self.n,
            granularity=self.cfg.granularity,
            dual=self.objective.two_masks,
            tasks=len(self.tasks),
            world_size=self.layout.world if state.shards_state else 1,
            base_bytes=dtype_bytes(stored[self.names[0]].dtype),
            delta_bytes=dtype_bytes(self.cfg.delta_dtype),
            distills=self.objective.distills,
        )
        return peak

    def available_memory(self) -> tuple[int, str]:
        if self.cfg.memory_budget_gb is not None:
            return int(self.cfg.memory_budget_gb * 2**30), "memory_budget_gb"
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free), f"free memory on {self.device}"
        return available_ram()

    def check_memory(self) -> int:
        need = self.estimate_memory()
        if self.host_bytes and self.device.type == "cpu":
            need += self.host_bytes  # offloaded to where it already is
        elif self.host_bytes:
            host, what = available_ram()
            if self.host_bytes > host:
                raise DamError(
                    f"memory: offload keeps about {self.host_bytes / 2**30:.2f} GiB in host "
                    f"memory but {what} is {host / 2**30:.2f} GiB"
                )
        have, what = self.available_memory()
        self.log(
            f"calibration: {len(self.names)} tensors, {self.n} experts, {len(self.tasks)} "
            f"tasks; estimated peak memory {need / 2**20:.1f} MiB ({what}: "
            f"{have / 2**20:.0f} MiB)"
        )
        if need > have:
            raise DamError(
                f"calibration needs about {need / 2**30:.2f} GiB but {what} is "
                f"{have / 2**30:.2f} GiB; lower batch_size, use granularity row/tensor, or run on "
                "a larger device"
            )
        return need

    # -- set-up ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, dev = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.state = self.state_class(self.inputs, self.adapter, dev)
        rows = len(self.names) if cfg.coefficients == "layer" else 1
        self.coef = torch.full((rows, self.n), cfg.coef_init, device=dev, requires_grad=True)
        state = self.state
        self.optimizers = {
            "m1": torch.optim.Adam(list(state.m1_logits.values()), lr=cfg.lr_mask),
            "m2": torch.optim.Adam(list(state.m2_logits.values()), lr=cfg.lr_mask)
            if state.m2_logits
            else None,
            "c": torch.optim.Adam([self.coef], lr=cfg.lr_coef),
        }
        spaces = {t: self.adapter.perturbation_space(t) for t in self.tasks}
        self.perturb = Perturbations(
            spaces,
            norm=cfg.norm,
            eps=cfg.eps,
            lr=cfg.lr_perturb,
            bounded=self.objective.bounded_perturbation,
            device=dev,
        )

    # -- the steps every objective is made of -------------------------------------------------------
    def batches(self) -> dict[str, Any]:
        """A batch of every task, of which this process keeps its share (all of it, unless the
        calibration is data-parallel)."""
        size, gen = self.cfg.batch_size, self.data_gen
        return {t: self.state.share(self.adapter.sample(t, size, gen)) for t in self.tasks}

    def logits(self, params, task: str, x, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The whole batch's logits under ``params`` (with ``delta`` added where it lives)."""
        extra = () if delta is None else (delta,)
        with bound(params):  # streamed parameters form each weight inside its module
            logits = self.adapter.logits(self.state.model, params, task, x, *extra)
        return self.state.gather(logits)

    def task_losses(self, params, task: str, x, *, perturbed: bool, safe_params=None):
        """(clean loss L_perf, safety loss) for one batch (clean and perturbed forwards).

        ``safe_params`` (default ``params``) are the parameters of the perturbed forward: a
        sharded state passes a copy built with M1 detached.
        """
        clean = self.logits(params, task, x)
        teacher = None
        if task in self.teacher_of:
            with torch.no_grad():
                expert = self.state.expert_params(self.teacher_of[task])
                teacher = self.logits(expert, task, x)
        h = self.objective.clean_loss(clean, teacher)
        if not perturbed or self.cfg.alpha == 0:
            return h, torch.zeros((), device=h.device)
        if self.audit_triggers is not None:
            merged = params if safe_params is None else safe_params
            return h, self.audit_triggers.safety(
                lambda x_, delta: self.logits(merged, task, x_, delta), task, x, clean, teacher
            )
        delta = self.perturb.deltas[task].detach()
        adv = self.logits(params if safe_params is None else safe_params, task, x, delta)
        return h, self.objective.safety_loss(clean, adv)

    def coefficient_step(self, masks: MaskDraw, *, perturbed: bool) -> Step:
        """One Adam step of the coefficients on L_perf (+ alpha * L_safe when ``perturbed``).

        Against the audit's triggers only M2 pays the safety term: the defense must cut what
        carries the trigger, not shrink whole experts."""
        perturbed = perturbed and self.audit_triggers is None
        batches = self.batches()

        def losses(params, _safe_params):
            for t in self.tasks:
                yield self.task_losses(params, t, batches[t], perturbed=perturbed)

        perf, safety = self.step_coefficients(masks, losses)
        return perf.item(), safety.item()

    def step_coefficients(self, masks: MaskDraw, losses) -> tuple[torch.Tensor, torch.Tensor]:
        """One Adam step of the coefficients on the sum over tasks of ``L_perf + alpha * L_safe``
        (``losses(params, safe_params)`` yields each task's pair); returns the two sums."""
        opt = self.optimizers["c"]
        opt.zero_grad(set_to_none=True)
        sums = self.state.gradients(
            masks, self.coef, losses, alpha=self.cfg.alpha, m1_learns_safety=True
        )
        self.state.all_sum([self.coef.grad])
        opt.step()
        return sums

    def reset_coefficients(self, *, new_optimizer: bool = False, lr: float | None = None) -> None:
        """Coefficients back to ``coef_init``; a new Adam (at ``lr``, default ``lr_coef``)."""
        with torch.no_grad():
            self.coef.fill_(self.cfg.coef_init)
        if new_optimizer:
            self.optimizers["c"] = torch.optim.Adam([self.coef], lr=lr or self.cfg.lr_coef)

    def perturbation_step(self, masks: MaskDraw) -> float:
        """Each task's perturbation ascends the trigger objective; returns the flip rate.

        With ``alpha: 0``, or the audit's triggers in its place, no loss reads the perturbation,
        so none is searched (rate 0)."""
        if self.cfg.alpha == 0 or self.audit_triggers is not None:
            return 0.0
        with torch.no_grad():
            params = self.state.merged_params(masks, self.coef.detach())
        flips = 0.0
        for _ in range(self.cfg.perturb_steps):
            batches = self.batches()
            for t in self.tasks:
                x = batches[t]
                with torch.no_grad():
                    pseudo = self.logits(params, t, x).argmax(-1)
                delta = self.perturb.deltas[t].detach().clone().requires_grad_(True)
                adv = self.logits(params, t, x, delta)
                loss = self.objective.trigger_objective(adv.float(), pseudo)
                (grad,) = torch.autograd.grad(loss, delta)
                self.state.all_sum([grad])
                self.perturb.step(t, grad)
                flips += float((adv.argmax(-1) != pseudo).float().mean()) / len(self.tasks)
        return flips / self.cfg.perturb_steps

    def mask_step(self, sample: MaskDraw | None = None) -> Step:
        """One Adam step of the mask logits on ``sample`` (a differentiable draw), else a fresh one."""

        def losses(params, safe_params):
            batches = self.batches()
            for t in self.tasks:
                yield self.task_losses(
                    params, t, batches[t], perturbed=True, safe_params=safe_params
                )

        perf, safe = self.state.gradients(
            self.state.draw(grad=True) if sample is None else sample,
            self.coef.detach(),
            losses,
            alpha=self.cfg.alpha,
            m1_learns_safety=not self.objective.two_masks,
        )
        if self.audit_triggers is not None:
            self.audit_triggers.drop_clean_gradients(self.state.m2_logits)
        masks = [opt for tag, opt in self.optimizers.items() if tag != "c" and opt is not None]
        for opt in masks:
            opt.step()
        for opt in masks:
            opt.zero_grad(set_to_none=True)
        return perf.item(), safe.item()

    # -- checkpoint --------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path | None:
        """This process's checkpoint: ``checkpoint``, else next to the mask file; or none."""
        if self.cfg.checkpoint:
            path = Path(self.cfg.checkpoint)
        elif self.mask_path is not None:
            path = self.mask_path.with_name(self.mask_path.name + ".ckpt.safetensors")
        else:
            return None
        return checkpoint.process_path(path, self.state)

    def save_checkpoint(self, step: int, key: str, history: list) -> None:
        path = self.checkpoint_path()
        if path is None:
            return
        tensors = checkpoint.training_tensors(
            self.state, self.coef, self.optimizers, self.perturb, self.data_gen
        )
        checkpoint.save(
            path, tensors, step=step, key=checkpoint.process_key(key, self.state), history=history
        )

    def _resume(self, key: str) -> tuple[int, list]:
        path = self.checkpoint_path()
        if path is None:
            return 0, []

        def restore(saved: dict) -> None:
            checkpoint.restore(
                saved, self.state, self.coef, self.optimizers, self.perturb, self.data_gen
            )

        found = checkpoint.load(path, checkpoint.process_key(key, self.state), restore, self.log)
        return found or (0, [])

    # -- the run ----------------------------------------------------------------------------------
    def settings(self, base: ModelRecord, experts: list[ModelRecord]) -> dict[str, Any]:
        return {
            "source": CALIBRATED,
            "calibration": self.cfg.settings(),
            "recipe": plan_digest(self.plan),
            "data": self.adapter.data_fingerprint(),
            "tasks": self.tasks,
            "extraction": self.objective.extraction,
            "models": {"base": base.fingerprint, "experts": [e.fingerprint for e in experts]},
        }

    def run(self, *, write: bool = True) -> CalibrationResult:
        """Check memory, train (resuming from a checkpoint), extract, then write the mask file."""
        cfg, objective = self.cfg, self.objective
        self.check_memory()
        base_rec, expert_recs = model_records(self.plan, allow_pickle=self.allow_pickle)
        settings = self.settings(base_rec, expert_recs)
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
        audit = self.run_audit()
        self._setup()
        if self.audit_triggers is not None:
            self.audit_triggers.hold_clean(self.state.m2_logits)
        timings = dict.fromkeys(("coefficients", "perturbation", "masks", "final"), 0.0)
        start, history = self._resume(key)
        bar = tqdm(
            total=cfg.steps + cfg.final_steps,
            initial=min(start, cfg.steps),
            desc="calibrate",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        t_all = time.perf_counter()
        for step in range(start, cfg.steps):
            history.append(self._mask_phase_step(step, timings))
            bar.update(1)
            last = history[-1]
            bar.set_postfix(
                perf=f"{last['L_perf']:.3f}",
                safe=f"{last['L_safe']:.3f}",
                flips=f"{last['flips']:.2f}",
            )
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                self.save_checkpoint(step + 1, key, history)
        masks = objective.extract(self.state)
        t0 = time.perf_counter()
        objective.begin_final(self)
        for step in range(cfg.final_steps if self.learn_coef else 0):
            perf, safe, flips = objective.final_step(self, masks)
            history.append(self._record(cfg.steps + step, perf, safe, flips, final=True))
            bar.update(1)
        timings["final"] = time.perf_counter() - t0
        bar.close()
        timings["total"] = time.perf_counter() - t_all
        mask_set, merged = self._finish(masks)
        path = self._write(
            mask_set, settings, history, timings, (base_rec, expert_recs), write, audit
        )
        return CalibrationResult(mask_set, merged, settings, history, timings, path, start, audit)

    def run_audit(self) -> dict[str, Any] | None:
        """The pre-merge audit of every expert (``audit`` setting), logged as its table."""
        config = self.cfg.audit_config()
        if config is None:
            return None
        from dam_mergekit.audit.report import format_table
        from dam_mergekit.audit.run import Auditor

        report = Auditor(self.plan, self.cfg, config, log=self.log).run(progress=self.progress)
        if self.layout.rank == 0:
            self.log("calibration: pre-merge audit\n" + format_table(report))
        if self.cfg.trigger_source == "audit":
            from dam_mergekit.calibrate.audit_safety import AuditTriggers

            self.audit_triggers = AuditTriggers(report, self.n)
        return report.to_json()

    def _mask_phase_step(self, step: int, timings: dict[str, float]) -> dict[str, float]:
        """Coefficients, perturbations, masks: one step of the first phase, timed per stage."""
        sample = self.state.draw(grad=self.objective.reuses_sample)
        masks = sample.detached()  # the coefficient and perturbation steps move no mask
        t0 = time.perf_counter()
        if self.learn_coef:  # ablations "masks", "m2": coefficients stay at coef_init
            perf, safe = self.objective.coefficient_step(self, masks)
        t1 = time.perf_counter()
        flips = self.perturbation_step(masks)
        t2 = time.perf_counter()
        if self.cfg.train != "coefficients":  # ablation "coefficients only": masks stay all-ones
            perf, safe = self.mask_step(sample if sample.grad else None)
        t3 = time.perf_counter()
        timings["coefficients"] += t1 - t0
        timings["perturbation"] += t2 - t1
        timings["masks"] += t3 - t2
        return self._record(step, perf, safe, flips)

    def _record(self, step, perf, safe, flips, *, final=False) -> dict[str, float]:
        state = self.state
        with torch.no_grad():
            coef = self.coef.detach().mean(0).cpu().tolist()
            frozen = self.cfg.train == "m2"
            rec = {
                "step": step,
                "final": final,
                "L_perf": perf,
                "L_safe": safe,
                "flips": flips,
                "m1_keep": 1.0 if frozen else _mean_prob(state.m1_logits.values()),
            }
            if state.m2_logits:
                for i, keep in enumerate(_keep_per_expert(state.m2_logits.values(), self.n)):
                    rec[f"m2_keep_{i}"] = keep
            for i, c in enumerate(coef):
                rec[f"coef_{i}"] = c
            for t, d in self.perturb.deltas.items():
                rec[f"delta_norm_{t}"] = float(d.detach().norm())
        return rec

    def _finish(self, masks: MaskDraw) -> tuple[MaskSet, dict[str, torch.Tensor]]:
        """The mask set to write and the merged tensors, both from exactly the same values."""
        mask_set = MaskSet()
        merged: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for k, final in enumerate(self.state.final_tensors(masks)):
                name = final.name
                coef = (coefficient_row(self.coef, k).detach() * final.rescale).float().cpu()
                m2 = None if final.m2 is None else [x.cpu() for x in final.m2]
                m1, m2 = self.objective.stored_masks(final.m1.cpu(), m2)
                mask_set.m1[name] = m1
                if m2 is not None:
                    mask_set.m2[name] = m2
                mask_set.coefficients[name] = coef
                merged[name] = merge_tensor(
                    final.base.cpu(),
                    [e.cpu() for e in final.experts],
                    self.inputs.weights[name],
                    lam=self.inputs.lams[name],
                    m1=m1.float(),
                    m2=None if m2 is None else [x.float() for x in m2],
                    coefficients=coef,
                )
        return mask_set, merged

    def _write(self, masks, settings, history, timings, records, write, audit) -> Path | None:
        """Process 0 writes the mask file and its history; every process drops its checkpoint."""
        base_rec, expert_recs = records
        path = None
        if write and self.mask_path is not None and self.layout.rank == 0:
            path = write_mask_file(
                self.mask_path,
                masks,
                base=base_rec,
                experts=expert_recs,
                tensor_shapes=self.shapes,
                settings=settings,
                audit=audit,
            )
            _write_json(
                self.mask_path.with_name(self.mask_path.name + ".history.json"),
                {"settings": settings, "history": history, "timings": timings},
            )
        ckpt = self.checkpoint_path()
        if write and ckpt is not None:
            ckpt.unlink(missing_ok=True)
        self.state.finish()
        return path


def available_ram() -> tuple[int, str]:
    """RAM a run may take: the kernel's MemAvailable (the page cache of files just written or
    read counts, as the kernel gives it back), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(pages), "free RAM"
    except (ValueError, OSError, AttributeError):
        return 2**62, "unknown"


def _mean_prob(logits) -> float:
    total, count = 0.0, 0
    for s in logits:
        total += float(full(torch.sigmoid(s.detach()).sum()))
        count += s.numel()
    return total / max(count, 1)


def _keep_per_expert(logits, n: int) -> list[float]:
    """Mean keep probability of each expert's M2 (logits are ``[n, ...]`` per tensor)."""
    total, count = torch.zeros(n, dtype=torch.float64), 0
    for s in logits:
        total += full(torch.sigmoid(s.detach()).reshape(n, -1).sum(1)).double().cpu()
        count += s.numel() // n
    return (total / max(count, 1)).tolist()


def _write_json(path: Path, data: dict) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
