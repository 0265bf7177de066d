"""export_onnx: plain ONNX, checked by onnxruntime, no trace of instrumentation (issue 5)."""
import dataclasses
import os
import re

import pytest
import torch
import torchvision
from torch import nn

import sgs_fx
from helpers import random_scales
from sgs_fx.cifar.models import build_model
from sgs_fx.passes.select import default_filter


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _train_a_little(model, x, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        opt.step()
    return model


def check_export(model, x, tmp_path, mode="sgs"):
    # branch recipes need odd kernels: a 4x4 patchify stem (ConvNeXt) stays a plain conv
    kwargs = {"scales": None} if mode == "sgs" else {
        "branches": "acb", "filter_fn": lambda n, m: default_filter(n, m) and all(k % 2 for k in m.kernel_size)}
    sgs = sgs_fx.transform(model, mode=mode, **kwargs)
    if mode == "sgs":
        sgs_fx.set_scales(sgs, random_scales(sgs, dtype=torch.float32))
    _train_a_little(sgs, x)
    report = sgs_fx.export_onnx(sgs, tmp_path / "sgs.onnx", x[:1])
    assert report.passed and set(report.max_abs_diff) == {1, 3}
    assert max(report.max_abs_diff.values()) <= 1e-4
    plain = sgs_fx.export_onnx(model, tmp_path / "plain.onnx", x[:1])
    assert report.op_counts == plain.op_counts
    assert not sgs_fx.instrumented(sgs) == {}  # the trained model itself stays instrumented
    return report


@pytest.mark.parametrize("mode", ["sgs", "branches"])
def test_cifar_resnet(tmp_path, mode):
    check_export(build_model("resnet18", width=0.125), torch.randn(4, 3, 32, 32), tmp_path, mode)


def test_torchvision_resnet18(tmp_path):
    check_export(torchvision.models.resnet18(num_classes=10), torch.randn(4, 3, 64, 64), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sgs", "branches"])
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf",
                                  "vgg11_bn"])
def test_torchvision_models(name, tmp_path, mode):
    check_export(torchvision.models.get_model(name, num_classes=10), torch.randn(4, 3, 64, 64), tmp_path, mode)


def test_report_text(tmp_path):
    model = sgs_fx.transform(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    report = sgs_fx.export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 8, 8), check_batch_sizes=(1, 5))
    text = str(report)
    assert "Conv×1" in text and "batch 5" in text and "PASSED" in text and report.exporter == "dynamo"


class _WithExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
        self.classes = ["a", "b", "c", "d", "e"]  # saved with the weights: state_dict holds a non-tensor

    def get_extra_state(self):
        return {"classes": self.classes}

    def set_extra_state(self, state):
        self.classes = state["classes"]

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("large", [False, True], ids=["one_file", "weights_beside_it"])
def test_the_weights_are_in_the_onnx_file_unless_too_large_for_one(tmp_path, monkeypatch, large):
    # a user copies the .onnx and ships it: its weights must be inside, unless ONNX's 2 GiB limit forbids it (the
    # exporter's threshold, 1.5 GiB, lowered here); an earlier export's weights file left beside it is removed
    import onnx
    import onnxruntime

    from torch.onnx._internal.exporter import _onnx_program

    if large:
        monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    (tmp_path / "m.onnx.data").write_bytes(b"an earlier export's weights")
    torch.manual_seed(0)
    model = sgs_fx.transform(_WithExtraState())
    x = torch.randn(2, 3, 8, 8)
    report = sgs_fx.export_onnx(model, tmp_path / "m.onnx", x)
    assert report.passed and report.exporter == "dynamo"
    files = ["m.onnx", "m.onnx.data"] if large else ["m.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    assert report.size_bytes == sum(os.path.getsize(tmp_path / f) for f in files)
    weights = sum(t.numel() * 4 for t in sgs_fx.strip(model).parameters())
    assert (os.path.getsize(tmp_path / "m.onnx") > weights) == (not large)
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    if not large:  # the file alone, elsewhere
        shipped = tmp_path / "shipped"
        shipped.mkdir()
        (shipped / "model.onnx").write_bytes((tmp_path / "m.onnx").read_bytes())
        session = onnxruntime.InferenceSession(str(shipped / "model.onnx"))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert (torch.from_numpy(got) - model(x)).abs().max().item() < 1e-5  # float32 sums in another order


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile], ids=["data_parallel", "compiled"])
def test_a_wrapped_model_exports_the_model_inside(tmp_path, wrap):
    # the model a training script holds after training; exporting the wrapper failed in both exporters
    torch.manual_seed(0)
    model = sgs_fx.transform(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)))
    wrapped = wrap(model)
    report = sgs_fx.export_onnx(wrapped, tmp_path / "m.onnx", torch.randn(2, 3, 8, 8))
    assert report.passed and report.op_counts.get("Conv") == 1 and sgs_fx.instrumented(model)
    ptq = sgs_fx.quantize_ptq(wrapped, [torch.randn(8, 3, 8, 8)], num_batches=1, progress=False)
    assert sgs_fx.export_onnx(ptq, tmp_path / "q.onnx", torch.randn(2, 3, 8, 8)).quantized


