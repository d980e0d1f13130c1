"""AdaRound / BRECQ reconstruction (quantcore.recon): the paper's formulas against a NumPy reference,
lower layer/output error than round-to-nearest on real Fashion-MNIST activations of a ViT trained
here, written-back weights that are exact grid points of unchanged ranges, the recipe field, and a
2-rank gloo run that rounds like one process."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from quantcore import api
from quantcore.demo import FMNIST_DIR, load_fashion_mnist
from quantcore.errors import UserError
from quantcore.models import vit_fmnist
from quantcore.placement import quantizers
from quantcore.recipe import RecipeError, load_recipe
from quantcore.recon import ReconstructionConfig, reconstruct
from quantcore.recon.adaround import (_Rounding, beta_at, init_rounding, reconstruction_error, rectified_sigmoid,
                                      rounding_regularizer)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]

MEAN, STD = 0.2860, 0.3530  # vit_fmnist's pretrained_cfg


# -- data and a quickly trained model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def fmnist() -> dict[str, torch.Tensor]:
    d = load_fashion_mnist()

    def norm(a: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(a.copy()).float() / 255.0 - MEAN) / STD)[:, None]

    (xtr, ytr), (xte, _) = d["train"], d["test"]
    return {"train": norm(xtr[:4096]), "train_y": torch.from_numpy(ytr[:4096].astype(np.int64)),
            "calib": norm(xtr[50000:50256]), "test": norm(xte[:1000])}


@pytest.fixture(scope="module")
def trained_vit(fmnist) -> nn.Module:
    """The demo ViT (depth 2) after 2 epochs on 4,096 Fashion-MNIST images (~5 s; ~65 % top-1)."""
    torch.manual_seed(0)
    m = vit_fmnist(depth=2)
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    x, y = fmnist["train"], fmnist["train_y"]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            j = perm[i:i + 128]
            loss = nn.functional.cross_entropy(m(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return m.eval()


def _vit_recipe(act_bits: int | None, **extra) -> dict:
    acts = {"enabled": False} if act_bits is None else {"bits": act_bits, "symmetric": True}
    return {"name": "recon_test", "placement": {"family": "vit", "mode": "ft1"},
            "quant": {"weights": {"bits": 4, "symmetric": True, "per_channel": True}, "activations": acts},
            "calibration": {"method": "max", "weights_method": "max"}, **extra}


def _prepared(model: nn.Module, recipe: dict, calib: torch.Tensor) -> nn.Module:
    m = api.prepare(copy.deepcopy(model), recipe)
    api.calibrate(m, calib.split(64))
    return m


def _capture(model: nn.Module, module_name: str, x: torch.Tensor) -> torch.Tensor:
    out = []
    h = model.get_submodule(module_name).register_forward_hook(lambda _m, _i, o: out.append(o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return out[0]


# -- 1. the paper's formulas ---------------------------------------------------------------------------------
def _ref_h(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * 1.2 - 0.1, 0.0, 1.0)  # zeta = 1.1, gamma = -0.1


def test_formulas_match_a_reference_of_the_paper():
    rng = np.random.default_rng(0)
    v = rng.normal(0, 3, size=(6, 5))
    vt = torch.tensor(v, dtype=torch.float64)
    np.testing.assert_allclose(rectified_sigmoid(vt).numpy(), _ref_h(v), rtol=1e-12, atol=1e-12)
    for beta in (20.0, 7.3, 2.0):
        ref = np.sum(1.0 - np.abs(2.0 * _ref_h(v) - 1.0) ** beta)
        assert math.isclose(float(rounding_regularizer(vt, beta)), ref, rel_tol=1e-10)
    frac = rng.uniform(0, 0.999, size=50)
    np.testing.assert_allclose(_ref_h(init_rounding(torch.tensor(frac)).numpy()), frac, atol=1e-9)
    # beta: no regularizer for the first 20 %, then linear 20 -> 2 (AdaRound / BRECQ schedule)
    cfg = ReconstructionConfig(iterations=1000)
    assert beta_at(0, cfg) is None and beta_at(199, cfg) is None
    for step in (200, 500, 999):
        assert math.isclose(beta_at(step, cfg), 20.0 - 18.0 * (step - 200) / 800, rel_tol=1e-12)
    # reconstruction error: squared error summed over channels, mean over positions, per sample
    a, b = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    ref = [sum((a[n, c, i, j] - b[n, c, i, j]) ** 2 for c in range(4)) for n in range(3) for i in range(5)
           for j in range(6)]
    np.testing.assert_allclose(reconstruction_error(a, b).numpy(),
                               torch.stack(ref).reshape(3, 30).mean(1).numpy(), rtol=1e-5)
    a, b = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    np.testing.assert_allclose(reconstruction_error(a, b).numpy(), ((a - b) ** 2).sum(2).mean(1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_soft_weight_and_its_gradient_match_the_reference(symmetric):
    """W~ = s (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z) with s, z from the range as ONNX/AIMET
    define them, on a Linear's per-channel int4 grid; dW~/dV = s (zeta - gamma) sigmoid'(V) inside."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    model = api.prepare(nn.Sequential(lin), _vit_recipe(None, quant={
        "weights": {"bits": 4, "symmetric": symmetric, "per_channel": True}, "activations": {"enabled": False}},
        placement={"family": "generic"}), example_input=torch.randn(2, 6))
    api.calibrate(model, [torch.randn(8, 6)])
    wq = quantizers(model)["0.weight_quantizer"]
    r = _Rounding("0.weight_quantizer", lin, "weight", wq)
    r.v.data.normal_(0, 2)
    w = lin.weight.detach().double().numpy()
    lo, hi = wq.amin.double().numpy()[:, None], wq.amax.double().numpy()[:, None]
    if symmetric:
        qmin, qmax, s = -8, 7, np.maximum(np.abs(lo), hi) / 7
        z = np.zeros_like(s)
    else:
        qmin, qmax = 0, 15
        s = (hi - lo) / 15
        z = np.clip(np.round(-lo / s), 0, 15)
    v = r.v.detach().double().numpy()
    pre = np.floor(w / s) + _ref_h(v) + z
    ref = s * (np.clip(pre, qmin, qmax) - z)
    # a weight on a grid point (the channel maximum) may floor to either side in float32 vs float64
    ok = np.abs(w / s - np.round(w / s)) > 1e-4
    assert ok.sum() >= 20
    soft = r.soft()
    np.testing.assert_allclose(soft.detach().double().numpy()[ok], ref[ok], rtol=1e-5, atol=1e-6)
    soft.sum().backward()
    sig = 1 / (1 + np.exp(-v))
    h_raw = sig * 1.2 - 0.1
    inside = (h_raw > 0) & (h_raw < 1) & (pre > qmin) & (pre < qmax)
    ref_grad = np.where(inside, s * 1.2 * sig * (1 - sig), 0.0)
    np.testing.assert_allclose(r.v.grad.double().numpy()[ok], ref_grad[ok], rtol=1e-4, atol=1e-7)


