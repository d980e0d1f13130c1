"""JPEG through torchvision.io + the model's transform on tensors (quantcore.data.decode) against the PIL
path (quantcore.data.base.decode_image + the model's PIL transform), the reference.

Checked on real images: generated ImageNet-like 500x375 photos (bench.loader's generator) and Fashion-MNIST
re-encoded as 224x224 JPEGs. Tolerance (stated in quantcore.data.decode): decoded uint8 pixels identical;
normalized tensors within MAX_LEVEL_DIFF levels of 255 per value, MEAN_ABS_TOL in mean, FRAC_DIFFER_TOL of
values differing; top-1 of a trained CNN agreeing on >= 99%. Every bad input gives the PIL path's error or
skip. The batched path runs here with device='cpu'; the nvJPEG (cuda) test runs only where a GPU is.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.decode import fmnist_agreement, fmnist_jpegs, photo_jpegs
from quantcore.data import DataError, FolderDataset, decode_image, eval_transform, make_loader
from quantcore.data.decode import (FRAC_DIFFER_TOL, MAX_LEVEL_DIFF, MEAN_ABS_TOL, BatchDecoder, Encoded,
                                   as_uint8_tensor, decode_to_tensor, device_loader, tensor_plan)
from quantcore.data.transforms import describe_transform

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return photo_jpegs(10, seed=11)


def _reencode(data: bytes, mode: str | None = None, **kw) -> bytes:
    im = Image.open(io.BytesIO(data))
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", **{"quality": 88, **kw})
    return buf.getvalue()


@pytest.fixture(scope="module")
def variants(photos) -> dict[str, bytes]:
    """Real JPEG flavours: baseline 4:2:0, 4:4:4, progressive, grayscale, Fashion-MNIST at 224x224."""
    p = photos[0]
    return {"baseline": p, "444": _reencode(photos[1], subsampling=0),
            "progressive": _reencode(photos[2], progressive=True),
            "gray": _reencode(photos[3], "L"), "gray_progressive": _reencode(photos[4], "L", progressive=True),
            **({"fmnist": fmnist_jpegs(1)[0][0]} if FMNIST.is_file() else {})}


@pytest.fixture(scope="module")
def models():
    import timm

    return {"bilinear": timm.create_model("resnet50.tv_in1k", pretrained=False),
            "bicubic": timm.create_model("vit_small_patch16_224", pretrained=False),
            "gray": timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=1, img_size=28, patch_size=4)}


def _levels(a: torch.Tensor, b: torch.Tensor, std) -> torch.Tensor:
    """|a - b| in levels of 255 (undoing the normalization)."""
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (a - b).abs() * s * 255


def assert_within_tolerance(new: torch.Tensor, ref: torch.Tensor, std) -> None:
    assert new.shape == ref.shape and new.dtype == ref.dtype == torch.float32
    lv = _levels(new, ref, std)
    assert float(lv.max()) <= MAX_LEVEL_DIFF + 1e-3, float(lv.max())
    d = (new - ref).abs()
    assert float(d.mean()) <= MEAN_ABS_TOL, float(d.mean())
    assert float((d > 1e-6).float().mean()) <= FRAC_DIFFER_TOL


# ------------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("mode", ["RGB", "L", None])
def test_decoded_pixels_are_bit_identical_to_pil(variants, mode):
    for name, b in variants.items():
        x, used = decode_to_tensor(b, name, mode)
        assert used == "torchvision", name
        ref = decode_image(b, name)
        ref = ref.convert(mode) if mode else ref
        ref_t = torch.from_numpy(np.asarray(ref).copy())
        ref_t = ref_t[None] if ref_t.ndim == 2 else ref_t.permute(2, 0, 1)
        assert x.dtype == torch.uint8 and torch.equal(x, ref_t), (name, mode)


@pytest.mark.parametrize("which", ["bilinear", "bicubic", "gray"])
def test_transform_agrees_with_pil_path_within_stated_tolerance(models, photos, variants, which):
    t_new, t_pil = eval_transform(models[which]), eval_transform(models[which], decoder="pil")
    assert t_new.config["decoder"]["name"] == "torchvision" and t_pil.config["decoder"]["name"] == "pil"
    blobs = photos + list(variants.values())
    for i, b in enumerate(blobs):
        assert_within_tolerance(t_new.from_bytes(b, f"#{i}"), t_pil.from_bytes(b, f"#{i}"), t_pil.config["std"])
    assert t_new.counts == {"torchvision": len(blobs)} and t_pil.counts == {"pil": len(blobs)}
    shape = tuple(t_pil.config["input_size"])
    assert tuple(t_new.from_bytes(photos[0], "x").shape) == shape


def test_the_tolerance_check_can_fail(models, photos):
    """Negative control: a bilinear tensor path against a bicubic PIL path is caught by the same check."""
    t_new = eval_transform(models["bilinear"])
    t_other = eval_transform(models["bilinear"], overrides={"interpolation": "bicubic"}, decoder="pil")
    with pytest.raises(AssertionError):
        for b in photos[:3]:
            assert_within_tolerance(t_new.from_bytes(b, "x"), t_other.from_bytes(b, "x"), t_other.config["std"])


def test_torchvision_weights_preset_runs_on_tensors(photos):
    import torchvision

    w = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    t_new, t_pil = eval_transform(None, weights=w), eval_transform(None, weights=w, decoder="pil")
    assert t_new.config["decoder"]["tensor_steps"][0].startswith("resize([232], bilinear")
    for b in photos[:3]:
        assert_within_tolerance(t_new.from_bytes(b, "x"), t_pil.from_bytes(b, "x"), t_pil.config["std"])


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST not installed")
def test_top1_of_a_trained_model_agrees_on_fashion_mnist_jpegs():
    r = fmnist_agreement(n_test=300, n_train=6000)
    assert r["acc_pil"] > 0.7, r  # a real model: the agreement below means something
    assert r["agree"] >= 0.99, r
    assert r["max_levels"] <= MAX_LEVEL_DIFF + 1e-3 and r["decoders"] == {"torchvision": 300}, r


# ------------------------------------------------------------------------------------------------ path choice
def test_choice_of_path_is_recorded(models):
    d = describe_transform(models["bilinear"])
    assert d["decoder"]["name"] == "torchvision" and d["decoder"]["asked"] == "auto"
    assert d["decoder"]["tensor_steps"] == ["resize([256], bilinear, antialias)", "center_crop([224, 224])",
                                            "to_float/255", "normalize"]
    assert describe_transform(models["bilinear"], decoder="pil")["decoder"]["name"] == "pil"
    # a step without an exact tensor counterpart keeps the whole transform on PIL, and says why
    t = eval_transform(models["bilinear"], overrides={"interpolation": "nearest"})
    assert t.plan is None and t.config["decoder"]["name"] == "pil" and "nearest" in t.config["decoder"]["reason"]
    from torchvision import transforms as T

    plan, why = tensor_plan(T.Compose([T.Lambda(lambda x: x), T.ToTensor()]))
    assert plan is None and "Lambda" in why
    with pytest.raises(ValueError, match="auto"):
        eval_transform(models["bilinear"], decoder="bogus")


# ------------------------------------------------------------------------------------------------ bad input
def _cmyk(photo: bytes) -> bytes:
    return _reencode(photo, "CMYK")


def _tolerated_corruption(photo: bytes) -> bytes:
    """Junk bytes inserted into the entropy-coded data, the file cut back to its length (EOI lost): torchvision
    refuses it ("incomplete or truncated"), Pillow decodes it (libjpeg warnings only); found deterministically."""
    from torchvision.io import decode_jpeg

    rng = np.random.default_rng(0)
    for _ in range(100):
        pos, k = int(rng.integers(2000, len(photo) - 2000)), int(rng.integers(1, 30))
        d = (photo[:pos] + bytes(rng.integers(0, 256, k).astype(np.uint8)) + photo[pos:])[:len(photo)]
        try:
            Image.open(io.BytesIO(d)).load()
        except Exception:
            continue
        try:
            decode_jpeg(as_uint8_tensor(d))
        except RuntimeError:
            return d
    pytest.fail("no tolerated corruption found")


BAD = {
    "truncated.jpg": lambda p: p[: len(p) // 2],
    "truncated_header.jpg": lambda p: p[:300],
    "garbage_after_soi.jpg": lambda p: b"\xff\xd8\xff" + b"x" * 500,
    "empty.jpg": lambda p: b"",
    "not_an_image.jpg": lambda p: b"hello, I am text" * 50,
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_jpeg_gives_the_pil_paths_error_naming_the_file(models, photos, name):
    data = BAD[name](photos[0])
    where = f"s3://bucket/val/cls/{name}"
    errs = []
    for decoder in ("pil", "auto"):
        with pytest.raises(DataError) as ei:
            eval_transform(models["bilinear"], decoder=decoder).from_bytes(data, where)
        errs.append(ei.value)
    same = [re.sub(r"0x[0-9a-f]+", "0x?", str(e)) for e in errs]  # PIL names the BytesIO object by address
    assert same[0] == same[1] and where in same[1] and errs[1].file == where
    with pytest.raises(DataError, match=name):
        BatchDecoder(eval_transform(models["bilinear"]))([Encoded(as_uint8_tensor(photos[1]), "ok.jpg"),
                                                          Encoded(as_uint8_tensor(data), where)])


@pytest.mark.parametrize("which", ["bilinear", "gray"])
def test_files_torchvision_refuses_but_pil_decodes_fall_back_to_pil(models, photos, which):
    """CMYK JPEGs and corrupt-but-tolerated JPEGs: PIL decodes them, so the result is the PIL path's, exactly."""
    t_new, t_pil = eval_transform(models[which]), eval_transform(models[which], decoder="pil")
    for data in (_cmyk(photos[0]), _tolerated_corruption(photos[1])):
        assert torch.equal(t_new.from_bytes(data, "x.jpg"), t_pil.from_bytes(data, "x.jpg"))
        x, used = decode_to_tensor(data, "x.jpg", t_pil.config["mode"])
        assert used == "pil"
    assert t_new.counts == {"pil": 2}
    bd = BatchDecoder(t_new)
    out, keep, skipped = bd([Encoded(as_uint8_tensor(d), f"{i}.jpg")
                             for i, d in enumerate((photos[2], _cmyk(photos[0]), _tolerated_corruption(photos[1])))])
    assert keep == [0, 1, 2] and not skipped and bd.counts == {"torchvision": 1, "pil": 2}
    assert_within_tolerance(out[1], t_pil.from_bytes(_cmyk(photos[0]), "x"), t_pil.config["std"])


