"""The pass on graphs (issue 10): conv nodes of fx GraphModules and torch.export modules get SGS on their
weight edge; forward bit-identical, weight gradients exactly S ⊙ G (float64), strip restores the graph."""
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import sgs_fx
from sgs_fx.graph_weight import SGSGraphWeight
from sgs_fx.passes.graph import is_conv_node


class _Inline(fx.Tracer):
    """Traces *into* conv modules: every conv becomes an F.conv call on a get_attr weight."""

    def is_leaf_module(self, m, qualname):
        return False if isinstance(m, nn.modules.conv._ConvNd) else super().is_leaf_module(m, qualname)


def inlined(model):
    return fx.GraphModule(model, _Inline().trace(model))


def exported(model, x):
    return torch.export.export(model, (x,)).module()


def _random_scales(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    scales = {n: torch.rand(tuple(m.kernel_size), dtype=torch.float64, generator=g) + 0.25
              for n, m in sgs_fx.instrumented(model).items()}
    sgs_fx.set_scales(model, scales)
    return sgs_fx.get_scales(model)


def check_graph_model(gm, x, model=None):
    """Every claim of the issue on one graph: identity, names, exact gradients, MI, strip. ``model``: the module the
    graph was made from; its conv modules then give the S every conv node must get (same inputs, same S)."""
    sgs = sgs_fx.transform(gm)
    selected = [n for n in sgs.graph.nodes if is_conv_node(n) and n.args[1].op == "call_module"]
    assert selected and all(isinstance(sgs.get_submodule(n.args[1].target), SGSGraphWeight) for n in selected)
    assert sgs.state_dict().keys() == gm.state_dict().keys()
    assert torch.equal(sgs(x), gm(x))
    scales = _random_scales(sgs)
    owner = {f"sgs.{n.replace('.', '_')}": n for n, _ in gm.named_parameters()}
    for m in (gm, sgs):
        m.zero_grad(set_to_none=True)
        m(x).pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()  # applies S (scaling='step')
    plain = dict(gm.named_parameters())
    scaled_params = {owner[name] for name in scales}
    for name, p in sgs.named_parameters():
        key = f"sgs.{name.replace('.', '_')}"
        expected = scales[key] * plain[name].grad if name in scaled_params else plain[name].grad
        assert torch.equal(p.grad, expected), name
    got = sgs_fx.MIScheduler(sgs, [x], batches=1).calibrate()
    assert set(got) == set(scales) and all(torch.isfinite(s).all() for s in got.values())
    if model is not None:  # the conv modules of the model, calibrated on the same input, give the same S
        by_module = sgs_fx.MIScheduler(sgs_fx.transform(model), [x], batches=1).calibrate()
        for key, s in got.items():
            conv = owner[key].rsplit(".", 1)[0]
            torch.testing.assert_close(s, by_module[conv], rtol=0, atol=1e-12, msg=key)
        assert not all(torch.equal(s, torch.ones_like(s)) for s in got.values())
    stripped = sgs_fx.strip(sgs)
    assert not any(isinstance(m, SGSGraphWeight) for m in stripped.modules())
    assert stripped.state_dict().keys() == gm.state_dict().keys() and torch.equal(stripped(x), gm(x))
    return sgs


def test_exported_resnet18_conv_nodes():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sgs = check_graph_model(exported(model, x), x, model)
    assert len(sgs_fx.instrumented(sgs)) == 17  # every conv whose kernel dims are all > 1
    assert list(sgs_fx.instrumented(sgs))[0] == "sgs.conv1_weight"


def test_inlined_fx_graph_and_onnx_export_of_the_stripped_graph(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = inlined(model)
    assert not any(isinstance(m, nn.Conv2d) for m in gm.modules() if m is not gm)
    sgs = check_graph_model(gm, x, model)
    report = sgs_fx.export_onnx(sgs_fx.strip(sgs).float(), tmp_path / "g.onnx", x[:1].float())
    assert report.passed


def test_mi_of_a_graph_node_equals_the_estimator_on_its_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
    gm = inlined(nn.Sequential(conv))
    sgs = sgs_fx.transform(gm)
    x = torch.randn(4, 3, 10, 10).cumsum(-1)
    got = sgs_fx.MIScheduler(sgs, [x], batches=1).calibrate()
    assert torch.equal(got["sgs.0_weight"], sgs_fx.dependence(x, conv))


class CallsTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(3, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(torch.relu(F.conv2d(x, self.kernel, padding=1)), self.kernel, padding=1)


@pytest.mark.parametrize("scaling", ["step", "hook"])
def test_a_parameter_used_by_two_conv_nodes_gets_one_S(scaling):
    torch.manual_seed(0)
    gm = fx.symbolic_trace(CallsTwice()).double()
    sgs = sgs_fx.transform(gm, scaling=scaling)
    assert list(sgs_fx.instrumented(sgs)) == ["sgs.kernel"]
    s = _random_scales(sgs)["sgs.kernel"]  # set_scales on per-use nodes (it raised KeyError once)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for m in (gm, sgs):
        m.zero_grad()
        m(x).pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()  # applies S (scaling='step')
    # graph nodes scale per use, S ⊙ G1 + S ⊙ G2: S ⊙ (G1 + G2) up to the order of the sum (gradients ~1e4)
    assert (sgs.kernel.grad - s * gm.kernel.grad).abs().max().item() <= 1e-10
    assert (sgs.kernel.grad - gm.kernel.grad).abs().max().item() > 1e-3


class ConvAndCallShareAWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)

    def forward(self, x):
        return F.conv2d(torch.relu(self.conv(x)), self.conv.weight, padding=1)


def test_a_conv_module_and_a_conv_node_sharing_a_weight_each_scale_their_use(caplog):
    # the node scales its use; the conv's hook would scale both uses (the node's twice): the conv goes per use
    torch.manual_seed(0)
    gm = fx.symbolic_trace(ConvAndCallShareAWeight()).double()
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs = sgs_fx.transform(gm)
    assert "conv module(s) conv share their weight with conv nodes" in caplog.text
    scales = _random_scales(sgs)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = gm.conv.weight
    uses = {}

    def use(name):
        v = w.view_as(w)
        v.register_hook(lambda g: uses.__setitem__(name, g))
        return v

    F.conv2d(torch.relu(F.conv2d(x, use("conv"), padding=1)), use("node"), padding=1).pow(2).sum().backward()
    sgs(x).pow(2).sum().backward()
    torch.optim.SGD(sgs.parameters(), lr=0.0).step()  # applies S (scaling='step')
    expected = scales["conv"] * uses["conv"] + scales["sgs.conv_weight"] * uses["node"]
    assert (sgs.conv.weight.grad - expected).abs().max().item() <= 1e-10


class NormedConvAndCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 3, padding=1))

    def forward(self, x):
        return F.conv2d(self.conv(x), self.conv.parametrizations.weight.original1, padding=1)


