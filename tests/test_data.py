"""quantcore.data: layouts, packing to zip shards (local + S3), subsets/sharding, bad-input errors and
skip reporting through DataLoader workers, and eval transforms taken from the model."""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from quantcore.data import (
    DataError,
    Skipped,
    FolderDataset,
    ImagePathsDataset,
    ZipShardDataset,
    describe_transform,
    detect_layout,
    eval_transform,
    first_batches,
    make_loader,
    open_dataset,
    pack,
    pack_arrays,
    per_class_subset,
    random_subset,
    shard_indices,
)

CLASSES = ("cat", "dog", "eel")
EXTS = (".JPEG", ".jpg", ".png", ".jpeg")


# ---------------------------------------------------------------------------------------------- helpers
def _img_bytes(seed: int, ext: str = ".jpg", size: int = 32, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG" if ext.lower() == ".png" else "JPEG", quality=90)
    return buf.getvalue()


def make_folder(root, split="train", classes=CLASSES, n=4, seed=0) -> str:
    """<root>/<split>/<class>/<i>.<ext> with mixed extensions; returns root."""
    for ci, c in enumerate(classes):
        d = os.path.join(root, split, c)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            ext = EXTS[(ci + i) % len(EXTS)]
            with open(os.path.join(d, f"{c}_{i:02d}{ext}"), "wb") as f:
                f.write(_img_bytes(seed * 1000 + ci * 100 + i, ext))
    return str(root)


def make_resisc(root, classes=("forest", "airplane", "beach"), n=4) -> str:
    """RESISC45 layout; label ids deliberately not alphabetical; train uses root-relative paths and val
    images/-relative ones."""
    ids = {c: i for i, c in enumerate(classes)}
    paths = []
    for c in classes:
        os.makedirs(os.path.join(root, "images", c), exist_ok=True)
        for i in range(n):
            p = f"{c}/{c}_{i:03d}.jpg"
            with open(os.path.join(root, "images", p), "wb") as f:
                f.write(_img_bytes(ids[c] * 100 + i))
            paths.append(p)
    train = [p for p in paths if int(p[-7:-4]) < n - 1]
    val = [p for p in paths if int(p[-7:-4]) == n - 1]
    with open(os.path.join(root, "train_imagepaths.txt"), "w") as f:
        f.write("".join(f"images/{p}\n" for p in train))
    with open(os.path.join(root, "val_imagepaths.txt"), "w") as f:
        f.write("".join(f"{p}\n" for p in val))
    with open(os.path.join(root, "test_imagepaths.txt"), "w") as f:  # bare file names (torchgeo style)
        f.write("".join(f"{p.split('/')[1]}\n" for p in val[:2]))
    with open(os.path.join(root, "label_map.json"), "w") as f:
        json.dump(ids, f)
    return str(root)


def write_zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _to_tensor():
    from torchvision import transforms as T

    return T.ToTensor()


def pixels(ds, i) -> np.ndarray:
    return np.asarray(ds.load_image(i))


def tree_bytes(root) -> dict[str, bytes]:
    out = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(dp, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.fixture()
def folder(tmp_path):
    return make_folder(tmp_path / "src")


@pytest.fixture()
def packed(tmp_path, folder):
    dst = str(tmp_path / "packed")
    pack(folder, dst, "train", shard_size=5)
    return dst


# ---------------------------------------------------------------------------------------------- layouts
def test_folder_layout(folder, tmp_path):
    with open(os.path.join(folder, "train", "cat", "notes.txt"), "w") as f:
        f.write("not an image")
    assert detect_layout(folder, "train") == "folder"
    ds = open_dataset(folder, "train")
    assert isinstance(ds, FolderDataset) and ds.layout == "folder"
    assert ds.classes == list(CLASSES)
    assert ds.labels == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.samples[0] == "cat/cat_00.JPEG" and ds.samples == sorted(ds.samples)
    assert any(u.endswith("notes.txt") for u in ds.ignored)
    img, y = ds[5]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and y == 1
    # file:// URIs work the same
    ds2 = open_dataset("file://" + os.path.abspath(folder), "train")
    assert ds2.samples == ds.samples and ds2.labels == ds.labels
    assert np.array_equal(pixels(ds2, 7), pixels(ds, 7))
    with pytest.raises(DataError, match="cannot detect"):
        open_dataset(folder, "nosuchsplit")


def test_resisc_layout(tmp_path):
    root = make_resisc(tmp_path / "resisc")
    assert detect_layout(root, "train") == "resisc"
    tr = open_dataset(root, "train")
    va = open_dataset(root, "val", layout="resisc45")
    assert isinstance(tr, ImagePathsDataset) and tr.layout == "resisc"
    assert tr.classes == ["forest", "airplane", "beach"]  # order = label_map ids, not alphabetical
    assert len(tr) == 9 and len(va) == 3
    te = open_dataset(root, "test")
    assert te.samples == ["forest/forest_003.jpg", "airplane/airplane_003.jpg"] and te.labels == [0, 1]
    assert np.array_equal(pixels(te, 1), pixels(va, 1))
    assert tr.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert va.samples == ["forest/forest_003.jpg", "airplane/airplane_003.jpg", "beach/beach_003.jpg"]
    assert va.labels == [0, 1, 2]
    assert va[1][1] == 1 and va[1][0].size == (32, 32)
    # written by a Windows editor: a byte-order mark starts each file (the first image was lost)
    for name in ("val_imagepaths.txt", "label_map.json"):
        f = os.path.join(root, name)
        raw = open(f, "rb").read()
        open(f, "wb").write(b"\xef\xbb\xbf" + raw.replace(b"\n", b"\r\n"))
    bom = open_dataset(root, "val")
    assert bom.samples == va.samples and bom.labels == va.labels and bom.classes == va.classes


def test_pack_folder_roundtrip_and_determinism(tmp_path, folder, packed):
    names = sorted(os.listdir(packed))
    assert names == ["index.json"] + [f"train-{k:05d}{s}" for k in range(3) for s in (".zip", "_map.txt")]
    idx = json.load(open(os.path.join(packed, "index.json")))
    ent = idx["splits"]["train"]
    assert ent["classes"] == list(CLASSES) and ent["count"] == 12
    assert [s["count"] for s in ent["shards"]] == [5, 5, 2]
    assert open(os.path.join(packed, "train-00000_map.txt")).readline() == "cat/cat_00.JPEG\t0\n"

    src = open_dataset(folder, "train")
    assert detect_layout(packed, "train") == "zip"
    with pytest.raises(DataError, match=r"split 'val' under .*: looked for .*; its index.json lists the split\(s\) "
                                        r"'train' \(--split\)"):
        open_dataset(packed, "val")
    z = open_dataset(packed, "train")
    assert isinstance(z, ZipShardDataset) and len(z.shards) == 3
    assert z.classes == src.classes and z.labels == src.labels and z.samples == src.samples
    for i in range(len(src)):
        assert np.array_equal(pixels(z, i), pixels(src, i))
    assert z.where(11).endswith("train-00002.zip:eel/eel_03.jpg")

    # re-packing gives identical bytes (shards, maps, index)
    again = str(tmp_path / "again")
    pack(folder, again, "train", shard_size=5)
    assert tree_bytes(again) == tree_bytes(packed)

    # a second split is added to the same index; re-sharding a packed split keeps the data
    make_folder(folder, "val", n=2, seed=1)
    pack(folder, packed, "val", shard_size=None)
    assert sorted(json.load(open(os.path.join(packed, "index.json")))["splits"]) == ["train", "val"]
    assert os.path.exists(os.path.join(packed, "val.zip")) and len(open_dataset(packed, "val")) == 6
    resharded = str(tmp_path / "resharded")
    pack(packed, resharded, "train", shard_size=4)
    r = open_dataset(resharded, "train")
    assert len(r.shards) == 3 and r.labels == src.labels
    assert np.array_equal(pixels(r, 9), pixels(src, 9))


def test_pack_resisc_roundtrip(tmp_path):
    root = make_resisc(tmp_path / "resisc")
    dst = str(tmp_path / "packed")
    pack(root, dst, "train", shard_size=4)
    src, z = open_dataset(root, "train"), open_dataset(dst, "train")
    assert z.classes == src.classes and z.labels == src.labels and len(z.shards) == 3
    assert all(np.array_equal(pixels(z, i), pixels(src, i)) for i in range(len(src)))


def test_single_zip_layout_without_index(tmp_path):
    """Classic <split>.zip + <split>_map.txt, members under a '<split>/' folder, no index.json."""
    root = tmp_path / "zipped"
    root.mkdir()
    members = {f"val/c{y}/img{i}.jpg": _img_bytes(10 * y + i) for y in range(3) for i in range(2)}
    write_zip(root / "val.zip", members)
    lines = [f"c{y}/img{i}.jpg\t{y}" for y in range(3) for i in range(2)]
    (root / "val_map.txt").write_text("# comment\n\n" + "\n".join(lines) + "\n")
    assert detect_layout(str(root), "val") == "zip"
    ds = open_dataset(str(root), "val")
    assert ds.classes == ["0", "1", "2"] and ds.labels == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(pixels(ds, 3), np.asarray(Image.open(io.BytesIO(members["val/c1/img1.jpg"]))))
    assert open_dataset(str(root), "val", num_classes=10).num_classes == 10


def test_sharded_reading_by_listing(packed, folder):
    os.remove(os.path.join(packed, "index.json"))
    ds = open_dataset(packed, "train", classes=list(CLASSES))
    assert [s.name for s in ds.shards] == ["train-00000.zip", "train-00001.zip", "train-00002.zip"]
    assert ds.labels == open_dataset(folder, "train").labels
    assert {ds.shard_of(i).name for i in (0, 5, 10)} == {s.name for s in ds.shards}
    os.remove(os.path.join(packed, "train-00001_map.txt"))
    with pytest.raises(DataError, match="train-00001.zip has no map file"):
        open_dataset(packed, "train")


def test_zip_files_that_are_not_shards_numbered_from_zero_are_refused(packed, tmp_path):
    """Split 'test' read test-2019.zip and test-2020.zip (splits of their own) as its shards, merged; a
    shard missing from 0..N-1 left its images out silently."""
    root = tmp_path / "years"
    root.mkdir()
    for year in (2019, 2020):
        write_zip(root / f"test-{year}.zip", {f"c0/{year}.jpg": _img_bytes(year)})
        (root / f"test-{year}_map.txt").write_text(f"c0/{year}.jpg\t0\n")
    with pytest.raises(DataError, match=r"not shards numbered 0..N-1.*give one as the split \(e.g. 'test-2019'\)"):
        open_dataset(str(root), "test", layout="zip")
    assert len(open_dataset(str(root), "test-2019")) == 1
    for name in ("test-0", "test-00000"):  # one shard number written twice
        write_zip(root / f"{name}.zip", {"c0/x.jpg": _img_bytes(1)})
        (root / f"{name}_map.txt").write_text("c0/x.jpg\t0\n")
    with pytest.raises(DataError, match="shard number\\(s\\) 0 written twice"):
        open_dataset(str(root), "test", layout="zip")
    os.remove(os.path.join(packed, "index.json"))
    for ext in (".zip", "_map.txt"):
        os.remove(os.path.join(packed, f"train-00001{ext}"))
    with pytest.raises(DataError, match="train-00001.zip missing"):
        open_dataset(packed, "train")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this OS")
def test_a_named_pipe_among_the_images_is_named_not_read(tmp_path):
    """A FIFO called pipe.png blocked the run forever, with or without --skip-bad."""
    root = make_folder(tmp_path / "f", "val", n=2)
    os.mkfifo(os.path.join(root, "val", CLASSES[0], "pipe.png"))
    ds = open_dataset(root, "val")
    i = ds.samples.index(f"{CLASSES[0]}/pipe.png")
    with pytest.raises(DataError, match="pipe.png is not a regular file"):
        ds.read_raw(i)
    skipping = open_dataset(root, "val", skip_bad=True)
    assert isinstance(skipping[i], Skipped) and "not a regular file" in skipping[i].reason
    assert any(n.endswith("pipe.png") for n in skipping.skipped.names)


def test_pack_arrays_grayscale_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    dst = str(tmp_path / "fmnist")
    ent = pack_arrays(gray, labels, dst, "test", names, shard_size=4)
    assert ent["count"] == 10 and len(ent["shards"]) == 3 and ent["image_format"] == "png"
    ds = open_dataset(dst, "test")
    assert ds.classes == names and ds.labels == labels.tolist()
    assert ds.samples[0] == "T-shirt_top/00000.png"
    for i in range(10):
        im = ds.load_image(i)
        assert im.mode == "L" and np.array_equal(np.asarray(im), gray[i])
    dst2 = str(tmp_path / "fmnist2")
    pack_arrays(gray, labels, dst2, "test", names, shard_size=4)
    assert tree_bytes(dst2) == tree_bytes(dst)

    rgb = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    pack_arrays(rgb, [0, 1, 0], dst, "rgb", ["a", "b"], shard_size=None)
    ds = open_dataset(dst, "rgb")
    assert np.array_equal(np.asarray(ds.load_image(2)), rgb[2])
    with pytest.raises(DataError, match="out of range"):
        pack_arrays(rgb, [0, 1, 5], dst, "bad", ["a", "b"])


# ---------------------------------------------------------------------------------------------- subsets
def test_per_class_subset_and_random_subsets(tmp_path):
    root = make_folder(tmp_path / "src", n=6)
    ds = open_dataset(root, "train")
    a = per_class_subset(ds, 2, seed=3)
    assert a == per_class_subset(ds, 2, seed=3) == sorted(a)
    assert len(a) == 6 and len(set(a)) == 6
    assert [sum(ds.labels[i] == c for i in a) for c in range(3)] == [2, 2, 2]
    assert any(per_class_subset(ds, 2, seed=s) != a for s in range(4, 10))
    b = per_class_subset(ds.labels + [0], 2, seed=3)  # class 0 grows: classes 1 and 2 keep their picks
    assert [i for i in b if i < 18 and ds.labels[i] > 0] == [i for i in a if ds.labels[i] > 0]
    with pytest.raises(DataError, match="fewer than n_per_class"):
        per_class_subset(ds, 7, seed=0)
    assert len(per_class_subset(ds, 7, seed=0, allow_fewer=True)) == 18

    fb = first_batches(ds, 2, 4, seed=1)
    assert fb == first_batches(ds, 2, 4, seed=1) and len(fb) == 8 and len(set(fb)) == 8
    assert fb != first_batches(ds, 2, 4, seed=2)
    assert sorted(first_batches(18, 10, 4, seed=0)) == list(range(18))  # clamped to the dataset
    assert random_subset(ds, 5, seed=0) == random_subset(len(ds), 5, seed=0)


@pytest.mark.parametrize("n,world", [(0, 3), (1, 4), (10, 3), (12, 4), (17, 5), (7, 1)])
def test_shard_indices_disjoint_covering_balanced(n, world):
    idx = list(range(100, 100 + n))[::-1]
    parts = [shard_indices(idx, r, world) for r in range(world)]
    assert sum(parts, []) == idx
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert shard_indices(n, 0, world) == shard_indices(list(range(n)), 0, world)
    with pytest.raises(ValueError):
        shard_indices(idx, world, world)


# ---------------------------------------------------------------------------------------------- loader
@pytest.mark.parametrize("workers", [0, 2])
def test_make_loader_batches(packed, workers):
    from torchvision import transforms as T

    ds = open_dataset(packed, "train", T.ToTensor())
    idx = per_class_subset(ds, 3, seed=0)
    mine = shard_indices(idx, 1, 2)
    dl = make_loader(ds, 2, num_workers=workers, indices=mine)
    seen = []
    for images, labels, skipped in dl:
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert skipped == []
        seen += labels.tolist()
    assert seen == [ds.labels[i] for i in mine] and len(dl.skipped) == 0


# ---------------------------------------------------------------------------------------------- bad input
def _corrupt_folder(tmp_path):
    root = make_folder(tmp_path / "src")
    bad = os.path.join(root, "train", "dog", "dog_01.jpg")  # an extra, 13th file (dog_01 is a .png)
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return root, bad


def _collect(ds, workers):
    dl = make_loader(ds, 4, num_workers=workers)
    n, names = 0, []
    for images, labels, skipped in dl:
        n += len(labels)
        assert images.shape[0] == len(labels)
        names += skipped
    return n, names, dl


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_folder(tmp_path, workers):
    from torchvision import transforms as T

    root, bad = _corrupt_folder(tmp_path)
    ds = open_dataset(root, "train", T.ToTensor())
    i = ds.samples.index("dog/dog_01.jpg")
    with pytest.raises(DataError, match="dog_01.jpg") as ei:
        ds[i]
    assert ei.value.file == bad
    if workers:  # raised inside a worker: still a DataError naming the file
        with pytest.raises(DataError, match="dog_01.jpg"):
            list(make_loader(ds, 4, num_workers=workers))
    sk = open_dataset(root, "train", T.ToTensor(), skip_bad=True)
    n, names, dl = _collect(sk, workers)
    assert n == 12 and names == [bad]
    assert dl.skipped.names == [bad] and "cannot decode" in dl.skipped.reason(bad)
    assert sk.skipped.names == [bad]  # the dataset's own log is the loader's log


def _shard_with(tmp_path, members, map_text, index_classes=("a", "b", "c")):
    root = tmp_path / "z"
    root.mkdir(exist_ok=True)
    write_zip(root / "train-00000.zip", {f"a/{i}.jpg": _img_bytes(i) for i in range(3)})
    (root / "train-00000_map.txt").write_text("".join(f"a/{i}.jpg\t0\n" for i in range(3)))
    write_zip(root / "train-00001.zip", members)
    (root / "train-00001_map.txt").write_text(map_text)
    if index_classes is not None:
        (root / "index.json").write_text(json.dumps({"format": "quantcore-zip-shards", "splits": {"train": {
            "classes": list(index_classes), "shards": [
                {"zip": "train-00000.zip", "map": "train-00000_map.txt"},
                {"zip": "train-00001.zip", "map": "train-00001_map.txt"}]}}}))
    return str(root)


GOOD = {"b/0.jpg": _img_bytes(50), "c/1.jpg": _img_bytes(51)}
GOOD_MAP = "b/0.jpg\t1\nc/1.jpg\t2\n"


@pytest.mark.parametrize("case,members,map_text,match", [
    ("missing_member", GOOD, GOOD_MAP + "c/2.jpg\t2\n", r"train-00001.zip has no member 'c/2.jpg'.*_map.txt:3"),
    ("label_range", GOOD, "b/0.jpg\t1\nc/1.jpg\t7\n", r"train-00001_map.txt:2: label 7 .*out of range for 3"),
    ("unparsable", GOOD, "b/0.jpg\t1\nc/1.jpg\ttwo\n", r"train-00001_map.txt:2: cannot parse"),
    ("not_in_map", {**GOOD, "c/extra.jpg": _img_bytes(9)}, GOOD_MAP, r"train-00001.zip has 1 member.*c/extra.jpg"),
])
def test_map_problems_raise_and_skip(tmp_path, case, members, map_text, match):
    root = _shard_with(tmp_path, members, map_text)
    with pytest.raises(DataError, match=match):
        open_dataset(root, "train")
    ds = open_dataset(root, "train", skip_bad=True)
    assert len(ds.skipped) == 1
    rec = next(iter(ds.skipped))
    assert "train-00001" in rec.name and "train-00001" in rec.reason
    expected = {"missing_member": 5, "label_range": 4, "unparsable": 4, "not_in_map": 5}[case]
    assert len(ds) == expected
    dl = make_loader(open_dataset(root, "train", _to_tensor(), skip_bad=True), 8)
    assert sum(len(y) for _, y, _ in dl) == expected and dl.skipped.names == [rec.name]


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_jpeg_in_shard(tmp_path, workers):
    from torchvision import transforms as T

    data = _img_bytes(7)
    root = _shard_with(tmp_path, {**GOOD, "c/t.jpg": data[: len(data) // 2]}, GOOD_MAP + "c/t.jpg\t2\n")
    ds = open_dataset(root, "train", T.ToTensor())
    with pytest.raises(DataError, match=r"train-00001.zip:c/t.jpg"):
        ds[5]
    sk = open_dataset(root, "train", T.ToTensor(), skip_bad=True)
    n, names, dl = _collect(sk, workers)
    assert n == 5 and len(names) == 1 and names[0].endswith("train-00001.zip:c/t.jpg")
    assert "truncated" in dl.skipped.reason(names[0])


def test_truncated_zip(tmp_path):
    root = _shard_with(tmp_path, GOOD, GOOD_MAP)
    p = os.path.join(root, "train-00001.zip")
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"bad zip file .*train-00001.zip") as ei:
        open_dataset(root, "train")
    assert ei.value.shard.endswith("train-00001.zip")
    ds = open_dataset(root, "train", skip_bad=True)
    assert len(ds) == 3
    names = sorted(ds.skipped.names)
    assert len(names) == 2 and names[0].endswith("train-00001.zip:b/0.jpg") and names[1].endswith(":c/1.jpg")
    assert all("bad zip file" in ds.skipped.reason(n) for n in names)


def test_empty_class_folder(tmp_path):
    root = make_folder(tmp_path / "src")
    os.makedirs(os.path.join(root, "train", "bee"))
    with pytest.raises(DataError, match=r"class folder .*bee is empty"):
        open_dataset(root, "train")
    ds = open_dataset(root, "train", skip_bad=True)
    assert ds.classes == ["bee", "cat", "dog", "eel"] and ds.class_counts()[0] == 0
    assert len(ds) == 12 and ds.skipped.names[0].rstrip("/").endswith("bee")
    os.makedirs(os.path.join(root, "val"))
    with open(os.path.join(root, "val", "loose.jpg"), "wb") as f:
        f.write(_img_bytes(1))
    with pytest.raises(DataError, match="loose.jpg is not inside a class folder"):
        open_dataset(root, "val")


def test_resisc_bad_inputs(tmp_path):
    root = make_resisc(tmp_path / "resisc")
    with open(os.path.join(root, "val_imagepaths.txt"), "a") as f:
        f.write("images/unknown/x.jpg\n")
    with pytest.raises(DataError, match=r"val_imagepaths.txt:4: class folder 'unknown'"):
        open_dataset(root, "val")
    os.remove(os.path.join(root, "images", "beach", "beach_000.jpg"))
    ds = open_dataset(root, "train")
    with pytest.raises(DataError, match=r"image not found: .*beach_000.jpg"):
        ds[6]
    sk = open_dataset(root, "train", _to_tensor(), skip_bad=True)
    n, names, _ = _collect(sk, 0)
    assert n == 8 and names[0].endswith("beach/beach_000.jpg")


def test_pack_reports_bad_images(tmp_path):
    root, bad = _corrupt_folder(tmp_path)
    with pytest.raises(DataError, match="dog_01.jpg"):
        pack(root, str(tmp_path / "out"), "train", shard_size=5)
    # the split is marked incomplete until a pack finishes: never read as a dataset
    assert json.loads((tmp_path / "out" / "index.json").read_text())["splits"]["train"] == {"incomplete": True}
    ent = pack(root, str(tmp_path / "out"), "train", shard_size=5, skip_bad=True)
    assert ent["count"] == 12 and [s["name"] for s in ent["skipped"]] == [bad]
    # the packed split carries what was left out into every run that reads it (reports list it)
    for skip_bad in (False, True):
        ds = open_dataset(str(tmp_path / "out"), "train", skip_bad=skip_bad)
        assert len(ds) == 12 and ds.skipped.names == [bad]
        assert ds.skipped.reason(bad).startswith("left out when packing: ")
        dl = make_loader(open_dataset(str(tmp_path / "out"), "train", _to_tensor(), skip_bad=skip_bad), 8)
        assert sum(len(y) for _, y, _ in dl) == 12 and [r["name"] for r in dl.skipped.as_list()] == [bad]


def test_repacking_a_packed_split_keeps_it_and_refuses_to_pack_over_its_source(tmp_path, monkeypatch):
    """Repacking in place with a smaller --shard-size overwrote the shards it was still reading (the split
    lost, index marked incomplete); each repack also prefixed "left out when packing: " once more."""
    root, bad = _corrupt_folder(tmp_path)
    first = str(tmp_path / "p1")
    pack(root, first, "train", shard_size=7, skip_bad=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "p1").iterdir()}
    monkeypatch.chdir(tmp_path)
    for spelled in (first, first + "/", "p1", "./p1/", f"{tmp_path}/./p1", f"file://{first}"):
        with pytest.raises(DataError, match="the destination is the source"):
            pack(spelled, first, "train", shard_size=5)
    assert {p.name: p.read_bytes() for p in (tmp_path / "p1").iterdir()} == before  # nothing touched
    again = pack(first, str(tmp_path / "p2"), "train", shard_size=5)
    again = pack(str(tmp_path / "p2"), str(tmp_path / "p3"), "train", shard_size=4)
    assert again["count"] == 12 and [s["name"] for s in again["skipped"]] == [bad]
    reason = open_dataset(str(tmp_path / "p3"), "train").skipped.reason(bad)
    assert reason.startswith("left out when packing: ") and reason.count("left out when packing") == 1, reason
    # another split name into the same place reads one split and writes another: allowed
    pack(first, first, "train", shard_size=5, dst_split="train5")
    assert len(open_dataset(first, "train5")) == len(open_dataset(first, "train")) == 12


# ---------------------------------------------------------------------------------------------- transforms
def _gray_png_folder(root, value=200, size=40):
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, "val", c), exist_ok=True)
        Image.new("RGB", (size, size), (value, value, value)).save(os.path.join(root, "val", c, "0.png"))
    return str(root)


def test_eval_transform_from_timm_grayscale_vit(tmp_path):
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=1, img_size=28, patch_size=4,
                          depth=1, num_classes=3)
    m.pretrained_cfg = {**m.pretrained_cfg, "mean": (0.3,), "std": (0.2,), "crop_pct": 1.0}
    t = eval_transform(m)
    d = describe_transform(m)
    assert d["source"] == "timm" and d["input_size"] == [1, 28, 28] and d["mode"] == "L"
    assert d["mean"] == [0.3] and d["std"] == [0.2] and d["interpolation"] == "bicubic"
    json.dumps(d)
    ds = open_dataset(_gray_png_folder(tmp_path / "g"), "val", t)
    x, y = ds[1]
    assert x.shape == (1, 28, 28) and y == 1
    assert torch.allclose(x, torch.full_like(x, (200 / 255 - 0.3) / 0.2), atol=1e-5)
    x, _ = next(iter(make_loader(ds, 2)))[:2]
    assert x.shape == (2, 1, 28, 28)
    assert m(x).shape == (2, 3)

    # an RGB (3-value) mean on a grayscale model is reduced to one channel, not broadcast to 3
    m.pretrained_cfg = {**m.pretrained_cfg, "mean": (0.1, 0.2, 0.6), "std": (0.5, 0.5, 0.5)}
    x = eval_transform(m)(Image.new("RGB", (28, 28), (51, 51, 51)))
    assert x.shape == (1, 28, 28) and torch.allclose(x, torch.full_like(x, (0.2 - 0.3) / 0.5), atol=1e-5)


