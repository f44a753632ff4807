"""DAM calibration against task arithmetic on a CLIP zoo: ACC / ASR / p0 per task, per seed.

    python benchmarks/dam_vs_ta.py --zoo .cache/zoo/clip-default --seeds 0 1 2

For every calibration seed: task arithmetic (lambda 0.3, the same merge formula with all-ones masks)
and DAM (calibrated from ``--calibration``, the merged model computed in memory; the calibration
tests prove it equals what mergekit writes from the mask file) are evaluated with
``dam_mergekit.lab.zoo.clip_eval.evaluate_clip`` on the zoo's test split. The zoo is only read.

The script states the targets (DAM succession ASR <= TA's / 3, mean ACC >= TA's - 1 pp, DAM never
above TA on any backdoored task's ASR) and exits with status 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib import import_module
from pathlib import Path

import torch
import yaml


def _recipe(zoo: Path, cal_path: Path) -> dict:
    manifest = json.loads((zoo / "zoo.json").read_text())
    return {
        "merge_method": "dam",
        "base_model": str(zoo / manifest["base"]),
        "dtype": "float32",
        "models": [{"model": str(zoo / t["expert"])} for t in manifest["tasks"]],
        "parameters": {"calibration": str(cal_path), "lambda": 1.0},
    }


def _vision(zoo: Path, state: dict[str, torch.Tensor]):
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(str(zoo / "base"), dtype=torch.float32).eval()
    missing = set(state) - set(model.state_dict())
    if missing:
        raise SystemExit(f"merged tensors unknown to the model: {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    return model


def main(argv=None) -> int:
    from dam_mergekit.calibrate.config import CalibrationConfig
    from dam_mergekit.calibrate.trainer import Calibrator
    from dam_mergekit.merge import merge_tensor
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.plan import plan_recipe

    try:  # the lab's evaluation (ACC / ASR / p0 through the zoo's heads and trigger)
        evaluate_clip = import_module("dam_mergekit.lab.zoo.clip_eval").evaluate_clip
    except ImportError as err:
        raise SystemExit(f"needs dam_mergekit.lab (the backdoor lab): {err}") from None

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=".cache/zoo/clip-default")
    ap.add_argument("--calibration", default="recipes/dam-calibration.yml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override calibration settings (YAML values)",
    )
    ap.add_argument("--lam", type=float, default=0.3, help="task arithmetic lambda")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)

    zoo = Path(args.zoo)
    manifest = json.loads((zoo / "zoo.json").read_text())
    backdoored = [t["name"] for t in manifest["tasks"] if t.get("backdoored")]
    raw = yaml.safe_load(Path(args.calibration).read_text())
    raw["data"] = str(zoo)
    for item in args.set:
        key, _, value = item.partition("=")
        raw[key] = yaml.safe_load(value)
    tmp = Path(tempfile.mkdtemp(prefix="dam-vs-ta-"))
    results = {"zoo": str(zoo), "calibration": raw, "runs": []}
    ok = True

    cal_path = tmp / "calibration.yml"
    cal_path.write_text(yaml.safe_dump(raw))
    plan = plan_recipe(load_recipe(_recipe(zoo, cal_path)))
    calib = Calibrator(plan, CalibrationConfig.load(cal_path), progress=False)
    calib._setup()  # load base and experts once for task arithmetic
    loaded = calib.state
    ta_state = {
        t.name: merge_tensor(
            loaded.base[t.name], [e[t.name] for e in loaded.experts], [1.0] * calib.n, lam=args.lam
        )
        for t in plan.float_tensors
    }
    ta = evaluate_clip(_vision(zoo, ta_state), zoo)
    print(_table("task arithmetic", ta, manifest))

    for seed in args.seeds:
        raw["seed"] = seed
        cal_path.write_text(yaml.safe_dump(raw))
        start = time.perf_counter()
        run = Calibrator(plan, CalibrationConfig.load(cal_path), progress=True).run(write=False)
        seconds = time.perf_counter() - start
        dam = evaluate_clip(_vision(zoo, run.merged), zoo)
        print(_table(f"DAM seed {seed} ({seconds:.0f} s)", dam, manifest))
        _diagnose(run, plan)
        verdict = _targets(ta, dam, backdoored, manifest)
        ok = ok and verdict["met"]
        print("targets:", json.dumps(verdict))
        results["runs"].append(
            {
                "seed": seed,
                "ta": ta,
                "dam": dam,
                "verdict": verdict,
                "seconds": seconds,
                "history": run.history[-1:],
            }
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("ALL TARGETS MET" if ok else "TARGET MISSED (see above)")
    return 0 if ok else 1


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _targets(ta: dict, dam: dict, backdoored: list[str], manifest: dict) -> dict:
    tasks = [t["name"] for t in manifest["tasks"]]
    ta_asr = _mean(ta["asr"][t] for t in backdoored)
    dam_asr = _mean(dam["asr"][t] for t in backdoored)
    ta_acc, dam_acc = _mean(ta["acc"][t] for t in tasks), _mean(dam["acc"][t] for t in tasks)
    never_above = all(dam["asr"][t] <= ta["asr"][t] for t in backdoored)
    met = dam_asr <= ta_asr / 3 and dam_acc >= ta_acc - 1.0 and never_above
    return {
        "ta_succession_asr": round(ta_asr, 2),
        "dam_succession_asr": round(dam_asr, 2),
        "ta_acc": round(ta_acc, 2),
        "dam_acc": round(dam_acc, 2),
        "asr_at_most_third": dam_asr <= ta_asr / 3,
        "acc_within_1pp": dam_acc >= ta_acc - 1,
        "never_above_ta": never_above,
        "met": met,
    }


def _table(title: str, result: dict, manifest: dict) -> str:
    rows = [f"\n{title}", f"{'task':<10} {'bd':>3} {'ACC':>6} {'ASR':>6} {'p0':>6}"]
    for t in manifest["tasks"]:
        n = t["name"]
        rows.append(
            f"{n:<10} {'x' if t.get('backdoored') else '':>3} {result['acc'][n]:6.1f} "
            f"{result['asr'][n]:6.1f} {result['p0'][n]:6.1f}"
        )
    rows.append(f"{'mean':<10} {'':>3} {_mean(result['acc'].values()):6.1f}")
    return "\n".join(rows)


def _diagnose(run, plan) -> None:
    """Mean effective coefficient and kept share of each expert (what the masks and coefs did)."""
    n = len(plan.experts)
    coef = torch.stack([run.masks.coefficients[t.name] for t in plan.float_tensors]).mean(0)
    kept = []
    for i in range(n):
        total = kept_i = 0.0
        for t in plan.float_tensors:
            m1 = run.masks.m1.get(t.name)
            m2 = run.masks.m2.get(t.name)
            keep = torch.ones(t.shape)
            if m1 is not None:
                keep = keep * m1.float()
            if isinstance(m2, list) and m2[i] is not None:
                keep = keep * m2[i].float()
            kept_i += float(keep.sum())
            total += keep.numel()
        kept.append(kept_i / max(total, 1))
    names = [Path(str(e)).name for e in plan.experts]
    print(
        "effective coef (mean over tensors):",
        {k: round(float(c), 3) for k, c in zip(names, coef, strict=True)},
    )
    print("kept share M1*M2:", {k: round(v, 3) for k, v in zip(names, kept, strict=True)})
    last = run.history[-1] if run.history else {}
    print("last step:", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in last.items()})


if __name__ == "__main__":
    sys.exit(main())
