"""S applied in the backward pass: the per-use autograd function and the multiply every path shares.

``scale_grad`` scales one use of a weight (tied weights, graph nodes, ``torch.func``): an identity forward whose
backward multiplies the incoming gradient by S. ``mul_cast`` is the multiply itself, S ⊙ G rounded once to G's
dtype: the tensor hooks of ``scaling="hook"`` and of a prescaled ``scaling="step"`` weight use it too.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scale_grad", "scale_dtype", "mul_cast"]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, ``grad * scale`` backward; ``scale`` broadcasts over the trailing (spatial) dims."""

    generate_vmap_rule = True  # torch.func.vmap (per-sample gradients): both halves are plain torch ops

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
        return mul_cast(scale, grad), None


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


def mul_cast(scale: Tensor, grad: Tensor) -> Tensor:
    """S ⊙ G in G's dtype, rounded once: a half-precision G is multiplied by the float32 S (as the official
    in-place multiply of ``.grad`` does), not by S rounded to half first."""
    return torch.mul(grad, scale).to(grad.dtype)
