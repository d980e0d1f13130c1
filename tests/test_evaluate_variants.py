"""Many variants in one evaluation pass (issue #10 item 4): shared weights, exact results, measured cost.

On real data (Fashion-MNIST, models briefly trained here so activations and BatchNorm statistics are
realistic): the demo ViT with the demo recipes (ft1/ft2 placements, W8A8 and W4A4 with MSE ranges)
and a BatchNorm CNN (folded W8 and W4 per-channel, and unfolded). Variants calibrated together share
the FP32 model's tensors, yet every logit equals, bit for bit, that of the same variant prepared
and calibrated alone on its own copy (the reference is the code path before sharing existed). Memory
is checked twice: exactly (storages the models hold) and as the peak RSS of a process preparing 1 vs 4
variants of a 67 MB model, with separate copies as the control that shows the measurement can see
a copy. Timings are recorded, never compared with a threshold.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import quantcore
from quantcore import pipeline
from quantcore.api import quantizers
from quantcore.config import TrainConfig
from quantcore.demo import FMNIST_CLASSES, FMNIST_DIR, load_fashion_mnist
from quantcore.evaluate import EvalCost, WeightSharing, cost_markdown, evaluate_models, model_memory
from quantcore.models import vit_fmnist
from quantcore.train import train_classifier

pytestmark = [pytest.mark.skipif(not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"),
              pytest.mark.usefixtures("one_torch_thread")]

N_TRAIN, N_CALIB, N_EVAL = 3000, 128, 500
REPO = Path(__file__).resolve().parents[1]
FMNIST_CFG = {"input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,), "crop_pct": 1.0,
              "crop_mode": "center", "interpolation": "bilinear", "num_classes": 10}


def _cnn() -> nn.Module:
    """A small BatchNorm CNN for Fashion-MNIST (three conv-BN-ReLU, every BN foldable)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    m.pretrained_cfg = dict(FMNIST_CFG, architecture="test/fmnist_cnn")  # the eval transform travels with it
    return m


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> dict:
    """Fashion-MNIST packed as zip shards (calibration: train[:128], evaluation: test[:500]) and two
    models trained three epochs on train[:3000] (realistic weights, BatchNorm running statistics)."""
    from quantcore.data import pack_arrays

    data = load_fashion_mnist()
    root = str(tmp_path_factory.mktemp("fmnist") / "data")
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    pack_arrays(xtr[:N_CALIB], ytr[:N_CALIB], root, "train", FMNIST_CLASSES)
    pack_arrays(xte[:N_EVAL], yte[:N_EVAL], root, "test", FMNIST_CLASSES)
    x = (torch.from_numpy(xtr[:N_TRAIN].astype(np.float32) / 255.0) - 0.2860).div(0.3530)[:, None]
    y = torch.from_numpy(ytr[:N_TRAIN].astype(np.int64))
    cfg = TrainConfig(epochs=3, batch_size=128, lr=3e-3, hflip=False)
    models = {}
    for name, build in (("vit", vit_fmnist), ("cnn", _cnn)):
        torch.manual_seed(0)
        m = build()
        train_classifier(m, lambda e: ((x[i:i + 128], y[i:i + 128]) for i in range(0, N_TRAIN, 128)),
                         (N_TRAIN + 127) // 128, cfg)
        models[name] = m.eval()
    return {"uri": root, "models": models}


def _calib(r: quantcore.Recipe) -> quantcore.Recipe:
    return r.model_copy(update={"calibration": r.calibration.model_copy(update={"num_batches": 2, "batch_size": 64})})


def _recipes(kind: str) -> list[quantcore.Recipe]:
    if kind == "vit":  # the demo recipes: ft1/ft2 placements, W8A8 and W4A4 (per-channel weights), MSE ranges
        return [_calib(quantcore.load_recipe(n)) for n in ("fmnist_w8a8_ft1", "fmnist_w8a8_ft2", "fmnist_w4a4_ft1")]
    base = {"placement": {"family": "cnn"}, "calibration": {"method": "percentile", "num_batches": 2,
                                                           "batch_size": 64}}
    return [quantcore.load_recipe({**base, "name": "cnn_w8a8"}),
            quantcore.load_recipe({**base, "name": "cnn_w4a8_mse", "calibration": {
                **base["calibration"], "method": "mse", "weights_method": "mse"},
                "quant": {"weights": {"bits": 4, "per_channel": True}}}),
            quantcore.load_recipe({**base, "name": "cnn_w8a8_nofold",
                                   "placement": {"family": "cnn", "fold_bn": False}})]


def _opts() -> pipeline.RunOptions:
    return pipeline.RunOptions(batch_size=100, device="cpu", progress=False)


def _eval_batches(fmnist: dict, model: nn.Module) -> list[torch.Tensor]:
    from quantcore.data import eval_transform, make_loader, open_dataset

    ds = open_dataset(fmnist["uri"], "test", eval_transform(model))
    return [b[0] for b in make_loader(ds, 100)]


def _quantizer_bytes(model: nn.Module) -> int:
    """Bytes of the quantizers' own state (ranges), each storage once."""
    st = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
          for q in quantizers(model).values() for t in list(q.parameters()) + list(q.buffers())}
    return sum(st.values())


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_shared_variants_equal_variants_alone_bit_for_bit(fmnist, kind):
    trained = fmnist["models"][kind]
    recipes = _recipes(kind)
    cal = pipeline.DataSpec(fmnist["uri"], "train")
    fp32, variants, _ = pipeline.calibrate_variants(recipes, cal, _opts(), fp32=copy.deepcopy(trained))
    # the reference: each recipe prepared and calibrated alone, on its own full copy
    alone = {r.name: pipeline.calibrate_variants([r], cal, _opts(), fp32=copy.deepcopy(trained))[1][0].model
             for r in recipes}
    folded = {v.name: len(v.model.quantcore_placement.folded_bn) for v in variants}
    if kind == "cnn":
        assert folded == {"cnn_w8a8": 3, "cnn_w4a8_mse": 3, "cnn_w8a8_nofold": 0}
    fp_params = dict(fp32.named_parameters())

    # memory: what the models hold, each storage once
    models = {"fp32": fp32, **{v.name: v.model for v in variants}}
    mem = model_memory(models)
    size = _nbytes(trained)
    assert mem["own_bytes"]["fp32"] == size
    # as separate copies: N+1 models (a folded variant lacks its BatchNorms: 9 % of this CNN)
    assert mem["separate_bytes"] >= size + len(variants) * 0.8 * size
    for v in variants:
        params = dict(v.model.named_parameters())
        changed = {n for n, p in params.items() if n in fp_params and p is not fp_params[n]}
        if kind == "vit" or not folded[v.name]:
            assert not changed, (v.name, sorted(changed)[:5])  # no weight of its own
            assert mem["own_bytes"][v.name] == _quantizer_bytes(v.model), (v.name, mem)  # ranges only
        else:  # the folded convs (weights and biases) are its own, the rest is shared
            assert changed == {f"{i}.{k}" for i in (0, 3, 6) for k in ("weight", "bias")}, sorted(changed)
            if v is variants[0]:
                folded_bytes = sum(params[n].numel() * 4 for n in changed)
                assert mem["own_bytes"][v.name] == folded_bytes + _quantizer_bytes(v.model)
    if kind == "cnn":  # W8 and W4 fold identically: the second holds the first's folded weights
        assert mem["own_bytes"]["cnn_w4a8_mse"] == _quantizer_bytes(variants[1].model)
        assert dict(variants[1].model.named_parameters())["0.weight"] is \
            dict(variants[0].model.named_parameters())["0.weight"]
    # vs (N+1) x size as separate copies: the FP32 weights, plus one set of folded convs for the CNN
    assert mem["models_bytes"] < (1.1 if kind == "vit" else 2.1) * size, mem

    # exactness: every variant's logits and ranges equal those of the variant alone; FP32 untouched
    batches = _eval_batches(fmnist, trained)
    with torch.no_grad():
        for x in batches:
            assert torch.equal(fp32(x), trained(x))
            for v in variants:
                out, ref = v.model(x), alone[v.name](x)
                assert torch.equal(out, ref), v.name
                assert not torch.equal(out, trained(x)), v.name  # quantization really in the path
    for v in variants:
        got, ref = v.model.state_dict(), alone[v.name].state_dict()
        assert list(got) == list(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref), v.name

    # and the evaluation pass scores each one exactly as a pass of FP32 + that variant alone
    ev = pipeline.DataSpec(fmnist["uri"], "test")
    scores, info, _ = pipeline.evaluate_variants(fp32, variants, ev, _opts())
    for r in recipes:
        one = pipeline.VariantResult(r.name, r, alone[r.name])
        ref_scores, _, _ = pipeline.evaluate_variants(copy.deepcopy(trained), [one], ev, _opts())
        for n in ("fp32", r.name):
            assert json.dumps(scores[n].as_dict()) == json.dumps(ref_scores[n].as_dict()), n
    assert scores["fp32"].top1 > 50.0  # learned something: chance is 10 %
    t = info["evaluation_cost"]["time"]
    assert t["images"] == N_EVAL and set(t["models"]) == set(models)


