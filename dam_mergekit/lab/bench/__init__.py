"""``dam-mergekit bench``: merge a zoo's experts with several methods and score each merge."""

from dam_mergekit.lab.bench.runner import *  # noqa: F403  (split into modules in the next step)
from dam_mergekit.lab.bench.runner import _MERGES, add_parser  # noqa: F401
