"""Search budgets checked on a lower confidence bound (issue #11: a Δ top-1 measured on held-out
images is noisy; the search must not call a coin toss "met").

The bounds are checked against references written here (the per-image difference vector and numpy's
sample standard deviation; Wilson's score equation solved by bisection), and their coverage on real
data: the trained demo ViT at W4A4 on all 10,000 Fashion-MNIST test images is the population, and
random 1,000-image samples of it must contain the population's Δ above their 90 % bound about 90 % of
the time.
"""
from __future__ import annotations

import copy
import gzip
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from quantcore import api
from quantcore.analysis import Budget, Engine, LogitStats
from quantcore.analysis.search import delta_lower_bound, wilson_lower_bound
from quantcore.demo import SHIPPED_FP32
from quantcore.errors import UserError
from quantcore.models import vit_fmnist
from quantcore.recipe import load_recipe

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _ref_delta_bound(d: np.ndarray, conf: float) -> float:
    """Agresti-Min bound from the per-image differences themselves (values -1/0/+1): four pseudo-images
    of weight 0.5 (one per cell of the paired 2x2 table: +1, -1, 0, 0) join them, then the Wald bound
    of the weighted mean with the weighted (population) variance."""
    v = np.concatenate([d, [1.0, -1.0, 0.0, 0.0]])
    w = np.concatenate([np.ones(d.size), np.full(4, 0.5)])
    mean = np.average(v, weights=w)
    var = np.average((v - mean) ** 2, weights=w)
    return 100 * (mean - NormalDist().inv_cdf(conf) * np.sqrt(var / w.sum()))


@pytest.mark.parametrize("gained,lost,n", [(12, 30, 5000), (0, 0, 800), (40, 5, 1000), (3, 250, 10000)])
@pytest.mark.parametrize("conf", [0.5, 0.8, 0.9, 0.99])
def test_delta_bound_matches_per_image_reference(gained, lost, n, conf):
    d = np.zeros(n)
    d[:gained] = 1
    d[gained:gained + lost] = -1
    assert delta_lower_bound(gained, lost, n, conf) == pytest.approx(_ref_delta_bound(d, conf), abs=1e-9)
    if conf > 0.5:
        assert delta_lower_bound(gained, lost, n, conf) < 100 * (gained - lost) / n + 1e-12


def test_delta_bound_stays_below_zero_when_nothing_changed_on_few_images():
    """Plain Wald gives exactly 0 for 0 gained / 0 lost: 20 identical images would 'prove' any budget."""
    assert delta_lower_bound(0, 0, 20, 0.9) < -3
    assert delta_lower_bound(0, 0, 20, 0.9) > delta_lower_bound(0, 1, 20, 0.9)
    assert -0.05 < delta_lower_bound(0, 0, 10000, 0.9) < 0


@pytest.mark.parametrize("agree,n", [(99.7, 10000), (96.0, 5000), (100.0, 500), (50.0, 20), (0.0, 100)])
@pytest.mark.parametrize("conf", [0.8, 0.9, 0.975])
def test_wilson_bound_solves_the_score_equation(agree, n, conf):
    """Wilson's lower end p_L is the root below p̂ of (p̂ - p)^2 = z^2 p (1 - p) / n (bisection here)."""
    p_hat, z = agree / 100, NormalDist().inv_cdf(conf)

    def f(p):
        return (p_hat - p) ** 2 - z * z * p * (1 - p) / n

    lo, hi = 0.0, p_hat  # f(0) >= 0 >= f(p_hat)
    if f(lo) <= 0:
        ref = 0.0
    else:
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
        ref = lo
    got = wilson_lower_bound(agree, n, conf)
    assert got == pytest.approx(100 * ref, abs=1e-7)
    assert 0 <= got <= agree


def test_budget_checks_the_bound_not_the_point_estimate():
    m = {"count": 5000, "delta_top1": -0.06, "gained": 40, "lost": 43, "agreement": 98.24}
    assert Budget.from_options(delta_top1=0.1).ok(m)  # the point estimate passes...
    strict = Budget.from_options(delta_top1=0.1, confidence=0.9)
    assert not strict.ok(m)  # ... its 90 % bound (-0.30) does not
    assert strict.bound(m) == pytest.approx(delta_lower_bound(40, 43, 5000, 0.9))
    assert "90% confidence" in strict.describe()
    clean = {"count": 5000, "delta_top1": 0.0, "gained": 0, "lost": 0, "agreement": 100.0}
    assert strict.ok(clean)
    ag = Budget.from_options(agreement=98.0, confidence=0.9)
    assert Budget.from_options(agreement=98.0).ok(m) and not ag.ok(m)  # 98.24 % of 5000: bound 98.0 - ...
    assert ag.bound(m) == pytest.approx(wilson_lower_bound(98.24, 5000, 0.9))


