"""Issue #7 faults 1, 2, 4, 5 as kinds: layer subclasses with their own forward, weights used
functionally by a parent, options that cannot apply, per-channel activations. Each right value is
checked against an independent computation (the float layer's own math, a hand-made fake quant)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import quantcore
from quantcore.config import Override, PlacementConfig, SpecPatch
from quantcore.errors import PlacementError, UserError
from quantcore.formats import QuantSpec
from quantcore.placement import place_quantizers, quantizers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W = QuantSpec(axis=0, calibrator="max")
A = QuantSpec(calibrator="max")


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 0.5 * self.weight, self.bias)


class PadConv(nn.Conv2d):
    """Pads in its own forward (third-party 'same' convs): a swapped plain conv gets the shape wrong."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0)


class StdConv(nn.Conv2d):
    """Weight standardization in forward (timm StdConv2d-style)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class LoRALinear(nn.Linear):
    def __init__(self, i, o, r=2):
        super().__init__(i, o)
        self.lora_a = nn.Linear(i, r, bias=False)
        self.lora_b = nn.Linear(r, o, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_b(self.lora_a(x))


def _calibrate(model, x):
    quantcore.calibrate(model, [x])


def _fake_quant(t: torch.Tensor, amax: torch.Tensor, axis=None) -> torch.Tensor:
    scale = (amax / 127).clamp_min(1e-8)
    if axis is not None:
        scale = scale.reshape(-1, *([1] * (t.dim() - 1)))
    return torch.clamp(torch.round(t / scale), -128, 127) * scale


@pytest.mark.parametrize("layer,x", [
    (ScaledLinear(6, 5), torch.randn(4, 6)),
    (PadConv(3, 4, 3, stride=2), torch.randn(2, 3, 9, 9)),
    (StdConv(3, 4, 3, padding=1), torch.randn(2, 3, 8, 8)),
    (LoRALinear(6, 5), torch.randn(4, 6)),
], ids=["scaled-linear", "pad-in-forward-conv", "weight-standardized-conv", "lora"])
def test_layer_subclass_keeps_its_forward_and_is_quantized_as_it_computes(layer, x):
    torch.manual_seed(0)
    model = nn.Sequential(layer).eval()
    ref = copy.deepcopy(model)
    res = place_quantizers(model, PlacementConfig(), W, A, example_input=x)
    assert type(model[0]) is type(layer) and "0.weight_quantizer" in res.quantizers
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # prepared, not calibrated: bit-identical
        _calibrate(model, x)
        with quantcore.quantization_disabled(model):
            assert torch.equal(model(x), ref(x))
        y = model(x)
    assert not torch.equal(y, ref(x))
    qs = quantizers(model)
    wq = qs["0.weight_quantizer"]
    # The weight range is the one of the weight the op receives (scaled / standardized), per channel.
    if isinstance(layer, ScaledLinear):
        effective = 0.5 * ref[0].weight
    elif isinstance(layer, StdConv):
        w = ref[0].weight
        effective = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
    else:
        effective = ref[0].weight
    amax = effective.detach().abs().reshape(effective.shape[0], -1).amax(1)
    assert torch.allclose(wq.amax, amax, rtol=1e-6)
    # Independent reference: the float layer's own math on fake-quantized input and weight.
    xq = _fake_quant(x, qs["0.input_quantizer"].amax)
    wqv = _fake_quant(effective.detach(), amax, axis=0)
    with torch.no_grad():
        if isinstance(layer, ScaledLinear):
            expect = F.linear(xq, wqv, ref[0].bias)
        elif isinstance(layer, PadConv):
            expect = F.conv2d(F.pad(xq, (0, 1, 0, 1)), wqv, ref[0].bias, 2, 0)
        elif isinstance(layer, StdConv):
            expect = F.conv2d(xq, wqv, ref[0].bias, 1, 1)
        else:  # LoRA: the base op quantized here; lora_a/lora_b are Linear modules with their own
            la, lb = model[0].lora_a, model[0].lora_b
            expect = F.linear(xq, wqv, ref[0].bias) + lb(la(x))
    assert torch.allclose(y, expect, rtol=1e-5, atol=1e-6)


def test_multihead_attention_projections_and_matmuls_are_quantized_and_act():
    torch.manual_seed(0)
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=5).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.3)  # zero-initialised head: logits would not move
    x = torch.randn(2, 3, 16, 16)
    res = quantcore.prepare(model, {"model": {"name": "x"}}, example_input=x).quantcore_placement
    mha = "encoder.layers.encoder_layer_0.self_attention"
    assert res.attention == [mha]
    for q in ("in_proj_input_quantizer", "in_proj_weight_quantizer", "out_proj.input_quantizer",
              "out_proj.weight_quantizer", "q_quantizer", "k_quantizer", "attn_quantizer", "v_quantizer"):
        assert f"{mha}.{q}" in res.quantizers, q
    _calibrate(model, x)
    qs = quantizers(model)
    with torch.no_grad():
        y = model(x)
        for name in (f"{mha}.out_proj.weight_quantizer", f"{mha}.in_proj_weight_quantizer", f"{mha}.q_quantizer",
                     f"{mha}.attn_quantizer"):
            qs[name].quantize = False
            assert not torch.equal(model(x), y), f"{name} has no effect"
            qs[name].quantize = True
    # in_proj's weight range comes from the packed in_proj_weight (3E x E, per output channel)
    w = model.encoder.layers[0].self_attention.in_proj_weight
    assert torch.allclose(qs[f"{mha}.in_proj_weight_quantizer"].amax, w.detach().abs().amax(1))
    enc = quantcore.encodings(model)
    assert {r["name"] for r in enc["quantizers"]} == set(qs)
    assert enc["placement"]["attention"] == [mha]


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with query != key: torch slices the packed in_proj_weight into rows
    (q rows, then k/v rows, or all three when key != value) and runs one F.linear per slice."""

    def __init__(self, kv_same: bool):
        super().__init__()
        self.kv_same = kv_same
        self.mem = nn.Linear(16, 16)
        self.val = None if kv_same else nn.Linear(16, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        k = self.mem(x)
        v = k if self.kv_same else self.val(x)
        return self.fc(self.mha(x, k, v, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("kv_same", [True, False])
def test_multihead_cross_attention_quantizes_the_rows_of_its_packed_projection(kv_same):
    """Before: the sliced in_proj_weight stayed float and 'mha' was listed float and as quantized
    attention at once. Now each F.linear receives the rows of the quantized parameter."""
    torch.manual_seed(0)
    model, x = CrossAttention(kv_same).eval(), torch.randn(2, 6, 16)
    res = quantcore.prepare(model, {"model": {"name": "x"}}, example_input=x).quantcore_placement
    assert res.float_reasons == {} and res.attention == ["mha"]
    assert {"mha.in_proj_input_quantizer", "mha.in_proj_weight_quantizer"} <= set(res.quantizers)
    _calibrate(model, x)
    wq = quantizers(model)["mha.in_proj_weight_quantizer"]
    w = model.mha.in_proj_weight
    with torch.no_grad():  # independent: per-row symmetric int8 of the whole parameter, by hand
        scale = w.abs().amax(1, keepdim=True) / 127
        expect = torch.clamp(torch.round(w / scale), -128, 127) * scale
    seen = []

    class Spy(TorchFunctionMode):  # entered first: below quantcore's mode, it sees what the op receives
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                seen.append(args[1].detach().clone())
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Spy():
        model(x)
    cuts = [(0, 16), (16, 48)] if kv_same else [(0, 16), (16, 32), (32, 48)]
    for a, b in cuts:  # each slice arrives as the rows of the quantized parameter, never the float rows
        assert any(t.shape == (b - a, 16) and torch.allclose(t, expect[a:b], atol=1e-6) for t in seen), (a, b)
        assert not any(t.shape == (b - a, 16) and torch.equal(t, w.detach()[a:b]) for t in seen), (a, b)
    assert wq.is_calibrated and torch.allclose(wq.amax, w.detach().abs().amax(1))


def test_every_layer_is_quantized_or_listed_with_a_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.mm_param = nn.Parameter(torch.randn(4, 4))
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)

        def forward(self, x):
            y = self.used(x) @ self.mm_param
            return self.up(y.reshape(2, 4, 1, 1)).flatten(1)

    model = Odd().eval()
    x = torch.randn(2, 4)
    res = place_quantizers(model, PlacementConfig(), W, A, example_input=x)
    assert "used.weight_quantizer" in res.quantizers
    assert res.float_reasons["unused"] == "not called on the example input"
    assert "transposed" in res.float_reasons["up"]
    assert "matmul" in res.float_reasons["mm_param"]


@pytest.mark.parametrize("field,value", [("mode", "ft2"), ("quantize_softmax_input", True),
                                         ("share_qkv_range", True), ("quantize_gemm_output", False)])
def test_attention_options_on_a_model_without_attention_are_refused(field, value):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with pytest.raises(PlacementError, match=rf"placement\.{field}"):
        place_quantizers(model, PlacementConfig(**{field: value}), W, A, example_input=torch.randn(2, 3, 8, 8))
    assert isinstance(model[1], nn.BatchNorm2d)  # nothing was changed before the refusal


def test_per_channel_activation_override_is_refused_naming_the_quantizer():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(PlacementError, match=r"'0\.input_quantizer'.*per-channel"):
        place_quantizers(model, PlacementConfig(), W, A, [Override(match="0", spec=SpecPatch(per_channel=True))],
                         example_input=torch.randn(2, 4))
    assert issubclass(PlacementError, UserError)


def test_batch_size_does_not_change_activation_ranges_shape():
    """Per-tensor activation ranges: a model calibrated at batch 4 evaluates at batch 5 (the old
    per-channel activations used the batch axis and crashed there)."""
    model = quantcore.prepare(nn.Sequential(nn.Linear(4, 3)).eval(), {"model": {"name": "x"}},
                              example_input=torch.randn(4, 4))
    quantcore.calibrate(model, [torch.randn(4, 4)])
    assert quantizers(model)["0.input_quantizer"].amax.numel() == 1
    with torch.no_grad():
        assert model(torch.randn(5, 4)).shape == (5, 3)


# -- found by a new user trying to break it ----------------------------------------------------------
R = {"name": "t", "model": {"name": "x"}, "calibration": {"method": "max"}}


def test_failed_calibration_pass_leaves_no_quantizer_collecting():
    model = quantcore.prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), R,
                              example_input=torch.randn(2, 8))
    with pytest.raises(RuntimeError):
        quantcore.calibrate(model, [torch.randn(2, 8), torch.randn(2, 9)])  # second batch: wrong width
    assert not any(q.calibrating or q.observe for q in quantizers(model).values())


