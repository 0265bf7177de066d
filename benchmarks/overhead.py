"""Train-step cost of SGS and of real branch blocks, relative to the plain model (issues 2 and 3).

Variants: plain, sgs (transform + random S), branches_acb, branches_repvgg; optionally torch.compile'd
plain vs sgs. Steps are interleaved (one step of every variant per round, in a rotating order) and the
figure of merit is the median over rounds of the per-round ratio variant / plain, so drift of a shared
machine cancels. Memory: bytes of tensors saved for backward (activations, exact and deterministic)
plus parameter bytes.

    .venv/bin/python benchmarks/overhead.py [--quick] [--compile] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sgs_fx  # noqa: E402
from sgs_fx.models import build_model  # noqa: E402
from report import emit  # noqa: E402


def make_variants(name: str, width: float, compile_: bool) -> dict:
    torch.manual_seed(0)
    plain = build_model(name, width=width)
    sgs = sgs_fx.transform(plain)
    sgs_fx.set_scales(sgs, {n: torch.rand(tuple(m.kernel_size)) + 0.5 for n, m in sgs_fx.instrumented(sgs).items()})
    variants = {"plain": plain, "sgs": sgs,
                "branches_acb": sgs_fx.transform(plain, mode="branches", branches="acb"),
                "branches_repvgg": sgs_fx.transform(plain, mode="branches", branches="repvgg")}
    if compile_:
        variants["plain_compiled"] = torch.compile(build_model(name, width=width))
        variants["sgs_compiled"] = torch.compile(sgs_fx.transform(build_model(name, width=width)))
    return variants


def train_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def saved_bytes(model, x, y) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return total


def bench(name: str, width: float, batch: int, rounds: int, warmup: int, compile_: bool) -> dict:
    variants = make_variants(name, width, compile_)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in variants.items()}
    for k, m in variants.items():
        for _ in range(warmup):
            train_step(m, opts[k], x, y)
    times = {k: [] for k in variants}
    keys = list(variants)
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            train_step(variants[k], opts[k], x, y)
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k in keys:
        base = "plain_compiled" if k.endswith("_compiled") else "plain"
        ratios = [a / b for a, b in zip(times[k], times[base])]
        out[k] = {"median_step_s": statistics.median(times[k]), "ratio_vs_plain": statistics.median(ratios),
                  "ratio_iqr": [statistics.quantiles(ratios, n=4)[0], statistics.quantiles(ratios, n=4)[2]]
                  if len(ratios) >= 4 else None,
                  "params_bytes": sum(p.numel() * p.element_size() for p in variants[k].parameters())}
        if not k.endswith("_compiled"):
            out[k]["saved_for_backward_bytes"] = saved_bytes(variants[k], x, y)
    for k in keys:
        if "saved_for_backward_bytes" in out[k]:
            out[k]["saved_ratio_vs_plain"] = out[k]["saved_for_backward_bytes"] / out["plain"]["saved_for_backward_bytes"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "vgg11_bn"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also plain vs SGS under torch.compile (inductor)")
    p.add_argument("--quick", action="store_true", help="width 0.25, 6 rounds (a minute)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.rounds = 0.25, 6
    results = {m: bench(m, args.width, args.batch, args.rounds, args.warmup, args.compile) for m in args.models}
    emit(args, results, args.json)
    print(f"\n{'model':<10} {'variant':<16} {'step (s)':>9} {'time/plain':>11} {'saved-for-bw/plain':>19} {'params MB':>10}")
    for m, res in results.items():
        for k, r in res.items():
            saved = f"{r['saved_ratio_vs_plain']:.2f}" if "saved_ratio_vs_plain" in r else "-"
            print(f"{m:<10} {k:<16} {r['median_step_s']:>9.4f} {r['ratio_vs_plain']:>11.3f} {saved:>19} "
                  f"{r['params_bytes'] / 2**20:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
