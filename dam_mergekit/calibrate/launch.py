"""How this process was launched: alone, or as one of ``torchrun``'s processes (no torch import)."""

from __future__ import annotations

import os


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (1 when run directly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this process reports and writes (rank 0 under torchrun; always when run alone)."""
    return os.environ.get("RANK", "0") == "0"
