"""The mutual-information estimator of SGS (spec §3), vectorised and streaming.

For one conv layer and every kernel displacement d, the input x̃ (padded as the conv pads it) gives, per
channel c, pairs (x̃[c, p], x̃[c, p + d]). Their normalised mutual information, lifted by the k-transform
and averaged over channels, is the dependence D(d); S = D / mean(D), floored.

The statistics of (c, d) are functions of its multiset of pairs, so they are accumulated batch by batch
and reduced across ranks (§3.5): pass 1 gathers min / max / count, pass 2 the joint histograms with bins
fixed by the global pass-1 values. All channels are handled at once; the only Python loops run over the
displacements (D' = (∏K − 1) / 2 for odd kernels) and over channel chunks that bound memory.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_RANGE_EPS = 1e-12  # added to each maximum (spec §3.3 step 5), float64
# float64 elements per channel chunk: bounds the extra memory of pass 2. 8 MB on the CPU (cache-sized); on a
# GPU 256 MB, so that a layer is a few kernel launches rather than hundreds.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


@dataclass(frozen=True)
class ConvGeometry:
    """What the estimator needs of a conv: kernel, displacements, and how the conv pads its input.

    Attributes:
        kernel: spatial kernel shape (K_1, ..., K_n).
        pad: per-side padding in ``F.pad`` order (last axis first).
        pad_mode: ``F.pad`` mode ("constant" for zeros padding).
        displacements: the D' displacements computed; the others are their negatives (same value).
        tap_index: for each tap (row-major), an index into ``displacements``, or -1 for the anchor.
    """

    kernel: tuple[int, ...]
    pad: tuple[int, ...]
    pad_mode: str
    displacements: tuple[tuple[int, ...], ...]
    tap_index: tuple[int, ...]

    @classmethod
    def of(cls, conv: nn.Module) -> "ConvGeometry":
        kernel = tuple(conv.kernel_size)
        dilation = tuple(conv.dilation)
        anchor = [(k - 1) // 2 for k in kernel]
        computed: dict[tuple[int, ...], int] = {}
        tap_index = []
        for tap in itertools.product(*(range(k) for k in kernel)):
            d = tuple(dl * (t - a) for dl, t, a in zip(dilation, tap, anchor))
            if not any(d):
                tap_index.append(-1)
            elif tuple(-v for v in d) in computed:  # pairs of -d are those of d, swapped: same NMI
                tap_index.append(computed[tuple(-v for v in d)])
            else:
                computed[d] = len(computed)
                tap_index.append(computed[d])
        # DeformConv2d has neither attribute: it zero-pads by `padding` (its offsets are ignored here)
        padding_mode = getattr(conv, "padding_mode", "zeros")
        mode = "constant" if padding_mode == "zeros" else padding_mode
        pad = getattr(conv, "_reversed_padding_repeated_twice", None)
        if pad is None:
            pad = [p for p in reversed(tuple(conv.padding)) for _ in range(2)]
        return cls(kernel, tuple(pad), mode, tuple(computed), tuple(tap_index))


def _pair_views(xp: Tensor, d: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
    """Views X, Y of the padded input with Y at X's position + d; None when no position fits."""
    sx, sy = [slice(None), slice(None)], [slice(None), slice(None)]
    for length, da in zip(xp.shape[2:], d):
        if length - abs(da) <= 0:
            return None
        sx.append(slice(max(0, -da), length - max(0, da)))
        sy.append(slice(max(0, da), length - max(0, -da)))
    return xp[tuple(sx)], xp[tuple(sy)]


