"""Calibration speed: steps per second, peak memory and each stage's share of the time.

    python benchmarks/bench_calibration.py                     # a self-made tiny zoo, 1 thread
    python benchmarks/bench_calibration.py --zoo .cache/zoo/clip-default --steps 20
    python benchmarks/bench_calibration.py --sizes vit-192,vit-384,vit-768,llama-256,llama-512

``--sizes`` measures the memory estimate instead (see :func:`measure_sizes`).

Without ``--zoo`` it writes a small random CLIP zoo (the test fixture's format) to a temporary
directory, so it runs anywhere. The thread count is fixed (``--threads``, default 1) so numbers
are comparable between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def _tiny_zoo(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _calib_fixtures import write_clip_zoo

    return write_clip_zoo(root, experts=2, image=16, calib=64)


def _zoo_recipe(zoo: Path, manifest: dict) -> dict:
    """A dam recipe over a zoo's base and experts (the calibration is passed to the trainer)."""
    return {
        "merge_method": "dam",
        "base_model": str(zoo / manifest["base"]),
        "models": [{"model": str(zoo / t["expert"])} for t in manifest["tasks"]],
        "parameters": {"calibration": "unused.yml"},
    }


def main(argv=None) -> int:
    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", help="a CLIP zoo (default: a tiny random one)")
    ap.add_argument("--steps", type=int, help="default 20; 2 with --sizes")
    ap.add_argument("--final-steps", type=int, help="default 5; 1 with --sizes")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mode", default="dam", choices=["dam", "as_released"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", help="measured peak memory beside the estimate: vit-W,llama-W,...")
    ap.add_argument(
        "--compare-delta-dtype",
        metavar="DTYPE",
        help="with --zoo: the package's default calibration with task vectors in DTYPE against "
        "float32 (masks and coefficients)",
    )
    ap.add_argument("--seed", type=int, default=1000, help="calibration seed of the comparison")
    ap.add_argument("--delta-dtype", default="bfloat16", help="with --sizes (default bfloat16)")
    ap.add_argument(
        "--memory",
        default="whole",
        choices=["whole", "streamed", "offload"],
        help="with --sizes: the calibration's memory layout (default whole)",
    )
    ap.add_argument("--json", help="with --sizes: also write the rows here")
    ap.add_argument(
        "--malloc",
        choices=["fixed", "default"],
        default="fixed",
        help="with --sizes: glibc's mmap threshold fixed at 256 KiB (RSS follows live memory) or "
        "glibc's default (its dynamic threshold keeps freed memory, and RSS grows past it)",
    )
    ap.add_argument("--_one", help=argparse.SUPPRESS)  # one size, in a fresh process
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._one:
        return _measure_one(json.loads(args._one))
    if args.sizes:
        args.steps, args.final_steps = args.steps or 2, args.final_steps or 1
        return measure_sizes(args)
    if args.compare_delta_dtype:
        if not args.zoo:
            raise SystemExit("--compare-delta-dtype needs --zoo")
        return compare_delta_dtype(Path(args.zoo), args.compare_delta_dtype, args.seed)
    args.steps, args.final_steps = args.steps or 20, args.final_steps or 5

    tmp = Path(tempfile.mkdtemp(prefix="bench-calib-"))
    zoo = Path(args.zoo) if args.zoo else _tiny_zoo(tmp)
    manifest = json.loads((zoo / "zoo.json").read_text())
    cal = {
        "adapter": "clip",
        "data": str(zoo),
        "steps": args.steps,
        "final_steps": args.final_steps,
        "batch_size": args.batch_size,
        "mode": args.mode,
        "device": args.device,
        "checkpoint_every": 10**6,
    }
    recipe = _zoo_recipe(zoo, manifest)
    plan = plan_recipe(load_recipe(recipe))
    calibrator = Calibrator(plan, CalibrationConfig.from_dict(cal), progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = calibrator.run(write=False)
    wall = time.perf_counter() - start
    t = result.timings
    loop = t["coefficients"] + t["perturbation"] + t["masks"]
    params = sum(int(torch.tensor(s).prod()) if s else 1 for s in plan.shapes().values())
    print(
        f"zoo {zoo} ({len(plan.experts)} experts, {params} merged parameters), "
        f"mode {args.mode}, batch {args.batch_size}, {args.threads} thread(s), {args.device}"
    )
    print(
        f"alternating steps: {args.steps / loop:.2f} steps/s   "
        f"final coefficient steps: {args.final_steps / max(t['final'], 1e-9):.2f} steps/s   "
        f"wall {wall:.1f} s (incl. loading)"
    )
    for stage in ("coefficients", "perturbation", "masks", "final"):
        print(f"  {stage:<13} {t[stage]:7.2f} s  {100 * t[stage] / t['total']:5.1f} %")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"peak RSS {rss:.0f} MiB; estimate printed before training: "
        f"{calibrator.estimate_memory() / 2**20:.1f} MiB"
    )
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    return 0


