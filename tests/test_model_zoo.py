"""The acceptance for "any model": every zoo architecture (tests/zoo.py) is prepared, calibrated with
all five calibrators and checked for an untouched FP32 path, no dead quantizers, every
Linear/Conv/attention quantized or listed float with a reason, and a W8A8 logit SQNR above
:data:`zoo.SQNR_FLOOR_DB` (its docstring says why that floor)."""
from __future__ import annotations

import math

import pytest

import zoo

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.mark.parametrize("entry", zoo.ZOO, ids=[e.name for e in zoo.ZOO])
def test_zoo_model(entry):
    row = zoo.run_entry(entry)
    bad_fp32 = [m for m in row["fp32_match"] if not m[1]]
    assert not bad_fp32, f"FP32 path changed: {bad_fp32}"
    assert not row["dead"], f"quantizers with no effect: {row['dead'][:8]}"
    assert not row["unlisted"], f"Linear/Conv neither quantized nor listed float: {row['unlisted'][:8]}"
    assert not row["unlisted_attention"], f"attention neither quantized nor listed: {row['unlisted_attention'][:8]}"
    assert row["quantizers"] > 0
    assert not row["float_attention_operands"], f"attention GEMM operands left float: {row['float_attention_operands'][:6]}"
    for cal, db in row["sqnr"].items():
        floor = zoo.ENTROPY_FLOOR_DB if cal == "entropy" else zoo.SQNR_FLOOR_DB
        assert db > floor or math.isinf(db), f"{cal}: SQNR {db:.1f} dB"
    ref = row.get("sqnr_entropy_reference")
    if ref is not None:  # entropy is as good as the reference algorithm on the same activations
        assert row["sqnr"]["entropy"] >= ref - zoo.ENTROPY_REFERENCE_TOL_DB, (row["sqnr"]["entropy"], ref)


def test_zoo_is_broad():
    libs = {e.name.split(":")[0] for e in zoo.ZOO}
    assert libs == {"timm", "torchvision", "hf"} and len(zoo.ZOO) >= 40
