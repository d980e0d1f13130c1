"""Format ``int_dynamic`` (issue #11): a uniform integer grid whose scale and zero point are computed at
run time per token (last dimension) or per ``block_size`` elements of it, bounded by the calibrated range.

The grid is checked against a numpy reference that loops over the slices one by one (written from the
formula in the module docstring, not calling quantcore) on real activations of the demo ViT on
Fashion-MNIST: LayerNorm outputs (qkv input), post-GELU (fc2 input) and post-softmax values.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import quantcore
from quantcore.formats import QuantSpec
from quantcore.placement import quantizers
from quantcore.quantizer import TensorQuantizer
from quantcore.recipe import RecipeError, recipe_from_dict
from test_vit_quantizers import _demo_model, images, quantizer_inputs  # noqa: F401 - images: a fixture

SITES = {"layernorm": "blocks.1.attn.qkv.input_quantizer", "gelu": "blocks.1.mlp.fc2.input_quantizer",
         "softmax": "blocks.1.attn.attn_quantizer"}


def _e4m3_values() -> np.ndarray:
    """Every finite non-negative E4M3 value (OCP FP8: bias 7, no infinities, S.1111.111 is NaN), by
    its definition."""
    vals = [m / 8 * 2.0**-6 for m in range(8)]  # subnormals
    vals += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    return np.array(vals)


def _bf16_rne(v: float) -> float:
    """float32 -> bfloat16 by rounding the bit pattern to nearest, ties to even."""
    u = int(np.array(v, dtype=np.float32).view(np.uint32))
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return float(np.array(u, dtype=np.uint32).view(np.float32))


def ref_store_scale(s: float, fmt: str, top: float) -> float:
    """A scale as ``scale_format`` stores it (the module docstring's rules; numpy, not torch)."""
    if fmt == "fp32":
        return float(np.float32(s))
    if fmt == "fp16":
        return float(np.float16(min(max(s, 2.0**-24), 65504.0)))
    if fmt == "bf16":
        return _bf16_rne(s)
    if fmt == "e8m0":
        return 2.0 ** math.ceil(math.log2(s))
    if fmt == "fp8_e4m3":
        g = float(np.float32(top / 448.0))
        r = min(max(float(np.float32(s / g)), 2.0**-9), 448.0)
        grid = _e4m3_values()
        d = np.abs(grid - r)
        best = np.flatnonzero(d == d.min())  # a tie: the even code (grid index parity is the code's)
        return float(grid[best[0] if len(best) == 1 else best[best % 2 == 0][0]]) * g
    raise ValueError(fmt)


def ref_dynamic(x: np.ndarray, lo_b: float, hi_b: float, bits: int, symmetric: bool, block: int | None,
                scale_format: str = "fp16") -> np.ndarray:
    """One slice at a time: the slice's own range (bounded by [lo_b, hi_b]), its scale as stored,
    then the uniform grid."""
    x = x.astype(np.float64)
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    n = flat.shape[1]
    b = n if block is None else min(block, n)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        top = hi_b / qmax
    else:
        qmin, qmax = 0, 2**bits - 1
        top = (hi_b - lo_b) / (qmax - qmin)
    for r in range(flat.shape[0]):
        for start in range(0, n, b):
            v = flat[r, start:start + b]
            # a stored scale other than the exact one: values past the bound are clipped to it first
            if symmetric:
                a = min(np.abs(v).max(), hi_b)
                s = ref_store_scale(max(a / qmax, 1e-8), scale_format, top)
                v = v if scale_format == "fp32" else np.clip(v, -a * (qmax + 1) / qmax, a)
                y = np.clip(np.round(v / s), qmin, qmax) * s
            else:
                lo = max(min(v.min(), 0.0), lo_b)
                hi = min(max(v.max(), 0.0), hi_b)
                s = ref_store_scale(max((hi - lo) / (qmax - qmin), 1e-8), scale_format, top)
                z = np.clip(np.round(qmin - lo / s), qmin, qmax)
                v = v if scale_format == "fp32" else np.clip(v, lo, hi)
                y = (np.clip(np.round(v / s) + z, qmin, qmax) - z) * s
            out[r, start:start + b] = y
    return out.reshape(x.shape)


@pytest.fixture(scope="module")
def acts(images) -> dict[str, torch.Tensor]:
    """What three quantizers of block 1 receive on 32 Fashion-MNIST test images."""
    return quantizer_inputs(SITES, images[:32])


def _quantizer(x: torch.Tensor, bits: int, symmetric: bool, block: int | None, calibrator: str = "max",
               percentile: float = 99.99, scale_format: str | None = None) -> TensorQuantizer:
    q = TensorQuantizer(QuantSpec(format="int_dynamic", bits=bits, symmetric=symmetric, block_size=block,
                                  calibrator=calibrator, percentile=percentile, scale_format=scale_format))
    q.start_calibration()
    q(x)
    assert q.finalize()
    return q


@pytest.mark.parametrize("site", list(SITES))
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (3, False)])
@pytest.mark.parametrize("block", [None, 16, 24])  # 24: the 64 features end with a block of 16
@pytest.mark.parametrize("calibrator", ["max", "percentile"])
def test_grid_matches_slice_by_slice_reference(acts, site, bits, symmetric, block, calibrator):
    x = acts[site]
    if site == "softmax":  # (B, heads, N, N): one query row's probabilities per slice
        x = x[:4]
    q = _quantizer(x, bits, symmetric, block, calibrator, percentile=99.0)
    with torch.no_grad():
        y = q(x)
    ref = ref_dynamic(x.numpy(), float(q.amin), float(q.amax), bits, symmetric, block)
    # float32 kernel vs float64 reference: a value exactly at a rounding midpoint may go either way,
    # and so may a scale at a midpoint of its stored format (then its whole block moves)
    diff = np.abs(y.double().numpy() - ref)
    step = np.abs(ref).max() / 2 ** (bits - 1)
    assert (diff > 1e-5 * step).mean() < 1e-3 and diff.max() <= step
    if calibrator == "percentile":  # the bound clips: some slices hold values beyond it
        # (asymmetric: the rounded zero point moves the grid's ends by up to half a step)
        # (and the fp16 scale may round up by half its ulp, 2**-11 of the bound)
        half = 0.0 if symmetric else float(q.amax - q.amin) / (2**bits - 1) / 2
        assert float(x.max()) > float(q.amax)
        assert float(y.max()) <= float(q.amax) * (1 + 2.0**-11) + half + 1e-6
    # finer than one static grid over the same bound, the point of the format
    static = TensorQuantizer(QuantSpec(format="int", bits=bits, symmetric=symmetric))
    static.set_range(q.amin, q.amax)
    with torch.no_grad():
        assert float((y - x).pow(2).mean()) < float((static(x) - x).pow(2).mean())


