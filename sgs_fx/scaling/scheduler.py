"""MIScheduler: recompute every layer's S from the mutual information of its input, on a schedule (spec §4).

Observation follows spec §3.1 and §3.5: the model in eval mode under ``no_grad`` (its mode restored
afterwards), the first ``batches`` batches of a fresh pass over the training loader, and two passes over
those same inputs (ranges, then histograms): one forward per batch while the padded conv inputs fit in
``keep_bytes`` (they are kept for the second pass), two streaming forwards beyond it; under
``torch.distributed``, MIN / MAX / SUM reductions so that every rank gets the S of the union of all ranks'
batches.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..batches import call, first_input, leave_no_trace, rng_untouched, to_model
from ..conv import SGSOwnForwardMixin
from ..ownership import is_sgs_conv
from ..passes.registry import get_scales, instrumented, set_scales
from ..passes.functional import ObserveFunctionalConvs, observe_conv_ops
from ..passes.select import unwrap
from .mi import ConvGeometry, PairStats, check_hyper

logger = logging.getLogger("sgs_fx")


class MIScheduler:
    """Sets S of every SGS conv from the NMI of its input, at ``warmup`` and every ``every`` epochs after.

    Args:
        model: a model transformed with ``sgs_fx.transform`` (may be wrapped in DDP or torch.compile).
        loader: the *training* loader (its augmentation included); each rank passes its own.
        k: k-transform of the NMI (default 5, the official setting).
        every: recompute period in epochs (default 5).
        warmup: S = ones for epochs < warmup; first recompute at ``warmup`` (default 1).
        batches: number of loader batches observed per recompute (default 2).
        zero_removal: drop pairs holding an exact zero (default False).
        floor: lower bound of S before the final renormalisation (default 1e-3).
        input_fn: batch -> model input (default: the batch itself, or its first element). A tuple is
            passed as positional arguments, a dict as keyword arguments, anything else (a tensor, a list
            of images) as the one argument; every tensor inside is moved to the model's device and
            floating tensors to its dtype.
        progress: show a tqdm bar on rank 0 while calibrating.
        keep_bytes: keep the observed batches' conv inputs (padded) in memory up to this many bytes, so that
            a calibration runs one forward per batch instead of two; beyond it (or 0) the inputs are
            streamed through two forwards and memory stays O(C·D'·B²) beyond one batch. Same S either way.

    Call ``step(epoch)`` at the start of every epoch (epochs count from 0), before training on it.
    """

    def __init__(self, model: nn.Module, loader: Iterable, *, k: float = 5, every: int = 5, warmup: int = 1,
                 batches: int = 2, zero_removal: bool = False, floor: float = 1e-3,
                 input_fn: Callable | None = None, progress: bool = False, keep_bytes: int = 512 * 2**20):
        check_hyper(k, floor)
        if int(every) < 1 or int(warmup) < 0 or int(batches) < 1:
            raise ValueError(f"MIScheduler needs every >= 1, warmup >= 0, batches >= 1 (got {every}, {warmup}, {batches})")
        convs = instrumented(model)
        if not convs:
            raise ValueError("MIScheduler: the model has no instrumented conv; call sgs_fx.transform(model) first")
        branched = [n for n, m in convs.items() if not is_sgs_conv(m)]
        if branched:
            raise ValueError(f"MIScheduler: {branched[0]!r} is a branched block (mode='branches'), whose S is fixed; "
                             "use mode='sgs' for MI-driven scales")
        self.model, self.loader = model, loader
        self.k, self.every, self.warmup, self.batches = k, int(every), int(warmup), int(batches)
        self.zero_removal, self.floor = zero_removal, floor
        self.input_fn = input_fn or first_input("MIScheduler")
        self.progress = progress
        self.keep_bytes = int(keep_bytes)
        self.last_epoch: int | None = None
        self.last_recompute: int | None = None
        self._warned: set[str] = set()

    # -- schedule --------------------------------------------------------------------------------------
    def due(self, epoch: int) -> bool:
        """Whether ``step(epoch)`` recomputes S."""
        return epoch == self.warmup or (epoch > self.warmup and epoch % self.every == 0)

    def step(self, epoch: int) -> bool:
        """Apply the schedule for ``epoch``; returns True when S was recomputed.

        Once per epoch: S computed for this epoch already (``step`` called twice, or a run resumed from a
        checkpoint saved inside the epoch) is kept, so a resumed run trains on the S it saved.
        """
        self.last_epoch = epoch
        if epoch < self.warmup:
            set_scales(self.model, {n: torch.ones(tuple(m.kernel_size)) for n, m in instrumented(self.model).items()})
            return False
        if self.last_recompute == epoch:
            return False
        if not self.due(epoch):
            if self.last_recompute is not None:
                return False
            # past warm-up, and no S was computed or restored: a resumed run that did not load this
            # scheduler's state would train on S = ones until the next due epoch
            logger.warning("sgs_fx.MIScheduler: step(%d) is past warm-up but no S was computed or restored "
                           "(load_state_dict with the checkpoint's scheduler state); computing S now", epoch)
        self.calibrate()
        self.last_recompute = epoch
        return True

    # -- calibration -----------------------------------------------------------------------------------
    def calibrate(self) -> dict[str, Tensor]:
        """Recompute S of every layer now, from the loader's first ``batches`` batches; returns the new S."""
        root = unwrap(self.model)
        convs = instrumented(root)
        inputs = self._draw_inputs(root)
        stats = {n: PairStats(ConvGeometry.of(m), m.in_channels, zero_removal=self.zero_removal,
                              device=m.sgs_scale.device) for n, m in convs.items()}
        with leave_no_trace(root):
            kept = self._pass1(root, convs, inputs, stats)
            _reduce_ranges(list(stats.values()))
            if not _all_ranks_agree(kept is not None, device=next(iter(stats.values())).lo.device):
                kept = None  # a forward under FSDP2 is collective: every rank must run pass 2 the same way
            live = {n: s for n, s in stats.items() if s.failure() is None}
            for s in live.values():
                s.start_histograms()
            if kept is not None:  # the inputs of every conv were kept: no second forward
                for name in list(kept):
                    for xp in kept.pop(name):
                        if name in live:
                            live[name].observe_hist(xp, padded=True)
            else:
                self._run(root, {n: convs[n] for n in live}, inputs,
                          {n: s.observe_hist for n, s in live.items()}, "MI pass 2/2")
            _reduce_histograms(list(live.values()))
        new = {}
        for name, s in stats.items():
            scale, why = s.scale(self.k, self.floor)
            if scale is None:
                if name not in self._warned:
                    self._warned.add(name)
                    logger.warning("sgs_fx.MIScheduler: layer %r keeps its previous S: %s", name, why)
                continue
            new[name] = scale
        if dist.is_available() and dist.is_initialized() and stats:
            _broadcast_from_rank0(new, next(iter(stats.values())).lo.device)
        set_scales(root, new)
        for name, s in new.items():
            logger.info("sgs_fx.MIScheduler: %s S=%s", name, _compact(s))
        return new

    def _draw_inputs(self, root: nn.Module) -> list:
        # A shuffling loader draws its order from the global RNG: on a forked one, calibration sees the batches
        # the epoch will then train on first, and leaves the training's random stream where it was.
        inputs = []
        with rng_untouched():
            for batch in self.loader:
                inputs.append(to_model(self.input_fn(batch), root))
                if len(inputs) == self.batches:
                    break
        if not inputs:
            raise ValueError("MIScheduler: the loader yielded no batch; it needs at least one to estimate S")
        return inputs

    def _pass1(self, root, convs, inputs, stats) -> dict | None:
        """Pass 1, keeping every conv's padded input while they fit in ``keep_bytes`` (then pass 2 needs no
        forward); returns the kept inputs, or None once they would not fit (pass 2 then runs the model again)."""
        kept: dict | None = {n: [] for n in convs} if self.keep_bytes > 0 else None
        size = 0

        def observe(name, x):
            nonlocal size
            xp = stats[name].observe_range(x, keep=kept is not None)
            if kept is not None:
                kept[name].append(xp)
                size += xp.numel() * xp.element_size()

        def after_batch(i):
            nonlocal kept
            if kept is not None and size * len(inputs) / (i + 1) > self.keep_bytes:
                kept = None  # would not fit: stream instead (memory O(C·D'·B²) beyond one batch)

        self._run(root, convs, inputs, {n: (lambda x, n=n: observe(n, x)) for n in convs}, "MI pass 1/2",
                  after_batch=after_batch)
        return kept

    def _run(self, root, convs, inputs, observers, desc, after_batch=None):
        # A conv with torch's forward convolves its input, padded as its geometry says (the estimator pads it the
        # same way); an SGS graph node gets (weight, input). A conv with a forward of its own may pad inside it
        # (timm's Conv2dSame): the map its conv op receives is observed instead (spec §3.1: the map convolved).
        own = {n: m for n, m in convs.items() if isinstance(m, SGSOwnForwardMixin)}
        handles = [m.register_forward_pre_hook(lambda mod, args, fn=observers[n]: fn(args[getattr(mod, "mi_input", 0)]))
                   for n, m in convs.items() if n not in own]
        inside: list = []
        handles += observe_conv_ops(own, observers, inside)
        # F.conv*d calls of ordinary modules: no module is called, a torch function mode sees the calls
        functional = {id(m._sgs_param): (m._sgs_param, observers[n]) for n, m in convs.items()
                      if m.__dict__.get("_sgs_functional")}
        try:
            from tqdm.auto import tqdm

            show = self.progress and (not dist.is_initialized() or dist.get_rank() == 0)
            with ObserveFunctionalConvs(functional, inside) if functional or own else contextlib.nullcontext():
                for i, x in enumerate(tqdm(inputs, desc=desc, disable=not show, leave=False)):
                    call(root, x)
                    if after_batch is not None:
                        after_batch(i)
        finally:
            for h in handles:
                h.remove()

    # -- checkpointing ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: every layer's current S and the schedule position."""
        return {"scales": get_scales(self.model), "last_epoch": self.last_epoch,
                "last_recompute": self.last_recompute, "warned": sorted(self._warned),
                "config": {"k": self.k, "every": self.every, "warmup": self.warmup, "batches": self.batches,
                           "zero_removal": self.zero_removal, "floor": self.floor}}

    def load_state_dict(self, state: Mapping) -> None:
        set_scales(self.model, state["scales"])
        self.last_epoch, self.last_recompute = state["last_epoch"], state["last_recompute"]
        self._warned = set(state.get("warned", ()))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_ranges(stats: list[PairStats]) -> None:
    if not _distributed() or not stats:
        return
    lo = torch.cat([s.lo.flatten() for s in stats])
    hi = torch.cat([s.hi.flatten() for s in stats])
    counts = torch.cat([torch.cat([s.count.flatten(), s.nonfinite.view(1), s.calls.view(1)]) for s in stats])
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    i = j = 0
    for s in stats:
        n = s.lo.numel()
        s.lo.copy_(lo[i:i + n].view_as(s.lo))
        s.hi.copy_(hi[i:i + n].view_as(s.hi))
        i += n
        m = s.count.numel()
        s.count.copy_(counts[j:j + m].view_as(s.count))
        s.nonfinite.copy_(counts[j + m])
        s.calls.copy_(counts[j + m + 1])
        j += m + 2


def _all_ranks_agree(flag: bool, device) -> bool:
    """True when ``flag`` holds on every rank (always ``flag`` itself in a single process)."""
    if not _distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _reduce_histograms(stats: list[PairStats]) -> None:
    if not _distributed() or not stats:
        return
    flat = torch.cat([s.hist.flatten() for s in stats])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for s in stats:
        s.hist.copy_(flat[i:i + s.hist.numel()].view_as(s.hist))
        i += s.hist.numel()


def _broadcast_from_rank0(scales: dict[str, Tensor], device: torch.device) -> None:
    # Every rank computed the same counts, but FSDP2 does not broadcast buffers: rank 0's S is the one used.
    # NCCL needs this rank's own GPU (the model's: the statistics' device), not "cuda", the current device, which
    # is GPU 0 on every rank of a script that never called torch.cuda.set_device.
    if not _distributed() or not scales:
        return
    names = sorted(scales)
    flat = torch.cat([scales[n].flatten() for n in names])
    flat = flat.to(device if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(flat, src=0)
    i = 0
    for n in names:
        scales[n] = flat[i:i + scales[n].numel()].view_as(scales[n]).cpu()
        i += scales[n].numel()


def _compact(s: Tensor) -> str:
    return str([round(v, 3) for v in s.flatten().tolist()]) if s.numel() <= 9 else \
        f"centre={s.flatten()[s.numel() // 2].item():.3f} min={s.min().item():.3f} max={s.max().item():.3f}"
