"""The audit's outputs: a table to read, JSON to keep, and a picture of each suspected trigger."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dam_mergekit.audit.run import AuditReport, ExpertAudit
from dam_mergekit.staging import staged_file


def format_table(report: AuditReport) -> str:
    """One row per expert: index, suspected class, flip rates on it and on the base, verdict."""
    head = (
        f"{'expert':<26} {'task':<10} {'index':>6} {'class':>5} {'flips':>6} {'base':>6}  "
        f"{'family@scale':<14} verdict"
    )
    rows = [head, "-" * len(head)]
    for e in report.experts:
        v = e.verdict
        if v is None:
            rows.append(f"{_short(e.expert):<26} {e.task:<10} {'-':>6}")
            continue
        rows.append(
            f"{_short(e.expert):<26} {e.task:<10} {v.score:6.2f} {v.suspected_class:5d} "
            f"{v.flip_rate:6.1%} {v.base_flip_rate:6.1%}  {f'{v.family}@{v.scale:g}':<14} "
            + ("SUSPICIOUS" if v.flagged else "clean")
        )
    rows.append(
        f"{len(report.flagged)} of {len(report.experts)} experts flagged (index: excess flip rate "
        f"of the most reachable class over the median class, flagged above "
        f"{report.settings['threshold']:g}); {report.seconds:.1f} s"
    )
    return "\n".join(rows)


def _short(path: str) -> str:
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def write_json(report: AuditReport, path: Path) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(report.to_json(), indent=1), encoding="utf-8")


def suspected_triggers(expert: ExpertAudit) -> dict[str, torch.Tensor]:
    """Each family's inverted trigger for the suspected class, at the verdict's scale."""
    if expert.verdict is None:
        return {}
    return {family: expert.suspected(family).trigger for family in expert.inverted}


def save_pictures(report: AuditReport, folder: Path) -> list[Path]:
    """One PNG per image expert: its suspected class's trigger in each family, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for e in report.experts:
        triggers = {f: t for f, t in suspected_triggers(e).items() if t.dim() == 3}
        if not triggers or e.verdict is None:
            continue
        fig, axes = plt.subplots(1, len(triggers), figsize=(2.6 * len(triggers), 2.9))
        for ax, (family, trigger) in zip(
            list(getattr(axes, "flat", [axes])), triggers.items(), strict=True
        ):
            ax.imshow(_displayable(trigger, family).permute(1, 2, 0).numpy())
            ax.set_title(family, fontsize=9)
            ax.axis("off")
        v = e.verdict
        fig.suptitle(
            f"{e.task}: class {v.suspected_class}, index {v.score:.1f}"
            + (" (flagged)" if v.flagged else ""),
            fontsize=9,
        )
        path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', _short(e.expert))}.png"
        with staged_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _displayable(trigger: torch.Tensor, family: str) -> torch.Tensor:
    """A patch is already an image (mask * pattern); a perturbation is stretched to [0, 1]."""
    if family == "patch":
        return trigger.clamp(0, 1)
    span = float(trigger.abs().max()) or 1.0
    return (0.5 + 0.5 * trigger / span).clamp(0, 1)