@pytest.mark.parametrize("site", list(SITES))
@pytest.mark.parametrize("scale_format", ["fp32", "fp16", "bf16", "fp8_e4m3", "e8m0"])
@pytest.mark.parametrize("bits,symmetric,block", [(4, False, 16), (8, True, None), (4, True, 24)])
def test_each_scale_format_matches_the_reference(acts, site, scale_format, bits, symmetric, block):
    """The stored scale as the reference rounds it (numpy float16, bfloat16 by its bit pattern, E4M3
    from its table of values, powers of two), then the same grid; and the calibrated bound stays a
    clip bound (helper-135: e8m0 let values up to ~2x past it)."""
    x = acts[site][:4] if site == "softmax" else acts[site]
    q = _quantizer(x, bits, symmetric, block, "percentile", percentile=99.0, scale_format=scale_format)
    with torch.no_grad():
        y = q(x)
    ref = ref_dynamic(x.numpy(), float(q.amin), float(q.amax), bits, symmetric, block, scale_format)
    diff = np.abs(y.double().numpy() - ref)
    step = np.abs(ref).max() / 2 ** (bits - 1)
    assert (diff > 1e-5 * step).mean() < 1e-3 and diff.max() <= step
    # the calibrated range stays a clip bound whatever the stored scale (e8m0's rounded-up scale spans
    # up to 2x the bound), within half a step of the grid
    assert float(x.max()) > float(q.amax)  # percentile 99: values past the bound in some slices
    half_step = (float(q.amax - q.amin) if not symmetric else 2 * float(q.amax)) / (2**bits - 1)
    assert float(y.max()) <= float(q.amax) + half_step + 1e-6
    exact = ref_dynamic(x.numpy(), float(q.amin), float(q.amax), bits, symmetric, block, "fp32")
    moved = float(np.mean(np.abs(ref - exact) > 1e-6 * step))
    # the rounding of the scale must reach the grid (else this test could not tell the formats apart)
    assert moved > (0.0 if scale_format == "fp32" else 0.01) or scale_format == "fp32"
    if scale_format == "fp32":
        assert moved == 0.0


