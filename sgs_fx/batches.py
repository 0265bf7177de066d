"""From a loader's batch to a model call: shared by the MI scheduler and post-training quantization.

A batch is what a loader yields: an input tensor, or a sequence whose first element is the input (an
``(input, target)`` pair). ``input_fn(batch)`` may instead return any model input: a tuple is the
positional arguments, a dict the keyword arguments, anything else (a tensor, a list of images) the one
argument.
"""
from __future__ import annotations

from collections.abc import Callable

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
