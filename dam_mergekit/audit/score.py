"""From flip rates to verdicts: how far an expert's most reachable class stands above the rest.

An inverted trigger's flip rate says how easily a class is reached, but some tasks are simply
fragile: every class of a weak model flips easily. So each class's score is its *excess*: its
flip rate minus the median class's, for the same expert, family and scale (Neural Cleanse's
median-based outlier test, on flip rates under a fixed budget instead of trigger sizes). An
expert's index is its largest excess; above the threshold it is flagged and that class is the
suspect.

Why not a z-score over the pool of every expert's classes, as Neural Cleanse divides by the MAD:
on the development zoos a clean task with one naturally easy class (the stripes task's class 3,
excess 0.51) lay as many MADs out as some backdoors (a blended one: 0.62), while the excess
itself kept every backdoor (0.57 and up) above every clean class (0.52 at most). docs/audit.md
has the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Any

from dam_mergekit.audit.invert import Inverted


@dataclass(frozen=True)
class ExpertVerdict:
    score: float  # excess flip rate of the expert's most reachable class over its median class
    suspected_class: int
    flip_rate: float  # of the suspected class's inverted trigger
    base_flip_rate: float  # the same trigger on the base model: a shared shortcut is a feature
    family: str
    scale: float
    flagged: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 4),
            "suspected_class": self.suspected_class,
            "flip_rate": round(self.flip_rate, 4),
            "base_flip_rate": round(self.base_flip_rate, 4),
            "family": self.family,
            "scale": self.scale,
            "flagged": self.flagged,
        }


def excesses(rates: list[float]) -> list[float]:
    """Each class's flip rate above the median class's."""
    mid = median(rates)
    return [r - mid for r in rates]


def verdict(
    inverted: dict[str, dict[float, list[Inverted]]], threshold: float
) -> ExpertVerdict | None:
    """An expert's most anomalous (family, scale, class), flagged above ``threshold``."""
    best = None
    for family, by_scale in inverted.items():
        for scale, row in by_scale.items():
            rates = [inv.flip_rate for inv in row]
            for inv, excess in zip(row, excesses(rates), strict=True):
                if best is None or excess > best[0]:
                    best = (excess, inv, family, scale)
    if best is None:
        return None
    excess, inv, family, scale = best
    return ExpertVerdict(
        excess, inv.target, inv.flip_rate, inv.reference_rate, family, scale, excess > threshold
    )
