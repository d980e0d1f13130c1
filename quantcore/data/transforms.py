"""Evaluation transforms taken from the model itself.

* timm models (anything with a ``pretrained_cfg``/``default_cfg``): ``timm.data.resolve_data_config``
  + ``timm.data.create_transform`` - mean/std/crop_pct/interpolation/input size come from the model's
  config, then the channel count and fixed image size are checked against the *built* model (a ViT
  created with ``in_chans=1, img_size=28`` keeps the 3x224 ``pretrained_cfg`` of its architecture, but
  must be fed 1x28x28). Grayscale models get PIL images converted to ``'L'``, all others to ``'RGB'``.
* torchvision models: the transforms of the weights the model source records on the model
  (:data:`TORCHVISION_WEIGHTS_ATTR`, ``torchvision:<name>``: its DEFAULT weights, e.g. ResNet-50's
  V2 resize 232, Inception-v3's 342 -> 299), or ``weights=`` (a ``WeightsEnum`` member or its
  ``.transforms()``); for a torchvision model built elsewhere, the torchvision standard (resize 256,
  center crop 224, bilinear, ImageNet mean/std).

:func:`describe_transform` returns the same resolution as a JSON-able dict for reports.

:func:`train_transform` is the training counterpart (QAT): the same resolved mean/std/input size/
interpolation/PIL mode, through timm's ``create_transform(is_training=True)`` (RandomResizedCrop, flip,
colour jitter or auto-augment, random erasing) as the recipe's ``qat.augment`` asks.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections import Counter
from typing import Any, Callable

import torch
from torch import nn
from torchvision import transforms as _T

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvertMode:
    """Convert a PIL image to ``mode`` (``'RGB'``/``'L'``); tensors pass through. Picklable.

    Images not yet in 8-bit ``L``/``RGB`` (e.g. handed over by a foreign dataset) first go through
    :func:`quantcore.data.base.to_8bit`, so 16-bit images are scaled, never clipped."""

    def __init__(self, mode: str, alpha: str = "drop") -> None:
        self.mode = mode
        self.alpha = alpha  # quantcore.data.base.ALPHA_POLICIES

    def __call__(self, img):
        if not hasattr(img, "convert"):
            return img
        keyed = self.alpha == "white" and getattr(img, "info", {}).get("transparency") is not None
        if getattr(img, "mode", None) != self.mode or keyed:  # an L/RGB PNG's tRNS key is transparency too
            if img.mode not in ("L", "RGB") or keyed:
                from .base import to_8bit

                img = to_8bit(img, getattr(img, "filename", None) or f"<{img.mode} image>", self.alpha, self.mode)
            return img if img.mode == self.mode else img.convert(self.mode)
        return img

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r}" + (f", alpha={self.alpha!r})" if self.alpha != "drop" else ")")


class EvalTransform:
    """``ConvertMode`` followed by the model's transform; carries the resolved config as ``.config``.

    ``decoder`` (``'auto'``, ``'torchvision'``, ``'pil'``; see :mod:`quantcore.data.decode`): with a
    torchvision decoder and a transform made of steps that have exact tensor counterparts, datasets call
    :meth:`from_bytes` and JPEGs are decoded by ``torchvision.io.decode_jpeg`` and transformed as ``uint8``
    tensors (``.plan``); other formats keep PIL and this transform. ``config["decoder"]`` records the
    choice (and why PIL was kept); ``counts`` tallies which decoder ran in this process."""

    def __init__(self, inner: Callable, config: dict[str, Any], decoder: str = "auto") -> None:
        from .decode import DECODERS, resolve_decoder, tensor_plan

        self.inner = inner
        self.config = dict(config)
        mode = config.get("mode")
        self.alpha = config.get("alpha", "drop")
        self.convert = ConvertMode(mode, self.alpha) if mode else None
        name = resolve_decoder(decoder)
        self.plan, reason = tensor_plan(inner) if name != "pil" else (None, "")
        if self.plan is None and name != "pil":
            name, reason = "pil", f"{decoder!r} asked, but {reason}: the whole transform stays on PIL"
        info: dict[str, Any] = {"name": name, "asked": decoder, "jpeg": DECODERS[name]}
        if self.plan is not None:
            info["tensor_steps"] = self.plan.describe()
        if reason:
            info["reason"] = reason
        self.config["decoder"] = info
        self.counts: Counter = Counter()

    def __call__(self, img):
        if self.convert is not None:
            img = self.convert(img)
        elif hasattr(img, "convert"):
            _refuse_channels(self.config)
        return self.inner(img)

    def from_bytes(self, data: bytes, where: str) -> torch.Tensor:
        """Encoded image -> normalized ``C x H x W`` float32 tensor; raises :class:`DataError` naming
        ``where`` for a file the PIL path cannot decode either (same message)."""
        from .base import decode_image
        from .decode import to_mode, try_torchvision

        if self.convert is None:
            _refuse_channels(self.config)

        x = try_torchvision(data) if self.plan is not None else None
        if x is not None:
            self.counts["torchvision"] += 1
            return self.plan(to_mode(x, self.config.get("mode")))
        img = decode_image(data, where, self.alpha, self.config.get("mode"))
        self.counts["pil"] += 1
        return self(img)

    def __repr__(self) -> str:
        decoder = self.config["decoder"]["name"]
        return f"EvalTransform(convert={self.convert!r}, inner={self.inner!r}, decoder={decoder!r})"


# ---------------------------------------------------------------------------------------- model probes
# Set by the torchvision model source: the ``WeightsEnum`` member (``"ResNet50_Weights.IMAGENET1K_V2"``)
# whose transforms are the model's preprocessing, also when it was built without those weights (a
# fine-tune in ``model.checkpoint``, or random init): they are the architecture's.
TORCHVISION_WEIGHTS_ATTR = "torchvision_weights"


def weights_name(weights: Any) -> str:
    """``"ResNet50_Weights.IMAGENET1K_V2"`` for a torchvision ``WeightsEnum`` member
    (``torchvision.models.get_weight`` takes it back)."""
    return f"{type(weights).__name__}.{weights.name}"


def _recorded_weights(model: nn.Module | None) -> Any:
    name = getattr(model, TORCHVISION_WEIGHTS_ATTR, None) if model is not None else None
    if not isinstance(name, str):
        return None
    import torchvision

    return torchvision.models.get_weight(name)


def _pretrained_cfg(model: nn.Module | None) -> dict | None:
    if model is None:
        return None
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg:
            return cfg
    return _hf_model_cfg(model)


_HF_CFGS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_WARNED_DEFAULT: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _hf_model_cfg(model: nn.Module) -> dict | None:
    """A Hugging Face model built outside quantcore (``from_pretrained``/``from_config`` in the user's
    code) carries no pretrained_cfg: its image processor's settings, from the ``preprocessor_config.json``
    of the directory it was loaded from (``config._name_or_path``), else its model type's processor
    defaults at ``config.image_size`` (warned), as quantcore's own Hugging Face source does. None for
    any other model."""
    if not type(model).__module__.startswith("transformers.") or getattr(model, "config", None) is None:
        return None
    if model in _HF_CFGS:
        return _HF_CFGS[model]
    from ..model_sources.hf import hf_data_config

    config = model.config
    local = str(getattr(config, "_name_or_path", "") or "")
    pcfg = hf_data_config(local if os.path.isdir(local) else "", local or type(model).__name__, config, None)
    if pcfg["hf_preprocessing"]["flip_channel_order"]:
        log.warning("%s: its image processor feeds BGR (do_flip_channel_order), which a model built outside "
                    "quantcore does not do by itself; build it with quantcore (model.name: <its directory>) to "
                    "get the flip, or flip the channels in your own model", local or type(model).__name__)
    _HF_CFGS[model] = pcfg
    return pcfg


def model_in_chans(model: nn.Module | None, default: int = 3) -> int:
    """Input channels of the built model: the ``first_conv`` named by its cfg, else the first conv."""
    if model is None:
        return default
    cfg = _pretrained_cfg(model) or {}
    first = cfg.get("first_conv")
    for name in ([first] if isinstance(first, str) else list(first or [])):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        if getattr(mod, "in_channels", None):
            return int(mod.in_channels)
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Conv1d, nn.Conv3d)):
            return int(mod.in_channels)
    in_chans = getattr(model, "in_chans", None)
    return int(in_chans) if isinstance(in_chans, int) else default


def model_fixed_img_size(model: nn.Module | None) -> tuple[int, int] | None:
    """(H, W) a patch-embedding model insists on (timm ViT/DeiT/Swin with a fixed ``img_size``)."""
    pe = getattr(model, "patch_embed", None) if model is not None else None
    size = getattr(pe, "img_size", None)
    if size is None or getattr(pe, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def _fit_channels(vals, in_chans: int, what: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in (vals if isinstance(vals, (list, tuple)) else [vals]))
    if len(vals) == in_chans:
        return vals
    if len(vals) == 1:
        return vals * in_chans
    if in_chans == 1:  # grayscale model with an RGB config: single-channel average (timm adapts convs the same way)
        return (sum(vals) / len(vals),)
    raise ValueError(f"model has {in_chans} input channels but its {what} has {len(vals)} values: {vals}")


def _mode_for(in_chans: int) -> str | None:
    return {1: "L", 3: "RGB"}.get(in_chans)


def _refuse_channels(config: dict[str, Any]) -> None:
    """An image for a model that takes neither 1 nor 3 channels: image files decode to grayscale or RGB
    (alpha is not a fourth input channel here), so no conversion gives such a model its input; without
    this, a grayscale JPEG was broadcast to every channel on one decode path and refused on the other."""
    from ..errors import UserError

    chans = (config.get("input_size") or [None])[0]
    raise UserError(f"the model takes {chans}-channel input, but quantcore's image pipeline makes 1-channel "
                    f"(grayscale) or 3-channel (RGB) images; feed such a model tensors of your own "
                    f"(quantcore.calibrate/evaluate take any iterable of batches)")


def _interp_name(x) -> str:
    return str(getattr(x, "value", x))


# ---------------------------------------------------------------------------------------- resolution
class FloorCenterCrop(_T.CenterCrop):
    """Centre crop that starts at ``floor((size - crop) / 2)`` on each axis, as Hugging Face image
    processors do (torchvision rounds the offset). PIL image or ``... x H x W`` tensor in, the same
    type out; an input smaller than the crop is padded as :class:`torchvision.transforms.CenterCrop`
    pads it."""

    def forward(self, img):
        from torchvision.transforms import functional as TF

        h, w = _hw(img)
        ch, cw = self.size if len(self.size) == 2 else (self.size[0], self.size[0])
        if h < ch or w < cw:
            return super().forward(img)
        return TF.crop(img, (h - ch) // 2, (w - cw) // 2, ch, cw)


def _hw(img) -> tuple[int, int]:
    if isinstance(img, torch.Tensor):
        return int(img.shape[-2]), int(img.shape[-1])
    return int(img.size[1]), int(img.size[0])  # PIL: (width, height)


def _resolve(model: nn.Module | None, weights, overrides: dict | None, use_test_size: bool = False):
    overrides = dict(overrides or {})
    in_chans = int(overrides.pop("in_chans", model_in_chans(model)))
    recorded = weights is None and not overrides and _recorded_weights(model)
    if recorded:
        weights = recorded
    if weights is not None:
        tv = weights.transforms() if hasattr(weights, "transforms") else weights
        crop = getattr(tv, "crop_size", None)
        resize = getattr(tv, "resize_size", None)
        crop = list(crop) if crop is not None else None
        size = getattr(model, "image_size", None)  # torchvision ViT: built for one input size only
        if recorded and isinstance(size, int) and crop and resize and size != crop[0]:
            # built with another image_size than the weights': their preset scaled to it (timm's rule)
            inner, cfg = _resolve(model, None, {
                "in_chans": in_chans, "crop_size": size, "resize_size": int(size * resize[0] / crop[0]),
                "mean": list(tv.mean), "std": list(tv.std), "interpolation": _interp_name(tv.interpolation)})
            return inner, {**cfg, "source": "torchvision-weights (scaled to the model's image_size)",
                           "weights": weights_name(weights)}
        cfg = {
            "source": "torchvision-weights",
            "weights": weights_name(weights) if hasattr(weights, "transforms") else None,
            "input_size": [in_chans, crop[0], crop[-1]] if crop else None,
            "resize_size": list(resize) if resize is not None else None,
            "mean": list(getattr(tv, "mean", [])) or None,
            "std": list(getattr(tv, "std", [])) or None,
            "interpolation": _interp_name(getattr(tv, "interpolation", "")) or None,
            "crop_pct": (crop[0] / resize[0]) if crop and resize else None,
            "crop_mode": "center",
            "mode": _mode_for(in_chans),
        }
        if overrides:
            raise ValueError(f"overrides {sorted(overrides)} cannot be applied to torchvision weights transforms")
        return tv, cfg

    pcfg = _pretrained_cfg(model)
    if pcfg is not None:
        import timm.data

        dc = timm.data.resolve_data_config(pretrained_cfg=pcfg, model=model, use_test_size=use_test_size)
        fixed = model_fixed_img_size(model)
        size = fixed if fixed is not None else tuple(dc["input_size"][1:])
        dc["input_size"] = (in_chans, *size)
        dc.update(overrides)
        in_chans = int(dc["input_size"][0])
        dc["mean"] = _fit_channels(dc["mean"], in_chans, "mean")
        dc["std"] = _fit_channels(dc["std"], in_chans, "std")
        kw = {k: dc[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in dc}
        inner = timm.data.create_transform(**kw, is_training=False)
        # HF models carry their image processor's settings as a timm pretrained_cfg
        source = "hf" if pcfg.get("hf_preprocessing") else "timm"
        cfg = {"source": source, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
               "resize_size": _find_resize(inner), "mode": _mode_for(in_chans)}
        if (pcfg.get("hf_preprocessing") or {}).get("alpha", "drop") != "drop":
            cfg["alpha"] = pcfg["hf_preprocessing"]["alpha"]  # the processor's do_convert_rgb
        if pcfg.get("hf_preprocessing") and hasattr(inner, "transforms"):
            # transformers' processors start a centre crop at floor((size - crop) / 2); torchvision's
            # CenterCrop rounds, one pixel off for half the odd margins
            inner.transforms = [FloorCenterCrop(t.size) if type(t) is _T.CenterCrop else t for t in inner.transforms]
            cfg["crop_offset"] = "floor"
        return inner, cfg

    # torchvision standard preset
    from torchvision import transforms as T

    if model is not None and not overrides and model not in _WARNED_DEFAULT:
        _WARNED_DEFAULT.add(model)  # once per model: every dataset opened for it asks again
        log.warning("%s carries no preprocessing config (timm pretrained_cfg, torchvision weights, Hugging Face "
                    "processor): using torchvision's standard preset (resize 256, crop 224, bilinear, ImageNet "
                    "mean/std), which may not be how its weights were trained; build it through a recipe "
                    "(model.name: torchvision:<name>, a timm name or a Hugging Face directory) or pass "
                    "weights=/overrides= to eval_transform", type(model).__name__)

    resize = int(overrides.pop("resize_size", 256))
    crop = int(overrides.pop("crop_size", 224))
    mean = _fit_channels(overrides.pop("mean", IMAGENET_MEAN), in_chans, "mean")
    std = _fit_channels(overrides.pop("std", IMAGENET_STD), in_chans, "std")
    interp = str(overrides.pop("interpolation", "bilinear"))
    if overrides:
        raise ValueError(f"unknown transform overrides: {sorted(overrides)}")
    inner = T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode(interp), antialias=True),
        T.CenterCrop(crop),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    cfg = {"source": "torchvision-default", "input_size": [in_chans, crop, crop], "resize_size": [resize],
           "mean": list(mean), "std": list(std), "interpolation": interp, "crop_pct": crop / resize,
           "crop_mode": "center", "mode": _mode_for(in_chans)}
    return inner, cfg


def _find_resize(t) -> list[int] | None:
    for sub in getattr(t, "transforms", []) or []:
        if type(sub).__name__ == "Resize":
            s = sub.size
            return [s] if isinstance(s, int) else list(s)
    return None


def has_data_config(model: nn.Module | None) -> bool:
    """The model carries its own preprocessing (torchvision weights, a timm pretrained_cfg, a Hugging
    Face processor), rather than falling back to torchvision's standard preset."""
    return bool(_recorded_weights(model)) or _pretrained_cfg(model) is not None


