"""scaling="step": S applied to .grad by the attached optimizer's step (float64, exact), and never lost unseen."""
import copy
import logging
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sgs_fx
from helpers import TiedConvs, TinyNet, random_scales
from test_wrappers import (X, _assign, _load_swapped, _pickle, _set_attribute, _to_float32, _to_swapped,
                           _weight_normed, assert_equal_grads, grads, net, same_net, scaled, scaled_grads)


def step_grads(model, opt, x, call=None, backwards=1):
    """zero_grad, backward(s), opt.step() at lr 0 (weights unchanged): the gradients the update used."""
    opt.zero_grad(set_to_none=True)
    for _ in range(backwards):
        (call if call is not None else model)(x).pow(2).sum().backward()
    opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def attached(make=net, **kw):
    sgs = sgs_fx.transform(make(), scaling="step", **kw)
    scales = scaled(sgs)
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    sgs_fx.attach_optimizer(opt)
    return sgs, opt, scales


@pytest.mark.parametrize("make", [net, same_net, _weight_normed], ids=["torch_forward", "own_forward", "parametrized"])
def test_step_applies_S_to_the_weight_gradients_exactly(make):
    sgs, opt, scales = attached(make)
    if make is _weight_normed:  # S scales the direction v (original1), as the hook does (tested in test_wrappers)
        hooked = sgs_fx.transform(make(), scales=scales)
        want = grads(hooked, X)
        assert not torch.equal(want["0.parametrizations.weight.original1"],
                               grads(make(), X)["0.parametrizations.weight.original1"])
    else:
        want = scaled_grads(grads(make(), X), scales)
    assert_equal_grads(step_grads(sgs, opt, X), want)
    assert_equal_grads(step_grads(sgs, opt, X), want)  # every step, from fresh gradients
    assert all(p._backward_hooks is None for p in sgs.parameters())  # no hook: nothing in the backward pass


def test_tinynet_every_flavour():
    plain = TinyNet().double()
    sgs = sgs_fx.transform(plain, scaling="step")
    sgs_fx.set_scales(sgs, random_scales(sgs))
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    sgs_fx.attach_optimizer(opt)
    x = torch.randn(3, 3, 17, 17, dtype=torch.float64)
    assert_equal_grads(step_grads(sgs, opt, x), scaled_grads(grads(plain, x), sgs_fx.get_scales(sgs)))


def test_accumulated_micro_batches_are_scaled_once():
    sgs, opt, scales = attached()
    got = step_grads(sgs, opt, X, backwards=2)
    for name, g in scaled_grads(grads(net(), X, backwards=2), scales).items():
        assert (got[name] - g).abs().max().item() <= 1e-12, name


def test_a_second_step_without_backward_does_not_scale_again():
    sgs, opt, scales = attached()
    again = sgs_fx.attach_optimizer(opt)  # attached twice: still one pre-hook
    assert len(opt._optimizer_step_pre_hooks) == 1
    want = scaled_grads(grads(net(), X), scales)
    assert_equal_grads(step_grads(sgs, opt, X), want)
    opt.step()  # no backward in between (an LR finder, a second optimizer over the same weights)
    assert_equal_grads({n: p.grad for n, p in sgs.named_parameters()}, want)
    again.remove()  # either handle detaches the optimizer
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        sgs(X)


def test_zero_grad_without_set_to_none_scales_the_new_gradient():
    sgs, opt, scales = attached()
    want = scaled_grads(grads(net(), X), scales)
    step_grads(sgs, opt, X)
    for _ in range(2):
        opt.zero_grad(set_to_none=False)  # the same .grad tensors, zeroed in place
        sgs(X).pow(2).sum().backward()
        opt.step()
        assert_equal_grads({n: p.grad for n, p in sgs.named_parameters()}, want)


