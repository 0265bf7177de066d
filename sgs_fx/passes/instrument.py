"""The SGS pass: every selected conv call site becomes an SGS conv (or, for verification, a branched block)."""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..ops import SCALE_BUFFER, is_sgs_conv, sgs_class_for
from ..optimizers import register_scaled
from .select import FilterFn, default_filter, is_plain_conv, unwrap
from .trace import find_conv_call_sites

logger = logging.getLogger("sgs_fx")

MODES = ("sgs", "branches")


def transform(
    model: nn.Module,
    *,
    mode: str = "sgs",
    scales: Mapping[str, Tensor] | None = None,
    filter_fn: FilterFn | None = None,
    example_inputs: tuple | None = None,
    inplace: bool = False,
    branches=None,
) -> nn.Module:
    """Instrument every selected conv of ``model`` for Spatial Gradient Scaling.

    Args:
        model: any ``nn.Module``; its class and methods are kept.
        mode: ``"sgs"`` (scale the weight gradient by S) or ``"branches"`` (build the equivalent linear
            multi-branch block per conv, for verification; see ``sgs_fx.passes.branches``).
        scales: optional initial S per qualified conv name (default: ones, i.e. plain training).
        filter_fn: ``(qualified_name, module) -> bool`` replacing the default selection (all spatial
            kernel dims > 1).
        example_inputs: a tuple of inputs; used only when fx tracing fails, to find the call order.
        inplace: modify ``model`` itself; otherwise a deep copy is transformed and returned.
        branches: ``mode="branches"`` only: a recipe name ("acb", "repvgg", "skeleton") or a list of
            ``(kernel_shape, alpha)`` pairs; default: masked branches reproducing ``scales``.

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
    if not inplace:
        model = copy.deepcopy(model)

    selected = filter_fn or default_filter
    modules = dict(model.named_modules())
    already = [n for n, m in modules.items() if _is_instrumented(m)]
    other_mode = [n for n in already if _mode_of(modules[n]) != mode]
    if other_mode:
        raise ValueError(
            f"sgs_fx.transform(mode={mode!r}): {other_mode[0]!r} is already instrumented in mode "
            f"{_mode_of(modules[other_mode[0]])!r}; call sgs_fx.strip(model) first"
        )
    candidates = [n for n, m in modules.items() if is_plain_conv(m) and not _is_instrumented(m) and selected(n, m)]
    if not candidates and not already:
        n_convs = sum(is_plain_conv(m) for m in modules.values())
        what = "has no conv layers" if n_convs == 0 else f"has {n_convs} convs but none is selected by the filter"
        raise ValueError(
            f"sgs_fx.transform: {type(model).__name__} {what}; SGS applies to Conv1d/2d/3d weights "
            "(default: all spatial kernel dims > 1; pass filter_fn to select others)"
        )

    sites = find_conv_call_sites(model, example_inputs)
    if not sites.traced:
        logger.warning(
            "sgs_fx.transform: torch.fx could not trace %s (%s); instrumenting conv modules found by "
            "walking named_modules() instead%s; functional F.conv calls are not instrumented",
            type(model).__name__, sites.error,
            " (call order from example_inputs)" if sites.order else "",
        )
    if sites.functional:
        logger.warning(
            "sgs_fx.transform: %d functional conv call(s) with parameter weights are not instrumented: %s",
            len(sites.functional), ", ".join(sites.functional[:5]),
        )

    rank = {name: i for i, name in enumerate(sites.order)}
    candidates.sort(key=lambda n: rank.get(n, len(rank)))
    start = len(already)
    if mode == "sgs":
        for i, name in enumerate(candidates):
            _instrument_sgs(modules[name], order=start + i)
    else:
        from .branches import instrument_branches

        instrument_branches(model, candidates, start=start, scales=scales, branches=branches)

    not_reached = [n for n in candidates if n not in rank] if sites.order else []
    logger.info(
        "sgs_fx.transform: %d conv(s) instrumented in mode %r (%s)%s%s",
        len(candidates), mode,
        "by fx trace" if sites.traced else "by module walk, trace failed",
        f", {len(already)} already instrumented" if already else "",
        f"; not reached by the {'trace' if sites.traced else 'example run'}: {', '.join(not_reached)}"
        if not_reached else "",
    )
    if scales is not None and mode == "sgs":
        set_scales(model, scales)
    return model


def _is_instrumented(m: nn.Module) -> bool:
    return is_sgs_conv(m) or getattr(m, "_sgs_leaf", False)


def _mode_of(m: nn.Module) -> str:
    return "sgs" if is_sgs_conv(m) else "branches"


def _instrument_sgs(conv: nn.Module, order: int) -> None:
    kernel = tuple(conv.kernel_size)
    w = conv.weight
    conv.__class__ = sgs_class_for(type(conv))
    conv.register_buffer(SCALE_BUFFER, torch.ones(kernel, dtype=w.dtype, device=w.device), persistent=False)
    conv._sgs_order = order
    register_scaled(w)


def instrumented(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> instrumented conv (SGS or branched), in forward order."""
    found = [(n, m) for n, m in unwrap(model).named_modules() if _is_instrumented(m)]
    found.sort(key=lambda nm: nm[1]._sgs_order)
    return dict(found)


def get_scales(model: nn.Module) -> dict[str, Tensor]:
    """Qualified name -> S (a copy, mean 1) for every instrumented conv (a branched block's equivalent S)."""
    return {name: (m.sgs_scale if is_sgs_conv(m) else m.scale).detach().clone()
            for name, m in instrumented(model).items()}


def validate_scale(name: str, value, kernel: tuple[int, ...]) -> Tensor:
    """S as float64, checked (shape, finite, > 0) and renormalised to mean 1; ValueError names the layer."""
    s = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
    if tuple(s.shape) != tuple(kernel):
        raise ValueError(f"scale for {name!r} has shape {tuple(s.shape)}, expected the kernel's spatial shape {tuple(kernel)}")
    if not torch.isfinite(s).all():
        raise ValueError(f"scale for {name!r} has non-finite entries: {s.tolist()}")
    if not (s > 0).all():
        raise ValueError(f"scale for {name!r} must be strictly positive (got min {s.min().item():g}); S only redistributes the step among taps")
    return s / s.mean()


def set_scales(model: nn.Module, mapping: Mapping[str, Tensor]) -> None:
    """Write S for the named convs (others keep theirs); each S is validated and renormalised to mean 1."""
    convs = instrumented(model)
    unknown = [n for n in mapping if n not in convs]
    if unknown:
        known = ", ".join(list(convs)[:6]) + (", ..." if len(convs) > 6 else "")
        raise ValueError(f"set_scales: no instrumented conv named {unknown[0]!r} (known: {known or 'none'})")
    branched = [n for n in mapping if not is_sgs_conv(convs[n])]
    if branched:
        raise ValueError(
            f"set_scales: {branched[0]!r} is a branched block, whose S is fixed by its branches; "
            "rebuild it with transform(..., mode='branches', scales=...)"
        )
    checked = {n: validate_scale(n, s, tuple(convs[n].kernel_size)) for n, s in mapping.items()}
    with torch.no_grad():  # every S is checked before any is written
        for name, s in checked.items():
            convs[name].sgs_scale.copy_(s)
