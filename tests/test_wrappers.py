"""S survives everything that replaces, copies or re-wraps the weight Parameter (issues 9 and 22).

Each case below replaces or bypasses the Parameter object that SGS knows (the hook's, or the step's mark) and
checks, exactly in float64, that the gradient an optimizer step uses is still S ⊙ G (and every other gradient G),
under both scalings: every test runs once with ``scaling="step"`` (the default) and once with ``"hook"``.
"""
import functools
import warnings
import copy
import io
import logging

import pytest
import torch
from torch import nn

import sgs_fx
from helpers import Conv2dSame, TiedConvs, gloo_group, spawn_and_load


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, bias=False),
                         nn.ReLU(), nn.Conv2d(6, 4, 3)).double()


def scaled(model, seed=1):
    torch.manual_seed(seed)
    scales = {n: torch.rand(tuple(m.kernel_size), dtype=torch.float64) + 0.25
              for n, m in sgs_fx.instrumented(model).items()}
    sgs_fx.set_scales(model, scales)
    return sgs_fx.get_scales(model)


@pytest.fixture(autouse=True, params=["step", "hook"])
def scaling(request, monkeypatch):
    """Every test of this module under both scalings: ``sgs_fx.transform`` defaults to the parameter here."""
    if request.param == "step" and request.node.get_closest_marker("hook_only"):
        pytest.skip("scaling='hook' only (what scaling='step' does instead is tested in test_step.py)")
    monkeypatch.setattr(sgs_fx, "transform", functools.partial(_TRANSFORM, scaling=request.param))
    return request.param


_TRANSFORM = sgs_fx.transform


def grads(model, x, call=None, params=None, backwards=1):
    """The gradients an optimizer step uses: backward(s), then a step of SGD at lr 0 (weights unchanged)."""
    model.zero_grad(set_to_none=True)
    for _ in range(backwards):  # more than one: gradient accumulation
        (call if call is not None else model)(x).pow(2).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    return {n: p.grad.clone() for n, p in (params or dict(model.named_parameters())).items()}


def scaled_grads(plain, scales):
    """The gradients SGS must give: S ⊙ G for the weight of each conv in ``scales``, G for everything else."""
    out = {}
    for name, g in plain.items():
        conv = name.rsplit(".", 1)[0]
        out[name] = scales[conv].to(g.dtype) * g if name.endswith("weight") and conv in scales else g
    return out


def assert_equal_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def assert_exactly_scaled(got, plain, scales):
    assert_equal_grads(got, scaled_grads(plain, scales))


X = torch.randn(2, 3, 9, 9, dtype=torch.float64)


def _to_float32(m):
    return m.to(torch.float32)  # same Parameter objects, new S buffers


def _to_swapped(m):
    # torch's swap_tensors path keeps the Parameter objects but drops their hooks
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        return m.to(torch.float32)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def _assign(m):
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    return m


def _load_swapped(m):
    # load_state_dict swaps the tensors in (no attribute assignment) under the same flag
    state = {k: v.clone() for k, v in m.state_dict().items()}
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.load_state_dict(state)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    return m


def _set_attribute(m):
    m[2].weight = nn.Parameter(m[2].weight.detach().clone())
    return m


