"""Export a (stripped) model to ONNX and check it with onnx.checker and onnxruntime.

What ships must be indistinguishable from a model that never saw sgs_fx: the model is stripped (branches
folded) on a copy, exported in eval mode, and its onnxruntime outputs are compared with PyTorch's at
several batch sizes (``check.py``); the outcome is an ``ExportReport`` (``report.py``).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Union

import torch
from torch import Tensor, nn

from ..passes.copying import copy_model
from ..passes.select import unwrap
from ..passes.strip import strip
from ..quant import freeze
from .check import (FixedGraph, agreement, as_inputs, batch_size, check_like, check_outputs, onnx_accuracy,
                    open_session, runs_at, shapes)
from .qdq import check_quantized, has_quantization, to_qdq
from .report import (ExportMismatchError, ExportReport, data_dependent_text, file_size, op_counts,
                     shapes_text)

__all__ = ["export_onnx", "ExportReport", "ExportMismatchError", "onnx_accuracy", "file_size", "op_counts"]

logger = logging.getLogger("sgs_fx")

# (export_onnx has no inplace option: it must leave the user's model as it was)
_COPY_FIX = ("delete that attribute before exporting (a forward may have left it), or make it deepcopyable: the "
             "export works on a copy so that the model keeps its mode, device and instrumentation")


Inputs = Union[Tensor, "tuple[Tensor, ...]"]


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: Inputs, *, dynamic_batch: bool | None = None,
                opset: int | None = None, check_batch_sizes: tuple[int, ...] = (1, 3), atol: float = 1e-4,
                rtol: float = 1e-5, check_input: Inputs | None = None, min_agreement: float = 0.97,
                max_output_steps: float = 4.0, max_output_fraction: float = 0.05) -> ExportReport:
    """Strip a copy of ``model``, export it to ``path`` and check it with onnxruntime.

    Args:
        model: a transformed (SGS or branch mode) or plain model, also inside DDP, DataParallel or
            torch.compile (the model inside is exported); it is not modified. A model with
            fake-quant modules (``prepare_qat_fx`` / ``sgs_fx.prepare_qat`` after training, or
            ``sgs_fx.quantize_ptq``) is written as QDQ ONNX: QuantizeLinear / DequantizeLinear with the
            fake-quants' scales, int8 weights (BatchNorm folded), its observers frozen on the copy.
        path: the .onnx file to write; its directory must exist. One self-contained file, unless the weights
            exceed 1.5 GiB (ONNX files stop at 2 GiB): then the exporter writes them beside it (``path + ".data"``,
            or a file per tensor from the TorchScript exporter), and they must travel with it
            (``report.size_bytes`` counts them). A ``path + ".data"`` left by an earlier export of ``path`` that
            the new file does not use is deleted.
        example_input: the model's input tensor, shape (N, ...), or a tuple of tensors, its positional
            inputs, each (N, ...) with the same N (the batch dim they share). They set the non-batch dims;
            the checks draw inputs like them: floats from a normal of their mean and std, integers (token
            ids, labels) uniformly between their min and max, booleans at random.
        dynamic_batch: export the batch dim as dynamic (then batch sizes ``check_batch_sizes`` are checked) or
            not (only N is). Default: dynamic where the model takes other batch sizes than the example's; a
            static ``torch.export`` program (its guards fix dim 0) is exported at its shape, and the report says so.
            So is a model whose exported graph runs only at the batch it was exported at (onnxruntime raises, or
            returns other outputs or shapes than PyTorch, at a check batch size: torchvision's detection models and
            RAFT loop over the images): it is exported again at the example's shapes.
        opset: ONNX opset (default: the exporter's).
        check_batch_sizes: batch sizes run through onnxruntime and PyTorch.
        atol, rtol: a float model passes where each check's largest |onnxruntime - PyTorch| is at most
            ``atol + rtol * max |PyTorch output|``. onnxruntime's kernels sum in another order than
            PyTorch's, and float32 rounding grows with the values summed: ≤ 1e-5 on torchvision classifiers,
            ~5e-3 on a ResNet-18 whose outputs reach ~2e3 (a regression head in raw units; 2-4e-6 of the
            scale), which an absolute bound alone would fail. A wrong graph (a missing op, another padding)
            misses by far more than 1e-5 of the scale.
        check_input: real inputs (N, ...) to check on (a tuple like ``example_input``'s for a model with several):
            for a float model, the comparison runs on their first items at each of ``check_batch_sizes`` instead of
            on random inputs (for a model that rejects random values); for a quantized one, every output and
            top-1 agreement are checked over all of them (default: 64 random inputs, and no agreement check).
        max_output_steps, max_output_fraction: a quantized export also fails where any output differs from the
            PyTorch fake-quant model's by more than the larger of ``max_output_steps`` quantization steps of that
            output (the scale of the fake-quant that produces it, else 1/255 of its range over the check inputs)
            and ``max_output_fraction`` of that range. onnxruntime requantises each layer in integer arithmetic,
            so a correct file moves outputs by about a step (measured: 1 step of 255 on the demo's CIFAR models;
            2.7 % of the range for a one-output head whose range is small beside the upstream steps); a wrong
            bias or weight moves them by far more.
        min_agreement: a quantized export fails below this top-1 agreement between onnxruntime and the
            PyTorch fake-quant model, where agreement means something (two outputs or more per input, and
            PyTorch predicting more than one class over the check inputs). Exact agreement is not expected: onnxruntime requantises in
            integer arithmetic and sums in another order, so a value at a rounding boundary may land
            one step away, and logits move by a few quantisation steps. Measured on under-trained CIFAR
            models (1,000 test images, many near-ties): 97.9-99.9 %; int16 saturation in onnxruntime's
            kernels (8-bit weights on a CPU without VNNI) gave 93-95 % (BENCHMARKS.md).

    Raises:
        FileNotFoundError: the directory of ``path`` does not exist.
        TypeError: ``example_input`` or ``check_input`` is not a tensor or a tuple of tensors.
        ValueError: ``example_input`` does not fit the model, its tensors disagree on the batch size
            (with ``dynamic_batch``), ``check_input`` is not shaped like it, a negative tolerance, or
            ``dynamic_batch=True`` where the model or its exported graph runs only at one batch size.
        RuntimeError: the exporter failed (its complaint is quoted), or onnxruntime cannot run the file.
        UnsupportedQuantizationError: observers without fake-quant, a converted (convert_fx) model, or a
            quantization with no QDQ form; the message says what to do.
        ExportMismatchError: onnxruntime's output differs beyond that tolerance (or agrees below
            ``min_agreement``), or is shaped unlike PyTorch's on the same input (an output whose size depends on the
            data, such as detections, is said to); the file is still written, for inspection.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"export_onnx: directory {directory!r} of {path!r} does not exist; create it first")
    xs = as_inputs(example_input, "example_input")
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"export_onnx: atol and rtol must be >= 0 (got atol={atol}, rtol={rtol})")
    static_reason = None
    if dynamic_batch:
        _check_batch_dim(xs)
    elif dynamic_batch is None and (any(x.dim() == 0 for x in xs) or len({len(x) for x in xs}) > 1):
        dynamic_batch, static_reason = False, f"the inputs share no batch dim: {shapes(xs)}"
    if check_input is not None:
        check_input = check_like(as_inputs(check_input, "check_input"), xs)
    # a copy (the user's model keeps its mode, device and instrumentation); a wrapper (DDP, torch.compile): its model
    plain = strip(copy_model(unwrap(model), "sgs_fx.export_onnx", fix=_COPY_FIX), inplace=True).eval().cpu()
    quantized = has_quantization(plain)
    if quantized:
        if len({batch_size(x) for x in xs}) > 1:
            raise ValueError(f"export_onnx: the quantized check runs batches of inputs, and these inputs do not "
                             f"share dim 0 ({shapes(xs)}); give the model inputs with a shared batch dim")
        check_quantized(plain)
        freeze(plain)  # no forward below (fit check, comparisons) may move the ranges being exported
    try:
        with torch.no_grad():
            plain(*xs)
    except Exception as exc:
        raise ValueError(f"export_onnx: example_input of shape {shapes(xs)} does not fit "
                         f"{type(plain).__name__}: {exc}") from exc
    asked = dynamic_batch
    if dynamic_batch is not False:
        probe = _fixed_batch(plain, xs)
        if probe is not None and dynamic_batch:
            raise ValueError(f"export_onnx: dynamic_batch=True, but {type(plain).__name__} takes only batch size "
                             f"{batch_size(xs[0])} ({probe}); pass dynamic_batch=False (or leave it unset) "
                             "to export it at that shape")
        if probe is not None:
            static_reason = f"the model runs only at its example's batch size ({probe})"
        dynamic_batch = probe is None
    given = check_input if not quantized else None  # a float check on the user's inputs, where given
    if given is not None and dynamic_batch and len(given[0]) < max(check_batch_sizes):
        raise ValueError(f"export_onnx: check_input holds {len(given[0])} inputs; the check runs batch sizes "
                         f"{list(check_batch_sizes)}: give at least {max(check_batch_sizes)}")
    exported = to_qdq(plain) if quantized else plain
    settings = dict(atol=atol, rtol=rtol, quantized=quantized, min_agreement=min_agreement)
    report, session = _export_and_load(exported, xs, path, dynamic_batch, opset, settings, static_reason)
    sizes = tuple(check_batch_sizes) if dynamic_batch else (None,)  # None: the example's own shapes
    traced = len(_traced_inputs(xs, dynamic_batch)[0]) if dynamic_batch else None
    try:
        check_outputs(plain, session, xs, sizes, report, given, traced)
    except FixedGraph as fixed:
        if not runs_at(plain, session, xs, traced, given):  # not even at the batch it was exported at: no fixed
            check_outputs(plain, session, xs, sizes, report, given, None)  # batch, a wrong graph, reported as such
        else:
            graph = f"the exported graph runs only at batch size {traced}, the batch it was exported at ({fixed})"
            if asked:
                raise ValueError(f"export_onnx: dynamic_batch=True, but {graph}; pass dynamic_batch=False (or leave "
                                 "it unset) to export and check it at the example's batch size") from None
            logger.warning("export_onnx: %s; exporting it at the example's shapes %s instead, as dynamic_batch=False "
                           "does", graph, shapes(xs))
            dynamic_batch, sizes = False, (None,)
            report, session = _export_and_load(exported, xs, path, False, opset, settings, graph)
            check_outputs(plain, session, xs, sizes, report, given, None)
    if quantized:
        report.max_output_steps, report.max_output_fraction = max_output_steps, max_output_fraction

        agreement(plain, session, xs, check_input, report, fixed_batch=None if dynamic_batch else batch_size(xs[0]))
    if not report.passed:
        limit = "; ".join(report.failures()) if quantized else shapes_text(report) if report.shape_mismatches else \
            f"differs from PyTorch beyond atol={atol:g} + rtol={rtol:g} x max |output|"
        if report.data_dependent and not quantized:
            limit += data_dependent_text(report)
        raise ExportMismatchError(f"export_onnx: onnxruntime {limit}; the model was written to {path} for "
                                  f"inspection\n{report}", report)
    logger.info("%s", report)
    return report


