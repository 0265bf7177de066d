"""The SGS mechanism on the conv side: the instrumented conv classes, and the gradient hooks on their weights.

Under ``scaling="step"`` (the default) a conv's weight carries a hook that does not touch the gradient: it records,
in the conv's ``GradState``, that autograd computed a gradient for the weight (``pending``). Any torch.optim
optimizer's step then multiplies the ``.grad`` of every weight with a pending gradient by S and clears the record
(``sgs_fx/step.py``). The record is written by torch's own event — the weight's tensor hook, which the autograd
engine runs for every gradient it computes for that Parameter — never inferred from marks, caches or version
counters, so it cannot go stale. See docs/scaling.md.

Under ``scaling="hook"``, SGS multiplies the gradient of a conv's weight element-wise by the spatial matrix S (spec §1). sgs_fx does
it with a tensor hook on the weight Parameter the conv actually uses: the hook runs in the backward pass,
on each incoming gradient *before* it is accumulated into ``.grad``, so micro-batches are each scaled once
(``.grad = S ⊙ Σ G``), DDP and FSDP2 reduce the scaled gradient, and GradScaler's unscaling commutes with it.
The hook is ``S.mul``: a C method, so the backward pass gains one multiplication per conv and no Python
frame. That is what makes SGS as cheap as a plain step when a step
is bound by host-side per-op work (small models, GPUs): the first version's autograd.Function cost two
Python calls per conv per step (1.28-1.33x an eager GPU step).

A hook lives on a Parameter *object*, and wrappers replace those objects (FSDP2's unsharded parameter,
``load_state_dict(assign=True)``, ``to()`` with swapped tensors, copies, ``torch.func.functional_call``).
So the conv checks, at every eager forward, that the hook sits on the weight and S it is about to use, and
re-attaches it otherwise (two identity tests); ``_apply``, ``_load_from_state_dict``, ``__setattr__`` and
unpickling re-attach it eagerly, which covers ``torch.compile``, whose traced forward cannot run the check.

``nn.DataParallel`` replicates every module at every forward onto broadcast copies of the weights, whose
gradients autograd sums into the original Parameters: replicas leave the hook to the original (see
``_replicate``). Under ``torch.nn.utils.prune`` the trained tensor is ``weight_orig``, and the hook sits there.

Where one Parameter feeds several SGS convs (tied weights), a single hook cannot give each use its own S:
those convs scale *per use* instead, with ``scale_grad`` (an autograd function in the forward graph, exact
and slower), so the tied weight gets S₁ ⊙ G₁ + S₂ ⊙ G₂.

An instrumented conv is the *same module object* with its class swapped for an SGS subclass of its own
class, so qualified names, parameters, hooks, ``isinstance`` checks and the state_dict stay as they were.
"""
from __future__ import annotations

import copy
import functools
import logging
import warnings
import weakref

import torch
from torch import Tensor, nn
from torch.fx import Proxy
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.utils import parametrize


__all__ = ["scale_grad", "SGSConvMixin", "SGSGraphWeight", "SGSConv1d", "SGSConv2d", "SGSConv3d", "sgs_class_for", "is_sgs_conv",
           "attach_hook", "detach_hook", "scale_dtype", "GradState", "grad_state", "stepped_tensor"]

logger = logging.getLogger("sgs_fx")

SCALE_BUFFER = "sgs_scale"


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, ``grad * scale`` backward; ``scale`` broadcasts over the trailing (spatial) dims."""

    @staticmethod
    def forward(weight: Tensor, scale: Tensor) -> Tensor:
        # A view, not the input itself: autograd then records a proper node for this function.
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (scale,) = ctx.saved_tensors
        return _mul_cast(scale, grad), None


def scale_grad(weight: Tensor, scale: Tensor) -> Tensor:
    """Return ``weight`` unchanged; its gradient is multiplied by ``scale`` in backward (per use).

    Args:
        weight: conv kernel, shape (C_out, C_in/groups, K_1, ..., K_n).
        scale: S, shape (K_1, ..., K_n), broadcast over both channel dims.
    """
    return _ScaleGrad.apply(weight, scale)


def scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """S is kept in float32 at least: a bf16 S would be off by up to 4e-3 from the S that was set."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


