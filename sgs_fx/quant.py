"""INT8: SGS inside PyTorch's QAT flow, post-training quantization, and the settings onnxruntime runs in int8.

    qat = sgs_fx.prepare_qat(model, example_input)     # fake-quant, Conv-BN(-ReLU) fused; plain model first
    qat = sgs_fx.transform(qat)                         # then SGS: exact S * G through the fake-quant
    ...train...
    sgs_fx.export_onnx(qat, "int8.onnx", x)             # QDQ ONNX, int8 weights, checked by onnxruntime

    ptq = sgs_fx.quantize_ptq(float_model, loader)      # or: calibrate a trained float model

Both give a torch.fx GraphModule with fake-quant modules (``prepare_qat_fx``'s form), so they share one
export path (``export/qdq.py``). The default ranges are ones onnxruntime's x86 int8 kernels compute without
overflow: uint8 activations over the full range, int8 per-channel symmetric weights in [-63, 63] (7 bits).
onnxruntime's u8s8 kernels on x86 without VNNI add pairs of u8 x s8 products in int16, which saturates
with 8-bit weights (its docs recommend reduce_range there); PyTorch's own x86 default instead narrows the
activations to 7 bits, which needs a Clip before every QuantizeLinear and stops onnxruntime fusing
Conv into QLinearConv. ``qconfig_mapping(weight_bits=8)`` gives full 8-bit weights for VNNI / ARM targets.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import logging
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import fx, nn

from .batches import call, first_input, to_model
from .export.qdq import is_fake_quant
from .passes.select import unwrap
from .passes.strip import strip

logger = logging.getLogger("sgs_fx")


def qconfig_mapping(*, qat: bool = True, weight_bits: int = 7):
    """A QConfigMapping whose fake-quants export to QDQ ONNX that onnxruntime runs with int8 kernels.

    Args:
        qat: fused moving-average fake-quants (cheap per step, for training) if True; otherwise
            histogram observers for activations (L2-optimal ranges, for post-training calibration).
        weight_bits: 7 (default: weights in [-63, 63], no int16 saturation in onnxruntime on any x86 CPU)
            or 8 (weights in [-127, 127], for VNNI / ARM targets).
    """
    from torch.ao.quantization import (FakeQuantize, FixedQParamsFakeQuantize, FusedMovingAvgObsFakeQuantize,
                                       HistogramObserver, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver, QConfig,
                                       QConfigMapping, get_default_qat_qconfig_mapping)

    if weight_bits not in (7, 8):
        raise ValueError(f"qconfig_mapping: weight_bits={weight_bits!r}; use 7 or 8")
    wmax = 2 ** (weight_bits - 1) - 1
    act_kw = dict(quant_min=0, quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                  reduce_range=False)
    w_kw = dict(quant_min=-wmax, quant_max=wmax, dtype=torch.qint8,
                qscheme=torch.per_channel_symmetric, ch_axis=0, reduce_range=False)
    if qat:
        act = FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, **act_kw)
        weight = FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, **w_kw)
    else:
        act = FakeQuantize.with_args(observer=HistogramObserver, **act_kw)
        weight = FakeQuantize.with_args(observer=PerChannelMinMaxObserver, **w_kw)
    mapping = QConfigMapping().set_global(QConfig(activation=act, weight=weight))
    # sigmoid, hardsigmoid, tanh, softmax: the backend accepts only their fixed output ranges (1/256 over
    # [0, 1], 2/256 over [-1, 1]); any other qconfig leaves them float, with a warning per op.
    with warnings.catch_warnings():  # torch's default mapping holds reduce_range observers, which warn
        warnings.simplefilter("ignore")
        for op, qconfig in get_default_qat_qconfig_mapping("x86").object_type_qconfigs.items():
            if qconfig is not None and isinstance(qconfig.activation(), FixedQParamsFakeQuantize):
                mapping.set_object_type(op, QConfig(activation=qconfig.activation, weight=weight))
    return mapping


_default_mapping = qconfig_mapping  # the functions below take a `qconfig_mapping` argument, as torch's do


def prepare_qat(model: nn.Module, example_inputs, *, qconfig_mapping=None, inplace: bool = False) -> fx.GraphModule:
    """``prepare_qat_fx`` with sgs_fx's export-ready defaults, on a copy of ``model`` (in train mode).

    Call it on the plain (or stripped) model, then ``sgs_fx.transform`` the result. With ``inplace=True``
    the GraphModule reuses ``model``'s modules and Parameter objects (an optimizer keeps working).
    """
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from .ownership import is_sgs_conv

    if any(is_sgs_conv(m) for m in model.modules()):
        raise RuntimeError("sgs_fx.prepare_qat: the model is SGS-instrumented; quantize the plain model first "
                           "(sgs_fx.strip(model), or prepare before sgs_fx.transform), then transform the result; "
                           "set_scales(qat, get_scales(model)) carries the scales over")
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    qmap = _default_mapping() if qconfig_mapping is None else qconfig_mapping
    custom = PrepareCustomConfig().set_non_traceable_module_classes(_mode_dependent_leaves(model))
    with warnings.catch_warnings():
        # torch.ao's FX flow warns that it is deprecated for torchao's pt2e; it is the flow sgs_fx supports
        # (README says so), and the warning names an API the user did not call
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.ao.quantization")
        qat = prepare_qat_fx((model if inplace else copy.deepcopy(model)).train(), qmap, example_inputs,
                             prepare_custom_config=custom)
    _refuse_zero_bn_scales(qat)
    return qat


def _refuse_zero_bn_scales(qat: nn.Module) -> None:
    """PyTorch's fused Conv-BN QAT modules divide the conv output by gamma / std: a gamma of exactly 0 is NaN."""
    from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

    zero = [f"{n} ({int((m.bn.weight == 0).sum())} channels)" for n, m in qat.named_modules()
            if isinstance(m, _ConvBnNd) and m.bn.affine and bool((m.bn.weight == 0).any())]
    if zero:
        raise ValueError(
            f"sgs_fx.prepare_qat: BatchNorm weight (gamma) is exactly 0 in {len(zero)} fused conv-BN layer(s): "
            f"{', '.join(zero[:3])}{', ...' if len(zero) > 3 else ''}. PyTorch's fused Conv-BN QAT module divides "
            "by gamma, so they would output NaN. Zero-initialised residual BatchNorms (timm's zero_init_last, "
            "torchvision's zero_init_residual) need training before quantization: train in float first, or "
            "build the model without that initialisation.")


