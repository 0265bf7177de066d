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


def test_fast_step_smoke(tmp_path):
    _run("benchmarks/fast_step.py", "--smoke", "--models", "vgg11_bn", "--arms", "baseline", "sgs", "--rounds", "2",
         "--json", str(tmp_path / "f.json"))
    row = json.loads((tmp_path / "f.json").read_text())["results"]["timing"]["vgg11_bn"]
    assert set(row["step_ms"]) == {"baseline", "sgs"} and len(row["step_ms_rounds"]["sgs"]) == 2
    assert row["ratio_to_baseline"]["baseline"] == 1.0 and len(row["ratio_ci"]["sgs"]) == 2
    assert row["calibration_s"]  # warm-up 1: the SGS trainer calibrated at round 1, and its time was kept apart
    _run("benchmarks/fast_step.py", "--smoke", "--check", "--json", str(tmp_path / "c.json"))
    check = json.loads((tmp_path / "c.json").read_text())["results"]["check"]
    assert check["scales_moved"] and "passed" not in check  # a CPU captures nothing: the eager step is checked
    assert check["max_relative_grad_error"] == 0.0 and check["max_relative_update_error"] < 1e-4


def test_gpu_session_script_runs_blind_at_smoke_size(tmp_path):
    # the script a lent GPU runs, end to end on this CPU: every step, its JSON, the study's lines and report
    import os

    env = {**os.environ, "OUT": str(tmp_path), "SMOKE": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "240"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "session.log").read_text()
    for step in ("check", "timing", "study"):
        assert f"=== {step}: exit 0" in log, log[-3000:]
    assert "runs eagerly" not in log
    assert json.loads((tmp_path / "fast_step.json").read_text())["results"]["timing"]["resnet18"]["step_ms"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from study import read_rows

    rows = read_rows(tmp_path / "study_gpu.jsonl")
    assert rows[0]["arm"] == "baseline" and "int8_acc" in rows[0]  # the first run starts whatever the budget
    assert "paired difference to the baseline" in log and (tmp_path / "study_gpu.png").exists()


def test_overhead_dispatch_bound_smoke(tmp_path):
    _run("benchmarks/overhead.py", "--dispatch-bound", "--models", "vgg11_bn", "--rounds", "2", "--inner", "1",
         "--warmup", "1", "--json", str(tmp_path / "o.json"))
    res = json.loads((tmp_path / "o.json").read_text())["results"]["vgg11_bn"]
    assert {"plain", "plain_again", "sgs", "sgs_hook", "sgs_per_use", "official", "multiply_floor"} <= set(res)
    assert res["setting"]["threads"] == 1
    _run("benchmarks/overhead.py", "--dispatch-bound", "--models", "vgg11_bn", "--rounds", "2", "--inner", "1",
         "--warmup", "1", "--variants", "sgs_hook", "--json", str(tmp_path / "v.json"))
    res = json.loads((tmp_path / "v.json").read_text())["results"]["vgg11_bn"]
    assert set(res) == {"plain", "sgs_hook", "setting"}


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
