"""CPU-budget accuracy study on real CIFAR-10: baseline vs SGS (MI) vs ACB branches vs fixed ACB-equivalent S.

A narrow VGG-11-BN, the full training set, a fixed number of epochs, 3 seeds per arm; prints a JSON line
per run and a mean ± std table, and writes everything to --json. About 75 minutes on 2 CPU cores at the
defaults; run it in the background:

    nohup .venv/bin/python benchmarks/accuracy.py > accuracy.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402
from sgs_fx.cifar.train import TrainConfig, train  # noqa: E402

ARMS = {
    "baseline": dict(scales="none"),
    "sgs_mi": dict(scales="mi"),
    "branches_acb": dict(scales="acb", mode="branches"),
    "fixed_acb_scales": dict(scales="acb"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--every", type=int, default=2, help="MI recompute period (the paper: 5 of 200 epochs)")
    p.add_argument("--subset", type=int)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--data", default="cifar10", choices=["cifar10", "synthetic"])
    p.add_argument("--out", default="runs/accuracy")
    p.add_argument("--json", default="benchmarks/results/accuracy.json")
    args = p.parse_args(argv)
    results = []
    for seed in args.seeds:
        for arm in args.arms:
            cfg = TrainConfig(model="vgg11_bn", width=args.width, epochs=args.epochs, seed=seed, every=args.every,
                              warmup=1, subset=args.subset, data=args.data, out=f"{args.out}/{arm}_s{seed}",
                              export=False, plots=False, progress=False, **ARMS[arm])
            t0 = time.perf_counter()
            summary = train(cfg)
            row = {"arm": arm, "seed": seed, "test_acc": summary["final"]["test_acc"],
                   "best_test_acc": summary["best_test_acc"], "s_per_epoch": summary["mean_epoch_time_s"],
                   "wall_s": time.perf_counter() - t0}
            results.append(row)
            print(json.dumps(row), flush=True)
    table = {}
    for arm in args.arms:
        accs = [r["test_acc"] for r in results if r["arm"] == arm]
        times = [r["s_per_epoch"] for r in results if r["arm"] == arm]
        table[arm] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "n": len(accs), "s_per_epoch": statistics.median(times)}
    print(f"\n{'arm':<18} {'test acc (mean ± std)':>24} {'s/epoch':>8}")
    for arm, t in table.items():
        print(f"{arm:<18} {100 * t['mean']:>15.2f} ± {100 * t['std']:.2f} (n={t['n']}) {t['s_per_epoch']:>8.1f}")
    emit(args, {"runs": results, "table": table}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
