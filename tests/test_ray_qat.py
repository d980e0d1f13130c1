"""``jobs.ray_qat`` (Ray Train QAT entrypoint): argument and recipe errors exit 2 before Ray starts,
worker failures map to exit codes, the S3 storage for Ray Train, and the end-to-end run on a local
Ray cluster with a worker killed mid-training (tests/ray_qat_e2e.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import ray_qat
from quantcore.errors import UserError
from netns import in_netns, netns_usable  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

QAT_RECIPE = {"name": "t_qat", "model": {"name": "quantcore/vit_fmnist", "num_classes": 4},
              "qat": {"max_steps": 3, "batch_size": 4}}


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the entrypoint got as far as starting Ray."""
    def _run(*a, **k):
        raise AssertionError("Ray was started although the arguments are wrong")

    monkeypatch.setattr(ray_qat, "run", _run)


@pytest.fixture
def data_dir(tmp_path) -> str:
    """A folder-layout dataset with train and val splits (only its layout is looked at)."""
    for split in ("train", "val"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
    return str(tmp_path / "data")


def _recipe(tmp_path: Path, data: dict) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _main(capsys, *argv: str) -> tuple:
    rc = ray_qat.main(list(argv))
    return rc, capsys.readouterr().err


def test_missing_required_arguments_exit_2(no_ray, capsys):
    with pytest.raises(SystemExit) as exc:
        ray_qat.main(["--data", "d"])
    assert exc.value.code == 2
    assert "--recipe" in capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    (["--num-workers", "0"], "--num-workers must be >= 1"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--max-failures", "-2"], "--max-failures must be >= -1"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker must be a fraction in (0, 1] or a whole number"),
    (["--cpus-per-worker", "nan"], "--cpus-per-worker must be"),  # NaN aborted the raylet
    (["--cpus-per-worker", "inf"], "--cpus-per-worker must be"),
    (["--cpus-per-worker", "1.5"], "--cpus-per-worker must be"),
    (["--name", "qat-\u00fc"], "--name 'qat-\u00fc': use printable ASCII"),
    (["--storage-path", "hdfs://nn/x"], "--storage-path hdfs://nn/x"),
])
def test_bad_numbers_and_storage_path_exit_2(no_ray, capsys, tmp_path, extra, needle):
    rc, err = _main(capsys, "--recipe", _recipe(tmp_path, QAT_RECIPE), "--data", "d", "--out", str(tmp_path / "o"),
                    *extra)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_recipe_errors_exit_2_before_ray_starts(no_ray, capsys, tmp_path):
    rc, err = _main(capsys, "--recipe", str(tmp_path / "missing.yaml"), "--data", "d", "--out", "o")
    assert rc == 2 and "missing.yaml" in err and "not found" in err
    bad = dict(QAT_RECIPE, qat={"batch_size": 0})
    rc, err = _main(capsys, "--recipe", _recipe(tmp_path, bad), "--data", "d", "--out", "o")
    assert rc == 2 and "batch_size" in err
    no_qat = {k: v for k, v in QAT_RECIPE.items() if k != "qat"}
    rc, err = _main(capsys, "--recipe", _recipe(tmp_path, no_qat), "--data", "d", "--out", "o")
    assert rc == 2 and "no qat: section" in err
    no_model = {k: v for k, v in QAT_RECIPE.items() if k != "model"}
    rc, err = _main(capsys, "--recipe", _recipe(tmp_path, no_model), "--data", "d", "--out", "o")
    assert rc == 2 and "--init" in err


def test_missing_checkpoint_and_init_exit_2(no_ray, capsys, tmp_path):
    r = _recipe(tmp_path, QAT_RECIPE)
    for flag in ("--checkpoint", "--init"):
        rc, err = _main(capsys, "--recipe", r, "--data", "d", "--out", "o", flag, str(tmp_path / "nope.pt"))
        assert rc == 2 and f"{flag} {tmp_path / 'nope.pt'}: not found" in err


def test_missing_dataset_split_exit_2(no_ray, capsys, tmp_path, data_dir):
    r = _recipe(tmp_path, QAT_RECIPE)
    rc, err = _main(capsys, "--recipe", r, "--data", str(tmp_path / "nowhere"), "--out", "o")
    assert rc == 2 and f"--data {tmp_path / 'nowhere'} (split 'train')" in err
    rc, err = _main(capsys, "--recipe", r, "--data", data_dir, "--eval-split", "test", "--out", "o")
    assert rc == 2 and f"--eval-data {data_dir} (split 'test')" in err


