"""The benchmark scripts run (smoke sizes), so that what BENCHMARKS.md quotes can be reproduced."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_recipe_smoke():
    lines = [json.loads(line) for line in _run("benchmarks/gpu_recipe.py", "--smoke", "--width", "0.125").splitlines()
             if line.startswith("{")]
    assert [r["run"] for r in lines] == ["baseline", "sgs"] and all(r["epochs"] == 1 for r in lines)
    # warm-up 0: the SGS run calibrated S before its first step, so its trajectory differs from the baseline
    assert lines[0]["final_loss"] != lines[1]["final_loss"]


def test_accuracy_study_smoke(tmp_path):
    out = _run("benchmarks/accuracy.py", "--data", "synthetic", "--epochs", "1", "--seeds", "0", "--width", "0.0625",
               "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "acc.json"))
    table = json.loads((tmp_path / "acc.json").read_text())["results"]["table"]
    assert set(table) == {"baseline", "sgs_mi", "branches_acb", "fixed_acb_scales"} and "mean ± std" in out


def test_overhead_dispatch_bound_smoke(tmp_path):
    _run("benchmarks/overhead.py", "--dispatch-bound", "--models", "vgg11_bn", "--rounds", "2", "--inner", "1",
         "--warmup", "1", "--json", str(tmp_path / "o.json"))
    res = json.loads((tmp_path / "o.json").read_text())["results"]["vgg11_bn"]
    assert {"plain", "sgs", "sgs_per_use", "official"} <= set(res) and res["setting"]["threads"] == 1


@pytest.mark.slow
def test_int8_study_smoke(tmp_path):
    _run("benchmarks/int8_study.py", "--data", "synthetic", "--epochs", "2", "--seeds", "0", "--models", "vgg11_bn",
         "--arms", "baseline", "sgs_mi", "--subset", "256", "--width-scale", "0.25", "--out", str(tmp_path / "runs"),
         "--json", str(tmp_path / "int8.json"), timeout=600)
    results = json.loads((tmp_path / "int8.json").read_text())["results"]
    assert set(results["table"]) == {"vgg11_bn/baseline", "vgg11_bn/sgs_mi"}
    run = results["runs"][0]
    assert {"float_acc", "ptq_acc", "qat_acc", "weights"} <= set(run) and run["qat_export"]["quantized"]
    assert set(results["saturation"]["vgg11_bn"]) >= {"w7", "w8"}
