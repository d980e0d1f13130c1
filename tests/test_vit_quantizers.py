"""ViT quantizer kinds (issue #11): log2 / log_sqrt2 (FQ-ViT, RepQ-ViT) and twin_int (PTQ4ViT).

Each grid is checked against a numpy reference written from the papers' formulas (not calling
quantcore), on real post-softmax and post-GELU activations of the demo ViT on Fashion-MNIST; the
range searches against a brute force of their objective (the histogram read as a piecewise-uniform
density, integrated here by dense sampling) over a fine candidate grid.
"""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import quantcore
from quantcore.formats import QuantSpec
from quantcore.demo import SHIPPED_FP32 as CHECKPOINT  # the trained demo ViT shipped with quantcore
from quantcore.placement import quantizers
from quantcore.quantizer import TensorQuantizer
from quantcore.recipe import RecipeError, recipe_from_dict

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
SOFTMAX = "blocks.*.attn.attn_quantizer"
GELU = "blocks.*.mlp.fc2.input_quantizer"


# -- numpy references (from the papers / reference code, independent of quantcore) ---------------
def ref_log(x: np.ndarray, s: float, bits: int, k: int) -> np.ndarray:
    """FQ-ViT log2 (k=1) / RepQ-ViT log√2 (k=2): the reference code's formulas, with scale s."""
    n = 2**bits
    x = x.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        code = np.round(-k * np.log2(x / s))
    mask = (code >= n) | (x <= 0) | np.isnan(code)
    q = np.clip(np.nan_to_num(code, nan=0, posinf=n, neginf=0), 0, n - 1)
    if k == 1:
        y = s * 2.0 ** (-q)
    else:  # RepQ-ViT: 2**(-ceil(q/2)) * (sqrt(2) if q odd else 1) * s
        y = 2.0 ** (-np.ceil(q / 2)) * ((q % 2) * (math.sqrt(2) - 1) + 1) * s
    y[mask] = 0.0
    return y


def ref_twin(x: np.ndarray, d1: float, d2: float, bits: int, gelu: bool) -> np.ndarray:
    """PTQ4ViT twin uniform: one region bit, bits-1 magnitude bits per region."""
    n = 2 ** (bits - 1)
    x = x.astype(np.float64)
    r2 = np.clip(np.round(x / d2), 0, n - 1) * d2
    if gelu:
        r1 = np.clip(np.round(x / d1), -n, 0) * d1
        return np.where(x < 0, r1, r2)
    r1 = np.clip(np.round(x / d1), 0, n - 1) * d1
    return np.where(x < n * d1, r1, r2)


def sampled_objective(state, fq, sub: int = 32) -> np.ndarray:
    """E[(Q(X) - X)^2] under the histogram read as uniform inside each bin, by dense midpoint
    sampling (``sub`` points per bin). ``fq(points (P,)) -> (K, P)``. Returns (K,)."""
    counts = state.counts.numpy().astype(np.float64)
    n = state.bins
    r = 2.0**state.exp
    w = r / n
    occ = np.nonzero(counts)[0]
    left = -r + occ * w
    pts = (left[:, None] + (np.arange(sub) + 0.5)[None, :] * (w / sub)).ravel()
    wts = np.repeat(counts[occ] / counts.sum() / sub, sub)
    err = (fq(pts) - pts[None, :]) ** 2
    return err @ wts


# -- real activations ------------------------------------------------------------------------------
def _fmnist(n: int) -> torch.Tensor:
    with gzip.open(FMNIST, "rb") as f:
        raw = f.read()
    x = np.frombuffer(raw, dtype=np.uint8, offset=16)[: n * 784].reshape(n, 1, 28, 28)
    return (torch.from_numpy(x.astype(np.float32)) / 255.0 - 0.2860) / 0.3530


def _recipe(name: str = "vitq_test", **over) -> dict:
    r = {"name": name, "model": {"name": "quantcore/vit_fmnist"}, "placement": {"family": "vit", "mode": "ft1"},
         "quant": {"weights": {"bits": 4, "symmetric": True, "per_channel": True},
                   "activations": {"bits": 4, "symmetric": True}},
         "calibration": {"method": "mse", "weights_method": "mse", "bins": 2048}, "overrides": []}
    r.update(over)
    return r


def _demo_model() -> torch.nn.Module:
    from quantcore.models import vit_fmnist

    torch.manual_seed(0)
    m = vit_fmnist()
    m.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return m.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    if not FMNIST.is_file():
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST}")
    return _fmnist(256)


