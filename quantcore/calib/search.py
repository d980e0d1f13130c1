"""Range searches: turn collected statistics into a quantization range ``(lo, hi)``.

``find_range`` works on a :class:`HistogramState` (activations), ``tensor_mse_range`` on a tensor
itself (weights). Every search is vectorized in torch over candidates; the only Python loops are a
small fixed number of coarse-to-fine refinement rounds.

Error model used by the MSE / tf_enhanced searches: inside each histogram bin the density is taken
as uniform (piecewise-uniform density), and the expected squared error of the integer grid (rounding
inside the range, clipping outside) is integrated *exactly* under that model from prefix sums of the
0th/1st/2nd moments, so a candidate costs O(grid levels) instead of O(bins) (see ``_grid_error``).
Rounding each bin's centre to the grid instead aliases badly once the step is comparable to the bin
width (8-bit grids on a 2048-bin histogram often are), and a flat ``s^2/12`` noise model is wrong
for skewed data whose mass sits within one step of zero (post-softmax / post-GELU); the exact
piecewise-uniform integral handles both.

Entropy is TensorRT's / ModelOpt's KL search, run on an estimate of the histogram that reference would
build from the same data (``bins`` bins over ``[0, amax]``, re-binned from ours: its candidates do not
depend on our power-of-two span), with its zero-bin rule. The entropy calibrator collects 8x finer than
that grid, so each of our bins lands whole in one of the reference's, point masses included. Fed
ModelOpt's own histogram the search returns its threshold exactly; on ours the re-binned counts differ
from a histogram of the raw values where the data's tail is sparse, and the KL minimum, which is flat
there, can move (``tests/test_calibrator_reference.py`` bounds the reference's KL at our threshold).
ModelOpt's own grid depends on the first batch's max, so its thresholds differ from ours by 0.3 %
(median) to 15 % on the demo ViT's activations (``tests/test_backends.py``). O(levels) per threshold via prefix sums, so every
threshold is evaluated (symmetric, one-sided); two-sided asymmetric specs search both ends (see
``_entropy_range``).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from ..formats import QuantSpec
from ..quantizer_kinds.affine import MIN_SCALE as _MIN_SCALE  # the quantizer's floor: never a zero scale
from .histogram import HistogramState
from .maxcal import channel_extremes

#: AIMET's default weight on clipping noise for the tf_enhanced (SQNR) search.
TF_ENHANCED_GAMMA = 3.0
#: Above this many grid levels (bits > 10) the in-range error uses the s^2/12 model instead of the
#: per-cell integral: the step is then about a bin width or less, where the two agree closely.
_MAX_EXACT_LEVELS = 1024
#: Points (candidates x grid cells) evaluated per chunk, bounding temporary memory.
_CHUNK_POINTS = 1 << 18

Range = tuple[float, float]


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the (small: <= ~250k-element) CPU searches on one intra-op thread.

    Forking/joining threads for each of the ~100 small ops costs more than it saves, and on a
    busy machine it is 10x slower or worse. ``set_num_threads`` is process-wide, so it is restored
    right after; other Python threads using torch meanwhile only run slower, never differently.
    """
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def find_range(state: HistogramState, spec: QuantSpec) -> Range:
    """Range ``(lo, hi)`` for ``spec`` from a histogram; symmetric specs give ``(-a, a)``.

    Empty or all-zero states give ``(0.0, 0.0)`` (the quantizer floors the scale).
    """
    if state.total == 0 or state.exp is None:
        return 0.0, 0.0
    with _one_cpu_thread(state.counts.device):
        return _find_range(state, spec)


def _find_range(state: HistogramState, spec: QuantSpec) -> Range:
    from ..quantizer_kinds import quantizer_kind
    from ..quantizer_kinds.base import QuantizerKind

    kind = quantizer_kind(spec.format)
    uniform = type(kind).compute_range is QuantizerKind.compute_range
    # one distinct value: every calibrator of a uniform grid agrees; a kind with its own search (twin_int,
    # log2) still applies its own rules to it (twin_int's post-softmax form refuses a constant 3.0 as it
    # refuses {0, 3}, and stores its own grid's top, not the value)
    if spec.calibrator == "max" or (state.min == state.max and uniform):
        return _max_range(state, spec)
    # the kind decides: a non-uniform grid searches its own error; uniform ones use the calibrator's
    return kind.compute_range(state, spec)


def _max_range(state: HistogramState, spec: QuantSpec) -> Range:
    if spec.symmetric:
        a = max(abs(state.min), abs(state.max))
        return -a, a
    return float(state.min), float(state.max)


def _abs_max(state: HistogramState) -> float:
    return max(abs(state.min), abs(state.max))


def bin_width(state: HistogramState) -> float:
    return state.range / state.bins


