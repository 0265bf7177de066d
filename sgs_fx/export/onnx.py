"""Export a (stripped) model to ONNX and check it with onnx.checker and onnxruntime.

What ships must be indistinguishable from a model that never saw sgs_fx: the model is stripped (branches
folded) on a copy, exported in eval mode, and its onnxruntime outputs are compared with PyTorch's at
several batch sizes.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor, fx, nn

from ..passes.select import unwrap
from ..passes.strip import strip
from ..quant import freeze
from .qdq import check_quantized, has_quantization, to_qdq

logger = logging.getLogger("sgs_fx")


class ExportMismatchError(RuntimeError):
    """onnxruntime's output differs from PyTorch's beyond the tolerance (the file is still written)."""

    def __init__(self, message: str, report: "ExportReport"):
        super().__init__(message)
        self.report = report


@dataclass
class ExportReport:
    """Outcome of ``export_onnx``.

    Attributes:
        path: the ONNX file written.
        opset: the opset of its default domain.
        exporter: "dynamo" or "torchscript" (the fallback, with its reason in ``fallback_reason``).
        op_counts: op type -> number of nodes in the main graph.
        max_abs_diff / max_rel_diff: batch size -> largest difference between onnxruntime and PyTorch, of
            the output closest to its allowance where the model returns several tensors (all are compared).
        output_scale: batch size -> largest |PyTorch output| of that output.
        outputs: (tensors PyTorch returns, outputs of the ONNX model); where they differ only the first
            pair was compared.
        atol, rtol: a float model passes where, for every check, max_abs_diff <= atol + rtol * output_scale.
        quantized: a QDQ INT8 model (then ``passed`` means: no output further than ``max_output_steps``
            quantization steps from PyTorch's fake-quant output, and top-1 agreement >= ``min_agreement`` where
            agreement is meaningful).
        agreement: the fraction of check inputs whose onnxruntime top-1 equals PyTorch's fake-quant top-1;
            ``agreement_meaningful`` is False for one output per input or one class predicted for every input.
        checked: the number of check inputs behind ``agreement``.
        max_output_diff: the largest |onnxruntime - PyTorch fake-quant| output over those inputs; ``output_step``
            the scale of the fake-quant that produces the output (None: ``output_range`` / 255 is the step).
        ort_ops: op type -> count in the graph onnxruntime runs after its optimisations (QLinearConv
            there means int8 kernels; a quantized model only).
        size_bytes: the file's size, with the external-data file holding its weights.
        static_batch: why the batch dim was exported fixed although ``dynamic_batch`` was left unset (the
            model runs only at the example's batch size, or the graph the exporter wrote does), or None.
        shape_mismatches: batch size -> outputs onnxruntime returned in another shape than PyTorch on the same
            input, each as text.
        data_dependent: output index -> its dims whose size depends on the data (detections after a score
            threshold, top-k and NMS): dims the file leaves symbolic, other than the batch.
    """

    path: str
    opset: int
    exporter: str
    op_counts: dict[str, int]
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    max_rel_diff: dict[int, float] = field(default_factory=dict)
    atol: float = 1e-4
    rtol: float = 1e-5
    output_scale: dict[int, float] = field(default_factory=dict)
    outputs: tuple[int, int] = (0, 0)
    fallback_reason: str | None = None
    quantized: bool = False
    agreement: float | None = None
    agreement_meaningful: bool = True
    max_output_diff: float | None = None
    output_step: float | None = None  # the output fake-quant's scale (None: 1/255 of the output range)
    output_range: float | None = None
    max_output_steps: float = 4.0
    max_output_fraction: float = 0.05
    output_checks: list = field(default_factory=list)  # per output: {"diff", "range", "step"}
    checked: int = 0
    min_agreement: float = 0.97
    ort_ops: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0
    static_batch: str | None = None
    shape_mismatches: dict[int, list[str]] = field(default_factory=dict)
    data_dependent: dict[int, list[int]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        if self.quantized:
            return self.max_output_diff is not None and not self.failures()
        return bool(self.max_abs_diff) and all(d <= self.tolerance(b) for b, d in self.max_abs_diff.items())

    @staticmethod
    def step_of(check: dict) -> float:
        """One quantization step of an output: its fake-quant's scale, else 1/255 of its range."""
        return check.get("step") or (check.get("range") or 0.0) / 255 or 1e-12

    def allowance_of(self, check: dict) -> float:
        """The largest difference an output of a quantized export may show."""
        return max(self.max_output_steps * self.step_of(check), self.max_output_fraction * (check.get("range") or 0.0))

    @property
    def step(self) -> float:
        """One quantization step of the output closest to its allowance (quantized exports)."""
        return self.step_of({"step": self.output_step, "range": self.output_range})

    @property
    def output_allowance(self) -> float:
        return self.allowance_of({"step": self.output_step, "range": self.output_range})

    def failures(self) -> list[str]:
        """Why a quantized export fails (empty: it passes)."""
        out = []
        for k, c in enumerate(self.output_checks):
            if c["diff"] > self.allowance_of(c):
                which = f"output {k}" if len(self.output_checks) > 1 else "outputs"
                out.append(f"{which} differ{'s' if len(self.output_checks) > 1 else ''} by {c['diff']:.3g} = "
                           f"{c['diff'] / self.step_of(c):.1f} quantization steps ({self.step_of(c):.3g}), beyond "
                           f"max_output_steps={self.max_output_steps:g} and max_output_fraction="
                           f"{self.max_output_fraction:g} of its range {c['range']:.3g}")
        if self.agreement_meaningful and self.agreement is not None and self.agreement < self.min_agreement:
            out.append(f"top-1 agreement {self.agreement:.2%} < min_agreement={self.min_agreement:g}")
        return out

    def tolerance(self, batch: int) -> float:
        """The largest difference allowed for the check at ``batch`` (float models)."""
        return self.allowance(self.output_scale.get(batch, 0.0))

    def allowance(self, scale: float) -> float:
        """The largest difference allowed for an output whose largest |value| is ``scale``."""
        return self.atol + self.rtol * scale

    def __str__(self) -> str:
        kind = "INT8 QDQ ONNX" if self.quantized else "ONNX"
        lines = [f"{kind} export: {self.path} (opset {self.opset}, {self.exporter} exporter, "
                 f"{sum(self.op_counts.values())} nodes, {self.size_bytes / 1024:.0f} KiB)"]
        lines.append(f"  ops: {_ops_text(self.op_counts)}")
        if self.static_batch:
            lines.append(f"  batch dim exported fixed: {self.static_batch}")
        if self.quantized:
            lines.append(f"  onnxruntime runs: {_ops_text(self.ort_ops)}")
            if self.max_output_diff is not None:
                many = f" (the closest to its allowance of {len(self.output_checks)} outputs)" \
                    if len(self.output_checks) > 1 else ""
                lines.append(f"  max |output diff|{many} vs the PyTorch fake-quant model: {self.max_output_diff:.3g} = "
                             f"{self.max_output_diff / self.step:.1f} quantization steps of the output ({self.step:.3g}),"
                             f" {self.max_output_diff / max(self.output_range or 0.0, 1e-30):.1%} of its range "
                             f"{self.output_range or 0.0:.3g} (allowed {self.output_allowance:.3g}), over "
                             f"{self.checked} inputs")
            if self.agreement is not None:
                what = "" if self.agreement_meaningful else (" (not checked: random check inputs, one output per "
                                                             "input, or one class predicted for every input)")
                lines.append(f"  top-1 agreement: {self.agreement:.2%}{what}")
        if self.data_dependent:
            lines.append(f"  size depends on the data (compared per input): "
                         f"{', '.join(f'output {k} dim {_ints(d)}' for k, d in self.data_dependent.items())}")
        n_torch, n_onnx = self.outputs
        if n_torch != n_onnx:
            lines.append(f"  PyTorch returns {n_torch} tensors, the ONNX model {n_onnx} outputs: only the first compared")
        elif n_torch > 1:
            lines.append(f"  all {n_torch} outputs compared (each batch line: the one closest to its allowance)")
        for b in self.max_abs_diff:
            allowed = "" if self.quantized else f" (allowed {self.tolerance(b):.3g})"
            lines.append(f"  batch {b}: max |ort - torch| = {self.max_abs_diff[b]:.3g}{allowed}, "
                         f"max rel = {self.max_rel_diff[b]:.3g}, max |output| = {self.output_scale.get(b, 0.0):.3g}")
            if self.shape_mismatches.get(b):
                lines.append(f"  batch {b}: shaped unlike PyTorch's output: {'; '.join(self.shape_mismatches[b])}")
        limit = (f"output within {self.max_output_steps:g} steps or {self.max_output_fraction:.0%} of its range" + (f", agreement >= {self.min_agreement:.0%}"
                                                                     if self.agreement_meaningful else "")) \
            if self.quantized else f"atol {self.atol:g} + rtol {self.rtol:g} x max |output|"
        lines.append(f"  {'PASSED' if self.passed else 'FAILED'} ({limit})")
        return "\n".join(lines)


def _ops_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


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
        path: the .onnx file to write; its directory must exist.
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
    xs = _as_inputs(example_input, "example_input")
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"export_onnx: atol and rtol must be >= 0 (got atol={atol}, rtol={rtol})")
    static_reason = None
    if dynamic_batch:
        _check_batch_dim(xs)
    elif dynamic_batch is None and (any(x.dim() == 0 for x in xs) or len({len(x) for x in xs}) > 1):
        dynamic_batch, static_reason = False, f"the inputs share no batch dim: {_shapes(xs)}"
    if check_input is not None:
        check_input = _check_like(_as_inputs(check_input, "check_input"), xs)
    plain = strip(unwrap(model)).eval().cpu()  # a DDP / DataParallel / torch.compile wrapper: its model
    quantized = has_quantization(plain)
    if quantized:
        if len({_batch_size(x) for x in xs}) > 1:
            raise ValueError(f"export_onnx: the quantized check runs batches of inputs, and these inputs do not "
                             f"share dim 0 ({_shapes(xs)}); give the model inputs with a shared batch dim")
        check_quantized(plain)
        freeze(plain)  # no forward below (fit check, comparisons) may move the ranges being exported
    try:
        with torch.no_grad():
            plain(*xs)
    except Exception as exc:
        raise ValueError(f"export_onnx: example_input of shape {_shapes(xs)} does not fit "
                         f"{type(plain).__name__}: {exc}") from exc
    asked = dynamic_batch
    if dynamic_batch is not False:
        probe = _fixed_batch(plain, xs)
        if probe is not None and dynamic_batch:
            raise ValueError(f"export_onnx: dynamic_batch=True, but {type(plain).__name__} takes only batch size "
                             f"{_batch_size(xs[0])} ({probe}); pass dynamic_batch=False (or leave it unset) "
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
        _check(plain, session, xs, sizes, report, given, traced)
    except _FixedGraph as fixed:
        if not _runs_at(plain, session, xs, traced, given):  # not even at the batch it was exported at: no fixed
            _check(plain, session, xs, sizes, report, given, None)  # batch, a wrong graph, reported as such
        else:
            graph = f"the exported graph runs only at batch size {traced}, the batch it was exported at ({fixed})"
            if asked:
                raise ValueError(f"export_onnx: dynamic_batch=True, but {graph}; pass dynamic_batch=False (or leave "
                                 "it unset) to export and check it at the example's batch size") from None
            logger.warning("export_onnx: %s; exporting it at the example's shapes %s instead, as dynamic_batch=False "
                           "does", graph, _shapes(xs))
            dynamic_batch, sizes = False, (None,)
            report, session = _export_and_load(exported, xs, path, False, opset, settings, graph)
            _check(plain, session, xs, sizes, report, given, None)
    if quantized:
        report.max_output_steps, report.max_output_fraction = max_output_steps, max_output_fraction

        _agreement(plain, session, xs, check_input, report, fixed_batch=None if dynamic_batch else _batch_size(xs[0]))
    if not report.passed:
        limit = "; ".join(report.failures()) if quantized else _shapes_text(report) if report.shape_mismatches else \
            f"differs from PyTorch beyond atol={atol:g} + rtol={rtol:g} x max |output|"
        if report.data_dependent and not quantized:
            limit += _data_dependent_text(report)
        raise ExportMismatchError(f"export_onnx: onnxruntime {limit}; the model was written to {path} for "
                                  f"inspection\n{report}", report)
    logger.info("%s", report)
    return report


class _FixedGraph(Exception):
    """What shows that the exported graph does not run at a batch size other than the one it was exported at."""


class _OnnxRuntimeFailed(Exception):
    """onnxruntime raised running the file (its own error types derive from Exception only)."""


def _check(model: nn.Module, session, xs: tuple[Tensor, ...], sizes, report: ExportReport,
           given: tuple[Tensor, ...] | None, traced: int | None) -> None:
    """``_compare``, with the model's and onnxruntime's errors turned into ones that say what to do."""
    try:
        _compare(model, session, xs, sizes, report, given, traced)
    except _OnnxRuntimeFailed as exc:
        raise RuntimeError(f"export_onnx: onnxruntime could not run the exported file ({exc}); it was written to "
                           f"{report.path} for inspection") from exc.__cause__
    except (AssertionError, RuntimeError, ValueError, IndexError) as exc:
        if given is not None:
            raise
        raise ValueError(
            f"export_onnx: the model raised on the check's inputs, which are drawn at random like example_input "
            f"(floats around its mean and std, integers between its min and max): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}. The file was written to {report.path}; pass "
            "check_input=(real inputs the model accepts) to check on those instead") from exc


def _runs_at(model: nn.Module, session, xs: tuple[Tensor, ...], batch: int, given: tuple[Tensor, ...] | None) -> bool:
    """Whether onnxruntime runs the file at ``batch`` and returns PyTorch's number of outputs in PyTorch's shapes."""
    g = torch.Generator().manual_seed(2)
    xb = tuple(c[:batch] for c in given) if given is not None and len(given[0]) >= batch else \
        tuple(_random_like(x, batch, g) for x in xs)
    try:
        with torch.no_grad():
            expected = _output_tensors(model(*xb))
        got = session.run(None, _feed(session, xb))
    except Exception:
        return False
    return len(got) == len(expected) and all(tuple(o.shape) == tuple(e.shape) for o, e in zip(got, expected))


def _export_and_load(model: nn.Module, xs: tuple[Tensor, ...], path: str, dynamic_batch: bool, opset: int | None,
                     settings: dict, static_reason: str | None):
    """Export, run onnx.checker, and return the report (its settings filled in) and an onnxruntime session."""
    exporter, reason = _export(model, xs, path, dynamic_batch, opset)
    import onnx

    proto = onnx.load(path, load_external_data=False)
    onnx.checker.check_model(path)
    report = ExportReport(path=path, opset=_opset(proto), exporter=exporter, op_counts=op_counts(proto),
                          fallback_reason=reason, size_bytes=file_size(path, proto), static_batch=static_reason,
                          **settings)
    return report, _session(path, report)


def _traced_inputs(xs: tuple[Tensor, ...], dynamic_batch: bool) -> tuple[Tensor, ...]:
    # torch.export specialises a dim of size 1: export with a batch of 2 so the batch dim stays symbolic.
    return tuple(x.expand(2, *x.shape[1:]).contiguous() for x in xs) if dynamic_batch and len(xs[0]) == 1 else xs


def _export(model: nn.Module, xs: tuple[Tensor, ...], path: str, dynamic_batch: bool, opset: int | None):
    ex = _traced_inputs(xs, dynamic_batch)
    kwargs = {} if opset is None else {"opset_version": opset}
    try:
        batch = torch.export.Dim("batch", min=1)
        dyn = tuple({0: batch} for _ in xs) if dynamic_batch else None  # one Dim: the inputs share the batch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, ex, path, dynamo=True, dynamic_shapes=dyn, verbose=False, **kwargs)
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


def onnx_accuracy(path: str | os.PathLike, batches) -> float:
    """Top-1 accuracy of an ONNX classifier in onnxruntime (CPU, all optimisations) over (input, label) batches.

    The input is a tensor, or a tuple of tensors for a model with several inputs (in the ONNX file's order).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    correct = total = 0
    for x, y in batches:
        xs = _as_inputs(x, "a batch's input", "onnx_accuracy")
        if len(xs) != len(names):
            raise ValueError(f"onnx_accuracy: {os.fspath(path)} takes {len(names)} input(s) ({', '.join(names)}), "
                             f"a batch gave {len(xs)}; give each batch as (inputs, labels), inputs a tuple")
        logits = session.run(None, dict(zip(names, (t.numpy() for t in xs))))[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y.cpu()).sum())
        total += len(y)
    if total == 0:
        raise ValueError("onnx_accuracy: no batches")
    return correct / total


def _complaint(exc: Exception, limit: int = 400) -> str:
    """An exporter's error in one readable line: no colour codes, no graph dumps."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("%", "graph("))]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        lines.append(f"caused by {_complaint(cause, limit)}")
    return f"{type(exc).__name__}: {' '.join(lines)}"[:limit]


def file_size(path: str | os.PathLike, proto=None) -> int:
    """Bytes of the ONNX file plus the external-data files its initializers point to."""
    if proto is None:
        import onnx

        proto = onnx.load(os.fspath(path), load_external_data=False)
    directory = os.path.dirname(os.path.abspath(path))
    files = {entry.value for t in proto.graph.initializer if t.data_location == 1  # onnx.TensorProto.EXTERNAL
             for entry in t.external_data if entry.key == "location"}
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(directory, f)) for f in files)


