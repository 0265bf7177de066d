"""The paper's CIFAR recipe at the GPU's speed: the whole training step captured once and replayed (issue 21).

A run trains one *arm* — the plain baseline, MI-driven SGS, SGS with the fixed ACB-equivalent S, or real ACB
branches folded at the end — with the recipe of spec §4.3: SGD momentum 0.9, coupled weight decay 5e-4,
cosine lr from 0.1 per epoch, batch 128, random crop 32 pad 4 + horizontal flip + cutout 16.

A step at CIFAR sizes is bound by host-side work (a few hundred kernel launches, the optimizer's Python,
the augmentation of each batch), not by the GPU's arithmetic. So everything a step touches lives on the device
at a fixed address:

* the normalised training images, and this epoch's augmented images and labels, written in place by one
  batched augmentation at the start of the epoch (``data.draw_augmentation`` + ``apply_augmentation``);
* a step cursor (which batch of the epoch), advanced inside the step;
* the learning rate, a tensor that the fused SGD reads and that each epoch rewrites in place;
* S, the SGS convs' buffers, which the MI scheduler rewrites in place (``set_scales`` copies);
* the sum of the epoch's losses, read once per epoch.

On CUDA, after ``warmup_steps`` eager steps (cuDNN's algorithm search, the momentum buffers), one CUDA graph of
the step — batch selection, forward in bf16 autocast, backward, S applied to the conv gradients
(``scaling="step"``: one foreach multiply in the optimizer's pre-hook), fused SGD update, loss sum — is captured
and replayed for every later step of the run: never re-captured, never recompiled, no host sync inside an epoch.
The MI calibration runs eagerly between epochs.

On a CPU (or with ``capture=False``) the same step runs eagerly, and ends with the same float32 weights as a
plain per-batch loop over the same draws with ``torch.optim.SGD`` (tested). Static shapes mean each epoch
trains on ``N // batch_size`` full batches of a fresh permutation (the last partial batch is dropped).

Application layer, like ``train.py``: the core never imports it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sgs_fx

from .data import Cifar10, apply_augmentation, draw_augmentation, to_float
from .models import build_model
from .recipe import Recipe

logger = logging.getLogger("sgs_fx")

ARMS = ("baseline", "sgs", "acb_fixed", "acb_branches")


@dataclass
class FastRecipe(Recipe):
    """One run of the recipe. ``None`` device options mean: on for CUDA, off elsewhere."""

    arm: str = "baseline"  # one of ARMS
    crop_pad: int = 4
    cutout: int = 16
    capture: bool | None = None  # one CUDA graph of the step
    bf16: bool | None = None  # bf16 autocast of forward and backward
    channels_last: bool | None = None
    warmup_steps: int = 3  # eager steps before the capture
    compile: bool = False  # torch.compile the model's forward and backward (fused kernels) inside the captured step

    def __post_init__(self):
        if self.arm not in ARMS:
            raise ValueError(f"arm {self.arm!r}: use one of {', '.join(ARMS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch={self.max_steps_per_epoch}: use None (every full batch) or >= 1")
        if not self.width > 0:
            raise ValueError(f"width={self.width} must be > 0")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps={self.warmup_steps}: a capture needs at least one eager step first")


def cosine_lr(recipe: FastRecipe, epoch: int) -> float:
    """The learning rate of ``epoch``: cosine from ``lr`` at epoch 0 towards ``min_lr`` at ``epochs``."""
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * epoch / recipe.epochs))


def epoch_draws(recipe: FastRecipe, n: int, steps: int, epoch: int, device: torch.device):
    """(image order, augmentation draws) of one epoch: its first ``steps * batch_size`` images of a fresh
    permutation of ``n``, each with its crop, flip and cutout; a function of (seed, epoch) alone."""
    g = torch.Generator(device=device).manual_seed(recipe.seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g, device=device)[:steps * recipe.batch_size]
    aug = draw_augmentation(len(order), 32, 32, g, crop_pad=recipe.crop_pad, cutout=recipe.cutout)
    return order, aug


def build_arm(recipe: FastRecipe, device: torch.device) -> nn.Module:
    """The arm's model, initialised from ``recipe.seed`` (every arm of a seed starts from the same weights)."""
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, width=recipe.width).to(device)
    if recipe.arm == "baseline":
        return model
    if recipe.arm == "acb_branches":
        return sgs_fx.transform(model, mode="branches", branches="acb")
    model = sgs_fx.transform(model)
    if recipe.arm == "acb_fixed":
        sgs_fx.set_scales(model, {n: sgs_fx.equivalent_scales("acb", m.kernel_size)[0]
                                  for n, m in sgs_fx.instrumented(model).items()})
    return model


