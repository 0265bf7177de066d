"""Fake-quant model -> QDQ graph: what ``export_onnx`` writes for a quantized model.

A model prepared by ``prepare_qat_fx`` (QAT) or by ``sgs_fx.quantize_ptq`` (PTQ) computes in float with
fake-quant modules: activation fake-quants between the ops, a weight fake-quant inside every QAT conv /
linear (after folding its BatchNorm). ``to_qdq`` rewrites a copy into the graph onnxruntime deploys:

* each activation fake-quant -> ``quantized_decomposed.quantize_per_tensor`` -> ``dequantize_per_tensor``
  (the dynamo exporter writes QuantizeLinear / DequantizeLinear), with the scale and zero point the
  fake-quant holds;
* each QAT conv / linear -> a ``QDQConv`` / ``QDQLinear`` that keeps its weight as an int8 buffer
  (BatchNorm folded exactly as the QAT module folds it in eval) and dequantizes it per channel
  (DequantizeLinear on an int8 initializer: the file holds int8 weights). Its bias stays float.

Dequantizing the int8 weight gives back, bit for bit, the weight PyTorch's fake-quant computes; the
activations are quantized with the same scales. What can differ in onnxruntime is only float
summation order (and its int8 kernels' requantisation), which is why export checks top-1 agreement.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

_QDTYPE = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.uint8: torch.uint8, torch.int8: torch.int8}
_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


class UnsupportedQuantizationError(ValueError):
    """The model holds quantization that has no QDQ ONNX form here; the message says what to change."""


def is_fake_quant(m: nn.Module) -> bool:
    from torch.ao.quantization import FakeQuantizeBase

    return isinstance(m, FakeQuantizeBase)


def is_observer(m: nn.Module) -> bool:
    from torch.ao.quantization import ObserverBase

    return isinstance(m, ObserverBase)


def has_quantization(model: nn.Module) -> bool:
    """True when ``model`` holds fake-quant modules, observers or converted quantized modules."""
    return any(is_fake_quant(m) or is_observer(m) or _is_converted(m) for m in model.modules())


def _is_converted(m: nn.Module) -> bool:
    return type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def check_quantized(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` is a fake-quant model that ``to_qdq`` can convert."""
    converted = [n for n, m in model.named_modules() if _is_converted(m)]
    if converted:
        raise UnsupportedQuantizationError(
            f"export_onnx: {converted[0]!r} is a {type(model.get_submodule(converted[0])).__name__} of a converted "
            f"(convert_fx / convert) model, whose packed int8 kernels have no ONNX export; export the fake-quant "
            f"model from before convert_fx (prepare_qat_fx after training, or sgs_fx.quantize_ptq): export_onnx "
            f"writes it as QDQ ONNX")
    fake = [n for n, m in model.named_modules() if is_fake_quant(m)]
    if not fake:
        observers = [n for n, m in model.named_modules() if is_observer(m)]
        raise UnsupportedQuantizationError(
            f"export_onnx: the model holds observers ({', '.join(observers[:3])}{', ...' if len(observers) > 3 else ''}) "
            f"but no fake-quant: a prepare_fx model only records ranges and would export as float. Quantize it with "
            f"sgs_fx.quantize_ptq(float_model, batches) (observers and fake-quant in one step) or train it with "
            f"prepare_qat_fx, then export")
    if not isinstance(model, fx.GraphModule):
        raise UnsupportedQuantizationError(
            f"export_onnx: {type(model).__name__} holds fake-quant modules ({fake[0]!r}) but is not a torch.fx "
            f"GraphModule: only FX graph mode quantization (prepare_qat_fx, sgs_fx.prepare_qat, sgs_fx.quantize_ptq) "
            f"places them where a QDQ graph can be read off; eager-mode QuantStub models are not supported")


def to_qdq(model: fx.GraphModule) -> fx.GraphModule:
    """A copy of the fake-quant GraphModule ``model`` with explicit quantize / dequantize ops and int8 weights.

    Raises:
        UnsupportedQuantizationError: an observer without fake-quant, a converted model, a fake-quant
            whose dtype / scheme has no QuantizeLinear form, or a weighted QAT module of an unknown kind.
    """
    check_quantized(model)
    gm = copy.deepcopy(model).eval()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if is_fake_quant(m):
            _replace_activation(gm, node, m)
        elif is_observer(m):
            raise UnsupportedQuantizationError(
                f"export_onnx: {node.target!r} is an observer ({type(m).__name__}) without fake-quant next to "
                f"fake-quant modules; calibrate with sgs_fx.quantize_ptq or prepare_qat_fx so every range is applied")
        elif getattr(m, "weight_fake_quant", None) is not None:
            _set_module(gm, node.target, _qdq_weighted(node.target, m))
    graph.eliminate_dead_code()
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _qparams(name: str, fq: nn.Module, *, weight: bool):
    dtype = _QDTYPE.get(fq.dtype)
    scheme = fq.qscheme
    allowed = _PER_CHANNEL + _PER_TENSOR if weight else _PER_TENSOR
    if dtype is None or scheme not in allowed:
        what = "weight" if weight else "activation"
        raise UnsupportedQuantizationError(
            f"export_onnx: the {what} fake-quant {name!r} quantizes to {fq.dtype} with {scheme}; QDQ ONNX here takes "
            f"int8 / uint8 {'per-channel or per-tensor' if weight else 'per-tensor'} affine or symmetric "
            f"quantization (sgs_fx.qconfig_mapping() gives one)")
    if int(fq.fake_quant_enabled[0]) == 0:
        return None  # PyTorch passes the tensor through unquantized; so does the export
    return dtype, fq.scale.detach().clone(), fq.zero_point.detach().clone(), int(fq.quant_min), int(fq.quant_max)


