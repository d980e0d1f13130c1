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
def test_attention_with_a_bias_table_lookup_is_quantized_on_q_k_v(fused):
    """timm MaxViT's TF-ported weights (``RelPosBiasTf``) compute their position bias with einsum lookups
    of a parameter table in buffers, inside the attention's own forward (a method, not a module). The
    run-time interception finds q @ k^T by the order of a call's matmuls: it used to take the lookup for
    q @ k^T (a review found q's range 16x too wide), so the attention was left float. The lookups are now
    skipped as constants at run time as in placement: q, k, v and the probabilities get the ranges of
    the tensors timm's own forward computes, each quantizer acts, the table is listed as a constant, and
    quantization off is the float model."""
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
    nn.init.normal_(net.attn.rel_pos.relative_position_bias_table, 0, 1.0)  # a trained-looking bias, not ~0
    x = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1))
    # the reference: q, k, v and the probabilities as timm's explicit path computes them
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        ref = net(x)
        a = net.attn
        q, k, v = a.qkv(net.embed(x)).view(4, -1, a.num_heads, a.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        seen["q"] = q if fused else q * a.scale  # the fused path scales after quantizing q (as an int GEMM)
        seen["k"], seen["v"] = k, v
        seen["attn"] = a.rel_pos(q * a.scale @ k.transpose(-2, -1)).softmax(-1)
    m = quantcore.prepare(copy.deepcopy(net), RECIPE, example_input=x[:2])
    pl = m.quantcore_placement
    assert pl.attention == ["attn"] and "attn" not in pl.float_reasons, pl.float_reasons
    assert "constant" in pl.float_reasons["attn.rel_pos.relative_position_bias_table"]
    quantcore.calibrate(m, [x])
    qs = quantizers(m)
    for role, want in seen.items():  # within the qkv GEMM's own 8-bit error (the bug: 16x too wide)
        got = qs[f"attn.{role}_quantizer"].amax
        assert torch.allclose(got, want.abs().max(), rtol=0.02), (role, got, want.abs().max())
    with torch.no_grad():
        out = m(x)
        assert not torch.equal(out, ref)
        for role in seen:
            qs[f"attn.{role}_quantizer"].quantize = False
            changed = not torch.equal(m(x), out)
            qs[f"attn.{role}_quantizer"].quantize = True
            assert changed, role
        with quantcore.quantization_disabled(m):
            assert torch.equal(m(x), ref)


# -- review of the change (helper audit): the same kind with other layouts ---------------------------------
def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()))


def _prepared(net: nn.Module, x: torch.Tensor):
    m = quantcore.prepare(copy.deepcopy(net), RECIPE, example_input=x[:2])
    quantcore.calibrate(m, [x])
    with torch.no_grad():
        ref, out = net(x), m(x)
        with quantcore.quantization_disabled(m):
            assert torch.equal(m(x), ref)
    return m, _sqnr(ref, out)


def test_a_non_contiguous_position_parameter_gets_the_same_quantized_values():
    """rel_k stored transposed (a checkpoint loaded with assign=True): the quantized view took the view's
    strides on a contiguous copy and multiplied scrambled values (logit SQNR 46 -> 23 dB)."""
    net = _net("botnet")
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    strided = copy.deepcopy(net)
    pe = strided[1].pos_embed
    pe.height_rel = nn.Parameter(pe.height_rel.detach().t().contiguous().t())
    pe.width_rel = nn.Parameter(pe.width_rel.detach().t().contiguous().t())
    assert not pe.height_rel.is_contiguous()
    _, contiguous_db = _prepared(net, x)
    _, strided_db = _prepared(strided, x)
    assert strided_db > contiguous_db - 3, (strided_db, contiguous_db)


