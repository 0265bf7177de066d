"""The record of new gradients under ``scaling="step"``: each SGS weight's tensor hook, and what it writes.

The optimizer step must know, for every SGS weight, whether ``.grad`` holds gradients S has not been applied to.
It learns that from an event torch gives: the autograd engine runs a Parameter's tensor hooks for every gradient
it computes for it (``backward``, ``torch.autograd.grad``, DDP, DataParallel, FSDP2's unsharded parameter). The
hook here changes nothing and sets ``GradState.pending``; the step (``sgs_fx/step.py``) multiplies by S and clears
it. Nothing is inferred from marks on gradient tensors or from version counters, so nothing can go stale.
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor, nn

from .backward import mul_cast
from .ownership import SCALE_BUFFER, stepped_tensor

__all__ = ["GradState", "grad_state", "StepHook", "stepped_weight", "check_unchanged", "settle", "warn_unscaled"]


class GradState:
    """``scaling="step"``: what the optimizer's step needs to know about an SGS weight's ``.grad``.

    Written only by events: the weight's tensor hook (autograd computed a gradient for it), the step and
    ``sgs_fx.scale_gradients`` (S was applied). It lives on the conv for the conv's whole life — re-attaching the
    hook to a new Parameter object (``to()``, ``load_state_dict(assign=True)``, FSDP2) keeps it — and travels with
    its copies, whose ``.grad`` is copied too.

    * ``pending``: a gradient arrived since S was last applied to ``.grad``; the next step multiplies it by S.
    * ``prescaled``: S is in ``.grad`` already — ``scale_gradients`` applied it, or the hook scaled what arrived in a
      distributed job — and no step of this weight has run since: the hook scales each gradient as it arrives, so
      ``.grad`` stays S ⊙ (everything accumulated), whatever zeroed it in between, and the step leaves it alone.
    * ``replayed``: a gradient arrived while a CUDA graph was being captured and no captured step applied S: the
      graph's replays rewrite ``.grad`` with no hook running, so every eager step scales it.
    * ``version``: the lost-S warning's reference (``check_unchanged``): the weight's version at the last eager
      forward while nothing was pending, or when its last step ended, or else at the second pending gradient.
    """

    __slots__ = ("pending", "prescaled", "replayed", "version")

    def __init__(self):
        self.pending = self.prescaled = self.replayed = False
        self.version = None

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k in self.__slots__:
            setattr(self, k, state.get(k, getattr(GradState(), k)))


def grad_state(conv: nn.Module) -> GradState:
    """``conv``'s ``GradState`` (created on first use, then kept for the conv's life)."""
    state = conv.__dict__.get("_sgs_grad")
    if state is None:
        state = conv.__dict__["_sgs_grad"] = GradState()
    return state


class StepHook:
    """``scaling="step"``'s tensor hook: notes each gradient in the conv's ``GradState`` and leaves it unchanged —
    unless ``scale_gradients`` put the weight in the prescaled state, or the process is part of a distributed job,
    where it returns S ⊙ G.

    Distributed: DDP (with ``find_unused_parameters`` or ``static_graph``) and FSDP2 write into a weight's ``.grad``
    the reduction of other ranks' gradients even on a rank where the weight computed none, so no rank can tell at
    its step which weights hold new gradients. Every rank sees each gradient it contributes here, before the
    reduction: S applied to each of them is S applied to their reduction (S is linear and the same on all ranks).

    Holds the conv weakly (a strong reference from the weight's hook back to its module would make a cycle through
    the tensor) and reads S from it at each call, so a new S, however written, is the one used.
    """

    __slots__ = ("conv", "state")

    def __init__(self, conv: nn.Module, state: GradState):
        self.conv, self.state = weakref.ref(conv), state

    def __call__(self, grad: Tensor):
        # (runs for every conv in every backward, right after the conv's own backward kernels: kept short)
        state = self.state
        if state.prescaled or _distributed():
            conv = self.conv()
            if conv is None:
                return None
            if not state.prescaled:
                return _become_prescaled(conv, state, grad)
            return mul_cast(conv._buffers[SCALE_BUFFER], grad)
        if state.pending:  # a later gradient before any step: accumulation, unless the weight was updated since
            conv = self.conv()
            if conv is not None:
                check_unchanged(conv, state)
        else:
            state.pending = True
        if _CUDA[0] and torch.cuda.is_current_stream_capturing():
            state.replayed = True
        return None


def stepped_weight(conv: nn.Module) -> Tensor | None:
    """The tensor an optimizer steps for ``conv``'s weight (FSDP2's sharded one, or the hooked one)."""
    d = conv.__dict__
    w = d.get("_sgs_sharded")
    if w is None:
        hooked = d.get("_sgs_hook")
        w = hooked.param if hooked is not None else stepped_tensor(conv)
    return w


def check_unchanged(conv: nn.Module, state: GradState) -> None:
    """A gradient arrives while earlier ones are pending (no step applied S since the first of them). If the weight
    changed since its reference (``GradState.version``: the forward that led to the first pending gradient) *and*
    the pending gradient is gone from ``.grad`` (set to None, or zeroed), something used it and threw it away
    without a torch.optim step: an update with the unscaled gradient (a hand-written update, an optimizer outside
    torch.optim, the first half of SAM: warned at the second backward). Gradient accumulation keeps ``.grad``, so a
    weight changed between micro-batches (a clamp, a max-norm constraint in the forward) is no sign, nor a change
    before the forward (a clamp after a step); LBFGS's closure calls are scaled as each returns. (A step GradScaler skipped,
    followed by a weight change before the next backward, looks the same as an update and is warned about too.)"""
    w = stepped_weight(conv)
    if w is None:
        return
    if state.version is not None and w._version != state.version and _discarded(w.grad):
        warn_unscaled(conv)
    state.version = w._version


def _discarded(g: Tensor | None) -> bool:
    """Whether a weight's ``.grad`` holds none of the gradients that arrived since the step (zero_grad ran)."""
    if g is None:
        return True
    with torch.no_grad():
        return not bool(g.any())  # (a reduction, only where the weight changed with gradients pending)


