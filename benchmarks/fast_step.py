"""The captured step's cost per arm, epochs interleaved (issue 21), and a check that the captured loop trains like
the eager one on this device.

    python benchmarks/fast_step.py --models vgg11_bn resnet18 --arms baseline sgs --rounds 8 --json out.json
    python benchmarks/fast_step.py --check --json check.json        # captured vs eager, S and lr changing
    python benchmarks/fast_step.py --smoke                          # CPU, tiny (tests)

Timing: one ``FastTrainer`` per (model, arm) is built and trains its epoch 0 (warm-up steps and the capture);
then every round trains one more epoch of each trainer, in a rotating order. An epoch's time per step (its MI
calibration, if one ran, taken out) is what a 200-epoch run pays per step, augmentation of the epoch included.
Per arm: the median step, and the median over rounds of the ratio to the baseline's step in the same round
with a bootstrap 95 % CI. The MI calibrations' own times are reported apart.

Check (CUDA): the MI-SGS arm with warm-up 0 and a calibration every epoch, float32, trained 3 epochs once with
the captured step and once eagerly from the same seed: the largest relative weight difference must stay at
cuDNN's nondeterminism (a graph that missed an lr or S update would differ by orders of magnitude more).
The JSON file is rewritten after every result, so a run cut by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, median_ci, meta  # noqa: E402

import sgs_fx  # noqa: E402
from sgs_fx.data import synthetic_cifar  # noqa: E402
from sgs_fx.fast_train import ARMS, FastRecipe, FastTrainer  # noqa: E402


def load(args):
    if args.smoke:
        return synthetic_cifar(n_train=256, n_test=64)
    if args.data:
        from study import load_data

        return load_data(args.data, False)
    return synthetic_cifar(n_train=args.images, n_test=1000)  # timing does not depend on the pixels


def timing(args, data, device, results: dict, save) -> None:
    extra = dict(width=0.125, batch_size=16, max_steps_per_epoch=4) if args.smoke else dict(width=args.width)
    for model in args.models:
        trainers = {}
        for arm in args.arms:
            recipe = FastRecipe(arm=arm, model=model, epochs=args.rounds + 1, capture=args.capture, seed=0,
                                compile=args.compile, **extra)
            trainers[arm] = FastTrainer(recipe, data, device)
            first = trainers[arm].train_epoch(0)
            results.setdefault("first_epoch_s", {})[f"{model}/{arm}"] = first["epoch_s"]
        per_step = {arm: [] for arm in args.arms}
        calibrations = []
        for r in range(1, args.rounds + 1):
            order = args.arms[r % len(args.arms):] + args.arms[:r % len(args.arms)]
            for arm in order:
                e = trainers[arm].train_epoch(r)
                per_step[arm].append((e["epoch_s"] - e["calibration_s"]) / trainers[arm].steps * 1e3)
                if e["calibration_s"]:
                    calibrations.append(e["calibration_s"])
        row = {"steps_per_epoch": trainers[args.arms[0]].steps, "captured": {a: t.captures == 1 for a, t in trainers.items()},
               "captures": {a: t.captures for a, t in trainers.items()},
               "step_ms": {a: statistics.median(v) for a, v in per_step.items()}, "step_ms_rounds": per_step,
               "calibration_s": calibrations}
        if "baseline" in per_step:
            for arm in args.arms:
                ratios = [a / b for a, b in zip(per_step[arm], per_step["baseline"])]
                row.setdefault("ratio_to_baseline", {})[arm] = statistics.median(ratios)
                row.setdefault("ratio_ci", {})[arm] = median_ci(ratios)
            row["projected_200_epochs_s"] = {a: row["step_ms"][a] * row["steps_per_epoch"] * 200 / 1e3
                                             for a in args.arms}
        results.setdefault("timing", {})[model] = row
        save()
        del trainers
        if device.type == "cuda":
            torch.cuda.empty_cache()


def check(args, data, device, results: dict, save) -> None:
    extra = dict(width=0.125, batch_size=16, max_steps_per_epoch=4) if args.smoke else dict(width=0.5)
    models = {}
    for capture in (True, False) if device.type == "cuda" else (False,):
        recipe = FastRecipe(arm="sgs", model="vgg11_bn", epochs=3, warmup=0, every=1, bf16=False, capture=capture,
                            seed=1, **extra)
        trainer = FastTrainer(recipe, data, device)
        for epoch in range(recipe.epochs):
            trainer.train_epoch(epoch)
        models[capture] = trainer
    eager = models[False].model.state_dict()
    row = {"captures": {str(k): t.captures for k, t in models.items()},
           "scales_moved": not all(torch.equal(s, torch.ones_like(s)) for s in sgs_fx.get_scales(models[False].model).values())}
    if True in models:
        captured = models[True].model.state_dict()
        rel = max(((captured[k].double() - eager[k].double()).abs().max() / eager[k].double().abs().max().clamp_min(1e-12)).item()
                  for k in eager if eager[k].is_floating_point())
        row.update(max_relative_weight_diff=rel, passed=rel < 1e-2 and models[True].captures == 1)
    results["check"] = row
    save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg11_bn", "resnet18"])
    p.add_argument("--arms", nargs="+", default=["baseline", "sgs"], choices=ARMS)
    p.add_argument("--rounds", type=int, default=8, help="timed epochs per arm after the first")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--images", type=int, default=50_000, help="synthetic training images when no --data")
    p.add_argument("--data", help="CIFAR-10 folder (see study.py); default synthetic images of CIFAR's shape")
    p.add_argument("--no-capture", dest="capture", action="store_false", default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile each model's forward inside the step")
    p.add_argument("--check", action="store_true", help="only the captured-vs-eager check")
    p.add_argument("--device")
    p.add_argument("--json")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load(args)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "train_images": len(data.train_labels), "compile": args.compile}
    t0 = time.perf_counter()

    def save():  # after every result: a run cut by a time limit keeps what it measured
        results["wall_s"] = time.perf_counter() - t0
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"meta": meta(args), "results": results}, indent=2))

    if args.check:
        check(args, data, device, results, save)
        emit(args, results, args.json)
        return 0 if results["check"].get("passed", True) else 1  # (nothing captured on a CPU: nothing to compare)
    else:
        timing(args, data, device, results, save)
    results["wall_s"] = time.perf_counter() - t0
    emit(args, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