# -- 2. lower error than round-to-nearest on real activations -------------------------------------------
def test_layer_reconstruction_lowers_output_error_on_held_out_images(trained_vit, fmnist):
    """W4 weight-only, layer mode: the first quantized layer sees FP32 inputs, so its output error on
    held-out test images is purely the weight rounding; AdaRound must beat round-to-nearest there and
    at the logits."""
    calib, test = fmnist["calib"], fmnist["test"]
    rtn = _prepared(trained_vit, _vit_recipe(None), calib)
    ada = copy.deepcopy(rtn)
    res = reconstruct(ada, calib.split(64), ReconstructionConfig(mode="layer", iterations=120, num_images=256))
    assert [u["name"] for u in res.units][:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                                                 "blocks.0.mlp.fc2"]
    assert all(u["loss"] < u["loss_rtn"] for u in res.units)
    layer = "blocks.0.attn.qkv"
    ref = _capture(trained_vit, layer, test)
    e_rtn = float(((_capture(rtn, layer, test) - ref) ** 2).mean())
    e_ada = float(((_capture(ada, layer, test) - ref) ** 2).mean())
    assert e_ada < 0.9 * e_rtn, (e_ada, e_rtn)
    with torch.no_grad():
        f, lr, la = trained_vit(test), rtn(test), ada(test)
    assert float(((la - f) ** 2).mean()) < float(((lr - f) ** 2).mean())


def test_block_reconstruction_with_activation_quantization_lowers_logit_error(trained_vit, fmnist):
    """BRECQ blocks with A6 on and QDrop mixing: lower logit error than round-to-nearest on held-out images."""
    calib, test = fmnist["calib"], fmnist["test"]
    rtn = _prepared(trained_vit, _vit_recipe(6), calib)
    ada = copy.deepcopy(rtn)
    res = reconstruct(ada, calib.split(64), ReconstructionConfig(mode="block", iterations=150, num_images=256,
                                                                 drop_prob=0.5))
    assert [u["name"] for u in res.units] == ["blocks.0", "blocks.1"]
    assert len(res.units[0]["layers"]) == 4
    with torch.no_grad():
        f, lr, la = trained_vit(test), rtn(test), ada(test)
    assert float(((la - f) ** 2).mean()) < 0.95 * float(((lr - f) ** 2).mean())
    # learned activation step sizes are written back into the ranges: nothing learnable is left behind
    lsq = copy.deepcopy(rtn)
    before = {n: q.amax.clone() for n, q in quantizers(lsq).items() if n.startswith("blocks.0.")}
    reconstruct(lsq, calib.split(64), ReconstructionConfig(mode="block", iterations=10, num_images=64,
                                                           modules=["blocks.0.*"], act_ranges="learned"))
    qs = quantizers(lsq)
    assert all(q.scale is None and not q.spec.learnable for q in qs.values())
    changed = [n for n, a in before.items() if qs[n].kind == "activation" and not torch.equal(qs[n].amax, a)]
    assert changed and all(n.startswith("blocks.0.") for n in changed)


