"""The SGS pass: every selected conv call site becomes an SGS conv (or, for verification, a branched block)."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor, fx, nn

from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from ..backward import scale_dtype
from ..conv import sgs_class_for
from ..hooks import attach_hook
from ..ownership import SCALE_BUFFER, hook_target, is_pruned, is_sgs_conv, target_of
from ..optimizers import remember_copies
from .branches import instrument_branches
from .registry import instrumented, is_instrumented, mode_of, set_scales
from .copying import copy_model
from .select import FilterFn, default_filter, is_deform_conv, is_plain_conv, unwrap
from .functional import PREFIX, instrument_functional
from .graph import computed_kernel_calls, graph_conv_count, instrument_graph
from .trace import CallSites, find_conv_call_sites

__all__ = ["transform"]

logger = logging.getLogger("sgs_fx")

MODES = ("sgs", "branches")
SCALINGS = ("step", "hook")


def transform(
    model: nn.Module,
    *,
    mode: str = "sgs",
    scales: Mapping[str, Tensor] | None = None,
    filter_fn: FilterFn | None = None,
    example_inputs: tuple | None = None,
    inplace: bool = False,
    branches=None,
    scaling: str = "step",
) -> nn.Module:
    """Instrument every selected conv of ``model`` for Spatial Gradient Scaling.

    Args:
        model: any ``nn.Module``; its class and methods are kept.
        mode: ``"sgs"`` (scale the weight gradient by S) or ``"branches"`` (build the equivalent linear
            multi-branch block per conv, for verification; see ``sgs_fx.passes.branches``).
        scales: optional initial S per qualified conv name (default: ones, i.e. plain training).
        filter_fn: ``(qualified_name, module) -> bool`` replacing the default selection (all spatial
            kernel dims > 1).
        example_inputs: the model's inputs (a tuple: positional arguments; a dict: keyword arguments), used only
            when fx tracing fails: one forward on them (eval mode, no_grad, the model's buffers and the RNG left
            as they were) finds the ``F.conv*d`` calls with a Parameter as their kernel, and the call order.
        inplace: modify ``model`` itself; otherwise a deep copy is transformed and returned.
        branches: ``mode="branches"`` only: a recipe name ("acb", "repvgg", "skeleton") or a list of
            ``(kernel_shape, alpha)`` pairs; default: masked branches reproducing ``scales``.
        scaling: when S is applied. ``"step"`` (default): any torch.optim optimizer's ``step()`` multiplies the
            weight's ``.grad`` by S (the official code's order and about its cost, eager or compiled);
            gradients read before the step (clipping, ``torch.autograd.grad``) are the unscaled G
            (``sgs_fx.scale_gradients`` applies S earlier). ``"hook"``: a gradient hook on the Parameter
            applies S in the backward pass, so every gradient anyone reads is S ⊙ G (0.3-0.5 points dearer
            than ``"step"`` on a host-bound step; BENCHMARKS.md). The same update either way. Tied weights and F.conv calls of ordinary modules
            are scaled in the backward pass in both.

    Returns:
        The transformed model (``model`` itself when ``inplace=True``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sgs_fx.transform expects an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"sgs_fx.transform: unknown mode {mode!r}; use one of {MODES}")
    if unwrap(model) is not model:
        raise TypeError(
            f"sgs_fx.transform got a wrapped model ({type(model).__name__}); transform the plain model first, "
            "then wrap it in DDP / torch.compile"
        )
    if mode == "sgs" and branches is not None:
        raise ValueError("sgs_fx.transform: `branches` only applies to mode='branches'")
    if scaling not in SCALINGS:
        raise ValueError(f"sgs_fx.transform: unknown scaling {scaling!r}; use 'step' (the default: S applied by "
                         "the optimizer's step) or 'hook' (S applied in the backward pass)")
    _refuse_unsupported(model, mode, filter_fn or default_filter)
    source = None
    if not inplace:
        source, model = model, copy_model(model, "sgs_fx.transform")

    selected = filter_fn or default_filter
    modules = dict(model.named_modules())
    already = [n for n, m in modules.items() if is_instrumented(m)]
    other_mode = [n for n in already if mode_of(modules[n]) != mode]
    if mode == "sgs":
        other_scaling = [n for n in already if mode_of(modules[n]) == "sgs" and
                         bool(modules[n].__dict__.get("_sgs_step")) != (scaling == "step")
                         and not modules[n].__dict__.get("_sgs_per_use")]
        if other_scaling:
            raise ValueError(
                f"sgs_fx.transform(scaling={scaling!r}): {other_scaling[0]!r} is already instrumented with scaling="
                f"{'step' if modules[other_scaling[0]].__dict__.get('_sgs_step') else 'hook'!r}; call "
                "sgs_fx.strip(model) first to change it (S is kept by get_scales / set_scales)")
    if other_mode:
        raise ValueError(
            f"sgs_fx.transform(mode={mode!r}): {other_mode[0]!r} is already instrumented in mode "
            f"{mode_of(modules[other_mode[0]])!r}; call sgs_fx.strip(model) first"
        )
    candidates = [n for n, m in modules.items() if is_plain_conv(m) and not is_instrumented(m) and selected(n, m)]
    conv_nodes = graph_conv_count(model) if isinstance(model, fx.GraphModule) else 0
    if conv_nodes and mode == "branches":
        raise ValueError(
            f"sgs_fx.transform(mode='branches'): this GraphModule calls {conv_nodes} conv(s) as graph nodes; branch "
            "blocks replace conv modules only. Use mode='sgs' (the default) on graphs")
    sites = _graph_sites(model) if isinstance(model, fx.GraphModule) else find_conv_call_sites(model, example_inputs)
    if not sites.traced:
        _report_untraced(model, sites)
    elif sites.loose:
        logger.warning(
            "sgs_fx.transform: conv module(s) of %s hold kernel-shaped Parameters beside their weight (%s): a conv "
            "their own forward makes with one gets no S (sgs_fx scales each conv module's own weight)",
            type(model).__name__, ", ".join(sites.loose[:8]))
    if sites.unsupported:
        logger.warning(
            "sgs_fx.transform: %s makes conv calls sgs_fx does not instrument, so S does not reach their kernels: %s. "
            "It instruments conv modules (their own kernel) and F.conv1d/2d/3d calls of other modules; call "
            "F.conv*d there (or make the kernel a conv module's weight)", type(model).__name__,
            ", ".join(f"{p} in {f}" for p, f in sites.unsupported[:8]))

    calls = [c for c in sites.functional_calls if mode == "sgs"]
    if not candidates and not already and not conv_nodes and not calls:
        n_convs = sum(is_plain_conv(m) for m in modules.values())
        n_transposed = sum(isinstance(m, _ConvNd) and m.transposed for m in modules.values())
        if n_convs:
            what = f"has {n_convs} convs but none is selected by the filter"
        elif n_transposed:
            what = (f"has only transposed convs ({n_transposed}), which SGS does not instrument: the method pairs "
                    "each kernel tap with a displacement of the conv's input, and a transposed conv has no such pairing")
        else:
            what = "has no conv layers"
        raise ValueError(
            f"sgs_fx.transform: {type(model).__name__} {what}; SGS applies to Conv1d/2d/3d weights "
            "(default: all spatial kernel dims > 1; pass filter_fn to select others)"
        )

    rank = {name: i for i, name in enumerate(sites.order)}
    candidates.sort(key=lambda n: rank.get(n, len(rank)))
    walked = list(candidates)  # conv modules: the ones the trace or the example run could have reached
    start = len(already)
    if mode == "sgs":
        tied = _tied_weights(modules, candidates)
        for i, name in enumerate(candidates):
            _instrument_sgs(modules[name], order=start + i, per_use=name in tied, at_step=scaling == "step")
        if sites.functional_calls:
            candidates += instrument_functional(model, sites.functional_calls, selected, start=start + len(candidates),
                                                at_step=scaling == "step")
            if not candidates and not already and not conv_nodes:
                raise ValueError(
                    f"sgs_fx.transform: {type(model).__name__} makes {len(sites.functional_calls)} F.conv call(s) "
                    f"({', '.join(dict.fromkeys(p for p, _ in sites.functional_calls))}) but none is selected by the "
                    "filter (default: all spatial kernel dims > 1; pass filter_fn to select others)")
        if conv_nodes:
            nodes = instrument_graph(model, selected, start=start + len(candidates))
            if not candidates and not nodes and not already:
                raise ValueError(f"sgs_fx.transform: the GraphModule has {conv_nodes} conv node(s) but none with a "
                                 "parameter weight is selected by the filter (see the warning above)")
            _order_by_graph(model)
            candidates += nodes
    else:
        instrument_branches(model, candidates, start=start, scales=scales, branches=branches)
        if sites.functional:
            logger.warning("sgs_fx.transform(mode='branches'): %d functional conv call(s) are left plain (branch "
                           "blocks replace conv modules): %s", len(sites.functional), ", ".join(sites.functional[:5]))

    if mode == "sgs":
        computed = computed_kernel_calls(model.graph, model) if isinstance(model, fx.GraphModule) else sites.computed
        _warn_computed_kernels(model, computed + _other_modules_using_scaled_weights(model))
    not_reached = [n for n in walked if n not in rank] if sites.order else []
    logger.info(
        "sgs_fx.transform: %d conv(s) instrumented in mode %r (%s)%s%s",
        len(candidates), mode,
        "by fx trace" if sites.traced else
        f"by module walk{' and an example forward' if sites.observed else ''}, trace failed",
        f", {len(already)} already instrumented" if already else "",
        f"; not reached by the {'trace' if sites.traced else 'example run'}: {', '.join(not_reached)}"
        if not_reached else "",
    )
    if scales is not None and mode == "sgs":
        set_scales(model, scales)
    if source is not None and mode == "sgs":
        # an optimizer built on `source` before transform trains nothing: warned at its step
        remember_copies(source, model, [target_of(m) for m in instrumented(model).values() if is_sgs_conv(m)])
    return model


