"""Quantization-aware training: the loop, distillation losses, data-parallel sampling, checkpoints,
SIGTERM and kill-a-rank resumes (bit-identical on CPU), convert/encodings, save/load.

Real data: a small slice of Fashion-MNIST packed into zip shards, and a demo ViT trained on it for a
few seconds (so quantization error and its recovery are real, not noise on random weights).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from quantcore import api, distributed
from quantcore.config import QATConfig, Recipe
from quantcore.demo import FMNIST_CLASSES, FMNIST_DIR, load_fashion_mnist
from quantcore.errors import UserError
from quantcore.pipeline import DataSpec
from quantcore.qat import (QATOptions, decode_train_state, encode_train_state, latest_checkpoint, list_checkpoints,
                           per_sample_loss, run_qat)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
N_TRAIN, N_TEST = 480, 200


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory, one_torch_thread):
    """(data dir, FP32 weights path): 480 train / 200 test images, a demo ViT trained 4 epochs on them."""
    from quantcore.data import pack_arrays
    from quantcore.models import vit_fmnist
    from quantcore.train import train_classifier
    from quantcore.config import TrainConfig

    root = tmp_path_factory.mktemp("fmnist")
    data = load_fashion_mnist()
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x, y = data[split]
        pack_arrays(x[:n], y[:n], str(root / "data"), split, FMNIST_CLASSES, shard_size=200)
    x = torch.from_numpy(data["train"][0][:N_TRAIN].copy()).float().div(255).sub(0.286).div(0.353)[:, None]
    y = torch.from_numpy(data["train"][1][:N_TRAIN].copy()).long()
    torch.manual_seed(0)
    model = vit_fmnist()
    cfg = TrainConfig(epochs=6, batch_size=32, lr=3e-3)
    train_classifier(model, lambda e: ((x[i:i + 32], y[i:i + 32]) for i in range(0, N_TRAIN, 32)), 15, cfg)
    ckpt = root / "fp32.pt"
    torch.save(model.state_dict(), ckpt)
    return str(root / "data"), str(ckpt)


def _recipe(ckpt: str, **qat) -> dict:
    q = {"epochs": 2, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 1e-3}, "distill": {"kind": "kd"},
         "augment": {"kind": "model", "scale": [0.8, 1.0]}, "checkpoint_every": 4, "log_every": 2,
         "num_workers": 0}
    q.update(qat)
    return {"name": "t_w4", "model": {"name": "quantcore/vit_fmnist", "checkpoint": ckpt},
            "placement": {"family": "vit", "mode": "ft1"},
            "quant": {"weights": {"bits": 4, "symmetric": True, "per_channel": True},
                      "activations": {"bits": 4, "symmetric": True}},
            "calibration": {"method": "mse", "weights_method": "mse", "num_batches": 2, "batch_size": 32},
            "overrides": [{"match": "blocks.*.attn.attn_quantizer", "spec": {"symmetric": False}}],
            "qat": q}


def _run(fmnist, out, **kw):
    data, ckpt = fmnist
    qat = kw.pop("qat", {})
    r = Recipe.model_validate(_recipe(ckpt, **qat))
    return run_qat(r, DataSpec(data, "train"), DataSpec(data, "test"), str(out),
                   QATOptions(progress=False, **kw))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:4]}"


# ------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("n,batch,world", [(10, 2, 2), (37, 4, 3), (5, 4, 4), (64, 8, 2), (1, 3, 2)])
def test_epoch_batches_cover_every_sample_once_with_equal_steps_per_rank(n, batch, world):
    for start in (0, min(n, batch * world + 1)):
        per_rank = [distributed.epoch_batches(n, batch, world, r, seed=3, epoch=1, start=start) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # every rank runs the same number of steps
        seen = [i for p in per_rank for b, _ in p for i in b]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1)).tolist()
        assert sorted(seen) == sorted(perm[start:])  # each remaining sample exactly once
        for step in range(len(per_rank[0])):  # the normalizer is the real global batch size
            counts = {p[step][1] for p in per_rank}
            assert counts == {sum(len(p[step][0]) for p in per_rank)}
    a = distributed.epoch_batches(n, batch, world, 0, seed=3, epoch=1)
    assert a == distributed.epoch_batches(n, batch, world, 0, seed=3, epoch=1)  # deterministic in the seed


# ------------------------------------------------------------------------------------ losses
def test_kd_and_deit_losses_match_an_independent_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10) * 2, torch.randint(0, 10, (6,))
    cfg = QATConfig(distill={"kind": "kd", "temperature": 3.0, "alpha": 0.25})
    ref_kl = torch.nn.functional.kl_div(torch.log_softmax(s / 3, -1), torch.softmax(t / 3, -1),
                                        reduction="none").sum(-1) * 9
    ref = 0.75 * torch.nn.functional.cross_entropy(s, y, reduction="none") + 0.25 * ref_kl
    torch.testing.assert_close(per_sample_loss(s, y, t, cfg), ref)
    d = torch.randn(6, 10)
    hard = QATConfig(distill={"kind": "deit_hard", "alpha": 0.5})
    ref_hard = 0.5 * torch.nn.functional.cross_entropy(s, y, reduction="none") + \
        0.5 * torch.nn.functional.cross_entropy(d, t.argmax(-1), reduction="none")
    torch.testing.assert_close(per_sample_loss((s, d), y, t, hard), ref_hard)
    soft = QATConfig(distill={"kind": "deit_soft", "alpha": 0.5, "temperature": 1.0})
    ref_soft = 0.5 * torch.nn.functional.cross_entropy(s, y, reduction="none") + 0.5 * torch.nn.functional.kl_div(
        torch.log_softmax(d, -1), torch.softmax(t, -1), reduction="none").sum(-1)
    torch.testing.assert_close(per_sample_loss((s, d), y, t, soft), ref_soft)
    mse = QATConfig(distill={"kind": "logit_mse", "alpha": 0.4})
    ref_mse = 0.6 * torch.nn.functional.cross_entropy(s, y, reduction="none") + 0.4 * ((s - t) ** 2).mean(-1)
    torch.testing.assert_close(per_sample_loss(s, y, t, mse), ref_mse)
    with pytest.raises(ValueError, match="temperature does not apply to kind logit_mse"):
        QATConfig(distill={"kind": "logit_mse", "temperature": 2.0})


# ------------------------------------------------------------------------------------ checkpoints
def test_a_changed_start_is_refused_naming_what_changed():
    """A resume whose --init checkpoint (weights or calibrated ranges) or FP32 weights changed is refused;
    the message names the one that changed (an --init with new ranges is not "other FP32 weights")."""
    from quantcore.checkpoint import CheckpointError
    from quantcore.qat import _check_same_start

    stored = {"start": {"init": "i.qc.pt", "fp32_sha256": "a"}}
    with pytest.raises(CheckpointError, match=r"from another --init checkpoint \(its weights or calibrated ranges"):
        _check_same_start(stored, {"init": "i.qc.pt", "fp32_sha256": "b"}, "o/ckpt")
    stored = {"start": {"init": None, "fp32_sha256": "a"}}
    with pytest.raises(CheckpointError, match=r"from other FP32 weights \(recipe model.checkpoint"):
        _check_same_start(stored, {"init": None, "fp32_sha256": "b"}, "o/ckpt")
    _check_same_start(stored, {"init": None, "fp32_sha256": "a"}, "o/ckpt")  # the same start resumes


def test_corrupt_or_partial_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    from quantcore.io import storage

    good = encode_train_state({"step": 4, "x": torch.arange(3)})
    storage.write_bytes(str(tmp_path / "checkpoints" / "step-000000004.pt"), good)
    storage.write_bytes(str(tmp_path / "checkpoints" / "step-000000008.pt"), good[:-10])  # partial write
    bad = bytearray(encode_train_state({"step": 12, "x": torch.arange(3)}))
    bad[100] ^= 0xFF  # one flipped byte
    storage.write_bytes(str(tmp_path / "checkpoints" / "step-000000012.pt"), bytes(bad))
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [12, 8, 4]
    with caplog.at_level(logging.WARNING, logger="quantcore"):
        uri, state = latest_checkpoint(str(tmp_path))
    assert uri.endswith("step-000000004.pt") and state["step"] == 4
    assert "step-000000012.pt" in caplog.text and "SHA-256" in caplog.text
    assert "step-000000008.pt" in caplog.text
    with pytest.raises(UserError, match="SHA-256"):
        decode_train_state(bytes(bad), "x")


# ------------------------------------------------------------------------------------ the loop
def test_qat_trains_converts_and_reports(fmnist, tmp_path):
    """W4A4 with learned ranges and KD: the loss falls, learned scales reach encodings.json, the saved
    model reloads bit-identically, and the report compares FP32, PTQ and QAT."""
    out = tmp_path / "run"
    seen = []
    rep = _run(fmnist, out, on_log=seen.append)
    assert set(rep["results"]) == {"fp32", "t_w4:ptq", "t_w4"}
    assert rep["results"]["t_w4"]["count"] == N_TEST and rep["qat"]["steps"] == 2 * N_TRAIN // 16
    losses = [m["loss"] for m in seen if "loss" in m]
    assert len(losses) >= 10 and sum(losses[-3:]) < sum(losses[:3])  # it learns
    assert [m["val_top1"] for m in seen if "val_top1" in m]  # validated at the end of epoch 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [m["step"] for m in seen if "loss" in m]
    for f in ("report.md", "training.png", "ptq/model.qc.pt", "t_w4/encodings.json"):
        assert (out / f).is_file(), f
    # convert: the learned scales (last training checkpoint + the final steps) are what encodings report
    model = api.load(str(out / "t_w4" / "model.qc.pt"))
    ptq = api.load(str(out / "ptq" / "model.qc.pt"))
    enc = json.loads((out / "t_w4" / "encodings.json").read_text())
    enc_ptq = api.encodings(ptq)
    name = "blocks.0.mlp.fc1.input_quantizer"
    learned = {r["name"]: r for r in enc["quantizers"]}[name]["amax"]
    calibrated = {r["name"]: r for r in enc_ptq["quantizers"]}[name]["amax"]
    assert learned != pytest.approx(calibrated, rel=1e-4)  # training moved the range ...
    assert learned == pytest.approx(float(model.get_submodule(name).amax), rel=1e-6)  # ... and encodings say so
    assert not any(q.spec.learnable for q in api.quantizers(model).values())  # converted
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, ptq.blocks[0].mlp.fc1.weight)  # the weights trained too
    # save/load bit-identical: the reloaded model gives the same logits as the one that was saved
    x = torch.randn(4, 1, 28, 28)
    again = api.load(str(out / "t_w4" / "model.qc.pt"))
    assert torch.equal(model(x), again(x))
    _assert_same_weights(model.state_dict(), again.state_dict())


def test_frozen_ranges_keep_the_calibrated_ranges(fmnist, tmp_path):
    _run(fmnist, tmp_path / "f", qat={"ranges": "frozen", "epochs": 1, "distill": {"kind": "none"}}, max_steps=6)
    a = _state(tmp_path / "f" / "ptq" / "model.qc.pt")
    b = _state(tmp_path / "f" / "t_w4" / "model.qc.pt")
    ranges = [k for k in a if k.endswith((".amax", ".amin")) and "weight_quantizer" not in k]
    assert ranges and all(torch.equal(a[k], b[k]) for k in ranges)
    assert not torch.equal(a["blocks.0.mlp.fc1.weight"], b["blocks.0.mlp.fc1.weight"])  # weights trained


def test_bad_qat_options_are_user_errors_naming_the_field(fmnist, tmp_path):
    with pytest.raises(UserError, match="distillation token"):
        _run(fmnist, tmp_path / "d", qat={"distill": {"kind": "deit_hard"}}, max_steps=1)
    with pytest.raises(ValueError, match="bn_freeze_step"):
        Recipe.model_validate(_recipe("x", bn="fold", bn_freeze_step=3))
    with pytest.raises(ValueError, match="distill.teacher"):
        Recipe.model_validate(_recipe("x", distill={"kind": "none", "teacher": {"name": "resnet18"}}))
    # learn_zero_point: false where every learned range is symmetric (no zero point to learn) cannot apply
    data, ckpt = fmnist
    sym = {**_recipe(ckpt, learn_zero_point=False), "overrides": []}
    with pytest.raises(UserError, match="learn_zero_point: false.*symmetric"):
        run_qat(Recipe.model_validate(sym), DataSpec(data, "train"), None, str(tmp_path / "z"),
                QATOptions(progress=False, max_steps=1))


@pytest.mark.parametrize("field,qat", [("qat.distill.temperature", {"distill": {"kind": "kd", "temperature": math.inf}}),
                                       ("qat.optimizer.lr", {"optimizer": {"name": "adamw", "lr": math.inf}}),
                                       ("qat.optimizer.range_lr", {"optimizer": {"name": "adamw", "range_lr": math.nan}}),
                                       ("qat.clip_grad_norm", {"clip_grad_norm": math.inf})])
def test_an_infinite_or_nan_number_in_a_recipe_is_refused_naming_the_field(field, qat):
    """gt=0 let .inf through: training ran on NaN, saved an all-NaN model, then died writing encodings.json
    (exit 1, retried by every launcher, failing the same way)."""
    from quantcore.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=f"{field.replace('.', '[.]')}: Input should be a finite number"):
        load_recipe(_recipe("x.pt", **qat))


def test_a_diverging_run_stops_at_the_first_nan_step_before_saving_it(fmnist, tmp_path):
    """A finite but far too large lr trained every remaining step on NaN weights, saved them as the QAT
    model, exited 0, and wrote bare NaN tokens into metrics.jsonl."""
    from quantcore.qat import Diverged

    out = tmp_path / "div"
    with pytest.raises(Diverged, match=r"recipe 't_w4': the QAT loss became inf/NaN at step (\d+)") as exc:
        _run(fmnist, out, qat={"optimizer": {"name": "sgd", "lr": 1e30}, "checkpoint_every": 1})
    step = exc.value.step
    saved = [s for s, _ in list_checkpoints(str(out))]
    assert saved and max(saved) < step, (saved, step)  # nothing of the NaN step on storage
    for _, uri in list_checkpoints(str(out)):
        state = decode_train_state(Path(uri).read_bytes(), uri)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (out / "t_w4").exists()  # no QAT model
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in metrics"))


def test_a_max_steps_cap_the_run_never_reaches_is_said(fmnist, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="quantcore.qat"):
        rep = _run(fmnist, tmp_path / "cap", qat={"epochs": 1, "batch_size": 240, "checkpoint_every": 10},
                   max_steps=5, eval_limit=20)
    assert rep["qat"]["steps"] == 2
    said = [r.getMessage() for r in caplog.records if "qat.max_steps 5" in r.getMessage()]
    assert said and "the run has 2 steps" in said[0] and "never reached" in said[0], said
    assert said[0] in rep["warnings"]  # in the report too, not only in one rank's log


def test_a_batch_larger_than_the_data_is_reported_with_the_batch_used(fmnist, tmp_path):
    """A global batch above the training images was said in rank 0's log only, and the report gave the
    configured batch as the global batch although each step used all the training images."""
    rep = _run(fmnist, tmp_path / "big", qat={"epochs": 1, "batch_size": 4 * N_TRAIN, "checkpoint_every": 10},
               eval_limit=20)
    assert rep["qat"]["steps"] == 1 and rep["qat"]["global_batch"] == N_TRAIN
    said = [w for w in rep["warnings"] if f"qat.batch_size {4 * N_TRAIN} x 1 rank(s)" in w]
    assert said and f"each epoch is one step of {N_TRAIN} images" in said[0], rep["warnings"]
    assert said[0] in (tmp_path / "big" / "report.md").read_text()


def test_sigterm_writes_a_checkpoint_exits_143_and_the_rerun_ends_bit_identical(fmnist, tmp_path):
    data, ckpt = fmnist
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(ckpt, checkpoint_every=3, epochs=3)))

    def cmd(out):
        return [sys.executable, "-m", "quantcore.cli", "qat", "-r", str(recipe), "-d", data, "--eval-split", "test",
                "-o", str(out), "--no-progress"]

    ref = subprocess.run(cmd(tmp_path / "A"), env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen(cmd(tmp_path / "B"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_checkpoint(proc, tmp_path / "B" / "checkpoints")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "preempted" in err and "step-" in err
    step = max(s for s, _ in list_checkpoints(str(tmp_path / "B")))
    assert 0 < step < 3 * N_TRAIN // 16
    assert not (tmp_path / "B" / "t_w4" / "model.qc.pt").exists()
    again = subprocess.run(cmd(tmp_path / "B"), env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    _assert_same_weights(_state(tmp_path / "A" / "t_w4" / "model.qc.pt"), _state(tmp_path / "B" / "t_w4" / "model.qc.pt"))
    a = json.loads((tmp_path / "A" / "report.json").read_text())["results"]
    b = json.loads((tmp_path / "B" / "report.json").read_text())["results"]
    assert a == b


@pytest.mark.parametrize("to", ["group", "every process"])
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_checkpoints(fmnist, tmp_path, to):
    """``kill -TERM -<pgid>`` (torchrun forwarding to a rank's group, a shell's job control) also
    reaches DataLoader worker processes: they must not die under the training loop (which then
    raised "DataLoader worker exited unexpectedly" and wrote no checkpoint). The run checkpoints the
    step it reached and exits 143, and no worker outlives it. "every process": a SIGTERM to each
    process by PID (systemd's control-group stop, Slurm's scancel), which no process group avoids."""
    data, ckpt = fmnist
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(ckpt, checkpoint_every=3, epochs=3, num_workers=2)))
    cmd = [sys.executable, "-m", "quantcore.cli", "qat", "-r", str(recipe), "-d", data, "--eval-split", "test",
           "-o", str(tmp_path / "B"), "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: the signal reaches only what this test started
    workers: list[int] = []
    try:
        _wait_for_checkpoint(proc, tmp_path / "B" / "checkpoints")
        workers = _children(proc.pid)
        if to == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            for pid in workers + [proc.pid]:  # the workers first: they see it before the rank stops them
                os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "preempted" in err and "step-" in err, err[-3000:]  # the SIGTERM checkpoint was written
    assert "exited unexpectedly" not in err and "Traceback" not in err, err[-3000:]
    assert workers, "the run had no DataLoader workers"
    deadline = time.time() + 30
    while any(Path(f"/proc/{w}").exists() and "zombie" not in _proc_state(w) for w in workers):
        assert time.time() < deadline, f"DataLoader workers outlived the run: {workers}"
        time.sleep(0.2)


def test_a_loader_worker_outlives_a_sigterm_by_its_grace_period_then_ends(monkeypatch):
    """Ignoring SIGTERM outright kept a stuck worker alive after the loader's own terminate(); it now
    ends WORKER_SIGTERM_GRACE_S after the first SIGTERM (long enough for its rank to checkpoint)."""
    import multiprocessing as mp

    from quantcore.data import loader

    monkeypatch.setattr(loader, "WORKER_SIGTERM_GRACE_S", 1)

    def worker() -> None:
        loader.leave_signal_group(0)
        time.sleep(30)  # a worker stuck in a read

    p = mp.get_context("fork").Process(target=worker)
    p.start()
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert p.is_alive()  # not at once: the rank is still checkpointing
    p.join(10)
    assert not p.is_alive() and p.exitcode == -signal.SIGALRM


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


def _wait_for_checkpoint(proc: subprocess.Popen, ck_dir: Path, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not (ck_dir.is_dir() and any(ck_dir.glob("step-*.pt"))):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    """Descendant PIDs of ``pid`` (from /proc; only processes this test started)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.extend(kids.get(p, []))
        todo.extend(kids.get(p, []))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_two_rank_torchrun_qat_survives_a_killed_rank_with_the_same_final_weights(fmnist, tmp_path):
    """2 ranks (gloo): K-rank calibration, DDP training, sharded evaluation; one rank SIGKILLed after the
    first checkpoint, torchrun restarts both, they resume by themselves and end bit-identical."""
    data, ckpt = fmnist
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(ckpt, checkpoint_every=3, epochs=3)))

    def cmd(out):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max_restarts", "1", "-m", "quantcore.cli", "qat", "-r", str(recipe), "-d", data,
                "--eval-split", "test", "-o", str(out), "--no-progress"]

    ref = subprocess.run(cmd(tmp_path / "A"), env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    rep = json.loads((tmp_path / "A" / "report.json").read_text())
    assert rep["qat"]["world_size"] == 2 and rep["results"]["fp32"]["count"] == N_TEST
    assert rep["calibration"]["images"] == 64  # 2 batches of 32, split over the ranks and merged
    proc = subprocess.Popen(cmd(tmp_path / "B"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_checkpoint(proc, tmp_path / "B" / "checkpoints")
        ranks = [p for p in _children(proc.pid) if "quantcore.cli" in _cmdline(p) and "torch.distributed.run"
                 not in _cmdline(p)]
        assert len(ranks) == 2, [(p, _cmdline(p)) for p in _children(proc.pid)]
        os.kill(ranks[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from" in err or "Restarting" in err or "restart" in err.lower()
    _assert_same_weights(_state(tmp_path / "A" / "t_w4" / "model.qc.pt"), _state(tmp_path / "B" / "t_w4" / "model.qc.pt"))


def test_float_formats_train_with_autocast_and_deit_distillation_from_a_cnn_teacher(fmnist, tmp_path):
    """Seed 004's set-up in miniature: a distilled DeiT (distillation token) in FP16_32-style FP16 formats,
    hard distillation from a CNN teacher with its own weights, bf16 autocast."""
    import timm

    data, _ = fmnist
    torch.manual_seed(1)
    teacher = timm.create_model("resnet10t", in_chans=1, num_classes=10)
    t_ckpt = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), t_ckpt)
    r = Recipe.model_validate({
        "name": "deit_fp16", "model": {"name": "deit_tiny_distilled_patch16_224", "img_size": 28, "in_chans": 1,
                                       "num_classes": 10, "kwargs": {"patch_size": 7, "depth": 1}},
        "placement": {"family": "vit", "mode": "ft1"},
        "quant": {"weights": {"format": "fp16"}, "activations": {"format": "fp16"}},
        "calibration": {"num_batches": 1, "batch_size": 16},
        "qat": {"epochs": 1, "batch_size": 16, "amp": "bf16", "optimizer": {"name": "adamw", "lr": 1e-3},
                "ranges": "frozen",
                "distill": {"kind": "deit_hard", "teacher": {"name": "resnet10t", "in_chans": 1, "num_classes": 10,
                                                             "checkpoint": str(t_ckpt)}},
                "augment": {"kind": "none"}, "log_every": 1, "num_workers": 0}})
    seen = []
    rep = run_qat(r, DataSpec(data, "train"), DataSpec(data, "test"), str(tmp_path / "o"),
                  QATOptions(progress=False, max_steps=5, on_log=seen.append))
    assert rep["qat"]["learned_quantizers"] == 0  # casts have no range to learn
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in seen if "loss" in m) and len(seen) >= 5
    model = api.load(str(tmp_path / "o" / "deit_fp16" / "model.qc.pt"))
    assert {q.spec.format for q in api.quantizers(model).values()} == {"fp16"}
    assert not model.distilled_training  # the saved model averages both heads, as DeiT deploys
    # the teacher's file rewritten with other weights: the finished run's checkpoints are not resumed
    torch.manual_seed(9)
    torch.save(timm.create_model("resnet10t", in_chans=1, num_classes=10).state_dict(), t_ckpt)
    with pytest.raises(UserError, match=r"other teacher weights.*qat\.distill\.teacher"):
        run_qat(r, DataSpec(data, "train"), None, str(tmp_path / "o"), QATOptions(progress=False, max_steps=5))


def test_hugging_face_deit_with_teacher_trains_its_distillation_head(fmnist, tmp_path):
    """transformers' DeiTForImageClassificationWithTeacher has the distillation token and head (it
    always returns cls_logits and distillation_logits): deit_hard/deit_soft train on them, with the
    loss of the independent formula, instead of refusing the model as having no token."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTImageProcessor

    from quantcore.models import distilled_outputs, has_distillation_head

    data, _ = fmnist
    torch.manual_seed(0)
    cfg = DeiTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, num_labels=10,
                     architectures=["DeiTForImageClassificationWithTeacher"])
    hf = DeiTForImageClassificationWithTeacher(cfg).eval()
    hf.save_pretrained(tmp_path / "deit")
    DeiTImageProcessor(size={"height": 28, "width": 28}, do_center_crop=False, image_mean=[0.286],
                       image_std=[0.353]).save_pretrained(tmp_path / "deit")
    assert has_distillation_head(hf) and not has_distillation_head(torch.nn.Linear(2, 2))
    x, y, t = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), torch.randn(4, 10)
    out = hf(x)
    cls, dist = distilled_outputs(out)
    hard = QATConfig(distill={"kind": "deit_hard", "alpha": 0.3})
    ref = 0.7 * torch.nn.functional.cross_entropy(out.cls_logits, y, reduction="none") + \
        0.3 * torch.nn.functional.cross_entropy(out.distillation_logits, t.argmax(-1), reduction="none")
    torch.testing.assert_close(per_sample_loss(out, y, t, hard), ref)
    r = Recipe.model_validate({
        "name": "hfdeit", "model": {"name": str(tmp_path / "deit")},
        "placement": {"family": "vit", "mode": "ft1"}, "calibration": {"method": "max", "num_batches": 1, "batch_size": 16},
        "qat": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 1e-3},
                "distill": {"kind": "deit_soft", "alpha": 0.5}, "augment": {"kind": "none"}, "num_workers": 0}})
    before = {k: v.clone() for k, v in hf.state_dict().items() if k.startswith("distillation_classifier")}
    rep = run_qat(r, DataSpec(data, "train"), DataSpec(data, "test"), str(tmp_path / "o"),
                  QATOptions(progress=False, max_steps=3))
    assert rep["qat"]["steps"] == 3
    model = api.load(str(tmp_path / "o" / "hfdeit" / "model.qc.pt"))
    moved = [k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])]
    assert moved, "the distillation head did not train"


def test_a_teacher_sees_the_students_images_in_its_own_preprocessing(tmp_path, caplog):
    """A teacher whose data config normalizes otherwise (an HF processor's 0.5/0.5 against the student's
    Fashion-MNIST mean/std) gets the student's images mapped exactly onto its own normalization; another
    input size is resized to, with a warning; a teacher without a data config, or with another channel
    count, is said or refused (helper-131: a ResNet teacher scored 79 % on its own inputs, 24 % on the
    student's)."""
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from quantcore.config import ModelConfig
    from quantcore.data.transforms import eval_transform
    from quantcore.models import create_model, output_logits
    from quantcore.qat import TeacherInputs, _teacher_inputs

    student = create_model(ModelConfig(name="quantcore/vit_fmnist"))
    rng = np.random.RandomState(0)
    imgs = [Image.fromarray(rng.randint(0, 256, (28, 28), dtype=np.uint8), "L") for _ in range(4)]
    xs = torch.stack([eval_transform(student)(im) for im in imgs])

    def hf_teacher(size: int, chans: int = 1):
        torch.manual_seed(0)
        d = tmp_path / f"t{size}_{chans}"
        ViTForImageClassification(ViTConfig(image_size=size, patch_size=size // 4, num_channels=chans, hidden_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                             num_labels=10)).save_pretrained(d)
        ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * chans,
                          image_std=[0.5] * chans).save_pretrained(d)
        return create_model(ModelConfig(name=str(d))).eval()

    teacher = hf_teacher(28)
    wrapped = _teacher_inputs(teacher, student, "t28")
    assert isinstance(wrapped, TeacherInputs) and wrapped.inner is teacher and wrapped.size is None
    xt = torch.stack([eval_transform(teacher)(im) for im in imgs])
    with torch.no_grad():
        want = output_logits(teacher(xt))
        torch.testing.assert_close(output_logits(wrapped(xs)), want, atol=1e-5, rtol=1e-5)
        assert (output_logits(teacher(xs)) - want).abs().max() > 1e-2  # what it was fed before
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quantcore"):
        big = _teacher_inputs(hf_teacher(32), student, "t32")
    assert big.size == (32, 32) and "resized from 28x28 to its input size 32x32" in caplog.text
    with torch.no_grad():
        assert output_logits(big(xs)).shape == (4, 10)
    same = create_model(ModelConfig(name="quantcore/vit_fmnist"))
    assert _teacher_inputs(same, student, "same") is same
    with pytest.raises(UserError, match=r"qat\.distill\.teacher: t3 takes 3-channel images, the student 1-channel"):
        _teacher_inputs(hf_teacher(28, 3), student, "t3")
    # timm's default preprocessing for an architecture whose weights come from model.checkpoint says
    # nothing about how they were trained (a CNN trained on these 28x28 images): not applied, said;
    # a pretrained_cfg_overlay is the user saying it, and is applied
    import timm

    from quantcore.qat import _config_describes_weights

    ck = tmp_path / "cnn.pt"
    torch.save(timm.create_model("resnet10t", in_chans=1, num_classes=10).state_dict(), ck)
    plain = ModelConfig(name="resnet10t", in_chans=1, num_classes=10, checkpoint=str(ck))
    cnn = create_model(plain)
    assert not _config_describes_weights(plain, cnn)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quantcore"):
        assert _teacher_inputs(cnn, student, "cnn", _config_describes_weights(plain, cnn)) is cnn
    assert "says nothing about how they were trained" in caplog.text and "pretrained_cfg_overlay" in caplog.text
    told = ModelConfig(name="resnet10t", in_chans=1, num_classes=10, checkpoint=str(ck), kwargs={
        "pretrained_cfg_overlay": {"input_size": [1, 28, 28], "mean": [0.5], "std": [0.5], "crop_pct": 1.0}})
    cnn2 = create_model(told)
    assert _config_describes_weights(told, cnn2)
    mapped = _teacher_inputs(cnn2, student, "cnn2", True)
    assert isinstance(mapped, TeacherInputs) and mapped.size is None and "x*[" in mapped.describe()
    caplog.clear()
    bare = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with caplog.at_level(logging.WARNING, logger="quantcore"):
        assert _teacher_inputs(bare, student, "bare") is bare
    assert "carries no preprocessing config" in caplog.text and "as they are" in caplog.text


def test_a_run_whose_teacher_inputs_changed_is_not_resumed():
    """A run started before the teacher's inputs were mapped (or mapped otherwise) would continue on
    another teacher signal: refused like other teacher weights, while an unchanged one resumes."""
    from quantcore.checkpoint import CheckpointError
    from quantcore.qat import _check_same_start

    base = {"init": None, "fp32_sha256": "a", "teacher_sha256": "t"}
    _check_same_start({"start": dict(base)}, {**base, "teacher_inputs": None}, "u")  # before: as they are
    _check_same_start({"start": {**base, "teacher_inputs": "x*[2.0]+[0.5]"}},
                      {**base, "teacher_inputs": "x*[2.0]+[0.5]"}, "u")
    for stored in (dict(base), {**base, "teacher_inputs": "resized to 32x32 (bilinear)"}):
        with pytest.raises(CheckpointError, match=r"teacher saw its inputs otherwise"):
            _check_same_start({"start": stored}, {**base, "teacher_inputs": "x*[2.0]+[0.5]"}, "u")


def _cnn_recipe(tmp_path: Path, seed: int, name: str, **qat) -> dict:
    """A QAT recipe for a random-init timm resnet10t on 28x28 Fashion-MNIST with BatchNorm kept
    unfolded (its weights written to ``tmp_path/cnn.pt``); ``qat`` adds to its qat: section."""
    import timm

    torch.manual_seed(seed)
    ck = tmp_path / "cnn.pt"
    torch.save(timm.create_model("resnet10t", in_chans=1, num_classes=10).state_dict(), ck)
    small = {"pretrained_cfg_overlay": {"input_size": [1, 28, 28], "crop_pct": 1.0, "mean": [0.286], "std": [0.353]}}
    return {"name": name, "model": {"name": "resnet10t", "in_chans": 1, "num_classes": 10, "checkpoint": str(ck),
                                    "kwargs": small},
            "placement": {"family": "cnn", "fold_bn": False},
            "calibration": {"method": "max", "num_batches": 1, "batch_size": 16},
            "qat": {"epochs": 1, "batch_size": 16, "augment": {"kind": "none"}, "num_workers": 0, **qat}}


def test_bn_freeze_stops_running_statistics_after_n_steps(fmnist, tmp_path, caplog):
    data, _ = fmnist
    base = _cnn_recipe(tmp_path, 2, "cnn", bn="freeze", bn_freeze_step=3, checkpoint_every=3, keep_checkpoints=5)
    run_qat(Recipe.model_validate(base), DataSpec(data, "train"), None, str(tmp_path / "o"),
            QATOptions(progress=False, max_steps=9))
    states = {s: decode_train_state(Path(u).read_bytes(), u)["model"] for s, u in list_checkpoints(str(tmp_path / "o"))}
    key = next(k for k in states[3] if k.endswith("running_mean"))
    assert not torch.equal(states[3][key], _state(tmp_path / "o" / "ptq" / "model.qc.pt")[key])  # updated before
    assert torch.equal(states[3][key], states[6][key]) and torch.equal(states[6][key], states[9][key])  # frozen after
    # the report says what happened to them (it said "0 BatchNorms folded, 0 kept" and nothing of the freeze)
    import timm

    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in timm.create_model("resnet10t").modules())
    md = (tmp_path / "o" / "report.md").read_text()
    assert f"0 BatchNorms folded, {n_bn} kept" in md and "updated for 3 steps, then frozen (qat.bn: freeze)" in md, md
    pl = json.loads((tmp_path / "o" / "report.json").read_text())["variants"]["cnn"]["placement"]
    assert len(pl["unfolded_bn"]) == n_bn and set(pl["unfolded_bn"].values()) == {"placement.fold_bn: false"}
    with pytest.raises(ValueError, match="fold_bn"):
        Recipe.model_validate({**base, "qat": {"bn": "fold"}})
    # freeze with the BatchNorms folded away (placement.fold_bn: true, the default): nothing to freeze
    folded = {**base, "placement": {"family": "cnn"}}
    with pytest.raises(UserError, match=r"qat\.bn: freeze.*placement\.fold_bn: true.*folds all \d+ of this model's"):
        run_qat(Recipe.model_validate(folded), DataSpec(data, "train"), None, str(tmp_path / "f"),
                QATOptions(progress=False, max_steps=1))
    assert not (tmp_path / "f" / "ptq").exists()
    # settings that cannot take effect in this run are said: a freeze step past the end, a batch
    # larger than the data
    late = {**base, "qat": {**base["qat"], "bn_freeze_step": 100, "batch_size": 1000}}
    with caplog.at_level(logging.WARNING, logger="quantcore.qat"):
        run_qat(Recipe.model_validate(late), DataSpec(data, "train"), None, str(tmp_path / "late"),
                QATOptions(progress=False, max_steps=1))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "never freeze" in said and f"larger than the {N_TRAIN} training images" in said, said
    md = (tmp_path / "late" / "report.md").read_text()  # and the report does not claim a freeze that never came
    assert "updated at every step: qat.bn_freeze_step 100 was not reached in 1 steps" in md and "then frozen" not in md
    # validation settings with no validation in the run (one epoch, eval_every past its end) are said
    # too; with evaluation data and eval_every inside the run they are not
    for qat, data_eval, warned in (({"eval_every": 1000, "eval_limit": 5}, True, True),
                                   ({"eval_limit": 5}, True, True), ({"eval_every": 2}, False, True),
                                   ({"eval_every": 2, "eval_limit": 5}, True, False)):
        caplog.clear()
        r = {**base, "qat": {**base["qat"], "bn": "train", "bn_freeze_step": 0, **qat}}
        with caplog.at_level(logging.WARNING, logger="quantcore.qat"):
            run_qat(Recipe.model_validate(r), DataSpec(data, "train"), DataSpec(data, "test") if data_eval else None,
                    str(tmp_path / f"ev{len(caplog.records)}{sorted(qat)}{data_eval}"),
                    QATOptions(progress=False, max_steps=3))
        said = " ".join(m.getMessage() for m in caplog.records)
        assert ("no validation runs during training" in said) is warned, (qat, data_eval, said)
    with pytest.raises(ValueError, match="warmup_start: 0.5 is set but warmup_steps is 0"):
        QATConfig(schedule={"warmup_start": 0.5})


def test_ft2_shared_qkv_range_stays_shared_through_learned_qat(fmnist, tmp_path):
    data, ckpt = fmnist
    r = _recipe(ckpt, epochs=1, ranges="learned", optimizer={"name": "adamw", "lr": 1e-3, "range_lr": 1e-2})
    r["placement"] = {"family": "vit", "mode": "ft2"}
    r["quant"] = {"weights": {"bits": 8, "per_channel": False}, "activations": {"bits": 8}}
    run_qat(Recipe.model_validate(r), DataSpec(data, "train"), None, str(tmp_path / "o"),
            QATOptions(progress=False, max_steps=4))
    enc = json.loads((tmp_path / "o" / "t_w4" / "encodings.json").read_text())
    rows = {q["name"]: q for q in enc["quantizers"]}
    ptq = {q["name"]: q for q in api.encodings(api.load(str(tmp_path / "o" / "ptq" / "model.qc.pt")))["quantizers"]}
    for b in range(4):
        qkv = [rows[f"blocks.{b}.attn.{x}_quantizer"]["amax"] for x in "qkv"]
        qkv.append(rows[f"blocks.{b}.attn.qkv.output_quantizer"]["amax"])  # the GEMM writing q/k/v
        assert qkv[0] == qkv[1] == qkv[2] == qkv[3]  # one range, as ft2 deploys it
        assert qkv[0] != ptq[f"blocks.{b}.attn.q_quantizer"]["amax"]  # and it was learned


def test_a_checkpoint_calibrated_before_its_ranges_were_shared_is_not_reported_shared(fmnist, tmp_path, caplog):
    """An older quantcore calibrated ft2's q/k/v (and the GEMM writing them) apart: loading such a
    checkpoint keeps its ranges and warns naming the quantizers, encodings.json does not claim
    shared_with for them, and QAT from it (--init) starts the group from the union of the ranges, said
    in the report."""
    data, ckpt = fmnist
    r = _recipe(ckpt, epochs=1, ranges="frozen")
    r["placement"] = {"family": "vit", "mode": "ft2"}
    r["quant"] = {"weights": {"bits": 8, "per_channel": False}, "activations": {"bits": 8}}
    run_qat(Recipe.model_validate(r), DataSpec(data, "train"), None, str(tmp_path / "o"),
            QATOptions(progress=False, max_steps=1))
    model = api.load(str(tmp_path / "o" / "ptq" / "model.qc.pt"))
    qs = api.quantizers(model)
    out_q = qs["blocks.0.attn.qkv.output_quantizer"]
    lo, hi = out_q.amin.clone(), out_q.amax.clone()
    out_q.set_range(lo * 0.5, hi * 0.5)  # its own, narrower range, as an old calibration gave it
    api.save(model, str(tmp_path / "old.qc.pt"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        old = api.load(str(tmp_path / "old.qc.pt"))
    said = [x.message for x in caplog.records if "calibrated with different ranges" in x.message]
    assert len(said) == 1 and "blocks.0.attn.qkv.output_quantizer" in said[0], said
    assert torch.equal(api.quantizers(old)["blocks.0.attn.qkv.output_quantizer"].amax, hi * 0.5)  # kept
    rows = {q["name"]: q for q in api.encodings(old)["quantizers"]}
    assert "shared_with" not in rows["blocks.0.attn.q_quantizer"]
    assert "shared_with" not in rows["blocks.0.attn.qkv.output_quantizer"]
    assert "blocks.1.attn.k_quantizer" in rows["blocks.1.attn.q_quantizer"]["shared_with"]
    rep = run_qat(Recipe.model_validate(r), DataSpec(data, "train"), None, str(tmp_path / "q"),
                  QATOptions(progress=False, init=str(tmp_path / "old.qc.pt"), max_steps=1))
    assert any("blocks.0.attn.qkv.output_quantizer" in w and "union" in w for w in rep["warnings"]), rep["warnings"]
    enc = {q["name"]: q for q in json.loads((tmp_path / "q" / "t_w4" / "encodings.json").read_text())["quantizers"]}
    qkv = [enc[f"blocks.0.attn.{x}_quantizer"]["amax"] for x in ("q", "k", "v", "qkv.output")]
    assert qkv[0] == qkv[1] == qkv[2] == qkv[3] == pytest.approx(float(hi.max()))
    assert "blocks.0.attn.qkv.output_quantizer" in enc["blocks.0.attn.q_quantizer"]["shared_with"]
    # its ptq/ start is unified: QAT from that one has nothing to say about the ranges
    rep = run_qat(Recipe.model_validate(r), DataSpec(data, "train"), None, str(tmp_path / "q2"),
                  QATOptions(progress=False, init=str(tmp_path / "q" / "ptq" / "model.qc.pt"), max_steps=1))
    assert not any("union" in w for w in rep["warnings"]), rep["warnings"]


def test_mistakes_are_refused_before_calibrating_and_runs_are_never_mixed(fmnist, tmp_path):
    import timm

    data, ckpt = fmnist
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        _run(fmnist, tmp_path / "afile", max_steps=1)
    torch.manual_seed(3)
    t_ck = tmp_path / "t.pt"
    torch.save(timm.create_model("resnet10t", in_chans=1, num_classes=7).state_dict(), t_ck)
    teacher = {"name": "resnet10t", "in_chans": 1, "num_classes": 7, "checkpoint": str(t_ck)}
    for qat, msg in (({"distill": {"kind": "kd", "teacher": teacher}}, "gives 7 logits, the student 10"),
                     ({"distill": {"kind": "kd", "teacher": {"name": "no_such_model_xyz", "checkpoint": str(t_ck)}}},
                      "qat.distill.teacher"),
                     ({"bn": "freeze", "bn_freeze_step": 2}, "no BatchNorm"),
                     ({"distill": {"kind": "deit_soft"}}, "distillation token")):
        out = tmp_path / msg.replace(" ", "_")
        with pytest.raises(UserError, match=msg):
            _run(fmnist, out, qat=qat, max_steps=1)
        assert not (out / "ptq").exists()  # refused before calibrating
    with pytest.raises(ValueError, match="betas"):
        Recipe.model_validate(_recipe(ckpt, optimizer={"name": "sgd", "betas": [0.9, 0.99]}))
    # a run, then another recipe into the same --out: refused, never resumed into
    out = tmp_path / "run"
    _run(fmnist, out, qat={"epochs": 1}, max_steps=4)
    with pytest.raises(UserError, match="optimizer.lr"):
        _run(fmnist, out, qat={"epochs": 1, "optimizer": {"name": "adamw", "lr": 5e-3}}, max_steps=4)
    # --no-resume discards the old checkpoints instead of keeping them above its own
    _run(fmnist, out, qat={"epochs": 1, "optimizer": {"name": "adamw", "lr": 5e-3}}, max_steps=2, resume=False)
    assert [s for s, _ in list_checkpoints(str(out))] == [2]
    # --init with a QAT-trained checkpoint: its float path is the trained weights, which would be taken for
    # the FP32 model (the teacher, the report's fp32 row) without a word; refused, pointing to the PTQ one
    trained = next(p for p in out.glob("*/model.qc.pt") if p.parent.name != "ptq")
    # (its advice once was "rerun it into its own --out with more qat.epochs", which resuming refuses)
    with pytest.raises(UserError, match=r"--init .*model\.qc\.pt: this checkpoint was trained by QAT.*ptq/model\.qc\.pt"
                                        r".*run QAT again from that start with more qat\.epochs into a new --out"):
        run_qat(Recipe.model_validate(_recipe(ckpt, epochs=1, optimizer={"name": "adamw", "lr": 5e-3})),
                DataSpec(data, "train"), None, str(tmp_path / "from_qat"),
                QATOptions(progress=False, init=str(trained), max_steps=1))
    assert not (tmp_path / "from_qat" / "ptq").exists()
    # --init with a checkpoint of other formats is refused
    # (naming each field with both values: the same recipe name on both sides read as a file compared to itself)
    with pytest.raises(UserError, match=r"another version of recipe 't_w4' with other settings \(quant\.weights\.bits: "
                                        r"4 in the checkpoint, 8 here\)"):
        r = _recipe(ckpt)
        r["quant"]["weights"]["bits"] = 8
        run_qat(Recipe.model_validate(r), DataSpec(data, "train"), None, str(tmp_path / "i"),
                QATOptions(progress=False, init=str(out / "ptq" / "model.qc.pt"), max_steps=1))


def test_no_resume_under_a_torchrun_restart_resumes_the_runs_own_checkpoints(fmnist, tmp_path, monkeypatch):
    from quantcore.qat import _discarded_by_this_run

    """torchrun restarts the ranks with the same arguments: --no-resume discarded the checkpoints the run
    itself had written and trained from step 0 again at every restart."""
    out = tmp_path / "run"
    qat = {"epochs": 1, "checkpoint_every": 2}
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    _run(fmnist, out, qat=qat, max_steps=4, resume=False)
    before = list_checkpoints(str(out))
    assert [s for s, _ in before] and before[0][0] == 4
    written = {uri: os.stat(uri).st_mtime_ns for _, uri in before}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    rep = _run(fmnist, out, qat=qat, max_steps=4, resume=False, eval_limit=20)
    assert rep["qat"]["steps"] == 4 and list_checkpoints(str(out)) == before  # resumed at step 4, nothing redone
    assert {uri: os.stat(uri).st_mtime_ns for _, uri in before} == written  # not deleted and written again
    # torchrun without --rdzv-id names every run "none": that names no run
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert not _discarded_by_this_run(str(out))
    # a restart of another run whose first start died before it discarded: these are not its checkpoints
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-b")
    _run(fmnist, out, qat=qat, max_steps=2, resume=False, eval_limit=20)
    assert [s for s, _ in list_checkpoints(str(out))] == [2]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # the first start of a new run: starts over
    _run(fmnist, out, qat=qat, max_steps=2, resume=False, eval_limit=20)
    assert [s for s, _ in list_checkpoints(str(out))] == [2]
    # without --rdzv-id ("none") a restart deleted the run's own checkpoints: the torchrun agent's launch
    # (its log folder, the same across its in-place restarts; else its process id) names the run then
    from quantcore.qat import _run_id

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", "/tmp/torchelastic_ab12/none_x9/attempt_0/1/error.json")
    first = _run_id()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", "/tmp/torchelastic_ab12/none_x9/attempt_3/0/error.json")
    assert _run_id() == first and "torchelastic_ab12/none_x9" in first
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", "/tmp/torchelastic_cd34/none_y1/attempt_0/0/error.json")
    assert _run_id() != first  # another launch
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    _run(fmnist, out, qat=qat, max_steps=4, resume=False, eval_limit=20)
    own = list_checkpoints(str(out))
    written = {uri: os.stat(uri).st_mtime_ns for _, uri in own}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    rep = _run(fmnist, out, qat=qat, max_steps=4, resume=False, eval_limit=20)
    assert rep["qat"]["steps"] == 4 and {uri: os.stat(uri).st_mtime_ns for _, uri in own} == written


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_adamw_range_steps_are_relative_to_each_calibrated_scale(name):
    """Adam's first step is lr * sign(grad) whatever the gradient (bias-corrected moments: m/sqrt(v) =
    sign(g)); scales span orders of magnitude, so under AdamW each scale must move by about range_lr
    times its own calibrated value (within the sqrt(2) bucket), zero points by range_lr x the grid
    width; under SGD range_lr stays an absolute rate."""
    from tiny_data import TINY_RECIPE

    from quantcore.qat import _optimizer, _param_groups, learnable_quantizers

    torch.manual_seed(0)
    recipe = Recipe.model_validate({**TINY_RECIPE, "quant": {"activations": {"symmetric": False}},
                                    "qat": {"optimizer": {"name": name, "lr": 1e-3, "range_lr": 1e-2}}})
    model = api.build_model(recipe, load_weights=False)
    api.prepare(model, recipe)
    x = torch.randn(8, 3, 32, 32)
    api.calibrate(model, [(x, None)])
    learnable_quantizers(model)
    qs = {n: q for n, q in api.quantizers(model).items() if q.scale is not None}
    scales = torch.stack([q.scale.detach().abs().mean() for q in qs.values()])
    assert scales.max() / scales.min() > 20  # the model's scales span orders of magnitude
    before = {n: (q.scale.detach().clone(), q.zero_point.detach().clone()) for n, q in qs.items()}
    opt = _optimizer(_param_groups(model, recipe.qat), recipe.qat)
    model.train()
    model(x).logsumexp(1).sum().backward()
    opt.step()
    for n, q in qs.items():
        s0, z0 = before[n]
        moved = (q.scale.detach() - s0).abs()
        if name == "sgd":
            continue
        # per-channel scales share their quantizer's rate: relative to the mean of its channels
        rel = moved.max() / s0.abs().mean()
        assert 1e-2 / 1.5 < rel < 1e-2 * 1.5, (n, rel)
        if q.zero_point.requires_grad and q.zero_point.grad is not None and q.zero_point.grad.abs().sum() > 0:
            qmin, qmax = q.spec.qrange()
            (lr_z,) = [g["lr"] for g in opt.param_groups if any(p is q.zero_point for p in g["params"])]
            assert lr_z == pytest.approx(1e-2 * (qmax - qmin))  # codes: the same share of every grid
            # |step| = lr * |g| / (|g| + eps): at most lr (less only for gradients near Adam's eps)
            assert 0 < (q.zero_point.detach() - z0).abs().max() <= lr_z * 1.0001
    if name == "sgd":  # one group for all ranges at the absolute rate
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == [1e-3, 1e-3, 1e-2] or lrs == [1e-3, 1e-2], lrs


def test_a_resume_does_not_depend_on_the_recipes_name():
    """An unnamed recipe file was stored as 'custom' before files were named after their stem, and a
    chart's inline recipe key can be renamed between a preemption and the retry: the name changes no
    trained value, so the resume goes on (helper-130); a changed setting is still refused."""
    from quantcore import load_recipe
    from quantcore.checkpoint import CheckpointError
    from quantcore.qat import _check_same_run

    base = {"model": {"name": "quantcore/vit_fmnist"}, "qat": {"epochs": 1}}
    stored = json.dumps(load_recipe({**base, "name": "custom"}).model_dump(mode="json"))
    _check_same_run(stored, load_recipe({**base, "name": "my_qat", "description": "x"}), "o")
    with pytest.raises(CheckpointError, match="qat.epochs"):
        _check_same_run(stored, load_recipe({**base, "name": "my_qat", "qat": {"epochs": 2}}), "o")


def test_resume_refuses_other_data_or_rank_count(fmnist, tmp_path):
    """A resume continues the stored data position and RNG streams: on another split, dataset or rank
    count it would mix two runs silently, so it is refused naming what changed."""
    from quantcore.qat import _check_same_data

    data, ckpt = fmnist
    out = tmp_path / "run"
    _run(fmnist, out, qat={"epochs": 1}, max_steps=4)
    r = Recipe.model_validate(_recipe(ckpt, epochs=1))
    with pytest.raises(UserError, match="other data.*split 'train' -> 'test'"):
        run_qat(r, DataSpec(data, "test"), None, str(out), QATOptions(progress=False, max_steps=4))
    state = decode_train_state(Path(list_checkpoints(str(out))[0][1]).read_bytes(), "x")
    assert state["data"]["split"] == "train" and state["world_size"] == 1
    with pytest.raises(UserError, match="written by 2 rank.*this run has 1"):
        _check_same_data({**state, "world_size": 2}, state["data"], 1, "ck")
    _check_same_data(state, state["data"], 1, "ck")  # the same data and ranks resume
    # a missing evaluation split is refused before calibrating
    with pytest.raises(UserError, match="val"):
        run_qat(r, DataSpec(data, "train"), DataSpec(data, "val"), str(tmp_path / "v"),
                QATOptions(progress=False, max_steps=1))
    assert not (tmp_path / "v" / "ptq").exists()
    # --init and --checkpoint together: one would be ignored
    with pytest.raises(UserError, match="--init.*--checkpoint.*give one"):
        run_qat(r, DataSpec(data, "train"), None, str(tmp_path / "i"),
                QATOptions(progress=False, init=str(out / "ptq" / "model.qc.pt"), checkpoint=ckpt, max_steps=1))


def test_corrupt_newer_checkpoints_never_push_out_a_fresh_one(fmnist, tmp_path, caplog):
    """Files that did not verify (higher steps of a damaged earlier run, and a damaged lower one) stay,
    are skipped, and do not count against keep_checkpoints: the checkpoint just written survives and
    the rerun resumes from it; a corrupt file at a step the run writes again is replaced."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for s in (1, 4, 120, 131):
        (out / "checkpoints" / f"step-{s:09d}.pt").write_bytes(b"x" * 100)
    _run(fmnist, out, qat={"epochs": 1, "keep_checkpoints": 1}, max_steps=8)
    steps = [s for s, _ in list_checkpoints(str(out))]
    # 4 rewritten then pruned (keep 1), 8 kept, the corrupt ones (1: lower, never rewritten) left to see
    assert steps == [131, 120, 8, 1]
    caplog.clear()  # the run itself skipped them at its start too
    with caplog.at_level(logging.WARNING):
        uri, state = latest_checkpoint(str(out))
    assert state["step"] == 8 and uri.endswith("step-000000008.pt")
    assert sum("skipping training checkpoint" in r.message for r in caplog.records) == 2


def test_the_loss_logged_after_a_resume_is_the_uninterrupted_runs(fmnist, tmp_path):
    """The log window (loss summed since the last log line) travels in the checkpoint."""
    import shutil

    qat = {"epochs": 1, "checkpoint_every": 2, "log_every": 3, "keep_checkpoints": 5}
    full = tmp_path / "full"
    _run(fmnist, full, qat=qat, max_steps=6)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "checkpoints" / "step-000000006.pt").unlink()  # as if stopped after step 4
    rep = _run(fmnist, part, qat=qat, max_steps=6)
    lines = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    losses = [(m["step"], m["loss"]) for m in lines if "loss" in m]
    assert losses == [(m["step"], m["loss"]) for m in ref if "loss" in m] and losses[-1][0] == 6
    st4 = decode_train_state((part / "checkpoints" / "step-000000004.pt").read_bytes(), "x")
    assert 0 < st4["train_s"] <= rep["qat"]["train_s"]  # training time adds up over invocations


def test_resume_refuses_an_optimizer_state_of_other_parameter_groups(fmnist, tmp_path):
    """A checkpoint whose optimizer groups are not this run's (an older quantcore grouped the ranges
    otherwise) is refused naming the file, whether the group count, the members or the recorded layout
    differs; a checkpoint from before the layout was recorded still resumes when its groups fit."""
    import shutil

    qat = {"epochs": 1, "checkpoint_every": 2, "keep_checkpoints": 5}
    full = tmp_path / "full"
    _run(fmnist, full, qat=qat, max_steps=6)
    ck4 = "step-000000004.pt"
    good = decode_train_state((full / "checkpoints" / ck4).read_bytes(), "x")
    assert len(good["param_groups"]) == len(good["optimizer"]["param_groups"]) >= 3

    def resume_with(state: dict, name: str):
        part = tmp_path / name
        shutil.copytree(full, part)
        (part / "checkpoints" / "step-000000006.pt").unlink()
        (part / "checkpoints" / ck4).write_bytes(encode_train_state(state))
        return part, lambda: _run(fmnist, part, qat=qat, max_steps=6)

    def old(state: dict) -> dict:  # as written before the layout was recorded
        return {k: v for k, v in state.items() if k != "param_groups"}

    layout = [list(g) for g in good["param_groups"]]
    layout[0], layout[1] = layout[1], layout[0]
    _, go = resume_with({**good, "param_groups": layout}, "layout")
    with pytest.raises(UserError, match=f"{ck4}.*parameter groups differ"):
        go()
    opt = good["optimizer"]
    merged = {**opt, "param_groups": [{**opt["param_groups"][0],
                                       "params": [i for g in opt["param_groups"] for i in g["params"]]}]}
    _, go = resume_with({**old(good), "optimizer": merged}, "merged")
    with pytest.raises(UserError, match=f"{ck4}.*older quantcore.*--no-resume"):
        go()
    groups = [dict(g, params=list(g["params"])) for g in opt["param_groups"]]
    groups[0]["params"][0], groups[1]["params"][0] = groups[1]["params"][0], groups[0]["params"][0]
    _, go = resume_with({**old(good), "optimizer": {**opt, "param_groups": groups}}, "moved")
    with pytest.raises(UserError, match=f"{ck4}.*older quantcore"):
        go()
    part, go = resume_with(old(good), "fits")
    go()
    _assert_same_weights(_state(full / "t_w4" / "model.qc.pt"), _state(part / "t_w4" / "model.qc.pt"))


def _folder_split(root: Path, split: str, n: int, start: int, classes: int = 10, truncated: bool = False) -> None:
    """``n`` Fashion-MNIST images as PNG files in class folders (plus one truncated PNG)."""
    from PIL import Image

    x, y = load_fashion_mnist()["train"]
    for i in range(start, start + n):
        d = root / split / f"c{int(y[i]) % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{i:05d}.png")
    if truncated:
        good = next((root / split).glob("*/*.png")).read_bytes()
        (root / split / "c0" / "zz_trunc.png").write_bytes(good[:len(good) // 3])


def test_qat_options_that_cannot_act_are_refused(fmnist, tmp_path):
    """Recipe options the loop would ignore are refused naming the field; ranges: learned on a model
    whose formats have no learnable range is refused before calibrating; an evaluation split with
    another class count than the model's logits is refused before calibrating, not after an epoch."""
    data, ckpt = fmnist
    for qat, msg in (({"optimizer": {"name": "sgd", "momentum": 0.0, "nesterov": True}}, "nesterov"),
                     ({"ranges": "frozen", "learn_zero_point": False}, "learn_zero_point"),
                     ({"distill": {"kind": "kd", "alpha": 0.0, "temperature": 5.0}}, "distill.alpha: 0"),
                     ({"distill": {"kind": "logit_mse", "alpha": 1.0}, "label_smoothing": 0.3}, "label_smoothing")):
        with pytest.raises(ValueError, match=msg):
            Recipe.model_validate(_recipe(ckpt, **qat))
    Recipe.model_validate(_recipe(ckpt, distill={"kind": "logit_mse", "alpha": 0.5}, label_smoothing=0.1))
    r = _recipe(ckpt)
    r["quant"] = {"weights": {"format": "fp16"}, "activations": {"format": "fp16"}}
    r["calibration"] = {"num_batches": 2, "batch_size": 32}  # casts: no calibrator to name
    r["overrides"] = []
    with pytest.raises(UserError, match="qat.ranges: learned.*set qat.ranges: frozen"):
        run_qat(Recipe.model_validate(r), DataSpec(data, "train"), None, str(tmp_path / "f"),
                QATOptions(progress=False, max_steps=1))
    assert not (tmp_path / "f" / "ptq").exists()
    two = tmp_path / "two"
    _folder_split(two, "val", 8, 0, classes=2)
    with pytest.raises(UserError, match="gives 10 logits.*has 2 classes"):
        run_qat(Recipe.model_validate(_recipe(ckpt)), DataSpec(data, "train"), DataSpec(str(two), "val"),
                str(tmp_path / "c"), QATOptions(progress=False, max_steps=1))
    assert not (tmp_path / "c" / "ptq").exists()


def test_resume_refuses_another_start_or_changed_samples_and_reports_skipped_images(fmnist, tmp_path):
    """A resume must start from the same --init / FP32 weights and the same samples (added images
    under the same URI change the epoch order and schedule); bad training and calibration images are
    listed in the report and do not dilute the loss; validation at an epoch end runs once; a rerun of
    a finished run reports the same epochs."""
    data, ckpt = fmnist
    folder = tmp_path / "folder"
    _folder_split(folder, "train", 63, 0, truncated=True)
    _folder_split(folder, "test", 60, 100)
    r = Recipe.model_validate(_recipe(ckpt, epochs=2, batch_size=16, eval_every=4, eval_limit=20))
    out = tmp_path / "run"
    train = DataSpec(str(folder), "train", skip_bad=True)
    rep = run_qat(r, train, DataSpec(str(folder), "test"), str(out), QATOptions(progress=False))
    names = [s["name"] for s in rep["skipped"]]
    assert any("zz_trunc.png" in n for n in names), rep["skipped"]
    assert rep["qat"]["epochs_done"] == 2 and rep["qat"]["steps"] == 8  # 63 good of 64 / 16 per step
    vals = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_top1" in m]
    assert len(vals) == len(set(vals)), vals  # step 4 ends epoch 1: validated once
    # a rerun into the finished run's --out resumes from the final checkpoint: same epochs reported
    again = run_qat(r, train, DataSpec(str(folder), "test"), str(out), QATOptions(progress=False))
    assert again["qat"]["epochs_done"] == rep["qat"]["epochs_done"]
    # another --init than the run was started from (here: none) is refused
    out2 = tmp_path / "init"
    run_qat(r, train, None, str(out2), QATOptions(progress=False, init=str(out / "ptq" / "model.qc.pt"),
                                                 max_steps=2))
    with pytest.raises(UserError, match="started from --init"):
        run_qat(r, train, None, str(out2), QATOptions(progress=False, max_steps=2))
    # images added under the same URI: another run
    out3 = tmp_path / "grow"
    run_qat(r, train, None, str(out3), QATOptions(progress=False, max_steps=2))
    _folder_split(folder, "train", 5, 200)
    with pytest.raises(UserError, match="other data.*samples 64 -> 69"):
        run_qat(r, train, None, str(out3), QATOptions(progress=False, max_steps=2))


def test_a_skipped_training_image_does_not_dilute_the_step(fmnist, tmp_path):
    """With --skip-bad, a step whose batch lost an image to a decode error averages the loss over the
    images it really has: one SGD step on 39 good + 1 truncated image moves the weights exactly as one
    step on the same 39 good images alone (not by 39/40 of it, as dividing by the batch would)."""
    data, ckpt = fmnist
    qat = dict(epochs=1, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.0}, schedule={"name": "constant"},
               augment={"kind": "none"}, ranges="frozen", checkpoint_every=100)
    deltas = []
    for name, truncated, batch in (("with_bad", True, 40), ("good_only", False, 39)):
        folder = tmp_path / name
        _folder_split(folder, "train", 39, 0, truncated=truncated)
        (folder / "train" / "c1" / "notes.txt").write_text("not a sample")
        r = Recipe.model_validate(_recipe(ckpt, batch_size=batch, **qat))
        out = tmp_path / f"out_{name}"
        rep = run_qat(r, DataSpec(str(folder), "train", skip_bad=True), None, str(out), QATOptions(progress=False))
        assert rep["qat"]["steps"] == 1
        if truncated:
            assert any("zz_trunc.png" in s["name"] for s in rep["skipped"]), rep["skipped"]
            # a file that is not a sample is listed in the report, not only logged
            assert [Path(f).name for f in rep["data"]["train_unused_files"]] == ["notes.txt"]
            assert any(w.startswith("training data: 1 file(s)") for w in rep["warnings"]), rep["warnings"]
        before, after = _state(out / "ptq" / "model.qc.pt"), _state(out / "t_w4" / "model.qc.pt")
        keys = [k for k in before if k.endswith(".weight") and before[k].is_floating_point()]
        deltas.append(torch.cat([(after[k] - before[k]).flatten().double() for k in keys]))
    a, b = deltas
    assert b.abs().max() > 0, "the step did not move the weights"
    ratio = float(a.dot(b) / b.dot(b))
    assert abs(ratio - 1.0) < 1e-3, f"step with a skipped image = {ratio:.4f} x the good-only step (39/40 = 0.975)"
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("distill", ["kd", "none"])
def test_a_hugging_face_model_trains_under_qat(tmp_path, distill):
    """A Hugging Face classifier returns a ModelOutput, not a tensor: the student's loss takes its
    logits as the teacher's does (it crashed at step 1, after calibration), for every loss kind."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=10)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "hf")
    transformers.ViTImageProcessor(image_mean=[0.5], image_std=[0.5], size={"height": 28, "width": 28}
                                   ).save_pretrained(tmp_path / "hf")
    folder = tmp_path / "d"
    _folder_split(folder, "train", 40, 0)
    r = Recipe.model_validate({
        "name": "hf_w8", "model": {"name": str(tmp_path / "hf")}, "placement": {"family": "vit"},
        "calibration": {"method": "max", "num_batches": 1, "batch_size": 8},
        "qat": {"epochs": 1, "max_steps": 2, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 1e-4},
                "distill": {"kind": distill}, "num_workers": 0, "log_every": 1}})
    rep = run_qat(r, DataSpec(str(folder), "train"), DataSpec(str(folder), "train"), str(tmp_path / "o"),
                  QATOptions(progress=False))
    assert rep["qat"]["steps"] == 2 and {"fp32", "hf_w8:ptq", "hf_w8"} <= set(rep["results"])
    losses = [m["loss"] for m in map(json.loads, (tmp_path / "o" / "metrics.jsonl").read_text().splitlines())
              if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    # FP32 training (quantcore train, the demo's step) takes a Hugging Face model's logits too
    from quantcore.config import TrainConfig
    from quantcore.train import train_classifier

    hf = transformers.ViTForImageClassification(cfg)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    res = train_classifier(hf, lambda e: [(x, y)], 1, TrainConfig(epochs=1, batch_size=8, lr=1e-3))
    assert res.steps == 1 and math.isfinite(res.final_loss)


def _bn_train_rank(rank: int, recipe: dict, data: str, out: str) -> None:
    run_qat(Recipe.model_validate(recipe), DataSpec(data, "train"), DataSpec(data, "test"), out,
            QATOptions(progress=False, max_steps=3, eval_batch_size=32))


def test_bn_train_on_two_ranks_reports_the_model_it_saves(fmnist, tmp_path):
    """bn: train under DDP: after the last step each rank holds its own BatchNorm statistics; the
    sharded final evaluation must score the model rank 0 saves (it scored each shard with another
    one). Checked by evaluating the saved checkpoint in one process on the same images."""
    import timm

    from quantcore.data import eval_transform, make_loader, open_dataset
    from quantcore.evaluate import evaluate_models
    from test_distributed_ptq import run_ranks

    data, _ = fmnist
    recipe = _cnn_recipe(tmp_path, 3, "cnn_bn", bn="train", optimizer={"name": "sgd", "lr": 0.05})
    ck, small = recipe["model"]["checkpoint"], recipe["model"]["kwargs"]
    out = tmp_path / "o"
    run_ranks(_bn_train_rank, recipe, data, str(out), start_method="spawn")  # the ranks run backward
    rep = json.loads((out / "report.json").read_text())
    model = api.load(str(out / "cnn_bn" / "model.qc.pt")).eval()
    fp32 = timm.create_model("resnet10t", in_chans=1, num_classes=10, **small)
    fp32.load_state_dict(torch.load(ck, weights_only=True))
    fp32.eval()
    ds = open_dataset(data, "test", eval_transform(fp32))
    with torch.no_grad():
        scores = evaluate_models({"fp32": fp32, "cnn_bn": model}, make_loader(ds, 32, 0), ds.num_classes,
                                 reference="fp32")
    got, want = rep["results"]["cnn_bn"], scores["cnn_bn"]
    assert got["count"] == want.count == N_TEST
    assert got["sqnr_db"] == pytest.approx(want.sqnr_db, rel=1e-9) and got["top1"] == want.top1, (got, want)


def test_bn_left_after_folding_is_what_placement_leaves():
    """qat.bn: train/freeze with fold_bn: true is refused only when folding leaves no BatchNorm: one
    after a Linear (or a concat) cannot be folded and is still trained."""
    import timm

    from quantcore.qat import _bn_left_after_folding

    class LinearBN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.bn2d = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4, 8)
            self.bn1d = torch.nn.BatchNorm1d(8)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.bn1d(self.fc(self.bn2d(self.conv(x)).mean((2, 3)))))

    assert _bn_left_after_folding(LinearBN().eval())
    assert not _bn_left_after_folding(timm.create_model("resnet10t", in_chans=1, num_classes=10).eval())


@pytest.mark.parametrize("optimizer, key, want", [({"name": "sgd", "lr": 1e-3, "momentum": 0.0}, "momentum", 0.0),
                                                  ({"name": "sgd", "lr": 1e-3, "momentum": 0.5}, "momentum", 0.5),
                                                  ({"name": "adamw", "lr": 1e-3, "betas": [0.5, 0.99]}, "betas",
                                                   (0.5, 0.99))])
def test_onecycle_schedules_the_learning_rate_and_keeps_the_recipes_momentum(optimizer, key, want):
    """torch's OneCycleLR cycles momentum/beta1 over 0.85-0.95 by default: momentum: 0 ran SGD at 0.95."""
    from tiny_data import TINY_RECIPE

    from quantcore.qat import _optimizer, _param_groups, _scheduler

    recipe = Recipe.model_validate({**TINY_RECIPE, "qat": {"optimizer": optimizer, "schedule": {"name": "onecycle"}}})
    model = api.prepare(api.build_model(recipe, load_weights=False), recipe)
    api.calibrate(model, [(torch.randn(4, 3, 32, 32), None)])
    opt = _optimizer(_param_groups(model, recipe.qat), recipe.qat)
    sched = _scheduler(opt, recipe.qat, 10)
    lrs = []
    for _ in range(8):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        got = opt.param_groups[0][key]
        assert (tuple(got) if key == "betas" else got) == pytest.approx(want)
    assert max(lrs) > 10 * min(lrs)  # the learning rate does follow the cycle


def test_three_rank_resume_ends_bit_identical(fmnist, tmp_path):
    """With 3+ ranks a ring all-reduce adds each gradient element in an order set by DDP's bucket layout,
    which a restarted process builds anew: a resumed run's weights differed in the last bits (2 ranks
    hide it: a + b either way). Run B holds run A's PTQ start and its step-3 checkpoint, as if A had
    died after writing it; B resumes by itself and must end with A's weights, bit for bit."""
    import shutil

    data, ckpt = fmnist
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(ckpt, checkpoint_every=3, epochs=1, batch_size=16,
                                             keep_checkpoints=10)))

    def run(out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
               "-m", "quantcore.cli", "qat", "-r", str(recipe), "-d", data, "--eval-split", "test",
               "-o", str(out), "--no-progress", "--eval-limit", "30"]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    a, b = tmp_path / "A", tmp_path / "B"
    run(a)
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "ptq", b / "ptq")
    shutil.copy(a / "checkpoints" / "step-000000003.pt", b / "checkpoints")
    assert "resuming from" in run(b)
    _assert_same_weights(_state(a / "t_w4" / "model.qc.pt"), _state(b / "t_w4" / "model.qc.pt"))