def test_float_child_weight_is_not_taken_for_the_parents_computed_weight():
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 8)
            self.w = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return F.linear(self.head(x), self.w * 2)

    torch.manual_seed(0)
    model = nn.Sequential(Blk()).eval()
    x = torch.randn(2, 8)
    quantcore.prepare(model, {**R, "overrides": [{"match": "0.head", "float": True}]}, example_input=x)
    quantcore.calibrate(model, [x])
    qs = quantizers(model)
    assert "0.head.weight_quantizer" not in qs
    assert torch.allclose(qs["0.weight_quantizer"].amax, (2 * model[0].w).detach().abs().amax(1))  # (4,), not head's
    with torch.no_grad():
        h = model[0].head(x)
    assert torch.allclose(qs["0.input_quantizer"].amax, h.abs().max())


def test_fold_is_checked_on_every_output_not_only_logits():
    from collections import namedtuple

    Out = namedtuple("Out", "logits features")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn(y)
            return Out(z.mean((2, 3)), y)  # y, the conv output, is read twice: not foldable

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    ref = copy.deepcopy(model)
    pl = quantcore.prepare(model, R, example_input=x).quantcore_placement
    assert pl.folded_bn == [] and "bn" in pl.unfolded_bn
    with torch.no_grad():
        assert torch.equal(model(x).features, ref(x).features)