# --------------------------------------------------------------------------------------------------
# percentile
# --------------------------------------------------------------------------------------------------
def _hist_percentile(counts: torch.Tensor, e0: float, w: float, q: float) -> float:
    """q-th percentile (0..100) of a histogram with first edge ``e0`` and bin width ``w``.

    Linear interpolation inside the bin where the cumulative count crosses ``q% of total``.
    """
    c = counts.to(torch.float64)
    cdf = torch.cumsum(c, 0)
    target = cdf[-1] * (q / 100.0)
    k = int(torch.searchsorted(cdf, target.reshape(1)).clamp_(max=c.numel() - 1))
    prev = float(cdf[k - 1]) if k > 0 else 0.0
    ck = float(c[k])
    frac = (float(target) - prev) / ck if ck > 0 else 0.0
    return e0 + (k + min(max(frac, 0.0), 1.0)) * w


def _percentile_range(state: HistogramState, spec: QuantSpec) -> Range:
    p, w = spec.percentile, bin_width(state)
    if spec.symmetric:
        a = min(_hist_percentile(state.abs_counts(), 0.0, w, p), _abs_max(state))
        return -a, a
    r = state.range
    lo = _hist_percentile(state.counts, -r, w, 100.0 - p)
    hi = _hist_percentile(state.counts, -r, w, p)
    return max(lo, state.min), min(hi, state.max)


# --------------------------------------------------------------------------------------------------
# MSE / tf_enhanced
# --------------------------------------------------------------------------------------------------
class Moments:
    """Prefix moments ``F_k(x) = int_{-inf}^{x} t^k rho(t) dt`` (k = 0, 1, 2) of a histogram read
    as a piecewise-uniform density with total mass 1, in float64 (the grid error is a small
    difference of these sums).

    The table is padded with one empty bin on each side (density 0, prefix sums 0 / total), so any
    point maps to a row by ``floor`` alone: points left of the data get zeros, points right of it
    the totals, without a separate clamp of the point itself.
    """

    def __init__(self, counts: torch.Tensor, e0: float, w: float, total: float | None = None) -> None:
        p = counts.to(torch.float64)
        p = p / (p.sum() if total is None else total)  # total: mass held outside ``counts`` (a point at 0)
        dev = p.device
        n = p.numel()
        a = e0 + w * torch.arange(n, dtype=torch.float64, device=dev)
        b = a + w
        per_bin = torch.stack([p, p * (a + b) / 2, p * (a * a + a * b + b * b) / 3], 1)
        zero = torch.zeros(1, 3, dtype=torch.float64, device=dev)
        cum = torch.cat([zero, torch.cumsum(per_bin, 0)])  # (n + 1, 3): prefix sums at the edges
        dens = torch.cat([zero[0, :1], p / w, zero[0, :1]])
        # row r covers [e0 + (r - 1) w, e0 + r w): prefix sums at its left edge, its density
        cum = torch.cat([zero, cum])
        self.c0, self.c1, self.c2 = (cum[:, k].contiguous() for k in range(3))
        self.dens = dens
        self.left = e0 - w  # left edge of row 0
        self.w, self.n = w, n
        self.total = cum[-1]

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = torch.floor((x - self.left) * (1.0 / self.w)).clamp_(0, self.n + 1)
        dx = x - (self.left + r * self.w)  # offset from the row's left edge
        return r.flatten().long(), dx, r

    def at(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, dx, _ = self._rows(x)
        ej = x - dx

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, idx).view(x.shape)

        d = take(self.dens) * dx  # factors of dx avoid cancelling x^3 - e^3
        f0 = take(self.c0) + d
        f1 = take(self.c1) + d * (2 * ej + dx) / 2
        f2 = take(self.c2) + d * (ej * ej + ej * dx + dx * dx / 3)
        return f0, f1, f2

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """``F1(x) - x F0(x) = -int_{-inf}^{x} (x - t) rho(t) dt``."""
        idx, dx, _ = self._rows(x)
        c0 = self.c0.index_select(0, idx).view(x.shape)
        c1 = self.c1.index_select(0, idx).view(x.shape)
        half_d = self.dens.index_select(0, idx).view(x.shape).mul_(0.5)
        return c1.sub_(x * c0).sub_(half_d.mul_(dx).mul_(dx))


