"""Model families: detection and per-family defaults.

Dispatch walks the class MRO (``isinstance``-like, torchao style), never exact ``type(m) is X``, so
subclasses of timm/torchvision classes are recognized too.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..nn.attention import is_timm_attention
from ..nn.residual import is_timm_block

FAMILIES = ("vit", "cnn", "generic")

#: Module globs left float by default (``PlacementConfig.keep_float = None``). A glob also covers
#: the matched module's descendants. With the default, the vit family also leaves every layer other
#: than ``nn.Linear`` float (e.g. convolutions inside blocks); the cnn and generic families quantize
#: every Linear/Conv1d/Conv2d. An explicit ``keep_float`` list replaces all of these defaults.
DEFAULT_KEEP_FLOAT: dict[str, list[str]] = {
    "vit": ["patch_embed", "head", "head_dist", "attn_pool"],
    "cnn": [],
    "generic": [],
}


def _mro_names(obj: object) -> set[tuple[str, str]]:
    return {(k.__module__, k.__qualname__) for k in type(obj).__mro__}


def _has_class(obj: object, module: str, qualname: str) -> bool:
    return (module, qualname) in _mro_names(obj)


def is_vit_model(model: nn.Module) -> bool:
    """timm VisionTransformer and subclasses (VisionTransformerDistilled / DeiT, ...)."""
    return _has_class(model, "timm.models.vision_transformer", "VisionTransformer")


def is_torchvision_resnet(model: nn.Module) -> bool:
    return _has_class(model, "torchvision.models.resnet", "ResNet")


def is_patch_embed(mod: nn.Module) -> bool:
    return (_has_class(mod, "timm.layers.patch_embed", "PatchEmbed")
            or _has_class(mod, "timm.layers.hybrid_embed", "HybridEmbed"))


def is_batchnorm(mod: nn.Module) -> bool:
    return isinstance(mod, _BatchNorm) or _has_class(mod, "torchvision.ops.misc", "FrozenBatchNorm2d")


def _convs_outside_patch_embed(model: nn.Module) -> list[str]:
    embeds = [n for n, m in model.named_modules() if n and (is_patch_embed(m) or n.split(".")[-1] == "patch_embed")]
    out = []
    for n, m in model.named_modules():
        if isinstance(m, _ConvNd) and not any(n == e or n.startswith(e + ".") for e in embeds):
            out.append(n)
    return out


def detect_family(model: nn.Module) -> str:
    """``"vit"``, ``"cnn"`` or ``"generic"``.

    * vit: a timm VisionTransformer (incl. DeiT distilled), or a model whose only convolutions are a
      patch embedding and that contains timm ``Attention``;
    * cnn: torchvision ResNet/ResNeXt, conv nets with BatchNorm, and conv nets containing timm
      ``Attention`` (MobileViT: its attentions still get the vit attention treatment);
    * generic: anything else.
    """
    if is_vit_model(model):
        return "vit"
    modules = [m for _, m in model.named_modules()]
    has_attn = any(is_timm_attention(m) for m in modules)
    convs = _convs_outside_patch_embed(model)
    if has_attn:
        return "cnn" if convs else "vit"
    if is_torchvision_resnet(model):
        return "cnn"
    if convs and any(is_batchnorm(m) for m in modules):
        return "cnn"
    return "generic"


def transformer_scopes(model: nn.Module) -> list[str]:
    """Module names whose subtrees are transformer blocks: timm ``Block`` instances, plus the parent
    of every timm ``Attention`` outside such a block. Mode-dependent placement (ft1/ft2 weight
    granularity, GEMM-output quantizers) applies to the Linears inside these scopes."""
    blocks = [n for n, m in model.named_modules() if n and is_timm_block(m)]
    scopes = list(blocks)
    for n, m in model.named_modules():
        if not is_timm_attention(m):
            continue
        if any(n.startswith(b + ".") for b in blocks):
            continue
        parent = n.rpartition(".")[0]
        if parent not in scopes:
            scopes.append(parent)
    return scopes


def in_scope(name: str, scopes: list[str]) -> bool:
    for s in scopes:
        if s == "" or name == s or name.startswith(s + "."):
            return True
    return False
