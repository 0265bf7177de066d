"""The autograd op and the instrumented conv modules.

`scale_grad(weight, scale)` is the whole of SGS at training time: an identity in the forward pass and
an element-wise multiplication of the incoming gradient by the spatial matrix S in the backward pass.
It sits in the forward graph of the conv module (not in a parameter hook), which keeps it exact under
gradient accumulation, DDP, FSDP2, autocast and `torch.compile` (see DESIGN.md).

An instrumented conv is the *same module object* with its class swapped for an SGS subclass of its own
class, so qualified names, parameters, hooks, `isinstance` checks and the state_dict stay as they were.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["scale_grad", "SGSConvMixin", "SGSConv1d", "SGSConv2d", "SGSConv3d", "sgs_class_for", "is_sgs_conv"]

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
        return grad * scale.to(grad.dtype), None


def scale_grad(weight: Tensor, scale: Tensor) -> Tensor:
    """Return ``weight`` unchanged; its gradient is multiplied by ``scale`` in backward.

    Args:
        weight: conv kernel, shape (C_out, C_in/groups, K_1, ..., K_n).
        scale: S, shape (K_1, ..., K_n), broadcast over both channel dims.
    """
    return _ScaleGrad.apply(weight, scale)


_TORCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SGSConvMixin:
    """Forward of a conv whose weight gradient is scaled by the buffer ``sgs_scale`` (S).

    Used when the conv's class keeps torch's own forward: the scaled weight is passed to
    ``_conv_forward``, which handles every padding mode.
    """

    _sgs_base: type  # the class this SGS class was derived from; `strip` restores it

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, scale_grad(self.weight, self.sgs_scale), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", sgs=True"

    def __reduce_ex__(self, protocol):
        # Derived classes are created at run time; pickle (torch.save, deepcopy) rebuilds them by base.
        return _rebuild_sgs_conv, (self._sgs_base,), self.__getstate__()


class _SGSWeightOverrideMixin(SGSConvMixin):
    """For conv subclasses with a forward of their own (timm's same-padding or weight-standardised convs).

    Inside forward, ``self.weight`` resolves to ``scale_grad(weight, S)``, so whatever the subclass does
    with the weight (padding, standardisation) stays intact and the parameter's gradient is S ⊙ G.
    Outside forward, ``self.weight`` is the Parameter itself.
    """

    _sgs_in_forward = False

    @property
    def weight(self):
        w = self._parameters["weight"]
        if self.__dict__.get("_sgs_in_forward", False):
            return scale_grad(w, self._buffers[SCALE_BUFFER])
        return w

    def forward(self, *args, **kwargs):
        self.__dict__["_sgs_in_forward"] = True
        try:
            return self._sgs_base.forward(self, *args, **kwargs)
        finally:
            self.__dict__["_sgs_in_forward"] = False


class SGSConv1d(SGSConvMixin, nn.Conv1d):
    _sgs_base = nn.Conv1d


class SGSConv2d(SGSConvMixin, nn.Conv2d):
    _sgs_base = nn.Conv2d


class SGSConv3d(SGSConvMixin, nn.Conv3d):
    _sgs_base = nn.Conv3d


_STATIC = {nn.Conv1d: SGSConv1d, nn.Conv2d: SGSConv2d, nn.Conv3d: SGSConv3d}
_DERIVED: dict[type, type] = {}


def _keeps_torch_forward(cls: type) -> bool:
    base = next(c for c in cls.__mro__ if c in _TORCH_CONVS)
    return cls.forward is base.forward and cls._conv_forward is base._conv_forward


def sgs_class_for(cls: type) -> type:
    """The SGS class for conv class ``cls`` (created once per class and cached)."""
    if cls in _STATIC:
        return _STATIC[cls]
    if cls not in _DERIVED:
        mixin = SGSConvMixin if _keeps_torch_forward(cls) else _SGSWeightOverrideMixin
        _DERIVED[cls] = type(f"SGS{cls.__name__}", (mixin, cls), {"_sgs_base": cls, "__module__": __name__})
    return _DERIVED[cls]


def _rebuild_sgs_conv(base: type) -> nn.Module:
    cls = sgs_class_for(base)
    return cls.__new__(cls)


def is_sgs_conv(module: nn.Module) -> bool:
    return isinstance(module, SGSConvMixin)
