"""Quantizer groups: the unit that sensitivity measures and the search assigns one precision to."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..errors import UserError
from ..placement.overrides import matches

GROUPINGS = ("quantizer", "module", "block")


def _block_of(name: str, mods: dict[str, nn.Module], owners: set[str]) -> str | None:
    """The repeated block that contains ``name``: the innermost item of a ModuleList/Sequential that
    holds more than one quantized module and has a sibling of its own class (timm ``blocks.3``,
    torchvision ``layer1.0``/``features.4``, HF ``encoder.layer.3``). A one-layer wrapper
    (torchvision's ``Conv2dNormActivation`` is a Sequential) or a one-off part of a block (the
    squeeze-excitation inside ``features.4.block``) is not a block: the walk goes on outwards. The
    outermost item when none qualifies; None outside every ModuleList/Sequential."""
    parts = name.split(".")
    found = None
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[: i - 1])
        container = mods.get(parent)
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            found = ".".join(parts[:i])
            item = mods.get(found)
            repeated = any(type(m) is type(item) for m in container if m is not item)
            if repeated and sum(1 for o in owners if o == found or o.startswith(found + ".")) > 1:
                return found
    return found


def make_groups(engine, by: str | Sequence[str] = "quantizer", field: str = "groups") -> dict[str, list[str]]:
    """Group the engine's active quantizers (execution order kept inside each group).

    ``by``: ``"quantizer"`` (one group each), ``"module"`` (the module holding them: a Linear's
    input/weight/output quantizers, an attention's q/k/softmax/v quantizers, a block's residual-add
    quantizers), ``"block"`` (the repeated block that holds them, e.g. ``blocks.3``, ``layer1.0``: see
    :func:`_block_of`; quantizers outside any block by module), or a list of globs (``blocks.*.mlp.fc2``:
    each glob is one group of the quantizers it matches as a recipe override would, across blocks).
    Raises :class:`~quantcore.errors.UserError` naming ``field`` for an unknown grouping or a glob
    that matches no active quantizer, or an empty list of globs."""
    order = list(engine.order)
    if isinstance(by, str):
        if by not in GROUPINGS:
            raise UserError(f"{field}: unknown grouping {by!r} (expected one of {list(GROUPINGS)} or a list of "
                            "globs such as 'blocks.*.mlp.fc2')")
        out: dict[str, list[str]] = {}
        owners = {n.rpartition(".")[0] for n in order}
        for n in order:
            owner = n.rpartition(".")[0]
            if by == "quantizer":
                key = n
            elif by == "module":
                key = owner or "<model>"
            else:
                key = _block_of(n, engine.mods, owners) or owner or "<model>"
            out.setdefault(key, []).append(n)
        return out
    if not by:
        raise UserError(f"{field}: no group given (a grouping {list(GROUPINGS)} or comma-separated globs such as "
                        "'blocks.*.mlp.fc2')")
    out = {}
    for pat in by:
        if not isinstance(pat, str) or not pat:
            raise UserError(f"{field}: each group must be a non-empty glob string, got {pat!r}")
        members = [n for n in order if matches(pat, n)]
        if not members:
            raise UserError(f"{field}: glob {pat!r} matches no active quantizer of this model (names look like "
                            f"{order[0]!r})" if order else f"{field}: the model has no active quantizer")
        out[pat] = members
    return out


def group_matches(engine, members: Sequence[str]) -> list[str]:
    """Override ``match`` globs that select exactly ``members`` among the model's quantizers: the
    common owner module when it holds exactly these, else each quantizer's own name."""
    owners = {m.rpartition(".")[0] for m in members}
    if len(owners) == 1:
        owner = next(iter(owners))
        if owner and {n for n in engine.qs if matches(owner, n)} == set(members):
            return [owner]
    return list(members)


def as_grouping(value: Any) -> Any:
    """``"module"`` etc. stay a name; a comma-separated string or a list becomes a list of globs."""
    if isinstance(value, str) and value not in GROUPINGS and value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return value
