"""One warning when an adaptive optimizer steps SGS-instrumented weights.

SGS is defined for SGD (plain, momentum, Nesterov, coupled L2). Adam-family optimizers divide each
coordinate by its own second moment and almost cancel a fixed per-element gradient factor (spec §1.5):
sgs_fx warns once per optimizer and does not refuse. The check is a global optimizer step pre-hook, so
it works inside the user's own training loop with nothing to call.
"""
from __future__ import annotations

import logging
import weakref

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

logger = logging.getLogger("sgs_fx")

ADAPTIVE = tuple(
    getattr(torch.optim, n)
    for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "SparseAdam", "Adafactor")
    if hasattr(torch.optim, n)
)

# A mark on the Parameter itself, not a weak reference to it: torch.utils.swap_tensors (used by to() and
# load_state_dict under torch.__future__.set_swap_module_params_on_conversion) refuses tensors with weakrefs.
_MARK = "_sgs_scaled"
_CHECKED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, bool]" = weakref.WeakKeyDictionary()
_hook = None


def register_scaled(param: Tensor) -> None:
    """Mark ``param`` as a weight whose gradient SGS scales (and install the check once)."""
    global _hook
    param.__dict__[_MARK] = True
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check)


def unregister_scaled(param: Tensor) -> None:
    param.__dict__.pop(_MARK, None)


def _check(optimizer, args, kwargs):
    if optimizer in _CHECKED:
        return None
    _CHECKED[optimizer] = True
    if isinstance(optimizer, ADAPTIVE) and any(p.__dict__.get(_MARK, False) for g in optimizer.param_groups for p in g["params"]):
        logger.warning(
            "sgs_fx: %s steps SGS-instrumented weights; SGS is defined for SGD (plain, momentum, Nesterov). "
            "Adaptive optimizers normalise each coordinate and almost cancel the spatial scaling.",
            type(optimizer).__name__,
        )
    return None
