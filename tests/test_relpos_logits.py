"""Attention whose logits get a position term from a matmul of their own (timm BoTNet
``BottleneckAttn`` and HaloNet ``HaloAttn``: ``q @ rel_k^T`` in ``PosEmbedRel``) before softmax: that
GEMM runs in int8 next to ``q @ k^T``, so it is quantized (q as its input, ``rel_k`` per channel on its
output axis), each of its quantizers acts, and with quantization off the model is the float one."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quantcore
from quantcore.placement import quantizers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

bottleneck_attn = pytest.importorskip("timm.layers.bottleneck_attn")
halo_attn = pytest.importorskip("timm.layers.halo_attn")

RECIPE = {"version": 1, "name": "relpos", "placement": {"family": "auto"},
          "quant": {"weights": {"bits": 8, "per_channel": True}, "activations": {"bits": 8}}}


def _net(kind: str) -> nn.Module:
    """A stem conv, one relative-position attention on an 8x8 map, a pooled head: built from the
    layer's own config, no hub."""
    torch.manual_seed(0)
    if kind == "botnet":
        attn = bottleneck_attn.BottleneckAttn(16, feat_size=(8, 8), num_heads=2)
    else:
        attn = halo_attn.HaloAttn(16, feat_size=(8, 8), num_heads=2, block_size=4, halo_size=1)
    for p in attn.pos_embed.parameters():  # trained-looking position logits, not ~0
        p.data.normal_(0, 0.5)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), attn, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10)).eval()


def _fake_quant_rows(w: torch.Tensor) -> torch.Tensor:
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-8)
    return torch.clamp(torch.round(w / scale), -128, 127) * scale


@pytest.mark.parametrize("kind", ["botnet", "halonet"])
def test_relative_position_logits_are_quantized_and_act(kind):
    net = _net(kind)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
    m = quantcore.prepare(copy.deepcopy(net), RECIPE, example_input=x[:2])
    pl = m.quantcore_placement
    assert pl.attention == ["1"]
    # nothing about the position path is float: every matmul of it is quantized
    assert not [k for k in pl.float_reasons if "pos_embed" in k], pl.float_reasons
    qs = quantizers(m)
    new = [f"1.pos_embed.{p}_{r}_quantizer" for p in ("height_rel", "width_rel") for r in ("input", "weight")]
    assert all(n in qs for n in new), sorted(qs)
    quantcore.calibrate(m, [x])

    # the weight quantizer quantizes rel_k per position (its rows: the logits' channels), as by hand
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [qs[n].register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, []).append(o.detach()))
             for n in new]
    with torch.no_grad():
        out = m(x)
    for h in hooks:
        h.remove()
    for p in ("height_rel", "width_rel"):
        w = getattr(net[1].pos_embed, p).detach()
        got = seen[f"1.pos_embed.{p}_weight_quantizer"]
        assert got and torch.allclose(got[0], _fake_quant_rows(w), atol=1e-6)
        assert seen[f"1.pos_embed.{p}_input_quantizer"]
    assert not torch.equal(out, ref)

    # each quantizer of the position path acts on the output
    for n in new:
        qs[n].quantize = False
        with torch.no_grad():
            changed = not torch.equal(m(x), out)
        qs[n].quantize = True
        assert changed, n

    # quantization off: the float model, bit for bit
    with quantcore.quantization_disabled(m), torch.no_grad():
        assert torch.equal(m(x), ref)


def test_parameter_matmul_outside_attention_still_listed_float():
    """Only a data @ parameter inside a quantized attention is quantized; elsewhere it stays listed."""

    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            return x @ self.proj

    net = nn.Sequential(nn.Linear(8, 16), P(), nn.Linear(16, 4)).eval()
    m = quantcore.prepare(net, RECIPE, example_input=torch.randn(2, 8))
    assert "1.proj" in m.quantcore_placement.float_reasons
    assert not [n for n in quantizers(m) if "proj" in n]


@pytest.mark.parametrize("fused", [True, False])
def test_attention_with_a_bias_table_lookup_is_still_quantized(fused):
    """timm MaxViT's TF-ported weights (``RelPosBiasTf``) compute their position bias with einsum
    lookups of a parameter table in a buffer, inside the attention's forward: those products of
    parameters and buffers are constants, not part of softmax(QK^T)V, so the attention is quantized
    (before: every such attention stayed float, "attention ops ['matmul_act', 'sdpa'] in one
    forward"); the table is listed float as a constant; the bias still reaches the logits."""
    from functools import partial

    maxxvit = pytest.importorskip("timm.models.maxxvit")
    from timm.layers import RelPosBiasTf

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 32)
            self.attn = maxxvit.AttentionCl(32, dim_head=8, rel_pos_cls=partial(RelPosBiasTf, window_size=(4, 4)))
            self.attn.fused_attn = fused
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.attn(self.embed(x)).mean(1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.attn.rel_pos.relative_position_bias_table.normal_()  # trained-looking, not ~0
    x = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
        no_bias = copy.deepcopy(net)
        no_bias.attn.rel_pos.relative_position_bias_table.zero_()
        ref_no_bias = no_bias(x)
    m = quantcore.prepare(copy.deepcopy(net), RECIPE, example_input=x[:2])
    pl = m.quantcore_placement
    assert pl.attention == ["attn"], pl.float_reasons
    assert "constant" in pl.float_reasons["attn.rel_pos.relative_position_bias_table"]
    qs = quantizers(m)
    for role in ("q", "k", "v", "attn"):
        assert f"attn.{role}_quantizer" in qs, sorted(qs)
    quantcore.calibrate(m, [x])
    with torch.no_grad():
        out = m(x)
        for role in ("q", "k", "v", "attn"):
            q = qs[f"attn.{role}_quantizer"]
            q.quantize = False
            assert not torch.equal(m(x), out), role  # each attention quantizer acts
            q.quantize = True
        with quantcore.quantization_disabled(m):
            assert torch.equal(m(x), ref)

    def err(a: torch.Tensor) -> float:
        return float((a - ref).pow(2).sum())

    assert err(out) < err(ref_no_bias) / 20  # the bias is applied on the quantized path
