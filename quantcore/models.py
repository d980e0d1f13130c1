"""Build FP32 models from a :class:`ModelConfig`: timm, torchvision, or quantcore's own builders.

Weights come from (in order): ``checkpoint`` (local path / file:// / s3:// state_dict), a timm
``pretrained_cfg`` overlay file (``pretrained_file``), or the library's pretrained weights.
"""
from __future__ import annotations

import io
from typing import Callable

import torch
from torch import nn

from .config import ModelConfig

BUILDERS: dict[str, Callable[..., nn.Module]] = {}


class ModelError(ValueError):
    """A model could not be built or its weights could not be loaded."""


def register_builder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model builder under ``name`` (plain dict registry, as in timm)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BUILDERS[name] = fn
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


def create_model(cfg: ModelConfig, load_weights: bool = True) -> nn.Module:
    """The FP32 model described by ``cfg``, in eval mode. ``load_weights=False`` skips weights
    (used when a quantized checkpoint supplies every tensor)."""
    name, source = cfg.name, cfg.source
    if name.startswith("torchvision:"):
        source, name = "torchvision", name.split(":", 1)[1]
    elif name.startswith("timm:"):
        source, name = "timm", name.split(":", 1)[1]
    pretrained = cfg.pretrained and load_weights and cfg.checkpoint is None
    if name in BUILDERS:
        model = BUILDERS[name](**_kwargs(cfg))
        if pretrained:
            raise ModelError(f"model {name}: builtin builder has no pretrained weights; set model.checkpoint")
    elif source == "torchvision":
        model = _torchvision(name, cfg, pretrained)
    else:
        model = _timm(name, cfg, pretrained and load_weights)
    if load_weights and cfg.checkpoint:
        load_state_dict_uri(model, cfg.checkpoint)
    return model.eval()


def _timm(name: str, cfg: ModelConfig, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelError(f"model.name {name!r} is neither a timm model, 'torchvision:<name>', nor a builder "
                         f"({', '.join(sorted(BUILDERS))})")
    kw = _kwargs(cfg)
    if cfg.pretrained_file:
        # timm's own overlay mechanism: weights from a local file, preprocessing from the timm config.
        kw["pretrained_cfg_overlay"] = {"file": cfg.pretrained_file.removeprefix("file://")}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=pretrained, **kw)
    except Exception as err:  # hub downloads fail offline: say what to do instead
        raise ModelError(f"could not build timm model {name!r} (pretrained={pretrained}): {err}. "
                         "Offline? Point model.checkpoint or model.pretrained_file at a local/s3 file.") from err


def _torchvision(name: str, cfg: ModelConfig, pretrained: bool) -> nn.Module:
    import torchvision

    kw = dict(cfg.kwargs)
    if cfg.num_classes is not None:
        kw["num_classes"] = cfg.num_classes
    try:
        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
    except ValueError as err:
        raise ModelError(f"model.name torchvision:{name}: {err}") from None
    except Exception as err:
        raise ModelError(f"could not build torchvision model {name!r} (pretrained={pretrained}): {err}. "
                         "Offline? Point model.checkpoint at a local/s3 state_dict.") from err


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A plain state_dict from a local/s3 file (``{'state_dict': ...}`` / ``{'model': ...}`` unwrapped)."""
    from .io import storage

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise ModelError(f"model.checkpoint {uri}: not found") from err
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"model.checkpoint {uri}: not a readable torch state_dict ({err})") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"model.checkpoint {uri}: expected a mapping of tensor names to tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_uri(model: nn.Module, uri: str) -> None:
    sd = read_state_dict(uri)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ModelError(f"model.checkpoint {uri} does not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