def test_a_parametrized_conv_sharing_its_original_with_a_node_is_refused():
    gm = fx.symbolic_trace(NormedConvAndCall())
    with pytest.raises(ValueError, match="parametrized conv 'conv' shares its original weight with a conv node"):
        sgs_fx.transform(gm)


class Computed(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Parameter(torch.randn(3, 3, 3, 3))
        self.gate = nn.Parameter(torch.ones(3, 1, 1, 1))
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return self.conv(F.conv2d(x, self.base * self.gate, padding=1))


def test_computed_weights_are_named_in_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs = sgs_fx.transform(fx.symbolic_trace(Computed()))
    assert "1 conv use(s) with no spatial taps of their own" in caplog.text and "computed by mul(base, gate)" in caplog.text
    assert "base is not instrumented: no S on this use" in caplog.text and list(sgs_fx.instrumented(sgs)) == ["conv"]


def test_graph_without_selected_conv_nodes_and_branch_mode_are_clear_errors():
    gm = inlined(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="conv node\\(s\\) but none with a parameter weight is selected"):
        sgs_fx.transform(gm)
    with pytest.raises(ValueError, match="mode='branches'.*graph nodes"):
        sgs_fx.transform(inlined(nn.Sequential(nn.Conv2d(3, 3, 3))), mode="branches", branches="acb")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
                                  "regnet_y_400mf"])
@pytest.mark.parametrize("how", ["exported", "inlined"])
def test_torchvision_graphs(name, how):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=5).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    gm = exported(model, x) if how == "exported" else inlined(model)
    check_graph_model(gm, x, model)


class DeformNet(nn.Module):
    """A detection-head pattern: a plain conv predicts the offsets of a deformable conv."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import DeformConv2d

        self.offsets = nn.Conv2d(3, 2 * 3 * 3, 3, padding=1)
        self.deform = DeformConv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.deform(x, self.offsets(x))


def test_deform_conv_is_instrumented_like_a_conv_of_its_kernel():
    torch.manual_seed(0)
    model = DeformNet().double()
    sgs = sgs_fx.transform(model)
    assert list(sgs_fx.instrumented(sgs)) == ["offsets", "deform"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(sgs(x), model(x))
    scales = _random_scales(sgs)
    for m in (model, sgs):
        m.zero_grad()
        m(x).pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()  # applies S (scaling='step')
    for name, p in sgs.named_parameters():
        conv = name.rsplit(".", 1)[0]
        expected = scales[conv] * dict(model.named_parameters())[name].grad if name.endswith("weight") else \
            dict(model.named_parameters())[name].grad
        assert torch.equal(p.grad, expected), name
    # MI: a conv of the same kernel, dilation and padding (the offsets are ignored)
    got = sgs_fx.MIScheduler(sgs, [x], batches=1).calibrate()
    assert torch.equal(got["deform"], sgs_fx.dependence(x, nn.Conv2d(3, 4, 3, padding=1)))
    stripped = sgs_fx.strip(sgs)
    assert type(stripped.deform).__name__ == "DeformConv2d" and stripped.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="DeformConv2d.*no fixed sub-window branches"):
        sgs_fx.transform(model, mode="branches", branches="acb")


def test_deform_conv_model_exports_to_onnx(tmp_path):
    # ONNX has DeformConv since opset 19; onnxruntime runs it (on the CPU, float32)
    sgs = sgs_fx.transform(DeformNet())
    report = sgs_fx.export_onnx(sgs, tmp_path / "deform.onnx", torch.randn(1, 3, 8, 8))
    assert report.passed and report.op_counts == {"Conv": 1, "DeformConv": 1}


def test_copies_of_an_instrumented_graph_keep_S():
    import copy
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).double()
    gm = inlined(model)
    sgs = sgs_fx.transform(gm)
    scales = _random_scales(sgs)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(sgs, buf)
    buf.seek(0)
    for other in (copy.deepcopy(sgs), torch.load(buf, weights_only=False)):
        for m in (gm, other):
            m.zero_grad()
            m(x).pow(2).sum().backward()
            torch.optim.SGD(m.parameters(), lr=0.0).step()  # applies S (scaling='step')
        for name, p in other.named_parameters():
            key = f"sgs.{name.replace('.', '_')}"
            expected = scales[key] * gm.get_parameter(name).grad if key in scales else gm.get_parameter(name).grad
            assert torch.equal(p.grad, expected), name
