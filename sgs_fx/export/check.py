"""onnxruntime's side of ``export_onnx``: run the exported file and compare it with PyTorch, at each batch size, on
the same inputs (random ones drawn like the example, or the user's ``check_input``), output by output; tell a
graph that runs only at its traced batch size from a real mismatch; and score a classifier file's accuracy."""
from __future__ import annotations

import logging
import os
import re
import tempfile

import torch
from torch import Tensor, fx, nn

from .report import ExportReport, op_counts

__all__ = ["FixedGraph", "OnnxRuntimeFailed", "check_outputs", "runs_at", "open_session", "onnx_accuracy",
           "as_inputs", "batch_size", "shapes", "check_like", "random_like", "agreement"]

logger = logging.getLogger("sgs_fx")


class FixedGraph(Exception):
    """What shows that the exported graph does not run at a batch size other than the one it was exported at."""


class OnnxRuntimeFailed(Exception):
    """onnxruntime raised running the file (its own error types derive from Exception only)."""


def check_outputs(model: nn.Module, session, xs: tuple[Tensor, ...], sizes, report: ExportReport,
           given: tuple[Tensor, ...] | None, traced: int | None) -> None:
    """``_compare``, with the model's and onnxruntime's errors turned into ones that say what to do."""
    try:
        _compare(model, session, xs, sizes, report, given, traced)
    except OnnxRuntimeFailed as exc:
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


def runs_at(model: nn.Module, session, xs: tuple[Tensor, ...], batch: int, given: tuple[Tensor, ...] | None) -> bool:
    """Whether onnxruntime runs the file at ``batch`` and returns PyTorch's number of outputs. (Not their shapes:
    an output whose size depends on the data, such as detections with tied scores, may differ in size there; the
    comparison at that batch reports it.)"""
    g = torch.Generator().manual_seed(2)
    xb = tuple(c[:batch] for c in given) if given is not None and len(given[0]) >= batch else \
        tuple(random_like(x, batch, g) for x in xs)
    try:
        with torch.no_grad():
            expected = _output_tensors(model(*xb))
        got = session.run(None, _feed(session, xb))
    except Exception:
        return False
    return len(got) == len(expected)


def open_session(path: str, report: ExportReport):
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
        xs = as_inputs(x, "a batch's input", "onnx_accuracy")
        if len(xs) != len(names):
            raise ValueError(f"onnx_accuracy: {os.fspath(path)} takes {len(names)} input(s) ({', '.join(names)}), "
                             f"a batch gave {len(xs)}; give each batch as (inputs, labels), inputs a tuple")
        logits = session.run(None, dict(zip(names, (t.numpy() for t in xs))))[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y.cpu()).sum())
        total += len(y)
    if total == 0:
        raise ValueError("onnx_accuracy: no batches")
    return correct / total


def as_inputs(value, what: str, who: str = "export_onnx") -> tuple[Tensor, ...]:
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


def batch_size(x: Tensor) -> int:
    """An input's dim 0, the batch (1 for a 0-d input)."""
    return len(x) if x.dim() else 1


def shapes(xs: tuple[Tensor, ...]) -> str:
    return str(tuple(xs[0].shape)) if len(xs) == 1 else ", ".join(str(tuple(x.shape)) for x in xs)


def check_like(check: tuple[Tensor, ...], xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    if len(check) != len(xs) or any(c.shape[1:] != x.shape[1:] for c, x in zip(check, xs)) \
            or len({len(c) for c in check}) > 1:
        want = ", ".join("(" + ", ".join(["N", *map(str, x.shape[1:])]) + ")" for x in xs)
        raise ValueError(f"export_onnx: check_input must be shaped like example_input, {want} with one N; "
                         f"got {shapes(check)}")
    return check


def random_like(x: Tensor, batch: int | None, g: torch.Generator) -> Tensor:
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


def agreement(model: nn.Module, session, xs: tuple[Tensor, ...], check_input: tuple[Tensor, ...] | None,
               report: ExportReport, fixed_batch: int | None) -> None:
    """Every output of the quantized model against its ONNX output over the check inputs (each within its own
    allowance), and top-1 agreement on the first, where agreement means something."""
    import numpy as np

    given = check_input is not None
    if not given:
        g = torch.Generator().manual_seed(1)
        check_input = tuple(random_like(x, 64, g) for x in xs)
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
        FixedGraph: at a batch size other than ``traced`` (the batch a dynamic-batch file was exported at),
            onnxruntime raised or returned other outputs or shapes than PyTorch.
        OnnxRuntimeFailed: onnxruntime raised otherwise.
    """
    import numpy as np

    g = torch.Generator().manual_seed(0)
    for b in sizes:
        if given is not None:
            # None: the example's own batch size (a fixed-batch file takes no other)
            xb = tuple(c[:batch_size(x)] if b is None else c[:b] for c, x in zip(given, xs))
        else:
            xb = tuple(random_like(x, b, g) for x in xs)
        b = b if b is not None else batch_size(xb[0])  # the report's key
        with torch.no_grad():
            expected = [t.numpy() for t in _output_tensors(model(*xb))]
        other = traced is not None and b != traced  # where a graph fixed at `traced` shows it
        try:
            got = session.run(None, _feed(session, xb))
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            failed = f"onnxruntime at batch {b}: {_ort_complaint(exc)}"
            raise (FixedGraph if other else OnnxRuntimeFailed)(failed) from exc
        if other and len(got) != len(expected):
            raise FixedGraph(f"at batch {b} the ONNX model returns {len(got)} outputs, PyTorch {len(expected)}")
        if other:  # (a dim whose size depends on the data may differ: ties; that is compared below, not this)
            free = _data_dependent(session, fixed_shape=False) if hasattr(session, "get_outputs") else {}
            for k, (want, have) in enumerate(zip(expected, got)):
                if len(have.shape) != len(want.shape) or any(
                        h != w and i not in free.get(k, ()) for i, (h, w) in enumerate(zip(have.shape, want.shape))):
                    raise FixedGraph(f"at batch {b} output {k} is {tuple(have.shape)} in onnxruntime, "
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