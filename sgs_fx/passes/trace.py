"""Find conv call sites with torch.fx, convs (and instrumented convs) kept as leaves.

Tracing can fail on data-dependent control flow (detection models, for instance). The pass then falls
back to a walk over ``named_modules()``; instrumentation is local to each conv module, so coverage of
conv *modules* stays complete. Functional ``F.conv*d`` calls are then found by one observed forward on
``example_inputs``, or, without them, bounded by the Parameters that could be their kernels (``discover.py``).
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from .discover import extra_kernels, function_name, loose_kernels, observe_conv_calls, other_conv
from .graph import computed_kernel_calls, conv_args
from .select import is_conv_module, is_deform_conv

_FUNCTIONAL_CONVS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


@dataclass
class CallSites:
    """What one trace (or the fallback) learned about a model's convs.

    Attributes:
        traced: the fx trace succeeded.
        order: qualified names of conv modules in the order of their first call.
        functional: ``F.conv*d`` calls whose weight is a parameter, as "owner.param" strings.
        functional_calls: the same calls with their geometry, in call order.
        computed: conv calls whose kernel is computed from parameters (see ``graph.computed_kernel_calls``).
        error: why tracing failed, if it did.
        observed: tracing failed and one forward on example inputs found the calls instead.
        loose: tracing failed: Parameters with a conv kernel's shape that are no conv module's own kernel and no
            observed call used (an ``F.conv*d`` call with one of them would get no S); traced: such Parameters a conv
            module registers beside its weight (the trace does not look inside it).
        unsupported: (parameter, function) of conv calls sgs_fx does not instrument (``torch.convolution``,
            ``torch.ops.aten.conv2d``, an ``F.conv*d`` of a second kernel inside a conv module's own forward).
    """

    traced: bool
    order: list[str] = field(default_factory=list)
    functional: list[str] = field(default_factory=list)
    functional_calls: list[tuple[str, dict]] = field(default_factory=list)  # (parameter, stride/padding/...)
    computed: list[tuple[str, list[str]]] = field(default_factory=list)  # conv calls with a computed kernel
    error: str | None = None
    observed: bool = False
    loose: list[str] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)


class _ConvLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Never trace into a conv: tracing through the scaling autograd function would drop it silently.
        return is_conv_module(m) or super().is_leaf_module(m, qualname)


def find_conv_call_sites(model: nn.Module, example_inputs: tuple | None = None) -> CallSites:
    """Trace ``model`` and list its conv call sites; if tracing fails, observe one forward on ``example_inputs``
    (when given) instead."""
    if isinstance(model, _ConvNd):  # the root itself is the conv: its own weight is no functional call
        return CallSites(traced=True, order=[""])
    try:
        with _attributes_kept(model):
            graph = _ConvLeafTracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        sites = CallSites(traced=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        if example_inputs is not None:
            seen = observe_conv_calls(model, example_inputs)
            sites.order, sites.functional_calls, sites.observed = seen.order, seen.calls, True
            sites.functional = list(dict.fromkeys(p for p, _ in seen.calls))
            sites.unsupported = seen.unsupported
        named = set(sites.functional) | {p for p, _ in sites.unsupported}
        sites.loose = [n for n in loose_kernels(model) if n not in named]
        return sites
    modules = dict(model.named_modules())
    sites = CallSites(traced=True)
    for node in graph.nodes:
        if node.op == "call_module" and (isinstance(modules.get(node.target), _ConvNd)
                                         or is_deform_conv(modules.get(node.target))):
            if node.target not in sites.order:
                sites.order.append(node.target)
        elif node.op == "call_function" and node.target in _FUNCTIONAL_CONVS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                sites.functional.append(weight.target)
                sites.functional_calls.append((weight.target, conv_args(node)))
        elif node.op == "call_function" and other_conv(node.target):
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                sites.unsupported.append((weight.target, function_name(node.target)))
    sites.computed = computed_kernel_calls(graph, model)
    sites.loose = extra_kernels(model)
    return sites


@contextlib.contextmanager
def _attributes_kept(model: nn.Module):
    """Undo what a traced forward assigns: a cache (``self.last = out``) or a list of deep-supervision heads
    (``self.heads[i] = head(x)``) would otherwise keep the trace's Proxies after ``transform``."""
    saved = []
    for m in model.modules():
        saved.append((m.__dict__, dict(m.__dict__)))
        saved += [(c, c.copy()) for c in _containers(m.__dict__.values(), set(), 0)]
    try:
        yield
    finally:
        for container, items in saved:
            if isinstance(container, dict):
                if container.keys() != items.keys() or any(container[k] is not v for k, v in items.items()):
                    container.clear()
                    container.update(items)
            elif isinstance(container, set):
                if {id(v) for v in container} != {id(v) for v in items}:
                    container.clear()
                    container.update(items)
            elif len(container) != len(items) or any(a is not b for a, b in zip(container, items)):
                container.clear()  # (a list or a deque)
                container.extend(items)


def _containers(values, seen: set[int], depth: int):
    """The lists, dicts, deques and sets among ``values``, and those they hold (a few levels deep)."""
    for v in values:
        if isinstance(v, (list, dict, collections.deque, set)) and id(v) not in seen and depth < 4:
            seen.add(id(v))
            yield v
            yield from _containers(v.values() if isinstance(v, dict) else v, seen, depth + 1)