def _pickle(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("wrap", [_to_float32, _to_swapped, _assign, _load_swapped, _set_attribute, copy.deepcopy, _pickle],
                         ids=lambda f: getattr(f, "__name__", str(f)).strip("_"))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_replaced_or_copied_weights_keep_S(wrap, compiled):
    """Eager forwards re-check the hook; a compiled forward cannot, so each wrapper must re-attach it itself."""
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    out, plain = wrap(sgs), wrap(net())
    torch._dynamo.reset()
    call = torch.compile(out, fullgraph=True, backend="aot_eager") if compiled else out
    x = X.to(next(plain.parameters()).dtype)
    assert_exactly_scaled(grads(out, x, call=call), grads(plain, x), scales)
    assert_exactly_scaled(grads(out, x, call=call), grads(plain, x), scales)  # no second hook: not S² ⊙ G


def test_frozen_at_transform_then_unfrozen_keeps_S():
    frozen = net().requires_grad_(False)
    sgs = sgs_fx.transform(frozen, inplace=True)
    scales = scaled(sgs)
    sgs.requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(sgs, fullgraph=True, backend="aot_eager")  # no eager forward before the backward
    assert_exactly_scaled(grads(sgs, X, call=compiled), grads(net(), X), scales)


def test_torch_compile_after_load_state_dict_assign_keeps_S():
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    torch._dynamo.reset()
    compiled = torch.compile(sgs, fullgraph=True, backend="aot_eager")
    assert_exactly_scaled(grads(sgs, X, call=compiled), grads(net(), X), scales)
    _assign(sgs)  # new Parameter objects; the compiled forward cannot check them
    assert_exactly_scaled(grads(sgs, X, call=compiled), grads(net(), X), scales)


def same_net():
    torch.manual_seed(0)
    return nn.Sequential(Conv2dSame(3, 4, 3, stride=2)).double()


@pytest.mark.hook_only
@pytest.mark.parametrize("make", [net, same_net],
                         ids=["torch_forward", "own_forward"])
def test_functional_call_scales_the_tensors_passed_in(make):
    sgs = sgs_fx.transform(make())
    scales = scaled(sgs)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sgs.named_parameters()}
    torch.func.functional_call(sgs, params, (X,)).pow(2).sum().backward()
    assert_exactly_scaled({n: p.grad for n, p in params.items()}, grads(make(), X), scales)
    # and the module's own weights keep their hook, also for a compiled forward that cannot re-check it
    torch._dynamo.reset()
    compiled = torch.compile(sgs, fullgraph=True, backend="aot_eager")
    assert_exactly_scaled(grads(sgs, X, call=compiled), grads(make(), X), scales)


@pytest.mark.parametrize("derive", ["noise", "cast"])
@pytest.mark.parametrize("make", [net, same_net], ids=["torch_forward", "own_forward"])
def test_a_weight_computed_from_the_model_s_own_is_scaled_once(make, derive, monkeypatch):
    # weight noise, a cast, a first-order fast weight put in with functional_call: the gradient flows on to the
    # model's Parameters, whose own scaling applies S once (scaling that use as well gave S² ⊙ G)
    noise = {n: 1e-2 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(3))
             for n, p in make().named_parameters()}

    def call(model):
        ps = {n: p + noise[n] if derive == "noise" else p.float().double() for n, p in model.named_parameters()}
        return lambda x: torch.func.functional_call(model, ps, (x,))

    monkeypatch.setattr(sgs_fx.hooks, "_warned_plain", False)
    sgs = sgs_fx.transform(make())
    scales = scaled(sgs)
    plain = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (scaling="step": no "plain tensor" warning, S is applied)
        got = grads(sgs, X, call=lambda x: call(sgs)(x))
    assert_exactly_scaled(got, grads(plain, X, call=lambda x: call(plain)(x)), scales)


@pytest.mark.parametrize("make", [net, same_net], ids=["torch_forward", "own_forward"])
def test_functional_call_with_another_model_s_parameters_scales_them_per_use(make):
    sgs = sgs_fx.transform(make())
    scales = scaled(sgs)
    other = make()  # plain Parameters, which no SGS hook is on
    got = grads(other, X, call=lambda x: torch.func.functional_call(sgs, dict(other.named_parameters()), (x,)))
    assert_exactly_scaled(got, grads(make(), X), scales)


