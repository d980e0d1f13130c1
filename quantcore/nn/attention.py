"""Quantized drop-in replacement for timm's multi-head self-attention.

:class:`QuantAttention` subclasses timm's ``Attention`` and adopts the original module's parameters and
submodules (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``,
``proj_drop``), so state_dict keys and ``isinstance`` checks are unchanged. It adds activation
quantizers on the inputs of both batched matmuls of attention (as in NVIDIA FasterTransformer's ViT
INT8 modes)::

    q_quantizer(q), k_quantizer(k)  ->  (q * scale) @ k^T  -> [softmax_input_quantizer] -> mask
    -> softmax -> dropout -> attn_quantizer  ->  attn @ v_quantizer(v)

While none of these quantizers changes or observes its tensor (all disabled, or not calibrated and not
calibrating), forward *is* timm's forward (``F.scaled_dot_product_attention`` when the original module
had ``fused_attn``), so with every quantizer off the output is bit-identical to the float model.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats import QuantSpec
from ..quantizer import TensorQuantizer

try:  # timm is a dependency of quantcore, but keep the import failure readable.
    from timm.layers.attention import Attention as _TimmAttention
except ImportError:  # pragma: no cover - very old timm
    try:
        from timm.models.vision_transformer import Attention as _TimmAttention  # type: ignore
    except ImportError:
        _TimmAttention = None  # type: ignore[assignment]

if _TimmAttention is None:  # pragma: no cover
    raise ImportError("quantcore.nn.attention needs timm (timm.layers.attention.Attention)")

TimmAttention = _TimmAttention

#: Quantizer attribute names, in execution order.
ATTENTION_QUANTIZERS = ("q_quantizer", "k_quantizer", "softmax_input_quantizer", "attn_quantizer",
                        "v_quantizer")

# Attributes the explicit (quantized) path reads; validated before a module is converted.
_REQUIRED_MODULES = ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")
_REQUIRED_VALUES = ("num_heads", "head_dim", "scale", "fused_attn")


def is_timm_attention(mod: nn.Module) -> bool:
    """True for timm's ``Attention`` and its subclasses (MRO walk, no exact type check)."""
    return any(k is TimmAttention for k in type(mod).__mro__)


def check_attention(mod: nn.Module, name: str = "") -> None:
    """Raise a ValueError naming ``name`` if ``mod`` is not an attention :class:`QuantAttention` can adopt."""
    where = f"attention module {name!r} ({type(mod).__module__}.{type(mod).__qualname__})"
    hint = (f"; leave it float with an override {{match: {name!r}, float: true}}" if name else "")
    if not is_timm_attention(mod):
        raise ValueError(f"{where} is not a timm Attention{hint}")
    if type(mod).forward is not TimmAttention.forward and not isinstance(mod, QuantAttention):
        raise ValueError(f"{where} overrides timm Attention.forward; quantcore cannot insert its "
                         f"attention quantizers into an unknown forward{hint}")
    missing = [a for a in _REQUIRED_MODULES if not isinstance(getattr(mod, a, None), nn.Module)]
    missing += [a for a in _REQUIRED_VALUES if not hasattr(mod, a)]
    if missing:
        raise ValueError(f"{where} lacks attribute(s) {missing} that QuantAttention relies on "
                         f"(unsupported timm version?){hint}")
    if not isinstance(mod.qkv, nn.Linear):
        raise ValueError(f"{where}: qkv is {type(mod.qkv).__name__}, expected nn.Linear{hint}")
    attn_dim = getattr(mod, "attn_dim", mod.num_heads * mod.head_dim)
    if mod.num_heads * mod.head_dim != attn_dim or mod.qkv.out_features != 3 * attn_dim:
        raise ValueError(f"{where}: qkv.out_features={mod.qkv.out_features} does not match "
                         f"3 * num_heads * head_dim = {3 * mod.num_heads * mod.head_dim}{hint}")


def _self_attn_bias(n: int, attn: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    is_causal: bool) -> Optional[torch.Tensor]:
    """Additive bias with ``F.scaled_dot_product_attention`` semantics (as timm's explicit path)."""
    if is_causal:
        return attn.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros_like(attn_mask, dtype=attn.dtype)
        return bias.masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


