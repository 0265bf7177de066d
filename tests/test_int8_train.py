"""`sgs-fx train --qat EPOCH` and `sgs-fx export --int8`: QAT inside the training loop, exact resume, PTQ export."""
import json
import os
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sgs_fx
from sgs_fx.cli import main
from sgs_fx.cifar.data import synthetic_cifar
from sgs_fx.cifar.train import TrainConfig, build, evaluate, load_trained, to_qat, train

SMALL = dict(model="vgg11_bn", width=0.0625, epochs=3, batch_size=64, data="synthetic", every=1, warmup=1,
             progress=False, plots=False)


@pytest.mark.parametrize("stop_at", [1, 2])  # resumed at the QAT epoch (a float run branched), after it
def test_qat_epoch_trains_fake_quant_and_resumes_exactly(tmp_path, stop_at):
    straight = TrainConfig(out=str(tmp_path / "straight"), qat_epoch=1, export=stop_at == 2, **SMALL)
    summary = train(straight)
    resumed = TrainConfig(out=str(tmp_path / "resumed"), qat_epoch=1, export=False, **SMALL)
    # stopped before the switch: started as a float run, branched into QAT on resume (the epochs done are the same)
    train(replace(resumed, qat_epoch=None) if stop_at == 1 else resumed, stop_at=stop_at)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["epoch"] == stop_at - 1
    train(resumed, resume=True)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys() and any("fake_quant" in k for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"]["metrics"][-1] == {**b["history"]["metrics"][-1],
                                           "epoch_time_s": a["history"]["metrics"][-1]["epoch_time_s"]}
    if stop_at == 2:
        onnx = summary["onnx"]
        assert onnx["quantized"] and onnx["passed"] and onnx["path"].endswith("model_int8.onnx")
        assert onnx["int8_kernels"]["QLinearConv"] == 8
        model, cfg = load_trained(tmp_path / "straight" / "checkpoint.pt")
        assert cfg.qat_epoch == 1 and len(sgs_fx.instrumented(model)) == 8
        assert all(type(m).__name__ == "SGSConvBnReLU2d" for m in sgs_fx.instrumented(model).values())