def test_sharing_before_folding_would_corrupt_fp32(fmnist):
    """Control: the test above can fail. Variants that share the FP32 tensors *before* preparing
    (a deepcopy that keeps the parameters) fold BatchNorm into the FP32 weights themselves."""
    trained = fmnist["models"]["cnn"]
    fp32 = copy.deepcopy(trained)
    memo = {id(t): t for t in list(fp32.parameters()) + list(fp32.buffers())}
    quantcore.prepare(copy.deepcopy(fp32, memo), _recipes("cnn")[0])
    x = _eval_batches(fmnist, trained)[0]
    with torch.no_grad():
        assert not torch.equal(fp32(x), trained(x))


def test_weight_sharing_is_bitwise_not_numeric():
    """-0.0 == 0.0 and a NaN is unequal to itself: neither may be shared as "the same" tensor."""
    ref = nn.Linear(2, 2)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        ref.bias.copy_(torch.tensor([float("nan"), 1.0]))
    var = copy.deepcopy(ref)
    with torch.no_grad():
        var.weight[0, 0] = -0.0
    sharing = WeightSharing(ref)
    assert sharing.share(var) == 0
    assert var.weight is not ref.weight and var.bias is not ref.bias
    twin = copy.deepcopy(ref)
    with torch.no_grad():
        twin.bias.fill_(1.0)
    assert sharing.share(twin) == ref.weight.numel() * 4 and twin.weight is ref.weight


