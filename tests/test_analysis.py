"""quantcore.analysis against independent references: brute-force fake quantization, direct forwards
of the full model, recipes with overrides run through prepare + calibrate."""
from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from quantcore import api
from quantcore.analysis import Budget, Engine, LogitStats, RangeBank, error_analysis, make_groups, parse_choices, search
from quantcore.analysis import search_recipe, sensitivity, verify_recipe
from quantcore.analysis.groups import as_grouping
from quantcore.config import Override
from quantcore.demo import FMNIST_DIR, load_fashion_mnist
from quantcore.errors import UserError
from quantcore.models import vit_fmnist
from quantcore.placement import quantizers
from quantcore.recipe import dump_recipe, load_recipe

pytestmark = pytest.mark.skipif(not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST not installed")


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is fastest on a shared machine
    torch.manual_seed(0)
    data = load_fashion_mnist()

    def tensors(split, n, start=0):
        x, y = data[split]
        x = torch.from_numpy(x[start:start + n].copy()).float().div(255).unsqueeze(1)
        return (x - 0.2860) / 0.3530, torch.from_numpy(y[start:start + n].astype("int64"))

    xc, yc = tensors("train", 256)
    xe, ye = tensors("test", 256)
    calib = [(xc[i:i + 64], yc[i:i + 64]) for i in range(0, 256, 64)]
    evalb = [(xe[i:i + 128], ye[i:i + 128]) for i in range(0, 256, 128)]
    fp32 = vit_fmnist().eval()
    base = load_recipe("fmnist_w4a4_ft1")
    # percentile/max ranges: the cheap calibrators keep the test fast (the search recomputes ranges)
    recipe = base.model_copy(update={"qat": None, "train": None, "calibration": base.calibration.model_copy(
        update={"method": "percentile", "weights_method": "max"})})
    model = api.prepare(copy.deepcopy(fp32), recipe)
    api.calibrate(model, calib)
    yield fp32, recipe, model, calib, evalb
    torch.set_num_threads(threads)


def _direct_stats(model, batches, quantized=True):
    """LogitStats from plain full forwards: quantization on vs. api.quantization_disabled."""
    st = LogitStats()
    with torch.no_grad():
        for x, y in batches:
            with api.quantization_disabled(model):
                ref = model(x)
            api.set_quantization(model, quantized)
            st.update(model(x), ref, y)
            api.set_quantization(model, True)
    return st.metrics()


def _capture_input(module, model, x, quantized):
    got = []
    h = module.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            if quantized:
                model(x)
            else:
                with api.quantization_disabled(model):
                    model(x)
    finally:
        h.remove()
    return got[0]


def _brute_sqnr(x, q):
    """Fake-quantize x by hand with torch's reference op and the quantizer's scale/zero point."""
    scale, zp = q.scale_zero_point()
    qmin, qmax = q.spec.qrange()
    y = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
    return 10 * math.log10(float((x.double() ** 2).sum()) / float(((y - x).double() ** 2).sum())), y


def test_isolated_tensor_sqnr_equals_brute_force(setup):
    fp32, recipe, model, calib, evalb = setup
    name = "blocks.1.mlp.fc2.input_quantizer"
    q = quantizers(model)[name]
    res = error_analysis(model, evalb[:1], logits=False)
    x = _capture_input(model.get_submodule("blocks.1.mlp.fc2"), model, evalb[0][0], quantized=False)
    ref, _ = _brute_sqnr(x, q)
    assert res["quantizers"][name]["isolated"]["sqnr_db"] == pytest.approx(ref, abs=1e-3)
    assert res["order"][0] == "blocks.0.attn.qkv.input_quantizer"
    # a weight: quantized per channel by hand
    wq = quantizers(model)["blocks.0.mlp.fc1.weight_quantizer"]
    w = model.blocks[0].mlp.fc1.weight.detach()
    scale, zp = wq.scale_zero_point()
    qmin, qmax = wq.spec.qrange()
    yw = torch.fake_quantize_per_channel_affine(w, scale.reshape(-1), zp.reshape(-1), 0, qmin, qmax)
    refw = 10 * math.log10(float((w.double() ** 2).sum()) / float(((yw - w).double() ** 2).sum()))
    assert res["quantizers"]["blocks.0.mlp.fc1.weight_quantizer"]["isolated"]["sqnr_db"] == pytest.approx(refw, abs=1e-6)


def test_cumulative_all_equals_full_quantized_model(setup):
    fp32, recipe, model, calib, evalb = setup
    res = error_analysis(model, evalb, groups="block")
    last = list(res["groups"])[-1]
    direct = _direct_stats(model, evalb)
    assert res["groups"][last]["cumulative"] == direct
    assert res["model"] == direct
    # the cumulative tensor SQNR at the last quantizer's input: quantized model vs float twin
    name = "blocks.3.mlp.fc2.input_quantizer"
    q = quantizers(model)[name]
    out = []
    h = q.register_forward_hook(lambda m, a, o: out.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(evalb[0][0])
    finally:
        h.remove()
    one = error_analysis(model, evalb[:1], logits=False)
    xf = _capture_input(model.get_submodule("blocks.3.mlp.fc2"), model, evalb[0][0], quantized=False)
    ref = 10 * math.log10(float((xf.double() ** 2).sum()) / float(((out[0] - xf).double() ** 2).sum()))
    assert one["quantizers"][name]["cumulative"]["sqnr_db"] == pytest.approx(ref, abs=1e-3)
    # isolated logits of one quantizer = a full forward with only it switched on
    g = "blocks.2.mlp.fc1.input_quantizer"
    iso = error_analysis(model, evalb, groups=[g])["groups"][g]["isolated"]
    for n, qq in quantizers(model).items():
        qq.quantize = n == g
    try:
        st = LogitStats()
        with torch.no_grad():
            for x, y in evalb:
                with api.quantization_disabled(model):
                    ref = model(x)
                st.update(model(x), ref, y)
    finally:
        api.set_quantization(model, True)
    assert iso == st.metrics()


def test_alone_float_equals_override(setup):
    fp32, recipe, model, calib, evalb = setup
    sens = sensitivity(model, evalb, groups=["blocks.*.mlp.fc1"])
    err = error_analysis(model, evalb, groups=["blocks.*.mlp.fc1"])
    assert sensitivity(model, evalb, groups=["blocks.*.mlp.fc1"], errors=err)["groups"] == sens["groups"]
    got = sens["groups"]["blocks.*.mlp.fc1"]["alone_float"]
    r2 = recipe.model_copy(update={"overrides": list(recipe.overrides) + [
        Override(match="blocks.*.mlp.fc1", float=True)]})
    m2 = api.prepare(copy.deepcopy(fp32), r2)
    api.calibrate(m2, calib)
    st = LogitStats()
    with torch.no_grad():
        for x, y in evalb:
            st.update(m2(x), fp32(x), y)
    assert got == st.metrics()
    assert sens["model"] == _direct_stats(model, evalb)


def test_search_recipe_reproduces_its_figure(setup, tmp_path, monkeypatch):
    fp32, recipe, model, calib, evalb = setup
    stats = api.calibration_state(model)
    budget = Budget.from_options(agreement=99.0)
    res = search(model, evalb, budget, stats, groups="block", choices=("4", "8", "float"))
    assert res["evaluated"] and res["pareto"]
    rec = search_recipe(recipe, model, res)
    path = tmp_path / "search_recipe.yaml"
    path.write_text(dump_recipe(rec))
    again = verify_recipe(load_recipe(str(path)), fp32, calib, evalb)
    assert again == res["metrics"]
    assert res["met"] == budget.ok(again)
    # the cost of every evaluated configuration is ordered as the bits say
    lo = next(e for e in res["evaluated"] if e["step"] == "start")
    assert all(e["cost"] >= lo["cost"] for e in res["evaluated"])
    # written into OUT, a relative weights path would be read against OUT (recipe files resolve model
    # files against their own folder): the recipe names the file that was searched, absolute
    monkeypatch.chdir(tmp_path)
    rel = search_recipe(recipe, model, res, checkpoint="w.pt")
    assert rel.model.checkpoint == str(tmp_path / "w.pt")


def test_user_errors_name_the_field(setup):
    fp32, recipe, model, calib, evalb = setup
    eng = Engine(model, evalb[:1])
    with pytest.raises(UserError, match="groups.*blocks.9.mlp"):
        make_groups(eng, ["blocks.9.mlp"])
    with pytest.raises(UserError, match="groups: unknown grouping"):
        make_groups(eng, "layer")
    for empty in (",", " , ", []):  # globs that all strip away: never "no groups at all", silently
        with pytest.raises(UserError, match="groups: no group given"):
            make_groups(eng, as_grouping(empty))
    with pytest.raises(UserError, match="--budget-top1"):
        Budget.from_options(delta_top1=-0.5)
    with pytest.raises(UserError, match="--budget-agreement"):
        Budget.from_options(agreement=120)
    with pytest.raises(UserError, match="exactly one"):
        Budget.from_options(delta_top1=0.1, sqnr_db=20)
    with pytest.raises(UserError, match="choices"):
        parse_choices(["4", "int3"])
    from quantcore.cli import main

    assert main(["analyze", "-c", "/nonexistent.qc.pt", "-d", "x", "-o", "y", "--search", "--budget-top1", "-1"]) == 2


@pytest.mark.parametrize("patch", [{"placement": {"reparam_layernorm": True}},
                                   {"reconstruction": {"iterations": 10}}])
def test_search_refuses_recipes_with_calibration_time_weight_changes(patch):
    """The search reuses one set of statistics per candidate: reparam/reconstruction can't be redone -> error."""
    import quantcore
    from quantcore import api as qapi

    rec = quantcore.load_recipe({"name": "r", "model": {"name": "quantcore/vit_fmnist", "kwargs": {"depth": 1}},
                                 **patch})
    torch.manual_seed(0)
    model = qapi.prepare(qapi.build_model(rec, load_weights=False), rec)
    field = "reparam_layernorm" if "placement" in patch else "reconstruction"
    with pytest.raises(quantcore.UserError, match=f"--search.*{field}"):
        qapi.analyze(model, [(torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))], search=True,
                     budget={"delta_top1": 0.1})


def test_choices_are_ordered_cheapest_first_whatever_the_order_given():
    """The search starts from the first choice: '8,4' must still start at 4 bits."""
    from quantcore.analysis.search import parse_choices

    assert parse_choices(["8", "4"]) == ["4", "8"]
    assert parse_choices(["float", "fp16", "8", "fp8_e4m3", "6"]) == ["6", "8", "fp8_e4m3", "fp16", "float"]


def test_search_with_confidence_checks_every_candidate_on_the_bound(setup):
    """--budget-confidence: 'ok' of every evaluated configuration is its bound's verdict, the chosen one
    meets the budget on the bound, and the report says so."""
    from quantcore.analysis.report import markdown
    from quantcore.analysis.search import delta_lower_bound

    fp32, recipe, model, calib, evalb = setup
    stats = api.calibration_state(model)
    budget = Budget.from_options(delta_top1=1.0, confidence=0.8)
    res = search(model, evalb, budget, stats, groups="block", choices=("4", "8", "float"))
    for e in res["evaluated"]:
        m = e["metrics"]
        assert e["ok"] == (delta_lower_bound(m["gained"], m["lost"], m["count"], 0.8) >= -1.0 - 1e-9)
    point = search(model, evalb, Budget.from_options(delta_top1=1.0), stats, groups="block", choices=("4", "8", "float"))
    assert res["cost"] >= point["cost"]
    assert res["met"]  # 4/8/float on 256 images: all-float meets any budget, so some configuration does
    assert res["budget"]["bound"] >= -1.0
    assert "bound" in res["budget"]["bound_text"]
    assert res["budget"]["bound_text"] in markdown({"search": res})


def _twin_model(setup):
    fp32, recipe, _, calib, evalb = setup
    rec = recipe.model_copy(update={"overrides": list(recipe.overrides) + [
        Override.model_validate({"match": "blocks.*.attn.attn_quantizer",
                                 "spec": {"format": "twin_int", "calibrator": "mse"}})]})
    model = api.prepare(copy.deepcopy(fp32), rec)
    api.calibrate(model, calib)
    return rec, model


def test_search_keeps_registered_integer_kinds_and_costs_every_quantizer(setup, tmp_path):
    """An integer choice changes the bit width of a twin_int (log2, ...) quantizer, not its kind; the
    written recipe says only bits for it and reproduces the figure; quantizers outside every search
    group cost their own bits."""
    fp32, _, _, calib, evalb = setup
    rec, model = _twin_model(setup)
    attn = [n for n in quantizers(model) if n.endswith("attn.attn_quantizer")]
    assert attn and all(quantizers(model)[n].spec.format == "twin_int" for n in attn)
    stats = api.calibration_state(model)
    res = search(model, evalb, Budget.from_options(agreement=100.0), stats, groups="module", choices=("4", "8"))
    for n in attn:
        assert res["specs"][n]["format"] == "twin_int", n
    start = next(e for e in res["evaluated"] if e["step"] == "start")
    assert start["metrics"] == Engine(model, evalb).evaluate({"m": {}})["m"]  # all-4 is the model as given
    out = search_recipe(rec, model, res)
    for o in out.overrides[len(rec.overrides):]:
        if o.spec is not None and any(n.startswith(o.match) for n in attn):
            assert o.spec.format is None, o  # bits only: the kind stays the recipe's
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(out))
    assert verify_recipe(load_recipe(str(path)), fp32, calib, evalb) == res["metrics"]
    # one group only: the other quantizers keep 4 bits, so all-4 costs 4 effective bits as before
    one = search(model, evalb, Budget.from_options(agreement=1.0), stats, groups=["blocks.0.mlp.fc1"],
                 choices=("4", "8"))
    assert one["evaluated"][0]["cost"] == pytest.approx(start["cost"]) == pytest.approx(4.0)


