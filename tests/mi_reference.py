"""A deliberately naive reference of the MI estimator, written line by line from SGS_SPEC.md §3.

numpy, loops over channels and taps, no shared code with sgs_fx.scaling.mi.
"""
import itertools
import math

import numpy as np
import torch.nn.functional as F


def _pad(x, conv):
    # the conv's own padding (spec §3.1.1): zeros with per-side padding, or its padding mode
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, list(conv._reversed_padding_repeated_twice), mode=mode).numpy().astype(np.float64)


def _nmi(X, Y, k, zero_removal):
    if zero_removal:
        keep = (X != 0) & (Y != 0)
        X, Y = X[keep], Y[keep]
    n = X.size
    undefined = 0.0 if zero_removal else math.nan
    if n == 0:
        return undefined
    B = 1 + (n - 1).bit_length()
    J = np.zeros((B, B), dtype=np.int64)
    lo_x, hi_x = X.min(), X.max() + 1e-12
    lo_y, hi_y = Y.min(), Y.max() + 1e-12
    for v, w in zip(X.tolist(), Y.tolist()):
        i = 0 if hi_x - lo_x == 0 else min(max(math.floor((v - lo_x) * B / (hi_x - lo_x)), 0), B - 1)
        j = 0 if hi_y - lo_y == 0 else min(max(math.floor((w - lo_y) * B / (hi_y - lo_y)), 0), B - 1)
        J[i, j] += 1
    if zero_removal:
        np.fill_diagonal(J, 0)
    T = J.sum()
    if T == 0:
        return undefined
    p = J / T

    def H(q):
        q = q[q > 0]
        return -(q * np.log2(q)).sum()

    hxy = H(p)
    if hxy == 0:
        return undefined
    nmi = min(max((H(p.sum(1)) + H(p.sum(0)) - hxy) / hxy, 0.0), 1.0)
    return k * nmi / ((k - 1) * nmi + 1)


def reference_scale(x, conv, k=5, zero_removal=False, floor=1e-3):
    """S for one input batch; None where the layer fails (spec §3.4 step 15)."""
    import numpy as np

    if not np.isfinite(x.numpy()).all():
        return None
    xp = _pad(x, conv)
    K, dil = tuple(conv.kernel_size), tuple(conv.dilation)
    anchor = [(k_ - 1) // 2 for k_ in K]
    spatial = xp.shape[2:]
    D = np.zeros((xp.shape[1],) + K)
    for c in range(xp.shape[1]):
        for tap in itertools.product(*(range(k_) for k_ in K)):
            d = [dl * (t - a) for dl, t, a in zip(dil, tap, anchor)]
            if not any(d):
                D[(c,) + tap] = 1.0
                continue
            xs, ys = [], []
            for n in range(xp.shape[0]):
                for p in itertools.product(*(range(L) for L in spatial)):
                    q = [pi + di for pi, di in zip(p, d)]
                    if all(0 <= qi < L for qi, L in zip(q, spatial)):
                        xs.append(xp[(n, c) + tuple(p)])
                        ys.append(xp[(n, c) + tuple(q)])
            D[(c,) + tap] = _nmi(np.array(xs), np.array(ys), k, zero_removal)
    with np.errstate(all="ignore"):
        Dm = np.nanmean(D, axis=0) if not np.isnan(D).all(axis=0).any() else None
    if Dm is None:
        return None
    S = Dm / Dm.mean()
    S = np.maximum(S, floor)
    return S / S.mean()
