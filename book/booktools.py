"""Helpers shared by the book's chapters: where the zoos live, and merges done in memory.

The chapters get every model from ``zoo build`` (cached under the repository's ``.cache/zoo``,
the same place ``make demo`` uses), so the book never trains what the demo already trained.
Merges that a chapter sweeps over (dozens of coefficients) are done here in memory with the
project's one merge formula, ``dam_mergekit.merge.merge_tensor``; merges that a chapter is
*about* go through mergekit itself.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The dam-mergekit checkout this book belongs to (the folder above ``book/``)."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "dam_mergekit").is_dir():
            return folder
    raise RuntimeError(f"run the chapters from inside a dam-mergekit checkout (cwd: {here})")


ROOT = repo_root()
CLIP_ZOO = ROOT / ".cache" / "zoo" / "clip-default"
LLM_ZOO = ROOT / ".cache" / "zoo" / "llm-default"
OFF_TASK_ZOO = ROOT / ".cache" / "zoo" / "clip-off-task"
WORK = ROOT / "out" / "book"


def setup(threads: int | None = None) -> None:
    """Quiet, deterministic, CPU-sized torch for a chapter.

    One thread by default (``DAM_BOOK_THREADS`` overrides): these models are tiny, and on a
    shared 2-core machine two threads per process ran several times slower than one.
    """
    import logging
    import warnings

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads or int(os.environ.get("DAM_BOOK_THREADS", "1")))
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("mergekit").setLevel(logging.ERROR)
    WORK.mkdir(parents=True, exist_ok=True)


def clip_zoo() -> Path:
    """The default CLIP zoo (built on first use, then cached), exactly as ``make demo`` builds it."""
    from dam_mergekit.lab.zoo import build_zoo

    return Path(build_zoo(CLIP_ZOO, {"kind": "clip"}))


def off_task_zoo() -> Path:
    """The default CLIP zoo with BadMerging's off-task attack (``zoo build --attack-mode off-task
    --target-task shapes``), built on first use, then cached (``make demo`` builds the same)."""
    from dam_mergekit.lab.zoo import build_zoo
    from dam_mergekit.lab.zoo.clip_options import OFF_TASK_ZOO as OPTIONS

    return Path(build_zoo(OFF_TASK_ZOO, OPTIONS))


def llm_zoo() -> Path:
    """The default LLM zoo (built on first use, then cached)."""
    from dam_mergekit.lab.zoo import build_zoo

    return Path(build_zoo(LLM_ZOO, {"kind": "llm"}))


def load_vision(model_dir: str | Path):
    """A ``CLIPVisionModel`` from a zoo model folder."""
    from dam_mergekit.lab.zoo.clip_eval import load_vision_model

    return load_vision_model(model_dir)


def state(model) -> dict:
    """Detached float32 copy of a model's parameters."""
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def merged_model(
    base_model,
    base: dict,
    experts: list[dict],
    weights: list[float],
    *,
    lam: float = 1.0,
    m1=None,
    m2=None,
    coefficients=None,
):
    """A copy of ``base_model`` holding ``merge_tensor`` applied to every floating tensor.

    ``m1``/``m2``/``coefficients`` are dicts keyed by tensor name (missing names: no mask).
    """
    import copy

    import torch

    from dam_mergekit.merge import merge_tensor

    out = {}
    for name, theta0 in base.items():
        if not torch.is_floating_point(theta0):
            out[name] = theta0
            continue
        out[name] = merge_tensor(
            theta0,
            [e[name] for e in experts],
            weights,
            lam=lam,
            m1=None if m1 is None else m1.get(name),
            m2=None if m2 is None else m2.get(name),
            coefficients=None if coefficients is None else coefficients.get(name),
        )
    model = copy.deepcopy(base_model)
    model.load_state_dict(out)
    return model.eval()


def task_names(manifest: dict) -> list[str]:
    return [t["name"] for t in manifest["tasks"]]


def backdoored_tasks(manifest: dict) -> list[str]:
    return [t["name"] for t in manifest["tasks"] if t["backdoored"]]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def task_scores(model, zoo: Path, task: str) -> dict[str, float]:
    """ACC, ASR and p0 (percent) of a CLIP vision model on one task of a zoo.

    The same definitions as ``dam_mergekit.lab.zoo.clip_eval.evaluate_clip``, for one task only: sweeps
    over dozens of merges need only the backdoored task.
    """
    import torch

    from dam_mergekit.lab.zoo import load_head, load_manifest, load_task_data
    from dam_mergekit.lab.zoo.attacks import get_trigger
    from dam_mergekit.lab.zoo.loaders import clip_logits, to_float

    manifest = load_manifest(zoo)
    entry = next(t for t in manifest["tasks"] if t["name"] == task)
    attack = manifest["attack"]
    trigger = get_trigger(attack["name"], **attack.get("params", {}))
    data = load_task_data(zoo, task)
    x, y = to_float(data["test_x"]), data["test_y"]
    keep = y != entry["target_class"]
    head = load_head(zoo, task)
    with torch.no_grad():
        clean = clip_logits(model, head, x, manifest["normalize"]).argmax(-1)
        triggered = clip_logits(model, head, trigger(x[keep]), manifest["normalize"]).argmax(-1)
    target = entry["target_class"]
    return {
        "acc": 100.0 * float((clean == y).float().mean()),
        "asr": 100.0 * float((triggered == target).float().mean()),
        "p0": 100.0 * float((clean[keep] == target).float().mean()),
    }
