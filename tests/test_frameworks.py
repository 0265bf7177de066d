"""SGS inside the frameworks users train with (issue 22): a Lightning Trainer, Hugging Face accelerate, timm's
optimizer and scheduler. In each, the weights after training equal a hand computation that multiplies the
gradients by S before the same optimizer's step, and a resumed run ends identical to an uninterrupted one."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sgs_fx


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def dataset(dtype=torch.float64, n=16):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g))


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def scale_by_hand(model, scales):
    """What SGS does at the step, written out: each selected conv weight's gradient times its S."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            conv = name.rsplit(".", 1)[0]
            if name.endswith("weight") and conv in scales:
                p.grad.mul_(scales[conv].to(p.grad.dtype))


def assert_same(a, b, tol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol, k


# --- Lightning ------------------------------------------------------------------------------------------------

def _lightning():
    return pytest.importorskip("lightning")


def _lit(model, lr=0.1):
    L = _lightning()

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)

    return Lit()


def _trainer(epochs, precision, callbacks, **kw):
    L = _lightning()
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, precision=precision, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     num_sanity_val_steps=0, **kw)


def test_lightning_fit_with_clipping_equals_the_hand_computation():
    from sgs_fx.integrations.lightning import SGSCallback

    loader = DataLoader(dataset(), batch_size=4, shuffle=False)
    lit = _lit(sgs_fx.transform(net().double()))
    callback = SGSCallback(warmup=0, every=5)  # S from the data at epoch 0, then fixed
    _trainer(1, "64-true", [callback], gradient_clip_val=0.05, enable_checkpointing=False).fit(lit, loader)
    scales = sgs_fx.get_scales(lit.net)
    assert not all(torch.equal(s, torch.ones_like(s)) for s in scales.values())
    # by hand: clip the unscaled gradient (Lightning clips inside the closure it passes to step), then S, then SGD
    plain = net().double()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    clipped = 0
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        clipped += nn.utils.clip_grad_norm_(plain.parameters(), 0.05).item() > 0.05
        scale_by_hand(plain, scales)
        opt.step()
    assert clipped  # the clipping was active
    assert_same(weights(lit.net), weights(plain), tol=1e-12)


def test_lightning_bf16_resume_from_a_checkpoint_ends_identical(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sgs_fx.integrations.lightning import SGSCallback

    loader = DataLoader(dataset(torch.float32), batch_size=4, shuffle=False)

    def fit(epochs, ckpt_dir=None, ckpt_path=None):
        lit = _lit(sgs_fx.transform(net()))
        callbacks = [SGSCallback(warmup=0, every=5)]  # S only at epoch 0: a resume must restore it, not recompute
        if ckpt_dir:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True))
        _trainer(epochs, "bf16-mixed", callbacks, gradient_clip_val=1.0,
                 enable_checkpointing=bool(ckpt_dir)).fit(lit, loader, ckpt_path=ckpt_path)
        return lit, callbacks[0]

    whole, cb = fit(2)
    fit(1, ckpt_dir=tmp_path)
    resumed, cb_resumed = fit(2, ckpt_dir=tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    assert_same(weights(resumed.net), weights(whole.net))
    assert cb_resumed.scheduler.last_recompute == cb.scheduler.last_recompute == 0
    assert not all(torch.equal(a, b) for a, b in zip(weights(whole.net).values(), weights(_lit(net()).net).values()))


# --- accelerate -----------------------------------------------------------------------------------------------

def _accelerate_run(epochs, state_dir=None, load=False, save_after=None):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = sgs_fx.transform(net().double())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    loader = DataLoader(dataset(), batch_size=4, shuffle=False)
    sched = sgs_fx.MIScheduler(model, loader, warmup=0, every=5)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    accelerator.register_for_checkpointing(sched)
    start = 0
    if load:
        accelerator.load_state(state_dir)
        start = save_after
    for epoch in range(start, epochs):
        sched.step(epoch)
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                opt.step()
                opt.zero_grad()
        if save_after is not None and not load and epoch + 1 == save_after:
            accelerator.save_state(state_dir)
            break
    return accelerator.unwrap_model(model), sched


def test_accelerate_with_gradient_accumulation_equals_the_hand_computation():
    model, sched = _accelerate_run(1)
    scales = sgs_fx.get_scales(model)
    plain = net().double()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    batches = list(DataLoader(dataset(), batch_size=4, shuffle=False))
    for i in range(0, len(batches), 2):  # two micro-batches per step, each loss divided by 2 (accelerate does)
        opt.zero_grad()
        for x, y in batches[i:i + 2]:
            (F.cross_entropy(plain(x), y) / 2).backward()
        scale_by_hand(plain, scales)
        opt.step()
    assert_same(weights(model), weights(plain), tol=1e-12)


def test_accelerate_resume_with_save_state_ends_identical(tmp_path):
    whole, _ = _accelerate_run(2)
    _accelerate_run(2, state_dir=tmp_path / "state", save_after=1)
    resumed, sched = _accelerate_run(2, state_dir=tmp_path / "state", load=True, save_after=1)
    assert sched.last_recompute == 0  # restored, not recomputed from the epoch-1 weights
    assert_same(weights(resumed), weights(whole))


# --- timm -----------------------------------------------------------------------------------------------------

def _timm_run(model, epochs, by_hand=None, state=None, stop=None):
    pytest.importorskip("timm")
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    opt = create_optimizer_v2(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)  # Nesterov; no decay on biases
    lr_sched = CosineLRScheduler(opt, t_initial=epochs)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr"])
        start = state["epoch"]
    for epoch in range(start, epochs if stop is None else stop):
        lr_sched.step(epoch)
        for x, y in DataLoader(dataset(), batch_size=4, shuffle=False):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if by_hand is not None:
                scale_by_hand(model, by_hand)
            opt.step()
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "lr": lr_sched.state_dict(), "epoch": epochs if stop is None else stop}


