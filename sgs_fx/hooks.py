"""Keeping each SGS module's gradient hook on the weight it actually uses, through everything that replaces it.

A hook lives on a Parameter *object*, and wrappers replace those objects (FSDP2's unsharded parameter,
``load_state_dict(assign=True)``, ``to()`` with swapped tensors, copies, ``torch.func.functional_call``). So an
SGS conv checks, at every eager forward, that its hook sits on the weight and S it is about to use (two identity
tests, ``attached_for``) and re-attaches it otherwise; ``_apply``, ``_load_from_state_dict``, ``__setattr__`` and
unpickling re-attach it eagerly, which covers ``torch.compile``, whose traced forward cannot run the check.

Which hook: under ``scaling="hook"``, ``S.mul`` (a C method: one multiplication per conv in the backward pass
and no Python frame); under ``scaling="step"``, ``record.StepHook``, which records each gradient for the step.
Where one Parameter feeds several SGS convs (tied weights) no single hook can give each use its own S: those
convs scale *per use* instead (``backward.scale_grad``), so the tied weight gets S₁ ⊙ G₁ + S₂ ⊙ G₂.
``nn.DataParallel`` replicates every module at every forward onto broadcast copies of the weights, whose
gradients autograd sums into the original Parameters: replicas leave the hook to the original (``replicate``).
"""
from __future__ import annotations

import copy
import functools
import logging
import warnings

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from .backward import mul_cast, scale_dtype, scale_grad
from .ownership import SCALE_BUFFER, claim, claim_sharded, is_dtensor, other_owner, release, sgs_role, target_of
from .record import StepHook, grad_state, warn_unscaled

__all__ = ["HookState", "tracing", "attached_for", "NOT_COPIED", "NOT_PICKLED", "deepcopy_without_hook", "attach_hook",
           "detach_hook", "keep_scale", "replicate", "replica_weight", "warn_plain_tensor", "refuse_foreign_trace"]

logger = logging.getLogger("sgs_fx")


class HookState:
    """Which weight tensor and which S a conv's hook was attached for, and its handle.

    Strong references, not weakrefs: ``torch.utils.swap_tensors`` (``to()`` under
    ``torch.__future__.set_swap_module_params_on_conversion``) refuses tensors that have weakrefs.
    """

    __slots__ = ("param", "scale", "handle", "hooked", "impl", "at_step", "record")

    def __init__(self, param, scale, handle, at_step=False, record=None):
        self.param, self.scale, self.handle = param, scale, handle
        self.record = record  # scaling="step": the conv's GradState, which the forward gives the weight's version
        # the weight's gradient is scaled without per-use work: by the hook, or (scaling="step") by the step
        self.hooked = handle is not None or at_step
        self.at_step = at_step
        # torch.utils.swap_tensors keeps the Parameter object and gives it another C++ tensor, without the hook
        self.impl = param._cdata if param is not None else None


def tracing() -> bool:
    """Whether torch.compile or torch.fx is tracing the forward (hooks cannot be registered there: they were
    attached eagerly, see attach_hook's callers)."""
    return torch.compiler.is_compiling() or is_fx_symbolic_tracing()


def attached_for(m: nn.Module, target: Tensor | None) -> bool:
    """Whether ``m``'s hook state was made for ``target`` and its current S (the eager re-check)."""
    state = m.__dict__.get("_sgs_hook")
    return state is not None and state.param is target and state.scale is m._buffers[SCALE_BUFFER]


# what a copy (deepcopy, pickle) of an SGS module does not take along: its weight is a new tensor
NOT_COPIED = ("_sgs_hook", "_sgs_sharded")
# ... nor a pickle: it holds no gradients, so there is nothing pending for it
NOT_PICKLED = NOT_COPIED + ("_sgs_grad",)


def deepcopy_without_hook(module: nn.Module, memo: dict) -> nn.Module:
    """Everything but the hook state is copied; the copy's weight is a new tensor and gets a hook of its own.
    The record of pending gradients is copied with the gradients, against the copy's weight."""
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    new.__dict__.update(copy.deepcopy({k: v for k, v in module.__dict__.items() if k not in NOT_COPIED}, memo))
    attach_hook(new)  # (which also takes the copy's weight as the lost-S check's reference)
    return new