def _grid_params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) exactly as the quantizer derives them from a range."""
    qmin, qmax = spec.qrange()
    if spec.symmetric:
        s = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(_MIN_SCALE)
        return s, torch.zeros_like(s)
    s = ((hi - lo) / (qmax - qmin)).clamp_min(_MIN_SCALE)
    return s, torch.clamp(torch.round(qmin - lo / s), qmin, qmax)


def _grid_error(mom: Moments, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                gamma: float) -> torch.Tensor:
    """Expected squared error per candidate range; clipping error is weighted by ``gamma``.

    Grid points ``g_n = (nlo + n) s``, cell boundaries ``b_n = g_n - s/2``. With
    ``H(b; g) = int_{-inf}^{b} (t - g)^2 rho`` the in-range error is
    ``sum_n H(b_{n+1}; g_n) - H(b_n; g_n)``; regrouping by boundary, each interior boundary
    contributes ``H(b; g - s) - H(b; g) = 2 s (F1(b) - b F0(b))``, so only one prefix function is
    needed per boundary, and the full moments only at the two ends.
    """
    qmin, qmax = spec.qrange()
    levels = qmax - qmin + 1
    s, zp = _grid_params(lo, hi, spec)
    nlo = qmin - zp  # grid = s * {nlo, ..., nlo + levels - 1}: zp is an integer
    gmin, gmax = nlo * s, (nlo + levels - 1) * s
    f0, f1, f2 = mom.at(torch.stack([gmin - s / 2, gmax + s / 2], 1))
    t0, t1, t2 = mom.total
    below = f2[:, 0] - 2 * gmin * f1[:, 0] + gmin * gmin * f0[:, 0]  # H(b_0; gmin)
    h_end = f2[:, 1] - 2 * gmax * f1[:, 1] + gmax * gmax * f0[:, 1]  # H(b_L; gmax)
    above = (t2 - 2 * gmax * t1 + gmax * gmax * t0) - h_end
    if levels > _MAX_EXACT_LEVELS:
        inner = (f0[:, 1] - f0[:, 0]) * s * s / 12
    else:
        m = torch.arange(1, levels, dtype=torch.float64, device=s.device) - 0.5
        interior = (nlo[:, None] + m) * s[:, None]  # (K, levels - 1)
        inner = 2 * s * mom.phi(interior).sum(1) + h_end - below
    return inner.clamp_min(0) + gamma * (below + above).clamp_min(0)


def _chunked(fn: Callable[..., torch.Tensor], *cands: torch.Tensor, per_row: int) -> torch.Tensor:
    """Evaluate ``fn`` over candidate rows in chunks of bounded size (memory only, same result)."""
    k = cands[0].numel()
    step = max(1, _CHUNK_POINTS // max(per_row, 1))
    if k <= step:
        return fn(*cands)
    return torch.cat([fn(*(c[i:i + step] for c in cands)) for i in range(0, k, step)])


def occupied_bins(state: HistogramState) -> tuple[torch.Tensor, float]:
    """Signed counts trimmed to the occupied bins, and the left edge of the first one."""
    nz = torch.nonzero(state.counts).flatten()
    first, last = int(nz[0]), int(nz[-1])
    w = bin_width(state)
    return state.counts[first:last + 1], -state.range + first * w


def error_moments(state: HistogramState) -> Moments | None:
    """:class:`Moments` of the histogram for the grid error, the bin ``[0, w)`` taken as a point mass at
    zero (error-free on every grid: each holds zero exactly); None when it holds every value.

    Why: read as uniform over ``[0, w)``, the exact zeros of a post-ReLU map (99.9 % of it) are charged
    rounding error once the grid step nears the bin width (8 bits on 256 bins, 10-12 bits on 2048), and
    a range that clips the largest values then looks better than min/max by re-aligning the grid with
    that bin (measured: 177x the squared error of min/max on the raw values). While the step is at least
    two bin widths, the whole bin rounds to the grid point 0 under every candidate, so the point-mass
    reading changes every candidate's error by the same constant and picks the same range as before.
    """
    counts, e0 = occupied_bins(state)
    w = bin_width(state)
    iz = int(round(-e0 / w)) if w > 0 else -1
    total = float(counts.sum())
    if 0 <= iz < counts.numel() and int(counts[iz]):
        counts = counts.clone()
        counts[iz] = 0
        if not int(counts.sum()):
            return None
    return Moments(counts, e0, w, total)


def mse_objective(state: HistogramState, spec: QuantSpec, lo: torch.Tensor | float,
                  hi: torch.Tensor | float, gamma: float = 1.0) -> torch.Tensor:
    """Expected quantization error of the histogram's distribution (mass normalized to 1, the bin
    ``[0, w)`` as exact zeros: :func:`error_moments`) for candidate ranges; ``gamma`` weights the
    clipping part (1 = plain MSE)."""
    mom = error_moments(state)
    dev = state.counts.device
    if mom is None:  # zeros only (to the histogram's resolution): no range has an error
        return torch.zeros(torch.as_tensor(lo).numel(), dtype=torch.float64, device=dev)
    lo_t = torch.as_tensor(lo, dtype=torch.float64, device=dev).reshape(-1)
    hi_t = torch.as_tensor(hi, dtype=torch.float64, device=dev).reshape(-1)
    return _grid_error(mom, lo_t, hi_t, spec, gamma)


def _mse_range(state: HistogramState, spec: QuantSpec, gamma: float) -> Range:
    mom = error_moments(state)
    if mom is None:  # every value in [0, w): the grid resolves them finer than the histogram
        return _max_range(state, spec)
    dev = state.counts.device
    qmin, qmax = spec.qrange()
    per_row = min(qmax - qmin + 2, _MAX_EXACT_LEVELS)

    def err(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return _chunked(lambda a, b: _grid_error(mom, a, b, spec, gamma), lo, hi, per_row=per_row)

    # Few, wide evaluations: each costs ~40 small torch ops, whose fixed overhead dominates.
    if spec.symmetric:
        # 1-D: amax on a 64-point grid, then 2 rounds of 17 points within one step (step / 8):
        # resolution amax / 4096.
        amax = _abs_max(state)
        cand = amax * torch.arange(1, 65, dtype=torch.float64, device=dev) / 64
        step = amax / 64
        best = float(cand[torch.argmin(err(-cand, cand))])
        offs = torch.linspace(-1.0, 1.0, 17, dtype=torch.float64, device=dev)
        for _ in range(2):
            cand = (best + step * offs).clamp(amax * 1e-6, amax)
            best = float(cand[torch.argmin(err(-cand, cand))])
            step /= 8
        return -best, best

    # 2-D: lo in [min(obs_min, 0), 0], hi in [0, max(obs_max, 0)] -- the grid always holds zero.
    # A 13 x 13 grid, then 3 rounds of 9 x 9 within one step (step / 4): resolution range / 768.
    lo_end, hi_end = min(state.min, 0.0), max(state.max, 0.0)
    n = 12
    frac = torch.arange(n + 1, dtype=torch.float64, device=dev) / n
    lo_axis = lo_end * frac if lo_end < 0 else frac[:1] * 0
    hi_axis = hi_end * frac if hi_end > 0 else frac[:1] * 0
    lo_c, hi_c = torch.meshgrid(lo_axis, hi_axis, indexing="ij")
    lo_c, hi_c = lo_c.flatten(), hi_c.flatten()
    k = int(torch.argmin(err(lo_c, hi_c)))
    best_lo, best_hi = float(lo_c[k]), float(hi_c[k])
    d_lo, d_hi = -lo_end / n, hi_end / n
    offs = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64, device=dev)
    for _ in range(3):
        lo_c, hi_c = torch.meshgrid((best_lo + d_lo * offs).clamp(lo_end, 0.0),
                                    (best_hi + d_hi * offs).clamp(0.0, hi_end), indexing="ij")
        lo_c, hi_c = lo_c.flatten(), hi_c.flatten()
        k = int(torch.argmin(err(lo_c, hi_c)))
        best_lo, best_hi = float(lo_c[k]), float(hi_c[k])
        d_lo, d_hi = d_lo / 4, d_hi / 4
    # Return the grid's own end points: the quantizer then re-derives exactly the scale and
    # integer zero point evaluated here, with no rounding-boundary flip of the zero point.
    s, zp = _grid_params(torch.tensor([best_lo], dtype=torch.float64),
                         torch.tensor([best_hi], dtype=torch.float64), spec)
    s_f, zp_f = float(s), float(zp)
    return (qmin - zp_f) * s_f, (qmax - zp_f) * s_f


# --------------------------------------------------------------------------------------------------
# entropy (KL)
# --------------------------------------------------------------------------------------------------
#: First threshold tried, in bins of the reference histogram (TensorRT's / ModelOpt's ``start_bin``):
#: with 2048 bins the range is never cut below 1/16 of the observed extent.
ENTROPY_START_BIN = 128
#: Asymmetric entropy: threshold pairs up to this many are all evaluated (one-sided data always is).
_ENTROPY_EXHAUSTIVE_PAIRS = 4096


class _KLTables:
    """Prefix sums that make KL(P||Q) of one candidate O(levels) instead of O(bins).

    Q is constant over the non-zero bins of the histogram within a group, so with ``G_g`` the
    clipped slice's mass in group g, ``PG_g`` the same plus the outliers folded into it, ``nnz_g``
    its non-zero bins and ``S`` the slice mass (Q's normaliser):
    ``KL = sum_j P_j log P_j + log S - sum_g PG_g log(G_g / nnz_g)``, where ``sum_j P_j log P_j`` is
    a prefix sum except for the two bins that receive the outliers.
    """

    def __init__(self, counts: torch.Tensor) -> None:
        p = counts.to(torch.float64)
        p = p / p.sum()
        zero = torch.zeros(1, dtype=torch.float64, device=p.device)
        self.p = p
        self.plogp = torch.cat([zero, torch.cumsum(torch.xlogy(p, p), 0)])
        self.mass = torch.cat([zero, torch.cumsum(p, 0)])  # prefix mass
        self.nnz = torch.cat([zero, torch.cumsum((p > 0).to(torch.float64), 0)])  # prefix non-zeros

    def kl(self, a: torch.Tensor, b: torch.Tensor, levels: int) -> torch.Tensor:
        """KL(P||Q) of clipping to bins [a, b), as TensorRT / ModelOpt define it.

        P: the slice with the mass left of ``a`` added to bin ``a`` and the mass right of ``b`` to
        bin ``b - 1`` (normalised by the total). Q: the slice *without* the outliers, merged into
        ``levels`` groups (bin j of the slice -> group floor(j * levels / (b - a))), each group's
        mass spread evenly over its bins that are non-zero in the histogram, normalised by the
        slice mass. +inf where P has mass that Q cannot represent: outliers folded into an empty
        end bin.
        """
        mass = self.mass
        left = mass[a]
        right = mass[-1] - mass[b]
        pa, pb = self.p[a], self.p[b - 1]
        fa, fb = pa + left, pb + right
        plogp = (self.plogp[b] - self.plogp[a] - torch.xlogy(pa, pa) - torch.xlogy(pb, pb)
                 + torch.xlogy(fa, fa) + torch.xlogy(fb, fb))
        slice_mass = mass[b] - mass[a]
        # group g starts at a + ceil(g * (b - a) / levels); levels is a power of two -> shift
        g = torch.arange(levels + 1, device=a.device)
        shift = levels.bit_length() - 1
        starts = (g * (b - a)[:, None] + (levels - 1)).bitwise_right_shift_(shift).add_(a[:, None])
        flat = starts.flatten()
        shape = (a.numel(), levels + 1)
        gm = mass.index_select(0, flat).view(shape).diff(dim=1)
        gn = self.nnz.index_select(0, flat).view(shape).diff(dim=1)
        pg = gm.clone()
        pg[:, 0] += left
        pg[:, -1] += right
        logq = gm.log().sub_(gn.clamp_min_(1.0).log_())
        q = torch.where(pg > 0, pg * logq, torch.zeros_like(pg)).sum(1)
        kl = plogp + slice_mass.log() - q
        lost = ((pa == 0) & (left > 0)) | ((pb == 0) & (right > 0))
        return torch.where(torch.isnan(kl) | lost, torch.full_like(kl, math.inf), kl.clamp_min(0))


#: KL values this close to the minimum are equal: the prefix sums of :class:`_KLTables` leave ~1e-15
#: of rounding, which made a narrow threshold with KL exactly 0 beat the full range's 1e-16.
_KL_TIE = 1e-12


def _last_argmin(x: torch.Tensor) -> int:
    """Index of the last minimum, up to ``_KL_TIE`` (the reference keeps the widest of equally good
    thresholds)."""
    best = x.min()
    if not torch.isfinite(best):
        return x.numel() - 1 - int(torch.argmin(x.flip(0)))
    return int(torch.nonzero(x <= best + _KL_TIE).flatten()[-1])


def _reference_bins(state: HistogramState) -> int:
    return state.reference_bins or state.bins


def _lone(c: torch.Tensor) -> torch.Tensor:
    """Occupied bins whose neighbours are empty."""
    occ = c > 0
    lone = occ.clone()
    lone[1:] &= ~occ[:-1]
    lone[:-1] &= ~occ[1:]
    return lone


def _rebin(counts: torch.Tensor, e0: float, w: float, lo: float, hi: float, edges: torch.Tensor) -> torch.Tensor:
    """``counts`` re-binned onto ``edges`` by :func:`_resample`; when ours are at least 2x finer (a state
    collected for this, :class:`~.registry.EntropyCalibrator`), an occupied bin of ours with empty
    neighbours is a point mass (integers, pixels, an upstream quantizer's grid; a lone tail sample): it
    goes whole to the new bin holding its midpoint (the observed extreme for the first/last bin), as the
    value does in the reference's own histogram, instead of being spread across a new bin's edge. Dense
    stretches are interpolated (assigning whole fine bins there adds a count noise that moves the KL
    minimum: 3 % median against ModelOpt on ViT activations, 0.3 % interpolated)."""
    if (edges[1] - edges[0]) < 2 * w or counts.numel() < 2:
        return _resample(counts, e0, w, lo, hi, edges)
    c = counts.to(torch.float64)
    lone = _lone(c)
    out = torch.zeros(edges.numel() - 1, dtype=torch.float64, device=c.device)
    if bool(lone.any()):
        k = torch.nonzero(lone).flatten()
        pos = e0 + w * (k.to(torch.float64) + 0.5)
        pos = torch.where(k == counts.numel() - 1, hi, torch.where(k == 0, lo, pos)).clamp_(lo, hi)
        j = (torch.searchsorted(edges, pos, right=True) - 1).clamp_(0, edges.numel() - 2)
        out.index_add_(0, j, c[k])
    dense = torch.where(lone, 0.0, c)
    if bool(dense.any()):
        out += _resample(dense, e0, w, lo, hi, edges)
    return out


def _pair_mirrored_spikes(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``neg`` (the negative half folded onto |x|) with each lone bin ``j`` whose positive twin sits one
    bin up (``pos[j + 1]`` occupied, ``pos[j]`` empty) moved onto ``j + 1``. Bins are ``[e, e + w)``, so
    ``-v`` on a bin edge folds one |x| bin below ``v`` (integers, power-of-two grids); apart they would
    land in two reference bins, together they are the one value they are."""
    lone = _lone(neg)
    lone[-1] = False
    move = lone.clone()
    move[:-1] &= (pos[1:] > 0) & (pos[:-1] == 0)
    if not bool(move.any()):
        return neg
    out = neg.clone()
    k = torch.nonzero(move).flatten()
    out[k + 1] += out[k]
    out[k] = 0
    return out


def _resample(counts: torch.Tensor, e0: float, w: float, lo: float, hi: float,
              edges: torch.Tensor) -> torch.Tensor:
    """Re-bin ``counts`` (bins of width ``w`` from ``e0``, data within ``[lo, hi]``) onto ``edges``.

    The cumulative count is known exactly at our bin edges (the first and last clamped to the
    observed ``lo`` / ``hi``); in between it is interpolated by a monotone cubic (PCHIP), so a steep
    density (the peak of a heavy-tailed activation, a few bins wide) is not flattened into steps.
    A bin that meets ``[lo, hi]`` in one point holds a point mass there (a ReLU6 output saturated at
    exactly 6); mass at or beyond the last edge falls in the last new bin, as in ``torch.histc``.
    The cumulative counts are rounded to whole samples, so the result is a histogram of whole
    samples like the reference's: empty stretches and sparse tails stay empty where no sample falls.
    """
    k = counts.numel()
    dev = counts.device
    c = counts.to(torch.float64)
    knots = e0 + w * torch.arange(k + 1, dtype=torch.float64, device=dev)
    knots[0], knots[-1] = lo, hi  # lo lies in the first bin, hi in the last
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev), torch.cumsum(c, 0)])
    h = knots.diff()
    d = torch.where(h > 0, c / h.clamp_min(1e-300), 0.0)  # mean density per bin
    # knot slopes (densities): weighted harmonic mean of the neighbours' (Fritsch-Butland), 0 at
    # a local extremum or next to an empty bin; one-sided at the ends and beside a point mass
    hl, hr, dl, dr = h[:-1], h[1:], d[:-1], d[1:]
    wl, wr = 2 * hr + hl, hr + 2 * hl
    both = (dl > 0) & (dr > 0)
    inner = torch.where(both, (wl + wr) / (wl / dl.clamp_min(1e-300) + wr / dr.clamp_min(1e-300)), 0.0)
    inner = torch.where(hl == 0, dr, torch.where(hr == 0, dl, inner))
    m = torch.cat([d[:1], inner, d[-1:]])
    idx = (torch.searchsorted(knots, edges, right=True) - 1).clamp_(0, k - 1)
    hi_ = h[idx]
    t = torch.where(hi_ > 0, (edges - knots[idx]) / hi_.clamp_min(1e-300), 1.0).clamp_(0.0, 1.0)
    t2, t3 = t * t, t * t * t
    f = (cdf[idx] * (2 * t3 - 3 * t2 + 1) + cdf[idx + 1] * (3 * t2 - 2 * t3)
         + hi_ * (m[idx] * (t3 - 2 * t2 + t) + m[idx + 1] * (t3 - t2)))
    f = f.round_()
    f[-1] = cdf[-1]
    return f.diff().clamp_min_(0.0)


