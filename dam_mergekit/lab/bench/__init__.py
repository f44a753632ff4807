"""The bench: merge a zoo's experts with several methods, score each merge, check the claims.

:mod:`.methods` names the methods and builds their recipes, :mod:`.merging` merges one recipe,
:mod:`.runner` runs a zoo (and its seed siblings) through the methods, :mod:`.report` aggregates
seeds, prints the table and checks the claims, :mod:`.figure` draws acc_asr.png and :mod:`.cli`
adds ``dam-mergekit bench`` and ``demo``.
"""

from dam_mergekit.lab.bench.merging import merge_recipe
from dam_mergekit.lab.bench.methods import (
    AWM_SETTINGS,
    Method,
    RecipeBuilder,
    awm_recipe,
    clean_control_recipe,
    dam_coefficients_recipe,
    dam_recipe,
    dare_ties_recipe,
    learned_coefficients,
    methods_for,
    register_method,
    task_arithmetic_recipe,
    ties_recipe,
    unregister_method,
    write_coefficient_masks,
)
from dam_mergekit.lab.bench.report import (
    FIGURES,
    aggregate,
    check_dam,
    check_succession,
    report,
    summary_table,
)
from dam_mergekit.lab.bench.runner import BENCH_THREADS, bench_zoo, run_bench, zoos_for_seeds

__all__ = [
    "AWM_SETTINGS",
    "BENCH_THREADS",
    "FIGURES",
    "Method",
    "RecipeBuilder",
    "aggregate",
    "awm_recipe",
    "bench_zoo",
    "check_dam",
    "check_succession",
    "clean_control_recipe",
    "dam_coefficients_recipe",
    "dam_recipe",
    "dare_ties_recipe",
    "learned_coefficients",
    "merge_recipe",
    "methods_for",
    "register_method",
    "report",
    "run_bench",
    "summary_table",
    "task_arithmetic_recipe",
    "ties_recipe",
    "unregister_method",
    "write_coefficient_masks",
    "zoos_for_seeds",
]
