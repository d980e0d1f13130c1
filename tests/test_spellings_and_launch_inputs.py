"""One location, however it is written; one option, however it is given; CLI inputs a fresh user
tried (2026-12-03 break passes): each test failed on the code before its fix."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from quantcore.cli import main
from quantcore.io import storage
from tiny_data import TINY_RECIPE as RECIPE, make_images


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("imgs"))


def test_location_is_one_spelling_per_place(tmp_path, monkeypatch):
    d = tmp_path / "a b"
    d.mkdir()
    (tmp_path / "link").symlink_to(d)
    monkeypatch.chdir(tmp_path)
    want = os.path.realpath(d)
    for spelling in ("a b", "./a b/", str(d) + "/", f"{tmp_path}//a b", "file://" + str(d).replace(" ", "%20"),
                     "file://localhost" + str(d), "link"):
        assert storage.location(spelling) == want, spelling
    assert storage.location("S3://bkt/p/q/") == storage.location("s3://bkt/p/q") == "s3://bkt/p/q"
    assert storage.location("s3://bkt/p//q") != storage.location("s3://bkt/p/q")  # other S3 keys


def test_two_splits_of_one_dataset_are_recognised_however_the_uri_is_written(tmp_path, monkeypatch, capsys):
    """The 'same dataset, different class folders' refusal compared strings: './d', 'file:///abs/d'
    and '/abs//d' only warned, and top-1 was scored against shifted labels."""
    root = make_images(tmp_path / "d")
    (root / "val" / "cat").rename(root / "val" / "zebra")
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(RECIPE))
    monkeypatch.chdir(tmp_path)
    for ev in ("./d", "file://" + str(root), f"{tmp_path}//d"):
        assert run("ptq", "-r", r, "--calib-data", root, "--eval-data", ev, "--out", tmp_path / "o",
                   "--no-progress") == 2, ev
        assert "evaluation labels would be shifted" in capsys.readouterr().err
    assert not (tmp_path / "o" / RECIPE["name"]).exists()


def test_qat_resume_accepts_the_same_data_written_otherwise(tmp_path, monkeypatch):
    from quantcore.qat import _check_same_data, _data_identity

    class Spec:
        split, layout, skip_bad = "train", "auto", False

        def __init__(self, uri):
            self.uri = uri

    d = tmp_path / "ds"
    d.mkdir()
    monkeypatch.chdir(tmp_path)
    stored = {"data": _data_identity(Spec(str(d)))}
    for spelling in ("ds", "ds/", "file://" + str(d)):
        _check_same_data(stored, _data_identity(Spec(spelling)), 1, "ckpt")
    # a checkpoint of before stored the URI as spelled: compared as a location too
    _check_same_data({"data": {**stored["data"], "uri": str(d) + "/"}}, _data_identity(Spec("ds")), 1, "ckpt")
    (tmp_path / "other").mkdir()
    with pytest.raises(Exception, match="other data"):
        _check_same_data(stored, _data_identity(Spec("other")), 1, "ckpt")


def test_recipes_follow_the_storage_uri_rules(tmp_path, s3_server, s3_bucket):
    """file:// recipes were read with the '%20' kept (a decoy file of that literal name was loaded);
    a recipe-relative '../w/fp32.pt' on S3 became the key 'rec/../w/fp32.pt'; an S3 recipe key with a
    comma was split into two recipes."""
    from quantcore.cli import _load_recipes
    from quantcore.recipe import load_recipe

    real = tmp_path / "r dir"
    real.mkdir()
    (real / "r.yaml").write_text(yaml.safe_dump({**RECIPE, "name": "right"}))
    decoy = tmp_path / "r%20dir"
    decoy.mkdir()
    (decoy / "r.yaml").write_text(yaml.safe_dump({**RECIPE, "name": "decoy"}))
    assert load_recipe("file://" + str(real).replace(" ", "%20") + "/r.yaml").name == "right"
    assert load_recipe("file://localhost" + str(real) + "/r.yaml").name == "right"
    body = yaml.safe_dump({**RECIPE, "name": "s3r", "model": {**RECIPE["model"], "checkpoint": "../w/fp32.pt"}})
    storage.write_bytes(f"s3://{s3_bucket}/proj/rec/v1,final.yaml", body.encode())
    r = load_recipe(f"S3://{s3_bucket}/proj/rec/v1,final.yaml")
    assert r.model.checkpoint == f"s3://{s3_bucket}/proj/w/fp32.pt"
    assert [x.name for x in _load_recipes([f"s3://{s3_bucket}/proj/rec/v1,final.yaml"])] == ["s3r"]
    storage.write_bytes(f"s3://{s3_bucket}/up.yaml", yaml.safe_dump(
        {**RECIPE, "model": {**RECIPE["model"], "checkpoint": "../../x.pt"}}).encode())
    with pytest.raises(Exception, match="above the bucket"):
        load_recipe(f"s3://{s3_bucket}/up.yaml")


def test_a_legal_long_file_name_is_written_atomically(tmp_path):
    """The temporary name added 19 bytes: a 243-byte target name failed with ENAMETOOLONG after all
    the work (quantcore train -o ...)."""
    target = tmp_path / ("w" * 240 + ".pt")
    storage.write_bytes(str(target), b"abc")
    assert target.read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left
    uni = tmp_path / ("é" * 126 + ".b")  # 255 bytes in UTF-8
    storage.write_bytes(str(uni), b"x")
    assert uni.read_bytes() == b"x"


def test_printed_report_location_and_out_checks_use_the_storage_rules(images, tmp_path, capsys, s3_server,
                                                                      s3_bucket):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(RECIPE))
    out = f"s3://{s3_bucket}/run/"
    assert run("ptq", "-r", r, "--calib-data", images, "--limit", "3", "-o", out, "--no-progress") == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("report:"))
    assert line.split()[1] == f"s3://{s3_bucket}/run/report.md" and storage.exists(line.split()[1])
    # a file named literally 'a%20file' is not the location file:///.../a%20file names ('a file')
    (tmp_path / "a%20file").write_text("x")
    from quantcore.pipeline import check_out

    check_out("file://" + str(tmp_path) + "/a%20file")  # 'a file' does not exist: a new directory is fine
    (tmp_path / "b file").write_text("x")
    with pytest.raises(Exception, match="is a file"):
        check_out("file://" + str(tmp_path) + "/b%20file")


def test_train_seeds_the_model_and_checks_the_class_count(images, tmp_path, capsys):
    """`quantcore train` built the model before seeding (two runs, two models), and trained a head of
    the wrong size, or crashed in the loss, when the data had other classes."""
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({**RECIPE, "train": {"epochs": 1, "batch_size": 8, "seed": 3}}))
    outs = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for o in outs:
        torch.manual_seed(len(str(o)) + os.getpid())  # whatever the process's RNG held before
        assert run("train", "-r", r, "-d", images, "-o", o) == 0
    a, b = (torch.load(o) for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    r4 = tmp_path / "r4.yaml"
    r4.write_text(yaml.safe_dump({**RECIPE, "model": {**RECIPE["model"], "num_classes": 2},
                                  "train": {"epochs": 1, "batch_size": 8}}))
    capsys.readouterr()
    assert run("train", "-r", r4, "-d", images, "-o", tmp_path / "c.pt") == 2
    err = capsys.readouterr().err
    assert "model.num_classes" in err and "3 classes" in err and "Traceback" not in err
    assert not (tmp_path / "c.pt").exists()


def test_an_attached_short_value_counts_as_a_repeat(images, tmp_path, capsys):
    assert run("evaluate", "-c", tmp_path / "m.pt", "-d", images, "-b", "4", "-b8") == 2
    err = capsys.readouterr().err
    assert "given 2 times" in err and "4, 8" in err


def test_sigterm_outside_the_training_steps_says_so_and_ends_as_the_signal():
    code = ("import os, signal, time\n"
            "from quantcore.qat import _SigtermOutsideSteps\n"
            "with _SigtermOutsideSteps(True):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "print('not reached')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == -signal.SIGTERM, (p.returncode, p.stderr[-2000:])
    assert "preempted: SIGTERM outside the training steps" in p.stderr and "not reached" not in p.stdout


def test_the_export_component_refuses_what_the_cli_refuses():
    from jobs import components
    from jobs.components import ComponentError
    from quantcore.export.onnx_qdq import MIN_OPSET
    from quantcore.export.run import FORMATS

    assert components.EXPORT_FORMATS == FORMATS and components.EXPORT_OPSETS == (MIN_OPSET, 21)
    for kw, needle in (({"opset": 5}, "--opset 5"), ({"opset": 22}, "--opset 22"),
                       ({"format": "bogus"}, "--format"), ({"format": "onnx,tflite"}, "--format"),
                       ({"format": ","}, "--format")):
        with pytest.raises(ComponentError, match=needle):
            components.export(checkpoint="s3://b/m.qc.pt", out="s3://b/o", **kw)
    app = components.export(checkpoint="s3://b/m.qc.pt", out="s3://b/o", format="onnx, aimet", opset=18)
    assert "--opset" in app.roles[0].args and "18" in app.roles[0].args


def test_a_resisc_class_folder_starting_with_hash_is_not_a_comment(tmp_path):
    from PIL import Image

    from quantcore.data.resisc import ImagePathsDataset

    root = tmp_path / "r"
    for c in ("#1 priority", "normal"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / "images" / c / f"{i}.png")
    (root / "label_map.json").write_text(json.dumps({"#1 priority": 0, "normal": 1}))
    (root / "val_imagepaths.txt").write_text("# a comment\n#1 priority/0.png\nimages/#1 priority/1.png\n"
                                             "normal/0.png\nnormal/1.png\n")
    ds = ImagePathsDataset(str(root), "val")
    assert ds.labels == [0, 0, 1, 1] and not ds.skipped


def test_a_limit_beyond_the_split_is_said(images, tmp_path, caplog):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(RECIPE))
    with caplog.at_level("WARNING"):
        assert run("ptq", "-r", r, "--calib-data", images, "--limit", "1000", "-o", tmp_path / "o",
                   "--no-progress") == 0
    assert any("--limit 1000" in m and "has 12 images" in m for m in caplog.messages), caplog.messages


_DST_FORMS = {  # spellings of <tmp_path>/packed out ("d" below), and of an S3 prefix, as a user may type them
    "plain": lambda d: str(d), "trailing-slash": lambda d: str(d) + "/",
    "trailing-double-slash": lambda d: str(d) + "//",
    "inner-double-slash": lambda d: f"{d.parent}//{d.name}", "relative": lambda d: f"./{d.name}/",
    "symlink": lambda d: str(d.parent / "link"), "file-uri-raw": lambda d: "file://" + str(d),
    "file-uri-encoded": lambda d: d.as_uri(),
    "s3": lambda b: f"s3://{b}/packed out", "s3-trailing-slashes": lambda b: f"s3://{b}/packed out//",
    "s3-upper-case-scheme": lambda b: f"S3://{b}/packed out"}


@pytest.mark.parametrize("dst_form", list(_DST_FORMS))
def test_repacking_with_fewer_shards_leaves_one_dataset(images, tmp_path, caplog, monkeypatch, request, dst_form):
    """The earlier pack's superseded shards were found by matching listed names against the destination
    as typed: a raw-space file:// URI (listings are percent-encoded), 'd//' or 'S3://' kept them all."""
    from quantcore.data import open_dataset
    from quantcore.data.pack import pack

    if dst_form.startswith("s3"):
        bucket = request.getfixturevalue("s3_bucket")
        uri, where = _DST_FORMS[dst_form](bucket), f"s3://{bucket}/packed out"
    else:
        dst = tmp_path / "packed out"
        dst.mkdir()
        (tmp_path / "link").symlink_to(dst)
        monkeypatch.chdir(tmp_path)
        uri, where = _DST_FORMS[dst_form](dst), str(dst)

    def names() -> list[str]:
        return sorted(u.rsplit("/", 1)[1] for u in storage.list_uris(where))

    pack(str(images), uri, "val", shard_size=4)
    assert [n for n in names() if n.endswith(".zip")] == ["val-00000.zip", "val-00001.zip", "val-00002.zip"]
    storage.write_bytes(storage.join(where, "notes.txt"), b"mine")
    with caplog.at_level("WARNING"):
        pack(str(images), uri, "val", shard_size=100)
    assert names() == ["index.json", "notes.txt", "val-00000.zip", "val-00000_map.txt"]
    assert any("removed 4 file(s)" in m for m in caplog.messages), caplog.messages
    assert len(open_dataset(uri, "val", None)) == 12


@pytest.mark.parametrize("argv", [["--nproc_per_node", "1", "--nproc_per_node", "2"],
                                  ["--nproc_per_node=2", "--nproc-per-node=1"],
                                  ["--max_restarts", "0", "--max-restarts=3"]])
def test_jobs_torchrun_refuses_its_own_options_twice(argv, capsys):
    from jobs.torchrun import through_rank_shim

    with pytest.raises(SystemExit) as e:
        through_rank_shim(argv + ["-m", "quantcore.cli", "ptq", "-r", "a", "-r", "b"])
    assert e.value.code == 2 and "given 2 times" in capsys.readouterr().err
    # the target's own options are the target's: quantcore's -r twice (two recipes) is not torchrun's -r
    out = through_rank_shim(["--nproc_per_node", "1", "-m", "quantcore.cli", "ptq", "-r", "a", "-r", "b"])
    assert out[-4:] == ["-r", "a", "-r", "b"]