def test_bad_input(tmp_path):
    model = sgs_fx.transform(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sgs_fx.export_onnx(model, tmp_path / "missing" / "m.onnx", torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"example_input of shape \(1, 3, 9, 9\) does not fit"):
        sgs_fx.export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 9, 9))

    class Unexportable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            return torch.linalg.eigvals(self.conv(x)).real  # complex numbers: no ONNX exporter handles them

    with pytest.raises(RuntimeError, match="could not be exported.*linalg_eigvals"):
        sgs_fx.export_onnx(sgs_fx.transform(Unexportable()), tmp_path / "u.onnx", torch.randn(1, 3, 8, 8))


def _perturb_onnxruntime(monkeypatch, delta: float, output: int | None = None) -> None:
    """Make export_onnx's onnxruntime session add ``delta`` to one output (all if None): a wrong graph."""
    _edit_onnxruntime(monkeypatch, lambda i, o: o + delta if output is None or i == output else o)


def _edit_onnxruntime(monkeypatch, edit) -> None:
    """Make export_onnx's onnxruntime session return ``edit(i, output_i)`` for each of its outputs."""
    import sgs_fx.export.onnx as export_module

    real_session = export_module.open_session

    class Edited:
        def __init__(self, path, report):
            self.session = real_session(path, report)

        def get_inputs(self):
            return self.session.get_inputs()

        def get_outputs(self):
            return self.session.get_outputs()

        def run(self, *args):
            return [edit(i, o) for i, o in enumerate(self.session.run(*args))]

    monkeypatch.setattr(export_module, "open_session", Edited)


