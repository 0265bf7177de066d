"""scaling="step" (the default): S applied to .grad when any torch.optim optimizer steps (float64, exact), with
closures, wrappers and nested optimizers, and never lost unseen."""
import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import sgs_fx
from helpers import Conv2dSame, TiedConvs, TinyNet, gloo_group, random_scales, spawn_and_load
from test_wrappers import (X, _assign, _load_swapped, _pickle, _set_attribute, _to_float32, _to_swapped,
                           _weight_normed, assert_equal_grads, net, same_net, scaled, scaled_grads)


def plain_grads(model, x, backwards=1):
    """The plain model's gradients G (no optimizer involved)."""
    model.zero_grad(set_to_none=True)
    for _ in range(backwards):
        model(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def step_grads(model, opt, x, call=None, backwards=1):
    """zero_grad, backward(s), opt.step() at lr 0 (weights unchanged): the gradients the update used."""
    opt.zero_grad(set_to_none=True)
    for _ in range(backwards):
        (call if call is not None else model)(x).pow(2).sum().backward()
    opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def now(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def stepped(make=net, **kw):
    sgs = sgs_fx.transform(make(), **kw)
    scales = scaled(sgs)
    return sgs, torch.optim.SGD(sgs.parameters(), lr=0.0), scales


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    from sgs_fx import hooks, record
    monkeypatch.setattr(record, "_warned_unscaled", False)
    monkeypatch.setattr(hooks, "_warned_plain", False)


def _pruned():
    from torch.nn.utils import prune

    m = net()
    prune.l1_unstructured(m[0], "weight", amount=0.3)
    return m


@pytest.mark.parametrize("make", [net, same_net, _weight_normed, _pruned],
                         ids=["torch_forward", "own_forward", "parametrized", "pruned"])
def test_the_step_applies_S_to_the_weight_gradients_exactly(make):
    sgs, opt, scales = stepped(make, inplace=make is _pruned)  # (torch cannot deep-copy a pruned model)
    plain = make()
    G = plain_grads(plain, X)
    if make is _weight_normed:  # S scales the direction v (original1), the tensor the optimizer steps
        want = {n: scales["0"] * g if n == "0.parametrizations.weight.original1" else
                (scales[n.rsplit(".", 1)[0]] * g if n.endswith(".weight") else g) for n, g in G.items()}
    elif make is _pruned:  # S scales weight_orig (the trained tensor): S ⊙ mask ⊙ G
        want = {n: scales[n.split(".")[0]] * g if n.endswith(("weight", "weight_orig")) else g for n, g in G.items()}
    else:
        want = scaled_grads(G, scales)
    assert not all(torch.equal(want[n], G[n]) for n in G)
    assert_equal_grads(plain_grads(sgs, X), G)  # before the step: the unscaled G, as autograd computed it
    assert_equal_grads(step_grads(sgs, opt, X), want)
    assert_equal_grads(step_grads(sgs, opt, X), want)  # every step, from fresh gradients
    assert_equal_grads(plain_grads(sgs, X), G)  # the weights' hooks record gradients and change none


def test_tinynet_every_flavour():
    plain = TinyNet().double()
    sgs = sgs_fx.transform(plain)
    sgs_fx.set_scales(sgs, random_scales(sgs))
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    x = torch.randn(3, 3, 17, 17, dtype=torch.float64)
    assert_equal_grads(step_grads(sgs, opt, x), scaled_grads(plain_grads(plain, x), sgs_fx.get_scales(sgs)))


def test_accumulated_micro_batches_are_scaled_once():
    sgs, opt, scales = stepped()
    got = step_grads(sgs, opt, X, backwards=2)
    for name, g in scaled_grads(plain_grads(net(), X, backwards=2), scales).items():
        assert (got[name] - g).abs().max().item() <= 1e-12, name


def test_the_weights_after_a_step_are_the_hand_computed_update():
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    before = {n: p.detach().clone() for n, p in sgs.named_parameters()}
    opt = torch.optim.SGD(sgs.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    G = plain_grads(net(), X)
    step_grads(sgs, opt, X)
    for name, p in sgs.named_parameters():  # first step: buffer = S ⊙ G + wd W (decay unscaled, spec §1.1)
        conv = name.rsplit(".", 1)[0]
        g = scales[conv] * G[name] if name.endswith("weight") else G[name]
        torch.testing.assert_close(p.detach(), before[name] - 0.5 * (g + 0.01 * before[name]), rtol=0, atol=1e-15)


def test_zero_grad_without_set_to_none_scales_the_new_gradient():
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)
    step_grads(sgs, opt, X)
    for _ in range(2):
        opt.zero_grad(set_to_none=False)  # the same .grad tensors, zeroed in place
        sgs(X).pow(2).sum().backward()
        opt.step()
        assert_equal_grads(now(sgs), want)


@pytest.fixture
def capture(monkeypatch):
    """Emulate CUDA graph capture on a CPU: ``capture(True)`` makes sgs_fx see a capture in progress."""
    from sgs_fx import record, step as step_module

    on = [False]
    monkeypatch.setattr(record, "_CUDA", [True])
    monkeypatch.setattr(step_module, "_CUDA", [True])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: on[0])
    return lambda flag: on.__setitem__(0, flag)


def test_a_backward_captured_without_its_step_is_scaled_at_every_eager_step(capture):
    # a graph of forward and backward only, replayed before each eager step: the replays rewrite .grad in place
    # and run no hook (emulated by writing through .data), so every eager step must scale what it finds
    sgs, opt, scales = stepped()
    G1, G2 = plain_grads(net(), X), plain_grads(net(), 2 * X)
    opt.zero_grad(set_to_none=True)
    capture(True)
    sgs(X).pow(2).sum().backward()
    capture(False)
    for G in (G1, G2, G1):
        for n, p in sgs.named_parameters():
            p.grad.data.copy_(G[n])  # a replay
        opt.step()
        assert_equal_grads(now(sgs), scaled_grads(G, scales))


def test_a_captured_step_scales_in_the_capture_and_eager_steps_then_do_not_again(capture):
    # the whole step captured (the study's recipe): the multiply is part of the graph, and is done
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)
    opt.zero_grad(set_to_none=True)
    capture(True)
    sgs(X).pow(2).sum().backward()
    opt.step()
    capture(False)
    assert_equal_grads(now(sgs), want)
    opt.step()  # no new gradient: an eager step after the capture leaves S ⊙ G as it is
    assert_equal_grads(now(sgs), want)


def test_a_closure_step_scales_the_gradients_the_closure_computes():
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = sgs(X).pow(2).sum()
        loss.backward()
        return loss

    for step in (lambda: opt.step(closure), lambda: opt.step(closure=closure)):
        sgs.zero_grad(set_to_none=True)
        loss = step()
        assert loss.item() > 0 and calls
        assert_equal_grads(now(sgs), want)