def test_a_missing_s3_split_or_bucket_exits_2_before_ray_starts_mock(no_ray, capsys, tmp_path, s3_client, s3_bucket):
    """On S3 a folder split is what layout detection falls back to: a missing split or bucket reached
    the workers, which Ray retried --max-failures times (about 2 minutes) before exit 2."""
    s3_client.put_object(Bucket=s3_bucket, Key="ds/train/cat/0.png", Body=b"x")
    s3_client.put_object(Bucket=s3_bucket, Key="ds/val/", Body=b"")  # an empty folder's marker only
    rec = _recipe(tmp_path, QAT_RECIPE)
    ds = f"s3://{s3_bucket}/ds"
    for data, extra, needle in ((ds, [], f"--eval-data {ds} (split 'val'): nothing found under"),
                                (ds, ["--eval-data", f"s3://{s3_bucket}/other"], "--eval-data s3://"),
                                ("s3://no-such-bucket-qc/ds", [], "no-such-bucket-qc")):
        argv = ["--recipe", rec, "--data", data, "--out", str(tmp_path / "o"), *extra]
        rc, err = _main(capsys, *argv)
        assert rc == 2 and needle in err and "Traceback" not in err, (extra, err)
    s3_client.put_object(Bucket=s3_bucket, Key="ds/val/cat/0.png", Body=b"x")
    args = ray_qat._parser().parse_args(["--recipe", rec, "--data", f"s3://{s3_bucket}/ds", "--out", str(tmp_path / "o")])
    assert ray_qat.build_config(args).eval_split == "val"


def test_loop_config_carries_the_validated_recipe_and_defaults(tmp_path, data_dir):
    args = ray_qat._parser().parse_args(["--recipe", _recipe(tmp_path, QAT_RECIPE), "--data", data_dir,
                                         "--out", "s3://b/runs/q1/", "--max-steps", "7", "--workers", "0"])
    cfg = ray_qat.build_config(args)
    assert cfg.recipe["qat"]["batch_size"] == 4 and cfg.recipe["name"] == "t_qat"
    assert (cfg.eval_data, cfg.eval_split, cfg.split) == (data_dir, "val", "train")
    assert (cfg.max_steps, cfg.workers, cfg.run_name) == (7, 0, "qat-t_qat-q1")
    assert args.num_workers == 2 and not args.use_gpu


def test_a_run_name_from_a_non_ascii_out_is_ascii(tmp_path, data_dir):
    """The run name becomes a tag of Ray's metrics, which encode tags as ASCII: a derived name with
    'ü' crashed the Train controller (exit 1, retried for ever)."""
    args = ray_qat._parser().parse_args(["--recipe", _recipe(tmp_path, QAT_RECIPE), "--data", data_dir,
                                         "--out", "s3://b/out/ray 1+\u00fc/"])
    name = ray_qat.build_config(args).run_name
    assert name == "qat-t_qat-ray 1+_" and name.isascii()


def test_no_resume_discards_the_earlier_runs_checkpoints_before_ray(monkeypatch, capsys, tmp_path, data_dir):
    """The refusal of another run's checkpoints says "--no-resume to discard them": jobs.ray_qat has
    it, and deletes them in the driver (a worker group Ray restarts must still resume its own)."""
    out = tmp_path / "o"
    (out / "checkpoints").mkdir(parents=True)
    for step in (4, 8):
        (out / "checkpoints" / f"step-{step:09d}.pt").write_bytes(b"x")
    (out / "ptq").mkdir()
    seen = {}

    def fake_run(cfg, args):
        seen["left"] = sorted(p.name for p in (out / "checkpoints").iterdir())
        return {"results": {}, "steps": 1, "world_size": 2, "report": "r"}

    monkeypatch.setattr(ray_qat, "run", fake_run)
    argv = ["--recipe", _recipe(tmp_path, QAT_RECIPE), "--data", data_dir, "--out", str(out)]
    assert ray_qat.main(argv) == 0 and seen["left"] == ["step-000000004.pt", "step-000000008.pt"]
    assert ray_qat.main(argv + ["--no-resume"]) == 0 and seen["left"] == []


