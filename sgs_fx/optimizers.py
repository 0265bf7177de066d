"""One warning when an adaptive optimizer steps SGS-instrumented weights; one error when an optimizer that
was not given to ``sgs_fx.attach_optimizer`` steps weights that only such an optimizer scales.

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
# ... and a second mark on a weight that only an optimizer's step scales (transform(..., scaling="step"))
STEP_MARK = "_sgs_at_step"
_CHECKED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, bool]" = weakref.WeakKeyDictionary()
# the optimizers given to sgs_fx.attach_optimizer (see sgs_fx/step.py)
STEP_OPTIMIZERS: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_hook = None


def register_scaled(param: Tensor, at_step: bool = False) -> None:
    """Mark ``param`` as a weight whose gradient SGS scales (and install the check once)."""
    global _hook
    param.__dict__[_MARK] = True
    if at_step:
        param.__dict__[STEP_MARK] = True
    else:
        param.__dict__.pop(STEP_MARK, None)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check)


def unregister_scaled(param: Tensor) -> None:
    param.__dict__.pop(_MARK, None)
    param.__dict__.pop(STEP_MARK, None)


def in_step_optimizer(param: Tensor) -> bool:
    """Whether an optimizer given to ``sgs_fx.attach_optimizer`` steps this very Parameter object."""
    return any(p is param for opt in list(STEP_OPTIMIZERS) for g in opt.param_groups for p in g["params"])


def holds_step_weights(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` steps a weight that only an attached optimizer's step scales."""
    return any(p.__dict__.get(STEP_MARK, False) for g in optimizer.param_groups for p in g["params"])


def _check(optimizer, args, kwargs):
    if optimizer in _CHECKED:
        return None
    if optimizer not in STEP_OPTIMIZERS and holds_step_weights(optimizer):
        # Not marked as checked: every step of this optimizer raises until it is attached.
        raise RuntimeError(
            f"sgs_fx: this {type(optimizer).__name__} steps conv weights transformed with scaling='step', whose "
            "gradients only an optimizer given to sgs_fx.attach_optimizer scales; call "
            "sgs_fx.attach_optimizer(optimizer) before training (or transform with scaling='hook')")
    _CHECKED[optimizer] = True
    if isinstance(optimizer, ADAPTIVE) and any(p.__dict__.get(_MARK, False) for g in optimizer.param_groups for p in g["params"]):
        logger.warning(
            "sgs_fx: %s steps SGS-instrumented weights; SGS is defined for SGD (plain, momentum, Nesterov). "
            "Adaptive optimizers normalise each coordinate and almost cancel the spatial scaling.",
            type(optimizer).__name__,
        )
    return None
