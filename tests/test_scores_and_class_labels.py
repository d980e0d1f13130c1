"""Evaluation figures mean what they say (2026-12-03 break pass; each test failed on the code before
its fix): tied logits, inf/NaN logits, a checkpoint evaluated on data whose class folders sort
otherwise or lack a class, and a bad override among several recipes."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import quantcore
from quantcore.evaluate import EvalAccumulator
from quantcore.report import build_report, report_markdown


def _brute(logits: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, k: int) -> tuple[int, int, int]:
    """Correct top-1, correct top-k and agreement by a stable descending sort per image (among equal
    logits the lower class index first: argmax's rule)."""
    c1 = ck = agree = 0
    for row, label, rrow in zip(logits.tolist(), labels.tolist(), ref.tolist()):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        rorder = sorted(range(len(rrow)), key=lambda j: (-rrow[j], j))
        c1 += order[0] == label
        ck += label in order[:k]
        agree += order[0] == rorder[0]
    return c1, ck, agree


def test_tied_logits_are_ranked_one_way_for_top1_top5_and_agreement():
    """topk's order among ties (CPU: arbitrary) set top-1 while argmax set the reference's: identical
    all-zero logits gave 0 % agreement of a model with itself."""
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (64,))
    zeros = torch.zeros(64, 10)
    acc = EvalAccumulator(["fp32", "q"], 10, "fp32")
    acc.update({"fp32": zeros, "q": zeros.clone()}, labels)
    s = acc.scores()
    assert s["fp32"].agreement == 100.0 and s["q"].agreement == 100.0 and s["q"].sqnr_db == math.inf
    assert s["q"].top1 == pytest.approx(100.0 * float((labels == 0).float().mean()))
    assert s["q"].top5 == pytest.approx(100.0 * float((labels < 5).float().mean()))
    # many partial ties (logits on a coarse grid), against the brute-force stable sort
    ref = torch.randint(0, 4, (200, 10)).float()
    q = torch.where(torch.rand(200, 10) < 0.3, torch.randint(0, 4, (200, 10)).float(), ref)
    labels = torch.randint(0, 10, (200,))
    acc = EvalAccumulator(["fp32", "q"], 10, "fp32")
    acc.update({"fp32": ref, "q": q}, labels)
    for i, out in enumerate((ref, q)):
        assert (int(acc.correct1[i]), int(acc.correct5[i]), int(acc.agree[i])) == _brute(out, labels, ref, 5)


def test_inf_and_nan_logits_are_scored_wrong_and_reported_not_a_crash():
    """A float16 variant overflowing to inf/NaN crashed the whole evaluation (float.as_integer_ratio)."""
    torch.manual_seed(0)
    ref = torch.randn(32, 10)
    labels = ref.argmax(1)
    q = ref.clone()
    q[3] = float("nan")
    q[7, 2] = float("inf")
    acc = EvalAccumulator(["fp32", "fp16"], 10, "fp32")
    half = 16
    acc.update({"fp32": ref[:half], "fp16": q[:half]}, labels[:half])
    other = EvalAccumulator(["fp32", "fp16"], 10, "fp32")
    other.update({"fp32": ref[half:], "fp16": q[half:]}, labels[half:])
    acc.merge(EvalAccumulator.from_state_dict(other.state_dict()))
    s = acc.scores()
    assert s["fp16"].nonfinite == 2 and s["fp32"].nonfinite == 0
    assert s["fp16"].top1 == pytest.approx(100.0 * 30 / 32) and s["fp16"].agreement == pytest.approx(100.0 * 30 / 32)
    assert s["fp16"].sqnr_db == -math.inf and s["fp32"].top1 == 100.0
    rep = build_report(model="m", recipe=None, scores=s, reference="fp32", data={"eval_uri": "d", "eval_count": 32})
    assert any("fp16: inf/NaN logits on 2 of 32 images" in w for w in rep["warnings"])
    assert "inf/NaN logits on 2 of 32 images" in report_markdown(rep)
    # a reference with a NaN row: that image agrees with nothing and adds no energy
    acc = EvalAccumulator(["fp32", "q"], 10, "fp32")
    bad_ref = ref.clone()
    bad_ref[0] = float("nan")
    acc.update({"fp32": bad_ref, "q": ref + 0.01}, labels)
    s = acc.scores()
    assert s["q"].agreement == pytest.approx(100.0 * 31 / 32) and math.isfinite(s["q"].sqnr_db)


