"""The paper's CIFAR recipe on one GPU, baseline and SGS, each run in minutes (issue 6).

VGG-11-BN, 200 epochs, batch 128, SGD momentum 0.9, weight decay 5e-4 on all parameters, cosine lr
0.1 -> 1e-6, random crop 32 pad 4 + horizontal flip + cutout 16; SGS: k = 5, recomputed every 5 epochs
from 2 batches, warm-up 1. To fit about 10 minutes a run, everything stays on the GPU: the uint8 dataset,
the augmentation (seeded per epoch), channels_last, bf16 autocast, torch.compile of the train step's
model (S is a buffer: recomputing it never recompiles) and a fused SGD step. Prints one JSON line per run.

    python benchmarks/gpu_recipe.py                 # both runs, CIFAR-10 from the sgs_fx cache
    python benchmarks/gpu_recipe.py --smoke         # 2 steps on synthetic data, any device (tests)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sgs_fx  # noqa: E402
from sgs_fx.data import augment, load_cifar10, synthetic_cifar, to_float  # noqa: E402
from sgs_fx.models import build_model  # noqa: E402


def run(name: str, args, data, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(args.model, width=args.width).to(device).to(memory_format=torch.channels_last)
    sched = None
    if name == "sgs":
        model = sgs_fx.transform(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                          fused=device.type == "cuda")
    # reduce-overhead = CUDA graphs: the step is launch-bound at CIFAR sizes. SGS's hooks run on the weight
    # gradients the graphed backward returns, and the MI calibration runs the uncompiled model.
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        lr = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * epoch / epochs))
        for group in opt.param_groups:
            group["lr"] = lr
        if sched is not None:
            sched.loader = epoch_batches(epoch)  # the first batches of this epoch's augmented pass
            sched.step(epoch)
        model.train()
        for x, y in epoch_batches(epoch):
            with autocast:
                loss = F.cross_entropy(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad(), autocast:
        for i in range(0, len(test_y), 1000):
            x = to_float(test_x[i:i + 1000]).contiguous(memory_format=torch.channels_last)
            correct += (model(x).argmax(1) == test_y[i:i + 1000]).sum().item()
    return {"run": name, "model": args.model, "epochs": epochs, "test_acc": correct / len(test_y),
            "train_wall_s": wall, "final_loss": loss.item(), "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "compile": args.compile and args.compile_mode, "seed": args.seed}


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
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode (reduce-overhead: CUDA graphs; unmeasured on a GPU so far)")
    p.add_argument("--data-dir")
    p.add_argument("--smoke", action="store_true", help="2 steps on synthetic data, no compile")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.compile, args.warmup = False, 0  # warm-up 0: the smoke run calibrates S once
        data = synthetic_cifar(n_train=4 * args.batch_size, n_test=256)
    else:
        data = load_cifar10(args.data_dir)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for name in args.runs:
        print(json.dumps(run(name, args, data, device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