def op_counts(proto) -> dict[str, int]:
    """Op type -> node count of an ONNX model's main graph."""
    return dict(collections.Counter(node.op_type for node in proto.graph.node))


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def _session(path: str, report: ExportReport):
    """onnxruntime's CPU session, with all its graph optimisations, as a deployment would run the file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # not the warning that the optimised file below is machine-specific, nor errors: they are raised, and said once
    options.log_severity_level = 4
    if not report.quantized:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        report.ort_ops = op_counts(onnx.load(options.optimized_model_filepath, load_external_data=False))
    return session


def _as_inputs(value, what: str, who: str = "export_onnx") -> tuple[Tensor, ...]:
    """A tensor or a tuple of tensors, as a tuple of detached CPU tensors (the model's positional inputs)."""
    if isinstance(value, Tensor):
        return (value.detach().cpu(),)
    if isinstance(value, tuple) and value and all(isinstance(t, Tensor) for t in value):
        return tuple(t.detach().cpu() for t in value)
    if isinstance(value, list):  # one list argument (detection models) or positional inputs? Not guessed.
        raise TypeError(f"{who}: {what} is a list; pass a tuple of tensors, the model's positional inputs "
                        f"(a model taking a list of tensors as one argument cannot be checked by {who})")
    got = type(value).__name__ if not isinstance(value, tuple) else \
        f"tuple of {', '.join(type(t).__name__ for t in value) or 'nothing'}"
    raise TypeError(f"{who}: {what} must be a tensor or a tuple of tensors (the model's positional inputs), "
                    f"got {got}")


def _batch_size(x: Tensor) -> int:
    """An input's dim 0, the batch (1 for a 0-d input)."""
    return len(x) if x.dim() else 1


def _shapes(xs: tuple[Tensor, ...]) -> str:
    return str(tuple(xs[0].shape)) if len(xs) == 1 else ", ".join(str(tuple(x.shape)) for x in xs)


def _output_steps(model: nn.Module) -> list[float | None]:
    """For each output tensor, in the exporter's order: the scale of the per-tensor fake-quant producing it, or None."""
    if not isinstance(model, fx.GraphModule):
        return []
    from torch.utils._pytree import tree_leaves

    out = next(n for n in model.graph.nodes if n.op == "output").args[0]
    steps = []
    for node in tree_leaves(out):
        step = None
        if isinstance(node, fx.Node) and node.op == "call_module":
            fq = model.get_submodule(node.target)
            scale = getattr(fq, "scale", None)
            if isinstance(scale, Tensor) and scale.numel() == 1 and int(getattr(fq, "fake_quant_enabled", [1])[0]):
                step = float(scale)
        steps.append(step)
    return steps


def _fixed_batch(model: nn.Module, xs: tuple[Tensor, ...]) -> str | None:
    """Why ``model`` runs only at the example's batch size (a static ``torch.export`` program's guard), or None."""
    n = _batch_size(xs[0])
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
                         f"agree; got shapes {_shapes(xs)}. Pass dynamic_batch=False to export these shapes as "
                         "they are")


