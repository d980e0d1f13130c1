"""The quantcore CLI end to end on tiny generated data, local and on a real S3 API (moto on loopback)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
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


def _recipe(tmp_path, file: str, **over) -> Path:
    path = tmp_path / f"{file}.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, **over}))
    return path


def expect_user_error(capsys, args, *words) -> str:
    """Exit 2, exactly one ``error:`` line on stderr naming ``words``, no traceback."""
    assert run(*args) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) > 20, err
    assert "Traceback" not in err and not any(ln.startswith(" ") for ln in err.splitlines()), err
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def test_every_kind_of_user_mistake_is_one_line_and_exit_2(image_folder, tmp_path, capsys):
    out = tmp_path / "o"
    ptq = ("ptq", "--calib-data", image_folder, "--out", out, "--no-progress")

    def ptq_with(recipe, *more):
        return ptq[:1] + ("-r", recipe) + ptq[1:] + more

    good = _recipe(tmp_path, "good")
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "typo", placement={"famly": "vit"})),
                      "typo.yaml", "placement.famly")
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "kw", model={**RECIPE["model"], "kwargs": {"depthh": 1}})),
                      "model.kwargs", "depthh")
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "pc", quant={"activations": {"per_channel": True}})),
                      "pc.yaml", "quant.activations")
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "fp32", name="fp32")), "name", "'fp32'")
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "nomodel", model=None)), "model.name")
    expect_user_error(capsys, ptq_with(good, "-r", good), "'tiny_w8a8'", "unique")
    expect_user_error(capsys, ptq_with(good, "-r", _recipe(tmp_path, "other", name="other",
                                                            model={**RECIPE["model"], "num_classes": 5})),
                      "'other'", "model.num_classes")
    # An override whose match: matches nothing names the override (PlacementError, a UserError).
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "ov", overrides=[{"match": "nope.*", "float": True}])),
                      "overrides[0]", "nope.*")
    # An override whose spec does not fit a quantizer (checked at placement: the spec it patches
    # depends on the quantizer) names the override, the quantizer and the fix, on one line.
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "twin", overrides=[{"match": "*", "spec": {"format": "twin_int"}}])),
                      "overrides[0]", "invalid spec for quantizer", "before the override: int8/", "set symmetric: false")
    # A calibration-time field (reconstruction) of the second of two recipes names its recipe (helper-132)
    expect_user_error(capsys, ptq_with(good, "-r", _recipe(tmp_path, "rec", name="rec", reconstruction={
        "mode": "layer", "iterations": 2, "modules": ["layer*"]})),
                      "recipe 'rec': reconstruction.modules", "'layer*'")
    # Bad files: FP32 weights that are no state_dict, weights of another model, a calibrated
    # checkpoint that is no checkpoint, a data directory that does not exist.
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    expect_user_error(capsys, ptq_with(good, "--checkpoint", garbage), "model.checkpoint", "garbage.pt")
    wide = tmp_path / "wide.pt"
    torch.save(quantcore.build_model({"model": {**RECIPE["model"], "kwargs": {"patch_size": 8, "depth": 1,
                                                                              "embed_dim": 32}}}).state_dict(), wide)
    expect_user_error(capsys, ptq_with(good, "--checkpoint", wide), "model.checkpoint", "wide.pt", "size mismatch")
    expect_user_error(capsys, ("evaluate", "-c", garbage, "-d", image_folder), "checkpoint", "garbage.pt")
    expect_user_error(capsys, ("ptq", "-r", good, "--calib-data", tmp_path / "no-such-dir", "--out", out),
                      "no-such-dir")
    expect_user_error(capsys, ptq_with(good, "--device", "tpu:7"), "--device", "tpu:7")
    # Found only when the model meets the data: 5 logits for 3 classes.
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "ncls", model={**RECIPE["model"], "num_classes": 5})),
                      "model.num_classes", "5 logits", "3 classes")
    assert run("train", "-r", good, "-d", image_folder, "-o", tmp_path / "w.pt", "--epochs", "0") == 2  # usage
    assert not out.exists() or not any(out.rglob("report.json"))


def test_options_that_cannot_apply_are_refused_before_any_work(image_folder, tmp_path, capsys):
    """An option that cannot act is an error naming it, never dropped: spec fields a float cast or
    another calibrator has no use for, contradictory per-channel settings, an axis the weight does
    not have, QAT options the chosen loss/schedule/ranges/augmentation do not read, a decay that
    would raise the learning rate, a layout typo, analyze options without the step that reads them,
    and an evaluation split that does not exist (found before calibrating, nothing written)."""
    out = tmp_path / "o"

    def ptq_with(recipe, *more):
        return ("ptq", "-r", recipe, "--calib-data", image_folder, "--out", out, "--no-progress") + more

    for i, (patch, words) in enumerate([
            ({"format": "fp16", "bits": 4}, ("bits", "'fp16'")),
            ({"format": "bf16", "calibrator": "entropy"}, ("calibrator", "'bf16'")),
            ({"format": "fp8_e4m3", "narrow_range": True}, ("narrow_range",)),
            ({"format": "fp16", "per_channel": True}, ("per_channel",)),
            ({"calibrator": "max", "percentile": 99.0}, ("percentile", "'max'")),
            ({"per_channel": False, "axis": 0}, ("per_channel", "axis"))]):
        expect_user_error(capsys, ptq_with(_recipe(tmp_path, f"spec{i}", overrides=[{"match": "*", "spec": patch}])),
                          f"spec{i}.yaml", *words)
        expect_user_error(capsys, ptq_with(_recipe(tmp_path, f"q{i}", quant={"weights": patch})), "quant.weights", *words)
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "axis", overrides=[{"match": "*weight_quantizer",
                                                                              "spec": {"axis": 5}}])),
                      "axis 5", "weight_quantizer", "shape")
    # a percentile nothing reads: the quantizer's calibrator (from the recipe) is mse
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "pct", overrides=[{"match": "*input_quantizer",
                                                                             "spec": {"percentile": 99.9}}])),
                      "overrides[0]", "percentile", "'mse'")
    expect_user_error(capsys, ptq_with(_recipe(tmp_path, "pctq", quant={"activations": {"percentile": 99.9}})),
                      "quant.activations.percentile", "'mse'")
    # ...but an axis on a quantizer that reads none (a float cast, a disabled one) is no mistake
    for i, ov in enumerate(({"match": "*weight_quantizer", "spec": {"format": "fp16"}},
                            {"match": "*weight_quantizer", "enabled": False})):
        ok = _recipe(tmp_path, f"castaxis{i}", quant={"weights": {"bits": 8, "axis": 3}}, overrides=[ov])
        assert run(*ptq_with(ok, "--limit", "8")) == 0, capsys.readouterr().err
    capsys.readouterr()
    qat = {"epochs": 1, "optimizer": {"name": "sgd", "lr": 1e-4}}
    for i, (more, words) in enumerate([
            ({"schedule": {"name": "cosine", "min_lr": 0.01}}, ("min_lr", "optimizer.lr")),
            ({"distill": {"kind": "none", "alpha": 0.9}}, ("distill.alpha",)),
            ({"ranges": "frozen", "optimizer": {"name": "sgd", "lr": 1e-4, "range_lr": 0.5}}, ("range_lr", "frozen")),
            ({"augment": {"kind": "none", "hflip": 1.0}}, ("augment.hflip",)),
            ({"schedule": {"name": "cosine", "pct_start": 0.9}}, ("pct_start", "'cosine'")),
            ({"schedule": {"name": "onecycle", "warmup_steps": 100}}, ("warmup_steps", "'onecycle'"))]):
        expect_user_error(capsys, ptq_with(_recipe(tmp_path, f"qat{i}", qat={**qat, **more})), f"qat{i}.yaml", *words)
    good = _recipe(tmp_path, "good")
    expect_user_error(capsys, ptq_with(good, "--layout", "zipp"), "--layout", "'zipp'")
    expect_user_error(capsys, ("analyze", "-c", tmp_path / "x.pt", "-d", image_folder, "-o", out, "--cost", "bops",
                               "--eval-limit", "5"), "--cost", "--eval-limit", "--search", "--eval-split")
    expect_user_error(capsys, ("analyze", "-c", tmp_path / "x.pt", "-d", image_folder, "-o", out, "--no-errors",
                               "--no-sensitivity"), "--no-errors", "--no-sensitivity", "nothing")
    # an empty split name looked for class folders right under the dataset root; -c a,b is not a list
    expect_user_error(capsys, ptq_with(good, "--eval-split", ""), "split: empty name")
    expect_user_error(capsys, ("evaluate", "-c", f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}", "-d", image_folder),
                      "one checkpoint, not a comma-separated list")
    expect_user_error(capsys, ("analyze", "-c", tmp_path / "x.pt", "-d", image_folder, "-o", out, "--no-errors",
                               "--no-sensitivity", "--eval-split", "val", "--groups", "block"),
                      "--groups", "both switched off")
    expect_user_error(capsys, ptq_with(good, "--eval-split", "no_such_split"), "--eval-split", "no_such_split")
    # a shard cache for data read in place: ptq, evaluate and qat all refuse it
    expect_user_error(capsys, ptq_with(good, "--cache-dir", tmp_path / "cache"), "--cache-dir", str(image_folder))
    expect_user_error(capsys, ("evaluate", "-c", tmp_path / "x.pt", "-d", image_folder, "--cache-dir",
                               tmp_path / "cache"), "--cache-dir", "local")
    expect_user_error(capsys, ("qat", "-r", _recipe(tmp_path, "goodqat", qat=qat), "-d", image_folder, "-o", out,
                               "--cache-dir", tmp_path / "cache"),
                      "--cache-dir", "local")
    assert not (out / "good").exists() and not (tmp_path / "cache").exists()  # nothing calibrated or written


def test_random_fp32_weights_are_warned_about_and_recorded(image_folder, recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--out", out, "--no-progress") == 0
    err = capsys.readouterr().err
    assert sum("warning:" in ln and "RANDOM WEIGHTS" in ln for ln in err.splitlines()) >= 1, err
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["warnings"]) == 1 and "model.checkpoint" in rep["warnings"][0]
    assert rep["variants"]["tiny_w8a8"]["calibration"]["fp32_weights"] is None
    assert json.loads((out / "tiny_w8a8" / "report.json").read_text())["warnings"] == rep["warnings"]
    assert "**WARNING**: the FP32 model quantcore/vit_fmnist" in (out / "report.md").read_text()
    # The calibrated checkpoint remembers it: evaluating it warns again.
    ev = tmp_path / "ev"
    assert run("evaluate", "-c", out / "tiny_w8a8" / "model.qc.pt", "-d", image_folder, "-o", ev,
               "--no-progress") == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().err
    assert json.loads((ev / "report.json").read_text())["warnings"] == rep["warnings"]
    # Loaded weights: no warning, and the report says where they came from.
    weights = tmp_path / "fp32.pt"
    torch.save(quantcore.build_model(quantcore.load_recipe(recipe_file)).state_dict(), weights)
    out2 = tmp_path / "run2"
    assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--out", out2, "--checkpoint", weights,
               "--no-progress", "--limit", "6") == 0
    assert "RANDOM" not in capsys.readouterr().err
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["warnings"] == [] and rep2["variants"]["tiny_w8a8"]["calibration"]["fp32_weights"] == \
        f"model.checkpoint {weights}"


@pytest.mark.parametrize("cmd", ["pack", "calibrate", "evaluate", "ptq", "train", "demo"])
def test_help_explains_options(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--" in out and len(out) > 200


def test_calibration_on_fewer_images_than_the_recipe_asks_is_said(image_folder, tmp_path, capsys):
    """18 train images, the recipe asks for 3 x 10: calibrated on 18, and the report and stderr say so."""
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "calibration": {**RECIPE["calibration"], "num_batches": 3,
                                                               "batch_size": 10}}))
    out = tmp_path / "run"
    assert run("calibrate", "-r", path, "-d", image_folder, "--split", "train", "-o", out, "--no-progress") == 0
    rep = json.loads((out / "report.json").read_text())
    (name,) = rep["variants"]
    assert rep["variants"][name]["calibration"]["images"] == 18
    assert any("calibration asks for 30 images" in w and "calibrated on 18" in w for w in rep["warnings"])
    assert "calibration asks for 30 images" in capsys.readouterr().err
    # an unreadable image skipped with --skip-bad is not counted as calibrated on
    import shutil

    data = tmp_path / "with_bad"
    shutil.copytree(image_folder, data)
    cls = sorted(p for p in (data / "train").iterdir() if p.is_dir())[0]
    (cls / "zero.jpg").write_bytes(b"")
    out = tmp_path / "run_bad"
    assert run("calibrate", "-r", path, "-d", data, "--split", "train", "-o", out, "--no-progress", "--skip-bad") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["variants"][name]["calibration"]["images"] == 18 and len(rep["skipped"]) == 1
    assert any("has 19: calibrated on 18 (1 unreadable, skipped)" in w for w in rep["warnings"]), rep["warnings"]


def test_a_subset_with_bad_images_says_how_many_were_scored_and_cjk_class_names_warn_once(image_folder, recipe_file,
                                                                                            tmp_path, capsys):
    """--limit N --skip-bad: the subset line said 'N of M images' when fewer were scored (helper-129). And
    class folders the plot font cannot draw (CJK) gave matplotlib's warning per character and call."""
    import shutil
    import warnings

    out = tmp_path / "run"
    assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--out", out, "--no-progress") == 0
    data = tmp_path / "with_bad"
    shutil.copytree(image_folder, data)
    for p in sorted((data / "val").rglob("*.jpg")):
        p.write_bytes(b"")  # every image bad but one per class
    for c in sorted(d for d in (data / "val").iterdir() if d.is_dir()):
        shutil.copy(next((image_folder / "val" / c.name).glob("*.jpg")), c / "ok.jpg")
    capsys.readouterr()
    n_all = len(list((data / "val").rglob("*.jpg")))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no UserWarning escapes
        assert run("evaluate", "-c", out / "tiny_w8a8" / "model.qc.pt", "-d", data, "-o", tmp_path / "e",
                   "--limit", n_all - 1, "--skip-bad", "--no-progress") == 0
    printed = capsys.readouterr().out
    rep = json.loads((tmp_path / "e" / "report.json").read_text())
    n = rep["data"]["eval_count"]
    assert n < n_all - 1 and f"subset: {n_all - 1} of {n_all} images of the split, {n} scored" in printed, printed
    assert f"{n} of them scored" in (tmp_path / "e" / "report.md").read_text()
    # class names the plot's font lacks: one line, no matplotlib warning
    cjk = tmp_path / "cjk"
    for c, name in zip(sorted(d.name for d in (image_folder / "val").iterdir() if d.is_dir()), ("日本", "猫", "犬")):
        shutil.copytree(image_folder / "val" / c, cjk / "val" / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert run("evaluate", "-c", out / "tiny_w8a8" / "model.qc.pt", "-d", cjk, "-o", tmp_path / "e2",
                   "--no-progress") == 0
    err = capsys.readouterr().err
    assert err.count("per_class.png: the plot's font has no glyph") == 1, err


def test_how_evaluation_labels_map_to_the_models_classes_is_in_the_report(image_folder, recipe_file, tmp_path,
                                                                          capsys):
    """A checkpoint calibrated on cat/dog/fox, evaluated on folders that lack one of them (folders and packed
    shards) or share no name with them at all: the label mapping was said on stderr only (absent classes) or
    not at all (no shared name: labels by position, silently). Each is now in report.json and on stderr."""
    import shutil

    out = tmp_path / "run"
    assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--out", out, "--no-progress") == 0
    ckpt = out / "tiny_w8a8" / "model.qc.pt"
    classes = sorted(p.name for p in (image_folder / "val").iterdir() if p.is_dir())
    sub = tmp_path / "sub"
    shutil.copytree(image_folder / "val", sub / "val", ignore=shutil.ignore_patterns(classes[0]))
    other = tmp_path / "other"
    for i, c in enumerate(classes):
        shutil.copytree(image_folder / "val" / c, other / "val" / f"class_{i}")
    assert run("pack", sub, tmp_path / "sub_shards", "--split", "val") == 0
    capsys.readouterr()
    for data, said in [(sub, "has no class folder for 1 of the model's 3 classes"),
                       (tmp_path / "sub_shards", "has no images of 1 of the model's 3 classes"),
                       (other, "share no name with the model's labels")]:
        ev = tmp_path / f"ev_{data.name}"
        assert run("evaluate", "-c", ckpt, "-d", data, "-o", ev, "--no-progress") == 0
        assert said in capsys.readouterr().err
        warned = json.loads((ev / "report.json").read_text())["warnings"]
        assert [w for w in warned if said in w and w.startswith("evaluation data: ")], (said, warned)
        assert said in (ev / "report.md").read_text()
    # ptq (FP32 model without label names of its own) compares the calibration and evaluation classes instead
    assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--eval-data", other, "--out",
               tmp_path / "run2", "--no-progress") == 0
    assert "list different classes" in capsys.readouterr().err
    assert [w for w in json.loads((tmp_path / "run2" / "report.json").read_text())["warnings"]
            if "list different classes" in w]


