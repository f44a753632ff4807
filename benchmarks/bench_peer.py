"""FusionBench's DAM against this package's calibration: speed, peak memory, ACC / ASR / p0.

    .venv-peer/bin/python benchmarks/bench_peer.py --zoo .cache/zoo/clip-default --steps 20

Needs ``fusion-bench==0.2.33`` (the ``peer`` extra) beside this package, in a venv of its own:

    python3 -m venv .venv-peer
    .venv-peer/bin/pip install torch==2.14.1 torchvision==0.29.1 -e '.[dev,zoo,openclip,peer]'

Both sides get the zoo's base and experts, the same tasks, batch size (inputs per task per step),
step counts and thread count, each in a fresh process. FusionBench's side is its own
``ConcreteSafeTaskWiseAdaMergingForCLIP`` (the released DAM; its layer-wise twin does not run at
0.2.33) with its shipped hyperparameters, fed the zoo in-process: a subclass only supplies what the
class expects from FusionBench's model and task pools (the zoo's heads for its zero-shot head,
the zoo's unlabeled ``calib_x`` for its test loader, a perturbation of the zoo's image size
instead of the hard-coded 224x224) and times its two loops. Ours is ``Calibrator`` with the
package's default calibration (``--mode``). Each merged model is saved as a ``CLIPVisionModel``
directory and scored by ``dam-mergekit evaluate``. The targets (ours >= 1.5x FusionBench's
alternating steps per second, ours <= its peak RSS) are checked against the measured numbers.
A third process times the floor (:func:`run_floor`): the model's own forwards and backwards of
one step, which bounds the speed-up any implementation of the algorithm can reach over either side.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PEER = "fusion-bench==0.2.33"
# The task-wise class ships no config of its own; the layer-wise one's has every key it reads.
PEER_CONFIG = "method/concrete_subspace/clip_safe_concrete_layer_wise_adamerging.yaml"
SPEED_TARGET = 1.5  # ours / theirs, alternating steps per second, at least
RSS_TARGET = 1.0  # ours / theirs, peak resident memory, at most


# -- pure helpers (tested without FusionBench) ---------------------------------------------------
def status_kib(field: str, text: str | None = None) -> int:
    """A ``/proc/self/status`` field in KiB (``VmHWM``: the process's peak resident memory)."""
    if text is None:
        text = Path("/proc/self/status").read_text()
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def compare(
    ours: dict[str, Any], theirs: dict[str, Any], floor: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Ratios ours / theirs and whether the targets are met by these measurements; with the
    ``floor`` (the model's own work in one step), how close each side runs to it."""
    speed = ours["steps_per_s"] / theirs["steps_per_s"]
    rss = ours["peak_rss_kib"] / theirs["peak_rss_kib"]
    # what each side's merge itself adds to what its imports hold (FusionBench imports Lightning)
    grown = [max(r["peak_rss_kib"] - r["import_rss_kib"], 1) for r in (ours, theirs)]
    return {
        "speed_ratio": speed,
        "rss_ratio": rss,
        "rss_above_imports_ratio": grown[0] / grown[1],
        "speed_target_met": speed >= SPEED_TARGET,
        "rss_target_met": rss <= RSS_TARGET,
        **(_floor_ratios(ours, theirs, floor) if floor else {}),
    }


def _floor_ratios(ours, theirs, floor) -> dict[str, float]:
    """Each side's steps/s as a share of the floor's, and the floor over theirs: the largest
    speed-up over FusionBench that any implementation running these forwards can reach."""
    best = floor["steps_per_s"]
    return {
        "ours_of_floor": ours["steps_per_s"] / best,
        "theirs_of_floor": theirs["steps_per_s"] / best,
        "floor_over_theirs": best / theirs["steps_per_s"],
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:5.1f}"


def format_report(result: dict[str, Any]) -> str:
    """The printed summary: each side's speed and memory, the ratios, the scores."""
    s, cmp = result["settings"], result["compare"]
    lines = [
        f"zoo {s['zoo']}: tasks {', '.join(s['tasks'])}; {s['steps']} alternating + "
        f"{s['final_steps']} final steps, batch {s['batch_size']} per task, "
        f"{s['threads']} thread(s); ours mode {s['mode']}",
        f"{'':<12}{'steps/s':>9}{'final/s':>9}{'peak RSS':>11}{'after imports':>15}",
    ]
    for side in ("ours", "theirs"):
        r = result[side]
        lines.append(
            f"{side:<12}{r['steps_per_s']:9.2f}{r['final_steps_per_s']:9.2f}"
            f"{r['peak_rss_kib'] / 1024:8.0f} MiB{r['import_rss_kib'] / 1024:11.0f} MiB"
        )
    ok = {True: "met", False: "NOT met"}
    lines.append(
        f"steps/s ours / theirs {cmp['speed_ratio']:.2f} (target >= {SPEED_TARGET}: "
        f"{ok[cmp['speed_target_met']]}); peak RSS ours / theirs {cmp['rss_ratio']:.2f} "
        f"(target <= {RSS_TARGET}: {ok[cmp['rss_target_met']]}); peak RSS above imports "
        f"ours / theirs {cmp['rss_above_imports_ratio']:.2f} (no target)"
    )
    if "floor_over_theirs" in cmp:
        lines.append(
            f"the model's own forwards and backwards of one step alone: "
            f"{result['floor']['steps_per_s']:.2f} steps/s; ours runs at "
            f"{cmp['ours_of_floor']:.0%} of it, FusionBench at {cmp['theirs_of_floor']:.0%}: "
            f"no implementation of these forwards exceeds {cmp['floor_over_theirs']:.2f}x "
            "FusionBench's steps/s"
        )
    lines.append(f"{'':<12}{'ACC':>6}{'ASR succ':>9}{'p0 succ':>8}{'ASR trans':>10}{'p0 trans':>9}")
    for side in ("ours", "theirs"):
        e = result["scores"][side]
        lines.append(
            f"{side:<12}{_pct(e['acc_avg']):>6}{_pct(e['asr_succession_avg']):>9}"
            f"{_pct(e['p0_succession_avg']):>8}{_pct(e['asr_transfer_avg']):>10}"
            f"{_pct(e['p0_transfer_avg']):>9}"
        )
    return "\n".join(lines)


def select_tasks(manifest: dict[str, Any], wanted: str | None) -> list[dict[str, Any]]:
    """The zoo's task entries, all or the comma-separated subset in ``wanted`` (zoo order)."""
    if not wanted:
        return list(manifest["tasks"])
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    known = {t["name"] for t in manifest["tasks"]}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--tasks: {unknown} not in the zoo ({', '.join(sorted(known))})")
    return [t for t in manifest["tasks"] if t["name"] in names]


# -- the two sides, each run in a fresh process --------------------------------------------------
def _save_vision(zoo: Path, state: dict, out: Path) -> None:
    """The zoo's base architecture with ``state`` loaded, saved where ``evaluate`` reads it."""
    import torch
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(str(zoo / "base"), dtype=torch.float32).eval()
    unknown = set(state) - set(model.state_dict())
    if unknown:
        raise SystemExit(f"merged tensors unknown to the model: {sorted(unknown)[:3]}")
    model.load_state_dict(state, strict=False)
    model.save_pretrained(str(out))


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """This package's calibration of the zoo; the alternating loop timed per step call."""
    import torch  # noqa: F401  (imported before the baseline, as FusionBench's side does)

    from dam_mergekit.calibrate.config import CalibrationConfig, default_calibration
    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    import_rss = status_kib("VmRSS")
    zoo = Path(spec["zoo"])
    manifest = json.loads((zoo / "zoo.json").read_text())
    tasks = select_tasks(manifest, ",".join(spec["tasks"]))
    recipe = {
        "merge_method": "dam",
        "base_model": str(zoo / manifest["base"]),
        "dtype": "float32",
        "models": [{"model": str(zoo / t["expert"])} for t in tasks],
        "parameters": {"calibration": "unused.yml", "lambda": 1.0},  # as recipes/dam.yml
    }
    cal = default_calibration("clip", str(zoo), mode=spec["mode"], seed=spec["seed"])
    cal.update(steps=spec["steps"], final_steps=spec["final_steps"])
    cal.update(batch_size=spec["batch_size"], checkpoint_every=10**9)
    cal["adapter_options"] = {**cal.get("adapter_options", {}), "tasks": spec["tasks"]}
    calibrator = Calibrator(
        plan_recipe(load_recipe(recipe)), CalibrationConfig.from_dict(cal), progress=False
    )
    loop = [0.0]
    step = calibrator._mask_phase_step

    def timed(i: int, timings: dict[str, float]) -> dict[str, float]:
        t0 = time.perf_counter()
        out = step(i, timings)
        loop[0] += time.perf_counter() - t0
        return out

    calibrator._mask_phase_step = timed
    result = calibrator.run(write=False)
    _save_vision(zoo, result.merged, Path(spec["model_out"]))
    return {
        "steps_per_s": spec["steps"] / loop[0],
        "final_steps_per_s": spec["final_steps"] / max(result.timings["final"], 1e-9),
        "import_rss_kib": import_rss,
        "stage_seconds": dict(result.timings),
    }


def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The model's own work in one alternating step, nothing else: per task, the coefficient
    step's forward and backward into the weights, the trigger step's forward without a graph
    (pseudo-labels) and its forward and backward into the input, and the mask step's clean and
    perturbed forwards (one batch of twice the size) and backward into the weights. No merge, no
    mask sampling, no optimizer: both sides run at least these forwards each step."""
    import torch
    from transformers import CLIPVisionModel

    zoo = Path(spec["zoo"])
    model = CLIPVisionModel.from_pretrained(str(zoo / "base"), dtype=torch.float32).eval()
    model.requires_grad_(True)
    size = json.loads((zoo / "zoo.json").read_text())["image_size"]
    images = torch.rand(
        spec["batch_size"], 3, size, size, generator=torch.Generator().manual_seed(0)
    )

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).pooler_output

    def one_step() -> None:
        for _ in spec["tasks"]:
            pooled(images).square().mean().backward()
            with torch.no_grad():
                pooled(images)
            delta = torch.zeros_like(images[0], requires_grad=True)
            with _weights_frozen(model):
                torch.autograd.grad(pooled(images + delta).square().mean(), delta)
            pooled(torch.cat([images, images])).square().mean().backward()
            model.zero_grad(set_to_none=True)

    one_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        one_step()
    return {"steps_per_s": spec["steps"] / (time.perf_counter() - t0), "import_rss_kib": 0}


class _weights_frozen:
    """The trigger step's forward: the merged weights carry no gradient there."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.requires_grad_(False)

    def __exit__(self, *exc):
        self.model.requires_grad_(True)


def _zoo_heads(zoo: Path, tasks: list[dict[str, Any]]):
    """One projection and logit scale shared by every head (FusionBench keeps one of each)."""
    from safetensors.torch import load_file

    heads = {t["name"]: load_file(str(zoo / t["head"])) for t in tasks}
    first = next(iter(heads.values()))
    for name, h in heads.items():
        same = h["projection"].equal(first["projection"])
        if not same or not h["logit_scale"].equal(first["logit_scale"]):
            raise SystemExit(f"head {name}: another projection or logit scale than the first")
    return first["projection"], first["logit_scale"], {n: h["classes"] for n, h in heads.items()}


def _peer_class():
    """FusionBench's task-wise DAM class, given the zoo in place of its model and task pools."""
    import torch
    from fusion_bench.method.concrete_subspace import ConcreteSafeTaskWiseAdaMergingForCLIP
    from fusion_bench.utils.data import InfiniteDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    class ZooDAM(ConcreteSafeTaskWiseAdaMergingForCLIP):
        """Set ``zoo``, ``tasks``, ``images`` (normalised calib_x per task) before ``run``."""

        def setup_models(self):
            module, mask_model = super().setup_models()
            size = tuple(next(iter(self.images.values())).shape[1:])  # not 224x224
            shape = (len(self.modelpool.model_names), *size)
            self.pertubed_model.perturbed_input = torch.nn.Parameter(torch.zeros(shape))
            return module, mask_model

        @torch.no_grad()
        def setup_zero_shot_classification_head(self, *args, **kwargs) -> None:
            projection, scale, classes = _zoo_heads(self.zoo, self.tasks)
            linear = torch.nn.Linear(projection.shape[1], projection.shape[0], bias=False)
            linear.weight.copy_(projection)
            self.visual_projection = self.to_device(linear.requires_grad_(False))
            self.logit_scale_exp = self.to_device(scale.clone())  # the zoo's is exponentiated
            self.zeroshot_weights = {n: self.to_device(c) for n, c in classes.items()}

        def get_shuffled_test_loader_iter(self, task: str, *args, **kwargs):
            loaders = self.__dict__.setdefault("_loaders", {})
            if task not in loaders:
                data = TensorDataset(self.images[task])
                full = len(data) >= self.dataloader_kwargs["batch_size"]  # every batch is B
                kwargs = {"shuffle": True, "drop_last": full, **self.dataloader_kwargs}
                loader = DataLoader(data, **kwargs)
                loaders[task] = iter(InfiniteDataLoader(self.fabric.setup_dataloaders(loader)))
            return loaders[task]

        def train_mask(self, module, mask_model) -> None:
            t0 = time.perf_counter()
            super().train_mask(module, mask_model)
            self.seconds["alternating"] = time.perf_counter() - t0

        def run_adamerging(self, module, mask):
            t0 = time.perf_counter()
            out = super().run_adamerging(module, mask)
            self.seconds["final"] = time.perf_counter() - t0
            return out

    return ZooDAM


def _peer_config(spec: dict[str, Any]):
    """FusionBench's shipped DAM hyperparameters with this run's step counts and batch size."""
    from omegaconf import OmegaConf

    found = importlib.util.find_spec("fusion_bench_config")
    if found is None or not found.submodule_search_locations:
        raise SystemExit("fusion_bench_config (shipped with fusion-bench) not found")
    path = Path(list(found.submodule_search_locations)[0]) / PEER_CONFIG
    config = OmegaConf.load(path)
    config.max_steps, config.max_adamerging_steps = spec["steps"], spec["final_steps"]
    config.batch_size, config.num_workers = spec["batch_size"], 0
    config.save_interval = 10**9  # no checkpoints, as on our side
    return config


def run_theirs(spec: dict[str, Any]) -> dict[str, Any]:
    """FusionBench's DAM on the zoo, its mask loop and its AdaMerging loop timed."""
    import lightning as L
    import torch
    from fusion_bench.modelpool import CLIPVisionModelPool
    from lightning.fabric.loggers import TensorBoardLogger
    from omegaconf import DictConfig
    from safetensors.torch import load_file

    import_rss = status_kib("VmRSS")
    torch.manual_seed(spec["seed"])
    zoo = Path(spec["zoo"])
    manifest = json.loads((zoo / "zoo.json").read_text())
    tasks = select_tasks(manifest, ",".join(spec["tasks"]))
    models = {"_pretrained_": str(zoo / manifest["base"])}
    models.update({t["name"]: str(zoo / t["expert"]) for t in tasks})
    pool = CLIPVisionModelPool(DictConfig(models))
    mean = torch.tensor(manifest["normalize"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(manifest["normalize"]["std"]).view(1, 3, 1, 1)
    algo = _peer_class()(_peer_config(spec))
    algo.zoo, algo.tasks, algo.seconds = zoo, tasks, {}
    # what FusionBench's CLIP processor would hand it: normalised pixels (its perturbation is
    # added to these, as our as_released mode's ``perturb: normalized`` does)
    algo.images = {
        t["name"]: (load_file(str(zoo / t["data"]))["calib_x"].float() / 255 - mean) / std
        for t in tasks
    }
    algo.dataloader_kwargs = {"batch_size": spec["batch_size"], "num_workers": 0}  # else 1
    logs = Path(spec["model_out"]).parent / "theirs-logs"
    algo.fabric = L.Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(logs)))
    model = algo.run(pool)
    model.save_pretrained(spec["model_out"])
    return {
        "steps_per_s": spec["steps"] / algo.seconds["alternating"],
        "final_steps_per_s": spec["final_steps"] / max(algo.seconds["final"], 1e-9),
        "import_rss_kib": import_rss,
    }


def _worker(side: str, spec: dict[str, Any], threads: int) -> int:
    """One side in this (fresh) process; its numbers and peak RSS go to ``spec['result']``."""
    import torch

    torch.set_num_threads(threads)
    row = {"ours": run_ours, "theirs": run_theirs, "floor": run_floor}[side](spec)
    row["peak_rss_kib"] = status_kib("VmHWM")
    Path(spec["result"]).write_text(json.dumps(row))
    return 0


# -- the driver ----------------------------------------------------------------------------------
def _env(threads: int) -> dict[str, str]:
    """Fixed threads and no hub access for every child process."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env[key] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def measure(side: str, spec: dict[str, Any], threads: int, out: Path) -> dict[str, Any]:
    """Run one side in a fresh process (its log kept in ``out``) and read its numbers."""
    spec = {**spec, "model_out": str(out / side), "result": str(out / f"{side}.json")}
    cmd = [sys.executable, __file__, "--threads", str(threads), "--_worker", side]
    cmd += ["--_spec", json.dumps(spec)]
    t0 = time.perf_counter()
    with open(out / f"{side}.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(threads))
    if done.returncode != 0:
        tail = (out / f"{side}.log").read_text()[-3000:]
        raise SystemExit(f"{side}: the measuring process failed ({done.returncode})\n{tail}")
    row = json.loads(Path(spec["result"]).read_text())
    row["wall_s"] = time.perf_counter() - t0
    print(f"{side}: {row['wall_s']:.0f} s, log {out / f'{side}.log'}", file=sys.stderr)
    return row


def evaluate(model: Path, zoo: Path, threads: int) -> dict[str, Any]:
    """ACC / ASR / p0 of a saved model, through the ``dam-mergekit evaluate`` command."""
    exe = Path(sys.executable).with_name("dam-mergekit")
    cli = [str(exe)] if exe.exists() else [shutil.which("dam-mergekit") or "dam-mergekit"]
    done = subprocess.run(
        [*cli, "evaluate", str(model), "--zoo", str(zoo), "--json"],
        capture_output=True,
        text=True,
        env=_env(threads),
    )
    if done.returncode != 0:
        raise SystemExit(f"dam-mergekit evaluate {model} failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", help="a CLIP zoo (dam-mergekit zoo build); required")
    ap.add_argument("--tasks", help="comma-separated subset of the zoo's tasks (default all)")
    ap.add_argument("--steps", type=int, default=20, help="alternating steps (default 20)")
    ap.add_argument("--final-steps", type=int, default=5, help="coefficient-only steps after")
    ap.add_argument("--batch-size", type=int, default=16, help="inputs per task per step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", default="dam", choices=["dam", "as_released"], help="our side's")
    ap.add_argument(
        "--seed",
        type=int,
        help="both sides' calibration seed (default: the bench's for this zoo, 1000 + zoo seed; "
        "never the zoo's own)",
    )
    ap.add_argument("--out", help="keep merged models and logs here (default: a temporary dir)")
    ap.add_argument("--json", help="also write every number here")
    ap.add_argument("--_worker", choices=["ours", "theirs", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--_spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args._worker:
        return _worker(args._worker, json.loads(args._spec), args.threads)
    if not args.zoo:
        raise SystemExit("--zoo is required (a CLIP zoo with test data: dam-mergekit zoo build)")
    if importlib.util.find_spec("fusion_bench") is None:
        raise SystemExit(f"needs {PEER} in this Python (pip install -e '.[peer]'; see --help)")
    zoo = Path(args.zoo).resolve()
    manifest = json.loads((zoo / "zoo.json").read_text())
    if manifest.get("kind") != "clip":
        raise SystemExit(f"{zoo}: FusionBench's DAM is for CLIP; this zoo is {manifest['kind']}")
    tasks = [t["name"] for t in select_tasks(manifest, args.tasks)]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-peer-"))
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed
    if seed is None:
        from dam_mergekit.lab.protocol import calibration_seed

        seed = calibration_seed(int(manifest.get("options", {}).get("seed", 0)))
    spec = {"zoo": str(zoo), "tasks": tasks, "steps": args.steps, "seed": seed}
    spec.update(final_steps=args.final_steps, batch_size=args.batch_size, mode=args.mode)
    result: dict[str, Any] = {"settings": {**spec, "threads": args.threads, "out": str(out)}}
    for side in ("theirs", "ours", "floor"):  # one at a time: none shares memory or cores
        result[side] = measure(side, spec, args.threads, out)
    result["compare"] = compare(result["ours"], result["theirs"], result["floor"])
    result["scores"] = {s: evaluate(out / s, zoo, args.threads) for s in ("ours", "theirs")}
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