def _export_and_load(model: nn.Module, xs: tuple[Tensor, ...], path: str, dynamic_batch: bool, opset: int | None,
                     settings: dict, static_reason: str | None):
    """Export, run onnx.checker, and return the report (its settings filled in) and an onnxruntime session."""
    exporter, reason = _export(model, xs, path, dynamic_batch, opset)
    import onnx

    proto = onnx.load(path, load_external_data=False)
    _remove_stale_data(path, proto)
    onnx.checker.check_model(path)
    report = ExportReport(path=path, opset=_opset(proto), exporter=exporter, op_counts=op_counts(proto),
                          fallback_reason=reason, size_bytes=file_size(path, proto), static_batch=static_reason,
                          **settings)
    return report, open_session(path, report)


def _traced_inputs(xs: tuple[Tensor, ...], dynamic_batch: bool) -> tuple[Tensor, ...]:
    # torch.export specialises a dim of size 1: export with a batch of 2 so the batch dim stays symbolic.
    return tuple(x.expand(2, *x.shape[1:]).contiguous() for x in xs) if dynamic_batch and len(xs[0]) == 1 else xs


def _remove_stale_data(path: str, proto) -> None:
    # an earlier export to this path (or an sgs_fx before single-file export) wrote its weights here: beside a
    # file that does not use it, it would be shipped by mistake, or read as this model's
    stale = path + ".data"
    used = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    if os.path.exists(stale) and os.path.basename(stale) not in used:
        os.remove(stale)
        logger.info("export_onnx: removed %s, an earlier export's weights that %s does not use", stale, path)


