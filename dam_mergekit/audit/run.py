"""Audit a recipe's experts before merging: invert triggers on each, flag the anomalous ones.

Each expert is paired with its own task (as the calibration's teacher is), merged alone with the
base at each of the audit's scales, and, for every class of that task, the inversion of
:mod:`dam_mergekit.audit.invert` looks for a small trigger that sends the task's unlabeled inputs
there. :mod:`dam_mergekit.audit.score` turns the flip rates into one anomaly index per expert.

The audit reads the calibration's adapter and data (unlabeled inputs), the base and the experts;
never labels, triggers, target classes or the lab's controls.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from dam_mergekit.audit.config import AUTO, AuditConfig
from dam_mergekit.audit.invert import (
    Inverted,
    PatchTrigger,
    UniversalTrigger,
    invert,
    supports_patch,
)
from dam_mergekit.audit.score import ExpertVerdict, verdict
from dam_mergekit.calibrate.adapters import make_adapter
from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.calibrate.models import load_tensors
from dam_mergekit.calibrate.pairing import task_experts
from dam_mergekit.errors import DamError


@dataclass
class ExpertAudit:
    """One expert's inversions: flip rate per family, scale and class, and its verdict."""

    expert: str
    task: str
    inverted: dict[str, dict[float, list[Inverted]]] = field(default_factory=dict)
    verdict: ExpertVerdict | None = None
    index: int = -1  # the expert's place in the recipe

    def suspected(self, family: str | None = None) -> Inverted:
        """The inverted trigger of the suspected class at the verdict's scale (in ``family``,
        by default the verdict's own)."""
        v = self.verdict
        if v is None:
            raise ValueError(f"{self.expert} has no verdict")
        return self.inverted[family or v.family][v.scale][v.suspected_class]

    @property
    def rates(self) -> dict[str, dict[float, list[float]]]:
        """family -> scale -> flip rate of each class."""
        return {
            fam: {s: [inv.flip_rate for inv in row] for s, row in by.items()}
            for fam, by in self.inverted.items()
        }


@dataclass
class AuditReport:
    experts: list[ExpertAudit]
    settings: dict[str, Any]
    seconds: float

    @property
    def flagged(self) -> list[str]:
        return [e.expert for e in self.experts if e.verdict is not None and e.verdict.flagged]

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "seconds": round(self.seconds, 2),
            "flagged": self.flagged,
            "experts": [
                {
                    "expert": e.expert,
                    "task": e.task,
                    **(e.verdict.to_json() if e.verdict else {}),
                    "flip_rates": {
                        fam: {str(s): [round(r, 4) for r in rates] for s, rates in by.items()}
                        for fam, by in e.rates.items()
                    },
                }
                for e in self.experts
            ],
        }


def judge(experts: list[ExpertAudit], threshold: float) -> None:
    """Every expert's verdict, from its own inversions."""
    for expert in experts:
        expert.verdict = verdict(expert.inverted, threshold)


class Auditor:
    """Everything the audit needs, loaded once: adapter, base model, base tensors, pairing."""

    def __init__(self, plan, calibration: CalibrationConfig, config: AuditConfig, *, log=None):
        from dam_mergekit.model_files import model_dir

        self.cfg, self.plan = config, plan
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.device = torch.device(config.device)
        self.names = [t.name for t in plan.float_tensors]
        if not self.names or not plan.experts:
            raise DamError("the recipe has no experts or no floating-point tensors to audit")
        self.expert_dirs = [model_dir(e) for e in plan.experts]
        self.adapter = make_adapter(
            calibration.adapter, calibration.data, calibration.adapter_options, self.device
        )
        self.tasks = self.adapter.tasks()
        pairs = task_experts(
            self.tasks,
            list(map(str, plan.experts)),
            self.expert_dirs,
            lambda msg: self.log(f"audit: {msg}"),
        )
        self.task_of = {i: t for t, i in pairs.items()}
        base_dir = model_dir(plan.base)
        self.model = self.adapter.load_model(base_dir)
        self.pnames = self.adapter.parameter_names(self.model, self.names)
        self.base = load_tensors(base_dir, self.names, self.device)

    def families(self, task: str) -> list[str]:
        """The families to search on ``task``: a patch only where the input is an image."""
        image = supports_patch(self.adapter.perturbation_space(task))
        if self.cfg.families == (AUTO,):
            return ["patch" if image else "universal"]
        return [f for f in self.cfg.families if f != "patch" or image]

    def run(self, *, progress: bool = True) -> AuditReport:
        start = time.perf_counter()
        audited = [i for i in range(len(self.expert_dirs)) if i in self.task_of]
        work = sum(len(self.families(self.task_of[i])) * len(self.cfg.scales) for i in audited)
        bar = tqdm(total=work, desc="audit", unit="inversion", disable=not progress)
        experts = [self.audit_expert(i, bar) for i in audited]
        bar.close()
        judge(experts, self.cfg.threshold)
        return AuditReport(experts, self.cfg.settings(), time.perf_counter() - start)

    def audit_expert(self, index: int, bar) -> ExpertAudit:
        task = self.task_of[index]
        expert = load_tensors(self.expert_dirs[index], self.names, self.device)
        audit = ExpertAudit(str(self.plan.experts[index]), task, index=index)
        for family in self.families(task):
            audit.inverted[family] = {}
            for scale in self.cfg.scales:
                params = {
                    self.pnames[k]: self.base[k] + scale * (expert[k] - self.base[k])
                    for k in self.names
                }
                audit.inverted[family][scale] = self.invert_all(params, task, family)
                bar.update(1)
        return audit

    def invert_all(self, params, task: str, family: str) -> list[Inverted]:
        """Every class of ``task``, inverted on the same inputs (so rates compare)."""
        cfg, adapter, model = self.cfg, self.adapter, self.model
        gen = torch.Generator().manual_seed(cfg.seed)
        fit = [adapter.sample(task, cfg.batch_size, gen) for _ in range(cfg.steps(family))]
        held_out = adapter.sample(task, cfg.held_out, gen)
        base = {self.pnames[k]: v for k, v in self.base.items()}

        def forward_on(weights):
            def forward(x, edit):
                extra = () if edit is None else (edit,)
                return adapter.logits(model, weights, task, x, *extra)

            return forward

        with torch.no_grad():
            classes = int(forward_on(params)(fit[0], None).shape[-1])
        space = adapter.perturbation_space(task)
        init = torch.Generator().manual_seed(cfg.seed + 1)

        def make_trigger(count: int):
            if family == "patch":
                return PatchTrigger(space, cfg.patch_area, count, init, self.device, cfg.patch_lr)
            numel = int(torch.Size(space.shape).numel())
            return UniversalTrigger(space, cfg.universal_rms * numel**0.5, count, self.device)

        targets = list(range(classes))
        return invert(forward_on(params), fit, held_out, targets, make_trigger, forward_on(base))
