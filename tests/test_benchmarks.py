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


def test_gpu_recipe_on_a_carried_subset(tmp_path):
    # the way a lent GPU gets data: a small .npz of uint8 arrays, a few epochs, and a projection of the recipe
    import numpy as np

    from sgs_fx.data import synthetic_cifar

    d = synthetic_cifar(n_train=256, n_test=64)
    np.savez_compressed(tmp_path / "sub.npz", **{k: getattr(d, k).numpy() for k in
                                                  ("train_images", "train_labels", "test_images", "test_labels")})
    _run("benchmarks/gpu_recipe.py", "--data-npz", str(tmp_path / "sub.npz"), "--runs", "sgs", "--epochs", "2",
         "--warmup", "0", "--width", "0.0625", "--batch-size", "64", "--no-compile", "--json", str(tmp_path / "r.json"))
    (row,) = json.loads((tmp_path / "r.json").read_text())["results"]["runs"]
    assert row["train_images"] == 256 and row["test_images"] == 64 and row["steps_per_epoch"] == 4
    assert row["calibrations"] == 1 and row["calibration_s"] > 0 and row["projected_full_s"] > row["train_wall_s"]


def test_gpu_recipe_projection_arithmetic():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_recipe import projection

    class Every5:  # the recipe's schedule with warm-up 1: due at 1, 5, 10, ..., 195 (40 calibrations)
        def due(self, epoch):
            return epoch == 1 or (epoch > 1 and epoch % 5 == 0)

    # 10 epochs of 100 steps: 20 s, of which the first epoch 5 s and 2 later calibrations (epochs 1, 5) of 0.5 s
    row = {"epochs": 10, "steps_per_epoch": 100, "batch_size": 128, "train_wall_s": 20.0, "first_epoch_s": 5.0,
           "calibrations": 2, "calibration_s": 1.0}
    p = projection(row, 200, Every5())
    # steady: (20 - 5 - 2 * 0.5) s / 900 steps; full: 390 * 200 steps, the first 100 of them in the first epoch
    assert p["steady_step_ms"] == pytest.approx(14.0 / 900 * 1e3, rel=1e-12)
    assert p["projected_full_s"] == pytest.approx(5.0 + 14.0 / 900 * (78_000 - 100) + 0.5 * 40, rel=1e-12)
    assert projection({**row, "epochs": 1}, 200, Every5()) == {}


def test_accuracy_study_smoke(tmp_path):
    out = _run("benchmarks/accuracy.py", "--data", "synthetic", "--epochs", "1", "--seeds", "0", "--width", "0.0625",
               "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "acc.json"))
    table = json.loads((tmp_path / "acc.json").read_text())["results"]["table"]
    assert set(table) == {"baseline", "sgs_mi", "branches_acb", "fixed_acb_scales"} and "mean ± std" in out


def test_overhead_dispatch_bound_smoke(tmp_path):
    _run("benchmarks/overhead.py", "--dispatch-bound", "--models", "vgg11_bn", "--rounds", "2", "--inner", "1",
         "--warmup", "1", "--json", str(tmp_path / "o.json"))
    res = json.loads((tmp_path / "o.json").read_text())["results"]["vgg11_bn"]
    assert {"plain", "plain_again", "sgs", "sgs_per_use", "sgs_step", "official"} <= set(res)
    assert res["setting"]["threads"] == 1
    _run("benchmarks/overhead.py", "--dispatch-bound", "--models", "vgg11_bn", "--rounds", "2", "--inner", "1",
         "--warmup", "1", "--variants", "sgs_step", "--json", str(tmp_path / "v.json"))
    res = json.loads((tmp_path / "v.json").read_text())["results"]["vgg11_bn"]
    assert set(res) == {"plain", "sgs_step", "setting"}


def test_hook_cost_smoke(tmp_path):
    _run("benchmarks/hook_cost.py", "--convs", "3", "--samples", "4", "--json", str(tmp_path / "h.json"))
    _run("benchmarks/hook_cost.py", "--in-model", "vgg11_bn", "--steps", "3", "--json", str(tmp_path / "m.json"))
    res = json.loads((tmp_path / "h.json").read_text())["results"]
    assert {"plain", "sgs_hook", "noop_hook", "sgs_per_use", "foreach_after"} <= set(res)
    assert res["plain"]["extra_per_conv_us"] == 0 and len(res["sgs_hook"]["extra_per_conv_us_ci95"]) == 2
    in_model = json.loads((tmp_path / "m.json").read_text())["results"]
    assert set(in_model) == {"kxk", "full"} and len(in_model["kxk"]["per_conv"]) == 8  # VGG-11-BN's 3x3 convs


def test_batched_scaling_experiment_is_exact_and_runs(tmp_path):
    _run("benchmarks/batched_scaling.py", "--rounds", "2", "--inner", "1", "--json", str(tmp_path / "b.json"))
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert results["max_grad_error_float64"] == 0.0
    assert {"plain", "sgs", "official", "batched"} <= set(results)


def test_median_ci_brackets_the_median_and_narrows_with_more_data():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import median_ci

    assert median_ci([1.0, 1.0, 1.0]) == [1.0, 1.0]
    small = [1.0 + 0.1 * ((7 * i) % 11 - 5) for i in range(11)]  # 0.5 .. 1.5, median 1.0
    lo, hi = median_ci(small)
    assert lo < 1.0 < hi and lo >= 0.5 and hi <= 1.5
    lo2, hi2 = median_ci(small * 20)  # same spread, 20x the rounds: a narrower interval around the same median
    assert lo <= lo2 <= 1.0 <= hi2 <= hi and hi2 - lo2 < hi - lo
    assert median_ci(small, seed=1) == median_ci(small, seed=1)
    # 95 %: for n standard-normal values the median's standard error is 1.2533 / sqrt(n), so the interval is
    # about 2 * 1.96 * 0.0627 = 0.25 wide for n = 400 (min-max of the bootstrap medians would be ~0.45)
    import statistics

    normal = [statistics.NormalDist().inv_cdf((i + 0.5) / 400) for i in range(400)]
    lo, hi = median_ci(normal)
    assert 0.18 < hi - lo < 0.32 and lo < 0 < hi


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