# -- 3. the result is plain grid points of unchanged ranges ---------------------------------------------
class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 12 * 12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("bits,symmetric,per_channel", [(4, True, True), (8, False, False), (4, False, True),
                                                        (8, True, False)])
def test_written_back_weights_are_exact_grid_points(bits, symmetric, per_channel, fmnist, tmp_path):
    torch.manual_seed(0)
    cnn = _TinyCNN().eval()
    recipe = {"name": "cnn_recon", "placement": {"family": "generic"},
              "quant": {"weights": {"bits": bits, "symmetric": symmetric, "per_channel": per_channel},
                        "activations": {"bits": 8, "symmetric": False}},
              "calibration": {"method": "max"},
              "overrides": [{"match": "conv2.weight_quantizer", "spec": {"enabled": False}}],
              "reconstruction": {"mode": "layer", "iterations": 30, "num_images": 128, "batch_size": 16}}
    model = api.prepare(cnn, recipe, example_input=fmnist["calib"][:2])
    calib = fmnist["calib"][:128].split(32)
    api.calibrate(model, calib)
    qs = quantizers(model)
    before = {n: (q.amin.clone(), q.amax.clone()) for n, q in qs.items()}
    enc_before = api.encodings(model)
    orig = {n: getattr(model.get_submodule(n), "weight") for n in ("conv1", "conv2", "fc")}
    orig_values = {n: p.detach().clone() for n, p in orig.items()}
    res = reconstruct(model, calib, model.quantcore_recipe.reconstruction)

    assert [u["name"] for u in res.units] == ["conv1", "fc"]
    assert "disabled" in res.skipped["conv2.weight_quantizer"]
    assert model.conv2.weight is orig["conv2"]  # skipped: untouched
    for n, p in orig.items():  # the original tensors (shared with FP32 models) are never written
        assert torch.equal(p, orig_values[n])
    for n, q in qs.items():  # ranges frozen
        assert torch.equal(q.amin, before[n][0]) and torch.equal(q.amax, before[n][1]), n
    assert api.encodings(model) == enc_before
    for name in ("conv1", "fc"):
        wq = qs[f"{name}.weight_quantizer"]
        w = getattr(model, name).weight.detach()
        assert w is not orig[name]
        assert torch.equal(wq(w), w), name  # round-to-nearest reproduces the written weights bit for bit
        scale, zp = wq.scale_zero_point()
        shape = [-1] + [1] * (w.dim() - 1) if scale.numel() > 1 else []
        s = scale.reshape(shape)
        z = zp.float().reshape(shape)
        code = w / s
        assert torch.equal(code.round(), torch.round(code * 1e3) / 1e3) or torch.allclose(code, code.round(), atol=1e-3)
        qmin, qmax = wq.spec.qrange()
        assert float((code.round() + z).min()) >= qmin and float((code.round() + z).max()) <= qmax
        # each weight went to the grid point just below or just above it (or the clamp)
        x = orig_values[name] / s
        lo = torch.clamp(torch.floor(x) + z, qmin, qmax) - z
        hi = torch.clamp(torch.floor(x) + 1 + z, qmin, qmax) - z
        c = code.round()
        assert bool(((c == lo) | (c == hi)).all()), name
    # quantized weights are exact: switching the weight quantizers off changes no output bit
    x = fmnist["test"][:64]
    with torch.no_grad():
        y_on = model(x)
        for q in qs.values():
            if q.kind == "weight" and q is not qs["conv2.weight_quantizer"]:
                q.quantize = False
        y_off = model(x)
        for q in qs.values():
            q.quantize = True
    assert torch.equal(y_on, y_off)
    # and a saved checkpoint carries them
    api.save(model, str(tmp_path / "m.qc.pt"))
    loaded = api.load(str(tmp_path / "m.qc.pt"), model=_TinyCNN(), example_input=fmnist["calib"][:2])
    assert torch.equal(loaded.fc.weight, model.fc.weight) and torch.equal(loaded.conv1.weight, model.conv1.weight)
    with torch.no_grad():
        assert torch.equal(loaded(x), y_on)