def _replace_activation(gm: fx.GraphModule, node: fx.Node, fq: nn.Module) -> None:
    params = _qparams(node.target, fq, weight=False)
    (x,) = node.args
    if params is None:
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        return
    dtype, scale, zp, qmin, qmax = params
    scale, zp = float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])
    info = torch.iinfo(dtype)
    ops = torch.ops.quantized_decomposed
    with gm.graph.inserting_before(node):
        if (qmin, qmax) != (info.min, info.max):
            # QuantizeLinear saturates to the dtype's range; a narrower one (reduce_range) is a clamp first,
            # which rounds to the same integer at the bounds.
            x = gm.graph.call_function(torch.clamp, (x, (qmin - zp) * scale, (qmax - zp) * scale))
        q = gm.graph.call_function(ops.quantize_per_tensor.default, (x, scale, zp, qmin, qmax, dtype))
        dq = gm.graph.call_function(ops.dequantize_per_tensor.default, (q, scale, zp, qmin, qmax, dtype))
    node.replace_all_uses_with(dq)
    gm.graph.erase_node(node)


def _set_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)


def folded_weight_and_bias(m: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The float weight and bias a QAT module feeds its weight fake-quant and adds after it, in eval.

    For the fused Conv-BN modules this is the fold of ``_forward_approximate`` (same expressions, so the
    fake-quantized weight is bit-identical): w * gamma / sqrt(var + eps), and the bias
    beta + (b - mean) * gamma / sqrt(var + eps).
    """
    w = m.weight.detach()
    b = None if m.bias is None else m.bias.detach()
    bn = getattr(m, "bn", None)
    if bn is None:
        return w, b
    running_std = torch.sqrt(bn.running_var + bn.eps)
    factor = bn.weight.detach() / running_std
    shape = [1] * w.dim()
    shape[0] = -1
    w = w * factor.reshape(shape)
    b = (torch.zeros_like(bn.running_mean) if b is None else b) - bn.running_mean
    return w, bn.bias.detach() + b * factor


def quantize_weight(name: str, m: nn.Module) -> tuple[Tensor, Tensor, Tensor, int, int, int]:
    """(int8 weight, scales, zero points, axis, qmin, qmax) of QAT module ``m``'s fake-quantized weight."""
    fq = m.weight_fake_quant
    params = _qparams(f"{name}.weight_fake_quant", fq, weight=True)
    w, _ = folded_weight_and_bias(m)
    if params is None:
        raise UnsupportedQuantizationError(
            f"export_onnx: the weight fake-quant of {name!r} is disabled, so its weight is float; enable it "
            f"(torch.ao.quantization.enable_fake_quant) or export the float model")
    dtype, scale, zp, qmin, qmax = params
    ops = torch.ops.quantized_decomposed
    if fq.qscheme in _PER_CHANNEL:
        axis = int(fq.ch_axis)
        q = ops.quantize_per_channel(w, scale, zp, axis, qmin, qmax, dtype)
    else:
        axis = 0
        scale, zp = scale.reshape(1).expand(w.shape[0]).clone(), zp.reshape(1).expand(w.shape[0]).clone()
        q = ops.quantize_per_channel(w, scale, zp, axis, qmin, qmax, dtype)
    return q, scale.float(), zp.to(torch.int64), axis, qmin, qmax


class _QDQWeighted(nn.Module):
    """An int8 weight dequantized per channel in the forward; the op and its bias in float."""

    def __init__(self, name: str, m: nn.Module):
        super().__init__()
        q, scale, zp, axis, qmin, qmax = quantize_weight(name, m)
        _, bias = folded_weight_and_bias(m)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zp)
        self.register_buffer("bias", None if bias is None else bias.clone())
        self.axis, self.qmin, self.qmax = axis, qmin, qmax
        # the fused QAT classes (ConvReLU2d, ConvBnReLU2d, LinearReLU, ...) apply ReLU after the weighted op
        self.relu = "ReLU" in type(m).__name__

    def weight(self) -> Tensor:
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            self.weight_int8, self.weight_scale, self.weight_zero_point, self.axis, self.qmin, self.qmax,
            self.weight_int8.dtype)


class QDQConv(_QDQWeighted):
    def __init__(self, name: str, m: nn.Module):
        super().__init__(name, m)
        self.dims = m.weight.dim() - 2
        self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
        if m.padding_mode != "zeros":
            raise UnsupportedQuantizationError(
                f"export_onnx: {name!r} pads with {m.padding_mode!r}; only zero padding is exported quantized")

    def forward(self, x: Tensor) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        y = conv(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.relu(y) if self.relu else y


class QDQLinear(_QDQWeighted):
    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight(), self.bias)
        return F.relu(y) if self.relu else y


def _qdq_weighted(name: str, m: nn.Module) -> nn.Module:
    if isinstance(m, nn.modules.conv._ConvNd) and not getattr(m, "transposed", False):
        return QDQConv(name, m)
    if isinstance(m, nn.Linear):
        return QDQLinear(name, m)
    raise UnsupportedQuantizationError(
        f"export_onnx: {name!r} is a quantized {type(m).__name__}; QDQ export handles QAT convs (1d/2d/3d, with "
        f"fused BatchNorm / ReLU) and linears. Exclude it from quantization (QConfigMapping.set_module_name("
        f"{name!r}, None)) to keep it float")


__all__ = ["to_qdq", "check_quantized", "has_quantization", "UnsupportedQuantizationError", "QDQConv", "QDQLinear",
           "folded_weight_and_bias", "quantize_weight"]
