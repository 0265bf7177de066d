"""Branch mode: each selected conv becomes a BranchedConv whose SGD dynamics equal SGS with its S."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..branched import BranchedConv
from ..scaling.equivalence import branches_from, level_set_branches
from .registry import validate_scale
from .select import replace_everywhere


def instrument_branches(model: nn.Module, names: list[str], *, start: int, scales: Mapping[str, Tensor] | None,
                        branches) -> None:
    """Replace each named conv by a BranchedConv: from a recipe / branch list, or level sets of ``scales``.

    A conv absent from ``scales`` gets S = ones: one full branch, i.e. a plain conv.
    """
    if scales is not None and branches is not None:
        raise ValueError("transform(mode='branches'): pass either scales= (masked branches) or branches= (a recipe), "
                         "not both")
    unknown = [n for n in (scales or {}) if n not in names]
    if unknown:
        raise ValueError(f"transform(mode='branches'): scales name {unknown[0]!r}, which is not a selected conv")
    by_weight: dict[int, str] = {}
    for name in names:
        other = by_weight.setdefault(id(model.get_submodule(name).weight), name)
        if other != name:
            raise ValueError(
                f"transform(mode='branches'): convs {other!r} and {name!r} share one weight Parameter; separate "
                "branch blocks would train two independent kernels, which is not your model. Untie the weights "
                "or leave one conv out with filter_fn")
    for i, name in enumerate(names):
        conv = model.get_submodule(name)
        kernel = tuple(conv.kernel_size)
        if branches is not None:
            try:
                spec = branches_from(branches, kernel)
            except ValueError as exc:
                raise ValueError(f"transform(mode='branches'): conv {name!r}: {exc}; or leave it out with filter_fn, "
                                 "e.g. lambda name, m: all(k % 2 for k in m.kernel_size)") from exc
        else:
            s = validate_scale(name, scales[name], kernel) if scales and name in scales else torch.ones(kernel)
            spec = level_set_branches(s)
        block = BranchedConv(conv, spec)
        block._sgs_order = start + i
        replace_everywhere(model, conv, block)
