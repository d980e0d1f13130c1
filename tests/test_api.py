"""Recipes, the public API, checkpoints and encodings on a small ViT with random weights."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import yaml

import quantcore
from quantcore import CheckpointError, RecipeError
from quantcore.api import calibration_state, collect, finalize, load_calibration_state, merge_calibration_states

TINY = {"name": "quantcore/vit_fmnist", "kwargs": {"depth": 2}}


def tiny_recipe(**over) -> quantcore.Recipe:
    data = {"name": "tiny", "model": TINY, "calibration": {"method": "percentile", "num_batches": 4}}
    data.update(over)
    return quantcore.load_recipe(data)


def batches(n=4, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 1, 28, 28, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    recipe = tiny_recipe()
    model = quantcore.build_model(recipe)
    fp32 = copy.deepcopy(model)
    quantcore.prepare(model, recipe)
    res = quantcore.calibrate(model, batches())
    return model, fp32, res


# -- recipes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(quantcore.builtin_recipes()))
def test_builtin_recipes_validate(name):
    r = quantcore.load_recipe(name)
    assert r.name == name
    assert r.weight_spec().bits in (4, 8) or r.weight_spec().is_float
    # handed between processes as a full dump (Ray Train workers, analyze's search recipe, the demo's
    # torchrun ranks): every default spelled out, and it must validate again
    assert quantcore.Recipe.model_validate(r.model_dump(mode="json")) == r
    assert quantcore.load_recipe(yaml.safe_load(quantcore.recipe.dump_recipe(r))) == r


def test_seed_recipes_match_their_seeds():
    ft1, ft2 = quantcore.load_recipe("vit_b16_384_ft1"), quantcore.load_recipe("vit_b16_384_ft2")
    assert ft1.weight_spec().axis == 0 and ft2.weight_spec().axis is None
    assert ft1.activation_spec().calibrator == "percentile" and ft1.activation_spec().percentile == 99.99
    rx = quantcore.load_recipe("resnext101_w8a8")
    assert rx.placement.fold_bn and rx.calibration.images_per_class == 2
    assert rx.weight_spec().symmetric and not rx.activation_spec().symmetric
    fp = quantcore.load_recipe("deit_tiny_fp16_32")
    assert fp.weight_spec().format == "fp16" and fp.activation_spec().format == "fp16"
    mixed = quantcore.load_recipe("vit_b16_int8_mixed")
    assert {o.match for o in mixed.overrides if o.float} == {"blocks.4.mlp.fc2", "blocks.5.mlp.fc2"}


def test_recipe_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": TINY, "quant": {"weights": {"bitz": 8}}}))
    with pytest.raises(RecipeError, match=r"bad\.yaml[\s\S]*quant\.weights\.bitz"):
        quantcore.load_recipe(str(bad))
    bad.write_text(yaml.safe_dump({"model": TINY, "quant": {"activations": {"bits": 1}}}))
    with pytest.raises(RecipeError, match=r"quant\.activations\.bits"):
        quantcore.load_recipe(str(bad))
    bad.write_text(yaml.safe_dump({"model": TINY, "calibration": {"method": "median"}}))
    with pytest.raises(RecipeError, match=r"calibration\.method"):
        quantcore.load_recipe(str(bad))
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        quantcore.load_recipe(str(bad))
    # a repeated key: yaml.safe_load kept the last one silently
    bad.write_text(yaml.safe_dump({"model": TINY, "quant": {"weights": {"bits": 8}}}) + "quant: {}\n")
    with pytest.raises(RecipeError, match=rf"^recipe {re.escape(str(bad))} line \d+: key 'quant' appears twice in one "
                                          r"mapping \(first on line \d+\)$"):
        quantcore.load_recipe(str(bad))
    with pytest.raises(RecipeError, match="not found"):
        quantcore.load_recipe(str(tmp_path / "missing.yaml"))
    # YAML text, or a name the file system cannot hold, was a raw OSError "File name too long"
    with pytest.raises(RecipeError, match=r"a recipe is a dict, a built-in name, a YAML file's path or a storage "
                                          r"URI .*not YAML text"):
        quantcore.load_recipe("name: x\nquant: {}\n" * 30)
    with pytest.raises(RecipeError, match=r"not a file \(File name too long\); a recipe is a dict"):
        quantcore.load_recipe("x" * 400)


def test_recipe_settings_that_nothing_reads_or_that_contradict_are_refused(tmp_path):
    """A calibration field no quantizer can read, two fields that set the same thing differently, or
    grid fields an override gives only float casts: refused naming them (before, the last one or the
    more specific one won silently and report.json named the other)."""
    bad = tmp_path / "bad.yaml"
    for section, words in [
            ({"calibration": {"method": "max", "percentile": 50.0}}, ("calibration.percentile", "max")),
            ({"calibration": {"percentile": 99.9}, "quant": {"activations": {"percentile": 99.0}}},
             ("calibration.percentile", "quant.activations.percentile")),
            ({"calibration": {"method": "max", "bins": 64}}, ("calibration.bins", "histogram")),
            ({"calibration": {"method": "mse"}, "quant": {"activations": {"calibrator": "max"}}},
             ("calibration.method", "quant.activations.calibrator")),
            ({"calibration": {"weights_method": "mse"}, "quant": {"weights": {"calibrator": "max"}}},
             ("calibration.weights_method", "quant.weights.calibrator")),
            ({"calibration": {"num_batches": 1, "images_per_class": 2}}, ("images_per_class", "num_batches")),
            # written with their default values: still written, still contradicting (they were accepted)
            ({"calibration": {"method": "percentile"}, "quant": {"activations": {"calibrator": "max"}}},
             ("calibration.method: 'percentile'", "quant.activations.calibrator: 'max'")),
            ({"calibration": {"percentile": 99.99}, "quant": {"activations": {"calibrator": "max"}}},
             ("calibration.percentile", "calibrators: max")),
            ({"calibration": {"bins": 2048, "method": "max"}}, ("calibration.bins", "histogram")),
            # weights read calibration.percentile too, unless their own section sets one
            ({"calibration": {"method": "max", "weights_method": "percentile", "percentile": 99.0},
              "quant": {"weights": {"per_channel": False, "percentile": 99.5}}},
             ("calibration.percentile: 99.0 cannot act", "quant.weights.percentile replaces it")),
            ({"calibration": {"num_batches": 8, "images_per_class": 2}}, ("images_per_class", "num_batches")),
            ({"overrides": [{"match": "*fc2.input_quantizer", "enabled": True, "spec": {"enabled": False}}]},
             ("enabled", "spec.enabled")),
            # a float cast has no range: the calibrator settings of its section act on nothing (they were
            # accepted, and encodings.json said method 'none')
            ({"quant": {"activations": {"format": "fp16"}}, "calibration": {"method": "mse"}},
             ("calibration.method: 'mse' cannot act", "quant.activations is format 'fp16'")),
            ({"quant": {"activations": {"format": "bf16"}}, "calibration": {"method": "percentile", "percentile": 99.0}},
             ("calibration.method: 'percentile' cannot act", "'bf16'")),
            ({"quant": {"weights": {"format": "fp8_e4m3"}}, "calibration": {"weights_method": "percentile",
                                                                             "percentile": 99.0, "method": "max"}},
             ("calibration.weights_method: 'percentile' cannot act", "quant.weights is format 'fp8_e4m3'")),
            ({"quant": {"activations": {"format": "fp16"}, "weights": {"format": "fp16"}},
              "calibration": {"bins": 512}}, ("calibration.bins: 512 cannot act", "calibrators: none"))]:
        bad.write_text(yaml.safe_dump({"model": TINY, **section}))
        with pytest.raises(RecipeError) as err:
            quantcore.load_recipe(str(bad))
        assert all(w in str(err.value) for w in words), (section, str(err.value))
    # ...while a field some quantizer does read stays accepted, and show-recipe's dump loads back
    weights_read = {"model": TINY, "calibration": {"weights_method": "percentile", "percentile": 99.0},
                    "quant": {"activations": {"percentile": 99.9}, "weights": {"per_channel": False}}}
    bad.write_text(yaml.safe_dump(weights_read))
    assert quantcore.load_recipe(str(bad)).weight_spec().percentile == 99.0
    # a cast section whose quantizers an override puts on an integer grid reads its calibrator there
    to_grid = {"model": TINY, "quant": {"activations": {"format": "fp16"}}, "calibration": {"method": "mse"},
               "overrides": [{"match": "*fc2.input_quantizer", "spec": {"format": "int", "bits": 8}}]}
    bad.write_text(yaml.safe_dump(to_grid))
    assert quantcore.load_recipe(str(bad)).calibration.method == "mse"
    ok = {"model": TINY, "calibration": {"method": "max", "bins": 64, "percentile": 99.0},
          "overrides": [{"match": "*fc2.input_quantizer", "spec": {"calibrator": "percentile"}}]}
    bad.write_text(yaml.safe_dump(ok))
    r = quantcore.load_recipe(str(bad))
    bad.write_text(quantcore.recipe.dump_recipe(r))
    assert quantcore.load_recipe(str(bad)) == r
    # a dump leaves out what would act on nothing (it spells every other default), so it loads back
    for section in ({"quant": {"activations": {"calibrator": "max"}, "weights": {"calibrator": "max"}}},
                    {"calibration": {"images_per_class": 2}}):
        r = quantcore.load_recipe({"model": TINY, **section})
        bad.write_text(quantcore.recipe.dump_recipe(r))
        assert quantcore.load_recipe(str(bad)) == r
    # an older quantcore's dump spelled out every calibration default, inert ones too: it loads (read as
    # a dump, compared with the defaults), while an inert value that is not the default stays refused
    r = quantcore.load_recipe({"model": TINY, "quant": {"activations": {"calibrator": "max"}}})
    old = r.model_dump(mode="json")
    assert old["calibration"]["percentile"] == 99.99 and old["calibration"]["method"] == "percentile"
    bad.write_text(yaml.safe_dump(old))
    assert quantcore.load_recipe(str(bad)) == r
    old["calibration"]["percentile"] = 99.9
    bad.write_text(yaml.safe_dump(old))
    with pytest.raises(RecipeError, match="calibration.percentile: 99.9 cannot act"):
        quantcore.load_recipe(str(bad))
    # an override's bits on quantizers that are all float casts
    casts = tiny_recipe(quant={"activations": {"format": "fp16"}},
                        overrides=[{"match": "blocks.0.mlp.fc2.input_quantizer", "spec": {"bits": 4}}])
    with pytest.raises(quantcore.errors.PlacementError, match=r"overrides\[0\][\s\S]*bits[\s\S]*float cast"):
        quantcore.prepare(quantcore.build_model(casts), casts)
    # ...but a glob that also reaches integer quantizers acts on those
    some = tiny_recipe(quant={"activations": {"format": "fp16"}}, overrides=[{"match": "blocks.0.mlp.fc2.*",
                                                                             "spec": {"bits": 4}}])
    m = quantcore.prepare(quantcore.build_model(some), some)
    assert quantcore.quantizers(m)["blocks.0.mlp.fc2.weight_quantizer"].spec.bits == 4


def test_report_names_the_calibrators_that_ran_and_quantizers_left_float(tmp_path):
    """quant.activations.calibrator and overrides decide what runs: the calibration record counts
    them (not calibration.method's default); a quantizer an override leaves float is listed float."""
    r = tiny_recipe(quant={"activations": {"calibrator": "max"}},
                    overrides=[{"match": "blocks.0.mlp.fc2.input_quantizer", "spec": {"calibrator": "mse"}},
                               {"match": "blocks.1.mlp.fc2.input_quantizer", "float": True}])
    m = quantcore.prepare(quantcore.build_model(r), r)
    used = quantcore.api.calibrators_used(m)
    n_act = sum(q.kind == "activation" for q in quantcore.quantizers(m).values())
    assert used["activation"] == {"max": n_act - 1, "mse": 1} and list(used["weight"]) == ["max"]
    assert quantcore.api.method_summary(used) == f"max ({n_act - 1}), mse (1)"
    pl = m.quantcore_placement
    assert "blocks.1.mlp.fc2.input_quantizer" not in pl.quantizers
    assert "overrides[1]" in pl.float_reasons["blocks.1.mlp.fc2.input_quantizer"]
    assert "blocks.1.mlp.fc2.input_quantizer" in pl.as_dict()["float"]


def test_a_relative_checkpoint_in_a_recipe_file_is_relative_to_that_file(tmp_path, monkeypatch):
    """Before: resolved against the working directory, so the same recipe loaded other weights
    depending on where it ran (a w.pt there won silently)."""
    torch.manual_seed(0)
    ref = quantcore.build_model(tiny_recipe())
    (tmp_path / "sub").mkdir()
    (tmp_path / "cwd").mkdir()
    torch.save(ref.state_dict(), tmp_path / "sub" / "w.pt")
    torch.save(quantcore.build_model(tiny_recipe()).state_dict(), tmp_path / "cwd" / "w.pt")  # other weights
    (tmp_path / "sub" / "r.yaml").write_text(yaml.safe_dump({"model": {**TINY, "checkpoint": "w.pt"}}))
    monkeypatch.chdir(tmp_path / "cwd")
    r = quantcore.load_recipe(str(tmp_path / "sub" / "r.yaml"))
    assert r.model.checkpoint == str((tmp_path / "sub" / "w.pt").resolve())
    got = quantcore.build_model(r)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))
    # absolute paths, URIs and dict recipes are left as they are
    assert quantcore.load_recipe({"model": {**TINY, "checkpoint": "w.pt"}}).model.checkpoint == "w.pt"


