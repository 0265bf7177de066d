"""Cases that used to be silently wrong (issue 12): each ends correct, or refused with a clear error."""
import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import sgs_fx
from helpers import Conv2dSame, TiedConvs
from sgs_fx.ownership import is_sgs_conv

X = torch.randn(2, 3, 8, 8, dtype=torch.float64)


def _loss_grads(model, x=X):
    """The gradients an optimizer step uses (SGD at lr 0: the weights stay as they are)."""
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_lazy_conv_stays_instrumented_after_its_first_forward():
    torch.manual_seed(0)
    sgs = sgs_fx.transform(nn.Sequential(nn.LazyConv2d(4, 3, padding=1)).double())
    s = torch.rand(3, 3, dtype=torch.float64) + 0.5
    sgs_fx.set_scales(sgs, {"0": s})
    sgs(X)  # materialises the weight; torch turns the module into its `cls_to_become`
    assert is_sgs_conv(sgs[0]) and list(sgs_fx.instrumented(sgs)) == ["0"]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).double()
    plain.load_state_dict(sgs.state_dict())
    got, expected = _loss_grads(sgs), _loss_grads(plain)
    assert torch.equal(got["0.weight"], (s / s.mean()) * expected["0.weight"])
    assert type(sgs_fx.strip(sgs)[0]) is nn.Conv2d


def test_meta_device_then_to_empty_gives_the_scales_that_were_set():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    sgs = sgs_fx.transform(model)
    s = torch.rand(3, 3, dtype=torch.float64) + 0.5
    sgs_fx.set_scales(sgs, {"0": s})
    sgs.to_empty(device="cpu")
    scales = sgs_fx.get_scales(sgs)
    assert torch.equal(scales["0"], (s / s.mean()).float())
    assert torch.equal(scales["1"], torch.ones(3, 3))


def test_bf16_model_keeps_S_in_float32():
    sgs = sgs_fx.transform(nn.Sequential(nn.Conv2d(3, 4, 3)).to(torch.bfloat16))
    s = torch.rand(3, 3, dtype=torch.float64) + 0.5
    sgs_fx.set_scales(sgs, {"0": s})
    got = sgs_fx.get_scales(sgs)["0"]
    assert got.dtype == torch.float32 and torch.equal(got, (s / s.mean()).float())
    sgs.half()  # a dtype change must not round S either
    assert torch.equal(sgs_fx.get_scales(sgs)["0"], (s / s.mean()).float())
    x = torch.randn(4, 3, 6, 6, dtype=torch.float16)
    plain = sgs_fx.strip(sgs)
    for m in (sgs, plain):
        m(x).float().pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()
    # S ⊙ G rounded once to fp16, as the official multiply of .grad does (not G times S rounded to fp16)
    expected = (sgs_fx.get_scales(sgs)["0"] * plain[0].weight.grad.float()).half()
    assert sgs[0].weight.grad.dtype == torch.float16 and torch.equal(sgs[0].weight.grad, expected)


