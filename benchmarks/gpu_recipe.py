"""The paper's CIFAR recipe on one GPU, baseline and SGS, each run in minutes (issue 6).

VGG-11-BN, 200 epochs, batch 128, SGD momentum 0.9, weight decay 5e-4 on all parameters, cosine lr
0.1 -> 1e-6, random crop 32 pad 4 + horizontal flip + cutout 16; SGS: k = 5, recomputed every 5 epochs
from 2 batches, warm-up 1. To fit about 10 minutes a run, everything stays on the GPU: the uint8 dataset,
the augmentation (seeded per epoch), channels_last, bf16 autocast, torch.compile of the train step's
model (S is a buffer: recomputing it never recompiles) and a fused SGD step. Prints one JSON line per run.

    python benchmarks/gpu_recipe.py                 # both runs, CIFAR-10 from the sgs_fx cache
    python benchmarks/gpu_recipe.py --smoke         # 2 steps on synthetic data, any device (tests)

Timing a run on a machine without the dataset (a lent GPU takes 64 MiB per call): write a subset here,
carry it, and run a few epochs there; each line then also projects the full recipe's time from the measured
parts (the first epoch with compilation, the steady step, one MI calibration):

    python benchmarks/gpu_recipe.py --write-subset gpu_data/cifar_subset.npz   # 15,000 + 2,000 images, 46 MiB
    python benchmarks/gpu_recipe.py --data-npz gpu_data/cifar_subset.npz --epochs 10 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sgs_fx  # noqa: E402
from sgs_fx.data import Cifar10, augment, load_cifar10, synthetic_cifar, to_float  # noqa: E402
from sgs_fx.models import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402

FULL_TRAIN_IMAGES = 50_000


def run(name: str, args, data, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(args.model, width=args.width).to(device).to(memory_format=torch.channels_last)
    sched = None
    if name == "sgs":
        model = sgs_fx.transform(model, scaling=args.scaling)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                          fused=device.type == "cuda")
    if name == "sgs" and args.scaling == "step":
        sgs_fx.attach_optimizer(opt)
    # reduce-overhead = CUDA graphs: the step is launch-bound at CIFAR sizes. With scaling="step" the graphed
    # forward and backward are the plain model's, and S is applied to .grad before the fused SGD step (with
    # "hook", the hooks run on the weight gradients the graphed backward returns). The MI calibration runs
    # the uncompiled model.
    step_model = torch.compile(model, mode=args.compile_mode) if args.compile else model
    train_x = data.train_images.to(device)
    train_y = data.train_labels.to(device)
    test_x, test_y = data.test_images.to(device), data.test_labels.to(device)
    n = len(train_y)
    steps_per_epoch = n // args.batch_size if not args.smoke else 2
    epochs = args.epochs if not args.smoke else 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def epoch_batches(epoch):
        g = torch.Generator(device=device).manual_seed(args.seed * 100003 + epoch)
        perm = torch.randperm(n, device=device, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = augment(to_float(train_x[idx]), g, cutout=16).contiguous(memory_format=torch.channels_last)
            yield x, train_y[idx]

    if name == "sgs":
        sched = sgs_fx.MIScheduler(model, [], k=5, every=5, warmup=args.warmup, batches=2)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    graphs = args.compile and args.compile_mode == "reduce-overhead"
    first_epoch_s, calibration_s, calibrations = 0.0, 0.0, 0
    sync()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        lr = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * epoch / epochs))
        for group in opt.param_groups:
            group["lr"] = lr
        if sched is not None:
            sched.loader = epoch_batches(epoch)  # the first batches of this epoch's augmented pass
            sync()  # the previous epoch's queued kernels are not the calibration's
            t_cal = time.perf_counter()
            if sched.step(epoch):
                sync()
                calibration_s += time.perf_counter() - t_cal
                calibrations += 1
        model.train()
        for x, y in epoch_batches(epoch):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast:
                loss = F.cross_entropy(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch == 0:
            sync()
            first_epoch_s = time.perf_counter() - t_epoch
    sync()
    wall = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad(), autocast:
        for i in range(0, len(test_y), 1000):
            x = to_float(test_x[i:i + 1000]).contiguous(memory_format=torch.channels_last)
            correct += (model(x).argmax(1) == test_y[i:i + 1000]).sum().item()
    row = {"run": name, "model": args.model, "width": args.width, "epochs": epochs, "train_images": n,
           "batch_size": args.batch_size, "steps_per_epoch": steps_per_epoch, "test_images": len(test_y), "test_acc": correct / len(test_y),
           "train_wall_s": wall, "first_epoch_s": first_epoch_s, "calibrations": calibrations,
           "calibration_s": calibration_s, "final_loss": loss.item(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "compile": args.compile and args.compile_mode, "seed": args.seed,
           "scaling": args.scaling if name == "sgs" else None}
    row.update(projection(row, args.full_epochs, sched))
    return row


def projection(row: dict, full_epochs: int, sched) -> dict:
    """The full recipe's time (50,000 images, ``full_epochs``) from this run's parts: its first epoch (which
    compiles and captures, and calibrates if due), its steady per-step time, and one MI calibration per later
    due epoch."""
    if row["epochs"] < 2:
        return {}
    later_due = (lambda epochs: sum(sched.due(e) for e in range(1, epochs))) if sched is not None else (lambda _: 0)
    per_calibration = row["calibration_s"] / row["calibrations"] if row["calibrations"] else 0.0
    steady_s = row["train_wall_s"] - row["first_epoch_s"] - per_calibration * later_due(row["epochs"])
    per_step = steady_s / ((row["epochs"] - 1) * row["steps_per_epoch"])
    full_steps_per_epoch = FULL_TRAIN_IMAGES // row["batch_size"]
    projected = (row["first_epoch_s"] + per_step * (full_steps_per_epoch * full_epochs - row["steps_per_epoch"])
                 + per_calibration * later_due(full_epochs))
    return {"steady_step_ms": per_step * 1e3, "projected_full_s": projected, "projected_epochs": full_epochs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["baseline", "sgs"], choices=["baseline", "sgs"])
    p.add_argument("--model", default="vgg11_bn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="SGS warm-up epochs (S = ones before)")
    p.add_argument("--scaling", default="step", choices=["hook", "graph", "step"],
                   help="how the SGS run scales its weight gradients (sgs_fx.transform's scaling)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode (reduce-overhead: CUDA graphs; unmeasured on a GPU so far)")
    p.add_argument("--data-dir")
    p.add_argument("--data-npz", help="uint8 arrays of any size (written by --write-subset; no sha256 check)")
    p.add_argument("--write-subset", metavar="FILE", help="write the first --subset training and --test-subset "
                   "test images of the cached CIFAR-10 to FILE (.npz) and exit")
    p.add_argument("--subset", type=int, default=15_000)
    p.add_argument("--test-subset", type=int, default=2_000)
    p.add_argument("--full-epochs", type=int, default=200, help="the recipe's length, for the projection")
    p.add_argument("--json", help="also write every run's line (and the machine) to this file")
    p.add_argument("--smoke", action="store_true", help="2 steps on synthetic data, no compile")
    args = p.parse_args(argv)
    if args.write_subset:
        write_subset(args.write_subset, load_cifar10(args.data_dir), args.subset, args.test_subset)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.compile, args.warmup = False, 0  # warm-up 0: the smoke run calibrates S once
        data = synthetic_cifar(n_train=4 * args.batch_size, n_test=256)
    elif args.data_npz:
        data = read_subset(args.data_npz)
    else:
        data = load_cifar10(args.data_dir)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.runs:
        rows.append(run(name, args, data, device))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        emit(args, {"runs": rows}, args.json)
    return 0


def write_subset(path: str, data: Cifar10, n_train: int, n_test: int) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, train_images=data.train_images[:n_train].numpy(),
                        train_labels=data.train_labels[:n_train].numpy(),
                        test_images=data.test_images[:n_test].numpy(), test_labels=data.test_labels[:n_test].numpy())
    print(f"wrote {path}: {n_train} training and {n_test} test images, {Path(path).stat().st_size / 2**20:.1f} MiB")


def read_subset(path: str) -> Cifar10:
    with np.load(path) as f:
        return Cifar10(*(torch.from_numpy(f[k]) for k in ("train_images", "train_labels", "test_images", "test_labels")))


if __name__ == "__main__":
    sys.exit(main())