def test_a_recipe_file_without_a_name_is_named_after_the_file(tmp_path):
    """Before: every such file was 'custom', so two of them in one run were refused as duplicates
    (the chart's inline recipes, mounted as <key>.yaml, hit this in the pod)."""
    body = yaml.safe_dump({"model": TINY})
    for stem in ("int8_fast", "W4A4.v2", "fp32", "bad name", "checkpoints"):
        (tmp_path / f"{stem}.yaml").write_text(body)
    got = {stem: quantcore.load_recipe(str(tmp_path / f"{stem}.yaml")).name
           for stem in ("int8_fast", "W4A4.v2", "fp32", "bad name", "checkpoints")}
    # a stem that is not a valid or free recipe name keeps the default
    assert got == {"int8_fast": "int8_fast", "W4A4.v2": "W4A4.v2", "fp32": "custom", "bad name": "custom",
                   "checkpoints": "custom"}
    (tmp_path / "named.yaml").write_text(yaml.safe_dump({"name": "mine", "model": TINY}))
    assert quantcore.load_recipe(str(tmp_path / "named.yaml")).name == "mine"
    assert quantcore.load_recipe({"model": TINY}).name == "custom"


# -- API --------------------------------------------------------------------------------------------
def test_calibrate_sets_every_range_and_quantization_changes_outputs(calibrated):
    model, fp32, res = calibrated
    assert res.batches == 4 and res.images == 32 and res.uncalibrated == []
    qs = quantcore.quantizers(model)
    assert qs and all(q.is_calibrated for q in qs.values())
    x = batches(1, seed=7)[0][0]
    with torch.no_grad():
        ref, out = fp32(x), model(x)
        with quantcore.quantization_disabled(model):
            off = model(x)
    assert torch.equal(off, ref)
    assert not torch.equal(out, ref)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_merged_worker_states_equal_single_worker():
    data = batches(6, seed=3)
    recipe = tiny_recipe()
    torch.manual_seed(0)
    base = quantcore.build_model(recipe)
    single = quantcore.prepare(copy.deepcopy(base), recipe)
    quantcore.calibrate(single, data)
    states = []
    for shard in (data[0:1], data[1:4], data[4:6]):
        w = quantcore.prepare(copy.deepcopy(base), recipe)
        collect(w, shard)
        states.append(calibration_state(w))
    merged_model = quantcore.prepare(copy.deepcopy(base), recipe)
    load_calibration_state(merged_model, merge_calibration_states(states[::-1]))
    finalize(merged_model)
    a, b = quantcore.quantizers(single), quantcore.quantizers(merged_model)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n].amin, b[n].amin) and torch.equal(a[n].amax, b[n].amax), n


