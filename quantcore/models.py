"""Build FP32 models from a :class:`ModelConfig` through the model-source registry
(:mod:`quantcore.model_sources`: quantcore's own builders, timm, torchvision, Hugging Face directories,
Google ViT ``.npz``).

Weights come from (in order): ``checkpoint`` (local path / file:// / s3:// state_dict or safetensors), a timm
``pretrained_cfg`` overlay file (``pretrained_file``), or the library's pretrained weights.
:func:`create_model` records where they came from in ``model.quantcore_weights`` (a short string), or
``None`` when the model kept its random initialization: the pipeline warns about that, loudly.
"""
from __future__ import annotations

import io
from typing import Callable, Iterable

import torch
from torch import nn

from .config import ModelConfig
from .errors import UserError

BUILDERS: dict[str, Callable[..., nn.Module]] = {}
PRETRAINED_BUILDERS: set[str] = set()  # builders that take ``pretrained=`` and load their own weights


class ModelError(UserError):
    """A model could not be built or its weights could not be loaded."""


def register_builder(name: str,
                     pretrained: bool = False) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model builder under ``name`` (plain dict registry, as in timm).

    ``pretrained=True``: the builder takes a ``pretrained: bool`` argument and loads its own weights
    when it is true (``model.pretrained: true`` in a recipe). A builder that always loads weights may
    instead set ``model.quantcore_weights`` (where they came from) on the model it returns.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BUILDERS[name] = fn
        if pretrained:
            PRETRAINED_BUILDERS.add(name)
        else:
            PRETRAINED_BUILDERS.discard(name)
        return fn

    return deco


@register_builder("quantcore/vit_fmnist")
def vit_fmnist(num_classes: int = 10, **kwargs) -> nn.Module:
    """Small DeiT-style ViT for 28x28 grayscale images (the demo model): patch 7, width 64, depth 4."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                num_classes=num_classes)
    args.update(kwargs)
    model = VisionTransformer(**args)
    # Preprocessing travels with the model (Fashion-MNIST statistics), like timm's pretrained_cfg.
    model.pretrained_cfg = {
        "input_size": (args["in_chans"], args["img_size"], args["img_size"]),
        "mean": (0.2860,) * args["in_chans"], "std": (0.3530,) * args["in_chans"],
        "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear",
        "num_classes": num_classes, "architecture": "quantcore/vit_fmnist",
    }
    model.default_cfg = model.pretrained_cfg
    return model


def _kwargs(cfg: ModelConfig) -> dict:
    kw = dict(cfg.kwargs)
    if cfg.num_classes is not None:
        kw["num_classes"] = cfg.num_classes
    if cfg.in_chans is not None:
        kw["in_chans"] = cfg.in_chans
    if cfg.img_size is not None:
        kw["img_size"] = cfg.img_size
    return kw


def create_model(cfg: ModelConfig | None, load_weights: bool = True, seed: int | None = None) -> nn.Module:
    """The FP32 model described by ``cfg``, in eval mode. ``load_weights=False`` skips weights
    (used when a quantized checkpoint supplies every tensor). ``seed``: build under this torch seed, so a
    randomly initialized model is the same on every run; the caller's RNG state is left as it was.
    ``None`` draws from the caller's RNG (its own ``torch.manual_seed`` decides).

    The model comes from the registered source :func:`quantcore.model_sources.resolve_source` picks
    (builder, timm, torchvision, hf directory, Google ViT ``.npz``); ``model.checkpoint`` (torch
    state_dict or safetensors) is loaded on top unless the source reads it itself (``npz``).
    With ``load_weights`` the model carries ``quantcore_weights``: where its weights came from, or
    ``None`` when nothing was loaded (random initialization).
    """
    if cfg is None:
        raise ModelError("model.name: the recipe has no model: section, so there is no model to build "
                         "(add model: {name: ...}, or build the nn.Module yourself and pass it on)")
    from .model_sources import resolve_source

    source, name = resolve_source(cfg)
    if seed is None:
        model, weights = source.build(cfg, name, load_weights)
    else:
        with torch.random.fork_rng(devices=[]):  # the global RNG is the caller's: restored afterwards
            torch.manual_seed(seed)
            model, weights = source.build(cfg, name, load_weights)
    if load_weights and cfg.checkpoint and not source.consumes_checkpoint:
        weights = f"model.checkpoint {cfg.checkpoint}{load_state_dict_uri(model, cfg.checkpoint)}"
    if load_weights:
        model.quantcore_weights = weights
    return model.eval()


def read_state_dict(uri: str, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """A plain state_dict from a local/s3 file: safetensors (by suffix or header), or torch.save'd
    (``{'state_dict': ...}`` / ``{'model': ...}`` unwrapped). Wrapper prefixes (DDP ``module.``,
    torch.compile ``_orig_mod.``) are removed when every name carries them, unless the file's names are
    already ``names`` (the model's own: a model may have a submodule called ``module``)."""
    from .io import storage

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise ModelError(f"model.checkpoint {uri}: not found") from err
    from .model_sources.weights import is_safetensors, read_safetensors

    if is_safetensors(data, uri):
        return _unwrapped_names(read_safetensors(data, uri), names)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"model.checkpoint {uri}: not a readable torch state_dict ({_load_reason(err)}); "
                         "expected a torch.save'd state_dict of tensors (pickled objects are refused: loading them "
                         "runs code). A training checkpoint with other objects (hyper-parameters, a pickled model): "
                         "torch.save(ckpt['state_dict'], 'weights.pt') where you trust it, and give that") from None
    for key in _STATE_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        held = sorted(str(k) for k, v in obj.items() if isinstance(v, dict)) if isinstance(obj, dict) else []
        raise ModelError(f"model.checkpoint {uri}: expected a mapping of tensor names to tensors"
                         + (f"; the file holds {held[:6]} but none of {list(_STATE_KEYS)}: save the weights you "
                            f"want on their own (e.g. torch.save(ckpt[{held[0]!r}], 'weights.pt'))" if held else ""))
    return _unwrapped_names(obj, names)