def test_lbfgs_with_sgs_equals_lbfgs_with_S_applied_by_hand():
    # LBFGS calls its closure several times inside one step: each call's gradients must be S ⊙ G
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    plain = net()
    plain.load_state_dict(sgs.state_dict())
    x = X[:1]

    def run(model, by_hand):
        opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)

        def closure():
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            if by_hand:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        conv = n.rsplit(".", 1)[0]
                        if n.endswith("weight") and conv in scales:
                            p.grad.mul_(scales[conv])
            return loss

        for _ in range(2):
            opt.step(closure)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    got, want = run(sgs, False), run(plain, True)
    assert_equal_grads(got, want)
    assert not torch.equal(got["0.weight"], run(net(), False)["0.weight"])  # S changed the trajectory


class _Lookahead(torch.optim.Optimizer):
    """A wrapper that shares its base optimizer's param groups and steps it (timm's Lookahead does so)."""

    def __init__(self, base):
        self.base = base
        super().__init__([{"params": g["params"]} for g in base.param_groups], {})
        self.param_groups = base.param_groups

    def step(self, closure=None):
        return self.base.step(closure)


def test_an_optimizer_stepping_inside_another_does_not_scale_again():
    sgs, opt, scales = stepped()
    wrapped = _Lookahead(opt)
    want = scaled_grads(plain_grads(net(), X), scales)
    for _ in range(2):
        assert_equal_grads(step_grads(sgs, wrapped, X), want)


def test_an_optimizer_subclass_calling_super_step_scales_once():
    class MySGD(torch.optim.SGD):
        def step(self, closure=None):  # torch hooks both this step and SGD's
            return super().step(closure)

    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # SGD.step itself is hooked once an SGD exists
    sgs, _, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)
    opt = MySGD(sgs.parameters(), lr=0.0)
    for _ in range(2):
        assert_equal_grads(step_grads(sgs, opt, X), want)


def test_a_step_that_raised_does_not_silence_later_steps():
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)

    def boom():
        raise ZeroDivisionError

    class Raising(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            raise ZeroDivisionError  # after its inner step scaled: its entry is left behind

    opt.zero_grad()
    with pytest.raises(ZeroDivisionError):
        opt.step(boom)
    raising = Raising(sgs.parameters(), lr=0.0)
    sgs(X).pow(2).sum().backward()
    with pytest.raises(ZeroDivisionError):
        raising.step()
    other = torch.optim.SGD(sgs.parameters(), lr=0.0)
    for _ in range(3):  # every step of another optimizer scales every gradient
        assert_equal_grads(step_grads(sgs, other, X), want)
    assert_equal_grads(step_grads(sgs, opt, X), want)


def test_two_optimizers_each_scale_their_own_weights():
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    first = torch.optim.SGD(sgs[0].parameters(), lr=0.0)
    rest = torch.optim.SGD([*sgs[2].parameters(), *sgs[4].parameters()], lr=0.0)
    sgs(X).pow(2).sum().backward()
    first.step()
    want = scaled_grads(plain_grads(net(), X), scales)
    assert torch.equal(sgs[0].weight.grad, want["0.weight"])
    assert not torch.equal(sgs[2].weight.grad, want["2.weight"])  # not yet: another optimizer's weight
    rest.step()
    assert_equal_grads(now(sgs), want)


def test_a_param_group_added_later_is_scaled():
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    opt = torch.optim.SGD(sgs[0].parameters(), lr=0.0)
    step_grads(sgs, opt, X)  # the optimizer's list of SGS weights is cached here
    opt.add_param_group({"params": [*sgs[2].parameters(), *sgs[4].parameters()]})
    assert_equal_grads(step_grads(sgs, opt, X), scaled_grads(plain_grads(net(), X), scales))


def test_hook_and_step_models_side_by_side_are_each_scaled_once():
    hooked = sgs_fx.transform(net(), scaling="hook")
    scales = scaled(hooked)
    stepped_ = sgs_fx.transform(net(), scales=scales)
    opt = torch.optim.SGD([*hooked.parameters(), *stepped_.parameters()], lr=0.0)
    opt.zero_grad()
    (hooked(X).pow(2).sum() + stepped_(X).pow(2).sum()).backward()
    opt.step()
    want = scaled_grads(plain_grads(net(), X), scales)
    assert_equal_grads(now(hooked), want)
    assert_equal_grads(now(stepped_), want)


def test_tied_weights_scale_per_use_and_the_step_leaves_them_alone(caplog):
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs = sgs_fx.transform(TiedConvs().double())
    assert "share a weight Parameter" in caplog.text
    sgs_fx.set_scales(sgs, {"a": torch.rand(3, 3, dtype=torch.float64) + 0.5,
                            "b": torch.rand(3, 3, dtype=torch.float64) + 0.5})
    s_a, s_b = sgs.a.sgs_scale, sgs.b.sgs_scale
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    untied = TiedConvs().double()  # each use's gradient, from an untied copy
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

    sgs = sgs_fx.transform(Shared().double())
    scales = scaled(sgs)
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    assert_equal_grads(step_grads(sgs, opt, X), scaled_grads(plain_grads(Shared().double(), X), scales))


def test_copies_train_with_their_own_optimizer():
    sgs, opt, scales = stepped()
    for copy_ in (copy.deepcopy(sgs), _pickle(sgs)):
        opt2 = torch.optim.SGD(copy_.parameters(), lr=0.0)
        assert_equal_grads(step_grads(copy_, opt2, X), scaled_grads(plain_grads(net(), X), scales))


@pytest.mark.parametrize("wrap", [_to_float32, _to_swapped, _assign, _load_swapped, _set_attribute],
                         ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_wrappers_keep_S(wrap, compiled):
    """Whatever replaces the Parameter objects, an optimizer over the model's parameters scales them."""
    sgs, _, scales = stepped()
    out = wrap(sgs)
    torch._dynamo.reset()
    call = torch.compile(out, fullgraph=True, backend="aot_eager") if compiled else out
    x = X.to(next(out.parameters()).dtype)
    opt = torch.optim.SGD(out.parameters(), lr=0.0)
    want = scaled_grads(plain_grads(wrap(net()), x), scales)
    for _ in range(2):
        assert_equal_grads(step_grads(out, opt, x, call=call), want)


def test_compiled_graph_holds_no_S_and_new_S_does_not_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    sgs, opt, scales = stepped()
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
    assert_equal_grads(step_grads(sgs, opt, X, call=call), scaled_grads(plain_grads(plain, X), scales))
    new = scaled(sgs, seed=7)
    assert_equal_grads(step_grads(sgs, opt, X, call=call), scaled_grads(plain_grads(plain, X), new))
    assert counter.frame_count == 1


def test_a_compiled_optimizer_step_applies_S():
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)
    torch._dynamo.reset()
    compiled_step = torch.compile(opt.step)  # the pre-hook runs inside the compiled step (graph breaks allowed)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        sgs(X).pow(2).sum().backward()
        compiled_step()
        assert_equal_grads(now(sgs), want)


def test_autocast_and_grad_scaler():
    plain = TinyNet()
    sgs = sgs_fx.transform(plain)
    sgs_fx.set_scales(sgs, random_scales(sgs, dtype=torch.float32))
    scales = sgs_fx.get_scales(sgs)
    x = torch.randn(2, 3, 16, 16)
    runs = []
    for m in (plain, sgs):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x).float().pow(2).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)  # unscales, then steps: S applies to the unscaled gradient
        runs.append(now(m))
    for name, want in scaled_grads(runs[0], scales).items():
        torch.testing.assert_close(runs[1][name], want, rtol=1e-6, atol=0)  # same bf16 conv math both runs


