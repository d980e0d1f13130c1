"""``jobs.ray_sweep``: resumable sweeps (completion manifests, incremental summaries), task
resources (``--gpus-per-task 0`` = CPU tasks) and, in a loopback-only network namespace, a real
local Ray cluster whose first sweep attempt is killed after some runs finished
(tests/ray_e2e.py, S3 = moto_server on 127.0.0.1).

The runs here are real :func:`quantcore.pipeline.ptq` runs of a one-block ViT on tiny JPEG folders
(tests/tiny_data.py), written to local paths through :mod:`quantcore.io.storage`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

import quantcore

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # jobs/ is shipped as source, not installed
    sys.path.insert(0, str(REPO))

from jobs import ray_sweep  # noqa: E402
from jobs.ray_sweep import MANIFEST_NAME, SweepError, parse_sweep  # noqa: E402
from quantcore.io import storage  # noqa: E402
from tiny_data import TINY_RECIPE, make_images  # noqa: E402
from netns import in_netns, netns_usable  # noqa: E402

VARIANT = TINY_RECIPE["name"]
# what pipeline.ptq writes for one run of one recipe with an evaluation
EXPECTED_ARTIFACTS = sorted(["report.json", "report.md", "per_class.png", f"{VARIANT}/model.qc.pt",
                             f"{VARIANT}/encodings.json", f"{VARIANT}/ranges.png", f"{VARIANT}/report.json"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Dict[str, Any]:
    """A dataset, a recipe file, one run spec and that run computed once into ``done/<name>``."""
    root = tmp_path_factory.mktemp("sweep")
    data = make_images(root / "imgs")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    run = {"name": "tiny", "recipe": str(recipe), "calib_data": str(data), "limit": 6, "batch_size": 4}
    spec = parse_sweep({"runs": [run]}).runs[0]
    done = root / "done"
    rec = ray_sweep.execute_run(spec.model_dump(mode="json", exclude_none=True), str(done / "tiny"), "t", "cpu",
                                show_progress=False)
    assert rec["status"] == "succeeded", rec["traceback"]
    return {"root": root, "data": data, "recipe": recipe, "run": run, "spec": spec, "done": done, "record": rec}


def _copy(tiny: Dict[str, Any], dst: Path) -> Path:
    shutil.copytree(tiny["done"], dst)
    return dst / "tiny"


# ------------------------------------------------------------------------------ manifests

def test_a_finished_run_is_complete_and_its_manifest_lists_every_artifact(tiny):
    out = tiny["done"] / "tiny"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["schema"] == "quantcore.sweep-run/1" and manifest["run"] == "tiny"
    assert manifest["fingerprint"] == ray_sweep.run_fingerprint(tiny["spec"])
    assert [a["path"] for a in manifest["artifacts"]] == EXPECTED_ARTIFACTS
    for a in manifest["artifacts"]:
        assert (out / a["path"]).stat().st_size == a["size"] > 0, a
    written = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(str(p.relative_to(out)) for p in written) == sorted(EXPECTED_ARTIFACTS + [MANIFEST_NAME])
    assert manifest["record"]["status"] == "succeeded" and manifest["record"]["finished_at"]

    rec, why = ray_sweep.completed_record(tiny["spec"], str(out))
    assert rec is not None, why
    assert rec["reused"] is True and tiny["record"]["reused"] is False
    assert {k: v for k, v in rec.items() if k != "reused"} == {k: v for k, v in tiny["record"].items()
                                                               if k != "reused"}


def test_the_manifest_is_deleted_first_and_written_last(tiny, tmp_path, monkeypatch):
    """Storage operations of a recompute, in order (spied, the real functions still run): nothing is
    written before the old manifest is gone, and the new manifest is the last write."""
    out = _copy(tiny, tmp_path / "o")
    ops: List[tuple] = []
    real_writer, real_delete = storage._atomic_local_writer, storage.delete

    def writer(path, *a, **k):
        ops.append(("write", os.path.relpath(path, out)))
        return real_writer(path, *a, **k)

    def delete(uri, *a, **k):
        ops.append(("delete", os.path.relpath(uri, out)))
        return real_delete(uri, *a, **k)

    monkeypatch.setattr(storage, "_atomic_local_writer", writer)
    monkeypatch.setattr(storage, "delete", delete)
    rec = ray_sweep.execute_run(tiny["spec"].model_dump(mode="json", exclude_none=True), str(out), "t", "cpu",
                                show_progress=False)
    assert rec["status"] == "succeeded", rec["traceback"]
    assert ops[0] == ("delete", MANIFEST_NAME)
    assert ops[-1] == ("write", MANIFEST_NAME) and [o for o in ops if o[1] == MANIFEST_NAME] == [ops[0], ops[-1]]
    # besides --out's write probe (written and deleted at once, before any work), the artifacts
    probes = [p for op, p in ops if p.startswith(".quantcore-write-check-")]
    assert probes and all(("delete", p) in ops for p in probes) and not any(p.startswith(".quantcore") for p in os.listdir(out))
    assert {p for op, p in ops if op == "write" and p not in probes} == set(EXPECTED_ARTIFACTS + [MANIFEST_NAME])


def _drop(out: Path, rel: str) -> None:
    (out / rel).unlink()


def _truncate(out: Path, rel: str) -> None:
    with open(out / rel, "r+b") as f:
        f.truncate(10)


def _edit_manifest(out: Path, fn) -> None:
    p = out / MANIFEST_NAME
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))


@pytest.mark.parametrize("damage,reason", [
    (lambda out: _drop(out, MANIFEST_NAME), "not run yet"),
    (lambda out: _drop(out, f"{VARIANT}/model.qc.pt"), f"{VARIANT}/model.qc.pt is missing"),
    (lambda out: _drop(out, "report.md"), "report.md is missing"),
    (lambda out: _truncate(out, f"{VARIANT}/encodings.json"), "has 10 bytes, the manifest says"),
    (lambda out: (out / MANIFEST_NAME).write_text('{"schema": "quantcore.sweep-run/1", "run"'),
     "unreadable completion manifest"),
    (lambda out: _edit_manifest(out, lambda m: dict(m, schema="other/1")), "is not a quantcore.sweep-run/1"),
    (lambda out: _edit_manifest(out, lambda m: dict(m, artifacts=["report.json"])), "is not a quantcore.sweep-run/1"),
    (lambda out: _edit_manifest(out, lambda m: dict(m, fingerprint="sha256:0")), "fingerprint differs"),
], ids=["no-manifest", "checkpoint-missing", "report-missing", "partial-artifact", "corrupt-manifest",
        "foreign-manifest", "bad-artifact-list", "other-spec"])
def test_incomplete_or_foreign_outputs_are_not_taken_as_complete(tiny, tmp_path, damage, reason):
    out = _copy(tiny, tmp_path / "o")
    assert ray_sweep.completed_record(tiny["spec"], str(out))[0] is not None  # complete before the damage
    damage(out)
    rec, why = ray_sweep.completed_record(tiny["spec"], str(out))
    assert rec is None and reason in why, why


def test_a_changed_run_spec_is_recomputed(tiny, tmp_path):
    out = _copy(tiny, tmp_path / "o")
    changed = parse_sweep({"runs": [dict(tiny["run"], limit=3)]}).runs[0]
    assert ray_sweep.run_fingerprint(changed) != ray_sweep.run_fingerprint(tiny["spec"])
    rec, why = ray_sweep.completed_record(changed, str(out))
    assert rec is None and "fingerprint differs" in why
    # the same fields through defaults: the same run
    same = parse_sweep({"defaults": {"calib_data": tiny["run"]["calib_data"], "limit": 6},
                        "runs": [{k: v for k, v in tiny["run"].items() if k not in ("calib_data", "limit")}]}).runs[0]
    assert ray_sweep.completed_record(same, str(out))[0] is not None


def test_a_failing_recompute_leaves_no_manifest_behind(tiny, tmp_path):
    """A run recomputed over a complete one (its spec changed) that fails half-way: the old
    manifest is gone, so neither the old nor the half-written new outputs count as complete."""
    out = _copy(tiny, tmp_path / "o")
    broken = dict(tiny["run"], recipe=str(tiny["root"] / "missing.yaml"))
    rec = ray_sweep.execute_run(parse_sweep({"runs": [broken]}).runs[0].model_dump(mode="json", exclude_none=True),
                                str(out), "t", "cpu", show_progress=False)
    assert rec["status"] == "failed" and "missing.yaml" in rec["error"]
    assert not (out / MANIFEST_NAME).exists()
    # the record names no file this attempt did not write: the report.json there is the old run's
    assert (out / "report.json").exists()
    assert (rec["report"], rec["report_md"], rec["manifest"]) == (None, None, None), rec
    assert ray_sweep.completed_record(tiny["spec"], str(out)) == (None, "not run yet (no completion manifest)")


# ------------------------------------------------------------------------------ summaries

def test_a_sweep_of_complete_runs_reuses_them_without_starting_ray(tiny, tmp_path, capsys):
    import ray

    out = tmp_path / "o"
    _copy(tiny, out)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"runs": [tiny["run"]]}))
    before = (out / "tiny" / MANIFEST_NAME).stat().st_mtime_ns
    assert ray_sweep.main(["--sweep", str(sweep_file), "--out", str(out), "--gpus-per-task", "0"]) == 0
    assert not ray.is_initialized()
    assert (out / "tiny" / MANIFEST_NAME).stat().st_mtime_ns == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema"] == "quantcore.sweep-summary/2" and summary["state"] == "finished"
    assert (summary["runs_total"], summary["runs_succeeded"], summary["runs_reused"], summary["runs_pending"]) \
        == (1, 1, 1, 0)
    (r,) = summary["runs"]
    assert r["reused"] is True and r["variants"][VARIANT]["top1"] == tiny["record"]["variants"][VARIANT]["top1"]
    assert "Reused from an earlier attempt (complete manifests, not recomputed): tiny." in \
        (out / "summary.md").read_text()
    assert "[1/1] tiny: reused, complete since" in capsys.readouterr().out


def test_only_keeps_every_other_run_in_the_summary(tiny, tmp_path, capsys):
    """--only NAME rewrote summary.json with NAME alone: the other runs' results and a failure record
    were gone from it. They stay: complete runs from their manifests, a failed one from the previous
    summary, the rest pending; the exit status is that of the runs this invocation ran."""
    import ray

    out = tmp_path / "o"
    _copy(tiny, out)
    runs = [tiny["run"], dict(tiny["run"], name="broken"), dict(tiny["run"], name="later")]
    sweep = parse_sweep({"runs": runs})
    meta = {"sweep_file": "s.yaml", "out": str(out), "started": "t0", "finished": "t1", "duration_s": 1.0,
            "summary_json": str(out / "summary.json"), "summary_md": str(out / "summary.md")}
    failed = ray_sweep._failure(sweep.runs[1], str(out / "broken"), RuntimeError("node lost"))
    assert (failed["report"], failed["report_md"], failed["manifest"]) == (None, None, None), failed
    ray_sweep.write_summary(ray_sweep.build_summary(sweep, {"tiny": tiny["record"], "broken": failed}, meta, "finished"))
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"runs": runs}))
    assert ray_sweep.main(["--sweep", str(sweep_file), "--out", str(out), "--gpus-per-task", "0", "--only", "tiny"]) == 0
    assert not ray.is_initialized()  # tiny is complete: nothing to run
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["name"], r["status"]) for r in summary["runs"]] == \
        [("tiny", "succeeded"), ("broken", "failed"), ("later", "pending")]
    assert "node lost" in summary["runs"][1]["error"] and summary["runs_total"] == 3


def test_only_does_not_keep_a_success_its_manifest_no_longer_completes(tiny, tmp_path):
    """--only X listed another run as succeeded (reused) with the previous summary's numbers after its
    fields had changed or an artifact was deleted; it is pending until it is computed again."""
    import ray

    out = tmp_path / "o"
    _copy(tiny, out)
    shutil.copytree(out / "tiny", out / "other")
    runs = [tiny["run"], dict(tiny["run"], name="other", limit=5)]  # "other" changed since its manifest
    sweep = parse_sweep({"runs": runs})
    meta = {"sweep_file": "s.yaml", "out": str(out), "started": "t0", "finished": "t1", "duration_s": 1.0,
            "summary_json": str(out / "summary.json"), "summary_md": str(out / "summary.md")}
    stale = dict(tiny["record"], name="other", out=str(out / "other"))
    ray_sweep.write_summary(ray_sweep.build_summary(sweep, {"tiny": tiny["record"], "other": stale}, meta, "finished"))
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"runs": runs}))
    assert ray_sweep.main(["--sweep", str(sweep_file), "--out", str(out), "--gpus-per-task", "0", "--only", "tiny"]) == 0
    assert not ray.is_initialized()
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["name"], r["status"]) for r in summary["runs"]] == [("tiny", "succeeded"), ("other", "pending")]
    assert summary["runs_reused"] == 1


def test_only_does_not_keep_a_failure_whose_fields_changed(tiny, tmp_path):
    """--only X kept another run's failure (its old calib_data and error) after that run's fields were
    fixed in the sweep file: it is pending, as a changed success is. A failure recorded before records
    carried their fingerprint is kept while the fields it shows still match."""
    out = tmp_path / "o"
    _copy(tiny, out)
    broken = dict(tiny["run"], name="broken", calib_data=str(tmp_path / "missing"))
    meta = {"sweep_file": "s.yaml", "out": str(out), "started": "t0", "finished": "t1", "duration_s": 1.0,
            "summary_json": str(out / "summary.json"), "summary_md": str(out / "summary.md")}
    old = parse_sweep({"runs": [tiny["run"], broken]})
    sweep_file = tmp_path / "sweep.yaml"
    for legacy in (False, True):
        failed = ray_sweep._failure(old.runs[1], str(out / "broken"), RuntimeError("no such data"))
        if legacy:
            failed.pop("fingerprint")
        ray_sweep.write_summary(ray_sweep.build_summary(old, {"tiny": tiny["record"], "broken": failed}, meta,
                                                        "finished"))
        for fixed, status in ((dict(broken, calib_data=tiny["run"]["calib_data"]), "pending"), (broken, "failed")):
            sweep_file.write_text(yaml.safe_dump({"runs": [tiny["run"], fixed]}))
            assert ray_sweep.main(["--sweep", str(sweep_file), "--out", str(out), "--gpus-per-task", "0",
                                   "--only", "tiny"]) == 0
            summary = json.loads((out / "summary.json").read_text())
            assert [(r["name"], r["status"]) for r in summary["runs"]] == [("tiny", "succeeded"), ("broken", status)], \
                (legacy, fixed)
            ray_sweep.write_summary(ray_sweep.build_summary(old, {"tiny": tiny["record"], "broken": failed}, meta,
                                                            "finished"))


def test_a_driver_that_cannot_reach_ray_leaves_the_previous_summary(tiny, tmp_path, monkeypatch):
    """The running summary was written before connecting: under --no-resume a finished sweep's summary
    became all-pending while the driver hung on an unreachable cluster."""
    import ray

    out = _copy(tiny, tmp_path / "o")
    meta = {"sweep_file": "s.yaml", "out": str(out), "started": "t0", "finished": "t1", "duration_s": 1.0,
            "summary_json": str(out / "summary.json"), "summary_md": str(out / "summary.md")}
    sweep = parse_sweep({"runs": [tiny["run"]]})
    ray_sweep.write_summary(ray_sweep.build_summary(sweep, {"tiny": tiny["record"]}, meta, "finished"))
    before = (out / "summary.json").read_bytes()

    def unreachable(*a, **k):
        raise ConnectionError("could not reach the Ray cluster at 127.0.0.1:1")

    monkeypatch.setattr(ray, "init", unreachable)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"runs": [tiny["run"]]}))
    with pytest.raises(ConnectionError):
        ray_sweep.main(["--sweep", str(sweep_file), "--out", str(out), "--gpus-per-task", "0", "--no-resume",
                        "--address", "127.0.0.1:1"])
    assert (out / "summary.json").read_bytes() == before


def test_a_reused_run_of_a_copied_out_points_at_the_copy(tiny, tmp_path):
    """The summary's URIs of a reused run were those of the folder the run was first written to."""
    out = _copy(tiny, tmp_path / "copy")
    rec, why = ray_sweep.completed_record(tiny["spec"], str(out))
    assert rec is not None, why
    uris = [rec["out"], rec["report"], rec["report_md"], rec["manifest"]] + [
        u for v in rec["variants"].values() for u in (v.get("artifacts") or {}).values()]
    assert rec["out"] == str(out) and all(u.startswith(str(out) + "/") for u in uris[1:]), uris
    assert not any(str(tiny["done"]) in u for u in uris)


