"""Streaming histogram whose state merges exactly across data-parallel workers.

Binning: the signed histogram covers ``[-R, R)`` with ``2 * bins`` equal bins and ``R = 2**exp``, the
smallest power of two above the running abs-max. A value ``x`` falls in bin ``floor(x * bins / R)``
(offset by ``bins``). Multiplying by a power of two and taking ``floor`` are exact in floating point,
and ``floor(floor(y) / 2) == floor(y / 2)``, so doubling ``R`` maps bin ``i`` to ``floor(i / 2)``
exactly. Hence the final histogram depends only on the multiset of values seen, not on batch order or
on how the batches were split between workers: merging K workers' states gives bit-for-bit the state
of one worker that saw everything. Memory is fixed (``2 * bins`` int64 counts) whatever the data size.

The one exception is float32 underflow: a negative value so small that ``x * bins / R`` underflows to
-0.0 (below about ``R * 2**-160`` at 2048 bins: subnormal-level data, where real activations hold exact
zeros) lands in the bin just above zero when it is binned under a wide span, but just below zero when it
was binned under a narrow one and coarsened. Counts can then differ by such values between one bin and
its neighbour at zero; ranges are unaffected.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

DEFAULT_BINS = 2048


def _exp_above(amax: float) -> int:
    """Smallest e with amax < 2**e."""
    m, e = math.frexp(amax)  # amax = m * 2**e, 0.5 <= m < 1
    return e


#: How a batch is binned (all paths give bit-identical counts):
#:
#: * CPU with at most ``BINCOUNT_MAX_THREADS`` intra-op threads: the tensor is taken in pieces of
#:   ``_CPU_PIECE`` elements; each piece is read once from memory for its min/max and is still in
#:   cache when it is binned (scale, floor, +bins, to int16, ``torch.bincount``) in reused scratch
#:   buffers (no fresh pages per call). Pieces are exact: the state does not depend on how the data
#:   was split (the merge property above). ``torch.histc`` costs ~12 ns per element per thread here
#:   (scalar loop), this path ~2-4 ns, but its counting loop is serial: with many threads histc's
#:   parallel loop wins.
#: * otherwise (CUDA, many CPU threads): ``torch.histc`` on the floored values, in chunks of at most
#:   2**24 elements because it counts in float32; bin counts that are not a power of two use
#:   ``torch.bincount`` instead (histc's own bin arithmetic is only exact for power-of-two counts).
#:
#: Zero-heavy or peaked tensors (post-ReLU, post-softmax of a trained attention) send most elements
#: to one bin, and bincount's ``count[i] += 1`` then waits on its own previous store for every
#: element (~2x slower). When the state's counts so far say so (collision probability
#: ``sum p_i**2 >= _PEAKED``), consecutive elements count into ``_LANES`` interleaved sub-histograms
#: (the lane offset is folded into the ``+bins`` add), summed afterwards: the same counts.
BINCOUNT_MAX_THREADS = 6
_CPU_PIECE = 1 << 19
_LANES = 4
_MAX_LANE_BINS = 1 << 17  # lanes x 2 x bins int64 counts: 1 MiB at most
_PEAKED = 0.1
_HISTC_CHUNK = 1 << 24
_scratch = threading.local()


def _scratch_buffers(numel: int, fdtype: torch.dtype, idtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-thread reusable float/int buffers of at least ``numel`` elements (CPU)."""
    key = (fdtype, idtype)
    bufs = _scratch.__dict__.get(key)
    if bufs is None or bufs[0].numel() < numel:
        size = max(numel, _CPU_PIECE)
        bufs = (torch.empty(size, dtype=fdtype), torch.empty(size, dtype=idtype))
        if size <= 4 * _CPU_PIECE:  # an odd huge row is not kept
            _scratch.__dict__[key] = bufs
    return bufs


def _lane_offsets(numel: int, lanes: int, bins: int, idtype: torch.dtype = torch.int16) -> torch.Tensor:
    """Per-thread ``(i % lanes) * 2 * bins + bins`` (``idtype``) for i < numel (CPU, reused)."""
    key = ("lanes", lanes, bins, idtype)
    pat = _scratch.__dict__.get(key)
    if pat is None or pat.numel() < numel:
        size = max(numel, _CPU_PIECE)
        pat = ((torch.arange(size) % lanes) * (2 * bins) + bins).to(idtype)
        if size <= 4 * _CPU_PIECE:
            _scratch.__dict__[key] = pat
    return pat[:numel]


def memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` permuted so its dimensions run from the largest stride to the smallest (no copy): it is
    contiguous exactly when ``x`` covers its memory without gaps (contiguous, channels-last, permuted)."""
    return x.permute(sorted(range(x.dim()), key=lambda d: -x.stride(d)))


def _pieces(x: torch.Tensor) -> list[torch.Tensor]:
    """Views covering every element of ``x`` once, about ``_CPU_PIECE`` elements each (no copy).

    Dense layouts (contiguous, channels-last, permuted) are cut flat in memory order; other views
    (q/k/v slices of a fused qkv tensor) along their outermost dimension.
    """
    if x.dim() == 0:
        return [x.reshape(1)]
    y = memory_order(x)
    if y.is_contiguous():
        return list(y.view(-1).split(_CPU_PIECE))
    row = max(1, y[0].numel()) if y.shape[0] else 1
    return list(y.split(max(1, _CPU_PIECE // row)))


def _coarsened(counts: torch.Tensor, exp: int, new_exp: int) -> torch.Tensor:
    """``counts`` (``2 * bins`` bins over ``[-2**exp, 2**exp)``) re-binned exactly onto
    ``[-2**new_exp, 2**new_exp)``: bin ``i`` (signed) goes to ``floor(i / 2**(new_exp - exp))``."""
    n = counts.numel() // 2
    signed = torch.arange(-n, n, dtype=torch.int64)
    # once 2**shift >= n every bin maps to -1 or 0, so a larger shift (the range grew by more than
    # int64 can hold, e.g. 1e-19 then 1.0) gives the same target: capped, exactly
    shift = min(new_exp - exp, max(1, n.bit_length()))
    target = torch.div(signed, 2 ** shift, rounding_mode="floor") + n
    return torch.zeros_like(counts).index_add_(0, target, counts)


@dataclass
class HistogramState:
    """Counts over ``[-2**exp, 2**exp)``; ``exp`` is None until a non-zero value was seen."""

    bins: int = DEFAULT_BINS
    exp: int | None = None
    counts: torch.Tensor = field(default=None)  # type: ignore[assignment]
    min: float = math.inf
    max: float = -math.inf
    total: int = 0
    # the bin count of the histogram a range search re-bins this one onto (the entropy calibrator's
    # reference grid, ModelOpt's ``num_bins``), when it is not ``bins`` (collected finer, see
    # quantcore.calib.registry.EntropyCalibrator)
    reference_bins: int | None = None

    def __post_init__(self) -> None:
        if self.bins <= 0 or self.bins % 2:
            raise ValueError(f"histogram bins must be a positive even number, got {self.bins}")
        if self.counts is None:
            self.counts = torch.zeros(2 * self.bins, dtype=torch.int64)

    # -- collection -------------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> None:
        """Add every element of ``x`` (any shape, any device)."""
        if x.numel() == 0:
            return
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # exact for fp16/bf16; the bin index x * bins / R is then exact too
        if x.device.type == "cpu" and torch.get_num_threads() <= BINCOUNT_MAX_THREADS:
            self._update_cpu(x)
            return
        self._histc(x, self._observe(x))

    def _update_cpu(self, x: torch.Tensor) -> None:
        """Bin ``x`` piece by piece into a local histogram, committed at the end (all or nothing: a
        non-finite value leaves the state as it was, without copying the counts on every call).

        Per piece: min/max (a strided view is first copied to a contiguous scratch buffer, which is
        then scaled in place: reading q/k/v views of a fused qkv tensor twice with strides costs ~4x
        a contiguous read), then ``floor(x * scale)`` into the float scratch, conversion to int16,
        ``+ bins`` in int16 (half the bytes of a float add; or the lane offsets when the counts so
        far are peaked, see ``_LANES``), ``torch.bincount``.
        """
        n = self.bins
        exp, lo_all, hi_all, total = self.exp, self.min, self.max, self.total
        local: torch.Tensor | None = None
        local_exp: int | None = None  # None: only zeros so far (bin ``bins`` at every range)
        # lanes also for the entropy calibrator's finer histograms (int32 indices past int16's range)
        lanes = _LANES if _LANES * 2 * n <= _MAX_LANE_BINS and self.collision() >= _PEAKED else 1
        idtype = torch.int16 if lanes * 2 * n <= 32768 else torch.int32
        for piece in _pieces(x):
            k = piece.numel()
            fbuf, ibuf = _scratch_buffers(k, x.dtype, idtype)
            f = fbuf[:k]
            if piece.is_contiguous():
                src = piece.view(-1)
            else:
                f.view(piece.shape).copy_(piece)
                src = f
            lo, hi = torch.aminmax(src)
            lo_f, hi_f = lo.item(), hi.item()
            if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
                raise ValueError("non-finite values (inf/nan) reached a calibrator")
            lo_all, hi_all, total = min(lo_all, lo_f), max(hi_all, hi_f), total + k
            amax = max(-lo_f, hi_f)
            if amax > 0:
                need = _exp_above(amax)
                if exp is None or need > exp:
                    exp = need
            e = exp if exp is not None else 0
            scale = math.ldexp(float(n), -e)
            if f.dtype == torch.float32 and scale >= 2.0**126:  # |x| < 2**-115: exact in float64
                h = HistogramState(n, e)
                h._bincount_piece(src, e)
                h = h.counts
            else:
                torch.mul(src, scale, out=f).floor_()
                if n & (n - 1):  # the scale is not a power of two: a rounded product can reach n
                    f.clamp_(max=n - 1)
                idx = ibuf[:k]
                idx.copy_(f)
                if lanes > 1:
                    idx.add_(_lane_offsets(k, lanes, n, idtype))
                    h = torch.bincount(idx, minlength=lanes * 2 * n).view(lanes, 2 * n).sum(0)
                else:
                    h = torch.bincount(idx.add_(n), minlength=2 * n)
            if local is None:
                local = h
            else:
                if local_exp is not None and exp is not None and exp > local_exp:
                    local = _coarsened(local, local_exp, exp)
                local += h
            local_exp = exp
        if local is None:
            return
        if exp is not None:
            if self.exp is not None and exp > self.exp:
                self._coarsen(exp)
            self.exp = exp
            if local_exp is not None and local_exp < exp:
                local = _coarsened(local, local_exp, exp)
        self.counts += local
        self.min, self.max, self.total = lo_all, hi_all, total

    def collision(self) -> float:
        """Probability that two values seen so far share a bin (``sum p_i**2``; 0 before any value)."""
        if not self.total:
            return 0.0
        p = self.counts.double() / self.total
        return float(p.dot(p))

    def _observe(self, x: torch.Tensor) -> int:
        """Fold ``x``'s min/max/count into the state, widen the range if needed; returns ``exp``."""
        lo, hi = torch.aminmax(x)
        if x.device.type == "cpu":
            lo_f, hi_f = float(lo), float(hi)
        else:
            lo_f, hi_f = torch.stack((lo, hi)).tolist()  # one device sync, not two
        if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
            raise ValueError("non-finite values (inf/nan) reached a calibrator")
        amax = max(abs(lo_f), abs(hi_f))
        self.min, self.max = min(self.min, lo_f), max(self.max, hi_f)
        self.total += x.numel()
        if amax > 0:
            need = _exp_above(amax)
            if self.exp is None:
                self.exp = need
            elif need > self.exp:
                self._coarsen(need)
        return self.exp if self.exp is not None else 0

    def _scale(self, x: torch.Tensor, exp: int) -> tuple[torch.Tensor, float]:
        """``bins / 2**exp`` (a power of two when ``bins`` is: ``x * scale`` is then exact)."""
        scale = math.ldexp(float(self.bins), -exp)
        if x.dtype == torch.float32 and scale >= 2.0**126:
            x = x.double()  # the scale would overflow float32 (|x| < 2**-115): exact in float64
        return x, scale

    def _bincount_piece(self, x: torch.Tensor, exp: int) -> None:
        """CPU: ``floor(x * scale) + bins`` (integers in [0, 2 * bins): exact) counted by bincount."""
        n = self.bins
        x, scale = self._scale(x, exp)
        fbuf, ibuf = _scratch_buffers(x.numel(), x.dtype, torch.int16 if 2 * n <= 32768 else torch.int32)
        buf = fbuf[:x.numel()].view(x.shape)
        torch.mul(x, scale, out=buf).floor_().add_(n)
        if n & (n - 1):  # the scale is not a power of two: a rounded product can reach n exactly
            buf.clamp_(max=2 * n - 1)
        idx = ibuf[:x.numel()]
        idx.copy_(buf.view(-1))
        self.counts += torch.bincount(idx, minlength=2 * n)

    def _histc(self, x: torch.Tensor, exp: int) -> None:
        n = self.bins
        x, scale = self._scale(x, exp)
        buf = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous even for a view
        torch.mul(x, scale, out=buf).floor_()
        flat = buf.view(-1)
        if n & (n - 1):  # histc finds the bin as (v + n) * 2n / 2n in float: exact for 2n = 2**k only
            flat = flat.add_(n).clamp_(max=2 * n - 1).to(torch.int32 if 2 * n <= 2**31 else torch.int64)
            self.counts += torch.bincount(flat, minlength=2 * n).cpu()
            return
        h = torch.zeros(2 * n, dtype=torch.int64, device=x.device)
        for chunk in flat.split(_HISTC_CHUNK):  # histc counts in float32: exact up to 2**24
            h += torch.histc(chunk, bins=2 * n, min=-n, max=n).to(torch.int64)
        self.counts += h.cpu()

    def _coarsen(self, new_exp: int) -> None:
        if self.exp is None:
            self.exp = new_exp
            return
        shift = new_exp - self.exp
        if shift <= 0:
            return
        self.counts = _coarsened(self.counts, self.exp, new_exp)
        self.exp = new_exp

    # -- merge / serialize --------------------------------------------------------------------
    def merge(self, other: "HistogramState") -> "HistogramState":
        """In-place exact merge of another worker's state."""
        if (other.bins, other.reference_bins) != (self.bins, self.reference_bins):
            raise ValueError(f"cannot merge histograms with {self.bins} and {other.bins} bins (reference grids "
                             f"{self.reference_bins} and {other.reference_bins})")
        if other.total == 0:
            return self
        o = other.clone()
        if o.exp is not None:
            if self.exp is None or o.exp > self.exp:
                self._coarsen(o.exp)
            else:
                o._coarsen(self.exp)
        self.counts += o.counts
        self.min, self.max = min(self.min, o.min), max(self.max, o.max)
        self.total += o.total
        return self

    def clone(self) -> "HistogramState":
        return HistogramState(self.bins, self.exp, self.counts.clone(), self.min, self.max, self.total,
                              self.reference_bins)

    def to_dict(self) -> dict:
        """Plain tensors/numbers only (safe for ``torch.load(weights_only=True)``)."""
        return {
            "bins": self.bins,
            "exp": self.exp,
            "counts": self.counts.clone(),
            "min": self.min,
            "max": self.max,
            "total": self.total,
            **({"reference_bins": self.reference_bins} if self.reference_bins is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HistogramState":
        ref = d.get("reference_bins")
        return cls(int(d["bins"]), d["exp"], d["counts"].clone().to(torch.int64), float(d["min"]),
                   float(d["max"]), int(d["total"]), int(ref) if ref is not None else None)

    # -- views used by the range searches -----------------------------------------------------
    @property
    def range(self) -> float:
        return math.ldexp(1.0, self.exp) if self.exp is not None else 0.0

    def edges(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Signed bin edges, ``2 * bins + 1`` values from -R to R."""
        r = self.range
        return torch.linspace(-r, r, 2 * self.bins + 1, dtype=dtype)

    def abs_counts(self) -> torch.Tensor:
        """Histogram of |x| over ``[0, R)`` with ``bins`` bins (negative side folded)."""
        n = self.bins
        neg = self.counts[:n].flip(0)
        return self.counts[n:] + neg