def _mul_cast(scale: Tensor, grad: Tensor) -> Tensor:
    """S ⊙ G in G's dtype, rounded once: a half-precision G is multiplied by the float32 S (as the official
    in-place multiply of ``.grad`` does), not by S rounded to half first."""
    return torch.mul(grad, scale).to(grad.dtype)


class _HookState:
    """Which weight tensor and which S a conv's hook was attached for, and its handle.

    Strong references, not weakrefs: ``torch.utils.swap_tensors`` (``to()`` under
    ``torch.__future__.set_swap_module_params_on_conversion``) refuses tensors that have weakrefs.
    """

    __slots__ = ("param", "scale", "handle", "hooked", "impl", "at_step")

    def __init__(self, param, scale, handle, at_step=False):
        self.param, self.scale, self.handle = param, scale, handle
        # the weight's gradient is scaled without per-use work: by the hook, or (scaling="step") by the step
        self.hooked = handle is not None or at_step
        self.at_step = at_step
        # torch.utils.swap_tensors keeps the Parameter object and gives it another C++ tensor, without the hook
        self.impl = param._cdata if param is not None else None


class GradState:
    """``scaling="step"``: what the optimizer's step needs to know about an SGS weight's ``.grad``.

    Written only by events: the weight's tensor hook (autograd computed a gradient for it), the step and
    ``sgs_fx.scale_gradients`` (S was applied). It lives on the conv for the conv's whole life — re-attaching the
    hook to a new Parameter object (``to()``, ``load_state_dict(assign=True)``, FSDP2) keeps it — and travels with
    its copies, whose ``.grad`` is copied too.

    * ``pending``: a gradient arrived since S was last applied to ``.grad``; the next step multiplies it by S.
    * ``prescaled``: ``scale_gradients`` applied S and no step of this weight has run since: the hook scales each
      gradient as it arrives, so ``.grad`` stays S ⊙ (everything accumulated), whatever zeroed it in between.
    * ``replayed``: a gradient arrived while a CUDA graph was being captured and no captured step applied S: the
      graph's replays rewrite ``.grad`` with no hook running, so every eager step scales it.
    * ``version``: the stepped tensor's version when ``pending`` was set, for the lost-S warning only.
    """

    __slots__ = ("pending", "prescaled", "replayed", "version")

    def __init__(self):
        self.pending = self.prescaled = self.replayed = False
        self.version = 0

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k in self.__slots__:
            setattr(self, k, state.get(k, getattr(GradState(), k)))


def grad_state(conv: nn.Module) -> GradState:
    """``conv``'s ``GradState`` (created on first use, then kept for the conv's life)."""
    state = conv.__dict__.get("_sgs_grad")
    if state is None:
        state = conv.__dict__["_sgs_grad"] = GradState()
    return state


def stepped_tensor(conv: nn.Module) -> Tensor | None:
    """The Parameter an optimizer steps for ``conv``'s weight: FSDP2's sharded parameter where there is one (the
    conv holds the unsharded one from forward to the end of backward), else the hooked target."""
    sharded = conv.__dict__.get("_sgs_sharded")
    return sharded if sharded is not None else _target_of(conv)


