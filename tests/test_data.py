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
from PIL import Image

from quantcore.data import (
    DataError,
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
    assert not os.path.exists(tmp_path / "out" / "index.json")
    ent = pack(root, str(tmp_path / "out"), "train", shard_size=5, skip_bad=True)
    assert ent["count"] == 12 and [s["name"] for s in ent["skipped"]] == [bad]


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
    assert all(np.array_equal(pixels(z, i), pixels(src, i)) for i in range(len(src)))

    # folder layout directly on S3, and packing S3 -> S3
    _upload_tree(folder, f"s3://{s3_bucket}/folder")
    f = open_dataset(f"s3://{s3_bucket}/folder", "train")
    assert f.layout == "folder" and f.samples == src.samples and f.labels == src.labels
    assert np.array_equal(pixels(f, 4), pixels(src, 4))
    pack(f"s3://{s3_bucket}/folder", f"s3://{s3_bucket}/from-s3", "train", shard_size=5)
    assert storage.read_bytes(f"s3://{s3_bucket}/from-s3/train-00001.zip") == \
        storage.read_bytes(storage.join(dst, "train-00001.zip"))


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