def attach_hook(conv: nn.Module) -> None:
    """(Re)attach ``conv``'s gradient hook to its current weight Parameter (or graph node's parameter) and S."""
    if "_sgs_replica" in conv.__dict__:
        return  # a DataParallel replica: the original module holds the hook (see replicate)
    previous = conv.__dict__.get("_sgs_hook")
    detach_hook(conv)
    w = target_of(conv)
    s = conv._buffers.get(SCALE_BUFFER)
    if w is None or s is None:
        return
    if not conv.__dict__.get("_sgs_per_use", False):
        other = other_owner(w, conv)
        if other is not None:
            for a, b in ((conv, other), (other, conv)):
                # neither an F.conv call (no module runs it) nor torch's parametrization can be scaled per use
                if a.__dict__.get("_sgs_functional") or sgs_role(a) == "parametrized":
                    what = "an instrumented F.conv call" if a.__dict__.get("_sgs_functional") else \
                        f"the parametrized {type(a).__name__}"
                    raise RuntimeError(
                        f"sgs_fx: {type(b).__name__} and {what} now share one weight, which SGS cannot scale per "
                        "use; tie the weights before sgs_fx.transform (an F.conv call then shares the conv's S), "
                        "or strip, tie and transform again")
            logger.warning(
                "sgs_fx: the SGS convs %s and %s share one weight Parameter; each now scales its own use "
                "(the weight's gradient is S1*G1 + S2*G2), at the cost of an autograd function per call",
                type(other).__name__, type(conv).__name__)
            other.__dict__["_sgs_per_use"] = True
            attach_hook(other)
            conv.__dict__["_sgs_per_use"] = True
    handle, at_step = None, False
    if not conv.__dict__.get("_sgs_per_use", False):
        # S.mul(grad): a bound C method with a positional argument, half the call cost of a keyword partial;
        # the product is the same bits (multiplication commutes) and keeps the gradient's memory format.
        # An F.conv call's S lives in a child of the module owning the weight, and `to()` converts children
        # before the owner's own parameters: that hook must cope with the weight's dtype changing under it.
        functional = conv.__dict__.get("_sgs_functional", False)
        fn = s.mul if s.dtype == w.dtype and not functional else functools.partial(mul_cast, s)
        if conv.__dict__.get("_sgs_step", False):
            at_step = True  # the hook only records gradients: any torch.optim step scales .grad (sgs_fx/step.py)
            fn = StepHook(conv, grad_state(conv))
        if is_dtensor(w):  # FSDP2's sharded parameter, which the optimizer steps while the conv holds another;
            # autograd never computes its gradient: the unsharded parameter's hook sees them (the forward moves it)
            claim_sharded(w, conv)
            fn = None
        if fn is not None and w.requires_grad:
            handle = _register(w, fn)
        elif fn is not None and w.grad_fn is None and not w.is_inference():
            # A frozen weight may be unfrozen later (fine-tuning): the hook must already be there.
            w.requires_grad_(True)
            try:
                handle = _register(w, fn)
            finally:
                w.requires_grad_(False)
        if w.grad_fn is None:
            claim(w, conv)
    # (an inference tensor, made under torch.inference_mode, has no version for the forward to note)
    record = grad_state(conv) if at_step and not w.is_inference() else None
    conv.__dict__["_sgs_hook"] = HookState(w, s, handle, at_step, record)
    if at_step:
        state = grad_state(conv)
        if state.pending and previous is not None and previous.param is not w and not is_dtensor(previous.param):
            warn_unscaled(conv)  # a pending gradient left on a Parameter the conv no longer uses: a new one assigned
        state.version = None  # (the lost-S check's reference is taken again, from this weight)


def _register(w: Tensor, fn) -> object:
    had_hooks = w._backward_hooks is not None
    handle = w.register_hook(fn)
    if had_hooks and w.grad_fn is None:
        # torch.utils.swap_tensors moves the Python hook dict to the new tensor without registering it with
        # autograd, and register_hook only adds to an existing dict: assigning the dict registers it again.
        w._backward_hooks = w._backward_hooks
    return handle


