"""INT8 study on real CIFAR-10 (issue 11): does SGS quantize like a plain network, and do folded branches not?

For each model (narrow VGG-11-BN and ResNet-18), arm (baseline, SGS-MI, SGS with fixed ACB-equivalent S,
ACB branches folded by strip) and seed, one float run of --epochs; its checkpoint before the last --qat-epochs
epochs is copied and continued with fake-quant (QAT, the same lr schedule), so float and QAT share their first
epochs and their length. Then:

* float: the float model's test accuracy (PyTorch);
* PTQ: ``quantize_ptq`` on 32 training batches, exported to QDQ ONNX, accuracy of onnxruntime's INT8 run;
* QAT: the QAT model exported to QDQ ONNX, accuracy of onnxruntime's INT8 run;
* weight statistics of the deployed (BatchNorm-folded) float weights: max |w| / std per layer (tensor-wide and
  per output channel, averaged over channels) and the SQNR of their per-channel int8 quantization.

Resumable: finished runs are read back from --json. About 45 minutes on 2 CPU cores at the defaults:

    nohup .venv/bin/python benchmarks/int8_study.py > int8.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, meta  # noqa: E402

import sgs_fx  # noqa: E402
from sgs_fx.cifar.data import load_cifar10, synthetic_cifar  # noqa: E402
from sgs_fx.export.onnx import onnx_accuracy  # noqa: E402
from sgs_fx.export.qdq import folded_weight_and_bias, quantize_weight  # noqa: E402
from sgs_fx.cifar.train import TrainConfig, evaluate, export_summary, load_trained, train  # noqa: E402

ARMS = {
    "baseline": dict(scales="none"),
    "sgs_mi": dict(scales="mi"),
    "fixed_acb_scales": dict(scales="acb"),
    "branches_acb_folded": dict(scales="acb", mode="branches"),
}
MODELS = {"vgg11_bn": 0.25, "resnet18": 0.125}


def weight_stats(qat_like: torch.nn.Module) -> dict:
    """max|w|/std (layer, mean per channel) and int8 SQNR of the BN-folded weights of every quantized conv."""
    layers = []
    for name, m in qat_like.named_modules():
        if getattr(m, "weight_fake_quant", None) is None or m.weight.dim() < 4:
            continue
        w, _ = folded_weight_and_bias(m)
        flat = w.reshape(w.shape[0], -1).double()
        per_channel = (flat.abs().amax(1) / flat.std(1).clamp_min(1e-12)).mean().item()
        q, scale, zp, axis, _, _ = quantize_weight(name, m)
        shape = [-1] + [1] * (w.dim() - 1)
        deq = (q.double() - zp.reshape(shape)) * scale.double().reshape(shape)
        sqnr = 10 * math.log10(w.double().pow(2).sum().item() / max((w.double() - deq).pow(2).sum().item(), 1e-30))
        layers.append({"layer": name, "max_over_std": (flat.abs().max() / flat.std()).item(),
                       "max_over_std_per_channel": per_channel, "sqnr_db": sqnr})
    return {"layers": layers,
            "mean_max_over_std": statistics.mean(r["max_over_std"] for r in layers),
            "worst_max_over_std": max(r["max_over_std"] for r in layers),
            "mean_max_over_std_per_channel": statistics.mean(r["max_over_std_per_channel"] for r in layers),
            "mean_sqnr_db": statistics.mean(r["sqnr_db"] for r in layers),
            "worst_sqnr_db": min(r["sqnr_db"] for r in layers)}


def ort_accuracy(path: str, data) -> float:
    return onnx_accuracy(path, data.test_batches())


def one_run(model_name: str, arm: str, seed: int, args, data) -> dict:
    root = Path(args.out) / model_name / f"{arm}_s{seed}"
    cfg = TrainConfig(model=model_name, width=MODELS[model_name] * args.width_scale, epochs=args.epochs, seed=seed,
                      every=args.every, warmup=1, subset=args.subset, data=args.data, out=str(root / "float"),
                      export=False, plots=False, progress=False, **ARMS[arm])
    qat_cfg = replace(cfg, out=str(root / "qat"), qat_epoch=args.epochs - args.qat_epochs)
    t0 = time.perf_counter()
    train(cfg, stop_at=qat_cfg.qat_epoch)
    shutil.copytree(root / "float", root / "qat", dirs_exist_ok=True)
    float_acc = train(cfg, resume=True)["final"]["test_acc"]
    qat_acc_torch = train(qat_cfg, resume=True)["final"]["test_acc"]
    float_model, _ = load_trained(root / "float" / "checkpoint.pt")
    qat_model, _ = load_trained(root / "qat" / "checkpoint.pt")
    check = data.agreement_images()
    ptq_model = sgs_fx.quantize_ptq(float_model, data.calibration_batches(32, seed=seed), num_batches=32,
                                    progress=False)
    row = {"model": model_name, "arm": arm, "seed": seed, "float_acc": float_acc, "qat_acc_torch": qat_acc_torch}
    for kind, model in (("ptq", ptq_model), ("qat", qat_model)):
        report = sgs_fx.export_onnx(model, str(root / f"{kind}_int8.onnx"), check[:1], check_input=check,
                                    min_agreement=0.0)  # a study records the agreement, it does not gate on it
        row[f"{kind}_acc"] = ort_accuracy(report.path, data)
        row[f"{kind}_export"] = export_summary(report)
    row["ptq_acc_torch"] = evaluate(ptq_model, data, torch.device("cpu"))[1]
    row["weights"] = weight_stats(ptq_model)
    row["wall_s"] = time.perf_counter() - t0
    return row


def saturation(model_name: str, args, data) -> dict:
    """7- vs 8-bit weights, PTQ of the seed-0 baseline: onnxruntime's int8 kernels against the fake-quant model."""
    model, _ = load_trained(Path(args.out) / model_name / "baseline_s0" / "float" / "checkpoint.pt")
    calib = data.calibration_batches(32)
    check = data.agreement_images(2000)
    out = {"cpu_flags": sorted({f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
                                if f in Path("/proc/cpuinfo").read_text().split()})}
    for bits in (7, 8):
        ptq = sgs_fx.quantize_ptq(model, calib, weight_bits=bits, progress=False)
        report = sgs_fx.export_onnx(ptq, str(Path(args.out) / model_name / f"saturation_w{bits}.onnx"), check[:1],
                                    check_input=check, min_agreement=0.0)
        out[f"w{bits}"] = {"agreement": report.agreement, "max_output_diff": report.max_output_diff,
                           "fake_quant_acc": evaluate(ptq, data, torch.device("cpu"))[1], "ort_acc": ort_accuracy(report.path, data)}
    return out


