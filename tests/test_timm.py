"""Real timm models whose conv subclasses have their own forward (same padding, weight standardisation)."""
import pytest
import torch

import sgs_fx
from helpers import random_scales
from sgs_fx.passes.select import default_filter

timm = pytest.importorskip("timm")


@pytest.mark.slow
@pytest.mark.parametrize("name,cls_name", [
    ("tf_efficientnet_b0", "Conv2dSame"),      # pads dynamically in its own forward
    ("resnetv2_50x1_bit", "StdConv2d"),        # standardises its weight in its own forward
])
def test_conv_subclasses_keep_their_forward(name, cls_name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5).double().eval()
    assert any(type(m).__name__ == cls_name for m in model.modules())
    sgs = sgs_fx.transform(model)
    assert len(sgs_fx.instrumented(sgs)) == sum(default_filter(n, m) for n, m in model.named_modules())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert torch.equal(model(x), sgs(x))
    sgs_fx.set_scales(sgs, random_scales(sgs))
    scales = sgs_fx.get_scales(sgs)
    for m in (model, sgs):
        m.zero_grad()
        m(x).pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()  # applies S (scaling='step'); the weights stay
    plain = dict(model.named_parameters())
    for n, p in sgs.named_parameters():
        conv = n.rsplit(".", 1)[0]
        if n.endswith(".weight") and conv in scales:
            assert (p.grad - scales[conv] * plain[n].grad).abs().max().item() <= 1e-12, n
        else:
            assert torch.equal(p.grad, plain[n].grad), n
    stripped = sgs_fx.strip(sgs)
    assert type(stripped.get_submodule(next(iter(scales)))).__name__ == type(model.get_submodule(next(iter(scales)))).__name__


@pytest.mark.slow
def test_int8_of_a_timm_model_with_drop_path_and_batchnorm_act(tmp_path):
    # timm's BatchNormAct2d and DropPath branch on self.training. Traced in train mode (as QAT is), they
    # would use batch statistics and drop blocks at inference; sgs_fx keeps them as modules.
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=5, drop_path_rate=0.2).eval()
    x = torch.randn(16, 3, 64, 64)
    ptq = sgs_fx.quantize_ptq(sgs_fx.transform(model), [x[:8], x[8:]], num_batches=2, progress=False)
    kept = {type(ptq.get_submodule(n.target)).__name__ for n in ptq.graph.nodes if n.op == "call_module"}
    assert {"BatchNormAct2d", "DropPath"} <= kept
    with torch.no_grad():
        quantized = ptq(x)
        ptq.apply(torch.ao.quantization.disable_fake_quant)
        # fake-quant off: the float model, up to the fused conv-BN's scale-then-unscale rounding
        torch.testing.assert_close(ptq(x), model(x), rtol=1e-4, atol=1e-5)
        ptq.apply(torch.ao.quantization.enable_fake_quant)
        assert torch.equal(ptq(x), quantized)
    report = sgs_fx.export_onnx(ptq, tmp_path / "effnet.onnx", x[:1], check_input=x)
    assert report.passed and not any("Random" in op for op in report.op_counts)
