"""What one conv's gradient scaling costs in a host-bound backward pass, by mechanism.

A chain of ``--convs`` tiny convs (4 channels, 4x4 pixels, batch 1: the conv itself is cheap, so per-op host
work dominates, as in a GPU step at CIFAR sizes) is run forward and backward; the figure is the extra time
per conv over the plain chain, median of interleaved single runs, with a 95 % bootstrap interval.

  plain            the chain as it is
  sgs_hook         sgs_fx.transform: the tensor hook ``S.mul`` on each weight Parameter (``scaling="hook"``)
  noop_hook        a Python hook that returns None on each weight: what any per-Parameter hook costs at least
                   (the engine wraps the fresh gradient for Python, calls, unwraps)
  sgs_per_use      sgs_fx's autograd function in the forward graph (tied weights; sgs_fx 0.1)
  foreach_after    the plain chain, then one ``torch._foreach_mul_`` of every weight's .grad by S: the official
                   code's way, one call per step (exact only where .grad is the whole story: see BENCHMARKS.md)

    python benchmarks/hook_cost.py [--convs 30] [--samples 1000] [--device cuda] [--json out.json]

``--in-model resnet18|vgg11_bn`` times the multiplication itself, inside the hook, during training steps of
the host-bound proxy (``overhead.py --dispatch-bound``: width 0.125, batch 8, one thread; CPU only), per conv:
with S as sgs_fx keeps it (k x k, broadcast) and with S expanded to the weight's full shape, each beside the
same multiplication repeated in isolation (caches warm). The difference between the two is what running an
op right after a conv kernel costs.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sgs_fx  # noqa: E402
from overhead import PROXY_BATCH, PROXY_WIDTH, per_use_copy, proxy_hw  # noqa: E402
from report import emit, median_ci  # noqa: E402


def make_variants(n: int, channels: int, device) -> dict:
    torch.manual_seed(0)
    plain = nn.Sequential(*[nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(n)]).to(device)
    sgs = sgs_fx.transform(plain, scaling="hook")
    sgs_fx.set_scales(sgs, {name: torch.rand(3, 3) + 0.5 for name in sgs_fx.instrumented(sgs)})
    scales = [s.to(device) for s in sgs_fx.get_scales(sgs).values()]
    per_use = per_use_copy(sgs)
    noop = copy.deepcopy(plain)
    for conv in noop:
        conv.weight.register_hook(lambda g: None)
    foreach = copy.deepcopy(plain)
    expanded = [s.expand_as(c.weight) for s, c in zip(scales, foreach)]

    def after_backward():
        torch._foreach_mul_([c.weight.grad for c in foreach], expanded)

    return {"plain": (plain, None), "sgs_hook": (sgs, None), "noop_hook": (noop, None),
            "sgs_per_use": (per_use, None), "foreach_after": (foreach, after_backward)}


def in_model(name: str, steps: int) -> dict:
    """Per-conv time of the gradient multiplication inside a training step, and of the same op in isolation."""
    from sgs_fx.cifar.models import build_model

    torch.manual_seed(0)
    plain = build_model(name, width=PROXY_WIDTH)
    hw = proxy_hw(name)
    kinds = {"kxk": lambda s, w: s, "full": lambda s, w: s.expand_as(w).contiguous()}
    models, spent = {}, {k: {} for k in kinds}
    for kind, shape_s in kinds.items():
        model = copy.deepcopy(plain)
        for conv_name, conv in model.named_modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                s = shape_s(torch.rand(3, 3) + 0.5, conv.weight)
                ns = spent[kind].setdefault(conv_name, [])

                def hook(g, s=s, ns=ns):
                    t0 = time.perf_counter_ns()
                    out = s.mul(g)
                    ns.append(time.perf_counter_ns() - t0)
                    return out

                conv.weight.register_hook(hook)
        models[kind] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4))
    x, y = torch.randn(PROXY_BATCH, 3, hw, hw), torch.randint(0, 10, (PROXY_BATCH,))
    for i in range(steps):
        for model, opt in models.values():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    skip = min(20, steps // 2)  # warm-up steps
    out = {}
    for kind in kinds:
        per_conv = {}
        for conv_name, ns in spent[kind].items():
            w = plain.get_submodule(conv_name).weight
            s, g = kinds[kind](torch.rand(3, 3), w), torch.randn_like(w)
            hot = []
            for _ in range(200):
                t0 = time.perf_counter_ns()
                s.mul(g)
                hot.append(time.perf_counter_ns() - t0)
            per_conv[conv_name] = {"in_step_us": statistics.median(ns[skip:]) / 1e3,
                                   "isolated_us": statistics.median(hot[20:]) / 1e3}
        out[kind] = {"per_conv": per_conv, "sum_in_step_us": sum(v["in_step_us"] for v in per_conv.values()),
                     "sum_isolated_us": sum(v["isolated_us"] for v in per_conv.values())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--convs", type=int, default=30)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--samples", type=int, default=1000, help="interleaved forward+backward runs of each variant")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--in-model", choices=["resnet18", "vgg11_bn"], default=None,
                   help="time the multiplication inside training steps of this proxy model instead (CPU)")
    p.add_argument("--steps", type=int, default=300, help="training steps per variant with --in-model")
    args = p.parse_args(argv)
    if args.in_model:
        if args.device != "cpu":
            p.error("--in-model times ops inside the backward pass with the host clock: CPU only")
        torch.set_num_threads(1)
        results = in_model(args.in_model, args.steps)
        emit(args, results, args.json)
        print(f"\n{args.in_model}: the gradient multiplication per step, summed over its 3x3 convs (us)")
        for kind, r in results.items():
            print(f"  S {kind:<5} inside the step {r['sum_in_step_us']:8.1f}   same op in isolation "
                  f"{r['sum_isolated_us']:8.1f}")
        return 0
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    # one thread's CPU time ignores what other processes take from it; a GPU run needs wall time, synchronised
    clock = time.perf_counter_ns if cuda else time.thread_time_ns
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    variants = make_variants(args.convs, args.channels, device)
    x = torch.randn(1, args.channels, 4, 4, device=device)

    def run(model, after):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        if after is not None:
            after()

    for model, after in variants.values():
        for _ in range(10):
            run(model, after)
    keys = list(variants)
    times: dict[str, list[int]] = {k: [] for k in keys}
    for i in range(args.samples):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            sync()
            t0 = clock()
            run(*variants[k])
            sync()
            times[k].append(clock() - t0)
    results = {}
    for k in keys:
        extra_us = [(a - b) / args.convs / 1e3 for a, b in zip(times[k], times["plain"])]
        results[k] = {"median_run_us": statistics.median(times[k]) / 1e3,
                      "extra_per_conv_us": statistics.median(extra_us), "extra_per_conv_us_ci95": median_ci(extra_us)}
    results["setting"] = {"convs": args.convs, "channels": args.channels, "device": str(device),
                          "gpu": torch.cuda.get_device_name() if cuda else None, "samples": args.samples}
    emit(args, results, args.json)
    print(f"\n{'variant':<15} {'fwd+bwd (us)':>13} {'extra / conv (us)':>18} {'95% CI':>18}")
    for k in keys:
        r = results[k]
        lo, hi = r["extra_per_conv_us_ci95"]
        print(f"{k:<15} {r['median_run_us']:>13.1f} {r['extra_per_conv_us']:>18.2f} {f'[{lo:.2f}, {hi:.2f}]':>18}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
