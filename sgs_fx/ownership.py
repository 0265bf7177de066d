"""Weight ownership: which trained tensor each SGS module's S scales, and, from a Parameter, which SGS module owns it.

Every other part of the S mechanism asks here: the hooks (which tensor to hook, and whether another conv shares
it: tied weights scale per use), the optimizer step (which of an optimizer's Parameters are SGS weights, and
their S), the passes (``get_scales``, ``strip``). The tables are keyed by ``id`` of the Parameter object and hold
the module weakly; every lookup checks identity, so a recycled ``id`` is never mistaken for an SGS weight.

The SGS modules identify themselves by a class attribute, ``sgs_role``: ``"conv"`` (torch's own forward),
``"own_forward"`` (a conv subclass with a forward of its own), ``"parametrized"`` (``torch.nn.utils.parametrize``)
and ``"graph_weight"`` (the S holder on a graph's weight edge, or of an ``F.conv*d`` call).
"""
from __future__ import annotations

import weakref

from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["SCALE_BUFFER", "sgs_role", "is_sgs_conv", "hook_target", "is_pruned", "target_of", "stepped_tensor",
           "scales_at_step", "is_dtensor", "claim", "claim_sharded", "release", "other_owner", "owner_of",
           "any_owned", "owned_in", "generation", "scaled_at_source"]

SCALE_BUFFER = "sgs_scale"  # S: a non-persistent buffer of every SGS module, of the kernel's spatial shape

# id(weight) -> the SGS module whose hook is on it; a second SGS conv on the same weight makes both scale per use
_OWNERS: "dict[int, weakref.ref]" = {}
# id(sharded parameter) -> the conv it belongs to, under FSDP2 with scaling="step": the conv holds the unsharded
# parameter from forward to the end of backward (or to the step, with reshard_after_backward off), and the
# optimizer's step must still find it from the sharded one it steps.
_SHARDED: "dict[int, weakref.ref]" = {}
_GENERATION = [0]  # changes with every entry added or removed: what the tables say may have changed


def sgs_role(m: nn.Module) -> str | None:
    """What kind of SGS module ``m`` is (see the module docstring), or None for any other module."""
    return getattr(type(m), "sgs_role", None)


def is_sgs_conv(module: nn.Module) -> bool:
    """An SGS-instrumented conv: a conv module, or the SGS node on a conv node's weight edge in a graph."""
    return sgs_role(module) is not None


def hook_target(conv: nn.Module) -> Tensor | None:
    """The trained tensor whose gradient S scales, found without computing anything.

    The ``weight`` Parameter; for a weight under ``torch.nn.utils.parametrize`` (``spectral_norm``,
    ``weight_norm``, orthogonal, ...), the parametrization's original tensor of the kernel's full shape
    (spectral_norm: ``original``; weight_norm: ``original1``, the direction ``v``; its per-channel
    magnitude ``g`` is not a spatial kernel and is left alone). Reading ``conv.weight`` instead would run
    the parametrization, e.g. one spectral-norm power iteration. For a weight pruned with
    ``torch.nn.utils.prune``, ``weight_orig`` (the weight is ``weight_orig * weight_mask``, recomputed by a
    forward pre-hook): its gradient is mask ⊙ G, and S ⊙ mask ⊙ G is the masked S ⊙ G.
    """
    w = conv._parameters.get("weight")
    if w is not None:
        return w
    if is_pruned(conv):
        return conv._parameters["weight_orig"]
    if not parametrize.is_parametrized(conv, "weight"):
        return None
    full = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    originals = [p for n, p in conv.parametrizations.weight.named_parameters(recurse=False) if n.startswith("original")]
    return next((p for p in originals if tuple(p.shape) == full), None)


def is_pruned(conv: nn.Module) -> bool:
    """Whether ``torch.nn.utils.prune`` masks the conv's weight (it then trains ``weight_orig``)."""
    return "weight_orig" in conv._parameters and "weight_mask" in conv._buffers


def target_of(m: nn.Module) -> Tensor | None:
    """The tensor ``m``'s S scales: a graph weight's parameter (held, it belongs to another module), or
    ``hook_target``."""
    return m.__dict__.get("_sgs_param") if sgs_role(m) == "graph_weight" else hook_target(m)


def stepped_tensor(conv: nn.Module) -> Tensor | None:
    """The Parameter an optimizer steps for ``conv``'s weight: FSDP2's sharded parameter where there is one (the
    conv holds the unsharded one from forward to the end of backward), else the hooked target."""
    sharded = conv.__dict__.get("_sgs_sharded")
    return sharded if sharded is not None else target_of(conv)


