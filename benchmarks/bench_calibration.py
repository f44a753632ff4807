"""Calibration speed: steps per second, peak memory and each stage's share of the time.

    python benchmarks/bench_calibration.py                     # a self-made tiny zoo, 1 thread
    python benchmarks/bench_calibration.py --zoo .cache/zoo/clip-default --steps 20

Without ``--zoo`` it writes a small random CLIP zoo (the test fixture's format) to a temporary
directory, so it runs anywhere. The thread count is fixed (``--threads``, default 1) so numbers
are comparable between runs.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv=None) -> int:
    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", help="a CLIP zoo (default: a tiny random one)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--final-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mode", default="dam", choices=["dam", "as_released"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench-calib-"))
    zoo = Path(args.zoo) if args.zoo else _tiny_zoo(tmp)
    manifest = json.loads((zoo / "zoo.json").read_text())
    cal = {"adapter": "clip", "data": str(zoo), "steps": args.steps,
           "final_steps": args.final_steps, "batch_size": args.batch_size, "mode": args.mode,
           "device": args.device, "checkpoint_every": 10**6}
    recipe = {"merge_method": "dam", "base_model": str(zoo / manifest["base"]),
              "models": [{"model": str(zoo / t["expert"])} for t in manifest["tasks"]],
              "parameters": {"calibration": "unused.yml"}}
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
    print(f"zoo {zoo} ({len(plan.experts)} experts, {params} merged parameters), "
          f"mode {args.mode}, batch {args.batch_size}, {args.threads} thread(s), {args.device}")
    print(f"alternating steps: {args.steps / loop:.2f} steps/s   "
          f"final coefficient steps: {args.final_steps / max(t['final'], 1e-9):.2f} steps/s   "
          f"wall {wall:.1f} s (incl. loading)")
    for stage in ("coefficients", "perturbation", "masks", "final"):
        print(f"  {stage:<13} {t[stage]:7.2f} s  {100 * t[stage] / t['total']:5.1f} %")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB; estimate printed before training: "
          f"{calibrator.estimate_memory() / 2**20:.1f} MiB")
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