_QUANTIZED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    try:
        return "self.training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _mode_dependent_leaves(model: nn.Module) -> list[type]:
    """Classes to keep as modules in the QAT graph: tracing bakes ``self.training`` in as a constant.

    Stochastic depth / drop path (torchvision's StochasticDepth, timm's DropPath) read it to drop residual
    branches in training only, and timm's BatchNormAct2d to use batch statistics; traced in train mode they
    would do so at inference too (and export random ops, or batch statistics, to ONNX). Kept as modules they
    follow train()/eval(); holding no conv or linear, they lose no int8 kernel (a BatchNormAct2d is then not
    folded into its conv: correct, a little slower). A module holding convs that reads it must be traced for
    its convs to be quantized, so its training branch stays for good: that is logged.
    """
    leaves: dict[type, None] = {}
    baked: dict[type, list[str]] = {}
    for name, m in model.named_modules():
        cls = type(m)
        if cls.__module__.startswith("torch.") or not _reads_training(cls):
            continue  # torch's own modules are leaves of the tracer already
        if not any(isinstance(sub, _QUANTIZED_LAYERS) for sub in m.modules()):
            leaves[cls] = None
        else:
            baked.setdefault(cls, []).append(name or "the model")
    for cls, names in baked.items():
        logger.warning("sgs_fx.prepare_qat: %s reads self.training in its forward (%d module(s): %s); the QAT "
                       "graph keeps its training-mode branch, in eval and in the exported model too",
                       cls.__name__, len(names), ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
    return list(leaves)


def freeze(model: nn.Module) -> nn.Module:
    """Stop every observer (in place): the fake-quants keep their scales, as for evaluation and export."""
    from torch.ao.quantization import disable_observer

    model.apply(disable_observer)
    return model


@contextlib.contextmanager
def observers_frozen(model: nn.Module):
    """Within the block no fake-quant observes (evaluation must not move the ranges); restored after."""
    fakes = [m for m in model.modules() if is_fake_quant(m)]
    states = [m.observer_enabled.clone() for m in fakes]
    for m in fakes:
        m.disable_observer()
    try:
        yield model
    finally:
        for m, state in zip(fakes, states):
            m.observer_enabled.copy_(state)


def quantize_ptq(model: nn.Module, batches: Iterable, *, num_batches: int = 32, weight_bits: int = 7,
                 qconfig_mapping=None, input_fn: Callable | None = None, progress: bool = True) -> fx.GraphModule:
    """Post-training quantization of a trained float model, as a fake-quant GraphModule ready for export.

    A stripped copy is prepared like QAT (Conv-BN folded with the running statistics, in eval), the
    activation observers see ``num_batches`` batches of the float model, then each fake-quant takes the
    range its observer computed once, and every observer is frozen. ``model`` is not modified.

    Args:
        model: a float model (SGS-instrumented, branch mode or plain).
        batches: yields inputs, or (input, target) pairs, as training loaders do.
        num_batches: calibration batches (32 of 128 CIFAR images are plenty for histogram ranges).
        input_fn: batch -> model input (default: the batch itself, or its first element); a tuple is the
            model's positional inputs (``lambda b: (b["image"], b["mask"])``). Its tensors are moved to the
            model's device.
    """
    from tqdm.auto import tqdm

    if num_batches < 1:
        raise ValueError(f"quantize_ptq: num_batches={num_batches!r}; calibration needs at least one batch")
    plain = strip(unwrap(model))
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("quantize_ptq: `batches` is empty; pass a loader of training inputs to calibrate on")
    input_fn = input_fn or first_input("quantize_ptq")
    x0 = to_model(input_fn(first), plain)
    if isinstance(x0, dict):
        raise TypeError("quantize_ptq: input_fn returned a dict (keyword inputs); the quantized model is traced "
                        "with positional inputs: return a tuple in the order of the model's arguments")
    qmap = _default_mapping(qat=False, weight_bits=weight_bits) if qconfig_mapping is None else qconfig_mapping
    ptq = prepare_qat(plain, x0, qconfig_mapping=qmap).eval()  # a tuple: the positional inputs
    fakes = [m for m in ptq.modules() if is_fake_quant(m)]
    # Calibrate the float model: fake-quant off, each observer fed directly (FakeQuantize would otherwise
    # recompute the histogram's qparams at every call), qparams taken once at the end.
    for fq in fakes:
        fq.disable_fake_quant()
        fq.disable_observer()
    handles = [fq.register_forward_pre_hook(lambda m, args: m.activation_post_process(args[0].detach()))
               for fq in fakes]
    try:
        with torch.no_grad():
            seen = 0
            bar = tqdm(total=num_batches, desc="PTQ calibration", leave=False, disable=None if progress else True)
            for batch in itertools.chain([first], iterator):
                call(ptq, to_model(input_fn(batch), ptq))
                seen += 1
                bar.update()
                if seen >= num_batches:
                    break
            bar.close()
    finally:
        for h in handles:
            h.remove()
    for fq in fakes:
        scale, zero_point = fq.activation_post_process.calculate_qparams()
        fq.scale.resize_(scale.shape).copy_(scale)
        fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
        fq.enable_fake_quant()
    if seen < num_batches:
        logger.warning("quantize_ptq: calibrated on %d batches (the loader ran out before num_batches=%d)",
                       seen, num_batches)
    return ptq
