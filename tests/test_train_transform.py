"""The training transform (QAT): the model's own data config through timm's training pipeline."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from quantcore.config import AugmentConfig
from quantcore.data import TrainTransform, eval_transform, train_transform
from quantcore.data.transforms import EvalTransform
from quantcore.errors import UserError


@pytest.fixture(scope="module")
def vit_s():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)


@pytest.fixture(scope="module")
def fmnist_vit():
    from quantcore.models import vit_fmnist

    return vit_fmnist()


@pytest.fixture(scope="module")
def resnet18():
    tv = pytest.importorskip("torchvision")
    return tv.models.resnet18(num_classes=10)


def _rgb(h=300, w=400, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _gray(h=28, w=28, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")


def _seeded(t, img, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return t(img)


def _normalized_range(x: torch.Tensor, mean, std) -> None:
    for c, (m, s) in enumerate(zip(mean, std)):
        lo, hi = (0 - m) / s, (1 - m) / s
        assert x[c].min() >= lo - 1e-5 and x[c].max() <= hi + 1e-5


@pytest.mark.parametrize("which,shape,mode", [("vit_s", (3, 224, 224), "RGB"), ("fmnist_vit", (1, 28, 28), "L"),
                                              ("resnet18", (3, 224, 224), "RGB")])
def test_output_shape_dtype_normalization(request, which, shape, mode):
    model = request.getfixturevalue(which)
    t = train_transform(model, AugmentConfig())
    assert isinstance(t, TrainTransform)
    ev = eval_transform(model)
    cfg = t.config
    # the same resolution as the eval transform
    for key in ("input_size", "mean", "std", "interpolation", "mode"):
        assert cfg[key] == ev.config[key], key
    assert cfg["mode"] == mode and cfg["augment"]["kind"] == "model"
    # any source image (colour or not, any size) comes out as the model's input
    for img in (_rgb(), _gray(64, 48)):
        x = _seeded(t, img, 0)
        assert x.dtype == torch.float32 and tuple(x.shape) == shape
        _normalized_range(x, cfg["mean"], cfg["std"])
    assert len(cfg["mean"]) == len(cfg["std"]) == shape[0]


def test_fmnist_mean_std_one_channel(fmnist_vit):
    t = train_transform(fmnist_vit, {"hflip": 0.0, "scale": (1.0, 1.0), "ratio": (1.0, 1.0)})
    img = _gray()
    x = _seeded(t, img, 3)
    ref = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0) - 0.2860) / 0.3530
    assert torch.allclose(x[0], ref, atol=1e-6)


def test_reseeding_gives_identical_output_and_seeds_differ(vit_s):
    aug = AugmentConfig(auto_augment="rand-m9-mstd0.5", re_prob=0.5)
    t = train_transform(vit_s, aug)
    img = _rgb()
    a, b = _seeded(t, img, 11), _seeded(t, img, 11)
    assert torch.equal(a, b)
    # numpy's global generator is neither read for the result nor disturbed (RandAugment draws from it)
    np.random.seed(0)
    c = _seeded(t, img, 11)
    np.random.seed(1)
    d = _seeded(t, img, 11)
    assert torch.equal(a, c) and torch.equal(a, d)
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    _seeded(t, img, 12)
    assert np.array_equal(before, np.random.get_state()[1])
    # different seeds draw different crops
    plain = train_transform(vit_s, AugmentConfig())
    outs = [_seeded(plain, img, s) for s in range(4)]
    assert all(not torch.equal(outs[0], o) for o in outs[1:])


def test_python_and_torch_rng_both_matter(resnet18):
    """Crop position from python ``random``, flip from torch: fix one, vary the other."""
    t = train_transform(resnet18, AugmentConfig(hflip=0.5))
    img = _rgb()
    outs = []
    for s in range(8):
        random.seed(0)
        torch.manual_seed(s)
        outs.append(t(img))
    base = outs[0]
    assert all(torch.equal(o, base) or torch.equal(o, base.flip(-1)) for o in outs)
    assert any(torch.equal(o, base.flip(-1)) for o in outs) and any(torch.equal(o, base) for o in outs[1:])
    crops = []
    for s in range(4):
        random.seed(s)
        torch.manual_seed(0)
        crops.append(t(img))
    assert all(not torch.equal(crops[0], c) for c in crops[1:])


@pytest.mark.parametrize("which", ["vit_s", "resnet18"])
def test_no_crop_no_flip_is_a_plain_resize(request, which):
    """scale=(1,1), ratio=(1,1), hflip=0 on a square image = resize to the input size with the model's
    interpolation, then normalize (reference from torchvision ops)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    model = request.getfixturevalue(which)
    t = train_transform(model, AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0))
    cfg = t.config
    img = _rgb(331, 331, seed=4)
    _, h, w = cfg["input_size"]
    ref = F.resize(img, [h, w], interpolation=InterpolationMode(cfg["interpolation"]), antialias=True)
    ref = F.normalize(F.to_tensor(ref), cfg["mean"], cfg["std"])
    for seed in (0, 1):
        assert torch.equal(_seeded(t, img, seed), ref)