# -- --sizes: the estimate against a measurement -------------------------------------------------
VIT_LAYERS, VIT_EXPERTS = 12, 8  # ViT-B/32's depth, FusionBench's eight tasks
LLAMA_LAYERS, LLAMA_EXPERTS, LLAMA_VOCAB = 8, 3, 128256  # Llama-3's vocabulary, fewer layers


def _size_zoo(kind: str, width: int, root: Path) -> tuple[Path, dict]:
    """A random zoo of one size and the calibration settings of its recipe."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _calib_fixtures import write_clip_zoo, write_llm_zoo

    if kind == "vit":
        vision = dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=VIT_LAYERS,
            num_attention_heads=max(1, width // 64),
            image_size=224,
            patch_size=32,
        )
        zoo = write_clip_zoo(root, experts=VIT_EXPERTS, image=224, calib=16, config=vision)
        return zoo, {"adapter": "clip", "batch_size": 16, "granularity": "element"}
    heads = max(1, width // 128)
    shape = dict(
        hidden_size=width,
        intermediate_size=int(3.5 * width),
        num_hidden_layers=LLAMA_LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=width // heads,
        vocab_size=LLAMA_VOCAB,
        torch_dtype="bfloat16",
    )
    zoo = write_llm_zoo(root, config=shape, prompt_repeat=16)  # ~64-token prompts
    return zoo, {"adapter": "causal_lm", "batch_size": 8, "granularity": "row"}


def _anon_bytes() -> int:
    """This process's anonymous resident memory (mapped model files' pages left out)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class _PeakSampler:
    """The peak of :func:`_anon_bytes`, sampled every few milliseconds on a thread."""

    def __init__(self):
        import threading

        self.peak, self._stop = _anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _anon_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon_bytes())


def _measure_one(spec: dict) -> int:
    """Calibrate ``spec``'s recipe for a few steps in this (fresh) process; print one JSON row."""
    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    plan = plan_recipe(load_recipe(spec["recipe"]))
    calibrator = Calibrator(plan, CalibrationConfig.from_dict(spec["calibration"]), progress=False)
    before = _anon_bytes()  # imports, the calibration data, the planned recipe
    sampler = _PeakSampler()
    start = time.perf_counter()
    calibrator.run(write=False)
    peak = sampler.stop()
    params = sum(int(torch.tensor(s).prod()) if s else 1 for s in plan.shapes().values())
    row = {
        "size": spec["size"],
        "parameters": params,
        "experts": len(plan.experts),
        # on a cpu device what offload keeps in host memory is in the same resident memory
        "estimate_bytes": calibrator.estimate_memory() + calibrator.host_bytes,
        "measured_bytes": peak - before,
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(row))
    return 0


