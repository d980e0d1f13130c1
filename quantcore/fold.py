"""BatchNorm folding: merge eval-mode BatchNorm into the preceding convolution.

``conv -> bn`` pairs are found with ``torch.fx`` where the model (or a submodule) traces: a conv
call whose *only* user is a BatchNorm call. Where tracing fails (shape-dependent control flow, as in
timm's MobileViT block), the parent's children are paired in declaration order (a conv immediately
followed by a BatchNorm with as many channels: torchvision ``conv1``/``bn1``,
``downsample.0``/``downsample.1``, timm ``ConvNormAct.conv``/``.bn``) and tracing is retried one
level down. Pass ``example_input`` to verify the folded model against the original.

A plain BatchNorm is replaced by ``nn.Identity``; timm's ``BatchNormAct2d`` (BN + drop + activation)
by ``nn.Sequential(drop, act)``, keeping its activation.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.utils._pytree import tree_flatten

try:
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover
    FrozenBatchNorm2d = None  # type: ignore[assignment]

try:
    from timm.layers.norm_act import BatchNormAct2d
except ImportError:  # pragma: no cover
    BatchNormAct2d = None  # type: ignore[assignment]

__all__ = ["fold_batchnorm", "find_conv_bn_pairs", "FoldError"]


class FoldError(RuntimeError):
    """Folding is impossible or changed the model's outputs."""


# -- what can be folded ------------------------------------------------------------------------
def _has_base(mod: nn.Module, base: type | None) -> bool:
    return base is not None and any(k is base for k in type(mod).__mro__)


def _is_conv(mod: nn.Module) -> bool:
    return isinstance(mod, _ConvNd) and not mod.transposed


def _is_bn(mod: nn.Module) -> bool:
    """A BatchNorm whose forward we know: plain ``_BatchNorm`` subclasses, timm BatchNormAct2d,
    torchvision FrozenBatchNorm2d."""
    if _has_base(mod, BatchNormAct2d):
        return type(mod).forward is BatchNormAct2d.forward
    if _has_base(mod, FrozenBatchNorm2d):
        return type(mod).forward is FrozenBatchNorm2d.forward
    if isinstance(mod, _BatchNorm):
        return type(mod).forward is _BatchNorm.forward
    return False


def _bn_features(bn: nn.Module) -> int:
    return int(bn.running_mean.numel()) if getattr(bn, "running_mean", None) is not None else -1


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not (_is_conv(conv) and _is_bn(bn)):
        return False
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return False  # no running statistics: normalizes with batch statistics even in eval mode
    return conv.out_channels == _bn_features(bn)


# -- finding pairs -----------------------------------------------------------------------------
class _LeafTracer(torch.fx.Tracer):
    """Convs and BatchNorms (including timm/torchvision subclasses) are leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _is_conv(m) or _is_bn(m) or isinstance(m, _BatchNorm):
            return True
        return super().is_leaf_module(m, qualname)


def _pairs_from_graph(graph: torch.fx.Graph, root: nn.Module) -> list[tuple[str, str]]:
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        conv = root.get_submodule(node.target)
        if not _is_conv(conv) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or calls[user.target] != 1:
            continue
        if len(user.args) < 1 or user.args[0] is not node or user.kwargs:
            continue
        bn = root.get_submodule(user.target)
        if _foldable(conv, bn):
            pairs.append((node.target, user.target))
    return pairs


def _find_pairs(module: nn.Module, prefix: str, out: list[tuple[str, str]]) -> None:
    try:
        graph = _LeafTracer().trace(module)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to declaration order
        graph = None
    if graph is not None:
        for c, b in _pairs_from_graph(graph, module):
            out.append((prefix + c, prefix + b))
        return
    children = list(module.named_children())
    for (n1, m1), (n2, m2) in zip(children, children[1:]):
        if _foldable(m1, m2):
            out.append((prefix + n1, prefix + n2))
    for n, m in children:
        if not (_is_conv(m) or _is_bn(m)):
            _find_pairs(m, prefix + n + ".", out)


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` for every foldable conv->BatchNorm pair (see module docstring)."""
    found: list[tuple[str, str]] = []
    if _is_conv(model) or _is_bn(model):
        return found
    _find_pairs(model, "", found)
    # A module reachable under several names (shared) is never folded: folding would change the
    # other uses too.
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    seen: set[str] = set()
    pairs = []
    for c, b in found:
        if c in seen or b in seen:
            continue
        if counts.get(id(model.get_submodule(c)), 0) != 1 or counts.get(id(model.get_submodule(b)), 0) != 1:
            continue
        seen.update((c, b))
        pairs.append((c, b))
    return pairs