def _report_untraced(model: nn.Module, sites: CallSites) -> None:
    """How convs were found without a trace: a warning only if an F.conv*d call may be missed, naming the
    Parameters it could use and the fix; otherwise one info line."""
    why = f"torch.fx could not trace {type(model).__name__} ({sites.error})"
    loose = ", ".join(sites.loose[:8]) + (f", ... ({len(sites.loose)} in all)" if len(sites.loose) > 8 else "")
    if sites.observed:
        logger.info("sgs_fx.transform: %s; conv modules found by walking named_modules(), F.conv*d calls by the "
                    "example forward: %s%s", why, ", ".join(sites.functional) or "none",
                    f"; it passed no conv these Parameters with a kernel's shape: {loose}" if loose else "")
    elif sites.loose:
        logger.warning(
            "sgs_fx.transform: %s, so its F.conv*d calls can only be found by running it. Every conv module is "
            "instrumented, but %d Parameter(s) with a conv kernel's shape are no conv module's own kernel (%s): an "
            "F.conv*d call with one of them would get no S. Pass example_inputs=(<a batch>,) to transform to find "
            "those calls with one forward (eval mode, no_grad; buffers, modes and the RNG restored afterwards)",
            why, len(sites.loose), loose)
    else:
        logger.info("sgs_fx.transform: %s; conv modules found by walking named_modules(); every Parameter with a "
                    "conv kernel's shape belongs to one, so no F.conv*d call can be missed", why)


