"""quantcore export: ONNX QDQ graphs checked by onnx.checker and run in onnxruntime against quantcore's own
fake-quant model (real Fashion-MNIST images, the model zoo), AIMET 2.0.0 encodings round trips checked
against torch's fake-quant kernels, the TensorRT range table, and the CLI."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from quantcore import api  # noqa: E402
from quantcore.demo import FMNIST_DIR, load_fashion_mnist  # noqa: E402
from quantcore.export import ExportError, check_model, export_onnx, float_graph, graph_quantizers, ort_session  # noqa: E402
from quantcore.export.aimet import encodings_v2, load_encodings  # noqa: E402
from quantcore.export.run import CheckData, compare, export_checkpoint  # noqa: E402
from quantcore.export.trt_table import range_table, read_calibration_cache, calibration_cache  # noqa: E402
from quantcore.placement import quantizers  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HAVE_FMNIST = (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed")
ONNX_DTYPE = {v: k for k, v in onnx.TensorProto.DataType.items()}


@pytest.fixture(scope="module")
def fmnist():
    data = load_fashion_mnist()

    def tensors(split, n, start=0):
        x, y = data[split]
        x = torch.from_numpy(x[start:start + n].copy()).float().div(255).unsqueeze(1)
        return (x - 0.2860) / 0.3530, torch.from_numpy(y[start:start + n].astype("int64"))

    return tensors("train", 256), tensors("test", 512)


def _tiny_fmnist(recipe_name: str, calib, **quant):
    """The demo ViT (2 blocks, random weights) prepared with a demo recipe and calibrated on real images."""
    from quantcore.recipe import load_recipe

    recipe = load_recipe(recipe_name)
    data = recipe.model_dump(mode="json")
    data["model"]["kwargs"] = {"depth": 2}
    data["calibration"]["num_batches"] = 4
    if quant:
        for k, v in quant.items():
            data["quant"][k].update(v)
    torch.manual_seed(0)
    model = api.build_model(data, load_weights=False)
    api.prepare(model, data)
    x, y = calib
    api.calibrate(model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)])
    return model


def _initializers(proto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _assert_rows_in_graph(rows, proto, opset: int = 17):
    """Every encodings.json row: its Q/DQ (or Cast) nodes named after it, its ONNX type and its scale /
    zero point as the named initializers (at opset 21 a signed 8-bit activation is written as UINT8
    with its zero point + 128: the same values)."""
    found = graph_quantizers(proto)
    inits = {i.name: i for i in proto.graph.initializer}
    arrays = _initializers(proto)
    checked = 0
    for row in rows:
        name = row["name"]
        if not row["enabled"] or row.get("calibrated") is False:
            assert name not in found
            continue
        assert name in found, f"{name} has no node in the graph"
        rec = found[name]
        if row["format"] in ("fp16", "bf16"):
            assert rec["op"] == "cast" and rec["nodes"][:2] == [f"{name}/Cast_to", f"{name}/Cast_back"]
            continue
        assert f"{name}/QuantizeLinear" in rec["nodes"] and f"{name}/DequantizeLinear" in rec["nodes"]
        signed = row["quant_min"] < 0
        want = {(8, True): "INT8", (8, False): "UINT8", (4, True): "INT4", (4, False): "UINT4"}[(row["bits"], signed)]
        shift = 128 if (want == "INT8" and opset >= 21 and row["kind"] == "activation") else 0
        assert ONNX_DTYPE[inits[f"{name}.zero_point"].data_type] == ("UINT8" if shift else want)
        np.testing.assert_allclose(arrays[f"{name}.scale"].reshape(-1), np.asarray(row["scale"], np.float32).reshape(-1),
                                   rtol=1e-6)
        assert arrays[f"{name}.zero_point"].reshape(-1).tolist() == \
            (np.asarray(row["zero_point"]).reshape(-1) + shift).tolist()
        if row["axis"] is not None:
            q = next(n for n in proto.graph.node if n.name == f"{name}/QuantizeLinear")
            assert next(a.i for a in q.attribute if a.name == "axis") == 0  # output channel of the weight
        checked += 1
    return checked


# -- the demo ViT on real images ---------------------------------------------------------------------------
@needs_fmnist
@pytest.mark.parametrize("recipe,opset,asked", [("fmnist_w8a8_ft2", 17, None), ("fmnist_w8a8_ft1", 17, None),
                                                ("fmnist_w4a4_ft1", 21, None), ("fmnist_w8a8_ft1", 21, 21)])
def test_every_quantizer_of_encodings_json_is_a_named_qdq_pair_and_onnxruntime_agrees(fmnist, recipe, opset, asked):
    """... also at opset 21 with 8-bit activations (--opset 21, or a 4-bit override beside them), whose
    graph onnxruntime's default optimizations must load (its int8->uint8 rewrite failed there)."""
    model = _tiny_fmnist(recipe, fmnist[0])
    xe, ye = fmnist[1]
    ex = export_onnx(model, xe[:1], opset=asked)
    assert ex.opset == opset
    check_model(ex.model)
    rows = api.encodings(model)["quantizers"]
    # ft2: 17 per block (3 weighted ops x 3 + fc2 x 3 + 5 attention) incl. GEMM outputs; all must be there
    assert _assert_rows_in_graph(rows, ex.model, opset) == len(rows) == len(quantizers(model))
    attn = [r["name"] for r in rows if r["name"].endswith(("q_quantizer", "k_quantizer", "v_quantizer",
                                                           "softmax_input_quantizer", "attn_quantizer"))]
    assert len(attn) >= 8  # both attention matmuls' operands (and the softmax) of both blocks
    res = compare(model, ex.to_bytes(), xe, ye, optimization="all-exact")
    assert res["top1_agreement"] >= 99.8 and abs(res["top1_delta"]) <= 0.2
    assert compare(model, ex.to_bytes(), xe[:64], optimization="all")["top1_agreement"] >= 95  # onnxruntime's defaults load it
    # Without onnxruntime's fusions the graph is the fake-quant arithmetic itself
    exact = compare(model, ex.to_bytes(), xe[:64], optimization="disable")
    assert exact["top1_agreement"] == 100.0 and exact["max_abs_logit_diff"] < 1e-3


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    """The demo pipeline on the trained demo ViT shipped with quantcore (88.25 % top-1, real activation
    statistics): packed Fashion-MNIST, PTQ of the three demo recipes -> ``(store, {recipe: ckpt dir})``."""
    from quantcore.demo import DEMO_RECIPES, SHIPPED_FP32, pack_fashion_mnist
    from quantcore.pipeline import DataSpec, RunOptions, ptq
    from quantcore.recipe import load_recipe

    store = tmp_path_factory.mktemp("demo")
    data = str(store / "fashion-mnist")
    pack_fashion_mnist(data, log=lambda m: None)
    weights = str(SHIPPED_FP32)
    ptq([load_recipe(n) for n in DEMO_RECIPES], DataSpec(data, "train"), DataSpec(data, "test", limit=500),
        str(store / "runs"), RunOptions(batch_size=500, num_workers=0, device="cpu", progress=False, checkpoint=weights))
    return data, {n: store / "runs" / n for n in DEMO_RECIPES}


