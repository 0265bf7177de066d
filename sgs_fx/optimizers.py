"""Two warnings at the optimizer's step: one when an adaptive optimizer steps SGS weights, one when an optimizer
steps the Parameters of a model that ``transform`` copied (built before transform).

SGS is defined for SGD (plain, momentum, Nesterov, coupled L2). Adam-family optimizers divide each coordinate by
its own second moment and almost cancel a fixed per-element gradient factor (spec §1.5): sgs_fx warns once per
optimizer and does not refuse. Both checks run in the global optimizer step pre-hook of ``sgs_fx.step``.
"""
from __future__ import annotations

import logging
import warnings
import weakref

import torch
from torch import Tensor, nn

logger = logging.getLogger("sgs_fx")

ADAPTIVE = tuple(
    getattr(torch.optim, n)
    for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "SparseAdam", "Adafactor")
    if hasattr(torch.optim, n)
)
# other libraries' per-coordinate normalising or sign-based optimizers (timm's Lamb, Lion, Adan, AdaBelief, MADGRAD,
# ...), by class name: a sign-based update cancels a positive S entirely
_ADAPTIVE_NAMES = ("adam", "lamb", "lion", "adan", "adabelief", "madgrad", "rmsprop", "adafactor", "adagrad",
                   "adadelta", "laprop", "prodigy", "sophia", "novograd")


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, ADAPTIVE) or any(n in type(optimizer).__name__.lower() for n in _ADAPTIVE_NAMES)


_ADAPTIVE_SEEN: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def warn_if_adaptive(optimizer: torch.optim.Optimizer) -> None:
    """Once per optimizer, at a step over SGS weights: a warning if it is adaptive."""
    if optimizer in _ADAPTIVE_SEEN:
        return
    _ADAPTIVE_SEEN.add(optimizer)
    if is_adaptive(optimizer):
        logger.warning(
            "sgs_fx: %s steps SGS-instrumented weights; SGS is defined for SGD (plain, momentum, Nesterov). "
            "Adaptive optimizers normalise each coordinate and almost cancel the spatial scaling.",
            type(optimizer).__name__,
        )


# A conv module of a model that transform copied (not inplace) -> {parameter name: weak references to the
# modules of the copies whose SGS weight replaced it}. Kept here, not on the Parameters: a mark holding a weak
# reference would make the original model unpicklable, and torch.utils.swap_tensors refuses tensors with weakrefs.
_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict[str, list[weakref.ref]]]" = weakref.WeakKeyDictionary()
_GENERATION = [0]  # changes whenever a copy is recorded: optimizers decided before are checked again


def copies_generation() -> int:
    return _GENERATION[0]


def remember_copies(source: nn.Module, copy: nn.Module, weights: list[Tensor]) -> None:
    """Record which Parameters of ``source`` the transformed ``copy`` replaced with its SGS ``weights``."""
    scaled = {id(w) for w in weights}
    _GENERATION[0] += 1
    for mname, mod in copy.named_modules():
        for pname, p in mod._parameters.items():
            if p is None or id(p) not in scaled:
                continue
            try:
                owner = source.get_submodule(mname)
            except AttributeError:
                continue
            src = owner._parameters.get(pname)
            if src is not None and src is not p:
                _COPIES.setdefault(owner, {}).setdefault(pname, []).append(weakref.ref(mod))


def check_stale(optimizer: torch.optim.Optimizer) -> bool:
    """At a step: whether ``optimizer`` was built on a model that transform copied (warned once). True once decided
    for the copies recorded so far (the caller keeps that, with the optimizer's param groups, and asks again only
    when either changes)."""
    if not _COPIES:
        return True
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    copied = copied_params(optimizer, ids)
    return not copied or stale_verdict(optimizer, copied, ids)


def copied_params(optimizer: torch.optim.Optimizer, ids: set[int]) -> list[tuple[Tensor, nn.Module, str]]:
    """(Parameter, its module, its name) for each Parameter of ``optimizer`` (``ids``) that transform copied."""
    out = []
    for owner, names in list(_COPIES.items()):
        for pname in names:
            p = owner._parameters.get(pname)
            if p is not None and id(p) in ids:
                out.append((p, owner, pname))
    return out


def stale_verdict(optimizer: torch.optim.Optimizer, copied: list, ids: set[int]) -> bool:
    """At a step of an optimizer holding Parameters that transform copied: warn if the copies have gradients and
    these have none (the optimizer was built before transform and trains nothing the copy uses). True once
    decided: warned, or these Parameters have gradients (the original model is trained, e.g. a baseline)."""
    if any(p.grad is not None for p, _, _ in copied):
        return True
    for p, owner, pname in copied:
        for ref in _COPIES.get(owner, {}).get(pname, ()):
            mod = ref()
            twin = mod._parameters.get(pname) if mod is not None else None
            if twin is None or twin.grad is None or id(twin) in ids:
                continue
            for _, o, _ in copied:  # once for these models (a Lookahead's inner optimizer holds the same ones)
                _COPIES.pop(o, None)
            warnings.warn(
                f"sgs_fx: {type(optimizer).__name__} steps the parameters of the model that was passed to "
                "sgs_fx.transform, but the gradients were computed on the transformed copy it returned (its "
                f"{type(mod).__name__}.{pname} has a gradient; the optimizer's parameter has none), so this step "
                "updates nothing the copy uses. Build the optimizer after transform: model = sgs_fx.transform(model), "
                "then optimizer = ...(model.parameters()); or transform with inplace=True.", stacklevel=5)
            return True
    return False
