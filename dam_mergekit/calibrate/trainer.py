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
import torch.nn.functional as F
from tqdm.auto import tqdm

from dam_mergekit.calibrate import concrete
from dam_mergekit.calibrate.adapters import make_adapter
from dam_mergekit.calibrate.adapters.base import distill, entropy, infomax
from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.calibrate.estimate import peak_memory_bytes
from dam_mergekit.calibrate.models import check_experts, load_tensors
from dam_mergekit.calibrate.perturb import Perturbations
from dam_mergekit.errors import DamError
from dam_mergekit.masks import MaskSet, ModelRecord, fingerprint_model, write_mask_file
from dam_mergekit.merge import merge_tensor
from dam_mergekit.staging import staged_file

CHECKPOINT_FORMAT = "dam-mergekit-calibration-checkpoint"
EXTRACTION_DAM = "binary: keep where sigmoid(logit) >= 0.5; mean rescaling folded into coefficients"
EXTRACTION_RELEASED = "one continuous Concrete sample; mean rescaling folded into coefficients"


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

    world = 1  # processes sharing the state (the sharded trainer sets it)

    def __init__(
        self,
        plan,
        config: CalibrationConfig,
        *,
        mask_path: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
        log=None,
    ):
        from dam_mergekit.model_files import model_dir

        config.check()
        self.cfg = config
        self.plan = plan
        self.mask_path = Path(mask_path) if mask_path is not None else None
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.device = torch.device(config.device)
        self.tensors = list(plan.float_tensors)
        if not self.tensors:
            raise DamError("the recipe merges no floating-point tensors; nothing to calibrate")
        if not plan.experts:
            raise DamError("the recipe has no experts to merge")
        self.names = [t.name for t in self.tensors]
        self.shapes = {t.name: tuple(t.shape) for t in self.tensors}
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
        self.weights = {
            t.name: [float(t.weights.get(str(e), 1.0)) for e in plan.experts] for t in self.tensors
        }
        self.lams = {t.name: float(t.parameters.get("lambda", 1.0)) for t in self.tensors}
        self.dual = config.mode == "dam"
        self.m1_frozen = config.train == "m2"  # exactly all-ones, not sampled
        self.learn_coef = config.train in ("both", "coefficients")
        self.teacher_of = self._teachers() if self.dual and config.perf_loss == "distill" else {}

    def _teachers(self) -> dict[str, int]:
        """Each task's own expert (``perf_loss: distill``): by directory name, else recipe order.

        One expert is every task's teacher: then the clean loss keeps the masked model close to
        that expert on every task (the bench's ``awm`` row, whose one expert is a merge).
        """
        names = [Path(d).name for d in self.expert_dirs]
        if all(names.count(t) == 1 for t in self.tasks):
            return {t: names.index(t) for t in self.tasks}
        if len(self.tasks) == self.n:
            self.log(
                "calibration: perf_loss distill pairs tasks and experts in recipe order: "
                + ", ".join(
                    f"{t}<-{e}"
                    for t, e in zip(self.tasks, map(str, self.plan.experts), strict=True)
                )
            )
            return {t: i for i, t in enumerate(self.tasks)}
        if self.n == 1:
            self.log(
                f"calibration: perf_loss distill: the one expert {self.plan.experts[0]} is the "
                f"teacher of every task ({', '.join(self.tasks)})"
            )
            return dict.fromkeys(self.tasks, 0)
        raise DamError(
            f"perf_loss distill needs each task's own expert, but the {len(self.tasks)} tasks "
            f"({', '.join(self.tasks)}) match neither the {self.n} experts' directory names "
            f"({', '.join(names)}) nor their number"
        )

    # -- memory ------------------------------------------------------------------------------------
    def estimate_memory(self) -> int:
        """Bytes the run needs at its peak (a deliberately generous estimate)."""
        return peak_memory_bytes(
            self.shapes.values(),
            experts=self.n,
            granularity=self.cfg.granularity,
            dual=self.dual,
            batch_activation_bytes=self.adapter.activation_bytes(self.cfg.batch_size),
            tasks=len(self.tasks),
            world_size=self.world,
        )

    def available_memory(self) -> tuple[int, str]:
        if self.cfg.memory_budget_gb is not None:
            return int(self.cfg.memory_budget_gb * 2**30), "memory_budget_gb"
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free), f"free memory on {self.device}"
        try:
            pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return int(pages), "available RAM"
        except (ValueError, OSError, AttributeError):
            return 2**62, "unknown"

    def check_memory(self) -> int:
        need = self.estimate_memory()
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

    # -- parameters --------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, dev = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
        self._init_state()
        rows = len(self.names) if cfg.coefficients == "layer" else 1
        self.coef = torch.full((rows, self.n), cfg.coef_init, device=dev, requires_grad=True)
        self.opt_m1 = torch.optim.Adam(list(self.s1.values()), lr=cfg.lr_mask)
        self.opt_m2 = (
            torch.optim.Adam(list(self.s2.values()), lr=cfg.lr_mask) if self.dual else None
        )
        self.opt_c = torch.optim.Adam([self.coef], lr=cfg.lr_coef)
        spaces = {t: self.adapter.perturbation_space(t) for t in self.tasks}
        self.perturb = Perturbations(
            spaces, norm=cfg.norm, eps=cfg.eps, lr=cfg.lr_perturb, bounded=self.dual, device=dev
        )

    def _init_state(self) -> None:
        """The model, the base and expert tensors, and the mask logits (all on this device)."""
        dev = self.device
        self.base = load_tensors(self.base_dir, self.names, dev, allow_pickle=self.allow_pickle)
        self.experts = [
            load_tensors(d, self.names, dev, allow_pickle=self.allow_pickle)
            for d in self.expert_dirs
        ]
        self.model = self.adapter.load_model(self.base_dir)
        self.pnames = self.adapter.parameter_names(self.model, self.names)
        self.teacher_params = {
            t: {self.pnames[k]: self.experts[i][k] for k in self.names}
            for t, i in self.teacher_of.items()
        }
        self.s1 = {k: self._logits(k) for k in self.names}
        self.s2 = {k: self._logits(k, experts=self.n) for k in self.names} if self.dual else {}

    def _logits(self, name: str, experts: int = 0) -> torch.Tensor:
        """Initial mask logits of one tensor (M1; M2 with ``experts``), trainable."""
        return concrete.init_logits(
            self.shapes[name],
            self.cfg.granularity,
            self.cfg.init_logit,
            experts=experts,
            device=self.device,
        ).requires_grad_(True)

    def _teacher_params(self, task: str) -> dict[str, torch.Tensor]:
        return self.teacher_params[task]

    def _coef_row(self, k: int) -> torch.Tensor:
        return self.coef[k if self.coef.shape[0] > 1 else 0]

    def merged_params(
        self,
        m1: dict[str, torch.Tensor | None],
        m2: dict[str, list | None],
        coef: torch.Tensor,
        *,
        rescale: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Module parameters of the merged model (differentiable in masks and coefficients)."""
        out = {}
        rescale_on = concrete.rescaling_applies(self.cfg.rescale, self.cfg.granularity)
        for k, name in enumerate(self.names):
            a, b = m1.get(name), m2.get(name)
            if rescale is not None:
                r = rescale[name]
            else:
                r = concrete.rescale_factors(
                    a, b if b is not None else [None] * self.n, enabled=rescale_on
                )
            c = coef[k if coef.shape[0] > 1 else 0] * r
            out[self.pnames[name]] = merge_tensor(
                self.base[name],
                [e[name] for e in self.experts],
                self.weights[name],
                lam=self.lams[name],
                m1=a,
                m2=b,
                coefficients=c,
            )
        return out

    def _sample_masks(self) -> tuple[dict, dict]:
        """Concrete samples of M1 and every M2; a frozen M1 (``train: m2``) keeps everything."""
        T = self.cfg.temperature
        m1 = (
            {}
            if self.m1_frozen
            else {k: concrete.sample(s, T, self.noise_gen) for k, s in self.s1.items()}
        )
        m2 = {k: list(concrete.sample(s, T, self.noise_gen).unbind(0)) for k, s in self.s2.items()}
        return m1, m2

    def _step_masks(self) -> tuple[dict, dict]:
        """The step's mask sample, detached: the coefficient and perturbation steps use it."""
        m1, m2 = self._sample_masks()
        m1 = {k: v.detach() for k, v in m1.items()}
        m2 = {k: [x.detach() for x in v] for k, v in m2.items()}
        return m1, m2

    # -- losses ------------------------------------------------------------------------------------
    def _task_losses(
        self, params, task: str, x, *, perturbed: bool, safe_params=None
    ) -> tuple[torch.Tensor, ...]:
        """(clean loss L_perf, safety loss) for one batch (clean and perturbed forwards).

        ``safe_params`` (default ``params``) are the parameters of the perturbed forward: the
        sharded trainer passes a copy built with M1 detached, so one backward gives M1 the
        gradient of L_perf alone.
        """
        clean = self.adapter.logits(self.model, params, task, x)
        if task in self.teacher_of:
            with torch.no_grad():
                teacher = self.adapter.logits(self.model, self._teacher_params(task), task, x)
            h = distill(clean, teacher)
        elif self.cfg.perf_loss == "infomax" and self.dual:
            h = infomax(clean)
        else:
            h = entropy(clean)
        if not perturbed or self.cfg.alpha == 0:
            return h, torch.zeros((), device=h.device)
        adv = self.adapter.logits(
            self.model,
            params if safe_params is None else safe_params,
            task,
            x,
            self.perturb.deltas[task].detach(),
        )
        if self.cfg.safe_loss == "entropy" or not self.dual:
            return h, entropy(adv)
        target = torch.softmax(clean.detach().float(), dim=-1)
        safe = F.kl_div(torch.log_softmax(adv.float(), dim=-1), target, reduction="batchmean")
        return h, safe

    def _batches(self) -> dict[str, Any]:
        return {t: self.adapter.sample(t, self.cfg.batch_size, self.data_gen) for t in self.tasks}

    def _coef_step(self, masks1, masks2, *, rescale=None, safe: bool) -> tuple[float, float]:
        cfg = self.cfg
        if not self.dual:  # as released: reset to the initial value, one step on clean entropy
            with torch.no_grad():
                self.coef.fill_(cfg.coef_init)
        params = self.merged_params(masks1, masks2, self.coef, rescale=rescale)
        batches = self._batches()
        perf, safety = 0.0, 0.0
        total = torch.zeros((), device=self.device)
        for t in self.tasks:
            h, s = self._task_losses(params, t, batches[t], perturbed=safe)
            total = total + h + cfg.alpha * s
            perf, safety = perf + h.item(), safety + s.item()
        self.opt_c.zero_grad(set_to_none=True)
        total.backward()
        self.opt_c.step()
        if self.dual:
            with torch.no_grad():
                self.coef.clamp_(*cfg.coef_range)
        return perf, safety

    def _perturb_step(self, masks1, masks2, *, rescale=None) -> float:
        with torch.no_grad():
            params = self.merged_params(masks1, masks2, self.coef.detach(), rescale=rescale)
        flips = 0.0
        for _ in range(self.cfg.perturb_steps):
            batches = self._batches()
            for t in self.tasks:
                x = batches[t]
                with torch.no_grad():
                    pseudo = self.adapter.logits(self.model, params, t, x).argmax(-1)
                delta = self.perturb.deltas[t].detach().clone().requires_grad_(True)
                adv = self.adapter.logits(self.model, params, t, x, delta)
                loss = self._trigger_objective(adv.float(), pseudo)
                (grad,) = torch.autograd.grad(loss, delta)
                self.perturb.step(t, grad)
                flips += float((adv.argmax(-1) != pseudo).float().mean()) / len(self.tasks)
        return flips / self.cfg.perturb_steps

    def _trigger_objective(self, adv: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """What the proxy trigger ascends: away from the clean predictions, or (``targeted``)
        towards the class the perturbed batch already favours most, as a backdoor trigger does."""
        if self.cfg.trigger_search == "targeted" and self.dual:
            logp = torch.log_softmax(adv, dim=-1)
            favoured = logp.exp().mean(0).argmax()
            return logp[:, favoured].mean()
        return F.cross_entropy(adv, pseudo)

    def _mask_step(self) -> tuple[float, float]:
        cfg = self.cfg
        m1, m2 = self._sample_masks()
        params = self.merged_params(m1, m2, self.coef.detach())
        batches = self._batches()
        perf = torch.zeros((), device=self.device)
        safe = torch.zeros((), device=self.device)
        for t in self.tasks:
            h, s = self._task_losses(params, t, batches[t], perturbed=True)
            perf, safe = perf + h, safe + s
        s1 = list(self.s1.values())
        if self.dual:
            s2 = list(self.s2.values())
            g_perf = torch.autograd.grad(perf, s1 + s2, retain_graph=True, allow_unused=True)
            g_safe = (
                torch.autograd.grad(cfg.alpha * safe, s2, allow_unused=True)
                if cfg.alpha > 0 and safe.requires_grad
                else [None] * len(s2)
            )
            for p, g in zip(s1, g_perf[: len(s1)], strict=True):
                p.grad = g
            for p, g, gs in zip(s2, g_perf[len(s1) :], g_safe, strict=True):
                p.grad = g if gs is None else (gs if g is None else g + gs)
            self.opt_m1.step()
            self.opt_m2.step()
        else:  # as released: one mask on clean entropy + alpha * perturbed entropy
            grads = torch.autograd.grad(perf + cfg.alpha * safe, s1, allow_unused=True)
            for p, g in zip(s1, grads, strict=True):
                p.grad = g
            self.opt_m1.step()
        self.opt_m1.zero_grad(set_to_none=True)
        if self.opt_m2 is not None:
            self.opt_m2.zero_grad(set_to_none=True)
        return perf.item(), safe.item()

    # -- extraction --------------------------------------------------------------------------------
    def extract(self) -> tuple[dict, dict, dict]:
        """Masks to write and their rescale factors (dam: binary; as_released: one soft sample)."""
        rescale_on = concrete.rescaling_applies(self.cfg.rescale, self.cfg.granularity)
        with torch.no_grad():
            if self.dual:
                m1 = {k: self._extract_m1(s) for k, s in self.s1.items()}
                m2 = {k: list(concrete.binarize(s).float().unbind(0)) for k, s in self.s2.items()}
            else:
                m1, _ = self._sample_masks()
                m1 = {k: v.detach() for k, v in m1.items()}
                m2 = {}
            r = {
                k: concrete.rescale_factors(
                    m1.get(k), m2.get(k) or [None] * self.n, enabled=rescale_on
                )
                for k in self.names
            }
        return m1, m2, r

    def _extract_m1(self, logits: torch.Tensor) -> torch.Tensor:
        """M1 as written: binary, or all-ones when it was not trained (whatever its init_logit)."""
        keep = (
            torch.ones_like(logits, dtype=torch.bool)
            if self.m1_frozen
            else concrete.binarize(logits)
        )
        return keep.float()

    # -- checkpoint --------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path | None:
        if self.cfg.checkpoint:
            return Path(self.cfg.checkpoint)
        if self.mask_path is None:
            return None
        return self.mask_path.with_name(self.mask_path.name + ".ckpt.safetensors")

    def _state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for k, s in self.s1.items():
            out[f"s1/{k}"] = _local(s).detach()
        for k, s in self.s2.items():
            out[f"s2/{k}"] = _local(s).detach()
        out["coef"] = self.coef.detach()
        for tag, opt in (("m1", self.opt_m1), ("m2", self.opt_m2), ("c", self.opt_c)):
            if opt is None:
                continue
            for i, p in enumerate(opt.param_groups[0]["params"]):
                for key, value in opt.state.get(p, {}).items():
                    out[f"opt/{tag}/{i}/{key}"] = torch.as_tensor(_local(value)).reshape(-1).float()
        out.update(self.perturb.state())
        out["rng/data"] = self.data_gen.get_state()
        out["rng/noise"] = self.noise_gen.get_state()
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, s in self.s1.items():
                _local(s).copy_(state[f"s1/{k}"])
            for k, s in self.s2.items():
                _local(s).copy_(state[f"s2/{k}"])
            self.coef.copy_(state["coef"])
        for tag, opt in (("m1", self.opt_m1), ("m2", self.opt_m2), ("c", self.opt_c)):
            if opt is None:
                continue
            for i, p in enumerate(opt.param_groups[0]["params"]):
                prefix = f"opt/{tag}/{i}/"
                if prefix + "step" not in state:
                    continue
                opt.state[p] = {
                    "step": state[prefix + "step"].reshape(()).clone(),
                    "exp_avg": _like(p, state[prefix + "exp_avg"]),
                    "exp_avg_sq": _like(p, state[prefix + "exp_avg_sq"]),
                }
        self.perturb.load_state(state)
        self.data_gen.set_state(state["rng/data"])
        self.noise_gen.set_state(state["rng/noise"].to(self.noise_gen.get_state().device))

    def _save_checkpoint(self, step: int, key: str, history: list) -> None:
        from safetensors.torch import save_file

        path = self.checkpoint_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": str(step),
            "key": key,
            "history": json.dumps(history),
        }
        with staged_file(path) as tmp:
            save_file(self._state(), str(tmp), metadata=meta)

    def _try_resume(self, key: str) -> tuple[int, list]:
        from safetensors import safe_open

        path = self.checkpoint_path()
        if path is None or not path.is_file():
            return 0, []
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != CHECKPOINT_FORMAT or meta.get("key") != key:
                    self.log(f"calibration: {path} was made with other settings; starting afresh")
                    return 0, []
                state = {k: fh.get_tensor(k) for k in fh.keys()}
            self._load_state(state)
        except Exception as err:  # a damaged checkpoint is not fatal: start again
            self.log(f"calibration: cannot resume from {path} ({err}); starting afresh")
            return 0, []
        step = int(meta["step"])
        self.log(f"calibration: resuming from {path} at step {step}")
        return step, json.loads(meta.get("history", "[]"))

    # -- the run ----------------------------------------------------------------------------------
    def settings(self, base: ModelRecord, experts: list[ModelRecord]) -> dict[str, Any]:
        return {
            "source": "dam-mergekit calibrate",
            "calibration": self.cfg.settings(),
            "recipe": plan_digest(self.plan),
            "data": self.adapter.data_fingerprint(),
            "tasks": self.tasks,
            "extraction": EXTRACTION_DAM if self.dual else EXTRACTION_RELEASED,
            "models": {"base": base.fingerprint, "experts": [e.fingerprint for e in experts]},
        }

    def run(self, *, write: bool = True) -> CalibrationResult:
        cfg = self.cfg
        self.check_memory()
        base_rec, expert_recs = model_records(self.plan, allow_pickle=self.allow_pickle)
        settings = self.settings(base_rec, expert_recs)
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
        self._setup()
        timings = {"coefficients": 0.0, "perturbation": 0.0, "masks": 0.0, "final": 0.0}
        start, history = self._try_resume(key)
        total = cfg.steps + cfg.final_steps
        bar = tqdm(
            total=total,
            initial=min(start, cfg.steps),
            desc="calibrate",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        t_all = time.perf_counter()
        for step in range(start, cfg.steps):
            m1, m2 = self._step_masks()
            t0 = time.perf_counter()
            if self.learn_coef:  # ablations "masks", "m2": coefficients stay at coef_init
                perf, safe = self._coef_step(m1, m2, safe=self.dual)
            t1 = time.perf_counter()
            flips = self._perturb_step(m1, m2)
            t2 = time.perf_counter()
            if cfg.train != "coefficients":  # ablation "coefficients only": masks stay all-ones
                perf, safe = self._mask_step()
            t3 = time.perf_counter()
            timings["coefficients"] += t1 - t0
            timings["perturbation"] += t2 - t1
            timings["masks"] += t3 - t2
            history.append(self._record(step, perf, safe, flips))
            bar.update(1)
            bar.set_postfix(perf=f"{perf:.3f}", safe=f"{safe:.3f}", flips=f"{flips:.2f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                self._save_checkpoint(step + 1, key, history)

        m1, m2, rescale = self.extract()
        t0 = time.perf_counter()
        if not self.dual:
            with torch.no_grad():
                self.coef.fill_(cfg.coef_init)
            self.opt_c = torch.optim.Adam([self.coef], lr=cfg.lr_coef)
        for step in range(cfg.final_steps if self.learn_coef else 0):
            if self.dual:
                perf, safe = self._coef_step(m1, m2, rescale=rescale, safe=True)
                flips = self._perturb_step(m1, m2, rescale=rescale)
            else:  # final AdaMerging on clean entropy, no reset between steps
                perf, safe = self._final_adamerging_step(m1, rescale)
                flips = None
            history.append(self._record(cfg.steps + step, perf, safe, flips, final=True))
            bar.update(1)
        timings["final"] = time.perf_counter() - t0
        bar.close()
        timings["total"] = time.perf_counter() - t_all

        masks, merged = self._finish(m1, m2, rescale)
        path = None
        if write and self.mask_path is not None:
            path = write_mask_file(
                self.mask_path,
                masks,
                base=base_rec,
                experts=expert_recs,
                tensor_shapes=self.shapes,
                settings=settings,
            )
            _write_json(
                self.mask_path.with_name(self.mask_path.name + ".history.json"),
                {"settings": settings, "history": history, "timings": timings},
            )
            ckpt = self.checkpoint_path()
            if ckpt is not None:
                ckpt.unlink(missing_ok=True)
        return CalibrationResult(masks, merged, settings, history, timings, path, start)

    def _final_adamerging_step(self, m1, rescale) -> tuple[float, float]:
        params = self.merged_params(m1, {}, self.coef, rescale=rescale)
        batches = self._batches()
        total = torch.zeros((), device=self.device)
        for t in self.tasks:
            total = total + entropy(self.adapter.logits(self.model, params, t, batches[t]))
        self.opt_c.zero_grad(set_to_none=True)
        total.backward()
        self.opt_c.step()
        return total.item(), 0.0

    def _record(self, step, perf, safe, flips, *, final=False) -> dict[str, float]:
        with torch.no_grad():
            coef = self.coef.detach().mean(0).cpu().tolist()
            keep1 = 1.0 if self.m1_frozen else _mean_prob(self.s1.values())
            rec = {
                "step": step,
                "final": final,
                "L_perf": perf,
                "L_safe": safe,
                "flips": flips,
                "m1_keep": keep1,
            }
            if self.dual:
                for i, keep in enumerate(_keep_per_expert(self.s2.values(), self.n)):
                    rec[f"m2_keep_{i}"] = keep
            for i, c in enumerate(coef):
                rec[f"coef_{i}"] = c
            for t, d in self.perturb.deltas.items():
                rec[f"delta_norm_{t}"] = float(d.detach().norm())
        return rec

    def _final_tensors(self, m1, m2, rescale):
        """Per tensor: (index, name, M1, M2 list, rescale factors, base, expert tensors)."""
        for k, name in enumerate(self.names):
            experts = [e[name] for e in self.experts]
            yield k, name, m1.get(name), m2.get(name), rescale[name], self.base[name], experts

    def _finish(self, m1, m2, rescale) -> tuple[MaskSet, dict[str, torch.Tensor]]:
        """The mask set to write and the merged tensors, both from exactly the same values."""
        masks = MaskSet()
        merged: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for k, name, a, b, r, base, experts in self._final_tensors(m1, m2, rescale):
                coef = (self._coef_row(k).detach() * r).float().cpu()
                a_cpu = None if a is None else a.cpu()
                b_cpu = None if b is None else [x.cpu() for x in b]
                if self.dual:
                    masks.m1[name] = a_cpu.bool()
                    masks.m2[name] = [x.bool() for x in b_cpu]
                else:
                    masks.m1[name] = a_cpu.float().clamp(0, 1)
                masks.coefficients[name] = coef
                merged[name] = merge_tensor(
                    base.cpu(),
                    [e.cpu() for e in experts],
                    self.weights[name],
                    lam=self.lams[name],
                    m1=masks.m1[name].float(),
                    m2=None if not self.dual else [x.float() for x in masks.m2[name]],
                    coefficients=coef,
                )
        return masks, merged


def _mean_prob(logits) -> float:
    total, count = 0.0, 0
    for s in logits:
        total += float(_full(torch.sigmoid(s.detach()).sum()))
        count += s.numel()
    return total / max(count, 1)


def _keep_per_expert(logits, n: int) -> list[float]:
    """Mean keep probability of each expert's M2 (logits are ``[n, ...]`` per tensor)."""
    total, count = torch.zeros(n, dtype=torch.float64), 0
    for s in logits:
        total += _full(torch.sigmoid(s.detach()).reshape(n, -1).sum(1)).double().cpu()
        count += s.numel() // n
    return (total / max(count, 1)).tolist()


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly FSDP-sharded) tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (all of it, unless FSDP sharded it)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _like(param: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """An optimizer state for ``param`` from its saved (local, flattened) values."""
    local = _local(param)
    value = flat.reshape(local.shape).to(local.device).clone()
    if local is param:
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


def _write_json(path: Path, data: dict) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
