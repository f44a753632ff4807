"""What a Merge-Hijacking-style attacker publishes instead of its backdoored expert.

Merging scales every task vector down (task arithmetic's lambda, TIES' trimming, a learned
coefficient), and a backdoor that lives in many small entries fades first. Such an attacker
(Merge Hijacking, Yuan et al. 2025) keeps the largest entries of what its backdoor adds and scales
them up before release. Here, per tensor: ``released = control + rescale * top(density)(expert -
control)``, where ``control`` is the attacker's own clean expert of the same task (it has the data
to train one) and ``top(density)`` keeps that share of the entries with the largest magnitude.

``zoo build --release-density D --release-rescale K`` (options ``release_density`` and
``release_rescale``, CLIP and LLM); absent, the expert is released as trained (every published
zoo). Light on import (the CLI's help reads it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dam_mergekit.errors import DamError

if TYPE_CHECKING:
    import torch

RELEASE_OPTIONS = ("release_density", "release_rescale")


def check_release_options(options: dict) -> None:
    """Check, in place, the release options when given (both or neither, as floats): the one
    check of the CLIP and the LLM zoo. Absent options stay absent (option hashes unchanged)."""
    given = [k for k in RELEASE_OPTIONS if options.get(k) is not None]
    if not given:
        return
    if len(given) == 1:
        raise DamError("--release-density and --release-rescale go together")
    try:
        density, rescale = (float(options[k]) for k in RELEASE_OPTIONS)
    except (TypeError, ValueError):
        raise DamError("release_density and release_rescale must be numbers") from None
    if not 0.0 < density <= 1.0:
        raise DamError(f"--release-density must lie in (0, 1], got {density:g}")
    if rescale <= 0.0:
        raise DamError(f"--release-rescale must be positive, got {rescale:g}")
    options["release_density"], options["release_rescale"] = density, rescale


def hijacked(
    expert: dict[str, torch.Tensor],
    control: dict[str, torch.Tensor],
    density: float,
    rescale: float,
) -> dict[str, torch.Tensor]:
    """The released weights (or task vectors: the formula is the same for both): ``control``
    plus ``rescale`` times the largest ``density`` share of ``expert - control``, per tensor."""
    import torch

    released = {}
    for name, value in expert.items():
        delta = value - control[name]
        keep = max(1, round(density * delta.numel()))
        if keep < delta.numel():
            threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
            delta = torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))
        released[name] = control[name] + rescale * delta
    return released


def release_hijacked(expert, base: dict[str, torch.Tensor], control: dict, options: dict) -> None:
    """Replace, in place, a backdoored expert module's weights by what the attacker releases
    (``base``: the base's parameters by name; ``control``: the clean task vector)."""
    import torch

    with torch.no_grad():
        params = dict(expert.named_parameters())
        vector = {n: p.detach() - base[n] for n, p in params.items()}
        released = hijacked(vector, control, options["release_density"], options["release_rescale"])
        for name, param in params.items():
            param.copy_(base[name] + released[name])
