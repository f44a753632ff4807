"""The lab's protocol: which zoo seeds may be tuned on and which are only reported, which seed a
zoo seed's calibration gets, and which rows a defense is judged against.

Zoo seeds 0-2 are development seeds: any setting may be chosen on them. Seeds 3-7 are test
seeds: nothing is chosen on them, and they are reported on their own (mean, std, worst seed).
A calibration never shares its seed with the zoo it defends, so its random batches and Concrete
draws cannot replay the builder's draws (which inputs were poisoned, which were held out).
"""

from __future__ import annotations

DEVELOPMENT_SEEDS = (0, 1, 2)
TEST_SEEDS = (3, 4, 5, 6, 7)
SPLITS = ("development", "test", "extra")  # "extra": a seed outside 0-7, neither tuned nor held out

CALIBRATION_SEED_OFFSET = 1000
"""Default calibration seed of zoo seed ``s``: ``1000 + s`` (``bench --calib-seeds`` overrides)."""

UNDEFENDED = ("task_arithmetic", "ties", "dare_ties", "distill")
"""Merges without any defense; a defense is judged against the most accurate of them."""
NO_BACKDOOR = "task_arithmetic_clean_control"
"""Task arithmetic with the backdoored experts swapped for their clean controls."""
DOWN_WEIGHTED = "task_arithmetic_backdoor_third"
"""Task arithmetic with each backdoored expert's weight cut to a third: does the attack survive
down-weighting? A probe of the attack (it reads which expert is backdoored), not a baseline."""


def seed_split(seed: int) -> str:
    """``development``, ``test`` or ``extra``."""
    if seed in DEVELOPMENT_SEEDS:
        return "development"
    return "test" if seed in TEST_SEEDS else "extra"


def calibration_seed(zoo_seed: int) -> int:
    """The default seed of the calibrations that defend the zoo of ``zoo_seed``."""
    return CALIBRATION_SEED_OFFSET + zoo_seed


def best_undefended(rows: dict[str, dict]) -> str | None:
    """The undefended merge with the highest mean clean accuracy (None when none ran)."""
    ran = [n for n in UNDEFENDED if rows.get(n, {}).get("acc_avg") is not None]
    return max(ran, key=lambda n: rows[n]["acc_avg"]) if ran else None
