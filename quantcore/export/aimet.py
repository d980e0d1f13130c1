"""AIMET / Qualcomm AI Engine Direct (QNN) encodings, format 2.0.0, written from quantcore ranges and read
back onto a prepared model.

Format (AIMET's encoding specification, version 2.0.0, aligned with ``onnx::QuantizeLinear``)::

    {"version": "2.0.0",
     "encodings": [{"name": <ONNX tensor>, "output_dtype": "int8" | "uint8" | "int4" | "uint4" | "int16"
                    | "uint16" | "float16" | "bfloat16",
                    "y_scale": float | [float, ...], "y_zero_point": int | [int, ...] (omitted when 0),
                    "axis": int (per-channel only)}, ...]}

As AIMET does, entries are keyed by tensor names of the exported ONNX model: the float graph
(:func:`~quantcore.export.onnx_qdq.float_graph`, ``model_float.onnx``) in which each quantizer's tensor
is the input its Q/DQ pair had: weights by their initializer name (``blocks.0.attn.qkv.weight``),
activations by the tensor the exporter named (``/model/blocks/blocks.0/norm1/LayerNormalization_output_0``).
``tensor_map`` (quantizer name -> tensor name) ties them to quantcore's quantizers; :func:`load_encodings`
uses it to set ranges (and bit width / symmetry / axis) from a file, e.g. one AIMET calibrated.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..placement import quantizers, unwrap
from .onnx_qdq import ExportError, QdqSpec

AIMET_VERSION = "2.0.0"
_INT_DTYPES = {"INT8": "int8", "UINT8": "uint8", "INT4": "int4", "UINT4": "uint4", "INT16": "int16",
               "UINT16": "uint16"}
_FLOAT_DTYPES = {"FLOAT16": "float16", "BFLOAT16": "bfloat16"}
_FORMAT_OF_FLOAT = {"float16": "fp16", "bfloat16": "bf16"}


def _scalar_or_list(a: np.ndarray, cast):
    return cast(a.reshape(-1)[0]) if a.size == 1 and a.ndim == 0 else [cast(v) for v in a.reshape(-1)]


def encodings_v2(plans: dict[str, QdqSpec], tensor_map: dict[str, list[str]]) -> dict[str, Any]:
    """The 2.0.0 document for quantizers ``plans`` (from the ONNX export) keyed by ``tensor_map``
    (quantizer -> the tensors it quantizes, from :func:`~quantcore.export.onnx_qdq.float_graph`).
    Raises :class:`ExportError` for a quantizer without a tensor name, or with a narrow-range grid
    (the format cannot say so)."""
    encs = []
    for name, p in plans.items():
        if not tensor_map.get(name):
            raise ExportError(f"quantizer {name}: no tensor in the exported graph to key its AIMET encoding by")
        row: dict[str, Any] = {}
        if p.op == "cast":
            row["output_dtype"] = _FLOAT_DTYPES[p.dtype]
        else:
            if p.clip:
                raise ExportError(f"quantizer {name}: narrow range [{p.qmin}, {p.qmax}] has no AIMET encoding (the "
                                  f"2.0.0 format holds a type, scale and zero point only: a QNN runtime would use the "
                                  f"full {p.dtype.lower()} range); use narrow_range: false, or --format onnx (a Clip "
                                  f"before QuantizeLinear keeps it)")
            row["output_dtype"] = _INT_DTYPES[p.dtype]
            row["y_scale"] = _scalar_or_list(p.scale, float)
            if p.zero_point.any():  # optional when zero, as in onnx::QuantizeLinear
                row["y_zero_point"] = _scalar_or_list(p.zero_point, int)
            if p.axis is not None:
                row["axis"] = int(p.axis)
        for t in tensor_map[name]:  # a quantizer called more than once quantizes each tensor it saw
            encs.append({"name": t, **row})
    return {"version": AIMET_VERSION, "encodings": encs}


def _dtype_bits(dtype: str, where: str) -> tuple[bool, int]:
    import re

    m = re.fullmatch(r"(u?int)(\d+)", dtype)
    if m is None:
        raise ExportError(f"{where}: output_dtype {dtype!r} is not one of int4/uint4/int8/uint8/int16/uint16/"
                          f"float16/bfloat16")
    return m.group(1) == "int", int(m.group(2))


@torch.no_grad()
def load_encodings(model: nn.Module, doc: dict[str, Any], tensor_map: dict[str, list[str]], source: str = "encodings",
                   strict: bool = True) -> dict[str, Any]:
    """Set the ranges of ``model``'s quantizers from a 2.0.0 document (``doc``): the quantizer whose tensor
    (``tensor_map``) an entry names gets that entry's bit width, symmetry (signed type with zero point 0),
    axis and the range its scale/zero point span; float entries switch it to the cast format. ``strict``:
    every quantizer of ``tensor_map`` must have an entry. Returns ``{"loaded": n, "unmatched": [tensor
    names in the file no quantizer has]}``. Raises :class:`ExportError` naming ``source`` and the entry."""
    if not isinstance(doc, dict) or str(doc.get("version")) != AIMET_VERSION or not isinstance(doc.get("encodings"), list):
        raise ExportError(f"{source}: not an AIMET {AIMET_VERSION} encodings document (needs version "
                          f"{AIMET_VERSION!r} and an 'encodings' list; got version {doc.get('version') if isinstance(doc, dict) else None!r})")
    qs = quantizers(unwrap(model))
    by_tensor: dict[str, list[str]] = {}
    for q, ts in tensor_map.items():
        for t in ([ts] if isinstance(ts, str) else ts):
            by_tensor.setdefault(t, []).append(q)
    seen, unmatched = set(), []
    for i, e in enumerate(doc["encodings"]):
        where = f"{source}: encodings[{i}]"
        if "name" not in e or "output_dtype" not in e:
            raise ExportError(f"{where}: needs 'name' and 'output_dtype'")
        names = by_tensor.get(e["name"])
        if not names:
            unmatched.append(e["name"])
            continue
        for qname in names:
            if qname not in qs:
                raise ExportError(f"{where}: tensor {e['name']!r} maps to quantizer {qname}, which the model does not have")
            _apply(qs[qname], e, f"{where} ({e['name']} -> {qname})")
            seen.add(qname)
    missing = sorted(set(tensor_map) - seen)
    if strict and missing:
        raise ExportError(f"{source}: no encoding for {len(missing)} quantizer(s), e.g. {missing[:3]} "
                          f"(tensors {[tensor_map[m] for m in missing[:3]]})")
    return {"loaded": len(seen), "unmatched": unmatched, "missing": missing}


def _apply(q, e: dict[str, Any], where: str) -> None:
    dtype = e["output_dtype"]
    if dtype in _FORMAT_OF_FLOAT:
        q.set_spec(q.spec.model_copy(update={"format": _FORMAT_OF_FLOAT[dtype], "enabled": True}))
        q.reset_range()
        return
    signed, bits = _dtype_bits(dtype, where)
    if "y_scale" not in e:
        raise ExportError(f"{where}: integer encoding without y_scale")
    scale = torch.as_tensor(e["y_scale"], dtype=torch.float64).reshape(-1)
    zp = torch.as_tensor(e.get("y_zero_point", 0), dtype=torch.float64).reshape(-1)
    if zp.numel() == 1 and scale.numel() > 1:
        zp = zp.expand_as(scale)
    if zp.shape != scale.shape or (scale <= 0).any():
        raise ExportError(f"{where}: y_scale must be positive and y_zero_point the same shape")
    axis = e.get("axis")
    if scale.numel() > 1 and axis is None:
        raise ExportError(f"{where}: {scale.numel()} scales but no axis")
    symmetric = signed and not zp.any()
    if signed and zp.any():
        raise ExportError(f"{where}: a signed type with a non-zero zero point has no quantcore grid "
                          f"(symmetric grids are signed with zero point 0; asymmetric ones unsigned)")
    spec = q.spec.model_copy(update={"format": "int", "bits": bits, "symmetric": symmetric,
                                     "narrow_range": False, "axis": axis, "enabled": True, "learnable": False})
    try:
        spec = type(spec).model_validate(spec.model_dump())  # re-run the spec's checks
    except ValueError as err:
        raise ExportError(f"{where}: {err}") from None
    q.set_spec(spec)
    qmin, qmax = spec.qrange()
    if symmetric:
        # quantcore's symmetric scale is amax / qmax: the range [-qmax s, qmax s] gives back s exactly
        hi = qmax * scale
        lo = -hi
    else:
        lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
    shape = () if (axis is None and scale.numel() == 1) else (scale.numel(),)
    q.set_range(lo.float().reshape(shape), hi.float().reshape(shape))


__all__ = ["AIMET_VERSION", "encodings_v2", "load_encodings"]
