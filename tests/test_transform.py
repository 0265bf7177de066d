"""The core pass: transform / instrumented / get_scales / set_scales / strip (DESIGN.md, spec §1)."""
import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgs_fx
from helpers import DEFAULT_SELECTED, Dynamic, TinyNet, random_scales, state_equal
from sgs_fx.conv import SGSConv2d


def test_forward_identical_and_names_kept():
    model = TinyNet().eval()
    before = copy.deepcopy(model.state_dict())
    sgs = sgs_fx.transform(model, scales=None)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), sgs(x))
    assert list(sgs_fx.instrumented(sgs)) == DEFAULT_SELECTED  # forward order
    assert sgs.state_dict().keys() == model.state_dict().keys()
    assert type(sgs) is TinyNet and isinstance(sgs.same, nn.Conv2d)
    # the input model is untouched
    assert state_equal(model.state_dict(), before)
    assert not any(hasattr(m, "sgs_scale") for m in model.modules())


def test_inplace_keeps_parameter_objects():
    model = TinyNet()
    params = {n: p for n, p in model.named_parameters()}
    out = sgs_fx.transform(model, inplace=True)
    assert out is model
    assert all(p is params[n] for n, p in out.named_parameters())
    assert type(model.stem) is SGSConv2d


def test_state_dict_loads_strict_both_ways():
    plain, sgs = TinyNet(), sgs_fx.transform(TinyNet())
    sgs.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(sgs.state_dict(), strict=True)
    stripped = sgs_fx.strip(sgs)
    assert state_equal(stripped.state_dict(), plain.state_dict())
    assert not any(hasattr(m, "sgs_scale") for m in stripped.modules())
    assert type(stripped.stem) is nn.Conv2d and type(stripped.same).__name__ == "Conv2dSame"


def test_filter_fn_replaces_default():
    sgs = sgs_fx.transform(TinyNet(), filter_fn=lambda n, m: n in ("row", "point"))
    scales = sgs_fx.get_scales(sgs)
    assert list(scales) == ["point", "row"]
    assert scales["row"].shape == (1, 3) and scales["point"].shape == (1, 1)


