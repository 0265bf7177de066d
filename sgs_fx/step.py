"""``scaling="step"`` (the default): S applied to the conv weights' ``.grad`` when any torch.optim optimizer steps.

A global optimizer step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``) runs before every
``step()`` of every ``torch.optim.Optimizer``, timm's and Lightning's included, with nothing for the user to call.
It finds the SGS weights the optimizer holds (a list cached per optimizer, rebuilt only when its param groups or
the set of SGS weights change) and multiplies their ``.grad`` by S with one ``torch._foreach_mul_``: the
official implementation's multiply of ``.grad``, at about its cost (BENCHMARKS.md). The convs carry no hook and no
graph op, so a compiled model's graph is the plain model's and a new S never recompiles it.

S is linear, so this is the same update as scaling each gradient in the backward pass: micro-batches accumulated
into ``.grad`` are scaled once (S ⊙ Σ G), DDP's averaged gradient is scaled after its reduction, GradScaler's
unscaling commutes with it, and under FSDP2 each rank multiplies its shard of the reduced gradient (S is
spatial; shards split the channels).

* A step with a closure (LBFGS, Lightning's automatic optimization) computes its gradients inside the step:
  the pre-hook hands the optimizer a wrapped closure that applies S to the gradients each call computes.
* Every top-level step scales the gradients it finds: nothing but the step itself tells that a new backward
  ran (a backward replayed from a CUDA graph rewrites ``.grad`` without a trace). An optimizer stepping inside
  another's step (Lookahead-style wrappers that share param groups) does not scale those gradients again.
* ``sgs_fx.scale_gradients(model)`` applies S to ``.grad`` at once, for what reads ``.grad`` before the step
  (clipping the scaled gradient, logging) or updates without torch.optim; the next step leaves those
  gradients alone.
* Gradients read before the step — ``clip_grad_norm_``, ``torch.autograd.grad`` — are the unscaled G (the
  official code also clipped before scaling). ``scaling="hook"`` scales in the backward pass instead.
* S is never lost unseen: a weight that changes between two training forwards while no step (and no
  ``scale_gradients``) applied S — a hand-written update, an optimizer outside torch.optim — gets one warning
  naming the way out (see ``ops._check_update``). So does an optimizer built on the model before ``transform``
  copied it: it steps Parameters the copy does not use (``optimizers.stale_verdict``).
"""
from __future__ import annotations

import logging
import sys
import weakref

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import optimizers
from .ops import _OWNERS, _SHARDED_OWNERS, SCALE_BUFFER, is_dtensor, is_sgs_conv, scales_at_step
from .passes.registry import instrumented

__all__ = ["scale_gradients"]

logger = logging.getLogger("sgs_fx")

# On a gradient scaled by sgs_fx.scale_gradients: the next step leaves it alone (whatever was done to it in place
# since: clipping, GradScaler's unscaling), and removes the mark.
_PRESCALED = "_sgs_prescaled"

# whether sgs_fx.scale_gradients ever ran (until then the step looks for no marks)
_PRESCALED_ANY = [False]
# optimizer -> (signature of its param groups and of the set of SGS weights, [(param, conv)])
_CACHE: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()
# the steps in progress, outermost first: (optimizer, ids of the gradients it scaled, the frame of torch's step
# wrapper that runs it: an entry whose frame is no longer on the stack was left behind by a step that raised)
_ACTIVE: list[tuple["weakref.ref", set[int], object]] = []


def _signature(opt: torch.optim.Optimizer) -> tuple:
    """Changes when SGS weights are marked or unmarked, or param groups are added or replaced (O(1): an optimizer
    with thousands of groups pays no more per step than one with a single group)."""
    groups = opt.param_groups
    first, last = (groups[0], groups[-1]) if groups else ({"params": ()}, {"params": ()})
    return (optimizers.generation(), id(groups), len(groups), id(first["params"]), len(first["params"]),
            id(last["params"]), len(last["params"]))