def test_exif_orientation_is_not_applied_on_either_path(models, photos):
    im = Image.open(io.BytesIO(photos[0]))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6
    x, used = decode_to_tensor(data, "x", "RGB")
    assert used == "torchvision" and tuple(x.shape) == (3, 375, 500)  # stored orientation (landscape)
    t_new, t_pil = eval_transform(models["bilinear"]), eval_transform(models["bilinear"], decoder="pil")
    assert_within_tolerance(t_new.from_bytes(data, "x"), t_pil.from_bytes(data, "x"), t_pil.config["std"])


def test_channels_follow_the_model(models, variants):
    gray_model, rgb_model = eval_transform(models["gray"]), eval_transform(models["bilinear"])
    assert tuple(gray_model.from_bytes(variants["baseline"], "x").shape) == (1, 28, 28)  # RGB JPEG -> 'L'
    y = rgb_model.from_bytes(variants["gray"], "x")  # grayscale JPEG -> 3 equal channels (before normalize)
    s = torch.tensor(rgb_model.config["std"]).view(-1, 1, 1)
    m = torch.tensor(rgb_model.config["mean"]).view(-1, 1, 1)
    raw = y * s + m
    assert y.shape[0] == 3 and torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[0], raw[2], atol=1e-5)


# ------------------------------------------------------------------------------------------------ datasets
@pytest.fixture()
def folder(tmp_path, photos):
    """val/<class>/: good JPEGs, a PNG, a CMYK JPEG, and two bad JPEGs (truncated, garbage)."""
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / "val" / c).mkdir(parents=True)
    files = {"a/0.jpg": photos[0], "a/1.jpg": photos[1], "a/2_trunc.jpg": photos[2][: len(photos[2]) // 2],
             "a/3_cmyk.jpg": _cmyk(photos[3]), "b/4.jpg": photos[4], "b/5_garbage.jpg": b"\xff\xd8\xffjunk" * 40,
             "b/6.jpg": photos[5]}
    for rel, data in files.items():
        (root / "val" / rel).write_bytes(data)
    Image.open(io.BytesIO(photos[6])).save(root / "val" / "b" / "7.png")
    return root


def _run_loader(ds, batch_size=3):
    xs, ys, names = [], [], []
    loader = make_loader(ds, batch_size)
    for x, y, skipped in loader:
        xs.append(x)
        ys.append(y)
        names += skipped
    return torch.cat(xs), torch.cat(ys), names, loader.skipped.names


def test_dataset_with_skip_bad_lists_the_same_files_on_every_path(models, folder):
    m = models["bilinear"]
    ref = _run_loader(FolderDataset(str(folder), "val", eval_transform(m, decoder="pil"), skip_bad=True))
    t_new = eval_transform(m)
    new = _run_loader(FolderDataset(str(folder), "val", t_new, skip_bad=True))
    bad = [str(folder / "val" / "a" / "2_trunc.jpg"), str(folder / "val" / "b" / "5_garbage.jpg")]
    assert sorted(ref[2]) == sorted(new[2]) == sorted(ref[3]) == sorted(new[3]) == sorted(bad)
    assert torch.equal(ref[1], new[1])
    std = eval_transform(m).config["std"]
    for a, b in zip(new[0], ref[0]):
        assert_within_tolerance(a, b, std)
    assert t_new.counts == {"torchvision": 4, "pil": 2}  # PIL for the CMYK JPEG and the PNG
    # without skip_bad: the first bad file raises, named, on both paths
    for decoder in ("pil", "auto"):
        ds = FolderDataset(str(folder), "val", eval_transform(m, decoder=decoder))
        with pytest.raises(DataError, match="2_trunc.jpg"):
            ds[2]


@pytest.mark.parametrize("workers", [0, 1])
def test_device_loader_on_cpu_matches_and_skips_the_same(models, folder, workers):
    m = models["bilinear"]
    ref = _run_loader(FolderDataset(str(folder), "val", eval_transform(m, decoder="pil"), skip_bad=True))
    ds = FolderDataset(str(folder), "val", eval_transform(m), skip_bad=True)
    loader = device_loader(ds, 3, device="cpu", num_workers=workers)
    xs, ys, names = [], [], []
    for x, y, skipped in loader:
        assert x.device.type == "cpu" and x.shape[0] == y.shape[0]
        xs.append(x)
        ys.append(y)
        names += skipped
    assert sorted(names) == sorted(loader.skipped.names) == sorted(ref[3])
    assert torch.equal(torch.cat(ys), ref[1])
    std = eval_transform(m).config["std"]
    for a, b in zip(torch.cat(xs), ref[0]):
        assert_within_tolerance(a, b, std)
    assert ds.transform.plan is not None and ds.skipped is loader.skipped  # the dataset itself is unchanged
    ds_strict = FolderDataset(str(folder), "val", eval_transform(m))
    with pytest.raises(DataError, match="2_trunc.jpg"):
        list(device_loader(ds_strict, 3, device="cpu"))


def test_a_model_of_neither_1_nor_3_channels_is_refused_on_the_batched_path_too(folder):
    """The per-sample path refuses a 4-channel model (UserError naming the channel count); the batched
    path (BatchDecoder / device_loader) ran on and failed in Normalize with a raw RuntimeError."""
    from quantcore.errors import UserError

    t = eval_transform(None, overrides={"resize_size": 40, "crop_size": 32, "in_chans": 4, "mean": [0.5] * 4,
                                        "std": [0.5] * 4})
    assert t.plan is not None  # the batched path applies
    ds = FolderDataset(str(folder), "val", t, skip_bad=True)
    with pytest.raises(UserError, match="takes 4-channel input"):
        ds[0]
    with pytest.raises(UserError, match="takes 4-channel input"):
        BatchDecoder(t)
    with pytest.raises(UserError, match="takes 4-channel input"):
        list(device_loader(ds, 3, device="cpu"))


def test_batched_cpu_decode_equals_per_sample_path(models, photos, variants):
    t = eval_transform(models["bicubic"])
    blobs = photos[:6] + [variants["gray"], variants["progressive"]]
    out, keep, skipped = BatchDecoder(t, "cpu")([Encoded(as_uint8_tensor(b), f"#{i}") for i, b in enumerate(blobs)])
    assert keep == list(range(len(blobs))) and not skipped
    assert torch.equal(out, torch.stack([t.from_bytes(b, "x") for b in blobs]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: nvJPEG path untested here")
def test_nvjpeg_batch_agrees_with_pil_path(models, photos):
    """nvJPEG uses its own IDCT/upsampling: a looser bound than the CPU path's (measured on an H200:
    max 12 levels, mean 0.7 level; quantcore.data.decode states it)."""
    t_new, t_pil = eval_transform(models["bilinear"]), eval_transform(models["bilinear"], decoder="pil")
    out, keep, _ = BatchDecoder(t_new, "cuda")([Encoded(as_uint8_tensor(b), f"#{i}") for i, b in enumerate(photos)])
    assert out.device.type == "cuda" and keep == list(range(len(photos)))
    ref = torch.stack([t_pil.from_bytes(b, "x") for b in photos])
    lv = _levels(out.cpu(), ref, t_pil.config["std"])
    assert float(lv.mean()) < 1.0 and float(lv.max()) <= 16


def test_pipeline_evaluation_through_batched_decode_matches_the_worker_path(models, folder, monkeypatch):
    """What a GPU job runs (pipeline._loader -> device_loader), here with device='cpu': same scores,
    same skipped files as the per-sample worker path."""
    from quantcore import pipeline
    from quantcore.pipeline import DataSpec, RunOptions, evaluate_variants

    import timm

    torch.manual_seed(0)
    m = timm.create_model("resnet18.tv_in1k", pretrained=False, num_classes=2).eval()
    opts = RunOptions(batch_size=3, progress=False, device="cpu")
    spec = DataSpec(str(folder), "val", skip_bad=True)
    ref_scores, _, ref_skipped = evaluate_variants(m, [], spec, opts)
    used = []
    real = pipeline._loader

    def batched(*args, **kw):
        loader = real(*args, **dict(kw, batched_decode=True))
        used.append(type(loader).__name__)
        return loader

    monkeypatch.setattr(pipeline, "_loader", batched)
    scores, _, skipped = evaluate_variants(m, [], spec, opts)
    assert used == ["DeviceDecodeLoader"]
    assert sorted(r["name"] for r in skipped) == sorted(r["name"] for r in ref_skipped) and len(skipped) == 2
    assert scores["fp32"].count == ref_scores["fp32"].count == 6
    assert scores["fp32"].top1 == ref_scores["fp32"].top1