def test_the_update_uses_the_scaled_gradient():
    sgs = sgs_fx.transform(net(), scaling="step")
    scales = scaled(sgs)
    plain = net()
    before = {n: p.detach().clone() for n, p in sgs.named_parameters()}
    opt = torch.optim.SGD(sgs.parameters(), lr=0.5, momentum=0.9)
    sgs_fx.attach_optimizer(opt)
    step_grads(sgs, opt, X)
    for name, g in scaled_grads(grads(plain, X), scales).items():
        torch.testing.assert_close(dict(sgs.named_parameters())[name].detach(), before[name] - 0.5 * g, rtol=0, atol=1e-15)


@pytest.mark.parametrize("make", [same_net, _weight_normed], ids=["own_forward", "parametrized"])
def test_every_conv_class_refuses_to_train_unattached(make):
    sgs = sgs_fx.transform(make(), scaling="step")
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        sgs[0](X)  # the first conv alone: the own-forward, or the parametrized, class
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    sgs_fx.attach_optimizer(opt)
    sgs(X)


def test_training_forward_without_an_attached_optimizer_raises():
    sgs = sgs_fx.transform(net(), scaling="step")
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        sgs(X)
    with torch.no_grad():
        sgs(X)  # evaluation and MI calibration need no optimizer
    frozen = sgs_fx.transform(net().requires_grad_(False), scaling="step")
    frozen(X)  # nothing to scale
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        sgs(X)  # an optimizer exists, but nothing scales with it yet
    handle = sgs_fx.attach_optimizer(opt)
    sgs(X)
    handle.remove()
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        sgs(X)


def test_an_optimizer_that_was_not_attached_refuses_to_step():
    sgs = sgs_fx.transform(net(), scaling="step")
    attached_opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    sgs_fx.attach_optimizer(attached_opt)
    other = torch.optim.SGD(sgs.parameters(), lr=0.1)
    sgs(X).sum().backward()
    for _ in range(2):  # and every time, not only the first
        with pytest.raises(RuntimeError, match="attach_optimizer"):
            other.step()
    before = sgs[0].weight.detach().clone()
    assert torch.equal(sgs[0].weight, before)  # refused before it changed anything


