"""The paper's CIFAR-100 recipe (spec §4.3; its CIFAR-10 one is 600 epochs, wd 1e-4, S every 30 epochs from 20
batches), applied to CIFAR-10 and shared by the per-batch trainer (``train.py``) and the captured one
(``fast_train.py``): the fields both read, with the paper's values as defaults."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Recipe:
    model: str = "vgg11_bn"
    width: float = 1.0
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1  # cosine from lr at epoch 0 towards min_lr at `epochs`
    min_lr: float = 1e-6
    momentum: float = 0.9
    weight_decay: float = 5e-4  # coupled (SGD's weight_decay), never scaled by S (spec §1.1)
    k: float = 5  # MI scheduler (spec §4.2): S's sharpness, recalibration period in epochs, warm-up epochs
    every: int = 5
    warmup: int = 1
    mi_batches: int = 2
    seed: int = 0
    max_steps_per_epoch: int | None = None  # smoke runs