class _Hyper(nn.Module):
    """A hypernetwork on a conv backbone: the target conv's kernel is computed, for each call, from backbone features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.backbone = nn.Conv2d(3, 8, 3, padding=1).double()
        self.head = nn.Linear(8, 4 * 3 * 9).double()
        self.target = nn.Conv2d(3, 4, 3, padding=1).double()

    def kernel(self, x):
        return self.head(self.backbone(x).mean((0, 2, 3))).view(4, 3, 3, 3)

    def forward(self, x):
        return torch.func.functional_call(self.target, {"weight": self.kernel(x), "bias": self.target.bias}, (x,))


def test_a_twin_s_weights_cast_and_put_in_are_scaled_once_by_the_twin(monkeypatch):
    # an EMA / twin copy's parameters, cast, evaluated through the training model: the twin's own scaling applies S
    monkeypatch.setattr(sgs_fx.hooks, "_warned_plain", False)
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    twin, plain = copy.deepcopy(sgs), net()

    def cast(model, source):
        return lambda x: torch.func.functional_call(
            model, {n: p.float().double() for n, p in source.named_parameters()}, (x,))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = grads(twin, X, call=cast(sgs, twin))
    assert_exactly_scaled(got, grads(plain, X, call=cast(plain, plain)), scales)


def test_a_kernel_widened_from_the_conv_s_own_weight_scales_that_weight_once():
    # torch.cat([conv.weight, extra]): S reaches conv.weight through its own scaling; `extra` gets its G as it is
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    plain = net()
    extra = {m: torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4),
                            requires_grad=True) for m in ("sgs", "plain")}

    def widened(model, key):
        conv = model[0]
        w, b = torch.cat([conv.weight, extra[key]]), torch.cat([conv.bias, conv.bias[:2]])
        return lambda x: torch.func.functional_call(conv, {"weight": w, "bias": b}, (x,))

    for key, model in (("sgs", sgs), ("plain", plain)):
        model.zero_grad()
        widened(model, key)(X).pow(2).sum().backward()
        torch.optim.SGD(model.parameters(), lr=0.0).step()
    assert torch.equal(sgs[0].weight.grad, scales["0"] * plain[0].weight.grad)
    assert torch.equal(extra["sgs"].grad, extra["plain"].grad)


@pytest.mark.hook_only
def test_a_kernel_computed_from_other_sgs_weights_is_scaled_per_use():
    # the kernel depends on the SGS backbone's weight, but is not that weight in another form: its own use is scaled
    sgs = sgs_fx.transform(_Hyper())
    scales = scaled(sgs)
    plain = _Hyper()

    def forward(x):  # the plain model with S applied by hand: to the kernel's use, and to the backbone's weight
        k = plain.kernel(x)
        k.register_hook(lambda g: scales["target"] * g)
        return torch.func.functional_call(plain.target, {"weight": k, "bias": plain.target.bias}, (x,))

    plain.backbone.weight.register_hook(lambda g: scales["backbone"] * g)
    trained = ("backbone.weight", "backbone.bias", "head.weight", "head.bias", "target.bias")  # (target.weight: unused)
    got = grads(sgs, X, params={n: dict(sgs.named_parameters())[n] for n in trained})
    want = grads(plain, X, call=forward, params={n: dict(plain.named_parameters())[n] for n in trained})
    for n in trained:
        assert (got[n] - want[n]).abs().max().item() <= 1e-12, n  # (the same products, summed in another order)


def test_a_conversion_under_inference_mode_leaves_S_writable():
    # a validator's model.float() or .to(device) inside torch.inference_mode() (ultralytics does it to its EMA)
    sgs = sgs_fx.transform(net().float())
    scaled(sgs)
    with torch.inference_mode():
        sgs.float()  # (S is made again from its float64 master copy)
    assert not sgs[0].sgs_scale.is_inference()
    scales = scaled(sgs, seed=2)  # set_scales writes S in place, and the MI scheduler too
    assert_exactly_scaled(grads(sgs, X.float()), grads(net().float(), X.float()), scales)


def test_a_transform_under_inference_mode_leaves_S_writable():
    sgs = net()
    with torch.inference_mode():
        sgs_fx.transform(sgs, inplace=True)  # (in place: a copy's weights would be inference tensors too)
    scales = scaled(sgs)  # a new S buffer, for which the hook is made again at once
    torch._dynamo.reset()
    compiled = torch.compile(sgs, backend="aot_eager")  # (a compiled forward cannot re-check the hook)
    assert_exactly_scaled(grads(sgs, X, call=compiled), grads(net(), X), scales)


def test_a_weight_made_under_inference_mode_runs():
    # a conv fused for inference under torch.inference_mode (ultralytics' validator): its new weight is an inference
    # tensor, which has no version counter and takes no hook
    sgs = sgs_fx.transform(net())
    with torch.inference_mode():
        sgs[0].weight = nn.Parameter(sgs[0].weight.detach().clone(), requires_grad=False)
        sgs(X)
    with torch.no_grad():  # (outside inference mode, as torch allows it)
        for _ in range(2):
            assert torch.equal(sgs(X), net()(X))


@pytest.mark.hook_only
def test_per_sample_gradients_with_vmap_are_S_times_G():
    from torch.func import functional_call, grad, vmap

    def per_sample(model):
        params = {n: p.detach() for n, p in model.named_parameters()}
        loss = lambda ps, x: functional_call(model, ps, (x[None],)).pow(2).sum()  # noqa: E731
        return vmap(grad(loss), in_dims=(None, 0))(params, X)

    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    assert_exactly_scaled(per_sample(sgs), per_sample(net()), scales)


def test_strip_inplace_removes_the_hook():
    sgs = sgs_fx.transform(net())
    scaled(sgs)
    sgs(X)
    plain = sgs_fx.strip(sgs, inplace=True)
    assert_exactly_scaled(grads(plain, X), grads(net(), X), {})


def test_repeated_transform_and_forward_scale_once():
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    for _ in range(3):
        sgs(X)
        sgs = sgs_fx.transform(sgs, inplace=True)
    assert_exactly_scaled(grads(sgs, X), grads(net(), X), scales)


def test_tied_weight_is_scaled_per_use(caplog):
    torch.manual_seed(0)
    model = TiedConvs().double()
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs = sgs_fx.transform(model)
    assert "a, b share a weight Parameter" in caplog.text
    sa, sb = torch.rand(3, 3, dtype=torch.float64) + 0.5, torch.rand(3, 3, dtype=torch.float64) + 0.5
    with caplog.at_level(logging.WARNING, logger="sgs_fx"):
        sgs_fx.set_scales(sgs, {"a": sa, "b": sb})
    assert "a, b share one weight but have different S" in caplog.text
    sa, sb = sgs_fx.get_scales(sgs)["a"], sgs_fx.get_scales(sgs)["b"]
    # S_a ⊙ G_a + S_b ⊙ G_b: the per-use gradients, taken from the plain model with a hook on each use
    uses = {}
    torch.manual_seed(0)
    plain = TiedConvs().double()
    w = plain.a.weight

    def conv(x, name):
        wi = w.view_as(w)
        wi.register_hook(lambda g: uses.__setitem__(name, g))
        return nn.functional.conv2d(x, wi, plain.__getattr__(name).bias, padding=1)

    conv(torch.relu(conv(X, "a")), "b").pow(2).sum().backward()
    got = grads(sgs, X)["a.weight"]
    assert (got - (sa * uses["a"] + sb * uses["b"])).abs().max().item() <= 1e-12
    assert (got - w.grad).abs().max().item() > 1e-3  # and the scaling is real


def test_a_tied_weight_put_in_noised_is_scaled_per_use():
    # tied convs scale per use, nothing scales at the weight: a tensor computed from it is scaled at each use too
    torch.manual_seed(0)
    sgs = sgs_fx.transform(TiedConvs().double())
    sa, sb = torch.rand(3, 3, dtype=torch.float64) + 0.5, torch.rand(3, 3, dtype=torch.float64) + 0.5
    sgs_fx.set_scales(sgs, {"a": sa, "b": sb})
    sa, sb = sgs_fx.get_scales(sgs)["a"], sgs_fx.get_scales(sgs)["b"]
    torch.manual_seed(0)
    plain = TiedConvs().double()
    noise = 1e-2 * torch.randn(3, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def forward(model, scale_a, scale_b):
        w = model.a.weight + noise
        h = torch.func.functional_call(model.a, {"weight": scale_a(w), "bias": model.a.bias}, (X,))
        return torch.func.functional_call(model.b, {"weight": scale_b(w), "bias": model.b.bias}, (torch.relu(h),))

    forward(sgs, lambda w: w, lambda w: w).pow(2).sum().backward()
    forward(plain, lambda w: sgs_fx.scale_grad(w, sa), lambda w: sgs_fx.scale_grad(w, sb)).pow(2).sum().backward()
    torch.optim.SGD(sgs.parameters(), lr=0.0).step()
    assert torch.equal(sgs.a.weight.grad, plain.a.weight.grad)


def _fsdp2_worker(rank, world, init, out):
    with gloo_group(rank, world, init):
        from torch.distributed.fsdp import fully_shard

        model = sgs_fx.transform(net(), scaling="hook")  # (a spawned process: the fixture's default is not here)
        scaled(model)
        for m in model:
            if isinstance(m, nn.Conv2d):
                fully_shard(m)
        fully_shard(model)
        x = torch.randn(4, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        for _ in range(2):  # gradient accumulation across two backward passes
            model(x[rank * 2:(rank + 1) * 2]).pow(2).sum().backward()
        full = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(full, out)


@pytest.mark.hook_only  # scaling="step" under FSDP2: test_step.py
def test_fsdp2_two_gloo_processes_full_gradient_is_S_times_G():
    got = spawn_and_load(_fsdp2_worker, 2)
    scales = scaled(sgs_fx.transform(net()))
    plain = net()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        (plain(x).pow(2).sum() / 2).backward()  # FSDP2 averages over the 2 ranks
    for name, p in plain.named_parameters():
        conv = name.rsplit(".", 1)[0]
        expected = scales[conv] * p.grad if name.endswith("weight") else p.grad
        assert (got[name] - expected).abs().max().item() <= 1e-12, name
        if name.endswith("weight"):
            assert (got[name] - p.grad).abs().max().item() > 1e-3, name  # S really applied


class _FunctionalConv(nn.Module):
    """A conv written as ``F.conv2d`` with the module's own kernel (instrumented as a graph node once traced)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.kernel = nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64))
        self.head = nn.Conv2d(4, 2, 3).double()

    def forward(self, x):
        return self.head(torch.relu(nn.functional.conv2d(x, self.kernel, padding=1)))


