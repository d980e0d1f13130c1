"""TensorRT per-tensor dynamic ranges (implicit quantization): ``trt_ranges.json`` and a calibration cache.

TensorRT's implicit INT8 mode takes one symmetric range per tensor (``ITensor.setDynamicRange(-a, a)``,
or a calibration cache whose lines are ``<tensor>: <hex of the float32 scale a/127, big-endian>``) and
calibrates weights itself (per-channel max). So the table holds the activation quantizers, keyed by the
tensor names of the float ONNX model (``model_float.onnx``, which TensorRT's ONNX parser keeps), with
``amax``; an asymmetric range is widened to ``max(|min|, |max|)`` and marked ``exact: false``; grids TensorRT's
implicit INT8 cannot express (not 8-bit, per-channel activations) and casts are listed under ``skipped``
with the reason, and so are the weight quantizers (their grids are not carried: TensorRT derives its own).
Explicit quantization (the QDQ ``model.onnx``) needs no table.
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

from .onnx_qdq import QdqSpec

#: Header line of the cache (TensorRT reads the calibrator name from it; the version digits are informational).
CACHE_HEADER = "TRT-8601-EntropyCalibration2"


def range_table(plans: dict[str, QdqSpec], tensor_map: dict[str, list[str]]) -> dict[str, Any]:
    """``{"tensors": {tensor: {"amax", "scale", "quantizer", "exact"}}, "skipped": {quantizer: why}}``."""
    tensors: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name, p in plans.items():
        if p.kind == "weight":  # TensorRT calibrates weights itself in implicit mode
            grid = f"{p.format} cast" if p.op == "cast" else f"{p.bits}-bit grid"
            skipped[name] = (f"weight: TensorRT implicit INT8 sets weight scales itself (per-output-channel max of "
                             f"the weights); this {grid} is not carried")
            continue
        if p.op == "cast":
            skipped[name] = f"{p.format} cast (build the engine with FP16 enabled instead)"
            continue
        if p.bits != 8:
            skipped[name] = f"{p.bits}-bit grid: TensorRT implicit quantization is INT8 only"
            continue
        if p.scale.size != 1:
            skipped[name] = "per-channel activation ranges: TensorRT takes one range per tensor"
            continue
        s, z = float(p.scale.reshape(-1)[0]), int(p.zero_point.reshape(-1)[0])
        if p.signed and z == 0:
            # quantcore's symmetric scale is amax / 127: TensorRT's amax / 127 is the same scale (its grid
            # has no -128 code, which only values below the calibrated range reach)
            amax, exact = p.qmax * s, True
        else:
            amax, exact = max(abs((p.qmin - z) * s), abs((p.qmax - z) * s)), False
        for t in tensor_map[name]:
            tensors[t] = {"amax": amax, "scale": amax / 127.0, "quantizer": name, "exact": bool(exact)}
    return {"format": "tensorrt-dynamic-range", "tensors": tensors, "skipped": skipped}


def calibration_cache(table: dict[str, Any]) -> str:
    """The table as a TensorRT calibration cache (text)."""
    lines = [CACHE_HEADER]
    for t, row in table["tensors"].items():
        lines.append(f"{t}: {struct.pack('>f', np.float32(row['scale'])).hex()}")
    return "\n".join(lines) + "\n"


def read_calibration_cache(text: str) -> dict[str, float]:
    """``{tensor: scale}`` from a TensorRT calibration cache (the inverse of :func:`calibration_cache`)."""
    out = {}
    for line in text.splitlines()[1:]:
        if line.strip():
            name, hexv = line.rsplit(":", 1)
            out[name.strip()] = struct.unpack(">f", bytes.fromhex(hexv.strip()))[0]
    return out


__all__ = ["CACHE_HEADER", "calibration_cache", "range_table", "read_calibration_cache"]
