"""Conv discovery when torch.fx cannot trace the model (DESIGN.md: "Tracing can fail"; passes/discover.py)."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import sgs_fx
from helpers import random_scales
from sgs_fx.passes.select import default_filter


class Untraceable(nn.Module):
    """Data-dependent control flow (fx cannot trace it), a BatchNorm, a random draw, and an F.conv2d call with a
    Parameter of its own (strided, padded, dilated, grouped)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.kernel = nn.Parameter(torch.randn(4, 2, 3, 3))
        self.seen = []  # (training, grad enabled) of every real forward

    def forward(self, x):
        if isinstance(x, torch.Tensor):  # (not fx's attempt, with a Proxy)
            self.seen.append((self.training, torch.is_grad_enabled()))
        h = self.bn(self.conv(x)) + 0 * torch.randn(1, dtype=x.dtype)
        if h.sum() > 0:  # data-dependent
            h = 2 * h
        return F.conv2d(torch.relu(h), self.kernel, stride=2, padding=2, dilation=2, groups=2)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_example_inputs_find_the_F_conv_call_of_an_untraceable_model(caplog):
    torch.manual_seed(0)
    model = Untraceable().double()
    with caplog.at_level(logging.INFO, logger="sgs_fx"):
        sgs = sgs_fx.transform(model, example_inputs=(torch.randn(2, 3, 9, 9),))  # float input: cast to the model's
    assert not _warnings(caplog)
    assert "could not trace Untraceable" in caplog.text and "by the example forward: kernel" in caplog.text
    assert "passed no conv" not in caplog.text  # the kernel it saw is not listed as unseen
    assert "not reached" not in caplog.text  # (an F.conv call's S holder is no conv module the run could reach)
    assert list(sgs_fx.instrumented(sgs)) == ["conv", "sgs_kernel"]
    holder = sgs.sgs_kernel
    assert (holder.stride, holder.padding, holder.dilation, holder.groups) == ((2, 2), (2, 2), (2, 2), 2)
    assert sgs.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    scales = random_scales(sgs)
    sgs_fx.set_scales(sgs, scales)
    scales = sgs_fx.get_scales(sgs)
    outs = []
    for m in (model, sgs):
        torch.manual_seed(1)
        outs.append(m(x))
        m.zero_grad()
        outs[-1].pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()  # applies S (scaling='step')
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(sgs.kernel.grad, scales["sgs_kernel"] * model.kernel.grad)
    assert torch.equal(sgs.conv.weight.grad, scales["conv"] * model.conv.weight.grad)


def test_without_example_inputs_the_loose_kernel_is_named_with_the_fix(caplog):
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs = sgs_fx.transform(Untraceable())
    (warning,) = _warnings(caplog)
    assert "could not trace Untraceable" in warning and "(kernel)" in warning and "example_inputs=" in warning
    assert list(sgs_fx.instrumented(sgs)) == ["conv"]


def test_the_observation_forward_leaves_no_trace():
    model = Untraceable().train()
    model.bn.eval()  # a submodule's own mode is kept too
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 9, 9)
    rng = torch.get_rng_state()
    sgs_fx.transform(model, example_inputs=(x,), inplace=True)
    assert model.seen == [(False, False)]  # one forward, in eval mode, under no_grad
    assert model.training and model.conv.training and not model.bn.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in (model.conv, model.bn))  # its hooks removed


