"""PTQ4ViT's twin uniform quantization (Yuan et al. 2022, ECCV, sec. 4.1): format ``twin_int``.

Two uniform ranges share one ``bits``-bit code: one bit selects the range, ``bits - 1`` bits hold the
magnitude (``L = 2**(bits - 1)`` codes per range), and the steps are tied by a power of two,
``delta2 = 2**m * delta1`` (the paper's hardware-friendly constraint: R1 results are rescaled to R2 by
a shift). The range is decided by the value, as in the paper:

* **post-softmax** (non-negative calibration data, values in ``[0, 1]``): R1 = ``[0, L*delta1)`` for
  the many small values, R2 = ``[0, 1]`` for the few large ones, ``delta2 = 1/(L - 1)`` fixed (the
  reference's ``SoSPTQSLQuantMatMul`` spans ``[0, 1]`` in ``L - 1`` steps), ``m`` searched;
  ``x < L*delta1`` -> ``clamp(round(x/delta1), 0, L-1) * delta1``, else ``clamp(round(x/delta2), 0,
  L-1) * delta2``;
* **post-GELU** (calibration data with negative values): R1 = ``[-L*delta1, 0]`` for the negative
  values, R2 = ``[0, (L-1)*delta2]`` for the positive ones; ``x < 0`` -> ``clamp(round(x/delta1), -L, 0)
  * delta1``, else ``clamp(round(x/delta2), 0, L-1) * delta2``. The paper fixes R1 to the GELU minimum
  and searches ``delta2``; here ``delta1`` and ``m`` are searched together.

The search minimizes the expected squared error on the calibration histogram
(:func:`~.log2.step_grid_error`), not the paper's Hessian-guided output metric, which needs the layer
output and its gradient per candidate. Only calibrator ``mse`` (the search is the point of the grid).

State: the two range buffers hold both steps, so ``state_dict`` save/load needs nothing more. GELU
form: ``amin = -L*delta1 < 0``, ``amax = (L-1)*delta2``. Softmax form: ``amin = 0``, ``amax =
(L-1)*delta1 = 2**-m``. ``amin < 0`` tells the forms apart; ``m`` is recovered by rounding the log
ratio, so the power-of-two relation holds exactly in float32.
"""
from __future__ import annotations

import math

import torch

from .base import QuantizerKind, register_quantizer_kind
from .log2 import step_grid_error

#: Softmax form: m in 0..M_MAX (R1 top from 1 down to 2**-24, as the reference's split candidates
#: 2**-i, i < 20, and a little beyond).
M_MAX = 24
#: GELU form: delta1 candidates (fractions of the observed minimum), m range, refinement rounds.
_A_COARSE, _M_LO, _M_HI, _FINE, _ROUNDS = 64, -8, 24, 17, 2


def twin_fake_quant(x: torch.Tensor, d1, d2, bits: int, signed: bool) -> torch.Tensor:
    """Twin-uniform values of ``x`` (no gradient); ``d1``/``d2`` broadcast against ``x``."""
    n = 2 ** (bits - 1)
    q2 = torch.round(x / d2).clamp_(0, n - 1) * d2
    if signed:
        r1 = x < 0
        q1 = torch.round(x / d1).clamp_(-n, 0) * d1
    else:
        r1 = x < n * d1
        q1 = torch.round(x / d1).clamp_(0, n - 1) * d1
    return torch.where(r1, q1, q2)


def twin_params(amin: float, amax: float, bits: int) -> tuple[bool, float, float, int]:
    """``(signed, delta1, delta2, m)`` from the stored range (see the module docstring)."""
    n = 2 ** (bits - 1)
    if amin < 0:
        d1 = -amin / n
        m = round(math.log2(amax * n / ((n - 1) * -amin))) if amax > 0 else 0
        return True, d1, d1 * 2.0**m, m
    m = round(-math.log2(amax)) if amax > 0 else 0
    d2 = 1.0 / (n - 1)
    return False, d2 * 2.0**-m, d2, m