class _StepHook:
    """``scaling="step"``'s tensor hook: notes each gradient in the conv's ``GradState`` and leaves it unchanged —
    unless ``scale_gradients`` put the weight in the prescaled state, where it returns S ⊙ G.

    Holds the conv weakly (a strong reference from the weight's hook back to its module would make a cycle through
    the tensor) and reads S from it at each call, so a new S, however written, is the one used.
    """

    __slots__ = ("conv", "state")

    def __init__(self, conv: nn.Module, state: GradState):
        self.conv, self.state = weakref.ref(conv), state

    def __call__(self, grad: Tensor):
        state = self.state
        conv = self.conv()
        if conv is None:
            return None
        if state.prescaled:
            return _mul_cast(conv._buffers[SCALE_BUFFER], grad)
        if _CUDA[0] and torch.cuda.is_current_stream_capturing():
            state.replayed = True
        w = stepped_tensor(conv)
        version = w._version if w is not None else 0
        if state.pending and version != state.version:
            _warn_unscaled(conv)
        state.pending, state.version = True, version
        return None


_CUDA = [torch.cuda.is_available()]


def _tracing() -> bool:
    # torch.compile and torch.fx trace the forward; the hooks were attached eagerly (see attach_hook's callers)
    return torch.compiler.is_compiling() or is_fx_symbolic_tracing()


# id(weight) -> the conv whose hook is on it: a second conv on the same weight makes both scale per use.
_OWNERS: "dict[int, weakref.ref]" = {}


def hook_target(conv: nn.Module) -> Tensor | None:
    """The trained tensor whose gradient S scales, found without computing anything.

    The ``weight`` Parameter; for a weight under ``torch.nn.utils.parametrize`` (``spectral_norm``,
    ``weight_norm``, orthogonal, ...), the parametrization's original tensor of the kernel's full shape
    (spectral_norm: ``original``; weight_norm: ``original1``, the direction ``v``; its per-channel
    magnitude ``g`` is not a spatial kernel and is left alone). Reading ``conv.weight`` instead would run
    the parametrization, e.g. one spectral-norm power iteration. For a weight pruned with
    ``torch.nn.utils.prune``, ``weight_orig`` (the weight is ``weight_orig * weight_mask``, recomputed by a
    forward pre-hook): its gradient is mask ⊙ G, and S ⊙ mask ⊙ G is the masked S ⊙ G.
    """
    w = conv._parameters.get("weight")
    if w is not None:
        return w
    if is_pruned(conv):
        return conv._parameters["weight_orig"]
    if not parametrize.is_parametrized(conv, "weight"):
        return None
    full = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    originals = [p for n, p in conv.parametrizations.weight.named_parameters(recurse=False) if n.startswith("original")]
    return next((p for p in originals if tuple(p.shape) == full), None)


def is_pruned(conv: nn.Module) -> bool:
    """Whether ``torch.nn.utils.prune`` masks the conv's weight (it then trains ``weight_orig``)."""
    return "weight_orig" in conv._parameters and "weight_mask" in conv._buffers


def _target_of(m: nn.Module) -> Tensor | None:
    return m.__dict__.get("_sgs_param") if isinstance(m, SGSGraphWeight) else hook_target(m)


def _attached_for(m: nn.Module, target: Tensor | None) -> bool:
    """Whether ``m``'s hook state was made for ``target`` and its current S (the eager re-check)."""
    state = m.__dict__.get("_sgs_hook")
    return state is not None and state.param is target and state.scale is m._buffers[SCALE_BUFFER]


# what a copy (deepcopy, pickle) of an SGS module does not take along: its weight is a new tensor
_NOT_COPIED = ("_sgs_hook", "_sgs_sharded")


def _deepcopy_without_hook(module: nn.Module, memo: dict) -> nn.Module:
    """Everything but the hook state is copied; the copy's weight is a new tensor and gets a hook of its own."""
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    new.__dict__.update(copy.deepcopy({k: v for k, v in module.__dict__.items() if k not in _NOT_COPIED}, memo))
    attach_hook(new)
    return new


