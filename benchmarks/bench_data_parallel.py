"""Data-parallel calibration speed: N processes of one thread against one process of one thread.

    python benchmarks/bench_data_parallel.py                 # 2 processes, a self-made zoo
    python benchmarks/bench_data_parallel.py --image 32 --batch-size 32 --steps 20  # overhead-bound

Both runs calibrate the same recipe at the same global batch; each is timed by the calibration's
own clock (``timings.total`` in the mask file's history, so process start-up and model loading
are left out). Prints steps per second of each and their ratio, and how far the two mask files
are apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _calibrate(recipe: Path, processes: int) -> float:
    """Seconds the calibration itself took (its history's ``timings.total``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DAM_CALIBRATION_PARALLEL="data")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cli = ["-m", "dam_mergekit.cli", "calibrate", str(recipe), "--force", "--no-progress"]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", str(processes), *cli]
    else:
        cmd = [sys.executable, *cli]
    subprocess.run(cmd, env=env, cwd=recipe.parent, check=True, capture_output=True)
    history = recipe.parent / f"{recipe.stem}-calibration.masks.safetensors.history.json"
    return float(json.loads(history.read_text())["timings"]["total"])


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from _calib_fixtures import FAST, write_clip_zoo, write_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image", type=int, default=64, help="image side of the random zoo")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        zoo = write_clip_zoo(root, image=args.image, calib=4 * args.batch_size)
        settings = dict(FAST, steps=args.steps, final_steps=0, batch_size=args.batch_size)
        settings["checkpoint_every"] = args.steps + 1
        recipes = [write_recipe(root, zoo, settings, name=n) for n in ("one", "many")]
        one = _calibrate(recipes[0], 1)
        many = _calibrate(recipes[1], args.processes)
        from dam_mergekit.masks import MaskFile

        a = MaskFile(root / "one-calibration.masks.safetensors")
        b = MaskFile(root / "many-calibration.masks.safetensors")
        pairs = [(a.m1(n), b.m1(n)) for n in a.names]
        differ = sum(int((x != y).sum()) for x, y in pairs if x is not None)
    rate_one, rate_many = args.steps / one, args.steps / many
    print(f"global batch {args.batch_size}, {args.steps} steps, one thread per process")
    print(f"1 process:   {rate_one:6.2f} steps/s")
    print(f"{args.processes} processes: {rate_many:6.2f} steps/s")
    print(f"speed-up:    {rate_many / rate_one:.2f}x   (M1 entries that differ: {differ})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
