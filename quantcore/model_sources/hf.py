"""Source ``hf``: a Hugging Face ``transformers`` image classifier saved with ``save_pretrained``.

``model.name`` is the directory (local path, ``file://`` or ``s3://`` prefix; ``source: auto`` picks this
source for an ``s3://``/``file://`` name, a local directory holding ``config.json``, or any other existing
directory named as a path or by a name timm does not know - which then fails naming ``config.json``). It holds
``config.json`` and the weights (``model.safetensors`` or ``pytorch_model.bin``, sharded or not); an s3://
directory is first downloaded to a temporary local directory with :mod:`quantcore.io.storage`. The hub
is never contacted (``local_files_only=True``).

The class is ``config.json``'s ``architectures[0]`` when it is an image classifier transformers knows
(so ``DeiTForImageClassificationWithTeacher`` keeps its distillation head), else the
``AutoModelForImageClassification`` class of its ``model_type``. Weights must match exactly (missing,
unexpected or mismatched keys are refused in one line naming the keys, their shapes and the config field such
as ``num_labels``; empty or truncated files are refused before transformers reads them). ``model.kwargs``
become config overrides (e.g. ``attn_implementation: eager``).

Preprocessing: the directory's ``preprocessor_config.json`` (read with ``AutoImageProcessor``, so its
class defaults fill in missing fields) is reproduced class by class (:data:`PROCESSORS`) as a timm-style
``model.pretrained_cfg`` that :func:`quantcore.data.transforms.eval_transform` reads:

* ``size {height, width}``: squash to that size (``crop_mode: squash``), then the centre crop as one
  crop_pct; ``size {shortest_edge}`` + centre crop: shorter side, square crop (``crop_mode: center``);
  LeViT's int(256/224 x shortest_edge), ConvNeXt's and PoolFormer's ``crop_pct`` resizes as they do them;
* ``resample`` -> interpolation (nearest, bilinear, bicubic); rescale + normalize folded into timm's mean/std
  for ``x / 255``, with EfficientNet's ``rescale_offset``/``include_top`` and MobileViT's lack of a
  normalize step;
* ``do_flip_channel_order`` (MobileViT's BGR input): a forward pre-hook on the model reverses the first
  three input channels, so the model takes RGB like every other; mean/std are reversed to match
  (recorded as ``pretrained_cfg["hf_preprocessing"]["flip_channel_order"]``).

Anything not reproduced exactly (another processor class, padding, no resize, a shortest_edge resize without
crop, other filters, a mean/std of another length, a size the model refuses) is a ModelError naming the file,
the processor class and the field; the pixels then equal the processor's up to resampling (the centre
crop starts where transformers starts it, rounded down: ``quantcore.data.transforms.FloorCenterCrop``).

Without ``preprocessor_config.json``: the model type's default image processor (mean/std, resample,
channel flip) with the image squashed to ``config.json``'s ``image_size``; ``hf_preprocessing.file`` is
then ``None`` and ``notes`` says so.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from typing import Any, Iterator

import torch
from torch import nn

from . import ModelSource, register_source

log = logging.getLogger(__name__)

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
        if os.path.isfile(os.path.join(name, CONFIG)):
            return True
        # a directory without config.json: say so, rather than "not a timm model"; a bare name that is also
        # a timm architecture (an output folder named after the model) stays timm's
        return os.path.isdir(name) and (looks_like_path(name) or not _is_timm_name(name))

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
                model = _from_pretrained(cls, local, name, config, dict(cfg.kwargs or {}))
                weights = f"hf directory {name} ({_weights_file(local)})"
            else:
                model = cls(config)
                weights = None
            pcfg = hf_data_config(local, name, config, arch)
            definition = _definition_files(local)
        model.float()
        # what the architecture and preprocessing were read from: a checkpoint stores it, so it loads the
        # same model wherever it is loaded and whatever the directory holds by then (quantcore.load)
        model.quantcore_definition = {"source": self.name, "files": definition}
        model.pretrained_cfg = pcfg
        model.default_cfg = pcfg
        if pcfg["hf_preprocessing"]["flip_channel_order"]:
            model.register_forward_pre_hook(flip_channel_order, with_kwargs=True)
        _check_input_size(model, pcfg, name, config)
        return model, weights


    def rebuild(self, cfg, files: dict[str, str]) -> nn.Module:
        with stored_definition(files) as tmp:
            model, _ = self.build(cfg.model_copy(update={"name": tmp}), tmp, False)
        pre = model.pretrained_cfg["hf_preprocessing"]
        if pre.get("file"):  # named as the directory it came from, not the temporary copy
            pre["file"] = f"{_join(cfg.name, PREPROCESSOR)} (stored in the checkpoint)"
        model.quantcore_definition = {"source": self.name, "files": files}
        return model.eval()


def _definition_files(local: str) -> dict[str, str]:
    """``{file name: text}`` of the files that define the model apart from its weights (``config.json``,
    ``preprocessor_config.json`` when present)."""
    out = {}
    for file in (CONFIG, PREPROCESSOR):
        path = os.path.join(local, file)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out[file] = f.read()
    return out


@contextlib.contextmanager
def stored_definition(files: dict[str, str]) -> Iterator[str]:
    """A temporary directory holding a checkpoint's stored definition files (``config.json`` ...), for
    rebuilding its model without the original directory."""
    with tempfile.TemporaryDirectory(prefix="quantcore-hf-def-") as tmp:
        for file, text in files.items():
            if file not in (CONFIG, PREPROCESSOR):  # only the names this source writes
                continue
            with open(os.path.join(tmp, file), "w", encoding="utf-8") as f:
                f.write(text)
        yield tmp


def _join(name: str, file: str) -> str:
    return f"{name.rstrip('/')}/{file}"


def looks_like_path(name: str) -> bool:
    """Whether ``model.name`` reads as a filesystem path (absolute, ``./``, ``../``, ``~``, a trailing
    separator) rather than a registry name such as ``vit_base_patch16_224``."""
    return name.startswith(("/", "./", "../", "~", "file://")) or name.endswith(("/", os.sep)) or name in (".", "..")


def _is_timm_name(name: str) -> bool:
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return bool(timm.is_model(name))


def _check_input_size(model: nn.Module, pcfg: dict[str, Any], name: str, config) -> None:
    """ModelError naming ``preprocessor_config.json`` and ``config.json`` when the processor's output size
    is not ``config.json``'s ``image_size`` and the model refuses it (ViT and friends check the size in
    their first forward; ConvNets take any size). Only that case costs a forward pass (zeros, batch 1)."""
    from ..models import ModelError

    chans, h, w = pcfg["input_size"]
    image_size = getattr(config, "image_size", None)
    want = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    if image_size is None or (int(want[0]), int(want[-1])) == (h, w):
        return
    was_training = model.training
    model.eval()  # BatchNorm in train mode refuses batch 1
    try:
        with torch.no_grad():
            model(torch.zeros(1, chans, h, w))
    except (RuntimeError, ValueError, AssertionError) as err:
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        src = pcfg["hf_preprocessing"]["file"] or f"{CONFIG} image_size"
        raise ModelError(f"{src}: size/crop_size give {h}x{w} inputs, but {type(model).__name__} of "
                         f"{_join(name, CONFIG)} (image_size {image_size}) does not take them ({msg})") from None
    finally:
        model.train(was_training)


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
            # an object key is not a path: a '' (from '//'), '.' or '..' segment would land the file at
            # another place, outside the temporary folder too (an absolute path, or above it)
            if any(seg in ("", ".", "..") for seg in rel.split("/")):
                raise ModelError(f"model.name {name}: object key {uri!r} has an empty, '.' or '..' path segment; "
                                 f"it cannot be placed in a model folder (rename or remove it)")
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


def _weight_files(local: str, name: str, wfile: str) -> list[str]:
    """The weight files of ``wfile`` (itself, or the shards its ``.index.json`` lists); ModelError naming
    the index for unreadable JSON, no ``weight_map`` or a missing shard."""
    from ..models import ModelError

    if not wfile.endswith(".index.json"):
        return [wfile]
    where = _join(name, wfile)
    try:
        with open(os.path.join(local, wfile), encoding="utf-8") as f:
            wmap = json.load(f).get("weight_map")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelError(f"{where}: not a readable shard index ({err})") from None
    if not isinstance(wmap, dict) or not wmap:
        raise ModelError(f"{where}: weight_map missing or empty (a save_pretrained shard index maps keys to files)")
    shards = sorted({str(v) for v in wmap.values()})
    absent = [f for f in shards if not os.path.isfile(os.path.join(local, f))]
    if absent:
        raise ModelError(f"{where}: weight_map names {absent[:3]}, not in the directory")
    return shards


def _check_weight_files(local: str, name: str, wfile: str) -> None:
    """Refuse truncated, empty or foreign weight files before transformers reads them (its own errors are a
    Rust exception or a bare errno): ModelError naming the file. Reads safetensors headers and zip
    directories only."""
    import zipfile

    from safetensors import safe_open

    from ..models import ModelError

    for f in _weight_files(local, name, wfile):
        path, where = os.path.join(local, f), _join(name, f)
        if os.path.getsize(path) == 0:
            raise ModelError(f"{where}: empty file")
        if f.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as st:
                    st.keys()
            except Exception as err:  # SafetensorError (Rust) has no Python base class but Exception
                why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                raise ModelError(f"{where}: not a readable safetensors file ({why}; truncated or not "
                                 "safetensors)") from None
            continue
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head == b"PK" and not zipfile.is_zipfile(path):  # torch.save zip without its directory: cut short
            raise ModelError(f"{where}: a truncated torch.save archive (zip directory missing)")


def _quiet_transformers():
    """Context: transformers' logging at error level (its multi-line LOAD REPORT table is a warning;
    quantcore raises its own one-line error from the loading info instead)."""
    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet():
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)

    return quiet()


def _shape(s) -> list[int]:
    return [int(d) for d in s] if s is not None else []


def _mismatch_message(where: str, cls, config, mismatched: list, overrides: dict | None = None) -> str:
    """One line for weights whose shapes differ from what ``config.json`` builds: each key with both shapes,
    and the config field when it is the classifier (num_labels) or the input channels (num_channels)."""
    items = []
    for m in mismatched:
        if isinstance(m, (tuple, list)) and len(m) == 3:
            key, ckpt, model = m
            items.append((str(key), _shape(ckpt), _shape(model)))
        else:
            items.append((str(m), [], []))
    items.sort()
    parts = [f"{k} {c} in the file, {m} for the config" if c else k for k, c, m in items[:4]]
    more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
    hint = ""
    n_labels = int(getattr(config, "num_labels", 0) or 0)
    head = [(k, c, m) for k, c, m in items if c and m and c[0] != m[0] and m[0] == n_labels
            and any(w in k for w in ("classifier", "head", "fc."))]
    if head:
        hint = (f" - {CONFIG} num_labels is {n_labels} (id2label/label2id) but the weights have a "
                f"{head[0][1][0]}-class head")
    elif any(len(c) == 4 and len(m) == 4 and c[1] != m[1] and m[1] == getattr(config, "num_channels", None)
             for _, c, m in items):
        hint = f" - {CONFIG} num_channels is {config.num_channels}, the weights take {items[0][1][1]} channels"
    else:
        hint = f" - {CONFIG} does not describe these weights (a width or count field such as hidden_size differs)"
    if overrides:  # the config was changed by the recipe: the mismatch may be the recipe's doing
        hint += (f" - model.kwargs {dict(sorted(overrides.items()))} override {CONFIG}: check them first")
    return f"{where} does not match {cls.__name__} of {CONFIG}: shapes differ: {'; '.join(parts)}{more}{hint}"


def _from_pretrained(cls, local: str, name: str, config, overrides: dict | None = None) -> nn.Module:
    """``cls.from_pretrained`` in FP32 from the local directory; every weight must match exactly: ModelError
    naming the weights file and the keys (with shapes, and the config field where it is clear; a field
    that ``model.kwargs`` (``overrides``) set is named as that kwarg)."""
    from ..models import ModelError

    wfile = _weights_file(local)
    if wfile == "no weights file":
        raise ModelError(f"model.name {name}: no weights file ({' / '.join(WEIGHT_FILES)}) next to {CONFIG}")
    where = _join(name, wfile)
    _check_weight_files(local, name, wfile)
    import transformers
    from packaging.version import Version

    # FP32 whatever the file stores; transformers < 4.56 calls the argument torch_dtype
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        # ignore_mismatched_sizes: report mismatches in the loading info (checked below) instead of raising
        # "look at the above report"; nothing mismatched is ever kept
        with _quiet_transformers():
            model, info = cls.from_pretrained(local, config=config, local_files_only=True, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **{dtype_kw: torch.float32})
    except Exception as err:  # OSError / RuntimeError / ValueError / SafetensorError / unpickling errors
        if not isinstance(err, (OSError, RuntimeError, ValueError, EOFError, KeyError)) and \
                type(err).__name__ not in ("SafetensorError", "UnpicklingError"):
            raise
        msg = " ".join(str(err).split())[:300]
        raise ModelError(f"{where}: transformers could not load it into {cls.__name__}: {msg}") from None
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        raise ModelError(_mismatch_message(where, cls, config, mismatched, overrides))
    bad = {k: sorted(str(x) for x in (info.get(k) or [])) for k in ("missing_keys", "unexpected_keys")}
    if any(bad.values()):
        parts = [f"{k.split('_')[0]} {v[:5]}{' ...' if len(v) > 5 else ''}" for k, v in bad.items() if v]
        # another layer count: whole layers extra or missing at the end, on one side only (never layer 0;
        # a bias or a block that differs in every layer is another mismatch)
        sides = [v for v in bad.values() if v]
        idx = [re.search(r"\.(\d+)\.", k) for v in sides for k in v]
        layered = len(sides) == 1 and all(idx) and min(int(m.group(1)) for m in idx) > 0
        hint = f" - {CONFIG} has another layer count (num_hidden_layers / depths) than the weights" if layered else ""
        raise ModelError(f"{where} does not match {cls.__name__} of {CONFIG}: {'; '.join(parts)}{hint}")
    return model


# ------------------------------------------------------------------------------------ preprocessing
# Image processor classes (name without transformers' ``Pil``/``Fast`` backend suffix) whose ``preprocess``
# quantcore reproduces, and what each does beyond resize -> optional centre crop -> rescale -> normalize:
# "no_crop": ignores do_center_crop; "levit": shortest_edge becomes int(256/224 * shortest_edge);
# "convnext"/"poolformer": their crop_pct resize; "efficientnet": rescale_offset and include_top;
# "mobilevit": no normalize step at all, do_flip_channel_order.
PROCESSORS = {
    "ViTImageProcessor": "plain", "DeiTImageProcessor": "plain", "BeitImageProcessor": "plain",
    "BitImageProcessor": "plain", "CLIPImageProcessor": "plain", "MobileNetV1ImageProcessor": "plain",
    "MobileNetV2ImageProcessor": "plain", "PvtImageProcessor": "plain", "SiglipImageProcessor": "plain",
    "SegformerImageProcessor": "no_crop", "LevitImageProcessor": "levit", "ConvNextImageProcessor": "convnext",
    "PoolFormerImageProcessor": "poolformer", "EfficientNetImageProcessor": "efficientnet",
    "MobileViTImageProcessor": "mobilevit",
}
# processor fields read below (beyond these, a class's own: crop_pct, rescale_offset, include_top,
# do_flip_channel_order); default_to_square is already folded into ``size`` by transformers
_READ = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
         "do_normalize", "image_mean", "image_std", "default_to_square", "do_convert_rgb"}
_CLASS_READ = {"convnext": {"crop_pct"}, "poolformer": {"crop_pct"}, "efficientnet": {"rescale_offset", "include_top"},
               "mobilevit": {"do_flip_channel_order"}}
# fields that do not change the pixels of one RGB image: call plumbing, segmentation maps, padding size
# without padding (do_convert_rgb is read: it composites transparent images onto white)
_INERT = {"input_data_format", "device", "return_tensors", "disable_grouping", "image_seq_length",
          "do_reduce_labels", "pad_size", "data_format"}
# resample values quantcore reproduces (timm resizes with PIL; transformers' torchvision backend with the
# same filters; box / hamming / lanczos differ between transformers' backends and versions)
_INTERP_OK = ("nearest", "bilinear", "bicubic")


def _processor_kind(proc) -> tuple[str, str | None]:
    """(class name, PROCESSORS kind or None) of an image processor instance."""
    cls = type(proc).__name__
    base = cls.removesuffix("Fast").removesuffix("Pil")
    return cls, PROCESSORS.get(base)


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


def _size(val, field: str = "size", where: str = "") -> dict[str, int]:
    if val is None:
        return {}
    if isinstance(val, int) and not isinstance(val, bool):
        return {"height": val, "width": val}
    try:
        items = dict(val).items()  # a dict, or transformers' SizeDict
    except (TypeError, ValueError):
        items = None
    if items is None or not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0)
                                for _, v in items):
        from ..models import ModelError

        raise ModelError(f"{where}: {field} {val!r} is not a positive integer or a mapping of positive integers "
                         "({height, width} or {shortest_edge})")
    return {k: int(v) for k, v in items if v is not None}


def _interp(resample, where: str = "") -> str:
    val = getattr(resample, "value", resample)
    if isinstance(val, str):
        return {"nearest-exact": "nearest"}.get(val.lower(), val.lower())
    if not isinstance(val, int) or isinstance(val, bool):
        from ..models import ModelError

        raise ModelError(f"{where}: resample {val!r} is not a PIL resampling code (0 nearest, 2 bilinear, 3 bicubic) "
                         "or a name")
    return _RESAMPLE.get(int(val), f"PIL code {val}")


def _positive(val, field: str, where: str) -> float:
    """A processor field that must hold one positive number (rescale_factor, crop_pct)."""
    from ..models import ModelError

    num = _floats(val, field, where, one=True)[0]
    if num <= 0:
        raise ModelError(f"{where}: {field} {val} must be positive")
    return num


def _floats(val, field: str, where: str, one: bool = False) -> list[float]:
    """A processor field that holds a number, or (``one`` False) a flat list of numbers; ModelError naming the
    field otherwise (a string, a nested list, null)."""
    from ..models import ModelError

    seq = [val] if one or isinstance(val, (int, float)) else val
    if isinstance(seq, (list, tuple)) and seq and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in seq):
        return [float(v) for v in seq]
    raise ModelError(f"{where}: {field} {val!r} is not {'a number' if one else 'a number or a flat list of numbers'}")


def _crop_pct(pairs: list[tuple[int, int]]) -> float | None:
    """One crop_pct with ``floor(crop / crop_pct) == scaled`` for every (crop, scaled) pair - how timm's
    eval transform derives the resize from the crop - or None when no single value does."""
    lo = max(c / (s + 1) for c, s in pairs)
    hi = min(c / s for c, s in pairs)
    for pct in (hi, math.nextafter(hi, 0.0), (lo + hi) / 2):
        if pct > lo and all(math.floor(c / pct) == s for c, s in pairs):
            return pct
    return None


def _geometry(kind: str, g, where: str) -> tuple[tuple[int, int], float, str]:
    """(input H x W, crop_pct, crop_mode) for timm's eval transform that does what the processor's resize
    and centre crop do; ModelError naming ``where`` and the field for what timm's transform cannot do."""
    from ..models import ModelError

    size, crop = _size(g("size"), "size", where), _size(g("crop_size"), "crop_size", where)
    if not g("do_resize", True):
        raise ModelError(f"{where}: do_resize is false - the processor feeds each image at its own size, which "
                         "quantcore cannot reproduce with fixed-size batches; set do_resize: true with size")
    do_crop = bool(g("do_center_crop", False)) and kind != "no_crop"
    if do_crop and set(crop) != {"height", "width"}:
        raise ModelError(f"{where}: crop_size {crop} must be {{height, width}} when do_center_crop is true")
    hw_keys, short_keys = {"height", "width"}, {"shortest_edge"}
    if set(size) not in (hw_keys, short_keys):
        raise ModelError(f"{where}: size {size} is neither {{height, width}} nor {{shortest_edge}} (the two "
                         "resizes quantcore reproduces)")
    # resize: ("squash", h, w) or ("short", shortest edge); implied: a crop the resize itself makes (ConvNeXt)
    implied = None
    if kind == "convnext":
        pct = g("crop_pct")
        if "shortest_edge" not in size or pct is None:
            raise ModelError(f"{where}: ConvNeXt's processor needs size {{shortest_edge}} and crop_pct "
                             f"(got size {size}, crop_pct {pct})")
        s = size["shortest_edge"]
        pct = _positive(pct, "crop_pct", where)
        if s < 384:  # its rule: below 384, shorter side to int(s / crop_pct) then crop s x s; else warp to s x s
            resize, implied = ("short", int(s / pct)), (s, s)
        else:
            resize = ("squash", s, s)
    elif kind == "poolformer" and g("crop_pct") is not None:
        pct = _positive(g("crop_pct"), "crop_pct", where)
        if "shortest_edge" in size:
            resize = ("short", int(size["shortest_edge"] / pct))
        elif size["height"] == size["width"]:  # a square size keeps the aspect ratio in PoolFormer's resize
            resize = ("short", int(size["height"] / pct))
        else:
            resize = ("squash", int(size["height"] / pct), int(size["width"] / pct))
    elif "shortest_edge" in size:
        s = size["shortest_edge"]
        resize = ("short", int((256 / 224) * s) if kind == "levit" else s)
    else:
        resize = ("squash", size["height"], size["width"])

    final = (crop["height"], crop["width"]) if do_crop else implied
    if implied is not None and final != implied and (final[0] > implied[0] or final[1] > implied[1]):
        raise ModelError(f"{where}: crop_size {crop} is larger than the {implied[0]}x{implied[1]} crop of size "
                         f"{size} and crop_pct")
    if resize[0] == "squash":
        h, w = resize[1], resize[2]
        if final is None:
            return (h, w), 1.0, "squash"
        if final[0] > h or final[1] > w:
            raise ModelError(f"{where}: crop_size {crop} is larger than the resized {h}x{w} image (the processor "
                             "would pad with zeros)")
        pct = _crop_pct([(final[0], h), (final[1], w)])
        if pct is None:
            raise ModelError(f"{where}: crop_size/size ratios differ between height and width ({crop} of {h}x{w}); "
                             "timm's eval transform takes one crop_pct")
        return final, pct, "squash"
    s = resize[1]
    if final is None:
        raise ModelError(f"{where}: size {size} without do_center_crop keeps each image's aspect ratio, so inputs "
                         "vary in size; quantcore batches fixed-size inputs: set do_center_crop with crop_size")
    if final[0] != final[1]:
        raise ModelError(f"{where}: crop_size {crop} is not square; after a shortest_edge resize timm's eval "
                         "transform crops squares only")
    if final[0] > s:
        raise ModelError(f"{where}: crop_size {crop} is larger than the resized shorter side {s} (the processor "
                         "would pad with zeros)")
    return final, _crop_pct([(final[0], s)]), "center"


