"""Which modules are instrumented, and reading / writing their S (the public get_scales / set_scales)."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..hooks import attach_hook
from ..ownership import SCALE_BUFFER, is_sgs_conv, target_of
from .select import unwrap

logger = logging.getLogger("sgs_fx")


def is_instrumented(m: nn.Module | None) -> bool:
    return m is not None and (is_sgs_conv(m) or getattr(m, "_sgs_leaf", False))


def mode_of(m: nn.Module) -> str:
    return "sgs" if is_sgs_conv(m) else "branches"


def instrumented(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> instrumented conv (SGS or branched), in forward order."""
    found = [(n, m) for n, m in unwrap(model).named_modules() if is_instrumented(m)]
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


def write_scale(conv: nn.Module, s: Tensor) -> None:
    """Store a validated float64 S: the buffer the hook reads, and a float64 CPU master copy.

    The master copy refills S when a model built on the meta device is materialised (``to_empty``).
    """
    conv.__dict__["_sgs_master"] = s.clone()
    buf = conv._buffers[SCALE_BUFFER]
    if buf.is_inference():  # made under torch.inference_mode (a transform there): it cannot be written in place
        with torch.inference_mode(False):
            conv._buffers[SCALE_BUFFER] = s.to(dtype=buf.dtype, device=buf.device)
        attach_hook(conv)  # (the hook was made for the old S)
    elif not buf.is_meta:
        with torch.no_grad():
            buf.copy_(s)


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
    for name, s in checked.items():  # every S is checked before any is written
        write_scale(convs[name], s)
    _warn_tied_scales(convs)


def _warn_tied_scales(convs: Mapping[str, nn.Module]) -> None:
    by_weight: dict[int, list[str]] = {}
    for name, m in convs.items():
        if is_sgs_conv(m) and m.__dict__.get("_sgs_per_use", False):
            by_weight.setdefault(id(target_of(m)), []).append(name)
    for names in by_weight.values():
        first = convs[names[0]].sgs_scale
        differ = [n for n in names[1:] if not torch.equal(convs[n].sgs_scale, first)]
        if differ:
            logger.warning("sgs_fx.set_scales: %s share one weight but have different S; its gradient is "
                           "S1*G1 + S2*G2 (each use scaled by its own conv's S)", ", ".join(names))