def test_half_precision_gradient_is_multiplied_by_float32_S_and_rounded_once():
    sgs = sgs_fx.transform(net()).to(torch.bfloat16)
    scales = scaled(sgs)
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    x = X.to(torch.bfloat16)
    ref = plain_grads(net().to(torch.bfloat16), x)
    got = step_grads(sgs, opt, x)
    for conv in scales:
        w = f"{conv}.weight"
        assert torch.equal(got[w], (ref[w].float() * scales[conv].float()).to(torch.bfloat16)), w


@pytest.fixture
def fused(monkeypatch):
    """The GPU's fused multiply (an index gather of S, one foreach multiply), taken on a CPU."""
    from sgs_fx import step as step_module

    monkeypatch.setattr(step_module, "_fused_path", lambda g: True)
    return step_module


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_fused_multiply_is_S_times_G_with_each_gradient_s_own_strides(fused, memory_format):
    sgs = sgs_fx.transform(net()).to(memory_format=memory_format)
    scales = scaled(sgs)
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    want = scaled_grads(plain_grads(net().to(memory_format=memory_format), X), scales)
    assert_equal_grads(step_grads(sgs, opt, X), want)
    (layout,) = fused._GATHERS[opt].values()
    for view, conv in zip(layout.views, sgs_fx.instrumented(sgs).values()):
        # equal sizes and strides: what torch's fused foreach path needs (one kernel for every conv on a GPU)
        assert view.shape == conv.weight.grad.shape and view.stride() == conv.weight.grad.stride()
        assert conv.weight.grad.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("path", ["broadcast", "fused"])
def test_S_rewritten_in_place_through_data_is_the_S_of_the_next_step(path, request):
    if path == "fused":
        request.getfixturevalue("fused")
    sgs, opt, _ = stepped()
    step_grads(sgs, opt, X)
    G = plain_grads(net(), X)
    for seed in (3, 4):
        torch.manual_seed(seed)
        new = {n: torch.rand(3, 3, dtype=torch.float64) + 0.5 for n in sgs_fx.instrumented(sgs)}
        for n, conv in sgs_fx.instrumented(sgs).items():
            conv.sgs_scale.data.copy_(new[n])  # no version bump, same storage
        assert_equal_grads(step_grads(sgs, opt, X), scaled_grads(G, new))


def test_data_parallel_replicas_leave_the_scaling_to_the_step(monkeypatch):
    from test_wrappers import _cpu_replicate

    replicate = _cpu_replicate(monkeypatch)
    sgs, opt, scales = stepped()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)

    def data_parallel(inp):
        replicas = replicate(sgs, [0, 1])
        return torch.cat([replicas[0](inp[:2]), replicas[1](inp[2:])])

    want = scaled_grads(plain_grads(net(), x), scales)
    for _ in range(2):
        got = step_grads(sgs, opt, x, call=data_parallel)
        for name, g in want.items():  # the two halves are summed in another order
            assert (got[name] - g).abs().max().item() <= 1e-10, name


# --- what reads the gradient before the step, and updates that no step makes -------------------------------

def test_clipping_and_autograd_grad_see_G_under_step_and_S_times_G_under_hook():
    G = plain_grads(net(), X)
    for scaling in ("step", "hook"):
        sgs = sgs_fx.transform(net(), scaling=scaling)
        scales = scaled(sgs)
        want = G if scaling == "step" else scaled_grads(G, scales)
        (g,) = torch.autograd.grad(sgs(X).pow(2).sum(), [sgs[0].weight])
        assert torch.equal(g, want["0.weight"]), scaling
        sgs.zero_grad()
        sgs(X).pow(2).sum().backward()
        norm = nn.utils.clip_grad_norm_(sgs.parameters(), max_norm=1e9)  # the norm clipping compares
        assert norm.item() == pytest.approx(torch.stack([v.norm() for v in want.values()]).norm().item(), rel=1e-12)


def test_scale_gradients_applies_S_once_before_the_step():
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)
    opt.zero_grad()
    sgs(X).pow(2).sum().backward()
    assert sgs_fx.scale_gradients(sgs) == 3
    assert_equal_grads(now(sgs), want)  # clip the scaled gradient here, if that is what you want
    opt.step()
    assert_equal_grads(now(sgs), want)  # the step left them alone
    assert sgs_fx.scale_gradients(sgs_fx.transform(net(), scaling="hook")) == 0  # hook: .grad is S ⊙ G already


def test_clipping_and_unscaling_after_scale_gradients_do_not_scale_again():
    # the documented use: clip S ⊙ G (clip_grad_norm_ multiplies in place), or GradScaler's unscale_ first
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)
    opt.zero_grad()
    sgs(X).pow(2).sum().backward()
    sgs_fx.scale_gradients(sgs)
    nn.utils.clip_grad_norm_(sgs.parameters(), max_norm=1e9)  # a factor of 1, but an in-place multiply
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert_equal_grads(now(sgs), want)
    with pytest.raises(TypeError, match="expects the transformed model"):
        sgs_fx.scale_gradients(opt)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_hand_written_update_warns_once_and_names_the_way_out(compiled):
    sgs, _, _ = stepped()
    torch._dynamo.reset()
    call = torch.compile(sgs, backend="aot_eager") if compiled else sgs  # the warning comes from the backward

    def iteration():
        call(X).pow(2).sum().backward()
        with torch.no_grad():
            for p in sgs.parameters():
                p -= 0.1 * p.grad
        sgs.zero_grad()  # the usual loop: gradients gone before the next backward

    iteration()
    if compiled:  # (a compiled forward notes no version: the reference is taken at the second pending gradient)
        iteration()
    with pytest.warns(UserWarning, match=r"scale_gradients.*scaling='hook'"):
        iteration()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iteration()  # once


