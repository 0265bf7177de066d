"""Spec §7.1: the instrumented weight gradient is exactly S ⊙ G; nothing else changes (float64)."""

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sgs_fx
from helpers import TinyNet, gloo_group, random_scales, spawn_and_load


def _grads(model, x, loss_fn=lambda y: (y ** 2).sum(), call=None):
    """The gradients an optimizer step uses (SGD at lr 0: the weights stay as they are)."""
    model.zero_grad(set_to_none=True)
    loss_fn((call or model)(x)).backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_scaled(plain_grads, sgs_grads, scales, tol=1e-12, others_tol=0.0):
    for name, g in plain_grads.items():
        conv = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and conv in scales:
            assert (sgs_grads[name] - scales[conv] * g).abs().max().item() <= tol, name
        elif others_tol == 0.0:
            assert torch.equal(sgs_grads[name], g), name
        else:
            assert (sgs_grads[name] - g).abs().max().item() <= others_tol, name


def test_tinynet_float64_every_flavour():
    plain = TinyNet().double()
    sgs = sgs_fx.transform(plain)
    scales = random_scales(sgs)
    sgs_fx.set_scales(sgs, scales)
    scales = sgs_fx.get_scales(sgs)
    x = torch.randn(3, 3, 17, 17, dtype=torch.float64)
    assert_scaled(_grads(plain, x), _grads(sgs, x), scales)


@settings(max_examples=40, deadline=None, derandomize=True)  # reproducible in CI
@given(
    dims=st.integers(1, 3),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 4]),
    padding=st.sampled_from([0, 1, 2, "same"]),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_conv_configuration(dims, kernel, stride, dilation, groups, padding, padding_mode, bias, seed):
    if padding == "same":
        stride = 1
    g = torch.Generator().manual_seed(seed)
    conv_cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1]
    torch.manual_seed(seed)
    plain = conv_cls(4, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias, padding_mode=padding_mode).double()
    sgs = sgs_fx.transform(nn.Sequential(plain), filter_fn=lambda n, m: True)
    scales = random_scales(sgs, generator=g)
    sgs_fx.set_scales(sgs, scales)
    x = torch.randn(2, 4, *([7] * dims), dtype=torch.float64, generator=g)
    assert torch.equal(plain(x), sgs(x))
    pg = {("0." + k): v for k, v in _grads(plain, x).items()}
    assert_scaled(pg, _grads(sgs, x), sgs_fx.get_scales(sgs))


def test_gradient_accumulation_scales_each_micro_batch_once():
    plain = TinyNet().double()
    sgs = sgs_fx.transform(plain)
    sgs_fx.set_scales(sgs, random_scales(sgs))
    scales = sgs_fx.get_scales(sgs)
    xs = [torch.randn(2, 3, 16, 16, dtype=torch.float64) for _ in range(3)]
    for m in (plain, sgs):
        m.zero_grad()
        for x in xs:
            m(x).pow(2).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.0).step()
    assert_scaled({n: p.grad for n, p in plain.named_parameters()},
                  {n: p.grad for n, p in sgs.named_parameters()}, scales, tol=1e-11)


def _compiled_case(backend, tol, scaling="step"):
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2)).double()
    sgs = sgs_fx.transform(plain, scaling=scaling)
    sgs_fx.set_scales(sgs, random_scales(sgs))
    scales = sgs_fx.get_scales(sgs)
    torch._dynamo.reset()
    compiled = torch.compile(sgs, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    eager = _grads(plain, x)
    assert_scaled(eager, _grads(sgs, x, call=compiled), scales, tol=tol, others_tol=tol)
    # a change of S is a buffer update: no recompile, and the new S is used
    sgs_fx.set_scales(sgs, random_scales(sgs))
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_scaled(eager, _grads(sgs, x, call=compiled), sgs_fx.get_scales(sgs), tol=tol, others_tol=tol)


@pytest.mark.parametrize("scaling", ["step", "hook"])
def test_torch_compile_fullgraph_aot_eager(scaling):
    _compiled_case("aot_eager", tol=0.0, scaling=scaling)  # same aten kernels as eager: bit-identical


def test_unknown_scaling_is_refused():
    for bad in ("fast", "graph"):  # (scaling="graph" was removed: "step" costs nothing under torch.compile)
        with pytest.raises(ValueError, match=f"unknown scaling '{bad}'; use 'step'.*or 'hook'"):
            sgs_fx.transform(TinyNet(), scaling=bad)


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    # inductor fuses and reorders float64 reductions: rounding-level differences, not scaling errors
    _compiled_case("inductor", tol=1e-12)


def test_autocast_and_grad_scaler():
    plain = TinyNet()
    sgs = sgs_fx.transform(plain)
    sgs_fx.set_scales(sgs, random_scales(sgs, dtype=torch.float32))
    scales = sgs_fx.get_scales(sgs)
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for m in (plain, sgs):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x).float().pow(2).sum()
        scaler.scale(loss).backward()
        scaler.step(torch.optim.SGD(m.parameters(), lr=0.0))  # unscales, then steps (S applied there)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    # the low-precision conv math is identical in both runs; the scaling itself is done in float32
    for name, g in grads[0].items():
        conv = name.rsplit(".", 1)[0]
        expected = scales[conv].float() * g if (name.endswith("weight") and conv in scales) else g
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-6, atol=0)


def _ddp_worker(rank, world, path, result_path, scaling):
    with gloo_group(rank, world, path):
        torch.manual_seed(0)
        model = sgs_fx.transform(TinyNet().double(), scaling=scaling).eval()  # BN statistics would differ per shard
        torch.manual_seed(1)
        sgs_fx.set_scales(model, random_scales(model))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.0)  # lr 0: the weights stay as they are; "step": S applied
        torch.manual_seed(2)
        x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
        ddp(x[rank * 2:(rank + 1) * 2]).pow(2).sum().backward()
        opt.step()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        gathered = [torch.empty_like(grads) for _ in range(world)]
        dist.all_gather(gathered, grads)
        if rank == 0:
            torch.save(gathered, result_path)


@pytest.mark.parametrize("scaling", ["step", "hook"])
def test_ddp_two_gloo_processes_match_single_process(scaling):
    ranks = spawn_and_load(_ddp_worker, 2, scaling)
    assert torch.equal(ranks[0], ranks[1])
    torch.manual_seed(0)
    model = sgs_fx.transform(TinyNet().double()).eval()  # BN on batch statistics would differ per shard
    torch.manual_seed(1)
    sgs_fx.set_scales(model, random_scales(model))
    torch.manual_seed(2)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    # DDP averages over ranks: each rank's loss is a sum over its half, so the average is half the total
    (model(x).pow(2).sum() / 2).backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    single = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (ranks[0] - single).abs().max().item() <= 1e-10
    plain = sgs_fx.strip(model)
    plain.zero_grad()
    (plain(x).pow(2).sum() / 2).backward()
    unscaled = torch.cat([p.grad.flatten() for p in plain.parameters()])
    assert (ranks[0] - unscaled).abs().max().item() > 1e-3  # S really applied