class _KernelInChild(nn.Module):
    """``F.conv2d`` with a child's kernel: traced, the conv is a graph node (torch's ``replicate`` cannot copy a
    GraphModule that holds parameters itself, so the kernel sits in a child module)."""

    def __init__(self):
        super().__init__()
        self.inner = _FunctionalConv()

    def forward(self, x):
        return nn.functional.conv2d(x, self.inner.kernel, padding=1)


def _cpu_replicate(monkeypatch):
    """torch's own ``replicate`` (what nn.DataParallel runs at every forward), its CUDA broadcast replaced by
    CPU views: autograd sums the replicas' gradients into the original Parameters, as Broadcast's backward does."""
    import importlib

    module = importlib.import_module("torch.nn.parallel.replicate")

    def broadcast(tensors, devices, detach=False):
        return [[t.detach().clone() if detach else t.view_as(t) for t in tensors] for _ in devices] if tensors else []

    monkeypatch.setattr(module, "_broadcast_coalesced_reshape", broadcast)
    return module.replicate


def _weight_normed():
    torch.manual_seed(0)
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.Conv2d(4, 2, 3)).double()


@pytest.mark.parametrize("make", [net, same_net, lambda: TiedConvs().double(), _FunctionalConv,
                                  lambda: torch.fx.symbolic_trace(_KernelInChild()), _weight_normed],
                         ids=["torch_forward", "own_forward", "tied_per_use", "functional", "graph_node",
                              "parametrized"])
