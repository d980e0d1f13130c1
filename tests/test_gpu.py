"""The GPU paths against the CPU on the same inputs: histogram counts, calibrated ranges, fake-quant
forwards, save/load, QAT under autocast, and the CLI under torchrun with ``--device cuda`` (NCCL,
batched nvJPEG decode).

CI has no GPU, so every test here is skipped there; ``bench/gpu_check.sh`` runs this file on a lent
GPU. ``QUANTCORE_TEST_DEVICE=cpu`` runs the same code with the CPU standing in for the GPU (a dry run
of the tests themselves; the comparisons are then trivially tight).
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import quantcore
from quantcore import api
from quantcore.calib.histogram import HistogramState
from quantcore.config import Recipe
from quantcore.pipeline import DataSpec
from quantcore.qat import QATOptions, run_qat

from test_distributed_ptq import _free_port
from tiny_data import TINY_RECIPE, make_images

DEVICE = os.environ.get("QUANTCORE_TEST_DEVICE", "cuda")
REPO = Path(__file__).resolve().parents[1]
METHODS = ("max", "percentile", "mse", "entropy", "tf_enhanced")

pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device (bench/gpu_check.sh runs these on a lent GPU)")


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 in cuDNN convolutions and cuBLAS matmuls: the GPU's FP32 forward then differs from the
    CPU's by float rounding only (TF32 would add ~1e-3 relative, which moves calibrated ranges)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(1)  # the CPU side takes its bincount path, the GPU's histc path is the other one
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old[:2]
    torch.set_num_threads(old[2])


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Image-like batches: smooth colour fields plus grain, normalized as ImageNet inputs are."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = (x + 0.05 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    x = torch.round(x * 255) / 255  # 8-bit pixels: many repeated values
    return (x - 0.45) / 0.226


def _activations() -> dict[str, torch.Tensor]:
    """Tensors calibrators meet: a timm ViT's post-GELU and attention probabilities, a ResNet's
    post-ReLU map (mostly zeros), normalized 8-bit pixels (point masses), wide dynamic range, bf16."""
    import timm
    import torchvision

    torch.manual_seed(0)
    x = _images(4, 64)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10).eval()
    got: dict[str, torch.Tensor] = {}
    vit.blocks[0].mlp.act.register_forward_hook(lambda m, i, o: got.__setitem__("vit post-GELU", o))
    vit.blocks[1].norm1.register_forward_hook(lambda m, i, o: got.__setitem__("vit post-LayerNorm", o))
    cnn = torchvision.models.resnet18(num_classes=10).eval()
    cnn.layer1[0].relu.register_forward_hook(lambda m, i, o: got.setdefault("resnet post-ReLU", o))
    with torch.no_grad():
        vit(x)
        cnn(x)
        q, k = torch.randn(2, 4, 3, 65, 64).unbind(0)
        got["attention probabilities"] = (q @ k.transpose(-1, -2) / 2).softmax(-1)
    got["pixels"] = x
    got["wide range"] = torch.logspace(-8, 3, 5000) * torch.sign(torch.randn(5000))
    got["bf16 post-GELU"] = got["vit post-GELU"].bfloat16()
    return got


@pytest.mark.parametrize("bins", [2048, 16384])
def test_histogram_on_the_gpu_counts_what_the_cpu_counts(bins):
    """``HistogramState.update`` bins on the GPU with ``torch.histc`` and on one CPU thread with
    ``bincount``: two implementations of one exact binning. Same counts, bit for bit, including a
    range that grows between updates (the counts are re-binned) and bf16 input."""
    for name, x in _activations().items():
        half = x.flatten()[: x.numel() // 3]  # a smaller range first: the second update widens it
        states = {}
        for dev in ("cpu", DEVICE):
            s = HistogramState(bins=bins)
            s.update(half.to(dev) * 0.25)
            s.update(x.to(dev))
            states[dev] = s
        a, b = states["cpu"], states[DEVICE]
        assert (a.exp, a.total, a.min, a.max) == (b.exp, b.total, b.min, b.max), name
        assert torch.equal(a.counts.cpu(), b.counts.cpu()), (name, (a.counts.cpu() - b.counts.cpu()).abs().sum())


def _recipe(model: dict, placement: dict, method: str) -> dict:
    return {"name": f"gpu_{method}", "model": model, "placement": placement,
            "calibration": {"method": method, "num_batches": 3, "batch_size": 8}}


MODELS = {
    "vit": ({"name": "quantcore/vit_fmnist", "num_classes": 10, "in_chans": 3, "img_size": 32,
             "kwargs": {"patch_size": 8, "depth": 2}}, {"family": "vit", "mode": "ft2"}),
    "resnet18": ({"name": "torchvision:resnet18", "num_classes": 10}, {"family": "cnn", "fold_bn": True}),
}


def _calibrated(key: str, method: str, device: str, batches: list[torch.Tensor]) -> torch.nn.Module:
    model_cfg, placement = MODELS[key]
    r = quantcore.load_recipe(_recipe(model_cfg, placement, method))
    torch.manual_seed(0)
    model = quantcore.build_model(r).eval()
    api.prepare(model, r, example_input=batches[0][:1])
    model.to(device)
    api.calibrate(model, [b.to(device) for b in batches])
    return model


def _ranges(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, q in api.quantizers(model).items():
        if not q.spec.is_float and q.amax.numel():
            out[name] = torch.stack([q.amin.float().cpu().flatten(), q.amax.float().cpu().flatten()])
    return out


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_calibration_on_the_gpu_gives_the_cpu_ranges(key, method):
    """Every quantizer's calibrated range on the GPU equals the CPU's: max to float rounding of the
    forward; the histogram searches to within their grids (a value a rounding apart from a bin edge may
    land in the next bin, so a search can step once)."""
    batches = [_images(8, seed=s) for s in range(3)]
    cpu, gpu = (_ranges(_calibrated(key, method, d, batches)) for d in ("cpu", DEVICE))
    assert cpu.keys() == gpu.keys() and len(cpu) > 5
    rel = {n: float(((cpu[n] - gpu[n]).abs() / cpu[n].abs().clamp_min(1e-6)).max()) for n in cpu}
    worst = max(rel.items(), key=lambda kv: kv[1])
    if method == "max":
        assert worst[1] < 1e-4, worst
    else:
        # entropy: the KL curve of a random model's softmax input is flat, and its argmin moved 7.8% between
        # near-equal minima on an H200 (a search property, not a device one: the counts match bit for bit)
        close = sum(v < 1e-3 for v in rel.values()) / len(rel)
        assert worst[1] < (0.15 if method == "entropy" else 5e-2) and close >= 0.9, (worst, close)


@pytest.mark.parametrize("key", list(MODELS))
def test_prepare_on_a_model_already_on_the_gpu(key):
    """``prepare`` on a model that lives on the GPU puts its quantizers there too: the ranges calibrate
    on the device, and a deep copy (QAT's PTQ twin) runs without moving anything. Before, the ranges
    stayed on the CPU beside GPU weights ("cuda:0 and cpu" at the first quantized forward)."""
    batches = [_images(8, seed=s) for s in range(3)]
    model_cfg, placement = MODELS[key]
    r = quantcore.load_recipe(_recipe(model_cfg, placement, "percentile"))
    torch.manual_seed(0)
    model = quantcore.build_model(r).eval().to(DEVICE)
    api.prepare(model, r)
    where = next(model.parameters()).device  # cuda:0 (the index too: a quantizer on another GPU would fail)
    assert {b.device for q in api.quantizers(model).values() for b in q.buffers()} == {where}
    api.calibrate(model, [b.to(DEVICE) for b in batches])
    twin = copy.deepcopy(model)
    ref = _calibrated(key, "percentile", "cpu", batches)
    x = _images(16, seed=5)
    with torch.no_grad():
        got, got_twin, want = model(x.to(DEVICE)).cpu(), twin(x.to(DEVICE)).cpu(), ref(x)
    assert torch.equal(got, got_twin)
    sqnr = 10 * math.log10(float(want.pow(2).sum() / (got - want).pow(2).sum().clamp_min(1e-30)))
    assert sqnr > 30, sqnr


@pytest.mark.parametrize("key", list(MODELS))
def test_fake_quant_forward_and_save_load_on_the_gpu(key, tmp_path):
    """A model calibrated on the CPU and moved to the GPU runs the same fake-quant forward (rounding
    flips at grid midpoints aside); saved from the GPU and loaded on the CPU, its ranges are bit-identical."""
    batches = [_images(8, seed=s) for s in range(3)]
    model = _calibrated(key, "percentile", "cpu", batches)
    x = _images(64, seed=7)
    with torch.no_grad():
        ref = model(x)
        with api.quantization_disabled(model):
            ref_fp = model(x)
        model.to(DEVICE)
        got = model(x.to(DEVICE)).cpu()
        with api.quantization_disabled(model):
            got_fp = model(x.to(DEVICE)).cpu()
    torch.testing.assert_close(got_fp, ref_fp, rtol=1e-4, atol=1e-4)
    sqnr = 10 * math.log10(float(ref.pow(2).sum() / (got - ref).pow(2).sum().clamp_min(1e-30)))
    assert sqnr > 30 and float((got.argmax(1) == ref.argmax(1)).float().mean()) >= 0.95, sqnr
    api.save(model, str(tmp_path / "m.qc.pt"))
    back = api.load(str(tmp_path / "m.qc.pt"))
    a, b = _ranges(model), _ranges(back)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_qat_trains_on_the_gpu_under_autocast(tmp_path, compiled):
    """``run_qat`` on the GPU: bf16 autocast (``amp: auto``), learned ranges, eager and under
    ``qat.compile``; a checkpoint that loads on the CPU with the learned scales in its encodings."""
    data = make_images(tmp_path / "imgs", splits=(("train", 16), ("val", 4)))
    r = Recipe.model_validate({**TINY_RECIPE, "calibration": {"method": "max", "num_batches": 2, "batch_size": 8},
                               "qat": {"epochs": 1, "batch_size": 8, "amp": "auto", "ranges": "learned",
                                       "optimizer": {"name": "adamw", "lr": 1e-3}, "augment": {"kind": "none"},
                                       "log_every": 1, "num_workers": 0, "compile": compiled}})
    seen: list[dict] = []
    rep = run_qat(r, DataSpec(str(data), "train"), DataSpec(str(data), "val"), str(tmp_path / "o"),
                  QATOptions(device=DEVICE, progress=False, max_steps=5, on_log=seen.append))
    losses = [m["loss"] for m in seen if "loss" in m]
    assert len(losses) >= 5 and all(math.isfinite(v) for v in losses), seen
    assert rep["qat"]["learned_quantizers"] > 0
    model = api.load(str(tmp_path / "o" / r.name / "model.qc.pt"))
    assert next(model.parameters()).device.type == "cpu"
    enc = json.loads((tmp_path / "o" / r.name / "encodings.json").read_text())["quantizers"]
    scales = [s for e in enc if e.get("enabled") and "scale" in e
              for s in (e["scale"] if isinstance(e["scale"], list) else [e["scale"]])]
    assert scales and all(math.isfinite(s) and s > 0 for s in scales)


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "quantcore.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


def test_cli_under_torchrun_with_device_cuda_matches_the_cpu(tmp_path):
    """``quantcore ptq`` and ``quantcore qat`` under torchrun with ``--device cuda``: the rank's process
    group (NCCL on a GPU), the batched decode on the device and DDP run; the FP32 figures equal a CPU run
    of the same data, and the quantized ones within two images of it (18 images of a random-weight model,
    whose logits are near ties: on an H200 one image flipped)."""
    from quantcore.cli import main

    data = make_images(tmp_path / "imgs", splits=(("train", 8), ("val", 6)))
    rfile = tmp_path / "tiny.yaml"
    rfile.write_text(yaml.safe_dump({**TINY_RECIPE, "qat": {"epochs": 1, "batch_size": 4, "augment": {"kind": "none"},
                                                             "num_workers": 0}}))
    weights = tmp_path / "fp32.pt"
    torch.manual_seed(0)
    torch.save(quantcore.build_model(quantcore.load_recipe(TINY_RECIPE)).state_dict(), weights)
    common = ["-r", str(rfile), "--calib-data", str(data), "--checkpoint", str(weights), "--batch-size", "4",
              "--no-progress"]
    proc = _torchrun("ptq", *common, "--device", DEVICE, "--out", str(tmp_path / "g"), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main(["ptq", *common, "--device", "cpu", "--out", str(tmp_path / "c")]) == 0
    g, c = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("g", "c"))
    assert g["results"]["fp32"]["top1"] == c["results"]["fp32"]["top1"]
    assert g["results"]["fp32"]["count"] == c["results"]["fp32"]["count"] == 18
    assert g["results"]["tiny_w8a8"]["top1"] == pytest.approx(c["results"]["tiny_w8a8"]["top1"], abs=2 * 100 / 18 + 1e-9)

    proc = _torchrun("qat", "-r", str(rfile), "-d", str(data), "--eval-data", str(data), "--eval-split", "val",
                     "--checkpoint", str(weights), "--max-steps", "3", "--device", DEVICE, "--no-progress",
                     "--out", str(tmp_path / "q"), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = api.load(str(tmp_path / "q" / "tiny_w8a8" / "model.qc.pt"))
    assert _ranges(model)
