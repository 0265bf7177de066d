"""Remove all instrumentation: SGS convs get their original class back, branched blocks are folded."""
from __future__ import annotations

from torch import fx, nn

from ..hooks import detach_hook
from ..record import settle
from ..ownership import SCALE_BUFFER, is_sgs_conv
from .functional import strip_functional
from .graph import strip_graph
from .copying import copy_model
from .select import replace_everywhere, unwrap


def strip(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` as a plain model again (a copy unless ``inplace=True``).

    The result's state_dict keys equal those of the never-transformed model; a model that was never
    transformed comes back unchanged (as a copy unless ``inplace``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sgs_fx.strip expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy_model(model, "sgs_fx.strip")  # (a copy holds no gradients)
    root = unwrap(model)
    for m in root.modules():  # a gradient still waiting for its step gets S now: no step would apply it after
        if is_sgs_conv(m):
            settle(m)
    if isinstance(root, fx.GraphModule):
        strip_graph(root)
    strip_functional(root)
    for name, m in list(root.named_modules()):
        if is_sgs_conv(m):
            _strip_sgs(m)
        elif getattr(m, "_sgs_leaf", False):
            replace_everywhere(root, m, m.fold())
    return model


def _strip_sgs(conv: nn.Module) -> None:
    detach_hook(conv)
    conv.__class__ = conv._sgs_base
    del conv._buffers[SCALE_BUFFER]
    for key in ("_sgs_order", "_sgs_in_forward", "_sgs_per_use", "_sgs_step", "_sgs_sharded", "_sgs_master",
                "_sgs_grad", "cls_to_become"):
        conv.__dict__.pop(key, None)
