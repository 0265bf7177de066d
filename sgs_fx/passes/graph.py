"""SGS on conv *nodes* of an fx.GraphModule: ``torch.fx`` graphs with inlined convs, ``torch.export(...).module()``.

Each conv call (``F.conv1d/2d/3d``, ``torch.conv*d``, ``aten.conv*d``, ``aten.convolution``) whose weight
comes from a parameter (a ``get_attr``, possibly through shape-preserving nodes such as a fake-quant) gets an
``SGSGraphWeight`` node on its weight edge, in the manner of torch.ao's observer insertion::

    w = get_attr[layer1.0.conv1.weight]          w = get_attr[layer1.0.conv1.weight]
    y = aten.conv2d(x, w, None, [1, 1], [1, 1])  ->  w2 = call_module[sgs.layer1_0_conv1_weight](w, x)
                                                     y = aten.conv2d(x, w2, None, [1, 1], [1, 1])

The node returns the weight itself (the forward is bit-identical) and holds S as a non-persistent buffer, so
the state_dict keys do not change. When the weight reaches it as the Parameter, it is hooked like an SGS conv
(see ``sgs_fx/hooks.py``); through an intermediate node it is scaled per use. It also receives the conv's input,
which is what the MI scheduler observes. ``strip_graph`` removes the nodes again.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..conv import SGSConvMixin
from ..graph_weight import SGSGraphWeight
from ..hooks import attach_hook
from ..ownership import hook_target

logger = logging.getLogger("sgs_fx")

aten = torch.ops.aten
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_ATEN_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
               aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}
# single-input nodes that keep the weight's shape: a weight reached through them is still the parameter's
_SHAPE_PRESERVING_METHODS = {"contiguous", "to", "float", "double", "half", "bfloat16", "detach", "clone"}
SUBMODULE = "sgs"  # the GraphModule child holding every SGSGraphWeight


def is_conv_node(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _CONV_FUNCTIONS or node.target in _ATEN_CONVS
                                           or node.target is aten.convolution.default)


def conv_args(node: fx.Node) -> dict | None:
    """stride / padding / dilation / groups of a conv node, or None for a transposed convolution."""
    return call_geometry(node.target, node.args, node.kwargs)


def call_geometry(target, call_args: tuple, kw: dict) -> dict | None:
    """stride / padding / dilation / groups of a conv call ``target(*call_args, **kw)`` (a graph node's, or one
    seen running), or None for a transposed convolution."""
    args = list(call_args) + [None] * 9
    if target is aten.convolution.default:
        if args[6] or kw.get("transposed"):
            return None
        return {"stride": args[3], "padding": args[4], "dilation": args[5], "groups": args[8]}
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    got = {n: (args[i] if i < len(call_args) else kw.get(n)) for i, n in enumerate(names)}
    return {"stride": got["stride"] or 1, "padding": 0 if got["padding"] is None else got["padding"],
            "dilation": got["dilation"] or 1, "groups": got["groups"] or 1}


def _source_parameter(gm: fx.GraphModule, weight: fx.Node) -> tuple[str | None, str]:
    """(qualified name of the parameter behind a weight edge, or None; a description of the edge)."""
    node = weight
    for _ in range(8):
        if node.op == "get_attr":
            try:
                return (node.target if isinstance(gm.get_parameter(node.target), nn.Parameter) else None), node.target
            except AttributeError:
                return None, f"{node.target} (a buffer or constant, not a parameter)"
        inputs = [a for a in node.all_input_nodes]
        shape_kept = ((node.op == "call_module" and _is_fake_quant(gm.get_submodule(node.target)))
                      or (node.op == "call_method" and node.target in _SHAPE_PRESERVING_METHODS)
                      or (node.op == "call_function" and getattr(node.target, "__name__", "").startswith(
                          ("fake_quantize", "fused_moving_avg_obs_fake_quant", "_to_copy", "alias", "clone",
                           "detach"))))
        if not shape_kept or not inputs:
            what = getattr(node.target, "__name__", node.target) if node.op != "call_module" else node.target
            return None, f"computed by {what}({', '.join(a.name for a in inputs)})"
        node = inputs[0]
    return None, "reached through too many nodes"


_TRANSPOSED_CONVS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


def _is_transposed_conv(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _TRANSPOSED_CONVS or (
        node.target is aten.convolution.default and bool((list(node.args) + [None] * 7)[6])))


def computed_kernel_calls(graph: fx.Graph, root: nn.Module) -> list[tuple[str, list[str]]]:
    """Conv calls of ``graph`` (traced from ``root``) with no spatial taps of their own to scale — a computed kernel
    (transposed, flipped, generated) or a transposed convolution: (the call, described; the parameters involved)."""
    out = []
    for node in graph.nodes:
        if _is_transposed_conv(node):
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node):
                out.append((f"{node.name} (a transposed convolution)", _upstream_parameters(root, weight)))
            continue
        if not is_conv_node(node) or conv_args(node) is None:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if not isinstance(weight, fx.Node) or (weight.op == "call_module" and
                                               isinstance(root.get_submodule(weight.target), SGSGraphWeight)):
            continue
        name, why = _source_parameter(root, weight)
        if name is None and not why.endswith("not a parameter)"):
            out.append((f"{node.name} (kernel {why})", _upstream_parameters(root, weight)))
    return out


def _upstream_parameters(root: nn.Module, node: fx.Node, depth: int = 16) -> list[str]:
    found, frontier, seen = [], [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                try:
                    root.get_parameter(n.target)
                    found.append(n.target)
                except AttributeError:
                    pass
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return list(dict.fromkeys(found))


def _is_fake_quant(m: nn.Module) -> bool:
    return type(m).__name__.endswith(("FakeQuantize", "FakeQuantizeBase")) or hasattr(m, "fake_quant_enabled")


def instrument_graph(gm: fx.GraphModule, selected, start: int) -> list[str]:
    """Insert an SGS node on the weight edge of every selected conv node; returns the new instrumented names.

    The nodes scale per use (see ``SGSGraphWeight``); an SGS conv module of the same graph whose weight a
    node scales too is made to scale per use as well (each use then gets its own S, as for tied convs).
    """
    holder = getattr(gm, SUBMODULE, None)
    if holder is None:
        holder = nn.Module()
        gm.add_submodule(SUBMODULE, holder)
    names = []
    for node in list(gm.graph.nodes):
        if not is_conv_node(node) or _is_instrumented_edge(gm, node):
            continue
        geometry = conv_args(node)
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if geometry is None or not isinstance(weight, fx.Node):
            continue
        param_name, _ = _source_parameter(gm, weight)
        if param_name is None:  # a computed kernel: transform's warning says what happens to its parameters
            continue
        param = gm.get_parameter(param_name)
        child = param_name.replace(".", "_")
        if not hasattr(holder, child):  # one S per parameter: later calls with it share the first call's node
            mod = SGSGraphWeight(param, **geometry)
            if not selected(param_name, mod):
                continue
            holder.add_module(child, mod)
            mod._sgs_order = start + len(names)
            mod.__dict__["_sgs_per_use"] = True
            mod.attach(param)
            names.append(f"{SUBMODULE}.{child}")
        x = node.args[0] if node.args else node.kwargs["input"]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(f"{SUBMODULE}.{child}", (weight, x))
        node.replace_input_with(weight, new)
    gm.graph.lint()
    gm.recompile()
    _share_with_conv_modules(gm)
    return names


def _share_with_conv_modules(gm: fx.GraphModule) -> None:
    """A parameter that both an SGS conv module (a hook: S of all its uses) and a node scale: the conv per use."""
    node_params = {id(m.__dict__.get("_sgs_param")) for m in gm.modules()
                   if isinstance(m, SGSGraphWeight) and not m.__dict__.get("_sgs_functional")}
    shared = [n for n, m in gm.named_modules() if isinstance(m, SGSConvMixin) and not m._sgs_per_use
              and id(hook_target(m)) in node_params]
    for name in shared:
        conv = gm.get_submodule(name)
        if parametrize.is_parametrized(conv, "weight"):
            raise ValueError(f"sgs_fx.transform: the parametrized conv {name!r} shares its original weight with a "
                             "conv node of the graph; a parametrized conv cannot scale per use. Leave one of them "
                             "out with filter_fn")
        conv.__dict__["_sgs_per_use"] = True
        attach_hook(conv)
    if shared:
        logger.warning("sgs_fx.transform: conv module(s) %s share their weight with conv nodes of the graph; each "
                       "use now scales by its own S (an autograd function per call)", ", ".join(shared))


def _is_instrumented_edge(gm: fx.GraphModule, conv: fx.Node) -> bool:
    weight = conv.args[1] if len(conv.args) > 1 else conv.kwargs.get("weight")
    return (isinstance(weight, fx.Node) and weight.op == "call_module"
            and isinstance(gm.get_submodule(weight.target), SGSGraphWeight))


def strip_graph(gm: fx.GraphModule) -> None:
    """Remove every SGS node (its users read the weight directly again) and the modules holding S."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), SGSGraphWeight):
            gm.get_submodule(node.target).detach()
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            changed = True
    if changed or hasattr(gm, SUBMODULE):
        if hasattr(gm, SUBMODULE):
            delattr(gm, SUBMODULE)
        gm.graph.lint()
        gm.recompile()


def graph_conv_count(gm: fx.GraphModule) -> int:
    return sum(is_conv_node(n) for n in gm.graph.nodes)


__all__ = ["instrument_graph", "strip_graph", "is_conv_node", "conv_args", "graph_conv_count", "computed_kernel_calls",
           "call_geometry"]
