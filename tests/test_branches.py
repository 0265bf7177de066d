"""Branch mode, equivalent_scales and verify (spec §2, issue 3)."""
import logging

import pytest
import torch
import torchvision
from torch import nn

import sgs_fx
from sgs_fx.cifar.models import build_model
from sgs_fx.branched import BranchedConv
from sgs_fx.scaling.equivalence import branches_from, level_set_branches, raw_scale

F64 = torch.float64


@pytest.mark.parametrize("recipe,kernel,s_raw,m", [
    ("acb", (3, 3), [[1, 2, 1], [2, 3, 2], [1, 2, 1]], 15 / 9),
    ("repvgg", (3, 3), [[1, 1, 1], [1, 2, 1], [1, 1, 1]], 10 / 9),
    ("skeleton", (5, 5), [[1] * 5, [1, 2, 2, 2, 1], [1, 2, 3, 2, 1], [1, 2, 2, 2, 1], [1] * 5], 35 / 25),
    ("acb", (5, 5), [[1, 1, 2, 1, 1], [1, 1, 2, 1, 1], [2, 2, 3, 2, 2], [1, 1, 2, 1, 1], [1, 1, 2, 1, 1]], 35 / 25),
    ([((3, 3), 1), ((3, 1), 1), ((1, 1), 1)], (3, 3), [[1, 2, 1], [1, 3, 1], [1, 2, 1]], 13 / 9),
])
def test_equivalent_scales_match_hand_computed(recipe, kernel, s_raw, m):
    s, lr_factor = sgs_fx.equivalent_scales(recipe, kernel)
    expected = torch.tensor(s_raw, dtype=F64)
    assert lr_factor == pytest.approx(m, rel=1e-15)
    assert torch.allclose(s, expected / m, rtol=0, atol=1e-15)


def test_equivalent_scales_weighted_branches():
    s, m = sgs_fx.equivalent_scales([((3, 3), 1.0), ((3, 1), 0.7), ((1, 3), 1.3), ((1, 1), 2.0)])
    expected = torch.tensor([[1, 1.49, 1], [2.69, 7.18, 2.69], [1, 1.49, 1]], dtype=F64)
    assert m == pytest.approx(19.54 / 9, rel=1e-14)
    assert torch.allclose(s * m, expected, rtol=0, atol=1e-14)


def test_level_sets_reproduce_s_exactly():
    s = torch.rand(5, 5, dtype=F64) + 0.1
    s[0, :2] = s[1, 1]  # repeated values share a level
    bs = level_set_branches(s)
    assert torch.equal(raw_scale(bs), s) or (raw_scale(bs) - s).abs().max() <= 1e-15
    assert bs[0].mask.all() and len(bs) == torch.unique(s).numel()


def test_bad_recipes():
    with pytest.raises(ValueError, match="odd kernel sizes"):
        sgs_fx.equivalent_scales("acb", (4, 4))
    with pytest.raises(ValueError, match="unknown branch recipe"):
        sgs_fx.equivalent_scales("dbb")
    with pytest.raises(ValueError, match="not a centred sub-window"):
        sgs_fx.equivalent_scales([((2, 3), 1.0)])
    with pytest.raises(ValueError, match="uncovered"):
        sgs_fx.equivalent_scales([((1, 1), 1.0)])
    with pytest.raises(ValueError, match="conv '0': recipe 'acb' needs odd kernel sizes.*filter_fn"):
        sgs_fx.transform(nn.Sequential(nn.Conv2d(1, 1, 4)), mode="branches", branches="acb")
    with pytest.raises(ValueError, match="either scales= .* or branches="):
        sgs_fx.transform(nn.Sequential(nn.Conv2d(1, 1, 3)), mode="branches", branches="acb", scales={"0": torch.ones(3, 3)})


FLAVOURS = nn.Sequential(
    nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
    nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="reflect"), nn.ReLU(),
    nn.Conv2d(8, 8, (3, 5), padding=(1, 2), groups=2, padding_mode="circular"), nn.ReLU(),
    nn.Conv2d(8, 8, 5, padding="same", groups=8), nn.ReLU(),
    nn.Conv2d(8, 4, 3, stride=2, padding=1, padding_mode="replicate"),
    nn.Flatten(), nn.LazyLinear(5),
)