class _Attn(nn.Module):
    """Explicit attention on 16 channels; ``mode`` picks how position logits or the data come in."""

    def __init__(self, mode: str, d: int = 16, n: int = 10):
        super().__init__()
        self.mode, self.qkv, self.proj = mode, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.rel = nn.Parameter(torch.randn(*{"xp": (d, 8), "vec": (d,), "shared": (n, d)}.get(mode, (1,))) * 0.5)
        self.register_buffer("perm", torch.eye(n).flip(0).contiguous())

    def forward(self, x):
        B, N, C = x.shape
        if self.mode == "setitem":  # data written into a preallocated tensor
            buf = torch.zeros(3, B, N + 2, C)
            buf[:, :, :N] = self.qkv(x).reshape(B, N, 3, C).permute(2, 0, 1, 3)
            q, k, v = buf[0], buf[1], buf[2]
        else:
            q, k, v = self.qkv(x).chunk(3, -1)
        logits = q @ k.transpose(-1, -2) / 4
        if self.mode == "xp":  # x @ p: p's last axis holds the output channels
            logits = logits + (q @ self.rel).mean(-1, keepdim=True)
        elif self.mode == "vec":  # x @ u: a vector, no output channel of its own
            logits = logits + (q @ self.rel).unsqueeze(-1)
        elif self.mode == "shared":  # one parameter to F.linear and to a matmul
            logits = logits + torch.nn.functional.linear(q, self.rel)[..., :N] + \
                (k @ self.rel.transpose(-1, -2))[..., :N].transpose(-1, -2)
        elif self.mode == "buffer_bias":  # a bias from buffers alone, read through .mT
            for _ in range(3):
                del_me = (q * 1.0).mT  # short-lived data temporaries whose ids get reused
                del del_me
            logits = logits + (self.perm @ self.perm.mT)[:N, :N]
        out = logits.softmax(-1) @ v
        return self.proj(out[:, :N])


def _attn_net(mode: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), _Attn(mode), nn.Linear(16, 4)).eval()


_X = torch.randn(4, 10, 8, generator=torch.Generator().manual_seed(1))


def test_data_written_into_a_buffer_is_still_data():
    """buf[:, :, :N] = qkv(x): __setitem__ returns nothing, so the buffer was never marked as holding data
    and q @ k^T looked like a constant: the attention went float."""
    m, db = _prepared(_attn_net("setitem"), _X)
    assert m.quantcore_placement.attention == ["1"] and db > 30


def test_placement_does_not_depend_on_reused_tensor_ids():
    """A buffer read through .mT could inherit a freed data tensor's id and its 'data' flag: identical
    prepares placed differently (the attention found 9 times in 12)."""
    net = _attn_net("buffer_bias")
    found = set()
    for _ in range(12):
        m = quantcore.prepare(copy.deepcopy(net), RECIPE, example_input=_X)
        found.add((tuple(m.quantcore_placement.attention), tuple(sorted(quantizers(m)))))
    assert len(found) == 1, found


def test_position_parameter_axes_and_notes():
    """x @ p: per channel on p's last axis and no ft-mode note; x @ u with a vector: per tensor, said."""
    m, _ = _prepared(_attn_net("xp"), _X)
    assert quantizers(m)["1.rel_weight_quantizer"].spec.axis == 1
    assert not m.quantcore_placement.notes, m.quantcore_placement.notes
    m, _ = _prepared(_attn_net("vec"), _X)
    w = quantizers(m)["1.rel_weight_quantizer"]
    assert w.spec.axis is None and w.amax.numel() == 1
    assert any("per tensor, not per channel" in n for n in m.quantcore_placement.notes)
    with torch.no_grad():
        assert not torch.equal(w(m[1].rel), m[1].rel)  # it acts


def test_a_parameter_to_linear_and_to_a_matmul_is_listed_for_the_matmul():
    """The matmul use merged into F.linear's site: neither quantized nor listed float."""
    m, _ = _prepared(_attn_net("shared"), _X)
    reasons = m.quantcore_placement.float_reasons
    assert "1.rel (x @ rel)" in reasons and "also multiplied with data" in reasons["1.rel (x @ rel)"]
    assert "1.rel_weight_quantizer" in quantizers(m)


def test_an_attention_over_constants_alone_is_still_quantized():
    """DETR's first decoder self-attention runs on learned queries only: no op in it depends on the input,
    which is no reason to leave it float (it was quantized before input tracking)."""

    class Dec(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.queries = nn.Linear(8, 16), nn.Parameter(torch.randn(6, 16))
            self.self_attn, self.cross_attn, self.head = _Attn("plain"), _Attn("plain"), nn.Linear(16, 4)

        def forward(self, x):
            tgt = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1) + 0
            tgt = tgt + self.self_attn(tgt)
            mem = self.embed(x)
            return self.head(tgt + self.cross_attn(torch.cat([tgt, mem], 1))[:, :6]).mean(1)

    torch.manual_seed(0)
    m, _ = _prepared(Dec().eval(), _X)
    assert m.quantcore_placement.attention == ["self_attn", "cross_attn"]


# -- review of the constant-skip change (helper-116): placement and the run time must agree -------------
_N, _D, _H = 16, 32, 2


