"""`sgs-fx train`: the paper's CIFAR-100 recipe (spec §4.3) on CIFAR-10, with and without SGS, resumable, DDP-ready.

SGD momentum 0.9, weight decay 5e-4, cosine lr from 0.1, batch 128, random crop + flip (+ cutout);
a checkpoint after every epoch (model, optimizer, lr schedule, MI scheduler, history) from which
``--resume`` continues exactly: every random draw of epoch e comes from generators seeded by
(seed, epoch, rank), so nothing random needs to be carried across the boundary.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sgs_fx

from .data import Cifar10, augment, load_cifar10, synthetic_cifar, to_float
from .models import build_model
from .recipe import Recipe

logger = logging.getLogger("sgs_fx")


@dataclass
class TrainConfig(Recipe):
    scales: str = "mi"  # "mi" (SGS, MI-driven), "none" (baseline), "acb" / "repvgg" / "skeleton" (fixed S)
    mode: str = "sgs"  # "sgs" or "branches" (real multi-branch blocks for the recipe in `scales`)
    scaling: str = "step"  # when SGS scales the gradients: "step" or "hook" (sgs_fx.transform's `scaling`)
    zero_removal: bool = False
    cutout: int = 0
    subset: int | None = None
    data: str = "cifar10"  # or "synthetic" (smoke tests)
    data_dir: str | None = None
    out: str = "runs/default"
    device: str = "auto"
    export: bool = True
    plots: bool = True
    progress: bool = True
    qat_epoch: int | None = None  # from this epoch (0-based) on: fake-quant INT8 training (QAT); None: float
    weight_bits: int = 7  # QAT weights: 7 (onnxruntime-exact on every x86 CPU) or 8 (VNNI / ARM)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


class NaNLossError(RuntimeError):
    pass


def _setup_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if device.type == "cuda":
        # this rank's GPU for every CUDA call and NCCL collective: without it each rank's barriers and
        # broadcasts use GPU 0 (NCCL: "Duplicate GPU detected", or a hang)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


def _load_data(cfg: TrainConfig, d: _Dist) -> Cifar10:
    if cfg.data == "synthetic":
        return synthetic_cifar(seed=cfg.seed)
    if d.world == 1:
        return load_cifar10(cfg.data_dir)
    # Under torchrun, one process per machine fetches and caches CIFAR-10 while the others wait, then they read
    # the cache: one download per machine, not one per rank into the same files.
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    data = load_cifar10(cfg.data_dir) if first else None
    dist.barrier()
    return data if first else load_cifar10(cfg.data_dir)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # under torchrun: the GPU of this process's local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _validate(cfg: TrainConfig) -> None:
    if cfg.scales not in ("mi", "none", "acb", "repvgg", "skeleton"):
        raise ValueError(f"--scales {cfg.scales!r}: use mi, none, acb, repvgg or skeleton")
    if cfg.mode not in ("sgs", "branches"):
        raise ValueError(f"--mode {cfg.mode!r}: use sgs or branches")
    if cfg.scaling not in ("hook", "step"):
        raise ValueError(f"--scaling {cfg.scaling!r}: use step or hook")
    if cfg.mode == "branches" and cfg.scales in ("mi", "none"):
        raise ValueError("--mode branches needs a recipe: --scales acb, repvgg or skeleton")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be >= 1")
    if cfg.qat_epoch is not None and not 0 <= cfg.qat_epoch < cfg.epochs:
        raise ValueError(f"--qat {cfg.qat_epoch}: QAT must start at an epoch in [0, {cfg.epochs - 1}] "
                         f"(0-based; --epochs is {cfg.epochs})")
    if cfg.weight_bits not in (7, 8):
        raise ValueError(f"--weight-bits {cfg.weight_bits}: use 7 or 8")
    build_model(cfg.model, width=cfg.width)  # raises a clear error for an unknown name
    _check_writable(Path(cfg.out))


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a probe file of its own: under torchrun every rank checks the same --out at the same time
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test"):
            pass
    except OSError as exc:
        raise ValueError(f"--out {out}: not writable ({exc.strerror}); choose another directory") from exc


# settings a resumed run may change: where it writes and runs, and what it reports
_FREE_ON_RESUME = ("out", "device", "progress", "plots", "export", "data_dir")


def _check_same_run(cfg: TrainConfig, out: Path, start: int) -> None:
    """``--resume`` continues exactly the run that ``out`` holds: a changed recipe would not (the lr schedule, the
    data, the S schedule are functions of the settings), so it is refused with the settings that differ. One
    change keeps the epochs done so far as they were: a QAT switch (``qat_epoch``) at or after ``start`` (a float
    run branched into fake-quant training)."""
    path = out / "config.json"
    if not path.exists():
        return
    saved, now = json.loads(path.read_text()), asdict(cfg)

    def compatible(k):
        if k == "qat_epoch":
            return all(e is None or e >= start for e in (saved[k], now[k]))
        return False

    differ = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in now
              if k in saved and k not in _FREE_ON_RESUME and saved[k] != now[k] and not compatible(k)]
    if differ:
        raise ValueError(f"--resume: the run in {out} was started with {', '.join(differ)}; resume it with the same "
                         "settings, or train into a new --out")


class EpochBatches:
    """The training batches of one epoch: a fixed shuffle (DistributedSampler) and seeded augmentation.

    Iterating twice gives the same batches, which is what the MI scheduler needs: its first batches are
    the ones this epoch trains on first.
    """

    def __init__(self, data: Cifar10, cfg: TrainConfig, epoch: int, d: _Dist, device: torch.device):
        from torch.utils.data import DistributedSampler

        n = len(data.train_labels) if cfg.subset is None else min(cfg.subset, len(data.train_labels))
        sampler = DistributedSampler(range(n), num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        self.indices = torch.tensor(list(sampler))
        self.data, self.cfg, self.device = data, cfg, device
        self.seed = (cfg.seed * 1_000_003 + epoch) * 64 + d.rank
        steps = len(self.indices) // cfg.batch_size
        self.steps = steps if cfg.max_steps_per_epoch is None else min(steps, cfg.max_steps_per_epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        bs = self.cfg.batch_size
        for i in range(self.steps):
            idx = self.indices[i * bs:(i + 1) * bs]
            x = to_float(self.data.train_images[idx].to(self.device, non_blocking=True))
            yield augment(x, gen, cutout=self.cfg.cutout), self.data.train_labels[idx].to(self.device)


def build(cfg: TrainConfig, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, width=cfg.width).to(device)
    if cfg.scales == "none":
        return model
    if cfg.mode == "branches":
        return sgs_fx.transform(model, mode="branches", branches=cfg.scales)
    model = sgs_fx.transform(model, scaling=cfg.scaling)
    if cfg.scales != "mi":  # fixed scales reproducing a branch recipe, at no structural cost
        sgs_fx.set_scales(model, {n: sgs_fx.equivalent_scales(cfg.scales, m.kernel_size)[0]
                                  for n, m in sgs_fx.instrumented(model).items()})
    return model


def optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's SGD over ``model``."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def qat_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The fake-quant version of a float model, built in place: same Parameter objects, SGS with its scales.

    A branch-mode model is folded first (as it would be deployed), so its parameters are new ones.
    """
    scales = sgs_fx.get_scales(model) if cfg.mode == "sgs" and cfg.scales != "none" else None
    plain = sgs_fx.strip(model, inplace=True)
    qat = sgs_fx.prepare_qat(plain, torch.zeros(2, 3, 32, 32, device=device), inplace=True,
                             qconfig_mapping=sgs_fx.qconfig_mapping(weight_bits=cfg.weight_bits))
    if scales is not None:
        qat = sgs_fx.transform(qat, inplace=True, scaling=cfg.scaling)
        sgs_fx.set_scales(qat, scales)
    return qat