def attach_hook(conv: nn.Module) -> None:
    """(Re)attach ``conv``'s gradient hook to its current weight Parameter (or graph node's parameter) and S."""
    if "_sgs_replica" in conv.__dict__:
        return  # a DataParallel replica: the original module holds the hook (see _replicate)
    detach_hook(conv)
    w = _target_of(conv)
    s = conv._buffers.get(SCALE_BUFFER)
    if w is None or s is None:
        return
    if not conv.__dict__.get("_sgs_per_use", False):
        other = _OWNERS.get(id(w))
        other = other() if other is not None else None
        if other is not None and other is not conv and is_sgs_conv(other) and _target_of(other) is w:
            for a, b in ((conv, other), (other, conv)):
                # neither an F.conv call (no module runs it) nor torch's parametrization can be scaled per use
                if a.__dict__.get("_sgs_functional") or isinstance(a, _SGSParametrizedMixin):
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
        fn = s.mul if s.dtype == w.dtype and not functional else functools.partial(_mul_cast, s)
        if conv.__dict__.get("_sgs_step", False):
            at_step = True  # the hook only records gradients: any torch.optim step scales .grad (sgs_fx/step.py)
            fn = _StepHook(conv, grad_state(conv))
            if is_dtensor(w):  # FSDP2's sharded parameter, which the optimizer steps while the conv holds another;
                # autograd never computes its gradient (the unsharded parameter's hook records those)
                conv.__dict__["_sgs_sharded"] = w
                _SHARDED_OWNERS[id(w)] = weakref.ref(conv)
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
            key = id(w)
            _OWNERS[key] = weakref.ref(conv, lambda ref, key=key: _OWNERS.pop(key, None) if _OWNERS.get(key) is ref
                                       else None)
    conv.__dict__["_sgs_hook"] = _HookState(w, s, handle, at_step)


def scales_at_step(conv: nn.Module) -> bool:
    """Whether an optimizer's step scales ``conv``'s weight (``scaling="step"``, not per use)."""
    return conv.__dict__.get("_sgs_step", False) and not conv.__dict__.get("_sgs_per_use", False)


# id(sharded parameter) -> the conv it belongs to, under FSDP2 with scaling="step": the conv holds the unsharded
# parameter from forward to the end of backward (or to the step, with reshard_after_backward off), and the
# optimizer's step must still find it from the sharded one it steps.
_SHARDED_OWNERS: "dict[int, weakref.ref]" = {}

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch built without distributed
    _DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


_warned_unscaled = False
_warned_plain = False


def _warn_plain_tensor(conv: nn.Module) -> None:
    global _warned_plain
    if not _warned_plain and torch.is_grad_enabled():
        _warned_plain = True
        warnings.warn(
            f"sgs_fx: {type(conv).__name__} ran with a plain tensor as its weight (torch.func.functional_call, "
            "FSDP1's flat parameters or similar). Under scaling='step' (the default) S is applied when a torch.optim "
            "optimizer steps the Parameter, so a gradient computed for this tensor is the unscaled G. For "
            "functional training, transform with scaling='hook' (S applied to every use in the backward pass); "
            "for sharded training use FSDP2 (torch.distributed.fsdp.fully_shard).", stacklevel=5)


def _warn_unscaled(conv: nn.Module) -> None:
    """``scaling="step"``: a gradient arrives while the last one is still pending (no step and no
    ``scale_gradients`` applied S to it) and the weight changed in between: it was updated with the unscaled
    gradient (a hand-written update, an optimizer outside torch.optim), and S was lost. One warning, naming the way
    out. (Gradient accumulation, and steps that GradScaler skipped, leave the weight unchanged: no warning.)"""
    global _warned_unscaled
    if _warned_unscaled:
        return
    _warned_unscaled = True
    warnings.warn(
        f"sgs_fx: the weight of {type(conv).__name__} changed while its last gradient was still unscaled: no "
        "torch.optim optimizer step applied S to it. Under scaling='step' (the default) only a torch.optim "
        "optimizer's step() applies S: before a hand-written update or another optimizer, call "
        "sgs_fx.scale_gradients(model), or transform with scaling='hook' (S applied in the backward pass). "
        "(If you changed the weights yourself, e.g. re-initialised them, ignore this.)", stacklevel=2)


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
    owner = _OWNERS.get(id(state.param))
    if owner is not None and owner() is conv:
        del _OWNERS[id(state.param)]


