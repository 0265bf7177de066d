"""The MI estimator (spec §3) against the naive reference, edge cases, streaming, DDP."""

import numpy as np
import pytest
import torch
from torch import nn

import sgs_fx
from helpers import Conv2dSame
from mi_reference import reference_scale
from sgs_fx.scaling.mi import ConvGeometry, PairStats


def _feature_map(shape, seed, relu=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    # neighbouring pixels must be dependent, as in real feature maps: smooth along every spatial axis
    for axis in range(2, x.dim()):
        x = (x + x.roll(1, axis) + x.roll(-1, axis)) / 3
    x = x + 0.3 * torch.randn(shape, generator=g)
    return torch.relu(x) if relu else x


CASES = {
    "3x3": (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 7, 7)),
    "5x5": (nn.Conv2d(2, 4, 5, padding=2), (2, 2, 8, 8)),
    "dilated": (nn.Conv2d(2, 2, 3, padding=2, dilation=2), (2, 2, 8, 8)),
    "nonsquare_strided": (nn.Conv2d(2, 2, (3, 5), stride=2, padding=(1, 2)), (2, 2, 6, 9)),
    "even_4x4": (nn.Conv2d(2, 2, 4, padding=1), (2, 2, 7, 7)),
    "even_2x2_nopad": (nn.Conv2d(2, 2, 2), (2, 2, 6, 6)),
    "same_even": (nn.Conv2d(2, 2, 4, padding="same"), (2, 2, 6, 6)),
    "reflect": (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), (2, 2, 6, 6)),
    "depthwise": (nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 6, 6)),
    "1d": (nn.Conv1d(3, 2, 5, padding=2), (3, 3, 20)),
    "3d": (nn.Conv3d(2, 2, 3, padding=1), (2, 2, 4, 5, 5)),
    "row_1x3": (nn.Conv2d(2, 2, (1, 3), padding=(0, 1)), (2, 2, 6, 6)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("zero_removal", [False, True])
def test_matches_naive_reference(name, k, zero_removal):
    conv, shape = CASES[name]
    x = _feature_map(shape, seed=sum(map(ord, name)), relu=zero_removal)
    expected = reference_scale(x, conv, k=k, zero_removal=zero_removal)
    got = sgs_fx.dependence(x, conv, k=k, zero_removal=zero_removal)
    assert got.shape == tuple(conv.kernel_size) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)
    assert torch.isclose(got.mean(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12) and (got > 0).all()


def test_symmetric_and_centre_peaked_as_the_reference_computes_them():
    # sgs_fx computes D(d) once and copies it to D(-d); the reference computes every tap on its own, so its
    # symmetry (and centre peak) is a fact about the data, which sgs_fx must then reproduce
    conv = nn.Conv2d(3, 3, 5, padding=2)
    x = _feature_map((2, 3, 10, 10), 1)
    ref = reference_scale(x, conv)
    np.testing.assert_allclose(ref, ref[::-1, ::-1], rtol=0, atol=1e-12)  # D(d) = D(-d)
    assert ref[2, 2] == ref.max() and ref[2, 2] > ref[2, 3] > ref[2, 4]
    np.testing.assert_allclose(sgs_fx.dependence(x, conv).numpy(), ref, rtol=0, atol=1e-5)


def test_nmi_of_identical_vectors_is_one():
    # Without padding, a 1-D signal that is constant along runs of 2 has D(±1) from pairs that are mostly
    # equal; a 2x-upsampled map at dilation 2 compares equal pixels only where the run aligns. Simplest exact
    # case: a constant-along-axis map compared along that axis gives identical vectors X == Y.
    base = torch.randn(3, 2, 1, 9).expand(3, 2, 5, 9).contiguous()  # constant along H
    conv = nn.Conv2d(2, 2, (3, 1))  # displacements along H only, no padding
    stats = PairStats(ConvGeometry.of(conv), 2, zero_removal=False)
    stats.observe_range(base)
    stats.start_histograms()
    stats.observe_hist(base)
    assert torch.equal(stats.dependence_per_channel(k=1), torch.ones(2, 3, dtype=torch.float64))


EDGE = [
    ("all_zero_channel", lambda x: x.index_fill(1, torch.tensor([0]), 0.0)),
    ("constant_channel", lambda x: x.index_fill(1, torch.tensor([1]), 2.5)),
]


@pytest.mark.parametrize("name,edit", EDGE)
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("zero_removal", [False, True])
def test_edge_cases_match_reference(name, edit, padding, zero_removal):
    conv = nn.Conv2d(3, 3, 3, padding=padding)
    x = edit(_feature_map((2, 3, 6, 6), 3, relu=zero_removal))
    np.testing.assert_allclose(sgs_fx.dependence(x, conv, zero_removal=zero_removal).numpy(),
                               reference_scale(x, conv, zero_removal=zero_removal), rtol=0, atol=1e-5)


def test_single_pixel_and_empty_overlap():
    conv = nn.Conv2d(1, 1, 3)  # no padding, 1x1 input: no pair fits any displacement
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert torch.equal(sgs_fx.dependence(torch.ones(1, 1, 1, 1), conv), torch.ones(3, 3, dtype=torch.float64))
    # zero removal: every undefined value is 0, so only the centre survives, floored everywhere else
    s = sgs_fx.dependence(torch.ones(1, 1, 1, 1), conv, zero_removal=True)
    assert s[1, 1] == s.max() and torch.allclose(s.mean(), torch.tensor(1.0, dtype=torch.float64))
    # D = centre 1, else 0 -> S = 9 at the centre, 0 elsewhere -> floored to 1e-3, then renormalised
    assert torch.allclose(s[0, 0] / s[1, 1], torch.tensor(1e-3 / 9, dtype=torch.float64), rtol=1e-12)


def test_non_finite_input_keeps_ones_and_warns():
    x = _feature_map((2, 2, 5, 5), 0)
    x[0, 0, 1, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert torch.equal(sgs_fx.dependence(x, nn.Conv2d(2, 2, 3, padding=1)), torch.ones(3, 3, dtype=torch.float64))


def test_streaming_equals_one_shot():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    parts = [_feature_map((2, 3, 8, 8), s, relu=True) for s in range(3)]
    for zr in (False, True):
        stats = PairStats(ConvGeometry.of(conv), 3, zero_removal=zr)
        for p in parts:
            stats.observe_range(p)
        stats.start_histograms()
        for p in parts:
            stats.observe_hist(p)
        one = PairStats(ConvGeometry.of(conv), 3, zero_removal=zr)
        whole = torch.cat(parts)
        one.observe_range(whole)
        one.start_histograms()
        one.observe_hist(whole)
        assert torch.equal(stats.hist, one.hist) and torch.equal(stats.count, one.count)
        assert torch.equal(stats.scale(5, 1e-3)[0], one.scale(5, 1e-3)[0])


def test_chunked_channels_equal_unchunked(monkeypatch):
    conv = nn.Conv2d(6, 6, 3, padding=1)
    x = _feature_map((2, 6, 8, 8), 5)
    whole = sgs_fx.dependence(x, conv)
    monkeypatch.setattr("sgs_fx.scaling.mi._CHUNK_ELEMENTS", {"cpu": 150})  # one or two channels a chunk
    assert torch.equal(sgs_fx.dependence(x, conv), whole)


def test_bad_hyper_parameters():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with pytest.raises(ValueError, match="k must be"):
        sgs_fx.dependence(torch.randn(1, 2, 4, 4), conv, k=0)
    with pytest.raises(ValueError, match="input channels"):
        sgs_fx.dependence(torch.randn(1, 3, 4, 4), conv)


def test_pixels_binned_once_give_the_same_histograms_as_binning_per_displacement():
    # the fast path (each pixel binned once, displacements pair bin maps) must count exactly what the
    # general path (every (c, d) binned on its own) counts; a border maximum makes some (c, d) irregular
    conv = nn.Conv2d(4, 4, 3)  # no padding: a view that drops the top row drops real pixels
    regular = _feature_map((3, 4, 9, 9), 5)
    regular[:, :, 4, 4], regular[:, :, 4, 5] = 10.0, -10.0  # extremes inside every view: all (c, d) share bins
    border = regular.clone()
    border[:, 1, 0, 4] = 20.0  # channel 1's maximum only in the top row: views that drop it have other ranges
    for x, all_shared in ((regular, True), (border, False)):
        hists = []
        for force_general in (False, True):
            stats = PairStats(ConvGeometry.of(conv), 4, zero_removal=False)
            stats.observe_range(x)
            stats.start_histograms()
            if force_general:
                stats.shared[:] = False
                stats._shared_host[:] = False
            else:
                assert bool(stats.shared.all()) is all_shared and stats.shared.any()
            stats.observe_hist(x)
            hists.append(stats.hist)
        assert torch.equal(hists[0], hists[1])


def _same_padded(x, kernel, stride):
    """x padded as a TF-style 'SAME' conv pads it in its forward (extra pixel at the end)."""
    import math

    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / stride) - 1) * stride + kernel - ih, 0)
    pw = max((math.ceil(iw / stride) - 1) * stride + kernel - iw, 0)
    return torch.nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class _OwnForward(nn.Conv2d):
    """A conv subclass with a forward of its own that leaves the padding to torch's (padding_mode included)."""

    def forward(self, x):
        return super().forward(x)


