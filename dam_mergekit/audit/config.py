"""The audit's settings: one dataclass, every value checked before any model is loaded."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from dam_mergekit.audit.invert import FAMILIES
from dam_mergekit.errors import DamError

AUTO = "auto"


@dataclass(frozen=True)
class AuditConfig:
    """How hard the audit looks for a trigger, and when it calls an expert suspicious.

    The budgets are those of a trigger a user would not notice: ``patch_area`` of the pixels for
    the patch family (1 %: about a 3x3 patch on a 32x32 image, 22x22 on 224x224), and an L2 norm
    of ``universal_rms`` per input value for the universal family. The defaults were chosen on the
    lab's development zoos (seeds 0-2, docs/audit.md), within a third of a calibration's time.
    """

    scales: tuple[float, ...] = (1.0,)  # each expert is inverted on base + scale * its vector
    # "auto": the patch family on image inputs, the universal one where a patch cannot apply
    families: tuple[str, ...] = (AUTO,)
    patch_steps: int = 120  # optimisation steps (one batch each) per class
    universal_steps: int = 60
    batch_size: int = 8
    held_out: int = 128  # inputs on which a fitted trigger's flip rate is measured
    patch_area: float = 0.01
    patch_lr: float = 0.1  # Adam's step on the mask and pattern logits
    universal_rms: float = 0.03
    threshold: float = 0.55  # excess flip rate above which an expert is flagged
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "families", tuple(self.families))
        if not self.scales or any(not (0 < s <= 10 and math.isfinite(s)) for s in self.scales):
            raise DamError(f"audit scales must be numbers in (0, 10], got {list(self.scales)}")
        unknown = [f for f in self.families if f not in (*FAMILIES, AUTO)]
        if unknown or not self.families or (AUTO in self.families and len(self.families) > 1):
            raise DamError(
                f"audit families must be {AUTO!r} or some of {', '.join(FAMILIES)}, got "
                f"{list(self.families)}"
            )
        for name in ("patch_steps", "universal_steps", "batch_size", "held_out"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise DamError(f"audit {name} must be a positive integer")
        if not 0 < self.patch_area < 1:
            raise DamError(f"audit patch_area must lie in (0, 1), got {self.patch_area}")
        if not self.universal_rms > 0:
            raise DamError(f"audit universal_rms must be positive, got {self.universal_rms}")
        if not 0 < self.threshold < 1:
            raise DamError(f"audit threshold must lie in (0, 1), got {self.threshold}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "audit") -> AuditConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DamError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)

    def steps(self, family: str) -> int:
        return self.patch_steps if family == "patch" else self.universal_steps

    def settings(self) -> dict[str, Any]:
        out = asdict(self)
        out["scales"], out["families"] = list(self.scales), list(self.families)
        return out
