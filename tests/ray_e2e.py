"""End-to-end check of ``jobs.ray_sweep`` on a real local Ray cluster, S3 being moto_server.

Meant to run inside fresh network + PID namespaces (tests/test_jobs.py does this), so that Ray
only sees the loopback interface and ``ray stop --force`` can only reach this cluster:

    unshare -n -p -f --mount-proc sh -c 'ip link set lo up && "$0" "$@"' .venv/bin/python tests/ray_e2e.py

Steps: start moto_server on 127.0.0.1, create a bucket, pack a tiny 3-class JPEG dataset into it,
upload two recipes of two different tiny ViTs and a sweep file with three runs (the third names a
recipe that does not exist), ``ray start --head`` on 127.0.0.1, submit
``python -m jobs.ray_sweep ... --gpus-per-task 0`` with ``ray job submit --no-wait``, poll until it
ends, then check: the job failed *only* because of the broken run (exit 1, summary says 2 of 3
succeeded), both good runs wrote checkpoints, encodings and reports, summary.json/summary.md are
in the bucket, the dashboard API lists the job and the tasks by name (``ptq:<run>``) and the
Prometheus endpoint exports the sweep's metrics. ``ray stop --force`` and moto are stopped in
``finally``. Prints ``RAY E2E OK`` and exits 0 on success; otherwise exits 1 with the reason.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

from tiny_data import make_images  # this script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "qc-ray-e2e"
SUBMISSION_ID = "quantcore-sweep-e2e"


class E2EFailure(AssertionError):
    pass


def check(cond: Any, msg: str) -> None:
    if not cond:
        raise E2EFailure(msg)


def log(msg: str) -> None:
    print(f"[ray_e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return r.read()


def wait_http(url: str, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise E2EFailure(f"process for {url} exited with {proc.returncode}")
        try:
            http_get(url, timeout=3)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise E2EFailure(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.3)


def recipe(name: str, depth: int, patch: int, mode: str, method: str) -> Dict[str, Any]:
    return {"name": name,
            "model": {"name": "quantcore/vit_fmnist", "num_classes": 3, "in_chans": 3, "img_size": 32,
                      "kwargs": {"patch_size": patch, "depth": depth}},
            "placement": {"family": "vit", "mode": mode},
            "calibration": {"method": method, "num_batches": 2, "batch_size": 4}}


def run(cmd: List[str], env: Dict[str, str], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise E2EFailure(f"{' '.join(cmd[:3])} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=420, help="Seconds the Ray job may take.")
    ap.add_argument("--keep", action="store_true", help="Keep the work directory (logs) for debugging.")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qcray", dir="/tmp"))  # short: Ray's socket paths are limited
    moto: Optional[subprocess.Popen] = None
    ray_started = False
    ray_start: Optional[subprocess.Popen] = None
    env: Dict[str, str] = {}
    ok = False
    try:
        # --- S3 stand-in ----------------------------------------------------------------------
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        moto_log = open(work / "moto.log", "wb")
        moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=moto_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_http(endpoint + "/", 60, moto)
        log(f"moto_server pid {moto.pid} on {endpoint}")
        os.environ.update({
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        })
        for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "HTTP_PROXY", "HTTPS_PROXY",
                  "http_proxy", "https_proxy", "RAY_ADDRESS"):
            os.environ.pop(k, None)
        # --- Ray cluster, started in the background while the data is packed -------------------
        gcs, dash, metrics_port = free_port(), free_port(), free_port()
        env = dict(os.environ)
        env.update({
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        })
        ray = str(BIN / "ray")
        ray_cmd = [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
                   "--metrics-export-port", str(metrics_port), "--num-cpus", "2", "--num-gpus", "0",
                   "--object-store-memory", str(100 * 1024 * 1024), "--temp-dir", str(work / "ray"),
                   "--disable-usage-stats"]
        log("$ " + " ".join(ray_cmd))
        ray_started = True  # from here on `ray stop` runs in finally, even if start fails half-way
        # output to a file, not a pipe: daemons that keep an inherited pipe open would block reading it
        ray_start_log = work / "ray_start.log"
        with open(ray_start_log, "wb") as fh:
            ray_start = subprocess.Popen(ray_cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

        import boto3
        import yaml

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)

        # --- data, recipes, sweep ---------------------------------------------------------------
        sys.path.insert(0, str(REPO))
        from quantcore.cli import main as quantcore_main

        data = f"s3://{BUCKET}/data"
        rc = quantcore_main(["pack", str(make_images(work / "imgs")), data, "--split", "train", "--split", "val",
                             "--shard-size", "5"])
        check(rc == 0, f"quantcore pack exited with {rc}")
        recipes = {"a": recipe("tiny_a_w8a8", 1, 8, "ft1", "mse"), "b": recipe("tiny_b_w8a8", 2, 4, "ft2", "max")}
        for key, r in recipes.items():
            s3.put_object(Bucket=BUCKET, Key=f"recipes/{key}.yaml", Body=yaml.safe_dump(r).encode())
        sweep = {
            "description": "ray_e2e: two tiny ViTs and a broken run",
            "defaults": {"calib_data": data, "eval_split": "val", "limit": 9, "batch_size": 4},
            "runs": [
                {"name": "vit-a", "recipe": f"s3://{BUCKET}/recipes/a.yaml"},
                {"name": "vit-b", "recipes": [f"s3://{BUCKET}/recipes/b.yaml"], "limit": 12},
                {"name": "broken", "recipe": f"s3://{BUCKET}/recipes/missing.yaml"},
            ],
        }
        sweep_uri = f"s3://{BUCKET}/sweeps/e2e.yaml"
        s3.put_object(Bucket=BUCKET, Key="sweeps/e2e.yaml", Body=yaml.safe_dump(sweep).encode())
        out = f"s3://{BUCKET}/runs/e2e"

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

        t_submit = time.monotonic()
        run([ray, "job", "submit", "--address", url, "--submission-id", SUBMISSION_ID, "--no-wait", "--",
             "python", "-m", "jobs.ray_sweep", "--sweep", sweep_uri, "--out", out, "--gpus-per-task", "0"],
            env, timeout=120)

        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(url)
        deadline = time.monotonic() + args.timeout
        status = client.get_job_status(SUBMISSION_ID)
        while not status.is_terminal():
            check(time.monotonic() < deadline, f"job still {status} after {args.timeout:.0f} s")
            time.sleep(2)
            status = client.get_job_status(SUBMISSION_ID)
        logs = client.get_job_logs(SUBMISSION_ID)
        log(f"job {SUBMISSION_ID}: {status} after {time.monotonic() - t_submit:.0f} s; driver log tail:\n"
            + logs[-6000:])

        # --- checks ---------------------------------------------------------------------------------
        # The broken run makes the sweep exit 1 (FAILED) after the others finished.
        check(status == JobStatus.FAILED, f"expected the job to fail because of run 'broken', got {status}")
        check("1 of 3 runs failed: broken" in logs, "driver log lacks '1 of 3 runs failed: broken'")
        info = client.get_job_info(SUBMISSION_ID)
        check("exit code 1" in (info.message or ""), f"job message does not say exit code 1: {info.message!r}")

        def s3_get(key: str) -> bytes:
            return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()

        summary = json.loads(s3_get("runs/e2e/summary.json"))
        check(summary["schema"] == "quantcore.sweep-summary/1", f"summary schema {summary.get('schema')}")
        check((summary["runs_total"], summary["runs_succeeded"], summary["runs_failed"]) == (3, 2, 1),
              f"summary counts {summary['runs_total']}/{summary['runs_succeeded']}/{summary['runs_failed']}")
        by_name = {r["name"]: r for r in summary["runs"]}
        check(list(by_name) == ["vit-a", "vit-b", "broken"], f"summary runs {list(by_name)}")
        for run_name, variant, count in (("vit-a", "tiny_a_w8a8", 9), ("vit-b", "tiny_b_w8a8", 12)):
            r = by_name[run_name]
            check(r["status"] == "succeeded", f"{run_name}: {r['status']} {r.get('error')}")
            check(r["eval_count"] == count, f"{run_name}: eval_count {r['eval_count']} != {count}")
            v = r["variants"][variant]
            for key in ("top1", "delta_top1", "agreement", "sqnr_db"):
                check(isinstance(v[key], (int, float)), f"{run_name}.{variant}.{key} = {v[key]!r}")
            check(isinstance(r["fp32_top1"], (int, float)) and r["duration_s"] > 0, f"{run_name}: {r}")
            check(v["checkpoint"] == f"{out}/{run_name}/{variant}/model.qc.pt", f"checkpoint URI {v['checkpoint']}")
            for key in (f"{run_name}/report.json", f"{run_name}/report.md", f"{run_name}/{variant}/model.qc.pt",
                        f"{run_name}/{variant}/encodings.json", f"{run_name}/{variant}/report.json"):
                check(len(s3_get(f"runs/e2e/{key}")) > 0, f"empty object {key}")
            report = json.loads(s3_get(f"runs/e2e/{run_name}/report.json"))
            check(set(report["results"]) == {"fp32", variant}, f"{run_name} report results {set(report['results'])}")
            check(report["results"][variant]["top1"] == v["top1"], f"{run_name}: summary top-1 != report top-1")
            enc = json.loads(s3_get(f"runs/e2e/{run_name}/{variant}/encodings.json"))
            check(enc["quantizers"], f"{run_name}: empty encodings")
        broken = by_name["broken"]
        check(broken["status"] == "failed" and "missing.yaml" in (broken["error"] or ""),
              f"broken run: {broken['status']} {broken['error']}")
        md = s3_get("runs/e2e/summary.md").decode()
        check("| vit-a | succeeded | tiny_a_w8a8 |" in md and "**broken**" in md, "summary.md content:\n" + md)
        log("bucket: reports, checkpoints, encodings and summary present")

        # Dashboard: the job in the job list, the tasks by name.
        jobs = json.loads(http_get(url + "/api/jobs/"))
        mine = [j for j in jobs if j.get("submission_id") == SUBMISSION_ID]
        check(len(mine) == 1 and "jobs.ray_sweep" in mine[0]["entrypoint"] and mine[0]["status"] == "FAILED",
              f"/api/jobs/ does not list {SUBMISSION_ID} as expected: {json.dumps(jobs)[:2000]}")
        from ray.util.state import list_tasks

        names = {t.name: t.state for t in list_tasks(address=url, filters=[("name", "!=", "")], limit=1000)}
        for n in ("ptq:vit-a", "ptq:vit-b", "ptq:broken"):
            check(names.get(n) == "FINISHED", f"task {n} in the state API: {names.get(n)} (all: {names})")
        log(f"dashboard lists job {SUBMISSION_ID} and tasks {sorted(n for n in names if n.startswith('ptq:'))}")

        # Prometheus endpoint of the node: the sweep's metrics (exported every few seconds).
        wanted = ("ray_quantcore_sweep_images_processed", "ray_quantcore_sweep_top1")
        text, deadline = "", time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                text = http_get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
            except OSError:
                text = ""
            if all(w in text for w in wanted) and 'run="vit-b"' in text:
                break
            time.sleep(2)
        missing = [w for w in wanted if w not in text]
        check(not missing, f"metrics endpoint lacks {missing}")
        log("metrics: " + "; ".join(line for line in text.splitlines()
                                    if line.startswith("ray_quantcore_sweep_top1{"))[:600])
        ok = True
    except E2EFailure as err:
        print(f"RAY E2E FAILED: {err}", flush=True)
    except Exception:  # noqa: BLE001
        print("RAY E2E FAILED with an exception:\n" + traceback.format_exc(), flush=True)
    finally:
        if ray_start is not None and ray_start.poll() is None:
            ray_start.kill()  # by PID: our own `ray start`, if it is still starting
            ray_start.wait(timeout=30)
        if ray_started:
            try:
                subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env or None, capture_output=True,
                               timeout=120, stdin=subprocess.DEVNULL)
            except Exception as err:  # noqa: BLE001
                print(f"ray stop failed: {err}", flush=True)
        if moto is not None:
            moto.terminate()  # by PID
            try:
                moto.wait(timeout=15)
            except subprocess.TimeoutExpired:
                moto.kill()
                moto.wait(timeout=15)
        if not ok:
            for f in sorted((work / "ray").glob("session_latest/logs/*")):
                if f.name.startswith(("job-driver", "worker-")) and f.suffix in (".log", ".err", ".out"):
                    tail = f.read_text(errors="replace")[-1500:]
                    if tail.strip():
                        print(f"--- {f.name} (tail)\n{tail}", flush=True)
        if args.keep:
            print(f"work directory kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if ok:
        print("RAY E2E OK", flush=True)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
