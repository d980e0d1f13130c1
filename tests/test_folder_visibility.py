"""Folder datasets: every file is used or said (hidden and non-image files are listed and warned
about), linked class folders are data, a link loop does not hang; export's accuracy check refuses data
whose class count differs from the model's logits."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from PIL import Image

from quantcore import api
from quantcore.data import open_dataset
from quantcore.export.run import CheckData, ExportError, _load_check_images
from quantcore.models import vit_fmnist


def _img(path, colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="PNG")


def test_linked_class_folders_count_and_unused_files_are_said(tmp_path, caplog):
    root = tmp_path / "ds"
    _img(root / "val" / "a" / "x.png")
    _img(root / "val" / "a" / ".hidden.png")  # a hidden image: not used, but listed
    _img(tmp_path / "elsewhere" / "y.png")
    (root / "val" / "a" / "notes.txt").write_text("n")
    (root / "val" / "a" / "noext").write_bytes((root / "val" / "a" / "x.png").read_bytes())
    os.symlink(tmp_path / "elsewhere", root / "val" / "b")  # a class folder that is a link
    os.symlink(root / "val", tmp_path / "elsewhere" / "loop")  # a link back up the tree
    with caplog.at_level(logging.WARNING, logger="quantcore.data.detect"):
        ds = open_dataset(str(root), "val")
        open_dataset(str(root), "val")  # opened again (calibration, then evaluation): warned once
    assert ds.classes == ["a", "b"] and ds.samples == ["a/x.png", "b/y.png"] and ds.labels == [0, 1]
    assert sorted(p.rsplit("/", 1)[-1] for p in ds.ignored) == [".hidden.png", "noext", "notes.txt"]
    warned = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(warned) == 1 and "3 file(s)" in warned[0] and "(no extension)" in warned[0]


def test_export_check_refuses_data_with_another_class_count(tmp_path):
    torch.manual_seed(0)
    model = api.prepare(vit_fmnist(), {"name": "w8", "model": {"name": "quantcore/vit_fmnist"},
                                       "placement": {"family": "vit", "mode": "ft1"}})
    api.calibrate(model, [torch.randn(4, 1, 28, 28)])
    for c in ("1", "2", "3"):
        _img(tmp_path / "d" / "val" / c / "x.png", (int(c) * 40, 0, 0))
    with pytest.raises(ExportError, match="--check-data .* 3 classes, but the model gives 10 logits"):
        _load_check_images(model, CheckData(str(tmp_path / "d"), "val", None))


def test_ptq_refuses_a_file_as_out_and_a_negative_limit_before_calibrating(tmp_path, capsys):
    """Nothing is calibrated or written when an option cannot apply."""
    from quantcore.cli import main

    (tmp_path / "afile").write_text("x")
    for c in "ab":
        _img(tmp_path / "d" / "val" / c / "x.png")
    args = ["ptq", "-r", "fmnist_w8a8_ft1", "--calib-data", str(tmp_path / "d"), "--calib-split", "val"]
    assert main(args + ["-o", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(args + ["-o", str(tmp_path / "o"), "--limit", "-1"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_class_folders_named_as_the_models_labels_take_the_models_order(tmp_path, caplog):
    """HF id2label {0: red, 1: green, 2: blue}: folders red/green/blue sorted would give blue label 0."""
    from types import SimpleNamespace

    from quantcore.data import model_label_names

    for c in ("red", "green", "blue"):
        _img(tmp_path / "d" / "val" / c / "x.png")
    model = SimpleNamespace(config=SimpleNamespace(id2label={0: "red", 1: "green", 2: "blue"}))
    names = model_label_names(model)
    assert names == ["red", "green", "blue"]
    assert model_label_names(SimpleNamespace(config=SimpleNamespace(id2label={0: "LABEL_0", 1: "LABEL_1"}))) is None
    with caplog.at_level(logging.WARNING, logger="quantcore.data.detect"):
        ds = open_dataset(str(tmp_path / "d"), "val", label_names=names)
    assert ds.classes == names and [ds.classes[label] for label in ds.labels] == [s.split("/")[0] for s in ds.samples]
    assert any("model's order" in r.getMessage() for r in caplog.records)
    assert open_dataset(str(tmp_path / "d"), "val").classes == ["blue", "green", "red"]  # no names: sorted
    caplog.clear()
    _img(tmp_path / "d" / "val" / "cyan" / "x.png")  # a partial overlap: warned, not reordered
    with caplog.at_level(logging.WARNING, logger="quantcore.data.detect"):
        ds = open_dataset(str(tmp_path / "d"), "val", label_names=names)
    assert ds.classes == ["blue", "cyan", "green", "red"]
    assert any("not the same set" in r.getMessage() for r in caplog.records)


def test_class_folders_named_as_the_labels_up_to_case_or_unicode_form_take_the_models_order(tmp_path, caplog):
    """Folders Tench/Goldfish/Cock (or NFD-written names) for id2label tench/goldfish/cock are the model's
    classes: sorted order would make Cock label 0 (the model's tench) and relabel every image silently.
    Zip shards packed from such folders (sorted in their index) take the model's order too, and say so."""
    import unicodedata

    from quantcore.data import pack

    names = ["tench", "goldfish", "café", "cock"]
    folders = ["Tench", "GOLDFISH", unicodedata.normalize("NFD", "Café"), "cock"]
    for c in folders:
        _img(tmp_path / "d" / "val" / c / "x.png")
    with caplog.at_level(logging.WARNING, logger="quantcore.data.detect"):
        ds = open_dataset(str(tmp_path / "d"), "val", label_names=names)
    assert ds.classes == folders  # the folders, in the model's label order
    assert {s.split("/")[0]: label for s, label in zip(ds.samples, ds.labels)} == {f: i for i, f in enumerate(folders)}
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "up to letter case, Unicode form or word separators (spaces, _, -, /)" in said
    assert "'Tench' is the model's 'tench', class 0" in said
    # two folders that differ only in case cannot be matched one to one: sorted order, as before
    _img(tmp_path / "e" / "val" / "Tench" / "x.png")
    _img(tmp_path / "e" / "val" / "tench" / "x.png")
    assert open_dataset(str(tmp_path / "e"), "val", label_names=["tench", "cock"]).classes == ["Tench", "tench"]
    # zip shards (sorted index order): mapped by name up to case and form, and said
    pack(str(tmp_path / "d"), str(tmp_path / "z"), "val")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quantcore.data.detect"):
        z = open_dataset(str(tmp_path / "z"), "val", label_names=names)
    assert z.classes == folders
    assert {s.split("/")[0]: label for s, label in zip(z.samples, z.labels)} == {f: i for i, f in enumerate(folders)}
    assert any("the model's in another order" in r.getMessage() for r in caplog.records), caplog.records


def test_a_split_with_some_of_the_models_classes_in_another_letter_case_keeps_the_models_indices(tmp_path, caplog):
    """A small val split with folders Bird/FISH for labels bird/cat/dog/fish: before, matched by name only
    when all four were there, so it fell back to sorted order (Bird 0, FISH 1: fish scored as cat) and a
    run stopped on '4 logits but 2 classes', pointing at num_classes."""
    names = ["bird", "cat", "dog", "fish"]
    for c in ("Bird", "FISH"):
        _img(tmp_path / "d" / "val" / c / "x.png")
    with caplog.at_level(logging.WARNING, logger="quantcore.data.detect"):
        ds = open_dataset(str(tmp_path / "d"), "val", label_names=names)
    assert {s.split("/")[0]: label for s, label in zip(ds.samples, ds.labels)} == {"Bird": 0, "FISH": 3}
    assert ds.classes == ["Bird", "cat", "dog", "FISH"] and ds.absent_classes == ["cat", "dog"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "no class folder for 2 of the model's 4 classes" in said and "up to letter case" in said
    # a folder that is no label (up to case) is not mapped by name: sorted, and warned
    _img(tmp_path / "d" / "val" / "Cow" / "x.png")
    assert open_dataset(str(tmp_path / "d"), "val", label_names=names).classes == ["Bird", "Cow", "FISH"]


def test_class_folders_spelled_with_other_word_separators_are_the_models_classes(tmp_path, caplog):
    """The demo model's labels are t-shirt_top ... ankle_boot; a user's folders are 'T-shirt top',
    'Ankle boot' (a label with '/' cannot be a folder name). Before: no name matched, so label i was the
    i-th sorted folder ('Ankle boot' label 0, the model's t-shirt_top) - top-1 38 % for an 87 % model."""
    from quantcore.demo import FMNIST_CLASSES

    folders = {"t-shirt_top": "T-shirt top", "trouser": "Trouser", "sandal": "Sandal", "ankle_boot": "Ankle boot",
               "bag": "bag"}
    for f in folders.values():
        _img(tmp_path / "d" / "val" / f / "x.png")
    with caplog.at_level(logging.WARNING, logger="quantcore.data.detect"):
        ds = open_dataset(str(tmp_path / "d"), "val", label_names=FMNIST_CLASSES)
    got = {s.split("/")[0]: label for s, label in zip(ds.samples, ds.labels)}
    assert got == {f: FMNIST_CLASSES.index(n) for n, f in folders.items()}
    assert "word separators" in " ".join(r.getMessage() for r in caplog.records)
    # labels that would be one name without their separators are not matched loosely (ambiguous)
    assert open_dataset(str(tmp_path / "d"), "val", label_names=[*FMNIST_CLASSES, "t shirt top"]).classes == sorted(
        folders.values())
    # ... but by the strict key (case, Unicode form) when it tells them apart: 'bottom-feeder' and 'bottom
    # feeder' are two ImageNet-21k classes; folders, then zip shards packed from them
    from quantcore.data import pack

    for c in ("a_b", "AB"):
        _img(tmp_path / "e" / "val" / c / "x.png")
    ds = open_dataset(str(tmp_path / "e"), "val", label_names=["A_b", "ab"])
    assert {s.split("/")[0]: label for s, label in zip(ds.samples, ds.labels)} == {"a_b": 0, "AB": 1}
    pack(str(tmp_path / "e"), str(tmp_path / "z"), "val")
    z = open_dataset(str(tmp_path / "z"), "val", label_names=["ab", "a_b"])
    assert {s.split("/")[0]: label for s, label in zip(z.samples, z.labels)} == {"a_b": 1, "AB": 0}


def test_a_bad_image_reads_the_same_every_time():
    """The reason is part of the skipped record's identity (calibration + evaluation list it once)."""
    from quantcore.data.base import decode_image
    from quantcore.data.errors import DataError

    reasons = []
    for _ in range(2):
        with pytest.raises(DataError) as err:
            decode_image(b"not an image", "d/val/a/x.jpg")
        reasons.append(str(err.value))
    assert reasons[0] == reasons[1] and "0x" not in reasons[0] and "d/val/a/x.jpg" in reasons[0]


def test_an_empty_checkpoint_says_so():
    from quantcore.checkpoint import CheckpointError, read_checkpoint

    with pytest.raises(CheckpointError, match=r"m\.qc\.pt is empty \(0 bytes\)"):
        read_checkpoint(b"", "m.qc.pt")


def test_export_check_skips_bad_images_when_asked_and_lists_them(tmp_path):
    from quantcore.data.errors import DataError
    from quantcore.export.run import check_data

    torch.manual_seed(0)
    model = api.prepare(vit_fmnist(), {"name": "w8", "model": {"name": "quantcore/vit_fmnist"},
                                       "placement": {"family": "vit", "mode": "ft1"}})
    api.calibrate(model, [torch.randn(4, 1, 28, 28)])
    for c in range(10):
        _img(tmp_path / "d" / "val" / f"c{c}" / "x.png", (c * 20, c * 20, c * 20))
    (tmp_path / "d" / "val" / "c3" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        _load_check_images(model, check_data(str(tmp_path / "d"), "val"))
    xs, ys, _, skipped = _load_check_images(model, check_data(str(tmp_path / "d"), "val", skip_bad=True))
    assert xs.shape[0] == 10 and sorted(ys.tolist()) == list(range(10))
    assert len(skipped) == 1 and "broken.png" in json.dumps(skipped)
    with pytest.raises(ExportError, match="--check-skip-bad needs --check-data"):
        check_data(None, skip_bad=True)