def _other_modules_using_scaled_weights(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Modules that are not SGS convs holding a weight an SGS conv scales (a tied ConvTranspose, a Linear)."""
    convs = {id(target_of(m)) for m in instrumented(model).values() if is_sgs_conv(m)}
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)  # the first name: the SGS conv's, in registration order
    out = []
    for mname, mod in model.named_modules():
        if is_sgs_conv(mod) or isinstance(mod, parametrize.ParametrizationList):  # (a parametrized conv's original)
            continue
        for pname, p in mod._parameters.items():
            if p is not None and id(p) in convs and PREFIX + pname not in mod._modules:  # (an F.conv call's own)
                out.append((f"{mname or type(model).__name__}.{pname} ({type(mod).__name__}, a module that is not an "
                            "SGS conv)", [names.get(id(p), f"{mname}.{pname}")]))
    return out


def _warn_computed_kernels(model: nn.Module, computed: list[tuple[str, list[str]]]) -> None:
    """One warning that says, for every conv call with a computed kernel, what S does to its gradient: one S per
    Parameter, so a Parameter that an SGS conv scales as a whole gets that S on this use's gradient too."""
    if not computed:
        return
    whole = {}
    for name, m in instrumented(model).items():
        if is_sgs_conv(m) and not m.__dict__.get("_sgs_per_use", False):
            whole[id(target_of(m))] = name
    per_use = {id(target_of(m)): name for name, m in instrumented(model).items()
               if is_sgs_conv(m) and m.__dict__.get("_sgs_per_use", False)}
    lines = []
    for call, params in computed:
        parts = []
        for p in params or ["(no parameter)"]:
            param = model.get_parameter(p) if params else None
            if param is not None and id(param) in whole:
                parts.append(f"{p} is scaled as a whole by the S of {whole[id(param)]}, so this use's gradient is too")
            elif param is not None and id(param) in per_use:
                parts.append(f"{p}: {per_use[id(param)]} scales only its own use; this use's gradient is not scaled")
            else:
                parts.append(f"{p} is not instrumented: no S on this use")
        lines.append(f"{call}: {'; '.join(parts)}")
    logger.warning("sgs_fx.transform: %d conv use(s) with no spatial taps of their own to scale (a computed kernel, a "
                   "transposed convolution, or a module sharing an SGS conv's weight): %s", len(lines),
                   " | ".join(lines[:5]))


def _graph_sites(gm: fx.GraphModule) -> CallSites:
    """A GraphModule is its own trace: conv modules in the order of their call_module nodes."""
    modules = dict(gm.named_modules())
    order = [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), _ConvNd)]
    return CallSites(traced=True, order=list(dict.fromkeys(order)))


