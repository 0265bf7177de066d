"""SGS in an Ultralytics training run: two callbacks on the trainer's own events (docs/ultralytics.md).

    import sgs_fx
    from sgs_fx.integrations.ultralytics import add_sgs
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")
    add_sgs(model)                                        # k=5, every=5, warmup=1, batches=2 (the paper's)
    model.train(data="coco8.yaml", epochs=100, optimizer="SGD")
    sgs_fx.strip(model.model, inplace=True)               # plain convs again, for fuse() and the exporter
    model.export(format="onnx")

YOLOv6/v7 and RT-DETR train RepVGG-style ``RepConv`` branches and fold them for deployment; SGS gives a plain
conv that training dynamics at a plain conv's cost (docs/ultralytics.md).

The trainer builds its model in ``_setup_train`` and, in the same call, its optimizer and its EMA copy, with no
event in between. ``on_pretrain_routine_end`` (right after) transforms the model *in place*: the Parameters stay
the same objects, so the optimizer already built steps them, and sgs_fx's step pre-hook multiplies their
gradients by S (after the trainer's ``clip_grad_norm_``, which clips G: the official code's order). The EMA copy
is transformed too, and every new S is written into it, so the checkpoints (``last.pt``/``best.pt`` pickle the
EMA model) carry S; the scheduler's state rides along as the EMA model's ``sgs_schedule`` attribute, from which
a resumed run (``train(resume=True)``) restores it. ``on_train_epoch_start`` runs the MI schedule on batches drawn
from the trainer's own training dataset (its augmentation and ``preprocess_batch`` included) through a separate
single-process loader, with Python's, NumPy's and torch's random states restored afterwards, so calibration
leaves the training stream as it was.

Checkpoints written with SGS unpickle SGS convs: load them with ``sgs_fx`` importable. Ultralytics' ``fuse()``
accepts an SGS model (the final validation of ``best.pt`` runs it); strip before exporting so the exported graph is
the plain model's. Only ``BaseTrainer``'s events and attributes are used; tested on one epoch of each task
(detection with resume, segmentation, pose, OBB, classification, RT-DETR). Multi-GPU: Ultralytics (8.4) pickles
the trainer's callbacks, these included, into the script each DDP worker rebuilds its trainer from (cloudpickle);
each worker transforms its DDP-wrapped model in place and the MI statistics are summed over the ranks. There S is
applied before the reduction, so the trainer clips S ⊙ G; the launching process's callbacks keep no scheduler. Needs
``ultralytics``; sgs_fx does not.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..passes.instrument import transform
from ..passes.registry import get_scales, set_scales
from ..passes.select import FilterFn
from ..scaling.scheduler import MIScheduler

try:
    from ultralytics.utils.torch_utils import unwrap_model
except ImportError as exc:
    raise ImportError("sgs_fx.integrations.ultralytics needs Ultralytics: pip install ultralytics") from exc

__all__ = ["SGSCallbacks", "add_sgs", "SCHEDULE_ATTR"]

logger = logging.getLogger("sgs_fx")

# the attribute of the EMA model (pickled into last.pt / best.pt) that holds the MI scheduler's state
SCHEDULE_ATTR = "sgs_schedule"


class SGSCallbacks:
    """Ultralytics callbacks that instrument the trainer's model and run ``sgs_fx.MIScheduler`` on its data.

    Args:
        k, every, warmup, batches, zero_removal, floor, keep_bytes: as ``sgs_fx.MIScheduler``.
        filter_fn, scaling: as ``sgs_fx.transform`` (default: every conv with all spatial kernel dims > 1; S at the
            optimizer's step).

    Register with ``add_sgs(model)`` (a ``YOLO``/``RTDETR`` model or a trainer), or ``register(model)``.
    ``scheduler`` is the ``MIScheduler`` once training has started.
    """

    def __init__(self, *, k: float = 5, every: int = 5, warmup: int = 1, batches: int = 2, zero_removal: bool = False,
                 floor: float = 1e-3, keep_bytes: int = 512 * 2**20, filter_fn: FilterFn | None = None,
                 scaling: str = "step"):
        self.options = dict(k=k, every=every, warmup=warmup, batches=batches, zero_removal=zero_removal, floor=floor,
                            keep_bytes=keep_bytes)
        self.transform_options = dict(filter_fn=filter_fn, scaling=scaling)
        self.scheduler: MIScheduler | None = None

    def register(self, target) -> SGSCallbacks:
        """Add the callbacks to ``target`` (anything with Ultralytics' ``add_callback(event, fn)``)."""
        target.add_callback("on_pretrain_routine_end", self.on_pretrain_routine_end)
        target.add_callback("on_train_epoch_start", self.on_train_epoch_start)
        return self

    # -- events ------------------------------------------------------------------------------------------
    def on_pretrain_routine_end(self, trainer) -> None:
        """Instrument the model (and its EMA copy) in place; on a resumed run, restore S and the schedule."""
        model = unwrap_model(trainer.model)  # torch.compile / DDP wrappers: their module is transformed in place
        transform(model, inplace=True, **self.transform_options)
        ema = _ema_model(trainer)
        if ema is not None:
            with _quiet():  # a copy of the model: its warnings (an untraceable forward) were just given
                transform(ema, inplace=True, **self.transform_options)
        _warn_unless_sgd(trainer.optimizer)
        self.scheduler = MIScheduler(model, _CalibrationBatches(trainer, self.options["batches"]), **self.options)
        state = _resumed_schedule(trainer)
        if state is not None:
            self.scheduler.load_state_dict(state)
            self._sync_ema(trainer)

    def on_train_epoch_start(self, trainer) -> None:
        """Apply the MI schedule for this epoch, then write S and the schedule into the EMA copy."""
        if self.scheduler is None:
            raise RuntimeError("sgs_fx.integrations.ultralytics: on_train_epoch_start ran before "
                               "on_pretrain_routine_end; register the callbacks before train() (add_sgs(model))")
        self.scheduler.step(trainer.epoch)
        self._sync_ema(trainer)

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def _sync_ema(self, trainer) -> None:
        # The EMA is what the checkpoints pickle. The trainer rebuilds it as a copy of the (SGS) model when it
        # reloads a checkpoint (NaN recovery), so it is instrumented whenever this runs.
        ema = _ema_model(trainer)
        if ema is None:
            return
        set_scales(ema, get_scales(self.scheduler.model))
        setattr(ema, SCHEDULE_ATTR, self.scheduler.state_dict())


def add_sgs(target, **options) -> SGSCallbacks:
    """SGS for the next ``train()`` of ``target`` (a ``YOLO``/``RTDETR`` model, or an Ultralytics trainer).

    ``options`` are ``SGSCallbacks``'s. Train with ``optimizer="SGD"``: SGS is defined for SGD, and
    ``optimizer="auto"`` picks AdamW (up to 10,000 iterations) or MuSGD (longer runs). Returns the callbacks
    (their ``scheduler`` holds S; after a multi-GPU run, S is in the checkpoints).
    """
    return SGSCallbacks(**options).register(target)


# -- helpers ---------------------------------------------------------------------------------------------------

def _ema_model(trainer) -> torch.nn.Module | None:
    ema = getattr(trainer, "ema", None)
    return getattr(ema, "ema", None) if ema is not None else None


@contextlib.contextmanager
def _quiet():
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _warn_unless_sgd(optimizer) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.SGD):
        logger.warning("sgs_fx.integrations.ultralytics: the trainer built %s; SGS is defined for SGD (an adaptive "
                       "optimizer almost cancels a fixed per-element gradient scale). Train with optimizer='SGD' "
                       "(optimizer='auto' picks AdamW up to 10,000 iterations, MuSGD beyond)",
                       type(optimizer).__name__)


def _resumed_schedule(trainer) -> dict | None:
    """The scheduler state saved in the checkpoint a resumed run started from, or None."""
    path = getattr(trainer.args, "resume", None) if getattr(trainer, "resume", False) else None
    if not path or not isinstance(path, str):
        return None
    from ultralytics.utils.patches import torch_load

    ckpt = torch_load(path, map_location="cpu", weights_only=False)
    saved = ckpt.get("ema") or ckpt.get("model")
    state = getattr(saved, SCHEDULE_ATTR, None)
    if state is None:
        logger.warning("sgs_fx.integrations.ultralytics: %s holds no SGS schedule (trained without SGS?); S is "
                       "computed afresh at the first epoch past warm-up", path)
    return state


class _CalibrationBatches:
    """The trainer's training images for one calibration: ``batches`` batches of a fresh pass over its dataset.

    A separate loader in this process (the trainer's own is an infinite loader: drawing from it would shift the
    epoch's batches). The dataset's augmentation and ``random``/NumPy draws of ``preprocess_batch`` (multi-scale)
    run on saved random states that are restored afterwards; the scheduler forks torch's.
    """

    def __init__(self, trainer, batches: int):
        self.trainer, self.batches = trainer, batches

    def __iter__(self):
        import numpy as np

        loader = self.trainer.train_loader
        dataset = loader.dataset
        states = random.getstate(), np.random.get_state()
        try:
            calibration = DataLoader(dataset, batch_size=loader.batch_size,
                                     shuffle=not getattr(dataset, "rect", False),  # rect: batch shapes by index
                                     collate_fn=loader.collate_fn, num_workers=0)
            images = [self.trainer.preprocess_batch(batch)["img"]
                      for batch in itertools.islice(calibration, self.batches)]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
        return iter(images)
