"""Linear multi-branch blocks and their SGS equivalent (spec §2), as pure tensor functions.

A branch is a kernel supported on a fixed mask M (a centred sub-window, or any 0/1 pattern) with a
constant scalar α. Trained by SGD, the folded kernel W = Σ α (M ⊙ V) moves exactly like one conv whose
gradient is scaled by S_raw = Σ α² M; with S = S_raw / m and m = mean(S_raw), that is SGS with S at
learning rate η·m and coupled L2 λ/m.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

RECIPES = ("acb", "repvgg", "skeleton")


@dataclass(frozen=True)
class Branch:
    """One branch: ``mask`` (bool, the full kernel's spatial shape) and its constant scalar ``alpha``.

    ``window`` is the centred sub-window's shape when the mask is one (the branch is then built as a real
    smaller conv), else None.
    """

    mask: Tensor
    alpha: float
    window: tuple[int, ...] | None = None


def window_mask(kernel: Sequence[int], window: Sequence[int]) -> Tensor:
    """The mask of a centred ``window`` inside ``kernel``; each K_a - k_a must be even."""
    kernel, window = tuple(kernel), tuple(window)
    if len(window) != len(kernel) or any(w < 1 or w > k or (k - w) % 2 for k, w in zip(kernel, window)):
        raise ValueError(f"branch window {window} is not a centred sub-window of kernel {kernel} "
                         "(each window size must be <= the kernel's and differ from it by an even number)")
    mask = torch.zeros(kernel, dtype=torch.bool)
    mask[tuple(slice((k - w) // 2, (k - w) // 2 + w) for k, w in zip(kernel, window))] = True
    return mask


def recipe_windows(recipe: str, kernel: Sequence[int]) -> list[tuple[int, ...]]:
    """Centred windows of a named recipe for ``kernel``.

    acb: the full kernel plus, per axis, the centre line along it (2-D: KxK + 1xK + Kx1, ACNet);
    repvgg: the full kernel plus the 1x1 centre; skeleton: the full kernel and every smaller odd centred
    window (5x5 + 3x3 + 1x1, "nested" in the spec). Every recipe needs odd kernel sizes.
    """
    kernel = tuple(kernel)
    if recipe not in RECIPES:
        raise ValueError(f"unknown branch recipe {recipe!r}; use one of {RECIPES} or a list of (window, alpha)")
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"recipe {recipe!r} needs odd kernel sizes, got {kernel}; "
                         "pass scales= instead to build masked branches")
    ones = (1,) * len(kernel)
    if recipe == "repvgg":
        windows = [kernel, ones]
    elif recipe == "acb":
        windows = [kernel] + [tuple(k if a == axis else 1 for a, k in enumerate(kernel)) for axis in range(len(kernel))]
    else:
        windows = [tuple(max(1, k - 2 * i) for k in kernel) for i in range(max(kernel) // 2 + 1)]
    return list(dict.fromkeys(windows))  # e.g. acb on a 1-D kernel: the line is the kernel itself


def branches_from(spec, kernel: Sequence[int]) -> list[Branch]:
    """Branches from a recipe name or a list of ``(window_shape_or_mask, alpha)`` pairs."""
    kernel = tuple(kernel)
    if isinstance(spec, str):
        return [Branch(window_mask(kernel, w), 1.0, w) for w in recipe_windows(spec, kernel)]
    out = []
    for item in spec:
        shape_or_mask, alpha = item
        if not math.isfinite(float(alpha)) or float(alpha) == 0:
            raise ValueError(f"branch scalar alpha must be finite and non-zero, got {alpha}")
        if isinstance(shape_or_mask, Tensor):
            mask = shape_or_mask.to(torch.bool).cpu()
            if tuple(mask.shape) != kernel or not mask.any():
                raise ValueError(f"branch mask must have the kernel's shape {kernel} and at least one tap")
            out.append(Branch(mask, float(alpha)))
        else:
            w = tuple(shape_or_mask)
            out.append(Branch(window_mask(kernel, w), float(alpha), w))
    if not out:
        raise ValueError("a branched block needs at least one branch")
    return out


def level_set_branches(scale: Tensor) -> list[Branch]:
    """Masked branches with Σ α_j² M_j = S exactly (spec §2.6): M_j = [S >= v_j], α_j = √(v_j − v_{j−1}).

    M_1 is the full window; the number of branches is the number of distinct values of S.
    """
    s = scale.detach().to(torch.float64).cpu()
    values = torch.unique(s).tolist()
    out, previous = [], 0.0
    for v in values:
        mask = s >= v
        full = bool(mask.all())
        out.append(Branch(mask, math.sqrt(v - previous), tuple(s.shape) if full else None))
        previous = v
    return out


def raw_scale(branches: Sequence[Branch]) -> Tensor:
    """S_raw = Σ α² M (float64)."""
    return sum(b.alpha ** 2 * b.mask.to(torch.float64) for b in branches)


def equivalent_scales(branches, kernel: Sequence[int] = (3, 3)) -> tuple[Tensor, float]:
    """The SGS matrix S (mean 1) and learning-rate factor m = mean(Σ α² M) of a linear branch block.

    Args:
        branches: a recipe name ("acb", "repvgg", "skeleton"), or a list of ``(window_shape_or_mask, alpha)``.
        kernel: the full kernel's spatial shape (for recipe names and window shapes).

    Returns:
        (S, m): training the branches with SGD at (lr η, coupled L2 λ) equals SGS with S at lr η·m and
        L2 λ/m. E.g. ACB 3x3: S = [[1,2,1],[2,3,2],[1,2,1]] / (5/3), m = 5/3.
    """
    s_raw = raw_scale(branches_from(branches, kernel))
    m = s_raw.mean().item()
    if not (s_raw > 0).all():
        raise ValueError("the branches leave some tap uncovered: S would be 0 there (a frozen tap), which SGS excludes")
    return s_raw / m, m
