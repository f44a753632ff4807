"""The protocol a calibration adapter implements (documented in docs/calibration.md).

The trainer knows nothing about the model family. An adapter tells it:

- which tasks there are, and a batch of unlabeled inputs of each (``tasks``, ``sample``);
- how to build the model once from the base directory (``load_model``) and which module parameter
  each merged tensor is (``parameter_names``; by default the names are the same);
- the logits of a batch under given parameters, with the task's perturbation added where it lives
  (``logits``; the trainer passes merged parameters for ``torch.func.functional_call``);
- where the perturbation lives (``perturbation_space``: its shape and the valid input range);
- how to take one process's share of a batch under data-parallel calibration (``share``).

Adapters never read labels: calibration is unsupervised, like the paper's.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dam_mergekit.calibrate.perturb import PerturbationSpace
from dam_mergekit.errors import DamError


class CalibrationAdapter(ABC):
    """Base class of adapters; a user adapter subclasses it and is named ``module:Class``."""

    def __init__(self, data: str | list[str], options: dict[str, Any], device: torch.device):
        self.data = data
        self.options = dict(options or {})
        self.device = device

    @abstractmethod
    def tasks(self) -> list[str]:
        """The task names, each with its own unlabeled data and perturbation."""

    @abstractmethod
    def load_model(self, base_dir: str) -> torch.nn.Module:
        """The base model (eval mode, on ``self.device``); the trainer swaps in merged weights."""

    @abstractmethod
    def sample(self, task: str, batch_size: int, generator: torch.Generator) -> Any:
        """A batch of unlabeled inputs of ``task`` (drawn with ``generator``, so runs repeat)."""

    @abstractmethod
    def perturbation_space(self, task: str) -> PerturbationSpace:
        """Shape of ``task``'s universal perturbation and the range of a perturbed input."""

    @abstractmethod
    def logits(
        self,
        model: torch.nn.Module,
        params: dict[str, torch.Tensor],
        task: str,
        batch: Any,
        delta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[N, classes]`` logits of ``batch`` (plus ``delta``) under ``params`` (functional)."""

    def parameter_names(
        self, model: torch.nn.Module, tensor_names: Iterable[str]
    ) -> dict[str, str]:
        """Module parameter name of each merged tensor (mergekit's names are state-dict names)."""
        own = set(model.state_dict().keys())
        out = {}
        for name in tensor_names:
            if name not in own:
                raise DamError(
                    f"merged tensor {name!r} is not a parameter of the {type(model).__name__} "
                    "built by the calibration adapter; the recipe's models and the adapter disagree"
                )
            out[name] = name
        return out

    def share(self, batch: Any, part: int, parts: int) -> Any:
        """Inputs ``part`` of ``parts`` of a sampled batch, for data-parallel calibration.

        The shares, in order, must hold every input of the batch once, so that their logits
        concatenated along dim 0 are the batch's logits. By default the batch is one tensor split
        along dim 0; an adapter with another batch type overrides this.
        """
        if not isinstance(batch, torch.Tensor):
            raise DamError(
                f"{type(self).__name__}.sample returns {type(batch).__name__}, not a tensor; "
                "data-parallel calibration needs the adapter to define share()"
            )
        return batch.tensor_split(parts)[part]

    def activation_bytes(self, batch_size: int) -> int:
        """Activation memory of one forward with its backward at ``batch_size``, for the memory
        estimate (which counts two: clean and perturbed). The built-in adapters' is measured on
        fake tensors of the base model instead (``estimate.step_activation_bytes``)."""
        return 0

    def data_fingerprint(self) -> str:
        """A digest of the calibration data, recorded with the masks (stale data: recalibrate)."""
        return data_fingerprint(self.data)


def data_fingerprint(data: str | list[str]) -> str:
    """Digest of the data files' names, sizes and mtimes (a zoo: its manifest and data/ only)."""
    digest = hashlib.sha256()
    for root in [data] if isinstance(data, (str, os.PathLike)) else data:
        root = Path(root)
        if root.is_dir():
            files = sorted(
                p
                for p in root.rglob("*")
                if p.is_file() and (p.name == "zoo.json" or "data" in p.relative_to(root).parts[:1])
            )
        else:
            files = [root] if root.exists() else []
        for p in files:
            st = p.stat()
            digest.update(json.dumps([p.name, st.st_size, st.st_mtime_ns]).encode())
    return "sha256:" + digest.hexdigest()[:32]


def infomax(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy minus the entropy of the mean prediction (SHOT's information maximisation).

    Plain entropy can be driven down by collapsing every input onto a few confident classes; the
    second term rewards predictions that stay spread over the classes, so that collapse costs.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    marginal = probs.mean(0)
    return entropy(logits) + (marginal * torch.log(marginal.clamp_min(1e-12))).sum()


def distill(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || merged), batch mean: how far the merge drifts from a task's own expert.

    Unlike entropy it cannot be lowered by confident wrong answers, so masks trained on it do
    not collapse on a merge that is only half right. The teacher sees clean inputs only.
    """
    target = torch.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(
        torch.log_softmax(logits.float(), dim=-1), target, log_target=True, reduction="batchmean"
    )


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions (AdaMerging's unsupervised loss)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()