@pytest.mark.parametrize("case", ["clamp_between_micro_batches", "max_norm_in_forward", "clamp_after_each_step"])
def test_weights_changed_beside_the_optimizer_in_accumulation_raise_no_warning(case):
    sgs, _, _ = stepped()
    opt = torch.optim.SGD(sgs.parameters(), lr=0.1)

    def clamp():
        with torch.no_grad():
            for p in sgs.parameters():
                p.clamp_(-10, 10)

    if case == "max_norm_in_forward":  # EEGNet's constraint, written in the forward
        sgs.register_forward_pre_hook(lambda m, args: clamp())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(6):
            sgs(X).pow(2).sum().backward()
            if case == "clamp_between_micro_batches":
                clamp()
            if i % 3 == 2:  # three micro-batches a step
                opt.step()
                opt.zero_grad()
                if case == "clamp_after_each_step":
                    clamp()


@pytest.mark.parametrize("conv", [nn.Conv2d, Conv2dSame], ids=["torch_forward", "own_forward"])
def test_wgan_clipping_with_critic_gradients_from_the_generator_phase_raises_no_warning(conv):
    # the critic's weights are clamped after its step; the generator's backward then gives them a gradient that no
    # step uses and the next zero_grad throws away: nothing was updated with it
    gen = sgs_fx.transform(net())  # (2, 4, 7, 7) samples
    critic = sgs_fx.transform(nn.Sequential(conv(4, 3, 3), nn.ReLU(), conv(3, 2, 3)).double())
    real = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.01)
    opt_c = torch.optim.SGD(critic.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt_c.zero_grad()
            (critic(gen(X).detach()).mean() - critic(real).mean()).backward()
            opt_c.step()
            with torch.no_grad():
                for p in critic.parameters():
                    p.clamp_(-0.01, 0.01)
            opt_g.zero_grad()
            (-critic(gen(X)).mean()).backward()
            opt_g.step()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_first_half_of_sam_warns_at_its_second_backward(set_to_none):
    # SAM's ascent step uses .grad before any torch.optim step applied S; its second backward tells
    sgs, _, _ = stepped()
    opt = torch.optim.SGD(sgs.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sgs(X).pow(2).sum().backward()
        opt.step()  # the last step's end: the weights' reference
        sgs.zero_grad()
        sgs(X).pow(2).sum().backward()
        with torch.no_grad():
            for p in sgs.parameters():
                p.add_(0.05 * p.grad)  # the perturbation, with the unscaled G
        sgs.zero_grad(set_to_none=set_to_none)
    with pytest.warns(UserWarning, match="such as SAM"):
        sgs(X).pow(2).sum().backward()
    opt.step()


def test_steps_with_no_zero_grad_between_them_scale_the_whole_grad_as_the_official_code_does():
    # docs/scaling.md: the step multiplies all of .grad, what the last step left in it too (S² ⊙ G₁ + S ⊙ G₂), as
    # the official in-place multiply after each backward does; nothing is inferred from the gradient tensor
    sgs, opt, scales = stepped()
    G = plain_grads(net(), X)
    official = {n: torch.zeros_like(g) for n, g in G.items()}
    opt.zero_grad()
    for _ in range(3):
        sgs(X).pow(2).sum().backward()
        opt.step()  # (lr 0: every backward gives the same G)
        official = scaled_grads({n: official[n] + G[n] for n in G}, scales)
        assert_equal_grads(now(sgs), official)
    torch.autograd.grad(sgs(X).pow(2).sum(), list(sgs.parameters()))  # a probe between steps changes nothing
    sgs(X).pow(2).sum().backward()
    opt.step()
    assert_equal_grads(now(sgs), scaled_grads({n: official[n] + G[n] for n in G}, scales))


def test_strip_between_backward_and_step_applies_the_pending_S():
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)
    sgs(X).pow(2).sum().backward()
    copy_ = sgs_fx.strip(sgs)  # a copy: the model's pending gradients are left to its step
    assert not any(p.grad is not None for p in copy_.parameters())
    plain = sgs_fx.strip(sgs, inplace=True)  # no step would scale them afterwards: S now
    opt.step()
    assert_equal_grads(now(plain), want)


def test_an_optimizer_outside_torch_optim_warns():
    class MySGD:  # not a torch.optim.Optimizer: no step hooks run
        def __init__(self, params):
            self.params = list(params)

        @torch.no_grad()
        def step(self):
            for p in self.params:
                p -= 0.1 * p.grad

    sgs, _, _ = stepped()
    opt = MySGD(sgs.parameters())
    sgs(X).pow(2).sum().backward()
    opt.step()
    sgs.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="before a torch.optim optimizer step applied S"):
        sgs(X).pow(2).sum().backward()


def _stale_warnings(caught):
    return [w for w in caught if "Build the optimizer after transform" in str(w.message)]


@pytest.mark.parametrize("case", ["plain", "hook", "lbfgs_closure", "a_step_before_any_backward", "two_copies",
                                  "swapped_original", "lookahead"])
def test_an_optimizer_built_before_transform_warns_once_and_names_the_fix(case):
    model = net()
    opt = (torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2) if case == "lbfgs_closure"
           else torch.optim.SGD(model.parameters(), lr=0.1))  # the mistake: built on the model transform copies
    if case == "lookahead":
        opt = _Lookahead(opt)
    sgs = sgs_fx.transform(model, scaling="hook" if case == "hook" else "step")
    if case == "two_copies":  # a second copy (another arm) must not hide the first one's mistake
        other = sgs_fx.transform(model)
    if case == "swapped_original":  # swap_tensors keeps the Parameter objects, and empties their __dict__
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            model.to(torch.float64)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)
    if case == "a_step_before_any_backward":
        opt.step()  # e.g. to initialise state: nothing to decide yet
    before = {n: p.detach().clone() for n, p in sgs.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            def closure():
                opt.zero_grad()
                loss = sgs(X).pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure) if case == "lbfgs_closure" else (closure(), opt.step())
    stale = _stale_warnings(caught)
    assert len(stale) == 1, [str(w.message) for w in caught]
    if case == "two_copies":
        assert all(p.grad is None for p in other.parameters())  # (alive, untouched)
    if case not in ("lbfgs_closure", "lookahead"):
        assert stale[0].filename == __file__  # points at the user's step
    assert all(torch.equal(p, before[n]) for n, p in sgs.named_parameters())  # what the warning is about


