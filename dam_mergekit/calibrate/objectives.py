"""What a calibration optimises, one class per ``mode``: the seam for the next algorithm.

The loop (``trainer.py``) runs the same steps for every mode (coefficients, perturbations, masks,
extraction, a final stage); an objective says what each step minimises and how the learned masks
are stored. It reaches the run only through :class:`Run`, and the state only through
:class:`dam_mergekit.calibrate.state.CalibrationState`, so it works on one process or sharded.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from dam_mergekit.calibrate.adapters.base import distill, entropy, infomax
from dam_mergekit.calibrate.config import CalibrationConfig
from dam_mergekit.calibrate.state import CalibrationState, MaskDraw

EXTRACTION_DAM = "binary: keep where sigmoid(logit) >= 0.5; mean rescaling folded into coefficients"
EXTRACTION_RELEASED = "one continuous Concrete sample; mean rescaling folded into coefficients"

Step = tuple[float, float]  # (L_perf, L_safe) of one step, for the history


class Run(Protocol):
    """The parts of a calibration run an objective steps."""

    cfg: CalibrationConfig
    state: CalibrationState
    coef: torch.Tensor
    tasks: list[str]

    def coefficient_step(self, masks: MaskDraw, *, perturbed: bool) -> Step: ...

    def perturbation_step(self, masks: MaskDraw) -> float: ...

    def reset_coefficients(
        self, *, new_optimizer: bool = False, lr: float | None = None
    ) -> None: ...

    def step_coefficients(self, masks: MaskDraw, losses) -> tuple[torch.Tensor, torch.Tensor]: ...

    def batches(self) -> dict[str, Any]: ...

    def logits(self, params, task: str, x, delta: torch.Tensor | None = None) -> torch.Tensor: ...


class Objective(Protocol):
    """One calibration algorithm."""

    extraction: str  # how the stored masks were obtained, recorded in the mask file
    two_masks: bool  # M1 and one M2 per expert (M1 then learns from L_perf alone); else one
    # shared mask, which learns from both terms
    bounded_perturbation: bool  # projected into the eps ball; else unbounded (Adam)
    distills: bool  # the clean loss is the KL from each task's own expert
    reuses_sample: bool  # the mask step reuses the step's Concrete sample; else draws its own

    def clean_loss(self, logits: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor: ...

    def safety_loss(self, clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor: ...

    def trigger_objective(self, perturbed: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor: ...

    def coefficient_step(self, run: Run, masks: MaskDraw) -> Step: ...

    def extract(self, state: CalibrationState) -> MaskDraw: ...

    def begin_final(self, run: Run) -> None: ...

    def final_step(self, run: Run, masks: MaskDraw) -> tuple[float, float, float | None]: ...

    def stored_masks(
        self, m1: torch.Tensor, m2: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]: ...


class DefenseObjective:
    """Mode ``dam``: M1 on the clean loss, every M2 also on the safety loss against a proxy
    trigger; coefficients on both, clamped to ``coef_range``; binary masks."""

    extraction = EXTRACTION_DAM
    two_masks = True
    bounded_perturbation = True
    reuses_sample = False

    def __init__(self, config: CalibrationConfig):
        self.cfg = config
        self.distills = config.perf_loss == "distill"

    def clean_loss(self, logits, teacher):
        if teacher is not None:
            return distill(logits, teacher)
        return infomax(logits) if self.cfg.perf_loss == "infomax" else entropy(logits)

    def safety_loss(self, clean, perturbed):
        if self.cfg.safe_loss == "entropy":
            return entropy(perturbed)
        target = torch.softmax(clean.detach().float(), dim=-1)
        return F.kl_div(torch.log_softmax(perturbed.float(), dim=-1), target, reduction="batchmean")

    def trigger_objective(self, perturbed, pseudo):
        """Away from the clean predictions, or (``targeted``) towards the class the perturbed
        batch already favours most, as a backdoor trigger does."""
        if self.cfg.trigger_search == "targeted":
            logp = torch.log_softmax(perturbed, dim=-1)
            favoured = logp.exp().mean(0).argmax()
            return logp[:, favoured].mean()
        return F.cross_entropy(perturbed, pseudo)

    def coefficient_step(self, run, masks):
        step = run.coefficient_step(masks, perturbed=True)
        with torch.no_grad():
            run.coef.clamp_(*self.cfg.coef_range)
        return step

    def extract(self, state):
        return state.binary()

    def begin_final(self, run):
        """The coefficients go on from where the mask phase left them."""

    def final_step(self, run, masks):
        perf, safe = self.coefficient_step(run, masks)
        return perf, safe, run.perturbation_step(masks)

    def stored_masks(self, m1, m2):
        return m1.bool(), [x.bool() for x in m2]


class ReleasedObjective:
    """Mode ``as_released``, the released code's algorithm, for comparison: one shared mask on
    clean entropy plus alpha times perturbed entropy, learned on the same Concrete sample as the
    step's inner coefficient update; an unbounded perturbation; coefficients reset before each
    inner step (lr ``lr_coef``, Adam moments kept) on clean entropy only; then an entropy-only
    AdaMerging from ``coef_init`` with a new optimizer (lr ``lr_coef_final``) on one continuous
    mask sample. Its final coefficients are kept >= ``coef_range``'s low end, which the release
    does not do: a mask file stores no negative coefficient."""

    extraction = EXTRACTION_RELEASED
    two_masks = False
    bounded_perturbation = False
    distills = False
    reuses_sample = True

    def __init__(self, config: CalibrationConfig):
        self.cfg = config

    def clean_loss(self, logits, teacher):
        return entropy(logits)

    def safety_loss(self, clean, perturbed):
        return entropy(perturbed)

    def trigger_objective(self, perturbed, pseudo):
        return F.cross_entropy(perturbed, pseudo)

    def coefficient_step(self, run, masks):
        run.reset_coefficients()
        return run.coefficient_step(masks, perturbed=False)

    def extract(self, state):
        return state.draw(grad=False)

    def begin_final(self, run):
        run.reset_coefficients(new_optimizer=True, lr=self.cfg.lr_coef_final)

    def final_step(self, run, masks):
        """AdaMerging on clean entropy, no reset between steps."""
        batches = run.batches()
        zero = torch.zeros((), device=run.coef.device)

        def losses(params, _safe_params):
            for t in run.tasks:
                yield entropy(run.logits(params, t, batches[t])), zero

        total, _ = run.step_coefficients(masks, losses)
        with torch.no_grad():
            run.coef.clamp_(min=self.cfg.coef_range[0])
        return total.item(), 0.0, None

    def stored_masks(self, m1, m2):
        return m1.float().clamp(0, 1), None


OBJECTIVES: dict[str, type] = {"dam": DefenseObjective, "as_released": ReleasedObjective}


def objective_for(config: CalibrationConfig) -> Objective:
    return OBJECTIVES[config.mode](config)
