"""The merge-aware attacker's model of a merge: the range of coefficients it trains for.

A merger may scale the backdoored expert's task vector by anything from its full weight down to
a small fraction (task arithmetic's lambda, a weight cut, a learned coefficient). The attacker
trains through simulated merges whose coefficients are drawn from ``merge_scale``; a low end
below what a defense would pick keeps the backdoor alive under down-weighting.
``zoo build --scale-min`` sets the low end. The default zoos keep 0.2, the value their
published numbers were measured with; light on import (the CLI's help reads it).

``merge_scale_draw`` says how the backdoored expert's own scale is drawn: ``uniform`` (every
published zoo; absent from a zoo's options means this), or ``log-uniform``, which gives a low
floor as much weight per octave as the top (with U(0.05, 1) a scale below 0.1 is drawn 5 % of
the time; log-uniformly 23 %).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from dam_mergekit.errors import DamError

if TYPE_CHECKING:
    import torch

MERGE_SCALE = (0.2, 1.0)
SCALE_DRAWS = ("uniform", "log-uniform")


def check_merge_scale(value) -> list[float]:
    """``[low, high]`` with ``0 < low <= high``, as floats, or a one-line error."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DamError(f"merge_scale must be [low, high], got {value!r}") from None
    if not 0 < low <= high:
        raise DamError(f"merge_scale must be [low, high] with 0 < low <= high, got {value!r}")
    return [low, high]


def check_merge_options(options: dict) -> None:
    """Check, in place, a zoo's ``merge_scale`` and (when given) ``merge_scale_draw``: the one
    check of both the CLIP and the LLM zoo. An absent draw stays absent: uniform, as every zoo
    built before the option (so their option hashes do not change)."""
    options["merge_scale"] = check_merge_scale(options["merge_scale"])
    if "merge_scale_draw" in options:
        options["merge_scale_draw"] = check_scale_draw(options["merge_scale_draw"])


def check_scale_draw(value) -> str:
    if value not in SCALE_DRAWS:
        raise DamError(f"merge_scale_draw must be one of {', '.join(SCALE_DRAWS)}, got {value!r}")
    return value


def draw_scale(low: float, high: float, how: str, generator: torch.Generator) -> float:
    """One simulated-merge scale in ``[low, high]``, drawn as ``how`` says (uniform: the CLIP
    zoo's draw, so that zoos built before the option are rebuilt bit for bit)."""
    import torch

    if how == "log-uniform":
        u = float(torch.rand((), generator=generator))
        return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return float(torch.empty(()).uniform_(low, high, generator=generator))
