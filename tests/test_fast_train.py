"""The captured-step recipe (sgs_fx.cifar.fast_train) against a plain per-batch loop: same draws, same float32 weights."""
import math

import pytest
import torch
import torch.nn.functional as F

import sgs_fx
from sgs_fx.cifar.data import synthetic_cifar, to_float
from sgs_fx.cifar.fast_train import FastRecipe, FastTrainer, epoch_draws, train_fast
from sgs_fx.cifar.models import build_model

RECIPE = dict(model="vgg11_bn", width=0.125, epochs=3, batch_size=8, max_steps_per_epoch=4, warmup=1, every=1,
              seed=3)


@pytest.fixture(scope="module")
def data():
    return synthetic_cifar(n_train=64, n_test=32)


def naive_augment(img, oy, ox, flip, cy, cx, pad=4, cut=16):
    """One image (3, 32, 32) by hand: zero-pad, crop, mirror, cut a square out."""
    out = F.pad(img, (pad,) * 4)[:, oy:oy + 32, ox:ox + 32]
    if flip:
        out = out.flip(2)
    out = out.clone()
    out[:, max(0, cy - cut // 2):max(0, cy - cut // 2 + cut), max(0, cx - cut // 2):max(0, cx - cut // 2 + cut)] = 0
    return out


def plain_loop(recipe: FastRecipe, data, scales: list[dict] | None = None):
    """The recipe as anyone writes it, S applied by hand: per batch, per image, float lr, ``torch.optim.SGD`` on a
    plain, never-instrumented model (``acb_branches``: the real 3x3 + 1x3 + 3x1 blocks, which carry no S), and
    before each step every conv weight's ``.grad`` multiplied by its S (``scales[epoch]``: conv name -> S in force
    that epoch), the paper's update S ⊙ G. One float32 multiply per element, as the library's: the same rounding.

    fused=True as in the fast loop: torch's fused kernel rounds the update differently from its foreach kernel (an
    FMA), and what is under test is the loop and its S, not torch's arithmetic.
    """
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, width=recipe.width)
    if recipe.arm == "acb_branches":
        model = sgs_fx.transform(model, mode="branches", branches="acb")
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, fused=True)
    images = to_float(data.train_images)
    steps = recipe.max_steps_per_epoch
    for epoch in range(recipe.epochs):
        order, aug = epoch_draws(recipe, len(images), steps, epoch, torch.device("cpu"))
        for group in opt.param_groups:
            group["lr"] = recipe.min_lr + (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * epoch / recipe.epochs)) / 2
        model.train()
        for s in range(steps):
            idx = range(s * recipe.batch_size, (s + 1) * recipe.batch_size)
            x = torch.stack([naive_augment(images[order[i]], int(aug.crop_y[i]), int(aug.crop_x[i]), bool(aug.flip[i]),
                                           int(aug.cut_y[i]), int(aug.cut_x[i])) for i in idx])
            opt.zero_grad()
            F.cross_entropy(model(x), data.train_labels[order[list(idx)]]).backward()
            for name, s_conv in (scales[epoch] if scales else {}).items():
                model.get_submodule(name).weight.grad.mul_(s_conv)
            opt.step()
    return model


