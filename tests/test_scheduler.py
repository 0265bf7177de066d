"""MIScheduler (spec §4.1, §3.5, §7.7-7.8): schedule, resume, side effects, failures, DDP."""
import logging
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import sgs_fx
from helpers import Dynamic, gloo_group
from mi_reference import reference_scale


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
                         nn.Conv2d(6, 6, 5, padding=2), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2))


def loader(n_batches=3, seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 12, 12, generator=g).cumsum(-1) / 3, torch.zeros(batch)) for _ in range(n_batches)]


@pytest.mark.parametrize("warmup,every,expected", [
    (1, 5, [1, 5, 10, 15]),
    (0, 5, [0, 5, 10, 15]),
    (3, 4, [3, 4, 8, 12, 16]),
    (7, 5, [7, 10, 15]),
])
def test_schedule_arithmetic(warmup, every, expected):
    sched = sgs_fx.MIScheduler(sgs_fx.transform(small_net()), loader(), warmup=warmup, every=every)
    assert [e for e in range(18) if sched.due(e)] == expected


def test_step_recomputes_when_due_and_ones_before_warmup():
    model = sgs_fx.transform(small_net())
    sched = sgs_fx.MIScheduler(model, loader(), warmup=1, every=2)
    assert sched.step(0) is False
    assert all(torch.equal(s, torch.ones_like(s)) for s in sgs_fx.get_scales(model).values())
    assert sched.step(1) is True
    s1 = sgs_fx.get_scales(model)
    assert all((s > 0).all() and abs(s.mean().item() - 1) < 1e-6 and not torch.equal(s, torch.ones_like(s))
               for s in s1.values())
    assert s1["0"][1, 1] == s1["0"].max()  # centre-peaked on spatially correlated inputs
    assert sched.step(3) is False and sched.step(4) is True


def test_calibration_equals_the_naive_reference_on_the_concatenated_batches():
    # the reference shares no code with the scheduler (per channel, per tap, Python loops over pixels)
    model = sgs_fx.transform(small_net()).eval()
    data = loader(3)
    sched = sgs_fx.MIScheduler(model, data, batches=2)
    got = sched.calibrate()
    x = torch.cat([b[0] for b in data[:2]])
    np.testing.assert_allclose(got["0"].numpy(), reference_scale(x, model[0]), rtol=0, atol=1e-5)
    with torch.no_grad():
        feats = model[3](model[2](model[1](model[0](x))))
    np.testing.assert_allclose(got["4"].numpy(), reference_scale(feats, model[4]), rtol=0, atol=1e-5)