def test_fully_masked_attention_row_is_zero_like_torch():
    from quantcore.placement.intercept import quantized_sdpa

    q = k = v = torch.randn(1, 2, 4, 8)
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    mask[0, :, 2, :] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = quantized_sdpa({}, q, k, v, attn_mask=mask)
    assert torch.allclose(out, ref, atol=1e-6) and bool((out[0, :, 2] == 0).all())


def test_model_input_quantizer_acts_on_keyword_input():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, pixel_values=None):
            return self.fc(self.norm(pixel_values))

    torch.manual_seed(0)
    x = torch.randn(2, 8)
    model = quantcore.prepare(Net().eval(), {**R, "placement": {"quantize_model_input": True}},
                              example_input=x)
    assert "input_quantizer" in model.quantcore_placement.quantizers
    quantcore.calibrate(model, [x])
    with torch.no_grad():
        y = model(pixel_values=x)
        model.input_quantizer.quantize = False
        assert not torch.equal(model(pixel_values=x), y)


def test_data_parallel_calibration_includes_computed_weights():
    torch.manual_seed(0)
    base = nn.Sequential(ScaledLinear(6, 5), nn.ReLU(), StdConv(1, 2, 1)).eval()

    def build():
        m = nn.Sequential(ScaledLinear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
        m.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("2.")}, strict=False)
        return m

    torch.manual_seed(1)
    ref_model = build()
    x = torch.randn(8, 6)
    one = quantcore.prepare(copy.deepcopy(ref_model), R, example_input=x[:2])
    quantcore.calibrate(one, [x])
    states = []
    for shard in (x[:4], x[4:]):
        w = quantcore.prepare(copy.deepcopy(ref_model), R, example_input=x[:2])
        quantcore.collect(w, [shard])
        states.append(quantcore.calibration_state(w))
    merged_model = quantcore.prepare(copy.deepcopy(ref_model), R, example_input=x[:2])
    quantcore.load_calibration_state(merged_model, quantcore.merge_calibration_states(states))
    res = quantcore.finalize(merged_model)
    assert res.uncalibrated == []
    for n, q in quantizers(one).items():
        assert torch.equal(q.amax, quantizers(merged_model)[n].amax), n


def test_tied_weights_are_quantized_at_each_use_and_not_listed_float():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(2, 4)
    res = place_quantizers(Tied().eval(), PlacementConfig(), W, A, example_input=x)
    assert {"a.weight_quantizer", "b.weight_quantizer"} <= set(res.quantizers)
    assert res.float_reasons == {}