def eval_transform(model: nn.Module | None = None, *, weights: Any = None, overrides: dict | None = None,
                   use_test_size: bool = False, decoder: str = "auto") -> EvalTransform:
    """The model's evaluation transform: PIL image (or, through ``from_bytes``, encoded bytes) ->
    normalized ``C x H x W`` float tensor.

    ``weights``: torchvision ``WeightsEnum`` member (or an already built ``weights.transforms()``) to use
    instead of the model's own config. ``overrides``: timm data-config keys (``input_size``, ``mean``,
    ``std``, ``crop_pct``, ``interpolation``, ``crop_mode``, ``in_chans``) that win over the model's.
    ``use_test_size``: use the cfg's ``test_input_size``/``test_crop_pct`` where it has them (timm's
    ``validate.py`` default); off by default, i.e. the cfg's ``input_size``/``crop_pct``.
    ``decoder``: ``'auto'`` (torchvision for JPEG when its image extension loads), ``'torchvision'`` or
    ``'pil'`` (PIL for everything, the reference); pixels agree within :mod:`quantcore.data.decode`'s
    stated tolerance (decode bit-exact, resize within 1 of 255 levels).
    """
    inner, cfg = _resolve(model, weights, overrides, use_test_size)
    return EvalTransform(inner, cfg, decoder=decoder)