def test_data_parallel_replicas_keep_S(make, monkeypatch):
    _check_data_parallel(sgs_fx.transform(make()), monkeypatch)


def _check_data_parallel(sgs, monkeypatch):
    replicate = _cpu_replicate(monkeypatch)
    scaled(sgs)
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    direct = grads(sgs, x)  # the model's own forward: S ⊙ G, tested above per wrapper

    def data_parallel(inp):  # two replicas, half the batch each, replicated at every call as DataParallel does
        replicas = replicate(sgs, [0, 1])
        return torch.cat([replicas[0](inp[:2]), replicas[1](inp[2:])])

    unscaled = grads(sgs_fx.strip(sgs), x)
    for _ in range(2):
        got = grads(sgs, x, call=data_parallel)
        for name, g in direct.items():  # not bit-exact: the two halves are summed in another order
            assert (got[name] - g).abs().max().item() <= 1e-10, name
    assert max((direct[n] - unscaled[n]).abs().max().item() for n in direct) > 1e-3  # S is not ones
    for name, g in grads(sgs, x).items():  # and the original still scales on its own afterwards
        assert torch.equal(g, direct[name]), name


def test_data_parallel_hooks_a_weight_replaced_behind_the_module(monkeypatch):
    # the original's forward, which re-checks the hook, never runs under DataParallel: replication checks it
    replicate = _cpu_replicate(monkeypatch)
    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    sgs[2]._parameters["weight"] = nn.Parameter(sgs[2].weight.detach().clone())  # no __setattr__, no re-attach
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)

    def data_parallel(inp):
        replicas = replicate(sgs, [0, 1])
        return torch.cat([replicas[0](inp[:2]), replicas[1](inp[2:])])

    got, plain = grads(sgs, x, call=data_parallel), grads(net(), x)
    for name, g in plain.items():
        conv = name.rsplit(".", 1)[0]
        expected = scales[conv] * g if name.endswith("weight") and conv in scales else g
        assert (got[name] - expected).abs().max().item() <= 1e-10, name


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_keeps_S(reentrant):
    # the forward runs again inside backward (reentrant: under a backward of its own)
    from torch.utils.checkpoint import checkpoint

    sgs = sgs_fx.transform(net())
    scales = scaled(sgs)
    x = X.clone().requires_grad_(reentrant)  # the reentrant variant needs an input that requires grad
    got = grads(sgs, x, call=lambda inp: checkpoint(sgs, inp, use_reentrant=reentrant))
    assert_exactly_scaled(got, grads(net(), X), scales)


