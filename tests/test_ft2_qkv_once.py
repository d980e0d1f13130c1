"""ft2: the GEMM that produces q/k/v writes one int8 tensor with one scale (FasterTransformer's fused
QKV GEMM feeds it straight to the attention kernel). Its output quantizer and the q/k/v quantizers
quantize the same values, so they are one share group: with two ranges the values were rounded twice
(0.5 dB of logit SQNR on the demo ViT), which no deployed ft2 kernel does."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from quantcore import api
from quantcore.placement import quantizers
from quantcore.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe():
    d = load_recipe("fmnist_w8a8_ft2").model_dump(mode="json")
    d["model"] = {"name": "test/model"}
    d["overrides"] = []
    d["calibration"].update(num_batches=2, batch_size=4)
    return load_recipe(d)


def _hf(impl):
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=5, attn_implementation=impl)
    return ViTForImageClassification(cfg)


def _timm():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)


def _tv():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5)


BUILD = {"timm": _timm, "hf-eager": lambda: _hf("eager"), "hf-sdpa": lambda: _hf("sdpa"), "torchvision": _tv}
# each model's GEMM output quantizer(s) that produce q/k/v, in the first block
PRODUCERS = {"timm": ["blocks.0.attn.qkv.output_quantizer"],
             "hf-eager": [f"vit.layers.0.attention.{p}_proj.output_quantizer" for p in "qkv"],
             "hf-sdpa": [f"vit.layers.0.attention.{p}_proj.output_quantizer" for p in "qkv"],
             "torchvision": ["encoder.layers.encoder_layer_0.self_attention.in_proj_output_quantizer"]}


def _calibrated(model):
    torch.manual_seed(0)
    model = api.prepare(model.eval(), _recipe(), example_input=torch.randn(1, 3, 32, 32))
    api.calibrate(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    return model


@pytest.mark.parametrize("key", list(BUILD))
def test_qkv_gemm_output_is_quantized_once(key):
    torch.manual_seed(0)
    model = _calibrated(BUILD[key]())
    groups = model.quantcore_placement.share_groups
    first = next(g for g in groups if any(n.endswith("q_quantizer") for n in g[:1]))
    assert [n for n in first if "output_quantizer" in n] == PRODUCERS[key]
    qs = quantizers(model)
    for g in groups:  # one range per group
        assert all(torch.equal(qs[n].amax, qs[g[0]].amax) and torch.equal(qs[n].amin, qs[g[0]].amin) for n in g)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        out = getattr(out, "logits", out)
        for n, q in qs.items():  # the q/k/v quantizers see values already on their grid: they change nothing
            if n.rpartition(".")[2] in ("q_quantizer", "k_quantizer", "v_quantizer"):
                q.quantize = False
        once = model(x)
        once = getattr(once, "logits", once)
    assert torch.equal(out, once)


def test_timm_explicit_attention_shares_what_reaches_k_and_v():
    """timm's non-fused path scales q before q@k^T: k and v still come from the qkv GEMM as they are,
    so its output quantizer joins the group (one range, one rounding for k and v)."""
    torch.manual_seed(0)
    m = _timm()
    for b in m.blocks:
        b.attn.fused_attn = False
    model = _calibrated(m)
    g = model.quantcore_placement.share_groups[0]
    assert g[-1] == "blocks.0.attn.qkv.output_quantizer"


class _Transformed(nn.Module):
    """q/k/v computed from Linear outputs by a nonlinearity: not the GEMM's values, so not shared."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, 8)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        q, k, v = (torch.tanh(f(t)) for f in (self.q, self.k, self.v))
        return self.head(torch.nn.functional.scaled_dot_product_attention(q, k, v).mean(1))


def test_transformed_qkv_keeps_its_own_gemm_output_ranges():
    torch.manual_seed(0)
    d = _recipe().model_dump(mode="json")
    d["placement"]["family"] = "generic"
    model = api.prepare(_Transformed().eval(), load_recipe(d), example_input=torch.randn(1, 3, 32, 32))
    # tanh(q), tanh(k), tanh(v) are none of them a GEMM output: each keeps its own range (said in a note)
    assert model.quantcore_placement.share_groups == []
    assert any("keeps a range of its own" in n for n in model.quantcore_placement.notes)