def describe_transform(model: nn.Module | None = None, *, weights: Any = None, overrides: dict | None = None,
                       use_test_size: bool = False, decoder: str = "auto") -> dict[str, Any]:
    """JSON-able summary (source, input_size, resize_size, mean, std, crop_pct, crop_mode,
    interpolation, PIL mode, decoder) of :func:`eval_transform` for the same arguments."""
    if isinstance(model, (EvalTransform, TrainTransform)):
        return dict(model.config)
    return dict(eval_transform(model, weights=weights, overrides=overrides, use_test_size=use_test_size,
                               decoder=decoder).config)


# ---------------------------------------------------------------------------------------- training
class TrainTransform:
    """``ConvertMode`` followed by timm's training transform; ``.config`` says what was resolved and
    which augmentation runs. Picklable (DataLoader workers).

    Randomness comes only from python ``random`` and torch's global generator (what a training loop
    reseeds per sample): timm's RandAugment/AugMix draw from numpy's global generator, so around them
    numpy is seeded from python ``random`` and its previous state restored."""

    def __init__(self, inner: Callable, config: dict[str, Any], numpy_rng: bool = False) -> None:
        self.inner = inner
        self.config = dict(config)
        mode = config.get("mode")
        self.alpha = config.get("alpha", "drop")  # datasets decode with it (base.alpha_policy), as for eval
        self.convert = ConvertMode(mode, self.alpha) if mode else None
        self.numpy_rng = numpy_rng

    def __call__(self, img):
        if self.convert is not None:
            img = self.convert(img)
        elif hasattr(img, "convert"):
            _refuse_channels(self.config)
        if not self.numpy_rng:
            return self.inner(img)
        import random

        import numpy as np

        saved = np.random.get_state()
        np.random.seed(random.getrandbits(32))
        try:
            return self.inner(img)
        finally:
            np.random.set_state(saved)

    def __repr__(self) -> str:
        return f"TrainTransform(convert={self.convert!r}, inner={self.inner!r})"