def test_gpu_workers_on_a_cluster_without_enough_gpus_are_refused_after_a_wait():
    """--use-gpu on a CPU-only cluster waited until the job's deadline (a warning only): without an
    autoscaler the GPUs never come. Refused after GPU_WAIT_S; --wait-for-gpus keeps waiting, warned."""
    slept = []
    with pytest.raises(UserError, match=r"--use-gpu: the 2 workers ask one GPU each, but the Ray cluster has no GPUs"):
        ray_qat.check_gpus(True, 2, lambda: {"CPU": 16.0}, False, wait_s=20, sleep=slept.append)
    assert sum(slept) == 20
    with pytest.raises(UserError, match="has 1 GPU "):
        ray_qat.check_gpus(True, 2, lambda: {"CPU": 16.0, "GPU": 1.0}, False, wait_s=0, sleep=slept.append)
    said = ray_qat.check_gpus(True, 2, lambda: {"CPU": 16.0}, True, sleep=slept.append)
    assert said is not None and "--wait-for-gpus" in said
    joins = iter([{}, {"GPU": 1.0}, {"GPU": 8.0}])  # the GPU nodes register while it waits
    assert ray_qat.check_gpus(True, 2, lambda: next(joins), False, wait_s=60, sleep=lambda s: None) is None
    assert ray_qat.check_gpus(True, 2, lambda: {"CPU": 16.0, "GPU": 8.0}, False) is None
    assert ray_qat.check_gpus(False, 2, lambda: {"CPU": 16.0}, False) is None