def test_search_refuses_overlapping_groups_and_qat_checkpoints(setup):
    _, _, model, _, evalb = setup
    stats = api.calibration_state(model)
    with pytest.raises(UserError, match=r"search_groups: 'blocks\.0\.mlp\.fc2\..*' is in two groups"):
        search(model, evalb, Budget.from_options(agreement=99.0), stats, groups=["blocks.*.mlp.fc2", "blocks.0.*"])
    qat = copy.deepcopy(model)
    qat.quantcore_meta = {"extra": {"qat": {"steps": 10}}}
    with pytest.raises(UserError, match="--search: this checkpoint was trained by QAT"):
        api.analyze(qat, evalb, search=True, budget={"agreement": 99.0}, calib_batches=evalb)
    api.analyze(qat, evalb[:1], groups=["blocks.0.mlp.fc1"])  # analysis without the search is fine


def test_api_budget_errors_name_the_api_keys(setup):
    _, _, model, _, evalb = setup
    with pytest.raises(UserError, match=r"budget\['delta_top1'\]: must be a number"):
        api.analyze(model, evalb, search=True, budget={"delta_top1": "0.1"})
    with pytest.raises(UserError, match=r"search=True needs a budget: budget=\{"):
        api.analyze(model, evalb, search=True)
    with pytest.raises(UserError, match=r"budget\['confidence'\]: applies to"):
        api.analyze(model, evalb, search=True, budget={"sqnr_db": 20, "confidence": 0.9})
    # a top-1 budget on images without labels: named as the API's key, not the CLI flag
    unlabelled = [b[0] if isinstance(b, (tuple, list)) else b for b in evalb]
    with pytest.raises(UserError, match=r"^budget\['delta_top1'\] needs labelled data"):
        api.analyze(model, unlabelled, search=True, budget={"delta_top1": 0.1}, calib_batches=unlabelled)