def test_mismatch_raises_and_keeps_file(tmp_path, monkeypatch):
    model = sgs_fx.transform(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    _perturb_onnxruntime(monkeypatch, 1.0)
    with pytest.raises(sgs_fx.ExportMismatchError, match="was written to") as info:
        sgs_fx.export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    report = info.value.report
    assert os.path.exists(tmp_path / "m.onnx") and not report.passed
    assert report.max_abs_diff[1] == pytest.approx(1.0, abs=1e-5) and "allowed" in str(report)
    assert report.data_dependent == {} and "depends on the data" not in str(info.value)


class TwoHeads(nn.Module):
    """A main output in raw units (~1e5) and a small auxiliary one (~1), returned in a dict with a tuple."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3)

    def forward(self, x):
        y = self.conv(x)
        return {"out": self.head(y) * 1e5, "aux": (y.mean((2, 3)), y.amax((2, 3)))}


@pytest.mark.parametrize("output", [1, 2])
def test_every_output_is_compared_at_its_own_scale(tmp_path, monkeypatch, output):
    torch.manual_seed(0)
    model = sgs_fx.transform(TwoHeads())
    x = torch.randn(1, 3, 16, 16)
    report = sgs_fx.export_onnx(model, tmp_path / "ok.onnx", x)
    assert report.passed and report.outputs == (3, 3) and "all 3 outputs compared" in str(report)
    # 1e-3 on an auxiliary output: less than the main output's own float32 noise (~1e-2) and far inside its
    # allowance (1e-4 + 1e-5 * ~1e5), but ten times the auxiliary output's own allowance
    _perturb_onnxruntime(monkeypatch, 1e-3, output=output)
    with pytest.raises(sgs_fx.ExportMismatchError) as info:
        sgs_fx.export_onnx(model, tmp_path / "bad.onnx", x)
    assert info.value.report.max_abs_diff[1] == pytest.approx(1e-3, rel=1e-2)


class ConvAndSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        y = self.conv(x)
        return y, y.sum()


def test_unpaired_outputs_compare_the_first_and_say_so(caplog):
    import numpy as np

    from sgs_fx.export.check import _compare
    from sgs_fx.export.report import ExportReport

    model = ConvAndSum().eval()

    class OneExtraOutput:  # an ONNX model with an output in between that PyTorch does not return
        def get_inputs(self):
            return [type("Input", (), {"name": "x"})()]

        def run(self, _, feed):
            with torch.no_grad():
                y, total = model(torch.from_numpy(feed["x"]))
            return [y.numpy(), np.zeros((), dtype=np.float32), total.numpy()]

    report = ExportReport(path="m.onnx", opset=20, exporter="dynamo", op_counts={})
    with caplog.at_level("WARNING", logger="sgs_fx"):
        _compare(model, OneExtraOutput(), (torch.randn(1, 3, 8, 8),), (1, 3), report)
    # pairing by position would have compared the sum with the extra zero and failed
    assert report.outputs == (2, 3) and report.passed and report.max_abs_diff == {1: 0.0, 3: 0.0}
    assert "only the first compared" in str(report) and "only the first is compared" in caplog.text


def test_negative_tolerance_is_refused(tmp_path):
    model = sgs_fx.transform(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    for kwargs in ({"atol": -1.0}, {"rtol": -1e-5}):
        with pytest.raises(ValueError, match="atol and rtol must be >= 0"):
            sgs_fx.export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), **kwargs)


def test_large_outputs_are_judged_relative_to_their_scale(tmp_path):
    # a regression head in raw units: outputs ~2e3, where float32 sums reordered by onnxruntime's kernels
    # differ by ~5e-3 (50x an absolute 1e-4), yet only ~3e-6 of the outputs' magnitude
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    model = sgs_fx.transform(nn.Sequential(net, Scale(1e4)))
    x = torch.randn(1, 3, 32, 32)
    report = sgs_fx.export_onnx(model, tmp_path / "big.onnx", x)
    assert report.passed and min(report.output_scale.values()) > 1e3
    assert max(report.max_abs_diff.values()) > report.atol  # the absolute bound alone would have failed it
    assert all(d <= 1e-5 * report.output_scale[b] + report.atol for b, d in report.max_abs_diff.items())
    assert not dataclasses.replace(report, rtol=0.0).passed


class ImageMaskLabel(nn.Module):
    """Three positional inputs: an image, a mask of the same shape (weighted differently) and a class label."""

    def __init__(self):
        super().__init__()
        self.image, self.mask, self.label = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Embedding(10, 4)

    def forward(self, image, mask, label):
        return (self.image(image) + 3 * self.mask(mask)).mean((2, 3)) + self.label(label)


def test_several_inputs_are_exported_and_each_checked(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = sgs_fx.transform(ImageMaskLabel())
    inputs = (torch.randn(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.tensor([9]))
    report = sgs_fx.export_onnx(model, tmp_path / "three.onnx", inputs, check_batch_sizes=(1, 4))
    assert report.passed and report.exporter == "dynamo" and set(report.max_abs_diff) == {1, 4}
    import onnx

    graph_inputs = onnx.load(tmp_path / "three.onnx").graph.input
    assert [i.type.tensor_type.elem_type for i in graph_inputs] == [onnx.TensorProto.FLOAT] * 2 + [onnx.TensorProto.INT64]
    # fed by position: an onnxruntime session that swapped image and mask would be caught
    import sgs_fx.export.check as check_module

    real_feed = check_module._feed
    monkeypatch.setattr(check_module, "_feed", lambda session, xs: real_feed(session, (xs[1], xs[0], xs[2])))
    with pytest.raises(sgs_fx.ExportMismatchError):
        sgs_fx.export_onnx(model, tmp_path / "swapped.onnx", inputs)


def test_integer_inputs_are_drawn_within_their_range():
    from sgs_fx.export.check import random_like as _random_like

    g = torch.Generator().manual_seed(0)
    labels = _random_like(torch.tensor([2, 7]), 1000, g)
    assert labels.dtype == torch.int64 and labels.min() == 2 and labels.max() == 7
    assert _random_like(torch.tensor([[True]]), 8, g).dtype == torch.bool
    floats = _random_like(torch.full((1, 5), 3.0, dtype=torch.float16), 4000, g)
    assert floats.dtype == torch.float16 and floats.shape == (4000, 5)
    assert abs(floats.float().mean().item() - 3.0) < 0.01  # equal example values: mean 3, std clamped to 1e-3


def test_several_inputs_bad_input_is_named(tmp_path):
    model = sgs_fx.transform(ImageMaskLabel())
    inputs = (torch.randn(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"dim 0 is the batch, and they must agree.*dynamic_batch=False"):
        sgs_fx.export_onnx(model, tmp_path / "m.onnx", (inputs[0], inputs[1][:1], inputs[2]), dynamic_batch=True)
    with pytest.raises(TypeError, match="tensor or a tuple of tensors.*got tuple of int, int"):
        sgs_fx.export_onnx(model, tmp_path / "m.onnx", (1, 2))
    with pytest.raises(TypeError, match="is a list; pass a tuple of tensors"):
        sgs_fx.export_onnx(model, tmp_path / "m.onnx", list(inputs))
    with pytest.raises(ValueError, match=r"check_input must be shaped like example_input, \(N, 3, 8, 8\), "
                                         r"\(N, 3, 8, 8\), \(N\) with one N; got \(4, 3, 8, 8\)"):
        sgs_fx.export_onnx(model, tmp_path / "m.onnx", inputs, check_input=torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"example_input of shape \(2, 3, 8, 8\), \(2, 3, 8, 8\), \(2,\) does not fit"):
        sgs_fx.export_onnx(model, tmp_path / "m.onnx", (inputs[0], inputs[1], inputs[2] + 10))
    report = sgs_fx.export_onnx(model, tmp_path / "fixed.onnx", inputs, dynamic_batch=False)
    assert report.passed and list(report.max_abs_diff) == [2]


class ImageAndOffsets(nn.Module):
    """An image batch and a per-channel offset vector without a batch dim."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, image, offsets):
        return self.conv(image) + offsets.view(1, -1, 1, 1)


def test_fixed_shape_export_feeds_each_input_its_own_shape(tmp_path):
    model = sgs_fx.transform(ImageAndOffsets())
    inputs = (torch.randn(2, 3, 8, 8), torch.randn(4))
    with pytest.raises(ValueError, match="dim 0 is the batch"):
        sgs_fx.export_onnx(model, tmp_path / "m.onnx", inputs, dynamic_batch=True)
    report = sgs_fx.export_onnx(model, tmp_path / "fixed.onnx", inputs, dynamic_batch=False)
    assert report.passed and list(report.max_abs_diff) == [2]
    auto = sgs_fx.export_onnx(model, tmp_path / "auto.onnx", inputs)  # unset: no shared batch dim, so fixed
    assert auto.passed and list(auto.max_abs_diff) == [2] and "share no batch dim" in auto.static_batch


def test_a_static_torch_export_program_is_exported_at_its_shape(tmp_path):
    # torch.export's guards fix the batch dim of a program exported without dynamic shapes: by default it is
    # exported (and checked) at that shape, and the report says why; asking for a dynamic batch is a clear error
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    x = torch.randn(4, 3, 8, 8)
    plain = sgs_fx.strip(sgs_fx.transform(torch.export.export(model, (x,)).module()))
    report = sgs_fx.export_onnx(plain, tmp_path / "static.onnx", x)
    assert report.passed and list(report.max_abs_diff) == [4]
    assert "Guard failed" in report.static_batch and "batch dim exported fixed" in str(report)
    with pytest.raises(ValueError, match=r"dynamic_batch=True, but .* takes only batch size 4 .*dynamic_batch=False"):
        sgs_fx.export_onnx(plain, tmp_path / "dyn.onnx", x, dynamic_batch=True)
    dynamic = sgs_fx.export_onnx(model, tmp_path / "dynamic.onnx", x)  # an ordinary module: dynamic as before
    assert dynamic.static_batch is None and list(dynamic.max_abs_diff) == [1, 3]


class _AssertsNonNegative(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        assert bool((x >= 0).all()), "x must be >= 0"
        return self.conv(x)


def test_a_model_that_rejects_the_random_check_inputs_gets_a_clear_error(tmp_path):
    # a value-dependent assertion is not a fixed batch size (the probe repeats the example's own values), and the
    # random check inputs it then rejects are named, with what to do
    x = torch.rand(3, 3, 8, 8)
    with pytest.raises(ValueError, match=r"raised on the check's inputs, which are drawn at random like example_input"
                                         r".*x must be >= 0.*pass check_input="):
        sgs_fx.export_onnx(_AssertsNonNegative(), tmp_path / "m.onnx", x)
    report = sgs_fx.export_onnx(_AssertsNonNegative(), tmp_path / "real.onnx", x, check_input=torch.rand(5, 3, 8, 8))
    assert report.passed and list(report.max_abs_diff) == [1, 3] and report.static_batch is None


class PerImage(nn.Module):
    """Runs its conv image by image, as torchvision's detection models do: the exported graph keeps the loop
    unrolled at the batch it was exported at."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.stack([self.conv(image[None])[0] for image in x])


class _BranchesOnData(nn.Module):
    """A branch on a value, which torch.export refuses: the TorchScript exporter traces it, Python ints baked in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.rest(x, y) if y.mean() > -1e9 else y


class ReshapeToTheBatch(_BranchesOnData):
    def rest(self, x, y):
        return y.reshape(len(x), -1)  # len(x): the traced batch, a constant in the graph


class OneOutputPerImage(_BranchesOnData):
    def rest(self, x, y):
        return tuple(y[i:i + 1] for i in range(len(x)))  # as many outputs as the traced batch


@pytest.mark.parametrize("model, evidence", [
    (PerImage, r"onnxruntime at batch 1: InvalidArgument: Got invalid dimensions for input"),
    (ReshapeToTheBatch, r"at batch 1 output 0 is \(2, 72\) in onnxruntime, \(1, 144\) in PyTorch"),
    (OneOutputPerImage, r"at batch 1 the ONNX model returns 2 outputs, PyTorch 1"),
], ids=["onnxruntime_raises", "other_shape", "other_outputs"])
def test_a_graph_that_runs_only_at_its_export_batch_is_exported_at_the_example_batch(tmp_path, model, evidence):
    # torchvision's detection models and RAFT export so (issue 27): the model takes any batch, its graph does not
    x = torch.randn(1, 3, 8, 8)
    report = sgs_fx.export_onnx(sgs_fx.transform(model()), tmp_path / "m.onnx", x)
    assert report.passed and list(report.max_abs_diff) == [1]
    assert re.search(r"^the exported graph runs only at batch size 2, the batch it was exported at \(" + evidence,
                     report.static_batch)
    assert "batch dim exported fixed: the exported graph runs only" in str(report)
    import onnx

    assert onnx.load(tmp_path / "m.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_a_graph_that_runs_only_at_its_export_batch_is_one_clear_error_when_a_dynamic_batch_is_asked(tmp_path):
    with pytest.raises(ValueError) as info:
        sgs_fx.export_onnx(PerImage(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), dynamic_batch=True)
    message = str(info.value)
    assert "\n" not in message and re.fullmatch(
        r"export_onnx: dynamic_batch=True, but the exported graph runs only at batch size 2, the batch it was exported "
        r"at \(onnxruntime at batch 1: .*\); pass dynamic_batch=False \(or leave it unset\) to export and check it at "
        r"the example's batch size", message)


class KeepsPositive(nn.Module):
    """A second output whose size depends on the data (as detections after a score threshold)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y, y[y > 0]


def test_an_output_whose_size_depends_on_the_data_is_compared_per_input(tmp_path, monkeypatch):
    # its size differs from one batch size to the next, and onnxruntime is compared with PyTorch on the same input
    x = torch.randn(1, 3, 8, 8)
    report = sgs_fx.export_onnx(KeepsPositive(), tmp_path / "ok.onnx", x)
    assert report.passed and list(report.max_abs_diff) == [1, 3] and report.static_batch is None
    assert report.shape_mismatches == {}
    # onnxruntime keeping one item fewer on the same input (an item at a threshold, or a wrong graph) is said so
    _edit_onnxruntime(monkeypatch, lambda i, o: o[:-1] if i == 1 else o)
    with pytest.raises(sgs_fx.ExportMismatchError) as info:
        sgs_fx.export_onnx(KeepsPositive(), tmp_path / "short.onnx", x)
    match = re.search(r"onnxruntime returns outputs shaped unlike PyTorch's on the same input \(batch 1: output 1 "
                      r"\((\d+),\) in onnxruntime, \((\d+),\) in PyTorch; batch 3: .*\); the size of output 1 depends "
                      r"on the data .*check on real inputs \(check_input=", str(info.value))
    assert match and int(match[1]) == int(match[2]) - 1
    report = info.value.report
    assert list(report.shape_mismatches) == [1, 3] and report.static_batch is None
    assert "runs only" not in str(info.value)
    assert report.data_dependent == {1: [0]} and "size depends on the data (compared per input): output 1 dim 0" \
        in str(report)
    # other values at the same size: the same hint (ties at a threshold pick other items), not about the plain output
    monkeypatch.undo()
    _edit_onnxruntime(monkeypatch, lambda i, o: o + 1.0 if i == 1 else o)
    with pytest.raises(sgs_fx.ExportMismatchError, match=r"beyond atol=.*; the size of output 1 depends on the data"):
        sgs_fx.export_onnx(KeepsPositive(), tmp_path / "other.onnx", x)


class PerImageKeepsPositive(PerImage):
    def forward(self, x):
        y = super().forward(x)
        return y, y[y > 0]


def test_a_fixed_batch_graph_whose_output_sized_by_the_data_differs_is_a_mismatch_not_a_failure(tmp_path, monkeypatch):
    # ssdlite with random weights (tied scores: onnxruntime keeps other detections than PyTorch, at the export's own
    # batch too): a difference to report with its hint, not a file onnxruntime cannot run
    _edit_onnxruntime(monkeypatch, lambda i, o: o[:-1] if i == 1 else o)
    with pytest.raises(sgs_fx.ExportMismatchError, match=r"the size of output 1 depends on the data") as info:
        sgs_fx.export_onnx(sgs_fx.transform(PerImageKeepsPositive()), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert info.value.report.static_batch.startswith("the exported graph runs only at batch size 2")


def test_onnxruntime_failing_at_every_batch_size_is_a_clear_error(tmp_path, monkeypatch):
    # not a graph fixed at its export batch (it fails at that batch too): the file cannot run, and the error says so
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    def fail(i, o):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node")

    _edit_onnxruntime(monkeypatch, fail)
    with pytest.raises(RuntimeError, match=r"^export_onnx: onnxruntime could not run the exported file "
                                           r"\(onnxruntime at batch 1: Fail: Non-zero status code returned while running Conv node\); "
                                           r"it was written to .*m.onnx for inspection$"):
        sgs_fx.export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))


class _FewFlowUpdates(nn.Module):
    """torchvision's RAFT with 2 refinement steps instead of 12 (the same graph, a sixth of its size)."""

    def __init__(self):
        super().__init__()
        self.raft = torchvision.models.optical_flow.raft_small(weights=None)

    def forward(self, image1, image2):
        return self.raft(image1, image2, num_flow_updates=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "raft_small"])
def test_detection_and_optical_flow_models_export_at_their_example_batch(tmp_path, name):
    # issue 27: their graphs loop over the images, unrolled at the export's batch of 2 (fasterrcnn: onnxruntime's
    # "Split size 1 exceeds the remaining size" at batch 1; RAFT: image2's batch fixed), never transformed or not
    if name == "raft_small":
        model, x = _FewFlowUpdates(), (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))
    else:
        model, x = torchvision.models.get_model(name, weights=None, weights_backbone=None), torch.rand(1, 3, 320, 320)
    sgs = sgs_fx.transform(model.eval())
    report = sgs_fx.export_onnx(sgs, tmp_path / "m.onnx", x)
    assert report.passed and list(report.max_abs_diff) == [1] and report.shape_mismatches == {}
    assert report.static_batch.startswith("the exported graph runs only at batch size 2, the batch it was exported at")
    with pytest.raises(ValueError, match="dynamic_batch=True, but the exported graph runs only at batch size 2"):
        sgs_fx.export_onnx(model, tmp_path / "plain.onnx", x, dynamic_batch=True)


def test_check_input_of_a_graph_exported_at_the_example_batch_is_fed_at_that_batch(tmp_path):
    report = sgs_fx.export_onnx(PerImage(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8),
                                check_input=torch.randn(5, 3, 8, 8))
    assert report.passed and list(report.max_abs_diff) == [1] and report.static_batch is not None