@pytest.mark.parametrize("how", ["acb", "repvgg", "skeleton", "scales"])
def test_forward_equal_at_construction_and_fold(how):
    torch.manual_seed(0)
    model = nn.Sequential(*list(FLAVOURS)[:-1], nn.Linear(4 * 3 * 3, 5)).double()
    kw = {"scales": {n: torch.rand(tuple(m.kernel_size)) + 0.2 for n, m in model.named_modules()
                     if isinstance(m, nn.Conv2d)}} if how == "scales" else {"branches": how}
    branched = sgs_fx.transform(model, mode="branches", **kw)
    assert all(isinstance(m, BranchedConv) for m in sgs_fx.instrumented(branched).values())
    x = torch.randn(2, 3, 11, 11, dtype=F64)
    # W/α·α and the sum of branch outputs reorder float64 arithmetic: equal to rounding, not bit-exact
    assert (branched(x) - model(x)).abs().max().item() <= 1e-12
    folded = sgs_fx.strip(branched)
    assert folded.state_dict().keys() == model.state_dict().keys()
    assert type(folded[4]) is nn.Conv2d and folded[4].padding_mode == "circular"
    assert (folded(x) - model(x)).abs().max().item() <= 1e-12


def test_unnormalised_branches_need_lr_times_m_and_decay_over_m():
    """Spec §2.1: branches at (η, λ) == SGS with S at (η·m, λ/m); forgetting λ/m is not exact."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    spec = branches_from("acb", (3, 3))
    block = BranchedConv(conv, spec, normalise=False)
    s, m = sgs_fx.equivalent_scales("acb")
    sgs = sgs_fx.transform(nn.Sequential(conv))
    with torch.no_grad():
        sgs[0].weight.copy_(block.weight)
    sgs_fx.set_scales(sgs, {"0": s})
    eta, lam = 0.01, 1e-2
    opt_b = torch.optim.SGD(block.parameters(), lr=eta, momentum=0.9, nesterov=True, weight_decay=lam)
    # bias is outside the branches: it keeps (η, λ) in both models
    opt_s = torch.optim.SGD([{"params": [sgs[0].weight], "lr": eta * m, "weight_decay": lam / m},
                             {"params": [sgs[0].bias]}], lr=eta, momentum=0.9, nesterov=True, weight_decay=lam)
    xs = [torch.randn(4, 3, 8, 8, dtype=F64) for _ in range(5)]
    for step in range(100):
        for mod, opt in ((block, opt_b), (sgs, opt_s)):
            opt.zero_grad()
            mod(xs[step % 5]).pow(2).mean().backward()
            opt.step()
    assert (block.weight - sgs[0].weight).abs().max().item() <= 1e-10


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-3),
}


def _batches(n=4, size=32, classes=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, classes, (4,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["acb", "scales"])
def test_verify_small_vgg_100_steps(opt, how):
    torch.manual_seed(0)
    model = build_model("vgg11_bn", width=0.0625, num_classes=5)
    kw = {"branches": "acb"} if how == "acb" else {
        "scales": {n: torch.rand(3, 3) + 0.2 for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}}
    report = sgs_fx.verify(model, _batches(), steps=100, optimizer_factory=OPTIMIZERS[opt], **kw)
    assert report.within_conditions and report.losses[-1] < report.losses[0]
    assert report.max_diff <= 1e-9, report.table()
    assert report.ok and len(report.layer_diff) == 8


def test_verify_flavours_strided_dilated_grouped_depthwise():
    torch.manual_seed(0)
    model = nn.Sequential(*list(FLAVOURS)[:-1], nn.Linear(4 * 4 * 4, 5))
    report = sgs_fx.verify(model, _batches(size=16), steps=100, optimizer_factory=OPTIMIZERS["nesterov_wd"],
                           branches="acb")
    assert report.max_diff <= 1e-9, report.table()


def test_verify_torchvision_resnet18_reduced_input():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    report = sgs_fx.verify(model, _batches(n=2, size=32), steps=100, optimizer_factory=OPTIMIZERS["momentum"],
                           branches="acb")
    assert report.max_diff <= 1e-9, report.table()
    assert len(report.layer_diff) == 17  # every conv with all spatial dims > 1


@pytest.mark.parametrize("kwargs,flag", [
    ({"optimizer_factory": lambda p: torch.optim.Adam(p, lr=1e-3)}, "Adam normalises"),
    ({"clip_grad_norm": 1e-3}, "gradient clipping"),
    ({"l2_in_loss": 0.05}, "L2 penalty in the loss"),
])
def test_verify_flags_and_measures_violations(kwargs, flag, caplog):
    torch.manual_seed(0)
    model = build_model("vgg11_bn", width=0.0625, num_classes=5)
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        report = sgs_fx.verify(model, _batches(), steps=30, **kwargs)
    assert any(flag in v for v in report.violations) and flag in caplog.text
    assert not report.within_conditions and report.ok  # reported, not a failure
    assert report.max_diff > 1e-6, report.table()  # and the difference is real, not rounding