def _step_convs(opt: torch.optim.Optimizer) -> tuple[list[tuple[Tensor, nn.Module]], list]:
    """(Parameter, conv) for each weight of ``opt`` whose gradient only a step scales, and the pending check of
    Parameters that transform copied (``optimizers.stale_verdict``; emptied once decided). Cached."""
    sig = _signature(opt)
    cached = _CACHE.get(opt)
    if cached is not None and cached[0] == sig:
        return cached[1], cached[2]
    found = []
    ids = {id(p) for group in opt.param_groups for p in group["params"]}
    for group in opt.param_groups:
        for p in group["params"]:
            # by identity, not by the mark on p: torch.utils.swap_tensors (to() under swapped tensors) swaps the
            # Parameters' __dict__ too, and an F.conv call's S holder cannot re-mark its owner's parameter then
            if id(p) not in _OWNERS and id(p) not in _SHARDED_OWNERS:
                continue
            conv = _owner(p)
            if conv is not None and scales_at_step(conv):
                found.append((p, conv))
    copied = optimizers.copied_params(opt, ids)
    check = [copied, ids] if copied else []
    _CACHE[opt] = (sig, found, check)
    optimizers.warn_if_adaptive(opt)  # (once per optimizer; checked when its weights are listed)
    return found, check


def _check_copies(opt: torch.optim.Optimizer, check: list) -> None:
    if optimizers.stale_verdict(opt, *check):
        check.clear()


def _owner(p: Tensor) -> nn.Module | None:
    """The SGS conv whose weight ``p`` is: its current one, or (FSDP2) the sharded parameter it was gathered from."""
    for table, attr in ((_OWNERS, "_sgs_hook"), (_SHARDED_OWNERS, "_sgs_sharded")):
        ref = table.get(id(p))
        conv = ref() if ref is not None else None
        if conv is None or not is_sgs_conv(conv):
            continue
        held = conv.__dict__.get(attr)
        if (held.param if attr == "_sgs_hook" and held is not None else held) is p:
            return conv
    return None


def _full_scale(conv: nn.Module, g: Tensor) -> Tensor:
    """S broadcast to the gradient's shape and strides, materialised and cached until S changes: ``_foreach_mul_``
    then takes its fused path, which needs equal sizes and strides (one kernel for every conv on a GPU;
    broadcasting, or a channels_last gradient beside a contiguous S, costs one kernel per conv). Its memory is
    that of the conv's weight."""
    s = conv._buffers[SCALE_BUFFER]
    cached = conv.__dict__.get("_sgs_full")
    if cached is not None and cached[0] is s and cached[1] == s._version and cached[2].shape == g.shape and \
            cached[2].stride() == g.stride():
        return cached[2]
    full = torch.empty_like(g, dtype=s.dtype).copy_(s.to(g.device).expand(g.shape))  # (empty_like keeps the strides)
    conv.__dict__["_sgs_full"] = (s, s._version, full)
    return full


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return _CUDA[0] and torch.cuda.is_current_stream_capturing()


_CUDA = [torch.cuda.is_available()]


def _scale(pairs, skip) -> set[int]:
    """Multiply each pair's ``.grad`` by its conv's S (once); the ids of the gradients scaled.

    Runs at every optimizer step, right after a backward pass has evicted the interpreter's caches: kept to the
    few attribute reads each conv needs (and no grad-mode switch: a ``.grad`` needs none to be multiplied).
    """
    grads: list[Tensor] = []
    scales: list[Tensor] = []
    scaled: set[int] = set()
    prescaled = _PRESCALED_ANY[0]
    # S itself, broadcast, where the step is traced or captured: a compiled step fuses the broadcast, and a CUDA
    # graph must read S's own memory at every replay (S changes in place; a materialised copy would not follow)
    compiling = torch.compiler.is_compiling() or _capturing()
    for p, conv in pairs:
        g = p.grad
        if g is None:
            continue
        if type(g) is not Tensor and is_dtensor(g):  # FSDP2: S multiplies each rank's shard
            _check_placements(g, conv)
            g = _local(g)
        key = id(g)
        if key in scaled or (skip and key in skip):
            continue
        if prescaled and g.__dict__.pop(_PRESCALED, None) is not None:
            continue  # sgs_fx.scale_gradients applied S already (clipped or unscaled since, maybe: in place)
        grads.append(g)
        scales.append(conv._buffers[SCALE_BUFFER] if compiling else _full_scale(conv, g))
        scaled.add(key)
        conv.__dict__["_sgs_hook"].scaled = True
    if grads:
        if any(g.requires_grad for g in grads):  # a backward with create_graph=True: not part of the graph
            with torch.no_grad():
                torch._foreach_mul_(grads, scales)
        else:
            torch._foreach_mul_(grads, scales)  # in place: a half-precision gradient is rounded once
    return scaled


