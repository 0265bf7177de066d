"""`make demo` / `sgs-fx demo`: a narrow VGG-11-BN on real CIFAR-10, with and without SGS, exported and checked,
in float and in INT8 (post-training quantization, QDQ ONNX), both scored by onnxruntime."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .data import load_cifar10
from ..export.onnx import file_size, onnx_accuracy
from .train import TrainConfig, export_summary, load_trained, train

logger = logging.getLogger("sgs_fx")

NOTE = """\
What this shows: the whole pipeline on real data — SGS switched on in one line, S computed from the mutual
information of every conv's input (centre-peaked, as in the paper), training at plain-SGD cost, a plain
ONNX model checked against PyTorch with onnxruntime, and its INT8 QDQ version (post-training quantization,
int8 weights) scored by onnxruntime's int8 kernels next to it.
What it cannot show: an accuracy gain. The paper's gains (+1 to +2.4 points on CIFAR-100) come from 200
epochs; a few CPU epochs on a subset differ by seed noise (±1 point or more). BENCHMARKS.md holds the
multi-seed study and how to run the paper's recipe on a GPU."""


def run_demo(out: str = "runs/demo", epochs: int = 5, subset: int = 25000, width: float = 0.25,
             data_dir: str | None = None) -> int:
    base = dict(model="vgg11_bn", width=width, epochs=epochs, subset=subset, data_dir=data_dir, every=5, warmup=1)
    runs = {}
    t0 = time.perf_counter()
    for name, scales in (("baseline", "none"), ("sgs", "mi")):
        print(f"== {name}: vgg11_bn width {width}, {epochs} epochs on {subset} CIFAR-10 training images")
        runs[name] = train(TrainConfig(scales=scales, out=str(Path(out) / name), **base))
    data = load_cifar10(data_dir)
    for name, run in runs.items():
        run["int8"] = int8_ptq(Path(out) / name, data)
    wall = time.perf_counter() - t0
    print()
    print(_table(runs))
    print()
    print(_deploy_table(runs))
    sgs_scales = runs["sgs"]["scales"]
    for name in list(sgs_scales)[:2]:
        rows = "\n".join("    " + "  ".join(f"{v:5.2f}" for v in row) for row in sgs_scales[name])
        print(f"\nS of {name} (MI, mean 1):\n{rows}")
    print(f"\nwall time {wall:.0f}s; runs, metrics, plots and ONNX files under {out}/")
    print("\n" + NOTE)
    (Path(out) / "demo_summary.json").write_text(json.dumps(runs, indent=2))
    return 0 if all(r.get("onnx", {}).get("passed") and r["int8"]["passed"] for r in runs.values()) else 1


def int8_ptq(run_dir: Path, data, calib_batches: int = 32) -> dict:
    """Post-training INT8 of a finished run: QDQ ONNX next to its float ONNX, both scored by onnxruntime."""
    import sgs_fx

    model, _ = load_trained(run_dir / "checkpoint.pt")
    ptq = sgs_fx.quantize_ptq(model, data.calibration_batches(calib_batches), num_batches=calib_batches,
                              progress=False)
    check = data.agreement_images()
    report = sgs_fx.export_onnx(ptq, run_dir / "model_int8.onnx", check[:1], check_input=check)
    row = export_summary(report)
    row["test_acc"] = onnx_accuracy(report.path, data.test_batches())
    row["float_onnx_test_acc"] = onnx_accuracy(run_dir / "model.onnx", data.test_batches())
    row["float_onnx_size_bytes"] = file_size(run_dir / "model.onnx")
    return row


def _deploy_table(runs: dict) -> str:
    lines = ["onnxruntime on the test set (INT8: post-training quantization on 32 training batches, QDQ ONNX)",
             f"{'':<10} {'float acc':>10} {'float size':>11} {'INT8 acc':>9} {'INT8 size':>10} {'agreement':>10} "
             f"{'int8 kernels':>13}"]
    for name, r in runs.items():
        q = r["int8"]
        kernels = sum(q["int8_kernels"].values())
        lines.append(f"{name:<10} {q['float_onnx_test_acc']:>10.4f} {q['float_onnx_size_bytes'] / 1024:>8.0f} KiB "
                     f"{q['test_acc']:>9.4f} {q['size_bytes'] / 1024:>6.0f} KiB {q['agreement']:>10.2%} {kernels:>13}")
    return "\n".join(lines)


def _table(runs: dict) -> str:
    lines = [f"{'':<10} {'test acc':>9} {'best':>7} {'s/epoch':>8} {'ONNX max |diff|':>16} {'ONNX':>6}"]
    for name, r in runs.items():
        onnx = r.get("onnx") or {}
        diff = max(onnx.get("max_abs_diff", {0: float("nan")}).values())
        lines.append(f"{name:<10} {r['final']['test_acc']:>9.4f} {r['best_test_acc']:>7.4f} "
                     f"{r['mean_epoch_time_s']:>8.1f} {diff:>16.2e} {'ok' if onnx.get('passed') else 'FAIL':>6}")
    return "\n".join(lines)
