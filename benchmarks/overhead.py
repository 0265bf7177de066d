"""Train-step cost of SGS, of the official post-backward multiply and of real branch blocks, vs the plain model.

Variants (each its own copy of the same initial model, SGD momentum):
  plain              the untransformed model
  plain_again        a second copy of it, timed like the others: its ratio is the run's noise floor
  sgs                sgs_fx.transform + random S (scaling="step", the default: S applied to .grad when the
                     optimizer steps, by sgs_fx's global step pre-hook)
  sgs_hook           transform(scaling="hook"): a gradient hook on each weight applies S in the backward pass
  sgs_per_use        the same, forced to scale per use (the autograd function tied weights get; every weight's, originally)
  official           the plain model, then ``torch._foreach_mul_`` of every conv weight's .grad by S after
                     backward (what the official implementation does)
  multiply_floor     the plain model, then the multiply "sgs" makes at the step on a CPU (one ``_foreach_mul_``
                     of the gradients by S, broadcast) with none of its bookkeeping: sgs / multiply_floor is what
                     sgs_fx's Python adds, multiply_floor / plain the arithmetic any exact scaling costs
  flag_hook_c        the plain model with a post-accumulate-grad hook on each SGS conv's weight that is a C
                     method (a set's ``add``): the cost of knowing, from torch's own event, that a gradient arrived
  flag_hook_py       the same with a Python function as the hook (sets a flag, reads the weight's version)
  flag_prehook_py    the same Python function as a tensor hook (``register_hook``: it runs for every gradient
                     autograd computes for the weight, ``torch.autograd.grad``'s too, before accumulation)
  branches_acb       real 3x3 + 1x3 + 3x1 branch blocks (mode="branches", recipe "acb")
  *_compiled         torch.compile'd plain / sgs / sgs_hook (with --compile)

In one process every optimizer, plain ones included, passes through sgs_fx's global step pre-hook once sgs_fx
has instrumented a model; for an optimizer without SGS weights it returns after a cached lookup, and that cost is
in "plain" too.

Regimes:
  default            compute-bound CPU: full width, batch 64, 32x32, the machine's threads
  --dispatch-bound   host-bound CPU, the regime of a GPU step at CIFAR sizes: width 0.125, batch 8, one thread,
                     ResNet-18 at 16x16 and VGG-11-BN at 32x32
  --device cuda      full width, batch 128, bf16 autocast, channels_last, fused SGD, CUDA-synchronised timing

Steps are interleaved (``inner`` steps of every variant per round, in a rotating order) and the figure of
merit is the median over rounds of the per-round ratio variant / plain, so drift of a shared machine
cancels; its 95 % bootstrap interval says which differences are real. Memory (CPU): bytes of tensors saved
for backward plus parameter bytes.

    python benchmarks/overhead.py [--quick] [--compile] [--dispatch-bound] [--device cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sgs_fx  # noqa: E402
from sgs_fx.cifar.models import build_model  # noqa: E402
from report import emit, median_ci  # noqa: E402


PROXY_WIDTH, PROXY_BATCH = 0.125, 8  # the host-bound proxy of issue 9 (with one thread and proxy_hw)


def proxy_hw(model: str) -> int:
    """Input size of the host-bound proxy as issue 9 defines it: ResNet-18 at 16x16, VGG-11-BN at 32x32."""
    return 16 if model == "resnet18" else 32


class Setting:
    """Everything a regime fixes: sizes, device, precision, how a step is timed."""

    def __init__(self, args, model: str):
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.width, self.batch = args.width, args.batch
        self.hw = args.hw if args.hw else (proxy_hw(model) if args.dispatch_bound else 32)
        self.channels_last = self.cuda
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        # One CPU thread: the thread's CPU time ignores the time other processes on a shared machine take
        # from it, which is most of the noise; with a GPU or several threads only wall time means anything.
        self.clock = time.thread_time if (args.dispatch_bound and not self.cuda) else time.perf_counter

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def _random_scales(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(tuple(m.kernel_size), generator=g) + 0.5 for n, m in sgs_fx.instrumented(model).items()}


def per_use_copy(sgs: torch.nn.Module) -> torch.nn.Module:
    """A copy of an SGS model forced to scale per use (the autograd function tied weights get; every weight's, originally)."""
    per_use = copy.deepcopy(sgs)
    for conv in sgs_fx.instrumented(per_use).values():
        conv.__dict__["_sgs_per_use"] = True
        sgs_fx.hooks.attach_hook(conv)
    return per_use


def make_variants(name: str, st: Setting, compile_: bool, branches: bool) -> dict:
    torch.manual_seed(0)
    plain = build_model(name, width=st.width)
    sgs = sgs_fx.transform(plain)
    scales = _random_scales(sgs)
    sgs_fx.set_scales(sgs, scales)
    hook = sgs_fx.transform(plain, scaling="hook", scales=scales)
    variants = {"plain": plain, "plain_again": copy.deepcopy(plain), "sgs": sgs, "sgs_hook": hook,
                "sgs_per_use": per_use_copy(hook), "official": copy.deepcopy(plain),
                "multiply_floor": copy.deepcopy(plain), "flag_hook_c": copy.deepcopy(plain),
                "flag_hook_py": copy.deepcopy(plain), "flag_prehook_py": copy.deepcopy(plain)}
    if branches:
        variants["branches_acb"] = sgs_fx.transform(plain, mode="branches", branches="acb")
    if compile_:
        variants["plain_compiled"] = copy.deepcopy(plain)
        variants["sgs_compiled"] = copy.deepcopy(sgs)
        variants["sgs_hook_compiled"] = copy.deepcopy(hook)
    for k, m in variants.items():
        m.to(st.device)
        if st.channels_last:
            m.to(memory_format=torch.channels_last)
    # the official approach: .grad of each selected conv weight times S (expanded views), after backward
    official = variants["official"]
    pairs = [(official.get_submodule(n).weight, s.to(st.device)) for n, s in sgs_fx.get_scales(sgs).items()]
    official._sgs_official = pairs
    floor = variants["multiply_floor"]
    floor._sgs_floor = [(floor.get_submodule(n).weight, s.to(st.device)) for n, s in sgs_fx.get_scales(sgs).items()]
    for k in ("flag_hook_c", "flag_hook_py", "flag_prehook_py"):
        _add_flag_hooks(variants[k], list(sgs_fx.get_scales(sgs)), python=k.endswith("py"), pre=k == "flag_prehook_py")
    steps = {}
    for k, m in variants.items():
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=st.cuda or None)
        fwd = torch.compile(m) if k.endswith("_compiled") else m
        steps[k] = _make_step(fwd, opt, st, getattr(m, "_sgs_official", None), getattr(m, "_sgs_floor", None))
    return variants, steps