def _keep_scale(conv: nn.Module, old: Tensor | None) -> None:
    """After ``to()`` / ``half()`` / ``to_empty()``: S in float32 at least, and valid after materialisation.

    ``half()`` would otherwise round S to fp16, and ``to_empty()`` of a model built on the meta device
    would leave S as uninitialised memory; S then comes from the float64 copy ``set_scales`` keeps. That copy is
    also what a float32 S returns to under ``double()`` — where it still is the S in force (S written into the
    buffer directly, not through ``set_scales``, keeps its own value).
    """
    new, w = conv._buffers.get(SCALE_BUFFER), _target_of(conv)
    if old is None or new is None or w is None or new.is_meta:
        return
    master = conv.__dict__.get("_sgs_master")
    source = old
    if master is not None and (old.is_meta or torch.equal(master.to(old.dtype), old.detach().cpu())):
        source = master
    conv._buffers[SCALE_BUFFER] = source.to(device=new.device, dtype=scale_dtype(w.dtype))


def _replicate(module: nn.Module, make_replica) -> nn.Module:
    """``nn.DataParallel``'s replica of an SGS module (it replicates every module at every forward).

    A replica computes with broadcast copies of the weight, and autograd sums their gradients into the
    original Parameter, where the original's hook scales the sum once. So a replica leaves the hook alone
    (its ``__dict__`` starts as a shallow copy of the original's: re-attaching "its" hook would remove the
    original's, and S would be lost unseen) and scales per use only where the original does (tied or
    computed weights), with its own broadcast copy of S.
    """
    if not _attached_for(module, _target_of(module)):
        attach_hook(module)  # the original's forward, which would re-check, does not run under DataParallel
    state = module.__dict__.get("_sgs_hook")
    per_use = module.__dict__.get("_sgs_per_use", False) or state is None or not state.hooked
    replica = make_replica()
    replica.__dict__.pop("_sgs_hook", None)
    replica.__dict__["_sgs_replica"] = "per_use" if per_use else "hooked"
    return replica


def _replica_weight(conv: nn.Module, w: Tensor) -> Tensor:
    return scale_grad(w, conv._buffers[SCALE_BUFFER]) if conv.__dict__["_sgs_replica"] == "per_use" else w


def _refuse_foreign_trace(conv: nn.Module) -> None:
    # sgs_fx's own tracer keeps SGS convs as leaves; anyone else's fx trace (prepare_qat_fx, symbolic_trace)
    # would inline the conv and leave a graph that nothing instruments any more: S silently gone.
    raise RuntimeError(
        f"sgs_fx: torch.fx is tracing through the SGS-instrumented {type(conv).__name__}, which would inline it "
        "and drop S. Trace (or prepare_qat_fx / prepare_fx) the plain model first and call sgs_fx.transform on "
        "the result; or sgs_fx.strip the model before tracing it")