class TrainOnly(Untraceable):
    """An F.conv2d call made only in training mode: the example forward (eval mode) cannot see it."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Parameter(torch.randn(2, 2, 3, 3))

    def forward(self, x):
        y = super().forward(x)
        return F.conv2d(y, self.aux, padding=1) if self.training else y


def test_a_call_made_only_in_training_is_named_in_the_info_line(caplog):
    with caplog.at_level(logging.INFO, logger="sgs_fx"):
        sgs = sgs_fx.transform(TrainOnly(), example_inputs=(torch.randn(1, 3, 9, 9),))
    assert not _warnings(caplog) and list(sgs_fx.instrumented(sgs)) == ["conv", "sgs_kernel"]
    assert "it passed no conv these Parameters with a kernel's shape: aux" in caplog.text


def test_a_failing_example_forward_says_so():
    with pytest.raises(RuntimeError, match=r"could not trace Untraceable, and its forward on example_inputs .* failed"):
        sgs_fx.transform(Untraceable(), example_inputs=(torch.randn(2, 5, 9, 9),))  # 5 channels, the conv takes 3


class NothingLoose(nn.Module):
    """Untraceable; every Parameter with a kernel's shape belongs to a conv module (a transposed one, a
    parametrized one); the others cannot be an F.conv kernel (2-D, lazy)."""

    def __init__(self):
        super().__init__()
        self.conv = parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.fc = nn.Linear(4, 4)
        self.lazy = nn.LazyLinear(2)

    def forward(self, x):
        x = self.conv(x)
        for row in x:  # iterating a tensor: fx cannot trace it
            x = x + row
        return self.lazy(self.fc(self.up(x).mean((2, 3))))


def test_nothing_can_be_missed_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs = sgs_fx.transform(NothingLoose())
    assert not _warnings(caplog) and list(sgs_fx.instrumented(sgs)) == ["conv"]


def test_a_kernel_already_instrumented_is_not_loose_on_a_second_transform(caplog):
    once = sgs_fx.transform(Untraceable(), example_inputs=(torch.randn(1, 3, 9, 9),))
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        twice = sgs_fx.transform(once)
    assert not _warnings(caplog) and list(sgs_fx.instrumented(twice)) == ["conv", "sgs_kernel"]


def test_a_torchvision_detection_model_has_nothing_loose(caplog):
    from torchvision.models import detection

    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    with caplog.at_level(logging.INFO, logger="sgs_fx"):
        sgs = sgs_fx.transform(model)
    assert "could not trace FasterRCNN" in caplog.text and not _warnings(caplog)
    assert len(sgs_fx.instrumented(sgs)) == sum(default_filter(n, m) for n, m in model.named_modules())


class OtherConvFunctions(nn.Module):
    """Convs sgs_fx does not instrument: torch.convolution on a Parameter, and a conv subclass with a second kernel
    its own forward convolves with."""

    class TwoKernels(nn.Conv2d):
        def __init__(self):
            super().__init__(3, 3, 3, padding=1)
            self.extra = nn.Parameter(torch.randn(3, 3, 3, 3))

        def forward(self, x):
            return super().forward(x) + F.conv2d(x, self.extra, padding=1)

    def __init__(self, branch: bool):
        super().__init__()
        self.branch = branch
        self.two = self.TwoKernels()
        self.raw = nn.Parameter(torch.randn(3, 3, 3, 3))

    def forward(self, x):
        if self.branch and x.sum() > -1e9:  # untraceable
            x = x * 1
        return torch.convolution(self.two(x), self.raw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)


@pytest.mark.parametrize("branch, example", [(False, False), (True, True), (True, False)],
                         ids=["traced", "observed", "untraced"])
def test_convs_sgs_fx_does_not_instrument_are_named(caplog, branch, example):
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.INFO, logger="sgs_fx"):
        sgs = sgs_fx.transform(OtherConvFunctions(branch), example_inputs=(x,) if example else None)
    assert list(sgs_fx.instrumented(sgs)) == ["two"]
    said = _warnings(caplog)
    if example:  # seen: each call, with its function
        assert len(said) == 1
        assert "two.extra in torch.conv2d inside a conv module's forward, raw in torch.convolution" in said[0]
        assert "passed no conv" not in caplog.text  # (not told that raw went to no conv)
    elif branch:  # nothing run: every kernel-shaped Parameter that is no conv module's own kernel
        assert len(said) == 1 and "are no conv module's own kernel (raw, two.extra)" in said[0]
    else:  # the trace sees torch.convolution; the conv subclass is a leaf, its second kernel named as a maybe
        assert len(said) == 2
        assert "beside their weight (two.extra)" in said[0] and "raw in torch.convolution." in said[1]