def test_load_takes_an_example_input_for_models_that_do_not_take_images(tmp_path):
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 5))
    model = quantcore.prepare(Tok().eval(), {"name": "tok"}, example_input=ids)
    quantcore.calibrate(model, [ids])
    quantcore.save(model, str(tmp_path / "m.qc.pt"))
    back = quantcore.load(str(tmp_path / "m.qc.pt"), model=Tok(), example_input=ids)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_prepared_model_cast_to_another_dtype_still_quantizes(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    model = quantcore.prepare(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval(), R, example_input=x)
    quantcore.calibrate(model, [x])
    with torch.no_grad():
        y32 = model(x)
        y = model.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    assert torch.allclose(y.float(), y32, rtol=0.05, atol=0.05)


class EinsumAttention(nn.Module):
    """softmax(QK^T)V written with einsum (torchvision MaxViT style)."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        dots = torch.einsum("bid,bjd->bij", q, k) * q.shape[-1] ** -0.5
        return torch.einsum("bij,bjd->bid", dots.softmax(dim=-1), v)


def test_einsum_attention_is_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(EinsumAttention()).eval()
    x = torch.randn(2, 5, 8)
    ref = copy.deepcopy(model)
    res = place_quantizers(model, PlacementConfig(), W, A, example_input=x)
    assert res.attention == ["0"] and "0" not in res.float_reasons
    quantcore.calibrate(model, [x])
    qs = quantizers(model)
    with torch.no_grad():
        y = model(x)
        for name in ("0.q_quantizer", "0.k_quantizer", "0.attn_quantizer", "0.v_quantizer"):
            qs[name].quantize = False
            assert not torch.equal(model(x), y), name
            qs[name].quantize = True
        with quantcore.quantization_disabled(model):
            assert torch.equal(model(x), ref(x))


class TransposedAttention(nn.Module):
    """timm LeViT's conv mode: channels-first tokens, ``v @ attn.transpose(-2, -1)``: the
    probabilities are attn@v's second operand, moved by a transpose on the way."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv = nn.Conv1d(d, 3 * d, 1)

    def forward(self, x):  # x: (B, d, N)
        q, k, v = self.qkv(x).chunk(3, dim=1)
        attn = (q.transpose(-2, -1) @ k).softmax(-1)  # (B, N, N)
        return v @ attn.transpose(-2, -1)  # (B, d, N)


def test_probabilities_as_the_second_operand_of_attn_v_are_quantized_as_probabilities():
    """Before: called talking heads, attn_quantizer put on v and v_quantizer on the probabilities (a
    log2 or unsigned softmax override then hit v's negative values)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(TransposedAttention()).eval(), torch.randn(2, 8, 6)
    res = place_quantizers(model, PlacementConfig(), W, A, example_input=x)
    assert res.attention == ["0"] and res.notes == [] and "0" not in res.float_reasons
    quantcore.calibrate(model, [x])
    qs, seen = quantizers(model), {}
    for n in ("attn_quantizer", "v_quantizer"):
        qs[f"0.{n}"].register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, i[0].detach()))
    with torch.no_grad():
        model(x)
        q, k, v = model[0].qkv(x).chunk(3, dim=1)
    assert seen["attn_quantizer"].shape == (2, 6, 6) and float(seen["attn_quantizer"].min()) >= 0
    assert torch.allclose(seen["attn_quantizer"].sum(-1), torch.ones(2, 6), atol=1e-5)  # rows of probabilities
    assert seen["v_quantizer"].shape == v.shape and float(seen["v_quantizer"].min()) < 0
    assert float(qs["0.attn_quantizer"].amax) <= 1.0 + 1e-6  # the probabilities range, not v's


class Gram(nn.Module):
    """Second-order pooling: a channel Gram matrix (an activation x activation matmul, no softmax)."""

    def __init__(self, c=8):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        f = x.flatten(2)
        return x * torch.sigmoid(self.fc((f @ f.transpose(1, 2)).mean(-1) / f.shape[-1]))[..., None, None]


class GlobalContext(nn.Module):
    """GCNet's context block: softmax over positions, then one matmul (no q k^T before it)."""

    def __init__(self, c=8):
        super().__init__()
        self.attn = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        a = self.attn(x).reshape(b, 1, h * w).softmax(-1).unsqueeze(-1)
        return x + (x.reshape(b, 1, c, h * w) @ a).reshape(b, c, 1, 1)


@pytest.mark.parametrize("blocks", [(Gram, GlobalContext), (GlobalContext, GlobalContext)])
def test_attention_is_not_stitched_from_sibling_blocks_under_one_container(blocks):
    """Before: a matmul in one block and softmax+matmul in its sibling made their container an
    'attention' (q/k/attn/v quantizers on a Sequential), or listed the container float while the
    modules whose math stayed float went unnamed. Each block's own float math is named now."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.Sequential(*(b() for b in blocks))),
                        nn.Flatten(), nn.Linear(8 * 64, 5)).eval()
    res = place_quantizers(net, PlacementConfig(), W, A, example_input=torch.randn(2, 3, 8, 8))
    assert res.attention == [] and not any(q.startswith("1.") and q.count(".") == 1 for q in res.quantizers)
    assert set(res.float_reasons) == {"1.0.0", "1.0.1"}, res.float_reasons
    assert all("outside a softmax(QK^T)V pattern" in r for r in res.float_reasons.values())


class Recurrent(nn.Module):
    """Weights multiplied outside F.linear/conv: an LSTM, a GRU, and HF's Conv1D (torch.addmm)."""

    def __init__(self):
        super().__init__()
        self.lstm, self.gru, self.fc = nn.LSTM(8, 8, batch_first=True), nn.GRU(8, 8), nn.Linear(8, 3)
        self.conv1d_weight, self.conv1d_bias = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.zeros(8))

    def forward(self, x):
        y = self.gru(self.lstm(x)[0])[0]
        y = torch.addmm(self.conv1d_bias, y.reshape(-1, 8), self.conv1d_weight).reshape(y.shape)
        return self.fc(y)


def test_weights_multiplied_by_ops_quantcore_does_not_intercept_are_listed_float():
    """Before: LSTM/GRU layers and HF Conv1D projections (35 % of sequencer2d_s's weights) had no
    quantizer and no word in the report."""
    res = place_quantizers(Recurrent().eval(), PlacementConfig(), W, A, example_input=torch.randn(2, 5, 8))
    assert "fc.weight_quantizer" in res.quantizers
    assert "lstm" in res.float_reasons["lstm"] and "weight_ih_l0" in res.float_reasons["lstm"]
    assert "gru" in res.float_reasons["gru"]
    assert "addmm" in res.float_reasons["<model>"] and "conv1d_weight" in res.float_reasons["<model>"]


