"""The safety term from the pre-merge audit (``trigger_source: audit``).

Instead of one universal proxy perturbation per task searched during calibration, the safety term
uses the trigger the audit inverted for each flagged expert, on that expert's own task, with an
unlearning target: on a triggered input the merged model should answer what the task's own
expert answers on the clean input. Only flagged experts' M2 learn; every other expert's M2 is held
at keep-everything, so an expert the audit found clean loses nothing to the defense.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dam_mergekit.audit.invert import Inverted
from dam_mergekit.audit.run import AuditReport
from dam_mergekit.calibrate.adapters.base import distill

FROZEN_LOGIT = 30.0  # a Concrete sample at this logit is 1.0 in float32: the entry is kept


class AuditTriggers:
    """Per task, the inverted triggers of its flagged experts; per expert, whether M2 learns."""

    def __init__(self, report: AuditReport, experts: int):
        self.by_task: dict[str, list[Inverted]] = {}
        self.learns = [False] * experts
        for audit in report.experts:
            v = audit.verdict
            if v is None or not v.flagged:
                continue
            self.learns[audit.index] = True
            self.by_task.setdefault(audit.task, []).append(audit.suspected())

    def _rows(self, logits: torch.Tensor) -> torch.Tensor:
        shape = (len(self.learns),) + (1,) * (logits.dim() - 1)
        return torch.tensor(self.learns, device=logits.device).reshape(shape)

    def hold_clean(self, m2_logits: dict[str, torch.Tensor]) -> None:
        """Set every unflagged expert's M2 logits to keep-everything."""
        with torch.no_grad():
            for logits in m2_logits.values():
                logits.copy_(torch.where(self._rows(logits), logits, FROZEN_LOGIT))

    def drop_clean_gradients(self, m2_logits: dict[str, torch.Tensor]) -> None:
        """Zero the gradient of every unflagged expert's M2 (Adam then never moves it)."""
        for logits in m2_logits.values():
            if logits.grad is not None:
                logits.grad.mul_(self._rows(logits))

    def safety(
        self,
        logits: Callable[..., torch.Tensor],
        task: str,
        x: torch.Tensor,
        clean: torch.Tensor,
        teacher: torch.Tensor | None,
    ) -> torch.Tensor:
        """Sum over ``task``'s inverted triggers of KL(answer on clean x || merge on triggered x)."""
        target = (teacher if teacher is not None else clean).detach()
        total = torch.zeros((), device=clean.device)
        for found in self.by_task.get(task, []):
            total = total + distill(logits(x, found.edit(x)), target)
        return total