@pytest.mark.parametrize("extra,needle", [
    (["--storage-path", "relative/dir"], "--storage-path relative/dir: a relative path"),
    (["--storage-path", "s3://"], "--storage-path s3://: no bucket"),
    (["--wait-for-gpus"], "--wait-for-gpus applies to --use-gpu workers only"),
    (["--init", "{ckpt}", "--checkpoint", "{ckpt}"], "give one (--init starts from a calibrated checkpoint"),
])
def test_argument_conflicts_and_storage_paths_exit_2_before_ray(no_ray, capsys, tmp_path, data_dir, extra, needle):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"x")
    extra = [a.replace("{ckpt}", str(ckpt)) for a in extra]
    rc, err = _main(capsys, "--recipe", _recipe(tmp_path, QAT_RECIPE), "--data", data_dir, "--out",
                    str(tmp_path / "o"), *extra)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_missing_storage_and_out_buckets_are_said_before_ray_starts_moto_mock(monkeypatch, capsys, tmp_path, data_dir,
                                                                              s3_bucket):
    """A missing --storage-path bucket failed inside Ray Train's controller: exit 1 and a traceback."""
    import ray

    def no_init(*a, **k):
        raise AssertionError("Ray was started although the storage cannot be written")

    monkeypatch.setattr(ray, "init", no_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    r = _recipe(tmp_path, QAT_RECIPE)
    rc, err = _main(capsys, "--recipe", r, "--data", data_dir, "--out", str(tmp_path / "o"), "--storage-path",
                    "s3://no-such-bucket-qc/x")
    assert rc == 2 and "--storage-path s3://no-such-bucket-qc/x: cannot write there" in err
    rc, err = _main(capsys, "--recipe", r, "--data", data_dir, "--out", "s3://no-such-bucket-qc/run")
    assert rc == 2 and "--out s3://no-such-bucket-qc/run: cannot write there" in err
    ray_qat.check_locations(f"s3://{s3_bucket}/run", f"s3://{s3_bucket}/ray")  # both writable: no error


def test_worker_failures_map_to_exit_codes(monkeypatch, capsys, tmp_path, data_dir):
    """A user mistake raised in every failed worker exits 2 (after Ray's retries); anything else 1."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    def failing(exc):
        def _run(cfg, args):
            raise exc
        return _run

    r = _recipe(tmp_path, QAT_RECIPE)
    argv = ("--recipe", r, "--data", data_dir, "--out", "o")
    user = WorkerGroupError("2 workers failed", {0: UserExceptionWithTraceback(UserError("data split 'x' not found"),
                                                                                 "Traceback ..."),
                                                 1: UserExceptionWithTraceback(FileNotFoundError("s3://b/k"), "tb")})
    monkeypatch.setattr(ray_qat, "run", failing(user))
    rc, err = _main(capsys, *argv)
    assert rc == 2 and "data split 'x' not found" in err
    mixed = WorkerGroupError("2 workers failed", {0: UserExceptionWithTraceback(UserError("u"), "tb"),
                                                  1: UserExceptionWithTraceback(RuntimeError("gloo reset"), "tb")})
    monkeypatch.setattr(ray_qat, "run", failing(mixed))
    rc, err = _main(capsys, *argv)
    assert rc == 1 and "QAT failed" in err
    monkeypatch.setattr(ray_qat, "run", failing(RuntimeError("controller died")))
    assert _main(capsys, *argv)[0] == 1


def test_success_prints_results_and_report(monkeypatch, capsys, tmp_path, data_dir):
    summary = {"results": {"fp32": {"top1": 90.0, "agreement": 100.0}, "t_qat": {"top1": 89.5, "agreement": 98.0}},
               "steps": 7, "world_size": 2, "report": "s3://b/o/report.md", "ray_reports": 3,
               "last_metrics": {"step": 7, "loss": 0.25}}
    monkeypatch.setattr(ray_qat, "run", lambda cfg, args: summary)
    assert ray_qat.main(["--recipe", _recipe(tmp_path, QAT_RECIPE), "--data", data_dir, "--out", "s3://b/o"]) == 0
    out = capsys.readouterr().out
    assert "t_qat: top-1 89.50%, agreement 98.00%" in out and "report: s3://b/o/report.md" in out
    assert "3 ray.train reports, the last {'step': 7, 'loss': 0.25}" in out


def test_reporter_never_blocks_the_loop_and_merges_log_steps(monkeypatch):
    """ray.train.report runs in a thread; log steps arriving while it is busy are merged into one
    report (the same decision on every rank: it is all-reduced), and close() sends what is left."""
    import threading

    import ray.train

    sent, release = [], threading.Event()

    def slow_report(metrics):
        release.wait(10)
        sent.append(metrics)

    monkeypatch.setattr(ray.train, "report", slow_report)
    rep = ray_qat._Reporter("r", rank=1)  # rank 1: no Prometheus gauges, no log lines
    rep({"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 0.1, "images_per_s": 5.0})
    rep({"step": 2, "epoch": 1.0, "loss": 1.5, "lr": 0.1, "images_per_s": 5.0})  # returns at once: report busy
    rep({"step": 2, "epoch": 1.0, "val_top1": 50.0, "val_count": 8})
    rep({"step": 3, "epoch": 1.5, "loss": 1.0, "lr": 0.05, "images_per_s": 6.0, "note": "text dropped"})
    assert sent == []
    release.set()
    rep.close()
    assert [m["step"] for m in sent] == [1, 3] and rep.reported == 2
    assert sent[1] == {"step": 3, "epoch": 1.5, "loss": 1.0, "lr": 0.05, "images_per_s": 6.0, "val_top1": 50.0,
                       "val_count": 8, "val_step": 2}
    assert rep.last_reported == sent[1]


def test_storage_location_custom_s3_endpoint(monkeypatch):
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    assert ray_qat.storage_location(None, "/shared/out") == (None, None)
    assert ray_qat.storage_location(None, "s3://b/out/") == ("s3://b/out/ray", None)  # AWS: Ray resolves s3://
    # quantcore reads 'S3://' as S3: Ray's state must go there too, not to a local default
    assert ray_qat.storage_location(None, "S3://b/out") == ("s3://b/out/ray", None)
    assert ray_qat.storage_location("S3://b/ray", "/x") == ("s3://b/ray", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    path, fs = ray_qat.storage_location("s3://bucket/ray", "s3://b/out")
    assert path == "bucket/ray" and fs.type_name == "s3"
    assert ray_qat.storage_location("/mnt/shared/ray", "s3://b/out") == ("/mnt/shared/ray", None)




@pytest.mark.slow
@pytest.mark.skipif(not netns_usable(), reason="unshare of network + PID namespaces unavailable or not permitted")
def test_ray_train_qat_two_workers_moto_s3_resumes_after_worker_kill():
    """tests/ray_qat_e2e.py inside fresh network (loopback only) and PID namespaces (`ray stop --force`
    only reaches this cluster; the killed worker is ours): 2 Ray Train workers, checkpoints in moto S3,
    SIGKILL to rank 1 after the first checkpoint, Ray restarts the group, the loop resumes, and the
    final weights equal an uninterrupted torchrun run's bit for bit."""
    cmd = in_netns([sys.executable, REPO / "tests" / "ray_qat_e2e.py", "--timeout", "600"])
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS"):
        env.pop(k, None)  # the script sets up its own
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1020,
                          stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    steps = "\n".join(line for line in out.splitlines() if line.startswith("[ray_qat_e2e "))
    assert proc.returncode == 0 and "RAY QAT E2E OK" in proc.stdout, steps + "\n...\n" + out[-10000:]
    assert "SIGKILL to Ray Train worker rank 1" in out and "worker group restarted, resumed from step" in out
    assert "final weights bit-identical to the uninterrupted torchrun run" in out