class SGSConvMixin:
    """An instrumented conv: its weight gradient is scaled by the buffer ``sgs_scale`` (S).

    Used directly when the conv's class keeps torch's own forward; see ``_SGSOwnForwardMixin`` otherwise.
    """

    _sgs_base: type  # the class this SGS class was derived from; `strip` restores it
    _sgs_per_use = False

    def _sgs_weight(self) -> Tensor:
        """The weight for this forward: the Parameter itself, or ``scale_grad(weight, S)`` per use."""
        w = self._parameters.get("weight")
        # The fast path: identity tests only (the hook, or the step's mark, is on this weight and this S).
        state = self.__dict__.get("_sgs_hook")
        if state is not None and state.hooked and state.param is w and state.scale is self._buffers[SCALE_BUFFER]:
            return w
        return self._sgs_weight_slow(w)

    def _sgs_weight_slow(self, w: Tensor | None) -> Tensor:
        if "_sgs_replica" in self.__dict__:
            return _replica_weight(self, self.weight)
        if w is not None and not isinstance(w, nn.Parameter):
            # torch.func.functional_call & co. put a plain tensor in for one call
            if scales_at_step(self):
                _warn_plain_tensor(self)
                return w
            # scaling="hook": scale that use, and leave the Parameter's hook where it is (a compiled forward after
            # the call still relies on it)
            return scale_grad(w, self._buffers[SCALE_BUFFER])
        target = w if w is not None else hook_target(self)  # None: parametrized after transform
        if not _tracing() and not _attached_for(self, target):  # a traced forward cannot register hooks
            attach_hook(self)
        if w is None:  # pruned: the masked weight that torch.nn.utils.prune's pre-hook computed
            w = self.weight
        if self.__dict__.get("_sgs_per_use", False):
            return scale_grad(w, self._buffers[SCALE_BUFFER])
        return w

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Proxy):
            _refuse_foreign_trace(self)
        # _sgs_weight's fast path, inlined: this runs for every conv of every step (identity tests only).
        w = self._parameters.get("weight")
        state = self.__dict__.get("_sgs_hook")
        if state is None or not state.hooked or state.param is not w or state.scale is not self._buffers[SCALE_BUFFER]:
            w = self._sgs_weight_slow(w)
        return self._conv_forward(input, w, self.bias)

    def _apply(self, fn, recurse=True):
        old = self._buffers.get(SCALE_BUFFER)
        out = super()._apply(fn, recurse)
        _keep_scale(self, old)
        attach_hook(self)  # new buffer objects (and with swapped tensors, hooks dropped from the weight)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        attach_hook(self)  # load_state_dict(assign=True) puts new Parameter objects in place

    def _replicate_for_data_parallel(self):
        return _replicate(self, super()._replicate_for_data_parallel)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # (torch.nn.utils.prune sets a masked `weight` at every forward: the hook stays where it is)
        if name in ("weight", SCALE_BUFFER) and SCALE_BUFFER in self.__dict__.get("_buffers", {}) and \
                not _attached_for(self, _target_of(self)):
            attach_hook(self)

    def extra_repr(self) -> str:
        how = "per-use" if self._sgs_per_use else "step" if self.__dict__.get("_sgs_step") else "True"
        return super().extra_repr() + f", sgs={how}"

    # Explicit so that classes with a __deepcopy__ of their own (parametrized modules) copy the same way.
    __deepcopy__ = _deepcopy_without_hook

    def __reduce_ex__(self, protocol):
        # Derived classes are created at run time; pickle (torch.save) rebuilds them by base.
        # The hook state is not copied: a copy's weight is a new tensor and gets its own hook.
        state = {k: v for k, v in self.__getstate__().items() if k not in _NOT_COPIED}
        return _rebuild_sgs_conv, (self._sgs_base,), state

    def __setstate__(self, state):
        super().__setstate__(state)
        attach_hook(self)