def _export(model: nn.Module, xs: tuple[Tensor, ...], path: str, dynamic_batch: bool, opset: int | None):
    ex = _traced_inputs(xs, dynamic_batch)
    kwargs = {} if opset is None else {"opset_version": opset}
    try:
        batch = torch.export.Dim("batch", min=1)
        dyn = tuple({0: batch} for _ in xs) if dynamic_batch else None  # one Dim: the inputs share the batch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # one self-contained file, what gets copied and shipped; past 1.5 GiB of weights (protobuf stops at 2)
            # the exporter puts them in path + ".data" all the same
            torch.onnx.export(model, ex, path, dynamo=True, dynamic_shapes=dyn, verbose=False,
                              external_data=False, **kwargs)
        return "dynamo", None
    except Exception as dynamo_exc:
        reason = _complaint(dynamo_exc)
        logger.warning("export_onnx: the dynamo exporter failed (%s); falling back to the TorchScript exporter", reason)
    try:
        names = ["input"] if len(xs) == 1 else [f"input{i}" for i in range(len(xs))]
        axes = {**{n: {0: "batch"} for n in names}, "output": {0: "batch"}} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, ex, path, dynamo=False, input_names=names, output_names=["output"],
                              dynamic_axes=axes, **kwargs)
        return "torchscript", reason
    except Exception as exc:
        raise RuntimeError(f"export_onnx: {type(model).__name__} could not be exported. dynamo exporter: {reason}; "
                           f"TorchScript exporter: {_complaint(exc)}") from exc


def _complaint(exc: Exception, limit: int = 400) -> str:
    """An exporter's error in one readable line: no colour codes, no graph dumps."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("%", "graph("))]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        lines.append(f"caused by {_complaint(cause, limit)}")
    return f"{type(exc).__name__}: {' '.join(lines)}"[:limit]


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def _fixed_batch(model: nn.Module, xs: tuple[Tensor, ...]) -> str | None:
    """Why ``model`` runs only at the example's batch size (a static ``torch.export`` program's guard), or None."""
    n = batch_size(xs[0])
    # the example's own values, its first item repeated (an order or a range the forward asserts still holds)
    other = tuple(torch.cat([x[:1], x]) for x in xs)
    try:
        with torch.no_grad():
            model(*other)
    except Exception as exc:  # guards raise AssertionError; shape-specialised code RuntimeError
        return f"at batch {n + 1}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def _check_batch_dim(xs: tuple[Tensor, ...]) -> None:
    if any(x.dim() == 0 for x in xs) or len({len(x) for x in xs}) > 1:
        raise ValueError(f"export_onnx: with dynamic_batch=True every input's dim 0 is the batch, and they must "
                         f"agree; got shapes {shapes(xs)}. Pass dynamic_batch=False to export these shapes as "
                         "they are")