"""Source ``hf``: a Hugging Face ``transformers`` image classifier saved with ``save_pretrained``.

``model.name`` is the directory (local path, ``file://`` or ``s3://`` prefix; ``source: auto`` picks this
source for an ``s3://``/``file://`` name or a local directory holding ``config.json``). It holds
``config.json`` and the weights (``model.safetensors`` or ``pytorch_model.bin``, sharded or not); an s3://
directory is first downloaded to a temporary local directory with :mod:`quantcore.io.storage`. The hub
is never contacted (``local_files_only=True``).

The class is ``config.json``'s ``architectures[0]`` when it is an image classifier transformers knows
(so ``DeiTForImageClassificationWithTeacher`` keeps its distillation head), else the
``AutoModelForImageClassification`` class of its ``model_type``. Weights must match exactly (missing,
unexpected or mismatched keys are refused). ``model.kwargs`` become config overrides (e.g.
``attn_implementation: eager``).

Preprocessing: the directory's ``preprocessor_config.json`` (read with ``AutoImageProcessor``, so its
class defaults fill in missing fields) is mapped onto a timm-style ``model.pretrained_cfg`` that
:func:`quantcore.data.transforms.eval_transform` reads:

* ``size {height, width}`` without centre crop: squash to that size (``crop_mode: squash``, crop_pct 1);
  with ``crop_size``: squash to ``size`` then centre-crop (crop_pct = crop/size);
* ``size {shortest_edge}`` + ``crop_size``: shorter side to ``shortest_edge``, centre crop
  (``crop_mode: center``); ConvNeXt's ``crop_pct`` as its processor applies it;
* ``resample`` -> interpolation; ``image_mean/std`` (0/1 when ``do_normalize`` is false) divided by
  ``rescale_factor x 255`` (timm's ToTensor already scales by 1/255);
* ``do_flip_channel_order`` (MobileViT's BGR input): a forward pre-hook on the model reverses the first
  three input channels, so the model takes RGB like every other; mean/std are reversed to match
  (recorded as ``pretrained_cfg["hf_preprocessing"]["flip_channel_order"]``).

Without ``preprocessor_config.json``: the model type's default image processor (mean/std, resample,
channel flip) with the image squashed to ``config.json``'s ``image_size``; ``hf_preprocessing.file`` is
then ``None`` and ``notes`` says so.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any, Iterator

import torch
from torch import nn

from . import ModelSource, register_source

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# PIL resample codes (what preprocessor_config.json stores) -> timm interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HFSource(ModelSource):
    name = "hf"
    priority = 20

    def claims(self, cfg, name: str) -> bool:
        if name.startswith(("s3://", "file://")):
            return True
        return os.path.isfile(os.path.join(name, CONFIG))

    def build(self, cfg, name: str, load_weights: bool) -> tuple[nn.Module, str | None]:
        from ..models import ModelError

        try:
            import transformers  # noqa: F401  (an optional dependency)
        except ImportError:
            raise ModelError(f"model.name {name}: source hf needs the transformers package "
                             "(pip install 'transformers>=4.56')") from None
        for field in ("in_chans", "img_size", "pretrained_file"):
            if getattr(cfg, field) is not None:
                raise ModelError(f"model.{field}: not used by source hf - the directory's {CONFIG} fixes the "
                                 f"architecture; remove it")
        want_weights = load_weights and cfg.checkpoint is None
        with _local_dir(name, want_weights) as local:
            config, arch = _read_config(local, name, cfg)
            cls = _model_class(config, arch, name)
            if cfg.num_classes is not None and cfg.num_classes != config.num_labels:
                raise ModelError(f"model.num_classes {cfg.num_classes} differs from {_join(name, CONFIG)} "
                                 f"num_labels {config.num_labels} (a new head would be random): remove it")
            if want_weights:
                model = _from_pretrained(cls, local, name, config)
                weights = f"hf directory {name} ({_weights_file(local)})"
            else:
                model = cls(config)
                weights = None
            pcfg = hf_data_config(local, name, config, arch)
        model.float()
        model.pretrained_cfg = pcfg
        model.default_cfg = pcfg
        if pcfg["hf_preprocessing"]["flip_channel_order"]:
            model.register_forward_pre_hook(flip_channel_order, with_kwargs=True)
        return model, weights


def _join(name: str, file: str) -> str:
    return f"{name.rstrip('/')}/{file}"


@contextlib.contextmanager
def _local_dir(name: str, want_weights: bool) -> Iterator[str]:
    """A local directory with the model's files: ``name`` itself, or an s3:// prefix downloaded to a
    temporary directory (only the JSON configs when no weights are needed)."""
    from ..io import storage
    from ..models import ModelError

    if not storage.is_s3(name):
        path = storage.local_path(name)
        if not os.path.isdir(path):
            raise ModelError(f"model.name {name}: not a directory (source hf reads a transformers "
                             f"save_pretrained directory: {CONFIG} + model.safetensors or pytorch_model.bin)")
        yield path
        return
    prefix = name.rstrip("/")
    try:
        uris = storage.list_uris(prefix)
    except FileNotFoundError as err:
        raise ModelError(f"model.name {name}: bucket not found ({err})") from None
    if not uris:
        raise ModelError(f"model.name {name}: no files under this s3 prefix (expected {CONFIG} + weights)")
    with tempfile.TemporaryDirectory(prefix="quantcore-hf-") as tmp:
        for uri in uris:
            rel = uri[len(prefix) + 1:]
            if not want_weights and not rel.endswith(".json"):
                continue
            storage.download_file(uri, os.path.join(tmp, rel))
        yield tmp


def _read_config(local: str, name: str, cfg) -> tuple[Any, str | None]:
    """The transformers config (``model.kwargs`` applied) and ``architectures[0]``; ModelError naming
    ``config.json`` and the field for a missing file, bad JSON or an unknown ``model_type``."""
    import transformers

    from ..models import ModelError

    where = _join(name, CONFIG)
    path = os.path.join(local, CONFIG)
    if not os.path.isfile(path):
        raise ModelError(f"{where}: not found - source hf reads a transformers save_pretrained directory "
                         f"({CONFIG} + model.safetensors or pytorch_model.bin)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise ModelError(f"{where}: not readable JSON ({err})") from None
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise ModelError(f"{where}: model_type missing (not a transformers config)")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ModelError(f"{where}: architectures must be a list of class names, got {archs!r}")
    try:
        config = transformers.AutoConfig.from_pretrained(local, local_files_only=True, **dict(cfg.kwargs))
    except ValueError as err:
        msg = str(err).strip().splitlines()[0][:200]
        raise ModelError(f"{where}: model_type {raw['model_type']!r} is not known to transformers "
                         f"{transformers.__version__} ({msg})") from None
    unused = sorted(k for k in cfg.kwargs if not hasattr(config, k) and not hasattr(config, "_" + k))
    if unused:
        raise ModelError(f"model.kwargs {unused}: not fields of {type(config).__name__} ({where})")
    return config, (archs[0] if archs else None)


def _image_classifiers() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    names: set[str] = set()
    for v in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values():
        names.update((v,) if isinstance(v, str) else v)
    return names


def _model_class(config, arch: str | None, name: str):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    from ..models import ModelError

    where = _join(name, CONFIG)
    known = _image_classifiers()
    if arch is not None:
        if arch not in known or not hasattr(transformers, arch):
            raise ModelError(f"{where}: architectures[0] {arch!r} is not a transformers image classifier this "
                             f"quantcore can load (logits needed; e.g. {', '.join(sorted(known)[:6])} ...)")
        return getattr(transformers, arch)
    mapped = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if mapped is None:
        raise ModelError(f"{where}: model_type {config.model_type!r} has no image classification model in "
                         "transformers and architectures is not given")
    return getattr(transformers, mapped if isinstance(mapped, str) else mapped[0])


def _weights_file(local: str) -> str:
    return next((f for f in WEIGHT_FILES if os.path.isfile(os.path.join(local, f))), "no weights file")


def _from_pretrained(cls, local: str, name: str, config) -> nn.Module:
    """``cls.from_pretrained`` in FP32 from the local directory; every weight must match exactly."""
    from ..models import ModelError

    wfile = _weights_file(local)
    if wfile == "no weights file":
        raise ModelError(f"model.name {name}: no weights file ({' / '.join(WEIGHT_FILES)}) next to {CONFIG}")
    where = _join(name, wfile)
    import transformers
    from packaging.version import Version

    # FP32 whatever the file stores; transformers < 4.56 calls the argument torch_dtype
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        model, info = cls.from_pretrained(local, config=config, local_files_only=True, output_loading_info=True,
                                          **{dtype_kw: torch.float32})
    except (OSError, RuntimeError, ValueError) as err:
        msg = " ".join(str(err).split())[:300]
        raise ModelError(f"{where}: transformers could not load it into {cls.__name__}: {msg}") from None
    bad = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        parts = [f"{k.split('_')[0]} {v[:5]}{' ...' if len(v) > 5 else ''}" for k, v in bad.items() if v]
        raise ModelError(f"{where} does not match {cls.__name__} of {CONFIG}: {'; '.join(parts)}")
    return model


# ------------------------------------------------------------------------------------ preprocessing
def _default_processor(model_type: str):
    """The model type's default image processor (no file): its class constructed without arguments."""
    from transformers.models.auto.image_processing_auto import (IMAGE_PROCESSOR_MAPPING_NAMES,
                                                                get_image_processor_class_from_name)

    entry = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if isinstance(entry, dict):  # transformers 5: {backend: class name}
        cls_name = entry.get("torchvision") or next((v for v in entry.values() if v), None)
    else:  # transformers 4: (slow, fast)
        cls_name = next((v for v in (entry or ()) if v), None)
    cls = get_image_processor_class_from_name(cls_name) if cls_name else None
    return cls() if cls is not None else None