@needs_fmnist
@pytest.mark.parametrize("recipe", ["fmnist_w8a8_ft1", "fmnist_w8a8_ft2", "fmnist_w4a4_ft1"])
def test_trained_demo_checkpoints_on_the_whole_test_set(trained_demo, recipe, tmp_path):
    """The acceptance: all 10,000 Fashion-MNIST test images, ONNX (onnxruntime, every fusion and integer
    kernel that keeps values) vs the checkpoint's fake-quant model, on a trained demo ViT."""
    data, runs = trained_demo
    ck = runs[recipe] / "model.qc.pt"
    rep = export_checkpoint(str(ck), str(tmp_path), "onnx", check=CheckData(data, "test"))
    c = rep["check"]
    assert c["images"] == 10000 and "subset" not in c
    assert c["top1_agreement"] >= 99.9 and abs(c["top1_delta"]) <= 0.1
    assert not [w for w in rep.get("warnings", []) if "check images" in w]  # rounding ties are not warned about
    rows = json.loads((ck.parent / "encodings.json").read_text())["quantizers"]
    assert _assert_rows_in_graph(rows, onnx.load(str(tmp_path / "model.onnx"))) == len(rows)


# -- the model zoo --------------------------------------------------------------------------------------------
ZOO_EXPORT = ["timm:vit_tiny_patch16_224", "timm:deit_tiny_distilled_patch16_224", "timm:coat_lite_tiny",
              "timm:mobilevit_xxs", "timm:resnet18", "torchvision:resnext50_32x4d", "torchvision:vit (MultiheadAttention)",
              "hf:ViTForImageClassification (sdpa)", "hf:ViTForImageClassification (eager)",
              "hf:MobileViTForImageClassification", "hf:SwinForImageClassification"]


@pytest.mark.parametrize("name", ZOO_EXPORT)
def test_zoo_family_exports_and_runs(name):
    entry = next(e for e in zoo.ZOO if e.name == name)
    model = zoo.build(entry)
    calib, held = zoo.images(4, entry.size, seed=0), zoo.images(4, entry.size, seed=1)
    api.prepare(model, zoo.recipe_for("max"), example_input=calib[:2])
    api.calibrate(model, [(calib, None)])
    ex = export_onnx(model, held[:1])
    check_model(ex.model)
    active = {n for n, q in quantizers(model).items() if q.active}
    assert active == set(graph_quantizers(ex.model))
    for mod in model.quantcore_placement.attention:  # attention quantizers where quantcore applies them
        assert {f"{mod}.q_quantizer", f"{mod}.k_quantizer", f"{mod}.v_quantizer", f"{mod}.attn_quantizer"} <= active
    with torch.no_grad():
        fq = zoo.logits(model(held))
        nudged = zoo.logits(model(held + 1e-5 * torch.randn(held.shape, generator=torch.Generator().manual_seed(2))))
    out = torch.from_numpy(ort_session(ex.to_bytes(), optimization="all-exact").run(None, {"input": held.numpy()})[0])
    # onnxruntime's float ops differ from torch's in the last bits, which moves a value across a rounding tie
    # now and then (x / s in QuantizeLinear vs x * (1/s) in torch too). Most models then agree to > 100 dB;
    # some random-weight ones (CoaT, MobileViT) are chaotic at the grid: a 1e-5 input nudge alone moves
    # their fake-quant logits to ~25 dB. ONNX must be as close as that nudge, or 60 dB.
    assert zoo.sqnr_db(fq, out) >= min(60.0, zoo.sqnr_db(fq, nudged) - 3.0)


def test_fp16_quantizers_are_cast_pairs():
    entry = next(e for e in zoo.ZOO if e.name == "timm:vit_tiny_patch16_224")
    model = zoo.build(entry)
    x = zoo.images(2, entry.size)
    recipe = zoo.recipe_for("max")
    recipe["quant"] = {"weights": {"format": "fp16"}, "activations": {"format": "fp16"}}
    recipe["calibration"].pop("method", None)  # casts: no calibrator to name
    api.prepare(model, recipe, example_input=x)
    ex = export_onnx(model, x[:1])
    check_model(ex.model)
    rows = api.encodings(model)["quantizers"]
    assert _assert_rows_in_graph(rows, ex.model) == 0 and set(graph_quantizers(ex.model)) == {r["name"] for r in rows}
    with torch.no_grad():
        fq = model(x)
    out = ort_session(ex.to_bytes()).run(None, {"input": x.numpy()})[0]
    assert zoo.sqnr_db(fq, torch.from_numpy(out)) > 60


