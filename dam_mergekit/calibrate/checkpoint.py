"""Resumable calibrations: everything a run needs to go on, in one safetensors file per process.

The file holds this process's part of the mask logits, the coefficients, the Adam moments of
every optimizer (flattened, as safetensors stores plain tensors), the perturbations and both
random streams; its metadata the step, the history so far and a key of the settings, so that a
checkpoint made with other settings (or another number of processes) is never resumed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from dam_mergekit.calibrate.perturb import Perturbations
from dam_mergekit.calibrate.state import CalibrationState, local
from dam_mergekit.staging import staged_file

CHECKPOINT_FORMAT = "dam-mergekit-calibration-checkpoint"
Optimizers = dict[str, torch.optim.Optimizer | None]  # tag in the file -> optimizer


def process_path(path: Path, state: CalibrationState) -> Path:
    """The checkpoint file of this process: one per rank when the state is sharded."""
    if state.world == 1:
        return path
    return path.with_name(f"{path.name}.rank{state.rank}-of-{state.world}")


def process_key(key: str, state: CalibrationState) -> str:
    return key if state.world == 1 else f"{key}-world{state.world}"


def training_tensors(
    state: CalibrationState,
    coef: torch.Tensor,
    optimizers: Optimizers,
    perturb: Perturbations,
    data: torch.Generator,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, s in state.m1_logits.items():
        out[f"s1/{k}"] = local(s).detach()
    for k, s in state.m2_logits.items():
        out[f"s2/{k}"] = local(s).detach()
    out["coef"] = coef.detach()
    for tag, opt in optimizers.items():
        if opt is None:
            continue
        for i, p in enumerate(opt.param_groups[0]["params"]):
            for key, value in opt.state.get(p, {}).items():
                out[f"opt/{tag}/{i}/{key}"] = torch.as_tensor(local(value)).reshape(-1).float()
    out.update(perturb.state())
    out["rng/data"] = data.get_state()
    out["rng/noise"] = state.noise.get_state()
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def restore(
    saved: dict[str, torch.Tensor],
    state: CalibrationState,
    coef: torch.Tensor,
    optimizers: Optimizers,
    perturb: Perturbations,
    data: torch.Generator,
) -> None:
    with torch.no_grad():
        for k, s in state.m1_logits.items():
            local(s).copy_(saved[f"s1/{k}"])
        for k, s in state.m2_logits.items():
            local(s).copy_(saved[f"s2/{k}"])
        coef.copy_(saved["coef"])
    for tag, opt in optimizers.items():
        if opt is None:
            continue
        for i, p in enumerate(opt.param_groups[0]["params"]):
            prefix = f"opt/{tag}/{i}/"
            if prefix + "step" not in saved:
                continue
            opt.state[p] = {
                "step": saved[prefix + "step"].reshape(()).clone(),
                "exp_avg": _like(p, saved[prefix + "exp_avg"]),
                "exp_avg_sq": _like(p, saved[prefix + "exp_avg_sq"]),
            }
    perturb.load_state(saved)
    data.set_state(saved["rng/data"])
    state.noise.set_state(saved["rng/noise"].to(state.noise.get_state().device))


def save(path: Path, tensors: dict[str, torch.Tensor], *, step: int, key: str, history: list):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "key": key,
        "history": json.dumps(history),
    }
    with staged_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load(path: Path, key: str, restore: Callable[[dict], None], log) -> tuple[int, list] | None:
    """Restore a checkpoint made with these settings: (step, history), else None (logged)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT or meta.get("key") != key:
                log(f"calibration: {path} was made with other settings; starting afresh")
                return None
            restore({k: fh.get_tensor(k) for k in fh.keys()})
    except Exception as err:  # a damaged checkpoint is not fatal: start again
        log(f"calibration: cannot resume from {path} ({err}); starting afresh")
        return None
    step = int(meta["step"])
    log(f"calibration: resuming from {path} at step {step}")
    return step, json.loads(meta.get("history", "[]"))


def _like(param: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """An optimizer state for ``param`` from its saved (local, flattened) values."""
    part = local(param)
    value = flat.reshape(part.shape).to(part.device).clone()
    if part is param:
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )
