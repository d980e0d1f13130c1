"""Residual-add quantization for timm transformer blocks.

:class:`QuantResidualBlock` subclasses timm's pre-norm ``vision_transformer.Block`` and adopts the
original block's submodules (``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``,
``drop_path2``). It quantizes both inputs of both residual adds::

    x = residual1_quantizer(x) + branch1_quantizer(drop_path1(ls1(attn(norm1(x)))))
    x = residual2_quantizer(x) + branch2_quantizer(drop_path2(ls2(mlp(norm2(x)))))

While none of the four quantizers changes or observes its tensor, forward *is* timm's
``Block.forward`` (bit-identical output).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import PlacementError
from ..formats import QuantSpec
from ..quantizer import TensorQuantizer

try:
    from timm.models.vision_transformer import Block as _TimmBlock
except ImportError:  # pragma: no cover
    raise ImportError("quantcore.nn.residual needs timm (timm.models.vision_transformer.Block)")

TimmBlock = _TimmBlock

#: Quantizer attribute names, in execution order.
RESIDUAL_QUANTIZERS = ("residual1_quantizer", "branch1_quantizer", "residual2_quantizer",
                       "branch2_quantizer")
_REQUIRED = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def is_timm_block(mod: nn.Module) -> bool:
    """True for timm's pre-norm transformer ``Block`` and its subclasses."""
    return any(k is TimmBlock for k in type(mod).__mro__)


def check_block(mod: nn.Module, name: str = "") -> None:
    where = f"transformer block {name!r} ({type(mod).__module__}.{type(mod).__qualname__})"
    hint = "; leave its residual adds float (quantize_residual: false)" if name else ""
    if not is_timm_block(mod):
        raise PlacementError(f"{where} is not a timm vision_transformer.Block{hint}")
    if type(mod).forward is not TimmBlock.forward and not isinstance(mod, QuantResidualBlock):
        raise PlacementError(f"{where} overrides timm Block.forward; quantcore cannot quantize the "
                         f"residual adds of an unknown forward{hint}")
    missing = [a for a in _REQUIRED if not isinstance(getattr(mod, a, None), nn.Module)]
    if missing:
        raise PlacementError(f"{where} lacks submodule(s) {missing} that QuantResidualBlock relies on{hint}")


class QuantResidualBlock(TimmBlock):
    """timm ``Block`` with quantizers on both inputs of both residual adds."""

    residual1_quantizer: Optional[TensorQuantizer]
    branch1_quantizer: Optional[TensorQuantizer]
    residual2_quantizer: Optional[TensorQuantizer]
    branch2_quantizer: Optional[TensorQuantizer]

    @classmethod
    def from_float(cls, mod: nn.Module, act_spec: QuantSpec, bins: int = 2048,
                   name: str = "") -> "QuantResidualBlock":
        check_block(mod, name)
        if isinstance(mod, QuantResidualBlock):
            raise PlacementError(f"transformer block {name!r} is already a QuantResidualBlock")
        new = cls.__new__(cls)
        new.__dict__.update(mod.__dict__)
        new._parameters = dict(mod._parameters)
        new._buffers = dict(mod._buffers)
        modules: dict[str, Optional[nn.Module]] = {}
        for key, sub in mod._modules.items():
            modules[key] = sub
            if key == "drop_path1":
                modules["residual1_quantizer"] = TensorQuantizer(act_spec, "activation", bins)
                modules["branch1_quantizer"] = TensorQuantizer(act_spec, "activation", bins)
        modules["residual2_quantizer"] = TensorQuantizer(act_spec, "activation", bins)
        modules["branch2_quantizer"] = TensorQuantizer(act_spec, "activation", bins)
        new._modules = modules
        new.force_explicit = False
        return new

    def residual_quantizers(self) -> dict[str, TensorQuantizer]:
        return {n: getattr(self, n) for n in RESIDUAL_QUANTIZERS if getattr(self, n, None) is not None}

    def quant_path_needed(self) -> bool:
        if self.force_explicit:
            return True
        return any(q.calibrating or q.active for q in self.residual_quantizers().values())

    def _q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        q = getattr(self, name, None)
        return q(x) if q is not None else x

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        kw = {}
        if attn_mask is not None:
            kw["attn_mask"] = attn_mask
        if is_causal:
            kw["is_causal"] = True
        if not self.quant_path_needed():
            return super().forward(x, **kw)
        y = self.drop_path1(self.ls1(self.attn(self.norm1(x), **kw)))
        x = self._q("residual1_quantizer", x) + self._q("branch1_quantizer", y)
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = self._q("residual2_quantizer", x) + self._q("branch2_quantizer", y)
        return x