# -- 4. the recipe field ----------------------------------------------------------------------------------------
def test_recipe_field_validates():
    r = load_recipe("fmnist_w4a4_ft1_adaround")
    assert r.reconstruction is not None and r.reconstruction.mode in ("layer", "block")
    assert load_recipe("fmnist_w4a4_ft1").reconstruction is None
    base = {"name": "x", "placement": {"family": "vit"}}
    for bad, field in [({"iterations": 0}, "reconstruction.iterations"), ({"mode": "net"}, "reconstruction.mode"),
                       ({"lr": -1}, "reconstruction.lr"), ({"itrations": 5}, "reconstruction.itrations"),
                       ({"beta_start": 2, "beta_end": 20}, "beta_end"),
                       ({"act_quant": False, "drop_prob": 0.5}, "drop_prob"),
                       ({"batch_size": 64, "num_images": 32}, "batch_size")]:
        with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
            load_recipe({**base, "reconstruction": bad})


def test_glob_that_matches_nothing_names_the_field(trained_vit, fmnist):
    m = _prepared(trained_vit, _vit_recipe(None), fmnist["calib"][:64])
    with pytest.raises(UserError, match=r"reconstruction\.modules: 'blocks\.9\.\*'"):
        reconstruct(m, fmnist["calib"][:64].split(32), ReconstructionConfig(modules=["blocks.0.*", "blocks.9.*"]))


def test_a_section_or_option_with_nothing_to_act_on_is_refused(trained_vit, fmnist):
    """Float weights leave no rounding to learn, activations off or float leave no step size to
    learn; each is refused naming the field (a report saying AdaRound over round-to-nearest weights
    reads as if it ran)."""
    calib = fmnist["calib"][:64]
    fp16 = _vit_recipe(4)
    fp16["quant"]["weights"] = {"format": "fp16"}
    m = _prepared(trained_vit, fp16, calib)
    with pytest.raises(UserError, match=r"reconstruction: no weight quantizer can be reconstructed.*float format fp16"):
        reconstruct(m, calib.split(32), ReconstructionConfig(iterations=2))
    m = _prepared(trained_vit, _vit_recipe(None), calib)  # activations disabled
    with pytest.raises(UserError, match=r"reconstruction\.act_ranges: learned"):
        reconstruct(m, calib.split(32), ReconstructionConfig(iterations=2, act_ranges="learned"))
    fa = _vit_recipe(4)
    fa["quant"]["activations"] = {"format": "fp16"}
    fa["calibration"].pop("method")  # a cast has no calibrator
    m = _prepared(trained_vit, fa, calib)
    with pytest.raises(UserError, match=r"reconstruction\.act_ranges: learned"):
        reconstruct(m, calib.split(32), ReconstructionConfig(iterations=2, act_ranges="learned"))
    # QDrop also mixes each unit's input between the quantized-so-far and the FP32 path: with
    # quantized weights upstream that acts without any activation quantizer, so it runs
    assert reconstruct(m, calib.split(32), ReconstructionConfig(iterations=2, drop_prob=0.5)).units


# -- 5. two gloo ranks round like one process --------------------------------------------------------------------
def _recon_rank(rank: int, model: nn.Module, images: torch.Tensor, cfg: ReconstructionConfig, out: Path) -> None:
    from quantcore import distributed

    m = copy.deepcopy(model)
    mine = images[distributed.shard_batches(len(images), 16)]
    res = reconstruct(m, mine.split(16), cfg)
    if rank == 0:
        torch.save({"state": {k: v for k, v in m.state_dict().items() if k.endswith("weight")},
                    "images": res.images, "units": [u["name"] for u in res.units],
                    "unit_images": [u["images"] for u in res.units]}, out / "rank0.pt")