class _ConstAttn(nn.Module):
    """An explicit attention whose logits get a bias made of constants, made in one of several ways."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.qkv, self.proj = nn.Linear(_D, 3 * _D), nn.Linear(_D, _D)
        self.table = nn.Parameter(torch.randn(_H, _N, 8) * 3)
        self.register_buffer("look", torch.randn(8, _N))
        self.register_buffer("eye", torch.eye(_N) * 2)
        self.w = nn.Parameter(torch.randn(_D // _H, _N) * 0.3)
        self.seen: dict[str, torch.Tensor] = {}
        if mode == "child_param_site":
            self.child = _PosChild()

    def bias(self, q, ext):
        if self.mode == "own":  # its own parameter and buffers
            return torch.einsum("hnm,mk->hnk", self.table, self.look) @ self.eye
        if self.mode == "cached":  # a lookup cached as a plain attribute on the first call
            if getattr(self, "lut", None) is None:
                self.lut = torch.einsum("hnm,mk->hnk", self.table, self.look)
            return self.lut @ self.eye
        if self.mode == "parent_buffers":  # the parent's buffers, passed in: data to the run time
            return torch.einsum("hnm,mk->hnk", self.table, ext[0]) @ ext[1]
        if self.mode == "param_site":  # a data @ parameter site beside the constants, in its own forward
            return q @ self.w + torch.einsum("hnm,mk->hnk", self.table, self.look) @ self.eye
        if self.mode == "child_param_site":  # ... in a child, which gets a plan: its products are not the call's
            rel, lut = self.child(q)
            return rel + lut @ self.eye
        raise ValueError(self.mode)

    def forward(self, x, ext):
        b = x.shape[0]
        q, k, v = self.qkv(x).reshape(b, _N, 3, _H, _D // _H).permute(2, 0, 3, 1, 4)
        bias = self.bias(q, ext)  # before q @ k^T: the run time takes the first matmul on data for it
        a = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        self.seen.update(q=q, k=k, v=v)
        return self.proj((a @ v).transpose(1, 2).reshape(b, _N, _D))


class _PosChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(_H, _N, 8) * 3)
        self.register_buffer("look", torch.randn(8, _N))
        self.w = nn.Parameter(torch.randn(_D // _H, _N) * 0.3)

    def forward(self, q):
        return q @ self.w, torch.einsum("hnm,mk->hnk", self.table, self.look)


class _ConstNet(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(8, _D), _ConstAttn(mode), nn.Linear(_D, 5)
        self.register_buffer("plook", torch.randn(8, _N))
        self.register_buffer("peye", torch.eye(_N) * 2)

    def forward(self, x):
        return self.head(self.attn(self.embed(x), (self.plook, self.peye)).mean(1))


@pytest.mark.parametrize("mode,quantized", [("own", True), ("cached", True), ("parent_buffers", False),
                                            ("param_site", True), ("child_param_site", False)])
def test_constants_are_the_same_to_placement_and_run_time(mode, quantized):
    """The probe called any model buffer and any hooked child's product constant, the run time only the
    attention's own buffers and its own ops' products; a lookup cached as an attribute was a product on
    the probe's call only. Where they disagreed the bias lookup was quantized as q @ k^T (q's range
    14-27x too wide). Now an attention is quantized only where both agree, and then q/k/v get the real
    tensors' ranges; otherwise it stays float with its reason."""
    torch.manual_seed(0)
    net = _ConstNet(mode).eval()
    x = torch.randn(4, _N, 8, generator=torch.Generator().manual_seed(1))
    m = quantcore.prepare(copy.deepcopy(net), {**RECIPE, "quant": {"weights": {"bits": 8}, "activations": {
        "bits": 8, "calibrator": "max"}}}, example_input=x[:2])
    pl = m.quantcore_placement
    assert (pl.attention == ["attn"]) == quantized, (pl.attention, pl.float_reasons)
    if not quantized:
        assert "attn" in pl.float_reasons
    quantcore.calibrate(m, [x])
    with torch.no_grad():
        ref = net(x)
        with quantcore.quantization_disabled(m):
            assert torch.equal(m(x), ref)
            m(x)  # the float tensors of m's own forward
        want = {r: m.attn.seen[r].abs().max() for r in ("q", "k", "v")}
    qs = quantizers(m)
    for r, top in want.items():
        q = qs.get(f"attn.{r}_quantizer")
        assert (q is not None) == quantized
        if q is not None:
            assert torch.allclose(q.amax, top, rtol=0.02), (r, q.amax, top)
