"""SGS in an Ultralytics YOLO training run (issue 27, item 4): ``add_sgs(model)`` before ``model.train``.

One epoch of YOLOv8n on a tiny synthetic dataset (CPU, 64 px): at every optimizer step of Ultralytics' own loop
the weights move exactly as torch.optim.SGD moves them with S ⊙ clip(G) for the conv weights and clip(G) for every
other parameter (the trainer clips G, then steps); S is the MI schedule's, written into the EMA copy and pickled
with it into last.pt/best.pt, from which a resumed run restores it; the trained model strips to a plain one that
Ultralytics' fuse and ONNX exporter take. The other tasks (segmentation, pose, OBB, classification, RT-DETR) train
one epoch each under the same step check. Slow (Ultralytics is a test extra: ``pip install -e '.[zoo]'``); nothing
is downloaded (tests/conftest.py sets Ultralytics offline).
"""
import logging
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sgs_fx
from helpers import sgd_step_on_copies

pytestmark = pytest.mark.slow

ultralytics = pytest.importorskip(
    "ultralytics", reason="ultralytics is not installed (pip install -e '.[zoo]'; make test-slow installs it)")

from ultralytics import YOLO  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402

from sgs_fx.integrations.ultralytics import SCHEDULE_ATTR, SGSCallbacks, _CalibrationBatches, add_sgs  # noqa: E402

IMGSZ = 64
MAX_NORM = 10.0  # BaseTrainer.optimizer_step: clip_grad_norm_(model.parameters(), max_norm=10.0)


def write_dataset(root, task="detect"):
    """8 training and 8 validation images (64 px), one object of one of two classes each, labelled for ``task``:
    a box (detect), its outline as a polygon (segment, obb), a box and its two corner keypoints (pose), or an
    image folder per class (classify). Returns what ``train(data=...)`` takes."""
    import cv2

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(8):
            img = rng.integers(0, 60, (IMGSZ, IMGSZ, 3), dtype=np.uint8)
            x0, y0 = rng.integers(4, 32, 2)
            w, h = rng.integers(12, 28, 2)
            c = int(rng.integers(0, 2))
            if task == "classify":
                c = i % 2  # both classes in both splits (an image folder per class)
            img[y0:y0 + h, x0:x0 + w] = (200, 60 + 120 * c, 30)
            if task == "classify":
                (root / split / "ab"[c]).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / split / "ab"[c] / f"{i}.png"), img)
                continue
            for folder in ("images", "labels"):
                (root / folder / split).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), img)
            box = [(x0 + w / 2) / IMGSZ, (y0 + h / 2) / IMGSZ, w / IMGSZ, h / IMGSZ]
            outline = [v / IMGSZ for v in (x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h)]
            label = {"detect": box, "segment": outline, "obb": outline,
                     "pose": box + [x0 / IMGSZ, y0 / IMGSZ, 2, (x0 + w) / IMGSZ, (y0 + h) / IMGSZ, 2]}[task]
            (root / "labels" / split / f"{i}.txt").write_text(" ".join(map(str, [c, *label])) + "\n")
    if task == "classify":
        return root
    keypoints = "kpt_shape: [2, 3]\nflip_idx: [1, 0]\n" if task == "pose" else ""
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\n{keypoints}names:\n  0: a\n  1: b\n")
    return root / "data.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("yolo_data"))


def train_args(data, project, **kw):
    # batch 4 and nbs 4: one optimizer step per batch (no accumulation), two per epoch; plots off (they would fetch
    # a font); one epoch has no warm-up (the trainer keeps the last epoch out of it)
    return {**dict(data=str(data), epochs=1, imgsz=IMGSZ, batch=4, nbs=4, workers=0, device="cpu", optimizer="SGD",
                   amp=False, plots=False, project=str(project), name="run", exist_ok=True, verbose=False, seed=0),
            **kw}


class StepCheck:
    """Wraps the trainer's ``optimizer_step`` (unscale, clip G over the model's parameters, step, EMA update): before
    it, the expected update by hand (clip a copy of G the same way, multiply each conv's by S, then the optimizer's
    own SGD step on copies); after it, the weights the optimizer wrote."""

    def __init__(self):
        self.steps = []

    def on_pretrain_routine_end(self, trainer):  # added after add_sgs's: the model is instrumented by now
        original = trainer.optimizer_step

        def optimizer_step():
            model, opt = unwrap_model(trainer.model), trainer.optimizer
            scales = sgs_fx.get_scales(model)
            params = list(model.parameters())
            grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
            holders = []
            for p, g in zip(params, grads):  # clip_grad_norm_ on copies, in the model's parameter order
                holder = torch.zeros_like(p)
                holder.grad = g
                holders.append(holder)
            norm = torch.nn.utils.clip_grad_norm_(holders, max_norm=MAX_NORM).item()
            clipped = {id(p): h.grad for p, h in zip(params, holders)}
            for name, conv in sgs_fx.instrumented(model).items():
                g = clipped[id(conv.weight)]
                if g is not None:
                    g.mul_(scales[name].to(g.dtype))
            expected = sgd_step_on_copies(opt, clipped)
            original()
            actual = {id(p): p.detach().clone() for group in opt.param_groups for p in group["params"]}
            self.steps.append(dict(expected=expected, actual=actual, scales=scales, norm=norm,
                                   conv_weights={id(c.weight) for c in sgs_fx.instrumented(model).values()}))

        trainer.optimizer_step = optimizer_step

    def assert_exact(self, n_steps):
        assert len(self.steps) == n_steps
        for step in self.steps:
            assert step["expected"].keys() == step["actual"].keys()
            assert step["conv_weights"] <= step["actual"].keys()  # every SGS weight is stepped by this optimizer
            for key in step["actual"]:
                assert torch.equal(step["actual"][key], step["expected"][key])