def test_engine_reads_hugging_face_model_outputs():
    """A transformers classifier returns an ImageClassifierOutput: the engine scores its .logits."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = api.prepare(copy.deepcopy(hf), {"quant": {"weights": {"bits": 4}, "activations": {"bits": 4}},
                                            "calibration": {"method": "max"}}, example_input=x[:1])
    api.calibrate(model, [x])
    got = Engine(model, [(x, y)]).evaluate({"m": {}})["m"]
    st = LogitStats()
    with torch.no_grad():
        with api.quantization_disabled(model):
            ref = model(x).logits
        st.update(model(x).logits, ref, y)
    assert got == st.metrics() and got["sqnr_db"] is not None
    res = api.analyze(model, [(x, y)], groups="module")
    assert res["errors"] and res["sensitivity"]


def test_cli_analyze_argument_errors(setup, tmp_path):
    from quantcore.cli import main

    _, _, model, _, _ = setup
    path = tmp_path / "m.qc.pt"
    api.save(model, str(path))
    args = ["-d", str(tmp_path / "nodata"), "-o", str(tmp_path / "o")]
    assert main(["analyze", "-c", str(path), "-r", "fmnist_w8a8_ft2", *args]) == 2  # a recipe it would ignore
    assert main(["analyze", "-c", str(tmp_path), "-r", "fmnist_w8a8_ft2", *args]) == 2  # a folder
    assert main(["analyze", *args]) == 2  # neither weights nor recipe


def test_a_resaved_qat_checkpoint_is_still_refused_by_the_search(setup, tmp_path):
    _, _, model, _, evalb = setup
    qat = copy.deepcopy(model)
    qat.quantcore_meta = {"extra": {"qat": {"steps": 10}}}
    path = str(tmp_path / "again.qc.pt")
    api.save(qat, path)  # a plain load-and-save keeps the training record
    again = api.load(path)
    assert again.quantcore_meta["extra"]["qat"] == {"steps": 10}
    with pytest.raises(UserError, match="trained by QAT"):
        api.analyze(again, evalb, search=True, budget={"agreement": 99.0}, calib_batches=evalb)


def test_search_met_is_decided_by_what_the_written_recipe_gives(setup, monkeypatch):
    """A float-cast choice acts during calibration too: when the recipe run through prepare + calibrate
    misses the budget the search met on its own figure, the result says not met."""
    from quantcore.analysis import run as run_mod

    fp32, _, model, calib, evalb = setup
    worse = lambda *a, **k: {**Engine(model, evalb).evaluate({"m": {}})["m"], "agreement": 1.0}  # noqa: E731
    monkeypatch.setattr(run_mod, "verify_recipe", worse)
    opts = run_mod.AnalyzeOptions(errors=False, sensitivity=False, search=True,
                                  budget=Budget.from_options(agreement=50.0), search_groups="block", choices=("4", "8"))
    res, written = run_mod.analyze_model(model, evalb, opts, stats=api.calibration_state(model), fp32=fp32,
                                         calib_batches=calib)
    assert res["search"]["reproduced"]["equal"] is False and res["search"]["met"] is False
    # the recipe written says so too, and why: not "the last configuration tried" (it is the chosen one)
    assert written.description.startswith("BUDGET NOT MET (the search's figure met it, this recipe run "
                                          "through prepare + calibrate does not (agreement 1 vs ")


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_bars_cover_every_phase_and_stay_off_unless_asked(setup, capsys, monkeypatch, workers):
    """``analyze --progress`` (the CLI default): one bar per phase, each fed up to its total (error
    analysis: two passes over the images; sensitivity: one; the search: the configurations it
    evaluated, as its result lists them), also with forked workers; nothing on stderr when off."""
    import contextlib

    from quantcore.analysis import run as run_mod

    _, _, model, _, evalb = setup
    images = sum(x.shape[0] for x, _ in evalb)
    base = dict(budget=Budget.from_options(agreement=50.0), search=True, search_groups="block", choices=("4", "8"),
                groups="block", workers=workers)
    quiet, _ = run_mod.analyze_model(model, evalb, run_mod.AnalyzeOptions(**base), stats=api.calibration_state(model))
    assert capsys.readouterr().err == ""
    run_mod.analyze_model(model, evalb, run_mod.AnalyzeOptions(**base, progress=True), stats=api.calibration_state(model))
    err = capsys.readouterr().err
    assert all(f"{phase}:" in err for phase in ("error analysis", "sensitivity", "search")), err[-2000:]

    seen, real_bar = {}, run_mod._bar

    @contextlib.contextmanager
    def recording(on, desc, total, unit):
        with real_bar(False, desc, total, unit):
            def update(n):
                seen[desc] = n if unit == "config" else seen.get(desc, 0) + n
            yield update if on else None
            assert total is None or seen[desc] == total, (desc, seen[desc], total)

    monkeypatch.setattr(run_mod, "_bar", recording)
    res, _ = run_mod.analyze_model(model, evalb, run_mod.AnalyzeOptions(**base, progress=True),
                                   stats=api.calibration_state(model))
    assert seen == {"error analysis": 2 * images, "sensitivity": images, "search": len(res["search"]["evaluated"])}
    assert res["search"]["config"] == quiet["search"]["config"]  # the bars change nothing


class _EinsumNet(torch.nn.Module):
    """Grouped conv, a bmm and an einsum between activations, a Linear: every product kind."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1, groups=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        t = self.dw(self.conv(x)).flatten(2)                      # (B, 8, 784)
        g = torch.bmm(t, t.transpose(1, 2)) / 784                 # (B, 8, 8)
        y = torch.einsum("bij,bjk->bik", g, t).mean(-1)           # (B, 8)
        return self.fc(y)


