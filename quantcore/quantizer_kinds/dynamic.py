"""Dynamic (run-time) integer quantization per token or per block: format ``int_dynamic``.

The uniform affine grid of format ``int``, but its scale (and zero point) is computed from the tensor
itself at every forward, one per slice along the dimension(s) that the product consuming the tensor
**contracts** (the GEMM's K, along which an integer or block-scaled kernel can factor the scales out),
or per ``block_size`` consecutive elements of that slice (block scaling, as ModelOpt's dynamic block
quantization and the OCP Microscaling formats; a slice that is not a multiple of ``block_size`` ends
with a shorter block). The placement's call sites say which dimension that is:

* Linear input ``(..., tokens, features)``: the features of a token (per-token dynamic activation
  quantization of W4A4 LLM/ViT work: ZeroQuant, Yao et al. 2022; QuaRot, Ashkboos et al. 2024);
  Linear weight ``(out, in)``: the input features (group-wise weight quantization);
* attention: q and k along the head dimension, the probabilities along the keys, v along the tokens
  (``attn @ v`` contracts over them), whether the model calls fused SDPA, ``q @ k.transpose(-2, -1)``
  or an einsum (the same slices, the same outputs);
* convolution: the input channels, at each pixel of the input ``(N, C, H, W)`` and at each kernel tap
  of the weight ``(out, in, kh, kw)``: the pairing of a block-scaled GEMM over im2col's channels-last K
  (for a grouped convolution, pick a ``block_size`` that divides the channels per group);
* the model's image input ``(N, C, H, W)`` (``placement.quantize_model_input``): the channels of a pixel;
* a slice of one value (a one-channel image or convolution) is refused by quantizer name: every value
  would be its own scale;
* a tensor no product consumes (a residual add, the softmax input, a GEMM output), and a
  relative-position parameter viewed inside attention (BoTNet/HaloNet): the last dimension.

For a slice ``x_b``:

* symmetric: ``a = min(max|x_b|, amax)``, ``s = a / quant_max``, ``x_hat = clamp(round(x_b / s),
  quant_min, quant_max) * s``;
* asymmetric: ``lo = max(min(x_b, 0), amin)``, ``hi = min(max(x_b, 0), amax)``, ``s = (hi - lo) /
  (quant_max - quant_min)``, ``z = clamp(round(quant_min - lo / s))``, ``x_hat = (clamp(round(x_b / s) +
  z) - z) * s``.

The calibrated static range ``[amin, amax]`` is a clip bound over the whole tensor (asymmetric: the
rounded zero point moves the grid's ends by up to half a step, as for format ``int``): calibrator ``max``
never clips (pure dynamic quantization), ``percentile`` clips the rare outliers beyond it in every
slice. ``mse`` and ``entropy`` (and ``tf_enhanced``) search the range of one per-tensor grid, which
is not the grid applied here, so they are refused. A scale below ``MIN_SCALE`` (an all-zero slice) is
floored as format ``int`` floors it.

The run-time scale is stored in ``scale_format`` (what the kernel reads, so what the simulation applies;
rounded to nearest, ties to even, after the slice's scale is computed):

* ``fp16`` (the default; QuaRot's and most per-token INT4/INT8 kernels' scales) and ``bf16``: the scale
  cast to that type (fp16 kept within its range, 2**-24 .. 65504);
* ``fp8_e4m3``: NVFP4's two-level scheme (NVIDIA, 2025): a float32 scale per tensor, ``g = (the
  largest scale the clip bound allows) / 448``, times an E4M3 scale per block, ``fp8(s / g)``, kept
  within E4M3's 2**-9 .. 448;
* ``e8m0``: a power of two, rounded **up** (``2**ceil(log2 s)``), so the block's largest value is never
  clipped (the OCP Microscaling formats' shared exponent; the MX spec's own rule rounds down and clips);
* ``fp32``: the exact scale (quantcore before 2026-12-05; what an ``int_dynamic`` checkpoint written
  then loads with).

A scale rounded down clips the block's largest values at the last code, as the deployed kernel does:
by up to the format's relative rounding of the scale times ``quant_max`` steps (fp16 2**-11, bf16 2**-8,
E4M3 2**-4: at 8 bits up to ~8 steps; more for fp16 scales in its subnormal range, below 2**-14). A scale
rounded up (e8m0 always, up to 2x) would let values past the calibrated bound onto the wider grid: they
are clipped to the bound first, so it stays a clip bound for every scale format (within half a step).
The straight-through gradient is that of the exact scale's grid (``|x| <= a``, or ``lo <= x <= hi``).
The cost model (``quantcore analyze``) counts the format's bits per block (32, 16, 16, 8, 8).

Gradient: straight-through for values inside the clip bound (the run-time scale is treated as a
constant, as in QuaRot/LLM-QAT), zero outside. No learnable (LSQ) range: the step is not a parameter.
Deployment: the scales exist only at run time, so ONNX QDQ, AIMET encodings and the TensorRT range table
cannot express it (export refuses it by name); ``encodings.json`` records the rule and the clip bound.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .affine import MIN_SCALE
from .base import QuantizerKind, contracted_dims, register_quantizer_kind

#: ``scale_format`` -> bits of one stored scale (the cost model's figure)
SCALE_FORMATS = {"fp16": 16, "bf16": 16, "fp8_e4m3": 8, "e8m0": 8, "fp32": 32}
DEFAULT_SCALE_FORMAT = "fp16"
_E4M3_MAX, _E4M3_MIN = 448.0, 2.0**-9  # largest finite and smallest subnormal E4M3 magnitudes


def round_scale(s: torch.Tensor, scale_format: str, top: torch.Tensor) -> torch.Tensor:
    """``s`` (float32 scales, all >= MIN_SCALE) as ``scale_format`` stores them, back in float32.
    ``top``: 0-d, the largest scale the clip bound allows (``fp8_e4m3``'s per-tensor scale is
    ``top / 448``). Raises ``ValueError`` for an unknown format."""
    if scale_format == "fp32":
        return s
    if scale_format == "fp16":
        return s.clamp(2.0**-24, 65504.0).half().float()
    if scale_format == "bf16":
        return s.bfloat16().float()
    if scale_format == "fp8_e4m3":
        g = (top / _E4M3_MAX).clamp(min=MIN_SCALE)
        return (s / g).clamp_(_E4M3_MIN, _E4M3_MAX).to(torch.float8_e4m3fn).float().mul_(g)
    if scale_format == "e8m0":
        m, e = torch.frexp(s)  # s = m * 2**e, 0.5 <= m < 1: the next power of two up is 2**e, or s itself
        return torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, e - 1, e))
    raise ValueError(f"scale_format: {scale_format!r} is not one of {sorted(SCALE_FORMATS)}")


def spec_scale_format(spec) -> str:
    """The ``scale_format`` a spec's run-time scales are stored in (unset: :data:`DEFAULT_SCALE_FORMAT`)."""
    return spec.scale_format or DEFAULT_SCALE_FORMAT


