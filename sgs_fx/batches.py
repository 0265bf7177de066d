"""From a loader's batch to a model call: shared by the MI scheduler, post-training quantization and the
conv discovery of an untraceable model (``passes/discover.py``).

A batch is what a loader yields: an input tensor, or a sequence whose first element is the input (an
``(input, target)`` pair). ``input_fn(batch)`` may instead return any model input: a tuple is the
positional arguments, a dict the keyword arguments, anything else (a tensor, a list of images) the one
argument.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map


def first_input(who: str) -> Callable:
    """The default ``input_fn``: the batch itself if it is a tensor, else its first element."""

    def input_of(batch):
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
            return batch[0]
        raise TypeError(f"{who} cannot find the input in a batch of type {type(batch).__name__}; "
                        "pass input_fn=lambda batch: <the model input> (a tuple for several positional inputs)")

    return input_of


def to_model(inputs, model: nn.Module):
    """Every tensor in ``inputs`` (any nesting of lists, tuples, dicts) on the model's device; floating
    tensors in the model's floating dtype (a bf16 model gets bf16 inputs; integer ids stay integers)."""
    params = [p for p in model.parameters() if p.is_floating_point()] or list(model.buffers())
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params and params[0].is_floating_point() else None

    def move(t):
        if not isinstance(t, Tensor):
            return t
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    return tree_map(move, inputs)


def call(model: nn.Module, inputs):
    """A tuple is the positional arguments, a dict the keyword arguments, anything else the one argument."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


@contextmanager
def leave_no_trace(model: nn.Module):
    """Eval mode and no_grad for forwards that only observe (MI calibration, conv discovery), which leave no trace
    on the model or the RNG.

    A ``torch.export`` module keeps the mode it was exported in (``eval()`` does not reach its graph): exported in
    train mode, its BatchNorm would update its running statistics and its dropout draw random masks. So every
    buffer is restored afterwards (BatchNorm statistics, fake-quant ranges; S is written after this), and the
    forwards run on a forked RNG with a fixed seed: the same data always gives the same S.
    """
    modes = {m: m.training for m in model.modules()}  # restore each submodule's own mode, not just the root's
    try:
        model.eval()
    except (NotImplementedError, RuntimeError):
        pass  # torch.export's modules keep the mode they were exported in
    saved = [(m, name, b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items()
             if b is not None and not b.is_meta]
    try:
        with torch.no_grad(), rng_untouched():
            torch.manual_seed(0)
            yield
    finally:
        with torch.no_grad():
            for m, name, b, value in saved:
                now = m._buffers.get(name)
                if now is not b or b.shape != value.shape or b.is_inference():
                    # replaced, resized (a fake-quant's first ranges), or made under inference_mode (not writable)
                    m._buffers[name] = value
                elif 0 not in b.stride():  # (a broadcast view cannot have been written: nothing to restore)
                    b.copy_(value)
        for m, training in modes.items():
            m.training = training


def rng_untouched():
    """The CPU and every CUDA device's random state, restored afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)