def test_ptq_report_shows_cost_per_variant_and_memory(fmnist, tmp_path):
    recipes = _recipes("vit")[:2]
    cal, ev = pipeline.DataSpec(fmnist["uri"], "train"), pipeline.DataSpec(fmnist["uri"], "test", limit=200)
    rep = pipeline.ptq(recipes, cal, ev, str(tmp_path / "out"), _opts(),
                       fp32=copy.deepcopy(fmnist["models"]["vit"]))
    ec = rep["evaluation_cost"]
    t, mem = ec["time"], ec["memory"]
    assert (t["images"], t["batches"], t["ranks"], t["device"]) == (200, 2, 1, "cpu")
    assert list(t["models"]) == ["fp32"] + [r.name for r in recipes]
    parts = t["data"]["s"] + t["scoring"]["s"] + sum(m["s"] for m in t["models"].values())
    assert 0 < parts <= t["total"]["s"] * (1 + 1e-9)
    for m in t["models"].values():
        assert m["s"] > 0 and m["ms_per_image"] == pytest.approx(1000 * m["s"] / 200)
    variant_cost = [t["models"][r.name]["with_scoring_ms_per_image"] for r in recipes]
    assert t["extra_variant_ms_per_image"] == pytest.approx(sum(variant_cost) / len(variant_cost))
    size = _nbytes(fmnist["models"]["vit"])
    assert mem["own_bytes"]["fp32"] == size and mem["models_bytes"] < 1.1 * size <= mem["separate_bytes"] / 2
    assert mem["peak_bytes"] > 0 and "RSS" in mem["source"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["evaluation_cost"]["time"]["images"] == 200
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Evaluation cost" in md and "One more variant costs about" in md
    for name in ["fp32"] + [r.name for r in recipes]:
        assert f"forward `{name}`" in md
    assert cost_markdown({}) == ""
    # each variant's checkpoint still loads into a model of its own (the shared tensors are saved whole)
    loaded = quantcore.load(str(tmp_path / "out" / recipes[1].name / "model.qc.pt"))
    assert _nbytes(loaded) >= size


def test_eval_cost_accounts_every_batch_and_model():
    torch.manual_seed(0)
    models = {"a": nn.Linear(8, 4).eval(), "b": nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 4)).eval()}
    data = [(torch.randn(5, 8), torch.randint(0, 4, (5,))) for _ in range(3)] + [(torch.randn(2, 8),
                                                                                 torch.tensor([0, 3]))]
    cost = EvalCost(list(models))
    plain = evaluate_models(models, data, 4, reference="a")
    timed = evaluate_models(models, data, 4, reference="a", cost=cost)
    assert {n: s.as_dict() for n, s in plain.items()} == {n: s.as_dict() for n, s in timed.items()}
    assert (cost.images, cost.batches, cost.ranks) == (17, 4, 1)
    assert all(s > 0 for s in cost.forward_s.values()) and cost.data_s > 0 and cost.score_s > 0
    d = cost.as_dict(reference="a")
    assert d["extra_variant_ms_per_image"] == d["models"]["b"]["with_scoring_ms_per_image"]
    assert EvalCost(["a"]).as_dict()["total"]["ms_per_image"] is None  # no images: no rate
    with pytest.raises(ValueError, match="cost was made for models"):
        evaluate_models(models, data, 4, cost=EvalCost(["a"]))


