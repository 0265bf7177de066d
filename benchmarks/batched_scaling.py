"""Experiment (issue 9, not adopted): one autograd function per forward scales every conv weight's gradient.

The function takes all instrumented weights and returns a view of each, which the convs use; its backward
runs once, after the last conv's backward, and multiplies all weight gradients by S with one
``torch._foreach_mul``, warm, as the official post-backward multiply does, but inside the autograd graph
(so exact under accumulation and ``autograd.grad``). Compared interleaved with the plain model, the hook
and the official multiply on the host-bound proxy (ResNet-18 16x16, width 0.125, batch 8, 1 thread).

    python benchmarks/batched_scaling.py [--rounds 801] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sgs_fx  # noqa: E402
import overhead  # noqa: E402
from report import emit, median_ci  # noqa: E402


class _ScaleAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scales, *weights):
        ctx.scales = scales
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *torch._foreach_mul(list(grads), ctx.scales))


def batched_copy(plain: torch.nn.Module, scales: dict) -> torch.nn.Module:
    model = copy.deepcopy(plain)
    convs = [model.get_submodule(n) for n in scales]
    full = [s.to(c.weight.dtype).expand_as(c.weight).contiguous() for c, s in zip(convs, scales.values())]

    def pre(module, args):
        for conv, view in zip(convs, _ScaleAll.apply(full, *[c.weight for c in convs])):
            conv.__dict__["_view"] = view

    def post(module, args, out):
        for conv in convs:
            conv.__dict__.pop("_view", None)

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)
    for conv in convs:
        conv.forward = lambda x, c=conv: c._conv_forward(x, c.__dict__.get("_view", c.weight), c.bias)
    return model


def max_grad_error(plain: torch.nn.Module, scales: dict, hw: int) -> float:
    """Float64: the batched function's weight gradients against S * G of the plain model."""
    p64 = copy.deepcopy(plain).double()
    b64 = batched_copy(p64, {n: s.double() for n, s in scales.items()})
    x = torch.randn(4, 3, hw, hw, dtype=torch.float64)
    p64(x).square().sum().backward()
    b64(x).square().sum().backward()
    return max((p64.get_submodule(n).weight.grad * s.double() - b64.get_submodule(n).weight.grad).abs().max().item()
               for n, s in scales.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--rounds", type=int, default=801)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    setting = argparse.Namespace(device="cpu", width=overhead.PROXY_WIDTH, batch=overhead.PROXY_BATCH, hw=None,
                                 dispatch_bound=True)
    st = overhead.Setting(setting, args.model)
    variants, steps = overhead.make_variants(args.model, st, compile_=False, branches=False)
    del variants["sgs_per_use"], steps["sgs_per_use"]
    scales = sgs_fx.get_scales(variants["sgs"])
    error = max_grad_error(variants["plain"], scales, st.hw)
    batched = variants["batched"] = batched_copy(variants["plain"], scales)
    opt = torch.optim.SGD(batched.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    steps["batched"] = overhead._make_step(batched, opt, st, None)
    x, y = torch.randn(st.batch, 3, st.hw, st.hw), torch.randint(0, 10, (st.batch,))
    keys = list(variants)
    for k in keys:
        for _ in range(3):
            steps[k](x, y)
    times = {k: [] for k in keys}
    for r in range(args.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.thread_time()
            for _ in range(args.inner):
                steps[k](x, y)
            times[k].append((time.thread_time() - t0) / args.inner)
    results = {"max_grad_error_float64": error}
    for k in keys:
        ratios = [a / b for a, b in zip(times[k], times["plain"])]
        results[k] = {"median_step_s": statistics.median(times[k]), "ratio_vs_plain": statistics.median(ratios),
                      "ratio_ci95": median_ci(ratios)}
    emit(args, results, args.json)
    print(f"\nfloat64 |batched grad - S*G| max: {error:.1e}")
    for k in keys:
        r = results[k]
        print(f"{args.model} {k:<12} {r['median_step_s'] * 1e3:7.2f} ms  {r['ratio_vs_plain']:.3f} "
              f"[{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
