"""Cost of DAM's kernel against mergekit's task_arithmetic, and of the start-up hook.

Builds a ~100M-parameter Llama expert set (base + 3 experts, random, saved as safetensors), then
merges it with `task_arithmetic` and with `dam` (all-ones masks from `masks init`) through the stock
`mergekit-yaml`, alternating the two several times, and prints the median wall-time and peak-RSS
ratios (targets: <= 1.05x time, <= 1.10x peak RSS). Also prints what the `.pth` hook adds to
`python -c pass`. A benchmark, not a test: it prints ratios and asserts nothing about speed.

    python benchmarks/bench_kernel.py [--workdir DIR] [--repeats 3] [--small]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def build_models(root: Path, small: bool) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, vocab = (256, 2, 1000) if small else (768, 12, 8000)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=12 if not small else 4,
        num_key_value_heads=12 if not small else 4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    paths = {}
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(["base", "expert_0", "expert_1", "expert_2"]):
        with torch.no_grad():
            for key, param in model.state_dict().items():
                param.copy_(base[key] + (0.01 * torch.randn_like(param) if i else 0))
        model.save_pretrained(root / name, safe_serialization=True)
        paths[name] = root / name
    print(f"models: {n_params / 1e6:.1f}M parameters each, base + 3 experts in {root}")
    return paths


def write_recipes(root: Path, paths: dict[str, Path]) -> tuple[Path, Path]:
    import yaml

    models = [{"model": str(paths[f"expert_{i}"]), "parameters": {"weight": 1.0}} for i in range(3)]
    common = {"base_model": str(paths["base"]), "models": models, "dtype": "float32"}
    ta = root / "ta.yml"
    ta.write_text(
        yaml.safe_dump({"merge_method": "task_arithmetic", **common, "parameters": {"lambda": 0.3}})
    )
    dam = root / "dam.yml"
    masks = root / "ones.safetensors"
    dam.write_text(
        yaml.safe_dump(
            {"merge_method": "dam", **common, "parameters": {"lambda": 0.3, "masks": str(masks)}}
        )
    )
    subprocess.run(
        [str(BIN / "dam-mergekit"), "masks", "init", str(dam), "--out", str(masks)], check=True
    )
    return ta, dam


def timed_merge(recipe: Path, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one stock `mergekit-yaml` process."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(
        [str(BIN / "mergekit-yaml"), str(recipe), str(out), "--no-copy-tokenizer", "--quiet"],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("  (peak RSS not above an earlier child's: ratio is a lower bound)")
    return seconds, peak / 1024


def startup_overhead(runs: int = 40) -> tuple[float, float]:
    def mean_ms(env_value: str) -> float:
        env = {**os.environ, "DAM_MERGEKIT_AUTOLOAD": env_value}
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    return mean_ms("1"), mean_ms("0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a ~2M-parameter set (smoke run)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="dam-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        paths = build_models(root, args.small)
        ta, dam = write_recipes(root, paths)
        runs: dict[str, list[tuple[float, float]]] = {"task_arithmetic": [], "dam": []}
        for i in range(args.repeats):  # alternate, so drift in machine load hits both alike
            for name, recipe in (("task_arithmetic", ta), ("dam", dam)):
                # RUSAGE_CHILDREN keeps the max over all children: measure RSS in a fresh process
                code = (
                    f"import sys; sys.argv=['x']; from benchmarks.bench_kernel import "
                    f"timed_merge; from pathlib import Path; "
                    f"print(*timed_merge(Path({str(recipe)!r}), Path({str(root / name)!r})))"
                )
                proc = subprocess.run(
                    [sys.executable, "-c", code],
                    check=True,
                    text=True,
                    capture_output=True,
                    cwd=Path(__file__).parent.parent,
                )
                seconds, rss = map(float, proc.stdout.split()[-2:])
                runs[name].append((seconds, rss))
                print(f"  run {i + 1} {name:<16} {seconds:6.2f} s  peak RSS {rss:7.1f} MiB")
        med = {
            k: (statistics.median(s for s, _ in v), statistics.median(r for _, r in v))
            for k, v in runs.items()
        }
        on, off = startup_overhead()
        print()
        print(f"{'method':<16} {'time (s)':>9} {'peak RSS (MiB)':>15}")
        for name, (s, r) in med.items():
            print(f"{name:<16} {s:>9.2f} {r:>15.1f}")
        print(
            f"dam / task_arithmetic: time {med['dam'][0] / med['task_arithmetic'][0]:.3f}x "
            f"(target <= 1.05x), peak RSS {med['dam'][1] / med['task_arithmetic'][1]:.3f}x "
            "(target <= 1.10x)"
        )
        print(
            f"start-up: python -c pass {on:.1f} ms with the hook, {off:.1f} ms without: "
            f"+{on - off:.1f} ms (target <= 20 ms)"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
