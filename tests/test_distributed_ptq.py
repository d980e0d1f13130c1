"""Data-parallel PTQ: K ranks (gloo on 127.0.0.1) calibrate and evaluate exactly like one process.

Unit tests fork two ranks from this process (``torch.multiprocessing.start_processes``, fork: no
second import of torch/timm on 2 shared cores) and join them in a gloo group; the end-to-end test runs
``torchrun --nproc_per_node 2 -m quantcore.cli ptq`` on a tiny image folder. Every figure is compared
with a single-process run of the same data in this process; nothing is hard-coded.
"""
from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import quantcore
from quantcore import distributed
from quantcore.api import quantizers
from quantcore.evaluate import EvalAccumulator, evaluate_models
from tiny_data import TINY_RECIPE, make_images

WORLD = 2
NUM_CLASSES = 5
N_CALIB, N_EVAL = 22, 33  # odd / not divisible by the batch sizes: uneven shards and short batches
CALIB_BATCH, EVAL_BATCH = 4, 5
TIMEOUT_S = 240
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_env(port: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1"}


def _rank_main(rank: int, port: int, fn, args) -> None:
    """One forked rank: join the gloo group the way torchrun's environment describes it, run fn."""
    os.environ.update(_dist_env(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.owns_group) == (rank, WORLD, True)
    try:
        fn(rank, *args)
    finally:
        distributed.teardown(ctx)


def run_ranks(fn, *args, start_method: str = "fork") -> None:
    """Run ``fn(rank, *args)`` on WORLD forked ranks of one gloo group; raise if any rank fails.
    ``start_method="spawn"`` for ranks that run backward: a forked rank inherits the worker's autograd
    state, and once an earlier test on the same xdist worker has started autograd's device threads (a
    compiled backward does) its backward fails ("Unable to handle autograd's threading in combination
    with fork-based multiprocessing"; seen in the suite). ``fn`` must then be importable (module level)."""
    ctx = torch.multiprocessing.start_processes(_rank_main, args=(_free_port(), fn, args), nprocs=WORLD,
                                                join=False, start_method=start_method)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:  # only on timeout/failure are any still alive
            if p.is_alive():
                p.kill()
                p.join(5)


def batches(x: torch.Tensor, bs: int, y: torch.Tensor | None = None) -> list:
    return [(x[i:i + bs],) if y is None else (x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def ranges(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (q.amin.detach().clone(), q.amax.detach().clone()) for n, q in quantizers(model).items()}


def _vit_recipe(method: str) -> quantcore.Recipe:
    return quantcore.load_recipe({
        "name": f"vit_{method}",
        "model": {"name": "quantcore/vit_fmnist", "num_classes": NUM_CLASSES, "in_chans": 3, "img_size": 32,
                  "kwargs": {"patch_size": 8, "depth": 1}},
        "placement": {"family": "vit", "mode": "ft2"},
        "quant": {"activations": {"bits": 8, "symmetric": method != "mse"}},
        "calibration": {"method": method, "bins": 512}})


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES)).eval()


@pytest.fixture(scope="module")
def prepared() -> dict[str, nn.Module]:
    """Prepared, uncalibrated models: a ViT per histogram calibrator, a CNN with max ranges."""
    out = {}
    for method in ("percentile", "mse", "entropy"):
        r = _vit_recipe(method)
        torch.manual_seed(0)
        out[r.name] = quantcore.prepare(quantcore.build_model(r), r)
    cnn = quantcore.load_recipe({"name": "cnn_max", "placement": {"family": "cnn"},
                                 "quant": {"activations": {"bits": 8, "symmetric": False}},
                                 "calibration": {"method": "max"}})
    out["cnn_max"] = quantcore.prepare(_cnn(), cnn, example_input=torch.randn(2, 3, 32, 32))
    return out


def calib_data() -> torch.Tensor:
    return torch.randn(N_CALIB, 3, 32, 32, generator=torch.Generator().manual_seed(123)) * 1.5


def _calibrate_rank(rank: int, models: dict[str, nn.Module], out: Path) -> None:
    x = calib_data()
    mine = x[distributed.shard(len(x))]
    res = {}
    for name, model in models.items():
        m = copy.deepcopy(model)
        cal = quantcore.calibrate(m, batches(mine, CALIB_BATCH))
        res[name] = {"ranges": ranges(m), "images": cal.images}
    torch.save(res, out / f"calib-rank{rank}.pt")


def test_k_rank_calibration_equals_one_process_ranges_bitwise(prepared, tmp_path):
    run_ranks(_calibrate_rank, prepared, tmp_path)
    x = calib_data()
    shards = [x[distributed.shard(len(x), r, WORLD)] for r in range(WORLD)]
    assert sorted(len(s) for s in shards) == [N_CALIB // 2, N_CALIB // 2]
    union = [b for s in shards for b in batches(s, CALIB_BATCH)]  # one process, the same batches
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"calib-rank{rank}.pt")
        assert set(got) == set(prepared)
        for name, model in prepared.items():
            one = copy.deepcopy(model)
            quantcore.calibrate(one, union)
            ref = ranges(one)
            assert got[name]["images"] == N_CALIB
            assert set(got[name]["ranges"]) == set(ref) and ref
            calibrated = 0
            for q, (lo, hi) in ref.items():
                glo, ghi = got[name]["ranges"][q]
                assert torch.equal(glo, lo) and torch.equal(ghi, hi), (rank, name, q, glo, lo, ghi, hi)
                calibrated += hi.numel() > 0
            assert calibrated, name
            # the merge matters: rank 0's shard alone gives other activation ranges
            alone = copy.deepcopy(model)
            quantcore.calibrate(alone, batches(shards[0], CALIB_BATCH))
            acts = [q for q, tq in quantizers(one).items() if tq.kind == "activation" and ref[q][1].numel()]
            assert any(not torch.equal(ranges(alone)[q][1], ref[q][1]) for q in acts), name


# -- evaluation ---------------------------------------------------------------------------------
def eval_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(N_EVAL, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (N_EVAL,), generator=g)


@pytest.fixture(scope="module")
def eval_models(prepared) -> dict[str, nn.Module]:
    r = _vit_recipe("percentile")
    torch.manual_seed(0)
    fp32 = quantcore.build_model(r).eval()
    q = copy.deepcopy(prepared["vit_percentile"])
    quantcore.calibrate(q, batches(calib_data(), CALIB_BATCH))
    cnn = copy.deepcopy(prepared["cnn_max"])
    quantcore.calibrate(cnn, batches(calib_data(), CALIB_BATCH))
    return {"fp32": fp32, "vit_w8a8": q, "cnn": cnn}


def _evaluate_rank(rank: int, models: dict[str, nn.Module], out: Path) -> None:
    x, y = eval_data()
    idx = distributed.shard(len(x))
    merged = evaluate_models(models, batches(x[idx], EVAL_BATCH, y[idx]), NUM_CLASSES, reference="fp32")
    local = evaluate_models(models, batches(x[idx], EVAL_BATCH, y[idx]), NUM_CLASSES, reference="fp32",
                            sync=False)
    torch.save({"merged": {n: s.as_dict() for n, s in merged.items()},
                "local": {n: s.as_dict() for n, s in local.items()}}, out / f"eval-rank{rank}.pt")


def assert_same_scores(got: dict, ref: dict) -> None:
    """Counts and percentages from counts equal exactly; SQNR to 1e-9 relative."""
    assert set(got) == set(ref)
    for n, r in ref.items():
        g = got[n]
        for key in ("count", "top1", "top5", "agreement"):
            assert g[key] == r[key], (n, key, g[key], r[key])
        assert len(g["per_class"]) == len(r["per_class"])
        for a, b in zip(g["per_class"], r["per_class"]):
            assert a == b or (a is None and b is None) or (math.isnan(a) and math.isnan(b)), (n, g, r)
        if r["sqnr_db"] is None or math.isinf(r["sqnr_db"]):
            assert g["sqnr_db"] == r["sqnr_db"], n
        else:
            assert g["sqnr_db"] == pytest.approx(r["sqnr_db"], rel=1e-9, abs=0), n


def test_sharded_evaluation_equals_one_process(eval_models, tmp_path):
    run_ranks(_evaluate_rank, eval_models, tmp_path)
    x, y = eval_data()
    sizes = [len(distributed.shard(N_EVAL, r, WORLD)) for r in range(WORLD)]
    assert sizes == [N_EVAL // 2 + 1, N_EVAL // 2]  # uneven shards
    union = [b for r in range(WORLD) for idx in [distributed.shard(N_EVAL, r, WORLD)]
             for b in batches(x[idx], EVAL_BATCH, y[idx])]
    ref = {n: s.as_dict() for n, s in evaluate_models(eval_models, union, NUM_CLASSES, reference="fp32").items()}
    assert ref["fp32"]["count"] == N_EVAL and all(math.isfinite(ref[n]["sqnr_db"]) for n in ("vit_w8a8", "cnn"))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"eval-rank{rank}.pt")
        assert_same_scores(got["merged"], ref)
        assert got["local"]["fp32"]["count"] == sizes[rank]  # without the all-reduce: only the shard


def test_accumulator_merge_of_shards_equals_whole(eval_models):
    x, y = eval_data()
    names = list(eval_models)
    # the same batches either way: another batch size may round logits differently in the last bit
    shards = [[b for b in batches(x[idx], EVAL_BATCH, y[idx])] for r in range(3)
              for idx in [distributed.shard(N_EVAL, r, 3)]]

    def acc_of(bs):
        acc = EvalAccumulator(names, NUM_CLASSES, reference="fp32")
        for xb, yb in bs:
            acc.update({n: m(xb) for n, m in eval_models.items()}, yb)
        return acc

    parts = [acc_of(s) for s in shards]
    whole = acc_of([b for s in shards for b in s])
    merged = parts[0].merge(parts[1]).merge(EvalAccumulator.from_state_dict(parts[2].state_dict()))
    assert_same_scores({n: s.as_dict() for n, s in merged.scores().items()},
                       {n: s.as_dict() for n, s in whole.scores().items()})
    assert int(parts[1].total) == len(distributed.shard(N_EVAL, 1, 3))
    with pytest.raises(ValueError, match="different models"):
        merged.merge(EvalAccumulator(names[:1], NUM_CLASSES))


@pytest.mark.parametrize("n,bs,world", [(33, 5, 2), (33, 4, 3), (3, 4, 2), (0, 4, 2), (40, 8, 4)])
def test_shard_batches_are_the_single_process_batches(n, bs, world):
    idx = list(range(100, 100 + n))
    parts = [distributed.shard_batches(idx, bs, r, world) for r in range(world)]
    assert sum(parts, []) == idx  # disjoint, covering, in order

    def cut(xs):
        return [xs[i:i + bs] for i in range(0, len(xs), bs)]

    assert [b for p in parts for b in cut(p)] == cut(idx)  # each rank's loader: the single process's batches
    counts = [len(cut(p)) for p in parts]
    assert max(counts) - min(counts) <= 1  # balanced in whole batches


# -- the pipeline (ptq, evaluate_checkpoint) on ranks -------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Tiny image folder: train 3 x 6, val 3 x 11 = 33 images (odd), one corrupt val file."""
    root = make_images(tmp_path_factory.mktemp("imgs"), splits=(("train", 6), ("val", 11)))
    (root / "val" / "fox" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


@pytest.fixture(scope="module")
def recipe() -> dict:
    # 3 calibration batches of 4: rank 0 gets 2, rank 1 gets 1
    return {**TINY_RECIPE, "calibration": {**TINY_RECIPE["calibration"], "method": "percentile", "num_batches": 3}}


def _pipeline_rank(rank: int, recipe: dict, images: Path, out: Path) -> None:
    from quantcore import pipeline
    from quantcore.io import storage

    real = storage.write_bytes

    def logged(uri, *a, **kw):  # which rank writes what
        with open(out / f"writes-rank{rank}.txt", "a") as f:
            f.write(f"{uri}\n")
        return real(uri, *a, **kw)

    storage.write_bytes = logged
    opts = pipeline.RunOptions(batch_size=4, device="cpu", progress=False)
    r = quantcore.load_recipe(recipe)
    torch.manual_seed(1000 + rank)  # random FP32 weights differ per rank: ptq must use rank 0's on all
    rep = pipeline.ptq([r], pipeline.DataSpec(str(images), "train"),
                       pipeline.DataSpec(str(images), "val", skip_bad=True), str(out / "ptq"), opts)
    assert distributed.active()  # a group made by someone else is left alone
    ev = pipeline.evaluate_checkpoint(str(out / "ptq" / r.name / "model.qc.pt"),
                                      pipeline.DataSpec(str(images), "val", skip_bad=True, limit=25),
                                      str(out / "eval"), opts)
    torch.save({"ptq": rep, "eval": ev}, out / f"reports-rank{rank}.pt")


def _figures(rep: dict) -> dict:
    return {"results": rep["results"], "skipped": rep["skipped"], "eval_count": rep["data"]["eval_count"],
            "calibration": {k: v for k, v in (rep.get("calibration") or {}).items() if not k.endswith("_s")}}


def assert_same_report(got: dict, ref: dict) -> None:
    g, r = _figures(got), _figures(ref)
    assert_same_scores(g.pop("results"), r.pop("results"))
    assert g == r


def test_pipeline_on_ranks_writes_once_and_returns_one_process_figures(recipe, images, tmp_path):
    from quantcore import pipeline

    run_ranks(_pipeline_rank, recipe, images, tmp_path)
    reps = [torch.load(tmp_path / f"reports-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert reps[0] == reps[1]  # every rank returns the same report dict
    assert not (tmp_path / "writes-rank1.txt").exists()
    writes = Counter((tmp_path / "writes-rank0.txt").read_text().split())
    assert writes and set(writes.values()) == {1}, writes
    assert {str(tmp_path / "ptq" / "report.json"), str(tmp_path / "eval" / "report.json"),
            str(tmp_path / "ptq" / "tiny_w8a8" / "model.qc.pt")} <= set(writes)

    opts = pipeline.RunOptions(batch_size=4, device="cpu", progress=False)
    r = quantcore.load_recipe(recipe)
    torch.manual_seed(1000)  # rank 0's random weights
    one = pipeline.ptq([r], pipeline.DataSpec(str(images), "train"),
                       pipeline.DataSpec(str(images), "val", skip_bad=True), str(tmp_path / "one"), opts)
    ev = pipeline.evaluate_checkpoint(str(tmp_path / "one" / r.name / "model.qc.pt"),
                                      pipeline.DataSpec(str(images), "val", skip_bad=True, limit=25), None, opts)
    got = reps[0]
    assert got["ptq"]["data"]["world_size"] == WORLD and one["data"]["world_size"] == 1
    assert got["eval"]["data"]["world_size"] == WORLD and ev["data"]["world_size"] == 1
    assert one["data"]["eval_count"] == 33 and [s["name"] for s in one["skipped"]] == [
        str(images / "val" / "fox" / "zz_broken.jpg")]
    assert_same_report(got["ptq"], one)
    assert_same_report(got["eval"], ev)
    assert ev["data"]["eval_count"] == 25
    enc = [json.loads((d / r.name / "encodings.json").read_text())["quantizers"]
           for d in (tmp_path / "ptq", tmp_path / "one")]
    assert enc[0] == enc[1]


# -- end to end: torchrun + the CLI -----------------------------------------------------------------
def test_torchrun_cli_ptq_equals_one_process(recipe, images, tmp_path):
    from quantcore.cli import main

    rfile = tmp_path / "tiny.yaml"
    rfile.write_text(yaml.safe_dump(recipe))
    weights = tmp_path / "fp32.pt"
    torch.manual_seed(0)
    torch.save(quantcore.build_model(quantcore.load_recipe(recipe)).state_dict(), weights)
    common = ["-r", str(rfile), "--calib-data", str(images), "--checkpoint", str(weights), "--batch-size", "4",
              "--device", "cpu", "--no-progress", "--skip-bad"]
    env = {**os.environ, **_dist_env(_free_port())}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", env["MASTER_PORT"],
           "-m", "quantcore.cli", "ptq", *common, "--out", str(tmp_path / "k")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("report: ") == 1  # rank 0 prints (exit 0: every rank finished)
    assert main(["ptq", *common, "--out", str(tmp_path / "one")]) == 0

    got, ref = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("k", "one"))
    assert got["data"]["world_size"] == WORLD and ref["data"]["world_size"] == 1
    assert ref["data"]["eval_count"] == 33 and len(ref["skipped"]) == 1
    assert_same_report(got, ref)
    for d in ("k", "one"):  # artifacts complete, no temporary files left over
        names = sorted(p.relative_to(tmp_path / d).as_posix() for p in (tmp_path / d).rglob("*") if p.is_file())
        assert names == ["per_class.png", "report.json", "report.md", "tiny_w8a8/encodings.json",
                         "tiny_w8a8/model.qc.pt", "tiny_w8a8/ranges.png", "tiny_w8a8/report.json"], names
    enc = [json.loads((tmp_path / d / "tiny_w8a8" / "encodings.json").read_text())["quantizers"] for d in ("k", "one")]
    assert enc[0] == enc[1]


def test_logit_energies_sum_exactly_whatever_the_batches_shards_and_order():
    """SQNR came from float64 sums added per batch and per rank: 3 ranks, or another batch size,
    changed its last digits (30.638105705987794 vs ...79). Each image's energy is now added exactly, so
    any split of the same per-image logits reports the same bits; checked against exact rational sums."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(0)
    n, c = 997, 10
    ref = torch.randn(n, c, generator=g) * 3
    q = ref + torch.randn(n, c, generator=g) * torch.logspace(-6, 0, n)[:, None]  # energies of many scales
    labels = torch.randint(0, c, (n,), generator=g)

    def run(order, bs):
        acc = EvalAccumulator(["fp32", "q"], c, reference="fp32")
        for i in range(0, n, bs):
            j = order[i:i + bs]
            acc.update({"fp32": ref[j], "q": q[j]}, labels[j])
        return acc

    ident = torch.arange(n)
    one = run(ident, 256)
    variants = [run(ident, 7), run(torch.randperm(n, generator=g), 64)]
    shards = [run(torch.tensor(distributed.shard(n, r, 3)), 5) for r in range(3)]
    variants.append(shards[2].merge(shards[0]).merge(EvalAccumulator.from_state_dict(shards[1].state_dict())))
    for v in variants:
        assert v.scores()["q"].sqnr_db == one.scores()["q"].sqnr_db
        assert torch.equal(v.noise, one.noise) and torch.equal(v.sig, one.sig)
    exact = sum(Fraction(float(e)) for e in ((q.double() - ref.double()) ** 2).sum(1))
    assert float(one.noise[1]) == float(exact)  # correctly rounded


# -- skipped images with several recipes, and a calibration nothing could be read for -----------------
def _bad_train(root: Path) -> tuple[Path, list, list]:
    """Corrupt train images that only recipe A (seed 0) or only recipe B (seed 1) calibrates on."""
    from quantcore import pipeline
    from quantcore.data import open_dataset

    ds = open_dataset(str(root), "train", None)
    rec = [quantcore.load_recipe({**TINY_RECIPE, "name": f"r{s}", "calibration": {
        **TINY_RECIPE["calibration"], "method": "max", "seed": s}}) for s in (0, 1)]
    a, b = (pipeline._calibration_indices(ds, r) for r in rec)
    only_a, only_b = [i for i in a if i not in b][:3], [i for i in b if i not in a][:3]
    assert only_a and only_b
    for i in only_a + only_b:
        Path(ds.where(i)).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root, rec, [ds.where(i) for i in only_a], [ds.where(i) for i in only_b]


def _skips_rank(rank: int, root: Path, rec: list, out: Path) -> None:
    from quantcore import pipeline

    opts = pipeline.RunOptions(batch_size=4, device="cpu", progress=False)
    torch.manual_seed(0)
    _, variants, skipped = pipeline.calibrate_variants(rec, pipeline.DataSpec(str(root), "train", skip_bad=True),
                                                        opts)
    torch.save({"all": skipped, **{v.name: v.calibration.get("skipped") for v in variants}},
               out / f"skips-rank{rank}.pt")


def test_skipped_images_are_listed_per_recipe_in_image_order_whatever_the_rank_count(tmp_path):
    """Two recipes calibrate on different images, some unreadable: the run's list is recipe by recipe,
    each in image order, on 1 or K ranks alike (K ranks listed rank by rank), and each variant's own
    list has only its images (it had the whole run's)."""
    from quantcore import pipeline

    root, rec, only_a, only_b = _bad_train(make_images(tmp_path / "imgs", splits=(("train", 6),)))
    run_ranks(_skips_rank, root, rec, tmp_path)
    ranked = [torch.load(tmp_path / f"skips-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.manual_seed(0)
    _, variants, skipped = pipeline.calibrate_variants(
        rec, pipeline.DataSpec(str(root), "train", skip_bad=True),
        pipeline.RunOptions(batch_size=4, device="cpu", progress=False))
    one = {"all": skipped, **{v.name: v.calibration.get("skipped") for v in variants}}
    assert ranked[0] == ranked[1] == one
    assert [s["name"] for s in one["r0"]] == only_a and [s["name"] for s in one["r1"]] == only_b
    assert [s["name"] for s in one["all"]] == only_a + only_b


def test_a_calibration_with_no_readable_image_is_an_error_not_a_weights_only_result(tmp_path):
    """--skip-bad over calibration images none of which can be read: the variant's activations would
    stay pass-through under a W8A8 name (exit 0, 'agreement 100 %'); it is a data error naming the
    recipe and an image, and nothing is written."""
    from quantcore import pipeline
    from quantcore.data.errors import DataError

    root = make_images(tmp_path / "imgs", splits=(("train", 2), ("val", 2)))
    for f in (root / "train").rglob("*.jpg"):
        f.write_bytes(b"not an image")
    r = quantcore.load_recipe(TINY_RECIPE)
    with pytest.raises(DataError, match=r"recipe 'tiny_w8a8': none of the 6 calibration images .* could be read "
                                        r"\(6 skipped.*e\.g\. .*\.jpg\)"):
        pipeline.ptq([r], pipeline.DataSpec(str(root), "train", skip_bad=True),
                     pipeline.DataSpec(str(root), "val"), str(tmp_path / "out"),
                     pipeline.RunOptions(batch_size=4, device="cpu", progress=False))
    assert not any((tmp_path / "out").rglob("*"))  # no checkpoint, no report