def to_qat(model: nn.Module, opt: torch.optim.Optimizer, sched_lr, cfg: TrainConfig, device: torch.device):
    """Switch a float model to fake-quant training: (model, optimizer, lr schedule) to go on with.

    The parameters SGS keeps (``qat_model``) keep their momentum; folded branches start without.
    """
    qat = qat_model(model, cfg, device)
    new_opt = optimizer(qat, cfg)
    new_opt.param_groups[0].update({k: v for k, v in opt.param_groups[0].items() if k != "params"})
    new_opt.state.update({p: opt.state[p] for p in qat.parameters() if p in opt.state})
    new_sched = torch.optim.lr_scheduler.CosineAnnealingLR(new_opt, T_max=cfg.epochs, eta_min=cfg.min_lr)
    new_sched.load_state_dict(sched_lr.state_dict())
    return qat, new_opt, new_sched


def train(cfg: TrainConfig, *, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train as configured; returns the summary (also written to ``out/summary.json``).

    ``stop_at``: end after that many epochs (a later ``resume=True`` call goes on exactly).
    """
    _validate(cfg)
    device = _device(cfg.device)
    d = _setup_distributed(device)
    out = Path(cfg.out)
    data = _load_data(cfg, d)
    core = build(cfg, device)
    opt = optimizer(core, cfg)
    sched_lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.min_lr)
    history: dict = {"metrics": [], "scales": {}}
    start = 0
    ckpt_path = out / "checkpoint.pt"
    state = None
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        start = state["epoch"] + 1
        _check_same_run(cfg, out, start)
        if cfg.qat_epoch is not None and start > cfg.qat_epoch:  # the checkpoint holds the fake-quant model
            core, opt, sched_lr = to_qat(core, opt, sched_lr, cfg, device)
    model, mi = _wrap(core, cfg, d, device)
    if state is not None:
        core.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched_lr.load_state_dict(state["lr_scheduler"])
        if mi is not None:
            mi.load_state_dict(state["mi"])
        history = state["history"]
        if d.main:
            logger.info("resumed from %s at epoch %d", ckpt_path, start)
    metrics_path = out / "metrics.jsonl"
    if d.main:
        if not resume:
            metrics_path.write_text("")
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))  # (resumed: a later QAT switch, a new out)
    for epoch in range(start, cfg.epochs if stop_at is None else min(stop_at, cfg.epochs)):
        if epoch == cfg.qat_epoch:
            mi_state = mi.state_dict() if mi is not None else None
            core, opt, sched_lr = to_qat(core, opt, sched_lr, cfg, device)
            model, mi = _wrap(core, cfg, d, device)
            if mi is not None:
                mi.load_state_dict(mi_state)
            if d.main:
                logger.info("epoch %d: fake-quant training (QAT, %d-bit weights) from here on", epoch, cfg.weight_bits)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        batches = EpochBatches(data, cfg, epoch, d, device)
        if mi is not None:
            mi.loader = batches
            if mi.step(epoch):
                history["scales"][str(epoch)] = {n: s.tolist() for n, s in sgs_fx.get_scales(core).items()}
        t0 = time.perf_counter()
        train_loss, train_acc = _train_epoch(model, opt, batches, epoch, cfg, d)
        epoch_time = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            raise NaNLossError(f"epoch {epoch}: the training loss is {train_loss}; stopped. The checkpoint of the "
                               f"last good epoch is kept at {ckpt_path} (try a lower --lr).")
        test_loss, test_acc = evaluate(core, data, device, d)
        sched_lr.step()
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
               "test_acc": test_acc, "lr": opt.param_groups[0]["lr"], "epoch_time_s": epoch_time}
        history["metrics"].append(row)
        if d.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            _save(ckpt_path, {"model": core.state_dict(), "optimizer": opt.state_dict(),
                              "lr_scheduler": sched_lr.state_dict(), "mi": mi.state_dict() if mi else None,
                              "history": history, "epoch": epoch, "config": asdict(cfg)})
            logger.info("epoch %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1fs", epoch, train_loss,
                        train_acc, test_loss, test_acc, epoch_time)
        if d.world > 1:
            dist.barrier()
    summary = {"config": asdict(cfg), "final": history["metrics"][-1] if history["metrics"] else None,
               "best_test_acc": max((m["test_acc"] for m in history["metrics"]), default=None),
               "mean_epoch_time_s": sum(m["epoch_time_s"] for m in history["metrics"]) / max(1, len(history["metrics"])),
               "scales": {n: s.tolist() for n, s in sgs_fx.get_scales(core).items()} if cfg.scales != "none" else {}}
    if d.main:
        if cfg.export and len(history["metrics"]) == cfg.epochs:
            try:
                summary["onnx"] = export_summary(_export(core, data, out))
            except sgs_fx.ExportMismatchError as exc:  # the run and its file stay; the summary says it failed
                logger.warning("%s", exc)
                summary["onnx"] = export_summary(exc.report)
        if cfg.plots:
            from .plots import plot_run

            summary["plots"] = plot_run(history, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_trained(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The model of a checkpoint written by ``train`` (SGS, branches, or fake-quant after --qat)."""
    state = torch.load(path, map_location=device, weights_only=False)
    if not (isinstance(state, dict) and {"model", "config", "epoch"} <= set(state)):
        raise ValueError(f"{path} is not a checkpoint written by `sgs-fx train` (no model / config / epoch)")
    cfg = TrainConfig(**state["config"])
    device = torch.device(device)
    model = build(cfg, device)
    if cfg.qat_epoch is not None and state["epoch"] >= cfg.qat_epoch:
        model = qat_model(model, cfg, device)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def _wrap(core: nn.Module, cfg: TrainConfig, d: _Dist, device: torch.device):
    """(the model to train: DDP around ``core`` when distributed, its MI scheduler or None)."""
    model = core
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    mi = None
    if cfg.scales == "mi":
        mi = sgs_fx.MIScheduler(model, [], k=cfg.k, every=cfg.every, warmup=cfg.warmup, batches=cfg.mi_batches,
                                zero_removal=cfg.zero_removal, progress=False)
    return model, mi


def _export(core: nn.Module, data: Cifar10, out: Path) -> "sgs_fx.ExportReport":
    from ..export.qdq import has_quantization

    if has_quantization(core):  # QAT: INT8, checked on real test images (agreement needs real margins)
        check = data.agreement_images()
        return sgs_fx.export_onnx(core, out / "model_int8.onnx", check[:1], check_input=check)
    # real test images: the check draws its inputs around the example's mean and std (zeros gave it ~constant ones)
    return sgs_fx.export_onnx(core, out / "model.onnx", data.agreement_images(8))


def export_summary(report: "sgs_fx.ExportReport") -> dict:
    row = {"path": report.path, "passed": report.passed, "max_abs_diff": report.max_abs_diff,
           "exporter": report.exporter, "size_bytes": report.size_bytes, "quantized": report.quantized}
    if report.quantized:
        row.update(agreement=report.agreement, checked=report.checked, max_output_diff=report.max_output_diff,
                   int8_kernels={k: v for k, v in report.ort_ops.items() if k.startswith(("QLinear", "QGemm"))})
    else:
        row.update(output_scale=report.output_scale, allowed={b: report.tolerance(b) for b in report.max_abs_diff})
    return row


def _train_epoch(model, opt, batches, epoch, cfg, d) -> tuple[float, float]:
    from tqdm.auto import tqdm

    model.train()
    total = torch.zeros(3, dtype=torch.float64, device=next(model.parameters()).device)  # loss sum, correct, count
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                disable=None if (cfg.progress and d.main) else True)  # None: off when not a terminal
    for x, y in bar:
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            total += torch.stack([loss.detach().double() * len(y), (out.argmax(1) == y).sum().double(),
                                  torch.tensor(float(len(y)), dtype=torch.float64, device=total.device)])
        if not torch.isfinite(loss):
            break
        if bar.n % 10 == 0:
            bar.set_postfix(loss=f"{total[0].item() / total[2].item():.3f}", acc=f"{total[1].item() / total[2].item():.3f}")
    if d.world > 1:
        dist.all_reduce(total)
    return total[0].item() / max(1.0, total[2].item()), total[1].item() / max(1.0, total[2].item())


@torch.no_grad()
def evaluate(model: nn.Module, data: Cifar10, device, d: _Dist = _Dist(), batch_size: int = 500) -> tuple[float, float]:
    from ..quant import observers_frozen

    was = model.training
    model.eval()
    n = len(data.test_labels)
    total = torch.zeros(3, dtype=torch.float64, device=device)
    with observers_frozen(model):  # test images must not move a fake-quant model's ranges
        for i in range(d.rank * batch_size, n, batch_size * d.world):
            x = to_float(data.test_images[i:i + batch_size].to(device))
            y = data.test_labels[i:i + batch_size].to(device)
            out = model(x)
            total += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                                  (out.argmax(1) == y).sum().double(),
                                  torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    if d.world > 1:
        dist.all_reduce(total)
    model.train(was)
    return total[0].item() / total[2].item(), total[1].item() / total[2].item()


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a broken checkpoint