def test_eval_transform_timm_rgb_custom_cfg():
    import timm

    m = timm.create_model("resnet18", pretrained=False, num_classes=3)
    m.pretrained_cfg = {**m.pretrained_cfg, "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.25, 0.125),
                        "input_size": (3, 64, 64), "crop_pct": 0.5, "interpolation": "bilinear"}
    d = describe_transform(m)
    assert d["input_size"] == [3, 64, 64] and d["crop_pct"] == 0.5 and d["resize_size"] == [128]
    x = eval_transform(m)(Image.new("L", (50, 80), 255))  # grayscale input converted to RGB
    assert x.shape == (3, 64, 64)
    assert describe_transform(m, use_test_size=True)["input_size"] == [3, 288, 288]  # resnet18's test size
    assert describe_transform(m, overrides={"crop_pct": 1.0})["resize_size"] == [64]
    assert torch.allclose(x[:, 0, 0], torch.tensor([(1 - 0.1) / 0.5, (1 - 0.2) / 0.25, (1 - 0.3) / 0.125]))


def test_eval_transform_torchvision():
    import torchvision

    m = torchvision.models.resnet18(num_classes=3)
    d = describe_transform(m)
    assert d["source"] == "torchvision-default" and d["input_size"] == [3, 224, 224]
    assert d["resize_size"] == [256] and d["interpolation"] == "bilinear"
    assert eval_transform(m)(Image.new("RGB", (300, 260))).shape == (3, 224, 224)
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    d = describe_transform(m, weights=w)
    assert d["source"] == "torchvision-weights" and d["input_size"] == [3, 224, 224] and d["resize_size"] == [256]
    assert eval_transform(m, weights=w.transforms())(Image.new("L", (300, 260))).shape == (3, 224, 224)
    json.dumps(d)


