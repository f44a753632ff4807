"""The merge-aware attacker's model of a merge: the range of coefficients it trains for.

A merger may scale the backdoored expert's task vector by anything from its full weight down to
a small fraction (task arithmetic's lambda, a weight cut, a learned coefficient). The attacker
trains through simulated merges whose coefficients are drawn from ``merge_scale``; a low end
below what a defense would pick keeps the backdoor alive under down-weighting.
``zoo build --scale-min`` sets the low end. The default zoos keep 0.2, the value their
published numbers were measured with; light on import (the CLI's help reads it).
"""

from __future__ import annotations

from dam_mergekit.errors import DamError

MERGE_SCALE = (0.2, 1.0)


def check_merge_scale(value) -> list[float]:
    """``[low, high]`` with ``0 < low <= high``, as floats, or a one-line error."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DamError(f"merge_scale must be [low, high], got {value!r}") from None
    if not 0 < low <= high:
        raise DamError(f"merge_scale must be [low, high] with 0 < low <= high, got {value!r}")
    return [low, high]