def _augment_error(field: str, msg: str):
    from ..errors import UserError

    return UserError(f"qat.augment.{field}: {msg}")


def train_transform(model: nn.Module | None, augment: Any = None, *, weights: Any = None,
                    overrides: dict | None = None) -> "TrainTransform | EvalTransform":
    """The model's training transform: PIL image -> augmented, normalized ``C x H x W`` float tensor.

    ``augment`` is a :class:`quantcore.config.AugmentConfig` (or a dict of its fields; None = its
    defaults). The model's data config is resolved exactly as :func:`eval_transform` does (timm cfg or
    torchvision standard, channels and fixed image size from the built model, ``'L'`` images for
    grayscale models); the training pipeline is timm's ``create_transform(is_training=True)`` with that
    input size, mean/std and interpolation. ``augment.kind == "none"`` returns the eval transform.

    Grayscale models: RandomResizedCrop, flips, auto-augment and random erasing work on ``'L'``
    images; ``color_jitter`` is refused (its saturation part cannot apply to one channel).
    """
    from ..config import AugmentConfig

    if augment is None:
        augment = AugmentConfig()
    elif isinstance(augment, dict):
        augment = AugmentConfig.model_validate(augment)
    eval_inner, cfg = _resolve(model, weights, overrides, False)
    if augment.kind == "none":
        return EvalTransform(eval_inner, {**cfg, "augment": {"kind": "none"}})

    import timm.data

    input_size = cfg.get("input_size")
    if not input_size:
        raise ValueError("cannot resolve the model's input size for its training transform")
    in_chans = int(input_size[0])
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    interpolation = cfg.get("interpolation") or "bilinear"
    scale, ratio = tuple(float(x) for x in augment.scale), tuple(float(x) for x in augment.ratio)
    if not 0 < scale[0] <= scale[1]:
        raise _augment_error("scale", f"{list(scale)} must be 0 < min <= max (crop area fraction)")
    if not 0 < ratio[0] <= ratio[1]:
        raise _augment_error("ratio", f"{list(ratio)} must be 0 < min <= max (crop aspect ratio)")
    color_jitter = augment.color_jitter
    if in_chans == 1 and color_jitter:
        raise _augment_error("color_jitter", "the model takes 1-channel (grayscale) images; colour jitter "
                             "(brightness, contrast and saturation) cannot apply to them as asked - remove "
                             "it, or use auto_augment (e.g. rand-m9-mstd0.5), whose ops work on grayscale")
    if in_chans not in (1, 3) and (color_jitter or augment.auto_augment):
        field = "color_jitter" if color_jitter else "auto_augment"
        raise _augment_error(field, f"the model takes {in_chans}-channel inputs; PIL colour augmentation "
                             "works on 1- or 3-channel images only - remove it")
    aa = augment.auto_augment or None
    # timm switches colour jitter off under auto-augment (unless the policy is '3a'): report what runs
    cj_effective = color_jitter if color_jitter and not (aa and "3a" not in aa) else None
    try:
        inner = timm.data.create_transform(
            input_size=tuple(input_size), is_training=True, scale=scale, ratio=ratio, hflip=float(augment.hflip),
            vflip=0.0, color_jitter=color_jitter if color_jitter else None, auto_augment=aa,
            interpolation=interpolation, mean=mean, std=std, re_prob=float(augment.re_prob))
    except (AssertionError, KeyError, ValueError, IndexError) as err:
        if aa:
            raise _augment_error("auto_augment", f"{aa!r} is not a timm auto-augment policy "
                                 f"(e.g. rand-m9-mstd0.5, augmix-m5, original, v0, 3a): {err}") from None
        raise
    config = {
        "source": cfg.get("source"), "input_size": list(input_size), "mean": list(mean), "std": list(std),
        "interpolation": interpolation, "mode": cfg.get("mode"), **({"alpha": cfg["alpha"]} if "alpha" in cfg else {}),
        "augment": {"kind": "model", "pipeline": "timm create_transform(is_training=True)",
                    "crop": "RandomResizedCrop", "scale": list(scale), "ratio": list(ratio),
                    "hflip": float(augment.hflip), "color_jitter": cj_effective, "auto_augment": aa,
                    "re_prob": float(augment.re_prob)},
    }
    if color_jitter and cj_effective is None:
        config["augment"]["note"] = "color_jitter not applied: timm disables it under auto_augment"
    numpy_rng = bool(aa) and (aa.startswith("rand") or aa.startswith("augmix"))
    return TrainTransform(inner, config, numpy_rng=numpy_rng)


def dummy_input(model: nn.Module, batch: int = 1, **kw) -> torch.Tensor:
    """Zero tensor shaped like the model's eval input (handy for tracing/export)."""
    c, h, w = describe_transform(model, **kw)["input_size"]
    return torch.zeros(batch, c, h, w)


__all__ = ["eval_transform", "train_transform", "TrainTransform", "describe_transform", "model_in_chans", "model_fixed_img_size", "ConvertMode",
           "EvalTransform", "dummy_input", "IMAGENET_MEAN", "IMAGENET_STD"]