@pytest.mark.parametrize("name", ["resnet50", "swin_t", "efficientnet_b0", "inception_v3", "mobilenet_v3_small"])
def test_torchvision_models_get_their_weights_preprocessing(name, tmp_path):
    """`torchvision:<name>` (built without weights here: nothing downloads) is preprocessed as its
    DEFAULT weights' own transforms do (ResNet-50 V2: resize 232; Swin-T: bicubic; Inception-v3:
    342 -> 299), not by a generic 256/224 preset: pixel-exact on the PIL path, within the decoder's
    tolerance on the JPEG path, and recorded in the description."""
    import io

    import numpy as np
    import torchvision

    import quantcore

    model = quantcore.build_model({"model": {"name": f"torchvision:{name}", "pretrained": False}})
    weights = torchvision.models.get_model_weights(name).DEFAULT
    ref_tf = weights.transforms()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (301, 457, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    ref = ref_tf(img)
    ours = eval_transform(model)
    assert torch.equal(ours(img), ref)
    d = describe_transform(model)
    assert d["source"] == "torchvision-weights" and d["weights"] == f"{type(weights).__name__}.{weights.name}"
    assert d["input_size"][1:] == [ref_tf.crop_size[0]] * 2 and d["resize_size"] == list(ref_tf.resize_size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    jpeg_ref = ref_tf(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    std = torch.tensor(ref_tf.std).view(3, 1, 1)
    assert ((ours.from_bytes(buf.getvalue(), "x.jpg") - jpeg_ref) * std * 255).abs().max() <= 2.01
    # a model built with another image_size keeps the weights' mean/std/interpolation at its own size
    if name == "resnet50":
        vit = quantcore.build_model({"model": {"name": "torchvision:vit_b_16", "pretrained": False,
                                               "kwargs": {"image_size": 384}}})
        d = describe_transform(vit)
        assert d["input_size"] == [3, 384, 384] and d["resize_size"] == [438] and "scaled" in d["source"]
        assert eval_transform(vit)(img).shape == (3, 384, 384)


def test_a_model_of_neither_1_nor_3_channels_is_refused_on_every_decode_path():
    """Image files decode to grayscale or RGB: a 4-channel model has no conversion. A grayscale JPEG
    used to be broadcast to all 4 channels on the torchvision path (a silently wrong input) while PIL
    raised a raw RuntimeError; both now refuse, naming the channel count. The description still works."""
    import timm

    from quantcore.errors import UserError

    m = timm.create_model("test_resnet", pretrained=False, in_chans=4, pretrained_cfg_overlay=dict(
        input_size=(4, 32, 32), mean=(0.1, 0.2, 0.3, 0.4), std=(0.5, 0.5, 0.5, 0.5)))
    assert describe_transform(m)["input_size"] == [4, 32, 32]
    files = {}
    for name, mode, fmt in (("g.jpg", "L", "JPEG"), ("c.jpg", "RGB", "JPEG"), ("a.png", "RGBA", "PNG")):
        buf = io.BytesIO()
        Image.new(mode, (40, 30), 128 if mode == "L" else (10, 20, 30, 40)[:len(mode)]).save(buf, fmt)
        files[name] = buf.getvalue()
    for decoder in ("torchvision", "pil"):
        t = eval_transform(m, decoder=decoder)
        for name, data in files.items():
            with pytest.raises(UserError, match="takes 4-channel input"):
                t.from_bytes(data, name)
        with pytest.raises(UserError, match="takes 4-channel input"):
            t(Image.open(io.BytesIO(files["c.jpg"])))


# ---------------------------------------------------------------------------------------------- S3
def _upload_tree(local_root, uri):
    from quantcore.io import storage

    for rel, data in sorted(tree_bytes(local_root).items()):
        storage.write_bytes(storage.join(uri, *rel.split(os.sep)), data)


def test_s3_pack_and_read_moto_mock(tmp_path, folder, s3_server, s3_bucket):
    from quantcore.io import storage

    src = open_dataset(folder, "train")
    dst = f"s3://{s3_bucket}/imagenet-tiny"
    pack(folder, dst, "train", shard_size=5)
    dst2 = f"s3://{s3_bucket}/again"
    pack(folder, dst2, "train", shard_size=5)
    for name in ("index.json", "train-00000.zip", "train-00002_map.txt"):
        assert storage.read_bytes(storage.join(dst, name)) == storage.read_bytes(storage.join(dst2, name))
    assert detect_layout(dst, "train") == "zip"
    z = open_dataset(dst, "train", cache_dir=str(tmp_path / "cache"))
    assert z.labels == src.labels and z.samples == src.samples and len(z.shards) == 3
    with pytest.raises(DataError, match=r"has no split 'val'; its index.json lists the split\(s\) 'train' \(--split\)"):
        detect_layout(dst, "val")  # packed shards of another split only
    assert all(np.array_equal(pixels(z, i), pixels(src, i)) for i in range(len(src)))

    # folder layout directly on S3, and packing S3 -> S3
    _upload_tree(folder, f"s3://{s3_bucket}/folder")
    f = open_dataset(f"s3://{s3_bucket}/folder", "train")
    assert f.layout == "folder" and f.samples == src.samples and f.labels == src.labels
    assert np.array_equal(pixels(f, 4), pixels(src, 4))
    pack(f"s3://{s3_bucket}/folder", f"s3://{s3_bucket}/from-s3", "train", shard_size=5)
    assert storage.read_bytes(f"s3://{s3_bucket}/from-s3/train-00001.zip") == \
        storage.read_bytes(storage.join(dst, "train-00001.zip"))
    # an empty class on S3 is a folder marker key: the same error as an empty local folder
    storage.get_client().put_object(Bucket=s3_bucket, Key="folder/train/zebra/", Body=b"")
    os.makedirs(os.path.join(folder, "train", "zebra"))
    try:
        for root in (folder, f"s3://{s3_bucket}/folder"):
            with pytest.raises(DataError, match=r"class folder .*zebra is empty"):
                open_dataset(root, "train")
            sk = open_dataset(root, "train", skip_bad=True)
            assert sk.classes[-1] == "zebra" and [r.rstrip("/").endswith("zebra") for r in sk.skipped.names] == [True]
    finally:
        os.rmdir(os.path.join(folder, "train", "zebra"))


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_loader_and_skip_moto_mock(tmp_path, s3_server, s3_bucket, workers):
    from torchvision import transforms as T

    root, bad = _corrupt_folder(tmp_path)
    uri = f"s3://{s3_bucket}/bad-{workers}"
    pack(root, uri, "train", shard_size=5, verify=False)
    ds = open_dataset(uri, "train", T.ToTensor(), skip_bad=True)
    n, names, dl = _collect(ds, workers)
    assert n == 12 and len(names) == 1 and names[0].endswith("train-00001.zip:dog/dog_01.jpg")
    assert names[0].startswith(uri)


def test_s3_shard_uses_ranged_reads_moto_mock(tmp_path, s3_server, s3_bucket):
    from quantcore.io import storage

    root = make_folder(tmp_path / "big", n=12)
    uri = f"s3://{s3_bucket}/ranged"
    pack(root, uri, "train", shard_size=None)
    total = storage.size(storage.join(uri, "train.zip"))
    ds = ZipShardDataset(uri, "train", block_size=1024)
    assert np.array_equal(pixels(ds, 20), pixels(open_dataset(root, "train"), 20))
    fh = ds._zip(0).fp
    fetched = getattr(fh, "bytes_fetched", None)
    if fetched is not None:
        assert 0 < fetched < total / 2, (fetched, total)


def test_pickle_and_lru_handles(packed):
    import pickle

    from quantcore.data import collate_skip
    from quantcore.data.errors import Skipped

    ds = open_dataset(packed, "train", _to_tensor())
    ds.max_open_shards = 2
    for i in (0, 5, 10, 1):
        ds[i]
    assert sorted(ds._handles) == [0, 2]  # shard 1 was least recently used
    ds2 = pickle.loads(pickle.dumps(ds))  # open handles are not pickled; reopened lazily
    assert ds2._handles == {} and torch.equal(ds2[7][0], ds[7][0])

    # an all-skipped batch is not yielded; its names come with the next batch and are in .skipped
    marks = [Skipped(i, f"s{i}", "bad") for i in range(3)]
    imgs, labels, recs = collate_skip(marks)
    assert imgs is None and len(labels) == 0 and [r.name for r in recs] == ["s0", "s1", "s2"]

    class Half(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return Skipped(i, f"s{i}", "bad") if i < 2 else (torch.zeros(2), i)

    dl = make_loader(Half(), 2)
    out = [(y.tolist(), names) for _, y, names in dl]
    assert out == [([2, 3], ["s0", "s1"]), ([4, 5], [])] and dl.skipped.names == ["s0", "s1"]


# ------------------------------------------------------- issue #7 fault 7: --limit is a stratified sample
def test_class_quotas_proportional_every_class_deterministic():
    from quantcore.data import class_quotas

    assert class_quotas([1000] * 10, 64) == [6, 6, 7, 7, 7, 6, 6, 7, 6, 6]  # golden: same on every machine
    assert class_quotas([9000, 10, 10, 10], 4) == [1, 1, 1, 1]  # each class represented once N >= classes
    assert class_quotas([640, 10, 50], 64) == [58, 1, 5]
    assert class_quotas([3, 0, 5], 8) == [3, 0, 5] and class_quotas([3, 0, 5], 100) == [3, 0, 5]
    few = class_quotas([100] * 10, 4)  # N < classes: which classes is seeded, not "the first N"
    assert sum(few) == 4 and few != [1, 1, 1, 1, 0, 0, 0, 0, 0, 0] and few == class_quotas([100] * 10, 4)
    rng = np.random.default_rng(1)
    for _ in range(500):
        counts = rng.integers(0, 40, rng.integers(1, 25)).tolist()
        total, nonempty = sum(counts), sum(1 for c in counts if c)
        if not total:
            continue
        n = int(rng.integers(1, total + 3))
        q = class_quotas(counts, n, seed=int(rng.integers(0, 5)))
        assert sum(q) == min(n, total) and all(0 <= a <= c for a, c in zip(q, counts))
        if n >= nonempty:
            assert all(a >= 1 for a, c in zip(q, counts) if c)
        elif n < total:
            assert all(abs(a - n * c / total) < 1 for a, c in zip(q, counts))


def test_stratified_subset_of_class_sorted_split():
    from quantcore.data import limit_subset, stratified_subset

    labels = [c for c in range(10) for _ in range(100)]  # class order, like every folder/zip dataset
    idx = stratified_subset(labels, 64)
    assert idx == sorted(set(idx)) and len(idx) == 64
    assert sorted(np.bincount([labels[i] for i in idx]).tolist()) == [6] * 6 + [7] * 4
    assert idx[:6] == [5, 16, 20, 36, 82, 93]  # golden: seeded, independent of machine / worker count
    assert stratified_subset(labels, 64) == idx and stratified_subset(labels, 64, seed=1) != idx
    # data-parallel workers split the same list; their union is the sample whatever the world size
    for world in (1, 3, 4):
        assert sum((shard_indices(idx, r, world) for r in range(world)), []) == idx

    class DS:
        uri, num_classes = "mem://x", 10

        def __init__(self):
            self.labels = labels

        def __len__(self):
            return len(self.labels)

    got, info = limit_subset(DS(), 64)
    assert got == idx and info["selected"] == 64 and info["of"] == 1000 and info["seed"] == 0
    assert info["classes_represented"] == 10 and info["num_classes"] == 10 and "stratified" in info["method"]
    assert limit_subset(DS(), None) == (None, None) and limit_subset(DS(), 0) == (None, None)
    assert limit_subset(DS(), 5000) == (None, None)  # not a subset: the whole split
    with pytest.raises(DataError, match="limit"):
        limit_subset(DS(), -3)


class _AlwaysClass0(torch.nn.Module):
    """'Random weights' stand-in that always answers class 0 (a 1x1 conv so the transform sees 3 channels)."""

    pretrained_cfg = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                      "crop_pct": 1.0, "interpolation": "bilinear", "first_conv": "conv"}

    def __init__(self, k=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.k = k

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.k) + self.conv(x).mean() * 0
        out[:, 0] = 10.0
        return out


def test_limit_evaluates_stratified_sample_and_report_says_subset(tmp_path):
    from quantcore.pipeline import DataSpec, RunOptions, evaluate_variants
    from quantcore.report import build_report, report_markdown

    root = make_folder(tmp_path / "lim", split="val", n=8)  # 3 classes x 8, stored in class order
    opts = RunOptions(batch_size=8, progress=False, device="cpu")
    scores, info, _ = evaluate_variants(_AlwaysClass0(), [], DataSpec(root, "val", limit=6), opts)
    # old code: the first 6 images are all class 0 -> 100 %; a stratified sample has 2 per class -> 33.3 %
    assert scores["fp32"].count == 6 and abs(scores["fp32"].top1 - 100 / 3) < 1e-6
    sub = info["eval_subset"]
    assert (sub["selected"], sub["of"], sub["classes_represented"], sub["num_classes"]) == (6, 24, 3, 3)
    rep = build_report(model="m", recipe=None, scores=scores, reference="fp32", data=info)
    assert json.loads(json.dumps(rep))["data"]["eval_subset"]["selected"] == 6
    md = report_markdown(rep)
    assert "Subset evaluation" in md and "6 of 24 images" in md and "stratified" in md
    full, info_all, _ = evaluate_variants(_AlwaysClass0(), [], DataSpec(root, "val"), opts)
    assert full["fp32"].count == 24 and info_all["eval_subset"] is None
    assert "Subset" not in report_markdown(build_report(model="m", recipe=None, scores=full, reference="fp32",
                                                        data=info_all))


# ------------------------------------------------------- issue #7 fault 8: every PIL mode decoded, never clipped
def _encode(im, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


_G16 = np.array([[0, 1, 128, 129], [257, 32767, 32768, 40000], [65534, 65535, 1000, 50000]], dtype=np.uint16)
_G16_TO_8 = np.floor(_G16.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


def _mode_cases():
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    alpha = np.array([[0, 255], [128, 7]], dtype=np.uint8)
    pal = Image.new("P", (2, 2))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1, 1, 0])
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    pa = Image.merge("PA", (pal, Image.fromarray(alpha)))
    pal_rgb = np.array([[[10, 20, 30], [200, 100, 50]], [[200, 100, 50], [10, 20, 30]]], dtype=np.uint8)
    cmyk = Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0]))
    pgm16 = b"P5 4 3 65535\n" + _G16.astype(">u2").tobytes()
    return {  # name: (encoded bytes or in-memory image, expected mode, expected pixels or None = convert('RGB'))
        "1": (_encode(Image.fromarray(np.array([[0, 1], [1, 0]], bool)), "PNG"), "L",
              np.array([[0, 255], [255, 0]], np.uint8)),
        "L": (_encode(Image.fromarray(_G16_TO_8), "PNG"), "L", _G16_TO_8),
        "LA": (_encode(Image.merge("LA", (Image.fromarray(rgb[..., 0]), Image.fromarray(alpha))), "PNG"), "L",
               rgb[..., 0]),
        "P": (_encode(pal, "PNG"), "RGB", pal_rgb),
        "P+transparency": (_encode(pal_t, "PNG"), "RGB", pal_rgb),
        "PA": (pa, "RGB", pal_rgb),
        "RGB": (_encode(Image.fromarray(rgb), "PNG"), "RGB", rgb),
        "RGBA": (_encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), "RGB", rgb),
        "RGBa": (Image.fromarray(np.dstack([rgb, alpha])).convert("RGBa"), "RGB", None),
        "CMYK-tiff": (_encode(cmyk, "TIFF"), "RGB", np.array([[[255, 255, 255], [0, 255, 255]]], np.uint8)),
        "CMYK-jpeg": (_encode(cmyk.resize((8, 8)), "JPEG", quality=95), "RGB", None),
        "YCbCr": (_encode(Image.fromarray(rgb).convert("YCbCr"), "TIFF"), "RGB", None),
        "LAB": (_encode(Image.fromarray(rgb).convert("LAB"), "TIFF"), "RGB", None),
        "HSV": (Image.fromarray(rgb).convert("HSV"), "RGB", None),
        "I;16-png": (_encode(Image.fromarray(_G16), "PNG"), "L", _G16_TO_8),
        "I;16-tiff": (_encode(Image.fromarray(_G16), "TIFF"), "L", _G16_TO_8),
        "I;16B-tiff": (_encode(Image.fromarray(_G16).convert("I").convert("I;16B"), "TIFF"), "L", _G16_TO_8),
        "I;16L-mem": (Image.frombytes("I;16L", (4, 3), _G16.astype("<u2").tobytes()), "L", _G16_TO_8),
        "I;16N-mem": (Image.frombytes("I;16N", (4, 3), _G16.tobytes()), "L", _G16_TO_8),
        "I-pgm16": (pgm16, "L", _G16_TO_8),  # Netpbm maxval 65535: PIL mode 'I' holding 16-bit samples
    }


