"""SGS in a Lightning ``Trainer``: one callback computes S from mutual information on the paper's schedule.

    model = LitModel(net=sgs_fx.transform(net))          # S is applied at every optimizer step: nothing else to do
    trainer = Trainer(callbacks=[SGSCallback()])          # k=5, every=5, warmup=1, batches=2 (the paper's)

Lightning's automatic optimization passes a closure to ``optimizer.step``; sgs_fx's step pre-hook wraps it, so the
gradients the closure computes are scaled before the update (after Lightning's gradient clipping, which runs
inside the closure: the official code's order). The callback's ``state_dict`` is the scheduler's, so a fit resumed
from a checkpoint goes on with the S it saved. Needs ``lightning`` (or ``pytorch_lightning``); sgs_fx does not.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError("sgs_fx.integrations.lightning needs Lightning: pip install lightning") from exc

from ..scaling.scheduler import MIScheduler

__all__ = ["SGSCallback"]


def _lightning_forward():
    try:
        from lightning.pytorch import LightningModule
    except ImportError:
        from pytorch_lightning import LightningModule
    return LightningModule.forward


class SGSCallback(Callback):
    """Runs ``sgs_fx.MIScheduler`` at the start of every training epoch, on the trainer's training dataloader.

    Args:
        k, every, warmup, batches, zero_removal, floor, keep_bytes: as ``sgs_fx.MIScheduler``.
        input_fn: batch -> model input (default: the batch, or its first element); the LightningModule's
            ``forward`` is called with it, or ``model(pl_module)``'s if given.
        model: ``pl_module -> nn.Module`` that holds the instrumented convs and takes the input (default: the
            LightningModule itself).
    """

    def __init__(self, *, k: float = 5, every: int = 5, warmup: int = 1, batches: int = 2, zero_removal: bool = False,
                 floor: float = 1e-3, keep_bytes: int = 512 * 2**20, input_fn: Callable | None = None,
                 model: Callable | None = None):
        self.options = dict(k=k, every=every, warmup=warmup, batches=batches, zero_removal=zero_removal, floor=floor,
                            keep_bytes=keep_bytes, input_fn=input_fn)
        self.model_fn = model
        self.scheduler: MIScheduler | None = None
        self._pending: dict | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        if self.scheduler is None:
            target = self.model_fn(pl_module) if self.model_fn is not None else pl_module
            if self.model_fn is None and type(pl_module).forward is _lightning_forward():
                raise TypeError(
                    f"SGSCallback: {type(pl_module).__name__} defines no forward, which the MI calibration calls with "
                    "each batch's input; define forward, or pass model=lambda pl: pl.net (the module holding the SGS "
                    "convs) and, if the batch is not (input, ...), input_fn")
            self.scheduler = MIScheduler(target, loader, **self.options)
            if self._pending is not None:
                self.scheduler.load_state_dict(self._pending)
                self._pending = None
        self.scheduler.loader = loader
        self.scheduler.step(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is not None:
            return self.scheduler.state_dict()
        return dict(self._pending) if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)