@pytest.mark.parametrize("case", ["built_after", "inplace", "the_original_trained_beside_a_copy", "holds_both",
                                  "baseline_skipping_a_conv", "baseline_with_a_frozen_conv"])
def test_no_stale_optimizer_warning_where_the_optimizer_trains_what_ran(case):
    model = net()
    run = model
    if case == "built_after":
        run = sgs_fx.transform(model)
        opt = torch.optim.SGD(run.parameters(), lr=0.1)
    elif case == "inplace":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = sgs_fx.transform(model, inplace=True)
    elif case == "holds_both":  # the copy's weights are stepped too
        run = sgs_fx.transform(model)
        opt = torch.optim.SGD([*model.parameters(), *run.parameters()], lr=0.1)
    else:  # a baseline trained with its own optimizer after its transformed copy was (the copy keeps gradients)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        copy_ = sgs_fx.transform(model)
        copy_(X).pow(2).sum().backward()
        if case == "baseline_with_a_frozen_conv":
            model[0].weight.requires_grad_(False)
        if case == "baseline_skipping_a_conv":  # a layer-drop step: the first conv gets no gradient
            run = lambda x: model[4](model[3](model[2](x.repeat(1, 2, 1, 1))))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.zero_grad()
            run(X).pow(2).sum().backward()
            opt.step()


def test_the_original_model_stays_picklable_after_transform():
    import io
    import pickle

    model = net()
    sgs_fx.transform(model)
    pickle.dumps(model)
    torch.save(model, io.BytesIO())


@pytest.mark.parametrize("case", ["plain_loop", "zero_grad_in_place", "scale_gradients_then_hand_update",
                                  "eval_between", "grad_scaler_skips", "load_state_dict", "frozen"])
def test_no_warning_where_S_was_applied(case):
    sgs, opt, _ = stepped()
    if case == "frozen":
        sgs.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.zero_grad(set_to_none=case != "zero_grad_in_place")
            out = sgs(X).pow(2).sum()
            if case == "frozen":
                continue
            scaler = torch.amp.GradScaler("cpu")
            (scaler.scale(out) if case == "grad_scaler_skips" else out).backward()
            if case == "scale_gradients_then_hand_update":
                sgs_fx.scale_gradients(sgs)
                with torch.no_grad():
                    for p in sgs.parameters():
                        p -= 0.1 * p.grad
            elif case == "grad_scaler_skips":  # an inf gradient: GradScaler skips the step, weights unchanged
                sgs[0].weight.grad[0, 0, 0, 0] = float("inf")
                scaler.step(opt)
                assert scaler._found_inf_per_device(opt)
            else:
                opt.step()
            if case == "eval_between":
                with torch.no_grad():
                    sgs.eval()(X)
                sgs.train()
            if case == "load_state_dict":
                sgs.load_state_dict(net().state_dict())


def test_torch_func_functional_call_with_plain_tensors_warns_under_step():
    from torch.func import functional_call, grad

    reference = net()
    params = {n: p.detach().clone() for n, p in reference.named_parameters()}
    G = grad(lambda ps: functional_call(reference, ps, (X,)).pow(2).sum())(params)
    for scaling in ("step", "hook"):
        sgs = sgs_fx.transform(net(), scaling=scaling)
        scales = scaled(sgs)

        def loss(ps):
            return functional_call(sgs, ps, (X,)).pow(2).sum()

        if scaling == "step":
            with pytest.warns(UserWarning, match="scaling='hook'"):
                got = grad(loss)(params)
            assert_equal_grads(got, G)  # unscaled, as the warning says
        else:
            assert_equal_grads(grad(loss)(params), scaled_grads(G, scales))  # per use


def test_adaptive_optimizer_warns_once(caplog):
    sgs, _, _ = stepped()
    opt = torch.optim.Adam(sgs.parameters(), lr=1e-3)
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        for _ in range(2):
            step_grads(sgs, opt, X)
    assert caplog.text.count("Adaptive optimizers") == 1


# --- distributed, strip, scheduler ----------------------------------------------------------------------------

def _fsdp_input():
    return torch.randn(4, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _fsdp2_worker(rank, world, init, out, reshard_after_backward):
    with gloo_group(rank, world, init):
        from torch.distributed.fsdp import fully_shard

        model = sgs_fx.transform(net())
        scaled(model)
        for m in model:
            if isinstance(m, nn.Conv2d):
                fully_shard(m)
        fully_shard(model)
        model.set_reshard_after_backward(reshard_after_backward)
        names, sharded = zip(*model.named_parameters())
        opt = torch.optim.SGD(sharded, lr=0.0)
        for _ in range(2):  # gradient accumulation across two backward passes
            model(_fsdp_input()[rank * 2:(rank + 1) * 2]).pow(2).sum().backward()
        opt.step()
        full = {n: p.grad.full_tensor() for n, p in zip(names, sharded)}  # (the module may hold unsharded ones now)
        if rank == 0:
            torch.save(full, out)


@pytest.mark.parametrize("reshard_after_backward", [True, False], ids=["resharded", "unsharded_at_step"])
def test_fsdp2_two_gloo_processes_full_gradient_is_S_times_G(reshard_after_backward):
    got = spawn_and_load(_fsdp2_worker, 2, reshard_after_backward)
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
    sgs, opt, _ = stepped()
    plain = sgs_fx.strip(sgs, inplace=True)
    assert all(type(m) in (nn.Conv2d, nn.ReLU) for m in plain)
    assert_equal_grads(step_grads(plain, opt, X), plain_grads(net(), X))


def test_mi_scheduler_calibrates_a_step_model():
    sgs = sgs_fx.transform(net())
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    batches = [(torch.randn(4, 3, 9, 9, dtype=torch.float64), torch.zeros(4)) for _ in range(2)]
    sched = sgs_fx.MIScheduler(sgs, batches, warmup=0, every=1)
    sched.step(0)
    scales = sgs_fx.get_scales(sgs)
    assert any(not torch.equal(s, torch.ones_like(s)) for s in scales.values())
    assert_equal_grads(step_grads(sgs, opt, X), scaled_grads(plain_grads(net(), X), scales))


def _kernel_rows_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 4, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 2)).double()


def _rank_input(rank):
    return torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + rank))


def _spatially_sharded_worker(rank, world, init, out):
    with gloo_group(rank, world, init):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        model = sgs_fx.transform(_kernel_rows_net())
        scaled(model)
        fully_shard(model, shard_placement_fn=lambda p: Shard(2) if p.dim() == 4 else None)  # along kernel rows
        names, params = zip(*model.named_parameters())
        opt = torch.optim.SGD(params, lr=0.0)
        model(_rank_input(rank)).pow(2).sum().backward()
        opt.step()
        full = {n: p.grad.full_tensor() for n, p in zip(names, params)}
        if rank == 0:
            torch.save(full, out)