def test_attach_optimizer_validates_its_arguments():
    with pytest.raises(TypeError, match="at least one"):
        sgs_fx.attach_optimizer()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sgs_fx.attach_optimizer(object())
    hooked = sgs_fx.transform(net())
    with pytest.raises(ValueError, match="scaled by gradient hooks"):
        sgs_fx.attach_optimizer(torch.optim.SGD(hooked.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="create it over the transformed model"):
        sgs_fx.attach_optimizer(torch.optim.SGD(net().parameters(), lr=0.1))
    stepped = sgs_fx.transform(net(), scaling="step")
    good = torch.optim.SGD(stepped.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="create it over the transformed model"):
        sgs_fx.attach_optimizer(good, torch.optim.SGD(net().parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        stepped(X)  # the call failed as a whole: the good optimizer was not attached either


def test_a_closure_step_is_refused():
    sgs, opt, _ = attached()

    def closure():
        opt.zero_grad()
        loss = sgs(X).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure=closure)


def test_hooked_and_step_models_side_by_side_are_each_scaled_once():
    hooked = sgs_fx.transform(net())
    scales = scaled(hooked)
    stepped = sgs_fx.transform(net(), scaling="step", scales=scales)
    opt = torch.optim.SGD([*hooked.parameters(), *stepped.parameters()], lr=0.0)
    sgs_fx.attach_optimizer(opt)
    opt.zero_grad()
    (hooked(X).pow(2).sum() + stepped(X).pow(2).sum()).backward()
    opt.step()
    want = scaled_grads(grads(net(), X), scales)
    assert_equal_grads({n: p.grad for n, p in hooked.named_parameters()}, want)
    assert_equal_grads({n: p.grad for n, p in stepped.named_parameters()}, want)


def test_two_optimizers_each_scale_their_own_weights():
    sgs = sgs_fx.transform(net(), scaling="step")
    scales = scaled(sgs)
    first = torch.optim.SGD(sgs[0].parameters(), lr=0.0)
    rest = torch.optim.SGD([*sgs[2].parameters(), *sgs[4].parameters()], lr=0.0)
    sgs_fx.attach_optimizer(first, rest)
    sgs(X).pow(2).sum().backward()
    first.step()
    want = scaled_grads(grads(net(), X), scales)
    assert torch.equal(sgs[0].weight.grad, want["0.weight"])
    assert not torch.equal(sgs[2].weight.grad, want["2.weight"])  # not yet: another optimizer's weight
    rest.step()
    assert_equal_grads({n: p.grad for n, p in sgs.named_parameters()}, want)


def test_a_param_group_added_after_attaching_is_scaled():
    sgs = sgs_fx.transform(net(), scaling="step")
    scales = scaled(sgs)
    opt = torch.optim.SGD(sgs[0].parameters(), lr=0.0)
    sgs_fx.attach_optimizer(opt)
    opt.add_param_group({"params": [*sgs[2].parameters(), *sgs[4].parameters()]})
    assert_equal_grads(step_grads(sgs, opt, X), scaled_grads(grads(net(), X), scales))


def test_tied_weights_scale_per_use_and_the_step_leaves_them_alone(caplog):
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs = sgs_fx.transform(TiedConvs().double(), scaling="step")
    s_a, s_b = torch.rand(3, 3, dtype=torch.float64) + 0.5, torch.rand(3, 3, dtype=torch.float64) + 0.5
    sgs_fx.set_scales(sgs, {"a": s_a, "b": s_b})
    s_a, s_b = sgs.a.sgs_scale, sgs.b.sgs_scale
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="per use"):
        sgs_fx.attach_optimizer(opt)  # nothing left for the step to scale: all of it is per use
    plain = TiedConvs().double()
    plain.load_state_dict(sgs.state_dict())
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    # each use's gradient, from an untied copy
    untied = TiedConvs().double()
    untied.load_state_dict(sgs.state_dict())
    untied.b.weight = nn.Parameter(untied.a.weight.detach().clone())
    untied(x).pow(2).sum().backward()
    got = step_grads(sgs, torch.optim.SGD(sgs.parameters(), lr=0.0), x)
    want = s_a * untied.a.weight.grad + s_b * untied.b.weight.grad
    assert (got["a.weight"] - want).abs().max().item() <= 1e-12


def test_an_F_conv_call_sharing_a_step_conv_weight_shares_its_S():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return nn.functional.conv2d(torch.relu(self.conv(x)), self.conv.weight, padding=1)

    sgs = sgs_fx.transform(Shared().double(), scaling="step")
    scales = scaled(sgs)
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    sgs_fx.attach_optimizer(opt)
    plain = Shared().double()
    assert_equal_grads(step_grads(sgs, opt, X), scaled_grads(grads(plain, X), scales))


def test_copies_need_their_own_optimizer():
    sgs, opt, scales = attached()
    for copy_ in (copy.deepcopy(sgs), _pickle(sgs)):
        with pytest.raises(RuntimeError, match="attach_optimizer"):
            copy_(X)
        opt2 = torch.optim.SGD(copy_.parameters(), lr=0.0)
        sgs_fx.attach_optimizer(opt2)
        assert_equal_grads(step_grads(copy_, opt2, X), scaled_grads(grads(net(), X), scales))


@pytest.mark.parametrize("wrap", [_to_float32, _to_swapped, _assign, _load_swapped, _set_attribute],
                         ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_wrappers_keep_S_or_refuse_to_train(wrap, compiled):
    """Wrappers that keep the Parameter objects keep training with the attached optimizer; those that put new
    ones in place leave them outside it, and the forward says so until an optimizer over them is attached."""
    sgs, opt, scales = attached()
    held = {id(p) for p in sgs.parameters()}
    out = wrap(sgs)
    torch._dynamo.reset()
    call = torch.compile(out, fullgraph=True, backend="aot_eager") if compiled else out
    x = X.to(next(out.parameters()).dtype)
    if {id(p) for p in out.parameters()} != held:
        with pytest.raises(Exception, match="attach_optimizer"):
            call(x)
        opt = torch.optim.SGD(out.parameters(), lr=0.0)
        sgs_fx.attach_optimizer(opt)
    want = scaled_grads(grads(wrap(net()), x), scales)
    for _ in range(2):
        assert_equal_grads(step_grads(out, opt, x, call=call), want)


def test_compiled_graph_holds_no_S_and_new_S_does_not_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    sgs, opt, scales = attached()
    plain = net()
    counters = []
    for m in (plain, sgs):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        call = torch.compile(m, fullgraph=True, backend=counter)
        call(X)
        counters.append(counter)
    assert counters[1].op_count == counters[0].op_count  # the same graph as the plain model's
    counter = counters[1]
    call = torch.compile(sgs, fullgraph=True, backend=counter)
    assert_equal_grads(step_grads(sgs, opt, X, call=call), scaled_grads(grads(plain, X), scales))
    new = scaled(sgs, seed=7)
    assert_equal_grads(step_grads(sgs, opt, X, call=call), scaled_grads(grads(plain, X), new))
    assert counter.frame_count == 1


def test_autocast_and_grad_scaler():
    plain = TinyNet()
    sgs = sgs_fx.transform(plain, scaling="step")
    sgs_fx.set_scales(sgs, random_scales(sgs, dtype=torch.float32))
    scales = sgs_fx.get_scales(sgs)
    x = torch.randn(2, 3, 16, 16)
    runs = []
    for m, attach in ((plain, False), (sgs, True)):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        if attach:
            sgs_fx.attach_optimizer(opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x).float().pow(2).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)  # unscales, then steps: S applies to the unscaled gradient
        runs.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, want in scaled_grads(runs[0], scales).items():
        torch.testing.assert_close(runs[1][name], want, rtol=1e-6, atol=0)  # same bf16 conv math both runs


def test_half_precision_gradient_is_multiplied_by_float32_S_and_rounded_once():
    sgs = sgs_fx.transform(net(), scaling="step").to(torch.bfloat16)
    scales = scaled(sgs)
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    sgs_fx.attach_optimizer(opt)
    x = X.to(torch.bfloat16)
    plain = net().to(torch.bfloat16)
    ref = grads(plain, x)
    got = step_grads(sgs, opt, x)
    for conv in scales:
        w = f"{conv}.weight"
        assert torch.equal(got[w], (ref[w].float() * scales[conv].float()).to(torch.bfloat16)), w


def test_data_parallel_replicas_leave_the_scaling_to_the_step(monkeypatch):
    from test_wrappers import _cpu_replicate

    replicate = _cpu_replicate(monkeypatch)
    sgs, opt, scales = attached()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)

    def data_parallel(inp):
        replicas = replicate(sgs, [0, 1])
        return torch.cat([replicas[0](inp[:2]), replicas[1](inp[2:])])

    want = scaled_grads(grads(net(), x), scales)
    for _ in range(2):
        got = step_grads(sgs, opt, x, call=data_parallel)
        for name, g in want.items():  # the two halves are summed in another order
            assert (got[name] - g).abs().max().item() <= 1e-10, name
    unattached = sgs_fx.transform(net(), scaling="step")
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        replicate(unattached, [0, 1])