def test_fewer_than_five_classes_say_top_k():
    acc = EvalAccumulator(["fp32", "q"], 3, "fp32")
    acc.update({"fp32": torch.randn(6, 3), "q": torch.randn(6, 3)}, torch.tensor([0, 1, 2, 0, 1, 2]))
    s = acc.scores()
    assert s["q"].top5_k == 3 and s["q"].top5 == 100.0
    rep = build_report(model="m", recipe=None, scores=s, reference="fp32", data={"eval_uri": "d", "eval_count": 6})
    assert "| model | top-1 % | top-3 % |" in report_markdown(rep)


def _folder(root, split, classes, per_class=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = (torch.rand(28, 28, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px, mode="L").save(d / f"{i}.png")


def test_a_checkpoint_keeps_its_class_names_and_maps_evaluation_folders_by_them(tmp_path):
    """evaluate had no class names for a checkpoint: a split without one class folder was refused with
    advice to change model.num_classes, and folders sorted otherwise than the calibration data's
    labels were scored against shifted labels without a word."""
    from quantcore.data import model_label_names, open_dataset
    from quantcore.pipeline import DataSpec, RunOptions, evaluate_checkpoint, ptq

    torch.manual_seed(0)
    _folder(tmp_path / "d", "train", ["alpha", "mid", "zeta"])
    _folder(tmp_path / "d", "val", ["mid", "zeta"], seed=1)  # no "alpha" images in this split
    recipe = quantcore.load_recipe({"version": 1, "name": "t3", "model": {"name": "quantcore/vit_fmnist",
                                                                           "num_classes": 3},
                                    "calibration": {"num_batches": 1, "batch_size": 4}})
    out = str(tmp_path / "run")
    ptq([recipe], DataSpec(str(tmp_path / "d"), "train"), None, out, RunOptions(batch_size=4, progress=False))
    ckpt = f"{out}/t3/model.qc.pt"
    model = quantcore.load(ckpt)
    assert model_label_names(model) == ["alpha", "mid", "zeta"]
    ds = open_dataset(str(tmp_path / "d"), "val", None, label_names=model_label_names(model))
    assert ds.classes == ["alpha", "mid", "zeta"] and ds.absent_classes == ["alpha"]
    assert sorted(set(ds.labels)) == [1, 2] and ds.labels == sorted(ds.labels)
    rep = evaluate_checkpoint(ckpt, DataSpec(str(tmp_path / "d"), "val"), str(tmp_path / "ev"),
                              RunOptions(batch_size=4, progress=False))
    assert rep["data"]["eval_count"] == 6 and rep["class_names"] == ["alpha", "mid", "zeta"]
    assert rep["results"]["fp32"]["per_class"][0] is None  # no images of "alpha": not a score of 0
    # the same names in another sorted order than the model's labels: mapped by name
    model.quantcore_meta["extra"]["calibration"]["classes"] = ["zeta", "alpha", "mid"]
    ds = open_dataset(str(tmp_path / "d"), "train", None, label_names=model_label_names(model))
    assert ds.classes == ["zeta", "alpha", "mid"]
    assert [ds.labels[i] for i, s in enumerate(ds.samples) if s.startswith("zeta/")] == [0, 0, 0]


@pytest.mark.parametrize("layout", ["zip", "resisc"])
def test_packed_splits_take_the_model_labels_as_class_folders_do(tmp_path, layout):
    """A split lacking some classes evaluated as folders but was refused once packed ("repack with the
    model's order", which pack cannot do); classes packed in another order were scored shifted."""
    import json

    from quantcore.data import open_dataset, pack

    names = ["alpha", "mid", "zeta", "omega"]
    _folder(tmp_path / "f", "val", ["zeta", "mid"], seed=2)  # two of the model's four classes
    if layout == "zip":
        pack(str(tmp_path / "f"), str(tmp_path / "p"), "val", shard_size=2)
    else:  # resisc45 layout: <split>_imagepaths.txt + label_map.json, labels in the map's order
        root = tmp_path / "p"
        (root / "images").mkdir(parents=True)
        import shutil

        shutil.copytree(tmp_path / "f" / "val", root / "images", dirs_exist_ok=True)
        paths = sorted(str(p.relative_to(root)) for p in (root / "images").rglob("*.png"))
        (root / "val_imagepaths.txt").write_text("\n".join(paths) + "\n")
        (root / "label_map.json").write_text(json.dumps({"zeta": 0, "mid": 1}))
    ds = open_dataset(str(tmp_path / "p"), "val", None, label_names=names)
    assert ds.classes == names and ds.absent_classes == ["alpha", "omega"]
    by_class = {s.split("/")[-2]: y for s, y in zip(ds.samples, ds.labels)}
    assert by_class == {"mid": 1, "zeta": 2}, by_class
    # the model's first classes only: no position differs, the split is still short of classes
    _folder(tmp_path / "g", "val", ["alpha", "mid"], seed=4)
    pack(str(tmp_path / "g"), str(tmp_path / "q"), "val")
    first = open_dataset(str(tmp_path / "q"), "val", None, label_names=names)
    assert first.classes == names and first.absent_classes == ["zeta", "omega"]
    # a class the model does not know: left as packed (and warned about), not guessed
    plain = open_dataset(str(tmp_path / "p"), "val", None, label_names=["alpha", "mid", "other"])
    assert plain.classes != ["alpha", "mid", "other"] and plain.absent_classes == []


def test_a_bad_override_among_several_recipes_names_its_recipe():
    from quantcore.errors import PlacementError

    bad = {"version": 1, "name": "three_bad", "model": {"name": "quantcore/vit_fmnist"},
           "overrides": [{"match": "nothing.matches.this", "float": True}]}
    with pytest.raises(PlacementError, match=r"^recipe 'three_bad': overrides\[0\] 'nothing.matches.this' matches no"):
        quantcore.prepare(quantcore.build_model(bad), bad)


@pytest.mark.parametrize("name", ["../a8", ".", "..", "a/b", "x y", ""])
def test_a_recipe_name_that_is_not_one_folder_name_is_refused(name):
    """The name is the output folder <out>/<name>/: '../a8' wrote a run's files into another run's folder
    and '.' over the run's own report (seen through a Ray sweep's inline recipes)."""
    from quantcore.recipe import RecipeError

    with pytest.raises(RecipeError, match="it names the output folder"):
        quantcore.load_recipe({"version": 1, "name": name, "model": {"name": "quantcore/vit_fmnist"}})


@pytest.mark.parametrize("name", ["report.json", "report.md", "per_class.png", "Report.JSON", "ptq", "checkpoints",
                                  "metrics.jsonl", "training.png"])
def test_a_recipe_named_like_a_file_the_run_writes_is_refused(name):
    """<out>/report.json/ (the variant's folder) took the place of the run's report: the whole run was
    calibrated and evaluated, then failed writing its report (exit 2, results lost)."""
    from quantcore.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"a run writes <out>/.* itself"):
        quantcore.load_recipe({"version": 1, "name": name, "model": {"name": "quantcore/vit_fmnist"}})


def test_each_variant_report_describes_its_own_calibration_and_warnings(tmp_path):
    """With several recipes, the run's report said the first variant's image count for all, and each
    variant's own report.json carried that summary, the other variants' warnings and their costs."""
    import json

    from quantcore.pipeline import DataSpec, RunOptions, ptq
    from quantcore.report import report_markdown

    _folder(tmp_path / "d", "train", ["a", "b"], per_class=6)
    _folder(tmp_path / "d", "val", ["a", "b"], per_class=2, seed=3)

    def recipe(name, batches, method):
        return quantcore.load_recipe({"version": 1, "name": name, "model": {"name": "quantcore/vit_fmnist",
                                                                              "num_classes": 2},
                                      "calibration": {"method": method, "num_batches": batches, "batch_size": 4}})

    out = tmp_path / "run"
    rep = ptq([recipe("one", 1, "max"), recipe("many", 5, "percentile")], DataSpec(str(tmp_path / "d"), "train"),
              DataSpec(str(tmp_path / "d"), "val"), str(out), RunOptions(batch_size=4, progress=False))
    per = rep["calibration"]["per_variant"]
    assert per["one"]["images"] == 4 and per["many"]["images"] == 12, per  # 5 batches asked, 12 images there
    assert "`one` max" in report_markdown(rep) and "`many` percentile" in report_markdown(rep)
    asked = [w for w in rep["warnings"] if "calibration asks for" in w]
    assert asked and all("'many'" in w for w in asked)
    for name, images in (("one", 4), ("many", 12)):
        sub = json.loads((out / name / "report.json").read_text())
        assert sub["calibration"]["images"] == images and sub["calibration"] == rep["variants"][name]["calibration"]
        assert list(sub["results"]) == ["fp32", name] and "evaluation_cost" not in sub
        assert all(w in rep["warnings"] for w in sub["warnings"])
        assert bool([w for w in sub["warnings"] if "calibration asks for" in w]) == (name == "many"), sub["warnings"]


def test_class_names_with_dollar_signs_and_backticks_are_printed_as_written():
    """matplotlib read '$\\x$' in a class folder name as math: a traceback after the checkpoints were
    written, no report; a backtick in a skipped file's name broke its Markdown code span."""
    from quantcore.report import build_report, code, per_class_plot

    acc = EvalAccumulator(["fp32", "q"], 3, "fp32")
    logits = torch.eye(3)[[0, 1, 2, 2]] * 5
    acc.update({"fp32": logits, "q": logits + 0.1}, torch.tensor([0, 1, 2, 1]))
    rep = build_report(model="m$x$", recipe=None, scores=acc.scores(), reference="fp32", data={},
                       class_names=["8_Bag $\\x$", "US$ 5 and $ 10", "`tick`"])
    assert per_class_plot(rep)[:8] == b"\x89PNG\r\n\x1a\n"
    assert code("zz_bad|pipe`x.png") == "``zz_bad|pipe`x.png``" and code("`a`") == "`` `a` ``"


def test_a_relative_checkpoint_option_is_recorded_as_the_file_it_loaded(tmp_path, monkeypatch):
    """--checkpoint vit.pt was stored as typed; the stored recipe reads a relative path against the recipe's
    folder, so it named another file than the one loaded."""
    from quantcore.pipeline import _with_checkpoint

    monkeypatch.chdir(tmp_path)
    r = _with_checkpoint(quantcore.load_recipe({"version": 1, "name": "c", "model": {"name": "quantcore/vit_fmnist"}}),
                         "sub/w.pt")
    assert r.model.checkpoint == str(tmp_path / "sub" / "w.pt")
    r = _with_checkpoint(r, "s3://b/w.pt")
    assert r.model.checkpoint == "s3://b/w.pt"


def test_dataset_path_mistakes_are_named(tmp_path):
    from quantcore.data import DataError, open_dataset

    _folder(tmp_path / "fm", "val", ["a", "b"], per_class=1)
    with pytest.raises(DataError, match=r"dataset .*fmx: no such directory"):
        open_dataset(str(tmp_path / "fmx"), "val", None)
    with pytest.raises(DataError, match=r"holds class folders itself: give the dataset root that holds val/ "
                                        r"\(e.g. .*/fm\)"):
        open_dataset(str(tmp_path / "fm" / "val"), "val", None)


def test_a_yaml_syntax_error_is_one_line_naming_the_file(tmp_path):
    from quantcore.recipe import RecipeError

    (tmp_path / "bad.yaml").write_text("name: x\nmodel: {name: a\n")
    with pytest.raises(RecipeError) as info:
        quantcore.load_recipe(str(tmp_path / "bad.yaml"))
    assert "\n" not in str(info.value) and "<unicode string>" not in str(info.value)
    assert str(info.value).count(str(tmp_path / "bad.yaml")) >= 2  # the recipe, and the position in it


def test_report_md_says_which_preprocessing_made_the_figures():
    acc = EvalAccumulator(["fp32", "q"], 10, "fp32")
    acc.update({"fp32": torch.randn(4, 10), "q": torch.randn(4, 10)}, torch.tensor([0, 1, 2, 3]))
    tf = {"source": "timm", "input_size": [1, 28, 28], "interpolation": "bilinear", "mean": [0.286], "std": [0.353],
          "crop_pct": 1.0, "crop_mode": "center", "resize_size": [28], "mode": "L"}
    rep = build_report(model="m", recipe=None, scores=acc.scores(), reference="fp32",
                       data={"eval_uri": "d", "eval_count": 4}, extra={"transform": tf})
    assert ("Preprocessing (timm): input 1x28x28, resize [28] bilinear, crop center (crop_pct 1.0), mean [0.286], "
            "std [0.353], mode L.") in report_markdown(rep)


def _user_zip(folder_ds, root):
    """``folder_ds``'s images as a hand-made ``val.zip`` + ``val_map.txt`` (labels: the folder dataset's,
    i.e. the model's class indices), no index.json: the map gives label numbers and no class names."""
    import os
    import zipfile

    os.makedirs(root, exist_ok=True)
    with zipfile.ZipFile(os.path.join(root, "val.zip"), "w") as zf, open(os.path.join(root, "val_map.txt"), "w") as mf:
        for i, (s, y) in enumerate(zip(folder_ds.samples, folder_ds.labels)):
            zf.writestr(s, folder_ds.read_raw(i))
            mf.write(f"{s}\t{y}\n")


def test_a_map_files_label_numbers_are_never_matched_as_class_names(tmp_path):
    """A zip split without index.json got made-up class names "0".."K-1", which were then matched to a
    model's names as if they were the data's own: with numeric class folders 0..11 (sorted as text:
    0, 1, 10, 11, 2, ...) 20 of 24 labels were rewritten and a 100 % model scored 16.67 %; a checkpoint
    calibrated on such a zip recorded the made-up names as its classes and mislabelled folders later."""
    from quantcore.data import class_names, label_notes, model_label_names, open_dataset, pack

    classes = [str(i) for i in range(12)]
    _folder(tmp_path / "f", "val", classes, per_class=2)
    folder = open_dataset(str(tmp_path / "f"), "val", None)
    assert folder.classes[:4] == ["0", "1", "10", "11"]  # ImageFolder's order: sorted as text
    _user_zip(folder, str(tmp_path / "z"))
    # a model whose labels are the folder names in that order (a checkpoint calibrated on the folders)
    zipped = open_dataset(str(tmp_path / "z"), "val", None, label_names=list(folder.classes))
    assert zipped.labels == folder.labels and zipped.samples == folder.samples
    assert class_names(zipped) is None and label_notes(zipped) == []  # no "another order" note either
    # a checkpoint calibrated on the zip carries no class names, so folders keep their own labels
    recipe = quantcore.load_recipe({"version": 1, "name": "z12", "model": {"name": "quantcore/vit_fmnist",
                                                                            "num_classes": 12},
                                    "calibration": {"num_batches": 1, "batch_size": 4}})
    from quantcore.pipeline import DataSpec, RunOptions, ptq

    torch.manual_seed(0)
    ptq([recipe], DataSpec(str(tmp_path / "z"), "val"), DataSpec(str(tmp_path / "f"), "val"), str(tmp_path / "run"),
        RunOptions(batch_size=4, progress=False))
    model = quantcore.load(str(tmp_path / "run" / "z12" / "model.qc.pt"))
    assert model_label_names(model) is None
    again = open_dataset(str(tmp_path / "f"), "val", None, label_names=model_label_names(model))
    assert again.labels == folder.labels
    # repacked, the split still has no names (none are made up in its index)
    pack(str(tmp_path / "z"), str(tmp_path / "p"), "val")
    repacked = open_dataset(str(tmp_path / "p"), "val", None, label_names=list(folder.classes))
    assert class_names(repacked) is None and repacked.labels == folder.labels and repacked.num_classes == 12
    # files written before: an index and a checkpoint that recorded the made-up names "0".."11"
    import json

    index = json.loads((tmp_path / "p" / "index.json").read_text())
    index["splits"]["val"]["classes"] = classes
    (tmp_path / "p" / "index.json").write_text(json.dumps(index))
    old = open_dataset(str(tmp_path / "p"), "val", None, label_names=list(folder.classes))
    assert class_names(old) is None and old.labels == folder.labels
    model.quantcore_meta["extra"]["calibration"]["classes"] = classes
    assert model_label_names(model) is None


def test_a_class_name_that_is_not_utf8_is_drawn_escaped_in_the_plot():
    """A Latin-1 folder name (surrogate-escaped by os.fsdecode) crashed the per-class plot after
    calibration and evaluation, so report.json/report.md were never written."""
    from quantcore.report import per_class_plot

    acc = EvalAccumulator(["fp32", "q"], 2, "fp32")
    logits = torch.eye(2)[[0, 1]] * 5
    acc.update({"fp32": logits, "q": logits}, torch.tensor([0, 1]))
    rep = build_report(model="m", recipe=None, scores=acc.scores(), reference="fp32", data={},
                       class_names=[b"caf\xe9".decode("utf-8", "surrogateescape"), "tea"])
    assert per_class_plot(rep)[:8] == b"\x89PNG\r\n\x1a\n"