def measure_sizes(args) -> int:
    """Each size: a random zoo, a few calibration steps in a fresh process, the peak of its
    anonymous resident memory above what it held before (imports and data; mapped model files'
    pages are the page cache's, not the run's) beside ``Calibrator.estimate_memory``."""
    import subprocess

    import yaml

    rows = []
    for size in args.sizes.split(","):
        kind, _, width = size.partition("-")
        if kind not in ("vit", "llama") or not width.isdigit():
            raise SystemExit(f"--sizes: {size!r} is not vit-WIDTH or llama-WIDTH")
        with tempfile.TemporaryDirectory(prefix="bench-sizes-") as tmp:
            zoo, settings = _size_zoo(kind, int(width), Path(tmp))
            manifest = json.loads((zoo / "zoo.json").read_text())
            calibration = {
                **settings,
                "data": str(zoo),
                "steps": args.steps,
                "final_steps": args.final_steps,
                "delta_dtype": args.delta_dtype,
                "memory": args.memory,
                "checkpoint_every": 10**6,
                "adapter_options": {"tasks": [manifest["tasks"][0]["name"]]},
            }
            recipe = _zoo_recipe(zoo, manifest)
            (Path(tmp) / "recipe.yml").write_text(yaml.safe_dump(recipe))
            spec = {
                "size": size,
                "recipe": str(Path(tmp) / "recipe.yml"),
                "calibration": calibration,
            }
            cmd = [
                sys.executable,
                __file__,
                "--threads",
                str(args.threads),
                "--_one",
                json.dumps(spec),
            ]
            env = dict(os.environ)
            if args.malloc == "fixed":
                env["MALLOC_MMAP_THRESHOLD_"] = str(256 * 1024)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{size}: the measuring process failed\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            _print_row(rows[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    worst = max(abs(r["estimate_bytes"] / r["measured_bytes"] - 1) for r in rows)
    print(
        f"largest disagreement {100 * worst:.1f} % (target: within 20 % at every size); "
        f"malloc {args.malloc}, delta_dtype {args.delta_dtype}, memory {args.memory}, "
        f"{args.steps}+{args.final_steps} steps"
    )
    return 0


def _print_row(r: dict) -> None:
    mib = 2**20
    print(
        f"{r['size']:<11} {r['parameters'] / 1e6:7.1f}M params x {r['experts']} experts   "
        f"estimate {r['estimate_bytes'] / mib:9.0f} MiB   measured {r['measured_bytes'] / mib:9.0f} "
        f"MiB   estimate/measured {r['estimate_bytes'] / r['measured_bytes']:.2f}   "
        f"({r['seconds']:.0f} s)",
        flush=True,
    )


def compare_delta_dtype(zoo: Path, dtype: str, seed: int) -> int:
    """Calibrate ``zoo`` with the package's defaults twice, task vectors in float32 and in
    ``dtype``: the share of mask entries that differ and how far the learned coefficients are."""
    from dam_mergekit.calibrate import concrete
    from dam_mergekit.calibrate.config import CalibrationConfig, default_calibration
    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    manifest = json.loads((zoo / "zoo.json").read_text())
    recipe = _zoo_recipe(zoo, manifest)
    plan = plan_recipe(load_recipe(recipe))
    results = {}
    for name in ("float32", dtype):
        cal = default_calibration("clip", str(zoo), seed=seed, delta_dtype=name)
        start = time.perf_counter()
        results[name] = Calibrator(plan, CalibrationConfig.from_dict(cal), progress=False).run(
            write=False
        )
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    exact, narrow = results["float32"], results[dtype]
    differ = total = 0
    worst = 0.0
    for name in exact.masks.m1:
        learned = []
        for run in (exact, narrow):
            m1, m2 = run.masks.m1[name].float(), [m.float() for m in run.masks.m2[name]]
            coef = run.masks.coefficients[name]
            learned.append(concrete.unfold_rescaling(coef, m1, m2, enabled=True))
            if run is exact:
                pairs = [(run.masks.m1[name], narrow.masks.m1[name])]
                pairs += list(zip(run.masks.m2[name], narrow.masks.m2[name], strict=True))
                differ += sum(int((a != b).sum()) for a, b in pairs)
                total += sum(a.numel() for a, _ in pairs)
        worst = max(worst, float((learned[0] - learned[1]).abs().max()))
    print(
        f"zoo {zoo}, calibration seed {seed}: {differ} of {total} mask entries differ "
        f"({100 * differ / total:.3f} %); learned coefficients at most {worst:.2e} apart"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