def test_fp16_32_recipe_changes_outputs_only_slightly():
    recipe = tiny_recipe(quant={"weights": {"format": "fp16"}, "activations": {"format": "fp16"}})
    torch.manual_seed(0)
    model = quantcore.build_model(recipe)
    fp32 = copy.deepcopy(model)
    quantcore.prepare(model, recipe)
    quantcore.calibrate(model, batches(1))
    x = batches(1, seed=5)[0][0]
    with torch.no_grad():
        ref, out = fp32(x), model(x)
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


# -- checkpoints ------------------------------------------------------------------------------------
def test_save_load_bit_identical(calibrated, tmp_path):
    model, _, _ = calibrated
    path = tmp_path / "model.qc.pt"
    quantcore.save(model, str(path), extra={"note": "test"})
    raw = torch.load(path, weights_only=True)  # no pickled code inside
    assert raw["format"] == "quantcore.checkpoint"
    loaded = quantcore.load(str(path))
    x = batches(1, seed=11)[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.quantcore_meta["extra"] == {"note": "test"}
    assert "torch" in loaded.quantcore_meta["versions"]


def test_corrupted_and_tampered_checkpoints_are_refused(calibrated, tmp_path):
    model, _, _ = calibrated
    path = tmp_path / "m.pt"
    quantcore.save(model, str(path))
    data = path.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt.*corrupted"):
        quantcore.load(str(trunc))
    # Tamper: change one range value, keep the file well-formed.
    payload = torch.load(path, weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith("amax"))
    payload["state_dict"][key] = payload["state_dict"][key] * 2
    tampered = tmp_path / "tampered.pt"
    torch.save(payload, tampered)
    with pytest.raises(CheckpointError, match="tampered.pt.*SHA-256"):
        quantcore.load(str(tampered))
    with pytest.raises(CheckpointError, match="not found"):
        quantcore.load(str(tmp_path / "nope.pt"))
    # what is not a checkpoint (encodings.json, a pickle with code in it) is one line naming the file,
    # never torch's advice to retry with weights_only=False
    import os

    evil = tmp_path / "evil.pt"
    torch.save({"f": os.system}, evil)
    (tmp_path / "encodings.json").write_text('{"quantizers": []}')
    for bad, why in (("encodings.json", "not a PyTorch archive"), ("evil.pt", "posix.system"), ("trunc.pt", "zip archive")):
        with pytest.raises(CheckpointError) as err:
            quantcore.load(str(tmp_path / bad))
        msg = str(err.value)
        assert bad in msg and why in msg and "\n" not in msg and "weights_only" not in msg, msg


def test_checkpoint_mismatching_model_is_refused(calibrated, tmp_path):
    model, _, _ = calibrated
    path = tmp_path / "m.pt"
    quantcore.save(model, str(path))
    other = quantcore.build_model({"model": {"name": "quantcore/vit_fmnist", "kwargs": {"depth": 3}}})
    with pytest.raises(CheckpointError, match="m.pt"):
        quantcore.load(str(path), model=other)


def test_encodings_table(calibrated, tmp_path):
    model, _, _ = calibrated
    table = quantcore.encodings(model, extra={"calibration": "percentile"})
    json.dumps(table)  # serializable
    rows = {r["name"]: r for r in table["quantizers"]}
    assert rows.keys() == quantcore.quantizers(model).keys()
    w = next(r for n, r in rows.items() if n.endswith("fc1.weight_quantizer"))
    assert w["kind"] == "weight" and w["axis"] == 0 and w["symmetric"] and w["bits"] == 8
    assert isinstance(w["scale"], list) and len(w["scale"]) == len(w["amax"])
    a = next(r for n, r in rows.items() if n.endswith("fc1.input_quantizer"))
    assert a["calibrator"] == "percentile" and a["percentile"] == 99.99
    q = quantcore.quantizers(model)[a["name"]]
    assert a["scale"] == pytest.approx(float(q.amax) / 127)
    assert a["zero_point"] == 0 and a["quant_min"] == -128 and a["quant_max"] == 127


def test_recalibration_gives_the_same_ranges_as_the_first_calibration():
    recipe = tiny_recipe()
    torch.manual_seed(0)
    model = quantcore.prepare(quantcore.build_model(recipe), recipe)
    data = batches(3, seed=4)
    quantcore.calibrate(model, data)
    first = {n: (q.amin.clone(), q.amax.clone()) for n, q in quantcore.quantizers(model).items()}
    quantcore.calibrate(model, data)  # weights are calibrated now: they must stay float while collecting
    for n, q in quantcore.quantizers(model).items():
        assert torch.equal(q.amin, first[n][0]) and torch.equal(q.amax, first[n][1]), n


def test_learnable_quantizers_pass_gradients_and_survive_save_load(tmp_path):
    """QAT hook: make_learnable() turns calibrated ranges into parameters torch's learnable
    fake-quant ops train; outputs are unchanged at the switch and the checkpoint keeps them."""
    recipe = tiny_recipe()
    torch.manual_seed(0)
    model = quantcore.prepare(quantcore.build_model(recipe), recipe)
    quantcore.calibrate(model, batches(2))
    x = batches(1, seed=9)[0][0]
    with torch.no_grad():
        before = model(x)
    qs = quantcore.quantizers(model)
    for q in qs.values():
        q.make_learnable()
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    model(x).square().mean().backward()
    act = next(q for n, q in qs.items() if n.endswith("fc1.input_quantizer"))
    wgt = next(q for n, q in qs.items() if n.endswith("fc1.weight_quantizer"))
    assert act.scale.grad is not None and act.scale.grad.abs().sum() > 0
    assert wgt.scale.grad is not None and wgt.scale.grad.shape == wgt.scale.shape and wgt.scale.numel() > 1
    path = tmp_path / "qat.pt"
    quantcore.save(model, str(path))
    loaded = quantcore.load(str(path))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert all(q.spec.learnable for q in quantcore.quantizers(loaded).values())


# -- own modules, weight provenance, JSON-safe artifacts -------------------------------------------
class SmallNet(torch.nn.Module):
    """A user's own model: quantcore cannot build it, so its recipe has no model: section."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_prepare_and_load_an_own_module_without_a_model_section(tmp_path):
    recipe = quantcore.load_recipe({"name": "own", "placement": {"family": "generic"}})
    assert recipe.model is None
    torch.manual_seed(0)
    model = quantcore.prepare(SmallNet(), recipe, example_input=torch.randn(2, 1, 28, 28))
    quantcore.calibrate(model, batches(2))
    path = str(tmp_path / "own.qc.pt")
    quantcore.save(model, path)
    assert quantcore.encodings(model)["model"] == "SmallNet"
    loaded = quantcore.load(path, model=SmallNet())  # a fresh instance: its weights are replaced
    x = batches(1, seed=3)[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError, match=r"own\.qc\.pt.*model="):
        quantcore.load(path)
    with pytest.raises(quantcore.models.ModelError, match=r"model\.name"):
        quantcore.build_model(recipe)



class _NoWeights(torch.nn.Module):
    """Pooling and an activation only: no Linear, Conv or attention matmul to quantize."""

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(x), 2).flatten(1)


@pytest.mark.parametrize("case", ["no quantizable op", "every layer float", "keep_float", "BatchNorm folded first",
                                  "every quantizer disabled", "quant sections disabled", "spec.enabled"])
def test_prepare_refuses_a_model_left_with_no_quantizer_and_leaves_it_as_it_was(case, tmp_path):
    """A checkpoint with nothing quantized would evaluate and export as FP32 under a quantized name. The
    refusal leaves the model as it was (a BatchNorm fold undone), so a corrected recipe can prepare it."""
    from quantcore.errors import PlacementError

    over = {}
    if case == "no quantizable op":
        model, why = _NoWeights(), "reached no quantizable op"
    elif case == "every layer float":
        model, over, why = SmallNet(), {"overrides": [{"match": "*", "float": True}]}, r"kept float by overrides\[0\]"
    elif case == "keep_float":
        model, over, why = SmallNet(), {"placement": {"family": "generic", "keep_float": ["*"]}}, "keep_float"
    elif case == "BatchNorm folded first":
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        model[1].running_mean.uniform_(-1, 1)
        over, why = {"overrides": [{"match": "*", "float": True}]}, "overrides"
    else:  # placed, but not one quantizer would act (a fold to undo here too)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.LazyLinear(3))
        model(torch.randn(2, 1, 28, 28))
        model[1].running_mean.uniform_(-1, 1)
        over, why = {
            "every quantizer disabled": ({"overrides": [{"match": "*", "enabled": False}]},
                                         r"\(4, e.g. '0.input_quantizer'\) is disabled \(overrides\[0\] '\*'\)"),
            "quant sections disabled": ({"quant": {"weights": {"enabled": False}, "activations": {"enabled": False}}},
                                        r"is disabled \(quant.weights enabled: false; quant.activations enabled: false\)"),
            "spec.enabled": ({"quant": {"activations": {"enabled": False}},
                              "overrides": [{"match": "*weight_quantizer", "spec": {"enabled": False}}]},
                             r"is disabled \(quant.activations enabled: false; overrides\[0\] '\*weight_quantizer'\)"),
        }[case]
    model.eval()
    before = copy.deepcopy(model.state_dict())
    recipe = quantcore.load_recipe({"name": "nothing", "placement": {"family": "generic"}, **over})
    prefix = r"every quantizer placed .*" if "disabled" in case or case == "spec.enabled" else "no quantizer to place: .*"
    with pytest.raises(PlacementError, match=r"recipe 'nothing': " + prefix + why):
        quantcore.prepare(model, recipe, example_input=torch.randn(2, 1, 28, 28))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    if case != "no quantizable op":  # the same model object, a recipe that quantizes: prepared as if fresh
        quantcore.prepare(model, {"name": "fixed", "placement": {"family": "generic"}},
                          example_input=torch.randn(2, 1, 28, 28))
        assert quantcore.quantizers(model)


def test_a_checkpoint_whose_recipe_places_nothing_on_the_model_names_the_file(tmp_path):
    recipe = quantcore.load_recipe({"name": "own", "placement": {"family": "generic"}})
    model = quantcore.prepare(SmallNet(), recipe, example_input=torch.randn(2, 1, 28, 28))
    quantcore.calibrate(model, batches(1))
    path = str(tmp_path / "own.qc.pt")
    quantcore.save(model, path)
    with pytest.raises(CheckpointError, match=r"checkpoint .*own\.qc\.pt: recipe 'own': no quantizer to place"):
        quantcore.load(path, model=_NoWeights())


def test_build_model_records_where_its_weights_came_from(tmp_path):
    from quantcore.models import BUILDERS, PRETRAINED_BUILDERS, register_builder

    random = quantcore.build_model(tiny_recipe())
    assert random.quantcore_weights is None  # random initialization: the pipeline warns
    sd = tmp_path / "fp32.pt"
    torch.save(random.state_dict(), sd)
    loaded = quantcore.build_model(tiny_recipe(model={**TINY, "checkpoint": str(sd)}))
    assert loaded.quantcore_weights == f"model.checkpoint {sd}"
    assert not hasattr(quantcore.build_model(tiny_recipe(), load_weights=False), "quantcore_weights")

    @register_builder("test/own_weights", pretrained=True)
    def own(pretrained: bool = False, num_classes: int = 10):
        return SmallNet()

    try:
        assert quantcore.build_model({"model": {"name": "test/own_weights", "pretrained": True}}
                                     ).quantcore_weights == "test/own_weights pretrained"
        assert quantcore.build_model({"model": {"name": "test/own_weights"}}).quantcore_weights is None
    finally:
        BUILDERS.pop("test/own_weights")
        PRETRAINED_BUILDERS.discard("test/own_weights")
    with pytest.raises(quantcore.models.ModelError, match=r"model\.pretrained"):
        quantcore.build_model(tiny_recipe(model={**TINY, "pretrained": True}))


def test_model_mistakes_name_the_recipe_field(tmp_path):
    from quantcore.errors import UserError

    with pytest.raises(UserError, match=r"model\.kwargs.*depthh"):
        quantcore.build_model(tiny_recipe(model={**TINY, "kwargs": {"depthh": 2}}))
    other = tmp_path / "other.pt"  # a state_dict of another width: shapes differ
    torch.save(quantcore.build_model({"model": {**TINY, "kwargs": {"depth": 2, "embed_dim": 32}}}).state_dict(), other)
    with pytest.raises(UserError, match=r"model\.checkpoint .*other\.pt.*size mismatch"):
        quantcore.build_model(tiny_recipe(model={**TINY, "checkpoint": str(other)}))
    with pytest.raises(RecipeError, match=r"quant\.activations: per_channel/axis is for weights only"):
        tiny_recipe(quant={"activations": {"per_channel": True}})
    with pytest.raises(RecipeError, match=r"name: 'fp32' is reserved"):
        tiny_recipe(name="fp32")
    with pytest.raises(UserError, match="prepare"):
        quantcore.save(SmallNet(), str(tmp_path / "x.pt"))


def test_reports_and_encodings_write_non_finite_numbers_as_null(calibrated):
    from quantcore.evaluate import ModelScore
    from quantcore.report import build_report, report_markdown

    scores = {"fp32": ModelScore("fp32", 4, 50.0, 100.0, [50.0, float("nan")]),
              "q": ModelScore("q", 4, 50.0, 100.0, [50.0, float("nan")], agreement=100.0, sqnr_db=float("inf"))}
    rep = build_report(model="m", recipe=None, scores=scores, reference="fp32", data={},
                       warnings=["the FP32 model has RANDOM WEIGHTS"])
    assert rep["results"]["q"]["sqnr_db"] is None and rep["results"]["q"]["per_class"] == [50.0, None]
    assert json.loads(json.dumps(rep, allow_nan=False))["warnings"] == ["the FP32 model has RANDOM WEIGHTS"]
    md = report_markdown(rep)
    assert "**WARNING**: the FP32 model has RANDOM WEIGHTS" in md
    assert "| q | 50.00 | 100.00 | +0.00 | 100.00 | – |" in md
    model, _, _ = calibrated
    model = copy.deepcopy(model)
    q = next(q for n, q in quantcore.quantizers(model).items() if n.endswith("fc1.input_quantizer"))
    q.amax.fill_(float("inf"))
    row = next(r for r in quantcore.encodings(model)["quantizers"] if r["name"].endswith("fc1.input_quantizer"))
    assert row["max"] is None
    json.dumps(quantcore.encodings(model), allow_nan=False)


def test_convert_writes_learned_scales_back_into_the_ranges(tmp_path):
    """After QAT the learned scale/zero point are the quantizer's range: encodings and checkpoints
    report them (issue #8: before, encodings kept the calibration scale after training)."""
    recipe = tiny_recipe(quant={"activations": {"bits": 8, "symmetric": False}})
    torch.manual_seed(0)
    model = quantcore.prepare(quantcore.build_model(recipe), recipe)
    quantcore.calibrate(model, batches(2))
    x = batches(1, seed=9)[0][0]
    qs = quantcore.quantizers(model)
    for q in qs.values():
        q.make_learnable()
    with torch.no_grad():  # "training" moved every scale and zero point
        for q in qs.values():
            q.scale.mul_(1.3)
            q.zero_point.add_(2.0 if not q.spec.symmetric else 0.0)
        trained = model(x)
        learned = {n: (q.scale.clone(), q.zero_point.clone()) for n, q in qs.items()}
    quantcore.convert(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-5)
    rows = {r["name"]: r for r in quantcore.encodings(model)["quantizers"]}
    for n, q in qs.items():
        assert not q.spec.learnable and q.scale is None
        scale, zp = q.scale_zero_point()
        torch.testing.assert_close(scale.reshape(-1), learned[n][0].abs().reshape(-1), rtol=1e-6, atol=0)
        assert torch.equal(zp.reshape(-1).float(), learned[n][1].round().clamp(*q.spec.qrange()).reshape(-1))
        assert rows[n]["scale"] == pytest.approx(scale.reshape(-1).tolist() if scale.numel() > 1 else float(scale))
    path = tmp_path / "converted.qc.pt"
    quantcore.save(model, str(path))
    loaded = quantcore.load(str(path))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_wrapped_models_use_the_unwrapped_names(tmp_path):
    """DataParallel (DDP's single-process sibling) and torch.compile wrappers: quantizer names,
    encodings and checkpoints are those of the plain model, which loads them back."""
    recipe = tiny_recipe()
    torch.manual_seed(0)
    model = quantcore.prepare(quantcore.build_model(recipe), recipe)
    quantcore.calibrate(model, batches(1))
    plain = list(quantcore.quantizers(model))
    for wrapped in (torch.nn.DataParallel(model), torch.compile(model)):
        assert list(quantcore.quantizers(wrapped)) == plain
        assert [r["name"] for r in quantcore.encodings(wrapped)["quantizers"]] == plain
    quantcore.save(torch.nn.DataParallel(model), str(tmp_path / "w.qc.pt"))
    x = batches(1, seed=3)[0][0]
    with torch.no_grad():
        assert torch.equal(quantcore.load(str(tmp_path / "w.qc.pt"))(x), model(x))


def test_checkpoints_whose_recipe_has_options_refused_since_still_load(calibrated, tmp_path):
    """Refusals of options that cannot act apply to recipes being run; a checkpoint written when its
    recipe was accepted stays readable (export, evaluate, --init)."""
    from pydantic import ValidationError

    from quantcore.checkpoint import checkpoint_bytes, read_checkpoint
    from quantcore.config import Recipe

    model, _, _ = calibrated
    path = tmp_path / "model.qc.pt"
    quantcore.save(model, str(path))
    meta, _ = read_checkpoint(path.read_bytes(), str(path))
    meta["recipe"]["qat"] = {"ranges": "frozen", "learn_zero_point": False,
                             "optimizer": {"name": "sgd", "momentum": 0.0, "nesterov": True},
                             "distill": {"kind": "kd", "alpha": 0.0}}
    with pytest.raises(ValidationError, match="learn_zero_point|nesterov|alpha"):
        Recipe.model_validate(meta["recipe"])
    path.write_bytes(checkpoint_bytes(model, meta))
    loaded = quantcore.load(str(path))
    assert loaded.quantcore_recipe.qat.learn_zero_point is False
    x = batches(1, seed=11)[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_encodings_of_a_float_cast_state_no_grid():
    """A float cast has no integer grid: its row said axis 0, symmetric, narrow_range from the spec's
    defaults, as if a per-channel grid acted."""
    r = tiny_recipe(quant={"weights": {"format": "fp16"}, "activations": {"bits": 8}})
    m = quantcore.prepare(quantcore.build_model(r), r)
    quantcore.calibrate(m, batches(1))
    rows = {row["name"]: row for row in quantcore.encodings(m)["quantizers"]}
    w = rows["blocks.0.mlp.fc1.weight_quantizer"]
    assert w["format"] == "fp16" and all(w[k] is None for k in ("bits", "axis", "symmetric", "narrow_range",
                                                                 "calibrator"))
    a = rows["blocks.0.mlp.fc1.input_quantizer"]
    assert a["bits"] == 8 and a["symmetric"] is True and a["axis"] is None


class _EvalCachedBias(torch.nn.Module):
    """Caches a tensor derived from a parameter in eval mode and drops it in train mode, as HF
    ``LevitAttention`` does with its relative-position biases."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.bias_table = torch.nn.Parameter(torch.randn(4))
        self.cache: dict = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.cache = {}
        return self

    def forward(self, x):
        if self.training:
            b = self.bias_table * 2
        else:
            b = self.cache.setdefault("b", self.bias_table * 2)
        return self.fc(x) + b


def test_load_does_not_keep_what_modules_cached_from_the_weights_they_were_built_with(tmp_path):
    """load() prepares a freshly built model (its probe forward fills eval-mode caches from those
    weights) and only then loads the checkpoint's weights: the cache must not outlive them."""
    recipe = quantcore.load_recipe({"name": "own", "placement": {"family": "generic"}})
    torch.manual_seed(0)
    model = quantcore.prepare(_EvalCachedBias().eval(), recipe, example_input=torch.randn(2, 8))
    quantcore.calibrate(model, [torch.randn(4, 8)])
    path = str(tmp_path / "cached.qc.pt")
    quantcore.save(model, path)
    torch.manual_seed(1)  # other initial weights
    loaded = quantcore.load(path, model=_EvalCachedBias().eval())
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training and not loaded.fc.training


# -- models built and wrapped unusually (helper-90) -----------------------------------------------------------
def test_a_feature_map_returned_inside_a_dataclass_keeps_its_batchnorm_unfolded():
    """tree_flatten does not see into a dataclass: the conv output the model returns was folded into the
    BatchNorm (the returned features changed by up to 3.8) and the check on every output compared nothing."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        pre_bn: torch.Tensor

    class Holder:  # a plain object holding the features, not a dataclass
        def __init__(self, t):
            self.features = t

    class Net(torch.nn.Module):
        def __init__(self, wrap):
            super().__init__()
            self.wrap = wrap
            self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 4)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.2, 3)

        def forward(self, x):
            f = self.conv(x)
            return self.wrap(self.fc(self.bn(f).relu().mean((2, 3))), f)

    x = torch.randn(4, 3, 16, 16)
    for wrap in (Out, lambda logits, f: (logits, Holder(f))):
        torch.manual_seed(0)
        m = Net(wrap).eval()
        quantcore.prepare(m, {"name": "t", "placement": {"family": "generic"}}, example_input=x[:2])
        assert m.quantcore_placement.folded_bn == [], m.quantcore_placement.folded_bn
        assert "also returned by the model" in m.quantcore_placement.unfolded_bn["bn"]


def test_a_conv_output_kept_as_an_attribute_is_not_folded():
    """``self.feat = self.conv(x)`` (features saved for a caller, a hook, a loss): the fold rescales that
    tensor and only the model's outputs were checked, so ``m.feat`` changed (by up to 1.8 in a break
    pass). Kept as an attribute, also inside a list, the conv output keeps its BatchNorm unfolded."""

    class Net(torch.nn.Module):
        def __init__(self, as_list: bool):
            super().__init__()
            self.as_list = as_list
            self.conv, self.bn, self.head = torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.Conv2d(6, 2, 1)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.2, 3), self.bn.weight.uniform_(0.5, 2)

        def forward(self, x):
            y = self.conv(x)
            if self.as_list:
                self.feats = [y.flatten(1)]
            else:
                self.feat = y
            return self.head(self.bn(y))

    x = torch.randn(2, 4, 8, 8)
    for as_list in (False, True):
        torch.manual_seed(0)
        m = Net(as_list).eval()
        with torch.no_grad():
            m(x)
            ref = (m.feats[0] if as_list else m.feat).clone()
        quantcore.prepare(m, {"name": "t", "placement": {"family": "generic"}}, example_input=x)
        pl = m.quantcore_placement
        assert pl.folded_bn == [] and "kept as the attribute" in pl.unfolded_bn["bn"], pl.unfolded_bn
        with torch.no_grad(), quantcore.quantization_disabled(m):
            m(x)
            assert torch.equal(m.feats[0] if as_list else m.feat, ref)


def test_a_model_with_two_inputs_calibrates_both_and_says_what_it_cannot_feed():
    """prepare took example_input=(img, meta); calibrate fed model(images) only: a TypeError traceback, or
    (meta optional) the meta branch left uncalibrated without a word."""
    from quantcore.errors import UserError

    class TwoIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.img, self.meta, self.fc = torch.nn.Linear(8, 4), torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

        def forward(self, img, meta=None):
            h = self.img(img)
            return self.fc(h if meta is None else h + self.meta(meta))

    torch.manual_seed(0)
    m = TwoIn().eval()
    quantcore.prepare(m, {"name": "t2", "placement": {"family": "generic"}},
                      example_input=(torch.randn(2, 8), torch.randn(2, 3)))
    data = [(torch.randn(16, 8), torch.randn(16, 3) * 5, torch.zeros(16, dtype=torch.long))]  # inputs, labels
    res = quantcore.calibrate(m, data)
    assert res.uncalibrated == [] and res.images == 16
    assert float(m.meta.input_quantizer.amax) == pytest.approx(float(data[0][1].abs().max()), rel=1e-3)
    with pytest.raises(UserError, match="prepared with 2 positional inputs"):
        quantcore.calibrate(m, [torch.randn(4, 8)])
    # a flag after the image input is not an input calibration batches must give
    flagged = TwoIn().eval()
    quantcore.prepare(flagged, {"name": "t1", "placement": {"family": "generic"}},
                      example_input=(torch.randn(2, 8), None))
    assert quantcore.calibrate(flagged, [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))]).images == 4


def test_a_quantizer_the_calibration_never_reaches_is_a_warning():
    class Branchy(torch.nn.Module):  # a data-dependent branch: the probe saw 'big', calibration reaches 'small'
        def __init__(self):
            super().__init__()
            self.big, self.small = torch.nn.Linear(8, 2), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.big(x) if float(x.mean()) > 10 else self.small(x)

    m = Branchy().eval()
    quantcore.prepare(m, {"name": "b", "placement": {"family": "generic"}}, example_input=torch.full((2, 8), 20.0))
    res = quantcore.calibrate(m, [torch.randn(4, 8)])
    assert res.uncalibrated == ["big.input_quantizer"]
    assert any("saw no calibration data" in w and "big.input_quantizer" in w for w in res.warnings), res.warnings


def test_calibrating_on_no_batches_is_refused_and_keeps_the_ranges():
    """calibrate(model, []) warned that every activation quantizer saw no data, dropped their ranges and
    reported 0 batches; analysis then silently covered the weights alone."""
    m = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    quantcore.prepare(m, {"name": "e", "placement": {"family": "generic"}}, example_input=torch.randn(2, 8))
    quantcore.calibrate(m, [torch.randn(4, 8)])
    before = {n: q.amax.clone() for n, q in quantcore.quantizers(m).items()}
    for empty in ([], iter([]), (b for b in [])):
        with pytest.raises(quantcore.CalibrationError, match="no batches \\(an empty calibration set\\)"):
            quantcore.calibrate(m, empty)
    assert all(torch.equal(q.amax, before[n]) for n, q in quantcore.quantizers(m).items())
    # a generator's first batch, taken to see it is not empty, is still calibrated on
    assert quantcore.calibrate(m, (torch.randn(4, 8) for _ in range(3))).batches == 3


def test_prepare_on_a_wrapped_model_places_on_the_model_inside():
    """prepare(DataParallel(model)) placed with 'module.'-prefixed names: ft2's shared q/k/v range was not
    applied, encodings lost their placement and save() said the model was not prepared."""
    from quantcore.models import vit_fmnist

    x = torch.randn(8, 1, 28, 28)
    ranges = []
    for wrap in (lambda m: m, torch.nn.DataParallel):
        torch.manual_seed(0)
        m = wrap(vit_fmnist())
        quantcore.prepare(m, "fmnist_w8a8_ft2")
        quantcore.calibrate(m, [x])
        inner = quantcore.placement.unwrap(m)
        assert inner.quantcore_placement.share_groups and inner.quantcore_recipe.name == "fmnist_w8a8_ft2"
        qkv = [float(inner.blocks[0].attn.get_submodule(f"{n}_quantizer").amax) for n in "qkv"]
        assert len(set(qkv)) == 1, qkv  # one shared range
        ranges.append(qkv)
        assert quantcore.encodings(m)["placement"]["attention"]
    assert ranges[0] == ranges[1]


def test_an_override_without_float_keeps_no_float_decision_through_save_and_load(tmp_path):
    """An override setting only spec/enabled on a glob that also matches modules the ViT family keeps
    float (patch embedding, head) was saved with an explicit float: false, which on load re-quantized
    those modules: the checkpoint could not be loaded ('stored quantizers differ'). The same dump wrote
    the mixed-precision search's recipes."""
    recipe = tiny_recipe(overrides=[{"match": "*", "spec": {"bits": 6}}, {"match": "blocks.0.*", "enabled": False}])
    assert all(o.float is None for o in recipe.overrides)
    torch.manual_seed(0)
    model = quantcore.prepare(quantcore.build_model(recipe), recipe)
    assert not any(n.startswith(("head.", "patch_embed.")) for n in quantcore.quantizers(model))
    quantcore.calibrate(model, batches(2))
    path = str(tmp_path / "m.qc.pt")
    quantcore.save(model, path)
    loaded = quantcore.load(path)
    assert list(quantcore.quantizers(loaded)) == list(quantcore.quantizers(model))
    x = batches(1, seed=5)[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    again = quantcore.load_recipe(yaml.safe_load(yaml.safe_dump(recipe.model_dump(mode="json"))))
    assert [o.float for o in again.overrides] == [None, None]
    explicit = tiny_recipe(overrides=[{"match": "head", "float": False}])  # an explicit false still re-quantizes
    m2 = quantcore.prepare(quantcore.build_model(explicit), explicit)
    assert any(n.startswith("head.") for n in quantcore.quantizers(m2))


@pytest.mark.parametrize("override,words", [
    ({"enabled": False, "spec": {"bits": 4}}, ["enabled: false", "spec.bits"]),
    ({"spec": {"enabled": False, "symmetric": False, "calibrator": "max"}}, ["enabled: false", "spec.symmetric",
                                                                          "spec.calibrator"]),
    ({"float": True, "spec": {"bits": 4}}, ["float: true", "spec.bits"]),
    ({"float": True, "enabled": False}, ["float: true", "enabled"]),
    ({"float": True, "spec": {"enabled": True}}, ["float: true", "spec.enabled"]),
])
def test_override_settings_the_same_override_keeps_from_acting_are_refused(override, words):
    """An override that switches its quantizers off (or leaves its modules float) and also sets their
    grid: nothing could read those fields, yet encodings.json recorded them (``bits: 4, enabled: false``)."""
    rec = {"name": "ov", "model": {"name": "quantcore/vit_fmnist"},
           "overrides": [{"match": "blocks.0.mlp.fc1", **override}]}
    with pytest.raises(RecipeError) as err:
        quantcore.load_recipe(rec)
    assert "overrides.0" in str(err.value) and "blocks.0.mlp.fc1" in str(err.value)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    # what acts is accepted: each part alone, or the grid in an override that enables
    for ok in ({"enabled": False}, {"float": True}, {"enabled": True, "spec": {"bits": 4}}, {"spec": {"bits": 4}}):
        quantcore.load_recipe({**rec, "overrides": [{"match": "blocks.0.mlp.fc1", **ok}]})
    # a recipe stored in a checkpoint before this rule still loads
    from quantcore.config import Recipe

    Recipe.model_validate({**rec, "version": 1}, context={"stored": True})