def _graph_of_functional_conv():
    return torch.fx.symbolic_trace(_FunctionalConv())


@pytest.mark.parametrize("wrap", [_to_float32, _to_swapped, _assign, _load_swapped, copy.deepcopy, _pickle],
                         ids=lambda f: getattr(f, "__name__", str(f)).strip("_"))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("make", [_FunctionalConv, _graph_of_functional_conv], ids=["functional_call", "graph_node"])
def test_replaced_or_copied_weights_keep_S_of_calls_and_graph_nodes(make, wrap, compiled, scaling):
    """The parameter behind an F.conv call or a graph node belongs to another module, whose to() and
    load_state_dict run after the SGS holder's: graph nodes scale per use, calls re-attach after a load (hook) or
    are scaled by the step, which holds the Parameter object itself (step)."""
    sgs = sgs_fx.transform(make())
    scales = scaled(sgs)
    s_kernel = next(s for name, s in scales.items() if name.endswith("kernel"))
    out, plain = wrap(sgs), wrap(make())
    torch._dynamo.reset()
    call = torch.compile(out, fullgraph=True, backend="aot_eager") if compiled else out
    x = X.to(next(plain.parameters()).dtype)
    if make is _FunctionalConv and wrap is _to_swapped and compiled:
        # the swap dropped the call's hook (under "step", the one that records gradients) and a compiled forward
        # cannot re-attach it: refused, not lost
        with pytest.raises(Exception, match="run one eager forward before the compiled one"):
            call(x)
        out(x)  # one eager forward re-attaches it
    got, expected = grads(out, x, call=call), grads(plain, x)
    for _ in range(2):  # a second step: no second hook
        got, expected = grads(out, x, call=call), grads(plain, x)
        for name, g in expected.items():
            s = s_kernel if name == "kernel" else scales["head"] if name == "head.weight" else torch.ones(())
            want = (s * g.double()).to(g.dtype)  # rounded once from float64 (float32 after to(): 1 ulp apart)
            tol = 0 if g.dtype == torch.float64 else 2 ** -23
            assert torch.allclose(got[name], want, rtol=tol, atol=0), name