class _Flag:
    """What a flag-only hook does: note that a gradient arrived, and whether the weight changed since the last one
    while that one was pending (the lost-S check). Nothing clears the flag here, so the check's branch runs."""
    __slots__ = ("pending", "version", "changed")

    def __init__(self):
        self.pending, self.version, self.changed = False, 0, 0

    def __call__(self, p):
        if self.pending and p._version != self.version:
            self.changed += 1
        self.pending, self.version = True, p._version


def _add_flag_hooks(model, names, python: bool, pre: bool = False) -> None:
    for n in names:
        w = model.get_submodule(n).weight
        if pre:
            w.register_hook(_PreFlag(w))
        else:
            w.register_post_accumulate_grad_hook(_Flag() if python else set().add)


class _PreFlag(_Flag):
    """``_Flag`` as a tensor hook: called with the incoming gradient, it reads the weight's version itself."""
    __slots__ = ("weight",)

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def __call__(self, grad):
        super().__call__(self.weight)


def _make_step(fwd, opt, st: Setting, official_pairs=None, floor_pairs=None):
    floor_weights = [w for w, _ in floor_pairs] if floor_pairs else None
    floor_scales = [s for _, s in floor_pairs] if floor_pairs else None

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with st.autocast:
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        if official_pairs is not None:
            grads = [w.grad for w, _ in official_pairs]
            torch._foreach_mul_(grads, [s.expand_as(g) for (_, s), g in zip(official_pairs, grads)])
        if floor_weights is not None:
            torch._foreach_mul_([w.grad for w in floor_weights], floor_scales)
        opt.step()
    return step


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