def test_calibrating_a_model_left_in_train_mode_does_not_change_it():
    """calibrate() runs in eval mode and restores the mode: before, a model in train mode had its
    BatchNorm running statistics updated by the calibration data (the FP32 path then differed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 36, 3))
    x = torch.randn(2, 3, 8, 8)
    recipe = {"model": {"name": "x"}, "placement": {"fold_bn": False}}
    quantcore.prepare(model.eval(), recipe, example_input=x)
    ref = copy.deepcopy(model)
    model.train()
    quantcore.calibrate(model, [(x * 3 + 1, None)])
    assert model.training and model[1].training  # the caller's mode, restored
    assert torch.equal(model[1].running_mean, ref[1].running_mean)
    assert torch.equal(model[1].running_var, ref[1].running_var) and int(model[1].num_batches_tracked) == 0
    model.eval()
    with torch.no_grad(), quantcore.quantization_disabled(model), quantcore.quantization_disabled(ref):
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("fused", [True, False])
def test_attention_dropout_in_training_keeps_its_expectation(fused):
    """Probabilities are quantized before dropout's 1/(1-p) rescale: in train mode the expected
    attention output equals the eval one (quantizing after the rescale clipped it to ~0.6x)."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, num_classes=4,
                          attn_drop_rate=0.5).eval()
    m.blocks[0].attn.fused_attn = fused
    x = torch.randn(2, 3, 16, 16)
    quantcore.prepare(m, R, example_input=x)
    quantcore.calibrate(m, [x])
    attn, h = m.blocks[0].attn, torch.randn(2, 5, 192)
    with torch.no_grad():
        ev = attn.eval()(h)
        attn.train()
        torch.manual_seed(1)
        mean = torch.stack([attn(h) for _ in range(400)]).mean(0)
    ratio = float(mean.norm() / ev.norm())
    assert 0.9 < ratio < 1.1, ratio


class RoutedConv(nn.Module):
    """CondConv-style: each image's kernel is a mixture of experts chosen from that image (timm
    CondConv2d computes it the same way and runs one grouped conv over the batch)."""

    def __init__(self, cin=3, cout=8, experts=4):
        super().__init__()
        self.route = nn.Linear(cin, experts)
        self.experts = nn.Parameter(torch.randn(experts, cout * cin * 9) * 0.2)
        self.cin, self.cout = cin, cout

    def forward(self, x):
        b = x.shape[0]
        r = torch.sigmoid(self.route(x.mean((2, 3))))
        w = (r @ self.experts).view(b * self.cout, self.cin, 3, 3)  # (batch x out) kernels
        y = F.conv2d(x.reshape(1, b * self.cin, *x.shape[2:]), w, padding=1, groups=b)
        return y.view(b, self.cout, *x.shape[2:]).mean((2, 3))


def test_a_weight_computed_from_the_input_stays_float_and_says_so():
    """A routed kernel's range would be one per position of the calibration batch, sized by it and
    taken from its last batch: a batch of another size crashed and an image's output depended on its
    position in the batch. Kept float with the reason; a weight computed from parameters only
    (weight standardization) is still quantized."""
    torch.manual_seed(0)
    model = nn.Sequential(RoutedConv(), nn.Unflatten(1, (8, 1, 1)), StdConv(8, 4, 1)).eval()
    ref = copy.deepcopy(model)
    q = quantcore.prepare(model, R, example_input=torch.randn(2, 3, 8, 8))
    reasons = q.quantcore_placement.float_reasons
    assert "computed from the input" in reasons.get("0", ""), reasons
    assert "2.weight_quantizer" in quantizers(q) and "2" not in reasons
    assert "0.weight_quantizer" not in quantizers(q) and "0.input_quantizer" not in quantizers(q)
    g = torch.Generator().manual_seed(1)
    quantcore.calibrate(q, [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)])
    x = torch.randn(3, 3, 8, 8, generator=g)  # another batch size than calibration's
    with torch.no_grad():
        out = q(x)
        perm = torch.tensor([2, 0, 1])
        assert torch.equal(q(x[perm]), out[perm])  # an image's output does not depend on its position
        with quantcore.quantization_disabled(q):
            assert torch.allclose(q(x), ref(x), atol=1e-6)
    assert quantizers(q)["2.weight_quantizer"].active


class _PaddedMHA(nn.Module):
    def __init__(self, need_weights):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)
        self.need_weights = need_weights

    def forward(self, x):
        t = self.embed(x)
        pad = torch.zeros(t.shape[:2], dtype=torch.bool)
        pad[:, -3:] = True  # the last 3 tokens are padding
        y, _ = self.attn(t, t, t, key_padding_mask=pad, need_weights=self.need_weights)
        return self.head(y.mean(1))


def test_attention_mask_added_inside_baddbmm_is_not_quantized_with_the_logits():
    """nn.MultiheadAttention with need_weights=True (its default) and a mask computes
    baddbmm(mask, q, k^T): the -inf of masked keys sat inside the GEMM output the softmax-input
    quantizer calibrates on (a crash). The logits are quantized and the mask added after, as on the
    fused path (need_weights=False): both calibrate the same range."""
    recipe = {**R, "placement": {"family": "vit", "mode": "ft2"}}
    torch.manual_seed(0)
    base = _PaddedMHA(True).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 10, 12, generator=g) for _ in range(2)]
    amax = {}
    for need in (True, False):
        m = copy.deepcopy(base)
        m.need_weights = need
        q = quantcore.prepare(m, recipe, example_input=data[0])
        quantcore.calibrate(q, data)
        sq = quantizers(q)["attn.softmax_input_quantizer"]
        assert sq.active and bool(torch.isfinite(sq.amax).all())
        amax[need] = sq.amax
        x = torch.randn(3, 10, 12, generator=g)
        with torch.no_grad():
            ref, out = base(x), q(x)
            with quantcore.quantization_disabled(q):
                assert torch.allclose(q(x), ref, atol=1e-6)
            assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert torch.equal(amax[True], amax[False])


