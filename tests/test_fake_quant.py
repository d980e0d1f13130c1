"""quantcore's fake-quant ops against torch's own (the independent reference): the fixed-range path
(PTQ evaluation, QAT with frozen ranges) and the LSQ learnable path, values and gradients, on real
activations of a ViT fed Fashion-MNIST images plus zero-heavy and heavy-tailed tensors."""
from __future__ import annotations

import pytest
import torch

from quantcore.quantizer import LSQFakeQuant, _fixed_fake_quant


def _activations() -> list[torch.Tensor]:
    from quantcore.demo import FMNIST_DIR, load_fashion_mnist
    from quantcore.models import vit_fmnist

    torch.manual_seed(0)
    if (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        x = torch.from_numpy(load_fashion_mnist()["test"][0][:64].copy()).float().div(255).sub(0.286).div(0.353)[:, None]
    else:  # the same shapes; the other tensors below still cover skewed data
        x = torch.randn(64, 1, 28, 28)
    model = vit_fmnist().eval()
    acts: list[torch.Tensor] = []
    for m in model.modules():
        if type(m).__name__ in ("LayerNorm", "GELU", "Linear"):
            m.register_forward_hook(lambda mod, i, o: acts.append(o.detach()))
    with torch.no_grad():
        model(x)
    relu = torch.relu(torch.randn(32, 50, 40)) * 3  # half exact zeros
    tail = torch.distributions.StudentT(2.0).sample((32, 50, 40))  # heavy tails
    return acts[:6] + [relu, tail]


ACTS = _activations()


def _range(x: torch.Tensor, symmetric: bool, bits: int, axis: int | None):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    dims = [d for d in range(x.dim()) if d != axis] if axis is not None else list(range(x.dim()))
    lo, hi = x.amin(dims) * 0.8, x.amax(dims) * 0.8  # clip some values: both sides of the mask are tested
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale.clamp_min(1e-8).float(), zp, qmin, qmax


@pytest.mark.parametrize("i", range(len(ACTS)))
@pytest.mark.parametrize("symmetric,bits", [(True, 8), (False, 8), (True, 4), (False, 4)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fixed_range_fake_quant_equals_torch(i, symmetric, bits, per_channel):
    x = ACTS[i].clone().requires_grad_()
    axis = x.dim() - 1 if per_channel else None
    scale, zp, qmin, qmax = _range(x.detach(), symmetric, bits, axis)
    if axis is None:
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    else:
        ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    ours = _fixed_fake_quant(x, scale, zp, qmin, qmax, axis)
    assert torch.equal(ref, ours)
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(ref, x, g)[0], torch.autograd.grad(ours, x, g)[0])
    with torch.no_grad():  # the inference path (no autograd function)
        assert torch.equal(_fixed_fake_quant(x, scale, zp, qmin, qmax, axis), ref)


@pytest.mark.parametrize("i", range(len(ACTS)))
@pytest.mark.parametrize("symmetric,bits", [(True, 8), (False, 4)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_fake_quant_equals_torchs_learnable_op(i, symmetric, bits, per_channel):
    x = ACTS[i].clone().requires_grad_()
    axis = x.dim() - 1 if per_channel else None
    scale, zp, qmin, qmax = _range(x.detach(), symmetric, bits, axis)
    s = scale.reshape(-1).clone().requires_grad_()
    z = zp.reshape(-1).float().requires_grad_(not symmetric)
    g_factor = 0.37
    if axis is None:
        ref = torch._fake_quantize_learnable_per_tensor_affine(x, s, z, qmin, qmax, g_factor)
    else:
        ref = torch._fake_quantize_learnable_per_channel_affine(x, s, z, axis, qmin, qmax, g_factor)
    ours = LSQFakeQuant.apply(x, s, z, qmin, qmax, g_factor, axis)
    assert torch.equal(ref, ours)
    g = torch.randn_like(ref)
    inputs = (x, s, z) if z.requires_grad else (x, s)
    grads_ref, grads_ours = torch.autograd.grad(ref, inputs, g), torch.autograd.grad(ours, inputs, g)
    assert torch.equal(grads_ref[0], grads_ours[0])  # x: the same straight-through mask
    # scale / zero point: float32 sums of ~1e5 terms in different orders, so both are compared with a
    # float64 evaluation of the same sums, within a bound proportional to the sum of |terms|
    x64, s64 = x.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_(z.requires_grad)
    i64 = (x64, s64, z64) if z.requires_grad else (x64, s64)
    exact = torch.autograd.grad(LSQFakeQuant.apply(x64, s64, z64, qmin, qmax, g_factor, axis), i64, g.double())
    terms = float((g.abs() * (x.detach().abs() / s.detach().min() + qmax - qmin)).sum()) * g_factor
    for k in range(1, len(inputs)):
        for got in (grads_ref[k], grads_ours[k]):
            err = float((got.double() - exact[k]).abs().max())
            assert err <= 4e-6 * terms, (k, err, terms)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("axis", [None, 0])
def test_convert_after_learned_steps_keeps_every_output_bit_for_bit(symmetric, bits, axis):
    """QAT's learned scales, written back by convert(), must give exactly the grid training used:
    scale * qmax / qmax is one float32 ulp off for ~0.5-7 % of scales, which moved logits by up to
    0.03 on the demo ViT. The range search (_range_of_grid) reproduces each representable scale
    exactly, and QAT ends training with representable scales."""
    from quantcore.encoding_table import quantizer_rows
    from quantcore.formats import QuantSpec
    from quantcore.qat import _clamp_ranges, _representable_scales
    from quantcore.quantizer import TensorQuantizer

    g = torch.Generator().manual_seed(bits + (0 if axis is None else 1) + 2 * symmetric)
    w = torch.randn(256, 24, generator=g) * torch.rand(256, 1, generator=g)
    q = TensorQuantizer(QuantSpec(bits=bits, symmetric=symmetric, axis=axis), "weight")
    q.calibrate_tensor(w)
    q.make_learnable()
    holder = torch.nn.Sequential(q)
    for _ in range(3):  # optimizer-like steps, each followed by QAT's clamp
        with torch.no_grad():
            q.scale.mul_(torch.exp(0.05 * torch.randn(q.scale.shape, generator=g)))
            if not symmetric:  # a symmetric grid's zero point stays 0 (QAT does not train it)
                q.zero_point.add_(torch.randn(q.zero_point.shape, generator=g))
        _clamp_ranges(holder)
    _representable_scales(holder)  # what QAT does after its last step
    learned = q.scale.detach().clone()
    with torch.no_grad():
        before = q(w)
    row_before = quantizer_rows(holder)[0]
    q.convert()
    scale, _ = q.scale_zero_point()
    assert torch.equal(scale.reshape(-1), learned)
    with torch.no_grad():
        assert torch.equal(q(w), before)
    assert quantizer_rows(holder)[0] == row_before  # encodings of a model mid-QAT = after convert