def _cap_zero_bins(counts: torch.Tensor, z: int) -> None:
    """Cap the two bins beside zero (``z``: ``[0, w)``, where exact zeros land; ``z - 1``:
    ``[-w, 0)``) at their outer neighbours' counts, in place (the reference's zero-bin rule at our
    resolution). A spike of exact zeros (ReLU) or of values just below zero (GELU of large
    negative inputs) is removed; a smooth density keeps its shape; nothing is ever added."""
    for j, out in ((z, z + 1), (z - 1, z - 2)):
        if 0 <= j < counts.numel():
            outer = counts[out] if 0 <= out < counts.numel() else counts.new_zeros(())
            counts[j] = torch.minimum(counts[j], outer)


def _reference_abs_hist(state: HistogramState) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's |x| histogram, ``bins`` bins over ``[0, amax]`` with its zero-bin rule
    applied, re-binned from ours; and its ``bins + 1`` edges."""
    n, w, nr = state.bins, bin_width(state), _reference_bins(state)
    dev = state.counts.device
    signed = state.counts.to(torch.float64)
    _cap_zero_bins(signed, n)
    edges = torch.linspace(0.0, _abs_max(state), nr + 1, dtype=torch.float64, device=dev)
    ref = torch.zeros(nr, dtype=torch.float64, device=dev)
    # the two halves folded, each re-binned within its own extreme (GELU's edge at -0.17)
    pos, neg = signed[n:], signed[:n].flip(0)
    if _reference_bins(state) != n:  # collected finer for this: spikes are resolved (see _rebin)
        neg = _pair_mirrored_spikes(pos, neg)
    for half, end in ((pos, state.max), (neg, -state.min)):
        if end > 0 and bool(half.any()):
            last = int(torch.nonzero(half).flatten()[-1]) + 1
            ref += _rebin(half[:last], 0.0, w, 0.0, end, edges)
    ref[0] = ref[1]
    return ref, edges


def _reference_signed_hist(state: HistogramState) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The signed counterpart: ``bins`` bins (one more when zero falls inside one) over
    ``[min(min, 0), max(max, 0)]``, zero on edge ``k0``. The zero-bin rule applies to both halves
    of the reference's zero bin: ``[0, v)`` and ``[-v, 0)`` take their outer neighbours' counts.
    Returns (counts, edges, k0)."""
    n, w, nr = state.bins, bin_width(state), _reference_bins(state)
    lo_end, hi_end = min(state.min, 0.0), max(state.max, 0.0)
    v = (hi_end - lo_end) / nr
    k_lo = math.ceil(nr * (-lo_end / (hi_end - lo_end)))
    k_hi = math.ceil(nr * (hi_end / (hi_end - lo_end)))
    edges = v * torch.arange(-k_lo, k_hi + 1, dtype=torch.float64, device=state.counts.device)
    counts, e0 = occupied_bins(state)
    counts = counts.to(torch.float64)
    _cap_zero_bins(counts, n - int(torch.nonzero(state.counts).flatten()[0]))  # [0, w): index n
    ref = _rebin(counts, e0, w, float(state.min), float(state.max), edges)
    if k_hi >= 2:
        ref[k_lo] = ref[k_lo + 1]
    if k_lo >= 2:
        ref[k_lo - 1] = ref[k_lo - 2]
    return ref, edges, k_lo


