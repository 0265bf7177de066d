"""Small models and helpers shared by the tests."""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn


class Conv2dSame(nn.Conv2d):
    """timm-style 'SAME' padding conv: pads dynamically in its own forward."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm-style weight-standardised conv: normalises its weight in its own forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class TinyNet(nn.Module):
    """Every conv flavour the pass must cover, in one 2-D model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="reflect")
        self.grouped = nn.Conv2d(8, 8, (3, 5), padding=(1, 2), groups=2, padding_mode="circular")
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="replicate")
        self.same = Conv2dSame(8, 8, 3, stride=2)
        self.std = StdConv2d(8, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 8, 1)
        self.row = nn.Conv2d(8, 8, (1, 3), padding=(0, 1))
        self.even = nn.Conv2d(8, 8, 2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.strided(x))
        x = self.dilated(x) + x
        x = self.grouped(x)
        x = self.depthwise(x)
        x = self.same(x)
        x = self.std(x)
        x = self.row(self.point(x))
        x = self.even(x)
        return self.fc(x.mean((2, 3)))


DEFAULT_SELECTED = ["stem", "strided", "dilated", "grouped", "depthwise", "same", "std", "even"]


class Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > -1e30:  # always true, but data-dependent
            x = self.b(x)
        return x


def random_scales(model, generator=None, dtype=torch.float64):
    import sgs_fx

    return {n: torch.rand(tuple(m.kernel_size), generator=generator, dtype=dtype) + 0.2
            for n, m in sgs_fx.instrumented(model).items()}


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class TiedConvs(nn.Module):
    """Two convs sharing one weight Parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class gloo_group:
    """A 2-rank gloo process group for one ``mp.spawn`` worker, torn down cleanly even when the worker fails.

    A loaded CI machine slows ranks unevenly: the generous timeout waits for the slower rank, and the barrier
    before ``destroy_process_group`` keeps a rank from exiting (and tearing gloo's threads down, SIGABRT) while the
    other is still talking to it.

    A worker that completes the block leaves the process at its end (``os._exit(0)``, see ``__exit__``): everything
    the worker does, its results written included, belongs inside the block.
    """

    def __init__(self, rank: int, world: int, init_file: str, timeout_s: float = 600):
        self.rank, self.world, self.init_file, self.timeout_s = rank, world, init_file, timeout_s

    def __enter__(self):
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{self.init_file}", rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=self.timeout_s))
        return self

    def __exit__(self, exc_type, exc, tb):
        import torch.distributed as dist

        try:
            if exc_type is None:
                dist.barrier()
        finally:
            dist.destroy_process_group()
        if exc_type is None:
            # The worker's results are written and both ranks are past the barrier. Interpreter finalization can
            # still abort a gloo rank (a CI run saw "terminate called without an active exception", SIGABRT): gloo
            # work objects may hold tensors whose release needs the GIL while the interpreter is being torn down
            # (pytorch/pytorch#179291). Nothing is left to run, so the worker leaves without finalization.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return False


def spawn_and_load(worker, world: int, *extra):
    """Run ``worker(rank, world, init_file, out_file, *extra)`` in ``world`` processes (``mp.spawn``) and return what
    they saved with ``torch.save(..., out_file)``."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), out, *extra), nprocs=world, join=True)
        return torch.load(out)


def sgd_step_on_copies(optimizer, grads: dict) -> dict:
    """What ``optimizer.step()`` gives its parameters when their gradients are ``grads`` (id(param) -> tensor or
    None): torch.optim.SGD's own step, with the same param groups (hyperparameters, ``foreach``) and state (momentum
    buffers), run on copies, so the parameters and the optimizer are left as they are. ``optimizer`` is a
    ``torch.optim.SGD`` or a wrapper exposing its ``param_groups`` and ``state_dict`` (accelerate's). Returns
    id(param) -> the updated copy."""
    import copy

    copies = {id(p): p.detach().clone() for group in optimizer.param_groups for p in group["params"]}
    for key, c in copies.items():
        g = grads.get(key)
        c.grad = None if g is None else g.detach().clone()
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [copies[id(p)] for p in group["params"]]}
              for group in optimizer.param_groups]
    hand = torch.optim.SGD(groups)
    hand.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    hand.step()
    return {key: c.detach() for key, c in copies.items()}
