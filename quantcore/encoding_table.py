"""The ``encodings.json`` table: one row per quantizer, readable by people and other toolchains."""
from __future__ import annotations

import copy
import json
import math
from typing import Any

from torch import nn

ENCODINGS_VERSION = 1


def _float(v: float) -> float | None:
    """JSON has no inf/nan: a non-finite range value is written as null."""
    return v if math.isfinite(v) else None


def _num(t) -> float | None | list[float | None]:
    t = t.detach().cpu()
    return _float(float(t)) if t.numel() == 1 else [_float(float(v)) for v in t.reshape(-1)]


#: row keys quantcore writes itself: a kind's encoding() may not replace them
_OWN_KEYS = {"name", "kind", "enabled", "format", "bits", "symmetric", "axis", "narrow_range", "calibrator",
             "percentile", "quant_min", "quant_max", "min", "max", "amax", "calibrated", "shared_with"}


def _kind_fields(name: str, q, row: dict[str, Any]) -> dict[str, Any]:
    """The kind's own encoding fields (uniform int: scale, zero_point), checked: they may not replace
    the recorded format/range, and must be JSON values (tensors become numbers)."""
    from .plugins import PluginError

    kind = q.spec.kind
    who = f"quantizer {name!r} (format {q.spec.format!r} = {type(kind).__module__}.{type(kind).__qualname__})"
    try:
        # tensors and plain floats as the range values are: a non-finite number becomes null
        fields = {k: _num(v) if hasattr(v, "detach") else _float(v) if isinstance(v, float) else v
                  for k, v in kind.encoding(q).items()}
    except Exception as e:  # noqa: BLE001 - a kind's failure, named (built-in kinds do not raise here)
        raise PluginError(f"{who}: encoding() raised {type(e).__name__}: {e}") from e
    clash = sorted(set(fields) & (_OWN_KEYS | set(row)))
    if clash:
        raise PluginError(f"{who}: encoding() returns {clash}, which quantcore records itself; use other names")
    try:
        json.dumps(fields, allow_nan=False)  # as encodings.json is written
    except (TypeError, ValueError) as e:
        raise PluginError(f"{who}: encoding() returns a value that is not JSON (nested NaN/inf included): "
                          f"{e}") from None
    return fields


def quantizer_rows(model: nn.Module) -> list[dict[str, Any]]:
    from .placement import quantizers, unequal_shared_ranges

    share = getattr(getattr(model, "quantcore_placement", None), "share_groups", []) or []
    qs = quantizers(model)
    # only members that quantize share a grid (placement.unify_shared_ranges)
    acting = {n for n, q in qs.items() if q.spec.on_grid}
    shared_with = {n: [m for m in g if m != n and m in acting] for g in share for n in g if n in acting}
    shared_with = {n: v for n, v in shared_with.items() if v}
    # a checkpoint calibrated before its members were shared keeps their own ranges: not one grid
    for group in unequal_shared_ranges(model):
        for n in group:
            shared_with.pop(n, None)
    rows = []
    for name, q in qs.items():
        if q.spec.learnable and q.scale is not None:  # QAT in progress: the learned grid, as convert() writes it
            q = copy.deepcopy(q)
            q.convert()
        s = q.spec
        row: dict[str, Any] = {
            "name": name, "kind": q.kind, "enabled": s.enabled, "format": s.format,
            # a float cast has no grid: its spec's grid fields (defaults, or a quant: section's) do not act
            "bits": None if s.is_float else s.bits, "symmetric": None if s.is_float else s.symmetric,
            "axis": None if s.is_float else s.axis, "narrow_range": None if s.is_float else s.narrow_range,
            "calibrator": None if s.is_float else s.calibrator,
        }
        if s.calibrator == "percentile" and not s.is_float:
            row["percentile"] = s.percentile
        if not s.is_float:
            qmin, qmax = s.qrange()
            row.update(quant_min=qmin, quant_max=qmax)
            if q.is_calibrated:
                row.update(min=_num(q.amin), max=_num(q.amax))
                # the kind's own parameters (uniform int: scale, zero_point; other grids: theirs)
                row.update(_kind_fields(name, q, row))
                if s.symmetric:
                    row["amax"] = _num(q.amax)
            else:
                row["calibrated"] = False
        if name in shared_with:
            row["shared_with"] = shared_with[name]
        rows.append(row)
    return rows


def encodings_table(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"version", "quantizers": [...], ...extra}`` for ``encodings.json``."""
    table: dict[str, Any] = {"version": ENCODINGS_VERSION}
    recipe = getattr(model, "quantcore_recipe", None)
    if recipe is not None:
        table["recipe"] = recipe.name
        table["model"] = recipe.model.name if recipe.model is not None else type(model).__name__
    placement = getattr(model, "quantcore_placement", None)
    if placement is not None:
        table["family"], table["mode"] = placement.family, placement.mode
        if hasattr(placement, "as_dict"):  # what was quantized, folded, and left float (with why)
            table["placement"] = {k: v for k, v in placement.as_dict().items() if k not in ("family", "mode")}
    table.update(extra or {})
    table["quantizers"] = quantizer_rows(model)
    return table
