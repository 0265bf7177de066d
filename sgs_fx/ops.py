"""The autograd op and the instrumented conv modules.

`scale_grad(weight, scale)` is the whole of SGS at training time: an identity in the forward pass and
an element-wise multiplication of the incoming gradient by the spatial matrix S in the backward pass.
It sits in the forward graph of the conv module (not in a parameter hook), which keeps it exact under
gradient accumulation, DDP, FSDP2, autocast and `torch.compile` (see DESIGN.md).

An instrumented conv is the *same module object* with its class swapped for an SGS subclass of its own
class, so qualified names, parameters, hooks, `isinstance` checks and the state_dict stay as they were.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .optimizers import register_scaled

__all__ = ["scale_grad", "SGSConvMixin", "SGSConv1d", "SGSConv2d", "SGSConv3d", "BranchedConv", "sgs_class_for",
           "is_sgs_conv"]

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

    def __setstate__(self, state):
        super().__setstate__(state)
        register_scaled(self._parameters["weight"])  # a copy's weight is a new tensor: the Adam check must know it


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


class BranchedConv(nn.Module):
    """A conv trained as a linear multi-branch block: out = Σ_i α_i conv(x, M_i ⊙ V_i) + bias (spec §2.6).

    Nothing manipulates gradients here: the branches are ordinary parameters, and the SGS dynamics emerge
    from autograd alone, which is what makes this an honest check of the equivalence. A branch on a
    centred window is a real smaller conv (its cost is real); any other mask is a full-size kernel times a
    fixed mask. The input is padded once, as the original conv pads it; a window branch reads it cropped by
    δ·c per side, which keeps output size and alignment under stride and dilation.

    Args:
        conv: the conv to replace; its hyper-parameters, bias and class (for ``fold``) are kept.
        branches: ``sgs_fx.scaling.equivalence.Branch`` list.
        normalise: divide every α by √mean(Σ α² M) so that S_raw has mean 1 and the block trains with the
            same lr and weight decay as the SGS model (spec §2.6); False keeps the α as given.
    """

    _sgs_leaf = True

    def __init__(self, conv: nn.Module, branches, *, normalise: bool = True):
        super().__init__()
        from .scaling.equivalence import raw_scale

        self.kernel_size = tuple(conv.kernel_size)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.dilation, self.groups = tuple(conv.stride), tuple(conv.dilation), conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        self._conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(self.kernel_size)]
        # The original module, unregistered: `fold` rebuilds a conv of its exact class and settings.
        self.__dict__["_template"] = conv
        self.bias = conv.bias
        m = raw_scale(branches).mean().item() if normalise else 1.0
        w = conv.weight.detach()
        covered = torch.zeros(self.kernel_size, dtype=torch.bool)
        self.branches = nn.ModuleList()
        alphas, self._windows = [], []
        for i, b in enumerate(branches):
            alpha = b.alpha / math.sqrt(m)
            shape = b.window if b.window is not None else self.kernel_size
            # Start: each tap's value goes to the first branch covering it, divided by its α.
            crop = _window_slices(self.kernel_size, shape)
            fresh = (b.mask & ~covered)[crop].to(w.device)
            v = torch.where(fresh, w[(..., *crop)] / alpha, torch.zeros((), dtype=w.dtype, device=w.device))
            covered |= b.mask
            branch = nn.Module()
            branch.weight = nn.Parameter(v, requires_grad=conv.weight.requires_grad)
            self.branches.append(branch)
            alphas.append(alpha)
            self._windows.append(b.window)
            if b.window is None:
                self.register_buffer(f"mask{i}", b.mask.to(device=w.device, dtype=w.dtype), persistent=False)
        if not covered.all():
            raise ValueError("BranchedConv: the branches leave some kernel tap uncovered")
        self.register_buffer("alpha", torch.tensor(alphas, dtype=w.dtype, device=w.device), persistent=False)

    @property
    def weight(self) -> Tensor:
        """The folded kernel Σ α_i (M_i ⊙ V_i), zero-extended to the full window (differentiable)."""
        full = None
        for i, window in enumerate(self._windows):
            term = self._branch_kernel(i)
            if window is not None:
                term = F.pad(term, [p for k, w in zip(reversed(self.kernel_size), reversed(window))
                                    for p in ((k - w) // 2,) * 2])
            full = term if full is None else full + term
        return full

    def _branch_kernel(self, i: int) -> Tensor:
        """α_i (M_i ⊙ V_i) on the branch's own window (the mask is implicit for a window branch)."""
        v = self.branches[i].weight
        return v * (getattr(self, f"mask{i}") * self.alpha[i]) if self._windows[i] is None else v * self.alpha[i]

    @property
    def scale(self) -> Tensor:
        """S of this block: Σ α² M normalised to mean 1 (float64)."""
        s = sum(a ** 2 * self._mask(i).double().cpu() for i, a in enumerate(self.alpha.tolist()))
        return s / s.mean()

    def _mask(self, i: int) -> Tensor:
        if self._windows[i] is None:
            return getattr(self, f"mask{i}").bool()
        from .scaling.equivalence import window_mask

        return window_mask(self.kernel_size, self._windows[i])

    def forward(self, x: Tensor) -> Tensor:
        if any(self._reversed_padding_repeated_twice):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
        out = None
        for i, window in enumerate(self._windows):
            xi = x
            if window is not None:
                crop = tuple(slice(d * (k - w) // 2, x.shape[2 + a] - d * (k - w) // 2)
                             for a, (k, w, d) in enumerate(zip(self.kernel_size, window, self.dilation)))
                xi = x[(slice(None), slice(None), *crop)]
            y = self._conv_fn(xi, self._branch_kernel(i), None, self.stride, 0, self.dilation, self.groups)
            out = y if out is None else out + y
        if self.bias is not None:
            out = out + self.bias.view(1, -1, *([1] * len(self.kernel_size)))
        return out

    def fold(self) -> nn.Module:
        """A conv of the original class and settings whose weight is the folded kernel."""
        import copy

        conv = copy.deepcopy(self._template)
        with torch.no_grad():
            conv.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=self._template.weight.requires_grad)
        conv.bias = self.bias
        return conv

    def extra_repr(self) -> str:
        windows = ["x".join(map(str, w)) if w else "mask" for w in self._windows]
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, branches={windows}"


def _window_slices(kernel, window) -> tuple[slice, ...]:
    """Spatial slices of a centred ``window`` inside ``kernel``."""
    return tuple(slice((k - w) // 2, (k - w) // 2 + w) for k, w in zip(kernel, window))