# -- folding -----------------------------------------------------------------------------------
def _bn_replacement(bn: nn.Module) -> nn.Module:
    if _has_base(bn, BatchNormAct2d):
        parts = OrderedDict()
        for key in ("drop", "act"):
            sub = getattr(bn, key, None)
            if isinstance(sub, nn.Module) and not isinstance(sub, nn.Identity):
                parts[key] = sub
        return nn.Sequential(parts) if parts else nn.Identity()
    return nn.Identity()


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    w = conv.weight
    mean = bn.running_mean.to(torch.float64)
    var = bn.running_var.to(torch.float64)
    gamma = bn.weight.to(torch.float64) if getattr(bn, "weight", None) is not None else torch.ones_like(mean)
    beta = bn.bias.to(torch.float64) if getattr(bn, "bias", None) is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + float(bn.eps))
    b = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(mean)
    # Per-channel factors in float64; one rounding per weight element.
    w.mul_(s.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))
    new_b = ((b - mean) * s + beta).to(w.dtype)
    if conv.bias is not None:
        conv.bias.copy_(new_b)
    else:
        conv.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)


def _outputs(model: nn.Module, example_input: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    leaves, _ = tree_flatten(out)
    return [t.detach().clone() for t in leaves if isinstance(t, torch.Tensor)]


def _set(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, mod)


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor | tuple | None = None,
                   rtol: float = 1e-4, atol: float = 1e-5) -> list[tuple[str, str]]:
    """Fold every eval-mode BatchNorm that directly follows a conv into that conv, in place.

    Returns the folded ``(conv_name, bn_name)`` pairs. The model must be in eval mode (training-mode
    BatchNorm normalizes with batch statistics and cannot be folded). With ``example_input`` the
    outputs before and after are compared (``rtol``, and ``atol`` times the output's abs-max); on a
    mismatch the model is restored and :class:`FoldError` is raised.
    """
    if model.training:
        raise FoldError("fold_batchnorm needs the model in eval mode (call model.eval() first): "
                        "training-mode BatchNorm uses batch statistics and cannot be folded")
    training = [n for n, m in model.named_modules() if (_is_bn(m) or _is_conv(m)) and m.training]
    if training:
        raise FoldError(f"fold_batchnorm needs eval mode, but {training[:5]} are in training mode "
                        "(call model.eval() first)")
    pairs = find_conv_bn_pairs(model)
    if not pairs:
        return []
    reference = _outputs(model, example_input) if example_input is not None else None

    backup = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        backup.append((conv, conv.weight.detach().clone(),
                       None if conv.bias is None else conv.bias.detach().clone(), bn_name, bn))
        _fold_into(conv, bn)
        _set(model, bn_name, _bn_replacement(bn))

    if reference is not None:
        after = _outputs(model, example_input)
        bad = len(after) != len(reference)
        worst = 0.0
        for a, r in zip(after, reference):
            if a.shape != r.shape:
                bad = True
                break
            scale = float(r.abs().max()) if r.numel() and r.is_floating_point() else 1.0
            if not torch.allclose(a, r, rtol=rtol, atol=atol * max(scale, 1e-12)):
                bad = True
                worst = max(worst, float((a - r).abs().max()) / max(scale, 1e-12))
        if bad:
            with torch.no_grad():
                for conv, w, b, bn_name, bn in backup:
                    conv.weight.copy_(w)
                    if b is None:
                        conv.bias = None
                    else:
                        conv.bias.copy_(b)
                    _set(model, bn_name, bn)
            raise FoldError(f"BatchNorm folding changed the model's outputs (max error {worst:.3g} of "
                            f"the output scale; rtol={rtol}, atol={atol}); the model was restored. "
                            f"Pairs tried: {pairs[:8]}{' ...' if len(pairs) > 8 else ''}")
    return pairs
