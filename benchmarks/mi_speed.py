"""Speed and memory of one MI calibration (issue 4): sgs_fx's streaming estimator vs two references.

Workload: a freshly initialised CIFAR VGG-11-BN (full width), 256 real CIFAR-10 training images (2 batches
of 128, training augmentation), every 3x3 conv.
  ours:     MIScheduler.calibrate() — one forward per batch (conv inputs kept), all channels and
            displacements vectorised, each pixel binned once.
  official: with --official DIR (a clone of Ascend-Research/Reparameterization, and `pip install
            fast-histogram`): its own dependence.py, `feature_map_nmik` on every layer's padded input kept
            from one forward, exactly as its `generate_spatial_gradient_scaling_from_dependence` does.
            Without it, a re-implementation of that loop with np.histogram2d (4-5x slower than fast_histogram:
            not a fair stand-in for the official speed, reported as "official_reimpl").
  naive:    the test suite's reference (Python loops over pixels), on the first layer and 16 images only;
            compared with ours on the same slice.
Peak memory is measured per method in a fresh child process (resident memory sampled every millisecond,
above its level once the model and the 256 images are loaded) and set against one batch of activations
(every layer's output for 128 images, what a training step keeps) and against the forwards alone.

    .venv/bin/python benchmarks/mi_speed.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
import sgs_fx  # noqa: E402
from report import emit  # noqa: E402
from sgs_fx.cifar.models import build_model  # noqa: E402


def workload(n_images: int, synthetic: bool):
    from sgs_fx.cifar.data import augment, load_cifar10, synthetic_cifar, to_float

    data = synthetic_cifar(n_train=n_images) if synthetic else load_cifar10()
    g = torch.Generator().manual_seed(0)
    x = augment(to_float(data.train_images[:n_images].clone()), g)
    del data  # keep only the 256 images: the peak-memory baseline should not hold the whole dataset
    torch.manual_seed(0)
    model = sgs_fx.transform(build_model("vgg11_bn"))
    return model, list(x.split(128))


def run_ours(model, batches) -> dict:
    return sgs_fx.MIScheduler(model, batches, batches=len(batches)).calibrate()


def run_forward_only(model, batches) -> None:
    """The two passes' forwards alone: the memory any calibration needs before keeping statistics."""
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            for x in batches:
                model(x)


def conv_inputs(model, batches, keep) -> dict:
    """One eval forward per batch, keeping ``keep(conv, input)`` of every instrumented conv: the official
    flow, which holds every layer's feature maps before computing anything."""
    convs = sgs_fx.instrumented(model)
    maps = {n: [] for n in convs}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: maps[n].append(keep(mod, a[0])))
             for n, m in convs.items()]
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return maps


def run_official_code(model, batches, official_dir: str) -> dict:
    """The official estimator itself, imported from a clone (measured side by side, never copied)."""
    sys.path.insert(0, official_dir)
    from dependence import feature_map_nmik  # noqa: E402  (the official module; needs fast_histogram)

    convs = sgs_fx.instrumented(model)
    # padded as the official hook pads: F.pad(x, (p0, p0, p1, p1))
    maps = conv_inputs(model, batches, lambda mod, x: F.pad(x, (mod.padding[0], mod.padding[0], mod.padding[1],
                                                                mod.padding[1])).detach().cpu())
    return {n: feature_map_nmik(torch.cat(maps[n]), kernel_size=tuple(convs[n].kernel_size), k=5)
            for n in convs}


def run_official(model, batches) -> dict:
    """Re-implementation: feature maps of every layer kept whole, then a Python loop over channels x
    displacements with np.histogram2d."""
    convs = sgs_fx.instrumented(model)
    maps = conv_inputs(model, batches, lambda mod, x: x.detach().clone())
    out = {}
    for name, conv in convs.items():
        x = F.pad(torch.cat(maps[name]), list(conv._reversed_padding_repeated_twice)).double().numpy()
        k = conv.kernel_size[0]
        c0 = (k - 1) // 2
        D = np.ones((x.shape[1], k, k))
        for c in range(x.shape[1]):
            for i in range(k):
                for j in range(k):
                    if (i, j) == (c0, c0):
                        continue
                    di, dj = i - c0, j - c0
                    H, W = x.shape[2:]
                    X = x[:, c, max(0, -di):H - max(0, di), max(0, -dj):W - max(0, dj)].ravel()
                    Y = x[:, c, max(0, di):H - max(0, -di), max(0, dj):W - max(0, -dj)].ravel()
                    bins = 1 + math.ceil(math.log2(X.size))
                    J, _, _ = np.histogram2d(X, Y, bins=bins)
                    p = J / J.sum()
                    nz = p[p > 0]
                    hxy = -(nz * np.log2(nz)).sum()
                    px, py = p.sum(1), p.sum(0)
                    hx = -(px[px > 0] * np.log2(px[px > 0])).sum()
                    hy = -(py[py > 0] * np.log2(py[py > 0])).sum()
                    nmi = (hx + hy - hxy) / hxy if hxy > 0 else np.nan
                    D[c, i, j] = 5 * nmi / (4 * nmi + 1)
        d = np.nanmean(D, 0)
        out[name] = d / d.mean()
    return out


