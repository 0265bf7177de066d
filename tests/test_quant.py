"""SGS inside PyTorch's QAT flow (issue 11, first part): prepare_qat_fx, then transform."""
import copy

import pytest
import torch
from torch.ao.quantization import get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import sgs_fx
from sgs_fx.cifar.models import build_model


def _qat_model(x):
    torch.manual_seed(0)
    model = build_model("vgg11_bn", width=0.125).train()
    return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x,))


def test_qat_then_transform_scales_the_float_weight_exactly_through_the_fake_quant():
    x = torch.randn(4, 3, 32, 32)
    qat = _qat_model(x)
    sgs = sgs_fx.transform(qat)
    convs = sgs_fx.instrumented(sgs)
    assert len(convs) == 8 and all(type(m).__name__ == "SGSConvBnReLU2d" for m in convs.values())
    g = torch.Generator().manual_seed(1)
    sgs_fx.set_scales(sgs, {n: torch.rand(m.kernel_size, generator=g) + 0.5 for n, m in convs.items()})
    scales = sgs_fx.get_scales(sgs)
    reference = copy.deepcopy(qat)
    for m in (reference, sgs):
        m.zero_grad()
        m(x).pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()  # applies S (scaling='step')
    plain = dict(reference.named_parameters())
    for name, p in sgs.named_parameters():
        conv = name.rsplit(".", 1)[0]
        expected = scales[conv] * plain[name].grad if name.endswith("weight") and conv in scales else plain[name].grad
        assert torch.equal(p.grad, expected), name
    assert set(sgs_fx.MIScheduler(sgs, [x], batches=1).calibrate()) == set(convs)


def test_transform_then_prepare_qat_is_a_clear_error():
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    sgs = sgs_fx.transform(build_model("vgg11_bn", width=0.125).train())
    with pytest.raises(RuntimeError, match="prepare_qat_fx / prepare_fx\\) the plain model first"):
        prepare_qat_fx(sgs, get_default_qat_qconfig_mapping("x86"), (x,))
    with pytest.raises(RuntimeError, match="tracing through the SGS-instrumented SGSConv2d"):
        torch.fx.symbolic_trace(sgs)


# --- INT8 export (QDQ ONNX), PTQ and the errors of issue 11 -------------------------------------------------

import onnx  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sgs_fx.cifar.data import synthetic_cifar, to_float  # noqa: E402
from sgs_fx.export.qdq import QDQConv, QDQLinear, UnsupportedQuantizationError, to_qdq  # noqa: E402
from sgs_fx.export.onnx import onnx_accuracy  # noqa: E402


@pytest.fixture(scope="module")
def data():
    d = synthetic_cifar(n_train=512, n_test=256)
    return to_float(d.train_images), d.train_labels, to_float(d.test_images), d.test_labels