def test_an_unwritable_out_is_refused_before_ray_starts(tiny, tmp_path, capsys):
    import ray

    (tmp_path / "afile").write_text("x")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"runs": [tiny["run"]]}))
    assert ray_sweep.main(["--sweep", str(sweep_file), "--out", str(tmp_path / "afile" / "o"),
                           "--gpus-per-task", "0"]) == 2
    assert not ray.is_initialized() and "cannot write there" in capsys.readouterr().err


def test_summary_while_running_lists_pending_runs(tiny, tmp_path):
    sweep = parse_sweep({"runs": [tiny["run"], dict(tiny["run"], name="later")]})
    meta = {"sweep_file": "s.yaml", "out": str(tmp_path), "started": "t0", "finished": None, "duration_s": 1.0,
            "summary_json": str(tmp_path / "summary.json"), "summary_md": str(tmp_path / "summary.md")}
    summary = ray_sweep.build_summary(sweep, {"tiny": tiny["record"]}, meta, "running")
    assert (summary["state"], summary["runs_succeeded"], summary["runs_pending"]) == ("running", 1, 1)
    assert [(r["name"], r["status"]) for r in summary["runs"]] == [("tiny", "succeeded"), ("later", "pending")]
    ray_sweep.write_summary(summary)
    md = (tmp_path / "summary.md").read_text()
    assert "**In progress**: 1 of 2 runs finished so far." in md and "| later | pending |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][1]["status"] == "pending"