def test_switch_to_qat_keeps_parameters_momentum_and_scales():
    cfg = TrainConfig(**{**SMALL, "scales": "acb"})
    model = build(cfg, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    scales = sgs_fx.get_scales(model)
    qat, new_opt, new_sched = to_qat(model, opt, sched, cfg, torch.device("cpu"))
    assert {id(p) for p in qat.parameters()} == set(momentum)  # the same Parameter objects
    assert all(torch.equal(new_opt.state[p]["momentum_buffer"], momentum[id(p)]) for p in qat.parameters())
    assert new_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and new_sched.last_epoch == 1
    new_scales = sgs_fx.get_scales(qat)
    assert new_scales.keys() == scales.keys() and all(torch.equal(new_scales[k], scales[k]) for k in scales)
    # and the QAT model trains with them: the gradient its optimizer uses is S ⊙ G through the fake-quant
    plain = sgs_fx.strip(qat)  # a copy: the same fake-quant model without SGS
    x = torch.randn(4, 3, 32, 32)
    for m in (plain, qat):
        m.zero_grad()
        m(x).sum().backward()
    torch.optim.SGD(qat.parameters(), lr=0.0).step()
    for name, conv in sgs_fx.instrumented(qat).items():
        g = plain.get_submodule(name).weight.grad
        assert torch.equal(conv.weight.grad, new_scales[name] * g) and not torch.equal(conv.weight.grad, g), name


def test_evaluate_moves_no_range():
    cfg = TrainConfig(**SMALL)
    model = build(cfg, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    qat, _, _ = to_qat(model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3), cfg, torch.device("cpu"))
    qat(torch.rand(8, 3, 32, 32))  # ranges from one training forward
    before = {k: v.clone() for k, v in qat.state_dict().items()}
    evaluate(qat, synthetic_cifar(n_train=8, n_test=64), torch.device("cpu"))
    assert all(torch.equal(v, qat.state_dict()[k]) for k, v in before.items())
    assert all(int(m.observer_enabled) == 1 for m in qat.modules() if hasattr(m, "observer_enabled"))


def test_cli_qat_and_int8_export(tmp_path, capsys):
    float_run, qat_run = tmp_path / "float", tmp_path / "qat"
    common = ["--data", "synthetic", "--model", "vgg11_bn", "--width", "0.0625", "--epochs", "2", "--batch-size", "64",
              "--no-progress", "--no-plots", "--no-export"]
    assert main(["train", *common, "--out", str(float_run)]) == 0
    assert main(["train", *common, "--qat", "-1", "--out", str(qat_run)]) == 0
    assert json.loads((qat_run / "config.json").read_text())["qat_epoch"] == 1
    capsys.readouterr()
    # a float checkpoint: post-training quantization on (synthetic) training batches
    assert main(["export", "--checkpoint", str(float_run / "checkpoint.pt"), "--int8", "--calib-data", "synthetic",
                 "--calib-batches", "2", "-o", str(tmp_path / "ptq.onnx")]) == 0
    assert "INT8 QDQ ONNX export" in capsys.readouterr().out and (tmp_path / "ptq.onnx").exists()
    # a QAT checkpoint is exported as trained
    assert main(["export", "--checkpoint", str(qat_run / "checkpoint.pt"), "--calib-data", "synthetic",
                 "-o", str(tmp_path / "qat.onnx")]) == 0
    assert "INT8 QDQ ONNX export" in capsys.readouterr().out
    assert main(["train", *common, "--qat", "5", "--out", str(tmp_path / "bad")]) == 2
    assert "--qat 5: QAT must start at an epoch in [0, 1]" in capsys.readouterr().err


def test_demo_int8_step(tmp_path):
    from sgs_fx.cifar import demo

    run = tmp_path / "sgs"
    summary = train(TrainConfig(out=str(run), **SMALL))  # three epochs: logits with margins to agree on
    summary["int8"] = row = demo.int8_ptq(run, synthetic_cifar(), calib_batches=2)
    assert row["quantized"] and row["passed"] and (run / "model_int8.onnx").exists()
    # onnxruntime scores the float file like PyTorch (one test image in 256 may flip at a near-tie), and the
    # INT8 file within a few points of it, far above chance on this learnable synthetic set
    assert abs(row["float_onnx_test_acc"] - summary["final"]["test_acc"]) <= 1 / 256
    assert abs(row["test_acc"] - row["float_onnx_test_acc"]) <= 0.05 and row["test_acc"] > 0.3
    assert row["size_bytes"] < row["float_onnx_size_bytes"]
    table = demo._deploy_table({"sgs": summary})
    assert "INT8 acc" in table and f"{row['test_acc']:.4f}" in table


def test_a_failed_export_check_keeps_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sgs_fx.ExportReport, "passed", property(lambda self: False))
    out = tmp_path / "run"
    rc = main(["train", "--data", "synthetic", "--model", "vgg11_bn", "--width", "0.0625", "--epochs", "1",
               "--batch-size", "64", "--no-progress", "--no-plots", "--out", str(out)])
    assert rc == 4 and "failed its onnxruntime check (kept for inspection" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["onnx"]["passed"] is False and (out / "model.onnx").exists() and (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_qat_switch_under_torchrun_keeps_ranks_in_step(tmp_path):
    # The switch rebuilds the model (strip, prepare_qat, transform) and must re-wrap it in DDP: the old wrapper
    # around the float graph would go on training the same Parameters without fake-quant, or without gradient sync.
    worker = Path(__file__).with_name("ddp_qat_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path), "1"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for epoch in (0, 1, 2):
        a, b = ranks[0][epoch]["params"], ranks[1][epoch]["params"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), epoch  # gradients all-reduced
    ranges = {k: v for k, v in ranks[0][1]["buffers"].items() if k.endswith("activation_post_process.max_val")}
    assert len(ranges) >= 9 and all(torch.isfinite(v).all() for v in ranges.values())  # fake-quant saw the data
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(ckpt[k], v) for k, v in ranks[0][2]["params"].items())