def test_files_that_are_not_samples_are_in_every_report_and_the_pack_index(image_folder, recipe_file, tmp_path):
    """A GIF, a text file and a hidden file among the images are not samples: the ptq, evaluate and
    pack outputs list them (report.json data.unused_files, a report.md warning, index.json), so a
    split that shrank is visible in what the run wrote, not only on stderr; evaluate's report also
    records the transform and decoder it used."""
    import shutil

    from PIL import Image

    folder = tmp_path / "imgs"
    shutil.copytree(image_folder, folder)
    Image.new("RGB", (32, 32), (90, 90, 90)).save(folder / "val" / "dog" / "anim.gif")
    (folder / "val" / "cat" / "notes.txt").write_text("n")
    (folder / "train" / "fox" / ".DS_Store").write_bytes(b"\0")
    out = tmp_path / "run"
    assert run("ptq", "-r", recipe_file, "--calib-data", folder, "--out", out, "--no-progress") == 0
    rep = json.loads((out / "report.json").read_text())
    assert sorted(Path(f).name for f in rep["data"]["unused_files"]) == ["anim.gif", "notes.txt"]
    assert [Path(f).name for f in rep["variants"]["tiny_w8a8"]["calibration"]["unused_files"]] == [".DS_Store"]
    warned = [w for w in rep["warnings"] if "not used" in w]
    assert len(warned) == 2 and any(w.startswith("calibration data:") for w in warned), rep["warnings"]
    assert "2 file(s)" in (out / "report.md").read_text()

    ev = tmp_path / "ev"
    ckpt = out / "tiny_w8a8" / "model.qc.pt"
    assert run("evaluate", "-c", ckpt, "-d", folder, "-o", ev, "--no-progress") == 0
    rep = json.loads((ev / "report.json").read_text())
    assert sorted(Path(f).name for f in rep["data"]["unused_files"]) == ["anim.gif", "notes.txt"]
    assert any("not used" in w for w in rep["warnings"]) and rep["transform"]["decoder"]
    assert "Reference: fp32 = the checkpoint with quantization off" in (ev / "report.md").read_text()
    # an option given twice is refused, not overwritten by the last one
    assert run("evaluate", "-c", ckpt, "-c", ckpt, "-d", folder, "--no-progress") == 2
    assert run("qat", "-r", recipe_file, "-r", recipe_file, "-d", folder, "-o", tmp_path / "q") == 2
    assert not (tmp_path / "q").exists()

    shards = tmp_path / "shards"
    assert run("pack", folder, shards, "--split", "val") == 0
    index = json.loads((shards / "index.json").read_text())
    assert sorted(Path(f).name for f in index["splits"]["val"]["unused_files"]) == ["anim.gif", "notes.txt"]
    ev2 = tmp_path / "ev2"
    assert run("evaluate", "-c", ckpt, "-d", shards, "-o", ev2, "--no-progress") == 0
    rep = json.loads((ev2 / "report.json").read_text())
    assert len(rep["data"]["unused_files"]) == 2 and any("were not packed" in w for w in rep["warnings"])


