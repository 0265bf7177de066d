"""SGS for ``F.conv*d`` calls made by an ordinary module with one of its own parameters.

A hyper-network layer, a dynamic or modulated conv written as ``F.conv2d(x, self.kernel, padding=1)`` has no
conv module to swap. The trace finds the call and its geometry; the parameter gets the same gradient hook
as an SGS conv, held by an ``SGSGraphWeight`` registered next to it (``<owner>.sgs_<param>``: S is a
non-persistent buffer, so the state_dict keys do not change). A forward pre-hook on the owner re-checks
the hook at every eager forward (wrappers replace Parameter objects), and during calibration a torch
function mode hands the MI scheduler the input of every conv call made with the parameter.
One S per parameter: several calls with it share it, and the MI pools their inputs.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..graph_weight import SGSGraphWeight
from ..hooks import attached_for, tracing
from ..ownership import is_sgs_conv, target_of

logger = logging.getLogger("sgs_fx")

CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
PREFIX = "sgs_"


def _check_hooks(owner: nn.Module, args) -> None:
    """Forward pre-hook of an owner: its SGS weights sit on its current Parameters (module-level: picklable)."""
    if tracing():
        for mod, param in _holders_and_params(owner):
            if mod.__dict__.get("_sgs_swapped", False):
                # after to() with swapped tensors the hook is gone, and a traced forward cannot re-attach it
                raise RuntimeError(
                    f"sgs_fx: the gradient hook of {type(owner).__name__}'s F.conv kernel was dropped by a tensor swap "
                    "(to() or load_state_dict under torch.__future__.set_swap_module_params_on_conversion); run "
                    "one eager forward before the compiled one")
        return
    for mod, param in _holders_and_params(owner):
        # same object, other C++ tensor: torch.utils.swap_tensors (to() / load_state_dict under
        # torch.__future__.set_swap_module_params_on_conversion) dropped the hook
        if not (attached_for(mod, param) and mod.__dict__["_sgs_hook"].impl == param._cdata):
            mod.attach(param)
        mod.__dict__.pop("_sgs_swapped", None)


def _reattach_after_load(owner: nn.Module, incompatible_keys) -> None:
    """Load-state-dict post-hook of an owner: ``assign=True`` or swapped tensors leave the hook behind, and a
    compiled forward cannot re-check it, so re-attach now."""
    for mod, param in _holders_and_params(owner):
        mod.attach(param)


def _holders_and_params(owner: nn.Module):
    """(S holder, the owner's current Parameter it scales) for each instrumented F.conv parameter of ``owner``."""
    for child in owner.__dict__.get("_sgs_functional_children", ()):
        param = owner._parameters.get(child[len(PREFIX):])
        if isinstance(param, nn.Parameter):
            yield owner._modules[child], param


def instrument_functional(model: nn.Module, sites, selected, start: int, at_step: bool = False) -> list[str]:
    """Hook every selected parameter that ``F.conv*d`` calls use as their weight; returns the new names."""
    names = []
    # A parameter already scaled by an SGS conv (or an earlier call under another name) keeps that one hook:
    # one S per parameter, S ⊙ (G_conv + G_call). A second hook would scale twice; per-use scaling would
    # need the call itself, which no module runs here.
    taken = {id(target_of(m)): name for name, m in model.named_modules() if is_sgs_conv(m)}
    shared = []
    for param_name, geometry in sites:
        owner_name, _, leaf = param_name.rpartition(".")
        owner = model.get_submodule(owner_name)
        child = PREFIX + leaf
        param = owner._parameters.get(leaf)
        if param is None or child in owner._modules or param.dim() < 3:
            continue
        if id(param) in taken:
            shared.append(f"{param_name} (S of {taken[id(param)]})")
            continue
        mod = SGSGraphWeight(param, **geometry)
        if not selected(param_name, mod):
            continue
        owner.add_module(child, mod)
        mod._sgs_order = start + len(names)
        mod.__dict__["_sgs_functional"] = True
        if at_step:  # scaling="step": the optimizer's step scales the parameter, which no wrapper can unhook
            mod.__dict__["_sgs_step"] = True
        mod.attach(param)
        if not owner.__dict__.get("_sgs_functional_children"):
            owner.__dict__["_sgs_hook_id"] = owner.register_forward_pre_hook(_check_hooks).id
            owner.__dict__["_sgs_load_hook_id"] = owner.register_load_state_dict_post_hook(_reattach_after_load).id
            owner.__dict__["_sgs_functional_children"] = []
        owner.__dict__["_sgs_functional_children"].append(child)
        names.append(f"{owner_name}.{child}" if owner_name else child)
        taken[id(param)] = names[-1]
    if shared:
        logger.warning("sgs_fx.transform: F.conv calls with a weight that an SGS conv already scales share its S "
                       "(one S per parameter: S * (G1 + G2)): %s", "; ".join(shared[:5]))
    return names


def strip_functional(model: nn.Module) -> None:
    """Remove the hooks, the S holders and the owners' pre-hooks."""
    for owner in list(model.modules()):
        children = owner.__dict__.pop("_sgs_functional_children", None)
        if not children:
            continue
        for child in children:
            owner._modules[child].detach()
            del owner._modules[child]
        owner._forward_pre_hooks.pop(owner.__dict__.pop("_sgs_hook_id", None), None)
        owner._load_state_dict_post_hooks.pop(owner.__dict__.pop("_sgs_load_hook_id", None), None)


class ObserveFunctionalConvs(TorchFunctionMode):
    """During calibration: pass the input of every conv call whose weight is an instrumented parameter to its
    observer, and the input of the first conv op inside the forward of each conv module on ``inside`` (a stack of
    ``[observer, state, module input, module]`` entries; state 0: no conv op yet, 1: observed, 2: the module input
    is observed instead; see ``observe_conv_ops``)."""

    def __init__(self, observers: dict, inside: list | None = None):
        super().__init__()
        self.observers = observers  # id(parameter) -> (parameter, observer)
        self.inside = inside if inside is not None else []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONV_FUNCTIONS:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            entry = self.observers.get(id(weight))
            if entry is not None and entry[0] is weight:
                entry[1](x)
            elif self.inside and self.inside[-1][1] == 0:
                entry = self.inside[-1]
                padding = args[4] if len(args) > 4 else kwargs.get("padding", 0)
                if _same_padding(padding, entry[3]):
                    entry[0](x)  # the map that conv module's own forward convolves (padded there, maybe)
                    entry[1] = 1
                else:  # torch's _conv_forward padded it (padding_mode): the estimator pads the module input itself
                    entry[1] = 2
        return func(*args, **kwargs)


def _same_padding(op_padding, conv: nn.Module) -> bool:
    """Whether a conv op pads as the module's geometry says (then its input is the map the estimator pads)."""
    mine = conv.padding
    if isinstance(op_padding, str) or isinstance(mine, str):
        return op_padding == mine
    n = len(conv.kernel_size)
    as_tuple = lambda p: tuple(p) if isinstance(p, (tuple, list)) else (int(p),) * n  # noqa: E731
    return as_tuple(op_padding) == as_tuple(mine) and (conv.padding_mode == "zeros" or not any(as_tuple(mine)))


def observe_conv_ops(modules: dict, observers: dict, inside: list) -> list:
    """Hooks that make each module in ``modules`` (name -> conv with a forward of its own) report, through
    ``ObserveFunctionalConvs(..., inside)``, the input of the conv op its forward calls — timm's ``Conv2dSame`` pads
    its input there and convolves with padding 0 — or, if its forward calls none, its own input."""
    handles = []
    for name, m in modules.items():
        def enter(mod, args, fn=observers[name]):
            inside.append([fn, 0, args[0] if args else None, mod])  # state 0: no conv op seen yet

        def leave(mod, args, out):
            fn, state, x, _ = inside.pop()
            if state != 1 and x is not None:
                fn(x)

        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave, always_call=True))
    return handles