@pytest.mark.parametrize("which", ["vit_ft1", "einsum_net"])
def test_bops_counts_every_product_op_as_torch_flop_counter_does(setup, which):
    """The MACs the trace attributes add up to torch's own FLOP count / 2 (FlopCounterMode, an
    independent count at the aten level: fused attention, bmm, einsum, grouped conv included), and
    under ``cost bops`` every quantizer that is an operand of a product op moves the cost: the
    attention matmuls' q/k/probabilities/v quantizers too (they were free)."""
    from torch.utils.flop_counter import FlopCounterMode

    from quantcore.analysis.search import CostModel

    fp32, _, model, calib, evalb = setup
    if which == "einsum_net":
        fp32 = _EinsumNet().eval()
        model = api.prepare(copy.deepcopy(fp32), {"version": 1, "name": "g", "placement": {"family": "generic"},
                                                  "quant": {"weights": {"bits": 8}, "activations": {"bits": 8}}})
        api.calibrate(model, [x for x, _ in calib[:1]])
    x = evalb[0][0][:2]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fp32(x)
    eng = Engine(model, [(x, evalb[0][1][:2])])
    flops_per_image = fc.get_total_flops() / x.shape[0]  # one multiply-accumulate = 2 FLOPs
    assert 2 * sum(eng.trace.macs.values()) == pytest.approx(flops_per_image, rel=1e-9)

    cost = CostModel(eng, "bops")
    own = {n: eng.qs[n].spec for n in eng.active}
    operands = {n for pair in eng.trace.macs for n in pair if n is not None}
    assert operands, eng.trace.macs
    if which == "vit_ft1":
        assert {f"blocks.0.attn.{q}_quantizer" for q in ("q", "k", "attn", "v")} <= operands
    for n in operands:
        assert cost({**own, n: None}) > cost(own), n  # float (16 bits) costs more than its int grid


def test_a_budget_no_configuration_can_meet_is_refused_and_a_missed_one_is_marked(setup, tmp_path):
    """An agreement budget on its confidence bound that even identical outputs cannot meet on the
    search images is refused before the search runs (naming the image count that would do, checked
    against the bound itself); a budget the search misses writes a recipe that says so."""
    from quantcore.analysis.search import delta_lower_bound, search, search_recipe, wilson_lower_bound

    _, _, model, _, evalb = setup
    n = sum(x.shape[0] for x, _ in evalb)  # 256
    tight = Budget.from_options(agreement=99.5, confidence=0.9)
    assert wilson_lower_bound(100.0, n, 0.9) < 99.5
    with pytest.raises(UserError, match=rf"cannot be met on {n} search images.*at least (\d+)") as err:
        search(model, evalb, tight, api.calibration_state(model), groups="block", choices=("4", "8"))
    need = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    assert wilson_lower_bound(100.0, need, 0.9) >= 99.5 > wilson_lower_bound(100.0, need - 1, 0.9)
    # the same for a top-1 budget: no image gained or lost is the best a search can plan on
    top1 = Budget.from_options(delta_top1=0.4, confidence=0.9)
    assert delta_lower_bound(0, 0, n, 0.9) < -0.4
    with pytest.raises(UserError, match=rf"--budget-top1 0.4 .*cannot be met on {n} search images.*identical"
                                        r".*at least (\d+)") as err:
        search(model, evalb, top1, api.calibration_state(model), groups="block", choices=("4", "8"))
    need = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    assert delta_lower_bound(0, 0, need, 0.9) >= -0.4 > delta_lower_bound(0, 0, need - 1, 0.9)
    with pytest.raises(UserError, match="stays below 0: give a positive --budget-top1"):
        Budget.from_options(delta_top1=0.0, confidence=0.9).check_reachable(10**6)

    res = search(model, evalb, Budget.from_options(sqnr_db=200.0), api.calibration_state(model),
                 groups="block", choices=("4", "8"))
    assert res["met"] is False and set(res["config"].values()) == {"8"}  # the most precise it could do
    desc = search_recipe(model.quantcore_recipe, model, res).description
    assert desc.startswith("BUDGET NOT MET (no configuration tried met it") and "most precise" in desc
    met = search(model, evalb, Budget.from_options(sqnr_db=1.0), api.calibration_state(model),
                 groups="block", choices=("4", "8"))
    assert met["met"] and "NOT MET" not in search_recipe(model.quantcore_recipe, model, met).description


