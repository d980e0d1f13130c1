"""Generic placement helpers: module replacement and Linear/Conv quantization."""
from __future__ import annotations

from torch import nn

from ..formats import QuantSpec
from ..nn.layers import quant_class_for


def module_refs(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every dotted name under which it is reachable (shared modules have several)."""
    refs: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        refs.setdefault(id(mod), []).append(name)
    return refs


def set_module(model: nn.Module, name: str, new: nn.Module | None) -> None:
    """Replace the submodule ``name`` (looked up in the current tree, so parents may be replaced)."""
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, attr, new)


def quantize_layer(mod: nn.Module, input_spec: QuantSpec | None, weight_spec: QuantSpec | None,
                   output_spec: QuantSpec | None, bins: int) -> nn.Module:
    cls = quant_class_for(mod)
    if cls is None:
        raise TypeError(f"no quantized class for {type(mod).__name__}")
    return cls.from_float(mod, input_spec, weight_spec, output_spec, bins)


def is_quantizable_layer(mod: nn.Module) -> bool:
    return quant_class_for(mod) is not None


def is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear)
