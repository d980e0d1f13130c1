"""Accuracy on real data (Fashion-MNIST): the demo pipeline on a briefly trained ViT.

Top-1 barely moves at 8 bits, so the test holds INT8 top-1 agreement and logit SQNR against FP32
above thresholds, checks quantization is really in the path (finite SQNR), and shows the thresholds
catch broken calibration (shrunken ranges fall below them).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantcore import api
from quantcore.data import eval_transform, make_loader, open_dataset
from quantcore.demo import FMNIST_DIR, run_demo
from quantcore.evaluate import evaluate_models

pytestmark = pytest.mark.skipif(not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

W8_AGREEMENT, W8_SQNR = 99.0, 30.0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    return run_demo(str(store), epochs=3, train_limit=6000, progress=False, log=lambda s: None,
                    qat=False)  # QAT: tests/test_qat.py, tests/test_demo_job.py


def test_w8a8_matches_fp32_and_w4a4_degrades_gracefully(demo_run):
    res = demo_run.report["results"]
    assert res["fp32"]["count"] == 6000
    assert res["fp32"]["top1"] > 50.0, "the briefly trained model should have learned something (chance: 10%)"
    for name in ("fmnist_w8a8_ft1", "fmnist_w8a8_ft2"):
        r = res[name]
        assert r["agreement"] >= W8_AGREEMENT, (name, r["agreement"])
        assert W8_SQNR <= r["sqnr_db"] < 80.0, (name, r["sqnr_db"])  # < 80: quantization really applied
        assert abs(r["delta_top1"]) < 1.0
    w4 = res["fmnist_w4a4_ft1"]
    assert w4["sqnr_db"] < res["fmnist_w8a8_ft1"]["sqnr_db"] - 6.0  # 4 bits are visibly coarser
    assert w4["agreement"] >= 85.0 and w4["sqnr_db"] >= 12.0


def test_thresholds_catch_broken_ranges(demo_run):
    ckpt = demo_run.report["variants"]["fmnist_w8a8_ft1"]["artifacts"]["checkpoint"]
    good = api.load(ckpt)
    broken = api.load(ckpt)
    for q in api.quantizers(broken).values():
        if q.kind == "activation" and q.is_calibrated:
            q.set_range(q.amin * 0.05, q.amax * 0.05)  # ranges 20x too small: heavy clipping
    data = str(Path(demo_run.out).parent.parent / "data" / "fashion-mnist-6000")
    ds = open_dataset(data, "test", eval_transform(good))
    fp32 = api.load(ckpt)
    api.set_quantization(fp32, False)
    scores = evaluate_models({"fp32": fp32, "good": good, "broken": broken},
                             make_loader(ds, 500, indices=range(2000)), ds.num_classes, reference="fp32")
    assert scores["broken"].sqnr_db < W8_SQNR or scores["broken"].agreement < W8_AGREEMENT
    assert scores["good"].sqnr_db >= W8_SQNR
