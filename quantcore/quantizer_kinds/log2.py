"""Logarithmic grids for non-negative activations (post-softmax): formats ``log2`` and ``log_sqrt2``.

``log2`` is FQ-ViT's Log-Int-Softmax quantizer (Lin et al. 2022, IJCAI, sec. 3.3; reference code
megvii-research/FQ-ViT ``models/ptq/quantizer/log2.py``); ``log_sqrt2`` is RepQ-ViT's log√2 quantizer
(Li et al. 2023, ICCV, sec. 3.3; reference code zkkli/RepQ-ViT ``LogSqrt2Quantizer``). With ``N = 2**bits``
codes, scale ``s`` (the calibrated range top, ``amax``) and ``k = 1`` (log2) or ``k = 2`` (log√2)::

    code = clamp(round(-k * log2(x / s)), 0, N - 1)
    x_hat = s * 2 ** (-code / k)         # log√2: s * 2**(-ceil(code/2)) * (sqrt(2) if code odd else 1)
    x_hat = 0  where round(-k * log2(x / s)) >= N  (and where x <= 0)

As in both reference implementations, values whose code would pass the last one dequantize to 0 (the
references' ``mask``), values above ``s`` take code 0 (``s``). The references fix ``s = 1`` (FQ-ViT) or
pick it among percentiles (RepQ-ViT); here ``s`` comes from calibration: ``max`` takes the observed
maximum, ``mse`` searches ``s`` minimizing the expected squared error of the log grid on the
calibration histogram (:func:`step_grid_error`). Per tensor, non-negative inputs only
(``symmetric: false``); not learnable (QAT trains through them with a straight-through gradient).

:func:`step_grid_error` is shared with the twin-uniform kind (:mod:`.twin`): the exact expected error of
any piecewise-constant quantizer under the histogram read as a piecewise-uniform density.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .base import QuantizerKind, register_quantizer_kind

#: Refinement of the scale search: 161 candidates over two octaves below the maximum, then two rounds
#: of 17 within one step (resolution: 2 octaves / 160 / 64, i.e. ~1.4e-4 of an octave).
_COARSE, _FINE, _ROUNDS = 161, 17, 2


def step_grid_error(state, quantize: Callable[[torch.Tensor], torch.Tensor],
                    breakpoints: torch.Tensor) -> torch.Tensor:
    """Expected squared error of ``K`` candidate piecewise-constant quantizers on a histogram.

    ``state``: a :class:`~quantcore.calib.histogram.HistogramState` (its distribution, mass
    normalized to 1, read as uniform inside each bin, as the uniform grids' MSE search reads it).
    ``breakpoints``: ``(K, P)`` float64, sorted per row, a superset of each quantizer's decision
    points (extra or repeated points are harmless). ``quantize``: maps a ``(K, Q)`` float64 tensor
    to the quantized values of candidate ``k`` in row ``k`` (it is evaluated between breakpoints, so
    it only has to be right there). Returns ``(K,)`` float64: ``sum_j int_{b_j}^{b_{j+1}} (t - v_j)^2
    rho(t) dt``, exact under the piecewise-uniform model (prefix moments of the histogram).
    """
    from ..calib.search import bin_width, Moments, occupied_bins

    counts, e0 = occupied_bins(state)
    mom = Moments(counts, e0, bin_width(state))
    b = breakpoints.to(torch.float64)
    mids = torch.cat([b[:, :1] - 1.0, (b[:, :-1] + b[:, 1:]) / 2, b[:, -1:] + 1.0], 1)  # (K, P + 1)
    v = quantize(mids)
    f0, f1, f2 = mom.at(b)
    t0, t1, t2 = mom.total
    k = b.shape[0]

    def seg(f: torch.Tensor, total: torch.Tensor) -> torch.Tensor:  # mass/moment of each segment
        z = torch.zeros(k, 1, dtype=torch.float64, device=b.device)
        return torch.cat([z, f, total.expand(k, 1)], 1).diff(dim=1)

    m0, m1, m2 = seg(f0, t0), seg(f1, t1), seg(f2, t2)
    return (m2 - 2 * v * m1 + v * v * m0).sum(1).clamp_min(0.0)


def log_fake_quant(x: torch.Tensor, s: torch.Tensor | float, bits: int, k: int) -> torch.Tensor:
    """The log grid's values (no gradient): ``s * 2**(-code / k)``, 0 past the last code or for
    ``x <= 0``. ``s`` broadcasts against ``x`` (a scalar, or ``(K, 1)`` for K candidate scales)."""
    n = 2**bits
    t = x / s
    code = torch.round(torch.log2(t) * -k)  # x = 0: +inf (dropped); x < 0: nan (dropped below)
    drop = (code >= n) | (x <= 0)
    y = torch.exp2(code.clamp_(0, n - 1) / -k) * s
    return torch.where(drop, torch.zeros_like(y), y)


def _breakpoints(s: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Decision points of the log grid for scales ``s`` (K,): code q|q+1 at ``s 2**(-(q + 1/2)/k)``,
    the last one the drop-to-zero edge; 0 (negative inputs go to 0 too). Sorted ascending."""
    q = torch.arange(2**bits - 1, -1, -1, dtype=torch.float64, device=s.device)
    pts = s[:, None] * torch.exp2(-(q + 0.5) / k)[None, :]
    return torch.cat([torch.zeros_like(s)[:, None], pts], 1)


class LogGrid(QuantizerKind):
    """Power-of-two (``k = 1``) or power-of-√2 (``k = 2``) grid below a calibrated scale ``s = amax``."""

    supports_learnable = False
    supports_per_channel = False
    calibrators = ("max", "mse")

    def __init__(self, name: str, k: int, source: str) -> None:
        self.name, self.k, self.source = name, k, source

    def validate(self, spec) -> None:
        if spec.symmetric:
            raise ValueError(f"format {spec.format!r} quantizes non-negative values (post-softmax) on a "
                             f"one-sided grid: set symmetric: false")
        super().validate(spec)

    def qrange(self, spec) -> tuple[int, int]:
        return 0, 2**spec.bits - 1

    def tensor_range(self, x, spec):
        return None  # weights too go through compute_range (the uniform MSE search does not apply)

    def _check_non_negative(self, lo: float, spec) -> None:
        if lo < 0:
            raise ValueError(f"format {spec.format!r} ({spec.short()}) takes non-negative inputs "
                             f"(post-softmax), but the calibration data reach {lo:.4g}: use format 'int' "
                             f"for this quantizer")

    def extremes_range(self, lo, hi, spec):
        self._check_non_negative(float(lo), spec)
        return 0.0, max(float(hi), 0.0)

    def compute_range(self, state, spec) -> tuple[float, float]:
        self._check_non_negative(float(state.min), spec)
        smax = float(state.max)
        if smax <= 0 or spec.calibrator == "max":
            return 0.0, max(smax, 0.0)
        return 0.0, self.search_scale(state, spec.bits, smax)

    def search_scale(self, state, bits: int, smax: float) -> float:
        """``s`` in ``[smax / 4, smax]`` minimizing :func:`step_grid_error` (coarse-to-fine, vectorized)."""
        dev = state.counts.device

        def err(u: torch.Tensor) -> torch.Tensor:
            s = smax * torch.exp2(-u)
            return step_grid_error(state, lambda m: log_fake_quant(m, s[:, None], bits, self.k),
                                   _breakpoints(s, bits, self.k))

        u = torch.linspace(0.0, 2.0, _COARSE, dtype=torch.float64, device=dev)
        best = float(u[torch.argmin(err(u))])
        step = 2.0 / (_COARSE - 1)
        offs = torch.linspace(-1.0, 1.0, _FINE, dtype=torch.float64, device=dev)
        for _ in range(_ROUNDS):
            u = (best + step * offs).clamp(0.0, 2.0)
            best = float(u[torch.argmin(err(u))])
            step /= 8
        return smax * 2.0 ** -best

    def fake_quant(self, quantizer, x: torch.Tensor) -> torch.Tensor:
        spec = quantizer.spec
        lo, s = float(quantizer.amin), float(quantizer.amax)
        self._check_non_negative(lo, spec)
        y = log_fake_quant(x.detach(), max(s, 1e-30), spec.bits, self.k)
        if x.requires_grad and torch.is_grad_enabled():
            # straight-through inside [0, s]; nothing flows where the input was clipped to s
            inside = (x >= 0) & (x <= s)
            return y + (x - x.detach()) * inside
        return y

    def encoding(self, quantizer) -> dict:
        b = quantizer.spec.bits
        base = "2" if self.k == 1 else "sqrt2"
        return {"scale": quantizer.amax.float(), "log_base": base, "codes": 2**b,
                "zero": f"0 is a value outside the {2**b} codes (inputs below the last code's midpoint, "
                        f"and x <= 0): {2**b} codes + 0 = {2**b + 1} levels",
                "formula": f"code = clamp(round(-{self.k}*log2(x/scale)), 0, {2**b - 1}); "
                           f"x_hat = scale * 2**(-code/{self.k}); x_hat = 0 where "
                           f"round(-{self.k}*log2(x/scale)) >= {2**b} or x <= 0",
                "source": self.source}


register_quantizer_kind(LogGrid("log2", 1, "FQ-ViT Log-Int-Softmax (Lin et al. 2022)"), "log2")
register_quantizer_kind(LogGrid("log_sqrt2", 2, "RepQ-ViT log-sqrt2 (Li et al. 2023)"), "log_sqrt2")