def test_a_gradient_sharded_along_a_kernel_dim_is_scaled_exactly():
    # S is spatial, and FSDP2 may shard kernel rows: in a distributed job the hook scales each full gradient before
    # the reduce-scatter, so no rank needs its own slice of S
    got = spawn_and_load(_spatially_sharded_worker, 2)
    scales = scaled(sgs_fx.transform(_kernel_rows_net()))
    plain = _kernel_rows_net()
    for rank in range(2):
        (plain(_rank_input(rank)).pow(2).sum() / 2).backward()
    want = scaled_grads({n: p.grad for n, p in plain.named_parameters()}, scales)
    for name, g in want.items():
        assert (got[name] - g).abs().max().item() <= 1e-12, name  # (reduced in another order)
        if name.endswith("weight"):
            assert (got[name] - plain.get_parameter(name).grad).abs().max().item() > 1e-3, name  # S applied



def test_a_captured_step_multiplies_by_S_itself_not_a_cached_copy(monkeypatch):
    # a CUDA graph replays the multiply on the memory it was captured with: that must be S's own buffer, which
    # calibrations rewrite in place, not the copy of S materialised for eager steps
    from sgs_fx import step as step_module

    sgs, opt, _ = stepped()
    step_grads(sgs, opt, X)  # an eager step: the materialised copies exist now
    seen = []
    real = torch._foreach_mul_
    monkeypatch.setattr(step_module, "_capturing", lambda: True)
    monkeypatch.setattr(torch, "_foreach_mul_", lambda grads, scales: (seen.extend(scales), real(grads, scales)))
    step_grads(sgs, opt, X)
    buffers = [m.sgs_scale for m in sgs_fx.instrumented(sgs).values()]
    assert len(seen) == 3 and all(any(s is b for b in buffers) for s in seen)


# --- issue 26: what tells the step that a gradient is new cannot go stale ---------------------------------------

def _sgd_with_S_by_hand(model, scales, lr, updates, x=X):
    """SGD (no momentum) on a plain model, S applied to the conv weights' gradients by hand: the reference."""
    for _ in range(updates):
        model.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        with torch.no_grad():
            for n, p in model.named_parameters():
                conv = n.rsplit(".", 1)[0]
                g = scales[conv] * p.grad if n.endswith("weight") and conv in scales else p.grad
                p -= lr * g
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_scale_gradients_before_a_hand_written_update_with_zero_grad_in_place_applies_S_every_time():
    sgs, _, scales = stepped()
    want = _sgd_with_S_by_hand(net(), scales, 0.01, updates=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            sgs.zero_grad(set_to_none=False)  # the same .grad tensors every iteration
            sgs(X).pow(2).sum().backward()
            assert sgs_fx.scale_gradients(sgs) == 3
            with torch.no_grad():
                for p in sgs.parameters():
                    p -= 0.01 * p.grad
    for n, p in sgs.named_parameters():
        assert (p - want[n]).abs().max().item() <= 1e-12, n  # (the same ops, S applied at another moment)


def test_a_backward_after_scale_gradients_accumulates_S_times_G():
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X, backwards=2), scales)
    opt.zero_grad()
    sgs(X).pow(2).sum().backward()
    sgs_fx.scale_gradients(sgs)
    sgs(X).pow(2).sum().backward()  # accumulated onto S ⊙ G1: arrives scaled
    opt.step()
    for n, g in want.items():
        assert (now(sgs)[n] - g).abs().max().item() <= 1e-12, n


def test_clipping_the_scaled_gradient_after_a_step_grad_scaler_skipped():
    # the documented recipe: scale_gradients, clip S ⊙ G, then scaler.step; an inf skips a step
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000)
    for it in range(3):
        opt.zero_grad()
        scaler.scale(sgs(X).pow(2).sum()).backward()
        if it == 0:
            sgs[0].weight.grad[0, 0, 0, 0] = float("inf")
        scaler.unscale_(opt)
        assert sgs_fx.scale_gradients(sgs) == 3
        if it > 0:
            assert_equal_grads(now(sgs), want)  # what clipping sees
        norm = nn.utils.clip_grad_norm_(sgs.parameters(), max_norm=1e9)
        scaler.step(opt)
        scaler.update()
        assert (it == 0) == (not torch.isfinite(norm).item())
        if it > 0:
            assert_equal_grads(now(sgs), want)


def _fixed_input():
    return torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def _ddp_bucket_view_worker(rank, world, init, out):
    with gloo_group(rank, world, init):
        from torch.nn.parallel import DistributedDataParallel as DDP

        sgs = sgs_fx.transform(net())
        scaled(sgs)
        ddp = DDP(sgs, gradient_as_bucket_view=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
        said = []
        for _ in range(3):
            opt.zero_grad()  # set_to_none=True: DDP hands the same bucket views back at the next backward
            ddp(_fixed_input()).pow(2).sum().backward()
            said.append(sgs_fx.scale_gradients(sgs))
            said.append({n: p.grad.clone() for n, p in sgs.named_parameters()})
            opt.step()
        if rank == 0:
            torch.save(said, out)


def test_ddp_with_gradient_as_bucket_view_scale_gradients_every_iteration():
    said = spawn_and_load(_ddp_bucket_view_worker, 1)
    scales = scaled(sgs_fx.transform(net()))
    want = scaled_grads(plain_grads(net(), _fixed_input()), scales)
    assert said[0::2] == [3, 3, 3]
    for got in said[1::2]:  # (G computed in another process: its conv kernels may sum in another order)
        for name, g in want.items():
            assert (got[name] - g).abs().max().item() <= 1e-12, name


def _step_input(rank, step):
    return torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + rank))


def _wrapped_then_transformed_worker(rank, world, init, out):
    with gloo_group(rank, world, init):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = net()
        ddp = DDP(model, find_unused_parameters=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)
        sgs_fx.transform(ddp.module, inplace=True)  # after DDP and its optimizer, as Ultralytics' callback does
        scaled(model)
        for step in range(3):
            opt.zero_grad()
            ddp(_step_input(rank, step)).pow(2).sum().backward()
            opt.step()
        if rank == 0:
            torch.save(model.state_dict(), out)