@pytest.mark.parametrize("case", list(_mode_cases()))
def test_decode_every_mode_to_8bit(tmp_path, case):
    from quantcore.data import decode_image, to_8bit
    from quantcore.data.transforms import ConvertMode

    src, mode, want = _mode_cases()[case]
    if isinstance(src, bytes):
        img = decode_image(src, f"x/{case}")
        ref = Image.open(io.BytesIO(src))
    else:
        img, ref = to_8bit(src, f"x/{case}"), src
    assert img.mode == mode, (case, img.mode)
    got = np.asarray(img)
    if want is None:  # PIL's own colour conversion (alpha dropped)
        want = np.asarray((ref.convert("RGBA") if ref.mode in ("RGBa",) else ref).convert("RGB"))
    assert got.dtype == np.uint8 and np.array_equal(got, want), (case, got, want)
    # the transform path never clips: a foreign dataset handing over the raw mode gets the same pixels
    rgb = ConvertMode("RGB")(ref if not isinstance(src, bytes) else Image.open(io.BytesIO(src)))
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), np.asarray(img.convert("RGB")))


def test_16bit_png_in_folder_is_scaled_not_clipped(tmp_path):
    from torchvision import transforms as T

    g = np.full((16, 16), 33667, np.uint16)  # the report's file: mean 131 after scaling, 254+ when clipped
    os.makedirs(tmp_path / "val" / "a")
    Image.fromarray(g).save(tmp_path / "val" / "a" / "deep.png")
    ds = FolderDataset(str(tmp_path), "val", T.Compose([eval_transform(None).convert, T.PILToTensor()]))
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and int(x.float().mean().round()) == 131


