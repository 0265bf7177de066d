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
    plain = dict(model.named_parameters())
    for n, p in sgs.named_parameters():
        conv = n.rsplit(".", 1)[0]
        if n.endswith(".weight") and conv in scales:
            assert (p.grad - scales[conv] * plain[n].grad).abs().max().item() <= 1e-12, n
        else:
            assert torch.equal(p.grad, plain[n].grad), n
    stripped = sgs_fx.strip(sgs)
    assert type(stripped.get_submodule(next(iter(scales)))).__name__ == type(model.get_submodule(next(iter(scales)))).__name__
