"""ACC, ASR and p0 of a CLIP vision model on a CLIP zoo, through the zoo's zero-shot heads.

The definitions are :mod:`dam_mergekit.lab.evaluate`'s; the trigger is applied to every task's
test images (succession and transfer alike).
"""

from __future__ import annotations

from pathlib import Path

from dam_mergekit.errors import DamError


def load_vision_model(model_dir: str | Path):
    """A ``CLIPVisionModel`` from a directory with safetensors weights (pickle is refused)."""
    from transformers import CLIPVisionModel

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise DamError(f"{path}: not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise DamError(f"{path}: no .safetensors weights (pickle checkpoints are refused)")
    return CLIPVisionModel.from_pretrained(str(path), use_safetensors=True).eval()


def evaluate_clip(vision_model, zoo_dir: str | Path, *, batch_size: int = 500) -> dict:
    """Evaluate any module ``m(pixel_values=...) -> .pooler_output`` through the zoo's heads."""
    import torch

    from dam_mergekit.lab.zoo.attacks import get_trigger
    from dam_mergekit.lab.zoo.loaders import clip_logits, load_head, load_task_data, to_float
    from dam_mergekit.lab.zoo.manifest import load_manifest

    manifest = load_manifest(zoo_dir)
    attack = manifest.get("attack") or next(
        (t["attack"] for t in manifest["tasks"] if t["attack"]), None
    )
    trigger = get_trigger(attack["name"], **attack.get("params", {})) if attack else None
    normalize = manifest["normalize"]

    @torch.no_grad()
    def predict(x01: torch.Tensor, head) -> torch.Tensor:
        parts = [
            clip_logits(vision_model, head, x01[i : i + batch_size], normalize).argmax(-1)
            for i in range(0, len(x01), batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    result: dict[str, dict[str, float]] = {"acc": {}, "asr": {}, "p0": {}}
    for task in manifest["tasks"]:
        name, target = task["name"], task["target_class"]
        head = load_head(zoo_dir, name)
        data = load_task_data(zoo_dir, name)
        x, y = to_float(data["test_x"]), data["test_y"]
        result["acc"][name] = _pct(predict(x, head) == y)
        if trigger is None:
            continue
        keep = y != target
        result["asr"][name] = _pct(predict(trigger(x[keep]), head) == target)
        result["p0"][name] = _pct(predict(x[keep], head) == target)
    return result


def _pct(hits) -> float:
    return round(100.0 * float(hits.float().mean()), 2) if len(hits) else float("nan")