def _statistics(kind: str | None, g, chans: int, where: str) -> tuple[list[float], list[float]]:
    """timm (mean, std) for ``x / 255`` that give the processor's rescale + normalize, per channel.

    The processor computes ``((x * r + offset) - m) / s / s2`` (r = rescale_factor when do_rescale,
    offset -1 with EfficientNet's rescale_offset, m/s = image_mean/std when normalizing, s2 = image_std
    again with EfficientNet's include_top), which is ``(x / 255 - mean) / std`` with mean = (m - offset) /
    (255 r) and std = s * s2 / (255 r)."""
    from ..models import ModelError

    def per_channel(field: str) -> list[float]:
        val = g(field)
        if val is None:  # the processor itself refuses to normalize without them
            raise ModelError(f"{where}: {field} is null while the processor normalizes (do_normalize); give "
                             f"the model's mean/std, or set do_normalize: false")
        vals = _floats(val, field, where)
        if len(vals) not in (1, chans):
            raise ModelError(f"{where}: {field} has {len(vals)} values, the model has {chans} input channels "
                             f"({CONFIG} num_channels)")
        return vals * chans if len(vals) == 1 else vals

    r = _positive(g("rescale_factor", 1 / 255), "rescale_factor", where) if g("do_rescale", True) else 1.0
    offset = -1.0 if kind == "efficientnet" and g("do_rescale", True) and g("rescale_offset", False) else 0.0
    # MobileViT's processor has no normalize step whatever do_normalize says; None counts as off elsewhere
    normalize = bool(g("do_normalize", False)) and kind != "mobilevit"
    m = per_channel("image_mean") if normalize else [0.0] * chans
    s = per_channel("image_std") if normalize else [1.0] * chans
    s2 = per_channel("image_std") if kind == "efficientnet" and g("include_top", False) else [1.0] * chans
    if any(v == 0 for v in s + s2):
        raise ModelError(f"{where}: image_std has a zero")
    k = 255.0 * r
    return [(mi - offset) / k for mi in m], [si * s2i / k for si, s2i in zip(s, s2)]