def _become_prescaled(conv: nn.Module, state: GradState, grad: Tensor) -> Tensor:
    """The hook starts scaling what arrives (a distributed job began): what ``.grad`` already holds unscaled gets S
    now, so that all of it is S ⊙ G and the step leaves it alone. Returns S ⊙ ``grad``."""
    if state.pending:
        hooked = conv.__dict__.get("_sgs_hook")
        g = hooked.param.grad if hooked is not None else None
        if g is not None:
            with torch.no_grad():
                g.mul_(conv._buffers[SCALE_BUFFER])
    state.pending, state.version, state.prescaled = False, None, True
    return mul_cast(conv._buffers[SCALE_BUFFER], grad)


def settle(conv: nn.Module) -> None:
    """S applied now to the gradient ``conv``'s weight holds pending: the conv is about to lose its SGS class
    (``strip(inplace=True)`` between a backward and the step), after which no step would scale it."""
    state = conv.__dict__.get("_sgs_grad")
    if state is None or not (state.pending or state.replayed):
        return
    w = stepped_weight(conv)
    g = w.grad if w is not None else None
    if g is not None:
        with torch.no_grad():
            g.copy_(mul_cast(conv._buffers[SCALE_BUFFER], g))
    state.pending = state.replayed = False


_CUDA = [torch.cuda.is_available()]  # (a monkeypatchable constant: tests emulate a capture)


# Whether a default process group is initialised: then gradients are reduced across ranks after backward.
_distributed = torch.distributed.is_initialized if torch.distributed.is_available() else (lambda: False)


_warned_unscaled = False


def warn_unscaled(conv: nn.Module) -> None:
    """``scaling="step"``: a gradient arrives while the last one is still pending (no step and no
    ``scale_gradients`` applied S to it) and the weight changed in between: it was updated with the unscaled
    gradient (a hand-written update, an optimizer outside torch.optim), and S was lost. One warning, naming the way
    out. (Gradient accumulation, and steps that GradScaler skipped, leave the weight unchanged: no warning.)"""
    global _warned_unscaled
    if _warned_unscaled:
        return
    _warned_unscaled = True
    warnings.warn(
        f"sgs_fx: the weight of {type(conv).__name__} changed while its last gradient was still unscaled: an update "
        "used that gradient before a torch.optim optimizer step applied S to it (a hand-written update, an optimizer "
        "outside torch.optim, or the first half of a two-step optimizer such as SAM). Under scaling='step' (the "
        "default) S is applied when a torch.optim optimizer's step() begins: call sgs_fx.scale_gradients(model) right "
        "after the backward, or transform with scaling='hook' (S applied in the backward pass). (If you changed "
        "the weights yourself, e.g. re-initialised them, ignore this.)", stacklevel=2)
