"""End-to-end check of ``jobs.ray_qat``: Ray Train QAT with 2 workers, checkpoints in S3 (moto_server),
one worker killed mid-training, automatic resume, same final weights as an uninterrupted run.

Meant to run inside fresh network + PID namespaces (tests/test_ray_qat.py does this), so that Ray
only sees the loopback interface and ``ray stop --force`` can only reach this cluster:

    unshare -n -p -f --mount-proc sh -c 'ip link set lo up && "$0" "$@"' .venv/bin/python tests/ray_qat_e2e.py

Steps: start moto_server on 127.0.0.1, create a bucket, pack a tiny 4-class 28x28 grayscale dataset
into it (64 train / 32 val images), upload a recipe with a ``qat:`` section (a 1-block
``quantcore/vit_fmnist``, 60 steps of global batch 16, checkpoint every 5 steps and at each epoch
end) and seeded random FP32 weights. ``ray start --head`` on 127.0.0.1; the reference, the same QAT
with ``torchrun --nproc_per_node 2 -m quantcore.cli qat`` (gloo, 2 ranks, uninterrupted), runs
alongside. ``python -m jobs.ray_qat --num-workers 2 --max-failures 2 --storage-path s3://.../ray``
is submitted as a Ray job; as soon as a training checkpoint is in the bucket, the Ray Train worker
of rank 1 (its PID from the dashboard's Train API) is killed with SIGKILL. Checks: the job
succeeds, Ray ran a second attempt that logged ``resuming from .../step-N.pt`` with N > 0, the
artifacts are in S3 (model.qc.pt, encodings.json, report.json with its qat section, metrics.jsonl),
the final weights are bit-identical to the torchrun reference's, the dashboard lists the job and
the Train run with an errored and a finished attempt, the Prometheus endpoint exports
``ray_quantcore_qat_loss`` and the driver printed the last loss it ``ray.train.report``-ed. Prints
``RAY QAT E2E OK`` and exits 0 on success; otherwise exits 1 with the reason.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

# this script's folder is on sys.path
from ray_e2e import (E2EFailure, check, free_port, http_get, ray_head, run, start_moto, stop_cluster,
                     wait_http)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "qc-ray-qat"
SUBMISSION_ID = "quantcore-qat-e2e"
RECIPE_NAME = "tiny_qat"
CLASSES = ["a", "b", "c", "d"]
MAX_STEPS = 60

RECIPE: Dict[str, Any] = {
    "name": RECIPE_NAME,
    "model": {"name": "quantcore/vit_fmnist", "num_classes": len(CLASSES), "kwargs": {"depth": 1}},
    "placement": {"family": "vit", "mode": "ft1"},
    "calibration": {"method": "max", "num_batches": 2, "batch_size": 16},
    "qat": {"epochs": 15, "max_steps": MAX_STEPS, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 1e-3},
            "checkpoint_every": 5, "keep_checkpoints": 2, "log_every": 1, "num_workers": 0,
            "augment": {"kind": "none"}, "seed": 0},
}


def log(msg: str) -> None:
    print(f"[ray_qat_e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tiny_arrays(n_per_class: int, seed: int):
    """uint8 N x 28 x 28 images whose brightness and a stripe position depend on the class."""
    import numpy as np

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(len(CLASSES)):
        for _ in range(n_per_class):
            img = rng.random((28, 28)) * 60 + c * 50
            img[:, 4 + 5 * c: 7 + 5 * c] += 60
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    perm = rng.permutation(len(xs))
    return np.stack(xs)[perm], np.asarray(ys)[perm]


def state_dict_of(data: bytes) -> Dict[str, Any]:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["state_dict"]


def train_runs(url: str) -> List[Dict[str, Any]]:
    """Ray Train V2 runs from the dashboard (the driver must run with RAY_TRAIN_ENABLE_STATE_TRACKING=1:
    jobs.ray_qat sets it)."""
    try:
        return json.loads(http_get(url + "/api/train/v2/runs/v1", timeout=5)).get("train_runs") or []
    except (OSError, ValueError):
        return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=300, help="Seconds the Ray job may take.")
    ap.add_argument("--keep", action="store_true", help="Keep the work directory (logs) for debugging.")
    args = ap.parse_args()

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="qcrq", dir="/tmp"))  # short: Ray's socket paths are limited
    moto: Optional[subprocess.Popen] = None
    ray_start: Optional[subprocess.Popen] = None
    ref: Optional[subprocess.Popen] = None
    ray_started = False
    env: Dict[str, str] = {}
    ok = False
    failure = ""
    timings: Dict[str, float] = {}
    try:
        # --- S3 stand-in ------------------------------------------------------------------------
        moto, endpoint = start_moto(work, drop_env=("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                     "MASTER_PORT"))

        # --- Ray cluster, started in the background ------------------------------------------------
        # the torchrun reference and the Ray workers (1 CPU each) use one thread
        ray_cmd, env, dash, metrics_port = ray_head(work, num_cpus=3, extra_env={"OMP_NUM_THREADS": "1"})
        ray = ray_cmd[0]
        log("$ " + " ".join(ray_cmd))
        ray_started = True  # from here on `ray stop` runs in finally, even if start fails half-way
        ray_start_log = work / "ray_start.log"
        with open(ray_start_log, "wb") as fh:
            ray_start = subprocess.Popen(ray_cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

        # --- data, recipe, FP32 weights ------------------------------------------------------------
        import boto3
        import torch
        import yaml

        sys.path.insert(0, str(REPO))
        from quantcore.data import pack_arrays
        from quantcore.models import vit_fmnist

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        data = f"s3://{BUCKET}/data"
        for split, n, seed in (("train", 16, 1), ("val", 8, 2)):
            x, y = tiny_arrays(n, seed)
            pack_arrays(x, y, data, split, CLASSES, shard_size=32)
        recipe_uri = f"s3://{BUCKET}/recipes/{RECIPE_NAME}.yaml"
        s3.put_object(Bucket=BUCKET, Key=f"recipes/{RECIPE_NAME}.yaml", Body=yaml.safe_dump(RECIPE).encode())
        torch.manual_seed(123)
        buf = io.BytesIO()
        torch.save(vit_fmnist(num_classes=len(CLASSES), depth=1).state_dict(), buf)
        s3.put_object(Bucket=BUCKET, Key="fp32.pt", Body=buf.getvalue())
        fp32 = f"s3://{BUCKET}/fp32.pt"
        common = ["--recipe", recipe_uri, "--data", data, "--eval-split", "val", "--checkpoint", fp32]
        log(f"dataset {data} (64 train / 32 val), recipe {recipe_uri}, FP32 weights {fp32}")

        # --- reference: torchrun, 2 ranks, uninterrupted (in the background, while Ray starts and runs) -----
        t_ref = time.monotonic()
        ref_out = f"s3://{BUCKET}/ref"
        ref_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), "-m", "quantcore.cli", "qat", *common,
                   "--out", ref_out, "--no-progress"]
        log("$ " + " ".join(ref_cmd))
        ref_log = open(work / "reference.log", "wb")
        ref = subprocess.Popen(ref_cmd, env=env, cwd=REPO, stdout=ref_log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)

        try:
            ray_start.wait(timeout=300)
        except subprocess.TimeoutExpired:
            ray_start.kill()
            ray_start.wait(timeout=30)
            raise E2EFailure("`ray start` did not finish within 300 s") from None
        check(ray_start.returncode == 0, f"`ray start` exited with {ray_start.returncode}:\n"
              + ray_start_log.read_text(errors="replace")[-3000:])
        url = f"http://127.0.0.1:{dash}"
        wait_http(url + "/api/version", 120)
        log(f"ray cluster up, dashboard {url}")

        # --- the Ray Train job ---------------------------------------------------------------------------
        out = f"s3://{BUCKET}/qat"
        # Prometheus gauges are scraped while the job runs: Ray drops a worker's metrics some time after
        # the worker exits, so one scrape after the job (and the reference run) ended races that clean-up.
        wanted = ("ray_quantcore_qat_loss", "ray_quantcore_qat_images_per_s", "ray_quantcore_qat_step")
        scraped: Dict[str, str] = {}  # metric name -> its last sample line seen
        stop_scraping = threading.Event()

        def scrape() -> None:
            while not stop_scraping.is_set():
                try:
                    text = http_get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
                except OSError:
                    text = ""
                for line in text.splitlines():
                    name = line.split("{", 1)[0]
                    if name in wanted:
                        scraped[name] = line
                stop_scraping.wait(1.0)

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        t_submit = time.monotonic()
        run([ray, "job", "submit", "--address", url, "--submission-id", SUBMISSION_ID, "--no-wait", "--",
             "python", "-m", "jobs.ray_qat", *common, "--out", out, "--num-workers", "2", "--max-failures", "2",
             "--storage-path", f"s3://{BUCKET}/ray", "--workers", "0"], env, timeout=120)

        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(url)
        deadline = time.monotonic() + args.timeout
        killed: Optional[Dict[str, Any]] = None
        victim: Optional[Dict[str, Any]] = None
        status = client.get_job_status(SUBMISSION_ID)
        next_status = time.monotonic() + 1
        while not status.is_terminal():
            check(time.monotonic() < deadline, f"job still {status} after {args.timeout:.0f} s")
            if killed is None and victim is None:  # rank 1's PID, known as soon as the worker group started
                runs = train_runs(url)
                attempts = (runs[0].get("attempts") or []) if runs else []
                workers = (attempts[-1].get("workers") or []) if attempts else []
                victim = next((w for w in workers if w.get("world_rank") == 1 and w.get("pid")), None)
                if victim is not None:
                    log("Ray Train workers: " + ", ".join(f"rank {w.get('world_rank')} pid {w.get('pid')}"
                                                        for w in workers))
            if killed is None and victim is not None:  # a tight loop: training takes a few seconds only
                listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="qat/").get("Contents") or []
                steps = sorted(int(m.group(1)) for o in listed
                               if (m := re.search(r"checkpoints/step-(\d+)\.pt$", o["Key"])))
                if steps:
                    os.kill(int(victim["pid"]), signal.SIGKILL)  # a Ray worker in our own PID namespace
                    killed = {"pid": int(victim["pid"]), "checkpoints": steps, "at_s": time.monotonic() - t_submit,
                              "finished": any(o["Key"] == "qat/report.json" for o in listed)}
                    log(f"checkpoint(s) {steps} in S3: SIGKILL to Ray Train worker rank 1 (pid {victim['pid']})")
                    check(not killed["finished"], "the run had already written its report when the worker was "
                                                  "killed: the kill came too late to test a resume")
                time.sleep(0.05)
            else:
                time.sleep(0.2 if killed is None else 1)
            if time.monotonic() >= next_status:
                status = client.get_job_status(SUBMISSION_ID)
                next_status = time.monotonic() + 1
        timings["ray_job_s"] = time.monotonic() - t_submit
        logs = client.get_job_logs(SUBMISSION_ID)
        (work / "job.log").write_text(logs)
        log(f"job {SUBMISSION_ID}: {status} after {timings['ray_job_s']:.0f} s; driver log tail:\n" + logs[-5000:])

        try:
            ref.wait(timeout=max(30.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise E2EFailure("the torchrun reference run did not finish in time") from None
        timings["torchrun_reference_s"] = time.monotonic() - t_ref
        ref_text = (work / "reference.log").read_text(errors="replace")
        check(ref.returncode == 0, f"torchrun reference exited with {ref.returncode}:\n{ref_text[-3000:]}")
        log(f"torchrun reference (ran alongside) done after {timings['torchrun_reference_s']:.0f} s: "
            + " | ".join(line.strip() for line in ref_text.splitlines() if "top-1" in line)[:300])

        # --- checks -----------------------------------------------------------------------------------------
        check(killed is not None, "no worker was killed: no checkpoint appeared while the job ran")
        check(status == JobStatus.SUCCEEDED, f"job ended {status}, expected SUCCEEDED")
        resumed = [int(s) for s in re.findall(r"resuming from s3://\S+/qat/checkpoints/step-(\d+)\.pt", logs)]
        check(resumed and resumed[0] > 0, "no 'resuming from .../qat/checkpoints/step-N.pt' in the job log")
        check(min(killed["checkpoints"]) <= resumed[0] < MAX_STEPS,
              f"resumed from step {resumed[0]}, checkpoints seen before the kill: {killed['checkpoints']}")
        log(f"worker group restarted, resumed from step {resumed[0]} (of {MAX_STEPS})")

        def s3_get(key: str) -> bytes:
            return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()

        for key in (f"qat/{RECIPE_NAME}/model.qc.pt", f"qat/{RECIPE_NAME}/encodings.json", "qat/report.json",
                    "qat/report.md", "qat/metrics.jsonl", "qat/ptq/model.qc.pt", "qat/training.png"):
            check(len(s3_get(key)) > 0, f"empty object {key}")
        report = json.loads(s3_get("qat/report.json"))
        qat = report.get("qat") or {}
        check(qat.get("steps") == MAX_STEPS and qat.get("world_size") == 2, f"report qat section: {qat}")
        check({"fp32", f"{RECIPE_NAME}:ptq", RECIPE_NAME} <= set(report.get("results") or {}),
              f"report results {set(report.get('results') or {})}")
        metrics = [json.loads(line) for line in s3_get("qat/metrics.jsonl").decode().splitlines() if line.strip()]
        losses = [m["step"] for m in metrics if "loss" in m]
        check(losses == list(range(1, MAX_STEPS + 1)), f"metrics.jsonl loss steps {losses}")
        enc = json.loads(s3_get(f"qat/{RECIPE_NAME}/encodings.json"))
        check(enc.get("quantizers"), "empty encodings")
        log("bucket: model.qc.pt, encodings.json, report.json (qat section), metrics.jsonl present")

        a = state_dict_of(s3_get(f"qat/{RECIPE_NAME}/model.qc.pt"))
        b = state_dict_of(s3_get(f"ref/{RECIPE_NAME}/model.qc.pt"))
        check(a.keys() == b.keys(), f"state_dict keys differ: {sorted(set(a) ^ set(b))[:6]}")
        diff = [k for k in a if not torch.equal(a[k], b[k])]
        worst = max(((a[k].float() - b[k].float()).abs().max().item() for k in diff), default=0.0)
        check(not diff, f"{len(diff)} of {len(a)} tensors differ from the torchrun reference (max abs {worst:.3g}), "
                        f"e.g. {diff[:5]}")
        ref_report = json.loads(s3_get("ref/report.json"))
        check(report["results"][RECIPE_NAME]["top1"] == ref_report["results"][RECIPE_NAME]["top1"],
              "QAT top-1 differs from the reference")
        log(f"final weights bit-identical to the uninterrupted torchrun run ({len(a)} tensors)")

        # Dashboard: the job, and the Train run with its two attempts.
        jobs = json.loads(http_get(url + "/api/jobs/"))
        mine = [j for j in jobs if j.get("submission_id") == SUBMISSION_ID]
        check(len(mine) == 1 and "jobs.ray_qat" in mine[0]["entrypoint"] and mine[0]["status"] == "SUCCEEDED",
              f"/api/jobs/ does not list {SUBMISSION_ID} as expected: {json.dumps(jobs)[:2000]}")
        runs = train_runs(url)
        check(len(runs) == 1, f"/api/train/v2/runs/v1 lists {len(runs)} runs")
        attempts = runs[0].get("attempts") or []
        check(len(attempts) >= 2, f"Train run {runs[0].get('name')} has {len(attempts)} attempt(s), expected >= 2")
        check(runs[0].get("status") == "FINISHED" and attempts[0].get("status") == "ERRORED",
              f"Train run status {runs[0].get('status')}, attempts {[t.get('status') for t in attempts]}")
        log(f"dashboard lists job {SUBMISSION_ID} and Train run {runs[0].get('name')} with {len(attempts)} attempts "
            f"({', '.join(str(t.get('status')) for t in attempts)})")

        # Metrics: reported to Ray Train (driver's last metrics) and exported for Prometheus.
        reported = re.search(r"(\d+) ray\.train reports, the last \{[^}]*'loss': [0-9.]+", logs)
        check(reported is not None and int(reported.group(1)) > 0,
              "driver did not print the last ray.train-reported loss")
        t_deadline = time.monotonic() + 30  # the agent exports every few seconds: allow a last scrape
        while time.monotonic() < t_deadline and not all(w in scraped for w in wanted):
            time.sleep(1)
        stop_scraping.set()
        scraper.join(timeout=30)
        missing = [w for w in wanted if w not in scraped]
        check(not missing, f"metrics endpoint never showed {missing} while the job ran")
        log("metrics: " + "; ".join(scraped[w] for w in wanted)[:600])
        timings["total_s"] = time.monotonic() - t_start
        log("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
            + f"; killed at {killed['at_s']:.0f} s after submit")
        ok = True
    except E2EFailure as err:
        failure = f"RAY QAT E2E FAILED: {err}"
        print(failure, flush=True)
    except Exception:  # noqa: BLE001
        failure = "RAY QAT E2E FAILED with an exception:\n" + traceback.format_exc()
        print(failure, flush=True)
    finally:
        if ref is not None and ref.poll() is None:
            ref.kill()  # by PID: our own torchrun reference
            ref.wait(timeout=30)
        stop_cluster(moto, ray_start, ray_started, env)
        if not ok:
            for f in sorted((work / "ray").glob("session_latest/logs/**/*")):
                if f.is_file() and f.name.startswith(("job-driver", "worker-", "ray-train", "controller")) \
                        and f.suffix in (".log", ".err", ".out"):
                    tail = f.read_text(errors="replace")[-1500:]
                    if tail.strip():
                        print(f"--- {f.name} (tail)\n{tail}", flush=True)
        if args.keep:
            print(f"work directory kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if ok:
        print("RAY QAT E2E OK", flush=True)
        return 0
    print("\n" + failure[-3000:], flush=True)  # again after the log tails, for whoever reads the end
    return 1


if __name__ == "__main__":
    sys.exit(main())