@pytest.fixture(scope="module")
def acts(images) -> dict[str, torch.Tensor]:
    """Post-softmax and post-GELU tensors of block 1 of the demo ViT on Fashion-MNIST test images."""
    return quantizer_inputs({"softmax": "blocks.1.attn.attn_quantizer", "gelu": "blocks.1.mlp.fc2.input_quantizer"},
                            images[:128])


def quantizer_inputs(sites: dict[str, str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the demo ViT's quantizers ``sites`` (key -> quantizer name) receive for images ``x``."""
    m = _demo_model()
    quantcore.prepare(m, recipe_from_dict(_recipe()))
    qs = quantizers(m)
    got = {}
    hooks = [qs[site].register_forward_pre_hook(lambda _m, a, k=k: got.__setitem__(k, a[0].detach().clone()))
             for k, site in sites.items()]
    quantcore.api.start_calibration(m)  # collecting quantizers pass their input through unchanged
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return got


def _calibrated(fmt: str, bits: int, x: torch.Tensor, calibrator: str = "mse", bins: int = 2048) -> TensorQuantizer:
    q = TensorQuantizer(QuantSpec(format=fmt, bits=bits, symmetric=False, calibrator=calibrator), bins=bins)
    q.start_calibration()
    q(x)
    assert q.finalize()
    return q


# -- the grids against the references --------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt,k", [("log2", 1), ("log_sqrt2", 2)])
@pytest.mark.parametrize("calibrator", ["max", "mse"])
def test_log_grid_matches_reference(acts, fmt, k, bits, calibrator):
    x = acts["softmax"]
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    q = _calibrated(fmt, bits, x, calibrator)
    s = float(q.amax)
    if calibrator == "max":
        assert s == float(x.max())
    else:
        assert 0.25 * float(x.max()) <= s <= float(x.max())
    y = q(x)
    ref = ref_log(x.numpy(), s, bits, k)
    np.testing.assert_allclose(y.numpy(), ref, rtol=2e-6, atol=0)
    # the grid has at most 2**bits non-zero levels, all of the form s * 2**(-j/k)
    levels = np.unique(y.numpy()[y.numpy() > 0])
    assert len(levels) <= 2**bits
    j = -k * np.log2(levels / s)
    np.testing.assert_allclose(j, np.round(j), atol=1e-4)
    # the search improves on (or matches) the plain max scale
    if calibrator == "mse":
        mse = float(((y - x) ** 2).mean())
        qmax = _calibrated(fmt, bits, x, "max")
        assert mse <= float(((qmax(x) - x) ** 2).mean()) * 1.0001


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt,k", [("log2", 1), ("log_sqrt2", 2)])
def test_log_grid_edge_cases(fmt, k, bits):
    s = 0.75
    q = TensorQuantizer(QuantSpec(format=fmt, bits=bits, symmetric=False, calibrator="max"))
    q.set_range(0.0, s)
    n = 2**bits
    codes = torch.arange(min(n, 120), dtype=torch.float64)  # float32 normals (2**-126 and up)
    exact = (s * torch.exp2(-codes / k)).float()  # every grid point maps to itself
    above = torch.tensor([s, 0.9, 1.0, 5.0])       # values above amax take code 0 = s
    below = torch.tensor([s * 2.0 ** (-(n + 1) / k), 0.0] + ([1e-30] if bits == 4 else []))  # past the last code
    x = torch.cat([exact, above, below])
    y = q(x)
    c = len(codes)
    np.testing.assert_allclose(y[:c].numpy(), exact.numpy(), rtol=2e-7)
    assert torch.all(y[c:c + 4] == torch.tensor(s))
    assert torch.all(y[c + 4:] == 0)
    np.testing.assert_allclose(y.numpy(), ref_log(x.numpy(), s, bits, k), rtol=2e-6)
    # exact powers of two below s = 1 (FQ-ViT's setting) land exactly on log2 codes
    q.set_range(0.0, 1.0)
    p2 = torch.tensor([2.0**-j for j in range(min((n - 1) // k + 1, 20))])
    assert torch.equal(q(p2), p2) if k == 1 else torch.allclose(q(p2), p2, rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["softmax", "gelu"])
def test_twin_matches_reference(acts, kind, bits):
    x = acts[kind]
    q = _calibrated("twin_int", bits, x)
    enc = q.spec.kind.encoding(q)
    assert enc["region_convention"] == kind
    d1, d2, m = enc["delta1"], enc["delta2"], enc["exponent_m"]
    assert d2 == d1 * 2.0**m  # PTQ4ViT's power-of-two constraint, exactly
    if kind == "softmax":
        assert d2 == pytest.approx(1 / (2 ** (bits - 1) - 1))
    else:
        assert -2 ** (bits - 1) * d1 >= float(x.min()) - 1e-7  # R1 within the negative range
    y = q(x)
    ref = ref_twin(x.numpy(), d1, d2, bits, kind == "gelu")
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert len(np.unique(y.numpy())) <= 2**bits


def test_twin_edge_cases():
    # GELU form, 4 bits: d1 = 0.02, m = 3 -> d2 = 0.16
    q = TensorQuantizer(QuantSpec(format="twin_int", bits=4, symmetric=False, calibrator="mse"))
    q.set_range(-8 * 0.02, 7 * 0.16)
    x = torch.tensor([0.0, -0.02, -0.16, -1.0, 0.16, 0.08, 1.12, 9.0, -0.0099])
    y = q(x)
    np.testing.assert_allclose(y.numpy(), ref_twin(x.numpy(), 0.02, 0.16, 4, True), rtol=1e-6, atol=1e-8)
    assert y[3] == pytest.approx(-0.16) and y[7] == pytest.approx(1.12)  # both ends clip
    # softmax form, 8 bits: amax = 2**-m
    q.set_spec(QuantSpec(format="twin_int", bits=8, symmetric=False, calibrator="mse"))
    q.set_range(0.0, 2.0**-5)
    d2 = 1 / 127
    d1 = d2 / 32
    x = torch.tensor([0.0, d1, 127 * d1, 128 * d1 - 1e-6, 128 * d1 + 1e-6, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(q(x).numpy(), ref_twin(x.numpy(), d1, d2, 8, False), rtol=1e-6, atol=1e-9)


# -- range searches: the brute-force optimum of their objective --------------------------------------
@pytest.mark.parametrize("fmt,k", [("log2", 1), ("log_sqrt2", 2)])
def test_log_search_is_brute_force_optimum(acts, fmt, k):
    x = acts["softmax"]
    q = _calibrated(fmt, 4, x, bins=512)
    st = q.collector
    smax = float(x.max())
    cands = smax * 2.0 ** -np.linspace(0, 2, 1601)
    bf = sampled_objective(st, lambda p: np.stack([ref_log(p, s, 4, k) for s in cands]))
    got = sampled_objective(st, lambda p: ref_log(p, float(q.amax), 4, k)[None, :])[0]
    assert got <= bf.min() * (1 + 1e-3)
    # and it is a real choice: the objective varies by far more than that over the candidates
    assert bf.max() > 1.5 * bf.min()


def test_twin_softmax_search_is_brute_force_optimum(acts):
    x = acts["softmax"]
    q = _calibrated("twin_int", 4, x, bins=512)
    d2 = 1 / 7
    ms = np.arange(0, 25)
    bf = sampled_objective(q.collector, lambda p: np.stack([ref_twin(p, d2 / 2.0**m, d2, 4, False) for m in ms]))
    assert q.spec.kind.encoding(q)["exponent_m"] == int(ms[np.argmin(bf)])


def test_twin_gelu_search_is_brute_force_optimum(acts):
    x = acts["gelu"]
    bits, n = 4, 8
    q = _calibrated("twin_int", bits, x, bins=512)
    a = -float(x.min()) * np.linspace(0.02, 1.0, 250)
    ms = np.arange(-2, 11)

    def fq(p):
        return np.stack([ref_twin(p, ai / n, ai / n * 2.0**m, bits, True) for ai in a for m in ms])

    bf = sampled_objective(q.collector, fq, sub=8)
    enc = q.spec.kind.encoding(q)
    got = sampled_objective(q.collector, lambda p: ref_twin(p, enc["delta1"], enc["delta2"], bits, True)[None, :],
                            sub=8)[0]
    assert got <= bf.min() * (1 + 2e-3)


# -- errors ------------------------------------------------------------------------------------------
def test_negative_inputs_are_refused_naming_the_format(acts):
    with pytest.raises(ValueError, match=r"format 'log2'.*non-negative"):
        _calibrated("log2", 4, acts["gelu"])
    with pytest.raises(ValueError, match=r"format 'log_sqrt2'.*non-negative"):  # max too: at calibration
        _calibrated("log_sqrt2", 4, acts["gelu"], calibrator="max")
    with pytest.raises(ValueError, match=r"format 'twin_int'.*post-softmax.*reach"):
        _calibrated("twin_int", 4, acts["softmax"] * 3)  # non-negative but beyond [0, 1]


def test_constant_data_follow_the_kinds_own_rules():
    """One distinct value skipped the kind's own range search: twin_int accepted a constant 3.0 (which
    its post-softmax form cannot carry: q(3.0) gave 2.99 while its encoding said it covers [0, 1]) and
    stored 0.3 as amax for a constant 0.3, not its grid's top 2**-m."""
    with pytest.raises(ValueError, match=r"format 'twin_int'.*post-softmax.*reach"):
        _calibrated("twin_int", 8, torch.full((500,), 3.0))
    q = _calibrated("twin_int", 8, torch.full((500,), 0.3))
    m = q.spec.kind.encoding(q)["exponent_m"]
    assert float(q.amax) == 2.0 ** -m and float(q.amax) >= 0.3
    assert abs(float(q(torch.tensor([0.3]))) - 0.3) <= 0.5 / 127  # within half a step of its region
    for fmt in ("log2", "log_sqrt2"):  # a constant is still refused below zero, kept above
        with pytest.raises(ValueError, match=rf"format '{fmt}'.*non-negative"):
            _calibrated(fmt, 4, torch.full((500,), -0.5))


@pytest.mark.parametrize("patch,msg", [
    ({"format": "log2"}, r"'log2'.*symmetric: false"),
    ({"format": "log2", "symmetric": False, "per_channel": True}, r"'log2'.*per-tensor"),
    ({"format": "log_sqrt2", "symmetric": False, "calibrator": "entropy"}, r"'log_sqrt2' takes calibrator"),
    ({"format": "twin_int", "symmetric": True}, r"twin_int.*symmetric: false"),
    ({"format": "twin_int", "symmetric": False, "calibrator": "max"}, r"'twin_int' takes calibrator"),
])
def test_invalid_specs_are_refused_naming_the_override(patch, msg):
    # an override is a partial spec: it is checked where it applies, and the error names it
    r = recipe_from_dict(_recipe(overrides=[{"match": SOFTMAX, "spec": patch}]))
    with pytest.raises(ValueError, match=msg) as err:
        quantcore.prepare(_demo_model(), r)
    assert "overrides" in str(err.value) and "attn_quantizer" in str(err.value)
    with pytest.raises(ValueError, match=msg):  # and the spec itself, wherever it is built
        QuantSpec(**{k: v for k, v in patch.items() if k != "per_channel"}, **({"axis": 0} if "per_channel" in patch else {}))


def test_unknown_format_names_the_recipe_field(tmp_path):
    import yaml

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(_recipe(overrides=[{"match": SOFTMAX, "spec": {"format": "log3"}}])))
    with pytest.raises(RecipeError, match=r"bad\.yaml.*overrides\.0\.spec\.format.*unknown quantizer format 'log3'.*log2"):
        quantcore.recipe.load_recipe(str(p))
    with pytest.raises(RecipeError, match=r"quant\.activations\.format.*'log3'"):
        recipe_from_dict(_recipe(quant={"activations": {"format": "log3"}}))


def test_straight_through_gradient(acts):
    x = acts["softmax"][:4].clone().requires_grad_(True)
    q = _calibrated("log_sqrt2", 4, x.detach(), "mse")
    y = q(x)
    y.sum().backward()
    inside = (x.detach() <= float(q.amax)).float()
    assert torch.equal(x.grad, inside)
    g = acts["gelu"][:4].clone().requires_grad_(True)
    qt = _calibrated("twin_int", 4, g.detach())
    qt(g).pow(2).sum().backward()
    assert torch.isfinite(g.grad).all() and (g.grad != 0).any()


# -- the whole path: recipe -> calibrate -> encodings -> save/load ------------------------------------
def test_recipe_calibrate_save_load_roundtrip(images, tmp_path):
    r = recipe_from_dict(_recipe(overrides=[
        {"match": SOFTMAX, "spec": {"format": "log_sqrt2", "symmetric": False}},
        {"match": "blocks.0.attn.attn_quantizer", "spec": {"format": "log2", "symmetric": False, "calibrator": "max"}},
        {"match": GELU, "spec": {"format": "twin_int", "symmetric": False}},
        {"match": "blocks.3.attn.attn_quantizer", "spec": {"format": "twin_int", "symmetric": False}}]))
    m = quantcore.prepare(_demo_model(), r)
    quantcore.calibrate(m, [images[:64], images[64:128]])
    x = images[128:192]
    with torch.no_grad():
        y = m(x)
    enc = {row["name"]: row for row in quantcore.encodings(m)["quantizers"]}
    assert enc["blocks.0.attn.attn_quantizer"]["format"] == "log2"
    assert enc["blocks.1.attn.attn_quantizer"]["log_base"] == "sqrt2"
    assert "formula" in enc["blocks.1.attn.attn_quantizer"] and enc["blocks.1.attn.attn_quantizer"]["scale"] > 0
    row = enc["blocks.2.mlp.fc2.input_quantizer"]
    assert row["region_convention"] == "gelu" and row["delta2"] == row["delta1"] * 2.0 ** row["exponent_m"]
    assert enc["blocks.3.attn.attn_quantizer"]["region_convention"] == "softmax"
    import json

    json.dumps(quantcore.encodings(m))  # plain JSON
    uri = str(tmp_path / "m.qc.pt")
    quantcore.save(m, uri)
    m2 = quantcore.load(uri)
    with torch.no_grad():
        y2 = m2(x)
    assert torch.equal(y, y2)
    q1, q2 = quantizers(m), quantizers(m2)
    for name in q1:
        assert q1[name].spec == q2[name].spec
        assert torch.equal(q1[name].amin, q2[name].amin) and torch.equal(q1[name].amax, q2[name].amax)
    assert quantcore.encodings(m2)["quantizers"] == quantcore.encodings(m)["quantizers"]
    # and the new kinds change the output relative to the float path (they are on)
    with torch.no_grad(), quantcore.api.quantization_disabled(m2):
        assert not torch.equal(m2(x), y)


@pytest.mark.parametrize("method", ["mse", "max"])
def test_calibration_error_names_the_quantizer(method):
    """Negative (post-GELU) data reaching a log2 grid: calibration (max statistics too, not the first
    forward after it) refuses it naming the quantizer, not only the format."""
    import quantcore

    rec = quantcore.load_recipe({
        "name": "bad_log2", "model": {"name": "quantcore/vit_fmnist", "kwargs": {"depth": 1}},
        "calibration": {"method": method, "num_batches": 1},
        "overrides": [{"match": "blocks.*.mlp.fc2.input_quantizer",
                       "spec": {"format": "log2", "symmetric": False}}]})
    torch.manual_seed(0)
    model = quantcore.build_model(rec)
    quantcore.prepare(model, rec)
    with pytest.raises(quantcore.CalibrationError, match=r"'blocks\.0\.mlp\.fc2\.input_quantizer'.*log2"):
        quantcore.calibrate(model, [(torch.randn(4, 1, 28, 28), torch.zeros(4))])


@pytest.mark.parametrize("fmt", ["log2", "log_sqrt2", "twin_int"])
def test_reports_name_the_grid_not_int(fmt):
    """Analysis tables, errors and repr show ``spec.short()``: a 4-bit log2/twin grid is not int4."""
    s = QuantSpec(format=fmt, bits=4, symmetric=False, calibrator="mse" if fmt == "twin_int" else "max").short()
    assert s.startswith(f"{fmt}:4b/") and "int4" not in s
    assert QuantSpec(format="int", bits=4).short().startswith("int4/")


@pytest.mark.parametrize("fmt, kind", [("twin_int", "softmax"), ("twin_int", "gelu"), ("log2", "softmax"),
                                       ("log_sqrt2", "softmax"), ("int", "softmax"), ("int", "gelu")])
def test_represented_range_is_where_the_grid_clips_and_analysis_uses_it(acts, fmt, kind):
    """Every kind's ``represented_range`` is the interval its fake quant clips to (checked by
    brute force: the outputs never leave it, and values beyond it land on its ends), and the error
    analysis counts as clipped exactly the values the grid moves to an end from outside: on real
    post-softmax data a twin grid clips nothing (its second region reaches 1), whatever its stored
    ``amax`` (the first region's top) says."""
    from quantcore.analysis.error_analysis import _Stats

    x = acts[kind]
    q = _calibrated(fmt, 4, x)
    lo, hi = (float(t) for t in q.spec.kind.represented_range(q))
    y = q(x)
    assert float(y.min()) >= lo - 1e-7 and float(y.max()) <= hi + 1e-7
    far = torch.tensor([hi * 4 + 1.0, lo * 4 - 1.0 if lo < 0 else lo])
    assert torch.allclose(q(far), torch.tensor([hi, lo]), atol=1e-6)
    st = _Stats()
    st.add(x, q)
    res = st.result(q, clip_warn=0.01, outlier_warn=20.0)
    brute = int(((x > hi) | (x < lo)).sum()) / x.numel()
    assert res["clip_fraction"] == pytest.approx(brute, abs=1e-9)
    if fmt == "twin_int" and kind == "softmax":
        assert float(x.max()) <= 1 and res["clip_fraction"] == 0 and hi == pytest.approx(1.0)
        assert q.spec.kind.encoding(q)["covers"] == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("fmt,family", [("int", "vit"), ("log2", "vit"), ("twin_int", "generic")])
def test_a_per_tensor_weight_request_under_ft1_is_kept(fmt, family):
    """ft1 (the default mode of any model with attention, family generic too) quantizes block Linear
    weights per channel only because that is quant.weights' default: a recipe's per_channel: false (a
    per-tensor-only format needs it) gives per-tensor weights on every Linear, inside blocks too, with
    no note; the weights are then quantized with one scale per tensor."""
    import quantcore
    from quantcore.models import vit_fmnist

    rec = {"name": "w", "model": {"name": "quantcore/vit_fmnist"}, "placement": {"family": family},
           "quant": {"weights": {"format": fmt, "bits": 8, "symmetric": False, "per_channel": False}},
           "calibration": {"weights_method": "mse" if fmt == "twin_int" else "max"}}
    m = quantcore.prepare(vit_fmnist(), rec)
    ws = {n: q for n, q in m.named_modules() if n.endswith("weight_quantizer")}
    assert len(ws) >= 16 and all(q.spec.axis is None for q in ws.values()), {n: q.spec.axis for n, q in ws.items()}
    assert any(".attn.qkv." in n for n in ws) and m.quantcore_placement.notes == []
    if fmt == "int":
        quantcore.calibrate(m, [torch.randn(8, 1, 28, 28)])
        q = ws["blocks.0.attn.qkv.weight_quantizer"]
        assert q.amax.numel() == 1 and q.amin.numel() == 1
        w = m.blocks[0].attn.qkv.weight.detach()
        lo, hi = float(w.min()), float(w.max())  # max calibrator: one asymmetric range over the whole tensor
        assert float(q.amin) == pytest.approx(min(lo, 0.0), rel=1e-5) and float(q.amax) == pytest.approx(max(hi, 0.0), rel=1e-5)


def test_ft2_per_tensor_block_weights_are_said_and_an_override_sets_them(tmp_path):
    """ft2 quantizes block Linear weights per tensor whatever quant.weights' granularity is (the mode's
    definition): the placement says so (notes, report), and an override on weight quantizer names
    keeps chosen ones per channel."""
    import quantcore
    from quantcore.models import vit_fmnist
    from quantcore.report import report_markdown

    rec = {"name": "w", "placement": {"family": "vit", "mode": "ft2"}, "quant": {"weights": {"bits": 8}}}
    m = quantcore.prepare(vit_fmnist(), rec)
    axes = {n: q.spec.axis for n, q in m.named_modules() if n.endswith("weight_quantizer")}
    assert set(axes.values()) == {None}
    (note,) = m.quantcore_placement.notes
    assert "ft2" in note and f"{len(axes)} transformer-block" in note and "per tensor" in note
    md = report_markdown({"model": "m", "created": "now", "data": {}, "results": {}, "versions": {},
                          "variants": {"w": {"placement": m.quantcore_placement.as_dict()}}})
    assert f"- {note}" in md.splitlines()
    rec["overrides"] = [{"match": "blocks.0.*.weight_quantizer", "spec": {"per_channel": True}}]
    m = quantcore.prepare(vit_fmnist(), rec)
    axes = {n: q.spec.axis for n, q in m.named_modules() if n.endswith("weight_quantizer")}
    assert {n for n, a in axes.items() if a == 0} == {n for n in axes if n.startswith("blocks.0.")} != set()
    (note,) = m.quantcore_placement.notes
    assert f"{len(axes) - 4} transformer-block" in note
    rec["quant"]["weights"]["per_channel"] = False
    rec.pop("overrides")
    assert quantcore.prepare(vit_fmnist(), rec).quantcore_placement.notes == []  # asked for: nothing to say
