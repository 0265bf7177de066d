"""Branch-vs-scaling verification: train an SGS model and its branched twin side by side (spec §2).

From the same folded start, on the same batches, with the same optimizer settings, the folded kernels of
the branched model must track the SGS model's kernels to rounding (float64: <= 1e-9 after 100 steps) when
the lemma's conditions hold, and the report says which conditions do not.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .optimizers import is_adaptive
from .passes.instrument import transform
from .passes.registry import get_scales, instrumented, set_scales
from .passes.strip import strip
from .passes.copying import copy_model

logger = logging.getLogger("sgs_fx")


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


@dataclass
class VerifyReport:
    """Per-layer largest |ΔW| between the SGS kernels and the folded branched kernels after ``steps``.

    Attributes:
        layer_diff: qualified conv name -> max |W_sgs - fold(W_branched)|.
        other_diff: largest difference over every other parameter.
        steps, dtype, optimizer: what was run.
        violations: the lemma's conditions this setting breaks (empty: the equivalence must hold).
        tol: the tolerance applied when no condition is broken.
        losses: the SGS model's loss at each step (to show the problem is stable).
    """

    layer_diff: dict[str, float]
    other_diff: float
    steps: int
    dtype: torch.dtype
    optimizer: str
    violations: list[str] = field(default_factory=list)
    tol: float = 1e-9
    losses: list[float] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        return max([*self.layer_diff.values(), self.other_diff])

    @property
    def within_conditions(self) -> bool:
        return not self.violations

    @property
    def equivalent(self) -> bool:
        return self.max_diff <= self.tol

    @property
    def ok(self) -> bool:
        """False only when the conditions hold and the trajectories still differ beyond ``tol``."""
        return self.equivalent or not self.within_conditions

    def table(self) -> str:
        width = max([len(n) for n in self.layer_diff] + [5])
        lines = [f"{'layer':<{width}}  max |ΔW|", f"{'-' * width}  --------"]
        lines += [f"{n:<{width}}  {d:.3e}" for n, d in self.layer_diff.items()]
        lines.append(f"{'other':<{width}}  {self.other_diff:.3e}")
        verdict = ("EQUIVALENT" if self.equivalent else "NOT EQUIVALENT") + f" (tol {self.tol:g}, {self.steps} steps, " \
            f"{str(self.dtype).replace('torch.', '')}, {self.optimizer})"
        lines.append(verdict)
        if self.violations:
            lines.append("outside the lemma's conditions: " + "; ".join(self.violations))
        return "\n".join(lines)


def verify(model: nn.Module, batches: Sequence, *, steps: int = 100,
           optimizer_factory: Callable = _sgd, scales: Mapping[str, Tensor] | None = None, branches=None,
           filter_fn=None, loss_fn: Callable | None = None, dtype: torch.dtype = torch.float64,
           l2_in_loss: float = 0.0, clip_grad_norm: float | None = None, tol: float | None = None) -> VerifyReport:
    """Train the SGS-instrumented and the branched version of ``model`` side by side and compare them.

    Args:
        model: a plain model (not modified).
        batches: a non-empty sequence of inputs or (input, target) pairs, cycled over the steps.
        steps: optimizer steps.
        optimizer_factory: params -> optimizer, called once per model (default SGD lr 0.01, momentum 0.9).
        scales / branches: the S per layer (masked branches) or a recipe ("acb", "repvgg", "skeleton");
            default: the "acb" recipe.
        filter_fn: which convs (default: the paper's selection).
        loss_fn: (output, target_or_None) -> loss; default cross-entropy with a target, else mean square.
        dtype: float64 by default, where the equivalence is exact to rounding.
        l2_in_loss: add l2_in_loss/2 · ‖θ‖² to the loss. Outside the conditions: S scales the whole gradient
            that reaches the weight, penalty included (as the official implementation's ``.grad`` multiply
            did), while the branches' penalty is on each branch; use the optimizer's ``weight_decay``.
        clip_grad_norm: clip the global gradient norm (breaks the lemma once active).
        tol: the largest |ΔW| accepted (default 1e-9 in float64, 1e-4 otherwise).
    """
    if not batches:
        raise ValueError("verify: batches is empty; pass at least one input batch")
    if scales is None and branches is None:
        branches = "acb"
    base = copy_model(model, "sgs_fx.verify", fix="make it deepcopyable").to(dtype)
    branched = transform(base, mode="branches", scales=scales, branches=branches, filter_fn=filter_fn)
    sgs = transform(strip(branched), filter_fn=filter_fn)  # same folded start as the branched model
    set_scales(sgs, get_scales(branched))
    opt_b, opt_s = optimizer_factory(branched.parameters()), optimizer_factory(sgs.parameters())
    violations = _violations(opt_s, clip_grad_norm, l2_in_loss)
    for v in violations:
        logger.warning("sgs_fx.verify: outside the equivalence conditions: %s", v)
    loss_fn = loss_fn or _default_loss
    losses = []
    branched.train()
    sgs.train()
    for step in range(steps):
        x, y = _split(batches[step % len(batches)], dtype)
        for m, opt in ((branched, opt_b), (sgs, opt_s)):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(m(x), y)
            if l2_in_loss:
                loss = loss + 0.5 * l2_in_loss * sum(p.pow(2).sum() for p in m.parameters())
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(m.parameters(), clip_grad_norm)
            opt.step()
            if m is sgs:
                losses.append(loss.item())
    folded = strip(branched)
    layer_diff = {n: (sgs.get_submodule(n).weight - folded.get_submodule(n).weight).abs().max().item()
                  for n in instrumented(sgs)}
    weights = {f"{n}.weight" for n in layer_diff}
    plain = dict(folded.named_parameters())
    other = [(p - plain[n]).abs().max().item() for n, p in sgs.named_parameters() if n not in weights]
    report = VerifyReport(layer_diff, max(other, default=0.0), steps, dtype, type(opt_s).__name__, violations,
                          tol if tol is not None else (1e-9 if dtype == torch.float64 else 1e-4), losses)
    if report.within_conditions and not report.equivalent:
        logger.warning("sgs_fx.verify: trajectories differ by %.3g > %.3g within the lemma's conditions "
                       "(an unstable problem amplifies rounding: try a smaller lr)", report.max_diff, report.tol)
    return report


def _violations(opt, clip_grad_norm, l2_in_loss) -> list[str]:
    out = []
    if is_adaptive(opt):
        out.append(f"{type(opt).__name__} normalises each coordinate (SGS is defined for SGD)")
    elif not isinstance(opt, torch.optim.SGD):
        out.append(f"{type(opt).__name__} is not SGD; the lemma covers SGD, momentum, Nesterov and coupled L2")
    if clip_grad_norm is not None:
        out.append("gradient clipping sees different gradient norms in the two models")
    if l2_in_loss:
        out.append("an L2 penalty in the loss passes through S (use the optimizer's weight_decay instead)")
    return out


def _split(batch, dtype):
    if isinstance(batch, (list, tuple)):
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        x, y = batch, None
    return x.to(dtype), y


def _default_loss(out: Tensor, y) -> Tensor:
    if y is not None and out.dim() == 2 and not torch.is_floating_point(y):
        return F.cross_entropy(out, y)
    return out.pow(2).mean()
