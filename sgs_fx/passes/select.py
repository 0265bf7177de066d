"""Which modules count as convs, which are selected by default, and how to reach them in a wrapped model."""
from __future__ import annotations

from typing import Callable

from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..graph_weight import SGSGraphWeight

FilterFn = Callable[[str, nn.Module], bool]


def is_plain_conv(m: nn.Module) -> bool:
    """A forward (not transposed) ``nn.Conv1d/2d/3d`` or subclass, or ``torchvision.ops.DeformConv2d`` (its weight
    is a conv kernel); the paper defines no pairing for transposed convs."""
    return (isinstance(m, _ConvNd) and not m.transposed) or is_deform_conv(m)


def is_conv_module(m: nn.Module | None) -> bool:
    """A module whose forward is one conv of its own weight (any ``_ConvNd``, transposed too; a DeformConv2d; an
    instrumented block): the tracer keeps it as a leaf, and a conv call inside its forward is its own."""
    return isinstance(m, _ConvNd) or is_deform_conv(m) or getattr(m, "_sgs_leaf", False)


def is_deform_conv(m: nn.Module) -> bool:
    return any(c.__name__ == "DeformConv2d" and c.__module__.startswith("torchvision.ops") for c in type(m).__mro__)


def default_filter(name: str, m: nn.Module) -> bool:
    """The paper's selection: every conv (module, or conv node of a graph) all of whose spatial kernel dims are > 1.

    1xK / Kx1 convs are left alone (a user ``filter_fn`` may select them: S then has shape (1, K));
    1x1 convs would get S = [[1]], a no-op; even kernels (2x2, 4x4 patch stems) are selected.
    """
    return (is_plain_conv(m) or isinstance(m, SGSGraphWeight)) and all(k > 1 for k in m.kernel_size)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            return model


def replace_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.<qualname>`` is (the name stays, so state_dict keys keep their prefix)."""
    if not qualname:
        raise ValueError("sgs_fx: cannot replace the root module itself; transform or strip its parent instead")
    parent, _, child = qualname.rpartition(".")
    setattr(root.get_submodule(parent), child, new)


def replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every place ``old`` is registered: a module shared by two parents stays shared."""
    names = [n for n, m in root.named_modules(remove_duplicate=False) if m is old]
    for name in names:
        replace_submodule(root, name, new)