def _entropy_range(state: HistogramState, spec: QuantSpec) -> Range:
    """TensorRT's / ModelOpt's KL search (``_compute_amax_entropy``) on the histogram that this
    reference would have built from the same data.

    The reference bins |x| into ``bins`` equal bins over ``[0, amax]``, and its candidate
    thresholds are ``i * amax / bins`` for ``i >= ENTROPY_START_BIN``. Ours span the power of two
    above amax: they are re-binned onto the reference's grid (``_rebin``; ``bins`` is
    ``state.reference_bins`` for a state the entropy calibrator made, collected 4-8x finer than that
    grid, each lone bin of ours going whole to one reference bin), so the candidates never depend on the
    power-of-two span, and a point mass (integers, pixels, an upstream quantizer's grid) stays in one
    bin as in the reference's histogram. As in the reference:

    * the zero bin takes its neighbour's count (``bins[0] = bins[1]``): a spike of exact zeros (86%
      of a ReLU6 output) is represented exactly by any grid, and left in would make every threshold
      but the narrowest look bad. Our bins beside zero overlap two of the reference's, so they are
      first capped at their outer neighbours (``_cap_zero_bins``);
    * Q spreads each group's mass over the bins that are non-zero in the histogram, so outliers
      folded into an empty end bin give KL = +inf;
    * of equal divergences (up to ``_KL_TIE`` of rounding) the last (widest) threshold wins.

    Symmetric specs search |x| with ``2**(bits-1)`` levels. Asymmetric ones use the signed
    counterpart (``_reference_signed_hist``) with both ends free and ``2**bits`` levels, left
    outliers folding into the first kept bin: on one-sided data this is exactly the reference's
    unsigned search, and it is exhaustive. Two-sided pairs are searched exhaustively when few, else
    a coarse grid (<= 17 x 17) followed by two rounds of exhaustive scans of each end (within 4
    coarse steps) with the other fixed; the 2-D KL surface is rippled, so this lands near, not
    always on, the exhaustive optimum.
    """
    if spec.symmetric:
        return _entropy_symmetric(state, 2 ** (spec.bits - 1))
    return _entropy_asymmetric(state, 2**spec.bits)


