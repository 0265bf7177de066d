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

Check (CUDA; on a CPU the same code runs the eager step): the MI-SGS arm, float32, two epochs (S calibrated at
each, the lr changing, one capture); then S and the lr are changed in place and one more step is replayed: its
gradients must be S ⊙ G for G computed eagerly on the same batch and weights, and its update the fused SGD's with
the new lr (relative errors < 1e-4 and 1e-3; a graph that missed an update is off by O(1)).
The JSON file is rewritten after every result, so a run cut by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, median_ci, meta  # noqa: E402

import sgs_fx  # noqa: E402
from sgs_fx.cifar.data import synthetic_cifar  # noqa: E402
from sgs_fx.cifar.fast_train import ARMS, FastRecipe, FastTrainer  # noqa: E402


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
    """One replayed step, after S and the learning rate were changed in place, must apply exactly those: its
    gradients S ⊙ G (G computed eagerly on the same batch and weights) and its update the fused SGD's with the new
    lr. One step, so no chaos amplifies rounding differences; float32, deterministic kernels."""
    torch.backends.cudnn.deterministic = True
    extra = dict(width=0.125, batch_size=16) if args.smoke else dict(width=0.5)
    recipe = FastRecipe(arm="sgs", model="vgg11_bn", epochs=3, warmup=0, every=1, bf16=False, seed=1,
                        max_steps_per_epoch=8, capture=args.capture, **extra)
    trainer = FastTrainer(recipe, data, device)
    trainer.train_epoch(0)  # calibrates S, then eager warm-up steps, the capture, replays
    trainer.train_epoch(1)  # a new S and a new lr: the graph must be replayed, not captured again
    model = trainer.model
    convs = sgs_fx.instrumented(model)
    g = torch.Generator().manual_seed(3)
    sgs_fx.set_scales(model, {n: torch.rand(tuple(m.kernel_size), generator=g) + 0.25 for n, m in convs.items()})
    scales = sgs_fx.get_scales(model)
    trainer.lr.fill_(0.05)
    trainer.cursor.fill_(1)
    x = trainer.epoch_x[1].contiguous(memory_format=trainer.memory_format)
    y = trainer.epoch_y[1]
    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    F.cross_entropy(reference(x), y).backward()  # G: no optimizer, so unscaled
    G = {n: p.grad for n, p in reference.named_parameters()}
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    buffers = {n: trainer.opt.state[p]["momentum_buffer"].clone() for n, p in params.items()}
    if trainer.graph is not None:
        trainer.graph.replay()
    else:
        trainer._eager_step()
    grad_err = weight_err = 0.0
    for n, p in params.items():
        conv = n.rsplit(".", 1)[0]
        want = (scales[conv].to(G[n]) * G[n]) if n.endswith("weight") and conv in scales else G[n]
        grad_err = max(grad_err, ((p.grad - want).abs().max() / want.abs().max().clamp_min(1e-30)).item())
        buf = recipe.momentum * buffers[n] + want + recipe.weight_decay * before[n]
        moved = (before[n] - p.detach()).abs().max().clamp_min(1e-30)
        weight_err = max(weight_err, ((p.detach() - (before[n] - 0.05 * buf)).abs().max() / moved).item())
    results["check"] = {"captures": trainer.captures, "captured": trainer.graph is not None,
                        "max_relative_grad_error": grad_err, "max_relative_update_error": weight_err,
                        "scales_moved": not all(torch.equal(v, torch.ones_like(v)) for v in scales.values())}
    if trainer.graph is not None:
        results["check"]["passed"] = trainer.captures == 1 and grad_err < 1e-4 and weight_err < 1e-3
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
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1 (got {args.rounds})")
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
