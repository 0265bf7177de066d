"""SGS inside PyTorch's QAT flow (issue 11, first part): prepare_qat_fx, then transform."""
import copy

import pytest
import torch
from torch.ao.quantization import get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import sgs_fx
from sgs_fx.models import build_model


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