def _timm_same(stride):
    timm = pytest.importorskip("timm")
    return timm.layers.Conv2dSame(3, 4, 3, stride=stride)


@pytest.mark.parametrize("make, reference", [
    (lambda: Conv2dSame(3, 4, 3), lambda x: sgs_fx.dependence(_same_padded(x, 3, 1), nn.Conv2d(3, 4, 3))),
    (lambda: Conv2dSame(3, 4, 3, stride=2), lambda x: sgs_fx.dependence(_same_padded(x, 3, 2), nn.Conv2d(3, 4, 3, stride=2))),
    (lambda: _timm_same(2), lambda x: sgs_fx.dependence(_same_padded(x, 3, 2), nn.Conv2d(3, 4, 3, stride=2))),
    (lambda: nn.Conv2d(3, 4, 3, padding="same"), lambda x: sgs_fx.dependence(x, nn.Conv2d(3, 4, 3, padding=1))),
    (lambda: nn.Conv2d(3, 4, 4, padding="same"), lambda x: sgs_fx.dependence(_same_padded(x, 4, 1), nn.Conv2d(3, 4, 4))),
    *[(lambda mode=mode: _OwnForward(3, 4, 3, padding=1, padding_mode=mode),
       lambda x, mode=mode: sgs_fx.dependence(x, nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)))
      for mode in ("zeros", "reflect", "circular", "replicate")],
], ids=["same_pad_in_forward", "same_pad_in_forward_strided", "timm_Conv2dSame", "padding_same", "padding_same_even",
        "own_forward_zeros", "own_forward_reflect", "own_forward_circular", "own_forward_replicate"])
def test_mi_sees_the_map_the_conv_convolves(make, reference):
    # a conv that pads inside its own forward (timm's Conv2dSame) convolves a padded map: S comes from that map,
    # as from the same conv with explicit padding (it came from the unpadded input before)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16).abs()  # non-negative: the zero border is a distinct value
    model = sgs_fx.transform(nn.Sequential(make()), filter_fn=lambda n, m: True)
    got = sgs_fx.MIScheduler(model, [x], batches=1, warmup=0).calibrate()["0"]
    assert torch.equal(got.float(), reference(x).float())