def _check_like(check: tuple[Tensor, ...], xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    if len(check) != len(xs) or any(c.shape[1:] != x.shape[1:] for c, x in zip(check, xs)) \
            or len({len(c) for c in check}) > 1:
        want = ", ".join("(" + ", ".join(["N", *map(str, x.shape[1:])]) + ")" for x in xs)
        raise ValueError(f"export_onnx: check_input must be shaped like example_input, {want} with one N; "
                         f"got {_shapes(check)}")
    return check


def _random_like(x: Tensor, batch: int | None, g: torch.Generator) -> Tensor:
    """Inputs drawn like ``x`` (``batch`` of them; None: x's own shape): floats around its mean and std,
    integers in its range."""
    shape = tuple(x.shape) if batch is None else (batch, *x.shape[1:])
    if x.is_complex():
        raise TypeError(f"export_onnx: a complex input ({x.dtype}) cannot be fed to onnxruntime")
    if x.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not x.is_floating_point():  # integers: ids, labels
        low, high = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
        return torch.randint(low, high + 1, shape, generator=g, dtype=x.dtype)
    real = x if x.dtype in (torch.float32, torch.float64) else x.float()
    std = real.std().clamp(min=1e-3) if x.numel() > 1 else torch.ones((), dtype=real.dtype)  # one value: no spread
    mean = real.mean() if x.numel() else torch.zeros((), dtype=real.dtype)
    return (torch.randn(shape, generator=g, dtype=real.dtype) * std + mean).to(x.dtype)


def _feed(session, xs: tuple[Tensor, ...]) -> dict:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(xs):
        raise RuntimeError(f"export_onnx: the ONNX model takes {len(names)} inputs ({', '.join(names)}) but "
                           f"{len(xs)} were given: the exporter dropped an input the model does not use?")
    return {n: x.numpy() for n, x in zip(names, xs)}


def _agreement(model: nn.Module, session, xs: tuple[Tensor, ...], check_input: tuple[Tensor, ...] | None,
               report: ExportReport, fixed_batch: int | None) -> None:
    """Every output of the quantized model against its ONNX output over the check inputs (each within its own
    allowance), and top-1 agreement on the first, where agreement means something."""
    import numpy as np

    given = check_input is not None
    if not given:
        g = torch.Generator().manual_seed(1)
        check_input = tuple(_random_like(x, 64, g) for x in xs)
    n = len(check_input[0])
    same = total = 0
    classes, width = set(), 0
    outputs: list[dict] = []  # per output tensor: largest |difference|, min, max
    batch_size, end = 256, n
    if fixed_batch is not None:  # the file takes only that batch size: whole batches of it
        batch_size, end = fixed_batch, n - n % fixed_batch
        if end == 0:
            raise ValueError(f"export_onnx: check_input has {n} inputs, fewer than the fixed batch "
                             f"size {fixed_batch} of a dynamic_batch=False export")
    for i in range(0, end, batch_size):
        xb = tuple(c[i:i + batch_size] for c in check_input)
        with torch.no_grad():
            expected = [t.numpy() for t in _output_tensors(model(*xb))]
        got = session.run(None, _feed(session, xb))
        for k, (e, o) in enumerate(zip(expected, got)):
            if k == len(outputs):
                outputs.append({"diff": 0.0, "lo": float("inf"), "hi": float("-inf")})
            rec = outputs[k]
            rec["diff"] = max(rec["diff"], float(np.abs(o.astype(np.float64) - e.astype(np.float64)).max()))
            rec["lo"], rec["hi"] = min(rec["lo"], float(e.min())), max(rec["hi"], float(e.max()))
        m = len(xb[0])
        predicted = expected[0].reshape(m, -1).argmax(1)
        same += int((got[0].reshape(m, -1).argmax(1) == predicted).sum())
        total += m
        classes.update(predicted.tolist())
        width = expected[0].reshape(m, -1).shape[1]
    steps = _output_steps(model)
    report.output_checks = [{"diff": r["diff"], "range": r["hi"] - r["lo"],
                             "step": steps[k] if k < len(steps) else None} for k, r in enumerate(outputs)]
    worst = max(report.output_checks, key=lambda c: c["diff"] / max(report.allowance_of(c), 1e-30))
    report.max_output_diff, report.output_range, report.output_step = worst["diff"], worst["range"], worst["step"]
    report.agreement, report.checked = same / max(1, total), total
    # random inputs have no margins (near-ties flip), one output per input has nothing to rank, and a model that
    # predicts one class for every input agrees with anything: agreement is checked on real inputs only
    report.agreement_meaningful = given and width > 1 and len(classes) > 1


def _compare(model: nn.Module, session, xs: tuple[Tensor, ...], sizes, report: ExportReport,
             given: tuple[Tensor, ...] | None = None, traced: int | None = None) -> None:
    """Run both on random inputs drawn like ``xs`` (or on the first items of ``given``, the user's check inputs);
    every output tensor is compared with its ONNX output on the same input, batch size by batch size (an output
    whose size depends on the data may have another size at each).

    Per batch size the report keeps the output closest to its allowance (``atol + rtol * its max |value|``),
    so a small auxiliary output is not judged by the scale of a large main one.

    Raises:
        _FixedGraph: at a batch size other than ``traced`` (the batch a dynamic-batch file was exported at),
            onnxruntime raised or returned other outputs or shapes than PyTorch.
        _OnnxRuntimeFailed: onnxruntime raised otherwise.
    """
    import numpy as np

    g = torch.Generator().manual_seed(0)
    for b in sizes:
        if given is not None:
            # None: the example's own batch size (a fixed-batch file takes no other)
            xb = tuple(c[:_batch_size(x)] if b is None else c[:b] for c, x in zip(given, xs))
        else:
            xb = tuple(_random_like(x, b, g) for x in xs)
        b = b if b is not None else _batch_size(xb[0])  # the report's key
        with torch.no_grad():
            expected = [t.numpy() for t in _output_tensors(model(*xb))]
        other = traced is not None and b != traced  # where a graph fixed at `traced` shows it
        try:
            got = session.run(None, _feed(session, xb))
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            failed = f"onnxruntime at batch {b}: {_ort_complaint(exc)}"
            raise (_FixedGraph if other else _OnnxRuntimeFailed)(failed) from exc
        if other and len(got) != len(expected):
            raise _FixedGraph(f"at batch {b} the ONNX model returns {len(got)} outputs, PyTorch {len(expected)}")
        if other:
            for k, (want, have) in enumerate(zip(expected, got)):
                if have.shape != want.shape:
                    raise _FixedGraph(f"at batch {b} output {k} is {tuple(have.shape)} in onnxruntime, "
                                      f"{tuple(want.shape)} in PyTorch")
        report.outputs = (len(expected), len(got))
        if len(got) != len(expected):
            # The exporter dropped or added outputs (e.g. None or constants): pairing by position would
            # compare unrelated tensors, so only the first pair is checked, and the report says so.
            logger.warning("export_onnx: PyTorch returns %d tensors, the ONNX model %d outputs; only the first is "
                           "compared", len(expected), len(got))
            expected, got = expected[:1], got[:1]
        worst = None
        if hasattr(session, "get_outputs"):
            report.data_dependent = _data_dependent(session, fixed_shape=b is None)
        for k, (want, have) in enumerate(zip(expected, got)):
            scale = float(np.abs(want).max()) if want.size else 0.0
            if have.shape != want.shape:
                d = rel = float("inf")
                report.shape_mismatches.setdefault(b, []).append(
                    f"output {k} {tuple(have.shape)} in onnxruntime, {tuple(want.shape)} in PyTorch")
            else:
                diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
                d = float(diff.max()) if diff.size else 0.0
                rel = float((diff / np.maximum(np.abs(want), 1e-6)).max()) if diff.size else 0.0
            allowed = report.allowance(scale)
            slack = d / allowed if allowed > 0 else (0.0 if d == 0 else float("inf"))
            if worst is None or not slack <= worst[0]:  # NaN counts as worst
                worst = (slack, d, rel, scale)
        _, report.max_abs_diff[b], report.max_rel_diff[b], report.output_scale[b] = worst


def _data_dependent(session, fixed_shape: bool) -> dict[int, list[int]]:
    """Output index -> its dims whose size depends on the data: dims the file leaves symbolic, other than the batch
    (in a fixed-shape file every symbolic dim; else those not named after the batch, e.g. dynamo's ``u0``)."""
    out = {}
    for k, o in enumerate(session.get_outputs()):
        dims = [i for i, d in enumerate(o.shape or [])
                if not isinstance(d, int) and (fixed_shape or "batch" not in str(d))]
        if dims:
            out[k] = dims
    return out


def _ints(values) -> str:
    return ", ".join(map(str, values))


def _shapes_text(report: ExportReport) -> str:
    """Why a float export failed when onnxruntime returned outputs in other shapes than PyTorch."""
    where = "; ".join(f"batch {b}: {', '.join(m)}" for b, m in report.shape_mismatches.items())
    return f"returns outputs shaped unlike PyTorch's on the same input ({where})"


def _data_dependent_text(report: ExportReport) -> str:
    """What a failure may owe to outputs whose size depends on the data."""
    which = f"output{'s' if len(report.data_dependent) > 1 else ''} {_ints(report.data_dependent)}"
    return (f"; the size of {which} depends on the data (items kept by a threshold, top-k or NMS): where items "
            "tie or sit at a threshold, onnxruntime and PyTorch can keep or order different ones, which no tolerance "
            "covers (or the graph is wrong): check on real inputs (check_input=...)")


def _ort_complaint(exc: Exception, limit: int = 300) -> str:
    """onnxruntime's error in one line, without its status-code preamble."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", " ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text}"[:limit]


def _output_tensors(out) -> list[Tensor]:
    """The tensors of a model output in the exporter's order (pytree leaves: dicts by insertion, then lists)."""
    from torch.utils._pytree import tree_leaves

    tensors = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
    if not tensors:
        raise TypeError(f"export_onnx: the model returned no tensor to compare (got {type(out).__name__})")
    return tensors


def _first_tensor(out) -> Tensor:
    return _output_tensors(out)[0]
