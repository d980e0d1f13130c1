"""The FP32 demo model shipped with quantcore: its record, its accuracy, and when the demo uses it."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from quantcore import demo
from quantcore.config import TrainConfig
from quantcore.demo import FMNIST_DIR, SHIPPED_FP32, DemoError, prepare_demo, shipped_fp32
from quantcore.recipe import load_recipe

RECORD = SHIPPED_FP32.with_name(SHIPPED_FP32.name + ".json")
HAVE_FMNIST = (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()


def _demo_cfg() -> TrainConfig:
    return load_recipe(demo.DEMO_RECIPES[0]).train


def test_shipped_record_matches_the_weights_and_the_demo_train_config():
    meta = json.loads(RECORD.read_text())
    assert hashlib.sha256(SHIPPED_FP32.read_bytes()).hexdigest() == meta["sha256"]
    assert meta["train"] == _demo_cfg().model_dump()  # else the demo would silently retrain
    from quantcore.models import vit_fmnist

    model = vit_fmnist()
    missing = model.load_state_dict(torch.load(SHIPPED_FP32, weights_only=True), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    assert shipped_fp32(_demo_cfg()) == meta
    assert shipped_fp32(_demo_cfg().model_copy(update={"seed": 1})) is None
    assert shipped_fp32(_demo_cfg().model_copy(update={"epochs": 3})) is None


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_shipped_weights_reproduce_their_recorded_test_top1():
    from quantcore.models import vit_fmnist

    meta = json.loads(RECORD.read_text())
    x, y = demo.load_fashion_mnist()["test"]
    model = vit_fmnist().eval()
    model.load_state_dict(torch.load(SHIPPED_FP32, weights_only=True))
    cfg = model.pretrained_cfg
    xs = (torch.from_numpy(x.copy()).float().div(255).unsqueeze(1) - cfg["mean"][0]) / cfg["std"][0]
    with torch.no_grad():
        pred = torch.cat([model(xs[i:i + 2000]).argmax(1) for i in range(0, len(xs), 2000)])
    top1 = 100.0 * float((pred == torch.from_numpy(y.astype("int64"))).float().mean())
    assert abs(top1 - meta["top1_test"]) < 0.015, (top1, meta["top1_test"])  # 1 image = 0.01 point


@pytest.fixture()
def no_data_no_training(monkeypatch):
    """prepare_demo without packing Fashion-MNIST; training is recorded, not run."""
    trained = []
    monkeypatch.setattr(demo, "pack_fashion_mnist", lambda *a, **k: None)

    def fake_train(data_uri, model_uri, cfg, log):
        trained.append(cfg)
        demo.storage.write_bytes(model_uri, b"trained here")

    monkeypatch.setattr(demo, "train_fp32", fake_train)
    return trained


def test_demo_installs_the_shipped_model_unless_asked_for_another(tmp_path, no_data_no_training):
    logs = []
    plan = prepare_demo(str(tmp_path / "s"), log=logs.append)
    assert not no_data_no_training
    assert (tmp_path / "s" / "models").is_dir()
    installed = open(plan.model_uri, "rb").read()
    assert installed == SHIPPED_FP32.read_bytes()
    assert json.loads(open(plan.model_uri + ".json").read())["sha256"] == hashlib.sha256(installed).hexdigest()
    assert any("shipped with quantcore" in m for m in logs)
    assert prepare_demo(str(tmp_path / "s"), log=logs.append).model_uri == plan.model_uri
    assert "cached" in logs[-1] and not no_data_no_training
    # another seed, --retrain, other epochs, a train limit: a model trained here, under its own key
    uris = {plan.model_uri}
    for kw in ({"seed": 1}, {"retrain": True}, {"epochs": 2}, {"train_limit": 100}):
        p = prepare_demo(str(tmp_path / "s"), log=logs.append, **kw)
        assert p.model_uri not in uris and p.out != plan.out
        uris.add(p.model_uri)
    assert [c.seed for c in no_data_no_training] == [1, 0, 0, 0]
    # a run on a test sample reports into its own folders (never over the full run's)
    sample = prepare_demo(str(tmp_path / "s"), log=logs.append, eval_limit=300)
    assert sample.model_uri == plan.model_uri and sample.out != plan.out and sample.qat_out != plan.qat_out
    assert prepare_demo(str(tmp_path / "s"), log=logs.append, eval_limit=0).out == plan.out
    assert [c.epochs for c in no_data_no_training] == [12, 12, 2, 12]


def test_damaged_shipped_weights_are_refused_by_name(tmp_path, monkeypatch, no_data_no_training):
    bad = tmp_path / "assets" / SHIPPED_FP32.name
    bad.parent.mkdir()
    shutil.copy(RECORD, bad.with_name(RECORD.name))
    data = bytearray(SHIPPED_FP32.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(demo, "SHIPPED_FP32", bad)
    with pytest.raises(DemoError, match="vit_fmnist_seed0.pt: sha256 differs.*--retrain"):
        prepare_demo(str(tmp_path / "s"), log=lambda m: None)
    assert not list((tmp_path / "s").glob("models/*.pt"))  # nothing half-installed


def test_printed_targets_are_checked_per_row_at_their_limits():
    from quantcore.demo import TARGETS, summary_lines, target_rows

    def r(top1, agree):
        return {"top1": top1, "agreement": agree, "sqnr_db": 30.0}

    fp = 88.0
    rep = {"results": {"fp32": r(fp, 100.0),
                       "fmnist_w8a8_ft1": r(fp - TARGETS["w8a8_drop"], TARGETS["w8a8_agreement"]),  # at the limits
                       "fmnist_w8a8_ft2": r(fp, TARGETS["w8a8_agreement"] - 0.01),
                       "fmnist_w4a4_ft1": r(fp - TARGETS["w4a4_drop"] - 0.01, 99.0)}}
    qat = {"fmnist_w4a4_ft1": {"results": {"fp32": r(fp, 100.0), "fmnist_w4a4_ft1": r(fp - TARGETS["qat_w4a4_drop"], 97.0)},
                               "qat": {"world_size": 2}},
           "fmnist_w8a8_ft2": {"results": {"fp32": r(fp, 100.0),
                                           "fmnist_w8a8_ft2": r(fp, TARGETS["qat_ft2_agreement"] - 0.01)},
                               "qat": {"world_size": 2}}}
    rows = {x["name"]: x["met"] for x in target_rows(rep, qat)}
    assert rows == {"fmnist_w8a8_ft1": True, "fmnist_w8a8_ft2": False, "fmnist_w4a4_ft1": False,
                    "fmnist_w4a4_ft1 QAT": True, "fmnist_w8a8_ft2 QAT": False}
    text = "\n".join(summary_lines(rep, qat))
    assert text.count("MISSED") == 3 and text.count(": met") == 2 and "(2 ranks)" in text


def test_damaged_or_partial_records_are_refused_by_name(tmp_path, monkeypatch, no_data_no_training):
    assets = tmp_path / "assets"
    assets.mkdir()
    pt, rec = assets / SHIPPED_FP32.name, assets / RECORD.name
    monkeypatch.setattr(demo, "SHIPPED_FP32", pt)
    assert shipped_fp32(_demo_cfg()) is None  # nothing installed: the demo trains (and says so)
    shutil.copy(SHIPPED_FP32, pt)
    with pytest.raises(DemoError, match=r"vit_fmnist_seed0\.pt\.json: missing beside vit_fmnist_seed0\.pt"):
        prepare_demo(str(tmp_path / "s"), log=lambda m: None)
    for text, why in (("{not json", "Expecting property name"), ('{"train": {}}', "no 'train' or 'sha256'")):
        rec.write_text(text)
        with pytest.raises(DemoError, match=f"vit_fmnist_seed0.pt.json: not a readable record .*{why}.*--retrain"):
            prepare_demo(str(tmp_path / "s"), log=lambda m: None)
    pt.unlink()
    shutil.copy(RECORD, rec)
    with pytest.raises(DemoError, match=r"vit_fmnist_seed0\.pt: missing beside"):
        prepare_demo(str(tmp_path / "s"), log=lambda m: None)
    assert not no_data_no_training


def test_a_damaged_cached_copy_is_installed_again(tmp_path, no_data_no_training):
    logs = []
    plan = prepare_demo(str(tmp_path / "s"), log=logs.append)
    with open(plan.model_uri, "r+b") as f:
        f.truncate(1000)
    prepare_demo(str(tmp_path / "s"), log=logs.append)
    assert "differs from the shipped model" in logs[-2] and "shipped with quantcore" in logs[-1]
    assert open(plan.model_uri, "rb").read() == SHIPPED_FP32.read_bytes()


def test_demo_refuses_bad_options_and_a_store_that_is_a_file(tmp_path, no_data_no_training):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DemoError, match="--store .*exists and is not a directory"):
        prepare_demo(str(tmp_path / "f"), log=lambda m: None)
    for kw, opt in (({"epochs": 0}, "--epochs"), ({"train_limit": 0}, "--train-limit"),
                    ({"train_limit": -5}, "--train-limit")):
        with pytest.raises(DemoError, match=f"{opt} must be >= 1"):
            prepare_demo(str(tmp_path / "s"), log=lambda m: None, **kw)
    assert not no_data_no_training


@pytest.mark.parametrize("images", [1, 100, 1000, 1024])
def test_short_training_runs_schedule_without_dividing_by_zero(images):
    from quantcore.train import train_classifier

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(images, 1, 2, 2), torch.randint(0, 3, (images,))
    cfg = TrainConfig(epochs=1, batch_size=256, lr=1e-2, hflip=False)
    steps = (images + 255) // 256
    res = train_classifier(model, lambda e: ((x[i:i + 256], y[i:i + 256]) for i in range(0, images, 256)), steps, cfg)
    assert res.steps == steps and torch.isfinite(torch.tensor(res.final_loss))


@pytest.mark.parametrize("argv, opt", [(["--epochs", "0"], "--epochs"), (["--train-limit", "0"], "--train-limit"),
                                       (["--eval-limit", "-1"], "--eval-limit")])
def test_job_entrypoint_refuses_out_of_range_options(argv, opt, capsys):
    from jobs.demo import main

    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2 and f"argument {opt}: must be >=" in capsys.readouterr().err


def test_job_entrypoint_names_a_store_that_is_a_file(tmp_path, capsys, no_data_no_training):
    from jobs.demo import main

    (tmp_path / "f").write_text("x")
    assert main(["--store", str(tmp_path / "f")]) == 2
    assert "--store" in capsys.readouterr().err