def _in_outer_step() -> set[int]:
    """The gradients that steps in progress have scaled (an optimizer stepping inside another's step)."""
    if len(_ACTIVE) < 2:
        return _NOTHING
    out: set[int] = set()
    for _, ids, _frame in _ACTIVE[:-1]:
        out |= ids
    return out


def _drop_finished_steps() -> None:
    """Forget entries of steps that are no longer running (they raised, so no post-hook popped them)."""
    live = set()
    frame = sys._getframe(2)
    while frame is not None:
        live.add(id(frame))
        frame = frame.f_back
    _ACTIVE[:] = [e for e in _ACTIVE if e[2] is None or id(e[2]) in live]  # (None: a compiled step's)


_NOTHING: frozenset = frozenset()


def _before_step(opt: torch.optim.Optimizer, args, kwargs):
    if not optimizers.any_marked():
        return None
    pairs, check = _step_convs(opt)
    compiling = torch.compiler.is_compiling()  # (no frames under torch.compile: it cannot trace sys._getframe)
    if _ACTIVE and not compiling:  # nested (or left behind by a step that raised: dropped)
        _drop_finished_steps()
    # the same optimizer's step already running: a subclass whose step() calls super().step() (both are hooked)
    again = any(e[0]() is opt for e in _ACTIVE)
    entry = (weakref.ref(opt), set(), None if compiling else sys._getframe(1))
    _ACTIVE.append(entry)
    if not (pairs or check) or again:
        return None
    # (args holds the optimizer itself first: the hook wraps step(self, closure=None))
    closure = args[1] if len(args) > 1 else kwargs.get("closure")
    if not callable(closure):  # no closure (or an optimizer whose step takes something else first)
        if pairs:
            entry[1].update(_scale(pairs, _in_outer_step()))
        if check and not compiling:
            _check_copies(opt, check)
        return None

    def closure_then_scale():
        loss = closure()
        if pairs:
            entry[1].update(_scale(pairs, _in_outer_step()))  # (each call computes new gradients: scale them all)
        if check and not torch.compiler.is_compiling():
            _check_copies(opt, check)
        return loss

    if len(args) > 1:
        return (args[0], closure_then_scale, *args[2:]), kwargs
    return args, {**kwargs, "closure": closure_then_scale}


def _after_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
    if _ACTIVE and _ACTIVE[-1][0]() is opt:
        _ACTIVE.pop()


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)


def scale_gradients(model: nn.Module) -> int:
    """Multiply the ``.grad`` of every conv weight that ``scaling="step"`` scales at the step by its S, now.

    For code that reads or applies ``.grad`` before (or without) a torch.optim step: clipping the scaled
    gradient, a hand-written update, an optimizer outside torch.optim. Call it after the last backward before
    the update: the next torch.optim step leaves these gradients alone (also after clipping or unscaling them in
    place), so what a later backward accumulates into them is not scaled. Convs scaled in the backward pass
    (``scaling="hook"``, tied weights) need nothing: their ``.grad`` is S ⊙ G already. Returns how many
    gradients were scaled.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sgs_fx.scale_gradients expects the transformed model (an nn.Module), got "
                        f"{type(model).__name__}; the step of a torch.optim optimizer applies S by itself")
    pairs = []
    for conv in instrumented(model).values():
        if is_sgs_conv(conv) and scales_at_step(conv):
            sharded = conv.__dict__.get("_sgs_sharded")
            p = sharded if sharded is not None else conv.__dict__["_sgs_hook"].param
            pairs.append((p, conv))
    scaled = _scale(pairs, set())
    _PRESCALED_ANY[0] = True
    for p, _ in pairs:
        g = p.grad
        if g is not None:
            g = _local(g) if is_dtensor(g) else g
            if id(g) in scaled:
                g.__dict__[_PRESCALED] = True
    return len(scaled)


def _local(g):
    """A DTensor gradient's local shard, the same tensor object every time (marks stay on it)."""
    return getattr(g, "_local_tensor", None) if getattr(g, "_local_tensor", None) is not None else g.to_local()


def _check_placements(grad, conv) -> None:
    spatial = [pl for pl in grad.placements if pl.is_shard() and pl.dim % grad.dim() >= 2]
    if spatial:
        raise ValueError(
            f"sgs_fx: the gradient of {type(conv).__name__}'s weight is sharded along a spatial kernel dim "
            f"({spatial[0]}), where S cannot be applied shard by shard; shard the weight along dim 0 (FSDP2's "
            "default) or use scaling='hook'")
