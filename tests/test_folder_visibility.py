"""Folder datasets: every file is used or said (hidden and non-image files are listed and warned
about), linked class folders are data, a link loop does not hang; export's accuracy check refuses data
whose class count differs from the model's logits."""
from __future__ import annotations

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