class RssSampler:
    """Peak resident memory above the level at start, sampled from /proc every millisecond.

    ru_maxrss cannot be used: its high-water mark is set by loading the dataset, before the method runs.
    """

    def __init__(self):
        self.page = resource.getpagesize()
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def child(method: str, n_images: int, synthetic: bool, official_dir: str | None) -> None:
    model, batches = workload(n_images, synthetic)
    gc.collect()
    methods = {"ours": run_ours, "official_reimpl": run_official, "forward_only": run_forward_only,
               "official": lambda m, b: run_official_code(m, b, official_dir)}
    with RssSampler() as mem:
        t0 = time.perf_counter()
        methods[method](model, batches)
        elapsed = time.perf_counter() - t0
    print(json.dumps({"seconds": elapsed, "peak_extra_bytes": mem.peak - mem.start}))


def activation_bytes(model, batch) -> int:
    """Bytes of every leaf module's output for one batch: the activations one training step keeps."""
    total = 0

    def hook(mod, args, out):
        nonlocal total
        total += out.numel() * out.element_size()

    hs = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(batch)
    for h in hs:
        h.remove()
    return total


def naive_vs_ours(n_images: int, synthetic: bool) -> dict:
    from mi_reference import reference_scale

    model, batches = workload(max(n_images, 16), synthetic)
    x = batches[0][:n_images]
    conv = model.features[0]
    t0 = time.perf_counter()
    ref = reference_scale(x, conv)
    t_naive = time.perf_counter() - t0
    t_ours = statistics.median(_timed(lambda: sgs_fx.dependence(x, conv)) for _ in range(5))
    ours = sgs_fx.dependence(x, conv).numpy()
    return {"images": n_images, "layer": "features.0", "naive_s": t_naive, "ours_s": t_ours,
            "speedup": t_naive / t_ours, "max_abs_diff": float(np.abs(ours - ref).max())}


def ops_per_calibration(model, batches) -> dict:
    """aten ops run by one calibration, split into the forwards and the statistics (profiler counts)."""
    from torch.profiler import ProfilerActivity, profile

    def count(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))

    total = count(lambda: run_ours(model, batches))
    forward = count(lambda: run_forward_only(model, batches)) // 2  # one forward per batch
    return {"total": total, "forwards": forward, "statistics": total - forward}


def device_timing(model, batches, device: str) -> dict:
    model = model.to(device)
    batches = [b.to(device) for b in batches]
    sched = sgs_fx.MIScheduler(model, batches, batches=len(batches))
    sched.calibrate()  # warm-up
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sched.calibrate()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"calibrate_s_median": statistics.median(times), "gpu": torch.cuda.get_device_name()}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--naive-images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--synthetic", action="store_true", help="synthetic images instead of CIFAR-10 (smoke runs)")
    p.add_argument("--quick", action="store_true", help="1 repeat, 4 naive images")
    p.add_argument("--json")
    p.add_argument("--official", metavar="DIR", help="a clone of Ascend-Research/Reparameterization (dependence.py)")
    p.add_argument("--device", default="cpu", help="also time ours on this device (cuda) in-process")
    p.add_argument("--child", choices=["ours", "official", "official_reimpl", "forward_only"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.images, args.synthetic, args.official)
        return 0
    if args.quick:
        args.repeats, args.naive_images = 1, 4
    official = "official" if args.official else "official_reimpl"
    methods = ("ours", official, "forward_only")
    runs = {m: [] for m in methods}
    for _ in range(args.repeats):  # interleaved, each run in a fresh process
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, "--images", str(args.images)]
            cmd += ["--synthetic"] if args.synthetic else []
            cmd += ["--official", args.official] if args.official else []
            runs[method].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                                           .stdout.strip().splitlines()[-1]))
    results = {m: {"seconds": statistics.median(r["seconds"] for r in rs),
                   "runs_s": [r["seconds"] for r in rs],
                   "peak_extra_bytes": statistics.median(r["peak_extra_bytes"] for r in rs)} for m, rs in runs.items()}
    results["ours_over_official"] = results["ours"]["seconds"] / results[official]["seconds"]
    model, batches = workload(args.images, args.synthetic)
    results["one_batch_activations_bytes"] = activation_bytes(model, batches[0])
    results["ops_per_calibration"] = ops_per_calibration(model, batches)
    if args.device != "cpu":
        results["device"] = device_timing(model, batches, args.device)
    results["naive_slice"] = naive_vs_ours(args.naive_images, args.synthetic)
    emit(args, results, args.json)
    mb = 2 ** 20
    print(f"\nours:     {results['ours']['seconds']:.2f} s, peak extra {results['ours']['peak_extra_bytes'] / mb:.0f} MB")
    print(f"{official}: {results[official]['seconds']:.2f} s, peak extra {results[official]['peak_extra_bytes'] / mb:.0f} MB"
          f"  -> ours takes {results['ours_over_official']:.2f}x its time")
    print(f"aten ops (GPU kernel launches, roughly) per calibration: {results['ops_per_calibration']}")
    if "device" in results:
        print(f"{args.device}: {results['device']}")
    print(f"forward passes alone: peak extra {results['forward_only']['peak_extra_bytes'] / mb:.0f} MB; "
          f"one batch of activations (every layer's output): {results['one_batch_activations_bytes'] / mb:.0f} MB")
    n = results["naive_slice"]
    print(f"naive reference, first layer, {n['images']} images: {n['naive_s']:.2f} s vs ours {n['ours_s']:.4f} s "
          f"-> {n['speedup']:.0f}x (max |ΔS| {n['max_abs_diff']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