def test_get_set_scales_validate_and_renormalise():
    sgs = sgs_fx.transform(TinyNet())
    sgs_fx.set_scales(sgs, {"stem": torch.full((3, 3), 2.0)})
    assert torch.equal(sgs_fx.get_scales(sgs)["stem"], torch.ones(3, 3))
    s = torch.arange(1.0, 16.0).reshape(3, 5)
    sgs_fx.set_scales(sgs, {"grouped": s})
    assert torch.allclose(sgs_fx.get_scales(sgs)["grouped"], s / s.mean())
    with pytest.raises(ValueError, match=r"'stem'.*shape \(2, 2\).*\(3, 3\)"):
        sgs_fx.set_scales(sgs, {"stem": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="'stem'.*strictly positive"):
        sgs_fx.set_scales(sgs, {"stem": torch.zeros(3, 3)})
    bad = torch.ones(3, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'stem'.*non-finite"):
        sgs_fx.set_scales(sgs, {"stem": bad})
    with pytest.raises(ValueError, match="no instrumented conv named 'nope'"):
        sgs_fx.set_scales(sgs, {"nope": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="'point'"):  # 1x1 is not selected by default
        sgs_fx.set_scales(sgs, {"point": torch.ones(1, 1)})
    before = sgs_fx.get_scales(sgs)["stem"]
    with pytest.raises(ValueError, match="'even'"):  # all or nothing: stem is not written either
        sgs_fx.set_scales(sgs, {"stem": torch.rand(3, 3) + 1, "even": -torch.ones(2, 2)})
    assert torch.equal(sgs_fx.get_scales(sgs)["stem"], before)
    branched = sgs_fx.transform(TinyNet(), mode="branches", filter_fn=lambda n, m: n == "stem")
    with pytest.raises(ValueError, match="'stem' is a branched block"):
        sgs_fx.set_scales(branched, {"stem": torch.ones(3, 3)})


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        sgs_fx.transform(lambda x: x)
    with pytest.raises(ValueError, match="Sequential has no conv layers"):
        sgs_fx.transform(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="none is selected"):
        sgs_fx.transform(nn.Sequential(nn.Conv2d(2, 2, 1)))
    with pytest.raises(ValueError, match="unknown mode"):
        sgs_fx.transform(TinyNet(), mode="magic")


def test_double_transform_is_idempotent_and_strip_of_plain_is_noop():
    once = sgs_fx.transform(TinyNet())
    sgs_fx.set_scales(once, {"stem": torch.rand(3, 3) + 0.5})
    twice = sgs_fx.transform(once)
    assert list(sgs_fx.instrumented(twice)) == DEFAULT_SELECTED
    assert torch.equal(sgs_fx.get_scales(twice)["stem"], sgs_fx.get_scales(once)["stem"])
    plain = TinyNet()
    stripped = sgs_fx.strip(plain)
    assert stripped is not plain and state_equal(stripped.state_dict(), plain.state_dict())
    assert sgs_fx.strip(plain, inplace=True) is plain


def test_trace_failure_falls_back_to_the_module_walk(caplog):
    # nothing can be missed (every conv-shaped Parameter is a conv module's): no warning, the reason is logged
    with caplog.at_level(logging.INFO, logger="sgs_fx"):
        sgs = sgs_fx.transform(Dynamic(), example_inputs=(torch.ones(1, 3, 8, 8),))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "could not trace Dynamic (TraceError" in caplog.text
    assert list(sgs_fx.instrumented(sgs)) == ["a", "b", "unused"]  # never-called conv still instrumented
    assert "not reached by the example run: unused" in caplog.text


class Functional(nn.Module):
    """A conv module, and a parameter used by two F.conv2d calls (one S for it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.w = nn.Parameter(torch.randn(3, 3, 3, 3))

    def forward(self, x):
        h = F.conv2d(self.conv(x), self.w, padding=1)
        return F.conv2d(torch.relu(h), self.w, padding=1)


def test_functional_conv_of_an_ordinary_module_is_instrumented():
    torch.manual_seed(0)
    model = Functional().double()
    sgs = sgs_fx.transform(model)
    assert list(sgs_fx.instrumented(sgs)) == ["conv", "sgs_w"] and type(sgs) is Functional
    assert sgs.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert torch.equal(sgs(x), model(x))
    scales = random_scales(sgs)
    sgs_fx.set_scales(sgs, scales)
    scales = sgs_fx.get_scales(sgs)
    for copy_of in (lambda m: m, copy.deepcopy):
        m = copy_of(sgs)
        for mm in (model, m):
            mm.zero_grad()
            mm(x).pow(2).sum().backward()
            torch.optim.SGD(mm.parameters(), lr=0.0).step()  # applies S (scaling='step')
        assert torch.equal(m.w.grad, scales["sgs_w"] * model.w.grad)  # S ⊙ (G1 + G2)
        assert torch.equal(m.conv.weight.grad, scales["conv"] * model.conv.weight.grad)
    # the MI pools the inputs of both calls: equal to the estimator on their concatenation
    got = sgs_fx.MIScheduler(sgs, [x.float()], batches=1).calibrate()
    with torch.no_grad():
        h = F.conv2d(sgs.conv(x), sgs.w, padding=1)
    both = torch.cat([sgs.conv(x), torch.relu(h)])
    assert torch.allclose(got["sgs_w"], sgs_fx.dependence(both, nn.Conv2d(3, 3, 3, padding=1)), atol=1e-12, rtol=0)
    stripped = sgs_fx.strip(sgs)
    assert [n for n, _ in stripped.named_modules()] == ["", "conv"] and not stripped._forward_pre_hooks
    stripped.zero_grad()
    stripped(x).pow(2).sum().backward()
    torch.optim.SGD(stripped.parameters(), lr=0.0).step()  # applies S (scaling='step')
    assert torch.equal(stripped.w.grad, model.w.grad)


def test_functional_weight_replaced_by_load_state_dict_assign_keeps_S():
    torch.manual_seed(0)
    model = Functional().double()
    sgs = sgs_fx.transform(model)
    s = torch.rand(3, 3, dtype=torch.float64) + 0.5
    sgs_fx.set_scales(sgs, {"sgs_w": s})
    sgs.load_state_dict({k: v.clone() for k, v in sgs.state_dict().items()}, assign=True)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    for m in (model, sgs):
        m.zero_grad()
        m(x).pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()  # applies S (scaling='step')
    assert torch.equal(sgs.w.grad, (s / s.mean()) * model.w.grad)


class SharesConvWeight(nn.Module):
    """An F.conv2d call with a conv module's own weight Parameter, under a second name."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.k = self.conv.weight

    def forward(self, x):
        return F.conv2d(torch.relu(self.conv(x)), self.k, padding=1)


def test_functional_call_with_a_conv_weight_shares_the_conv_S(caplog):
    # the call cannot be scaled per use (no module runs it): one S per parameter, S ⊙ (G_conv + G_call).
    # Before, both became "per use" and the call's gradient was not scaled at all.
    torch.manual_seed(0)
    model = SharesConvWeight().double()
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs = sgs_fx.transform(model)
    assert list(sgs_fx.instrumented(sgs)) == ["conv"] and "k (S of conv)" in caplog.text
    sgs_fx.set_scales(sgs, random_scales(sgs))
    s = sgs_fx.get_scales(sgs)["conv"]
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    for m in (model, sgs):
        m.zero_grad()
        m(x).pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()  # applies S (scaling='step')
    assert torch.equal(sgs.conv.weight.grad, s * model.conv.weight.grad)
    # tied after transform, the call's own S and the conv's cannot both hold: refused, with what to do
    functional = sgs_fx.transform(Functional())
    with pytest.raises(RuntimeError, match="SGSConv2d and an instrumented F.conv call now share one weight.*before"):
        functional.conv.weight = functional.w


class HoldsAGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.stream = (i for i in range(3))  # deepcopy cannot copy a generator

    def forward(self, x):
        return self.conv(x)


def test_a_model_deepcopy_cannot_copy_is_told_what_to_do():
    with pytest.raises(TypeError, match="sgs_fx.transform works on a copy.*failed at HoldsAGenerator.stream .*generator.*inplace=True"):
        sgs_fx.transform(HoldsAGenerator())
    model = HoldsAGenerator()
    assert sgs_fx.transform(model, inplace=True) is model and list(sgs_fx.instrumented(model)) == ["conv"]
    with pytest.raises(TypeError, match="sgs_fx.strip works on a copy"):
        sgs_fx.strip(model)


def test_wrapped_model_is_refused():
    with pytest.raises(TypeError, match="transform the plain model first"):
        sgs_fx.transform(nn.DataParallel(TinyNet()))


def test_pickle_and_deepcopy_roundtrip():
    sgs = sgs_fx.transform(TinyNet())
    sgs_fx.set_scales(sgs, random_scales(sgs))
    buf = io.BytesIO()
    torch.save(sgs, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for a, b in ((sgs, loaded), (sgs, copy.deepcopy(sgs))):
        assert type(b.same) is type(a.same)
        assert all(torch.equal(a_, b_) for a_, b_ in zip(sgs_fx.get_scales(a).values(), sgs_fx.get_scales(b).values()))


@pytest.mark.parametrize("copied", [False, True])
def test_adam_warns_once(caplog, copied):
    sgs = sgs_fx.transform(TinyNet())
    sgs = copy.deepcopy(sgs) if copied else sgs
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        for opt in (torch.optim.SGD(sgs.parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(sgs.parameters())):
            for _ in range(2):
                opt.zero_grad()
                sgs(x).sum().backward()
                opt.step()
    assert caplog.text.count("Adam steps SGS-instrumented weights") == 1
    assert "SGD steps" not in caplog.text


class OnlyFunctionalConvs(nn.Module):
    """No conv module at all: its convs are F.conv2d calls with its own kernels."""

    def __init__(self, k=3):
        super().__init__()
        self.k1 = nn.Parameter(torch.randn(4, 3, k, k, dtype=torch.float64))
        self.k2 = nn.Parameter(torch.randn(2, 4, k, k, dtype=torch.float64))

    def forward(self, x):
        return F.conv2d(torch.relu(F.conv2d(x, self.k1, padding=1)), self.k2)


def test_a_model_whose_only_convs_are_F_conv_calls_is_instrumented():
    model = OnlyFunctionalConvs()
    sgs = sgs_fx.transform(model)
    assert set(sgs_fx.instrumented(sgs)) == {"sgs_k1", "sgs_k2"}
    scales = random_scales(sgs)
    sgs_fx.set_scales(sgs, scales)
    scales = sgs_fx.get_scales(sgs)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    for m in (model, sgs):
        m.zero_grad()
        m(x).pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()
    assert torch.equal(sgs.k1.grad, scales["sgs_k1"] * model.k1.grad)
    assert torch.equal(sgs.k2.grad, scales["sgs_k2"] * model.k2.grad)
    with pytest.raises(ValueError, match=r"makes 2 F.conv call\(s\) \(k1, k2\) but none is selected"):
        sgs_fx.transform(OnlyFunctionalConvs(k=1), filter_fn=None)


class ConvWeightUsedTransposed(nn.Module):
    """A conv module whose weight a second, functional conv uses transposed (a computed kernel)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return F.conv2d(torch.relu(self.conv(x)), self.conv.weight.transpose(2, 3), padding=1)


class FlippedKernel(nn.Module):
    """A conv module, and an F.conv2d call whose kernel is a flipped parameter of the module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.k = nn.Parameter(torch.randn(3, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(torch.relu(self.conv(x)), self.k.flip(-1), padding=1)


@pytest.mark.parametrize("route", ["module", "fx_graph"])
@pytest.mark.parametrize("scaling", ["step", "hook"])
def test_a_computed_kernel_gets_one_semantic_on_every_route(route, scaling, caplog):
    # one S per Parameter: a conv weight also used transposed is scaled as a whole (S ⊙ (G1 + G2)); a computed
    # kernel of a parameter no conv owns has no S. Both routes say exactly that.
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    for make, param, says, scaled_as_a_whole in (
            (ConvWeightUsedTransposed, "conv.weight", "conv.weight is scaled as a whole by the S of conv", True),
            (FlippedKernel, "k", "k is not instrumented: no S on this use", False)):
        torch.manual_seed(0)
        plain = make().double()
        source = torch.fx.symbolic_trace(plain) if route == "fx_graph" else plain
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sgs_fx"):
            sgs = sgs_fx.transform(source, scaling=scaling)
        assert "1 conv use(s) with no spatial taps of their own" in caplog.text and says in caplog.text
        assert "transpose(conv_weight" in caplog.text or "flip(k" in caplog.text
        sgs_fx.set_scales(sgs, {"conv": torch.rand(3, 3, dtype=torch.float64) + 0.5})
        s = sgs_fx.get_scales(sgs)["conv"]
        grads = []
        for m in (plain, sgs):
            m.zero_grad()
            m(x).pow(2).sum().backward()
            torch.optim.SGD(m.parameters(), lr=0.0).step()
            grads.append(dict(m.named_parameters())[param].grad)
        assert torch.equal(grads[1], s * grads[0] if scaled_as_a_whole else grads[0])


class TiedTransposed(nn.Module):
    """An autoencoder whose decoder is a ConvTranspose2d tied to the encoder conv's weight."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = nn.ConvTranspose2d(4, 3, 3, padding=1)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


class FunctionalTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.conv_transpose2d(torch.relu(self.enc(x)), self.enc.weight, padding=1)


@pytest.mark.parametrize("make", [TiedTransposed, FunctionalTransposed], ids=["module", "functional"])
def test_a_transposed_use_of_a_conv_weight_is_named_and_scaled_with_it(make, caplog):
    torch.manual_seed(0)
    plain = make().double()
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs = sgs_fx.transform(plain)
    assert "enc.weight is scaled as a whole by the S of enc, so this use's gradient is too" in caplog.text
    sgs_fx.set_scales(sgs, {"enc": torch.rand(3, 3, dtype=torch.float64) + 0.5})
    s = sgs_fx.get_scales(sgs)["enc"]
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    for m in (plain, sgs):
        m.zero_grad()
        m(x).pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()
    assert torch.equal(sgs.enc.weight.grad, s * plain.enc.weight.grad)


def test_legacy_spectral_norm_and_a_second_scaling_are_refused():
    legacy = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="deprecated torch.nn.utils.spectral_norm.*parametrizations.spectral_norm"):
        sgs_fx.transform(legacy)
    with pytest.raises(ValueError, match="deprecated torch.nn.utils.spectral_norm"):
        sgs_fx.transform(legacy, inplace=True)
    assert type(legacy[0]) is nn.Conv2d  # refused before anything changed
    sgs = sgs_fx.transform(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match=r"already instrumented with scaling='step'; call sgs_fx.strip"):
        sgs_fx.transform(sgs, scaling="hook")
    assert sgs_fx.transform(sgs, inplace=True) is sgs  # the same scaling again: idempotent