def test_ddp_wrapped_before_an_in_place_transform_trains_exactly():
    # Ultralytics' trainer wraps its model in DDP and builds the optimizer before any callback runs; add_sgs then
    # transforms the wrapped module in place: DDP's reducer and the optimizer hold the same Parameters, each rank
    # scales before the reduction.
    got = spawn_and_load(_wrapped_then_transformed_worker, 2)
    scales = scaled(sgs_fx.transform(net()))
    plain = net()
    opt = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    for step in range(3):  # DDP's average of the two ranks' gradients, S on each conv weight, then SGD
        opt.zero_grad()
        sum(plain(_step_input(r, step)).pow(2).sum() for r in range(2)).div(2).backward()
        for name, s in scales.items():
            dict(plain.named_parameters())[f"{name}.weight"].grad.mul_(s)
        opt.step()
    for name, p in plain.state_dict().items():
        assert (got[name] - p).abs().max().item() <= 1e-12, name
    assert any((got[n] - p).abs().max().item() > 1e-6 for n, p in net().state_dict().items())  # it trained


def test_a_middle_param_group_changed_after_a_step_is_scaled():
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    sgs[2].weight.requires_grad_(False)
    groups = [[sgs[0].weight], [sgs[0].bias], [*sgs[4].parameters()]]  # (sgs[2] has no bias)
    opt = torch.optim.SGD([{"params": g} for g in groups], lr=0.0)
    sgs(X).pow(2).sum().backward()
    opt.step()
    sgs[2].weight.requires_grad_(True)
    opt.param_groups[1]["params"].append(sgs[2].weight)  # unfreezing a conv into the middle group, in place
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_equal_grads(step_grads(sgs, opt, X), scaled_grads(plain_grads(net(), X), scales))


def test_gradients_from_autograd_grad_assigned_to_grad_are_scaled_at_the_step():
    sgs, opt, scales = stepped()
    params = list(sgs.parameters())
    for g, p in zip(torch.autograd.grad(sgs(X).pow(2).sum(), params), params):
        p.grad = g
    opt.step()
    assert_equal_grads(now(sgs), scaled_grads(plain_grads(net(), X), scales))


def test_two_steps_without_a_backward_between_apply_S_once():
    sgs, opt, scales = stepped()
    want = scaled_grads(plain_grads(net(), X), scales)
    step_grads(sgs, opt, X)
    opt.step()
    assert_equal_grads(now(sgs), want)


def test_double_after_float_returns_to_the_float64_S_that_was_set():
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)  # float64, not representable in float32
    assert not all(torch.equal(s.float().double(), s) for s in scales.values())
    sgs.float().double()
    assert all(torch.equal(sgs_fx.get_scales(sgs)[n], s) for n, s in scales.items())
    direct = torch.full((3, 3), 0.75, dtype=torch.float32)
    sgs.float()
    sgs[0].sgs_scale.copy_(direct)  # written directly: the master copy no longer holds the S in force
    sgs.double()
    assert torch.equal(sgs[0].sgs_scale, direct.double())


def test_an_optimizer_that_stepped_before_an_inplace_transform_scales_after_it():
    # training goes on with the same optimizer (and the same Parameter objects) once the model is instrumented
    other = sgs_fx.transform(net())  # (an SGS model in the process: the plain optimizer's steps are looked at)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step_grads(model, opt, X)
    sgs_fx.transform(model, inplace=True)
    scales = scaled(model)
    assert_equal_grads(step_grads(model, opt, X), scaled_grads(plain_grads(net(), X), scales))
    sgs_fx.strip(model, inplace=True)
    assert_equal_grads(step_grads(model, opt, X), plain_grads(net(), X))
    assert sgs_fx.instrumented(other)


