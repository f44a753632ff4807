"""Which expert is each task's own: the distillation teacher, and the model an audit inverts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dam_mergekit.errors import DamError


def task_experts(
    tasks: list[str], experts: list[str], expert_dirs: list[str], log: Callable[[str], None]
) -> dict[str, int]:
    """Each task's expert index: by directory name, else recipe order, else the one expert.

    One expert is every task's own when the recipe has only one (the bench's ``awm`` row, whose
    one expert is a merge).
    """
    names = [Path(d).name for d in expert_dirs]
    if all(names.count(t) == 1 for t in tasks):
        return {t: names.index(t) for t in tasks}
    if len(tasks) == len(experts):
        pairs = ", ".join(f"{t}<-{e}" for t, e in zip(tasks, experts, strict=True))
        log(f"tasks and experts paired in recipe order: {pairs}")
        return {t: i for i, t in enumerate(tasks)}
    if len(experts) == 1:
        log(f"the one expert {experts[0]} is the own expert of every task ({', '.join(tasks)})")
        return dict.fromkeys(tasks, 0)
    raise DamError(
        f"each task needs its own expert, but the {len(tasks)} tasks ({', '.join(tasks)}) "
        f"match neither the {len(experts)} experts' directory names ({', '.join(names)}) nor "
        "their number"
    )