class _KeywordProducts(torch.nn.Module):
    """Product ops called with keyword operands, addmm/baddbmm, a transposed conv."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))
        self.ct = torch.nn.ConvTranspose2d(2, 3, 3)

    def forward(self, x):
        y = torch.matmul(x, other=self.w)
        w3 = self.w[None].expand(y.shape[0], 8, 8)
        z = torch.bmm(y[:, None], mat2=w3)
        c = torch.baddbmm(z, batch1=z, batch2=w3)
        t = self.ct(x.reshape(-1, 2, 2, 2))
        return c.flatten(1).sum(1, keepdim=True) + t.flatten(1).sum(1, keepdim=True) + torch.addmm(y, y, self.w)


def test_the_mac_count_takes_keyword_operands_and_every_product_kind():
    from torch.utils.flop_counter import FlopCounterMode

    from quantcore.analysis.engine import trace_forward

    m, x = _KeywordProducts().eval(), torch.randn(4, 8)
    tr = trace_forward(m, x)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x)
    assert 2 * sum(tr.macs.values()) == pytest.approx(fc.get_total_flops() / x.shape[0], rel=1e-9)


class _TorchMHA(torch.nn.Module):
    """nn.MultiheadAttention (its projections and attention live inside F.multi_head_attention_forward)."""

    def __init__(self, need_weights: bool):
        super().__init__()
        self.emb = torch.nn.Linear(4, 16)
        self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = torch.nn.Linear(16, 3)
        self.need_weights = need_weights

    def forward(self, x):
        t = self.emb(x)
        a, _ = self.mha(t, t, t, need_weights=self.need_weights)
        return self.head(a.mean(1))


@pytest.mark.parametrize("need_weights", [True, False])
def test_the_mac_count_sees_inside_torch_multihead_attention(need_weights):
    """F.multi_head_attention_forward is one torch function to a TorchFunctionMode: its in/out
    projections and both attention products are counted as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from quantcore.analysis.engine import trace_forward

    m, x = _TorchMHA(need_weights).eval(), torch.randn(2, 5, 4)
    tr = trace_forward(m, x)
    # eval + no_grad would take torch's fused fast path (one op FlopCounterMode has no formula for);
    # train mode with dropout 0 computes the same through the counted ops
    with FlopCounterMode(display=False) as fc:
        m.train()(x)
    L, E, H = 5, 16, 2
    by_hand = L * 4 * E + L * E * 3 * E + 2 * H * L * L * (E // H) + L * E * E + E * 3  # emb, in, qk, av, out, head
    assert 2 * sum(tr.macs.values()) == pytest.approx(fc.get_total_flops() / x.shape[0], rel=1e-9)
    assert sum(tr.macs.values()) == pytest.approx(by_hand, rel=1e-9)


def test_share_group_member_left_float_measures_what_its_recipe_gives(setup):
    """ft2: a configuration with a q/k/v member float (and the others on the same or another grid) is
    measured by the search as the recipe it writes (``enabled: false`` on that member) gives it through
    prepare + calibrate: the others on the union of *their own* ranges. (The recipe widened their grid
    with the float member's range; the search unified only changed members.)"""
    from quantcore.analysis.search import choice_spec, config_ranges

    fp32, recipe, _, calib, evalb = setup
    d = recipe.model_dump(mode="json")
    d["placement"]["mode"] = "ft2"
    ft2 = load_recipe(d)
    model = api.prepare(copy.deepcopy(fp32), ft2)
    api.calibrate(model, calib)
    groups = model.quantcore_placement.share_groups
    assert groups
    qs = quantizers(model)
    alone = copy.deepcopy(model)
    alone.quantcore_placement.share_groups = []
    api.finalize(alone)  # each member's own range
    own = {n: float(q.amax.max()) for n, q in quantizers(alone).items()}
    eng = Engine(model, evalb)
    bank = RangeBank(model, api.calibration_state(model))
    for group in groups[:2]:
        # the member with the widest own range: leaving it float changes the others' grid the most
        member = max(group, key=own.get)
        assert own[member] > max(own[n] for n in group if n != member)
        for other in ("4", "8"):  # the others as they are (4-bit) and raised to 8 bits
            config = {n: "float" if n == member else other for n in group}
            res = {"groups": {n: [n] for n in group}, "config": config, "met": True, "cost": 0.0,
                   "cost_model": "bits", "budget": {"text": "test", "metric": "agreement"}}
            rec = search_recipe(ft2, model, res)
            assert any(o.match == member and o.enabled is False for o in rec.overrides)
            specs = {n: choice_spec(c, qs[n].spec) for n, c in config.items()}
            measured = eng.evaluate({"c": config_ranges(eng, bank, specs)})["c"]
            assert verify_recipe(rec, fp32, calib, evalb) == measured, (member, other)


@pytest.mark.parametrize("batch", [256, 32])
def test_tensor_statistics_equal_brute_force_over_all_batches(setup, batch):
    """p99.99 of |x| (the (N * 1e-4 + 1)-th largest of all N values), absmax, outlier ratio and zero
    fraction of each activation quantizer's float input, against every value captured from plain float
    forwards: the same whether the images come in one batch or eight (the running top-k kept too few
    values from earlier batches, so the p99.99 fell and the outlier ratio rose with the batch count)."""
    from quantcore.analysis.error_analysis import P9999

    _, _, model, _, evalb = setup
    x = torch.cat([b[0] for b in evalb])
    y = torch.cat([b[1] for b in evalb])
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    qs = quantizers(model)
    seen = {n: [] for n, q in qs.items() if q.kind == "activation"}

    def float_twin(n):  # record the input and pass it on unquantized: the float model's values
        def hook(mod, args, out):
            if n in seen:
                seen[n].append(args[0].detach().abs().flatten())
            return args[0]
        return hook

    hooks = [q.register_forward_hook(float_twin(n)) for n, q in qs.items()]
    try:
        with torch.no_grad():
            for xb, _ in batches:
                model(xb)
    finally:
        for h in hooks:
            h.remove()
    res = error_analysis(model, batches, logits=False)["quantizers"]
    checked = 0
    for n, vals in seen.items():
        if n not in res or not vals:
            continue
        v = torch.cat(vals).double()
        k = int(v.numel() * P9999) + 1
        p = float(v.topk(k).values[-1])
        st = res[n]["stats"]
        assert st["p99_99"] == pytest.approx(p, rel=1e-6), n
        assert st["absmax"] == pytest.approx(float(v.max()), rel=1e-6), n
        assert st["zero_fraction"] == float((v == 0).double().mean()), n
        if p > 0:
            assert st["outlier_ratio"] == pytest.approx(float(v.max()) / p, rel=1e-6), n
        assert not any("lower bound" in w for w in st["warnings"]), n
        checked += 1
    assert checked >= 20


def test_search_can_put_a_float_cast_quantizer_on_an_integer_grid(setup):
    """A quantizer the recipe casts to fp16 collects no calibration statistics; the search may choose an
    integer grid for it, so they are collected for it (while it keeps casting, as in calibration): its
    statistics describe every value it received (checked against a capture), the search runs, and
    without calibration images the error names the quantizer and why (it was 'statistics of ... are
    empty')."""
    from quantcore.analysis.search import cast_specs, collect_statistics

    fp32, recipe, _, calib, evalb = setup
    name = "blocks.1.attn.proj.input_quantizer"
    d = recipe.model_dump(mode="json")
    d["overrides"] = d["overrides"] + [{"match": name, "spec": {"format": "fp16"}}]
    model = api.prepare(copy.deepcopy(fp32), load_recipe(d))
    api.calibrate(model, calib)
    qs = quantizers(model)
    assert qs[name].spec.is_float and not api.calibration_state(model)[name]["total"]
    eng = Engine(model, evalb)
    casts = cast_specs(eng, "quantizer", ("4", "8", "float"), api.calibration_state(model))
    assert list(casts) == [name] and not casts[name].is_float and casts[name].bits == 4
    seen = []
    h = qs[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().flatten()))
    try:
        st = collect_statistics(model, calib, casts)[name]
    finally:
        h.remove()
    v = torch.cat(seen)
    assert st["total"] == v.numel() and st["min"] == float(v.min()) and st["max"] == float(v.max())
    assert qs[name].spec.is_float and qs[name].amax.numel() == 0  # the model is left as it was

    with pytest.raises(UserError, match=rf"float-cast quantizer.*{re.escape(name)}.*calib_batches"):
        api.analyze(model, evalb, search=True, budget={"agreement": 90.0}, search_groups="quantizer",
                    choices=("4", "8", "float"))
    res = api.analyze(model, evalb, search=True, budget={"agreement": 90.0}, search_groups="quantizer",
                      choices=("4", "8", "float"), calib_batches=calib, fp32=fp32)
    assert res["search"]["config"][name] in ("4", "8", "float") and "reproduced" in res["search"]


