"""How this process was launched: alone, or as one of ``torchrun``'s processes (no torch import)."""

from __future__ import annotations

import os

from dam_mergekit.errors import DamError

PARALLEL_ENV = "DAM_CALIBRATION_PARALLEL"
PARALLEL_MODES = {
    "data": "each process runs its share of every batch (faster; memory per process unchanged)",
    "state": "the state is sharded by FSDP (memory per process falls; every process runs "
    "every batch)",
}


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (1 when run directly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this process reports and writes (rank 0 under torchrun; always when run alone)."""
    return os.environ.get("RANK", "0") == "0"


def parallel_mode() -> str:
    """How ``torchrun``'s processes share a calibration: ``data`` (default) or ``state``."""
    mode = os.environ.get(PARALLEL_ENV, "data").strip().lower() or "data"
    if mode not in PARALLEL_MODES:
        raise DamError(
            f"{PARALLEL_ENV}={mode!r}: choose one of {', '.join(sorted(PARALLEL_MODES))}"
        )
    return mode


def join_process_group(config) -> tuple[int, int]:
    """Join torchrun's process group: (rank, world). On cuda each process takes the GPU of its
    local rank, which is written into ``config.device``."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise DamError("calibration under torchrun needs torch.distributed, which this torch lacks")
    kind = torch.device(config.device).type
    if kind not in ("cpu", "cuda"):
        raise DamError(f"calibration under torchrun runs on cpu or cuda, not {config.device!r}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    if kind == "cuda":  # one GPU per process: the launcher's local rank picks it
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        config.device = f"cuda:{local_rank}"
    return dist.get_rank(), dist.get_world_size()