def test_scale_formats_cost_their_bits_and_are_refused_where_nothing_is_stored(images):
    from quantcore.analysis.engine import Engine
    from quantcore.analysis.search import CostModel

    r = quantcore.load_recipe("fmnist_w4a4_ft1_dynamic")
    m = quantcore.prepare(_demo_model(), r)
    quantcore.calibrate(m, [images[:64]])
    cost = CostModel(Engine(m, [images[64:96]]), "bits")
    site = SITES["layernorm"]  # 64 features per token: 4 blocks of 16
    spec = quantizers(m)[site].spec
    assert spec.scale_format is None and spec.symmetric is False
    for fmt, bits in (("fp16", 16), ("bf16", 16), ("fp8_e4m3", 8), ("e8m0", 8), ("fp32", 32)):
        assert cost.stored_bits(site, spec.model_copy(update={"scale_format": fmt})) == \
            pytest.approx(4 + (bits + 4) / 16)
    assert cost.stored_bits(site, spec) == pytest.approx(4 + (16 + 4) / 16)
    base = {"name": "bad", "model": {"name": "quantcore/vit_fmnist"}}
    with pytest.raises(RecipeError, match=r"quant\.activations.*scale_format: format 'int' has no run-time scales"):
        recipe_from_dict({**base, "quant": {"activations": {"bits": 4, "scale_format": "fp16"}}})
    with pytest.raises(RecipeError, match=r"scale_format.*not an option of format 'fp16'"):
        recipe_from_dict({**base, "overrides": [{"match": "*", "spec": {"format": "fp16", "scale_format": "e8m0"}}]})
    with pytest.raises(RecipeError, match=r"scale_format"):
        recipe_from_dict({**base, "quant": {"activations": {"format": "int_dynamic", "scale_format": "fp64"}}})
    # an override to a static grid leaves the section's scale format behind, as its block size
    r2 = recipe_from_dict({**base, "quant": {"activations": {"format": "int_dynamic", "bits": 4, "block_size": 16,
                                                             "scale_format": "e8m0"}},
                           "calibration": {"method": "max"},
                           "overrides": [{"match": "blocks.0.*", "spec": {"format": "int"}}]})
    qs = quantizers(quantcore.prepare(_demo_model(), r2))
    assert qs["blocks.0.attn.qkv.input_quantizer"].spec.scale_format is None
    assert qs["blocks.1.attn.qkv.input_quantizer"].spec.scale_format == "e8m0"