def test_labels_outside_the_models_classes_are_refused(setup, tmp_path, capsys):
    """Images of classes the model has no logit for are never right: every top-1 figure would be
    silently off. The API names the label, the CLI the class counts (as ``quantcore ptq`` does), before
    any calibration or analysis runs."""
    from PIL import Image

    from quantcore.cli import main

    _, _, model, calib, evalb = setup
    x, y = evalb[0]
    for bad in (y + 10, torch.full_like(y, -1)):
        with pytest.raises(UserError, match=r"analysis data: label -?\d+ is outside the model's 10 classes"):
            api.analyze(model, [(x[:8], bad[:8])])
    path = tmp_path / "m.qc.pt"
    api.save(model, str(path))
    raw = load_fashion_mnist()["test"][0]
    for classes, rc in ((12, 2), (10, 0)):
        root = tmp_path / f"folder{classes}"
        for c in range(classes):
            (root / "train" / f"c{c:02d}").mkdir(parents=True)
            for i in range(52):  # the recipe calibrates on 512 images; a few are left to analyze
                Image.fromarray(raw[52 * c + i]).save(root / "train" / f"c{c:02d}" / f"{i}.png")
        args = ["analyze", "-c", str(path), "-d", str(root), "--split", "train", "-o", str(tmp_path / f"o{classes}"),
                "--limit", "4", "--no-errors", "--no-progress"]
        assert main(args) == rc, classes
        if rc:
            assert "the model gives 10 logits, but" in capsys.readouterr().err and not (tmp_path / "o12" / "analysis.json").exists()