def bench(name: str, args) -> dict:
    st = Setting(args, name)
    variants, steps = make_variants(name, st, args.compile, branches=not args.dispatch_bound)
    if args.variants:  # torch.compile compiles on the first call: a variant left out costs nothing
        unknown = set(args.variants) - set(variants)
        if unknown:
            raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {sorted(variants)}")
        keep = {"plain", "plain_compiled"} | set(args.variants)
        variants = {k: v for k, v in variants.items() if k in keep}
        steps = {k: v for k, v in steps.items() if k in keep}
    x = torch.randn(st.batch, 3, st.hw, st.hw, device=st.device)
    if st.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (st.batch,), device=st.device)
    for k in variants:
        for _ in range(args.warmup):
            steps[k](x, y)
    st.sync()
    times = {k: [] for k in variants}
    keys = list(variants)
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            st.sync()
            t0 = st.clock()
            for _ in range(args.inner):
                steps[k](x, y)
            st.sync()
            times[k].append((st.clock() - t0) / args.inner)
    out = {}
    for k in keys:
        base = "plain_compiled" if k.endswith("_compiled") else "plain"
        ratios = [a / b for a, b in zip(times[k], times[base])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else None
        out[k] = {"median_step_s": statistics.median(times[k]), "ratio_vs_plain": statistics.median(ratios),
                  "ratio_iqr": [q[0], q[2]] if q else None, "ratio_ci95": median_ci(ratios),
                  "params_bytes": sum(p.numel() * p.element_size() for p in variants[k].parameters())}
        if not st.cuda and not k.endswith("_compiled"):
            out[k]["saved_for_backward_bytes"] = saved_bytes(variants[k], x, y)
    for k in keys:
        if "saved_for_backward_bytes" in out[k]:
            out[k]["saved_ratio_vs_plain"] = out[k]["saved_for_backward_bytes"] / out["plain"]["saved_for_backward_bytes"]
    out["setting"] = {"device": str(st.device), "width": st.width, "batch": st.batch, "hw": st.hw,
                      "threads": torch.get_num_threads(), "autocast_bf16": st.cuda, "channels_last": st.channels_last,
                      "gpu": torch.cuda.get_device_name() if st.cuda else None}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "vgg11_bn"])
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--hw", type=int, default=None, help="input size (default 32; 16 for ResNet-18 when dispatch-bound)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--inner", type=int, default=None, help="steps of one variant per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also plain vs SGS under torch.compile (inductor)")
    p.add_argument("--dispatch-bound", action="store_true",
                   help="host-bound CPU regime: width 0.125, batch 8, 1 thread (a proxy of a GPU step)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--variants", nargs="+", help="time only these variants (and plain / plain_compiled)")
    p.add_argument("--quick", action="store_true", help="fewer rounds and a narrow model (a minute)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.dispatch_bound:
        torch.set_num_threads(1)
    defaults = ((PROXY_WIDTH, PROXY_BATCH, 201, 3) if args.dispatch_bound else (1.0, 128, 21, 10) if cuda else (1.0, 64, 15, 1))
    for attr, value in zip(("width", "batch", "rounds", "inner"), defaults):
        if getattr(args, attr) is None:
            setattr(args, attr, value)
    if args.quick:
        args.rounds = min(args.rounds, 9)
        if not args.dispatch_bound and not cuda:
            args.width = 0.25
    results = {m: bench(m, args) for m in args.models}
    emit(args, results, args.json)
    print(f"\n{'model':<10} {'variant':<15} {'step (ms)':>10} {'time/plain':>11} {'95% CI':>15} {'IQR':>15} {'saved-for-bw/plain':>19}")
    for m, res in results.items():
        for k, r in res.items():
            if k == "setting":
                continue
            saved = f"{r['saved_ratio_vs_plain']:.2f}" if "saved_ratio_vs_plain" in r else "-"
            iqr, ci = (f"[{r[f][0]:.3f}, {r[f][1]:.3f}]" if r[f] else "-" for f in ("ratio_iqr", "ratio_ci95"))
            print(f"{m:<10} {k:<15} {r['median_step_s'] * 1e3:>10.2f} {r['ratio_vs_plain']:>11.3f} {ci:>15} {iqr:>15} "
                  f"{saved:>19}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
