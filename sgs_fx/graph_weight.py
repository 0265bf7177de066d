"""The S holder of a conv that is not a module: the SGS node on a conv node's weight edge in an fx graph, and the
holder of an ``F.conv*d`` call's S (a child of the module that owns the called Parameter)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx import Proxy

from .backward import scale_dtype, scale_grad
from .hooks import (NOT_PICKLED, attach_hook, deepcopy_without_hook, detach_hook, keep_scale, refuse_foreign_trace,
                    tracing)
from .ownership import SCALE_BUFFER

__all__ = ["SGSGraphWeight", "reversed_padding"]


def reversed_padding(padding, kernel, dilation) -> list[int]:
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

    sgs_role = "graph_weight"  # (see ownership.sgs_role)
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
        self._reversed_padding_repeated_twice = reversed_padding(self.padding, self.kernel_size, self.dilation)
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
            refuse_foreign_trace(self)
        if weight is not self.__dict__.get("_sgs_param") and isinstance(weight, nn.Parameter) and not tracing():
            self.attach(weight)  # a new Parameter (load_state_dict(assign=True)): for ties and the Adam check
        return scale_grad(weight, self._buffers[SCALE_BUFFER])

    def _apply(self, fn, recurse=True):
        old = self._buffers.get(SCALE_BUFFER)
        out = super()._apply(fn, recurse)
        keep_scale(self, old)
        attach_hook(self)
        if self.__dict__.get("_sgs_functional") and torch.__future__.get_swap_module_params_on_conversion():
            # the owner swaps its parameters after its children: this hook (under scaling="step", the one that records
            # new gradients) is about to be dropped, and only the owner's next eager forward re-attaches it (a
            # compiled forward refuses until then)
            self.__dict__["_sgs_swapped"] = True
        return out

    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if k not in NOT_PICKLED}

    def __setstate__(self, state):
        super().__setstate__(state)
        if not self.__dict__.get("_sgs_functional", False):
            self.__dict__["_sgs_per_use"] = True  # a node pickled by an earlier version, which hooked its weight
        attach_hook(self)

    __deepcopy__ = deepcopy_without_hook

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sgs=True"