def test_a_checkpoint_written_before_scale_format_loads_with_float32_scales(images, tmp_path):
    """int_dynamic checkpoints written before the field existed computed float32 scales: they load
    with scale_format fp32 and give the outputs they were saved with."""
    import io

    from quantcore.checkpoint import _digest

    rec = quantcore.load_recipe("fmnist_w4a4_ft1_dynamic")
    m = quantcore.prepare(_demo_model(), rec.model_copy(update={"quant": rec.quant.model_copy(update={
        "activations": rec.quant.activations.model_copy(update={"scale_format": "fp32"})})}))
    quantcore.calibrate(m, [images[:64]])
    x = images[64:128]
    with torch.no_grad():
        y32 = m(x)
    uri = tmp_path / "old.qc.pt"
    quantcore.save(m, str(uri))
    payload = torch.load(uri, weights_only=True)
    for spec in payload["meta"]["quantizer_specs"].values():
        spec.pop("scale_format")
    payload["meta"]["recipe"]["quant"]["activations"].pop("scale_format")
    payload["sha256"] = _digest(payload["meta"], payload["state_dict"])
    buf = io.BytesIO()
    torch.save(payload, buf)
    uri.write_bytes(buf.getvalue())
    m2 = quantcore.load(str(uri))
    dyn = [q for q in quantizers(m2).values() if q.spec.format == "int_dynamic"]
    assert dyn and all(q.spec.scale_format == "fp32" for q in dyn)
    with torch.no_grad():
        assert torch.equal(m2(x), y32)
    # the default (fp16) scales give other outputs: the record is what keeps them
    for q in dyn:
        q.set_spec(q.spec.model_copy(update={"scale_format": None}))
    with torch.no_grad():
        assert not torch.equal(m2(x), y32)


def test_block_size_larger_than_the_dimension_is_per_token(acts):
    x = acts["layernorm"]
    with torch.no_grad():
        a = _quantizer(x, 4, False, 1000)(x)
        b = _quantizer(x, 4, False, None)(x)
    assert torch.equal(a, b)


def test_zero_and_constant_slices():
    x = torch.zeros(3, 8)
    x[1] = 2.5
    x[2, :4] = -1.0
    for sym in (True, False):
        for fmt, tol in (("fp32", 1e-6), (None, 2.0**-11), ("e8m0", 0.0)):
            q = _quantizer(x, 4, sym, 4, scale_format=fmt)
            with torch.no_grad():
                y = q(x)
            assert torch.isfinite(y).all() and torch.equal(y[0], x[0])
            if fmt == "e8m0":  # a power-of-two step: the end point lands on the grid only within a step
                assert (y - x).abs().max() <= 2.5 / 7
            else:  # one value per block: the block's end point (through the stored scale's rounding)
                assert torch.allclose(y, x, rtol=tol, atol=1e-6)


def test_straight_through_gradient_inside_the_bound(acts):
    x = acts["gelu"][:2].clone()
    q = _quantizer(x, 4, False, 16, "percentile", percentile=99.0)
    xg = x.clone().requires_grad_(True)
    q(xg).pow(2).sum().backward()
    y = q(x).detach()
    inside = (x >= float(q.amin)) & (x <= float(q.amax))
    assert (~inside).any() and inside.any()
    assert torch.allclose(xg.grad, torch.where(inside, 2 * y, torch.zeros_like(y)))


def test_half_precision_input_is_quantized_in_float32(acts):
    x = acts["layernorm"][:4]
    q = _quantizer(x, 4, True, 16)
    with torch.no_grad():
        y16 = q(x.half())
        y32 = q(x.half().float())
    assert y16.dtype == torch.float16 and torch.equal(y16, y32.half())


@pytest.mark.parametrize("patch,msg", [
    ({"block_size": 16}, r"block_size: format 'int' has no run-time block scales.*int_dynamic"),
    ({"format": "int_dynamic", "calibrator": "mse"}, r"'int_dynamic' takes calibrator one of \['max', 'percentile'\]"),
    ({"format": "int_dynamic", "per_channel": True}, r"'int_dynamic' computes its scales at run time.*not per channel"),
    ({"format": "twin_int", "symmetric": False, "calibrator": "mse", "block_size": 8}, r"block_size: format 'twin_int'"),
])
def test_invalid_specs_are_refused_naming_the_override(patch, msg):
    r = recipe_from_dict({"name": "bad", "model": {"name": "quantcore/vit_fmnist"},
                          "overrides": [{"match": "blocks.*.attn.attn_quantizer", "spec": patch}]})
    with pytest.raises(ValueError, match=msg) as err:
        quantcore.prepare(_demo_model(), r)
    assert "overrides" in str(err.value) and "attn_quantizer" in str(err.value)