@dataclass
class FastResult:
    """A finished run: the deployable model (stripped, eval mode, on the training device) and its numbers."""

    model: nn.Module
    metrics: dict = field(default_factory=dict)


class FastTrainer:
    """Trains one arm on ``data`` with the captured step; ``run()`` returns a ``FastResult``."""

    def __init__(self, recipe: FastRecipe, data: Cifar10, device: torch.device | str):
        self.recipe = recipe
        self.device = device = torch.device(device)
        cuda = device.type == "cuda"
        self.capture = cuda if recipe.capture is None else recipe.capture
        if self.capture and not cuda:
            raise ValueError("FastRecipe(capture=True) needs a CUDA device; a CPU runs the same step eagerly")
        self.bf16 = cuda if recipe.bf16 is None else recipe.bf16
        self.memory_format = torch.channels_last if (cuda if recipe.channels_last is None else recipe.channels_last) \
            else torch.contiguous_format
        self.train_x = to_float(data.train_images.to(device))  # (N, 3, 32, 32) normalised, float32
        self.train_y = data.train_labels.to(device)
        self.test_x = to_float(data.test_images.to(device))
        self.test_y = data.test_labels.to(device)
        n, bs = len(self.train_y), recipe.batch_size
        self.steps = n // bs if recipe.max_steps_per_epoch is None else min(n // bs, recipe.max_steps_per_epoch)
        if self.steps < 1:
            raise ValueError(f"{n} training images make no full batch of {bs}; lower batch_size")
        # the step's inputs, at fixed addresses for the whole run
        self.epoch_x = torch.empty(self.steps, bs, 3, 32, 32, device=device)
        self.epoch_y = torch.empty(self.steps, bs, dtype=torch.long, device=device)
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)
        self.lr = torch.tensor(cosine_lr(recipe, 0), dtype=torch.float32, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)

        self.model = build_arm(recipe, device).to(memory_format=self.memory_format)
        # the MI calibration runs self.model itself; only the training step runs the compiled forward
        self.forward = torch.compile(self.model) if recipe.compile else self.model
        # fused: one kernel for the update, and it reads the lr tensor on the device (capturable)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=recipe.momentum,
                                   weight_decay=recipe.weight_decay, fused=True)
        self.mi = None
        if recipe.arm == "sgs":
            self.mi = sgs_fx.MIScheduler(self.model, [], k=recipe.k, every=recipe.every, warmup=recipe.warmup,
                                         batches=recipe.mi_batches)
        self.graph = None
        self.captures = 0  # how often the step was captured: once per run, whatever the lr and S do
        self.capture_error: str | None = None

    # -- the step ------------------------------------------------------------------------------------------

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        # cache off: a cached bf16 copy of a weight would be captured once and never see the updates
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _step(self) -> None:
        """One training step on batch ``cursor`` of the epoch; only tensor ops, so that it can be captured."""
        x = self.epoch_x.index_select(0, self.cursor).squeeze(0).contiguous(memory_format=self.memory_format)
        y = self.epoch_y.index_select(0, self.cursor).squeeze(0)
        self.cursor.add_(1)
        with self._autocast():
            loss = F.cross_entropy(self.forward(x), y)
        loss.backward()
        self.opt.step()
        self.loss_sum.add_(loss.detach().float())

    def _eager_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._step()

    def _capture(self) -> None:
        """Capture ``_step`` once; every later step is ``self.graph.replay()``."""
        self.opt.zero_grad(set_to_none=True)  # the captured backward allocates .grad in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph
        self.captures += 1

    # -- an epoch ------------------------------------------------------------------------------------------

    def _prepare_epoch(self, epoch: int) -> None:
        order, aug = epoch_draws(self.recipe, len(self.train_y), self.steps, epoch, self.device)
        self.epoch_x.view(-1, 3, 32, 32).copy_(apply_augmentation(self.train_x[order], aug))
        self.epoch_y.view(-1).copy_(self.train_y[order])
        self.cursor.zero_()
        self.loss_sum.zero_()
        self.lr.fill_(cosine_lr(self.recipe, epoch))

    def _train_epoch(self, epoch: int) -> None:
        start = 0
        if self.capture and self.graph is None:
            # eager warm-up steps on a side stream (cuDNN's search, lazily built state), then one capture
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(min(self.recipe.warmup_steps, self.steps)):
                    self._eager_step()
                    start += 1
            torch.cuda.current_stream(self.device).wait_stream(side)
            if start < self.steps:
                try:
                    self._capture()
                except RuntimeError as exc:  # a run is still worth finishing: eagerly, and the metrics say so
                    logger.warning("sgs_fx.cifar.fast_train: capturing the step failed (%s); training eagerly", exc)
                    self.capture_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                    self.capture = False
                    self.opt.zero_grad(set_to_none=True)
        for _ in range(start, self.steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._eager_step()

    def _calibration_batches(self) -> list[Tensor]:
        """The first ``mi_batches`` batches of this epoch's augmented pass (spec §3.1: the training loader's)."""
        return [self.epoch_x[i].contiguous(memory_format=self.memory_format)
                for i in range(min(self.recipe.mi_batches, self.steps))]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_epoch(self, epoch: int) -> dict:
        """Prepare and train epoch ``epoch`` (calibrating S first when due): its seconds, calibration seconds
        (0 if none ran) and mean training loss."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self._sync()
        t0 = time.perf_counter()
        self._prepare_epoch(epoch)
        calibration_s = 0.0
        if self.mi is not None:
            self.mi.loader = self._calibration_batches()
            self._sync()
            t_cal = time.perf_counter()
            if self.mi.step(epoch):
                self._sync()
                calibration_s = time.perf_counter() - t_cal
        self.model.train()
        self._train_epoch(epoch)
        loss = self.loss_sum.item() / self.steps  # the epoch's one host sync
        if not math.isfinite(loss):
            raise FloatingPointError(f"{self.recipe.arm} seed {self.recipe.seed}, epoch {epoch}: the training loss "
                                     f"is {loss}; lower the learning rate")
        return {"epoch_s": time.perf_counter() - t0, "calibration_s": calibration_s, "loss": loss}

    def run(self, *, progress: bool = False) -> FastResult:
        """Train every epoch of the recipe; the result holds the stripped model and the run's numbers."""
        from tqdm.auto import tqdm

        recipe = self.recipe
        epochs = []
        t0 = time.perf_counter()
        bar = tqdm(range(recipe.epochs), desc=f"{recipe.arm} seed {recipe.seed}", leave=False,
                   disable=None if progress else True)
        for epoch in bar:
            epochs.append(self.train_epoch(epoch))
            bar.set_postfix(loss=f"{epochs[-1]['loss']:.3f}")
        train_s = time.perf_counter() - t0
        self.graph = None  # frees the graph's memory pool once the caller drops the trainer
        plain = sgs_fx.strip(self.model).eval()  # what is deployed: branches folded, no instrumentation
        calibration_s = [e["calibration_s"] for e in epochs]
        metrics = {
            **{k: v for k, v in asdict(recipe).items() if k not in ("capture", "bf16", "channels_last")},
            "train_images": len(self.train_y), "test_images": len(self.test_y), "steps_per_epoch": self.steps,
            "test_acc": self.accuracy(plain), "final_loss": epochs[-1]["loss"], "train_s": train_s,
            "first_epoch_s": epochs[0]["epoch_s"],
            "steady_step_ms": _steady_step_ms([e["epoch_s"] for e in epochs], calibration_s, self.steps),
            "calibrations": sum(c > 0 for c in calibration_s), "calibration_s": sum(calibration_s),
            "captured": self.captures == 1, "captures": self.captures, "capture_error": self.capture_error,
            "bf16": self.bf16,
            "channels_last": self.memory_format == torch.channels_last,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        }
        return FastResult(plain, metrics)

    @torch.no_grad()
    def accuracy(self, model: nn.Module, batch_size: int = 1000) -> float:
        correct = 0
        for i in range(0, len(self.test_y), batch_size):
            x = self.test_x[i:i + batch_size].contiguous(memory_format=self.memory_format)
            with self._autocast():
                correct += int((model(x).argmax(1) == self.test_y[i:i + batch_size]).sum())
        return correct / len(self.test_y)


def _steady_step_ms(epoch_s: list[float], calibration_s: list[float], steps: int) -> float | None:
    """Mean time of a step after the first epoch (which captures), MI calibrations taken out."""
    if len(epoch_s) < 2:
        return None
    return (sum(epoch_s[1:]) - sum(calibration_s[1:])) / ((len(epoch_s) - 1) * steps) * 1e3


def train_fast(recipe: FastRecipe, data: Cifar10, device: torch.device | str, *, progress: bool = False) -> FastResult:
    """Train one arm with the captured step (see the module docstring)."""
    return FastTrainer(recipe, data, device).run(progress=progress)
