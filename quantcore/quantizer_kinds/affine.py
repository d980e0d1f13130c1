"""The uniform affine integer grid (format ``int``): ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``.

Fixed ranges (PTQ, frozen QAT) and learnable LSQ/LSQ+ ranges (QAT), both in vectorized elementwise
torch ops with torch's rounding and straight-through gradients (tests/test_fake_quant.py compares
them with torch's ``fake_quantize_*`` kernels).
"""
from __future__ import annotations

import math

import torch

from .base import QuantizerKind, register_quantizer_kind

#: The smallest scale of the uniform grid (torch's fake-quant ops divide by it); a narrower range is
#: widened to this grid (:meth:`UniformAffine.grid_range`) and reported by calibration.
MIN_SCALE = 1e-8


class LSQFakeQuant(torch.autograd.Function):
    """Fake quantization with a learnable scale and zero point (LSQ, Esser et al. 2020; LSQ+ for the
    zero point): the same values and gradients as torch's
    ``_fake_quantize_learnable_per_{tensor,channel}_affine`` (straight-through estimator for ``x``
    where ``round(x / s + z)`` is on the grid; scale/zero-point gradients scaled by ``grad_factor``;
    tests/test_qat.py compares both), in plain elementwise torch ops, which measure 2.5-3x faster
    than torch's kernels on CPU (QAT step time is dominated by fake quantization on small models).

    ``x``: any shape; ``scale``/``zero_point``: shape ``(1,)`` or ``(C,)`` with ``axis`` the channel
    dimension of ``x``. Returns a tensor like ``x``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor, axis):  # noqa: D102
        shape = [1] * x.dim()
        if axis is not None:
            shape[axis] = -1
        # |scale| on the grid's floor, as convert() writes it back: a step that took a scale to or below
        # zero (a user's own optimizer; quantcore's loop clamps after each step) keeps a positive grid
        # (no mirrored grid, no NaN at 0) and convert() keeps the output. In float32 whatever the
        # parameters' dtype (model.half(): the floor 1e-8 is 0 in float16, 1/s inf, 0 * inf NaN)
        sign = torch.where(scale.detach() < 0, -1.0, 1.0)
        s = scale.detach().float().abs().clamp_min(MIN_SCALE).reshape(shape)
        z = zero_point.detach().float().round().clamp(qmin, qmax).reshape(shape)
        q = (x * s.reciprocal()).round_().add_(z)  # round(x * (1/s)) + z, as torch's kernels compute it
        qc = q.clamp(qmin, qmax)
        mask = qc == q  # on the grid: the straight-through estimator passes the gradient
        y = qc.sub_(z).mul_(s)
        ctx.save_for_backward(x, y, s, mask, sign)
        ctx.meta = (grad_factor, axis, zero_point.requires_grad, scale.dtype, zero_point.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        x, y, s, mask, sign = ctx.saved_tensors
        g, axis, learn_zp, s_dtype, z_dtype = ctx.meta
        gx = torch.where(mask, gy, 0.0)
        # d y / d s = (y - x) / s on the grid and y / s off it, so
        # sum(gy * dy/ds) = (sum(gy * y) - sum(gx * x)) / s ; d y / d z = -s off the grid, 0 on it.
        # Two fused float32 dots: the difference of two large sums carries float32 rounding of every
        # product (relative ~1e-4 on 1e6 elements, up to ~1e-2 for values far from zero in steps
        # of s, e.g. N(5, 0.05) at s = 0.05). Forming y - x per element first is exact but measured
        # 1.3-1.6x slower for the whole op (two more passes over each activation), which the QAT
        # step-time target cannot afford; gradient noise of that size does not change SGD/AdamW.
        if axis is None:
            gyf, gxf = gy.reshape(-1), gx.reshape(-1)
            gs = (torch.dot(gyf, y.reshape(-1)) - torch.dot(gxf, x.reshape(-1))).reshape(1)
            gz = (gxf.sum() - gyf.sum()).reshape(1) if learn_zp else None
        else:
            dims = [d for d in range(x.dim()) if d != axis]
            gs = ((gy * y).sum(dims) - (gx * x).sum(dims)).reshape(-1)
            gz = (gx.sum(dims) - gy.sum(dims)).reshape(-1) if learn_zp else None
        s1 = s.reshape(-1)
        gs = (gs / s1 * g * sign.reshape(-1)).to(s_dtype)  # d|scale|/d scale, in the parameter's dtype
        if gz is not None:
            gz = (gz * s1 * g).to(z_dtype)
        return gx, gs, gz, None, None, None, None


def _fixed_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      axis: int | None, symmetric: bool | None = None) -> torch.Tensor:
    """Fake quantization with a fixed range: the values of torch's ``fake_quantize_per_{tensor,channel}
    _affine`` (``(clamp(round(x * (1/s)) + z) - z) * s``) and their straight-through gradient, in
    vectorized elementwise ops (2-4x faster than torch's CPU kernels: this is every quantizer of a
    PTQ evaluation and of QAT with frozen ranges). ``scale``/``zero_point``: ``()`` or ``(C,)``;
    ``symmetric``: the zero point is 0 (the spec says so; None: read it, a device sync on a GPU)."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s = scale.reshape(shape) if scale.dim() else scale
    z = zero_point.to(x.dtype).reshape(shape) if zero_point.dim() else zero_point.to(x.dtype)
    if symmetric is None:  # reading the zero point waits for the device: callers that know pass it
        symmetric = not bool(zero_point.any())
    if not (x.requires_grad and torch.is_grad_enabled()):
        q = (x * s.reciprocal()).round_()
        if symmetric:
            return q.clamp_(qmin, qmax).mul_(s)
        return q.add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
    return _FixedFakeQuant.apply(x, s, z, qmin, qmax)