def _nested_cnn():
    """Sequentials inside Sequentials inside a named child (torchvision RegNet's ``f.a.0``,
    mobilenet's ``features.3.block.1.0``)."""
    torch.manual_seed(0)
    seq = torch.nn.Sequential

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = torch.nn.Module()
            self.f.a = seq(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
            self.f.b = seq(seq(torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU()), seq(torch.nn.Conv2d(8, 8, 1)))

        def forward(self, x):
            return x + self.f.b(self.f.a(x))

    return seq(torch.nn.Conv2d(3, 8, 3, padding=1), seq(Block(), Block()), torch.nn.AdaptiveAvgPool2d(1),
               torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()


@pytest.mark.parametrize("fp16", ["all", "one nested"])
def test_fp16_quantizers_inside_nested_sequentials_are_cast_pairs(fp16):
    """The exporter scopes a Sequential's item as the container's component extended (``/f/a/a.0/``):
    the casts of quantizers there were not found by name and the whole export was refused."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    recipe = {"name": "t", "placement": {"family": "generic"}, "calibration": {} if fp16 == "all" else {"method": "max"},
              "quant": {"weights": {"format": "fp16"}, "activations": {"format": "fp16"}} if fp16 == "all" else {},
              "overrides": [] if fp16 == "all" else [{"match": "1.1.f.b.0.0.input_quantizer", "spec": {"format": "fp16"}}]}
    model = api.prepare(_nested_cnn(), recipe, example_input=x)
    api.calibrate(model, [x])
    ex = export_onnx(model, x[:1])
    check_model(ex.model)
    rows = [r for r in api.encodings(model)["quantizers"] if r.get("enabled", True)]
    assert "1.1.f.b.0.0.input_quantizer" in {r["name"] for r in rows}
    assert set(graph_quantizers(ex.model)) == {r["name"] for r in rows}
    with torch.no_grad():
        fq = model(x)
    out = ort_session(ex.to_bytes()).run(None, {"input": x[:1].numpy()})[0]
    assert zoo.sqnr_db(fq[:1], torch.from_numpy(out)) > 60


def test_scope_names_of_nested_containers():
    from quantcore.export.onnx_qdq import _scope_name

    assert _scope_name("/blocks/blocks.0/attn/q_quantizer/Cast", "") == "blocks.0.attn.q_quantizer"
    assert _scope_name("/model/t/block1/block1-0/f/a/a.0/input_quantizer/Cast_1", "model.") == \
        "t.block1.block1-0.f.a.0.input_quantizer"
    assert _scope_name("/features/features.3/block/block.1/block.1.0/input_quantizer/Cast", "") == \
        "features.3.block.1.0.input_quantizer"
    assert _scope_name("/model.1/model.1.0/a/a.0/input_quantizer/Cast", "") == "1.0.a.0.input_quantizer"


# -- what cannot be exported ------------------------------------------------------------------------------------
@needs_fmnist
def test_refusals_name_the_quantizer_or_option(fmnist):
    log2 = _tiny_fmnist("fmnist_w8a8_ft2", fmnist[0])
    qname = "blocks.0.attn.attn_quantizer"
    q = quantizers(log2)[qname]
    q.set_spec(q.spec.model_copy(update={"format": "log2", "calibrator": "max"}))
    q.set_range(0.0, 1.0)
    with pytest.raises(ExportError, match=rf"quantizer {qname}: format 'log2'.*every export format") as err:
        export_onnx(log2, fmnist[1][0][:1])
    assert "AIMET encodings and the TensorRT range table" in str(err.value)  # not only "ONNX" for --format aimet
    six = _tiny_fmnist("fmnist_w8a8_ft2", fmnist[0], activations={"bits": 6})
    with pytest.raises(ExportError, match=r"quantizer blocks\.0\.attn\.qkv\.input_quantizer: 6-bit"):
        export_onnx(six, fmnist[1][0][:1])
    w4 = _tiny_fmnist("fmnist_w4a4_ft1", fmnist[0])
    with pytest.raises(ExportError, match=r"--opset 17: quantizer .* is INT4"):
        export_onnx(w4, fmnist[1][0][:1], opset=17)
    with pytest.raises(ExportError, match=r"--opset: 25"):
        export_onnx(w4, fmnist[1][0][:1], opset=25)


def _as_in_qat(model, factor: float):
    """Every active quantizer learnable, its scale moved by ``factor``: "trained", the ranges no longer
    match amin/amax."""
    for q in quantizers(model).values():
        if q.active:
            q.make_learnable()
    with torch.no_grad():
        for q in quantizers(model).values():
            if q.scale is not None:
                q.scale.mul_(factor)
    return model


@needs_fmnist
def test_qat_learnable_ranges_are_converted_on_a_copy(fmnist):
    model = _as_in_qat(_tiny_fmnist("fmnist_w8a8_ft2", fmnist[0]), 1.03)
    ex = export_onnx(model, fmnist[1][0][:1])
    assert all(q.scale is not None for q in quantizers(model).values() if q.spec.learnable)  # caller's model untouched
    res = compare(model, ex.to_bytes(), fmnist[1][0][:128], optimization="disable")
    assert res["top1_agreement"] == 100.0 and res["max_abs_logit_diff"] < 1e-3


# -- AIMET encodings ---------------------------------------------------------------------------------------------
@needs_fmnist
def test_a_narrow_range_grid_is_not_written_as_an_aimet_encoding(fmnist, tmp_path):
    """AIMET 2.0.0 encodings hold a type, scale and zero point: a narrow grid ([-127, 127]) would be
    read as the full int8 range. --format aimet refuses it naming the quantizer; `all` leaves the AIMET
    files out with that reason and still writes the ONNX model (whose Clip keeps the grid)."""
    from quantcore.export.run import export_model

    model = _tiny_fmnist("fmnist_w8a8_ft1", fmnist[0])
    q = quantizers(model)["blocks.0.attn.q_quantizer"]
    q.set_spec(q.spec.model_copy(update={"narrow_range": True}))
    with pytest.raises(ExportError, match=r"blocks\.0\.attn\.q_quantizer: narrow range \[-127, 127\].*AIMET"):
        export_model(model, str(tmp_path / "a"), formats=["aimet"])
    rep = export_model(model, str(tmp_path / "b"))
    assert rep["aimet"]["written"] is False and "narrow range" in rep["aimet"]["why"]
    assert (tmp_path / "b" / "model.onnx").is_file() and not (tmp_path / "b" / "model.encodings").exists()


@needs_fmnist
def test_aimet_encodings_round_trip(fmnist):
    a = _tiny_fmnist("fmnist_w8a8_ft1", fmnist[0])  # per-channel weights, asymmetric fc2 input / softmax output
    ex = export_onnx(a, fmnist[1][0][:1])
    fproto, tensor_map = float_graph(ex.model, ex.float_weights)
    check_model(fproto)
    doc = json.loads(json.dumps(encodings_v2(ex.plans, tensor_map)))
    assert doc["version"] == "2.0.0" and len(doc["encodings"]) == len(ex.plans)
    tensors = {o for n in fproto.graph.node for o in n.output} | {i.name for i in fproto.graph.initializer}
    assert {e["name"] for e in doc["encodings"]} <= tensors  # keyed by the float graph's tensor names
    w = next(e for e in doc["encodings"] if e["name"] == "blocks.0.attn.qkv.weight")
    assert w["output_dtype"] == "int8" and w["axis"] == 0 and len(w["y_scale"]) == a.blocks[0].attn.qkv.weight.shape[0] and "y_zero_point" not in w
    asym = next(e for e in doc["encodings"] if e["name"] == tensor_map["blocks.0.mlp.fc2.input_quantizer"][0])
    assert asym["output_dtype"] == "uint8" and isinstance(asym["y_zero_point"], int) and asym["y_zero_point"] > 0
    # Read back onto a model calibrated differently (fewer images, percentile): the file's ranges win
    b = _tiny_fmnist("fmnist_w8a8_ft1", (fmnist[0][0][:64] * 0.5, fmnist[0][1][:64]))
    assert not torch.equal(quantizers(b)["blocks.0.attn.qkv.input_quantizer"].amax,
                           quantizers(a)["blocks.0.attn.qkv.input_quantizer"].amax)
    res = load_encodings(b, doc, tensor_map, source="model.encodings")
    assert res["loaded"] == len(ex.plans) and not res["unmatched"] and not res["missing"]
    for name, qa in quantizers(a).items():
        qb = quantizers(b)[name]
        sa, za = qa.scale_zero_point()
        sb, zb = qb.scale_zero_point()
        torch.testing.assert_close(sb, sa, rtol=1e-6, atol=0)
        assert torch.equal(za, zb) and qa.spec.symmetric == qb.spec.symmetric and qa.spec.axis == qb.spec.axis
    x = fmnist[1][0][:64]
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


@needs_fmnist
@pytest.mark.parametrize("mode", ["ft1", "ft2"])
def test_float_graph_of_chained_quantizers_maps_every_quantizer(fmnist, mode):
    """quantize_residual puts a residual add's input quantizers right after GEMM output quantizers
    (ft2): quantizers reading other quantizers' outputs. The float graph AIMET encodings and TensorRT
    tables refer to must still resolve every tensor, give each quantizer its own tensor, compute the
    float model, and carry the encodings back onto the model."""
    from quantcore.recipe import load_recipe

    data = load_recipe(f"fmnist_w8a8_{mode}").model_dump(mode="json")
    data["model"]["kwargs"] = {"depth": 2}
    data["placement"]["quantize_residual"] = True
    torch.manual_seed(0)
    model = api.build_model(data, load_weights=False)
    api.prepare(model, data)
    x, y = fmnist[0]
    api.calibrate(model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)])
    assert any("residual" in n for n in quantizers(model))
    ex = export_onnx(model, fmnist[1][0][:1])
    fproto, tensor_map = float_graph(ex.model, ex.float_weights)
    check_model(fproto)
    assert set(tensor_map) == set(graph_quantizers(ex.model))
    names = [t for ts in tensor_map.values() for t in ts]
    assert len(names) == len(set(names))  # one tensor per quantizer use
    xe = fmnist[1][0][:32]
    out = ort_session(fproto.SerializeToString(), optimization="disable").run(None, {"input": xe.numpy()})[0]
    with torch.no_grad(), api.quantization_disabled(model):
        ref = model(xe)
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-4)
    doc = json.loads(json.dumps(encodings_v2(ex.plans, tensor_map)))
    res = load_encodings(model, doc, tensor_map, source="model.encodings")
    assert res["loaded"] == len(ex.plans) and not res["unmatched"] and not res["missing"]


def test_aimet_entries_match_torch_fake_quant_kernels():
    """A hand-written AIMET 2.0.0 file (as AIMET would calibrate it) against torch's own fake-quant ops."""
    entry = next(e for e in zoo.ZOO if e.name == "timm:vit_tiny_patch16_224")
    model = zoo.build(entry)
    x = zoo.images(2, entry.size)
    api.prepare(model, zoo.recipe_for("max"), example_input=x)
    tmap = {"blocks.0.mlp.fc2.input_quantizer": ["act"], "blocks.0.attn.qkv.weight_quantizer": ["w"]}
    rng = np.random.default_rng(0)
    wscale = (rng.random(576) * 0.01 + 1e-3).tolist()
    doc = {"version": "2.0.0", "encodings": [
        {"name": "act", "output_dtype": "uint8", "y_scale": 0.0123, "y_zero_point": 37},
        {"name": "w", "output_dtype": "int8", "y_scale": wscale, "axis": 0},
        {"name": "not_in_model", "output_dtype": "int8", "y_scale": 0.1}]}
    res = load_encodings(model, doc, tmap, strict=True)
    assert res["unmatched"] == ["not_in_model"]
    qa, qw = quantizers(model)["blocks.0.mlp.fc2.input_quantizer"], quantizers(model)["blocks.0.attn.qkv.weight_quantizer"]
    t = torch.randn(4, 17, 768) * 2
    ref = torch.fake_quantize_per_tensor_affine(t, 0.0123, 37, 0, 255)
    torch.testing.assert_close(qa(t), ref, rtol=0, atol=1e-6)
    wt = torch.randn(576, 192) * 0.3
    s = torch.tensor(wscale, dtype=torch.float32)
    ref = torch.fake_quantize_per_channel_affine(wt, s, torch.zeros(576, dtype=torch.int32), 0, -128, 127)
    torch.testing.assert_close(qw(wt), ref, rtol=0, atol=1e-6)
    with pytest.raises(ExportError, match=r"enc\.json: not an AIMET 2\.0\.0"):
        load_encodings(model, {"version": "1.0.0", "activation_encodings": {}}, tmap, source="enc.json")
    with pytest.raises(ExportError, match=r"enc\.json: encodings\[0\] .*signed type with a non-zero zero point"):
        load_encodings(model, {"version": "2.0.0", "encodings": [{"name": "act", "output_dtype": "int8",
                                                                  "y_scale": 0.1, "y_zero_point": 3}]}, tmap, source="enc.json")


# -- TensorRT range table ----------------------------------------------------------------------------------------
@needs_fmnist
def test_trt_range_table_and_cache(fmnist):
    model = _tiny_fmnist("fmnist_w8a8_ft2", fmnist[0])
    ex = export_onnx(model, fmnist[1][0][:1])
    _, tensor_map = float_graph(ex.model, ex.float_weights)
    table = range_table(ex.plans, tensor_map)
    qs = quantizers(model)
    acts = [n for n, q in qs.items() if q.active and q.kind == "activation"]
    assert sorted(r["quantizer"] for r in table["tensors"].values()) == sorted(acts)
    cache = read_calibration_cache(calibration_cache(table))
    for t, row in table["tensors"].items():
        q = qs[row["quantizer"]]
        assert cache[t] == pytest.approx(row["scale"], rel=1e-6)
        if q.spec.symmetric:  # TensorRT's amax/127 is quantcore's scale
            assert row["exact"] and row["scale"] == pytest.approx(float(q.scale_zero_point()[0]), rel=1e-6)
        else:  # asymmetric: widened to the larger side
            assert not row["exact"] and row["amax"] == pytest.approx(max(-float(q.amin), float(q.amax)), rel=1e-5)

    weights = [n for n, q in qs.items() if q.active and q.kind == "weight"]
    assert weights and all(table["skipped"][n].startswith("weight:") for n in weights)  # none silently dropped
    assert set(table["skipped"]) | {r["quantizer"] for r in table["tensors"].values()} == \
        {n for n, q in qs.items() if q.active}


def test_a_trt_table_that_would_hold_nothing_is_refused_or_left_out(fmnist, tmp_path):
    """W4A4: no quantizer is an INT8 per-tensor activation range, so a TensorRT table would be empty
    and TensorRT would calibrate everything itself: asked for alone it is refused (ExportError, exit 2
    from the CLI), naming the format and why; under ``all`` it is left out and the report says so."""
    from quantcore.errors import UserError
    from quantcore.export.run import export_model

    model = _tiny_fmnist("fmnist_w4a4_ft1", fmnist[0])
    with pytest.raises(UserError, match=r"trt-table: none of the \d+ quantizers.*4-bit grid.*--format onnx"):
        export_model(model, str(tmp_path / "alone"), "trt-table")
    assert not (tmp_path / "alone").exists() or not any((tmp_path / "alone").iterdir())
    rep = export_model(model, str(tmp_path / "all"), "all")
    assert rep["trt_table"]["written"] is False and "none of the" in rep["trt_table"]["why"]
    names = {p.name for p in (tmp_path / "all").iterdir()}
    assert "model.onnx" in names and "model.encodings" in names
    assert not names & {"trt_ranges.json", "trt_ranges.cache"}


# -- CLI -------------------------------------------------------------------------------------------------------------
def _tiny_checkpoint(tmp_path) -> tuple[Path, str]:
    """(image folder, calibrated checkpoint) of the tiny recipe, random weights."""
    from quantcore.data import eval_transform, make_loader, open_dataset
    from tiny_data import TINY_RECIPE, make_images

    root = make_images(tmp_path / "imgs")
    torch.manual_seed(0)
    model = api.build_model(TINY_RECIPE, load_weights=False)
    api.prepare(model, TINY_RECIPE)
    ds = open_dataset(str(root), "train", eval_transform(model))
    api.calibrate(model, [(x, y) for x, y, _ in make_loader(ds, 6)])
    ck = str(tmp_path / "model.qc.pt")
    api.save(model, ck)
    return root, ck


def test_cli_export_with_check_data_and_s3(tmp_path, s3_bucket, capsys):
    from quantcore.cli import main
    from quantcore.io import storage

    root, ck = _tiny_checkpoint(tmp_path)
    out = str(tmp_path / "export")
    assert main(["export", ck, "--out", out, "--check-data", str(root), "--check-split", "val"]) == 0
    rep = json.loads(Path(out, "export_report.json").read_text())
    assert rep["checker"]["ok"] and rep["check"]["images"] == 12 and rep["check"]["top1_agreement"] == 100.0
    for f in ("model.onnx", "model_float.onnx", "model.encodings", "tensor_map.json", "trt_ranges.json", "trt_ranges.cache"):
        assert Path(out, f).is_file()
    s3out = f"s3://{s3_bucket}/exp"
    assert main(["export", ck, "--out", s3out, "--format", "onnx,aimet"]) == 0
    check_model(onnx.load_from_string(storage.read_bytes(s3out + "/model.onnx")))
    assert json.loads(storage.read_bytes(s3out + "/model.encodings"))["version"] == "2.0.0"
    assert not storage.exists(s3out + "/trt_ranges.json")
    # another export into the same folder that would leave the first one's files beside its own: refused
    # before anything is written; the same formats again replace them
    before_enc = Path(out, "model.encodings").read_bytes()
    assert main(["export", ck, "--out", out, "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "already holds model_float.onnx" in err and "trt_ranges.cache" in err and "nothing was written" in err
    assert Path(out, "model.encodings").read_bytes() == before_enc
    # bad check data fails before any file is written; malformed or empty --out before any work
    assert main(["export", ck, "--out", str(tmp_path / "new"), "--check-data", str(root), "--check-split", "nope"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "new").exists()
    for bad in ("s3:/bucket/x", "", "s3://"):
        assert main(["export", ck, "--out", bad, "--format", "onnx"]) == 2
        assert "error:" in capsys.readouterr().err
    assert not Path("s3:").exists()
    assert main(["export", ck, "--out", out, "--format", "all,onnx"]) == 2
    assert "'all' already names every format" in capsys.readouterr().err
    # an output location that is a file: one error line naming it, exit 2, the file untouched
    before = Path(out, "model.onnx").read_bytes()
    assert main(["export", ck, "--out", str(Path(out, "model.onnx", "sub")), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "model.onnx is a file, not a directory" in err and "Traceback" not in err
    assert Path(out, "model.onnx").read_bytes() == before


def test_a_check_on_real_images_that_disagrees_is_a_warning(tmp_path, monkeypatch, capsys):
    """onnxruntime agreeing on 81.67 % of the check images (top-1 16.67 vs 25.00 %) was reported without a
    warning line or a warnings entry: only the 3-input smoke test could warn."""
    from quantcore.cli import main
    from quantcore.export import run as export_run

    root, ck = _tiny_checkpoint(tmp_path)
    real = export_run.compare

    def worse(m, onnx_bytes, x, y=None, *a, **k):  # onnxruntime flipping 4 of the 12 check images
        res = real(m, onnx_bytes, x, y, *a, **k)
        if y is not None:
            res.update(top1_agreement=res["top1_agreement"] - 100 * 4 / len(x), top1_onnx=res["top1_fake_quant"] - 25.0)
            res["top1_delta"] = res["top1_onnx"] - res["top1_fake_quant"]
        return res

    monkeypatch.setattr(export_run, "compare", worse)
    out = tmp_path / "e"
    assert main(["export", ck, "--out", str(out), "--format", "onnx", "--check-data", str(root),
                 "--check-split", "val"]) == 0
    said = [w for w in json.loads((out / "export_report.json").read_text())["warnings"] if "check images" in w
            and "default session" not in w]
    assert len(said) == 1 and "agrees with the quantized model on 66.67 %" in said[0], said
    assert "warning: on the 12 check images" in capsys.readouterr().err


def test_onnxruntimes_default_session_disagreeing_on_the_check_images_is_a_warning(tmp_path, monkeypatch, capsys):
    """The check runs onnxruntime without its two value-changing rewrites (all-exact); the default session
    a deployment gets (u8 activations, int32 biases) was compared and stored in check_ort_default, never
    warned about, though it agreed on 75 % of top-1 predictions on a ShuffleNet."""
    from quantcore.cli import main
    from quantcore.export import run as export_run

    root, ck = _tiny_checkpoint(tmp_path)
    real = export_run.compare

    def check_warnings(sessions: tuple[str, ...], out: Path) -> list[str]:
        """Export with the check, onnxruntime flipping 3 of the 12 check images in ``sessions``."""
        def worse(m, onnx_bytes, x, y=None, batch_size=250, optimization="all", *a, **k):
            res = real(m, onnx_bytes, x, y, batch_size, optimization, *a, **k)
            if y is not None and optimization in sessions:
                res.update(top1_agreement=res["top1_agreement"] - 100 * 3 / len(x))
            return res

        monkeypatch.setattr(export_run, "compare", worse)
        assert main(["export", ck, "--out", str(out), "--format", "onnx", "--check-data", str(root),
                     "--check-split", "val"]) == 0
        return json.loads((out / "export_report.json").read_text()).get("warnings", [])

    warned = check_warnings(("all",), tmp_path / "e")  # the default session only
    said = [w for w in warned if "default session" in w]
    assert len(said) == 1 and "on 75.00 % of the check images" in said[0], warned
    assert "QDQS8ToU8Transformer" in said[0] and "(all-exact, those two disabled: 100.00 %)" in said[0]
    assert not [w for w in warned if "check images" in w and w not in said]
    assert "default session options" in capsys.readouterr().err
    # all-exact as far off as the default session: its own warning says it, disabling the rewrites would not help
    warned = check_warnings(("all", "all-exact"), tmp_path / "e2")
    assert not [w for w in warned if "default session" in w] and [w for w in warned if "check images" in w]


def test_an_export_check_of_a_model_with_constant_logits_is_a_warning(tmp_path):
    """A quantized model whose logits are all 0 (every activation below its grid's smallest step: a
    random-weight EfficientNet) agreed with onnxruntime on 100 % and the export said nothing."""
    from quantcore.export.run import export_model

    q = _tiny_cnn(8)
    with torch.no_grad():
        q[-1].weight.zero_()
        q[-1].bias.zero_()
    rep = export_model(q, str(tmp_path / "o"), formats=["onnx"], x=torch.randn(1, 3, 16, 16))
    assert rep["smoke"]["constant_output"] and rep["smoke"]["max_abs_logit"] == 0
    said = [w for w in rep.get("warnings", []) if "logits are all 0" in w]
    assert len(said) == 1 and "says nothing" in said[0], rep.get("warnings")
    rep = export_model(_tiny_cnn(8), str(tmp_path / "p"), formats=["onnx"], x=torch.randn(1, 3, 16, 16))
    assert not rep["smoke"]["constant_output"] and not [w for w in rep.get("warnings", []) if "logits are" in w]


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from quantcore.cli import main

    assert main(["export", str(tmp_path / "missing.qc.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.qc.pt" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.qc.pt"), "--out", str(tmp_path / "o"), "--format", "tflite"]) == 2
    assert "--format" in capsys.readouterr().err
    # check options without the data they apply to would be ignored: refused, naming them
    assert main(["export", str(tmp_path / "missing.qc.pt"), "--out", str(tmp_path / "o"), "--check-limit", "50"]) == 2
    assert "--check-limit needs --check-data" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.qc.pt"), "--out", str(tmp_path / "o"), "--check-split", "val"]) == 2
    assert "--check-split needs --check-data" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.qc.pt"), "--out", str(tmp_path / "o"), "--check-data",
                 str(tmp_path), "--check-limit", "-1"]) == 2
    assert "--check-limit must be >= 0" in capsys.readouterr().err


def _tiny_cnn(act_bits: int, weight_bits: int = 8, symmetric: bool = True):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                            torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    r = {"name": "t", "placement": {"family": "generic"}, "calibration": {"method": "max"},
         "quant": {"activations": {"bits": act_bits, "symmetric": symmetric}, "weights": {"bits": weight_bits}}}
    q = api.prepare(m, r, example_input=torch.randn(2, 3, 16, 16))
    api.calibrate(q, [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))])
    return q


def test_an_export_onnxruntime_computes_wrongly_is_refused_not_written(tmp_path):
    """4-bit symmetric activations into convolutions: onnxruntime's fused QLinearConv computes another
    result (the unoptimized graph agrees to 1e-8), and the export used to write it and exit 0."""
    from quantcore.export.run import export_model

    with pytest.raises(ExportError, match=r"optimizations \(all-exact\) disagrees.*nothing was written") as err:
        export_model(_tiny_cnn(4), str(tmp_path / "a4"), formats=["onnx"], x=torch.randn(1, 3, 16, 16))
    assert not (tmp_path / "a4" / "model.onnx").exists()
    # the cause is named (helper-131: the advice said "use an asymmetric grid" to a model that had one):
    # onnxruntime drops the ReLU before a 4-bit grid with negative codes, here both convolutions after one
    assert re.search(r"drops a ReLU before a 4-bit grid.*here: 2\.input_quantizer, 4\.input_quantizer\. ",
                     str(err.value)), str(err.value)
    # asymmetric 4-bit grids after the ReLUs: zero point 0 (calibrated) is right; one above 0 (as QAT may
    # learn) is named
    m = _tiny_cnn(4, symmetric=False)
    assert float(api.quantizers(m)["2.input_quantizer"].amin) == 0.0
    q = api.quantizers(m)["4.input_quantizer"]
    q.set_range(-q.amax / 15, q.amax.clone())  # zero point 1
    with pytest.raises(ExportError, match=r"drops a ReLU.*here: 4\.input_quantizer\. .*learn_zero_point: false"):
        export_model(m, str(tmp_path / "u4z"), formats=["onnx"], x=torch.randn(1, 3, 16, 16))
    rep = export_model(_tiny_cnn(8), str(tmp_path / "a8"), formats=["onnx"], x=torch.randn(1, 3, 16, 16))
    assert rep["smoke"]["top1_agreement"] == 100.0 and (tmp_path / "a8" / "model.onnx").exists()


@pytest.mark.parametrize("layer", ["conv", "linear"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_ranges_per_input_channel_are_refused_by_export(layer, symmetric, tmp_path, monkeypatch):
    """A recipe may calibrate a weight per channel on axis 1 (its input channels): valid fake quantization,
    but no integer kernel takes one scale per input channel. The export wrote a model.onnx onnxruntime's
    default session refuses (symmetric activations: exit 0, no word) or died in onnxruntime's traceback
    (asymmetric: exit 1). Now refused naming the quantizer, before anything is written; and a graph
    onnxruntime cannot load at its defaults is refused as such even without --check-data."""
    from quantcore.export import onnx_qdq
    from quantcore.export.run import export_model

    class Tokens(torch.nn.Module):  # (N, C, H, W) -> (N, HW, C): a Linear on tokens exports as MatMul, as in a ViT
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(1)

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                            Tokens(), torch.nn.Linear(16, 32), Mean(), torch.nn.Linear(32, 10)).eval()
    target = "2.weight_quantizer" if layer == "conv" else "4.weight_quantizer"
    r = {"name": "t", "placement": {"family": "generic"}, "calibration": {"method": "max"},
         "quant": {"activations": {"bits": 8, "symmetric": symmetric}},
         "overrides": [{"match": target, "spec": {"per_channel": True, "axis": 1}}]}
    q = api.prepare(m, r, example_input=torch.randn(2, 3, 16, 16))
    api.calibrate(q, [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))])
    assert api.quantizers(q)[target].amax.numel() == 16  # the recipe's grid is per input channel
    for fmt in (["onnx"], ["aimet"], ["trt-table"]):
        with pytest.raises(ExportError, match=rf"quantizer {target}: per-channel weight ranges on axis 1 .*not its "
                                              r"output channels.*axis 0"):
            export_model(q, str(tmp_path / fmt[0]), formats=fmt, x=torch.randn(1, 3, 16, 16))
        assert not (tmp_path / fmt[0]).exists()
    # the graph it used to write: onnxruntime's fused MatMulIntegerToFloat refuses it (now an ExportError
    # naming that, not its traceback), and the convolution runs in float
    monkeypatch.setattr(onnx_qdq, "_check_weight_axis", lambda *a: None)
    if layer == "linear":
        with pytest.raises(ExportError, match=r"onnxruntime (\(optimization all-exact\)|with its default graph "
                                              r"optimizations) cannot run the exported graph.*MatMulIntegerToFloat.*"
                                              r"nothing was written"):
            export_model(q, str(tmp_path / "raw"), formats=["onnx"], x=torch.randn(1, 3, 16, 16))
        assert not (tmp_path / "raw" / "model.onnx").exists()
    else:
        rep = export_model(q, str(tmp_path / "raw"), formats=["onnx"], x=torch.randn(1, 3, 16, 16))
        assert "ConvInteger" not in rep.get("integer_ops", {}) and (tmp_path / "raw" / "model.onnx").exists()


def test_trt_table_and_aimet_describe_the_quantizers_grid_at_opset_21(tmp_path):
    """A 4-bit weight forces opset 21, where model.onnx writes int8 activations as uint8 (+128) for
    onnxruntime; the range table and AIMET encodings read that rewritten grid: every symmetric int8
    activation came out 'widened', amax +0.8 %, and AIMET uint8 (loading back as asymmetric)."""
    from quantcore.export.run import export_model

    q = _tiny_cnn(8, weight_bits=4)
    rep = export_model(q, str(tmp_path / "o"), formats=["aimet", "trt-table"], x=torch.randn(1, 3, 16, 16))
    assert rep["opset"] == 21
    assert rep["trt_table"]["widened"] == [], rep["trt_table"]
    enc = json.loads((tmp_path / "o" / "model.encodings").read_text())
    acts = [e for e in enc["encodings"] if e["output_dtype"] in ("int8", "uint8")]  # (weights: int4)
    assert acts and all(e["output_dtype"] == "int8" and not e.get("y_zero_point") for e in acts), acts[:2]
    q_in = quantizers(q)["2.input_quantizer"]
    table = json.loads((tmp_path / "o" / "trt_ranges.json").read_text())
    row = next(v for v in table["tensors"].values() if v["quantizer"] == "2.input_quantizer")
    assert row["exact"] and abs(row["amax"] - float(q_in.amax)) <= 1e-6 * float(q_in.amax)


def _weight_on_a_tie(q) -> tuple[int, int, float]:
    """(channel, k, value): a float32 value k.5 * s_c where ONNX's x / s and torch's x * (1 / s) round
    to different integers (half to even on the exact tie vs. just past it)."""
    scale, _ = q.scale_zero_point()
    for c, s in enumerate(scale.reshape(-1).tolist()):
        s = np.float32(s)
        for k in range(1, 100):
            w = np.float32((k + 0.5) * s)
            if np.rint(w / s) != np.rint(w * (np.float32(1) / s)):
                return c, k, float(w)
    raise AssertionError("no tie found")


def test_constant_weights_get_quantcores_integer_codes_in_onnx():
    """A weight on a rounding tie got another code in ONNX (QuantizeLinear divides, torch multiplies by
    the reciprocal): model.onnx writes weights on their grid, so every code is quantcore's; the float
    graph (AIMET, range table) keeps the FP32 weights."""
    model = _tiny_cnn(8)
    q = quantizers(model)["7.weight_quantizer"]
    c, k, w = _weight_on_a_tie(q)
    with torch.no_grad():
        model[7].weight[c, 0] = w
        model[7].weight[c, 1] = -w
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ex = export_onnx(model, x[:1])
    out = ort_session(ex.to_bytes(), optimization="disable").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=0, atol=1e-5)
    fproto, _ = float_graph(ex.model, ex.float_weights)
    fw = {i.name: i for i in fproto.graph.initializer}["7.weight"]
    from onnx import numpy_helper

    assert np.array_equal(numpy_helper.to_array(fw), model[7].weight.detach().numpy())  # FP32, not on the grid


def test_narrow_range_per_channel_weights_export(tmp_path):
    """[-127, 127] per-channel weights (TensorRT's own convention) could not be exported in any format;
    written on their grid they need no Clip. AIMET 2.0.0 still cannot say 'narrow': left out of `all`."""
    from quantcore.export.run import export_model

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 64, 10)).eval()
    r = {"name": "t", "placement": {"family": "generic"}, "calibration": {"method": "max"},
         "quant": {"activations": {"bits": 8}, "weights": {"bits": 8, "per_channel": True, "narrow_range": True}}}
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model = api.prepare(m, r, example_input=x)
    api.calibrate(model, [x])
    rep = export_model(model, str(tmp_path / "o"), x=x[:1])
    assert (tmp_path / "o" / "model.onnx").is_file() and rep["aimet"]["written"] is False
    assert "narrow range" in rep["aimet"]["why"] and rep["smoke"]["max_abs_logit_diff_unoptimized"] < 1e-5


def test_encoded_tensors_are_read_only_by_their_quantized_consumers():
    """Encodings and range tables apply to every reader of a tensor: a block input that feeds a
    quantized conv and a float residual add must give the conv's quantizer a tensor of its own, or
    QNN/TensorRT would quantize the add's input too."""

    class Res(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv, self.head = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1), \
                torch.nn.Linear(8, 10)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = h + self.conv(h)
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    r = {"name": "t", "placement": {"family": "generic"}, "calibration": {"method": "max"},
         "quant": {"activations": {"bits": 8}, "weights": {"bits": 8}}}
    model = api.prepare(Res().eval(), r, example_input=x)
    api.calibrate(model, [x])
    ex = export_onnx(model, x[:1])
    fproto, tensor_map = float_graph(ex.model, ex.float_weights)
    check_model(fproto)
    readers = {}
    for n in fproto.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    for qname, tensors in tensor_map.items():
        for t in tensors:
            assert "Add" not in readers.get(t, []), (qname, t, readers.get(t))
    out = ort_session(fproto.SerializeToString(), optimization="disable").run(None, {"input": x.numpy()})[0]
    with torch.no_grad(), api.quantization_disabled(model):
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-5, atol=1e-5)


def test_every_format_of_a_model_in_qat_uses_the_learned_scales(tmp_path):
    from quantcore.export.run import export_model

    model = _as_in_qat(_tiny_cnn(8), 1.05)
    rep = export_model(model, str(tmp_path / "o"), formats=["trt-table", "aimet"], x=torch.randn(1, 3, 16, 16))
    assert "aimet" not in rep or rep["aimet"].get("written") is not False
    doc = json.loads((tmp_path / "o" / "model.encodings").read_text())
    learned = {n: float(q.scale.reshape(-1)[0]) for n, q in quantizers(model).items() if q.scale is not None}
    fproto_map = json.loads((tmp_path / "o" / "tensor_map.json").read_text())
    by_tensor = {e["name"]: e for e in doc["encodings"]}
    name = "2.input_quantizer"
    entry = by_tensor[fproto_map[name][0]]
    got = entry["y_scale"] if not isinstance(entry["y_scale"], list) else entry["y_scale"][0]
    assert got == pytest.approx(learned[name], rel=1e-6)
    assert all(q.spec.learnable for q in quantizers(model).values() if q.scale is not None)  # caller's model as it was


@pytest.mark.parametrize("clamp", ["relu6", "hardtanh", "normalize"])
def test_the_models_own_clip_nodes_are_not_taken_for_quantizers(tmp_path, clamp):
    """ReLU6 (MobileNetV2), hardtanh and F.normalize export as ONNX ``Clip`` nodes that torch names
    ``/<scope>/Clip``: every format that reads the quantizers back from the graph (AIMET encodings, the
    TensorRT range table) took them for quantizers and failed ("float graph: N nodes with unresolved
    inputs"). They are the model's own ops: kept in the float graph, no quantizer by their name."""
    import torch.nn.functional as F

    from quantcore.export.run import export_model

    class Normalize(torch.nn.Module):
        def forward(self, x):
            return F.normalize(x, dim=1)

    act = {"relu6": torch.nn.ReLU6(), "hardtanh": torch.nn.Hardtanh(-0.5, 0.5), "normalize": Normalize()}[clamp]
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), act, torch.nn.Conv2d(16, 16, 3, padding=1),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    r = {"name": "t", "placement": {"family": "generic"}, "calibration": {"method": "max"}}
    q = api.prepare(m, r, example_input=torch.randn(2, 3, 16, 16))
    api.calibrate(q, [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))])
    rep = export_model(q, str(tmp_path / "o"), formats="all", x=torch.randn(1, 3, 16, 16))
    import onnx

    proto = onnx.load(str(tmp_path / "o" / "model.onnx"))
    clips = [n.name for n in proto.graph.node if n.op_type == "Clip"]
    assert clips, "the model's clamp is a Clip node in the graph"
    found = graph_quantizers(proto)
    assert set(found) == set(quantizers(q)), sorted(found)
    enc = json.loads((tmp_path / "o" / "model.encodings").read_text())
    assert {e["name"] for e in enc["encodings"]}
    table = json.loads((tmp_path / "o" / "trt_ranges.json").read_text())
    assert {v["quantizer"] for v in table["tensors"].values()} <= set(quantizers(q))
    assert rep["smoke"]["top1_agreement"] == 100.0
