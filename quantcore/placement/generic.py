"""Module-tree helpers for placement."""
from __future__ import annotations

from torch import nn


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
