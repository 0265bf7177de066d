"""Remove all instrumentation: SGS convs get their original class back, branched blocks are folded."""
from __future__ import annotations

import copy

from torch import nn

from ..ops import SCALE_BUFFER, is_sgs_conv
from ..optimizers import unregister_scaled
from .select import replace_submodule, unwrap


def strip(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` as a plain model again (a copy unless ``inplace=True``).

    The result's state_dict keys equal those of the never-transformed model; a model that was never
    transformed comes back unchanged (as a copy unless ``inplace``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sgs_fx.strip expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    root = unwrap(model)
    for name, m in list(root.named_modules()):
        if is_sgs_conv(m):
            _strip_sgs(m)
        elif getattr(m, "_sgs_leaf", False):
            replace_submodule(root, name, m.fold())
    return model


def _strip_sgs(conv: nn.Module) -> None:
    unregister_scaled(conv.weight)
    conv.__class__ = conv._sgs_base
    delattr(conv, SCALE_BUFFER)
    conv.__dict__.pop("_sgs_order", None)
    conv.__dict__.pop("_sgs_in_forward", None)