def _size(val) -> dict[str, int]:
    if val is None:
        return {}
    if isinstance(val, int):
        return {"height": val, "width": val}
    return {k: int(v) for k, v in dict(val).items() if v is not None}


def _interp(resample) -> str:
    val = getattr(resample, "value", resample)
    if isinstance(val, str):
        return val.lower()
    return _RESAMPLE.get(int(val), "bilinear")


def _crop_pct(crop: int, scaled: int) -> float:
    """crop/scaled, nudged so timm's ``floor(crop / crop_pct)`` gives back ``scaled`` exactly."""
    pct = crop / scaled
    if math.floor(crop / pct) != scaled:
        pct = crop / (scaled + 1e-6)
    return pct


def hf_data_config(local: str, name: str, config, arch: str | None) -> dict[str, Any]:
    """timm-style ``pretrained_cfg`` (input_size, mean, std, interpolation, crop_pct, crop_mode) from the
    directory's ``preprocessor_config.json`` or, without one, the model type's processor defaults;
    ``hf_preprocessing`` records the file, the channel flip and any approximation made."""
    from ..models import ModelError

    chans = int(getattr(config, "num_channels", 3) or 3)
    image_size = getattr(config, "image_size", None)
    if isinstance(image_size, (list, tuple)):
        img_hw = (int(image_size[0]), int(image_size[-1]))
    else:
        img_hw = (int(image_size), int(image_size)) if image_size else (224, 224)
    path = os.path.join(local, PREPROCESSOR)
    where = _join(name, PREPROCESSOR)
    notes: list[str] = []
    if os.path.isfile(path):
        from transformers import AutoImageProcessor

        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
            proc = AutoImageProcessor.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            msg = " ".join(str(err).split())[:200]
            raise ModelError(f"{where}: not a readable image processor config ({msg})") from None
        file = where
    else:
        proc = _default_processor(config.model_type)
        file = None
        notes.append(f"no {PREPROCESSOR}: {type(proc).__name__ if proc else 'no processor'} defaults for "
                     f"model_type {config.model_type!r}, image squashed to {CONFIG} image_size {list(img_hw)}")

    g = (lambda k, d=None: getattr(proc, k, d) if proc is not None else d)
    size, crop = _size(g("size")), _size(g("crop_size"))
    do_crop = bool(g("do_center_crop", False)) and bool(crop)
    crop_pct_attr = g("crop_pct")
    if file is None or not g("do_resize", True):
        if file is not None:
            notes.append(f"do_resize is false: images are squashed to {CONFIG} image_size {list(img_hw)}")
        hw, pct, mode = img_hw, 1.0, "squash"
    elif "height" in size and "width" in size:
        if do_crop:
            fh, fw = crop["height"] / size["height"], crop["width"] / size["width"]
            if abs(fh - fw) > 1e-9:
                raise ModelError(f"{where}: crop_size/size ratios differ between height and width "
                                 f"({crop} of {size}); timm's transform takes one crop_pct")
            hw, pct, mode = (crop["height"], crop["width"]), _crop_pct(crop["height"], size["height"]), "squash"
        else:
            hw, pct, mode = (size["height"], size["width"]), 1.0, "squash"
    elif "shortest_edge" in size:
        s = size["shortest_edge"]
        if crop_pct_attr is not None:  # ConvNeXt: crop below 384, squash at 384 and above
            hw, pct, mode = ((s, s), float(crop_pct_attr), "center") if s < 384 else ((s, s), 1.0, "squash")
        elif do_crop:
            hw, pct, mode = (crop["height"], crop["width"]), _crop_pct(min(crop["height"], crop["width"]), s), "center"
        else:
            hw, pct, mode = (s, s), 1.0, "center"
            notes.append(f"size shortest_edge {s} without a crop: images are centre-cropped to {s}x{s}")
    else:
        raise ModelError(f"{where}: size {size} is neither {{height, width}} nor {{shortest_edge}}")

    if not g("do_normalize", False):  # None (MobileViT: no normalize step) counts as off, as in transformers
        mean, std = [0.0] * chans, [1.0] * chans
    else:
        mean = list(g("image_mean") or [0.5] * chans)
        std = list(g("image_std") or [0.5] * chans)
    k = (float(g("rescale_factor", 1 / 255)) if g("do_rescale", True) else 1.0) * 255.0
    # HF: (x * rescale_factor - mean) / std; timm: (x / 255 - mean') / std'
    mean = [m / k for m in (mean * chans if len(mean) == 1 else mean)]
    std = [s / k for s in (std * chans if len(std) == 1 else std)]
    flip = bool(g("do_flip_channel_order", False))
    if flip:  # HF flips before normalizing; our flip runs after, so the statistics swap places
        mean[:3], std[:3] = mean[:3][::-1], std[:3][::-1]
    return {
        "input_size": (chans, int(hw[0]), int(hw[1])), "mean": tuple(mean), "std": tuple(std),
        "interpolation": _interp(g("resample", 2)), "crop_pct": float(pct), "crop_mode": mode,
        "num_classes": int(config.num_labels), "architecture": arch or config.model_type,
        "hf_preprocessing": {"file": file, "flip_channel_order": flip, "notes": notes},
    }


def flip_channel_order(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: RGB -> BGR on the first three channels of ``pixel_values`` (``(B, C, H, W)``), as
    MobileViT's image processor does, so the model is fed RGB like every other quantcore model."""

    def flip(x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] < 3:
            return x
        return torch.cat([x[:, [2, 1, 0]], x[:, 3:]], dim=1) if x.shape[1] > 3 else x[:, [2, 1, 0]]

    if args:
        return (flip(args[0]), *args[1:]), kwargs
    if "pixel_values" in kwargs:
        return args, {**kwargs, "pixel_values": flip(kwargs["pixel_values"])}
    return None


register_source(HFSource())
