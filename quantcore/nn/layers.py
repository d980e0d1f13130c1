"""Quantized drop-in replacements for Linear and Conv layers.

They subclass the float layer (isinstance checks and state_dict keys are unchanged) and share its
parameters, adding ``input_quantizer``, ``weight_quantizer`` and optionally ``output_quantizer``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QuantSpec
from ..quantizer import TensorQuantizer


class _QuantMixin:
    input_quantizer: TensorQuantizer | None
    weight_quantizer: TensorQuantizer | None
    output_quantizer: TensorQuantizer | None

    def _init_quantizers(self, input_spec: QuantSpec | None, weight_spec: QuantSpec | None,
                         output_spec: QuantSpec | None, bins: int) -> None:
        self.input_quantizer = TensorQuantizer(input_spec, "activation", bins) if input_spec else None
        self.weight_quantizer = TensorQuantizer(weight_spec, "weight", bins) if weight_spec else None
        self.output_quantizer = TensorQuantizer(output_spec, "activation", bins) if output_spec else None

    def _qin(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x) if self.input_quantizer is not None else x

    def _qweight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight

    def _qout(self, y: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(y) if self.output_quantizer is not None else y

    @classmethod
    def _adopt(cls, mod: nn.Module, input_spec, weight_spec, output_spec, bins):
        """Turn ``mod`` into this class in place of a copy: parameters and hooks are kept."""
        new = cls.__new__(cls)
        new.__dict__.update(mod.__dict__)
        new._modules = dict(mod._modules)
        new._parameters = dict(mod._parameters)
        new._buffers = dict(mod._buffers)
        new._init_quantizers(input_spec, weight_spec, output_spec, bins)
        return new


class QuantLinear(nn.Linear, _QuantMixin):
    @classmethod
    def from_float(cls, mod: nn.Linear, input_spec: QuantSpec | None, weight_spec: QuantSpec | None,
                   output_spec: QuantSpec | None = None, bins: int = 2048) -> "QuantLinear":
        return cls._adopt(mod, input_spec, weight_spec, output_spec, bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qout(F.linear(self._qin(x), self._qweight(), self.bias))


class QuantConv2d(nn.Conv2d, _QuantMixin):
    @classmethod
    def from_float(cls, mod: nn.Conv2d, input_spec: QuantSpec | None, weight_spec: QuantSpec | None,
                   output_spec: QuantSpec | None = None, bins: int = 2048) -> "QuantConv2d":
        return cls._adopt(mod, input_spec, weight_spec, output_spec, bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qout(self._conv_forward(self._qin(x), self._qweight(), self.bias))


class QuantConv1d(nn.Conv1d, _QuantMixin):
    @classmethod
    def from_float(cls, mod: nn.Conv1d, input_spec, weight_spec, output_spec=None, bins: int = 2048):
        return cls._adopt(mod, input_spec, weight_spec, output_spec, bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qout(self._conv_forward(self._qin(x), self._qweight(), self.bias))


# Float class -> quantized class. Looked up along the MRO so subclasses of Linear/Conv also match.
QUANT_LAYERS: dict[type, type] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, nn.Conv1d: QuantConv1d}


def quant_class_for(mod: nn.Module) -> type | None:
    if isinstance(mod, tuple(set(QUANT_LAYERS.values()))):
        return None  # already quantized
    for klass in type(mod).__mro__:
        if klass in QUANT_LAYERS:
            return QUANT_LAYERS[klass]
    return None
