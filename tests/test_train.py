"""`sgs-fx train` end to end on synthetic data: outputs, exact resume, bad input, NaN loss, torchrun DDP."""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import sgs_fx
import sgs_fx.cifar.train as train_mod
from sgs_fx.cli import main
from sgs_fx.cifar.train import TrainConfig, train

SMALL = dict(model="vgg11_bn", width=0.0625, epochs=3, batch_size=64, data="synthetic", every=1, warmup=1,
             progress=False)


def test_cli_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    examples = []
    real_export = sgs_fx.export_onnx
    monkeypatch.setattr(sgs_fx, "export_onnx", lambda model, path, x, **kw: examples.append(x) or real_export(
        model, path, x, **kw))
    rc = main(["train", "--data", "synthetic", "--model", "vgg11_bn", "--width", "0.0625", "--epochs", "3",
               "--batch-size", "64", "--every", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["onnx"]["passed"] and (out / "model.onnx").exists()
    # the ONNX check draws inputs around the example's statistics: real (normalised) images, not a constant
    assert len(examples) == 1 and examples[0].std() > 0.5
    assert set(summary["onnx"]["output_scale"]) == set(summary["onnx"]["allowed"]) == {"1", "3"}
    assert (out / "curves.png").exists() and (out / "scales.png").exists()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["onnx"]["passed"]
    # export the checkpoint again through the CLI
    assert main(["export", "--model", "vgg11_bn", "--width", "0.0625", "--checkpoint", str(out / "checkpoint.pt"),
                 "-o", str(tmp_path / "again.onnx")]) == 0


@pytest.mark.parametrize("scales,mode", [("mi", "sgs"), ("acb", "branches")])
def test_resume_continues_exactly(tmp_path, monkeypatch, scales, mode):
    # The default every=5: S is computed at epoch 1 only, so the run resumed at epoch 2 must restore it
    # from the checkpoint (recomputing would not be due, and ones would be wrong).
    small = {**SMALL, "every": 5}
    straight = tmp_path / "straight"
    train(TrainConfig(out=str(straight), scales=scales, mode=mode, export=False, plots=False, **small))

    real = train_mod._train_epoch

    def interrupted(model, opt, batches, epoch, cfg, d):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(model, opt, batches, epoch, cfg, d)

    resumed = tmp_path / "resumed"
    cfg = TrainConfig(out=str(resumed), scales=scales, mode=mode, export=False, plots=False, **small)
    monkeypatch.setattr(train_mod, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_mod, "_train_epoch", real)
    train(cfg, resume=True)
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"]["metrics"][-1]["test_acc"] == b["history"]["metrics"][-1]["test_acc"]
    if scales == "mi":
        assert a["mi"]["last_recompute"] == b["mi"]["last_recompute"] == 1
        assert a["mi"]["scales"].keys() == b["mi"]["scales"].keys()
        assert all(torch.equal(a["mi"]["scales"][k], b["mi"]["scales"][k]) for k in a["mi"]["scales"])
        assert not all(torch.equal(s, torch.ones_like(s)) for s in b["mi"]["scales"].values())


def test_out_check_is_safe_for_ranks_checking_one_directory_at_once(tmp_path):
    # Every torchrun rank validates the same --out together; a shared probe file was unlinked by one rank under
    # another (FileNotFoundError, reported as "not writable"). Threads reproduce that interleaving at once.
    errors = []

    def check():
        try:
            for _ in range(300):
                train_mod._check_writable(tmp_path)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(exc)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("local_rank, order", [("0", ["load", "barrier"]), ("1", ["barrier", "load"])])
def test_under_torchrun_one_rank_per_machine_fetches_cifar_before_the_others_read_it(monkeypatch, local_rank,
                                                                                         order):
    events = []
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(train_mod, "load_cifar10", lambda data_dir: events.append("load") or "cifar")
    monkeypatch.setattr(train_mod.dist, "barrier", lambda: events.append("barrier"))
    cfg = TrainConfig(data="cifar10")
    assert train_mod._load_data(cfg, train_mod._Dist(rank=int(local_rank) + 2, world=4)) == "cifar"
    assert events == order
    events.clear()
    assert train_mod._load_data(cfg, train_mod._Dist()) == "cifar" and events == ["load"]  # one process: no wait


def test_under_torchrun_each_rank_takes_its_local_gpu_for_cuda_calls_and_nccl(monkeypatch):
    # Without set_device / device_id, every rank's NCCL barrier and broadcast ran on GPU 0 (a hang or "Duplicate
    # GPU detected"); `--device cuda` meant GPU 0 on every rank.
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_mod._device("cuda") == torch.device("cuda", 1)
    assert train_mod._device("cuda:0") == torch.device("cuda", 0)  # an explicit GPU is kept
    assert train_mod._device("cpu") == torch.device("cpu")
    monkeypatch.setattr(train_mod.torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(train_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train_mod.dist, "init_process_group",
                        lambda backend, **kw: calls.append((backend, kw.get("device_id"))))
    monkeypatch.setattr(train_mod.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(train_mod.dist, "get_world_size", lambda: 2)
    gpu = torch.device("cuda", 1)
    assert train_mod._setup_distributed(gpu) == train_mod._Dist(1, 2)
    assert calls == [("set_device", gpu), ("nccl", gpu)]
    calls.clear()
    train_mod._setup_distributed(torch.device("cpu"))
    assert calls == [("gloo", None)]


def test_bad_input(tmp_path, capsys):
    assert main(["train", "--model", "resnet9000", "--data", "synthetic", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "--data", "synthetic", "--out", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic", "--mode", "branches", "--out", str(tmp_path / "y")]) == 2
    assert "needs a recipe" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic", "--resume", "--out", str(tmp_path / "z")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    run = ["train", "--data", "synthetic", "--width", "0.0625", "--max-steps-per-epoch", "1", "--no-export",
           "--no-plots", "--no-progress", "--out", str(tmp_path / "r")]
    assert main([*run, "--epochs", "1"]) == 0
    # a longer schedule is another run: its lr at epoch 1 differs from the finished run's
    assert main([*run, "--epochs", "2", "--resume"]) == 2
    assert "started with epochs=1 (now 2)" in capsys.readouterr().err
    assert main([*run, "--epochs", "1", "--qat", "0", "--resume"]) == 2  # epoch 0 was trained in float
    assert "started with qat_epoch=None (now 0)" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    real = train_mod._train_epoch

    def poisoned(model, opt, batches, epoch, cfg, d):
        if epoch == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return real(model, opt, batches, epoch, cfg, d)

    monkeypatch.setattr(train_mod, "_train_epoch", poisoned)
    out = tmp_path / "nan"
    rc = main(["train", "--data", "synthetic", "--model", "vgg11_bn", "--width", "0.0625", "--epochs", "3",
               "--batch-size", "64", "--out", str(out), "--no-progress"])
    assert rc == 3 and "epoch 1: the training loss is nan" in capsys.readouterr().err
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sgs_fx.cli",
           "train", "--data", "synthetic", "--model", "vgg11_bn", "--width", "0.0625", "--epochs", "2",
           "--batch-size", "32", "--every", "1", "--warmup", "0", "--out", str(out), "--no-progress", "--no-plots"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"best_test_acc"') == 1  # one summary line, from rank 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # rank 0 alone writes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["onnx"]["passed"] and summary["scales"]


def test_step_scaling_trains_bit_for_bit_like_the_hook(tmp_path):
    # One backward per step: the hook's S * G and the step's in-place G * S are the same products, so the two
    # runs (resumed, and through the switch to fake-quant training) end with identical weights.
    small = {**SMALL, "qat_epoch": 2}
    train(TrainConfig(out=str(tmp_path / "hook"), scaling="hook", export=False, plots=False, **small))
    cfg = TrainConfig(out=str(tmp_path / "step"), export=False, plots=False, **small)  # the default: "step"
    train(cfg, stop_at=1)
    train(cfg, resume=True)
    a = torch.load(tmp_path / "hook" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "step" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(s, torch.ones_like(s)) for s in b["mi"]["scales"].values())
