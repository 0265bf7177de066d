"""What ``export_onnx`` returns: the report of an export (the file, its operators, how onnxruntime compared with
PyTorch), the error it raises on a mismatch, and the file's size and operator counts."""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

__all__ = ["ExportMismatchError", "ExportReport", "file_size", "op_counts", "shapes_text", "data_dependent_text"]


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


def _ints(values) -> str:
    return ", ".join(map(str, values))


def shapes_text(report: ExportReport) -> str:
    """Why a float export failed when onnxruntime returned outputs in other shapes than PyTorch."""
    where = "; ".join(f"batch {b}: {', '.join(m)}" for b, m in report.shape_mismatches.items())
    return f"returns outputs shaped unlike PyTorch's on the same input ({where})"


def data_dependent_text(report: ExportReport) -> str:
    """What a failure may owe to outputs whose size depends on the data."""
    which = f"output{'s' if len(report.data_dependent) > 1 else ''} {_ints(report.data_dependent)}"
    return (f"; the size of {which} depends on the data (items kept by a threshold, top-k or NMS): where items "
            "tie or sit at a threshold, onnxruntime and PyTorch can keep or order different ones, which no tolerance "
            "covers (or the graph is wrong): check on real inputs (check_input=...)")


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