def detach_hook(conv: nn.Module) -> None:
    """Remove ``conv``'s gradient hook (if any)."""
    state = conv.__dict__.pop("_sgs_hook", None)
    if state is None:
        return
    if state.handle is not None:
        state.handle.remove()
    release(state.param, conv)


def keep_scale(conv: nn.Module, old: Tensor | None) -> None:
    """After ``to()`` / ``half()`` / ``to_empty()``: S in float32 at least, and valid after materialisation.

    ``half()`` would otherwise round S to fp16, and ``to_empty()`` of a model built on the meta device
    would leave S as uninitialised memory; S then comes from the float64 copy ``set_scales`` keeps. That copy is
    also what a float32 S returns to under ``double()`` — where it still is the S in force (S written into the
    buffer directly, not through ``set_scales``, keeps its own value).
    """
    new, w = conv._buffers.get(SCALE_BUFFER), target_of(conv)
    if old is None or new is None or w is None or new.is_meta:
        return
    master = conv.__dict__.get("_sgs_master")
    source = old
    if master is not None and (old.is_meta or torch.equal(master.to(old.dtype), old.detach().cpu())):
        source = master
    with torch.inference_mode(False):  # (a conversion under inference_mode, e.g. a validator's model.float(),
        # would otherwise make S an inference tensor, which set_scales could not write)
        conv._buffers[SCALE_BUFFER] = source.to(device=new.device, dtype=scale_dtype(w.dtype))


def replicate(module: nn.Module, make_replica) -> nn.Module:
    """``nn.DataParallel``'s replica of an SGS module (it replicates every module at every forward).

    A replica computes with broadcast copies of the weight, and autograd sums their gradients into the
    original Parameter, where the original's hook scales the sum once. So a replica leaves the hook alone
    (its ``__dict__`` starts as a shallow copy of the original's: re-attaching "its" hook would remove the
    original's, and S would be lost unseen) and scales per use only where the original does (tied or
    computed weights), with its own broadcast copy of S.
    """
    if not attached_for(module, target_of(module)):
        attach_hook(module)  # the original's forward, which would re-check, does not run under DataParallel
    state = module.__dict__.get("_sgs_hook")
    per_use = module.__dict__.get("_sgs_per_use", False) or state is None or not state.hooked
    replica = make_replica()
    replica.__dict__.pop("_sgs_hook", None)
    replica.__dict__["_sgs_replica"] = "per_use" if per_use else "hooked"
    return replica


def replica_weight(conv: nn.Module, w: Tensor) -> Tensor:
    """The weight a DataParallel replica computes with (per use where the original scales per use)."""
    return scale_grad(w, conv._buffers[SCALE_BUFFER]) if conv.__dict__["_sgs_replica"] == "per_use" else w


_warned_plain = False


def warn_plain_tensor(conv: nn.Module) -> None:
    """Once: a forward with a plain tensor as the weight, whose gradient no step of a Parameter scales."""
    global _warned_plain
    if not _warned_plain and torch.is_grad_enabled():
        _warned_plain = True
        warnings.warn(
            f"sgs_fx: {type(conv).__name__} ran with a plain tensor as its weight (torch.func.functional_call, "
            "FSDP1's flat parameters or similar). Under scaling='step' (the default) S is applied when a torch.optim "
            "optimizer steps the Parameter, so a gradient computed for this tensor is the unscaled G. For "
            "functional training, transform with scaling='hook' (S applied to every use in the backward pass); "
            "for sharded training use FSDP2 (torch.distributed.fsdp.fully_shard).", stacklevel=5)


def refuse_foreign_trace(conv: nn.Module) -> None:
    """sgs_fx's own tracer keeps SGS convs as leaves; anyone else's fx trace (prepare_qat_fx, symbolic_trace)
    would inline the conv and leave a graph that nothing instruments any more: S silently gone."""
    raise RuntimeError(
        f"sgs_fx: torch.fx is tracing through the SGS-instrumented {type(conv).__name__}, which would inline it "
        "and drop S. Trace (or prepare_qat_fx / prepare_fx) the plain model first and call sgs_fx.transform on "
        "the result; or sgs_fx.strip the model before tracing it")