def test_block_size_on_a_float_cast_or_section_is_refused():
    with pytest.raises(RecipeError, match=r"block_size.*not an option of format 'fp16'"):
        recipe_from_dict({"name": "bad", "model": {"name": "quantcore/vit_fmnist"},
                          "overrides": [{"match": "*", "spec": {"format": "fp16", "block_size": 16}}]})
    with pytest.raises(RecipeError, match=r"quant\.activations.*block_size: format 'int' has no run-time"):
        recipe_from_dict({"name": "bad", "model": {"name": "quantcore/vit_fmnist"},
                          "quant": {"activations": {"bits": 4, "block_size": 16}}})
    with pytest.raises(RecipeError, match=r"quant\.activations.*'int_dynamic' takes calibrator"):
        recipe_from_dict({"name": "bad", "model": {"name": "quantcore/vit_fmnist"}, "calibration": {"method": "mse"},
                          "quant": {"activations": {"format": "int_dynamic", "bits": 4}}})


def test_shipped_recipe_calibrates_saves_loads_and_export_refuses_by_name(images, tmp_path):
    r = quantcore.load_recipe("fmnist_w4a4_ft1_dynamic")
    m = quantcore.prepare(_demo_model(), r)
    quantcore.calibrate(m, [images[:64], images[64:128]])
    qs = quantizers(m)
    acts_q = [n for n, q in qs.items() if q.kind == "activation" and q.spec.enabled]
    assert acts_q and all(qs[n].spec.format == "int_dynamic" and qs[n].spec.block_size == 16 for n in acts_q)
    x = images[128:192]
    with torch.no_grad():
        y = m(x)
        with quantcore.api.quantization_disabled(m):
            y_fp = m(x)
    assert not torch.equal(y, y_fp)
    enc = {row["name"]: row for row in quantcore.encodings(m)["quantizers"]}
    row = enc[SITES["gelu"]]
    assert row["format"] == "int_dynamic" and row["block_size"] == 16 and row["scale"].startswith("dynamic")
    assert row["scale_format"] == "fp16" and "s = fp16(" in row["formula"]
    assert row["max"] == pytest.approx(float(qs[SITES["gelu"]].amax)) and "formula" in row
    json.dumps(quantcore.encodings(m), allow_nan=False)
    uri = str(tmp_path / "m.qc.pt")
    quantcore.save(m, uri)
    m2 = quantcore.load(uri)
    with torch.no_grad():
        assert torch.equal(m2(x), y)
    from quantcore.export.onnx_qdq import ExportError, export_onnx

    with pytest.raises(ExportError, match=r"input_quantizer.*'int_dynamic' computes its scale and zero point at run time"):
        export_onnx(m2, x[:1])