@pytest.mark.parametrize("kind", ["F", "I32"])
def test_float_and_32bit_images_refused_naming_file(tmp_path, kind):
    arr = (np.arange(12, dtype=np.float32).reshape(3, 4) / 11) if kind == "F" else \
        (np.arange(12, dtype=np.int32).reshape(3, 4) * 100000)
    os.makedirs(tmp_path / "val" / "a")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "val" / "a" / "ok.png")
    Image.fromarray(arr).save(tmp_path / "val" / "a" / "deep.tif")
    ds = FolderDataset(str(tmp_path), "val")
    with pytest.raises(DataError, match="deep.tif") as ei:
        ds.load_image(0)
    assert "deep.tif" in str(ei.value) and ("'F'" in str(ei.value) or "'I'" in str(ei.value))
    assert ei.value.file.endswith("deep.tif")
    with pytest.raises(DataError, match="deep.tif"):  # pack verifies, so it fails before any evaluation
        pack(str(tmp_path), str(tmp_path / "out"), "val")
    skip = FolderDataset(str(tmp_path), "val", skip_bad=True)
    assert [type(skip[i]).__name__ for i in range(2)] == ["Skipped", "tuple"]
    assert skip.skipped.names[0].endswith("deep.tif")


# ------------------------------------------------------- issue #7 fault 9: file:// behaves like the plain path
_ODD_NAMES = {"cl a/x y.jpg": 0, "clb/z%41.jpg": 1, "clb/q#1?.png": 2, "déjà vu/ü 100%.png": 3}


