"""transform / strip copy a model a training forward left holding tensors with autograd history (issue 27, item 2)."""
import collections
import logging
import types

import pytest
import torch
from torch import nn

import sgs_fx
from helpers import random_scales, state_equal


class Head(nn.Module):
    """A deep-supervision head writing into a list its parent shares (MONAI's DynUNet does so)."""

    def __init__(self, heads: list):
        super().__init__()
        self.conv = nn.Conv2d(4, 2, 3, padding=1)
        self.heads = heads

    def forward(self, x):
        if self.training:
            self.heads[0] = self.conv(x)
        return x


class KeepsItsOutputs(nn.Module):
    """Stores tensors with autograd history in its forward: an attribute, and a list a child writes into."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.heads = [torch.zeros(1), torch.zeros(1)]
        self.head = Head(self.heads)
        self.last = None
        self.stats = {}

    def forward(self, x):
        y = self.head(self.stem(x).relu())
        out = self.body(y)
        if self.training:
            self.last = out
            self.heads[1] = out.mean((2, 3))
            self.stats["max"] = out.amax()
        return out


def _train_step(model, x):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def _has_history(model):
    return [t.grad_fn is not None for t in (model.last, *model.heads, model.stats["max"])]


def test_transform_and_strip_copy_a_model_holding_tensors_with_history(caplog):
    x = torch.randn(2, 3, 8, 8)
    model = KeepsItsOutputs()
    _train_step(model, x)
    assert _has_history(model) == [True] * 4  # what copy.deepcopy refuses
    before, last, heads = {k: v.clone() for k, v in model.state_dict().items()}, model.last, model.heads
    with caplog.at_level(logging.INFO, logger="sgs_fx"):
        sgs = sgs_fx.transform(model)
    assert "4 tensor(s) with autograd history" in caplog.text and "KeepsItsOutputs.last" in caplog.text
    # the user's model is untouched: its convs, weights and the very tensors it held, history included
    assert type(model.stem) is nn.Conv2d and state_equal(model.state_dict(), before)
    assert model.last is last and model.heads is heads and _has_history(model) == [True] * 4
    # the copy holds the same values, detached, and the list its child shares is still one list
    assert torch.equal(sgs.last, last) and _has_history(sgs) == [False] * 4
    assert sgs.head.heads is sgs.heads and sgs.heads is not heads

    sgs_fx.set_scales(sgs, random_scales(sgs, dtype=torch.float32))
    _train_step(sgs, x)
    sgs_last = sgs.last
    plain = sgs_fx.strip(sgs)
    assert sgs_fx.instrumented(plain) == {} and list(sgs_fx.instrumented(sgs)) == ["stem", "head.conv", "body"]
    assert sgs.last is sgs_last and _has_history(sgs) == [True] * 4  # the SGS model is untouched too
    assert torch.equal(plain.last, sgs_last) and plain.head.heads is plain.heads
    plain.eval(), sgs.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), sgs(x))


def test_the_copy_shares_storage_as_the_original_does():
    # a tensor with history that views another keeps viewing that tensor's copy, and the copy is the copy's own
    model = KeepsItsOutputs()
    model.heads[0] = torch.zeros(2, 4, requires_grad=True) * 1
    model.heads[1] = model.heads[0][1]
    plain = sgs_fx.strip(model)
    plain.heads[0].fill_(7.0)
    assert torch.equal(plain.heads[1], torch.full((4,), 7.0)) and not model.heads[0].any()


class KeepsInAnObject(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.cache = types.SimpleNamespace(last=None)  # not a container the copy looks into

    def forward(self, x):
        self.cache.last = self.conv(x)
        return self.cache.last


def test_a_tensor_with_history_the_copy_cannot_reach_is_named_with_inplace():
    model = KeepsInAnObject()
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    with pytest.raises(TypeError, match=r"sgs_fx.strip works on a copy.*failed at KeepsInAnObject.cache "
                                        r"\(RuntimeError: Only Tensors created explicitly.*pass inplace=True"):
        sgs_fx.strip(model)
    assert sgs_fx.transform(model, inplace=True) is model and sgs_fx.strip(model, inplace=True) is model


def test_export_onnx_names_its_own_way_out_of_an_uncopyable_attribute(tmp_path):
    model = KeepsInAnObject()
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match=r"sgs_fx.export_onnx works on a copy.*failed at KeepsInAnObject.cache .*"
                                        r"delete that attribute before exporting") as caught:
        sgs_fx.export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert "inplace" not in str(caught.value)  # (export_onnx has no such option)


class KeepsInADeque(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.recent = collections.deque(maxlen=2)
        self.seen = set()

    def forward(self, x):
        self.recent.append(self.conv(x))
        self.seen.add(self.recent[-1] * 1)
        return self.recent[-1]


def test_a_deque_of_tensors_with_history_is_copied_detached():
    model = sgs_fx.transform(KeepsInADeque())
    assert not model.recent and not model.seen  # the trace's Proxies were not left in them
    model(torch.randn(1, 3, 8, 8))
    plain = sgs_fx.strip(model)
    assert plain.recent[0].grad_fn is None and torch.equal(plain.recent[0], model.recent[0])
    assert model.recent[0].grad_fn is not None
