"""The quantcore CLI end to end on tiny generated data, local and on a real S3 API (moto on loopback)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import quantcore
from quantcore.cli import main
from quantcore.io import storage
from tiny_data import TINY_RECIPE as RECIPE, make_images

REPORT_KEYS = {"schema", "created", "model", "data", "calibration", "reference", "results", "timings_s",
               "skipped", "versions", "variants", "transform"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("imgs"))


@pytest.fixture()
def recipe_file(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return str(path)


def run(*args: str) -> int:
    return main([str(a) for a in args])


def check_run_outputs(out: str, variant: str) -> dict:
    rep = json.loads(storage.read_bytes(storage.join(out, "report.json")))
    assert REPORT_KEYS <= rep.keys()
    assert rep["schema"] == "quantcore.report/1" and rep["reference"] == "fp32"
    assert set(rep["results"]) == {"fp32", variant}
    q = rep["results"][variant]
    for key in ("top1", "top5", "per_class", "agreement", "sqnr_db", "delta_top1", "count"):
        assert key in q, key
    assert q["count"] == 12 and len(q["per_class"]) == 3
    assert rep["data"]["eval_count"] == 12 and rep["variants"][variant]["calibration"]["images"] == 8
    assert storage.read_bytes(storage.join(out, "per_class.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fp32 |" in storage.read_bytes(storage.join(out, "report.md")).decode()
    enc = json.loads(storage.read_bytes(storage.join(out, variant, "encodings.json")))
    assert enc["quantizers"] and all("scale" in r for r in enc["quantizers"] if r["enabled"])
    sub = json.loads(storage.read_bytes(storage.join(out, variant, "report.json")))
    assert set(sub["results"]) == {"fp32", variant}
    return rep


def test_pack_then_ptq_local(image_folder, recipe_file, tmp_path, capsys):
    shards = tmp_path / "shards"
    assert run("pack", image_folder, shards, "--split", "train", "--split", "val", "--shard-size", "5") == 0
    assert len(list(shards.glob("train-*.zip"))) == 4
    out = tmp_path / "run"
    assert run("ptq", "-r", recipe_file, "--calib-data", shards, "--out", out, "--no-progress") == 0
    rep = check_run_outputs(str(out), "tiny_w8a8")
    printed = capsys.readouterr().out
    assert "tiny_w8a8" in printed and "agreement" in printed
    # The checkpoint written by ptq evaluates to the same quantized top-1 through `evaluate`.
    ev = tmp_path / "ev"
    assert run("evaluate", "-c", out / "tiny_w8a8" / "model.qc.pt", "-d", shards, "-o", ev, "--no-progress") == 0
    rep2 = json.loads((ev / "report.json").read_text())
    assert rep2["results"]["tiny_w8a8"]["top1"] == pytest.approx(rep["results"]["tiny_w8a8"]["top1"])


def test_ptq_on_s3_moto_mock(image_folder, recipe_file, s3_server, s3_bucket, tmp_path):
    data = f"s3://{s3_bucket}/data"
    assert run("pack", image_folder, data, "--split", "train", "--split", "val", "--shard-size", "5") == 0
    out = f"s3://{s3_bucket}/runs/one"
    assert run("calibrate", "-r", recipe_file, "-d", data, "-o", out, "--no-progress") == 0
    assert storage.exists(f"{out}/tiny_w8a8/model.qc.pt") and storage.exists(f"{out}/tiny_w8a8/encodings.json")
    assert run("ptq", "-r", recipe_file, "--calib-data", data, "--out", out, "--no-progress") == 0
    check_run_outputs(out, "tiny_w8a8")
    model = quantcore.load(f"{out}/tiny_w8a8/model.qc.pt")
    assert quantcore.quantizers(model)


def test_train_then_ptq_with_trained_weights(image_folder, recipe_file, tmp_path):
    weights = tmp_path / "fp32.pt"
    assert run("train", "-r", recipe_file, "-d", image_folder, "-o", weights, "--epochs", "1") == 0
    assert weights.stat().st_size > 0
    out = tmp_path / "run"
    assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--out", out, "--checkpoint", weights,
               "--no-progress") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["variants"]["tiny_w8a8"]["recipe"]["model"]["checkpoint"] == str(weights)


def test_user_mistakes_exit_2_without_traceback(image_folder, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**RECIPE, "calibration": {"methd": "mse"}}))
    assert run("ptq", "-r", bad, "--calib-data", image_folder, "--out", tmp_path / "o", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "calibration.methd" in err and "Traceback" not in err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(RECIPE))
    assert run("ptq", "-r", good, "--calib-data", tmp_path / "missing", "--out", tmp_path / "o",
               "--no-progress") == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    assert run("evaluate", "-c", tmp_path / "nope.pt", "-d", image_folder) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert run("ptq", "--bogus-flag") != 0


@pytest.mark.parametrize("cmd", ["pack", "calibrate", "evaluate", "ptq", "train", "demo"])
def test_help_explains_options(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--" in out and len(out) > 200