@pytest.mark.parametrize("arm", ["baseline", "sgs", "acb_fixed", "acb_branches"])
def test_fast_loop_ends_with_the_plain_loops_weights(arm, data):
    recipe = FastRecipe(arm=arm, **RECIPE)
    trainer = FastTrainer(recipe, data, "cpu")
    scales = []  # S in force in each epoch: what the fast loop's model holds after the epoch's MI calibration
    for epoch in range(recipe.epochs):
        trainer.train_epoch(epoch)
        scales.append(sgs_fx.get_scales(trainer.model))
    reference = plain_loop(recipe, data, scales if arm in ("sgs", "acb_fixed") else None)
    fast = trainer.model.state_dict()
    ref = reference.state_dict()
    assert fast.keys() == ref.keys()
    for name in ref:  # S applied twice, or not at all, by the library ends with other weights
        assert torch.equal(fast[name], ref[name]), name
    if arm == "acb_fixed":  # the S read back is the one the arm means
        acb = sgs_fx.equivalent_scales("acb", (3, 3))[0]
        assert all(torch.allclose(s.double(), acb / acb.mean()) for s in scales[0].values())
    if arm == "sgs":  # calibrated in epochs 1 and 2: S is not ones there, so the equal weights show S applied once
        assert trainer.mi.last_epoch == 2 and not all(torch.equal(s, torch.ones(3, 3)) for s in scales[1].values())
    if arm != "baseline":  # the arms really differ from the baseline
        base = plain_loop(FastRecipe(arm="baseline", **RECIPE), data).state_dict()
        assert not torch.equal(sgs_fx.strip(trainer.model).state_dict()["features.0.weight"], base["features.0.weight"])


def test_the_step_reads_lr_and_S_where_a_captured_graph_would(data):
    # A CUDA graph replays kernels on fixed addresses: every tensor the step reads must be rewritten in place,
    # never rebound, across epochs, lr changes and MI calibrations.
    recipe = FastRecipe(arm="sgs", **RECIPE)
    trainer = FastTrainer(recipe, data, "cpu")
    trainer.train_epoch(0)
    held = {"lr": trainer.lr, "cursor": trainer.cursor, "epoch_x": trainer.epoch_x, "epoch_y": trainer.epoch_y,
            "loss_sum": trainer.loss_sum, **{f"S {n}": m.sgs_scale for n, m in sgs_fx.instrumented(trainer.model).items()},
            **{f"param {n}": p for n, p in trainer.model.named_parameters()}}
    ptrs = {k: t.data_ptr() for k, t in held.items()}
    before = {k: t.clone() for k, t in held.items()}
    for epoch in (1, 2):  # both calibrate S (warm-up 1, every 1) and lower the lr
        trainer.train_epoch(epoch)
    assert trainer.opt.param_groups[0]["lr"] is trainer.lr
    scales = {f"S {n}": m.sgs_scale for n, m in sgs_fx.instrumented(trainer.model).items()}
    for k, t in held.items():
        now = scales.get(k, t)
        assert now.data_ptr() == ptrs[k], f"{k} was rebound"
        if k.startswith("S ") or k in ("lr", "epoch_x"):
            assert not torch.equal(now, before[k]), f"{k} did not change, so the test shows nothing"
    assert trainer.lr.item() == pytest.approx(recipe.min_lr + (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * 2 / 3)) / 2)


def test_run_reports_and_strips(data):
    recipe = FastRecipe(arm="acb_branches", **{**RECIPE, "epochs": 2})
    result = train_fast(recipe, data, "cpu")
    m = result.metrics
    assert m["train_images"] == 64 and m["test_images"] == 32 and m["steps_per_epoch"] == 4
    assert m["captured"] is False and m["captures"] == 0  # a CPU runs the same step eagerly
    assert m["steady_step_ms"] > 0 and m["calibrations"] == 0 and math.isfinite(m["final_loss"])
    assert not sgs_fx.instrumented(result.model)  # folded: a plain model, ready to export
    assert not result.model.training
    assert m["test_acc"] == FastTrainer(recipe, data, "cpu").accuracy(result.model)


def test_bad_recipes_are_refused(data):
    with pytest.raises(ValueError, match="arm 'mi'"):
        FastRecipe(arm="mi")
    with pytest.raises(ValueError, match="CUDA"):
        FastTrainer(FastRecipe(capture=True, **RECIPE), data, "cpu")
    with pytest.raises(ValueError, match="no full batch"):
        FastTrainer(FastRecipe(**{**RECIPE, "batch_size": 128}), data, "cpu")
