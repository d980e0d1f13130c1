"""RepQ-ViT post-LayerNorm reparameterization (quantcore.transforms.reparam): the float function is
kept (timm ViT and a Hugging Face ViT built from a config), the per-channel ranges of every folded
LayerNorm output become equal, the folded parameters match a numpy reference of RepQ-ViT's formulas,
unsupported layouts are refused naming the module, and the recipe switch survives save/load."""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import quantcore
from quantcore.demo import SHIPPED_FP32 as CHECKPOINT  # the trained demo ViT shipped with quantcore
from quantcore.errors import PlacementError
from quantcore.recipe import recipe_from_dict
from quantcore.transforms import collect_channel_ranges, find_layernorm_pairs, reparam_layernorm

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _fmnist(n: int) -> torch.Tensor:
    if not FMNIST.is_file():
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST}")
    with gzip.open(FMNIST, "rb") as f:
        raw = f.read()
    x = np.frombuffer(raw, dtype=np.uint8, offset=16)[: n * 784].reshape(n, 1, 28, 28)
    return (torch.from_numpy(x.astype(np.float32)) / 255.0 - 0.2860) / 0.3530


def _structured(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Photo-like RGB images: smooth gradients, gratings and discs (not noise)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        p = torch.rand(8, generator=g)
        grad = p[0] * xx + p[1] * yy
        grating = torch.sin(6 * math.pi * p[2] * (xx * torch.cos(p[3] * 3) + yy * torch.sin(p[3] * 3)))
        disc = (((xx - p[4] + 0.5) ** 2 + (yy - p[5] + 0.5) ** 2) < 0.2 * p[6]).float()
        img = torch.stack([grad + 0.3 * grating, disc - 0.5 * grad, 0.5 * grating + disc * p[7]])
        out.append(img)
    return torch.stack(out)


def _demo_model() -> nn.Module:
    from quantcore.models import vit_fmnist

    torch.manual_seed(0)
    m = vit_fmnist()
    m.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return m.eval()


def _hf_vit(kind: str = "vit") -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg_cls, model_cls = {"vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
                          "deit": (transformers.DeiTConfig, transformers.DeiTForImageClassification)}[kind]
    cfg = cfg_cls(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=96, num_labels=5)
    torch.manual_seed(0)
    m = model_cls(cfg).eval()
    with torch.no_grad():  # give the LayerNorms uneven per-channel affines, as trained models have
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.mul_(torch.rand_like(mod.weight) * 3 + 0.2)
                mod.bias.add_(torch.randn_like(mod.bias) * 0.5)
    return m


def _logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = m(x)
    return y.logits if hasattr(y, "logits") else y


def _check_preserved_and_equalized(m: nn.Module, x: torch.Tensor, n_pairs: int, n_consumers: int) -> None:
    y0 = _logits(m, x)
    pairs, _ = find_layernorm_pairs(m)
    assert len(pairs) == n_pairs and all(len(p.consumers) == n_consumers[i % 2] for i, p in enumerate(pairs))
    before, _, _ = collect_channel_ranges(m, pairs, [x])
    res = reparam_layernorm(m, [x[: len(x) // 2], x[len(x) // 2:]])
    assert res.images == len(x) and len(res.pairs) == n_pairs
    y1 = _logits(m, x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5 * float(y0.abs().max()))
    pairs, _ = find_layernorm_pairs(m)
    after, _, _ = collect_channel_ranges(m, pairs, [x])
    for name, st in after.items():
        width = float((st.max - st.min).mean())
        b = before[name]
        assert float(((b.max - b.min).max() / (b.max - b.min).min())) > 1.2  # there was something to equalize
        # every channel now spans the same range (the point of the transform)
        assert float((st.min - st.min.mean()).abs().max()) < 1e-4 * width, name
        assert float((st.max - st.max.mean()).abs().max()) < 1e-4 * width, name


def test_timm_demo_vit_preserves_outputs_and_equalizes_ranges():
    x = _fmnist(128)
    _check_preserved_and_equalized(_demo_model(), x, 8, (1, 1))


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_hf_vit_preserves_outputs_and_equalizes_ranges(kind):
    m = _hf_vit(kind)
    _check_preserved_and_equalized(m, _structured(64), 4, (3, 1))  # q/k/v: three consumers


def test_fold_matches_numpy_reference_of_repq_vit():
    """RepQ-ViT's test_quant.py formulas (per-channel delta/zero point -> mean targets), in numpy."""
    m = _demo_model()
    x = _fmnist(64)
    pairs, _ = find_layernorm_pairs(m)
    p = pairs[0]
    st, _, _ = collect_channel_ranges(m, pairs, [x])
    lo, hi = st[p.norm_name].min.double().numpy(), st[p.norm_name].max.double().numpy()
    g, be = p.norm.weight.detach().double().numpy(), p.norm.bias.detach().double().numpy()
    w, bias = p.consumers[0].weight.detach().double().numpy(), p.consumers[0].bias.detach().double().numpy()
    bits = 4  # cancels; any value gives the same fold
    delta = (hi - lo) / (2**bits - 1)
    zp = -lo / delta
    t_delta, t_zp = delta.mean(), zp.mean()
    r = delta / t_delta
    b = (-zp * delta) / r - (-t_zp * t_delta)
    g_ref, be_ref = g / r, be / r - b
    w_ref = w * r[None, :]
    bias_ref = bias + w_ref @ b
    reparam_layernorm(m, [x])
    np.testing.assert_allclose(p.norm.weight.detach().numpy(), g_ref, rtol=1e-5)
    np.testing.assert_allclose(p.norm.bias.detach().numpy(), be_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pairs[0].consumers[0].weight.detach().numpy(), w_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pairs[0].consumers[0].bias.detach().numpy(), bias_ref, rtol=1e-5, atol=1e-6)


def test_unsupported_layouts_are_refused_naming_the_module():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.ln(x))

    with pytest.raises(PlacementError, match=r"reparam_layernorm: Plain has no LayerNorm -> Linear.*'ln'"):
        find_layernorm_pairs(Plain())
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2, qkv_bias=False,
                          num_classes=3)
    with pytest.raises(PlacementError, match=r"'blocks\.0\.attn\.qkv'.*bias"):
        find_layernorm_pairs(m)


def test_recipe_switch_calibrate_save_load(tmp_path):
    x = _fmnist(192)
    r = recipe_from_dict({"name": "reparam_test", "model": {"name": "quantcore/vit_fmnist"},
                          "placement": {"family": "vit", "mode": "ft1", "reparam_layernorm": True},
                          "quant": {"weights": {"bits": 4}, "activations": {"bits": 4, "symmetric": False}},
                          "calibration": {"method": "mse", "weights_method": "mse"}})
    fp32 = _demo_model()
    y_fp = _logits(fp32, x[128:])
    m = quantcore.prepare(_demo_model(), r)
    quantcore.calibrate(m, iter([x[:64], x[64:128]]))  # a one-shot iterator feeds both passes
    assert len(m.quantcore_reparam.pairs) == 8 and m.quantcore_reparam.images == 128
    qs = quantcore.placement.quantizers(m)
    assert qs["blocks.0.attn.qkv.input_quantizer"].amax.numel() == 1  # per tensor after the fold
    with quantcore.api.quantization_disabled(m):
        torch.testing.assert_close(_logits(m, x[128:]), y_fp, rtol=1e-5, atol=1e-5 * float(y_fp.abs().max()))
    y = _logits(m, x[128:])
    uri = str(tmp_path / "r.qc.pt")
    quantcore.save(m, uri)
    m2 = quantcore.load(uri)
    assert torch.equal(_logits(m2, x[128:]), y)
    assert torch.equal(m2.blocks[0].norm1.weight, m.blocks[0].norm1.weight)


class _GatedLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass with a forward of its own (zero-centred gamma: ``norm(x) * (1 + weight)``)."""

    def forward(self, x):
        return nn.functional.layer_norm(x, self.normalized_shape, 1 + self.weight, self.bias, self.eps)


class _LoRALinear(nn.Linear):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.lora_a = nn.Linear(self.in_features, 4, bias=False)
        self.lora_b = nn.Linear(4, self.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.2)

    def forward(self, x):
        return super().forward(x) + self.lora_b(self.lora_a(x))


def _small_timm_vit(variant: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import Attention, VisionTransformer

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    if variant == "own_norm":
        kw["norm_layer"] = _GatedLayerNorm
    m = VisionTransformer(**kw)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
    for b in m.blocks:
        if variant == "lora":
            lora = _LoRALinear(b.mlp.fc1.in_features, b.mlp.fc1.out_features)
            lora.load_state_dict(b.mlp.fc1.state_dict(), strict=False)
            b.mlp.fc1 = lora
        if variant == "gated":  # timm's own option: attn.gate reads norm1's output as well as attn.qkv
            b.attn = Attention(32, 2, qkv_bias=True, gated=True)
    assert timm is not None
    return m.eval()


@pytest.mark.parametrize("variant,folded", [("lora", ["norm1"]), ("gated", ["norm2"]), ("own_norm", [])])
def test_pairs_whose_fold_would_change_the_float_model_are_left_as_they_are(variant, folded, caplog):
    """The pairs were taken by type alone: a LayerNorm subclass with its own forward, a LoRA branch on
    fc1, or timm's gated attention reading norm1's output changed the FP32 model by 2-25 % of its output
    scale, silently. Now the fold is checked on the first calibration batch, as BatchNorm folding is."""
    m = _small_timm_vit(variant)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y0 = _logits(m, x)
    if not folded:
        with pytest.raises(PlacementError, match="no LayerNorm -> Linear pair can be folded.*forward of its own"):
            reparam_layernorm(m, [x])
        torch.testing.assert_close(_logits(m, x), y0, rtol=0, atol=0)  # left exactly as it was
        return
    res = reparam_layernorm(m, [x])
    assert sorted(p.split(" ->")[0] for p in res.pairs) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in folded)
    left = [s for s in res.skipped if "reparameterization changed" in s["reason"]]
    assert len(left) == 2 and any("left as it is" in r.message for r in caplog.records)
    torch.testing.assert_close(_logits(m, x), y0, rtol=1e-5, atol=1e-5 * float(y0.abs().max()))