class _FlexAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        from torch.nn.attention.flex_attention import flex_attention

        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return self.proj(flex_attention(q, k, v).transpose(1, 2).reshape(b, n, 16))


def test_attention_computed_by_flex_attention_is_listed_float_not_skipped_silently():
    """flex_attention (HF attn_implementation='flex_attention') runs q@k^T and attn@v inside a kernel
    quantcore does not intercept: they stay float, and the report says so; a ViT placement names it."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(_FlexAttention(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention outside torch.compile warns it is slow
        q = quantcore.prepare(copy.deepcopy(model), R, example_input=x)
        assert "flex_attention" in q.quantcore_placement.float_reasons.get("0", ""), \
            q.quantcore_placement.float_reasons
        assert "0.qkv.input_quantizer" in quantizers(q)  # its projections are still quantized
        with pytest.raises(PlacementError, match="flex_attention"):
            quantcore.prepare(copy.deepcopy(model), {**R, "placement": {"family": "vit", "mode": "ft2"}},
                              example_input=x)


def test_keeping_a_folded_batchnorm_float_is_refused_not_ignored():
    """``float: true`` on a BatchNorm that folding merged into its conv matched the Identity left in
    its place and did nothing; the conv stayed quantized. A rule matching conv and BN both is fine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(PlacementError, match=r"overrides\[0\] '1'.*folded into the conv '0'"):
        quantcore.prepare(copy.deepcopy(model), {**R, "placement": {"family": "cnn"},
                                                 "overrides": [{"match": "1", "float": True}]}, example_input=x)
    q = quantcore.prepare(copy.deepcopy(model), {**R, "placement": {"family": "cnn"},
                                                 "overrides": [{"match": "[01]", "float": True}]}, example_input=x)
    assert "0.weight_quantizer" not in quantizers(q) and "3.weight_quantizer" in quantizers(q)