class _Tied(torch.nn.Module):
    """One Linear applied twice (weight tying / a recurrent block)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, stride=4)
        self.block = torch.nn.Linear(8, 8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x).mean((2, 3))
        h = torch.nn.functional.gelu(self.block(h))
        return self.fc(torch.nn.functional.gelu(self.block(h)))


def test_effective_bits_count_a_tied_weight_once(setup):
    """``cost bits`` weighs each quantized tensor by its elements: a weight is one stored tensor however
    often its module is called (it was counted per call), each activation call is its own values.
    Reference: the hand count from the parameters and the captured activations."""
    from quantcore.analysis.search import CostModel, choice_spec

    _, _, _, calib, _ = setup
    torch.manual_seed(0)
    fp32 = _Tied().eval()
    model = api.prepare(copy.deepcopy(fp32), {"version": 1, "name": "tied", "placement": {"family": "generic"},
                                              "quant": {"weights": {"bits": 4}, "activations": {"bits": 4}}})
    x, y = calib[0]
    api.calibrate(model, [x])
    qs = quantizers(model)
    calls = {n: 0 for n in qs}
    hooks = [q.register_forward_hook((lambda n: lambda m, a, o: calls.__setitem__(n, calls[n] + a[0].numel()))(n))
             for n, q in qs.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    eng = Engine(model, [(x, y)])
    elems = {n: (float(model.get_submodule(n.rpartition(".")[0]).weight.numel()) if q.kind == "weight"
                 else calls[n] / x.shape[0]) for n, q in qs.items() if n in eng.active}
    assert elems["block.input_quantizer"] == 2 * 8  # called twice per image
    specs = {n: eng.qs[n].spec for n in eng.active}
    specs["block.weight_quantizer"] = choice_spec("8", specs["block.weight_quantizer"])
    hand = sum(e * (8 if n == "block.weight_quantizer" else 4) for n, e in elems.items()) / sum(elems.values())
    assert CostModel(eng, "bits")(specs) == pytest.approx(hand, rel=1e-12)


@pytest.mark.parametrize("act", [torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.SiLU])
def test_replayed_prefix_is_not_changed_by_an_in_place_activation(act):
    # torchvision's mobilenet_v3 classifier: Linear -> Hardswish(inplace=True) -> ... -> Linear. The
    # engine replays the FP32/base outputs of the modules before a configuration's first change; an
    # in-place activation after such a module must not have rewritten the stored output.
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(3)])
            self.fc1, self.act, self.fc2 = torch.nn.Linear(16, 32), act(inplace=True), torch.nn.Linear(32, 5)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(self.body(x.flatten(1)))))

    recipe = {"name": "t", "placement": {"family": "auto"},
              "quant": {"weights": {"bits": 8, "per_channel": True}, "activations": {"bits": 8}},
              "calibration": {"method": "max", "num_batches": 1, "batch_size": 8}}
    model = api.prepare(Net().eval(), recipe, example_input=torch.randn(2, 1, 4, 4))
    xs = [torch.randn(16, 1, 4, 4)]
    api.calibrate(model, xs)
    eng = Engine(model, [(x, None) for x in xs])
    configs = {"fc2 float": {n: None for n in eng.active if n.startswith("fc2.")},
               "fc2 weight only": {n: None for n in eng.active if n != "fc2.weight_quantizer"}}
    got = eng.evaluate(configs)
    with torch.no_grad():  # independent: the whole forward, quantizers switched by hand
        ref = model(xs[0])
        with api.quantization_disabled(model):
            fp = model(xs[0])
        qs = quantizers(model)
        for name, cfg in configs.items():
            saved = {n: qs[n].quantize for n in cfg}
            for n in cfg:
                qs[n].quantize = False
            out = model(xs[0])
            for n, on in saved.items():
                qs[n].quantize = on
            sqnr = 10 * math.log10(fp.pow(2).sum() / (fp - out).pow(2).sum())
            assert got[name]["sqnr_db"] == pytest.approx(sqnr, abs=0.01), name
    assert not torch.equal(ref, fp)


def test_limits_beyond_the_split_are_said(setup, tmp_path, caplog):
    """--limit/--search-limit/--eval-limit larger than what the split holds: the run uses what there
    is and says so (warning naming the option and the count), as analysis.json records."""
    import json
    import logging

    from PIL import Image

    from quantcore.cli import main

    _, _, model, _, _ = setup
    path = tmp_path / "m.qc.pt"
    api.save(model, str(path))
    raw = load_fashion_mnist()["test"][0]
    root = tmp_path / "folder"
    for c in range(10):
        for split, n in (("train", 52), ("val", 3)):  # the recipe calibrates on 512: 8 left to analyze
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(raw[60 * c + i]).save(root / split / f"c{c}" / f"{i}.png")
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING):
        assert main(["analyze", "-c", str(path), "-d", str(root), "--split", "train", "--eval-split", "val",
                     "--eval-limit", "500", "-o", str(out), "--limit", "100", "--no-errors", "--no-progress"]) == 0
    said = caplog.text
    assert "--limit 100" in said and "using those 8" in said, said
    assert "--eval-limit 500" in said and "has 30 images" in said, said
    assert json.loads((out / "analysis.json").read_text())["info"]["analysis_images"] == 8


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18"])
def test_block_groups_are_blocks_on_torchvision_cnns(arch):
    """--groups block: the item of a Sequential/ModuleList holding more than one quantized module.
    torchvision's Conv2dNormActivation is itself a Sequential; its items are single layers."""
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    recipe = {"name": "t", "placement": {"family": "auto"}, "quant": {"weights": {"bits": 8}, "activations": {"bits": 8}},
              "calibration": {"method": "max", "num_batches": 1, "batch_size": 2}}
    x = torch.randn(2, 3, 64, 64)
    model = api.prepare(net, recipe, example_input=x)
    api.calibrate(model, [x])
    eng = Engine(model, [(x, None)])
    groups = make_groups(eng, "block")
    mods = dict(model.named_modules())
    top = "features" if arch.startswith("mobilenet") else "layer"
    # independent: the blocks are features.N / layerK.N (InvertedResidual, BasicBlock) by construction
    for key, members in groups.items():
        if key.startswith(top):
            assert key.count(".") == 1, (key, members)
            assert type(mods[key]).__name__ in ("InvertedResidual", "BasicBlock", "Conv2dNormActivation"), key
    blocks = [k for k in groups if k.startswith(top)]
    want = {".".join(n.split(".")[:2]) for n in eng.order if n.startswith(top)}
    assert set(blocks) == want
    assert sum(len(v) for v in groups.values()) == len(eng.order)