class _SGSOwnForwardMixin(SGSConvMixin):
    """For conv subclasses with a forward of their own (timm's same-padding or weight-standardised convs).

    Their forward runs unchanged on the hooked weight. Only when scaling per use (tied weights) does
    ``self.weight`` resolve, inside forward, to ``scale_grad(weight, S)``.
    """

    @property
    def weight(self):
        if "weight" in self._parameters:
            w = self._parameters["weight"]
        elif "weight" in self.__dict__:  # a DataParallel replica's broadcast copy, a pruned weight
            w = self.__dict__["weight"]
        else:  # between prune.remove's delattr and its register_parameter: hasattr must say no
            raise AttributeError(f"{type(self).__name__} has no attribute 'weight'")
        if self.__dict__.get("_sgs_in_forward", False):
            return scale_grad(w, self._buffers[SCALE_BUFFER])
        return w

    @weight.setter
    def weight(self, value):
        # nn.Module.__setattr__ routes Parameters to _parameters; a plain tensor lands here (DataParallel's
        # replicate() sets its broadcast copies this way, torch.nn.utils.prune its masked weight)
        self.__dict__["weight"] = value

    @weight.deleter
    def weight(self):
        if self.__dict__.pop("weight", None) is None:
            raise AttributeError(f"{type(self).__name__} has no attribute 'weight'")

    def forward(self, *args, **kwargs):
        if args and isinstance(args[0], Proxy):
            _refuse_foreign_trace(self)
        replica = self.__dict__.get("_sgs_replica")
        if replica is not None:
            per_call = replica == "per_use"
        else:
            self._sgs_weight()
            w = self._parameters.get("weight")  # None when pruned: the hook on weight_orig scales it
            per_call = self._sgs_per_use or (w is not None and not isinstance(w, nn.Parameter))
        if not per_call:
            return self._sgs_base.forward(self, *args, **kwargs)
        self.__dict__["_sgs_in_forward"] = True
        try:
            return self._sgs_base.forward(self, *args, **kwargs)
        finally:
            self.__dict__["_sgs_in_forward"] = False


class _SGSParametrizedMixin(SGSConvMixin):
    """For convs whose weight is computed by ``torch.nn.utils.parametrize``: the hook sits on the original."""

    def forward(self, *args, **kwargs):
        if args and isinstance(args[0], Proxy):
            _refuse_foreign_trace(self)
        target = hook_target(self)
        if not _tracing() and not _attached_for(self, target):
            attach_hook(self)
        return self._sgs_base.forward(self, *args, **kwargs)


class SGSConv1d(SGSConvMixin, nn.Conv1d):
    _sgs_base = nn.Conv1d


class SGSConv2d(SGSConvMixin, nn.Conv2d):
    _sgs_base = nn.Conv2d


class SGSConv3d(SGSConvMixin, nn.Conv3d):
    _sgs_base = nn.Conv3d


_TORCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_STATIC = {nn.Conv1d: SGSConv1d, nn.Conv2d: SGSConv2d, nn.Conv3d: SGSConv3d}
_DERIVED: dict[type, type] = {}


def _keeps_torch_forward(cls: type) -> bool:
    base = next((c for c in cls.__mro__ if c in _TORCH_CONVS), None)
    return base is not None and cls.forward is base.forward and cls._conv_forward is base._conv_forward


def sgs_class_for(cls: type) -> type:
    """The SGS class for conv class ``cls`` (created once per class and cached)."""
    if cls in _STATIC:
        return _STATIC[cls]
    if cls not in _DERIVED:
        if getattr(cls, "__module__", "") == parametrize.__name__ or cls.__name__.startswith("Parametrized"):
            mixin = _SGSParametrizedMixin  # torch.nn.utils.parametrize's injected class
        elif _keeps_torch_forward(cls):
            mixin = SGSConvMixin
        else:
            mixin = _SGSOwnForwardMixin
        _DERIVED[cls] = type(f"SGS{cls.__name__}", (mixin, cls), {"_sgs_base": cls, "__module__": __name__})
    return _DERIVED[cls]


def _rebuild_sgs_conv(base: type) -> nn.Module:
    cls = sgs_class_for(base)
    return cls.__new__(cls)


def is_sgs_conv(module: nn.Module) -> bool:
    """An SGS-instrumented conv: a conv module, or the SGS node on a conv node's weight edge in a graph."""
    return isinstance(module, (SGSConvMixin, SGSGraphWeight))