class _FixedFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax):  # noqa: D102
        q = (x * s.reciprocal()).round_().add_(z)
        qc = q.clamp(qmin, qmax)
        ctx.save_for_backward(qc == q)
        return qc.sub_(z).mul_(s)

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        (mask,) = ctx.saved_tensors
        return torch.where(mask, gy, 0.0), None, None, None, None


class UniformAffine(QuantizerKind):
    """Uniform integer grid, symmetric or asymmetric, per tensor or per channel (TensorRT/ONNX QDQ,
    AIMET, FasterTransformer); learnable in QAT (LSQ, Esser et al. 2020; LSQ+ zero point)."""

    name = "int"
    supports_learnable = True

    def fake_quant(self, quantizer, x: torch.Tensor) -> torch.Tensor:
        spec = quantizer.spec
        qmin, qmax = spec.qrange()
        axis = None if spec.axis is None else spec.axis % x.dim()
        if spec.learnable and quantizer.scale is not None:
            # LSQ's gradient scale 1/sqrt(N * qmax): N elements share one scale (per sample for
            # activations, per channel for per-channel weights)
            per = x.numel() if quantizer.kind == "weight" else x[0].numel() if x.dim() > 1 else x.numel()
            g = 1.0 / math.sqrt(max(1, per // quantizer.scale.numel()) * max(qmax, 1))
            return LSQFakeQuant.apply(x, quantizer.scale, quantizer.zero_point, qmin, qmax, g, axis)
        scale, zp = quantizer.scale_zero_point()
        return _fixed_fake_quant(x, scale, zp, qmin, qmax, axis, symmetric=spec.symmetric)

    def grid_range(self, lo, hi, spec):
        """A range narrower than the floor scale allows (``(quant_max - quant_min) * MIN_SCALE``;
        symmetric: ``quant_max * MIN_SCALE`` each side) is quantized with the floor scale: it is widened
        to exactly that grid (keeping the zero point the floor scale gives). ``at_floor`` also marks
        a range already exactly there (a range search returns its grid's end points)."""
        qmin, qmax = spec.qrange()
        if spec.symmetric:
            floor = qmax * MIN_SCALE
            a = torch.clamp(hi, min=floor)
            return -a, a, hi <= floor * (1 + 1e-6)
        floor = (qmax - qmin) * MIN_SCALE
        at = (hi - lo) <= floor * (1 + 1e-6)
        if not bool(at.any()):
            return lo, hi, at
        zp = torch.clamp(torch.round(qmin - lo / MIN_SCALE), qmin, qmax)
        return torch.where(at, (qmin - zp) * MIN_SCALE, lo), torch.where(at, (qmax - zp) * MIN_SCALE, hi), at

    def encoding(self, quantizer) -> dict:
        scale, zp = quantizer.scale_zero_point()
        return {"scale": scale, "zero_point": zp}


register_quantizer_kind(UniformAffine())