class _KernelBy(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.kernel = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.b = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        if self.how == "convolution":
            y = torch.convolution(x, self.kernel, self.b, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
        elif self.how == "conv2d":
            y = torch.ops.aten.conv2d(x, self.kernel, self.b)
        else:  # a transposed view of the parameter: x @ W^T + b
            return torch.addmm(self.b, x.mean((2, 3)).repeat(1, 9), self.kernel.flatten(1).t())
        return y.mean((2, 3))


@pytest.mark.parametrize("how", ["convolution", "conv2d", "addmm"])
def test_a_weight_run_by_a_lower_level_op_or_through_a_view_is_listed_float(how):
    """torch.convolution / torch.ops.aten.conv2d (below F.conv2d) and addmm with ``weight.t()`` ran a
    parameter quantcore does not quantize without a word: no quantizer, no float reason."""
    torch.manual_seed(0)
    model = nn.Sequential(_KernelBy(how), nn.Linear(8, 4)).eval()
    q = quantcore.prepare(model, R, example_input=torch.randn(2, 3, 8, 8))
    reason = q.quantcore_placement.float_reasons.get("0", "")
    assert f"used by {how}" in reason and "kernel" in reason, q.quantcore_placement.float_reasons
    assert "1.weight_quantizer" in quantizers(q)


class _DilatedBranch(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.__dict__["conv"] = conv  # shares the kernel, does not own it (TridentNet)

    def forward(self, x):
        return F.conv2d(x, self.conv.weight, self.conv.bias, 1, 2, 2)


def test_a_weight_reused_by_a_sibling_names_the_float_op_not_the_quantized_owner():
    """The report said the owner 'c' was float while its own conv was quantized, and said nothing
    about the branch that really ran float."""
    torch.manual_seed(0)
    model = nn.Module()
    model.c = nn.Conv2d(3, 8, 3, padding=1)
    model.b2 = _DilatedBranch(model.c)
    model.forward = lambda x: (model.c(x) + model.b2(x)).mean((2, 3))
    q = quantcore.prepare(model.eval(), R, example_input=torch.randn(2, 3, 8, 8))
    reasons = q.quantcore_placement.float_reasons
    assert "c" not in reasons and "'c.weight'" in reasons.get("b2", ""), reasons
    assert quantizers(q)["c.weight_quantizer"] is not None


def test_functional_call_with_swapped_parameters_quantizes_the_tensors_it_is_given():
    """torch.func.functional_call (ensembles, meta-learning) swaps parameters for plain tensors: the
    placement hook crashed ('weight is not an nn.Parameter'). The swapped weights are quantized as the
    module's own would be."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    q = quantcore.prepare(model, R, example_input=torch.randn(2, 6))
    x = torch.randn(4, 6)
    quantcore.calibrate(q, [x])
    params = {k: v.detach().clone() for k, v in q.named_parameters()}
    with torch.no_grad():
        assert torch.equal(functional_call(q, params, (x,)), q(x))
        params["2.weight"] = params["2.weight"] * 0.5
        halved = functional_call(q, params, (x,))
        assert not torch.equal(halved, q(x))  # the swapped tensor is the one used


class _LoRAMerged(nn.Linear):
    """LoRA merged on the fly: F.linear(x, W + B @ A)."""

    def __init__(self, i, o, r=4):
        super().__init__(i, o)
        self.A = nn.Parameter(torch.randn(r, i) * 0.3)
        self.B = nn.Parameter(torch.randn(o, r) * 0.3)

    def forward(self, x):
        return F.linear(x, self.weight + self.B @ self.A, self.bias)


class _ParamMatmul(nn.Module):
    """x @ W: a parameter used by a matmul on data (not quantized)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(16, 16) * 0.3)

    def forward(self, x):
        return x @ self.proj


def test_a_weight_merged_from_parameters_is_quantized_as_one_and_not_listed_float():
    """B @ A merged into the weight F.linear receives is a weight computation: the linear's weight
    quantizer quantizes the merged weight (checked against fake-quantizing W + B A by hand), so B is
    not listed float "used by a matmul" (it was); a parameter multiplied with data still is."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), _LoRAMerged(48, 16), _ParamMatmul(), nn.Linear(16, 10)).eval()
    x = torch.randn(4, 3, 4, 4)
    m = quantcore.prepare(copy.deepcopy(net), {"version": 1, "name": "t", "placement": {"family": "generic"},
                                               "quant": {"weights": {"bits": 4, "per_channel": True},
                                                         "activations": {"bits": 8}}},
                          example_input=x[:1])
    reasons = m.quantcore_placement.float_reasons
    assert not any(k.startswith("1.") or k == "1" for k in reasons), reasons
    assert "2.proj" in reasons and "matmul" in reasons["2.proj"]
    quantcore.calibrate(m, [x])
    wq = quantizers(m)["1.weight_quantizer"]
    merged = (net[1].weight + net[1].B @ net[1].A).detach()
    amax = merged.abs().amax(1, keepdim=True)
    scale = amax / 7
    ref = (merged / scale).round().clamp(-8, 7) * scale
    got = []
    h = wq.register_forward_hook(lambda mod, a, o: got.append(o.detach()))
    with torch.no_grad():
        m(x)
    h.remove()
    assert len(got) == 1 and torch.allclose(got[0], ref, atol=1e-6)


# -- a module running its own weight and a computed one (helper break pass) ---------------------------
class LoRALinear(_LoRAMerged):
    """LoRA written as a second F.linear on the merged low-rank delta, after the layer's own."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + 2.0 * F.linear(x, self.B @ self.A)


class DeltaFirstConv(nn.Conv2d):
    """The computed-weight conv first, then the module's own."""

    def __init__(self):
        super().__init__(3, 4, 3, padding=1)
        self.delta = nn.Parameter(torch.randn_like(self.weight))

    def forward(self, x):
        return F.conv2d(x, self.weight + self.delta, None, 1, 1) + super().forward(x)


def _fq(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    s = amax / 127
    return torch.clamp(torch.round(x / s), -128, 127) * s


@pytest.mark.parametrize("which", ["param_first", "computed_first"])
def test_a_second_weighted_op_on_another_weight_is_listed_float_and_runs_float(which):
    """One module, two F.linear/conv ops: one on its parameter, one on a computed weight. They shared one
    site: the second op silently ran float (no quantizer, nothing listed), or the computed weight took
    the quantizer the parameter was listed under. The second op is now listed float with the reason, and
    the output is the hand-made one with exactly that op float."""
    torch.manual_seed(0)
    if which == "param_first":
        m, x = nn.Sequential(LoRALinear(32, 16)).eval(), torch.randn(8, 32)
    else:
        m, x = nn.Sequential(DeltaFirstConv()).eval(), torch.randn(2, 3, 8, 8)
    layer = copy.deepcopy(m[0])
    quantcore.prepare(m, {"name": "t", "placement": {"family": "generic"},
                          "quant": {"weights": {"calibrator": "max", "per_channel": True},
                                    "activations": {"calibrator": "max"}}}, example_input=x)
    quantcore.calibrate(m, [x])
    reasons = m.quantcore_placement.float_reasons
    listed = [k for k in reasons if k.startswith("0 (")]
    assert len(listed) == 1 and "stays float" in reasons[listed[0]], reasons
    assert ("computed weight" in listed[0]) == (which == "param_first")
    with torch.no_grad():
        xq = _fq(x, x.abs().max())
        if which == "param_first":
            w = layer.weight
            want = F.linear(xq, _fq(w, w.abs().amax(1, keepdim=True)), layer.bias) + 2.0 * F.linear(x, layer.B @ layer.A)
        else:
            w = layer.weight + layer.delta
            want = (F.conv2d(xq, _fq(w, w.abs().amax((1, 2, 3), keepdim=True)), None, 1, 1)
                    + F.conv2d(x, layer.weight, layer.bias, 1, 1))
        assert torch.allclose(m(x), want, atol=1e-5)


def test_torchscript_is_refused_naming_the_module():
    """A torch.jit.trace'd model was "prepared" with no quantizer and no float reason (its ops run in a
    TorchScript graph), and calibrated: the "quantized" model was the FP32 one."""
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    recipe = {"name": "t", "placement": {"family": "generic"}}
    with pytest.raises(PlacementError, match=r"the model is TorchScript"):
        quantcore.prepare(torch.jit.trace(copy.deepcopy(base), x), recipe, example_input=x)
    with pytest.raises(PlacementError, match=r"module '0' is TorchScript"):
        quantcore.prepare(nn.Sequential(torch.jit.script(copy.deepcopy(base)), nn.Flatten()), recipe, example_input=x)


@pytest.mark.parametrize("kind", ["orthogonal", "spectral_norm", "weight_norm"])
def test_a_parametrized_weight_is_quantized_and_its_parametrization_is_named_for_what_it_is(kind):
    """torch.nn.utils.parametrize layers: the layer is quantized on the weight its parametrization
    produces, and the parametrization's own ops (matmuls, mv) were listed float as 'matmul outside
    attention' / 'used by mv', which read as if part of the layer stayed float."""
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    fc = getattr(P, kind)(nn.Linear(16, 16))
    model = nn.Sequential(fc, nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(8, 16)
    with torch.no_grad():
        ref = model(x)
    res = place_quantizers(model, PlacementConfig(), W, A, example_input=x)
    assert {"0.input_quantizer", "0.weight_quantizer"} <= set(res.quantizers)
    about = {n: r for n, r in res.float_reasons.items() if n.startswith("0.")}
    assert all(n.startswith("0.parametrizations.weight") and r.startswith("computes 0.weight (a torch.nn.utils."
               "parametrize parametrization); the weight it produces is quantized by 0's weight quantizer")
               for n, r in about.items()), about
    quantcore.calibrate(model, [x])
    qs = quantizers(model)
    with torch.no_grad():
        w = fc.weight  # what the parametrization produces: its per-channel max is the calibrated range
        assert torch.allclose(qs["0.weight_quantizer"].amax.flatten(), w.abs().amax(1), rtol=1e-6)
        assert not torch.equal(model(x), ref)
        with quantcore.quantization_disabled(model):
            assert torch.allclose(model(x), ref, atol=1e-6)


def _fq_row(x: torch.Tensor, row: dict) -> torch.Tensor:
    """``x`` fake-quantized with one encodings.json row (per tensor or per channel), by torch's ops."""
    sc, zp = row["scale"], row["zero_point"]
    if isinstance(sc, list):
        return torch.fake_quantize_per_channel_affine(x, torch.tensor(sc), torch.tensor(zp, dtype=torch.int32),
                                                      row["axis"] % x.dim(), row["quant_min"], row["quant_max"])
    return torch.fake_quantize_per_tensor_affine(x, float(sc), int(zp), row["quant_min"], row["quant_max"])


def test_parameters_named_x_and_x_weight_each_get_their_own_quantizers():
    """``gate`` and ``gate_weight`` both mapped to the quantizer prefix ``gate_``: one site, so the
    F.linear on ``gate`` ran float while the tables listed it quantized and no float reason was given."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_weight = nn.Parameter(torch.randn(16, 16) * 0.3)
            self.gate = nn.Parameter(torch.randn(16, 16) * 0.3)

        def forward(self, x):
            return F.linear(x, self.gate_weight) * torch.sigmoid(F.linear(x, self.gate))

    torch.manual_seed(0)
    m = nn.Sequential(Gated(), nn.Linear(16, 4)).eval()
    ref = copy.deepcopy(m)
    x = torch.randn(32, 16)
    quantcore.prepare(m, {"name": "t", "placement": {"family": "generic"}}, example_input=x[:2])
    quantcore.calibrate(m, [x])
    assert m.quantcore_placement.float_reasons == {}
    e = {r["name"]: r for r in quantcore.encodings(m)["quantizers"]}
    g = ref[0]
    h = (F.linear(_fq_row(x, e["0.gate_weight_input_quantizer"]), _fq_row(g.gate_weight, e["0.gate_weight_weight_quantizer"]))
         * torch.sigmoid(F.linear(_fq_row(x, e["0.gate_input_quantizer"]), _fq_row(g.gate, e["0.gate_weight_quantizer"]))))
    want = F.linear(_fq_row(h, e["1.input_quantizer"]), _fq_row(ref[1].weight, e["1.weight_quantizer"]), ref[1].bias)
    with torch.no_grad():
        torch.testing.assert_close(m(x), want.detach(), rtol=1e-5, atol=1e-6)


def test_a_model_that_is_itself_a_layer_with_a_model_input_quantizer_is_refused():
    """An nn.Linear subclass as the whole model, with quantize_model_input: its own input_quantizer and
    the model-input quantizer were one module, calibrated on both tensors (one row in the tables)."""

    class Probe(nn.Linear):
        def forward(self, x):
            return super().forward(torch.tanh(x.flatten(1)) * 3)

    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(PlacementError, match="itself a quantized layer.*Wrap the model in a container"):
        quantcore.prepare(Probe(12, 4).eval(), {"name": "t", "placement": {"family": "generic",
                                                                             "quantize_model_input": True}},
                          example_input=x)
    wrapped = nn.Sequential(Probe(12, 4)).eval()
    quantcore.prepare(wrapped, {"name": "t", "placement": {"family": "generic", "quantize_model_input": True}},
                      example_input=x)
    assert {"input_quantizer", "0.input_quantizer"} <= set(quantizers(wrapped))
