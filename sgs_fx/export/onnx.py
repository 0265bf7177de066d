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
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..passes.strip import strip

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
        max_abs_diff / max_rel_diff: batch size -> largest difference between onnxruntime and PyTorch.
        atol: the tolerance on the absolute difference.
    """

    path: str
    opset: int
    exporter: str
    op_counts: dict[str, int]
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    max_rel_diff: dict[int, float] = field(default_factory=dict)
    atol: float = 1e-4
    fallback_reason: str | None = None

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_diff) and max(self.max_abs_diff.values()) <= self.atol

    def __str__(self) -> str:
        lines = [f"ONNX export: {self.path} (opset {self.opset}, {self.exporter} exporter, "
                 f"{sum(self.op_counts.values())} nodes)"]
        ops = ", ".join(f"{k}×{v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: -kv[1]))
        lines.append(f"  ops: {ops}")
        for b in self.max_abs_diff:
            lines.append(f"  batch {b}: max |ort - torch| = {self.max_abs_diff[b]:.3g}, "
                         f"max rel = {self.max_rel_diff[b]:.3g}")
        lines.append(f"  {'PASSED' if self.passed else 'FAILED'} (atol {self.atol:g})")
        return "\n".join(lines)


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: Tensor, *, dynamic_batch: bool = True,
                opset: int | None = None, check_batch_sizes: tuple[int, ...] = (1, 3), atol: float = 1e-4
                ) -> ExportReport:
    """Strip a copy of ``model``, export it to ``path`` and check it with onnxruntime.

    Args:
        model: a transformed (SGS or branch mode) or plain model; it is not modified.
        path: the .onnx file to write; its directory must exist.
        example_input: one input tensor, shape (N, ...); it sets the non-batch dims.
        dynamic_batch: export the batch dim as dynamic (otherwise only N is checked).
        opset: ONNX opset (default: the exporter's).
        check_batch_sizes: batch sizes run through onnxruntime and PyTorch.
        atol: largest allowed absolute difference. 1e-4 leaves room for float32 reductions reordered
            by onnxruntime's kernels in deep models (observed ≤ 1e-5 on torchvision models).

    Raises:
        FileNotFoundError: the directory of ``path`` does not exist.
        ValueError: ``example_input`` does not fit the model.
        RuntimeError: the exporter failed (its complaint is quoted).
        ExportMismatchError: onnxruntime's output differs beyond ``atol``; the file is still written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"export_onnx: directory {directory!r} of {path!r} does not exist; create it first")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"export_onnx: example_input must be a tensor, got {type(example_input).__name__}")
    plain = strip(model).eval()
    x = example_input.detach().cpu()
    plain = plain.cpu()
    try:
        with torch.no_grad():
            plain(x)
    except Exception as exc:
        raise ValueError(f"export_onnx: example_input of shape {tuple(x.shape)} does not fit "
                         f"{type(plain).__name__}: {exc}") from exc

    exporter, reason = _export(plain, x, path, dynamic_batch, opset)
    import onnx

    proto = onnx.load(path, load_external_data=False)
    onnx.checker.check_model(path)
    report = ExportReport(path=path, opset=_opset(proto), exporter=exporter, op_counts=op_counts(proto), atol=atol,
                          fallback_reason=reason)
    sizes = tuple(check_batch_sizes) if dynamic_batch else (x.shape[0],)
    _compare(plain, path, x, sizes, report)
    if not report.passed:
        raise ExportMismatchError(f"export_onnx: onnxruntime differs from PyTorch beyond atol={atol:g}; "
                                  f"the model was written to {path}\n{report}", report)
    logger.info("%s", report)
    return report


def _export(model: nn.Module, x: Tensor, path: str, dynamic_batch: bool, opset: int | None):
    # torch.export specialises a dim of size 1: export with a batch of 2 so the batch dim stays symbolic.
    ex = x.expand(2, *x.shape[1:]).contiguous() if dynamic_batch and x.shape[0] == 1 else x
    kwargs = {} if opset is None else {"opset_version": opset}
    try:
        dyn = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (ex,), path, dynamo=True, dynamic_shapes=dyn, verbose=False, **kwargs)
        return "dynamo", None
    except Exception as dynamo_exc:
        reason = _complaint(dynamo_exc)
        logger.warning("export_onnx: the dynamo exporter failed (%s); falling back to the TorchScript exporter", reason)
    try:
        axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (ex,), path, dynamo=False, input_names=["input"], output_names=["output"],
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


def op_counts(proto) -> dict[str, int]:
    """Op type -> node count of an ONNX model's main graph."""
    return dict(collections.Counter(node.op_type for node in proto.graph.node))


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def _compare(model: nn.Module, path: str, x: Tensor, sizes, report: ExportReport) -> None:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    g = torch.Generator().manual_seed(0)
    for b in sizes:
        xb = torch.randn((b, *x.shape[1:]), generator=g, dtype=x.dtype) * x.std().clamp(min=1e-3) + x.mean()
        with torch.no_grad():
            expected = _first_tensor(model(xb)).numpy()
        got = session.run(None, {name: xb.numpy()})[0]
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        report.max_abs_diff[b] = float(diff.max()) if diff.size else 0.0
        report.max_rel_diff[b] = float((diff / np.maximum(np.abs(expected), 1e-6)).max()) if diff.size else 0.0


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    if isinstance(out, (list, tuple)):
        return _first_tensor(out[0])
    raise TypeError(f"export_onnx: cannot compare a model output of type {type(out).__name__}")
