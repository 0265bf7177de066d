"""Conv call sites of a model torch.fx cannot trace: one observed forward, or what its Parameters can tell.

Conv *modules* need no trace: ``transform`` walks ``named_modules()``, and instrumentation is local to each conv.
An ``F.conv*d(x, self.kernel)`` call of an ordinary module has no module to find. Given example inputs, one real
forward finds every such call: a torch function mode records each conv call made outside a conv module's own
forward whose weight is a Parameter of the model, with its geometry (the same ``(parameter, geometry)`` pairs a
trace gives, for ``instrument_functional``). That forward leaves no trace, as MI calibration's: eval mode,
no_grad, every buffer and the RNG restored (``batches.leave_no_trace``).

Without example inputs the Parameters bound what can be missed: an ``F.conv1d/2d/3d`` kernel has 3 dims or more,
so only a Parameter of that shape that no conv module owns can be one (``loose_kernels``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch._ops import OpOverload, OpOverloadPacket
from torch.nn.parameter import is_lazy
from torch.overrides import TorchFunctionMode

from ..batches import call, leave_no_trace, to_model
from ..graph_weight import SGSGraphWeight
from ..ownership import hook_target
from .functional import CONV_FUNCTIONS
from .graph import call_geometry
from .select import is_conv_module


@dataclass
class Observed:
    """What one forward showed.

    Attributes:
        order: qualified names of conv modules in the order of their first call.
        calls: ``(parameter, geometry)`` of each distinct ``F.conv*d`` call whose weight is a Parameter, in call
            order (geometry: stride / padding / dilation / groups).
    """

    order: list[str] = field(default_factory=list)
    calls: list[tuple[str, dict]] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)


def other_conv(func) -> bool:
    """A conv function sgs_fx does not instrument (``torch.convolution``, ``torch.ops.aten.conv2d``, ...)."""
    # (an op overload's name carries its overload after a dot: "convolution.default")
    return func not in CONV_FUNCTIONS and "conv" in getattr(func, "__name__", "").split(".")[0]


def function_name(func) -> str:
    return str(func) if isinstance(func, (OpOverload, OpOverloadPacket)) else f"torch.{func.__name__}"


class _RecordConvCalls(TorchFunctionMode):
    """Records the conv calls made with a Parameter of the model while no conv module's forward is running."""

    def __init__(self, params: dict, depth: list[int], kernels: set[int]):
        super().__init__()
        self.params = params  # id(parameter) -> (qualified name, parameter)
        self.depth = depth  # [number of conv module forwards running]
        self.kernels = kernels  # ids of the conv modules' own kernels
        self.calls: dict[tuple, tuple[str, dict]] = {}
        self.unsupported: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONV_FUNCTIONS or other_conv(func):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            hit = self.params.get(id(weight))
            if hit is not None and hit[1] is weight and id(weight) not in self.kernels:
                if func in CONV_FUNCTIONS and not self.depth[0]:
                    geometry = call_geometry(func, args, kwargs)
                    self.calls.setdefault((hit[0], repr(geometry)), (hit[0], geometry))
                else:  # another function, or inside a conv module's own forward (a second kernel of its own)
                    where = " inside a conv module's forward" if func in CONV_FUNCTIONS else ""
                    self.unsupported.setdefault(hit[0], function_name(func) + where)
        return func(*args, **kwargs)


def observe_conv_calls(model: nn.Module, example_inputs) -> Observed:
    """Run ``model`` once on ``example_inputs`` (a tuple: positional arguments; a dict: keyword arguments;
    anything else: the one argument), leaving no trace, and return the conv calls it made."""
    params = {id(p): (name, p) for name, p in model.named_parameters()}
    seen = Observed()
    depth = [0]

    def enter(mod, args, name):
        seen.order.append(name)
        depth[0] += 1

    def leave(mod, args, out):
        depth[0] -= 1

    handles = []
    kernels = set()
    for name, m in model.named_modules():
        if is_conv_module(m):
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: enter(mod, args, name)))
            handles.append(m.register_forward_hook(leave, always_call=True))
            kernels.add(id(hook_target(m)))
    recorder = _RecordConvCalls(params, depth, kernels)
    try:
        with leave_no_trace(model), recorder:
            call(model, to_model(example_inputs, model))
    except Exception as e:
        raise RuntimeError(
            f"sgs_fx.transform: torch.fx could not trace {type(model).__name__}, and its forward on example_inputs "
            f"(run in eval mode, to find its F.conv*d calls) failed: {type(e).__name__}: {e}; pass example_inputs the "
            "model accepts (a tuple is the positional arguments, a dict the keyword arguments)") from e
    finally:
        for h in handles:
            h.remove()
    seen.order = list(dict.fromkeys(seen.order))
    seen.calls = list(recorder.calls.values())
    seen.unsupported = list(recorder.unsupported.items())
    return seen


_CONV_OWN = ("weight", "bias", "weight_orig")  # a conv module's own Parameters (weight_orig: pruned)


def extra_kernels(model: nn.Module) -> list[str]:
    """Kernel-shaped Parameters a conv module registers beside its own (a conv subclass with a second kernel): a
    trace keeps the module a leaf, so a conv its forward makes with one is not seen, and gets no S."""
    return [f"{name}.{key}" if name else key for name, m in model.named_modules() if is_conv_module(m)
            for key, p in m._parameters.items() if key not in _CONV_OWN and p is not None and p.dim() >= 3]


def loose_kernels(model: nn.Module) -> list[str]:
    """Parameters with a conv kernel's shape (3 dims or more) that no conv module owns as its kernel and no F.conv S
    holder scales: the only ones an ``F.conv*d`` call could use as its weight unseen. (A second kernel that a conv
    subclass registers beside its weight is one: its own forward may convolve with it.)"""
    owned = {id(p) for m in model.modules() if is_conv_module(m)
             for name, p in m.named_parameters() if "." in name or name in _CONV_OWN}
    owned |= {id(m.__dict__.get("_sgs_param")) for m in model.modules() if isinstance(m, SGSGraphWeight)}
    return [name for name, p in model.named_parameters()
            if id(p) not in owned and not is_lazy(p) and p.dim() >= 3]