class PairStats:
    """Streaming statistics of one conv layer's input pairs, all channels and displacements at once.

    Shapes: ``lo``/``hi``/``count`` are (2, C, D') and (C, D') (X and Y stacked); ``hist`` is
    (C, D', B_max, B_max) int64 once pass 2 starts.
    """

    def __init__(self, geometry: ConvGeometry, channels: int, *, zero_removal: bool, device=None):
        self.geometry = geometry
        self.channels = channels
        self.zero_removal = zero_removal
        n_disp = len(geometry.displacements)
        kw = dict(dtype=torch.float64, device=device)
        self.lo = torch.full((2, channels, n_disp), math.inf, **kw)
        self.hi = torch.full((2, channels, n_disp), -math.inf, **kw)
        self.count = torch.zeros(channels, n_disp, dtype=torch.int64, device=device)
        self.full_lo = torch.full((channels,), math.inf, **kw)  # over the whole padded map, per channel
        self.full_hi = torch.full((channels,), -math.inf, **kw)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.calls = torch.zeros((), dtype=torch.int64, device=device)
        self.hist: Tensor | None = None

    # -- shared ----------------------------------------------------------------------------------------
    def _padded(self, x: Tensor) -> Tensor:
        if x.dim() != len(self.geometry.kernel) + 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"conv input of shape {tuple(x.shape)} does not match a conv with {self.channels} input "
                f"channels and a {len(self.geometry.kernel)}-D kernel"
            )
        x = x.detach()
        if any(self.geometry.pad):
            x = F.pad(x, list(self.geometry.pad), mode=self.geometry.pad_mode)
        return x

    def _chunks(self, xp: Tensor, float64: bool = True):
        per_channel = max(1, xp[:, :1].numel())
        step = max(1, _CHUNK_ELEMENTS.get(xp.device.type, _CHUNK_ELEMENTS["cpu"]) // per_channel)
        for c0 in range(0, self.channels, step):
            yield c0, (xp[:, c0:c0 + step].to(torch.float64) if float64 else xp[:, c0:c0 + step])

    def _pairs(self, xc: Tensor):
        """(j, X, Y, keep) per displacement: strided views (N, c, ...) — no copy — and the zero-removal mask."""
        for j, d in enumerate(self.geometry.displacements):
            views = _pair_views(xc, d)
            if views is None:
                continue
            X, Y = views
            keep = (X != 0) & (Y != 0) if self.zero_removal else None
            yield j, X, Y, keep

    # -- pass 1 ----------------------------------------------------------------------------------------
    def observe_range(self, x: Tensor, keep: bool = False) -> Tensor | None:
        """Pass 1: per (channel, displacement) min / max of X and Y and the pair count.

        With ``keep``, returns the padded input (a copy, safe from later in-place ops on ``x``) for
        ``observe_hist(..., padded=True)``: one forward instead of two, at the cost of keeping the map.
        """
        xp = self._padded(x)
        self.calls += 1
        self.nonfinite += (~torch.isfinite(x)).sum()
        if self.zero_removal:  # the kept pairs depend on both sides: reduce per displacement
            self._observe_range_pairs(xp)
        else:
            self._observe_range_views(xp)
        if keep:
            return xp.clone() if xp.data_ptr() == x.data_ptr() else xp
        return None

    def _observe_range_views(self, xp: Tensor) -> None:
        # Without zero removal X and Y are plain views of the map: min over a view = min over the view of the
        # batch-wise min. One pass over the data, then small reductions of (C, L...) maps, gathered into one
        # update per statistic (few kernel launches: this runs per layer and batch).
        spatial = tuple(range(1, xp.dim() - 1))
        lo_map, hi_map = torch.aminmax(xp, dim=0)
        self.full_lo.copy_(torch.minimum(self.full_lo, lo_map.amin(spatial).double()))
        self.full_hi.copy_(torch.maximum(self.full_hi, hi_map.amax(spatial).double()))
        views = list(self._view_slices(xp.shape[2:]))
        if not views:
            return
        js = [j for j, _, _ in views]
        every = (slice(None),)  # the channel dim
        lo = torch.stack([torch.stack([lo_map[every + v[1 + side]].amin(spatial) for v in views], dim=1)
                          for side in (0, 1)]).double()  # (side, C, D'), side 0 = X's view, 1 = Y's
        hi = torch.stack([torch.stack([hi_map[every + v[1 + side]].amax(spatial) for v in views], dim=1)
                          for side in (0, 1)]).double()
        if js == list(range(self.lo.shape[2])):
            self.lo.copy_(torch.minimum(self.lo, lo))
            self.hi.copy_(torch.maximum(self.hi, hi))
        else:
            self.lo[:, :, js] = torch.minimum(self.lo[:, :, js], lo)
            self.hi[:, :, js] = torch.maximum(self.hi[:, :, js], hi)
        pairs = torch.tensor([xp.shape[0] * math.prod(s_.stop - s_.start for s_ in sx) for _, sx, _ in views],
                             dtype=torch.int64)
        if js == list(range(self.count.shape[1])):
            self.count += pairs.to(self.count.device)
        else:
            self.count[:, js] += pairs.to(self.count.device)

    def _observe_range_pairs(self, xp: Tensor) -> None:
        dims = (0, *range(2, xp.dim()))  # every dim but the channel
        for c0, xc in self._chunks(xp):
            c1 = c0 + xc.shape[1]
            for j, X, Y, keep in self._pairs(xc):
                for side, V in enumerate((X, Y)):
                    lo_v = V if keep is None else V.masked_fill(~keep, math.inf)
                    hi_v = V if keep is None else V.masked_fill(~keep, -math.inf)
                    self.lo[side, c0:c1, j] = torch.minimum(self.lo[side, c0:c1, j], lo_v.amin(dims))
                    self.hi[side, c0:c1, j] = torch.maximum(self.hi[side, c0:c1, j], hi_v.amax(dims))
                self.count[c0:c1, j] += X[:, 0].numel() if keep is None else keep.sum(dims)

    def _view_slices(self, lengths):
        """(j, X slices, Y slices) over the spatial dims, for every displacement with a non-empty overlap."""
        for j, d in enumerate(self.geometry.displacements):
            if any(length - abs(da) <= 0 for length, da in zip(lengths, d)):
                continue
            yield (j, tuple(slice(max(0, -da), length - max(0, da)) for length, da in zip(lengths, d)),
                   tuple(slice(max(0, da), length - max(0, -da)) for length, da in zip(lengths, d)))

    def start_histograms(self) -> None:
        """Fix every (channel, displacement)'s bins from the (reduced) pass-1 values (steps 4-5)."""
        # Sturges, exactly in integers: B = 1 + ceil(log2 N) = 1 + (N - 1).bit_length(); B = 1 for N <= 1.
        counts = self.count.flatten().tolist()
        self.bins = torch.tensor([(n - 1).bit_length() + 1 if n > 1 else 1 for n in counts],
                                 dtype=torch.int64, device=self.count.device).view_as(self.count)
        self.b_max = int(self.bins.max().item()) if self.bins.numel() else 1
        width = self.hi + _RANGE_EPS - self.lo
        # A zero width (a constant vector absorbing the 1e-12) puts everything in bin 0: (v - lo) * B / inf = 0.
        self.width = torch.where(width > 0, width, math.inf)
        self.hist = torch.zeros(self.channels, len(self.geometry.displacements), self.b_max * self.b_max,
                                dtype=torch.int64, device=self.count.device)
        # (c, d) whose X and Y ranges are the whole map's: their bin of a pixel does not depend on d, so each
        # pixel is binned once (per distinct B) and the displacements only pair up bin indices. The others
        # (an extreme value only in a border row that d's view leaves out; zero removal) bin per displacement.
        lo, hi = self.full_lo[None, :, None], self.full_hi[None, :, None]
        self.shared = ((self.lo == lo) & (self.hi == hi)).all(0) & (not self.zero_removal)
        full_width = self.full_hi + _RANGE_EPS - self.full_lo
        self.full_width = torch.where(full_width > 0, full_width, math.inf)
        # the per-chunk decisions of pass 2 read host copies: no device synchronisation inside the loops
        self._shared_host, self._bins_host = self.shared.cpu(), self.bins.cpu()

    # -- pass 2 ----------------------------------------------------------------------------------------
    def observe_hist(self, x: Tensor, padded: bool = False) -> None:
        """Pass 2: accumulate the joint histograms (steps 6-7); ``padded``: ``x`` came from ``observe_range``."""
        if self.hist is None:
            raise RuntimeError("PairStats.observe_hist before start_histograms")
        xp = x if padded else self._padded(x)
        for c0, xc in self._chunks(xp):
            c1 = c0 + xc.shape[1]
            shared = self._shared_host[c0:c1]
            if shared.any():
                self._hist_shared(xc, c0, c1, shared)
            if not shared.all():
                self._hist_per_displacement(xc, c0, c1, ~shared)

    def _hist_shared(self, xc: Tensor, c0: int, c1: int, shared: Tensor) -> None:
        """Bin every pixel once per distinct B; each displacement then pairs two views of the bin map."""
        b_max, n = self.b_max, c1 - c0
        shape = (1, n) + (1,) * (xc.dim() - 2)
        lo = self.full_lo[c0:c1].view(shape)
        width = self.full_width[c0:c1].view(shape)
        # int32 index arithmetic (n * b_max² is far below 2**31): half the memory traffic of int64
        channel = (torch.arange(n, device=xc.device, dtype=torch.int32) * (b_max * b_max)).view(shape)
        bins = self._bins_host[c0:c1]
        buf = torch.empty_like(xc)
        for b in torch.unique(bins[shared]).tolist():
            # Spec §3.3 step 6, in this order: floor((v - lo) * B / (hi - lo)), clipped to [0, B - 1].
            torch.sub(xc, lo, out=buf)
            index = buf.mul_(b).div_(width).floor_().clamp_(0, b - 1).to(torch.int32)
            row = index.mul(b_max).add_(channel)  # (c, i_X) part of the flat key (c, i_X, i_Y)
            views = list(self._view_slices(xc.shape[2:]))
            uses = [shared[:, j] & (bins[:, j] == b) for j, _, _ in views]
            if views and all(u.all() for u in uses) and len(views) == self.hist.shape[1]:
                self._hist_all_displacements(row, index, views, c0, c1)
                continue
            for j, sx, sy in views:
                use = shared[:, j] & (bins[:, j] == b)
                if not use.any():
                    continue
                flat = row[(slice(None), slice(None), *sx)] + index[(slice(None), slice(None), *sy)]
                counts = torch.bincount(flat.flatten(), minlength=n * b_max * b_max).view(n, b_max * b_max)
                if use.all():
                    self.hist[c0:c1, j] += counts
                else:
                    use = use.to(counts.device)
                    self.hist[c0:c1, j][use] += counts[use]

    def _hist_all_displacements(self, row: Tensor, index: Tensor, views, c0: int, c1: int) -> None:
        """Every displacement's keys in one buffer, offset by j · n · B_max², and one bincount for them all
        (two small ops per displacement instead of a bincount and an update each: fewer GPU launches)."""
        n, bb = c1 - c0, self.b_max * self.b_max
        every = (slice(None), slice(None))
        sizes = [row[every + sx].numel() for _, sx, _ in views]
        keys = torch.empty(sum(sizes), dtype=torch.int32, device=row.device)
        offset = 0
        for (j, sx, sy), size in zip(views, sizes):
            segment = keys[offset:offset + size].view(row[every + sx].shape)
            torch.add(row[every + sx], index[every + sy], out=segment)
            segment.add_(j * n * bb)
            offset += size
        counts = torch.bincount(keys, minlength=len(views) * n * bb).view(len(views), n, bb)
        self.hist[c0:c1] += counts.transpose(0, 1)

    def _hist_per_displacement(self, xc: Tensor, c0: int, c1: int, rows: Tensor) -> None:
        """The general path: every (c, d) with its own bins, for the rows (c, d) marked in ``rows``."""
        b_max = self.b_max
        shape = (1, c1 - c0) + (1,) * (xc.dim() - 2)  # per-channel values broadcast over (N, c, ...)
        channel = torch.arange(c1 - c0, device=xc.device, dtype=torch.float64).view(shape) * (b_max * b_max)
        buffers: dict = {}  # reused across displacements: large fresh allocations cost page faults on CPU
        for j, X, Y, keep in self._pairs(xc):
            if not rows[:, j].any():
                continue
            bins = self.bins[c0:c1, j].view(shape).to(torch.float64)
            ix = self._bin(X, 0, c0, c1, j, bins, shape, buffers, "x")
            iy = self._bin(Y, 1, c0, c1, j, bins, shape, buffers, "y")
            # (c, i_X, i_Y) -> one flat index, in float64 (exact: far below 2**53), then one integer cast
            flat = ix.mul_(b_max).add_(iy).add_(channel)
            flat = (flat[keep] if keep is not None else flat.flatten()).long()
            counts = torch.bincount(flat, minlength=(c1 - c0) * b_max * b_max).view(c1 - c0, b_max * b_max)
            use = rows[:, j].to(counts.device)
            self.hist[c0:c1, j][use] += counts[use]

    def _bin(self, V: Tensor, side: int, c0: int, c1: int, j: int, bins: Tensor, shape, buffers: dict,
             key: str) -> Tensor:
        lo = self.lo[side, c0:c1, j].view(shape)
        width = self.width[side, c0:c1, j].view(shape)
        buf = buffers.get(key)
        if buf is None or buf.shape != V.shape:
            buf = buffers[key] = torch.empty(V.shape, dtype=torch.float64, device=V.device)
        # Spec §3.3 step 6, in this order: floor((v - lo) * B / (hi - lo)), clipped to [0, B - 1].
        torch.sub(V, lo, out=buf)
        return buf.mul_(bins).div_(width).floor_().clamp_(min=torch.zeros_like(bins), max=bins - 1)

    # -- finalise --------------------------------------------------------------------------------------
    def failure(self) -> str | None:
        if int(self.calls) == 0:
            return "the conv was never called by the calibration forward"
        if int(self.nonfinite) > 0:
            return f"its input holds {int(self.nonfinite)} non-finite value(s)"
        return None

    def dependence_per_channel(self, k: float) -> Tensor:
        """D_c(t) for every channel and tap, shape (C, taps): NaN where undefined (zero removal: 0)."""
        b = self.b_max
        J = self.hist.view(self.channels, -1, b, b).to(torch.float64)
        if self.zero_removal:
            J = J * (1 - torch.eye(b, dtype=J.dtype, device=J.device))
        total = J.sum((-1, -2))
        p = J / total.clamp(min=1)[..., None, None]
        entropy = lambda q, dims: -(torch.special.xlogy(q, q).sum(dims)) / math.log(2)  # noqa: E731
        h_xy = entropy(p, (-1, -2))
        mi = entropy(p.sum(-1), -1) + entropy(p.sum(-2), -1) - h_xy
        undefined = (self.count == 0) | (total == 0) | (h_xy == 0)
        nmi = (mi / torch.where(undefined, 1.0, h_xy)).clamp(0.0, 1.0)
        nmi_k = k * nmi / ((k - 1) * nmi + 1)
        nmi_k = torch.where(undefined, 0.0 if self.zero_removal else math.nan, nmi_k)
        tap_index = torch.tensor(self.geometry.tap_index, device=J.device)
        ones = torch.ones(self.channels, 1, dtype=torch.float64, device=J.device)
        per_tap = torch.cat([nmi_k, ones], dim=1)  # index -1 (the anchor) picks the trailing ones column
        return per_tap[:, tap_index]

    def scale(self, k: float, floor: float) -> tuple[Tensor | None, str | None]:
        """(S of the kernel's shape, None) or (None, why the layer failed) — steps 14-17."""
        why = self.failure()
        if why:
            return None, why
        d = torch.nanmean(self.dependence_per_channel(k), dim=0)
        if torch.isnan(d).any():
            return None, "every channel's dependence is undefined at some tap (constant or empty inputs)"
        return normalise_with_floor(d, floor).view(self.geometry.kernel).cpu(), None


def normalise_with_floor(d: Tensor, floor: float) -> Tensor:
    s = d / d.mean()
    s = s.clamp(min=floor)
    return s / s.mean()


def dependence(x: Tensor, conv: nn.Module, *, k: float = 5, zero_removal: bool = False,
               floor: float = 1e-3) -> Tensor:
    """S (mean 1, shape = the kernel's spatial shape, float64) of ``conv`` from one input batch ``x``.

    Args:
        x: the conv's input, shape (N, C_in, L_1, ..., L_n).
        conv: the conv (plain or instrumented); its kernel, dilation, padding and padding mode are used.
        k: the k-transform of the NMI (k = 1: identity; larger k flattens S).
        zero_removal: drop pairs with an exact zero (ReLU, padding) and the histogram's diagonal.
        floor: lower bound on S before the final renormalisation.

    When the layer fails (non-finite input, every channel undefined at a tap), returns ones and warns.
    """
    check_hyper(k, floor)
    stats = PairStats(ConvGeometry.of(conv), conv.in_channels, zero_removal=zero_removal, device=x.device)
    stats.observe_range(x)
    if stats.failure() is None:
        stats.start_histograms()
        stats.observe_hist(x)
    s, why = stats.scale(k, floor)
    if s is None:
        import warnings

        warnings.warn(f"sgs_fx.dependence: {why}; returning S = ones", RuntimeWarning, stacklevel=2)
        return torch.ones(tuple(conv.kernel_size), dtype=torch.float64)
    return s


def check_hyper(k: float, floor: float) -> None:
    if not (k > 0 and math.isfinite(k)):
        raise ValueError(f"k must be a finite number > 0 (got {k})")
    if not (0 < floor < 1):
        raise ValueError(f"floor must lie in (0, 1) (got {floor})")
