"""``scaling="step"``: S applied to the conv weights' ``.grad`` by the optimizer's step, all at once.

The default hook multiplies each weight gradient as the backward pass produces it, right after that conv's
backward kernel; in a step bound by host-side per-op work that multiplication costs 2-4 times its isolated time
(BENCHMARKS.md). Here the convs carry no hook and no forward-graph op at all, and a step pre-hook of the
optimizer multiplies every instrumented weight's ``.grad`` by its S with one ``torch._foreach_mul_``, warm,
as the official implementation does after backward. S is linear, so this is the same update: micro-batches
accumulated into ``.grad`` are scaled once (S ⊙ Σ G), DDP's averaged gradient is scaled after its reduction,
GradScaler's unscaling commutes with it, a compiled model's graph holds no S (S updates never recompile), and
under FSDP2 each rank multiplies its shard of the reduced gradient (S is spatial; shards split the channels).

What it cannot do, and the default hook can: ``torch.autograd.grad`` and anything that reads ``.grad``
between backward and ``optimizer.step()`` (gradient clipping, logging) see the unscaled gradient; an
optimizer step with a closure (LBFGS, Lightning's automatic optimization) computes its gradients inside
the step, after the pre-hook, and is refused.

S is never lost unseen: an instrumented conv's forward with gradients enabled raises while its weight is in
no attached optimizer, and any other ``torch.optim`` optimizer stepping such a weight raises at its step.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .ops import _OWNERS, _SHARDED_OWNERS, SCALE_BUFFER, attach_hook, is_dtensor, scales_at_step
from .optimizers import _CHECKED, _MARK as SCALED_MARK, STEP_MARK, STEP_OPTIMIZERS, holds_step_weights

__all__ = ["attach_optimizer", "StepAttachment"]

# On a gradient tensor: its version counter right after S was applied, so a second step with no backward in
# between (two optimizers holding one weight, an LR finder) does not apply S twice.
_SCALED_AT = "_sgs_scaled_at"


# optimizer -> the handle of its step pre-hook (attaching twice registers one hook)
_HANDLES: "weakref.WeakKeyDictionary[torch.optim.Optimizer, object]" = weakref.WeakKeyDictionary()


class StepAttachment:
    """What ``attach_optimizer`` returns: ``remove()`` detaches the optimizers again."""

    def __init__(self, optimizers):
        self._optimizers = [weakref.ref(o) for o in optimizers]

    def remove(self) -> None:
        for ref in self._optimizers:
            opt = ref()
            if opt is not None and opt in _HANDLES:
                _HANDLES.pop(opt).remove()
                STEP_OPTIMIZERS.discard(opt)
                _CHECKED.pop(opt, None)  # its next step is checked again (and refused if it still holds SGS weights)
                for _, conv in _step_convs(opt):
                    attach_hook(conv)


def attach_optimizer(*optimizers: torch.optim.Optimizer) -> StepAttachment:
    """Scale the gradients of the conv weights these optimizers step, in their ``step()``.

    For models transformed with ``scaling="step"``; call once, after creating the optimizer(s) over the
    transformed model's parameters (GANs and the like: pass each optimizer that steps instrumented weights)::

        model = sgs_fx.transform(model, scaling="step")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sgs_fx.attach_optimizer(opt)

    Attaching an optimizer again changes nothing. Returns a handle whose ``remove()`` undoes it.
    """
    if not optimizers:
        raise TypeError("sgs_fx.attach_optimizer needs at least one optimizer")
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"sgs_fx.attach_optimizer expects torch.optim.Optimizer instances, got {type(opt).__name__}")
    for opt in optimizers:  # all checked before any is attached
        if not holds_step_weights(opt):
            hooked = sum(bool(p.__dict__.get(SCALED_MARK)) for g in opt.param_groups for p in g["params"])
            raise ValueError(
                f"sgs_fx.attach_optimizer: this {type(opt).__name__} steps no conv weight transformed with "
                "scaling='step'" + (f" ({hooked} SGS weight(s) of it are scaled by gradient hooks or per use "
                                    "already: nothing to attach)" if hooked else
                                    "; create it over the transformed model's parameters"))
    for opt in optimizers:
        if opt not in _HANDLES:
            _HANDLES[opt] = opt.register_step_pre_hook(_scale_before_step)
        STEP_OPTIMIZERS.add(opt)
    for opt in optimizers:
        for _, conv in _step_convs(opt):
            attach_hook(conv)  # its forward then takes the fast path (and no longer refuses to train)
    return StepAttachment(optimizers)


def _step_convs(opt: torch.optim.Optimizer):
    """(Parameter, conv) for each weight of ``opt`` that a conv instrumented with scaling="step" owns."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not p.__dict__.get(STEP_MARK, False):
                continue
            ref = _OWNERS.get(id(p))
            conv = ref() if ref is not None else None
            state = conv.__dict__.get("_sgs_hook") if conv is not None else None
            if state is None or state.param is not p:  # FSDP2: the conv may hold the unsharded parameter now
                ref = _SHARDED_OWNERS.get(id(p))
                conv = ref() if ref is not None else None
                if conv is None or conv.__dict__.get("_sgs_sharded") is not p:
                    continue
            if scales_at_step(conv):
                yield p, conv


def _scale_before_step(opt: torch.optim.Optimizer, args, kwargs):
    # (args holds the optimizer itself first: the hook wraps step(self, closure=None))
    if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:
        raise RuntimeError(
            f"sgs_fx: {type(opt).__name__}.step was called with a closure, which computes the gradients inside "
            "the step, after scaling='step' has applied S; transform with scaling='hook' (the default) for "
            "closure-based optimizers (LBFGS) and trainers that pass one (Lightning's automatic optimization)")
    grads: list[Tensor] = []
    scales: list[Tensor] = []
    with torch.no_grad():  # (where DTensor.to_local() is the local shard itself)
        for p, conv in _step_convs(opt):
            g = p.grad
            if g is None:
                continue
            if is_dtensor(g):  # FSDP2: S multiplies each rank's shard of the output or input channels
                _check_placements(g, conv)
                g = g.to_local()
            if g.__dict__.get(_SCALED_AT) != g._version:
                grads.append(g)
                scales.append(conv._buffers[SCALE_BUFFER])
        if grads:
            torch._foreach_mul_(grads, scales)  # in place: a half-precision gradient is rounded once
    for g in grads:
        g.__dict__[_SCALED_AT] = g._version
    return None


def _check_placements(grad, conv) -> None:
    spatial = [pl for pl in grad.placements if pl.is_shard() and pl.dim % grad.dim() >= 2]
    if spatial:
        raise ValueError(
            f"sgs_fx: the gradient of {type(conv).__name__}'s weight is sharded along a spatial kernel dim "
            f"({spatial[0]}), where S cannot be applied shard by shard; shard the weight along dim 0 (FSDP2's "
            "default) or use scaling='hook'")