def dynamic_fake_quant(x: torch.Tensor, lo_bound: torch.Tensor, hi_bound: torch.Tensor, qmin: int, qmax: int,
                       symmetric: bool, block_size: int | None,
                       scale_format: str = DEFAULT_SCALE_FORMAT) -> torch.Tensor:
    """Quantize-dequantize ``x`` (float32, any shape, at least 1-D) with one run-time scale per slice
    of the last dimension (``block_size`` None: the whole dimension), stored in ``scale_format``
    (:func:`round_scale`). ``lo_bound``/``hi_bound``: 0-d float32 clip bound (``hi_bound > 0``;
    ``lo_bound <= 0``). Returns a tensor like ``x``; straight-through gradient inside the clip bound
    (see the module docstring)."""
    n = x.shape[-1]
    xb = x
    pad = 0
    if block_size is not None and block_size < n:
        pad = (-n) % block_size
        # zeros do not move a block's max|x| (nor its min/max, which include 0 anyway)
        xp = F.pad(x, (0, pad)) if pad else x
        xb = xp.reshape(*x.shape[:-1], (n + pad) // block_size, block_size)
    grad = x.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        if symmetric:
            a = xb.abs().amax(-1, keepdim=True).clamp_(max=hi_bound)
            s = round_scale((a / qmax).clamp_(min=MIN_SCALE), scale_format, hi_bound / qmax)
            inside = (xb.abs() <= a) if grad else None
            # a rounded scale (e8m0 rounds up, up to 2x) must not let values past the calibrated bound:
            # they are clipped to it first, as the exact scale's grid clips them (fp32: no change)
            xq = xb if scale_format == "fp32" else torch.minimum(torch.maximum(xb, -a * ((qmax + 1) / qmax)), a)
            y = (xq / s).round_().clamp_(qmin, qmax).mul_(s)
        else:
            lo = xb.amin(-1, keepdim=True).clamp_(max=0.0).clamp_(min=lo_bound)
            hi = xb.amax(-1, keepdim=True).clamp_(min=0.0).clamp_(max=hi_bound)
            s = round_scale(((hi - lo) / (qmax - qmin)).clamp_(min=MIN_SCALE), scale_format,
                            (hi_bound - lo_bound) / (qmax - qmin))
            z = (qmin - lo / s).round_().clamp_(qmin, qmax)
            inside = ((xb >= lo) & (xb <= hi)) if grad else None
            xq = xb if scale_format == "fp32" else torch.minimum(torch.maximum(xb, lo), hi)
            y = (xq / s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
    if xb is not x:
        y = y.reshape(*x.shape[:-1], n + pad)[..., :n]
        if grad:
            inside = inside.reshape(*x.shape[:-1], n + pad)[..., :n]
    if not grad:
        return y
    return torch.where(inside, x + (y - x).detach(), y)


class DynamicInt(QuantizerKind):
    """Uniform integer grid with run-time scales per slice along the consuming product's contracted
    dimension(s) (a token's features) or per ``block_size`` elements of it; the calibrated range is a
    clip bound. See the module docstring."""

    name = "int_dynamic"
    supports_learnable = False
    supports_per_channel = False
    supports_blocks = True
    calibrators = ("max", "percentile")

    def validate(self, spec) -> None:
        if spec.axis is not None:
            raise ValueError(f"axis/per_channel: format {spec.format!r} computes its scales at run time per slice "
                             f"along what the consuming product contracts (or per block_size elements of it), not "
                             f"per channel; remove axis/per_channel (weights: per_channel: false)")
        super().validate(spec)

    def fake_quant(self, quantizer, x: torch.Tensor, dims: tuple[int, ...] | int | None = None) -> torch.Tensor:
        spec = quantizer.spec
        qmin, qmax = spec.qrange()
        lo, hi = quantizer.amin.float().reshape(()), quantizer.amax.float().reshape(())
        fmt = spec_scale_format(spec)
        if x.dim() == 0:
            return dynamic_fake_quant(x.reshape(1), lo, hi, qmin, qmax, spec.symmetric, spec.block_size,
                                      fmt).reshape(())
        d = list(contracted_dims(dims, x.dim()))
        if d == [x.dim() - 1]:
            return dynamic_fake_quant(x, lo, hi, qmin, qmax, spec.symmetric, spec.block_size, fmt)
        # the contracted dimensions last (a conv's channels; an einsum's summed letters, flattened in
        # their order), then back
        rest = [i for i in range(x.dim()) if i not in d]
        xp = x.permute(*rest, *d)
        y = dynamic_fake_quant(xp.reshape(*xp.shape[:len(rest)], -1), lo, hi, qmin, qmax, spec.symmetric,
                               spec.block_size, fmt)
        inverse = [0] * x.dim()
        for pos, i in enumerate(rest + d):
            inverse[i] = pos
        return y.reshape(xp.shape).permute(*inverse)

    def encoding(self, quantizer) -> dict:
        spec = quantizer.spec
        qmin, qmax = spec.qrange()
        where = ("the dimension(s) the consuming product contracts (a Linear input: a token's features; a conv "
                 "input: a pixel's channels; v: the tokens; quantcore/quantizer_kinds/dynamic.py lists each)")
        per = (f"each slice along {where}" if spec.block_size is None
               else f"each block of {spec.block_size} consecutive elements of the slice along {where}")
        fmt = spec_scale_format(spec)
        if spec.symmetric:
            rule = (f"for {per}: s = {fmt}(min(max|x|, amax)/{qmax}), x_hat = clamp(round(x/s), {qmin}, {qmax})*s")
        else:
            rule = (f"for {per}: lo = max(min(x, 0), min), hi = min(max(x, 0), max), s = {fmt}((hi - lo)/{qmax - qmin}), "
                    f"z = clamp(round({qmin} - lo/s), {qmin}, {qmax}), x_hat = (clamp(round(x/s) + z, {qmin}, "
                    f"{qmax}) - z)*s")
        stored = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32",
                  "e8m0": "a power of two (E8M0), rounded up",
                  "fp8_e4m3": "E4M3 per block times one float32 scale per tensor, (the largest scale the clip "
                              "bound allows)/448 (NVFP4's two levels)"}[fmt]
        return {"block_size": spec.block_size, "scale": "dynamic (computed at run time)", "formula": rule,
                "scale_format": fmt, "scale_stored_as": stored,
                "clip_bound": "min/max: the calibrated range, a bound on every run-time range"}


register_quantizer_kind(DynamicInt())