def test_timm_optimizer_and_scheduler_equal_the_hand_computation_and_resume():
    sgs = sgs_fx.transform(net().double())
    sgs_fx.set_scales(sgs, {n: torch.rand(3, 3, dtype=torch.float64) + 0.5 for n in sgs_fx.instrumented(sgs)})
    scales = sgs_fx.get_scales(sgs)
    whole = _timm_run(sgs, 2)
    plain = _timm_run(net().double(), 2, by_hand=scales)
    assert_same(whole["model"], plain["model"], tol=1e-12)
    # resumed from the state after epoch 1 into a fresh SGS model: identical to the uninterrupted run
    fresh = sgs_fx.transform(net().double(), scales=scales)
    half = _timm_run(fresh, 2, stop=1)
    again = sgs_fx.transform(net().double(), scales=scales)
    resumed = _timm_run(again, 2, state=half)
    assert_same(resumed["model"], whole["model"])


def test_lightning_callback_names_a_missing_forward_and_takes_a_model():
    L = _lightning()
    from sgs_fx.integrations.lightning import SGSCallback

    class NoForward(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = sgs_fx.transform(net().double())

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(dataset(), batch_size=4, shuffle=False)
    with pytest.raises(TypeError, match="defines no forward.*model=lambda pl: pl.net"):
        _trainer(1, "64-true", [SGSCallback(warmup=0)], enable_checkpointing=False).fit(NoForward(), loader)
    lit = NoForward()
    callback = SGSCallback(warmup=0, model=lambda pl: pl.net)
    _trainer(1, "64-true", [callback], enable_checkpointing=False).fit(lit, loader)
    assert not all(torch.equal(s, torch.ones_like(s)) for s in sgs_fx.get_scales(lit.net).values())


# --- Hugging Face Trainer -------------------------------------------------------------------------------------

@pytest.mark.slow  # transformers is in the zoo extra, which `make test-slow` installs
def test_hugging_face_trainer_steps_s_times_its_clipped_gradient(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[zoo]'; make test-slow installs it)")
    from helpers import random_scales, sgd_step_on_copies

    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = sgs_fx.transform(transformers.ResNetForImageClassification(config).double())
    sgs_fx.set_scales(model, random_scales(model, torch.Generator().manual_seed(1)))
    scales = sgs_fx.get_scales(model)
    assert len(scales) == 3  # the 7x7 stem and the two 3x3 convs (its 1x1 shortcut is not selected)
    g = torch.Generator().manual_seed(2)
    examples = [{"pixel_values": torch.randn(3, 16, 16, generator=g, dtype=torch.float64),
                 "labels": int(torch.randint(0, 3, (1,), generator=g))} for _ in range(12)]
    weights = {id(sgs_fx.instrumented(model)[n].weight): n for n in scales}

    class StepCheck(transformers.TrainerCallback):
        """Before each step: the optimizer's own SGD on copies, with S ⊙ G for the conv weights and G for the rest
        (G is what the Trainer left in .grad: clipped, unscaled). After it: the weights it wrote."""

        def __init__(self):
            self.expected, self.steps = None, []

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            grads = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    grads[id(p)] = None if p.grad is None else p.grad * scales[weights[id(p)]] \
                        if id(p) in weights else p.grad
            self.expected = sgd_step_on_copies(optimizer, grads)

        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            actual = {id(p): p.detach().clone() for group in optimizer.param_groups for p in group["params"]}
            self.steps.append((self.expected, actual, optimizer))

    check = StepCheck()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), optim="sgd", optim_args="momentum=0.9,nesterov=True", learning_rate=0.1,
        weight_decay=1e-3, max_grad_norm=0.05, lr_scheduler_type="constant", per_device_train_batch_size=4,
        num_train_epochs=1, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=examples, callbacks=[check]).train()

    assert len(check.steps) == 3
    inner = getattr(check.steps[0][2], "optimizer", check.steps[0][2])  # accelerate's wrapper holds torch's
    assert type(inner) is torch.optim.SGD and inner.param_groups[0]["nesterov"]
    assert set(weights) <= set(check.steps[0][1])  # every SGS weight is stepped by the Trainer's optimizer
    for expected, actual, _ in check.steps:
        assert expected.keys() == actual.keys()
        for key in actual:
            assert torch.equal(actual[key], expected[key])