@pytest.fixture
def unreachable_s3(monkeypatch):
    """boto3 pointed at a loopback port nobody listens on, two quick attempts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                 "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                 "QUANTCORE_S3_MAX_ATTEMPTS": "2", "QUANTCORE_S3_RETRY_BASE_DELAY": "0.01"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    storage.reset_config()
    storage.reset_client()
    yield
    storage.reset_config()
    storage.reset_client()


def test_unreachable_output_storage_exits_1_without_recomputing_anything(tiny, tmp_path, unreachable_s3, capsys):
    """Reading the manifests fails (retries exhausted): not a reason to recompute every run, and not
    a user error either: exit 1, so the launcher retries and the retry resumes."""
    import ray

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"runs": [tiny["run"]]}))
    assert ray_sweep.main(["--sweep", str(sweep_file), "--out", "s3://bkt/sweep", "--gpus-per-task", "0"]) == 1
    err = capsys.readouterr().err
    assert "error: S3 get_object failed for s3://bkt/sweep/tiny/_SUCCESS.json after retries" in err
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------ task resources

def _args(*extra: str):
    return ray_sweep._parser().parse_args(["--sweep", "s.yaml", "--out", "o", *extra])


def test_gpus_per_task_0_makes_cpu_tasks():
    args = _args("--gpus-per-task", "0")
    opts = ray_sweep.task_options("a", args.gpus_per_task, args.cpus_per_task, args.max_retries)
    assert opts["num_gpus"] == 0 and opts["num_cpus"] == 1 and opts["name"] == "ptq:a"
    # the default stays one GPU per run (GPU clusters); a fraction shares a GPU
    assert ray_sweep.task_options("a", _args().gpus_per_task, 1, 1)["num_gpus"] == 1
    assert ray_sweep.task_options("a", _args("--gpus-per-task", "0.5").gpus_per_task, 1, 1)["num_gpus"] == 0.5


@pytest.mark.parametrize("flag,value", [("--gpus-per-task", "-1"), ("--gpus-per-task", "nan"),
                                        ("--gpus-per-task", "1.5"), ("--gpus-per-task", "one"),
                                        ("--cpus-per-task", "inf"), ("--max-retries", "-1")])
def test_bad_task_resources_exit_2_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        ray_sweep.main(["--sweep", "s.yaml", "--out", "o", flag, value])
    assert exc.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_task_options_refuse_what_ray_would_reject():
    with pytest.raises(SweepError, match="--gpus-per-task: above 1 it must be a whole number"):
        ray_sweep.task_options("a", 2.5, 1, 1)
    with pytest.raises(SweepError, match="--max-retries"):
        ray_sweep.task_options("a", 0, 1, -1)


def test_a_cuda_run_on_cpu_tasks_exits_2_before_ray_starts(tiny, tmp_path, capsys):
    import ray

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"runs": [dict(tiny["run"], device="cuda")]}))
    assert ray_sweep.main(["--sweep", str(sweep_file), "--out", str(tmp_path / "o"), "--gpus-per-task", "0"]) == 2
    err = capsys.readouterr().err
    assert "runs[0](tiny).device: 'cuda' needs a GPU, but --gpus-per-task is 0" in err
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x"])
def test_a_device_that_is_not_a_torch_device_exits_2_before_ray_starts(tiny, tmp_path, capsys, device):
    import ray

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"runs": [dict(tiny["run"], device=device)]}))
    assert ray_sweep.main(["--sweep", str(sweep_file), "--out", str(tmp_path / "o"), "--gpus-per-task", "1"]) == 2
    err = capsys.readouterr().err
    assert "device" in err and f"{device!r} is not a torch device" in err
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


def test_a_missing_or_bad_recipe_exits_2_before_ray_starts(tiny, tmp_path, capsys):
    """Before, the driver started Ray and scheduled the task, which failed as a run (exit 1)."""
    import ray

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name": "quantcore/vit_fmnist"}, "calibration": {"method": "medain"}}))
    for recipe, words in (("fmnist_w8a8_ftl", "'fmnist_w8a8_ftl' not found"), (str(bad), "calibration.method")):
        sweep_file = tmp_path / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({"runs": [tiny["run"], dict(tiny["run"], name="typo", recipe=recipe)]}))
        assert ray_sweep.main(["--sweep", str(sweep_file), "--out", str(tmp_path / "o"), "--gpus-per-task", "0"]) == 2
        err = capsys.readouterr().err
        assert "runs[1](typo).recipes:" in err and words in err, err
        assert not ray.is_initialized() and not (tmp_path / "o").exists()
    sweep_file.write_text(yaml.safe_dump({"runs": [dict(tiny["run"], cache_dir=str(tmp_path / "c"))]}))
    assert ray_sweep.main(["--sweep", str(sweep_file), "--out", str(tmp_path / "o"), "--gpus-per-task", "0"]) == 2
    # quantcore's message names the sweep's field, not the CLI flag the sweep's user never typed
    err = capsys.readouterr().err
    assert "runs[0](tiny).cache_dir: cache_dir " in err and "--cache-dir" not in err, err
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


def _refused_before_ray(tiny, tmp_path, capsys, cases) -> None:
    """Each ``(change, words)``: a sweep of a good run plus a run "bad" with ``change`` exits 2 saying
    ``words``, before Ray starts and before anything is written."""
    import ray

    for change, words in cases:
        sweep_file = tmp_path / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({"runs": [tiny["run"], dict(tiny["run"], name="bad", **change)]}))
        assert ray_sweep.main(["--sweep", str(sweep_file), "--out", str(tmp_path / "o"), "--gpus-per-task", "0"]) == 2
        err = capsys.readouterr().err
        assert words in err, err
        assert not ray.is_initialized() and not (tmp_path / "o").exists()


def test_an_unknown_model_or_missing_weights_file_exits_2_before_ray_starts(tiny, tmp_path, capsys):
    """A model name its source does not know, or a weights file that is not there, was found by the task
    after Ray had started (the run failed, exit 1); the driver now builds the architecture on the meta
    device and looks for the files."""
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(dict(TINY_RECIPE, name="typo", model={"name": "vit_tiny_patch16_2244"})))
    nofile = tmp_path / "nofile.yaml"
    nofile.write_text(yaml.safe_dump(dict(TINY_RECIPE, name="nofile",
                                          model=dict(TINY_RECIPE["model"], checkpoint="gone.pt"))))
    cases = ((dict(recipe=str(typo)), "runs[1](bad).recipes: recipe 'typo': model.name 'vit_tiny_patch16_2244'"),
             (dict(recipe=str(nofile)), f"runs[1](bad).recipes: recipe 'nofile': model.checkpoint: "
                                        f"{tmp_path / 'gone.pt'}: no such file"),
             (dict(checkpoint="missing.pt"), f"runs[1](bad).checkpoint: {tmp_path / 'missing.pt'}: no such file"))
    # a builder that reads its own tensors cannot build on the meta device: checked on the CPU instead
    ray_sweep._check_model(quantcore.load_recipe({"version": 1, "name": "rg", "model": {
        "name": "torchvision:regnet_x_400mf"}}), None, "sweep.yaml: runs[0](rg)")
    _refused_before_ray(tiny, tmp_path, capsys, cases)


def test_a_missing_local_data_path_exits_2_before_ray_starts(tiny, tmp_path, capsys):
    """A local calib_data / eval_data that does not exist was found by the run's task after Ray started
    (exit 1, "retryable"); the driver checks local data as it checks recipes and weights. S3 data is the
    task's to find (tests/ray_e2e.py's broken run)."""
    gone = tmp_path / "no-such-data"
    cases = ((dict(calib_data=str(gone)), f"runs[1](bad).calib_data: dataset {gone}: no such file or directory"),
             (dict(calib_data=f"file://{gone}"), f"runs[1](bad).calib_data: dataset file://{gone}: no such file or directory"),
             (dict(eval_data="gone-val"), f"runs[1](bad).eval_data: dataset {tmp_path / 'gone-val'}: no such "
                                          f"file or directory"))  # relative: to the sweep file's folder
    _refused_before_ray(tiny, tmp_path, capsys, cases)


def test_a_split_the_local_data_does_not_hold_exits_2_before_ray_starts(tiny, tmp_path, capsys):
    """eval_split: vall (a typo) on local data passed the driver's checks and failed in the task."""
    cases = ((dict(eval_split="vall"), "runs[1](bad).eval_split 'vall': cannot detect a dataset layout for split "
                                       "'vall'"),
             (dict(calib_split="tran"), "runs[1](bad).calib_split 'tran': cannot detect a dataset layout"),
             # an explicit layout the data does not have was found by the task (exit 1)
             (dict(layout="zip"), "runs[1](bad).layout 'zip' (calib_split 'train'): "),
             (dict(layout="resisc"), "runs[1](bad).layout 'resisc' (calib_split 'train'): "))
    _refused_before_ray(tiny, tmp_path, capsys, cases)
    # the right explicit layout passes the check
    ray_sweep._check_data(parse_sweep({"runs": [dict(tiny["run"], layout="folder")]}), "s.yaml")