def _odd_folder(root) -> str:
    for name, seed in _ODD_NAMES.items():
        p = os.path.join(root, "val", *name.split("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(_img_bytes(seed, os.path.splitext(name)[1]))
    return str(root)


def _same_dataset(a, b):
    assert (a.classes, a.labels, a.samples) == (b.classes, b.labels, b.samples)
    assert not a.skipped and not b.skipped
    assert all(np.array_equal(pixels(a, i), pixels(b, i)) for i in range(len(a)))


def test_file_uri_folder_identical_to_plain_path(tmp_path):
    from quantcore.io import storage
    from quantcore.io.uri import file_uri

    root = _odd_folder(tmp_path / "data set é")  # the root itself has a space and non-ASCII
    plain = open_dataset(root, "val")
    assert plain.classes == ["cl a", "clb", "déjà vu"] and plain.labels == [0, 1, 1, 2]
    assert plain.samples == ["cl a/x y.jpg", "clb/q#1?.png", "clb/z%41.jpg", "déjà vu/ü 100%.png"]
    encoded = file_uri(root)  # RFC 8089, percent-encoded
    assert "%20" in encoded and " " not in encoded
    for uri in (encoded, "file://" + root, "file://localhost" + root, "file:" + root, encoded + "/"):
        for skip_bad in (False, True):
            _same_dataset(plain, open_dataset(uri, "val", skip_bad=skip_bad))
        assert open_dataset(uri, "val", layout="folder").where(2) == storage.join(encoded, "val", "clb/z%41.jpg")
    # packing from / to file:// gives the same bytes as plain paths; reading the shards back too
    pack(root, str(tmp_path / "p1"), "val", shard_size=3)
    pack(encoded, file_uri(str(tmp_path / "p 2%")), "val", shard_size=3)
    assert tree_bytes(tmp_path / "p1") == tree_bytes(tmp_path / "p 2%")
    for uri in (str(tmp_path / "p 2%"), file_uri(str(tmp_path / "p 2%"))):
        z = open_dataset(uri, "val")
        assert z.layout == "zip" and z.classes == plain.classes and z.samples == plain.samples
        assert all(np.array_equal(pixels(z, i), pixels(plain, i)) for i in range(len(z)))


def test_file_uri_grammar_round_trips():
    from quantcore.io import storage
    from quantcore.io.uri import file_uri, parse_uri

    assert parse_uri("file:///d/a%20b/z%2541.jpg").path == "/d/a b/z%41.jpg"
    assert parse_uri("file:///d/z%41.jpg").path == "/d/zA.jpg"  # %XX is always decoded: '%' is '%25'
    assert parse_uri("file:///d/a b#c?d").path == "/d/a b#c?d"  # raw form: no query, no fragment
    assert parse_uri("file:///d/%C3%A9").path == parse_uri("file:///d/é").path == "/d/é"
    assert parse_uri("FILE://LOCALHOST/d/x").path == parse_uri("file:/d/x").path == "/d/x"
    for name in ("/d/x y%41#?.jpg", "/d/é/ü", "/d/" + os.fsdecode(b"\xff\xfe"), "/d/a+b=c;d,e&f@g$h!'()*~"):
        assert parse_uri(file_uri(name)).path == name
        assert parse_uri(storage.join(file_uri("/d"), name[3:])).path == name
    for bad in ("file://host/d/x", "file:///d/a%00b"):
        with pytest.raises(ValueError, match="file"):
            parse_uri(bad)


def test_s3_keys_with_spaces_and_percent_round_trip_moto_mock(tmp_path, s3_server, s3_bucket):
    from quantcore.io import storage

    keys = ["odd/a b.bin", "odd/z%41.bin", "odd/z%2541.bin", "odd/h#1?x=2.bin", "odd/é ü.bin", "odd/p+q.bin"]
    for i, k in enumerate(keys):
        storage.write_bytes(f"s3://{s3_bucket}/{k}", bytes([i]))
    assert storage.list_uris(f"s3://{s3_bucket}/odd") == sorted(f"s3://{s3_bucket}/{k}" for k in keys)
    for i, k in enumerate(keys):
        assert storage.read_bytes(f"s3://{s3_bucket}/{k}") == bytes([i])
    root = _odd_folder(tmp_path / "src")
    _upload_tree(root, f"s3://{s3_bucket}/odd-ds")
    _same_dataset(open_dataset(root, "val"), open_dataset(f"s3://{s3_bucket}/odd-ds", "val"))
    pack(f"s3://{s3_bucket}/odd-ds", f"s3://{s3_bucket}/odd-packed", "val", shard_size=3)
    pack(root, str(tmp_path / "local-packed"), "val", shard_size=3)
    assert storage.read_bytes(f"s3://{s3_bucket}/odd-packed/val-00001.zip") == \
        (tmp_path / "local-packed" / "val-00001.zip").read_bytes()


def test_pack_output_reads_back_whatever_the_class_names(tmp_path):
    """Class folders starting with '#' or a space, or holding tabs-free odd characters, survive a pack:
    the map's tab-separated lines are samples, taken as written (a '#' line without a tab is a comment)."""
    classes = ("#first", " lead", "tail ", "b%20+ü")
    root = make_folder(tmp_path / "src", classes=classes, n=3)
    direct = open_dataset(root, "train")
    pack(root, str(tmp_path / "out"), "train", shard_size=5)
    ds = open_dataset(str(tmp_path / "out"), "train")
    assert ds.classes == direct.classes and len(ds) == len(direct) == 12 and not ds.skipped
    assert sorted(zip(ds.samples, ds.labels)) == sorted(zip(direct.samples, direct.labels))
    raw = {direct.samples[i]: direct.read_raw(i) for i in range(len(direct))}
    for i in range(len(ds)):
        assert ds.read_raw(i) == raw[ds.samples[i]]
    # a hand-written map keeps its comments and whitespace-separated lines
    out = tmp_path / "hand"
    out.mkdir()
    with zipfile.ZipFile(out / "val.zip", "w") as zf:
        zf.writestr("a.png", _img_bytes(1, ".png"))
    (out / "val_map.txt").write_text("# path label\n  a.png   0\n")
    hand = open_dataset(str(out), "val")
    assert hand.samples == ["a.png"] and hand.labels == [0]


def test_a_pack_that_fails_or_overwrites_another_never_reads_as_a_dataset(tmp_path):
    """A failed pack leaves its split marked incomplete (refused, not read in part); shards or maps of
    another pack under an index that recorded other ones are refused by their size / sample count."""
    root, _ = _corrupt_folder(tmp_path)  # dog_01.jpg cannot be decoded: the pack fails part-way
    dst = str(tmp_path / "out")
    with pytest.raises(DataError):
        pack(root, dst, "train", shard_size=5)
    assert os.path.exists(os.path.join(dst, "train-00000.zip"))  # a shard was written before the failure
    with pytest.raises(DataError, match="'train' was not packed completely"):
        open_dataset(dst, "train")
    # a good pack first, then a failing one over it: the old entry is not read with the new shards
    good = make_folder(tmp_path / "good", classes=("x", "y"), n=6)
    dst2 = str(tmp_path / "out2")
    pack(good, dst2, "train", shard_size=4)
    assert len(open_dataset(dst2, "train")) == 12
    with pytest.raises(DataError):
        pack(root, dst2, "train", shard_size=4)
    with pytest.raises(DataError, match="not packed completely"):
        open_dataset(dst2, "train")
    # a shard replaced behind a complete index (another pack's file copied in)
    pack(good, dst2, "train", shard_size=4)
    other = str(tmp_path / "other")
    pack(make_folder(tmp_path / "o", classes=("x", "y"), n=6, seed=5), other, "train", shard_size=4)
    import shutil

    shutil.copy(os.path.join(other, "train-00001.zip"), os.path.join(dst2, "train-00001.zip"))
    with pytest.raises(DataError, match=r"train-00001\.zip is \d+ bytes, index\.json recorded \d+"):
        open_dataset(dst2, "train")
    pack(good, dst2, "train", shard_size=4)
    with open(os.path.join(dst2, "train-00002_map.txt"), "a") as f:
        f.write("x/extra.png\t0\n")
    with pytest.raises(DataError, match=r"lists 5 samples, index\.json recorded 4"):
        open_dataset(dst2, "train")


def test_another_packs_maps_or_members_are_refused_even_at_equal_sizes(tmp_path):
    """Same member names and zip bytes, other labels (a map copied from another pack) or other image
    content at equal sizes: refused by the digests index.json records, not read with wrong labels."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, 28, 28), dtype=np.uint8)
    y = np.array([0, 1] * 4)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    pack_arrays(x, y, a, "test", ["cat", "dog"], shard_size=4)
    pack_arrays(x, 1 - y, b, "test", ["dog", "cat"], shard_size=4)
    assert open_dataset(a, "test").labels == y.tolist()
    import shutil

    shutil.copy(os.path.join(b, "test-00000_map.txt"), os.path.join(a, "test-00000_map.txt"))
    with pytest.raises(DataError, match=r"test-00000_map\.txt differs from the one index\.json recorded"):
        open_dataset(a, "test")
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    pack_arrays(x, y, c, "test", ["cat", "dog"], shard_size=4)
    x2 = rng.integers(0, 255, (8, 28, 28), dtype=np.uint8)  # random pixels: PNGs of the same size
    pack_arrays(x2, y, d, "test", ["cat", "dog"], shard_size=4)
    # (noise does not compress: the PNGs, and so the shards, have the same sizes)
    assert os.path.getsize(os.path.join(c, "test-00001.zip")) == os.path.getsize(os.path.join(d, "test-00001.zip"))
    shutil.copy(os.path.join(d, "test-00001.zip"), os.path.join(c, "test-00001.zip"))
    with pytest.raises(DataError, match=r"test-00001\.zip holds other members"):
        open_dataset(c, "test")
    # a split named like another split's shard would replace it
    with pytest.raises(DataError, match=r"split name 'test-00001' ends in -<digits>"):
        pack_arrays(x[:2], y[:2], c, "test-00001", ["cat", "dog"], shard_size=None)
    with pytest.raises(DataError, match="whole class indices"):
        pack_arrays(x[:2], np.array([0.7, 1.7]), str(tmp_path / "e"), "test", ["cat", "dog"])


def test_map_lines_end_at_newline_only_and_a_byte_order_mark_is_not_a_path(tmp_path):
    """Names with other Unicode line breaks (\\u2028, \\x85, \\x1e, \\x0c) read back after a pack; a map
    written by a Windows editor (BOM, CRLF) reads as well."""
    classes = ("x\u2028y", "p\x85q", "r\x1es", "b\x0cc")
    root = make_folder(tmp_path / "src", classes=classes, n=2)
    pack(root, str(tmp_path / "out"), "train", shard_size=3)
    ds = open_dataset(str(tmp_path / "out"), "train")
    assert ds.classes == sorted(classes) and len(ds) == 8 and not ds.skipped
    out = tmp_path / "hand"
    out.mkdir()
    with zipfile.ZipFile(out / "val.zip", "w") as zf:
        zf.writestr(" lead/a.png", _img_bytes(1, ".png"))
        zf.writestr("b.png", _img_bytes(2, ".png"))
    (out / "val_map.txt").write_bytes("\ufeff lead/a.png\t0\r\nb.png\t1\r\n".encode("utf-8"))
    hand = open_dataset(str(out), "val")
    assert hand.samples == [" lead/a.png", "b.png"] and hand.labels == [0, 1]


def test_pack_skip_bad_skips_a_name_the_map_cannot_hold(tmp_path):
    root = make_folder(tmp_path / "src", classes=("a", "b"), n=2)
    bad = os.path.join(root, "train", "a", "t\tab.png")
    with open(bad, "wb") as f:
        f.write(_img_bytes(9, ".png"))
    with pytest.raises(DataError, match="a tab or line break"):
        pack(root, str(tmp_path / "out"), "train")
    ent = pack(root, str(tmp_path / "out"), "train", skip_bad=True)
    assert ent["count"] == 4 and [s["name"] for s in ent["skipped"]] == [bad]
    assert len(open_dataset(str(tmp_path / "out"), "train")) == 4


def test_a_hand_made_zip_with_two_members_of_one_name_is_refused(tmp_path):
    """zipfile reads the last of same-named members (zip -u, 'a' mode re-adding an image): the first
    copy was never read nor listed. The shard is refused, naming the member."""
    import warnings
    import zipfile

    def png(v):
        b = io.BytesIO()
        Image.fromarray(np.full((8, 8), v, np.uint8)).save(b, "PNG")
        return b.getvalue()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile's "Duplicate name" warning
        with zipfile.ZipFile(tmp_path / "val.zip", "w") as z:
            z.writestr("c0/a.png", png(10))
            z.writestr("c0/a.png", png(200))
            z.writestr("c1/b.png", png(50))
    (tmp_path / "val_map.txt").write_text("c0/a.png\t0\nc1/b.png\t1\n")
    for skip_bad in (False, True):
        with pytest.raises(DataError, match=r"val\.zip holds 1 member\(s\) under a name[\s\S]*'c0/a.png'"):
            open_dataset(str(tmp_path), "val", skip_bad=skip_bad)


@pytest.mark.parametrize("where", ["local", "s3_moto_mock"])
def test_shards_packed_into_their_own_source_folder_are_an_ambiguous_layout(folder, where, request):
    """`pack SRC SRC`: auto-detection took the shards and hid the folder (images added later were
    silently not read) and refused the unpacked splits ('no zip shards for split train'). On S3 the
    ambiguity was not checked at all: the shards were read silently."""
    make_folder(folder, "val", n=2, seed=1)
    root = folder
    if where != "local":
        root = f"s3://{request.getfixturevalue('s3_bucket')}/ds"
        _upload_tree(folder, root)
    pack(root, root, "val")
    with pytest.raises(DataError, match=r"both zip files for split 'val' and a val/ folder[\s\S]*--layout"):
        open_dataset(root, "val")
    assert len(open_dataset(root, "val", layout="folder")) == len(open_dataset(root, "val", layout="zip"))
    assert detect_layout(root, "train") == "folder"  # index.json does not list train: its folder is read
    assert len(open_dataset(root, "train")) == 12


def test_an_s3_key_with_an_empty_path_segment_is_named_not_read_as_another_mock(s3_client, s3_bucket):
    """'val/dog//x.png' was read as 'val/dog/x.png' (another object, read twice) or as a missing file."""
    def png(v):
        b = io.BytesIO()
        Image.fromarray(np.full((8, 8), v, np.uint8)).save(b, "PNG")
        return b.getvalue()

    for key, v in (("d/val/dog/x.png", 10), ("d/val/dog//x.png", 200), ("d/val/cat/y.png", 50)):
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=png(v))
    uri = f"s3://{s3_bucket}/d"
    with pytest.raises(DataError, match=r"dog//x\.png' has an empty path segment"):
        open_dataset(uri, "val", layout="folder")
    ds = open_dataset(uri, "val", layout="folder", skip_bad=True)
    assert ds.samples == ["cat/y.png", "dog/x.png"]
    assert [int(np.asarray(ds.load_image(i))[0, 0]) for i in range(len(ds))] == [50, 10]
    assert [r["name"] for r in ds.skipped.as_list()] == [f"{uri}/val/dog//x.png"]


def test_s3_class_folder_holding_no_images_is_named_not_dropped_moto_mock(tmp_path, s3_server, s3_bucket):
    """On S3 a folder exists only through its keys. A class folder holding only files that are not
    images (a HEIC, a README) vanished there, and every later class's label moved down by one; a
    local folder names it as empty. Both now say the same."""
    root = make_folder(tmp_path / "src", classes=("ant", "bee", "cat"), n=2)
    for f in os.listdir(os.path.join(root, "train", "bee")):
        os.remove(os.path.join(root, "train", "bee", f))
    with open(os.path.join(root, "train", "bee", "IMG_0001.HEIC"), "wb") as f:
        f.write(b"not decodable here")
    uri = f"s3://{s3_bucket}/heic-ds"
    _upload_tree(root, uri)  # no folder markers, as `aws s3 sync` uploads
    for src in (root, uri):
        with pytest.raises(DataError, match=r"class folder .*bee is empty"):
            open_dataset(src, "train")
        ds = open_dataset(src, "train", skip_bad=True)
        assert ds.classes == ["ant", "bee", "cat"] and ds.labels == [0, 0, 2, 2], (src, ds.classes)


def test_folders_named_by_duplicated_model_labels_are_refused():
    """An HF id2label naming one label twice (ImageNet-1k's 'crane' is 134 and 517): every image of the
    folder 'crane' was read twice, once under each label, silently."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(tmp, classes=("cock", "crane", "goose"), n=2)
        with pytest.raises(DataError, match=r"'crane': \[1, 3\]"):
            open_dataset(root, "train", label_names=["cock", "crane", "goose", "crane"])
        ds = open_dataset(root, "train", label_names=["goose", "cock", "crane"])  # unique: the model's order
        assert ds.classes == ["goose", "cock", "crane"] and len(ds) == 6


def test_a_ycbcr_image_read_by_a_one_channel_model_is_its_y_band(tmp_path):
    """A YCbCr TIFF went through RGB before a 1-channel model's 'L': up to 3 levels (on 47 % of the
    values) from PIL's convert('L'), which takes the Y band (timm's input_img_mode='L' loader)."""
    from torchvision import transforms as T

    from quantcore.data.decode import pil_to_tensor
    from quantcore.data.transforms import ConvertMode

    rgb = np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    ycc = Image.fromarray(rgb).convert("YCbCr")
    buf = io.BytesIO()
    ycc.save(buf, "TIFF")
    data = buf.getvalue()
    want = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert np.abs(np.asarray(Image.open(io.BytesIO(data)).convert("RGB").convert("L")).astype(int) - want).max() > 0
    os.makedirs(tmp_path / "val" / "a")
    (tmp_path / "val" / "a" / "x.tif").write_bytes(data)
    ds = FolderDataset(str(tmp_path), "val", T.Compose([ConvertMode("L"), T.PILToTensor()]))
    assert np.array_equal(ds[0][0][0].numpy(), want)  # the dataset path
    assert np.array_equal(np.asarray(ConvertMode("L")(Image.open(io.BytesIO(data)))), want)  # a foreign dataset's image
    assert np.array_equal(pil_to_tensor(data, "x.tif", "L")[0].numpy(), want)  # the batched path
    assert np.asarray(ConvertMode("RGB")(Image.open(io.BytesIO(data)))).shape == (24, 24, 3)  # RGB models: unchanged