def test_calibration_leaves_mode_and_gradients_untouched():
    model = sgs_fx.transform(small_net()).train()
    model[1].eval()  # a submodule's own mode must survive too
    model(loader()[0][0]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    bn_stats = model[1].running_mean.clone()
    sgs_fx.MIScheduler(model, loader()).calibrate()
    assert model.training and not model[1].training and model[3].training
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert torch.equal(bn_stats, model[1].running_mean)


def test_the_scheduler_runs_after_the_model_was_converted_under_inference_mode():
    # an evaluation that converts the model inside torch.inference_mode() (ultralytics' validator does, to its
    # EMA): its BatchNorm statistics come out as inference tensors, which calibration cannot write in place
    model = sgs_fx.transform(small_net())
    sched = sgs_fx.MIScheduler(model, loader(), warmup=0, every=1)
    with torch.inference_mode():
        model.double()
    stats = model[1].running_mean.clone()
    assert model[1].running_mean.is_inference()
    sched.step(0)
    assert torch.equal(model[1].running_mean, stats)
    assert not torch.equal(sgs_fx.get_scales(model)["0"], torch.ones(3, 3, dtype=torch.float64))


def test_resume_restores_scales():
    model = sgs_fx.transform(small_net())
    sched = sgs_fx.MIScheduler(model, loader(), warmup=0, every=3)
    sched.step(0)
    state = sched.state_dict()
    fresh = sgs_fx.transform(small_net())
    resumed = sgs_fx.MIScheduler(fresh, loader(seed=99), warmup=0, every=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(sgs_fx.get_scales(model).values(), sgs_fx.get_scales(fresh).values()))
    assert resumed.step(0) is False  # resumed inside epoch 0 (whose S it restored): not drawn again
    assert resumed.step(1) is False and resumed.step(2) is False  # not due: S stays as restored
    assert all(torch.equal(a, b) for a, b in zip(sgs_fx.get_scales(model).values(), sgs_fx.get_scales(fresh).values()))


def test_a_resume_without_the_scheduler_state_computes_S_at_once(caplog):
    model = sgs_fx.transform(small_net())
    sched = sgs_fx.MIScheduler(model, loader(), warmup=1, every=5)
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        assert sched.step(3) is True  # not due, but S would otherwise stay ones until epoch 5
    assert "no S was computed or restored" in caplog.text
    assert all(not torch.equal(s, torch.ones_like(s)) for s in sgs_fx.get_scales(model).values())
    assert sched.step(4) is False


def test_failing_layers_keep_previous_scale_and_warn_once(caplog):
    model = sgs_fx.transform(Dynamic())
    previous = torch.rand(3, 3) + 0.5
    sgs_fx.set_scales(model, {"unused": previous})
    sched = sgs_fx.MIScheduler(model, [torch.randn(2, 3, 8, 8)], batches=1)
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sched.calibrate()
        sched.calibrate()
    assert torch.allclose(sgs_fx.get_scales(model)["unused"], previous / previous.mean())
    assert caplog.text.count("'unused' keeps its previous S: the conv was never called") == 1
    nan_input = torch.randn(2, 3, 8, 8)
    nan_input[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs_fx.MIScheduler(model, [nan_input], batches=1).calibrate()
    assert "'a' keeps its previous S: its input holds 1 non-finite value(s)" in caplog.text
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in sgs_fx.get_scales(model).values())


def test_bad_input():
    model = sgs_fx.transform(small_net())
    with pytest.raises(ValueError, match="no batch"):
        sgs_fx.MIScheduler(model, []).calibrate()
    with pytest.raises(TypeError, match="input_fn"):
        sgs_fx.MIScheduler(model, [{"x": torch.randn(1, 3, 8, 8)}]).calibrate()
    assert sgs_fx.MIScheduler(model, [{"x": torch.randn(1, 3, 8, 8)}], input_fn=lambda b: b["x"]).calibrate()
    with pytest.raises(ValueError, match="no instrumented conv"):
        sgs_fx.MIScheduler(small_net(), loader())
    with pytest.raises(ValueError, match="every >= 1"):
        sgs_fx.MIScheduler(model, loader(), every=0)


def _ddp_worker(rank, world, init, out):
    with gloo_group(rank, world, init):
        model = nn.parallel.DistributedDataParallel(sgs_fx.transform(small_net()))
        for zr in (False, True):
            # rank 1 streams (keep_bytes=0), rank 0 would keep its inputs: the ranks agree on one way
            sched = sgs_fx.MIScheduler(model, loader(seed=rank), batches=2, zero_removal=zr,
                                       keep_bytes=0 if rank == 1 else 2**29)
            scales = sched.calibrate()
            torch.save(scales, f"{out}.{zr}.{rank}")


def test_ddp_two_gloo_processes_equal_union():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "s")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2, join=True)
        for zr in (False, True):
            r0, r1 = torch.load(f"{out}.{zr}.0"), torch.load(f"{out}.{zr}.1")
            single = sgs_fx.MIScheduler(sgs_fx.transform(small_net()),
                                        [b for s in (0, 1) for b in loader(seed=s)[:2]], batches=4,
                                        zero_removal=zr).calibrate()
            for name in single:  # the reduced counts are the single process's counts: bit-identical S
                assert torch.equal(r0[name], r1[name]) and torch.equal(r0[name], single[name])


