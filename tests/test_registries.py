"""Extension points: a quantizer kind, a calibrator and a model family are each one class plus one
registration, and recipes validate names against the registries (issue #11, item 1)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import quantcore
from quantcore import RecipeError
from quantcore.calib import HistogramState, calibrator, calibrator_names, register_calibrator
from quantcore.calib import registry as cal_registry
from quantcore.calib.registry import Calibrator, PercentileCalibrator
from quantcore.formats import QuantSpec
from quantcore.placement import families
from quantcore.placement import detect_family, place_quantizers, quantizers
from quantcore.quantizer import TensorQuantizer
from quantcore.quantizer_kinds import QuantizerKind, quantizer_kind, quantizer_kind_names, register_quantizer_kind
from quantcore.quantizer_kinds import base as kind_base
from quantcore.quantizer_kinds.affine import UniformAffine

TINY = {"name": "quantcore/vit_fmnist", "kwargs": {"depth": 2}}


# -- a new quantizer kind: uniform int with a power-of-two scale (shift-only requantization) ----------
class Pow2Int(UniformAffine):
    name = "test_int_pow2"
    supports_learnable = False
    supports_asymmetric = False

    def fake_quant(self, quantizer, x):
        qmin, qmax = quantizer.spec.qrange()
        s = torch.exp2(torch.ceil(torch.log2(quantizer.amax.float() / qmax)))
        return torch.clamp(torch.round(x / s), qmin, qmax) * s

    def encoding(self, quantizer):
        qmin, qmax = quantizer.spec.qrange()
        return {"shift": int(torch.ceil(torch.log2(quantizer.amax.float() / qmax)))}


class P999(Calibrator):
    """The 99.9th percentile whatever the spec says: an independent path to PercentileCalibrator."""

    name = "test_p999"

    def compute_range(self, state, spec):
        return PercentileCalibrator().compute_range(state, spec.model_copy(update={"percentile": 99.9}))


class OnlyLinear(families.FamilyPlan):
    """Models made of Linear layers only; keeps the last layer ('2') float by default."""

    name = "test_mlp"
    priority = 50
    default_keep_float = ("2",)

    def matches(self, facts):
        return not facts.has_attention and facts.convolutions == 0


@pytest.fixture()
def registered():
    register_quantizer_kind(Pow2Int())
    register_calibrator(P999())
    families.register_family(OnlyLinear())
    yield
    kind_base._KINDS.unregister("test_int_pow2")
    cal_registry._CALIBRATORS.unregister("test_p999")
    families._FAMILIES.unregister("test_mlp")


def _ref_pow2(x: torch.Tensor, amax: float, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    s = 2.0 ** math.ceil(math.log2(amax / qmax))
    return torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s


def test_builtins_are_registered():
    assert {"int", "fp16", "bf16"} <= set(quantizer_kind_names())
    assert set(calibrator_names()) >= {"max", "percentile", "mse", "entropy", "tf_enhanced"}
    assert families.family_names()[:3] == ["vit", "cnn", "generic"]
    assert quantizer_kind("fp16").is_float and not quantizer_kind("int").is_float
    assert calibrator("max").statistics == "max" and calibrator("mse").statistics == "histogram"


def test_new_kind_acts_and_is_validated(registered):
    torch.manual_seed(0)
    x = torch.randn(4, 64) * 3
    q = TensorQuantizer(QuantSpec(format="test_int_pow2", bits=6), "weight")
    q.calibrate_tensor(x)
    amax = float(q.amax)
    assert amax == pytest.approx(float(x.abs().max()))
    y = q(x)
    assert torch.equal(y, _ref_pow2(x, amax, 6))
    assert not torch.equal(y, x)
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(format="test_int_pow2", symmetric=False)
    with pytest.raises(ValueError, match="learnable"):
        QuantSpec(format="test_int_pow2", learnable=True)


def test_new_kind_through_a_recipe_encodings_and_checkpoint(registered, tmp_path):
    recipe = quantcore.load_recipe({
        "name": "pow2", "model": TINY, "calibration": {"method": "max", "num_batches": 2},
        "overrides": [{"match": "blocks.*.mlp.fc1.weight_quantizer",
                       "spec": {"format": "test_int_pow2", "per_channel": False}}]})
    torch.manual_seed(0)
    model = quantcore.build_model(recipe)
    quantcore.prepare(model, recipe)
    g = torch.Generator().manual_seed(1)
    quantcore.calibrate(model, [(torch.randn(8, 1, 28, 28, generator=g), torch.zeros(8)) for _ in range(2)])
    q = quantizers(model)["blocks.0.mlp.fc1.weight_quantizer"]
    w = model.blocks[0].mlp.fc1.weight
    assert torch.equal(q(w.detach()), _ref_pow2(w.detach(), float(q.amax), 8))
    rows = {r["name"]: r for r in quantcore.encodings(model)["quantizers"]}
    assert rows["blocks.0.mlp.fc1.weight_quantizer"]["format"] == "test_int_pow2"
    assert rows["blocks.0.mlp.fc1.weight_quantizer"]["shift"] == math.ceil(math.log2(float(q.amax) / 127))
    x = torch.randn(4, 1, 28, 28, generator=g)
    with torch.no_grad():
        ref = model(x)
    quantcore.save(model, str(tmp_path / "m.qc.pt"))
    back = quantcore.load(str(tmp_path / "m.qc.pt"))
    assert quantizers(back)["blocks.0.mlp.fc1.weight_quantizer"].spec.format == "test_int_pow2"
    with torch.no_grad():
        assert torch.equal(back(x), ref)


def test_new_calibrator_through_a_recipe(registered):
    rec = quantcore.load_recipe({"name": "c", "model": TINY, "calibration": {"method": "test_p999"}})
    assert rec.calibration.method == "test_p999"
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(20000, generator=g)) ** 2  # skewed, zero-heavy
    q = TensorQuantizer(QuantSpec(calibrator="test_p999"))
    q.start_calibration()
    q(x)
    assert isinstance(q.collector, HistogramState)
    q.finalize()
    ref = TensorQuantizer(QuantSpec(calibrator="percentile", percentile=99.9))
    ref.start_calibration()
    ref(x)
    ref.finalize()
    assert float(q.amax) == float(ref.amax)
    assert float(q.amax) == pytest.approx(float(torch.quantile(x.double(), 0.999)), rel=0.02)  # brute force


def test_new_family_detected_and_its_defaults_apply(registered):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    assert detect_family(model, torch.randn(2, 8)) == "test_mlp"
    from quantcore.config import PlacementConfig

    res = place_quantizers(copy.deepcopy(model), PlacementConfig(), QuantSpec(axis=0), QuantSpec(),
                           example_input=torch.randn(2, 8))
    assert res.family == "test_mlp"
    assert "2" in res.float_reasons and not any(n.startswith("2.") for n in res.quantizers)
    assert "0.weight_quantizer" in res.quantizers


@pytest.mark.parametrize("patch, field", [
    ({"quant": {"weights": {"format": "int9"}}}, "quant.weights.format"),
    ({"overrides": [{"match": "head", "spec": {"format": "log3"}}]}, "overrides.0.spec.format"),
    ({"calibration": {"method": "histo"}}, "calibration.method"),
    ({"quant": {"activations": {"calibrator": "kl"}}}, "quant.activations.calibrator"),
    ({"placement": {"family": "vitt"}}, "placement.family"),
])
def test_recipe_rejects_unknown_names_naming_the_field(patch, field):
    with pytest.raises(RecipeError) as e:
        quantcore.load_recipe({"name": "bad", "model": TINY, **patch})
    msg = str(e.value)
    assert field in msg and "registered" in msg, msg


def test_duplicate_registration_is_refused():
    class Other(QuantizerKind):
        name = "int"

    with pytest.raises(ValueError, match="already registered"):
        register_quantizer_kind(Other())
    with pytest.raises(ValueError, match="already registered"):
        register_calibrator(type("OtherMax", (Calibrator,), {"name": "max"})())


def test_weights_method_takes_registered_calibrators(registered):
    """calibration.weights_method was max/mse only (a registered calibrator was refused there, while
    quant.weights.calibrator took it); a per-tensor weight grid takes any, and a per-channel one names
    the field when its calibrator cannot give per-channel ranges."""
    for name in ("percentile", "test_p999"):
        r = quantcore.load_recipe({"model": TINY, "calibration": {"weights_method": name},
                                   "quant": {"weights": {"per_channel": False}}})
        assert r.weight_spec().calibrator == name and r.weight_spec().axis is None
    with pytest.raises(RecipeError, match="quant.weights with calibration.weights_method 'test_p999': per-channel"):
        quantcore.load_recipe({"model": TINY, "calibration": {"weights_method": "test_p999"}})
    torch.manual_seed(0)
    r = quantcore.load_recipe({"model": TINY, "calibration": {"weights_method": "percentile", "percentile": 99.0},
                               "quant": {"weights": {"per_channel": False}}})
    m = quantcore.prepare(quantcore.build_model(r), r)
    quantcore.calibrate(m, [torch.randn(2, 1, 28, 28)])
    q = quantizers(m)["blocks.0.mlp.fc1.weight_quantizer"]
    w = dict(m.named_parameters())["blocks.0.mlp.fc1.weight"].detach().abs().flatten()
    assert float(q.amax) < float(w.max())  # a percentile of |w|, not its max
    assert float(q.amax) == pytest.approx(float(torch.quantile(w, 0.99)), rel=0.05)