def assert_scales_equal(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k


def non_uniform(scales):
    return any(not torch.equal(s, torch.ones_like(s)) for s in scales.values())


def test_yolo_train_applies_s_at_every_step_saves_it_and_strips_for_export(data, tmp_path):
    model = YOLO("yolov8n.yaml")
    sgs = add_sgs(model, warmup=0)  # S from the data before the first step
    check = StepCheck()
    model.add_callback("on_pretrain_routine_end", check.on_pretrain_routine_end)
    model.train(**train_args(data, tmp_path))
    trainer = model.trainer

    assert isinstance(trainer.optimizer, torch.optim.SGD)
    scales = sgs.scheduler.state_dict()["scales"]
    assert non_uniform(scales) and sgs.scheduler.last_recompute == 0
    assert len(scales) == 39  # every k>1 conv of YOLOv8n
    check.assert_exact(2)
    assert any(step["norm"] > MAX_NORM for step in check.steps)  # the clipping was active: S scales clip(G)
    for step in check.steps:
        assert_scales_equal(step["scales"], scales)  # the MI schedule's S is what reached the step

    # the EMA copy carries S, and so do the checkpoints, which pickle it (best.pt is what train() loaded back)
    assert_scales_equal(sgs_fx.get_scales(trainer.ema.ema), scales)
    for ckpt_path in (trainer.last, trainer.best):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = ckpt["ema"] or ckpt["model"]
        assert_scales_equal(sgs_fx.get_scales(saved), scales)
        assert getattr(saved, SCHEDULE_ATTR)["last_recompute"] == 0
    assert_scales_equal(sgs_fx.get_scales(model.model), scales)

    # calibration draws the trainer's preprocessed training images on saved random states (Python's and NumPy's;
    # the scheduler forks torch's): the augmentation stream the epoch trains on is left as it was
    before = random.getstate(), np.random.get_state()[1].copy()
    images = list(_CalibrationBatches(trainer, 2))
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert [tuple(x.shape) for x in images] == [(4, 3, IMGSZ, IMGSZ)] * 2
    assert all(x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 for x in images)

    # strip before the exporter: a plain DetectionModel (the keys of one never transformed), then ONNX
    sgs_fx.strip(model.model, inplace=True)
    assert not sgs_fx.instrumented(model.model)
    assert not any(type(m).__module__.startswith("sgs_fx") for m in model.model.modules())
    fresh = YOLO("yolov8n.yaml").model
    assert model.model.state_dict().keys() == fresh.state_dict().keys()
    onnx_file = model.export(format="onnx", imgsz=IMGSZ, simplify=False)
    assert onnx_file.endswith(".onnx")


@pytest.mark.parametrize("task, cfg", [("segment", "yolov8n-seg.yaml"), ("pose", "yolov8n-pose.yaml"),
                                       ("obb", "yolov8n-obb.yaml"), ("classify", "yolov8n-cls.yaml"),
                                       ("detect", "rtdetr-l.yaml")])
def test_every_task_trains_with_s_at_each_step_and_exports(task, cfg, tmp_path):
    # The callbacks use only BaseTrainer's events and attributes; each task's trainer has its own dataset, loss,
    # preprocess_batch and (RT-DETR) model class, with RepConv branches in RT-DETR's RepC3 blocks.
    from ultralytics import RTDETR

    data = write_dataset(tmp_path / "data", task)
    model = (RTDETR if cfg.startswith("rtdetr") else YOLO)(cfg)
    spatial_convs = sum(isinstance(m, torch.nn.Conv2d) and max(m.kernel_size) > 1 for m in model.model.modules())
    sgs = add_sgs(model, warmup=0)
    check = StepCheck()
    model.add_callback("on_pretrain_routine_end", check.on_pretrain_routine_end)
    model.train(**train_args(data, tmp_path))

    assert model.trainer.args.task == task
    scales = sgs.scheduler.state_dict()["scales"]
    assert len(scales) == spatial_convs and non_uniform(scales)
    check.assert_exact(2)
    assert any(step["norm"] > MAX_NORM for step in check.steps)
    for step in check.steps:
        assert_scales_equal(step["scales"], scales)
    saved = torch.load(model.trainer.last, map_location="cpu", weights_only=False)
    assert_scales_equal(sgs_fx.get_scales(saved["ema"] or saved["model"]), scales)
    sgs_fx.strip(model.model, inplace=True)
    assert not sgs_fx.instrumented(model.model)
    assert model.export(format="onnx", imgsz=IMGSZ, simplify=False).endswith(".onnx")


class Interrupted(Exception):
    pass


def test_yolo_resume_restores_s_from_the_checkpoint(data, tmp_path):
    def stop_after_first_save(trainer):
        raise Interrupted

    first = YOLO("yolov8n.yaml")
    sgs = add_sgs(first, warmup=0, every=5)  # S computed at epoch 0 only: a resumed epoch 1 must restore it
    first.add_callback("on_model_save", stop_after_first_save)
    with pytest.raises(Interrupted):
        first.train(**train_args(data, tmp_path, epochs=2))
    saved = sgs.scheduler.state_dict()["scales"]
    assert non_uniform(saved)

    resumed = YOLO(str(tmp_path / "run" / "weights" / "last.pt"))
    sgs2 = add_sgs(resumed, warmup=0, every=5)
    check = StepCheck()
    resumed.add_callback("on_pretrain_routine_end", check.on_pretrain_routine_end)
    resumed.train(resume=True)
    assert resumed.trainer.start_epoch == 1
    assert sgs2.scheduler.last_recompute == 0  # restored, not recomputed from the epoch-1 weights
    check.assert_exact(2)
    for step in check.steps:
        assert_scales_equal(step["scales"], saved)


def test_the_callbacks_reach_the_trainer_each_ddp_worker_rebuilds(data, tmp_path):
    # Multi-GPU: Ultralytics pickles the trainer's class, arguments, model and callbacks (cloudpickle) and runs a
    # script that rebuilds the trainer from them in each torchrun worker. A worker needs GPUs, so that script runs
    # here in one CPU process: add_sgs's callbacks arrive with it, and the run it trains carries the MI schedule's S.
    pytest.importorskip("cloudpickle", reason="Ultralytics' multi-GPU launch needs cloudpickle (the zoo extra)")
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    model = YOLO("yolov8n.yaml")
    add_sgs(model, warmup=0)
    trainer = DetectionTrainer(overrides={**train_args(data, tmp_path), "model": "yolov8n.yaml"},
                               _callbacks=model.callbacks)
    script = generate_ddp_file(trainer)
    try:
        proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    finally:
        ddp_cleanup(trainer, script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(trainer.last, map_location="cpu", weights_only=False)
    saved = ckpt["ema"] or ckpt["model"]
    scales = sgs_fx.get_scales(saved)
    assert len(scales) == 39 and non_uniform(scales)
    assert getattr(saved, SCHEDULE_ATTR)["last_recompute"] == 0


def test_a_non_sgd_optimizer_is_named_and_the_events_must_come_in_order(caplog):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    trainer = SimpleNamespace(model=net, ema=None, optimizer=torch.optim.AdamW(net.parameters()), epoch=0,
                              resume=False, args=SimpleNamespace(resume=False))
    callbacks = SGSCallbacks()
    with pytest.raises(RuntimeError, match="before on_pretrain_routine_end"):
        callbacks.on_train_epoch_start(trainer)
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        callbacks.on_pretrain_routine_end(trainer)
    assert "built AdamW" in caplog.text and "optimizer='SGD'" in caplog.text


def test_the_docs_page_block_runs_as_printed(data, tmp_path, monkeypatch):
    """docs/ultralytics.md's example, with the tiny dataset and CPU settings standing in for coco8 and 100 epochs."""
    import re
    from pathlib import Path

    from ultralytics.engine.model import Model

    text = (Path(__file__).resolve().parents[1] / "docs" / "ultralytics.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    train = Model.train
    # two epochs, each validated (the validator converts the EMA under torch.inference_mode: S must stay writable)
    monkeypatch.setattr(Model, "train",
                        lambda self, **kw: train(self, **{**kw, **train_args(data, tmp_path, epochs=2, val=True)}))
    namespace = {}
    exec(compile(block, "docs/ultralytics.md", "exec"), namespace)
    model = namespace["model"]
    assert not sgs_fx.instrumented(model.model)
    scales = sgs_fx.get_scales(torch.load(model.trainer.last, map_location="cpu", weights_only=False)["model"])
    assert len(scales) == 39 and non_uniform(scales)  # the default warmup=1: S from MI at epoch 1
    assert (tmp_path / "run" / "weights" / "best.onnx").exists()