class QuantAttention(TimmAttention):
    """timm ``Attention`` with quantizers on the inputs of ``Q@K^T`` and ``attn@V``.

    ``force_explicit = True`` makes forward take the explicit path even with every quantizer off
    (used to compare the explicit and fused paths).
    """

    q_quantizer: Optional[TensorQuantizer]
    k_quantizer: Optional[TensorQuantizer]
    softmax_input_quantizer: Optional[TensorQuantizer]
    attn_quantizer: Optional[TensorQuantizer]
    v_quantizer: Optional[TensorQuantizer]

    @classmethod
    def from_float(cls, mod: nn.Module, act_spec: QuantSpec, softmax_input: bool = False,
                   bins: int = 2048, name: str = "") -> "QuantAttention":
        """Adopt ``mod``'s parameters, submodules and hooks; add the attention quantizers."""
        check_attention(mod, name)
        if isinstance(mod, QuantAttention):
            raise ValueError(f"attention module {name!r} is already a QuantAttention")
        new = cls.__new__(cls)
        new.__dict__.update(mod.__dict__)
        new._parameters = dict(mod._parameters)
        new._buffers = dict(mod._buffers)
        quants: dict[str, Optional[TensorQuantizer]] = {
            "q_quantizer": TensorQuantizer(act_spec, "activation", bins),
            "k_quantizer": TensorQuantizer(act_spec, "activation", bins),
            "softmax_input_quantizer": TensorQuantizer(act_spec, "activation", bins) if softmax_input else None,
            "attn_quantizer": TensorQuantizer(act_spec, "activation", bins),
            "v_quantizer": TensorQuantizer(act_spec, "activation", bins),
        }
        # Register the quantizers right after q_norm/k_norm so module order follows execution order.
        modules: dict[str, Optional[nn.Module]] = {}
        anchor = "k_norm" if "k_norm" in mod._modules else "qkv"
        for key, sub in mod._modules.items():
            modules[key] = sub
            if key == anchor:
                modules.update(quants)
        new._modules = modules
        new.force_explicit = False
        return new

    # -- state --------------------------------------------------------------------------------
    def attention_quantizers(self) -> dict[str, TensorQuantizer]:
        out = {}
        for n in ATTENTION_QUANTIZERS:
            q = getattr(self, n, None)
            if q is not None:
                out[n] = q
        return out

    def quant_path_needed(self) -> bool:
        """Whether any attention quantizer changes or observes its tensor."""
        if self.force_explicit:
            return True
        for n in ATTENTION_QUANTIZERS:
            q = getattr(self, n, None)
            if q is not None and (q.calibrating or q.active):
                return True
        return False

    def _q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        q = getattr(self, name, None)
        return q(x) if q is not None else x

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if not self.quant_path_needed():
            # Exactly timm's forward: fused SDPA (or timm's explicit path when fused_attn is False).
            if is_causal:
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            if attn_mask is not None:
                return super().forward(x, attn_mask=attn_mask)
            return super().forward(x)
        return self._quant_forward(x, attn_mask, is_causal)

    def _quant_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                       is_causal: bool) -> torch.Tensor:
        B, N, _ = x.shape
        attn_dim = getattr(self, "attn_dim", self.num_heads * self.head_dim)
        gate_mod = getattr(self, "gate", None)
        gate = gate_mod(x).sigmoid() if gate_mod is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        # Inputs of the first batched GEMM; the softmax scale is applied after quantization (as an
        # integer GEMM would rescale its accumulator), so q, k and v can share one range.
        q = self._q("q_quantizer", q)
        k = self._q("k_quantizer", k)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        # Before the additive mask: -inf entries must never reach a calibrator or a grid.
        attn = self._q("softmax_input_quantizer", attn)
        bias = _self_attn_bias(N, attn, attn_mask, is_causal)
        if bias is not None:
            attn = attn + bias
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        attn = self._q("attn_quantizer", attn)
        v = self._q("v_quantizer", v)
        x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, attn_dim)
        norm = getattr(self, "norm", None)
        if norm is not None:
            x = norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, fused_attn={self.fused_attn}"
