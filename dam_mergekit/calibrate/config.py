"""The calibration file: every setting of a DAM calibration run, checked before any training.

A calibration file is YAML. Paths in it (``data``, ``checkpoint``) are relative to the current
directory, like the model paths of a mergekit recipe. Only the keys below are accepted; an unknown
key is an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dam_mergekit.errors import DamError
from dam_mergekit.masks.file import COEFFICIENT_RANGE

ADAPTERS = ("clip", "causal_lm")
MODES = ("dam", "as_released")
NORMS = ("linf", "l2")
GRANULARITIES = ("element", "row", "tensor")
COEFFICIENT_SCOPES = ("layer", "task")
SAFE_LOSSES = ("kl", "entropy")
PERF_LOSSES = ("entropy", "infomax", "distill")
TRIGGER_SEARCHES = ("untargeted", "targeted")
TRAIN_PARTS = ("both", "masks", "coefficients", "m2")
DELTA_DTYPES = ("float32", "bfloat16")
MEMORY_LAYOUTS = ("whole", "streamed", "offload")
# What differs from the CalibrationConfig defaults (validated on CLIP zoos) for the built-in
# causal-LM adapter, and the released code's settings (mode as_released). recipes/ agrees.
CAUSAL_LM_SETTINGS: dict[str, Any] = {
    "steps": 100,
    "final_steps": 25,
    "batch_size": 8,
    "lr_perturb": 0.05,
    "granularity": "row",
}
RELEASED_SETTINGS: dict[str, Any] = {
    "mode": "as_released",
    "steps": 1000,
    "final_steps": 1000,
    "init_logit": 0.0,
    "lr_mask": 0.001,
    "lr_coef": 1.0,  # the inner step, from coefficients reset to coef_init each time
    "lr_coef_final": 0.001,  # the final AdaMerging stage, a new optimizer
    "lr_perturb": 0.0001,
    "alpha": 0.1,
    "coef_range": [0.0, 10.0],
    "safe_loss": "entropy",
    "perf_loss": "entropy",
    "trigger_search": "untargeted",
}
# The released code perturbs normalised pixels (the built-in clip adapter's option).
RELEASED_CLIP_OPTIONS: dict[str, Any] = {"perturb": "normalized"}
FLOAT_KEYS = (
    "lr_mask",
    "lr_coef",
    "lr_coef_final",
    "lr_perturb",
    "alpha",
    "eps",
    "coef_init",
    "init_logit",
    "temperature",
    "memory_budget_gb",
)


@dataclass
class CalibrationConfig:
    """Settings of one calibration run (see docs/calibration.md for the meaning of each)."""

    adapter: str = "clip"  # "clip", "causal_lm" or "package.module:Class" (a user adapter)
    data: str | list[str] = ""  # a zoo directory (or adapter-specific paths)
    adapter_options: dict[str, Any] = field(default_factory=dict)
    mode: str = "dam"  # "dam" (two masks, bounded perturbation) or "as_released"
    steps: int = 150  # alternating (coefficient, perturbation, M1, M2) steps
    final_steps: int = 50  # coefficient-only steps with the extracted (binary) masks fixed
    batch_size: int = 16
    lr_mask: float = 0.1
    lr_coef: float = 3e-3
    lr_coef_final: float | None = None  # coefficient lr of the final stage (default: lr_coef)
    lr_perturb: float = 0.1  # step size of the perturbation (per step, in its norm)
    perturb_steps: int = 1  # ascent steps on the perturbation per outer step
    alpha: float = 3.0  # weight of L_safe (in the M2 and the coefficient steps)
    eps: float = 1.0  # norm bound of the perturbation
    norm: str = "l2"
    granularity: str = "element"
    coefficients: str = "layer"  # "layer": one per expert per tensor; "task": one per expert
    coef_init: float = 0.3
    coef_range: tuple[float, float] = (0.0, 0.3)
    init_logit: float = 3.0  # initial mask logit (keep probability sigmoid(3) = 0.95)
    temperature: float = 0.5
    rescale: bool = True  # the released per-tensor mean rescaling (folded into coefficients)
    safe_loss: str = "kl"  # "kl": KL(clean || perturbed); "entropy": entropy on perturbed
    # "distill": KL from each task's own expert on clean inputs (default: does not collapse);
    # "entropy" (as published); "infomax": entropy minus the entropy of the batch's mean
    perf_loss: str = "distill"
    # "untargeted" (as published): the proxy trigger moves inputs away from the merge's own
    # predictions; "targeted": towards the one class it already favours (a backdoor's signature)
    trigger_search: str = "targeted"
    # ablations (mode dam): "masks" keeps the coefficients at coef_init, "coefficients" keeps the
    # masks all-ones, "m2" also keeps M1 all-ones (one trained mask: the bench's awm); "both" is DAM
    train: str = "both"
    seed: int = 0
    device: str = "cpu"
    memory_budget_gb: float | None = None  # refuse when the estimate exceeds it
    # dtype the task vectors are held in (cast to float32 per use): unset is float32;
    # "bfloat16" halves the largest part of the state at scale
    delta_dtype: str | None = None
    # where the merged weights live (dam_mergekit/calibrate/streamed.py): "whole" forms them once
    # per step (fastest); "streamed" forms each inside the module that reads it and again in its
    # backward (blocks checkpointed); "offload" is streamed with the base and task vectors in host
    # memory. It changes memory and time, not the masks (not recorded in the mask file).
    memory: str = "whole"
    checkpoint: str | None = None  # default: next to the mask file
    checkpoint_every: int = 25
    # the pre-merge audit (dam_mergekit.audit) before training: true, or a mapping of its
    # settings; its verdicts go into the mask file (unset or false: no audit)
    audit: bool | dict[str, Any] | None = None
    # where the safety term's triggers come from: unset, the universal proxy perturbation searched
    # during calibration; "audit": the audit's inverted triggers of the experts it flags, and only
    # those experts' M2 learn (mode dam, one process)
    trigger_source: str | None = None
    source: str | None = field(default=None, compare=False)  # where it was read from

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationConfig:
        from dam_mergekit.recipe.load import read_yaml

        where = str(path)
        raw = read_yaml(path, "calibration file")
        if not isinstance(raw, dict):
            raise DamError(f"{where}: a calibration file is a YAML mapping of settings")
        return cls.from_dict(raw, where=where)

    @classmethod
    def check_keys(cls, raw: dict[str, Any], where: str, *, exclude: tuple[str, ...] = ()) -> None:
        """Refuse a key that is not a setting (a typo must not fall back to a default)."""
        known = {f.name for f in fields(cls)} - {"source", *exclude}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DamError(
                f"{where}: unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "calibration") -> CalibrationConfig:
        cls.check_keys(raw, where)
        values = dict(raw)
        if "coef_range" in values:
            rng = values["coef_range"]
            if not (isinstance(rng, (list, tuple)) and len(rng) == 2):
                raise DamError(f"{where}: coef_range must be [low, high], got {rng!r}")
            values["coef_range"] = (float(rng[0]), float(rng[1]))
        if values.get("adapter_options") is None:
            values["adapter_options"] = {}
        for key in FLOAT_KEYS:  # PyYAML reads `1e-3` (no dot) as a string
            if isinstance(values.get(key), str):
                try:
                    values[key] = float(values[key])
                except ValueError:
                    raise DamError(
                        f"{where}: {key} must be a number, got {values[key]!r}"
                    ) from None
        cfg = cls(**values, source=where)
        cfg.check()
        return cfg

    # -- checks (cheap, nothing loaded) ----------------------------------------------------------
    def check(self) -> None:
        """Settings that are wrong whatever the models: a one-line error naming the setting."""
        where = self.source or "calibration"

        def bad(msg: str) -> DamError:
            return DamError(f"{where}: {msg}")

        if self.adapter not in ADAPTERS and ":" not in str(self.adapter):
            raise bad(
                f"unknown adapter {self.adapter!r}; use one of {', '.join(ADAPTERS)} or "
                "'package.module:Class' for your own adapter"
            )
        if self.adapter not in ADAPTERS:  # a user's adapter: import it now, and say from where
            from dam_mergekit.calibrate.adapters import adapter_class

            try:
                adapter_class(self.adapter)
            except DamError as err:
                raise bad(f"{err} (the `adapter` setting)") from None
        self._check_choices(bad)
        if not (isinstance(self.eps, (int, float)) and self.eps > 0 and math.isfinite(self.eps)):
            raise bad(
                f"eps must be a finite number > 0 (the perturbation's norm bound), got {self.eps!r}"
            )
        for key in ("steps", "batch_size", "perturb_steps", "checkpoint_every"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise bad(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not (isinstance(self.final_steps, int) and self.final_steps >= 0):
            raise bad(f"final_steps must be an integer >= 0, got {self.final_steps!r}")
        for key in ("lr_mask", "lr_coef", "lr_perturb", "temperature"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and value > 0):
                raise bad(f"{key} must be a number > 0, got {value!r}")
        if self.train != "both" and self.mode != "dam":
            raise bad(f"train: {self.train} is an ablation of mode dam, not of {self.mode}")
        final_lr = self.lr_coef_final
        if final_lr is not None and not (isinstance(final_lr, (int, float)) and final_lr > 0):
            raise bad(f"lr_coef_final must be a number > 0 (or unset), got {final_lr!r}")
        if final_lr is not None and self.mode == "dam":
            raise bad(
                "lr_coef_final is a setting of mode as_released (its final stage starts a new "
                "optimizer); mode dam's final stage goes on with lr_coef"
            )
        if not (isinstance(self.alpha, (int, float)) and self.alpha >= 0):
            raise bad(f"alpha must be a number >= 0, got {self.alpha!r}")
        low, high = self.coef_range
        if not (0 <= low <= high <= COEFFICIENT_RANGE[1]):
            raise bad(
                f"coef_range must satisfy 0 <= low <= high <= {COEFFICIENT_RANGE[1]:g} (what "
                f"`masks validate` accepts), got {list(self.coef_range)}"
            )
        if not (low <= self.coef_init <= high):
            raise bad(f"coef_init {self.coef_init} lies outside coef_range {list(self.coef_range)}")
        if self.delta_dtype not in (None, *DELTA_DTYPES):
            raise bad(
                f"delta_dtype must be one of {', '.join(DELTA_DTYPES)} (or unset), "
                f"got {self.delta_dtype!r}"
            )
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise bad(f"memory_budget_gb must be > 0, got {self.memory_budget_gb!r}")
        if not self.data:
            raise bad("`data` is empty; set it to the calibration data (a zoo directory)")
        for path in self.data_paths():
            if not Path(path).exists():
                raise bad(
                    f"calibration data {path} not found (paths are relative to {os.getcwd()})"
                )
        check_device(self.device, where)
        self._check_audit(bad)

    def _check_choices(self, bad) -> None:
        """Settings that take one of a few names."""
        for key, allowed in (
            ("mode", MODES),
            ("norm", NORMS),
            ("granularity", GRANULARITIES),
            ("coefficients", COEFFICIENT_SCOPES),
            ("safe_loss", SAFE_LOSSES),
            ("perf_loss", PERF_LOSSES),
            ("trigger_search", TRIGGER_SEARCHES),
            ("train", TRAIN_PARTS),
            ("memory", MEMORY_LAYOUTS),
        ):
            if getattr(self, key) not in allowed:
                raise bad(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")

    def _check_audit(self, bad) -> None:
        """The audit settings and what trigger_source needs of them."""
        if not (self.audit is None or isinstance(self.audit, (bool, dict))):
            raise bad(
                f"audit must be true, false or a mapping of audit settings, got {self.audit!r}"
            )
        self.audit_config()  # its own settings are checked too
        if self.trigger_source not in (None, "search", "audit"):
            raise bad(f"trigger_source must be search or audit, got {self.trigger_source!r}")
        if self.trigger_source == "audit" and (not self.audit or self.mode != "dam"):
            raise bad("trigger_source audit needs mode dam and the audit (audit: true)")

    def audit_config(self):
        """The audit to run before training (on the calibration's device), or None."""
        if not self.audit:
            return None
        from dam_mergekit.audit.config import AuditConfig

        raw = {"device": self.device, **(self.audit if isinstance(self.audit, dict) else {})}
        return AuditConfig.from_dict(raw, where=f"{self.source or 'calibration'}: audit")

    def data_paths(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else [str(p) for p in self.data]

    # -- what the mask file records ----------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Everything that changes the learned masks (device, memory layout, checkpointing and
        budget do not)."""
        out = asdict(self)
        for key in ("source", "checkpoint", "checkpoint_every", "memory_budget_gb", "device"):
            out.pop(key)
        out.pop("memory")
        out["coef_range"] = list(self.coef_range)
        _drop_unset(out)
        return out


OPTIONAL_KEYS = ("lr_coef_final", "audit", "trigger_source", "delta_dtype")
"""Settings whose unset value (None) is left out of what a mask file records, so that mask files
made before the setting existed keep their fingerprint."""


def _drop_unset(settings: dict[str, Any]) -> None:
    for key in OPTIONAL_KEYS:
        if settings.get(key) is None or settings.get(key) is False:
            settings.pop(key, None)


def check_device(device: str, where: str = "calibration") -> None:
    """Refuse a device this machine does not have (before anything is loaded)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DamError(
            f"{where}: device {device!r} is not a torch device (cpu, cuda, cuda:0, mps)"
        ) from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DamError(
                f"{where}: device {device!r} asked for, but CUDA is not available here; "
                "set `device: cpu`"
            )
        if dev.index is not None and dev.index >= count:
            raise DamError(
                f"{where}: device {device!r} does not exist ({count} CUDA device(s): "
                f"cuda:0..cuda:{count - 1})"
            )
        return
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DamError(f"{where}: device 'mps' is not available here; set `device: cpu`")
        return
    raise DamError(f"{where}: device {device!r} is not supported; use cpu, cuda[:N] or mps")


def default_calibration(adapter: str, data: str, **overrides: Any) -> dict[str, Any]:
    """A whole calibration-file mapping: the defaults for a built-in adapter, then ``overrides``."""
    out = asdict(CalibrationConfig(adapter=adapter, data=data))
    for key in ("source", "checkpoint", "memory_budget_gb", "memory"):
        out.pop(key)
    out["coef_range"] = list(out["coef_range"])
    _drop_unset(out)
    if adapter == "causal_lm":
        out.update(CAUSAL_LM_SETTINGS)
    if overrides.get("mode") == "as_released":
        out.update(RELEASED_SETTINGS)
        if adapter == "clip":
            out["adapter_options"] = dict(RELEASED_CLIP_OPTIONS)
    out.update(overrides)
    return out
