"""The CPU histogram path (issue #10, calibration overhead) against the histogram's definition, on
real activations: Fashion-MNIST images through the demo ViT, every tensor a quantizer saw (token
tensors, q/k/v strided views of the fused qkv output, softmax probabilities, GELU outputs).

Reference, written from the definition in ``quantcore.calib.histogram`` (numpy, float64): over all the
values a quantizer saw, ``R = 2**e`` with ``e`` the smallest integer such that ``max|x| < 2**e``, and
the count of bin ``floor(x * bins / R) + bins``. Exact equality is required: the binning is exact, so
the state must not depend on batch split, piece size or rank count.
"""
from __future__ import annotations

import copy
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import quantcore
from quantcore.calib import histogram as hmod
from quantcore.calib.histogram import HistogramState
from quantcore.calib.maxcal import MaxState

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST not installed")]

RECIPE = {"model": {"name": "quantcore/vit_fmnist", "pretrained": False},
          "placement": {"family": "vit", "mode": "ft2"},  # ft2: softmax input and GEMM outputs too
          "calibration": {"method": "percentile", "num_batches": 6, "batch_size": 16}}


def _fmnist_batches(n_batches: int = 6, batch: int = 16) -> list[torch.Tensor]:
    with gzip.open(FMNIST, "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    x = torch.from_numpy(raw[:n_batches * batch].astype(np.float32) / 255.0)
    x = (x - 0.2860) / 0.3530
    return list(x.split(batch))


def _reference(values: list[np.ndarray], bins: int) -> dict:
    """The histogram state from its definition (no code of the module under test)."""
    v = np.concatenate([a.reshape(-1).astype(np.float64) for a in values])
    amax = float(np.abs(v).max())
    exp = math.frexp(amax)[1] if amax > 0 else None
    scale = bins / 2.0 ** (exp if exp is not None else 0)
    counts = np.bincount((np.floor(v * scale) + bins).astype(np.int64), minlength=2 * bins)
    return {"exp": exp, "counts": counts, "min": float(v.min()), "max": float(v.max()), "total": v.size}


def _assert_state(st: HistogramState, ref: dict, what: str) -> None:
    assert st.exp == ref["exp"], what
    assert st.min == ref["min"] and st.max == ref["max"] and st.total == ref["total"], what
    assert np.array_equal(st.counts.numpy(), ref["counts"]), what


@pytest.fixture(scope="module")
def seen():
    """A prepared demo ViT calibrated on Fashion-MNIST, with every tensor each histogram saw."""
    torch.manual_seed(0)
    batches = _fmnist_batches()
    model = quantcore.prepare(quantcore.build_model(RECIPE), RECIPE)
    record: dict[int, list[np.ndarray]] = {}
    strided = [0]
    orig = HistogramState.update

    def spy(self, x):
        record.setdefault(id(self), []).append(x.detach().float().numpy().copy())
        strided[0] += not x.is_contiguous()
        return orig(self, x)

    HistogramState.update = spy
    try:
        quantcore.collect(model, batches)
    finally:
        HistogramState.update = orig
    return model, batches, record, strided[0]


def test_cpu_path_is_the_definition_on_real_activations(seen):
    model, _, record, strided = seen
    hists = {n: q.collector for n, q in quantcore.quantizers(model).items()
             if q.kind == "activation" and isinstance(q.collector, HistogramState) and q.collector.total}
    # q/k/v views of the fused qkv output reach the collectors as one dense copy, which the quantizer
    # also hands on to the attention matmuls (test_quantizer_copies_strided_views_once)
    assert len(hists) >= 20 and strided == 0
    names = set()
    for name, st in hists.items():
        _assert_state(st, _reference(record[id(st)], st.bins), name)
        names.add(name.rsplit(".", 1)[-1])
    assert {"q_quantizer", "attn_quantizer", "softmax_input_quantizer"} <= names


def test_piece_size_and_histc_path_do_not_change_the_state(seen, monkeypatch):
    _, _, record, _ = seen
    values = max(record.values(), key=lambda v: sum(a.size for a in v))  # the largest tensors
    ref = _reference(values, 2048)
    for piece in (1 << 10, 1 << 14):
        monkeypatch.setattr(hmod, "_CPU_PIECE", piece)
        st = HistogramState()
        for a in values:
            st.update(torch.from_numpy(a))
        _assert_state(st, ref, f"piece {piece}")
    monkeypatch.setattr(hmod, "BINCOUNT_MAX_THREADS", -1)  # the GPU / many-thread path
    st = HistogramState()
    for a in values:
        st.update(torch.from_numpy(a))
    _assert_state(st, ref, "histc path")


def test_interleaved_counting_is_exact_and_engages_on_zero_heavy_data(seen, monkeypatch):
    """Peaked tensors are counted in interleaved lanes: the same state as the definition, on every
    recorded activation (lanes forced on) and on zero-heavy ones (engaged by the counts seen)."""
    _, _, record, _ = seen
    used = []
    orig = hmod._lane_offsets
    monkeypatch.setattr(hmod, "_lane_offsets", lambda *a: used.append(a) or orig(*a))
    monkeypatch.setattr(hmod, "_CPU_PIECE", 1 << 12)  # several pieces per call, odd tails
    monkeypatch.setattr(hmod, "_PEAKED", 0.0)
    for values in record.values():
        for bins in (2048, 16384):  # 16384: the entropy calibrator's finer state (int32 lane indices)
            st = HistogramState(bins)
            for a in values:
                st.update(torch.from_numpy(a))
            _assert_state(st, _reference(values, bins), f"lanes forced, {bins} bins")
    assert used and {a[2] for a in used} == {2048, 16384}
    monkeypatch.setattr(hmod, "_PEAKED", 0.1)
    rng = np.random.default_rng(0)
    for what, make in (("relu", lambda: np.maximum(rng.standard_normal((4, 64, 28, 28)), 0)),
                       ("softmax", lambda: _softmax(4 * rng.standard_normal((96, 197))))):
        values = [make().astype(np.float32) for _ in range(3)]
        used.clear()
        st = HistogramState()
        for a in values:
            st.update(torch.from_numpy(a))
        assert st.collision() > 0.1 and used, what  # from the second call on
        _assert_state(st, _reference(values, 2048), what)
    gauss = [rng.standard_normal((8, 197, 64)).astype(np.float32) for _ in range(3)]
    used.clear()
    st = HistogramState()
    for a in gauss:
        st.update(torch.from_numpy(a))
    assert not used and st.collision() < 0.01  # spread data keeps the plain count


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_k_rank_merge_equals_one_process(seen):
    model, batches, _, _ = seen
    one = quantcore.calibration_state(model)
    for k in (2, 3):
        states = []
        for r in range(k):
            rank = copy.deepcopy(model)
            quantcore.collect(rank, batches[r::k])
            states.append(quantcore.calibration_state(rank))
        merged = quantcore.merge_calibration_states(states)
        assert set(merged) == set(one)
        for name, d in one.items():
            m = merged[name]
            if d["type"] == "hist":
                assert m["exp"] == d["exp"] and m["total"] == d["total"], (k, name)
                assert m["min"] == d["min"] and m["max"] == d["max"], (k, name)
                assert torch.equal(m["counts"], d["counts"]), (k, name)
            elif d["type"] == "max":
                assert torch.equal(m["min"], d["min"]) and torch.equal(m["max"], d["max"]), (k, name)


def test_ranges_growing_inside_one_call_and_zeros_first(monkeypatch):
    """The range widens between pieces of one tensor (local re-binning), starts from all-zero
    pieces (no range yet) and reaches negative exponents."""
    monkeypatch.setattr(hmod, "_CPU_PIECE", 1 << 12)
    g = torch.Generator().manual_seed(5)
    parts = [torch.zeros(5000), torch.randn(5000, generator=g) * 1e-3, torch.randn(5000, generator=g) * 0.3,
             torch.randn(5000, generator=g) * 40.0]
    for bins in (2048, 1000):  # also a bin count that is not a power of two
        st = HistogramState(bins)
        st.update(torch.cat(parts[:3]))
        st.update(parts[3])
        other = HistogramState(bins)
        other.update(parts[0])
        other.update(torch.cat(parts[1:]))
        assert st.exp == other.exp and torch.equal(st.counts, other.counts)
        if bins == 2048:
            _assert_state(st, _reference([p.numpy() for p in parts], bins), "growing")
    tiny = HistogramState()
    tiny.update(torch.zeros(10))
    tiny.update(torch.full((10,), 2.0**-60))
    _assert_state(tiny, _reference([np.zeros(10, np.float32), np.full(10, 2.0**-60, np.float32)], 2048), "tiny")


def test_non_finite_leaves_the_state_unchanged(monkeypatch):
    monkeypatch.setattr(hmod, "_CPU_PIECE", 1 << 10)
    g = torch.Generator().manual_seed(6)
    st = HistogramState()
    st.update(torch.randn(3000, generator=g))
    before = st.clone()
    bad = torch.randn(5000, generator=g) * 100.0  # would widen the range...
    bad[-1] = float("nan")  # ...but the last piece is not finite
    with pytest.raises(ValueError, match="non-finite"):
        st.update(bad)
    assert st.exp == before.exp and st.total == before.total and torch.equal(st.counts, before.counts)
    assert st.min == before.min and st.max == before.max


def test_max_state_strided_views_and_non_finite():
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(4, 50, 3, 2, 16, generator=g).permute(2, 0, 3, 1, 4)
    for view in qkv.unbind(0):
        a, b = MaxState(), MaxState()
        a.update(view)
        b.update(view.contiguous())
        assert torch.equal(a.min, b.min) and torch.equal(a.max, b.max)
        assert a.min.dtype == torch.float32 and float(a.max) == float(view.max())
    with pytest.raises(ValueError, match="non-finite"):
        MaxState().update(torch.tensor([1.0, float("inf")]))


def test_histogram_strided_views_are_the_definition(seen):
    """The histogram's own strided branch (a view reaching it directly, GPU-less callers, other
    collectors' users): q-like slices of a fused tensor built from real activations."""
    _, _, record, _ = seen
    values = max(record.values(), key=lambda v: sum(a.size for a in v))
    st = HistogramState()
    for a in values:
        t = torch.from_numpy(a).reshape(-1, a.shape[-1])
        fused = torch.stack((t, 2 * t, -t), dim=1)  # (rows, 3, C): slice 0 is strided
        view = fused[:, 0]
        assert not view.is_contiguous()
        st.update(view)
    _assert_state(st, _reference(values, 2048), "strided views")


def test_quantizer_copies_strided_views_once():
    """While calibrating on CPU, a strided (gapped) input is copied once and that copy goes both to the
    collector and downstream (same values); dense layouts (channels-last, permuted) pass untouched."""
    from quantcore.formats import QuantSpec
    from quantcore.quantizer import TensorQuantizer, _dense

    quantizer = TensorQuantizer(QuantSpec(bits=8, calibrator="percentile"))
    quantizer.calibrating = True
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 9, 3, 2, 4, generator=g).permute(2, 0, 3, 1, 4)
    out = quantizer(qkv[1])
    assert out.is_contiguous() and torch.equal(out, qkv[1]) and not _dense(qkv[1])
    seen = {"n": quantizer.collector.total}
    for dense in (torch.randn(2, 3, 5, 5, generator=g).to(memory_format=torch.channels_last),
                  torch.randn(4, 5, 6, generator=g).permute(2, 0, 1)):
        assert _dense(dense) and not dense.is_contiguous()
        assert quantizer(dense) is dense  # no copy: the layout is kept for what follows
    assert quantizer.collector.total == seen["n"] + 2 * 5 * 5 * 3 + 4 * 5 * 6