@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
def test_two_ranks_round_like_one_process(trained_vit, fmnist, tmp_path, drop_prob):
    """Also with QDrop (drop_prob > 0): the masks follow the global batch, not the rank."""
    from test_distributed_ptq import run_ranks

    calib = fmnist["calib"][:96]  # 6 batches of 16: 3 per rank
    model = _prepared(trained_vit, _vit_recipe(8), calib)
    cfg = ReconstructionConfig(mode="block", iterations=60, batch_size=24, num_images=96, drop_prob=drop_prob)
    run_ranks(_recon_rank, model, calib, cfg, tmp_path, start_method="spawn")  # the ranks run backward
    got = torch.load(tmp_path / "rank0.pt")
    one = copy.deepcopy(model)
    res = reconstruct(one, calib.split(16), cfg)
    assert got["images"] == res.images == 96 and got["units"] == [u["name"] for u in res.units]
    assert got["unit_images"] == [96] * len(res.units)  # what the units saw, not rank 0's share
    ref = {k: v for k, v in one.state_dict().items() if k.endswith("weight")}
    assert set(ref) == set(got["state"])
    qs = quantizers(one)
    for k, w in ref.items():
        owner = k.rpartition(".")[0]
        wq = qs.get(f"{owner}.weight_quantizer")
        if wq is None or not wq.spec.enabled:
            assert torch.equal(w, got["state"][k]), k
            continue
        s = wq.scale_zero_point()[0].reshape(-1, *[1] * (w.dim() - 1))
        codes1, codes2 = torch.round(w / s), torch.round(got["state"][k] / s)
        assert torch.equal(codes1, codes2), f"{k}: {(codes1 != codes2).sum()} of {w.numel()} codes differ"


def test_fisher_weights_follow_what_the_prediction_uses(trained_vit, fmnist):
    """BRECQ's diagonal Fisher: after the last block only the class token reaches the head (global_pool
    'token'), so the patch tokens get weight exactly 0; the weights average 1."""
    from quantcore.recon.adaround import _fisher

    x = fmnist["calib"][:64]
    w = _fisher(trained_vit, trained_vit.blocks[1], list(x.split(32)), 64, torch.device("cpu"))
    assert w.shape == (64, 17, 64)
    assert float(w[:, 1:].abs().max()) == 0.0 and float(w[:, 0].min()) >= 0 and float(w[:, 0].max()) > 0
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-5)
    m = _prepared(trained_vit, _vit_recipe(8), x)
    res = reconstruct(m, x.split(32), ReconstructionConfig(mode="block", iterations=20, num_images=64, loss="fisher"))
    assert [u["name"] for u in res.units] == ["blocks.0", "blocks.1"]  # the weighted path runs end to end
    assert all(math.isfinite(u["loss"]) and math.isfinite(u["loss_rtn"]) for u in res.units)


def test_pipeline_runs_reconstruction_when_the_recipe_asks(tmp_path):
    """``calibrate_variants`` (quantcore ptq) reconstructs right after calibration; the FP32 model,
    whose tensors the variant shares, keeps its weights."""
    from quantcore.pipeline import DataSpec, RunOptions, calibrate_variants
    from tiny_data import TINY_RECIPE, make_images

    root = make_images(tmp_path / "img")
    r = load_recipe({**TINY_RECIPE, "reconstruction": {"iterations": 5, "batch_size": 4, "num_images": 8}})
    fp32, variants, _ = calibrate_variants([r], DataSpec(str(root), "train"), RunOptions(device="cpu", progress=False))
    rec = variants[0].model.quantcore_reconstruction
    assert rec.images == 8 and [u["name"] for u in rec.units] == ["blocks.0"]
    m = variants[0].model
    wq = quantizers(m)["blocks.0.attn.qkv.weight_quantizer"]
    assert torch.equal(wq(m.blocks[0].attn.qkv.weight), m.blocks[0].attn.qkv.weight)
    assert not torch.equal(fp32.blocks[0].attn.qkv.weight, m.blocks[0].attn.qkv.weight)
    w = fp32.blocks[0].attn.qkv.weight  # the FP32 model kept float weights (not grid points)
    assert not torch.equal(wq(w), w)


def test_asking_for_more_images_than_calibration_gives_is_said(caplog):
    """reconstruction.num_images set above what calibration passes: used all, and warned (not silent)."""
    import logging

    import quantcore
    from quantcore.recon import reconstruct
    from quantcore.recon.config import ReconstructionConfig

    rec = quantcore.load_recipe({"name": "r", "model": {"name": "quantcore/vit_fmnist", "kwargs": {"depth": 1}},
                                 "quant": {"weights": {"bits": 4}}, "calibration": {"method": "max"}})
    torch.manual_seed(0)
    model = quantcore.prepare(quantcore.build_model(rec, load_weights=False), rec)
    batches = [(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    quantcore.calibrate(model, batches)
    with caplog.at_level(logging.WARNING, logger="quantcore"):
        res = reconstruct(model, batches, ReconstructionConfig(num_images=5000, iterations=2, batch_size=8))
    assert res.images == 16 and any("num_images is 5000" in w for w in res.warnings)
    # a quantcore log line (the CLI's "warning:" line), not a Python warning with file and line (helper-132)
    assert "num_images is 5000" in caplog.text