def test_a_run_error_names_the_sweep_fields_and_says_where_evaluation_data_came_from(tiny, tmp_path):
    """quantcore's errors name CLI flags (--eval-split); a sweep's user set fields (eval_split). And "read for
    evaluation too" is said only when eval_data was not given, not when it names the calibration folder."""
    fell_back = dict(tiny["run"], eval_split="nope")
    rec = ray_sweep.execute_run(parse_sweep({"runs": [fell_back]}).runs[0].model_dump(mode="json", exclude_none=True),
                                str(tmp_path / "a"), "t", "cpu", show_progress=False)
    assert rec["status"] == "failed" and "the calibration data, read for evaluation too (calib_data, eval_split " \
        "'nope')" in rec["error"] and "--" not in rec["error"], rec["error"]
    given = dict(fell_back, eval_data=tiny["run"]["calib_data"])
    rec = ray_sweep.execute_run(parse_sweep({"runs": [given]}).runs[0].model_dump(mode="json", exclude_none=True),
                                str(tmp_path / "b"), "t", "cpu", show_progress=False)
    assert rec["status"] == "failed" and "evaluation data (eval_data/eval_split 'nope')" in rec["error"], rec["error"]
    assert "read for evaluation too" not in rec["error"]
    # a flag that is no field of a run, and errors that are not user errors, stay as they are
    assert ray_sweep._as_fields(quantcore.errors.UserError("--out x, --limit 3")) == "--out x, limit 3"
    assert ray_sweep._as_fields(RuntimeError("--limit 3")) == "--limit 3"