def _breakpoints(d1: torch.Tensor, d2: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """A sorted superset of the decision points for candidate steps ``d1``, ``d2`` (K,)."""
    n = 2 ** (bits - 1)
    dev = d1.device
    j = torch.arange(n - 1, dtype=torch.float64, device=dev) + 0.5  # between codes j and j + 1
    r2 = d2[:, None] * j
    if signed:
        r1 = -d1[:, None] * (torch.arange(n, dtype=torch.float64, device=dev) + 0.5)
        pts = [r1, torch.zeros_like(d1)[:, None], r2]
    else:
        pts = [d1[:, None] * j, (n * d1)[:, None], r2, torch.zeros_like(d1)[:, None]]
    return torch.cat(pts, 1).sort(1).values


class TwinUniform(QuantizerKind):
    """PTQ4ViT twin uniform grid (one region bit, ``bits - 1`` magnitude bits per range)."""

    name = "twin_int"
    supports_learnable = False
    supports_per_channel = False
    calibrators = ("mse",)

    def validate(self, spec) -> None:
        if spec.symmetric:
            raise ValueError("format 'twin_int' has two one-sided ranges (PTQ4ViT): set symmetric: false")
        super().validate(spec)

    def qrange(self, spec) -> tuple[int, int]:
        return 0, 2**spec.bits - 1

    def tensor_range(self, x, spec):
        return None

    def error(self, state, bits: int, d1: torch.Tensor, d2: torch.Tensor, signed: bool) -> torch.Tensor:
        """Expected squared error on the histogram for candidate steps (K,) -> (K,)."""
        return step_grid_error(state, lambda v: twin_fake_quant(v, d1[:, None], d2[:, None], bits, signed),
                               _breakpoints(d1, d2, bits, signed))

    def compute_range(self, state, spec) -> tuple[float, float]:
        n = 2 ** (spec.bits - 1)
        dev = state.counts.device
        lo, hi = float(state.min), float(state.max)
        if lo >= 0:
            if hi > 1.0 + 1e-6:
                raise ValueError(f"format 'twin_int' on non-negative data is PTQ4ViT's post-softmax form "
                                 f"(R2 = [0, 1]), but the calibration data reach {hi:.4g}: use format 'int' "
                                 f"for this quantizer")
            m = torch.arange(M_MAX + 1, dtype=torch.float64, device=dev)
            d2 = torch.full_like(m, 1.0 / (n - 1))
            best = int(m[torch.argmin(self.error(state, spec.bits, d2 * torch.exp2(-m), d2, False))])
            return 0.0, 2.0**-best
        # GELU form: R1 extent A = n * d1 in (0, |min|], m on an integer range; then A refined
        a_max = -lo
        a = a_max * torch.arange(1, _A_COARSE + 1, dtype=torch.float64, device=dev) / _A_COARSE
        ms = torch.arange(_M_LO, _M_HI + 1, dtype=torch.float64, device=dev)
        aa, mm = torch.meshgrid(a, ms, indexing="ij")
        aa, mm = aa.flatten(), mm.flatten()
        k = int(torch.argmin(self.error(state, spec.bits, aa / n, aa / n * torch.exp2(mm), True)))
        best_a, best_m = float(aa[k]), float(mm[k])
        step = a_max / _A_COARSE
        offs = torch.linspace(-1.0, 1.0, _FINE, dtype=torch.float64, device=dev)
        for _ in range(_ROUNDS):
            aa, mm = torch.meshgrid((best_a + step * offs).clamp(a_max * 1e-6, a_max),
                                    torch.tensor([best_m - 1, best_m, best_m + 1], dtype=torch.float64, device=dev),
                                    indexing="ij")
            aa, mm = aa.flatten(), mm.flatten()
            k = int(torch.argmin(self.error(state, spec.bits, aa / n, aa / n * torch.exp2(mm), True)))
            best_a, best_m = float(aa[k]), float(mm[k])
            step /= 8
        return -best_a, (n - 1) * best_a / n * 2.0**best_m

    def fake_quant(self, quantizer, x: torch.Tensor) -> torch.Tensor:
        bits = quantizer.spec.bits
        signed, d1, d2, _ = twin_params(float(quantizer.amin), float(quantizer.amax), bits)
        d1, d2 = max(d1, 1e-30), max(d2, 1e-30)
        y = twin_fake_quant(x.detach(), d1, d2, bits, signed)
        if x.requires_grad and torch.is_grad_enabled():
            n = 2 ** (bits - 1)
            inside = (x >= (-n * d1 if signed else 0.0)) & (x <= (n - 1) * d2)
            return y + (x - x.detach()) * inside
        return y

    def represented_range(self, quantizer):
        """Both regions: the softmax form's R2 reaches ``(L-1)*delta2`` (1), above the stored
        ``amax`` (R1's top); the GELU form's stored range is already both regions' span."""
        signed, d1, d2, _ = twin_params(float(quantizer.amin), float(quantizer.amax), quantizer.spec.bits)
        lo = quantizer.amin.float()
        return lo, torch.full_like(lo, (2 ** (quantizer.spec.bits - 1) - 1) * d2)

    def encoding(self, quantizer) -> dict:
        bits = quantizer.spec.bits
        n = 2 ** (bits - 1)
        signed, d1, d2, m = twin_params(float(quantizer.amin), float(quantizer.amax), bits)
        if signed:
            # region 1 holds magnitudes 1..n (n codes, stored as magnitude - 1); a value rounding to 0
            # is region 2's code 0
            rule = (f"post-GELU: x < 0 -> x_hat = clamp(round(x/delta1), -{n}, 0)*delta1, and x_hat < 0 is region 1 "
                    f"with code {n} + (-x_hat/delta1 - 1); else (x_hat = 0 included) region 2, x_hat = "
                    f"clamp(round(x/delta2), 0, {n - 1})*delta2, code = x_hat/delta2")
            code = f"{n} region-1 codes for -{n}*delta1..-delta1, {n} region-2 codes for 0..{n - 1}*delta2"
        else:
            rule = (f"post-softmax: x < {n}*delta1 -> region 1, x_hat = clamp(round(x/delta1), 0, {n - 1})*delta1, "
                    f"code = x_hat/delta1; else region 2, x_hat = clamp(round(x/delta2), 0, {n - 1})*delta2, "
                    f"code = {n} + x_hat/delta2")
            code = f"{n} codes per region; the grid covers [0, {n - 1}*delta2] (max is region 1's top)"
        return {"delta1": d1, "delta2": d2, "exponent_m": m, "region_convention": "gelu" if signed else "softmax",
                "codes_per_region": n, "covers": [float(self.represented_range(quantizer)[0].min()),
                                                  float(self.represented_range(quantizer)[1].max())],
                "codes": code,
                "formula": f"delta2 = 2**m * delta1; " + rule,
                "source": "PTQ4ViT twin uniform quantization (Yuan et al. 2022)"}


register_quantizer_kind(TwinUniform())
