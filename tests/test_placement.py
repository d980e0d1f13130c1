"""Quantizer placement: names per family/mode, bit-exactness when disabled, quantizers in the path,
attention paths, residual quantizers, model-input quantizer and overrides."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from quantcore.config import Override, PlacementConfig, SpecPatch
from quantcore.errors import PlacementError
from quantcore.fold import fold_batchnorm
from quantcore.formats import QuantSpec
from quantcore.nn import QuantResidualBlock
from quantcore.placement import PlacementResult, detect_family, place_quantizers, quantizers
from quantcore.placement.intercept import quantized_sdpa
from quantcore.quantizer import TensorQuantizer
from timm.layers import Attention
from timm.models.vision_transformer import Block

pytestmark = pytest.mark.usefixtures("one_torch_thread")


W = QuantSpec(axis=0, calibrator="max")
A = QuantSpec(calibrator="max")
W_OFF = W.model_copy(update={"enabled": False})
A_OFF = A.model_copy(update={"enabled": False})
ATTN_Q = ("q_quantizer", "k_quantizer", "attn_quantizer", "v_quantizer")
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
RESIDUAL_Q = ("residual1_quantizer", "branch1_quantizer", "residual2_quantizer", "branch2_quantizer")


# -- models (built once, deep-copied per test) ------------------------------------------------------
class TinyGeneric(nn.Module):
    """Linear, Conv1d, Conv2d, a Linear subclass and a module reachable under two names."""

    class MyLinear(nn.Linear):
        pass

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), self.MyLinear(16, 8))
        self.head = nn.Linear(8, 5)
        self.alias = self.head  # same module under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x)).flatten(2)
        x = self.norm(self.conv1d(x).mean(-1))
        return self.head(self.mlp(x))


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


_BUILDERS = {
    # Fewer blocks than the real models to keep the suite fast on 2 shared CPU cores; the structure
    # (and so every name) per block is unchanged.
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=6),
            (2, 3, 32, 32)),
    "deit": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=3),
             (2, 3, 32, 32)),
    "mobilevit": (lambda: timm.create_model("mobilevit_xxs", pretrained=False), (2, 3, 32, 32)),
    "resnext": (lambda: torchvision.models.resnext50_32x4d(weights=None), (2, 3, 32, 32)),
    "generic": (TinyGeneric, (2, 3, 8, 8)),
}
_CACHE: dict[str, nn.Module] = {}


def get_model(key: str) -> tuple[nn.Module, torch.Tensor]:
    build, shape = _BUILDERS[key]
    if key not in _CACHE:
        model = _seeded(build)
        if key in ("resnext", "mobilevit"):  # non-trivial BatchNorm statistics
            g = torch.Generator().manual_seed(1)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        _CACHE[key] = model
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    return copy.deepcopy(_CACHE[key]), x


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def calibrate(model: nn.Module, x: torch.Tensor, share_groups=()) -> None:
    qs = quantizers(model)
    for q in qs.values():
        if q.kind == "activation":
            q.start_calibration()
    for m in model.modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(wq, TensorQuantizer):
            wq.calibrate_tensor(m.weight)
    run(model, x)
    for name, q in qs.items():
        if q.kind == "activation":
            assert q.finalize(), f"{name} saw no data"
    for group in share_groups:  # what the calibration finalize does with share groups
        lo = torch.stack([qs[n].amin for n in group]).min()
        hi = torch.stack([qs[n].amax for n in group]).max()
        for n in group:
            qs[n].set_range(lo, hi)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- expected names, built from the float model's structure ---------------------------------------
def expected_vit(model: nn.Module, mode: str, residual: bool = False, model_input: bool = False) -> set[str]:
    names = {"input_quantizer"} if model_input else set()
    for i, _ in enumerate(model.blocks):
        p = f"blocks.{i}"
        for lin in BLOCK_LINEARS:
            names |= {f"{p}.{lin}.input_quantizer", f"{p}.{lin}.weight_quantizer"}
            if mode == "ft2":
                names.add(f"{p}.{lin}.output_quantizer")
        names |= {f"{p}.attn.{q}" for q in ATTN_Q}
        if mode == "ft2":
            names.add(f"{p}.attn.softmax_input_quantizer")
        if residual:
            names |= {f"{p}.{r}" for r in RESIDUAL_Q}
    return names


def expected_layers(model: nn.Module, skip=()) -> set[str]:
    names = set()
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not any(n == s or n.startswith(s + ".") for s in skip):
            names |= {f"{n}.input_quantizer", f"{n}.weight_quantizer"}
    return names


def expected_mobilevit(model: nn.Module, mode: str) -> set[str]:
    names = expected_layers(model)
    blocks = [n for n, m in model.named_modules() if isinstance(m, Block)]
    for n, m in model.named_modules():
        if isinstance(m, Attention):
            names |= {f"{n}.{q}" for q in ATTN_Q}
            if mode == "ft2":
                names.add(f"{n}.softmax_input_quantizer")
        if mode == "ft2" and isinstance(m, nn.Linear) and any(n.startswith(b + ".") for b in blocks):
            names.add(f"{n}.output_quantizer")
    return names


# -- family detection ---------------------------------------------------------------------------------
def test_detect_family():
    assert detect_family(get_model("vit")[0]) == "vit"
    assert detect_family(get_model("deit")[0]) == "vit"
    assert detect_family(get_model("mobilevit")[0]) == "cnn"
    assert detect_family(get_model("resnext")[0]) == "cnn"
    assert detect_family(get_model("generic")[0]) == "generic"
    assert detect_family(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())) == "cnn"
    # Attention without convs, not a VisionTransformer: vit
    assert detect_family(nn.Sequential(nn.Linear(8, 8), Attention(8, num_heads=2)).eval(),
                         torch.randn(2, 5, 8)) == "vit"


# -- expected names per family and mode ---------------------------------------------------------------
@pytest.mark.parametrize("key", ["vit", "deit"])
@pytest.mark.parametrize("mode", ["ft1", "ft2"])
def test_vit_names_modes_and_share_groups(key, mode):
    model, x = get_model(key)
    ref = copy.deepcopy(model)
    res = place_quantizers(model, PlacementConfig(mode=mode), W, A)
    assert isinstance(res, PlacementResult) and model.quantcore_placement is res
    assert (res.family, res.mode) == ("vit", mode)
    qs = quantizers(model)
    assert list(qs) == res.quantizers
    assert set(qs) == expected_vit(ref, mode)
    # patch_embed / head / head_dist stay float
    assert type(model.patch_embed.proj) is nn.Conv2d and type(model.head) is nn.Linear
    expect_float = {"patch_embed.proj", "head"} | ({"head_dist"} if key == "deit" else set())
    assert set(res.float_modules) == expect_float
    for i, blk in enumerate(model.blocks):
        assert type(blk.attn) is Attention and isinstance(blk.attn.q_quantizer, TensorQuantizer)
        for lin in BLOCK_LINEARS:
            q = qs[f"blocks.{i}.{lin}.weight_quantizer"]
            assert q.kind == "weight"
            assert q.spec.axis == (0 if mode == "ft1" else None)
    if mode == "ft2":
        assert len(res.share_groups) == len(model.blocks)
        for i, g in enumerate(res.share_groups):
            assert g == [f"blocks.{i}.attn.{q}" for q in ("q_quantizer", "k_quantizer", "v_quantizer",
                                                          "qkv.output_quantizer")]
    else:
        assert res.share_groups == []
    # parameters keep their names and values
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())


def test_mode_flags_override_defaults():
    model, _ = get_model("vit")
    res = place_quantizers(model, PlacementConfig(mode="ft2", share_qkv_range=False, quantize_gemm_output=False),
                           QuantSpec(calibrator="max"), A)  # per-tensor weights given: ft2 keeps them
    names = set(res.quantizers)
    assert res.share_groups == []
    assert not any(n.endswith("output_quantizer") for n in names)
    assert "blocks.0.attn.softmax_input_quantizer" in names
    model, _ = get_model("vit")
    res = place_quantizers(model, PlacementConfig(mode="ft1", quantize_softmax_input=True), QuantSpec(calibrator="max"), A)
    assert "blocks.3.attn.softmax_input_quantizer" in res.quantizers
    # ft1's per-channel weights are quant.weights' default: a per-tensor weight spec given is kept
    assert quantizers(model)["blocks.3.mlp.fc1.weight_quantizer"].spec.axis is None and res.notes == []


@pytest.mark.parametrize("mode", ["ft1", "ft2"])
def test_mobilevit_names(mode):
    model, x = get_model("mobilevit")
    ref = copy.deepcopy(model)
    res = place_quantizers(model, PlacementConfig(mode=mode, quantize_model_input=True), W, A)
    assert res.family == "cnn" and res.mode == mode
    assert set(res.quantizers) == expected_mobilevit(ref, mode)
    assert "input_quantizer" not in res.quantizers  # the stem conv's input quantizer covers the image
    n_attn = sum(isinstance(m, Attention) for m in ref.modules())
    assert n_attn > 0 and sum(hasattr(m, "q_quantizer") for m in model.modules()) == n_attn
    assert len(res.attention) == n_attn
    assert len(res.share_groups) == (n_attn if mode == "ft2" else 0)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    assert len(res.folded_bn) == n_bn and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert hasattr(model.stem.conv, "weight_quantizer") and hasattr(model.head.fc, "weight_quantizer")


def test_resnext_and_generic_names():
    model, x = get_model("resnext")
    ref = copy.deepcopy(model)
    res = place_quantizers(model, PlacementConfig(quantize_model_input=True), W, A)
    assert (res.family, res.mode) == ("cnn", None)
    assert set(res.quantizers) == expected_layers(ref)
    assert len(res.folded_bn) == sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules()) == 53
    qs = quantizers(model)
    assert qs["layer1.0.conv2.weight_quantizer"].spec.axis == 0
    assert qs["layer1.0.conv2.input_quantizer"].spec.axis is None
    assert hasattr(model.layer1[0].downsample[0], "weight_quantizer")

    model, x = get_model("generic")
    ref = copy.deepcopy(model)
    res = place_quantizers(model, PlacementConfig(quantize_model_input=True, keep_float=["conv1d"]), W, A,
                           example_input=x)
    assert (res.family, res.mode, res.folded_bn) == ("generic", None, [])
    # The first conv reads the image itself: its input quantizer is the model-input quantizer.
    assert set(res.quantizers) == expected_layers(ref, skip=["conv1d"])
    assert res.quantizers[0] == "conv.input_quantizer"
    assert not hasattr(model.conv1d, "weight_quantizer") and res.float_modules == ["conv1d"]
    assert hasattr(model.mlp[2], "weight_quantizer")  # a Linear subclass keeps its class and is quantized
    assert type(model.mlp[2]) is TinyGeneric.MyLinear
    assert model.alias is model.head and hasattr(model.head, "weight_quantizer")
    assert hasattr(model.conv, "weight_quantizer")

    model, x = get_model("generic")
    place_quantizers(model, PlacementConfig(), W, A, example_input=x)
    assert hasattr(model.conv1d, "weight_quantizer")


# -- disabled quantizers are bit-exact; calibrated ones are in the path ---------------------------------
@pytest.mark.parametrize("key", ["vit", "deit", "mobilevit", "resnext", "generic"])
def test_disabled_is_bit_exact_and_calibrated_is_close(key):
    model, x = get_model(key)
    ref = copy.deepcopy(model)
    attn = {"mode": "ft2"} if key in ("vit", "deit", "mobilevit") else {}
    cfg = PlacementConfig(**attn, quantize_model_input=True, quantize_residual=key in ("vit", "deit"))
    res = place_quantizers(model, cfg, W, A, example_input=x)
    if res.folded_bn:  # compare against the float model with the same (deterministic) folding
        assert fold_batchnorm(ref, x).pairs == res.folded_bn
    y_ref = run(ref, x)
    assert torch.equal(run(model, x), y_ref)  # nothing calibrated yet: nothing active

    calibrate(model, x, res.share_groups)
    y_q = run(model, x)
    assert not torch.equal(y_q, y_ref)
    assert rel_err(y_q, y_ref) < 0.5, rel_err(y_q, y_ref)

    for q in quantizers(model).values():  # switched off: bit-exact again
        q.quantize = False
    assert torch.equal(run(model, x), y_ref)
    for q in quantizers(model).values():
        q.quantize = True
        q.set_spec(q.spec.model_copy(update={"enabled": False}))
    assert torch.equal(run(model, x), y_ref)


def test_keep_float_replacing_the_family_list_is_noted():
    """placement.keep_float replaces the family's default float list (patch embedding, head): a user adding
    one glob quantized the head without a word. The placement notes name what that list would keep float."""
    model, _ = get_model("vit")
    res = place_quantizers(model, PlacementConfig(family="vit", keep_float=["blocks.1.*"]), W, A)
    assert any(n.endswith("weight_quantizer") and n.startswith("head.") for n in quantizers(model))
    (note,) = [n for n in res.notes if "keep_float replaces" in n]
    assert "'head'" in note and "family" in note
    model, _ = get_model("vit")
    res = place_quantizers(model, PlacementConfig(family="vit", keep_float=["blocks.1.*", "head", "patch_embed"]), W, A)
    assert not [n for n in res.notes if "keep_float replaces" in n]
    model, _ = get_model("vit")
    assert not [n for n in place_quantizers(model, PlacementConfig(family="vit"), W, A).notes if "keep_float" in n]


@pytest.mark.parametrize("key", ["vit", "mobilevit"])
def test_placed_with_disabled_specs_is_bit_exact(key):
    model, x = get_model(key)
    ref = copy.deepcopy(model)
    # every spec disabled at placement is refused (nothing would act), the model left as it was
    with pytest.raises(PlacementError, match=r"every quantizer placed .* is disabled \(quant.weights enabled: false; "
                                             r"quant.activations enabled: false\)"):
        place_quantizers(model, PlacementConfig(mode="ft2", fold_bn=False, quantize_model_input=True), W_OFF, A_OFF)
    assert not quantizers(model)
    res = place_quantizers(model, PlacementConfig(mode="ft2", fold_bn=False, quantize_model_input=True), W, A_OFF)
    assert res.folded_bn == []
    calibrate(model, x)  # ranges exist; activations disabled, and now the weights too
    for q in quantizers(model).values():
        q.set_spec(q.spec.model_copy(update={"enabled": False}))
    assert torch.equal(run(model, x), run(ref, x))


def test_fused_sdpa_kept_while_attention_quantizers_inactive():
    model, x = get_model("vit")
    place_quantizers(model, PlacementConfig(mode="ft2"), W, A)
    seen = []
    for blk in model.blocks:
        blk.attn.q_quantizer.register_forward_hook(lambda *a: seen.append(1))
    y_ref = run(model, x)
    assert seen == []  # nothing calibrated: timm's own fused forward, quantizers never called
    calibrate(model, x)
    seen.clear()
    y_q = run(model, x)  # quantizing: the fused op is decomposed and q is quantized in every block
    assert len(seen) == len(model.blocks) and not torch.equal(y_q, y_ref)
    for blk in model.blocks:  # only non-attention quantizers active: fused op again
        for a in ("q_quantizer", "k_quantizer", "softmax_input_quantizer", "attn_quantizer", "v_quantizer"):
            getattr(blk.attn, a).quantize = False
    seen.clear()
    run(model, x)
    assert seen == []


def test_sdpa_decomposition_matches_torch_with_masks_scale_and_gqa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    bool_mask = torch.ones(5, 5, dtype=torch.bool).tril()
    float_mask = torch.randn(5, 5, generator=g)
    for kw in ({}, {"attn_mask": bool_mask}, {"attn_mask": float_mask}, {"is_causal": True}, {"scale": 0.3}):
        ref = F.scaled_dot_product_attention(q, k, v, **kw)
        assert torch.allclose(quantized_sdpa({}, q, k, v, **kw), ref, rtol=1e-5, atol=1e-6), kw
    k2, v2 = k[:, :2], v[:, :2]
    ref = F.scaled_dot_product_attention(q, k2, v2, enable_gqa=True)
    assert torch.allclose(quantized_sdpa({}, q, k2, v2, enable_gqa=True), ref, rtol=1e-5, atol=1e-6)


def test_fused_and_explicit_timm_attention_quantize_alike():
    """timm's fused path (SDPA, decomposed) and its explicit path (q*scale @ k^T, softmax, @ v,
    intercepted op by op) get the same quantizers and nearly the same output."""
    outs = []
    for fused in (True, False):
        model, x = get_model("vit")
        for blk in model.blocks:
            blk.attn.fused_attn = fused
        ref = copy.deepcopy(model)
        res = place_quantizers(model, PlacementConfig(mode="ft2"), W, A)
        assert len(res.attention) == len(model.blocks)
        assert torch.equal(run(model, x), run(ref, x))  # not calibrated: bit-exact on both paths
        calibrate(model, x, res.share_groups)
        outs.append((run(model, x), run(ref, x), res.quantizers))
    (yf, rf, qf), (ye, re_, qe) = outs
    assert qf == qe and torch.allclose(rf, re_, rtol=1e-4, atol=1e-5)
    assert not torch.equal(yf, rf) and not torch.equal(ye, re_)
    assert rel_err(yf, ye) < 0.05, rel_err(yf, ye)


def test_each_quantizer_kind_is_in_the_path():
    model, x = get_model("vit")
    spec = QuantSpec(bits=4, calibrator="max")
    res = place_quantizers(model, PlacementConfig(mode="ft2", quantize_residual=True, quantize_model_input=True),
                           spec, spec)
    calibrate(model, x)
    qs = quantizers(model)
    for q in qs.values():
        q.quantize = False
    y_float = run(model, x)
    for target in ("blocks.1.attn.q_quantizer", "blocks.1.attn.k_quantizer", "blocks.1.attn.softmax_input_quantizer",
                   "blocks.1.attn.attn_quantizer", "blocks.1.attn.v_quantizer", "blocks.1.residual1_quantizer",
                   "blocks.1.branch1_quantizer", "blocks.1.residual2_quantizer", "blocks.1.branch2_quantizer",
                   "input_quantizer", "blocks.1.mlp.fc1.output_quantizer", "blocks.1.mlp.fc2.weight_quantizer",
                   "blocks.1.attn.proj.input_quantizer"):
        assert target in res.quantizers
        qs[target].quantize = True
        assert not torch.equal(run(model, x), y_float), target
        qs[target].quantize = False


def test_residual_blocks():
    model, x = get_model("vit")
    ref = copy.deepcopy(model)
    res = place_quantizers(model, PlacementConfig(mode="ft1", quantize_residual=True), W, A)
    assert set(res.quantizers) == expected_vit(ref, "ft1", residual=True)
    assert all(isinstance(b, QuantResidualBlock) and isinstance(b, Block) for b in model.blocks)
    assert hasattr(model.blocks[0].attn, "q_quantizer")
    with pytest.raises(ValueError, match="quantize_residual"):
        place_quantizers(get_model("generic")[0], PlacementConfig(quantize_residual=True), W, A)


def test_state_dict_round_trip_and_deepcopy():
    cfg = PlacementConfig(mode="ft2", quantize_residual=True, quantize_model_input=True)
    ovs = [Override(match="blocks.2.attn.attn_quantizer", float=True)]
    model, x = get_model("vit")
    place_quantizers(model, cfg, W, A, ovs)
    calibrate(model, x, model.quantcore_placement.share_groups)
    y = run(model, x)
    fresh, _ = get_model("vit")
    place_quantizers(fresh, cfg, W, A, ovs)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(run(fresh, x), y)
    clone = copy.deepcopy(model)  # the model-input hook and the result travel with the copy
    assert clone.quantcore_placement.quantizers == model.quantcore_placement.quantizers
    assert torch.equal(run(clone, x), y)
    clone.input_quantizer.quantize = False
    assert not torch.equal(run(clone, x), y)


# -- overrides ----------------------------------------------------------------------------------------
def test_override_float_the_two_most_sensitive_fc():
    """Seed recipe: INT8 everywhere except residual adds and blocks.4/5.mlp.fc2."""
    model, x = get_model("vit")
    ref = copy.deepcopy(model)
    ovs = [Override(match="blocks.4.mlp.fc2", float=True), Override(match="blocks.5.mlp.fc2", float=True)]
    res = place_quantizers(model, PlacementConfig(mode="ft1", quantize_residual=False), W, A, ovs)
    gone = {f"blocks.{i}.mlp.fc2.{k}_quantizer" for i in (4, 5) for k in ("input", "weight")}
    assert set(res.quantizers) == expected_vit(ref, "ft1") - gone
    assert type(model.blocks[4].mlp.fc2) is nn.Linear and type(model.blocks[5].mlp.fc2) is nn.Linear
    assert hasattr(model.blocks[3].mlp.fc2, "weight_quantizer")
    assert {"blocks.4.mlp.fc2", "blocks.5.mlp.fc2"} <= set(res.float_modules)
    calibrate(model, x)
    assert rel_err(run(model, x), run(ref, x)) < 0.5


def test_override_spec_enabled_and_order():
    model, _ = get_model("vit")
    ovs = [
        Override(match="blocks.*", spec=SpecPatch(bits=6)),
        Override(match="blocks.0.mlp.fc1", spec=SpecPatch(bits=4)),           # module name: all its quantizers
        Override(match="blocks.*.attn.attn_quantizer", spec=SpecPatch(bits=8, symmetric=False)),
        Override(match="blocks.1.attn.q_quantizer", enabled=False),
        Override(match="blocks.2.attn.attn_quantizer", float=True),           # remove one quantizer
        Override(match="head", float=False),                                  # re-quantize a default-float module
    ]
    res = place_quantizers(model, PlacementConfig(mode="ft1"), W, A, ovs)
    qs = quantizers(model)
    assert qs["blocks.0.mlp.fc1.input_quantizer"].spec.bits == 4
    assert qs["blocks.0.mlp.fc1.weight_quantizer"].spec.bits == 4
    assert qs["blocks.0.mlp.fc1.weight_quantizer"].spec.axis == 0
    assert qs["blocks.0.mlp.fc2.input_quantizer"].spec.bits == 6
    assert qs["blocks.3.attn.attn_quantizer"].spec.bits == 8 and not qs["blocks.3.attn.attn_quantizer"].spec.symmetric
    assert qs["blocks.1.attn.q_quantizer"].spec.enabled is False
    assert qs["blocks.1.attn.k_quantizer"].spec.enabled is True
    assert "blocks.2.attn.attn_quantizer" not in qs and getattr(model.blocks[2].attn, "attn_quantizer", None) is None
    assert {"head.input_quantizer", "head.weight_quantizer"} <= set(res.quantizers)
    assert "head" not in res.float_modules
    assert qs["head.input_quantizer"].spec.bits == 8
    calibrate(model, get_model("vit")[1])  # still runs with a removed quantizer


@pytest.mark.parametrize("bad", [
    [Override(match="blocks.99.mlp.fc2", float=True)],
    [Override(match="blocks.0.mlp.fc9", spec=SpecPatch(bits=4))],
    [Override(match="head", spec=SpecPatch(bits=4))],  # matches a module that is float: no quantizer
    [Override(match="blocks.0.attn.nope_quantizer", enabled=False)],
])
def test_unmatched_override_raises(bad):
    model, _ = get_model("vit")
    with pytest.raises(ValueError, match=bad[0].match.replace("*", r"\*").replace(".", r"\.")):
        place_quantizers(model, PlacementConfig(), W, A, bad)


@pytest.mark.parametrize("rules,said", [
    # a quantizer of a module an earlier override keeps float: the name is right, the rule above removed it
    ([Override(match="blocks.*.mlp.*", float=True), Override(match="blocks.0.mlp.fc2.input_quantizer",
                                                              spec=SpecPatch(bits=4))],
     r"overrides\[1\] .* matches the quantizers of module 'blocks\.0\.mlp\.fc2', which overrides\[0\] "
     r"'blocks\.\*\.mlp\.\*' keeps float"),
    # the family's default keep_float (the ViT head)
    ([Override(match="head.input_quantizer", spec=SpecPatch(bits=4))],
     r"module 'head', which default keep_float 'head' keeps float"),
    # a spec override, then float: true on the same modules (the later float wins whatever the order)
    ([Override(match="blocks.0.mlp.*", spec=SpecPatch(bits=4)), Override(match="blocks.0.mlp.*", float=True)],
     r"overrides\[0\] .* but no quantizer there: overrides\[1\] 'blocks\.0\.mlp\.\*' keeps those modules float"),
    ([Override(match="head", spec=SpecPatch(bits=4))],
     r"default keep_float 'head' keeps those modules float.*float: false"),
    # the float rule after the quantizer's override (helper-135: only earlier rules were looked at)
    ([Override(match="blocks.0.mlp.fc2.input_quantizer", spec=SpecPatch(bits=4)),
      Override(match="blocks.*.mlp.*", float=True)],
     r"overrides\[0\] .* matches the quantizers of module 'blocks\.0\.mlp\.fc2', which overrides\[1\]"),
    # a typo below a float module is a typo: told to check the name, not to un-float the module
    ([Override(match="blocks.0.mlp", float=True), Override(match="blocks.0.mlp.fc9", spec=SpecPatch(bits=4))],
     r"overrides\[1\] 'blocks\.0\.mlp\.fc9' matches no module and no quantizer of this model \(check the name"),
    ([Override(match="blocks.0.mlp.fc2", float=True),
      Override(match="blocks.0.mlp.fc2.input_quantiser", spec=SpecPatch(bits=4))],
     r"'blocks\.0\.mlp\.fc2\.input_quantiser' matches no module and no quantizer of this model \(check the name"),
])
def test_an_override_meeting_modules_another_rule_keeps_float_says_which_rule(rules, said):
    """helper-132: the message said 'matches no module and no quantizer ... check the name' for a
    quantizer name that was right, removed by an earlier float rule."""
    with pytest.raises(ValueError, match=said):
        place_quantizers(get_model("vit")[0], PlacementConfig(), W, A, rules)


def test_keep_float_typo_and_noop_override_raise():
    with pytest.raises(ValueError, match="patch_embd"):
        place_quantizers(get_model("vit")[0], PlacementConfig(keep_float=["patch_embd"]), W, A)
    with pytest.raises(ValueError, match="sets none"):
        place_quantizers(get_model("vit")[0], PlacementConfig(), W, A, [Override(match="head")])


def test_explicit_keep_float_replaces_the_vit_defaults():
    model, x = get_model("vit")
    res = place_quantizers(model, PlacementConfig(keep_float=[]), W, A)
    assert hasattr(model.patch_embed.proj, "weight_quantizer") and hasattr(model.head, "weight_quantizer")
    assert {"patch_embed.proj.weight_quantizer", "head.input_quantizer"} <= set(res.quantizers)
    assert res.float_modules == []


def test_float_override_of_a_container_and_model_input():
    model, x = get_model("vit")
    ovs = [Override(match="blocks.0", float=True), Override(match="input_quantizer", spec=SpecPatch(bits=6))]
    res = place_quantizers(model, PlacementConfig(quantize_model_input=True), W, A, ovs)
    assert not any(n.startswith("blocks.0.") for n in res.quantizers)
    assert type(model.blocks[0].attn) is Attention
    assert quantizers(model)["input_quantizer"].spec.bits == 6


# -- errors ---------------------------------------------------------------------------------------
class OddAttention(Attention):
    def forward(self, x, attn_mask=None, is_causal=False):  # its own forward, around timm's
        return super().forward(x) * 2


def test_attention_subclass_with_its_own_forward_is_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), OddAttention(8, num_heads=2)).eval()
    x = torch.randn(2, 5, 8)
    ref = copy.deepcopy(model)
    res = place_quantizers(model, PlacementConfig(), W, A, example_input=x)
    assert res.attention == ["1"] and "1.q_quantizer" in res.quantizers
    assert torch.equal(run(model, x), run(ref, x))
    calibrate(model, x)
    assert not torch.equal(run(model, x), run(ref, x))
    # ... and can be left float by an override, listed with the rule
    model = copy.deepcopy(ref)
    res = place_quantizers(model, PlacementConfig(), W, A, [Override(match="1", float=True)], example_input=x)
    assert set(res.float_modules) == {"1", "1.qkv", "1.proj"}
    assert all("overrides[0]" in r for r in res.float_reasons.values())


def test_place_twice_raises():
    model, _ = get_model("generic")
    place_quantizers(model, PlacementConfig(), W, A)
    with pytest.raises(ValueError, match="already"):
        place_quantizers(model, PlacementConfig(), W, A)


def test_a_module_run_twice_is_named_in_the_notes():
    """One conv applied at two scales (a reused / recurrent module) has one input quantizer for both
    calls: one range over both value scales. The placement says so, naming the module and its calls;
    a model whose quantized modules each run once has no such note."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(self.conv(self.conv(x) * 50).mean((2, 3)))

    res = place_quantizers(Twice().eval(), PlacementConfig(family="generic"), W, A,
                           example_input=torch.randn(1, 3, 8, 8))
    note = [n for n in res.notes if "more than once" in n]
    assert len(note) == 1 and "'conv': 2 calls" in note[0] and "head" not in note[0]
    model, _ = get_model("generic")
    res = place_quantizers(model, PlacementConfig(family="generic"), W, A)
    assert not any("more than once" in n for n in res.notes)