def test_confidence_errors_name_the_option():
    with pytest.raises(UserError, match="--budget-confidence.*--budget-sqnr"):
        Budget.from_options(sqnr_db=30, confidence=0.9)
    for bad in (1.0, 0.3, float("nan"), 90):
        with pytest.raises(UserError, match="--budget-confidence"):
            Budget.from_options(delta_top1=0.1, confidence=bad)
    from quantcore.cli import main

    assert main(["analyze", "-c", "/nonexistent.qc.pt", "-d", "x", "-o", "y", "--search", "--budget-top1", "0.1",
                 "--budget-confidence", "1.5"]) == 2
    # a budget without --search would be ignored: refused, naming the options
    assert main(["analyze", "-c", "/nonexistent.qc.pt", "-d", "x", "-o", "y", "--budget-top1", "0.1",
                 "--budget-confidence", "0.9"]) == 2
    with pytest.raises(UserError, match="--budget-confidence"):
        Budget.from_options(delta_top1=0.1, confidence="0.9")
    from quantcore import api as qapi

    with pytest.raises(UserError, match="unknown key.*conf"):
        qapi.analyze(torch.nn.Identity(), [], search=True, budget={"delta_top1": 0.1, "conf": 0.9})
    with pytest.raises(UserError, match="search=True"):
        qapi.analyze(torch.nn.Identity(), [], budget={"delta_top1": 0.1})


def _fmnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    xt = (torch.from_numpy(x.copy()).float() / 255 - 0.2860) / 0.3530  # the demo model's normalization
    return xt, torch.from_numpy(y.astype(np.int64))


@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_bound_covers_the_population_delta_on_real_w4a4_predictions():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = _fmnist_test()
        fp32 = vit_fmnist().eval()
        fp32.load_state_dict(torch.load(SHIPPED_FP32, weights_only=True))
        recipe = load_recipe("fmnist_w4a4_ft1")
        recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(
            update={"method": "percentile", "weights_method": "max"})})  # cheap ranges: W4A4 still flips ~4 %
        model = api.prepare(copy.deepcopy(fp32), recipe)
        api.calibrate(model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)])
        batches = [(x[i:i + 1000], y[i:i + 1000]) for i in range(0, 10000, 1000)]
        with torch.no_grad():
            pf = torch.cat([fp32(b) for b, _ in batches]).argmax(1)
            pq = torch.cat([model(b) for b, _ in batches]).argmax(1)
        cf, cq = (pf == y).numpy(), (pq == y).numpy()
        d = cq.astype(np.int64) - cf.astype(np.int64)
        # the Engine's counts are the per-image vector's
        m = Engine(model, batches).evaluate({"m": {}})["m"]
        assert (m["gained"], m["lost"]) == (int((d == 1).sum()), int((d == -1).sum()))
        assert m["delta_top1"] == pytest.approx(100 * d.mean(), abs=1e-9)
        assert m["gained"] + m["lost"] > 150  # enough discordant images for the coverage check to mean much
        pop = 100 * d.mean()
        rng = np.random.default_rng(0)
        trials, n = 600, 1000
        hits = 0
        for _ in range(trials):
            s = d[rng.choice(d.size, n, replace=False)]
            hits += delta_lower_bound(int((s == 1).sum()), int((s == -1).sum()), n, 0.9) <= pop
        assert 0.86 <= hits / trials <= 0.95, hits / trials  # binomial sd at 0.9: 0.012
        # and the point estimate alone "meets" a budget set at the population's Δ only about half the time
        half = sum(100 * d[rng.choice(d.size, n, replace=False)].mean() >= pop for _ in range(trials)) / trials
        assert 0.35 <= half <= 0.65
    finally:
        torch.set_num_threads(threads)


def test_logit_stats_counts_merge():
    a, b = LogitStats(), LogitStats()
    ref = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    out = torch.tensor([[1.0, 2.0], [1.0, 0.0], [1.0, 0.0]])
    a.update(out[:2], ref[:2], torch.tensor([0, 0]))  # image 0 lost, image 1 gained
    b.update(out[2:], ref[2:], torch.tensor([1]))  # both wrong: neither
    m = a.merge(b).metrics()
    assert (m["gained"], m["lost"], m["count"]) == (1, 1, 3)
    assert LogitStats().metrics()["gained"] is None
