"""Extensions from outside quantcore: loaded by the CLI ($QUANTCORE_PLUGINS, entry points), checked at
registration, and a broken one named by quantizer instead of failing somewhere inside torch or, worse,
giving wrong numbers without a word."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import quantcore
from quantcore import api
from quantcore.calib import register_calibrator
from quantcore.calib import registry as cal_registry
from quantcore.calib.registry import Calibrator
from quantcore.checkpoint import CheckpointError
from quantcore.formats import QuantSpec
from quantcore.placement import families, quantizers
from quantcore.plugins import PluginError, load_plugins
from quantcore.quantizer_kinds import QuantizerKind, register_quantizer_kind
from quantcore.quantizer_kinds import base as kind_base
from quantcore.quantizer_kinds.affine import UniformAffine
from quantcore.registry import Registry

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "quantcore/vit_fmnist", "kwargs": {"depth": 1}}
TARGET = "blocks.0.mlp.fc2.input_quantizer"


class _Kind(UniformAffine):
    """A uniform int kind whose fake_quant is replaced per test (the broken plug-ins)."""

    def __init__(self, name, fq=None, enc=None):
        self.name, self._fq, self._enc = name, fq, enc

    def fake_quant(self, quantizer, x):
        return self._fq(quantizer, x) if self._fq else super().fake_quant(quantizer, x)

    def encoding(self, quantizer):
        return self._enc(quantizer) if self._enc else super().encoding(quantizer)


class _Cal(Calibrator):
    def __init__(self, name, fn):
        self.name, self._fn = name, fn

    def compute_range(self, state, spec):
        return self._fn(state, spec)


@pytest.fixture()
def registry_guard():
    names = []
    yield names
    for reg, n in names:
        reg.unregister(n)


def _model(override_spec):
    r = quantcore.load_recipe({"name": "t", "model": TINY, "calibration": {"method": "max", "num_batches": 1},
                               "overrides": [{"match": TARGET, "spec": override_spec}]})
    torch.manual_seed(0)
    m = api.prepare(quantcore.build_model(r), r)
    return m


def _calibrated(override_spec):
    m = _model(override_spec)
    api.calibrate(m, [torch.randn(2, 1, 28, 28)])
    return m


BROKEN_KINDS = {
    "raises": (lambda q, x: (_ for _ in ()).throw(RuntimeError("boom")), "fake_quant raised RuntimeError: boom"),
    "shape": (lambda q, x: x.reshape(-1), "must return the input's shape and dtype"),
    "broadcast": (lambda q, x: x.mean(0, keepdim=True), "must return the input's shape and dtype"),
    "dtype": (lambda q, x: x.to(torch.int8), "must return the input's shape and dtype"),
    "none": (lambda q, x: None, "returned NoneType"),
    "nan": (lambda q, x: x * float("nan"), "inf/NaN for finite input"),
}


@pytest.mark.parametrize("case", list(BROKEN_KINDS))
def test_a_broken_plugin_kind_is_named_by_quantizer(case, registry_guard):
    fq, said = BROKEN_KINDS[case]
    register_quantizer_kind(_Kind(f"t_bad_{case}", fq))
    registry_guard.append((kind_base._KINDS, f"t_bad_{case}"))
    with pytest.raises(PluginError) as e:  # calibration's checking forward, before any checkpoint is written
        _calibrated({"format": f"t_bad_{case}"})
    assert TARGET in str(e.value) and f"t_bad_{case}" in str(e.value) and said in str(e.value), str(e.value)


@pytest.mark.parametrize("case", ["shape", "nan"])
def test_a_broken_plugin_kind_fails_calibration_not_the_first_forward_after_it(case, registry_guard, tmp_path):
    """calibrate ran no quantized forward, so `quantcore calibrate` wrote a checkpoint whose first
    evaluation failed (helper-132); and a loaded checkpoint named its quantizers '(unnamed)'."""
    fq, said = BROKEN_KINDS[case]
    register_quantizer_kind(_Kind(f"t_late_{case}", fq))
    registry_guard.append((kind_base._KINDS, f"t_late_{case}"))
    m = _model({"format": f"t_late_{case}"})
    batches = iter([torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28)])  # a one-shot iterator too
    with pytest.raises(PluginError) as e:
        api.calibrate(m, batches)
    assert TARGET in str(e.value) and said in str(e.value), str(e.value)
    # a kind that works while calibrating, then breaks: the loaded model names the quantizer too
    kind = _Kind(f"t_later_{case}")
    register_quantizer_kind(kind)
    registry_guard.append((kind_base._KINDS, f"t_later_{case}"))
    m = _model({"format": f"t_later_{case}"})

    def endless():  # an endless stream with max_batches: the check keeps the first batch, reads no more
        while True:
            yield torch.randn(2, 1, 28, 28)

    api.calibrate(m, endless(), max_batches=2)
    api.save(m, str(tmp_path / "m.qc.pt"))
    loaded = api.load(str(tmp_path / "m.qc.pt"))
    assert all(q.qname == n for n, q in quantizers(loaded).items())
    kind._fq = fq
    with pytest.raises(PluginError) as e, torch.no_grad():
        loaded(torch.randn(2, 1, 28, 28))
    assert f"quantizer '{TARGET}'" in str(e.value) and "(unnamed)" not in str(e.value), str(e.value)


BROKEN_CALS = {
    "raises": (lambda s, p: (_ for _ in ()).throw(RuntimeError("calib boom")), "raised RuntimeError: calib boom"),
    "scalar": (lambda s, p: 3.0, "must return (lo, hi)"),
    "none": (lambda s, p: None, "must return (lo, hi)"),
    "vector": (lambda s, p: (-torch.ones(7), torch.ones(7)), "per-tensor quantizer"),
    "inverted": (lambda s, p: (1.0, -1.0), "lo > hi"),
    "nan": (lambda s, p: (float("nan"), 1.0), "inf/NaN"),
    "text": (lambda s, p: ("-1", "1"), "not numbers"),
}


@pytest.mark.parametrize("case", list(BROKEN_CALS))
def test_a_broken_plugin_calibrator_is_named_by_quantizer(case, registry_guard):
    fn, said = BROKEN_CALS[case]
    register_calibrator(_Cal(f"t_cal_{case}", fn))
    registry_guard.append((cal_registry._CALIBRATORS, f"t_cal_{case}"))
    m = _model({"calibrator": f"t_cal_{case}"})
    with pytest.raises(quantcore.UserError) as e:
        api.calibrate(m, [torch.randn(2, 1, 28, 28)])
    msg = str(e.value)
    assert TARGET in msg and said in msg and msg.count(TARGET) == 1, msg


@pytest.mark.parametrize("enc, said", [
    (lambda q: {"format": "other", "max": 1.0}, "which quantcore records itself"),
    (lambda q: (_ for _ in ()).throw(KeyError("enc boom")), r"encoding\(\) raised KeyError"),
    (lambda q: {"handle": object()}, "not JSON"),
    (lambda q: {"shifts": [1.0, float("nan")]}, "not JSON"),  # as encodings.json is written (no NaN)
])
def test_a_plugin_encoding_may_not_rewrite_the_row_and_must_be_json(enc, said, registry_guard):
    register_quantizer_kind(_Kind("t_enc", enc=enc))
    registry_guard.append((kind_base._KINDS, "t_enc"))
    m = _calibrated({"format": "t_enc"})
    with pytest.raises(PluginError, match=said) as e:
        api.encodings(m)
    assert TARGET in str(e.value)


def test_registration_checks_type_and_name_and_says_who_holds_a_name(registry_guard):
    with pytest.raises(ValueError, match="not a QuantizerKind"):
        register_quantizer_kind("hello", "t_str")
    with pytest.raises(ValueError, match="not a Calibrator"):
        register_calibrator(object())
    with pytest.raises(ValueError, match="use letters, digits"):
        register_quantizer_kind(_Kind("tern ary:8b/sym"))
    with pytest.raises(ValueError, match="already registered by quantcore.quantizer_kinds.affine.UniformAffine"):
        register_quantizer_kind(type("Other", (QuantizerKind,), {"name": "int"})())
    with pytest.raises(ValueError, match="reserved"):
        families.register_family(type("Auto", (families.FamilyPlan,), {"name": "auto"})())
    # the same class again (a module reload, new settings): replaces, with a warning
    register_calibrator(_Cal("t_same", lambda s, p: (-1.0, 1.0)))
    registry_guard.append((cal_registry._CALIBRATORS, "t_same"))
    second = _Cal("t_same", lambda s, p: (-2.0, 2.0))
    with pytest.warns(UserWarning, match="registered again"):
        register_calibrator(second)
    assert cal_registry.calibrator("t_same") is second
    reg = Registry("thing")
    reg.register(1, "a")
    with pytest.raises(ValueError, match="already registered by builtins.int"):
        reg.register("x", "a")


def test_learnable_plugin_that_ignores_the_learned_scale_is_refused(registry_guard):
    from quantcore.qat import learnable_quantizers

    class FixedOnly(UniformAffine):  # declares learnable but always reads amax
        name = "t_fixed_only"

        def fake_quant(self, quantizer, x):
            qmin, qmax = quantizer.spec.qrange()
            s = quantizer.amax.float() / qmax
            return torch.clamp(torch.round(x / s), qmin, qmax) * s

    register_quantizer_kind(FixedOnly())
    registry_guard.append((kind_base._KINDS, "t_fixed_only"))
    m = _calibrated({"format": "t_fixed_only"})
    with pytest.raises(PluginError, match="does not use quantizer.scale") as e:
        learnable_quantizers(m)
    assert TARGET in str(e.value)


def test_checkpoint_of_a_plugin_kind_or_family_names_what_is_missing(tmp_path, registry_guard):
    register_quantizer_kind(_Kind("t_ckpt"))
    registry_guard.append((kind_base._KINDS, "t_ckpt"))
    m = _calibrated({"format": "int"})
    quantizers(m)[TARGET].set_spec(QuantSpec(format="t_ckpt"))  # set by hand, not by the recipe
    api.save(m, str(tmp_path / "m.qc.pt"))
    kind_base._KINDS.unregister("t_ckpt")
    with pytest.raises(CheckpointError, match=f"quantizer '{TARGET}'.*unknown quantizer format 't_ckpt'"):
        api.load(str(tmp_path / "m.qc.pt"))

    class Mlp(families.FamilyPlan):
        name, priority = "t_mlp_family", 1

        def matches(self, facts):
            return not facts.has_attention

    families.register_family(Mlp())
    r = quantcore.load_recipe({"name": "mlp", "calibration": {"method": "max", "num_batches": 1}})
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    m = api.prepare(net, r, example_input=torch.randn(1, 8))
    assert m.quantcore_placement.family == "t_mlp_family"
    api.calibrate(m, [torch.randn(4, 8)])
    api.save(m, str(tmp_path / "mlp.qc.pt"))
    families._FAMILIES.unregister("t_mlp_family")
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with pytest.raises(CheckpointError, match="model family 't_mlp_family', which is not registered"):
        api.load(str(tmp_path / "mlp.qc.pt"), model=fresh)


def test_cli_loads_plugins_from_the_environment(tmp_path):
    (tmp_path / "t_cli_plug.py").write_text(textwrap.dedent('''
        from quantcore.quantizer_kinds import register_quantizer_kind
        from quantcore.quantizer_kinds.affine import UniformAffine
        class Mine(UniformAffine):
            name = "t_cli_kind"
        register_quantizer_kind(Mine())
    '''))
    (tmp_path / "r.yaml").write_text("version: 1\nname: r\nmodel: {name: quantcore/vit_fmnist}\n"
                                     "quant: {activations: {format: t_cli_kind}}\n")
    env = {"PYTHONPATH": f"{REPO}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "quantcore.cli", "show-recipe", str(tmp_path / "r.yaml")]
    without = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert without.returncode == 2 and "t_cli_kind" in without.stderr, without.stderr[-800:]
    ok = subprocess.run(cmd, capture_output=True, text=True, env={**env, "QUANTCORE_PLUGINS": "t_cli_plug"},
                        timeout=300)
    assert ok.returncode == 0 and "t_cli_kind" in ok.stdout, ok.stderr[-800:]
    bad = subprocess.run(cmd, capture_output=True, text=True, env={**env, "QUANTCORE_PLUGINS": "t_no_such_mod"},
                         timeout=300)
    assert bad.returncode == 2 and "plug-in module 't_no_such_mod' (named by $QUANTCORE_PLUGINS)" in bad.stderr


def test_load_plugins_reads_entry_points(monkeypatch, tmp_path):
    from importlib import metadata

    (tmp_path / "t_ep_plug.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = metadata.EntryPoint(name="mine", value="t_ep_plug", group="quantcore.plugins")
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [ep] if group == "quantcore.plugins" else [])
    assert load_plugins("") == ["t_ep_plug"] and sys.modules["t_ep_plug"].LOADED


def test_ray_entrypoints_load_plugins_before_reading_recipes(monkeypatch, tmp_path, capsys):
    """Ray jobs do not go through the CLI: the driver and each worker/task import the plug-ins, and
    the driver passes $QUANTCORE_PLUGINS to the cluster's processes."""
    from jobs import ray_qat, ray_sweep
    from quantcore.plugins import runtime_env

    monkeypatch.setenv("QUANTCORE_PLUGINS", "t_no_such_mod")
    assert runtime_env() == {"env_vars": {"QUANTCORE_PLUGINS": "t_no_such_mod"}}
    assert ray_qat.main(["-r", "fmnist_w8a8_ft2", "-d", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "t_no_such_mod" in capsys.readouterr().err
    assert ray_sweep.main(["--sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "t_no_such_mod" in capsys.readouterr().err
    with pytest.raises(PluginError, match="t_no_such_mod"):
        ray_qat.train_loop_per_worker({})
    monkeypatch.delenv("QUANTCORE_PLUGINS")
    assert runtime_env() == {}


def test_a_plugin_calibrator_reading_max_statistics_computes_the_range(registry_guard):
    """A calibrator with statistics "max" (and a per-channel one on per-channel weights) got the observed
    extremes instead of its own range, silently."""

    class HalfMax(Calibrator):
        name, statistics, per_channel = "t_halfmax", "max", True

        def compute_range(self, state, spec):
            return state.min * 0.5, state.max * 0.5

    register_calibrator(HalfMax())
    registry_guard.append((cal_registry._CALIBRATORS, "t_halfmax"))
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    ref = _model({"calibrator": "max"})
    api.calibrate(ref, [x])
    m = _model({"calibrator": "t_halfmax"})
    api.calibrate(m, [x])
    q, q0 = quantizers(m)[TARGET], quantizers(ref)[TARGET]
    assert torch.allclose(q.amax, 0.5 * q0.amax) and float(q0.amax) > 0
    w = "blocks.0.mlp.fc2.weight_quantizer"
    r = quantcore.load_recipe({"name": "t", "model": TINY, "calibration": {"method": "max", "num_batches": 1},
                               "overrides": [{"match": w, "spec": {"calibrator": "t_halfmax"}}]})
    torch.manual_seed(0)
    pm = api.prepare(quantcore.build_model(r), r)
    api.calibrate(pm, [x])
    wq = quantizers(pm)[w]
    weight = dict(pm.named_parameters())["blocks.0.mlp.fc2.weight"].detach()
    assert wq.amax.numel() == weight.shape[0]
    assert torch.allclose(wq.amax, 0.5 * weight.abs().amax(1))  # per channel, half of each row's max


def _family(name, **methods):
    return type("Fam_" + name, (families.FamilyPlan,), {"name": name, "priority": 1, **methods})()


def test_a_broken_plugin_family_is_named(registry_guard):
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    r = quantcore.load_recipe({"name": "mlp", "calibration": {"method": "max", "num_batches": 1}})
    families.register_family(_family("t_fam_raise", matches=lambda self, f: 1 / 0))
    registry_guard.append((families._FAMILIES, "t_fam_raise"))
    with pytest.raises(PluginError, match=r"model family 't_fam_raise'.*matches\(\) raised ZeroDivisionError"):
        api.prepare(net, r, example_input=torch.randn(1, 8))
    families._FAMILIES.unregister("t_fam_raise")
    registry_guard.clear()
    families.register_family(_family("t_fam_reason", matches=lambda self, f: True,
                                     default_float_reason=lambda self, site, given: 42))
    registry_guard.append((families._FAMILIES, "t_fam_reason"))
    with pytest.raises(PluginError, match=r"t_fam_reason.*default_float_reason\(\) returned int 42"):
        api.prepare(net, r, example_input=torch.randn(1, 8))


def test_a_plugin_backend_is_named_checked_and_recorded(registry_guard):
    from quantcore import backends
    from quantcore.api import CalibrationResult

    class Halving(backends.Backend):
        name = "t_halving"

        def __init__(self, mode="ok"):
            self.mode = mode

        def calibrate(self, model, batches, max_batches=None, progress=None):
            if self.mode == "raise":
                raise RuntimeError("engine down")
            if self.mode == "none":
                return None
            n = 0
            assert len(batches) == 1  # what it was given: sized and iterable again
            for _ in range(2):  # e.g. a statistics pass, then a refining one
                n = sum(b.shape[0] for b in batches)
            if self.mode == "uncounted":
                return CalibrationResult()
            for q in quantizers(model).values():
                if not q.spec.is_float:
                    q.set_range(-1.0, 1.0)
            return CalibrationResult(batches=1, images=n)

    backends._BACKENDS.register(Halving())
    r = quantcore.load_recipe({"name": "t", "model": TINY,
                               "calibration": {"method": "max", "num_batches": 1, "backend": "t_halving"}})
    backends._BACKENDS.unregister("t_halving")
    for mode, said in (("raise", r"calibration.backend 't_halving' \(.*Halving\): calibrate\(\) raised RuntimeError"),
                       ("none", r"calibrate\(\) returned NoneType"),
                       ("uncounted", r"read 2 batch\(es\) but its result counts no images")):
        backends._BACKENDS.register(Halving(mode))
        torch.manual_seed(0)
        m = api.prepare(quantcore.build_model(r), r)
        with pytest.raises(PluginError, match=said):
            api.calibrate(m, [torch.randn(2, 1, 28, 28)])
        backends._BACKENDS.unregister("t_halving")
    backends._BACKENDS.register(Halving())
    registry_guard.append((backends._BACKENDS, "t_halving"))
    torch.manual_seed(0)
    m = api.prepare(quantcore.build_model(r), r)
    res = api.calibrate(m, [torch.randn(2, 1, 28, 28)])
    rec = res.transforms["backend"]
    assert rec["name"] == "t_halving" and rec["implementation"].endswith("Halving")
    assert set(rec["ranges"]) == {n for n, q in quantizers(m).items() if not q.spec.is_float}


def test_a_checkpoint_loaded_under_another_class_of_the_same_name_says_so(tmp_path, registry_guard, caplog):
    import logging

    register_quantizer_kind(_Kind("t_impl"))
    registry_guard.append((kind_base._KINDS, "t_impl"))
    m = _calibrated({"format": "t_impl"})
    api.save(m, str(tmp_path / "m.qc.pt"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        api.load(str(tmp_path / "m.qc.pt"))
    assert not [x for x in caplog.records if "was implemented by" in x.message]

    class Floor(_Kind):  # another implementation registered under the same name
        pass

    kind_base._KINDS.unregister("t_impl")
    register_quantizer_kind(Floor("t_impl"))
    with caplog.at_level(logging.WARNING):
        api.load(str(tmp_path / "m.qc.pt"))
    said = [x.message for x in caplog.records if "was implemented by" in x.message]
    assert len(said) == 1 and "format 't_impl'" in said[0] and "_Kind" in said[0] and "Floor" in said[0], said
