"""The copy a pass works on when ``inplace=False``: ``copy.deepcopy``, made to work on a model after a training forward.

``torch.Tensor.__deepcopy__`` refuses a tensor with autograd history (a non-leaf), and models keep such tensors
between calls: MONAI's DynUNet keeps its deep-supervision heads in a list, torchvision's RAFT its correlation
pyramid. Such a tensor is copied as its detached self (same values, no history; storage shared among such tensors
stays shared), which is what it would have been had the forward run under ``torch.no_grad()``.
"""
from __future__ import annotations

import collections
import copy
import logging
from collections.abc import Iterator

from torch import Tensor, nn

logger = logging.getLogger("sgs_fx")

_MAX_DEPTH = 6  # nested containers searched for tensors with history: lists of lists of dicts, not arbitrary graphs


_INPLACE_FIX = "pass inplace=True to work on the model itself, or make it deepcopyable"


def copy_model(model: nn.Module, who: str, *, fix: str = _INPLACE_FIX) -> nn.Module:
    """A deep copy of ``model``; tensors a forward left with autograd history become detached copies.

    Args:
        model: the module to copy; it is not modified.
        who: the public call that copies (named in the error).
        fix: what the error tells the user to do (the default names ``inplace=True``, for calls that have it).

    Raises:
        TypeError: something in the model cannot be deep-copied; names the attribute and the fix.
    """
    with_history = list(tensors_with_history(model))
    memo, _keep = _detached_memo(t for _, t in with_history)
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as e:  # deepcopy raises whatever the uncopyable attribute raises
        where, cause = _first_uncopyable(model) or (type(model).__name__, e)
        raise TypeError(f"{who} works on a copy of the model, and copy.deepcopy({type(model).__name__}) failed at "
                        f"{where} ({type(cause).__name__}: {cause}); {fix}") from e
    if with_history:
        logger.info("%s: %d tensor(s) with autograd history (kept by a training forward) copied detached: %s%s", who,
                    len(with_history), ", ".join(p for p, _ in with_history[:5]),
                    ", ..." if len(with_history) > 5 else "")
    return copied


def _detached_memo(tensors) -> tuple[dict, list[Tensor]]:
    """A deepcopy memo that copies each of ``tensors`` as its detached self (through the memo, so a storage shared
    with the model's other tensors stays shared in the copy), and the detached tensors, to be kept alive while the
    memo is in use (it is keyed by id)."""
    memo: dict = {}
    keep = []
    for t in tensors:
        keep.append(t.detach())
        memo[id(t)] = copy.deepcopy(keep[-1], memo)
    return memo, keep


def tensors_with_history(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Each tensor with a ``grad_fn`` held by a module of ``model`` (an attribute, a buffer, or an item of a list /
    tuple / dict / set / deque attribute, also nested), once, with its path."""
    seen: set[int] = set()
    for name, m in model.named_modules():
        prefix = f"{type(model).__name__}{'.' + name if name else ''}"
        for key, value in _state(m):
            yield from _search(value, f"{prefix}.{key}", seen, 0)


def _state(m: nn.Module) -> Iterator[tuple[str, object]]:
    """A module's own attributes, its parameters and buffers by their names."""
    for key, value in vars(m).items():
        if key in ("_parameters", "_buffers"):
            yield from value.items()
        elif key != "_modules":  # (walked by named_modules)
            yield key, value


def _search(value, path: str, seen: set[int], depth: int) -> Iterator[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        if value.grad_fn is not None and id(value) not in seen:
            seen.add(id(value))
            yield path, value
        return
    if depth >= _MAX_DEPTH or isinstance(value, (str, bytes, nn.Module)) or id(value) in seen:
        return
    if isinstance(value, dict):
        seen.add(id(value))
        for k, v in value.items():
            yield from _search(v, f"{path}[{k!r}]", seen, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        seen.add(id(value))
        for i, v in enumerate(value):
            yield from _search(v, f"{path}[{i}]", seen, depth + 1)


def _first_uncopyable(model: nn.Module) -> tuple[str, Exception] | None:
    """The first attribute of a module of ``model`` that deepcopy fails on, with its error (None: none alone fails)."""
    for name, m in model.named_modules():
        prefix = f"{type(model).__name__}{'.' + name if name else ''}"
        for key, value in _state(m):
            memo, _keep = _detached_memo(t for _, t in _search(value, "", set(), 0))  # as copy_model copies
            try:
                copy.deepcopy(value, memo)
            except Exception as e:
                return f"{prefix}.{key}", e
    return None