def _in_fresh_python(fn: str, *args: str) -> None:
    """Run ``tests/test_qat.<fn>(*args)`` in a new Python process. A compiled backward starts autograd's
    device threads in the process that runs it, and a fork-based test later on the same xdist worker
    (``run_ranks`` in test_recon/test_distributed_ptq) then cannot run backward in its ranks ("Unable to
    handle autograd's threading in combination with fork-based multiprocessing"; seen in the suite)."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_qat; test_qat.{fn}(*{args!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]


def test_compiled_training_step_trains_like_the_eager_one(tmp_path):
    """``qat.compile: true`` runs the training forward/backward under torch.compile (the fake-quant ops
    fused): the same steps as the eager loop to float rounding (learned ranges, asymmetric zero points
    too), a checkpoint with the unwrapped model's names that loads back. (In a fresh process.)"""
    _in_fresh_python("_compiled_vs_eager", str(tmp_path))


def _compiled_vs_eager(tmp: str) -> None:
    tmp_path = Path(tmp)
    from tiny_data import TINY_RECIPE, make_images

    data = make_images(tmp_path / "imgs", splits=(("train", 8),))
    torch.manual_seed(0)
    weights = tmp_path / "fp32.pt"
    torch.save(api.build_model(Recipe.model_validate(TINY_RECIPE)).state_dict(), weights)
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    import quantcore.qat as qat_mod

    made = []
    real = qat_mod.compile_for_training

    def spy(net):
        made.append(real(net))
        return made[-1]

    graphs = {}
    for compiled in (False, True):
        counters.clear()
        r = Recipe.model_validate({
            **TINY_RECIPE, "model": {**TINY_RECIPE["model"], "checkpoint": str(weights)},
            "quant": {"activations": {"symmetric": False}},
            "calibration": {"method": "max", "num_batches": 2, "batch_size": 4},
            # AdamW bounds each step by ~lr; SGD (lr 0.05) let LSQ's scale gradient, which jumps where a rounding
            # flips, move a weight range 7% apart
            "qat": {"epochs": 1, "batch_size": 4, "ranges": "learned", "optimizer": {"name": "adamw", "lr": 1e-3},
                    "augment": {"kind": "none"}, "num_workers": 0, "compile": compiled}})
        out = tmp_path / f"o{int(compiled)}"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(qat_mod, "compile_for_training", spy)
            run_qat(r, DataSpec(str(data), "train"), None, str(out), QATOptions(progress=False, max_steps=4, device="cpu"))
        graphs[compiled] = counters["stats"]["unique_graphs"]
    # the training model was compiled (the compiler probe's own function is one more graph) and only then
    assert len(made) == 1 and isinstance(made[0], OptimizedModule) and graphs[False] == 0 and graphs[True] >= 2
    fp32 = torch.load(weights, weights_only=True)
    eager, comp = (api.load(str(tmp_path / f"o{i}" / "tiny_w8a8" / "model.qc.pt")).state_dict() for i in (0, 1))
    assert eager.keys() == comp.keys() and not any("_orig_mod" in k for k in comp)
    trained = [k for k in fp32 if not torch.equal(fp32[k], eager[k])]
    assert len(trained) > len(fp32) // 2  # the steps moved the weights ...
    for k in eager:
        if eager[k].is_floating_point():  # ... and the compiled loop moved them the same way
            torch.testing.assert_close(comp[k], eager[k], rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_compiled_training_keeps_float_format_rounding(fmt):
    """``qat.compile`` must train the model that is deployed: Inductor elides a float32 -> fp16/bf16 ->
    float32 round trip unless told to keep it, and that round trip is all an FP16/BF16 quantizer does, so
    the compiled model would silently compute in FP32. (In a fresh process.)"""
    _in_fresh_python("_float_rounding_compiled", fmt)


def _float_rounding_compiled(fmt: str) -> None:
    from tiny_data import TINY_RECIPE

    from quantcore.qat import compile_for_training

    torch.manual_seed(0)
    r = Recipe.model_validate({**TINY_RECIPE, "quant": {"weights": {"format": fmt}, "activations": {"format": fmt}},
                               "calibration": {"num_batches": 2, "batch_size": 4}})  # casts: no calibrator
    model = api.prepare(api.build_model(r), r).train()
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)  # with autograd, as the training step runs it
    with api.quantization_disabled(model):
        fp32 = model(x)
    torch._dynamo.reset()
    try:
        compiled = compile_for_training(model)(x)
        compiled.sum().backward()  # the training graph, backward included, compiles and runs
    finally:
        torch._dynamo.reset()  # no compiled code left for later tests
    assert not torch.equal(eager, fp32)  # the casts round
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)  # ... compiled too (FP32: ~1e-4 off)