def _train(model, x, y, steps=40, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for i in range(steps):
        idx = slice((i * 64) % len(x), (i * 64) % len(x) + 64)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_qat(data):
    """A narrow VGG-11-BN, QAT with SGS, trained on the synthetic set until its logits have margins."""
    x, y, _, _ = data
    torch.manual_seed(0)
    qat = sgs_fx.transform(sgs_fx.prepare_qat(build_model("vgg11_bn", width=0.125), x[:2]))
    sgs_fx.MIScheduler(qat, [x[:64]], batches=1).calibrate()
    return _train(qat, x, y, steps=200)  # a real classifier (86 % on the synthetic test set, 8 classes predicted)


def test_qdq_weights_are_the_fake_quantized_weights_bit_for_bit(trained_qat, data):
    # What PyTorch's QAT modules feed their convs (BatchNorm folded, then fake-quantized), captured in a
    # real eval forward, must be exactly the int8 weight the export dequantizes.
    x = data[2][:8]
    model = sgs_fx.freeze(sgs_fx.strip(trained_qat).eval())
    seen = {}
    hooks = [m.weight_fake_quant.register_forward_hook(lambda mod, i, out, n=n: seen.__setitem__(n, out.detach()))
             for n, m in model.named_modules() if hasattr(m, "weight_fake_quant")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    qdq = to_qdq(model)
    convs = {n: m for n, m in qdq.named_modules() if isinstance(m, QDQConv)}
    assert len(convs) == 8 and all(m.weight_int8.dtype == torch.int8 for m in convs.values())
    for name, m in convs.items():
        assert torch.equal(m.weight(), seen[name]), name
        assert int(m.weight_int8.abs().max()) <= 63  # the default 7-bit weights
    # and the QDQ graph computes what the fake-quant model does: same top-1, logits within two steps of
    # the output quantizer (a value exactly at a rounding tie may round the other way: x * (1/s) vs x / s)
    step = float(model.get_submodule(list(model.graph.nodes)[-2].target).scale)
    with torch.no_grad():
        a, b = model(data[2]), qdq(data[2])
    assert torch.equal(a.argmax(1), b.argmax(1)) and (a - b).abs().max() <= 2 * step + 1e-6


def _stored_tensors(proto) -> dict:
    """Every tensor the file stores, by the name the graph uses: initializers and Constant nodes' values."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    values.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR})
    return values


def test_export_int8_qdq_onnx_checked_by_onnxruntime(trained_qat, data, tmp_path):
    x_test = data[2]
    before = {k: v.clone() for k, v in trained_qat.state_dict().items()}
    report = sgs_fx.export_onnx(trained_qat, tmp_path / "int8.onnx", x_test[:1], check_input=x_test)
    assert all(torch.equal(v, trained_qat.state_dict()[k]) for k, v in before.items())  # checks moved no range
    assert report.quantized and report.passed and report.checked == len(x_test) and report.agreement >= 0.98
    assert report.op_counts["QuantizeLinear"] >= 9 and report.op_counts["DequantizeLinear"] >= 9
    assert report.ort_ops.get("QLinearConv") == 8  # onnxruntime runs every conv with int8 kernels
    proto = onnx.load(report.path)
    int8 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sorted(tuple(t.dims) for t in int8 if len(t.dims) == 4) == sorted(
        tuple(m.weight.shape) for m in sgs_fx.instrumented(trained_qat).values())
    assert "INT8 QDQ ONNX" in str(report) and "top-1 agreement" in str(report)
    # the file holds the model's own ranges: the export's forwards (example, checks) observed nothing
    values = _stored_tensors(proto)
    first = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    assert float(values[first.input[1]]) == trained_qat.activation_post_process_0.scale.item()
    plain = sgs_fx.export_onnx(sgs_fx.strip(build_model("vgg11_bn", width=0.125)), tmp_path / "f.onnx", x_test[:1])
    # Int8 weights store a quarter of float32's bytes, plus float biases and per-channel scales. Compared on
    # tensor bytes, not file sizes: the exporter's per-node metadata (stack traces holding the checkout's
    # path) is a third of this small file and its length depends on where the tests run.
    float_bytes = sum(v.nbytes for v in _stored_tensors(onnx.load(plain.path)).values())
    assert sum(v.nbytes for v in values.values()) < 0.3 * float_bytes
    assert report.size_bytes < plain.size_bytes


def test_agreement_below_threshold_raises_and_keeps_the_file(trained_qat, data, tmp_path):
    path = tmp_path / "int8.onnx"
    with pytest.raises(ValueError, match=r"check_input must be shaped like example_input, \(N, 3, 32, 32\) with one N; got \(4, 3, 16, 32\)"):
        sgs_fx.export_onnx(trained_qat, path, data[2][:1], check_input=data[2][:4, :, :16])
    with pytest.raises(sgs_fx.ExportMismatchError, match=r"top-1 agreement .* < min_agreement=1.01") as info:
        sgs_fx.export_onnx(trained_qat, path, data[2][:1], check_input=data[2][:64], min_agreement=1.01)
    assert path.exists() and info.value.report.quantized and not info.value.report.passed


def _corrupting(monkeypatch, corrupt):
    """export_onnx writes a QDQ graph that ``corrupt`` damaged after the conversion: a bug the check must catch."""
    import sgs_fx.export.onnx as export_module

    real = export_module.to_qdq

    def damaged(model):
        qdq = real(model)
        with torch.no_grad():
            corrupt(qdq)
        return qdq

    monkeypatch.setattr(export_module, "to_qdq", damaged)


def test_a_correct_int8_export_is_within_a_step_or_two(trained_qat, data, tmp_path):
    report = sgs_fx.export_onnx(trained_qat, tmp_path / "int8.onnx", data[2][:1], check_input=data[2])
    assert report.passed and report.agreement_meaningful and report.output_step is not None
    assert report.max_output_diff <= 2 * report.step + 1e-6  # onnxruntime requantises: a step at a tie
    with torch.no_grad():
        assert (sgs_fx.freeze(sgs_fx.strip(trained_qat)).eval()(data[2]).argmax(1) == data[3]).float().mean() > 0.5
    assert "quantization steps of the output" in str(report)


def test_int8_export_with_negated_weights_fails_though_top1_agrees(trained_qat, data, tmp_path, monkeypatch):
    # the second conv's int8 weights negated in the written graph: the check must fail, whatever top-1 does
    second = lambda qdq: [m for m in qdq.modules() if isinstance(m, QDQConv)][1]  # noqa: E731
    _corrupting(monkeypatch, lambda qdq: second(qdq).weight_int8.neg_())
    with pytest.raises(sgs_fx.ExportMismatchError, match="quantization steps") as info:
        sgs_fx.export_onnx(trained_qat, tmp_path / "bad.onnx", data[2][:1], check_input=data[2])
    assert info.value.report.max_output_diff > 10 * info.value.report.output_allowance


class OneOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_int8_export_of_a_one_output_model_with_a_shifted_bias_fails(data, tmp_path, monkeypatch):
    # one output per input: top-1 agreement is always 100 % and says nothing; the outputs must be compared
    torch.manual_seed(0)
    x = data[0][:128]
    ptq = sgs_fx.quantize_ptq(OneOutput(), [x[:64], x[64:]], num_batches=2, progress=False)
    good = sgs_fx.export_onnx(ptq, tmp_path / "good.onnx", x[:1], check_input=x)
    assert good.passed and not good.agreement_meaningful and "not checked" in str(good)
    last = lambda qdq: [m for m in qdq.modules() if isinstance(m, QDQLinear)][-1]  # noqa: E731
    _corrupting(monkeypatch, lambda qdq: last(qdq).bias.add_(5.0))
    with pytest.raises(sgs_fx.ExportMismatchError, match="quantization steps"):
        sgs_fx.export_onnx(ptq, tmp_path / "bad.onnx", x[:1], check_input=x)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.cls = nn.Linear(4, 5)
        self.reg = nn.Linear(4, 2)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean((2, 3))
        return self.cls(f), self.reg(f)


def test_int8_export_checks_every_output(data, tmp_path, monkeypatch):
    # a corrupted second head (a regression output) must fail the export, however the first output agrees
    torch.manual_seed(0)
    x = data[0][:128]
    ptq = sgs_fx.quantize_ptq(TwoHeads(), [x[:64], x[64:]], num_batches=2, progress=False)
    good = sgs_fx.export_onnx(ptq, tmp_path / "good.onnx", x[:1], check_input=x)
    assert good.passed and len(good.output_checks) == 2
    second = lambda qdq: [m for m in qdq.modules() if isinstance(m, QDQLinear)][-1]  # noqa: E731
    _corrupting(monkeypatch, lambda qdq: second(qdq).bias.add_(5.0))
    with pytest.raises(sgs_fx.ExportMismatchError, match="output 1 differs by"):
        sgs_fx.export_onnx(ptq, tmp_path / "bad.onnx", x[:1], check_input=x)


def test_reduce_range_activations_are_clamped_like_pytorch(tmp_path):
    # PyTorch's x86 default narrows activations to [0, 127]; QuantizeLinear saturates at 255 only, so the
    # export clamps first. Make a range far too small for the data: without the clamp onnxruntime differs.
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).train()
    qat = prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x,))
    qat(x)
    qat.eval().apply(torch.ao.quantization.disable_observer)
    fq = qat.activation_post_process_1
    assert (fq.quant_min, fq.quant_max) == (0, 127)
    # the fused fake-quant derives its scale from the running range at every call (and stores it)
    fq.activation_post_process.max_val.fill_(0.05)
    with torch.no_grad():
        qat(x)
        assert fq.scale.item() == pytest.approx(0.05 / 127) and (getattr(qat, "0")(x) > 0.1).any()
    report = sgs_fx.export_onnx(qat, tmp_path / "rr.onnx", x[:1], check_input=x)
    assert report.op_counts["Clip"] == 3
    # one output step of slack: onnxruntime requantises in integers, a value at a tie may round the other way
    assert report.max_output_diff <= qat.activation_post_process_2.scale.item() + 1e-6


def test_ptq_calibrates_with_histogram_observers_on_the_float_model(data):
    x = data[0]
    torch.manual_seed(0)
    model = sgs_fx.transform(build_model("vgg11_bn", width=0.125)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(x[i:i + 32], None) for i in range(0, 160, 32)]
    ptq = sgs_fx.quantize_ptq(model, batches, num_batches=2, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and sgs_fx.instrumented(model)
    fakes = [m for m in ptq.modules() if isinstance(m, torch.ao.quantization.FakeQuantizeBase)]
    assert fakes and all(int(m.fake_quant_enabled) == 1 and int(m.observer_enabled) == 0 for m in fakes)
    # the input's fake-quant saw exactly the first two batches: the same ranges as an observer fed them
    reference = torch.ao.quantization.HistogramObserver(dtype=torch.quint8, quant_min=0, quant_max=255,
                                                       reduce_range=False)
    reference(x[:32])
    reference(x[32:64])
    scale, zero_point = reference.calculate_qparams()
    assert torch.equal(ptq.activation_post_process_0.scale, scale)
    assert torch.equal(ptq.activation_post_process_0.zero_point, zero_point)
    with pytest.raises(ValueError, match="`batches` is empty"):
        sgs_fx.quantize_ptq(model, [], progress=False)


def test_quantization_bad_input_is_named(tmp_path):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    model = build_model("vgg11_bn", width=0.125).eval()
    observed = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
    observed(x)
    with pytest.raises(UnsupportedQuantizationError, match="observers .* but no fake-quant.*quantize_ptq"):
        sgs_fx.export_onnx(observed, tmp_path / "a.onnx", x)
    with pytest.raises(UnsupportedQuantizationError, match="converted .* export the fake-quant model"):
        sgs_fx.export_onnx(convert_fx(observed), tmp_path / "b.onnx", x)
    qat = sgs_fx.prepare_qat(model, x)
    qat.activation_post_process_1.dtype = torch.qint32
    with pytest.raises(UnsupportedQuantizationError, match="'activation_post_process_1' quantizes to torch.qint32"):
        sgs_fx.export_onnx(qat, tmp_path / "c.onnx", x)
    eager = torch.ao.quantization.prepare_qat(
        nn.Sequential(nn.Conv2d(3, 4, 3)).train().requires_grad_().apply(
            lambda m: setattr(m, "qconfig", torch.ao.quantization.get_default_qat_qconfig("x86"))))
    with pytest.raises(UnsupportedQuantizationError, match="not a torch.fx GraphModule"):
        sgs_fx.export_onnx(eager, tmp_path / "d.onnx", x)
    with pytest.raises(RuntimeError, match="quantize the plain model first"):
        sgs_fx.prepare_qat(sgs_fx.transform(model), x)
    assert not any(tmp_path.iterdir())  # refused before anything was written


# --- models whose forward depends on train/eval, fixed-range activations, zero BatchNorm scales -----------

class _DropPathNet(nn.Module):
    """A residual block with stochastic depth (torchvision's), an SE-style sigmoid gate and a hardsigmoid."""

    def __init__(self, p=0.5):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = StochasticDepth(p, "row")
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.head = nn.Sequential(nn.Hardsigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.drop(self.branch(x))
        return self.head(x * self.gate(x))


def test_stochastic_depth_follows_eval_in_the_quantized_graph_and_export(tmp_path):
    # Traced in train mode, StochasticDepth's `if not self.training` would be baked in: the INT8 model would
    # drop residual branches at inference, and the ONNX file would hold random ops.
    torch.manual_seed(0)
    model = _DropPathNet().eval()
    x = torch.randn(64, 3, 8, 8)
    qat = sgs_fx.prepare_qat(model, x[:2])
    assert any(n.op == "call_module" and type(qat.get_submodule(n.target)).__name__ == "StochasticDepth"
               for n in qat.graph.nodes)
    torch.manual_seed(1)
    a = qat(x)
    torch.manual_seed(2)
    assert not torch.equal(a, qat(x))  # training: rows dropped at random
    sgs_fx.freeze(qat.eval())
    torch.manual_seed(1)
    a = qat(x)
    torch.manual_seed(2)
    assert torch.equal(a, qat(x))  # eval: no drop
    ptq = sgs_fx.quantize_ptq(sgs_fx.transform(model), [x[:32], x[32:]], num_batches=2, progress=False)
    report = sgs_fx.export_onnx(ptq, tmp_path / "sd.onnx", x[:1], check_input=x)
    assert report.passed and not any("Random" in op for op in report.op_counts)


def test_fixed_range_activations_get_their_fixed_fake_quant(recwarn):
    from torch.ao.quantization import FixedQParamsFakeQuantize

    qat = sgs_fx.prepare_qat(_DropPathNet().eval(), torch.randn(2, 3, 8, 8))
    fixed = {n: m for n, m in qat.named_modules() if isinstance(m, FixedQParamsFakeQuantize)}
    assert len(fixed) == 2 and {float(m.scale) for m in fixed.values()} == {1 / 256}  # sigmoid, hardsigmoid
    assert not [w for w in recwarn if "QConfig" in str(w.message)]  # torch warns per op otherwise


def test_modules_reading_training_with_convs_inside_are_logged(caplog):
    class Aux(nn.Module):  # an auxiliary head that only runs in training, like Inception's
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y + 1 if self.training else y

    with caplog.at_level("WARNING", logger="sgs_fx"):
        sgs_fx.prepare_qat(nn.Sequential(Aux(), nn.ReLU()).eval(), torch.randn(2, 3, 8, 8))
    assert "Aux reads self.training in its forward (1 module(s): 0)" in caplog.text


def test_zero_batchnorm_scale_is_refused_before_it_turns_to_nan():
    torch.manual_seed(0)
    model = _DropPathNet().eval()
    nn.init.zeros_(model.branch[1].weight)  # zero-initialised last BN of a residual branch (timm's default)
    with pytest.raises(ValueError, match=r"gamma\) is exactly 0 in 1 fused conv-BN layer\(s\): branch.0 \(8 channels"):
        sgs_fx.prepare_qat(model, torch.randn(2, 3, 8, 8))


class _TwoImages(nn.Module):
    """A classifier of an image pair (e.g. a change detector): each image through its own conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 5)

    def forward(self, before, after):
        return self.head(torch.relu(self.a(before) - self.b(after)).mean((2, 3)))


def test_int8_export_of_a_two_input_model_checks_agreement_on_pairs(tmp_path):
    torch.manual_seed(0)
    before, after = torch.randn(64, 3, 8, 8), torch.randn(64, 3, 8, 8)
    qat = sgs_fx.prepare_qat(_TwoImages(), (before[:2], after[:2]))
    qat(before, after)  # calibrate the observers
    report = sgs_fx.export_onnx(qat, tmp_path / "pair.onnx", (before[:1], after[:1]), check_input=(before, after))
    assert report.quantized and report.passed and report.checked == 64 and report.ort_ops.get("QLinearConv", 0) == 2


def _observer_of(graph_module, placeholder: str):
    """The fake-quant module applied to a graph input."""
    node = next(n for n in graph_module.graph.nodes if n.op == "call_module" and n.args
                and getattr(n.args[0], "target", None) == placeholder and n.args[0].op == "placeholder")
    return graph_module.get_submodule(node.target)


def test_ptq_of_a_two_input_model_calibrates_each_input_on_its_own_data(tmp_path):
    torch.manual_seed(0)
    before, after = torch.randn(64, 3, 8, 8), 3 * torch.randn(64, 3, 8, 8) + 1  # different ranges
    batches = [{"before": before[i:i + 16], "after": after[i:i + 16], "label": torch.zeros(16)}
               for i in range(0, 64, 16)]
    model = sgs_fx.transform(_TwoImages())
    ptq = sgs_fx.quantize_ptq(model, batches, num_batches=2, input_fn=lambda b: (b["before"], b["after"]),
                              progress=False)
    for name, x in (("before", before), ("after", after)):
        reference = torch.ao.quantization.HistogramObserver(dtype=torch.quint8, quant_min=0, quant_max=255,
                                                           reduce_range=False)
        reference(x[:16])
        reference(x[16:32])
        scale, zero_point = reference.calculate_qparams()
        fq = _observer_of(ptq, name)
        assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zero_point), name
    report = sgs_fx.export_onnx(ptq, tmp_path / "pair.onnx", (before[:1], after[:1]), check_input=(before, after))
    assert report.quantized and report.passed and report.ort_ops.get("QLinearConv", 0) == 2
    # onnx_accuracy feeds each batch's inputs in the file's input order: against labels of its own, it equals a
    # hand-run onnxruntime session fed by input name (and the inputs swapped would score differently)
    import onnxruntime as ort

    labels = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    logits = session.run(None, {names[0]: before.numpy(), names[1]: after.numpy()})[0]
    by_hand = float((torch.from_numpy(logits).argmax(1) == labels).float().mean())
    pairs = [((before[:40], after[:40]), labels[:40]), ((before[40:], after[40:]), labels[40:])]
    assert onnx_accuracy(report.path, pairs) == pytest.approx(by_hand, abs=1e-12)
    swapped = session.run(None, {names[0]: after.numpy(), names[1]: before.numpy()})[0]
    assert not (swapped.argmax(1) == logits.argmax(1)).all()
    with pytest.raises(ValueError, match="takes 2 input.*gave 1"):
        onnx_accuracy(report.path, [(before, labels)])


def test_ptq_names_input_fn_when_it_cannot_read_a_batch():
    batch = {"before": torch.randn(4, 3, 8, 8), "after": torch.randn(4, 3, 8, 8)}
    with pytest.raises(TypeError, match="quantize_ptq cannot find the input.*input_fn="):
        sgs_fx.quantize_ptq(_TwoImages(), [batch], progress=False)
    with pytest.raises(TypeError, match="quantize_ptq: input_fn returned a dict.*return a tuple"):
        sgs_fx.quantize_ptq(_TwoImages(), [batch], input_fn=lambda b: b, progress=False)