def scales_at_step(conv: nn.Module) -> bool:
    """Whether an optimizer's step scales ``conv``'s weight (``scaling="step"``, not per use)."""
    return conv.__dict__.get("_sgs_step", False) and not conv.__dict__.get("_sgs_per_use", False)


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch built without distributed
    _DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def generation() -> int:
    """Changes whenever an entry of the tables is added or removed (the key of what is derived from them)."""
    return _GENERATION[0]


def claim(w: Tensor, conv: nn.Module) -> None:
    """Record that ``conv``'s hook is on ``w`` (the entry goes with ``conv``)."""
    key = id(w)
    _OWNERS[key] = weakref.ref(conv, lambda ref, key=key: _forget(key, ref))
    _GENERATION[0] += 1


def _forget(key: int, ref: weakref.ref) -> None:
    if _OWNERS.get(key) is ref:
        del _OWNERS[key]
        _GENERATION[0] += 1


def claim_sharded(w: Tensor, conv: nn.Module) -> None:
    """FSDP2: ``w`` is the sharded parameter an optimizer steps for ``conv``'s weight."""
    conv.__dict__["_sgs_sharded"] = w
    _SHARDED[id(w)] = weakref.ref(conv)
    _GENERATION[0] += 1


def release(w: Tensor, conv: nn.Module) -> None:
    """Forget that ``conv`` owns ``w`` (its hook was removed)."""
    ref = _OWNERS.get(id(w))
    if ref is not None and ref() is conv:
        del _OWNERS[id(w)]
    _GENERATION[0] += 1


def other_owner(w: Tensor, conv: nn.Module) -> nn.Module | None:
    """Another SGS module whose hook is on ``w`` now (a tied weight), if any."""
    ref = _OWNERS.get(id(w))
    other = ref() if ref is not None else None
    if other is not None and other is not conv and is_sgs_conv(other) and target_of(other) is w:
        return other
    return None


def owner_of(p: Tensor) -> nn.Module | None:
    """The SGS module whose weight ``p`` is: its hooked one, or (FSDP2) the sharded parameter it was gathered from."""
    for table, attr in ((_OWNERS, "_sgs_hook"), (_SHARDED, "_sgs_sharded")):
        ref = table.get(id(p))
        conv = ref() if ref is not None else None
        if conv is None or not is_sgs_conv(conv):
            continue
        held = conv.__dict__.get(attr)
        if (held.param if attr == "_sgs_hook" and held is not None else held) is p:
            return conv
    return None


# how many autograd nodes scaled_at_source visits before it gives up (a derived weight's graph is shallow: a
# cast, added noise, a first-order fast weight; a second-order one may hold a whole backward pass)
_WALK_LIMIT = 4096


def scaled_at_source(t: Tensor, own: Tensor | None) -> bool:
    """Whether the gradient of ``t`` — a tensor put in as a conv's weight for one call (``functional_call``) — is
    scaled where autograd carries it: ``t`` is computed from that conv's own weight ``own`` (a cast, added noise, a
    fast weight of meta-learning, a concatenation), or from another SGS weight of ``t``'s own shape (a twin's or an
    EMA's weight, cast), where that weight is scaled as a whole (not per use, as tied weights are). That weight's SGS
    scaling applies S to what it receives; scaling this use as well would give S² ⊙ G. (``own`` is None for a conv
    that scales per use.) A kernel computed from SGS weights of other shapes (a hypernetwork on an SGS backbone) is
    not.

    A breadth-first walk of ``t``'s autograd graph to its leaves (``AccumulateGrad`` nodes), stopping at the first
    such weight or after ``_WALK_LIMIT`` nodes.
    """
    fn = t.grad_fn
    if fn is None or (own is None and not (_OWNERS or _SHARDED)):
        return False
    queue, seen = [fn], {fn}
    for node in queue:
        if len(queue) > _WALK_LIMIT:
            return False
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: the leaf it accumulates into
        if variable is not None:
            if variable is own or (variable.shape == t.shape and owner_of(variable) is not None):
                return True  # (a weight that convs scale per use, tied, is in no table: never found here)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return False


def any_owned() -> bool:
    """Whether any SGS weight exists in this process (until then an optimizer step costs one call)."""
    return bool(_OWNERS or _SHARDED)


def owned_in(param_groups) -> list[tuple[Tensor, nn.Module]]:
    """(Parameter, SGS module) for each SGS weight among ``param_groups`` (an optimizer's, as they are now)."""
    found = []
    owners, sharded = _OWNERS, _SHARDED
    for group in param_groups:
        for p in group["params"]:
            key = id(p)
            if key in owners or key in sharded:
                conv = owner_of(p)
                if conv is not None:
                    found.append((p, conv))
    return found
