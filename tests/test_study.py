"""benchmarks/study.py: interleaved runs, one JSON line each, resume by skipping, the budget, and the report's
arithmetic against a hand-computed example; benchmarks/stats.py against Student's t table."""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import stats  # noqa: E402
import study  # noqa: E402

from sgs_fx.cifar import data  # noqa: E402

SMOKE = ["--smoke", "--epochs", "1", "--no-int8"]


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_runs_are_interleaved_by_seed_and_a_rerun_skips_what_is_done(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    study.main([*SMOKE, "--arms", "baseline", "sgs", "--seeds", "0", "1", "--out", str(out)])
    rows = study.read_rows(out)
    assert [(r["seed"], r["arm"]) for r in rows] == [(0, "baseline"), (0, "sgs"), (1, "baseline"), (1, "sgs")]
    for r in rows:
        assert {"arm", "seed", "model", "epochs", "train_images", "float_acc", "final_loss", "train_s",
                "steady_step_ms", "calibrations", "device", "torch"} <= set(r)
        assert r["smoke"] and r["train_images"] == 256 and r["epochs"] == 1 and r["device"] == "cpu"
    # warm-up 1 of 1 epoch: S never left ones, so SGS trains exactly like the baseline of its seed
    assert rows[0]["final_loss"] == rows[1]["final_loss"] and rows[0]["final_loss"] != rows[2]["final_loss"]
    before = out.read_text()
    capsys.readouterr()
    study.main([*SMOKE, "--arms", "baseline", "sgs", "acb_fixed", "--seeds", "0", "1", "--out", str(out)])
    assert "2 run(s) to do, 4 already in" in capsys.readouterr().out
    assert out.read_text().startswith(before)
    assert [(r["seed"], r["arm"]) for r in study.read_rows(out)[4:]] == [(0, "acb_fixed"), (1, "acb_fixed")]
    # another batch size is another experiment: not skipped, and reported apart
    study.main([*SMOKE, "--arms", "baseline", "--seeds", "0", "--out", str(out), "--batch-size", "8"])
    assert "1 run(s) to do" in capsys.readouterr().out


def test_the_budget_stops_before_a_run_that_would_not_fit(tmp_path, capsys, monkeypatch):
    clock = iter(range(0, 10_000, 100))  # every perf_counter call: 100 s later
    monkeypatch.setattr(study.time, "perf_counter", lambda: float(next(clock)))
    out = tmp_path / "r.jsonl"
    study.main([*SMOKE, "--arms", "baseline", "--seeds", "0", "1", "2", "--out", str(out), "--budget-s", "350"])
    text = capsys.readouterr().out
    assert "budget:" in text and "stopping with" in text
    done = [r["seed"] for r in lines(out)]
    assert 1 <= len(done) < 3 and done == list(range(len(done)))


def test_the_budget_estimates_a_run_from_earlier_runs_in_the_file():
    rows = [dict(r, wall_s=300.0, arm="sgs") for r in _rows("sgs", [0.5])]
    recipe = {k: rows[0][k] for k in study.RECIPE}
    assert study._estimate("sgs", "vgg11_bn", recipe, rows, {}) == 300.0  # the file's runs of this arm and recipe
    assert study._estimate("sgs", "vgg11_bn", dict(recipe, batch_size=64), rows, {}) == 0.0  # another recipe
    assert study._estimate("acb_branches", "vgg11_bn", recipe, rows, {("baseline", "vgg11_bn"): [10.0]}) == 26.0


def test_odd_lines_are_skipped_and_a_failed_run_is_recorded_and_not_repeated(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.jsonl"
    out.write_text('[]\nnull\n"x"\n{"arm": "sgs", "seed": 0}\n')
    real = study.train_fast

    def diverging(recipe, *a, **kw):
        if recipe.arm == "sgs" and recipe.seed == 1:
            raise FloatingPointError("the training loss is nan")
        return real(recipe, *a, **kw)

    monkeypatch.setattr(study, "train_fast", diverging)
    study.main([*SMOKE, "--arms", "baseline", "sgs", "--seeds", "0", "1", "--out", str(out), "--report-after"])
    text = capsys.readouterr()
    assert text.err.count("skipped a line that is not a run") == 2 * 4  # read to resume, and for the report
    rows = {(r["arm"], r["seed"]): r for r in study.read_rows(out)}
    assert len(rows) == 4 and rows[("sgs", 1)]["float_acc"] is None and "nan" in rows[("sgs", 1)]["error"]
    assert "FAILED FloatingPointError" in text.out and "(1 without a float result)" in text.out
    study.main([*SMOKE, "--arms", "baseline", "sgs", "--seeds", "0", "1", "--out", str(out)])
    assert "0 run(s) to do" in capsys.readouterr().out  # a failure is a result; --retry-failed runs it again
    study.main([*SMOKE, "--arms", "baseline", "sgs", "--seeds", "0", "1", "--out", str(out), "--retry-failed"])
    assert "1 run(s) to do" in capsys.readouterr().out


def test_a_failed_run_retried_successfully_is_done(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.jsonl"
    with monkeypatch.context() as m:
        m.setattr(study, "train_fast", lambda *a, **kw: (_ for _ in ()).throw(FloatingPointError("nan loss")))
        study.main([*SMOKE, "--arms", "sgs", "--seeds", "0", "--out", str(out)])
    study.main([*SMOKE, "--arms", "sgs", "--seeds", "0", "--out", str(out), "--retry-failed"])
    (row,) = study.read_rows(out)  # the retry replaces the failed attempt: its error goes with it
    assert "error" not in row and 0 <= row["float_acc"] <= 1
    capsys.readouterr()
    study.main([*SMOKE, "--arms", "sgs", "--seeds", "0", "--out", str(out), "--retry-failed"])
    assert "0 run(s) to do" in capsys.readouterr().out


def test_a_run_without_its_int8_score_trains_again_when_int8_is_scored(tmp_path, capsys):
    # a slot's time limit can end the INT8 worker after the float line is written: the file then holds the run
    # without an INT8 line, as after --no-int8; the model is gone, so the run trains again and its row is replaced
    out = tmp_path / "r.jsonl"
    cmd = ["--smoke", "--epochs", "1", "--arms", "baseline", "--seeds", "0", "--out", str(out), "--int8-batches", "1",
           "--int8-workers", "0"]
    study.main([*cmd, "--no-int8"])
    capsys.readouterr()
    study.main(cmd)
    assert "1 run(s) to do (1 trained again: INT8 score missing)" in capsys.readouterr().out
    (row,) = study.read_rows(out)
    assert 0 <= row["int8_acc"] <= 1
    study.main(cmd)
    assert "0 run(s) to do" in capsys.readouterr().out
    failed_int8 = {**{k: v for k, v in row.items() if k != "int8_acc"}, "int8_error": "ValueError: x"}
    assert not study._to_run(failed_int8, argparse.Namespace(int8=True))  # a failed INT8 score is a result too


def test_capture_and_int8_batches_are_part_of_the_key(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.jsonl"
    cmd = [*SMOKE, "--arms", "baseline", "--seeds", "0", "--out", str(out)]
    study.main(cmd)
    capsys.readouterr()
    study.main([*cmd, "--int8-batches", "2"])  # another INT8 calibration: another INT8 accuracy, another run
    assert "1 run(s) to do" in capsys.readouterr().out
    study.main([*cmd, "--no-capture"])  # a CPU never captures: the same run
    assert "0 run(s) to do" in capsys.readouterr().out
    parsed = []
    monkeypatch.setattr(study, "run_study", parsed.append)
    study.main(cmd)
    study.main([*cmd, "--no-capture"])
    small = data.synthetic_cifar(n_train=16, n_test=8)
    cuda = [study.settings(args, torch.device("cuda"), small) for args in parsed]
    assert (cuda[0]["capture"], cuda[1]["capture"]) == (True, False)  # on CUDA the default captures, and times so
    ident = {"arm": "baseline", "seed": 0, "model": "vgg11_bn"}
    assert study.key({**ident, **cuda[0]}) != study.key({**ident, **cuda[1]})


def test_rows_written_before_capture_and_int8_batches_were_keyed_read_as_the_defaults_then(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    cmd = [*SMOKE, "--arms", "baseline", "--seeds", "0", "--out", str(out)]
    study.main(cmd)
    (row,) = lines(out)
    old = {k: v for k, v in row.items() if k not in ("capture", "int8_batches")}
    out.write_text(json.dumps(old) + "\n" + json.dumps({**old, "seed": 1, "device_type": "cuda"}) + "\n")
    cpu, cuda = study.read_rows(out)
    assert (cpu["capture"], cpu["int8_batches"], cuda["capture"], cuda["int8_batches"]) == (False, 8, True, 8)
    capsys.readouterr()
    study.main(cmd)
    assert "0 run(s) to do" in capsys.readouterr().out


def test_report_never_averages_eager_and_captured_steps():
    rows = _rows("baseline", [0.5, 0.6]) + _rows("sgs", [0.55, 0.65])
    rows += [dict(r, capture=False, captured=False, steady_step_ms=9.0) for r in _rows("baseline", [0.7])]
    rows[1] = dict(rows[1], captured=False, steady_step_ms=5.0)  # its capture failed: it trained eagerly
    text = study.report(rows)
    captured, eager = text.split("\n\n")
    assert "captured step" in captured and "eager step" in eager
    assert "  1.000  (1 trained eagerly: ms/step left out)" in captured and "5.000" not in captured
    assert "9.000" in eager and "9.000" not in captured


def test_bad_arguments_are_refused_before_any_run(tmp_path, capsys):
    out = str(tmp_path / "r.jsonl")
    for bad, says in ((["--seeds", "0", "0"], "--seeds lists a value twice"), (["--int8-batches", "0"], ">= 1"),
                      (["--width", "0"], "--width must be > 0"), (["--epochs", "0"], "--epochs must be >= 1")):
        with pytest.raises(SystemExit):
            study.main([*SMOKE, *bad, "--out", out])
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--report", str(tmp_path / "missing.jsonl")])
    assert not (tmp_path / "r.jsonl").exists()


def test_a_line_cut_by_a_kill_is_redone(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"arm": "baseline", "seed": 0, "model": "vgg')  # killed mid-write
    study.main([*SMOKE, "--arms", "baseline", "--seeds", "0", "--out", str(out)])
    assert [r["seed"] for r in study.read_rows(out)] == [0]


def test_int8_accuracy_is_recorded_inline_or_by_a_worker_process(tmp_path):
    # a worker scores INT8 while the GPU trains the next run; it must score exactly what the inline path scores
    rows = {}
    for workers in ("0", "1"):
        out = tmp_path / f"r{workers}.jsonl"
        study.main(["--smoke", "--epochs", "2", "--arms", "acb_branches", "--seeds", "0", "--out", str(out),
                    "--int8-batches", "2", "--int8-workers", workers])
        float_line, int8_line = lines(out)  # the float result at once, the INT8 score as a line of its own
        assert "int8_acc" not in float_line and study.key(int8_line) == study.key(float_line)
        (rows[workers],) = study.read_rows(out)
    for row in rows.values():
        assert 0 <= row["int8_acc"] <= 1 and row["int8_agreement"] is not None and row["int8_s"] > 0
    assert rows["0"]["float_acc"] == rows["1"]["float_acc"]
    assert (rows["0"]["int8_acc"], rows["0"]["int8_agreement"]) == (rows["1"]["int8_acc"], rows["1"]["int8_agreement"])


# a hand-computed paired example: the 8 seeds of MI-SGS vs baseline (40 epochs, 15,000 images)
BASE = [0.7927, 0.7916, 0.8024, 0.7796, 0.7914, 0.7735, 0.8103, 0.7611]
SGS = [0.8010, 0.7911, 0.8073, 0.7810, 0.7881, 0.7816, 0.8103, 0.7739]


def _rows(arm, accs, seeds=None):
    return [{"arm": arm, "seed": s, "model": "vgg11_bn", "width": 1.0, "epochs": 40, "batch_size": 128,
             "data": "0123456789abcdef", "smoke": False, "compile": False, "capture": True, "int8_batches": 8,
             "device_type": "cuda", "captured": True,
             "train_images": 15000, "float_acc": a, "steady_step_ms": 1.0}
            for s, a in zip(seeds or range(len(accs)), accs)]


def test_report_arithmetic_matches_the_hand_computation():
    # differences in points: .83 -.05 .49 .14 -.33 .81 0 1.28 -> sum 3.17, mean 0.39625;
    # squared deviations sum to 2.0983875 (points²) -> s = sqrt(2.0983875 / 7) = 0.547512, SE = s / sqrt(8) = 0.193575;
    # t = 2.04701, t_{0.975, 7} = 2.364624 (table) -> CI 0.39625 ± 0.457734
    rows = _rows("baseline", BASE) + _rows("sgs", SGS) + _rows("acb_fixed", [0.8, 0.81], seeds=[0, 5])
    summary = {s["arm"]: s for s in study.summarise(rows)}
    p = summary["sgs"]["paired"]
    assert p.n == 8
    assert 100 * p.mean == pytest.approx(0.39625, abs=1e-9)
    assert 100 * p.se == pytest.approx(0.193575, abs=1e-6)
    assert 100 * p.ci[0] == pytest.approx(0.39625 - 0.457734, abs=1e-5)
    assert 100 * p.ci[1] == pytest.approx(0.39625 + 0.457734, abs=1e-5)
    assert p.t == pytest.approx(2.04701, abs=1e-5)
    assert 0.05 < p.p < 0.10 and p.p == pytest.approx(0.079882, abs=1e-5)
    assert summary["baseline"]["n"] == 8 and 100 * summary["baseline"]["mean"] == pytest.approx(78.7825, abs=1e-9)
    # only common seeds pair: acb_fixed has seeds 0 and 5 -> differences +0.73 and +3.65 points
    q = summary["acb_fixed"]["paired"]
    assert q.n == 2 and 100 * q.mean == pytest.approx(2.19, abs=1e-9)
    text = study.report(rows)
    assert "+0.40" in text and "[-0.06, +0.85]" in text and "0.080" in text


def test_report_separates_recipes_and_handles_single_runs():
    rows = _rows("baseline", [0.5]) + _rows("sgs", [0.6])
    rows += [dict(r, epochs=200) for r in _rows("baseline", [0.9, 0.91])]
    text = study.report(rows)
    assert "40 epochs" in text and "200 epochs" in text
    one = {s["arm"]: s for s in study.summarise(rows[:2])}
    assert one["sgs"]["paired"].n == 1 and one["sgs"]["paired"].ci is None and one["sgs"]["se"] is None


def test_report_and_plot_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows("baseline", BASE) + _rows("sgs", SGS)))
    study.main(["--report", str(path), "--plot", str(tmp_path / "s.png")])
    assert "sgs" in capsys.readouterr().out and (tmp_path / "s.png").stat().st_size > 10_000


@pytest.mark.parametrize("df, q975", [(1, 12.7062047), (3, 3.1824463), (7, 2.3646243), (30, 2.0422725)])
def test_t_quantiles_match_the_table(df, q975):
    assert stats.t_quantile(0.975, df) == pytest.approx(q975, abs=1e-6)
    assert stats.t_two_sided_p(q975, df) == pytest.approx(0.05, abs=1e-7)


def test_t_tails():
    assert stats.t_two_sided_p(0.0, 5) == 1.0
    assert stats.t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)  # Cauchy: P(|T| > 1) = 1/2
    assert stats.t_two_sided_p(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), abs=1e-12)  # df 2: closed form
    assert stats.t_two_sided_p(1e6, 3) < 1e-15


def _sprite(images):
    return Image.fromarray(images.reshape(len(images), 1024, 3))


def test_a_sprite_folder_with_some_sprites(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 50000)
    monkeypatch.setattr(data, "SPRITE_SHA256", {
        **{f"data_batch_{i + 1}.png": data.sha256(train[i * 10000:(i + 1) * 10000]) for i in range(5)},
        "test_batch.png": data.sha256(test)})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _sprite(train[30000:40000]).save(tmp_path / "a" / "data_batch_4.png")
    _sprite(train[10000:20000]).save(tmp_path / "b" / "data_batch_2.png")
    with pytest.raises(FileNotFoundError, match="test_batch.png"):
        data.read_sprite_folder(tmp_path)
    _sprite(test).save(tmp_path / "b" / "test_batch.png")
    (tmp_path / "a" / "train_lables.json").write_text(json.dumps(labels.tolist()))
    (tmp_path / "test_lables.json").write_text(json.dumps(labels[:10000].tolist()))
    got = data.read_sprite_folder(tmp_path)
    assert np.array_equal(got.train_images.numpy(), np.concatenate([train[10000:20000], train[30000:40000]]))
    assert np.array_equal(got.train_labels.numpy(), np.concatenate([labels[10000:20000], labels[30000:40000]]))
    assert np.array_equal(got.test_images.numpy(), test)
    _sprite(train[:10000]).save(tmp_path / "data_batch_2.png")  # the wrong images under a sprite's name
    with pytest.raises(ValueError, match="appears twice"):
        data.read_sprite_folder(tmp_path)
    (tmp_path / "b" / "data_batch_2.png").unlink()
    with pytest.raises(ValueError, match="sha256 mismatch"):
        data.read_sprite_folder(tmp_path)