def _entropy_symmetric(state: HistogramState, levels: int) -> Range:
    ref, edges = _reference_abs_hist(state)
    t = _KLTables(ref)
    n = ref.numel()
    i = torch.arange(min(ENTROPY_START_BIN, n), n + 1, device=ref.device)
    kl = _chunked(lambda b: t.kl(torch.zeros_like(b), b, levels), i, per_row=levels + 1)
    a = min(float(edges[int(i[_last_argmin(kl)])]), _abs_max(state))
    return -a, a


def _entropy_asymmetric(state: HistogramState, levels: int) -> Range:
    ref, edges, k0 = _reference_signed_hist(state)
    t = _KLTables(ref)
    dev = ref.device
    total = ref.numel()
    start = min(ENTROPY_START_BIN, total)

    def kl_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ok = (b - a) >= start
        out = torch.full(a.shape, math.inf, dtype=torch.float64, device=dev)
        if bool(ok.any()):
            out[ok] = _chunked(lambda x, y: t.kl(x, y, levels), a[ok], b[ok], per_row=levels + 1)
        return out

    def best_of(a_axis: torch.Tensor, b_axis: torch.Tensor) -> tuple[int, int]:
        a, b = torch.meshgrid(a_axis, b_axis, indexing="ij")
        a, b = a.flatten(), b.flatten()
        k = _last_argmin(kl_pairs(a, b))
        return int(a[k]), int(b[k])

    def axis(lo: int, hi: int, step: int) -> torch.Tensor:
        pts = torch.arange(lo, hi + 1, step, device=dev)
        return torch.unique(torch.cat([pts, torch.tensor([hi], device=dev)]))

    na, nb = k0 + 1, total - k0 + 1  # a in [0, k0], b in [k0, total]: zero stays inside
    if na * nb <= _ENTROPY_EXHAUSTIVE_PAIRS:
        ba, bb = best_of(axis(0, k0, 1), axis(k0, total, 1))
    else:
        # KL ripples as group boundaries move, so a shrinking 2-D window gets stuck easily: after
        # a coarse grid, alternate exhaustive scans of one end (within 4 coarse steps) with the
        # other end fixed, twice; every scan keeps the current pair, so KL never increases.
        sa, sb = max(1, -(-na // 16)), max(1, -(-nb // 16))
        ba, bb = best_of(axis(0, k0, sa), axis(k0, total, sb))
        for _ in range(2):
            ba, bb = best_of(torch.tensor([ba], device=dev),
                             axis(max(k0, bb - 4 * sb), min(total, bb + 4 * sb), 1))
            ba, bb = best_of(axis(max(0, ba - 4 * sa), min(k0, ba + 4 * sa), 1),
                             torch.tensor([bb], device=dev))
    return max(float(edges[ba]), state.min), min(float(edges[bb]), state.max)


# --------------------------------------------------------------------------------------------------
# weights: MSE search on the tensor itself
# --------------------------------------------------------------------------------------------------
def _fq_error(flat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Sum of squared fake-quant errors per (candidate, channel); ``lo``/``hi`` are (K, C).

    Same arithmetic as torch's fake-quant kernels: multiply by ``1/scale``, round half to even."""
    qmin, qmax = spec.qrange()
    s, zp = _grid_params(lo, hi, spec)
    s, zp = s[..., None], zp[..., None]
    q = torch.mul(flat, 1.0 / s).round_()
    if not spec.symmetric:
        q = q.add_(zp).clamp_(qmin, qmax).sub_(zp)
    else:
        q = q.clamp_(qmin, qmax)
    return q.mul_(s).sub_(flat).square_().sum(-1)


def _best_per_channel(flat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                      spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Among (K, C) candidate ranges pick, per channel, the one with the least error."""
    step = max(1, (1 << 22) // max(flat.numel(), 1))  # chunk candidates: K copies of a big weight
    err = torch.cat([_fq_error(flat, lo[i:i + step], hi[i:i + step], spec)
                     for i in range(0, lo.shape[0], step)])
    k = torch.argmin(err, 0, keepdim=True)  # first minimum: ties keep the smaller ratio
    return lo.gather(0, k)[0], hi.gather(0, k)[0]


#: the smallest fraction of a channel's max the weight MSE search tries (as the activation search's 1/64)
_W_LOW = 1 / 64


def tensor_mse_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE-optimal range of a tensor (weights) under ``spec``'s integer grid.

    Per channel along ``spec.axis`` (shape (C,)) or per tensor (shape ()). The range is searched as
    a fraction of the channel's own extremes within [1/64, 1.0] using the real fake-quant error on
    the tensor: 21 coarse ratios in [0.2, 1] (step 0.04) and 8 geometric ones in [1/64, 0.15] (a far
    outlier: at 4 bits the best ratio of a 16k-wide channel with one 100x outlier is ~0.03), then per
    channel 17 ratios within one coarse step of the best (step 0.005, proportionally smaller below
    0.2). Asymmetric specs search the two ends by coordinate descent from the
    best shared ratio (each end: 21 coarse ratios, then 17 fine ones). Every pass keeps the current
    choice among its candidates and ratio 1.0 starts it, so the error never exceeds the max
    range's.
    """
    xf = x.detach().float()
    if spec.axis is None:
        flat = xf.reshape(1, -1)
    else:
        ax = spec.axis % xf.dim()
        flat = xf.movedim(ax, 0).reshape(xf.shape[ax], -1)
    dev = flat.device
    lo_obs, hi_obs = channel_extremes(flat)
    if spec.symmetric:
        hi_obs = torch.maximum(lo_obs.abs(), hi_obs.abs())
        lo_obs = -hi_obs
    else:
        lo_obs, hi_obs = lo_obs.clamp(max=0.0), hi_obs.clamp(min=0.0)

    def ratio(v: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        return torch.where(end != 0, v / torch.where(end != 0, end, 1.0), 1.0)

    # (K, 1) ratios: 0.2..1.0 in steps of 0.04, then 1/64..0.15 geometrically for a channel whose max
    # is a far outlier (listed last: on a tie the ratios >= 0.2 keep their choice)
    coarse = torch.cat([torch.linspace(0.2, 1.0, 21, device=dev),
                        torch.logspace(math.log10(_W_LOW), math.log10(0.15), 8, device=dev)])[:, None]
    fine = torch.linspace(-0.04, 0.04, 17, device=dev)[:, None]  # step 0.005 (relative below 0.2)

    def around(base: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return (base + offsets * (base / 0.2).clamp(max=1.0)).clamp(_W_LOW, 1.0)

    lo, hi = _best_per_channel(flat, coarse * lo_obs, coarse * hi_obs, spec)
    if spec.symmetric:
        r = around(ratio(hi, hi_obs), fine)
        lo, hi = _best_per_channel(flat, r * lo_obs, r * hi_obs, spec)
    else:
        # Coordinate descent from the shared ratio: the two ends' optima can differ a lot (an
        # outlier on one side only), so each end first gets a full coarse pass, then a fine one.
        for offsets, relative in ((coarse, False), (fine, True)):
            r_hi = around(ratio(hi, hi_obs), offsets) if relative else offsets.expand(-1, hi.numel()).clone()
            lo, hi = _best_per_channel(flat, lo.expand_as(r_hi), r_hi * hi_obs, spec)
            r_lo = around(ratio(lo, lo_obs), offsets) if relative else offsets.expand(-1, lo.numel()).clone()
            lo, hi = _best_per_channel(flat, r_lo * lo_obs, hi.expand_as(r_lo), spec)
    if spec.axis is None:
        return lo.reshape(()), hi.reshape(())
    return lo, hi