def _reversed_padding(padding, kernel, dilation) -> list[int]:
    """``F.pad`` order (last axis first), as nn.Conv computes ``_reversed_padding_repeated_twice``."""
    if padding == "valid":
        return [0, 0] * len(kernel)
    out = []
    for i in reversed(range(len(kernel))):
        if padding == "same":
            total = dilation[i] * (kernel[i] - 1)
            out += [total // 2, total - total // 2]
        else:
            out += [padding[i]] * 2
    return out


class SGSGraphWeight(nn.Module):
    """The SGS node on the weight edge of a conv node in an fx graph: ``(weight, input) -> weight``.

    Holds S (non-persistent buffer) and the conv's geometry, so that ``get_scales`` / ``set_scales`` and the
    MI scheduler treat it like an SGS conv; the scheduler observes its second argument, the conv's input.
    It scales per use (``scale_grad`` on the edge), never with a hook: the weight's Parameter belongs to
    another module, whose ``to()`` or ``load_state_dict`` replaces or swaps it after this node has been
    visited, so a hook could not be kept on it (and a compiled forward could not re-check it).

    For an ``F.conv*d`` call of an ordinary module (``_sgs_functional``), no graph runs this node: it holds
    S and the hook on the owner's parameter, re-checked by the owner's forward pre-hook and after its
    ``load_state_dict`` (see ``passes/functional.py``).
    """

    mi_input = 1  # which forward argument is the conv's input

    def __init__(self, param: Tensor, *, stride, padding, dilation, groups):
        super().__init__()
        n = param.dim() - 2
        tup = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n  # noqa: E731
        self.kernel_size = tuple(param.shape[2:])
        self.stride, self.dilation, self.groups = tup(stride), tup(dilation), int(groups)
        self.padding = padding if isinstance(padding, str) else tup(padding)
        self.padding_mode = "zeros"
        self.in_channels, self.out_channels = param.shape[1] * self.groups, param.shape[0]
        self._reversed_padding_repeated_twice = _reversed_padding(self.padding, self.kernel_size, self.dilation)
        self.register_buffer(SCALE_BUFFER, torch.ones(self.kernel_size, dtype=scale_dtype(param.dtype),
                                                      device=param.device), persistent=False)
        self.__dict__["_sgs_master"] = torch.ones(self.kernel_size, dtype=torch.float64)

    def attach(self, param: Tensor) -> None:
        self.__dict__["_sgs_param"] = param
        attach_hook(self)

    def detach(self) -> None:
        detach_hook(self)
        self.__dict__.pop("_sgs_param", None)

    def forward(self, weight: Tensor, input: Tensor) -> Tensor:
        if isinstance(weight, Proxy):
            _refuse_foreign_trace(self)
        if weight is not self.__dict__.get("_sgs_param") and isinstance(weight, nn.Parameter) and not _tracing():
            self.attach(weight)  # a new Parameter (load_state_dict(assign=True)): for ties and the Adam check
        return scale_grad(weight, self._buffers[SCALE_BUFFER])

    def _apply(self, fn, recurse=True):
        old = self._buffers.get(SCALE_BUFFER)
        out = super()._apply(fn, recurse)
        _keep_scale(self, old)
        attach_hook(self)
        if self.__dict__.get("_sgs_functional") and torch.__future__.get_swap_module_params_on_conversion():
            # the owner swaps its parameters after its children: this hook (under scaling="step", the one that records
            # new gradients) is about to be dropped, and only the owner's next eager forward re-attaches it (a
            # compiled forward refuses until then)
            self.__dict__["_sgs_swapped"] = True
        return out

    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if k not in _NOT_COPIED}

    def __setstate__(self, state):
        super().__setstate__(state)
        if not self.__dict__.get("_sgs_functional", False):
            self.__dict__["_sgs_per_use"] = True  # a node pickled by an earlier version, which hooked its weight
        attach_hook(self)

    __deepcopy__ = _deepcopy_without_hook

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sgs=True"