def test_the_nccl_broadcast_of_s_runs_on_the_model_s_device_not_the_current_gpu(monkeypatch):
    # NCCL needs each rank's own GPU; "cuda" is the current device, GPU 0 on every rank of a script that never
    # called torch.cuda.set_device. Here the model's device is the CPU: "cuda" would fail on this machine.
    from sgs_fx.scaling import scheduler

    sent = []
    monkeypatch.setattr(scheduler, "_distributed", lambda: True)
    monkeypatch.setattr(scheduler.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(scheduler.dist, "broadcast", lambda t, src: sent.append((t.device, src)) or t.mul_(2))
    scales = {"b": torch.ones(3, 3, dtype=torch.float64), "a": torch.full((3,), 0.5, dtype=torch.float64)}
    scheduler._broadcast_from_rank0(scales, torch.device("cpu"))
    assert sent == [(torch.device("cpu"), 0)]
    assert torch.equal(scales["a"], torch.ones(3, dtype=torch.float64))  # rank 0's values written back, by name
    assert torch.equal(scales["b"], torch.full((3, 3), 2.0, dtype=torch.float64))


class ListModel(nn.Module):
    """Detection-style: a list of images of different sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, images):
        return [self.conv(im[None]) for im in images]


class TwoArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, mask):
        return self.conv(x) * mask


class KeywordModel(nn.Module):
    """HF-style: keyword arguments, integer ids next to float pixels."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, pixel_values=None, token_ids=None):
        return self.conv(pixel_values + self.embed(token_ids).mean(0)[None, :, None, None])


def _images(n, seed):
    return loader(1, seed=seed, batch=n)[0][0]


@pytest.mark.parametrize("model,input_fn,batch", [
    (ListModel(), lambda b: list(b), [_images(1, 0)[0], _images(1, 1)[0][:, :8, :10]]),
    (TwoArgs(), lambda b: (b, torch.ones(1)), _images(2, 0)),
    (KeywordModel(), lambda b: {"pixel_values": b, "token_ids": torch.tensor([1, 3])}, _images(2, 0)),
], ids=["list", "positional", "keywords"])
def test_calibration_takes_any_input_structure(model, input_fn, batch):
    sgs = sgs_fx.transform(model, example_inputs=None)
    got = sgs_fx.MIScheduler(sgs, [batch], batches=1, input_fn=input_fn).calibrate()
    assert list(got) == ["conv"] and not torch.equal(got["conv"], torch.ones(3, 3))


def test_calibration_feeds_a_bf16_model_bf16_inputs():
    model = sgs_fx.transform(small_net()).to(torch.bfloat16)
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    got = sgs_fx.MIScheduler(model, loader(), batches=1).calibrate()  # float32 batches
    assert seen and set(seen) == {torch.bfloat16} and set(got) == {"0", "4", "6"}


def _zoo(name):
    import torchvision

    tv = torchvision.models
    builders = {
        "resnet50": (lambda: tv.resnet50(), (2, 3, 64, 64)),
        "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(), (2, 3, 64, 64)),
        "convnext_tiny": (lambda: tv.convnext_tiny(), (2, 3, 64, 64)),
        "r3d_18": (lambda: tv.video.r3d_18(), (1, 3, 4, 32, 32)),
        "deeplabv3_mobilenet": (lambda: tv.segmentation.deeplabv3_mobilenet_v3_large(weights=None,
                                                                                     weights_backbone=None), (2, 3, 64, 64)),
    }
    if name in builders:
        return builders[name]
    timm = pytest.importorskip("timm")
    return (lambda: timm.create_model(name, pretrained=False), (2, 3, 80, 80))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_small", "convnext_tiny", "r3d_18", "deeplabv3_mobilenet",
                                  "efficientnet_b0", "regnetx_002", "repvgg_a0", "inception_v3"])
def test_calibration_on_model_zoo_kinds(name):
    build, shape = _zoo(name)
    torch.manual_seed(0)
    sgs = sgs_fx.transform(build())
    x = torch.randn(shape).cumsum(-1) / 4
    got = sgs_fx.MIScheduler(sgs, [x], batches=1).calibrate()
    assert got and all(torch.isfinite(s).all() and (s > 0).all() for s in got.values())