class _SometimesUsed(nn.Module):
    """A second conv used only where ``use`` is true (drop-path, MoE, conditional branches)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, use):
        y = torch.tanh(self.c1(x))
        return y + self.c2(y) if use else y


def _unused_input(rank, step):
    return torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(100 * step + rank))


def _unused_on_one_rank_worker(rank, world, init, out, ddp_kwargs):
    with gloo_group(rank, world, init):
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = sgs_fx.transform(_SometimesUsed().double())
        scaled(model)
        ddp = DDP(model, **ddp_kwargs)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(2):
            opt.zero_grad()
            ddp(_unused_input(rank, step), use=rank == 1).pow(2).sum().backward()
            opt.step()
        weights = [torch.empty_like(model.c2.weight) for _ in range(world)]
        dist.all_gather(weights, model.c2.weight.detach())
        if rank == 0:
            torch.save({"c2_per_rank": weights, "state": model.state_dict()}, out)


@pytest.mark.parametrize("ddp_kwargs", [{"find_unused_parameters": True}, {"static_graph": True}],
                         ids=["find_unused_parameters", "static_graph"])
def test_ddp_with_a_conv_unused_on_one_rank_keeps_the_ranks_equal_and_exact(ddp_kwargs):
    # rank 0 never computes c2's gradient, yet DDP writes rank 1's share into it: S must reach it on both ranks
    got = spawn_and_load(_unused_on_one_rank_worker, 2, ddp_kwargs)
    scales = scaled(sgs_fx.transform(_SometimesUsed().double()))
    plain = _SometimesUsed().double()
    for step in range(2):  # DDP's average of the two ranks' gradients, then S, then SGD
        plain.zero_grad()
        sum(plain(_unused_input(r, step), use=r == 1).pow(2).sum() for r in range(2)).div(2).backward()
        with torch.no_grad():
            for n, p in plain.named_parameters():
                conv = n.split(".")[0]
                p -= 0.1 * (scales[conv] * p.grad if n.endswith("weight") else p.grad)
    assert torch.equal(got["c2_per_rank"][0], got["c2_per_rank"][1])
    for n, p in plain.named_parameters():
        assert (got["state"][n] - p.detach()).abs().max().item() <= 1e-12, n


def test_functional_call_with_another_model_s_parameters_leaves_s_where_it_was():
    from torch.func import functional_call

    sgs, opt, scales = stepped()
    snapshot = net()  # e.g. an EMA copy's parameters, evaluated through the training model
    want = scaled_grads(plain_grads(net(), X), scales)
    opt.zero_grad()
    sgs(X).pow(2).sum().backward()
    with torch.no_grad():
        functional_call(sgs, dict(snapshot.named_parameters()), (X,))  # between backward and step
    opt.step()
    assert_equal_grads(now(sgs), want)
    torch._dynamo.reset()
    compiled = torch.compile(sgs, backend="aot_eager")  # compiled forwards never re-check the hook
    for _ in range(2):
        assert_equal_grads(step_grads(sgs, opt, X, call=compiled), want)


def test_functional_call_with_an_sgs_copy_s_parameters_leaves_them_to_their_own_hooks(caplog):
    from torch.func import functional_call

    sgs, _, scales = stepped()
    twin = copy.deepcopy(sgs)
    opt = torch.optim.SGD(twin.parameters(), lr=0.0)
    want = scaled_grads(plain_grads(net(), X), scales)
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        for _ in range(2):
            opt.zero_grad()
            functional_call(sgs, dict(twin.named_parameters()), (X,)).pow(2).sum().backward()
            opt.step()  # the twin's own records: S once, at its step
            assert_equal_grads(now(twin), want)
    assert "share one weight" not in caplog.text
    assert all(sgs_fx.ownership.scales_at_step(m) for m in sgs_fx.instrumented(sgs).values())


def test_a_closure_step_keeps_the_gradients_scale_gradients_scaled_before_it():
    # Lightning's accumulate_grad_batches=2 with scale_gradients in on_after_backward: the first micro-batch is
    # scaled before the step, the second inside the step's closure
    sgs, _, scales = stepped()
    want = scaled_grads(plain_grads(net(), X, backwards=2), scales)
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    opt.zero_grad()
    sgs(X).pow(2).sum().backward()
    sgs_fx.scale_gradients(sgs)

    def closure():
        loss = sgs(X).pow(2).sum()
        loss.backward()
        sgs_fx.scale_gradients(sgs)
        return loss

    opt.step(closure)
    for n, g in want.items():
        assert (now(sgs)[n] - g).abs().max().item() <= 1e-12, n


@pytest.mark.parametrize("legacy", ["weight_norm", "spectral_norm"])
def test_a_legacy_weight_wrapper_applied_after_transform_is_refused(legacy):
    sgs, _, _ = stepped()
    getattr(torch.nn.utils, legacy)(sgs[0])
    with pytest.raises(RuntimeError, match="parametrizations.weight_norm"):
        sgs(X)


def test_a_model_saved_with_a_pending_gradient_trains_on_without_a_false_warning():
    import io

    sgs, _, scales = stepped()
    sgs(X).pow(2).sum().backward()  # pending, and then saved (torch.save pickles the module, not its .grad)
    buffer = io.BytesIO()
    torch.save(sgs, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.zero_grad()
            loaded(X).pow(2).sum().backward()
            opt.step()


def _replaced_by_hand(conv):
    conv._parameters["weight"] = nn.Parameter(conv.weight.detach().clone())  # no setattr: the hook stays put
    return conv._parameters["weight"]


def test_an_ema_evaluated_through_the_model_each_epoch_never_touches_s():
    from torch.func import functional_call

    sgs, opt, scales = stepped()
    ema = dict(net().named_parameters())
    G1, G2 = plain_grads(net(), X), plain_grads(net(), 2 * X)
    want = scaled_grads({n: G1[n] + G2[n] for n in G1}, scales)
    for _ in range(3):
        for _ in range(2):
            opt.zero_grad()
            sgs(X).pow(2).sum().backward()
            with torch.no_grad():
                functional_call(sgs, ema, (X,))  # e.g. logging the EMA's loss between backward and step
            sgs(2 * X).pow(2).sum().backward()
            opt.step()
            for n, g in want.items():
                assert (now(sgs)[n] - g).abs().max().item() <= 1e-12, n
        with torch.no_grad():
            functional_call(sgs, ema, (X,))  # the epoch's EMA validation


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_weight_replaced_behind_the_module_is_scaled_once_at_every_step(compiled):
    sgs, _, scales = stepped()
    new = _replaced_by_hand(sgs[0])
    opt = torch.optim.SGD(sgs.parameters(), lr=0.0)
    torch._dynamo.reset()
    call = torch.compile(sgs, backend="aot_eager") if compiled else sgs
    want = scaled_grads(plain_grads(net(), X, backwards=2), scales)
    for _ in range(3):
        opt.zero_grad()
        call(X).pow(2).sum().backward()
        with torch.no_grad():
            sgs(X)  # an eager evaluation in between
        call(X).pow(2).sum().backward()
        opt.step()
        for n, g in want.items():
            assert (now(sgs)[n] - g).abs().max().item() <= 1e-12, n
    assert sgs[0].weight is new


def _enter_and_leave_a_job_worker(rank, world, init, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    sgs = sgs_fx.transform(net())
    scaled(sgs)
    sgs(_fixed_input()).pow(2).sum().backward()  # pending, before the job starts
    with gloo_group(rank, world, init):
        ddp = DDP(sgs)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
        ddp(2 * _fixed_input()).pow(2).sum().backward()  # accumulated onto the pending gradient
        opt.step()
        entered = {n: p.grad.clone() for n, p in sgs.named_parameters()}
        opt.zero_grad()
        sgs(_fixed_input()).pow(2).sum().backward()  # in the job, then leaving it mid-accumulation
        dist.barrier()
        dist.destroy_process_group()
        sgs(2 * _fixed_input()).pow(2).sum().backward()
        opt.step()
        torch.save({"entered": entered, "left": {n: p.grad.clone() for n, p in sgs.named_parameters()}}, out)
        dist.init_process_group("gloo", init_method=f"file://{init}_again", rank=rank, world_size=world)


def test_entering_and_leaving_a_distributed_job_mid_accumulation_applies_s_once():
    got = spawn_and_load(_enter_and_leave_a_job_worker, 1)
    scales = scaled(sgs_fx.transform(net()))
    plain = net()
    plain(_fixed_input()).pow(2).sum().backward()
    plain(2 * _fixed_input()).pow(2).sum().backward()
    want = scaled_grads({n: p.grad for n, p in plain.named_parameters()}, scales)
    for key in ("entered", "left"):
        for n, g in want.items():
            assert (got[key][n] - g).abs().max().item() <= 1e-12, (key, n)


def test_lbfgs_accumulating_chunks_and_a_clamp_after_each_step_raise_no_false_warning():
    sgs, _, scales = stepped()
    opt = torch.optim.LBFGS(sgs.parameters(), lr=0.1, max_iter=3)

    def closure():  # LBFGS moves the weights between its closure calls
        opt.zero_grad()
        loss = sgs(X[:1]).pow(2).mean() + sgs(X[1:]).pow(2).mean()
        sgs(X[:1]).pow(2).mean().backward()
        sgs(X[1:]).pow(2).mean().backward()
        return loss

    sgd = torch.optim.SGD(sgs.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
        for _ in range(3):  # max-norm style clamp after each step, two micro-batches a step
            sgd.zero_grad()
            for _ in range(2):
                sgs(X).pow(2).mean().backward()
            sgd.step()
            with torch.no_grad():
                sgs[0].weight.clamp_(-0.2, 0.2)


def test_a_hand_written_update_assigning_a_new_parameter_warns():
    sgs, _, _ = stepped()
    with pytest.warns(UserWarning, match="before a torch.optim optimizer step applied S"):
        for _ in range(2):
            sgs(X).pow(2).sum().backward()
            w = sgs[0].weight
            sgs[0].weight = nn.Parameter(w.detach() - 0.1 * w.grad)  # the pending gradient is left behind