def _fsdp_input():
    return torch.randn(4, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _fsdp2_worker(rank, world, init, out, reshard_after_backward):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard

    model = sgs_fx.transform(net(), scaling="step")
    scaled(model)
    for m in model:
        if isinstance(m, nn.Conv2d):
            fully_shard(m)
    fully_shard(model)
    model.set_reshard_after_backward(reshard_after_backward)
    names, sharded = zip(*model.named_parameters())
    opt = torch.optim.SGD(sharded, lr=0.0)
    sgs_fx.attach_optimizer(opt)
    for _ in range(2):  # gradient accumulation across two backward passes
        model(_fsdp_input()[rank * 2:(rank + 1) * 2]).pow(2).sum().backward()
    opt.step()
    opt.step()  # no backward in between: not scaled again
    full = {n: p.grad.full_tensor() for n, p in zip(names, sharded)}  # (the module may hold unsharded ones now)
    if rank == 0:
        torch.save(full, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("reshard_after_backward", [True, False], ids=["resharded", "unsharded_at_step"])
def test_fsdp2_two_gloo_processes_full_gradient_is_S_times_G(reshard_after_backward):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grads.pt")
        mp.spawn(_fsdp2_worker, args=(2, os.path.join(tmp, "init"), out, reshard_after_backward), nprocs=2, join=True)
        got = torch.load(out)
    scales = scaled(sgs_fx.transform(net()))
    plain = net()
    for _ in range(2):
        (plain(_fsdp_input()).pow(2).sum() / 2).backward()
    for name, p in plain.named_parameters():
        conv = name.rsplit(".", 1)[0]
        want = scales[conv] * p.grad if name.endswith("weight") else p.grad
        assert (got[name] - want).abs().max().item() <= 1e-12, name  # FSDP2 averages the ranks' sums
        if name.endswith("weight"):
            assert (got[name] - p.grad).abs().max().item() > 1e-3, name  # S really applied


def test_strip_leaves_a_plain_model_and_an_optimizer_that_steps_it_plainly():
    sgs, opt, _ = attached()
    plain = sgs_fx.strip(sgs, inplace=True)
    assert all(type(m) in (nn.Conv2d, nn.ReLU) for m in plain)
    assert_equal_grads(step_grads(plain, opt, X), grads(net(), X))


def test_mi_scheduler_calibrates_a_step_model():
    sgs = sgs_fx.transform(net(), scaling="step")
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    sgs_fx.attach_optimizer(opt)
    batches = [(torch.randn(4, 3, 9, 9, dtype=torch.float64), torch.zeros(4)) for _ in range(2)]
    sched = sgs_fx.MIScheduler(sgs, batches, warmup=0, every=1)
    sched.step(0)
    scales = sgs_fx.get_scales(sgs)
    assert any(not torch.equal(s, torch.ones_like(s)) for s in scales.values())
    assert_equal_grads(step_grads(sgs, opt, X), scaled_grads(grads(net(), X), scales))


def test_a_compiled_optimizer_step_still_applies_S():
    sgs, opt, scales = attached()
    want = scaled_grads(grads(net(), X), scales)
    torch._dynamo.reset()
    compiled_step = torch.compile(opt.step)  # the pre-hook runs inside the compiled step (graph breaks allowed)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        sgs(X).pow(2).sum().backward()
        compiled_step()
        assert_equal_grads({n: p.grad for n, p in sgs.named_parameters()}, want)


def test_a_gradient_sharded_along_a_kernel_dim_is_refused():
    from torch.distributed.tensor import Replicate, Shard

    from sgs_fx.step import _check_placements

    class Grad:  # what _check_placements reads of a DTensor gradient
        def __init__(self, *placements):
            self.placements = placements

        def dim(self):
            return 4

    conv = nn.Conv2d(2, 2, 3)
    for ok in [(Shard(0),), (Shard(1), Replicate()), (Replicate(),)]:
        _check_placements(Grad(*ok), conv)
    for bad in [(Shard(2),), (Replicate(), Shard(-1))]:
        with pytest.raises(ValueError, match="spatial kernel dim"):
            _check_placements(Grad(*bad), conv)