def test_limit_0_evaluates_the_whole_split_as_the_clis_limit_0(tiny, tmp_path):
    whole = dict(tiny["run"], name="whole", limit=0)
    rec = ray_sweep.execute_run(parse_sweep({"runs": [whole]}).runs[0].model_dump(mode="json", exclude_none=True),
                                str(tmp_path / "whole"), "t", "cpu", show_progress=False)
    assert rec["status"] == "succeeded", rec["traceback"]
    assert rec["limit"] == 0 and rec["eval_count"] > tiny["record"]["eval_count"] == tiny["run"]["limit"]
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["data"]["eval_subset"] is None, report["data"]


def test_summary_duration_is_a_dash_when_none_was_measured(tiny, tmp_path):
    """A failed run showed 0.0 s, which reads as a measured zero: a task that died has no duration ("–"),
    a run that failed at once "<0.1", one that ran a while before failing keeps its measured time."""
    sweep = parse_sweep({"runs": [dict(tiny["run"], name=n) for n in ("died", "at-once", "later")]})
    died, at_once, later = (ray_sweep._failure(s, str(tmp_path / s.name), RuntimeError("x")) for s in sweep.runs)
    at_once["duration_s"], later["duration_s"] = 0.004, 12.345
    meta = {"sweep_file": "s.yaml", "out": str(tmp_path), "started": "t0", "finished": "t1", "duration_s": 13.0,
            "summary_json": str(tmp_path / "summary.json"), "summary_md": str(tmp_path / "summary.md")}
    md = ray_sweep.summary_markdown(ray_sweep.build_summary(
        sweep, {"died": died, "at-once": at_once, "later": later}, meta, "finished"))
    assert died["duration_s"] is None and "| died | failed | – | – | – | – | – | – | – | – |" in md, md
    assert "| at-once | failed | – | – | – | – | – | – | <0.1 | – |" in md
    assert "| later | failed | – | – | – | – | – | – | 12.3 | – |" in md and "0.0" not in md


