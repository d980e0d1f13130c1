"""Streaming histogram whose state merges exactly across data-parallel workers.

Binning: the signed histogram covers ``[-R, R)`` with ``2 * bins`` equal bins and ``R = 2**exp``, the
smallest power of two above the running abs-max. A value ``x`` falls in bin ``floor(x * bins / R)``
(offset by ``bins``). Multiplying by a power of two and taking ``floor`` are exact in floating point,
and ``floor(floor(y) / 2) == floor(y / 2)``, so doubling ``R`` maps bin ``i`` to ``floor(i / 2)``
exactly. Hence the final histogram depends only on the multiset of values seen, not on batch order or
on how the batches were split between workers: merging K workers' states gives bit-for-bit the state
of one worker that saw everything. Memory is fixed (``2 * bins`` int64 counts) whatever the data size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DEFAULT_BINS = 2048


def _exp_above(amax: float) -> int:
    """Smallest e with amax < 2**e."""
    m, e = math.frexp(amax)  # amax = m * 2**e, 0.5 <= m < 1
    return e


#: On CPU, ``torch.histc`` costs ~12 ns per element per thread (scalar loop, float counts), the
#: integer path (floor -> int16 -> ``torch.bincount``) ~1-3 ns, but its counting loop is serial. Up
#: to this many intra-op threads the integer path is faster; above it histc's parallel loop wins.
#: Both give identical counts. Bin counts that are not a power of two always take the integer path.
BINCOUNT_MAX_THREADS = 6
#: ``torch.histc`` counts in float32: chunks of at most 2**24 elements keep every count exact.
_HISTC_CHUNK = 1 << 24


def _bin_counts(x: torch.Tensor, bins: int, exp: int) -> torch.Tensor:
    """int64 counts (CPU) of ``floor(x * bins / 2**exp)`` over ``[-bins, bins)``, i.e. ``2 * bins``
    bins; every element of ``x`` (float32/64) must satisfy ``|x| < 2**exp``.

    The scale is a power of two when ``bins`` is, so ``x * scale`` and ``floor`` are exact (not
    rounded). Both paths below bin the same floats and give bit-identical counts.
    """
    n = bins
    scale = math.ldexp(float(n), -exp)
    if x.dtype == torch.float32 and scale >= 2.0**126:
        x = x.double()  # the scale itself would overflow float32 (|x| < 2**-115): exact in float64
    pow2 = n & (n - 1) == 0
    # Contiguous buffer even for a permuted view (q/k/v): one strided read, no reshape copy.
    buf = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x, scale, out=buf).floor_()
    if not pow2 or (x.device.type == "cpu" and torch.get_num_threads() <= BINCOUNT_MAX_THREADS):
        buf.add_(n)  # integers in [0, 2n): exact
        if not pow2:  # the scale is not a power of two: a rounded product can reach n exactly
            buf.clamp_(max=2 * n - 1)
        idx = buf.to(torch.int16 if 2 * n <= 32768 else torch.int32)
        return torch.bincount(idx.view(-1), minlength=2 * n).cpu()
    # histc finds the bin as (v + n) * 2n / 2n in the input's float type: exact only because 2n is
    # a power of two (for other bin counts that product rounds once it passes 2**24).
    h = torch.zeros(2 * n, dtype=torch.int64, device=x.device)
    for chunk in buf.view(-1).split(_HISTC_CHUNK):
        h += torch.histc(chunk, bins=2 * n, min=-n, max=n).to(torch.int64)
    return h.cpu()


@dataclass
class HistogramState:
    """Counts over ``[-2**exp, 2**exp)``; ``exp`` is None until a non-zero value was seen."""

    bins: int = DEFAULT_BINS
    exp: int | None = None
    counts: torch.Tensor = field(default=None)  # type: ignore[assignment]
    min: float = math.inf
    max: float = -math.inf
    total: int = 0

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
        exp = self.exp if self.exp is not None else 0
        self.counts += _bin_counts(x, self.bins, exp)

    def _coarsen(self, new_exp: int) -> None:
        if self.exp is None:
            self.exp = new_exp
            return
        shift = new_exp - self.exp
        if shift <= 0:
            return
        n = self.bins
        signed = torch.arange(-n, n, dtype=torch.int64)
        target = torch.div(signed, 2**shift, rounding_mode="floor") + n
        new = torch.zeros_like(self.counts)
        new.index_add_(0, target, self.counts)
        self.counts = new
        self.exp = new_exp

    # -- merge / serialize --------------------------------------------------------------------
    def merge(self, other: "HistogramState") -> "HistogramState":
        """In-place exact merge of another worker's state."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms with {self.bins} and {other.bins} bins")
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
        return HistogramState(self.bins, self.exp, self.counts.clone(), self.min, self.max, self.total)

    def to_dict(self) -> dict:
        """Plain tensors/numbers only (safe for ``torch.load(weights_only=True)``)."""
        return {
            "bins": self.bins,
            "exp": self.exp,
            "counts": self.counts.clone(),
            "min": self.min,
            "max": self.max,
            "total": self.total,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HistogramState":
        return cls(int(d["bins"]), d["exp"], d["counts"].clone().to(torch.int64), float(d["min"]),
                   float(d["max"]), int(d["total"]))

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