@pytest.mark.slow
def test_calibration_on_faster_rcnn_takes_a_list_of_images():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None,
                                                                           min_size=96, max_size=128)
    sgs = sgs_fx.transform(model)
    images = torch.rand(2, 3, 96, 112)
    got = sgs_fx.MIScheduler(sgs, [(images, None)], batches=1, input_fn=lambda b: list(b[0])).calibrate()
    assert len(got) >= 10 and all(torch.isfinite(s).all() for s in got.values())


class InPlaceAfterConv(nn.Module):
    """Modifies a conv's (unpadded) input in place after the conv has read it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        y = self.b(h)
        h.mul_(7.0).sin_()  # not affine: NMI would not notice an affine change of the kept map
        return y + h[..., 1:-1, 1:-1]


@pytest.mark.parametrize("make", [small_net, InPlaceAfterConv], ids=["small_net", "in_place_after_conv"])
def test_one_forward_with_kept_inputs_equals_two_streaming_forwards(make):
    torch.manual_seed(0)
    model = sgs_fx.transform(make())
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    data = loader(3)
    kept = sgs_fx.MIScheduler(model, data, batches=3).calibrate()
    assert len(calls) == 3  # one forward per batch
    streamed = sgs_fx.MIScheduler(model, data, batches=3, keep_bytes=0).calibrate()
    assert len(calls) == 3 + 6  # two forwards per batch
    budget = sgs_fx.MIScheduler(model, data, batches=3, keep_bytes=1).calibrate()  # too small: falls back
    for name in kept:
        assert torch.equal(kept[name], streamed[name]) and torch.equal(kept[name], budget[name])


class _BNDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(self.drop(torch.relu(self.bn(self.c1(x)))))


def test_calibrating_a_train_mode_export_changes_nothing_and_is_deterministic():
    # eval() does not reach a torch.export graph exported in train mode: its BatchNorm would move its running
    # statistics and its dropout draw random masks during calibration
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    sgs = sgs_fx.transform(torch.export.export(_BNDropout().train(), (x,)).module())
    before = {k: v.clone() for k, v in sgs.state_dict().items()}
    rng = torch.get_rng_state()
    first = sgs_fx.MIScheduler(sgs, [x], batches=1).calibrate()
    assert all(torch.equal(v, sgs.state_dict()[k]) for k, v in before.items())  # BatchNorm statistics untouched
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream is not advanced either
    again = sgs_fx.MIScheduler(sgs, [x], batches=1).calibrate()
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(s, torch.ones_like(s)) for s in first.values())


class _BroadcastBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("bias_map", torch.randn(1, 4, 1, 1).expand(1, 4, 8, 8))  # a stride-0 view

    def forward(self, x):
        return self.c(x) + self.bias_map


def test_calibration_with_a_shuffling_loader_and_a_broadcast_buffer_leaves_no_trace():
    from torch.utils.data import DataLoader, TensorDataset

    sgs = sgs_fx.transform(_BroadcastBuffer())
    assert set(sgs_fx.MIScheduler(sgs, [torch.randn(2, 3, 8, 8)], batches=1).calibrate()) == {"c"}
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.zeros(32))
    model = sgs_fx.transform(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)))
    rng = torch.get_rng_state()
    first = sgs_fx.MIScheduler(model, DataLoader(data, batch_size=4, shuffle=True), batches=1).calibrate()
    again = sgs_fx.MIScheduler(model, DataLoader(data, batch_size=4, shuffle=True), batches=1).calibrate()
    assert torch.equal(torch.get_rng_state(), rng)  # the loader's shuffle drew from a forked RNG
    assert torch.equal(first["0"], again["0"])  # so both calibrations saw the batches the epoch starts with
    expected_first = next(iter(DataLoader(data, batch_size=4, shuffle=True)))[0]  # what the epoch now draws first
    assert torch.equal(first["0"], sgs_fx.dependence(expected_first, nn.Conv2d(3, 4, 3, padding=1)))
