"""BranchedConv: a conv trained as the linear multi-branch block whose SGD dynamics equal SGS (spec §2.6).

Used by ``transform(mode="branches")`` to verify the equivalence numerically; ``strip`` folds it back.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scaling.equivalence import raw_scale, window_mask

__all__ = ["BranchedConv"]


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