class SharedChild(nn.Module):
    """One conv registered under two parents (called twice)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.again = self.conv

    def forward(self, x):
        return self.again(torch.relu(self.conv(x)))


def test_conv_under_two_parents_stays_one_module_in_branch_mode_and_strip():
    torch.manual_seed(0)
    model = SharedChild().double()
    branched = sgs_fx.transform(model, mode="branches", branches="acb")
    assert branched.conv is branched.again
    stripped = sgs_fx.strip(branched)
    assert stripped.conv is stripped.again and type(stripped.conv) is nn.Conv2d
    assert torch.allclose(stripped(X), model(X), atol=1e-12, rtol=0)
    sgs = sgs_fx.transform(model)
    assert sgs.conv is sgs.again and list(sgs_fx.instrumented(sgs)) == ["conv"]


def test_tied_weights_are_refused_by_branch_mode_and_verify():
    with pytest.raises(ValueError, match="'a' and 'b' share one weight Parameter.*filter_fn"):
        sgs_fx.transform(TiedConvs(), mode="branches", branches="acb")
    with pytest.raises(ValueError, match="share one weight Parameter"):
        sgs_fx.verify(TiedConvs(), [torch.randn(2, 3, 8, 8)], steps=1)
    stripped = sgs_fx.strip(sgs_fx.transform(TiedConvs()))
    assert stripped.a.weight is stripped.b.weight  # SGS mode and strip keep the tie


def _spectral():
    torch.manual_seed(0)
    return nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.ReLU(),
                         nn.Conv2d(4, 2, 3)).double()


def test_spectral_norm_transform_changes_nothing_and_scales_the_original():
    model = _spectral()
    reference = copy.deepcopy(model)
    u0 = model[0].parametrizations.weight[0]._u.clone()
    sgs = sgs_fx.transform(model)
    for m in (model, sgs):  # no power iteration ran during transform, on the input or on the copy
        assert torch.equal(m[0].parametrizations.weight[0]._u, u0)
    assert torch.equal(sgs(X), reference(X))
    s = torch.rand(3, 3, dtype=torch.float64) + 0.5
    sgs_fx.set_scales(sgs, {"0": s})
    plain, copied = copy.deepcopy(reference), copy.deepcopy(sgs)  # same power-iteration state as sgs
    got, expected = _loss_grads(sgs), _loss_grads(plain)
    name = "0.parametrizations.weight.original"
    assert torch.equal(got[name], (s / s.mean()) * expected[name])
    assert torch.equal(got["0.bias"], expected["0.bias"])
    assert torch.equal(_loss_grads(copied)[name], got[name])  # a copy has a hook of its own
    assert sgs_fx.strip(sgs)[0].parametrizations.weight.original.shape == (4, 3, 3, 3)


def test_weight_norm_scales_the_direction_and_not_the_magnitude(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))).double()
    sgs = sgs_fx.transform(model)
    s = torch.rand(3, 3, dtype=torch.float64) + 0.5
    sgs_fx.set_scales(sgs, {"0": s})
    got, expected = _loss_grads(sgs), _loss_grads(model)
    assert torch.equal(got["0.parametrizations.weight.original1"],
                       (s / s.mean()) * expected["0.parametrizations.weight.original1"])
    assert torch.equal(got["0.parametrizations.weight.original0"], expected["0.parametrizations.weight.original0"])
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        torch.optim.Adam(sgs.parameters()).step()
    assert "Adam steps SGS-instrumented weights" in caplog.text


def test_tied_parametrized_weights_are_refused():
    a, b = (parametrizations.weight_norm(nn.Conv2d(3, 3, 3, padding=1)) for _ in range(2))
    b.parametrizations.weight.original1 = a.parametrizations.weight.original1  # one direction v, two convs
    with pytest.raises(ValueError, match="convs 0, 1 share one parametrized weight.*filter_fn"):
        sgs_fx.transform(nn.Sequential(a, b))
    # tied after transform: the next forward finds the shared original and refuses (per-use scaling would
    # not reach into torch's parametrization, and S would be lost)
    sgs = sgs_fx.transform(nn.Sequential(*(parametrizations.weight_norm(nn.Conv2d(3, 3, 3, padding=1))
                                           for _ in range(2))))
    sgs[1].parametrizations.weight.original1 = sgs[0].parametrizations.weight.original1
    with pytest.raises(RuntimeError, match="SGSParametrizedConv2d and the parametrized SGSParametrizedConv2d now share"):
        sgs(torch.randn(1, 3, 8, 8))


def _pruned_pair(conv_cls, prune_first: bool, scaling: str):
    """(SGS model, plain model) with conv 0 pruned by torch.nn.utils.prune, before or after transform."""
    import torch.nn.utils.prune as prune

    def make():
        torch.manual_seed(0)
        return nn.Sequential(conv_cls(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).double()

    plain, model = make(), make()
    prune.l1_unstructured(plain[0], "weight", amount=0.4)
    if prune_first:  # a pruned module cannot be deep-copied (torch): transform it in place
        prune.l1_unstructured(model[0], "weight", amount=0.4)
        sgs = sgs_fx.transform(model, inplace=True, scaling=scaling)
    else:
        sgs = sgs_fx.transform(model, scaling=scaling)
        prune.l1_unstructured(sgs[0], "weight", amount=0.4)
    return sgs, plain


@pytest.mark.parametrize("scaling", ["step", "hook"])
@pytest.mark.parametrize("prune_first", [False, True], ids=["pruned_after", "pruned_before"])
@pytest.mark.parametrize("conv_cls", [nn.Conv2d, Conv2dSame], ids=["torch_forward", "own_forward"])
def test_pruned_conv_scales_weight_orig(conv_cls, prune_first, scaling):
    # the weight is weight_orig * mask, recomputed by prune's pre-hook at every forward; S lost before
    import torch.nn.utils.prune as prune

    sgs, plain = _pruned_pair(conv_cls, prune_first, scaling)
    sgs_fx.set_scales(sgs, {"0": torch.rand(3, 3, dtype=torch.float64) + 0.5})
    s = sgs_fx.get_scales(sgs)["0"]
    sgs(X)
    hooked = sgs[0].__dict__["_sgs_hook"]
    for _ in range(2):  # the pre-hook sets `weight` at every forward: one hook, never re-registered
        got, expected = _loss_grads(sgs), _loss_grads(plain)
        assert sgs[0].__dict__["_sgs_hook"] is hooked
        assert torch.equal(got["0.weight_orig"], s * expected["0.weight_orig"])
        assert torch.equal(got["2.weight"], sgs_fx.get_scales(sgs)["2"] * expected["2.weight"])
    prune.remove(sgs[0], "weight")  # the mask is made permanent: the Parameter is `weight` again
    prune.remove(plain[0], "weight")
    assert torch.equal(_loss_grads(sgs)["0.weight"], s * _loss_grads(plain)["0.weight"])


def test_pruned_conv_is_refused_by_branch_mode():
    import torch.nn.utils.prune as prune

    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.4)
    with pytest.raises(ValueError, match="'0' is pruned.*prune.remove"):
        sgs_fx.transform(model, mode="branches", inplace=True)


def test_parametrized_and_old_weight_norm_refusals():
    with pytest.raises(ValueError, match="'0' has a parametrized weight.*cannot be split"):
        sgs_fx.transform(_spectral(), mode="branches", branches="acb")
    old = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="'0' uses the deprecated torch.nn.utils.weight_norm.*parametrizations"):
        sgs_fx.transform(old)


def test_root_conv_gets_no_false_functional_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs = sgs_fx.transform(nn.Conv2d(3, 3, 3))
    assert "functional" not in caplog.text and list(sgs_fx.instrumented(sgs)) == [""]


def test_only_transposed_convs_is_told_why():
    with pytest.raises(ValueError, match="only transposed convs \\(1\\), which SGS does not instrument"):
        sgs_fx.transform(nn.Sequential(nn.ConvTranspose2d(3, 3, 3)))


class OutOfOrder(nn.Module):
    """Defined a, b, c; called c, a, b."""

    def __init__(self, dynamic=False):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.dynamic = dynamic

    def forward(self, x):
        x = self.c(x)
        if self.dynamic and x.sum() > 1e30:  # data-dependent: torch.fx cannot trace it
            x = -x
        return self.b(self.a(x))


@pytest.mark.parametrize("dynamic", [False, True], ids=["traced", "fallback"])
def test_instrumented_follows_call_order_not_definition_order(dynamic):
    sgs = sgs_fx.transform(OutOfOrder(dynamic), example_inputs=(torch.randn(1, 3, 6, 6),))
    assert list(sgs_fx.instrumented(sgs)) == ["c", "a", "b"]