class _SmallNet(torch.nn.Module):
    """Two convs and a head: quick to calibrate and search on random images."""

    def __init__(self):
        super().__init__()
        self.c1, self.r1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()
        self.c2, self.r2 = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.nn.ReLU()
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.r2(self.c2(self.r1(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def _small_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _small(recipe=None, calibrate=True):
    torch.manual_seed(0)
    fp32 = _SmallNet().eval()
    rec = load_recipe(recipe or {"name": "s", "placement": {"family": "generic"},
                                 "quant": {"weights": {"bits": 4}, "activations": {"bits": 4}}})
    model = api.prepare(copy.deepcopy(fp32), rec, example_input=torch.randn(1, 3, 16, 16))
    if calibrate:
        api.calibrate(model, _small_batches(2, 2))
    return fp32, model


def test_a_model_with_nothing_quantized_is_refused_not_reported_as_meeting_its_budget():
    """An uncalibrated model (no quantizer has a range: none acts), one whose activation quantizers all
    lack a range, and one prepare placed no quantizer in: the search reported 'met' with an empty
    configuration and analysis covered nothing (or the weights only), without a word."""
    data = _small_batches(1, 3)
    _, raw = _small(calibrate=False)
    with pytest.raises(UserError, match=r"6 quantizer\(s\) have no range \('c1.input_quantizer', .*not calibrated"):
        api.analyze(raw, data, search=True, budget={"sqnr_db": 40}, calib_batches=_small_batches(1, 2))
    with pytest.raises(UserError, match="not calibrated"):
        error_analysis(raw, data)
    _, weights_only = _small()
    for q in quantizers(weights_only).values():
        if q.kind == "activation":
            q.reset_range()
    with pytest.raises(UserError, match=r"3 quantizer\(s\) have no range \('c1.input_quantizer', 'c2.input"):
        api.analyze(weights_only, data)

    class NoLayer(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    with pytest.raises(UserError, match="recipe 'n': no quantizer to place: the example input .* reached no quantizable op"):
        api.prepare(NoLayer(), {"name": "n", "placement": {"family": "generic"}}, example_input=torch.randn(1, 3, 16, 16))
    bare = NoLayer()  # prepare refuses it; handed to analysis unprepared, analysis refuses it too
    with pytest.raises(UserError, match="no quantizers.*no quantizable layer"):
        api.analyze(bare, data, search=True, budget={"sqnr_db": 40}, calib_batches=data)
    with pytest.raises(UserError, match="no quantizable layer"):
        search(bare, data, Budget.from_options(sqnr_db=40), {})


def test_non_finite_or_empty_analysis_batches_are_refused_naming_the_batch():
    """One NaN pixel gave SQNR -inf and nan statistics without a warning, and a search 'met' its
    budget with kl nan; an empty batch crashed with ZeroDivisionError. Calibration refuses such data,
    analysis now too, naming the batch; so are NaN logits of the FP32 model or of a configuration."""
    fp32, model = _small()
    good = _small_batches(2, 3)
    bad = good[1][0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match=r"batch 1 holds 1 NaN/inf value"):
        api.analyze(model, [good[0], (bad, good[1][1])], search=True, budget={"agreement": 50},
                    calib_batches=_small_batches(2, 2), fp32=fp32)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(UserError, match=r"batch 0 holds 1 NaN/inf"):
        Engine(model, [bad])
    with pytest.raises(UserError, match=r"batch 0 is empty \(shape \(0, 3, 16, 16\)\)"):
        error_analysis(model, [(torch.empty(0, 3, 16, 16), torch.empty(0, dtype=torch.long))])
    eng = Engine(model, good)
    c1 = quantizers(model)["c1.input_quantizer"]
    huge = (c1.spec, c1.amin, torch.full_like(c1.amax, float("nan")))
    with pytest.raises(UserError, match=r"configuration 'x' gives NaN/inf logits on analysis batch 0"):
        eng.evaluate({"x": {"c1.input_quantizer": huge}})
    with torch.no_grad():
        model.fc.bias[0] = float("inf")
    try:
        with pytest.raises(UserError, match=r"batch 0: the FP32 model gives NaN/inf logits"):
            Engine(model, good).evaluate({"m": {}})
    finally:
        with torch.no_grad():
            model.fc.bias[0] = 0.0


@pytest.mark.parametrize("case", ["cast_to_int", "int_to_cast"])
def test_search_figure_is_what_its_recipe_gives_when_a_float_cast_moves(case):
    """A float cast acts during calibration, so the quantizers downstream of it collect other statistics
    when the search moves it (fp16 in the recipe -> an integer grid, or an integer grid -> fp16): the
    search reused the model's and reported 30.28405 dB where its recipe gives 30.29276. Statistics are
    now collected per set of acting casts: the figures are equal."""
    over = [{"match": "c2.input_quantizer", "spec": {"format": "fp16"}}] if case == "cast_to_int" else []
    fp32, model = _small({"name": "c", "placement": {"family": "generic"}, "calibration": {"method": "max"},
                          "quant": {"weights": {"bits": 8}, "activations": {"bits": 8}}, "overrides": over})
    calib, evalb = _small_batches(2, 2), _small_batches(3, 3)
    if case == "cast_to_int":
        kw = {"budget": {"sqnr_db": 30.0}, "choices": ("4", "fp16", "8")}
    else:  # c1's input cast to fp16: c2's and fc's inputs (int8, unsearched) see fp16 values in calibration
        kw = {"budget": {"sqnr_db": 10.0}, "choices": ("fp16",), "search_groups": ["c1.input_quantizer"]}
    res = api.analyze(model, evalb, search=True, calib_batches=calib, fp32=fp32, **kw)["search"]
    moved = res["config"]["c2.input_quantizer" if case == "cast_to_int" else "c1.input_quantizer"]
    assert moved == ("4" if case == "cast_to_int" else "fp16"), res["config"]
    assert res["reproduced"]["equal"] is True, (res["metrics"], res["reproduced"])


def test_analysis_input_checks_name_the_option():
    """A duplicate choice ('4' and '04'), a plain string split into characters, workers=-3 (the CLI's
    --parallel 0 is refused already) were accepted."""
    with pytest.raises(UserError, match=r"choices: choice '4' is given twice \('4' and '04'\)"):
        parse_choices(["4", "04"])
    assert parse_choices("8, 4,float") == ["4", "8", "float"]
    with pytest.raises(UserError, match="--choices: choice 'float' is given twice"):
        parse_choices("float,4,float", "--choices")
    _, model = _small()
    for bad in (-3, 0, 1.5, True):
        with pytest.raises(UserError, match=rf"workers: a number of processes, at least 1; got {bad!r}"):
            api.analyze(model, _small_batches(1, 3), workers=bad)
    with pytest.raises(UserError, match="workers: .* got -1"):
        Engine(model, _small_batches(1, 3)).evaluate({"a": {}, "b": {}}, workers=-1)


def test_cli_analyze_a_recipe_without_weights_is_a_user_error(tmp_path, capsys):
    """A recipe whose model has no weights (no model.checkpoint, no pretrained) and no --checkpoint ended
    in an AttributeError (exit 1) while reading the classes, before its own 'no FP32 weights' error."""
    import yaml

    from quantcore.cli import main
    from tiny_data import TINY_RECIPE, make_images

    root = make_images(tmp_path / "imgs")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    assert main(["analyze", "-r", str(recipe), "-d", str(root), "--split", "train", "--limit", "4",
                 "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "recipe 'tiny_w8a8': no FP32 weights to calibrate: give --checkpoint" in err and "Traceback" not in err


def test_outputs_an_earlier_analysis_left_are_removed_not_passed_off_as_this_runs(setup, tmp_path, caplog):
    """analyze --search wrote search_recipe.yaml and pareto.png; a later analyze without the search into the
    same folder rewrote analysis.json/md and left them there, as if this run had chosen that recipe."""
    _, _, model, calib, evalb = setup
    out = tmp_path / "o"
    api.analyze(model, evalb[:1], search=True, budget={"sqnr_db": 5.0}, calib_batches=calib[:1], groups=["blocks.0.mlp.fc1"],
                search_groups=["blocks.0.*"], choices=("4", "8"), out=str(out))
    made = {p.name for p in out.iterdir()}
    assert {"search_recipe.yaml", "pareto.png", "analysis.json"} <= made
    with caplog.at_level("WARNING", logger="quantcore"):
        res = api.analyze(model, evalb[:1], groups=["blocks.0.mlp.fc1"], out=str(out))
    left = {p.name for p in out.iterdir()}
    assert "search_recipe.yaml" not in left and "pareto.png" not in left and "analysis.json" in left
    assert "search" not in json.loads((out / "analysis.json").read_text()) and "search" not in res
    assert "removed pareto.png, search_recipe.yaml of an earlier analysis" in caplog.text
    assert ("sqnr.png" in made) == ("sqnr.png" in left)  # this run made its own error analysis