@pytest.mark.parametrize("layer_scale", [None, 1e-5])
def test_residual_branch_reads_the_gemm_output_rounded_once(layer_scale):
    """ft2 + quantize_residual: the residual add's branch input is the proj/fc2 GEMM output as it is
    (no LayerScale): one range with that GEMM's output quantizer. With LayerScale the values differ
    (scaled), so each keeps its own range."""
    torch.manual_seed(0)
    d = _recipe().model_dump(mode="json")
    d["placement"]["quantize_residual"] = True
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5,
                          init_values=layer_scale).eval()
    model = api.prepare(m, load_recipe(d), example_input=torch.randn(1, 3, 32, 32))
    api.calibrate(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    groups = [sorted(g) for g in model.quantcore_placement.share_groups]
    pairs = [sorted([f"blocks.{b}.{o}.output_quantizer", f"blocks.{b}.branch{i}_quantizer"])
             for b in range(2) for i, o in ((1, "attn.proj"), (2, "mlp.fc2"))]
    qs = quantizers(model)
    if layer_scale is not None:
        assert not any(p in groups for p in pairs)
        return
    assert all(p in groups for p in pairs)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        for b in range(2):
            for i in (1, 2):
                qs[f"blocks.{b}.branch{i}_quantizer"].quantize = False
        assert torch.equal(out, model(x))


class _Mutated(_Transformed):
    """q's GEMM output written in place through an alias after a view was taken (the view reaching
    sdpa sees the new values), k through a lossy cast: neither GEMM output quantizer is q's/k's."""

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        q = self.q(t)
        qh = q.view(q.shape[0], q.shape[1], 2, 8).transpose(1, 2)
        q.view(-1).mul_(0.5)  # another alias of the same storage
        k = self.k(t).half().float().view(q.shape[0], q.shape[1], 2, 8).transpose(1, 2)
        v = self.v(t).view(q.shape[0], q.shape[1], 2, 8).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(qh, k, v)
        return self.head(o.mean((1, 2)).repeat(1, 2))


def test_values_changed_in_place_or_by_a_lossy_cast_are_not_the_gemm_output():
    d = _recipe().model_dump(mode="json")
    d["placement"]["family"] = "vit"
    torch.manual_seed(0)
    model = api.prepare(_Mutated().eval(), load_recipe(d), example_input=torch.randn(1, 3, 32, 32))
    (g,) = model.quantcore_placement.share_groups
    assert [n for n in g if "output_quantizer" in n] == ["v.output_quantizer"]


def test_talking_heads_probabilities_are_not_v():
    """CaiT mixes the probabilities across heads with a Linear (proj_w) before attn@v: that Linear's
    output is attn@v's other operand, not v."""
    torch.manual_seed(0)
    m = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, depth=1, depth_token_only=1,
                          num_classes=5)
    model = api.prepare(m.eval(), _recipe(), example_input=torch.randn(1, 3, 32, 32))
    g = model.quantcore_placement.share_groups[0]
    # CaiT scales q before q@k^T: q holds other values than the qkv GEMM output and keeps its own range
    assert g == [f"blocks.0.attn.{q}" for q in ("k_quantizer", "v_quantizer", "qkv.output_quantizer")]


@pytest.mark.parametrize("off", [{"enabled": False}, {"spec": {"format": "fp16"}}])
def test_member_left_float_does_not_widen_the_shared_grid(off):
    """A share-group member the recipe leaves float (``enabled: false`` or a float cast: what the
    mixed-precision search writes) passes float values: the other members' common range is the union of
    *their* ranges only (the search measured it so, and the deployed kernel reads no int8 k). Reference:
    each member's own range from the same statistics, with the share groups removed."""
    import copy

    d = _recipe().model_dump(mode="json")
    torch.manual_seed(1)
    fp32 = _timm().eval()
    own = _calibrated(copy.deepcopy(fp32))
    own.quantcore_placement.share_groups = []
    api.finalize(own)
    pre = "blocks.0.attn."
    names = [pre + "qkv.output_quantizer", pre + "q_quantizer", pre + "k_quantizer", pre + "v_quantizer"]
    rng = {n: float(quantizers(own)[n].amax.max()) for n in names}
    widest = max(names, key=rng.get)  # leaving the widest member float must narrow the others' grid
    rest = [n for n in names if n != widest]
    assert rng[widest] > max(rng[n] for n in rest)
    d["overrides"] = [{"match": widest, **off}]
    torch.manual_seed(0)  # as _calibrated: the same calibration images
    m = api.prepare(fp32, load_recipe(d), example_input=torch.randn(1, 3, 32, 32))
    api.calibrate(m, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    qs = quantizers(m)
    for n in rest:
        assert float(qs[n].amax.max()) == pytest.approx(max(rng[k] for k in rest), rel=1e-6), n
    from quantcore.encoding_table import quantizer_rows

    rows = {r["name"]: r for r in quantizer_rows(m)}
    assert sorted(rows[rest[0]]["shared_with"]) == sorted(rest[1:]) and "shared_with" not in rows[widest]