def _order_by_graph(gm: fx.GraphModule) -> None:
    """Number every instrumented module (conv or SGS node) by its first call in the graph: forward order."""
    modules = dict(gm.named_modules())
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and is_instrumented(modules.get(n.target))]
    for i, name in enumerate(dict.fromkeys(calls)):
        modules[name]._sgs_order = i


def _refuse_unsupported(model: nn.Module, mode: str, selected: FilterFn) -> None:
    """Convs the pass cannot instrument correctly: a clear error before anything is copied or changed."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for name, m in model.named_modules():
        if not (is_plain_conv(m) and not is_instrumented(m) and selected(name, m)):
            continue
        for legacy, new, what in ((WeightNorm, "weight_norm", "the direction v"),
                                  (SpectralNorm, "spectral_norm", "its original weight")):
            if any(isinstance(h, legacy) for h in m._forward_pre_hooks.values()):
                raise ValueError(
                    f"sgs_fx.transform: conv {name!r} uses the deprecated torch.nn.utils.{new}, whose weight is "
                    f"recomputed by a forward pre-hook and cannot be copied or scaled; use "
                    f"torch.nn.utils.parametrizations.{new} (SGS then scales {what}), or leave the conv out with "
                    "filter_fn")
        if mode == "branches" and is_deform_conv(m):
            raise ValueError(
                f"sgs_fx.transform(mode='branches'): {name!r} is a DeformConv2d, whose sampling positions move with "
                "its offsets, so it has no fixed sub-window branches; use mode='sgs' or leave it out with filter_fn")
        if mode == "branches" and is_pruned(m):
            raise ValueError(
                f"sgs_fx.transform(mode='branches'): conv {name!r} is pruned (torch.nn.utils.prune), and its mask "
                "would not carry over to separate branch kernels; use mode='sgs' (it scales weight_orig) or "
                "prune.remove the mask first")
        if _parametrized(m):
            if mode == "branches":
                raise ValueError(
                    f"sgs_fx.transform(mode='branches'): conv {name!r} has a parametrized weight "
                    f"({type(m.parametrizations.weight[0]).__name__}), which cannot be split into linear branches; "
                    "remove the parametrization or leave the conv out with filter_fn")
            if hook_target(m) is None:
                raise ValueError(
                    f"sgs_fx.transform: conv {name!r} has a parametrized weight with no original tensor of the "
                    "kernel's full shape, so there is no trained kernel to scale; leave it out with filter_fn")


def _parametrized(conv: nn.Module) -> bool:
    return parametrize.is_parametrized(conv, "weight")


def _tied_weights(modules: dict[str, nn.Module], candidates: list[str]) -> set[str]:
    """Selected convs whose weight Parameter another selected conv uses too: they scale per use."""
    by_weight: dict[int, list[str]] = {}
    for name in candidates:
        by_weight.setdefault(id(hook_target(modules[name])), []).append(name)
    tied = {n for names in by_weight.values() if len(names) > 1 for n in names}
    parametrized = sorted(n for n in tied if _parametrized(modules[n]))
    if parametrized:
        raise ValueError(
            f"sgs_fx.transform: convs {', '.join(parametrized)} share one parametrized weight; SGS scales a "
            "parametrized weight with a hook on its original tensor, which cannot give each conv's use its own S. "
            "Leave all but one of them out with filter_fn")
    if tied:
        logger.warning(
            "sgs_fx.transform: convs %s share a weight Parameter; each scales its own use (the weight's "
            "gradient is S1*G1 + S2*G2), at the cost of an autograd function per call", ", ".join(sorted(tied)))
    return tied


def _instrument_sgs(conv: nn.Module, order: int, per_use: bool, at_step: bool) -> None:
    kernel = tuple(conv.kernel_size)
    w = hook_target(conv)
    cls = sgs_class_for(type(conv))
    if isinstance(conv, LazyModuleMixin):
        # On its first forward a lazy conv turns itself into `cls_to_become`: make that the SGS class.
        conv.__dict__["cls_to_become"] = sgs_class_for(conv.cls_to_become)
    conv.__class__ = cls
    conv.register_buffer(SCALE_BUFFER, torch.ones(kernel, dtype=scale_dtype(w.dtype), device=w.device),
                         persistent=False)
    conv.__dict__["_sgs_master"] = torch.ones(kernel, dtype=torch.float64)
    conv._sgs_order = order
    if per_use:
        conv.__dict__["_sgs_per_use"] = True
    if at_step:
        conv.__dict__["_sgs_step"] = True
    if not isinstance(conv, LazyModuleMixin) or not conv.has_uninitialized_params():
        attach_hook(conv)