def test_kind_none_is_the_eval_transform(vit_s):
    t = train_transform(vit_s, AugmentConfig(kind="none"))
    assert isinstance(t, EvalTransform) and t.config["augment"] == {"kind": "none"}
    img = _rgb()
    assert torch.equal(_seeded(t, img, 0), eval_transform(vit_s)(img))


def test_grayscale_refuses_color_jitter(fmnist_vit):
    with pytest.raises(UserError, match=r"qat\.augment\.color_jitter"):
        train_transform(fmnist_vit, AugmentConfig(color_jitter=0.4))
    # auto-augment ops work on 'L' images
    t = train_transform(fmnist_vit, AugmentConfig(auto_augment="rand-m9-mstd0.5", re_prob=0.5))
    for s in range(20):
        assert tuple(_seeded(t, _gray(seed=s), s).shape) == (1, 28, 28)


def test_bad_auto_augment_names_the_field(vit_s):
    with pytest.raises(UserError, match=r"qat\.augment\.auto_augment"):
        train_transform(vit_s, AugmentConfig(auto_augment="nonsense-policy"))


def test_color_jitter_reported(vit_s):
    cfg = train_transform(vit_s, AugmentConfig(color_jitter=0.4)).config["augment"]
    assert cfg["color_jitter"] == 0.4
    cfg = train_transform(vit_s, AugmentConfig(color_jitter=0.4, auto_augment="rand-m9-mstd0.5")).config["augment"]
    assert cfg["color_jitter"] is None and "auto_augment" in cfg["note"]


def test_picklable(vit_s, fmnist_vit):
    for model, img in ((vit_s, _rgb()), (fmnist_vit, _gray())):
        t = train_transform(model, AugmentConfig(auto_augment="rand-m9-mstd0.5", re_prob=0.25))
        t2 = pickle.loads(pickle.dumps(t))
        assert t2.config == t.config
        assert torch.equal(_seeded(t, img, 7), _seeded(t2, img, 7))


def test_training_reads_transparent_images_with_the_models_alpha_policy(tmp_path):
    """A model whose processor composites transparency onto white (transformers' do_convert_rgb: alpha='white')
    got that in evaluation only: the dataset decoded training images with the default policy ("drop"), so
    the train transform saw a fully transparent red pixel as red and a transparent palette entry as black."""
    timm = pytest.importorskip("timm")
    from torchvision import transforms as T

    from quantcore.data import open_dataset

    (tmp_path / "val" / "c").mkdir(parents=True)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200  # red, alpha 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "val" / "c" / "rgba.png")
    Image.new("P", (16, 16), 0).save(tmp_path / "val" / "c" / "p_trns.png", transparency=0)  # black, keyed
    m = timm.create_model("test_vit", pretrained=False, num_classes=2)
    m.pretrained_cfg = {**m.pretrained_cfg, "hf_preprocessing": {"alpha": "white", "flip_channel_order": False}}
    flat = AugmentConfig(hflip=0.0, scale=[1.0, 1.0], ratio=[1.0, 1.0], re_prob=0.0)
    train = train_transform(m, flat)
    assert isinstance(train, TrainTransform) and train.config["alpha"] == "white"
    mean, std = (torch.tensor(train.config[k]).view(-1, 1, 1) for k in ("mean", "std"))
    for t in (train, T.Compose([train]), eval_transform(m, decoder="pil")):  # the eval path: the reference
        ds = open_dataset(str(tmp_path), "val", t)
        for i in range(len(ds)):
            x = ds[i][0] * std + mean
            assert torch.allclose(x, torch.ones_like(x), atol=1e-5), (t, ds.samples[i], x[:, 0, 0])
    # a transform without a policy keeps the default: the stored colour of a transparent pixel
    ds = open_dataset(str(tmp_path), "val", T.ToTensor())
    assert torch.allclose(ds[ds.samples.index("c/rgba.png")][0][:, 0, 0], torch.tensor([200 / 255, 0.0, 0.0]))
