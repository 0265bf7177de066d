"""``scaling="step"`` (the default): S applied to the conv weights' ``.grad`` when any torch.optim optimizer steps.

What tells the step that a gradient is new is an event torch gives, not state that could go stale: each SGS weight
carries a tensor hook, which the autograd engine runs for every gradient it computes for that Parameter (a
backward, ``torch.autograd.grad``, DDP, DataParallel and FSDP2 alike). The hook changes nothing; it sets
``pending`` in the conv's ``GradState`` (``record.py``). A global optimizer step pre-hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) runs before every ``step()`` of every
``torch.optim.Optimizer``, finds that optimizer's SGS weights (kept per optimizer under a key of every Parameter's
identity in every group and of the ownership tables' generation: ``_plan``), and multiplies the ``.grad``
of each SGS weight with a pending gradient by S — S read from the conv at that moment — then clears ``pending``.
Nothing is marked on gradient tensors, and nothing of S is cached.

S is linear, so this is the update of scaling each gradient in the backward pass: micro-batches accumulated into
``.grad`` are scaled once (S ⊙ Σ G) and GradScaler's unscaling commutes with it. In a distributed job (DDP, FSDP2)
the hook itself scales each gradient before the reduction (``record.StepHook``): a rank cannot tell at its step
which of its weights other ranks' gradients reached.

* Nested steps (Lookahead-style wrappers, a subclass calling ``super().step()``) and two steps with no backward in
  between find nothing pending the second time: S is applied once per gradient.
* A step with a closure (LBFGS, Lightning) computes its gradients inside the step: the pre-hook hands the optimizer
  a wrapped closure that applies S to what each call computed.
* ``sgs_fx.scale_gradients(model)`` applies S at once, for code that reads or uses ``.grad`` before (or without)
  a step; until the next step of those weights, their hooks scale each new gradient as it arrives
  (``prescaled``), so ``.grad`` is S ⊙ G however it was zeroed, clipped, unscaled or accumulated in between.
* A CUDA graph's replay rewrites ``.grad`` without running any hook. A gradient that arrives while a graph is being
  captured is marked ``replayed``; if the captured region includes the step, that captured step applies S on every
  replay and clears the mark; otherwise every eager step scales that weight's ``.grad``.
* S is never lost unseen: a gradient arriving while the previous one is still pending, thrown away, with the weight
  changed since the forward that led to it (or since its last step ended: a step post-hook records the version),
  means the weight was updated with the unscaled gradient: one warning names the way out
  (``record.check_unchanged``). So does an optimizer built on the model before ``transform`` copied it
  (``optimizers.check_stale``).
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import optimizers
from .ownership import SCALE_BUFFER, any_owned, generation, is_sgs_conv, owned_in, scales_at_step, stepped_tensor
from .passes.registry import instrumented
from .record import grad_state

__all__ = ["scale_gradients"]

_CUDA = [torch.cuda.is_available()]


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return _CUDA[0] and torch.cuda.is_current_stream_capturing()


def _due(state, capturing: bool) -> bool:
    """Whether ``.grad`` holds gradients S was not applied to; clears the record, since S is about to be."""
    due = state.pending or state.replayed
    state.pending, state.version = False, None
    if capturing:  # the captured multiply runs at every replay
        state.replayed = False
    return due


class _Plan:
    """What the steps of one optimizer need: its SGS weights with their convs and records, found by a walk over its
    param groups and kept under a key of everything the walk reads; and the copies generation for which the
    built-before-transform check is decided."""

    __slots__ = ("ref", "key", "weights", "stale_decided")

    def __init__(self, opt, key, weights):
        self.ref, self.key, self.weights, self.stale_decided = weakref.ref(opt), key, weights, None


# id(optimizer) -> its _Plan (a plain dict, cheaper than a WeakKeyDictionary at every step; emptied by a finalizer)
_PLANS: dict[int, _Plan] = {}


def _plan(opt: torch.optim.Optimizer) -> _Plan:
    """``opt``'s plan: (Parameter, conv, GradState) for each weight whose gradient its step scales.

    The key is everything the answer depends on: the identity of every Parameter of every param group, in order (a
    group added, replaced, or changed in place changes it), and the generation of the ownership tables (any hook
    attached, moved or removed, a conv stripped or switched to per-use scaling changes it). Making it is one C-level
    pass over the groups. (A conv's GradState is created once and kept for its life: it can be held here.)
    """
    groups = opt.param_groups
    key = (generation(), tuple(map(id, groups[0]["params"]))) if len(groups) == 1 else \
        (generation(), *(tuple(map(id, group["params"])) for group in groups))
    plan = _PLANS.get(id(opt))
    if plan is not None and plan.key == key and plan.ref() is opt:
        return plan
    if plan is None or plan.ref() is not opt:
        weakref.finalize(opt, _PLANS.pop, id(opt), None)
    weights = [(p, conv, grad_state(conv)) for p, conv in owned_in(groups) if scales_at_step(conv)]
    plan = _PLANS[id(opt)] = _Plan(opt, key, weights)
    if weights:
        optimizers.warn_if_adaptive(opt)
    return plan


def _apply_at_step(weights, owner) -> None:
    """Multiply the pending gradients of ``weights`` by S; a step of these weights ends their prescaled state.

    Runs at every step, right after a backward pass has left the caches cold: one loop, few attribute reads.
    """
    grads: list[Tensor] = []
    scales: list[Tensor] = []
    capturing = _capturing()
    for p, conv, state in weights:
        if state.prescaled:  # sgs_fx.scale_gradients applied S, and the hook every gradient since
            state.prescaled = False
        elif _due(state, capturing):
            _collect(p, conv, grads, scales)
    if grads:
        _multiply(grads, scales, owner)


def _collect(p: Tensor, conv: nn.Module, grads: list, scales: list) -> None:
    if p.grad is not None:
        grads.append(p.grad)
        scales.append(conv._buffers[SCALE_BUFFER])


def _multiply(grads: list[Tensor], scales: list[Tensor], owner) -> None:
    """``grads[i] *= scales[i]`` in place (a half-precision gradient times the float32 S, rounded once)."""
    if not grads:
        return
    with torch.no_grad():  # (a backward with create_graph=True leaves gradients that require grad)
        if _fused_path(grads[0]) and not torch.compiler.is_compiling() and _gather_mul(grads, scales, owner):
            return
        torch._foreach_mul_(grads, scales)  # S broadcast over the channel dims (a CPU has no fused foreach path)


def _fused_path(g: Tensor) -> bool:
    """Where ``_foreach_mul_`` has a fused path worth three kernels to reach (CUDA); tests force it on a CPU."""
    return g.is_cuda


# --- one fused multiply on a GPU ---------------------------------------------------------------------------------

class _Gather:
    """Where each element of a list of gradients finds its S entry: an int32 index into the S's concatenated.

    ``torch._foreach_mul_`` takes its fused path (one kernel for every conv) only for operands of equal sizes and
    strides. Each step, ``index_select`` of the current S's through this index fills ``arena``, whose per-gradient
    views have the gradients' own sizes and strides (channels_last too): three kernels, whatever the number of
    convs, and S read afresh every time (also by every replay of a captured step). Only the layout is kept, keyed
    on every gradient's size, strides, dtype and device and every S's size and dtype.
    """

    __slots__ = ("index", "arena", "views", "captured")

    def __init__(self, grads: list[Tensor], scales: list[Tensor]):
        device, dtype = grads[0].device, scales[0].dtype
        self.arena = torch.empty(sum(g.numel() for g in grads), dtype=dtype, device=device)
        parts, self.views, offset, first = [], [], 0, 0
        for g, s in zip(grads, scales):
            local = torch.empty_like(g, dtype=torch.int32)  # (g's strides, for a dense g)
            if local.stride() != g.stride():
                raise ValueError("a gradient that is not dense")
            local.copy_((torch.arange(s.numel(), dtype=torch.int32, device=device) + first).view(s.shape).expand(g.shape))
            parts.append(local.as_strided((g.numel(),), (1,)))  # in memory order
            self.views.append(self.arena.as_strided(g.shape, g.stride(), offset))
            offset, first = offset + g.numel(), first + s.numel()
        self.index = torch.cat(parts)
        self.captured = False


# owner (an optimizer, or the model of scale_gradients) -> {layout key: _Gather}
_GATHERS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
_MAX_LAYOUTS = 8


def _gather_mul(grads: list[Tensor], scales: list[Tensor], owner) -> bool:
    """The fused multiply; False where it does not apply (mixed devices or dtypes of S, a non-dense gradient)."""
    device, dtype = grads[0].device, scales[0].dtype
    if any(g.device != device for g in grads) or any(s.dtype != dtype or s.device != device for s in scales):
        return False
    key = tuple((g.shape, g.stride(), g.dtype, s.shape) for g, s in zip(grads, scales)) + (device, dtype)
    layouts = _GATHERS.setdefault(owner, {})
    gather = layouts.get(key)
    if gather is None:
        try:
            gather = _Gather(grads, scales)
        except ValueError:
            return False
        if len(layouts) >= _MAX_LAYOUTS:  # a captured graph keeps writing into its arena: never drop that one
            for k in [k for k, v in layouts.items() if not v.captured][:len(layouts) - _MAX_LAYOUTS + 1]:
                del layouts[k]
        layouts[key] = gather
    if _capturing():
        gather.captured = True
    torch.index_select(torch.cat([s.reshape(-1) for s in scales]), 0, gather.index, out=gather.arena)
    torch._foreach_mul_(grads, gather.views)
    return True


# --- the optimizer step pre-hook --------------------------------------------------------------------------------

def _before_step(opt: torch.optim.Optimizer, args, kwargs):
    if not any_owned():  # no SGS model in this process
        return None
    if torch.compiler.is_compiling():  # a compiled step: this bookkeeping runs eagerly (a graph break)
        return _before_step_eager(opt, args, kwargs)
    plan = _plan(opt)
    # (args holds the optimizer itself first: the hook wraps step(self, closure=None))
    closure = args[1] if len(args) > 1 else kwargs.get("closure")
    if not callable(closure):  # no closure (or an optimizer whose step takes something else first)
        if plan.stale_decided != optimizers.copies_generation() and optimizers.check_stale(opt):
            plan.stale_decided = optimizers.copies_generation()
        if plan.weights:
            _apply_at_step(plan.weights, opt)
        return None

    def closure_then_scale():  # (prescaled weights stay so until after the call: what it adds arrives scaled)
        loss = closure()
        if torch.compiler.is_compiling():  # (a compiled step traces its closure)
            _after_closure_eager(opt, plan)
        else:
            _after_closure(opt, plan)
        return loss

    if len(args) > 1:
        return (args[0], closure_then_scale, *args[2:]), kwargs
    return args, {**kwargs, "closure": closure_then_scale}


def _after_closure(opt, plan: _Plan) -> None:
    if plan.stale_decided != optimizers.copies_generation() and optimizers.check_stale(opt):
        plan.stale_decided = optimizers.copies_generation()
    if plan.weights:
        _apply_at_step(plan.weights, opt)


def _after_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
    """The weights' versions as this step left them: the lost-S warning's reference (``record.check_unchanged``)
    where no eager forward notes one (a compiled model's)."""
    if torch.compiler.is_compiling():  # a compiled step: this runs eagerly (a graph break)
        return _after_step_eager(opt, args, kwargs)
    plan = _PLANS.get(id(opt))
    if plan is None or not plan.weights or plan.ref() is not opt:
        return None
    for p, _, state in plan.weights:
        state.version = p._version
    return None


_before_step_eager = torch.compiler.disable(_before_step)
_after_closure_eager = torch.compiler.disable(_after_closure)
_after_step_eager = torch.compiler.disable(_after_step)

register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)


def scale_gradients(model: nn.Module) -> int:
    """Apply S now to the ``.grad`` of every conv weight that ``scaling="step"`` scales at the step.

    For code that reads or uses ``.grad`` before (or without) a torch.optim step: clipping the scaled gradient,
    logging it, a hand-written update, an optimizer outside torch.optim. From this call until the next optimizer
    step of those weights, each new gradient is scaled as it arrives, so ``.grad`` stays S ⊙ G whatever happens in
    between (clipping or unscaling in place, zeroing, further backward passes), and that step does not scale
    again. Convs scaled in the backward pass (``scaling="hook"``, tied weights) need nothing: their ``.grad`` is
    S ⊙ G already. Returns how many conv gradients hold S ⊙ G after the call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sgs_fx.scale_gradients expects the transformed model (an nn.Module), got "
                        f"{type(model).__name__}; the step of a torch.optim optimizer applies S by itself")
    grads: list[Tensor] = []
    scales: list[Tensor] = []
    capturing = _capturing()
    held = 0
    for conv in instrumented(model).values():
        if not (is_sgs_conv(conv) and scales_at_step(conv)):
            continue
        state, p = grad_state(conv), stepped_tensor(conv)
        if not state.prescaled:
            if _due(state, capturing) and p is not None:
                _collect(p, conv, grads, scales)
            state.prescaled = True
        held += p is not None and p.grad is not None
    _multiply(grads, scales, model)
    return held