def table(runs: list[dict]) -> dict:
    out = {}
    for model_name in dict.fromkeys(r["model"] for r in runs):
        for arm in dict.fromkeys(r["arm"] for r in runs if r["model"] == model_name):
            rows = [r for r in runs if r["model"] == model_name and r["arm"] == arm]

            def ms(values):
                values = list(values)
                return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]

            out[f"{model_name}/{arm}"] = {
                "n": len(rows), "float": ms(r["float_acc"] for r in rows), "ptq": ms(r["ptq_acc"] for r in rows),
                "qat": ms(r["qat_acc"] for r in rows),
                "ptq_drop": ms(r["float_acc"] - r["ptq_acc"] for r in rows),
                "qat_drop": ms(r["float_acc"] - r["qat_acc"] for r in rows),
                "max_over_std": ms(r["weights"]["mean_max_over_std"] for r in rows),
                "max_over_std_per_channel": ms(r["weights"]["mean_max_over_std_per_channel"] for r in rows),
                "sqnr_db": ms(r["weights"]["mean_sqnr_db"] for r in rows),
                "ptq_agreement": ms(r["ptq_export"]["agreement"] for r in rows),
                "qat_agreement": ms(r["qat_export"]["agreement"] for r in rows)}
    return out


def print_table(t: dict) -> None:
    print(f"\n{'model/arm':<32} {'float':>12} {'PTQ int8':>12} {'QAT int8':>12} {'max|w|/std':>11} {'SQNR dB':>8}")
    for key, r in t.items():
        def f(v):
            return f"{100 * v[0]:5.2f}±{100 * v[1]:4.2f}"
        print(f"{key:<32} {f(r['float']):>12} {f(r['ptq']):>12} {f(r['qat']):>12} "
              f"{r['max_over_std'][0]:>11.2f} {r['sqnr_db'][0]:>8.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--qat-epochs", type=int, default=1, help="the last epochs trained with fake-quant")
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--width-scale", type=float, default=1.0, help="multiplies each model's width (smoke runs)")
    p.add_argument("--data", default="cifar10", choices=["cifar10", "synthetic"])
    p.add_argument("--out", default="runs/int8")
    p.add_argument("--json", default="benchmarks/results/int8_study.json")
    p.add_argument("--no-saturation", dest="saturation", action="store_false",
                   help="skip the 7- vs 8-bit weight comparison at the end")
    args = p.parse_args(argv)
    if not 1 <= args.qat_epochs < args.epochs:
        p.error("--qat-epochs must be in [1, --epochs - 1]")
    warnings.filterwarnings("ignore")
    data = synthetic_cifar() if args.data == "synthetic" else load_cifar10()
    done, saturation_done = [], {}
    if Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())
        saturation_done = previous["results"].get("saturation", {})
        if previous["meta"]["args"].get("epochs") == args.epochs and previous["meta"]["args"].get("data") == args.data:
            done = previous["results"]["runs"]
    runs = list(done)
    for seed in args.seeds:
        for model_name in args.models:
            for arm in args.arms:
                if any(r["model"] == model_name and r["arm"] == arm and r["seed"] == seed for r in done):
                    continue
                row = one_run(model_name, arm, seed, args, data)
                runs.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("weights", "ptq_export", "qat_export")}),
                      flush=True)
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # after every run: resumable
                Path(args.json).write_text(json.dumps({"meta": meta(args), "results": {
                    "runs": runs, "table": table(runs), "saturation": saturation_done}}, indent=2))
    t = table(runs)
    print_table(t)
    results = {"runs": runs, "table": t}
    results["saturation"] = dict(saturation_done)  # one invocation per model keeps the others'
    if args.saturation and 0 in args.seeds and "baseline" in args.arms:
        results["saturation"].update({m: saturation(m, args, data) for m in args.models})
        print(json.dumps(results["saturation"]))
    emit(args, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