def _refuse_unread(proc, kind: str, where: str) -> None:
    """ModelError naming the first processor field that changes pixels but is not reproduced here."""
    from ..models import ModelError

    names = getattr(proc, "_valid_kwargs_names", None) or getattr(proc, "_valid_processor_keys", None) or []
    read = _READ | _CLASS_READ.get(kind, set())
    for field in names:
        val = getattr(proc, field, None)
        if field in read or val is None or val is False:
            continue
        if field == "data_format" and str(getattr(val, "value", val)) in ("channels_first", "ChannelDimension.FIRST"):
            continue
        if field in _INERT and field != "data_format":
            continue
        raise ModelError(f"{where}: {field} {val!r} of {type(proc).__name__} is not reproduced by quantcore "
                         "(its output would differ from the processor's); remove it or set it off")


def hf_data_config(local: str, name: str, config, arch: str | None) -> dict[str, Any]:
    """timm-style ``pretrained_cfg`` (input_size, mean, std, interpolation, crop_pct, crop_mode) that makes
    :func:`quantcore.data.transforms.eval_transform` do what the directory's ``preprocessor_config.json``
    processor does, or, without one, the model type's processor statistics at ``image_size``.
    ``hf_preprocessing`` records the file, the processor class, the channel flip and notes.

    Raises ModelError naming the file, the processor class and the field for a processor class not in
    :data:`PROCESSORS` or a setting quantcore does not reproduce exactly (padding, no resize, a
    shortest_edge resize without crop, box/hamming/lanczos resampling, a mean/std of another length)."""
    from ..models import ModelError

    chans = int(getattr(config, "num_channels", 3) or 3)
    image_size = getattr(config, "image_size", None)
    if isinstance(image_size, (list, tuple)):
        img_hw = (int(image_size[0]), int(image_size[-1]))
    else:
        img_hw = (int(image_size), int(image_size)) if image_size else (224, 224)
    path = os.path.join(local, PREPROCESSOR) if local else None  # None: no directory to read it from
    where = _join(name, PREPROCESSOR)
    notes: list[str] = []
    if path is not None and os.path.isfile(path):
        from transformers import AutoImageProcessor

        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
            proc = AutoImageProcessor.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            msg = " ".join(str(err).split())[:600]
            raise ModelError(f"{where}: not a readable image processor config ({msg})") from None
        file = where
    else:
        proc = _default_processor(config.model_type)
        file = None
        notes.append(f"no {PREPROCESSOR}: {type(proc).__name__ if proc else 'no processor'} defaults for "
                     f"model_type {config.model_type!r}, image squashed to {CONFIG} image_size {list(img_hw)}")
        # said, not only recorded: processors that resize the short side and crop (DINOv2, CLIP, MobileViT)
        # would have been fed other pixels; the directory's own file is the reference
        log.warning("%s: %s; add the model's %s (its processor's save_pretrained) for its own resize and crop",
                    name, notes[-1], PREPROCESSOR)

    cls, kind = _processor_kind(proc) if proc is not None else ("no processor", None)
    where_cls = f"{where} ({cls})"
    if file is not None and kind is None:
        raise ModelError(f"{where}: image processor {cls} is not one quantcore reproduces "
                         f"({', '.join(sorted(PROCESSORS))}); its resize/crop/normalize would only be approximated")
    if file is None and proc is not None and kind is None:
        notes.append(f"{cls} is not a processor quantcore reproduces: only its image_mean/image_std are used")
    g = (lambda k, d=None: getattr(proc, k, d) if proc is not None else d)
    if file is not None:
        _refuse_unread(proc, kind, where_cls)
        hw, pct, mode = _geometry(kind, g, where_cls)
    else:
        hw, pct, mode = img_hw, 1.0, "squash"
    interp = _interp(g("resample", 2), where_cls)
    if interp not in _INTERP_OK and file is not None:
        raise ModelError(f"{where_cls}: resample {interp} is not reproduced (transformers' backends differ "
                         f"there); quantcore reproduces {', '.join(_INTERP_OK)} (PIL codes 0, 2, 3)")
    mean, std = _statistics(kind, g, chans, where_cls)
    flip = bool(g("do_flip_channel_order", False)) and kind in ("mobilevit", None)
    # transformers' convert_to_rgb puts transparent pixels on white; without it RGBA arrays keep their colour
    alpha = "white" if g("do_convert_rgb", False) else "drop"
    if flip:  # HF flips before normalizing; our flip runs after, so the statistics swap places
        mean[:3], std[:3] = mean[:3][::-1], std[:3][::-1]
    return {
        "input_size": (chans, int(hw[0]), int(hw[1])), "mean": tuple(mean), "std": tuple(std),
        "interpolation": interp, "crop_pct": float(pct), "crop_mode": mode,
        "num_classes": int(config.num_labels), "architecture": arch or config.model_type,
        "hf_preprocessing": {"file": file, "processor": cls if proc is not None else None,
                             "flip_channel_order": flip, "alpha": alpha, "notes": notes},
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