def test_compile_refused_before_calibration_where_it_cannot_build(tmp_path, monkeypatch):
    """``qat.compile: true`` on a machine where torch.compile cannot build code (seen: no C++ compiler,
    Inductor's InvalidCxxCompiler at the first training step, after calibration, exit 1) is a user error
    naming the field, raised before anything is calibrated or written."""
    from tiny_data import TINY_RECIPE, make_images

    data = make_images(tmp_path / "imgs", splits=(("train", 4),))

    def broken(*args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in\ntorch._inductor.config.cpp.cxx")
        return run

    monkeypatch.setattr(torch, "compile", broken)

    def calibrate(*a, **k):
        raise AssertionError("calibrated before the compiler was checked")

    monkeypatch.setattr(api, "calibrate", calibrate)
    r = Recipe.model_validate({**TINY_RECIPE, "qat": {"epochs": 1, "batch_size": 4, "augment": {"kind": "none"},
                                                       "num_workers": 0, "compile": True}})
    with pytest.raises(UserError, match=r"qat\.compile: true, but torch\.compile cannot build code.*InvalidCxxCompiler"):
        run_qat(r, DataSpec(str(data), "train"), None, str(tmp_path / "o"), QATOptions(progress=False, device="cpu"))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.pt"))


def test_quantizers_go_to_their_holders_device():
    """prepare() builds quantizers on the CPU; each then goes to its holder's device: the nearest
    parameter or buffer, its own or its descendants' (quantizers at any depth skipped, they are still on
    the CPU), else its parent's. ``meta`` stands in for a GPU, two parts of a split model for two GPUs."""
    from quantcore.api import _quantizers_to_host_devices
    from quantcore.formats import QuantSpec
    from quantcore.quantizer import TensorQuantizer

    def q() -> TensorQuantizer:
        return TensorQuantizer(QuantSpec())

    class Holder(torch.nn.Module):  # no parameters of its own; first child quantized but parameter-free
        def __init__(self, device):
            super().__init__()
            self.act = torch.nn.Sequential(torch.nn.GELU())
            self.act.output_quantizer = q()
            self.fc = torch.nn.Linear(2, 2, device=device)
            self.add_quantizer = q()

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Holder("meta"), torch.nn.Sequential(torch.nn.ReLU()))
    model[2].relu_quantizer = q()  # no device below it: its parent's (the model's, cpu)
    _quantizers_to_host_devices(model)
    got = {n: m.amax.device.type for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    assert got == {"1.act.output_quantizer": "meta", "1.add_quantizer": "meta", "2.relu_quantizer": "cpu"}, got


def test_learned_ranges_say_which_quantizers_keep_their_calibrated_range(fmnist, tmp_path):
    """qat.ranges: learned with run-time-scaled (int_dynamic) or twin_int activations: the weights learn
    their ranges, those quantizers cannot; the report said '16 learned ranges' and nothing about the 32
    others. The warning names the formats; a recipe where no format can learn names int_dynamic too."""
    data, ckpt = fmnist
    r = _recipe(ckpt, epochs=1)
    r["quant"]["activations"] = {"format": "int_dynamic", "bits": 4, "symmetric": False, "block_size": 16}
    r["calibration"]["method"] = "max"
    r["overrides"] = [{"match": "blocks.*.attn.attn_quantizer", "spec": {"format": "twin_int", "calibrator": "mse"}}]
    rep = run_qat(Recipe.model_validate(r), DataSpec(data, "train"), None, str(tmp_path / "o"),
                  QATOptions(progress=False, max_steps=2))
    model = api.load(str(tmp_path / "o" / "t_w4" / "model.qc.pt"))
    qs = api.quantizers(model)
    weights = [n for n, q in qs.items() if q.kind == "weight" and q.spec.on_grid]
    assert rep["qat"]["learned_quantizers"] == len(weights)
    warned = " ".join(rep["warnings"])
    for fmt in ("int_dynamic", "twin_int"):
        n = sum(q.spec.format == fmt for q in qs.values())
        assert n and f"{n} quantizer(s) of format {fmt!r} have no learnable range" in warned, warned
    r["quant"]["weights"] = {"format": "fp16"}
    with pytest.raises(UserError, match=r"none of its formats has a learnable range \(formats [^)]*int_dynamic"):
        run_qat(Recipe.model_validate(r), DataSpec(data, "train"), None, str(tmp_path / "p"),
                QATOptions(progress=False, max_steps=2))


@pytest.mark.parametrize("batch_size", [1, N_TRAIN - 1])
def test_bn_train_with_a_one_image_step_is_refused_before_training(fmnist, tmp_path, batch_size):
    """qat.bn: train on 3 ranks with 101 images split the last global batch 2/2/1: the rank with one
    image crashed in training-mode BatchNorm (1x1 input: one value per channel) with a traceback and
    exit 1, which every launcher retry repeated. Refused now, naming the layer; bn: freeze from step 0
    never trains the statistics and runs."""
    data, _ = fmnist
    recipe = _cnn_recipe(tmp_path, 3, "cnn_one", bn="train", batch_size=batch_size)
    with pytest.raises(UserError, match=r"qat\.bn: train trains BatchNorm statistics, but .*'layer4\.0\.bn\d'.* one "
                                        r"value per channel"):
        run_qat(Recipe.model_validate(recipe), DataSpec(data, "train"), None, str(tmp_path / "o"),
                QATOptions(progress=False, max_steps=2))
    frozen = _cnn_recipe(tmp_path, 3, "cnn_one", bn="freeze", bn_freeze_step=0, batch_size=batch_size)
    run_qat(Recipe.model_validate(frozen), DataSpec(data, "train"), None, str(tmp_path / "f"),
            QATOptions(progress=False, max_steps=1))
    if batch_size > 1:  # qat.max_steps ends the run before the short last batch: nothing to refuse
        run_qat(Recipe.model_validate(recipe), DataSpec(data, "train"), None, str(tmp_path / "m"),
                QATOptions(progress=False, max_steps=1))


def test_a_resume_after_the_students_preprocessing_changed_is_refused():
    """A resumed run re-read the student's data config (an edited HF preprocessor_config.json): its
    training kept the stored transform but the final evaluation used the new one, so report.json
    described other inputs than the run trained on (PTQ SQNR 37.55 -> 39.85 dB), with no warning."""
    import timm

    from quantcore.checkpoint import CheckpointError
    from quantcore.qat import _check_same_start, _start_identity

    m = timm.create_model("resnet10t", num_classes=3, pretrained_cfg_overlay={"mean": (0.5,) * 3, "std": (0.25,) * 3})
    stored = {"start": _start_identity(None, m)}
    assert stored["start"]["student_inputs"]["mean"] == [0.5] * 3
    _check_same_start(stored, _start_identity(None, m), "ckpt")  # unchanged: resumes
    m.pretrained_cfg = {**m.pretrained_cfg, "mean": (0.4, 0.4, 0.4)}
    with pytest.raises(CheckpointError, match=r"read its images otherwise \(mean \[0\.5, 0\.5, 0\.5\] -> \[0\.4"):
        _check_same_start(stored, _start_identity(None, m), "ckpt")
    _check_same_start({"start": {k: v for k, v in stored["start"].items() if k != "student_inputs"}},
                      _start_identity(None, m), "ckpt")  # a checkpoint from before the record: not compared


def test_a_checkpoint_write_killed_midway_leaves_no_temp_file_after_the_restart(fmnist, tmp_path):
    """A kill during a checkpoint write left its half-written .qctmp file (29 MB in the report) under
    checkpoints/ for good: the restarted run now removes it before resuming, and keeps the rest."""
    out = tmp_path / "run"
    qat = {"epochs": 1, "checkpoint_every": 2}
    _run(fmnist, out, qat=qat, max_steps=4, eval_limit=20)
    before = list_checkpoints(str(out))
    stale = out / "checkpoints" / ".step-000000006.pt.1234abcd.qctmp"
    stale.write_bytes(b"\0" * 1000)
    rep = _run(fmnist, out, qat=qat, max_steps=4, eval_limit=20)
    assert rep["qat"]["steps"] == 4 and not stale.exists() and list_checkpoints(str(out)) == before


def test_a_second_run_on_the_same_out_stops_the_first_before_it_writes(fmnist, tmp_path, monkeypatch):
    """Two runs given one --out: the later one overwrote and pruned the earlier one's checkpoints and its
    results replaced the other's, both exiting 0. A run now claims --out at each start and checks the
    claim before every checkpoint and its results; a resumed or restarted run claims it again."""
    from types import SimpleNamespace

    import quantcore.qat as qat_mod

    out = tmp_path / "run"
    real = qat_mod._write_metrics
    taken = []

    def another_run_starts(uri, metrics):  # after this run's first checkpoint, another run claims --out
        real(uri, metrics)
        if not taken:
            with monkeypatch.context() as env:
                env.setenv("TORCHELASTIC_RUN_ID", "run-b")
                taken.append(qat_mod._claim_out(str(out), SimpleNamespace(is_main=True)))

    monkeypatch.setattr(qat_mod, "_write_metrics", another_run_starts)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(UserError, match=r"another run started writing here after this one .*Give each run its own"):
        _run(fmnist, out, qat={"epochs": 1, "checkpoint_every": 2}, max_steps=6, eval_limit=20)
    assert [s for s, _ in list_checkpoints(str(out))] == [2]  # its step-4 checkpoint was not written
    assert not (out / "t_w4").exists()  # nor its results
    monkeypatch.setattr(qat_mod, "_write_metrics", real)
    assert taken == ["run-b"] and qat_mod._claims(str(out)) == ["run-a", "run-b"]
    # an in-place torchrun restart of the first run does not take --out back from the one that claimed it
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(UserError, match="another run started writing here after this one"):
        _run(fmnist, out, qat={"epochs": 1, "checkpoint_every": 2}, max_steps=6, eval_limit=20)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a new start of it claims it and resumes
    rep = _run(fmnist, out, qat={"epochs": 1, "checkpoint_every": 2}, max_steps=6, eval_limit=20)
    assert rep["qat"]["steps"] == 6
    # a start refused by a check (another recipe) leaves the claim to the run that holds it
    holder = qat_mod._owner_of(str(out))
    with pytest.raises(UserError, match="recipe differs in qat.epochs"):
        _run(fmnist, out, qat={"epochs": 2, "checkpoint_every": 2}, max_steps=6, eval_limit=20)
    assert qat_mod._owner_of(str(out)) == holder
    # a start refused after calibrating (here: learn_zero_point with only symmetric learned ranges) wrote its
    # calibrated model over the holder's ptq/model.qc.pt, which the holder's resume then loaded, and with
    # --no-resume it deleted the holder's checkpoints first (helper-146): it now writes and deletes nothing
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    sym = {"epochs": 1, "checkpoint_every": 2, "learn_zero_point": False}
    data, ckpt = fmnist
    r = _recipe(ckpt, **sym)
    r["overrides"] = []  # every quantizer symmetric
    with pytest.raises(UserError, match="learn_zero_point: false, but every quantizer"):
        run_qat(Recipe.model_validate(r), DataSpec(data, "train"), DataSpec(data, "test"), str(out),
                QATOptions(progress=False, max_steps=6, eval_limit=20, resume=False))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
