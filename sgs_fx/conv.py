"""The SGS conv classes: an instrumented conv is the same module object with its class swapped for an SGS
subclass of its own class, so qualified names, parameters, hooks, ``isinstance`` checks and the state_dict stay as
they were; ``strip`` swaps the class back.

Three flavours, by how the conv computes: torch's own forward (``SGSConvMixin``: SGSConv1d/2d/3d and subclasses
that keep it), a forward of its own (``SGSOwnForwardMixin``: timm's same-padding or weight-standardised convs) and
a weight computed by ``torch.nn.utils.parametrize`` (``SGSParametrizedMixin``). Each forward runs on the weight the
hook sits on (re-attached where a wrapper replaced it: ``hooks.py``), or on ``scale_grad(weight, S)`` where the
conv scales per use.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.utils import parametrize

from .backward import scale_grad
from .hooks import (NOT_PICKLED, attach_hook, attached_for, deepcopy_without_hook, keep_scale, refuse_foreign_trace,
                    replica_weight, replicate, tracing, warn_plain_tensor)
from .ownership import (SCALE_BUFFER, hook_target, is_sgs_conv, owner_of, scales_at_step, scaled_at_source,
                        target_of)

__all__ = ["SGSConvMixin", "SGSOwnForwardMixin", "SGSParametrizedMixin", "SGSConv1d", "SGSConv2d", "SGSConv3d",
           "sgs_class_for", "rebuild_sgs_conv", "is_sgs_conv"]


class SGSConvMixin:
    """An instrumented conv: its weight gradient is scaled by the buffer ``sgs_scale`` (S).

    Used directly when the conv's class keeps torch's own forward; see ``SGSOwnForwardMixin`` otherwise.
    """

    sgs_role = "conv"  # (see ownership.sgs_role)
    _sgs_base: type  # the class this SGS class was derived from; `strip` restores it
    _sgs_per_use = False

    def _sgs_weight(self) -> Tensor:
        """The weight for this forward: the Parameter itself, or ``scale_grad(weight, S)`` per use."""
        w = self._parameters.get("weight")
        # The fast path: identity tests only (the hook is on this weight and was made for this S).
        state = self.__dict__.get("_sgs_hook")
        if state is not None and state.hooked and state.param is w and state.scale is self._buffers[SCALE_BUFFER]:
            _note_version(state.record, w)
            return w
        return self._sgs_weight_slow(w)

    def _sgs_weight_slow(self, w: Tensor | None) -> Tensor:
        if "_sgs_replica" in self.__dict__:
            return replica_weight(self, self.weight)
        if w is not None and not isinstance(w, nn.Parameter):
            # torch.func.functional_call & co. put a plain tensor in for one call; the Parameter's hook stays where
            # it is (a compiled forward after the call still relies on it)
            return scale_grad(w, self._buffers[SCALE_BUFFER]) if self._scales_plain_tensor(w) else w
        target = w if w is not None else hook_target(self)  # None: parametrized after transform
        if target is None:
            _refuse_unfindable_weight(self)
        hooked = self.__dict__.get("_sgs_hook")
        if isinstance(w, nn.Parameter) and hooked is not None and hooked.param is not w and \
                "_sgs_sharded" not in self.__dict__ and not self.__dict__.get("_sgs_per_use", False):
            # A Parameter the hook is not on, put in place behind the module's back (torch.func.functional_call with
            # another model's Parameters, which torch puts back afterwards; a wrapper writing _parameters): the hook
            # stays on the Parameter the optimizer knows (setattr or load_state_dict move it), and this use is scaled
            # per use, unless the Parameter is another SGS conv's weight, whose own hook scales it. (FSDP2's
            # unsharded parameter, the conv's own, takes the hook: _sgs_sharded.)
            return w if owner_of(w) is not None else scale_grad(w, self._buffers[SCALE_BUFFER])
        if not tracing() and not attached_for(self, target):  # a traced forward cannot register hooks
            attach_hook(self)
        if w is None:  # pruned: the masked weight that torch.nn.utils.prune's pre-hook computed
            w = self.weight
        if self.__dict__.get("_sgs_per_use", False):
            return scale_grad(w, self._buffers[SCALE_BUFFER])
        return w

    def _scales_plain_tensor(self, w: Tensor) -> bool:
        """Whether a plain tensor put in as the weight for one call is scaled per use."""
        hooked = self.__dict__.get("_sgs_hook")
        own = hooked.param if hooked is not None and not self.__dict__.get("_sgs_per_use", False) else None
        if scaled_at_source(w, own):
            # computed from this conv's weight (a cast, added noise, a fast weight) or a twin's: that weight's own
            # scaling applies S to the gradient it receives, once; scaling this use too would make it S² ⊙ G
            return False
        if scales_at_step(self):  # no step of a Parameter would see this gradient
            warn_plain_tensor(self)
            return False
        return True  # scaling="hook": torch.func's gradients of plain tensors are S ⊙ G

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Proxy):
            refuse_foreign_trace(self)
        # _sgs_weight's fast path, inlined: this runs for every conv of every step (identity tests only).
        w = self._parameters.get("weight")
        state = self.__dict__.get("_sgs_hook")
        if state is None or not state.hooked or state.param is not w or state.scale is not self._buffers[SCALE_BUFFER]:
            w = self._sgs_weight_slow(w)
        else:
            record = state.record
            if record is not None and not record.pending and not torch.compiler.is_compiling():
                record.version = w._version  # (_note_version, inlined)
        return self._conv_forward(input, w, self.bias)

    def _apply(self, fn, recurse=True):
        old = self._buffers.get(SCALE_BUFFER)
        out = super()._apply(fn, recurse)
        keep_scale(self, old)
        attach_hook(self)  # new buffer objects (and with swapped tensors, hooks dropped from the weight)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        attach_hook(self)  # load_state_dict(assign=True) puts new Parameter objects in place

    def _replicate_for_data_parallel(self):
        return replicate(self, super()._replicate_for_data_parallel)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # (torch.nn.utils.prune sets a masked `weight` at every forward: the hook stays where it is)
        if name in ("weight", SCALE_BUFFER) and SCALE_BUFFER in self.__dict__.get("_buffers", {}) and \
                not attached_for(self, target_of(self)):
            attach_hook(self)

    def extra_repr(self) -> str:
        how = "per-use" if self._sgs_per_use else "step" if self.__dict__.get("_sgs_step") else "True"
        return super().extra_repr() + f", sgs={how}"

    # Explicit so that classes with a __deepcopy__ of their own (parametrized modules) copy the same way.
    __deepcopy__ = deepcopy_without_hook

    def __reduce_ex__(self, protocol):
        # Derived classes are created at run time; pickle (torch.save) rebuilds them by base.
        # The hook state is not copied: a copy's weight is a new tensor and gets its own hook.
        state = {k: v for k, v in self.__getstate__().items() if k not in NOT_PICKLED}
        return rebuild_sgs_conv, (self._sgs_base,), state

    def __setstate__(self, state):
        super().__setstate__(state)
        attach_hook(self)


def _note_version(record, w: Tensor) -> None:
    """``scaling="step"``: the weight's version as a forward uses it, while no gradient is pending — the lost-S
    warning's reference (``record.check_unchanged``): an update between this forward's backward and the next
    backward (SAM's first half) changes it; a clamp after the step, before this forward, does not."""
    if record is not None and not record.pending and not torch.compiler.is_compiling():
        record.version = w._version


def _refuse_unfindable_weight(conv: nn.Module) -> None:
    raise RuntimeError(
        f"sgs_fx: {type(conv).__name__} has no weight Parameter that SGS can find (the legacy "
        "torch.nn.utils.weight_norm or spectral_norm applied after transform, or `del conv.weight`), so S cannot be "
        "applied to what trains it. Use torch.nn.utils.parametrizations.weight_norm / spectral_norm (supported "
        "before or after transform), or sgs_fx.strip the model, apply the legacy wrapper, and transform again")


class SGSOwnForwardMixin(SGSConvMixin):
    """For conv subclasses with a forward of their own (timm's same-padding or weight-standardised convs).

    Their forward runs unchanged on the hooked weight. Only when scaling per use (tied weights) does
    ``self.weight`` resolve, inside forward, to ``scale_grad(weight, S)``.
    """

    sgs_role = "own_forward"

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
            refuse_foreign_trace(self)
        replica = self.__dict__.get("_sgs_replica")
        if replica is not None:
            per_call = replica == "per_use"
        else:
            w = self._parameters.get("weight")  # None when pruned: the hook on weight_orig scales it
            # (_sgs_weight gives the weight itself unless this use is scaled per use)
            per_call = self._sgs_per_use or (self._sgs_weight() is not w and w is not None)
        if not per_call:
            return self._sgs_base.forward(self, *args, **kwargs)
        self.__dict__["_sgs_in_forward"] = True
        try:
            return self._sgs_base.forward(self, *args, **kwargs)
        finally:
            self.__dict__["_sgs_in_forward"] = False


class SGSParametrizedMixin(SGSConvMixin):
    """For convs whose weight is computed by ``torch.nn.utils.parametrize``: the hook sits on the original."""

    sgs_role = "parametrized"

    def forward(self, *args, **kwargs):
        if args and isinstance(args[0], Proxy):
            refuse_foreign_trace(self)
        target = hook_target(self)
        if not tracing() and not attached_for(self, target):
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
            mixin = SGSParametrizedMixin  # torch.nn.utils.parametrize's injected class
        elif _keeps_torch_forward(cls):
            mixin = SGSConvMixin
        else:
            mixin = SGSOwnForwardMixin
        _DERIVED[cls] = type(f"SGS{cls.__name__}", (mixin, cls), {"_sgs_base": cls, "__module__": __name__})
    return _DERIVED[cls]


def rebuild_sgs_conv(base: type) -> nn.Module:
    cls = sgs_class_for(base)
    return cls.__new__(cls)