# ------------------------------------------------------------------------------ Ray end to end





@pytest.mark.slow
@pytest.mark.skipif(not netns_usable(), reason="unshare of network + PID namespaces unavailable or not permitted")
def test_ray_sweep_killed_and_resubmitted_skips_finished_runs_local_cluster_moto_mock():
    """tests/ray_e2e.py in fresh network (loopback only) and PID namespaces: the first attempt is
    killed once the summary shows a finished run, the second attempt reuses every run the first
    one completed (no task, artifacts untouched) and computes the rest."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS"):
        env.pop(k, None)  # the script sets up its own
    cmd = in_netns([sys.executable, REPO / "tests" / "ray_e2e.py", "--timeout", "420"])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=840,
                          stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "RAY E2E OK" in proc.stdout, out[-12000:]
    assert "attempt 1 killed after" in out and "attempt 2 reused" in out
    assert "resume: finished runs not recomputed" in out
    assert "dashboard lists job quantcore-sweep-e2e" in out and "'ptq:broken'" in out
    assert "[3/3]" in out and "1 of 3 runs failed: broken" in out


def test_flags_are_named_as_fields_but_paths_stay_as_written():
    from quantcore.errors import UserError

    from jobs.ray_sweep import _as_fields

    msg = _as_fields(UserError("the data (--calib-data, --eval-data/--eval-split 'val', --out x): /data/--limit/x"))
    assert msg == "the data (calib_data, eval_data/eval_split 'val', --out x): /data/--limit/x"