_STATE_KEYS = ("state_dict", "model", "model_state")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def _unwrapped_names(sd: dict, names: Iterable[str] | None) -> dict:
    """The names of the module a wrapper (DDP, torch.compile, or both) held: a prefix is removed only when
    every name carries it and the names are not the model's own already."""
    if names is not None and set(sd) <= set(names):
        return sd
    sd = _without_wrappers(sd)
    if names is not None and set(sd) != set(names):
        # a training wrapper's attribute (Lightning's self.model, self.net), possibly around DDP/compile
        # names: every name under one prefix that, removed, gives exactly the model's names
        prefix = _owner_prefix(sd, names)
        if prefix is not None and all(str(k).startswith(prefix) for k in sd):
            sd = _without_wrappers({k[len(prefix):]: v for k, v in sd.items()})
    return sd


def _without_wrappers(sd: dict) -> dict:
    """``sd`` with DDP's / torch.compile's prefix removed while every name carries one."""
    for _ in range(4):
        prefix = next((p for p in _WRAPPER_PREFIXES if sd and all(str(k).startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _owner_prefix(sd: dict, names: Iterable[str]) -> str | None:
    """The first-level prefix (``'model.'``) under which the file's names, without wrapper prefixes,
    are exactly ``names``, if any."""
    want = set(names)
    for prefix in sorted({str(k).split(".", 1)[0] + "." for k in sd if "." in str(k)}):
        if set(_without_wrappers({str(k)[len(prefix):]: None for k in sd if str(k).startswith(prefix)})) == want:
            return prefix
    return None


def _check_float_values(state: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], what: str) -> None:
    """A float tensor of the model must come from a float tensor of the file: load_state_dict would cast
    int8/int64 values (a quantized or index tensor under a weight's name) into it without a word."""
    bad = [k for k, v in state.items() if k in sd and v.is_floating_point() and not sd[k].is_floating_point()]
    if bad:
        raise ModelError(f"{what}: {len(bad)} tensor(s) of the model are {sd[bad[0]].dtype} in the file (e.g. "
                         f"{bad[:3]}), not floating point: give the FP32 (or FP16/BF16) weights")


def _load_reason(err: Exception) -> str:
    """The useful part of a torch.load failure (its weights_only text is a page of advice)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        first = (rest.splitlines() or [type(err).__name__])[0]
        # torch's advice after the first sentence (add_safe_globals) would load code, which we refuse
        return first.split(" was not an allowed global", 1)[0].replace("Unsupported global: GLOBAL ",
                                                                          "it holds a pickled ")[:200]
    return (text.strip().splitlines() or [type(err).__name__])[0][:200]


def cast_note(state: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> str:
    """What loading ``sd`` into a model with ``state`` casts, for the weights' provenance: FP16/BF16 files
    lose nothing going to FP32, but the quantized model's FP32 reference is then the rounded weights."""
    casts = sorted({f"{sd[k].dtype} values, cast to {v.dtype}".replace("torch.", "") for k, v in state.items()
                    if k in sd and v.is_floating_point() and sd[k].dtype != v.dtype})
    return f" ({'; '.join(casts)})" if casts else ""


def load_state_dict_uri(model: nn.Module, uri: str) -> str:
    """Load a state_dict file (:func:`read_state_dict`) into ``model``, strictly; returns the cast note
    (:func:`cast_note`, '' when nothing was cast). ModelError naming the file on any mismatch."""
    state = model.state_dict()
    sd = read_state_dict(uri, state.keys())
    _check_float_values(state, sd, f"model.checkpoint {uri}")
    note = cast_note(state, sd)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise ModelError(f"model.checkpoint {uri} does not match the model: "
                         f"{'; '.join(lines[:3]) or err}{' ...' if len(lines) > 3 else ''}") from None
    if missing or unexpected:
        owner = _owner_prefix(sd, state.keys())
        others = [k for k in sd if owner is not None and not str(k).startswith(owner)]
        raise ModelError(f"model.checkpoint {uri} does not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}"
                         + (f"; the names under {owner!r} are exactly the model's, but the file also holds "
                            f"{len(others)} other tensor(s) (e.g. {others[:3]}): save the model's alone, e.g. "
                            f"{{k[{len(owner)}:]: v for k, v in sd.items() if k.startswith({owner!r})}}"
                            if owner is not None else "")
                         + ("; this is a calibrated quantcore checkpoint (model.qc.pt): load it with "
                            "quantcore.load or pass it as --checkpoint/-c, not as model.checkpoint"
                            if any(k.endswith((".amax", ".amin")) for k in unexpected) else "")
                         + ("; a Hugging Face model saved with save_pretrained loads from its folder instead "
                            "(model.name: <folder>, pretrained: true), where transformers maps the names it saved"
                            if hasattr(model, "save_pretrained") and hasattr(model, "config") else ""))
    return note


def has_distillation_head(model) -> bool:
    """Whether ``model`` has a DeiT distillation token with its own head: timm's ``*_distilled_*``
    models (``set_distilled_training``) or transformers' ``DeiTForImageClassificationWithTeacher``
    (``cls_classifier`` + ``distillation_classifier``)."""
    return hasattr(model, "set_distilled_training") or (
        hasattr(model, "cls_classifier") and hasattr(model, "distillation_classifier"))


def distilled_outputs(out) -> tuple:
    """``(class-token logits, distillation-token logits)`` of a model with a distillation head, in
    training: timm's tuple (``set_distilled_training(True)``) or a transformers output's
    ``cls_logits``/``distillation_logits`` (always there). Raises ValueError for anything else."""
    cls, dist = getattr(out, "cls_logits", None), getattr(out, "distillation_logits", None)
    if isinstance(cls, torch.Tensor) and isinstance(dist, torch.Tensor):
        return cls, dist
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
        return out[0], out[1]
    raise ValueError(f"expected the class and distillation heads' logits, got {type(out).__name__}")


def output_logits(out):
    """The logits tensor of a classifier's output: a tensor as is, a Hugging Face ``ModelOutput``'s
    ``.logits``, or the first item of a tuple/list (timm distilled heads in training mode)."""
    lg = getattr(out, "logits", None)
    if isinstance(lg, torch.Tensor):
        return lg
    if isinstance(out, (tuple, list)):
        return out[0]
    return out