def test_a_missing_s3_prefix_or_a_shard_given_as_the_dataset_say_so_mock(image_folder, tmp_path, s3_server,
                                                                          s3_bucket, capsys):
    """On S3 the folder layout is the fallback of layout detection: a prefix with nothing under it says
    that nothing is there (and which layouts were looked for), a URI that is one object (a shard) says
    it is a file; both exit 2 before anything is calibrated."""
    from tiny_data import TINY_RECIPE

    data = f"s3://{s3_bucket}/nf"
    assert run("pack", image_folder, data, "--split", "val", "--shard-size", "5") == 0
    from quantcore.recipe import recipe_from_dict

    model = quantcore.prepare(quantcore.build_model(recipe_from_dict(TINY_RECIPE)), TINY_RECIPE)
    quantcore.calibrate(model, [torch.rand(2, 3, 32, 32)])
    ckpt = tmp_path / "m.qc.pt"
    quantcore.save(model, str(ckpt))
    capsys.readouterr()
    assert run("evaluate", "-c", ckpt, "-d", f"s3://{s3_bucket}/does/not/exist", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "nothing found under s3://" in err and "index.json" in err and "val/<class>" in err, err
    assert run("evaluate", "-c", ckpt, "-d", f"s3://{s3_bucket}/does/not/exist/", "--no-progress") == 2
    assert "nothing found under s3://" in capsys.readouterr().err  # a prefix spelled with its slash too
    assert run("evaluate", "-c", ckpt, "-d", f"{data}/val-00000.zip", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "val-00000.zip is a file, not a dataset" in err, err
    # an --out that cannot be written (no such bucket; a path under a file) is refused before any work
    (tmp_path / "afile").write_text("x")
    for out in ("s3://no-such-bucket-qc/out", str(tmp_path / "afile" / "out")):
        assert run("evaluate", "-c", ckpt, "-d", data, "-o", out, "--no-progress") == 2
        err = capsys.readouterr().err
        assert f"--out {out}: cannot write there" in err and "Traceback" not in err, err


def test_analyze_refuses_a_missing_eval_split_or_unwritable_out_before_any_work(image_folder, tmp_path, capsys,
                                                                               monkeypatch):
    """analyze with FP32 weights calibrates first: a final-check split that does not exist, or an --out
    it cannot write, is found before that (calibrate is never called)."""
    from tiny_data import TINY_RECIPE

    import quantcore.api

    model = quantcore.build_model(TINY_RECIPE, load_weights=False)
    fp32 = tmp_path / "fp32.pt"
    torch.save(model.state_dict(), fp32)
    rec = tmp_path / "tiny.yaml"
    rec.write_text(yaml.safe_dump(TINY_RECIPE))

    def no_calibration(*a, **k):
        raise AssertionError("calibrated before the arguments were checked")

    monkeypatch.setattr(quantcore.api, "calibrate", no_calibration)
    (tmp_path / "afile").write_text("x")
    for more, words in ((["--eval-split", "nosuch", "-o", tmp_path / "o"], ("nosuch",)),
                        (["-o", tmp_path / "afile" / "o"], ("--out", "cannot write"))):
        capsys.readouterr()
        assert run("analyze", "-c", fp32, "-r", rec, "-d", image_folder, "--split", "train", *more) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words) and "Traceback" not in err and "calibrated before" not in err, err


def test_an_out_that_takes_writes_but_not_deletes_is_accepted_with_a_warning(tmp_path, monkeypatch, caplog):
    """--out's write probe: writing is what a run needs; a role without delete rights leaves the empty
    probe behind with a warning instead of refusing the run."""
    import logging

    from quantcore import pipeline

    def no_delete(uri, *a, **k):
        raise PermissionError(13, "AccessDenied", uri)

    monkeypatch.setattr(pipeline.storage, "delete", no_delete)
    with caplog.at_level(logging.WARNING, logger="quantcore"):
        pipeline.check_out(str(tmp_path / "o"))
    left = list((tmp_path / "o").glob(".quantcore-write-check-*"))
    assert len(left) == 1 and left[0].stat().st_size == 0
    assert any("could not delete the write probe" in r.getMessage() for r in caplog.records)


def test_a_refused_run_leaves_no_empty_output_folder(image_folder, tmp_path, capsys):
    """--out's write probe made the folder, so a run refused later (a corrupt image, a missing split)
    left an empty one behind, as if it had written something. The folders it made are removed; one
    that was there before stays."""
    from quantcore import pipeline

    pipeline.check_out(str(tmp_path / "a" / "b" / "c"))
    # the output folder goes, its new parents stay: another run may be making its folder beside it
    assert (tmp_path / "a" / "b").is_dir() and not (tmp_path / "a" / "b" / "c").exists()
    (tmp_path / "kept").mkdir()
    pipeline.check_out(str(tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
    out = tmp_path / "new" / "run"
    assert run("ptq", "-r", "fmnist_w8a8_ft1", "--calib-data", image_folder, "--calib-split", "nosuch",
               "-o", out, "--no-progress") == 2
    assert "nosuch" in capsys.readouterr().err and not out.exists()


def test_a_single_valued_option_given_twice_is_refused(image_folder, tmp_path, capsys):
    """click and argparse keep the last of a repeated option silently (a launcher's --device cuda,
    then --device cpu in extra arguments): every entrypoint refuses the repeat instead."""
    out = tmp_path / "o"
    expect_user_error(capsys, ("calibrate", "-r", "fmnist_w8a8_ft1", "-d", image_folder, "-o", out,
                               "--device", "cuda", "--device=cpu"), "--device", "2 times", "cuda, cpu")
    expect_user_error(capsys, ("calibrate", "-r", "fmnist_w8a8_ft1", "-d", image_folder, "-o", out,
                               "--no-progress", "--progress"), "--progress/--no-progress", "2 times")
    assert not out.exists()
    import argparse

    from jobs._args import parse_once
    from jobs.ray_qat import _parser as ray_qat_parser

    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int)
    p.add_argument("--tag", action="append")
    assert parse_once(p, ["--epochs", "2", "--tag", "a", "--tag", "b"]).tag == ["a", "b"]  # append may repeat
    for parser, argv in ((p, ["--epochs", "2", "--epochs=9"]),
                         (ray_qat_parser(), ["--recipe", "r", "--data", "d", "--out", "o", "--epochs", "2",
                                             "--num-workers", "3", "--num-workers", "1"])):
        with pytest.raises(SystemExit) as e:
            parse_once(parser, argv)
        assert e.value.code == 2
    assert "given 2 times" in capsys.readouterr().err
    # argparse's prefix matching and an attached short value hid the repeat: "--batch 4 --batch-size 8"
    # ran with 8
    from jobs.ray_sweep import _parser as ray_sweep_parser

    base = ["--recipe", "r", "--data", "d", "--out", "o"]
    for parser, argv, needle in ((ray_qat_parser(), base + ["--batch", "4", "--batch-size", "8"], "--batch"),
                                 (ray_qat_parser(), base + ["-b4", "--batch-size", "8"], "given 2 times"),
                                 (ray_qat_parser(), base + ["--max-f", "1", "--max-failures", "3"], "--max-f"),
                                 (ray_sweep_parser(), ["--sweep", "s", "--out", "o", "--gpus", "0"], "--gpus")):
        with pytest.raises(SystemExit) as e:
            parse_once(parser, argv)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err
    assert parse_once(ray_qat_parser(), base + ["-b4"]).batch_size == 4  # once, attached: fine


@pytest.mark.parametrize("rename", [("cat", "Cat"), ("cat", "cafe\u0301")])
def test_evaluation_split_with_other_class_names_than_the_calibration_split_is_refused(tmp_path, capsys, rename):
    """A val class folder renamed ('Cat' sorts first) or written on macOS (NFD 'café' beside Linux's
    NFC one): each label index moved and top-1 was scored against shifted labels without a word.
    Two splits of one dataset must list the same classes (ptq and qat); a different dataset warns."""
    import shutil

    old, new = rename
    root = make_images(tmp_path / "d")
    if "\u0301" in new:  # both splits carry 'café', the train split in NFC
        for split, name in (("train", "caf\u00e9"), ("val", new)):
            (root / split / old).rename(root / split / name)
    else:
        (root / "val" / old).rename(root / "val" / new)
    r = _recipe(tmp_path, "cls")
    err = expect_user_error(capsys, ("ptq", "-r", r, "--calib-data", root, "--out", tmp_path / "o", "--no-progress"),
                            "list different classes", "evaluation labels would be shifted")
    if "\u0301" in new:
        assert "Unicode normalizations" in err
    assert not (tmp_path / "o" / "cls").exists()  # refused before calibrating
    qat = _recipe(tmp_path, "clsqat", qat={"epochs": 1, "max_steps": 1, "batch_size": 4})
    expect_user_error(capsys, ("qat", "-r", qat, "-d", root, "-o", tmp_path / "q", "--no-progress"),
                      "label their classes differently")
    # another dataset (a different URI) as the evaluation data: a warning in the report, not a refusal
    other = tmp_path / "other"
    shutil.copytree(root / "val", other / "val")
    assert run("ptq", "-r", r, "--calib-data", root, "--eval-data", other, "--out", tmp_path / "o2", "--limit",
               "3", "--no-progress") == 0
    rep = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert any("list different classes" in w for w in rep["warnings"]), rep["warnings"]


def test_a_missing_evaluation_split_names_which_data_it_was_read_from(image_folder, tmp_path, capsys):
    """Without --eval-data the evaluation split is read from the calibration data; the error used to call
    that data 'the evaluation data (--eval-data ...)', an option the user never gave."""
    import shutil

    r = _recipe(tmp_path, "evsplit")
    train_only = tmp_path / "train_only"
    shutil.copytree(image_folder / "train", train_only / "train")
    err = expect_user_error(capsys, ("ptq", "-r", r, "--calib-data", train_only, "--out", tmp_path / "o",
                                     "--no-progress"), "the calibration data, read for evaluation too",
                            "--eval-split 'val'", str(train_only))
    assert "--eval-data" not in err
    err = expect_user_error(capsys, ("ptq", "-r", r, "--calib-data", image_folder, "--eval-data", train_only,
                                     "--out", tmp_path / "o", "--no-progress"),
                            "evaluation data (--eval-data/--eval-split 'val')", str(train_only))
    assert "calibration data" not in err
    # --eval-data given, naming the calibration folder itself: nothing fell back, the message must not say so
    err = expect_user_error(capsys, ("ptq", "-r", r, "--calib-data", train_only, "--eval-data", f"{train_only}/",
                                     "--out", tmp_path / "o", "--no-progress"),
                            "evaluation data (--eval-data/--eval-split 'val')", str(train_only))
    assert "read for evaluation too" not in err


def test_relative_data_paths_are_recorded_as_the_folders_that_were_read(image_folder, tmp_path, monkeypatch, capsys):
    """report.json kept the data paths as typed ('imgs'), which name nothing once the report is read from
    another folder (or the run's OUT is copied), while the checkpoint path was already made absolute."""
    import shutil

    shutil.copytree(image_folder, tmp_path / "imgs")
    r = _recipe(tmp_path, "relpaths")
    monkeypatch.chdir(tmp_path)
    assert run("ptq", "-r", r, "--calib-data", "imgs", "--eval-data", "./imgs/", "--out", "o", "--limit", "3",
               "--no-progress") == 0
    printed = capsys.readouterr().out  # a 3-class model: top-3, and the --limit sample said on the console too
    assert "top-3 " in printed and "top-5" not in printed and "(subset: 3 of 12 images" in printed, printed
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["data"]["eval_uri"] == str(tmp_path / "imgs"), rep["data"]
    assert rep["data"]["calib_uri"] == str(tmp_path / "imgs"), rep["data"]
    calib = json.loads((tmp_path / "o" / RECIPE["name"] / "report.json").read_text())["calibration"]
    assert calib["uri"] == str(tmp_path / "imgs"), calib


def test_file_names_that_are_not_utf8_are_reported_not_a_crash_after_the_run(tmp_path, capsys, monkeypatch):
    """Latin-1 names from old archives: the run used to finish, then die writing report.md
    (UnicodeEncodeError, exit 1, the work lost); pack died with a traceback in zipfile."""
    import logging
    import os

    # the CLI's own handler prints the warnings (escaped); pytest's captured log section would carry
    # the raw surrogate, which pytest-xdist cannot send from its worker
    monkeypatch.setattr(logging.getLogger("quantcore"), "propagate", False)

    root = make_images(tmp_path / "d")
    val = os.fsencode(root / "val")
    open(os.path.join(val, b"cat", b"notes\xe9.txt"), "wb").write(b"x")  # an unused file
    r = _recipe(tmp_path, "u8")
    assert run("ptq", "-r", r, "--calib-data", root, "--out", tmp_path / "o", "--limit", "3", "--no-progress") == 0
    md = (tmp_path / "o" / "report.md").read_text()
    assert "notes\\udce9.txt" in md  # named, with the undecodable byte spelled out
    os.remove(os.path.join(val, b"cat", b"notes\xe9.txt"))
    good = os.path.join(val, b"cat", os.listdir(os.path.join(val, b"cat"))[0])
    with open(good, "rb") as f, open(os.path.join(val, b"cat", b"caf\xe9.jpg"), "wb") as g:
        g.write(f.read())
    expect_user_error(capsys, ("pack", root, tmp_path / "p", "--split", "val"), "not valid UTF-8", "caf")
    assert run("pack", root, tmp_path / "p2", "--split", "val", "--skip-bad") == 0  # skipped and listed
    index = json.loads((tmp_path / "p2" / "index.json").read_text())
    assert "not valid UTF-8" in json.dumps(index)


def test_qat_init_from_a_reconstructed_checkpoint_is_refused_and_evaluate_says_what_fp32_is(image_folder, tmp_path,
                                                                                               capsys):
    """AdaRound/BRECQ rewrite the weights onto their grid: such a checkpoint's float path is not the
    FP32 model. QAT --init took it as the teacher and the report's FP32 (SQNR 9.7 -> 30.1 dB)."""
    r = _recipe(tmp_path, "rec", quant={"weights": {"bits": 4}},
                reconstruction={"mode": "layer", "iterations": 4, "batch_size": 4})
    assert run("calibrate", "-r", r, "-d", image_folder, "-o", tmp_path / "p", "--no-progress") == 0
    ckpt = tmp_path / "p" / RECIPE["name"] / "model.qc.pt"
    qat = _recipe(tmp_path, "rec2", quant={"weights": {"bits": 4}},
                  reconstruction={"mode": "layer", "iterations": 4, "batch_size": 4},
                  qat={"epochs": 1, "max_steps": 1, "batch_size": 4})
    expect_user_error(capsys, ("qat", "-r", qat, "-d", image_folder, "-o", tmp_path / "q", "--init", ckpt,
                               "--no-progress"), "--init", "reconstruction", "FP32")
    assert run("evaluate", "-c", ckpt, "-d", image_folder, "--limit", "3", "--no-progress") == 0
    assert "rounded them onto their grid" in capsys.readouterr().out


def test_comma_separated_recipes_and_a_calibration_only_report(image_folder, tmp_path, capsys):
    """README: `ptq --recipe a,b,c` (it was 'recipe a,b,c not found'); calibrate's report.md said
    'Evaluation data: ? (? images)' under an empty results table, and timed artifact writing as
    evaluation. A per-channel activation request names that mistake, not the calibrator's rule."""
    a = _recipe(tmp_path, "ca", name="ca")
    b = _recipe(tmp_path, "cb", name="cb", quant={"activations": {"bits": 6}})
    assert run("calibrate", "-r", f"{a},{b}", "-d", image_folder, "-o", tmp_path / "c", "--no-progress") == 0
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    assert set(rep["variants"]) == {"ca", "cb"} and "evaluate" not in rep["timings_s"]
    md = (tmp_path / "c" / "report.md").read_text()
    assert "Calibration only: nothing was evaluated" in md and "(? images)" not in md and "| model |" not in md
    pc = _recipe(tmp_path, "pc", quant={"activations": {"per_channel": True}})
    expect_user_error(capsys, ("calibrate", "-r", pc, "-d", image_folder, "-o", tmp_path / "d"),
                      "quant.activations", "weights only")


def test_random_fp32_weights_are_the_same_on_every_run(image_folder, recipe_file, tmp_path, capsys):
    """A recipe without weights calibrated a different random model on each run (the global RNG's state
    at build time), so two runs of one recipe gave different ranges and figures under the same seeds."""
    enc = []
    for i in range(2):
        torch.manual_seed(100 + i)  # whatever the caller's RNG holds
        out = tmp_path / f"run{i}"
        assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--out", out, "--no-progress") == 0
        enc.append(json.loads((out / "tiny_w8a8" / "encodings.json").read_text())["quantizers"])
    assert enc[0] == enc[1] and len(enc[0]) > 10
    assert "torch seed 0" in capsys.readouterr().err
    # the build's seed is its own: the caller's RNG stream goes on as if nothing drew from it
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    quantcore.build_model(quantcore.load_recipe(recipe_file), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_ptq_whose_evaluation_fails_says_the_checkpoints_are_kept(image_folder, recipe_file, tmp_path, capsys):
    """A corrupt evaluation image stopped ptq after the checkpoints were written: exit 2 with the image's
    name, but nothing said that model.qc.pt/encodings.json were there (without a report) and usable."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    splits = sorted(p.name for p in data.iterdir() if p.is_dir() and p.name != "train")
    cls = sorted(p for p in (data / splits[0]).iterdir() if p.is_dir())[0]
    (cls / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "run"
    assert run("ptq", "-r", recipe_file, "--calib-data", data, "--eval-split", splits[0], "--out", out,
               "--no-progress") == 2
    err = capsys.readouterr().err
    ckpt = out / "tiny_w8a8" / "model.qc.pt"
    assert "broken.jpg" in err and "calibrated checkpoints are written and kept" in err and str(ckpt) in err, err
    assert err.index("written and kept") < err.index("error:")  # the note, then the error itself
    assert quantcore.quantizers(quantcore.load(str(ckpt))) and not (out / "report.json").exists()


def test_random_weights_warning_names_every_recipe_of_the_run():
    """`ptq --recipe a,b` quantizes one FP32 model: the warning named only the first recipe."""
    import quantcore
    from quantcore.pipeline import random_weights_warning

    r = quantcore.load_recipe({"name": "a", "model": {"name": "quantcore/vit_fmnist"}})
    assert "(recipes 'a', 'b') has RANDOM WEIGHTS" in random_weights_warning(r, ["b"])
    assert "(recipe 'a') has RANDOM WEIGHTS" in random_weights_warning(r)


def test_no_progress_also_silences_the_libraries_bars(monkeypatch):
    """--no-progress left transformers' "Loading weights" bar on (an HF model directory loads with it)."""
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    from quantcore.cli import _progress

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    transformers_logging.enable_progress_bar()
    try:
        assert _progress(True) is True and transformers_logging.is_progress_bar_enabled()
        assert _progress(False) is False
        assert not transformers_logging.is_progress_bar_enabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        hub = pytest.importorskip("huggingface_hub.utils")
        hub.enable_progress_bars()  # the Hub read the variable at import: its own switch is what counts
        # transformers' switch happens to call the Hub's; without it the Hub's own switch must be called
        monkeypatch.setattr(transformers_logging, "disable_progress_bar", lambda: None)
        _progress(False)
        assert hub.are_progress_bars_disabled()
    finally:
        transformers_logging.enable_progress_bar()
        import huggingface_hub.utils as hub_utils

        hub_utils.enable_progress_bars()


def test_checkpoint_option_replaces_every_recipes_weights_before_they_are_compared(image_folder, tmp_path, capsys):
    """--checkpoint overrides the recipes' weights: recipes that differ only in model.checkpoint /
    model.pretrained_file calibrate that one model (they were refused as 'different models'); without
    --checkpoint they are still refused, and so are recipes that differ in anything else."""
    weights = tmp_path / "fp32.pt"
    torch.manual_seed(0)
    torch.save(quantcore.build_model(quantcore.load_recipe(dict(RECIPE))).state_dict(), weights)
    other = tmp_path / "other.pt"
    torch.save(torch.load(weights), other)
    a = _recipe(tmp_path, "wa", name="wa", model={**RECIPE["model"], "checkpoint": str(other)})
    b = _recipe(tmp_path, "wb", name="wb")
    c = _recipe(tmp_path, "wc", name="wc", model={**RECIPE["model"], "pretrained_file": str(other)})
    out = tmp_path / "c"
    assert run("calibrate", "-r", a, "-r", b, "-r", c, "-d", image_folder, "-o", out, "--checkpoint", weights,
               "--no-progress") == 0
    rep = json.loads((out / "report.json").read_text())
    for name in ("wa", "wb", "wc"):
        model = rep["variants"][name]["recipe"]["model"]
        assert model["checkpoint"] == str(weights) and model.get("pretrained_file") is None, model
    expect_user_error(capsys, ("calibrate", "-r", a, "-r", b, "-d", image_folder, "-o", tmp_path / "d",
                               "--no-progress"), "different models", "model.checkpoint")
    d = _recipe(tmp_path, "wd", name="wd", model={**RECIPE["model"], "kwargs": {"patch_size": 8, "depth": 2}})
    expect_user_error(capsys, ("calibrate", "-r", b, "-r", d, "-d", image_folder, "-o", tmp_path / "e",
                               "--checkpoint", weights, "--no-progress"), "different models", "model.kwargs")


def test_a_limit_above_the_split_size_is_in_the_report(image_folder, recipe_file, tmp_path):
    """--limit 100 on a 12-image split evaluates all 12: said on the log only, so report.json read
    like a 100-image sample had been asked for and got (helper-126). ptq and evaluate record it."""
    out = tmp_path / "p"
    assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--out", out, "--limit", "100",
               "--no-progress") == 0
    rep = json.loads((out / "report.json").read_text())
    want = "--limit 100: split 'val'"
    assert rep["data"]["eval_count"] == 12 and any(want in w and "12 images" in w for w in rep["warnings"]), rep
    ev = tmp_path / "e"
    assert run("evaluate", "-c", out / "tiny_w8a8" / "model.qc.pt", "-d", image_folder, "-o", ev, "--limit", "100",
               "--no-progress") == 0
    assert any(want in w for w in json.loads((ev / "report.json").read_text())["warnings"])
    # a limit within the split says nothing
    assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--out", tmp_path / "q", "--limit", "6",
               "--no-progress") == 0
    assert not any("--limit" in w for w in json.loads((tmp_path / "q" / "report.json").read_text()).get("warnings", []))


def test_ptq_into_an_out_of_an_earlier_run_names_what_its_report_no_longer_lists(image_folder, recipe_file, tmp_path,
                                                                                  caplog):
    """A second ptq into the same --out with other recipes replaced report.json (listing only its own
    variants) and left the first run's variant folder behind without a word (helper-141); now the
    report and the log name it, and nothing is deleted. The same recipes again (a retried job) say nothing."""
    out = tmp_path / "run"
    assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--out", out, "--no-progress") == 0
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(dict(RECIPE, name="tiny_other")))
    assert run("ptq", "-r", recipe_file, "--calib-data", image_folder, "--out", out, "--no-progress") == 0
    assert not any("earlier run" in w for w in json.loads((out / "report.json").read_text())["warnings"])
    caplog.clear()
    assert run("ptq", "-r", other, "--calib-data", image_folder, "--out", out, "--no-progress") == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["variants"]) == {"tiny_other"}
    said = [w for w in rep["warnings"] if "earlier run" in w]
    assert len(said) == 1 and "'tiny_w8a8'" in said[0] and "tiny_other" not in said[0], rep["warnings"]
    assert any("earlier run" in r.getMessage() and "tiny_w8a8" in r.getMessage() for r in caplog.records)
    assert (out / "tiny_w8a8" / "model.qc.pt").is_file()  # left as it was
    # and named again by every later run that does not write it (its report is long gone by then)
    assert run("ptq", "-r", other, "--calib-data", image_folder, "--out", out, "--no-progress") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["earlier_variants"] == ["tiny_w8a8"] and any("'tiny_w8a8'" in w for w in rep["warnings"])