def _cost_rank(rank: int, out: Path) -> None:
    torch.manual_seed(0)
    models = {"a": nn.Linear(8, 4).eval(), "b": nn.Linear(8, 4).eval()}
    data = [(torch.randn(3 + rank, 8), torch.randint(0, 4, (3 + rank,)))]
    cost = EvalCost(list(models))
    evaluate_models(models, data, 4, reference="a", cost=cost)
    torch.save({"images": cost.images, "ranks": cost.ranks, "batches": cost.batches}, out / f"cost{rank}.pt")


def test_cost_sums_over_ranks(tmp_path):
    from test_distributed_ptq import WORLD, run_ranks

    run_ranks(_cost_rank, tmp_path)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"cost{r}.pt")
        assert got == {"images": 3 + 4, "ranks": 2, "batches": 2}


_RSS_SCRIPT = r"""
import copy, gc, json, resource, sys, torch
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import quantcore
from quantcore import pipeline
from tiny_data import TINY_RECIPE, make_images

torch.set_num_threads(1)
root = make_images(Path(sys.argv[1]), splits=(("train", 2),))
model = {**TINY_RECIPE["model"], "kwargs": {"patch_size": 8, "depth": 8, "embed_dim": 512, "num_heads": 8}}
def recipe(i):
    return quantcore.load_recipe({**TINY_RECIPE, "name": f"v{i}", "model": model,
        "placement": {"family": "vit", "mode": "ft2" if i % 2 else "ft1"},
        "quant": {"weights": {"bits": 4 if i > 1 else 8}},
        "calibration": {"method": "max", "num_batches": 1, "batch_size": 4}})
def reset():  # Linux: restart the peak-RSS high-water mark (VmHWM), so one stage's peak is its own
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not permitted here: the marks stay cumulative (the control may then be masked)
        pass
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")
opts = pipeline.RunOptions(batch_size=4, device="cpu", progress=False)
torch.manual_seed(0)
fp32 = quantcore.build_model(recipe(0))
size = sum(p.numel() * 4 for p in fp32.parameters())
gc.collect()
reset()  # what importing and building peaked at does not mask the stages below
res = {"size": size, "built": peak()}
for n in (1, 4):
    reset()
    _, vs, _ = pipeline.calibrate_variants([recipe(i) for i in range(n)], pipeline.DataSpec(str(root), "train"),
                                           opts, fp32=fp32)
    res[f"peak_{n}"] = peak()
    if n == 4:  # control: the same variants as separate copies
        reset()
        copies = [copy.deepcopy(v.model) for v in vs]
        res["peak_copies"] = peak()
    del vs
    gc.collect()
print(json.dumps(res))
"""