def test_cost_model_counts_the_run_time_scales(images):
    """Effective bits: each block of B values carries a 16-bit scale (and, asymmetric, a zero point);
    per token, B is the tensor's last dimension (64 features for the demo ViT's Linear inputs)."""
    from quantcore.analysis.engine import Engine
    from quantcore.analysis.search import CostModel

    r = quantcore.load_recipe("fmnist_w4a4_ft1_dynamic")
    m = quantcore.prepare(_demo_model(), r)
    quantcore.calibrate(m, [images[:64]])
    eng = Engine(m, [images[64:96]])
    cost = CostModel(eng, "bits")
    site = SITES["layernorm"]
    spec = quantizers(m)[site].spec
    assert cost.stored_bits(site, spec) == pytest.approx(4 + (16 + 4) / 16)
    tok = spec.model_copy(update={"block_size": None, "symmetric": True})
    assert eng.trace.last_dim[site] == 64 and cost.stored_bits(site, tok) == pytest.approx(4 + 16 / 64)
    assert cost.stored_bits(site, QuantSpec(bits=4)) == 4.0
    # the attention rows (17 keys) and v (attn @ v contracts its 17 tokens) need two blocks of 16 per slice
    for other in ("blocks.1.attn.attn_quantizer", "blocks.1.attn.v_quantizer"):
        assert eng.trace.last_dim[other] == 17
        assert cost.stored_bits(other, quantizers(m)[other].spec) == pytest.approx(4 + 2 * (16 + 4) / 17)
    specs = {n: q.spec for n, q in quantizers(m).items() if q.spec.enabled}
    w = {n: cost.numel[n] for n in cost.numel}
    def per_value(n):
        k = eng.trace.last_dim[n]
        return -(-k // 16) * (16 + 4) / k if specs[n].format == "int_dynamic" else 0.0

    want = sum(w[n] * (specs[n].bits + per_value(n)) for n in w if n in specs) / sum(w.values())
    assert cost(specs) == pytest.approx(want) and cost(specs) > 4.0 and not math.isnan(want)


def test_an_override_to_another_format_leaves_the_sections_block_size_behind(images):
    """An int_dynamic section with block_size, and overrides that put some quantizers on a static int
    grid or an fp16 cast: those take the section's other fields, not its run-time block size."""
    r = recipe_from_dict({"name": "mixed", "model": {"name": "quantcore/vit_fmnist"},
                          "quant": {"activations": {"format": "int_dynamic", "bits": 4, "block_size": 16}},
                          "calibration": {"method": "max"},
                          "overrides": [{"match": "blocks.0.*", "spec": {"format": "int"}},
                                        {"match": "blocks.1.attn.attn_quantizer", "spec": {"format": "fp16"}}]})
    m = quantcore.prepare(_demo_model(), r)
    qs = quantizers(m)
    assert qs["blocks.0.attn.qkv.input_quantizer"].spec.format == "int"
    assert qs["blocks.0.attn.qkv.input_quantizer"].spec.block_size is None
    assert qs["blocks.0.attn.qkv.input_quantizer"].spec.bits == 4
    assert qs["blocks.1.attn.attn_quantizer"].spec.format == "fp16"
    assert qs["blocks.2.attn.qkv.input_quantizer"].spec.block_size == 16
    quantcore.calibrate(m, [images[:64]])
    with torch.no_grad():
        assert torch.isfinite(m(images[64:80])).all()


_DYN = {"version": 1, "name": "dyn", "placement": {"family": "vit", "mode": "ft1"},
        "quant": {"weights": {"bits": 8, "symmetric": True, "per_channel": True},
                  "activations": {"format": "int_dynamic", "bits": 4, "symmetric": False, "block_size": 16}},
        "calibration": {"method": "max", "num_batches": 1, "batch_size": 2}}


def _scaled_slices(model, x) -> dict[str, tuple]:
    """Per quantizer: the shape it first receives and the dims its call site passes."""
    from quantcore.quantizer import TensorQuantizer

    seen = {}
    hooks = [mod.register_forward_pre_hook(
        lambda mod, a, kw, n=n: (seen.setdefault(n, (tuple(a[0].shape), kw.get("dims"))), None)[1], with_kwargs=True)
        for n, mod in model.named_modules() if isinstance(mod, TensorQuantizer)]
    with torch.no_grad():
        y = model(x)
    for h in hooks:
        h.remove()
    return y, seen


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_attention_slices_are_the_same_whatever_attention_path_the_model_takes(family):
    """k reaches its quantizer as (B, H, N, d) through fused SDPA but as k^T (B, H, d, N) through
    ``q @ k.transpose(-2, -1)`` (timm fused_attn=False, Swin, HF eager): its run-time scales must cover
    the head dimension both times (what q @ k^T contracts), and v's the tokens (what attn @ v contracts),
    so both paths give the same outputs. They differed by 0.11 in the logits when scales followed the
    last dimension."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outs, shapes = {}, {}
    for fused in (True, False):
        torch.manual_seed(0)
        if family == "timm":
            import timm

            m = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, depth=2, pretrained=False)
            for b in m.blocks:
                b.attn.fused_attn = fused
        else:
            from transformers import ViTConfig, ViTForImageClassification

            cfg = ViTConfig(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, num_labels=10, attn_implementation="sdpa" if fused else "eager")
            m = ViTForImageClassification(cfg)
        m = quantcore.prepare(m.eval(), recipe_from_dict(_DYN), example_input=x)
        quantcore.calibrate(m, [x])
        outs[fused], shapes[fused] = _scaled_slices(m, x)
        with torch.no_grad(), quantcore.api.quantization_disabled(m):
            fp = m(x)
        fp = getattr(fp, "logits", fp)
        assert (getattr(outs[fused], "logits", outs[fused]) - fp).abs().max() > 1e-3  # the grids act
    k = {f: next(v for n, v in shapes[f].items() if n.endswith("k_quantizer")) for f in shapes}
    assert k[True][0] != k[False][0]  # the paths really differ: (B, H, N, d) vs (B, H, d, N)
    a, b = (getattr(outs[f], "logits", outs[f]) for f in (True, False))
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_convolutions_scale_a_pixels_channels_and_a_filters_weights():
    """A conv input's run-time scales cover the channels of one pixel (what the conv contracts), not a
    row of pixels; its weight's, one output channel's in x kh x kw; a Linear's, its input features."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(24, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))
    rec = {"version": 1, "name": "cnn", "placement": {"family": "generic"},
           "quant": {"weights": {"format": "int_dynamic", "bits": 4, "per_channel": False, "block_size": 16},
                     "activations": {"format": "int_dynamic", "bits": 4, "symmetric": False, "block_size": 16}},
           "calibration": {"method": "max", "weights_method": "max", "num_batches": 1}}
    x = torch.randn(2, 24, 6, 6)
    q = quantcore.prepare(m, recipe_from_dict(rec), example_input=x)
    quantcore.calibrate(q, [x])
    _, seen = _scaled_slices(q, x)
    assert seen["0.input_quantizer"][1] == (-3,) and seen["0.weight_quantizer"][1] == (1,)
    qs = quantizers(q)
    iq, wq = qs["0.input_quantizer"], qs["0.weight_quantizer"]
    with torch.no_grad():
        got = iq(x, dims=(-3,))
        ref = ref_dynamic(x.permute(0, 2, 3, 1).numpy(), float(iq.amin), float(iq.amax), 4, False, 16)
        assert np.allclose(got.permute(0, 2, 3, 1).numpy(), ref, atol=1e-6)
        w = m[0].weight
        gw = wq(w, dims=(1,))
        rw = ref_dynamic(w.permute(0, 2, 3, 1).numpy(), float(wq.amin), float(wq.amax), 4, True, 16)
        assert np.allclose(gw.permute(0, 2, 3, 1).numpy(), rw, atol=1e-6)
        # what the model computes is these grids: the conv of the quantized input and weight
        y = torch.nn.functional.conv2d(got, gw, m[0].bias)
        assert torch.allclose(q[0](x), y, atol=1e-5)


def test_einsum_contracted_dims_follow_the_equation():
    from quantcore.placement.intercept import _einsum_dims

    assert _einsum_dims("bhid,bhjd->bhij") == ((-1,), (-1,))
    assert _einsum_dims("bhij,bhjd->bhid") == ((-1,), (-2,))
    assert _einsum_dims("...id,...jd->...ij") == ((-1,), (-1,))  # an ellipsis before the letters
    assert _einsum_dims("...ij,...jd->...id") == ((-1,), (-2,))
    assert _einsum_dims("id...,jd...->ij...") == ((1,), (1,))  # ... and after them
    assert _einsum_dims("bid,bjd") == ((-3, -1), (-3, -1))  # implicit output: b and d are summed


def test_slices_of_one_value_and_block_size_one_are_refused():
    """A one-channel convolution input (the Fashion-MNIST image) scaled per pixel: every value its own
    scale, nothing quantized; refused naming the quantizer, at calibration."""
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    rec = {"version": 1, "name": "one", "placement": {"family": "generic"},
           "quant": {"activations": {"format": "int_dynamic", "bits": 4}}, "calibration": {"method": "max"}}
    q = quantcore.prepare(m, recipe_from_dict(rec), example_input=torch.randn(2, 1, 6, 6))
    with pytest.raises(quantcore.CalibrationError, match=r"'0\.input_quantizer'.*slices of 1 value.*format int"):
        quantcore.calibrate(q, [torch.randn(2, 1, 6, 6)])
    with pytest.raises(RecipeError, match=r"block_size"):
        recipe_from_dict({**rec, "quant": {"activations": {"format": "int_dynamic", "block_size": 1}}})