def test_peak_rss_is_bounded_in_the_number_of_variants(tmp_path):
    # A fixed mmap threshold: glibc otherwise raises it after the first large free, later tensors come
    # from the heap, and what a freed transient copy leaves there made peak_4 - peak_1 swing between
    # 0.5 and 1.4 x size from run to run (allocator timing, not live memory: 0.13-0.14 with this set)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "imgs"), str(REPO / "tests")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    size = res["size"]
    assert size > 60 * 2 ** 20  # large enough for RSS to see a copy clearly
    # one variant needs one transient copy; three more add only their ranges (measured: +0.13-0.14 x
    # size; without sharing it is +3 x size)
    assert res["peak_1"] - res["built"] < 1.6 * size, res
    assert res["peak_4"] - res["peak_1"] < 0.75 * size, res
    # control: four separate copies on top are seen by the same measurement
    assert res["peak_copies"] - res["peak_4"] > 2.5 * size, res


def test_hugging_face_classifiers_are_evaluated_through_ptq_and_evaluate(tmp_path, capsys):
    """A model whose forward returns a transformers ``ModelOutput`` (every HF directory model) goes
    through the CLI's ptq and evaluate (evaluation took ``.double()`` of the output object), and
    its scores equal those computed from ``.logits`` by hand."""
    transformers = pytest.importorskip("transformers")
    from tiny_data import make_images

    from quantcore import api
    from quantcore.cli import main
    from quantcore.evaluate import EvalAccumulator

    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(cfg).eval()
    d = tmp_path / "vit"
    hf.save_pretrained(d)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    data = make_images(tmp_path / "imgs")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "hf_w8a8", "model": {"name": str(d)},
                                  "calibration": {"method": "max", "num_batches": 1, "batch_size": 4}}))
    out = tmp_path / "o"
    assert main(["ptq", "-r", str(recipe), "--calib-data", str(data), "--eval-data", str(data), "--eval-split", "val",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["results"]) == {"fp32", "hf_w8a8"} and rep["data"]["eval_count"] == 12
    assert main(["evaluate", "-c", str(out / "hf_w8a8" / "model.qc.pt"), "-d", str(data), "--split", "val",
                 "--no-progress", "--device", "cpu"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    # the accumulator takes raw outputs: the same figures as from the logits tensors
    x = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    q = api.load(str(out / "hf_w8a8" / "model.qc.pt")).eval()
    with torch.no_grad():
        raw = {"fp32": hf(pixel_values=x), "q": q(x)}
    a, b = EvalAccumulator(["fp32", "q"], 3, "fp32"), EvalAccumulator(["fp32", "q"], 3, "fp32")
    a.update(raw, labels)
    b.update({n: v.logits if hasattr(v, "logits") else v for n, v in raw.items()}, labels)
    assert [t.tolist() for t in a._ints() + a._floats()] == [t.tolist() for t in b._ints() + b._floats()]
