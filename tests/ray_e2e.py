"""End-to-end check of ``jobs.ray_sweep`` on a real local Ray cluster, S3 being moto_server:
a sweep killed after some runs finished and submitted again skips the finished runs.

Meant to run inside fresh network + PID namespaces (tests/test_ray_sweep.py does this), so that
Ray only sees the loopback interface and ``ray stop --force`` can only reach this cluster:

    unshare -n -p -f --mount-proc sh -c 'ip link set lo up && "$0" "$@"' .venv/bin/python tests/ray_e2e.py

Steps: start moto_server on 127.0.0.1, create a bucket, pack a tiny 3-class JPEG dataset into it,
upload two recipes of two different tiny ViTs and a sweep file with three runs (the third names a
recipe that does not exist), ``ray start --head`` on 127.0.0.1 (2 CPUs, no GPU).

Attempt 1: ``python -m jobs.ray_sweep ... --gpus-per-task 0 --cpus-per-task 2`` (one run at a
time) with ``ray job submit --no-wait``; as soon as ``summary.json`` in the bucket shows a
finished run, ``ray job stop`` kills the driver (SIGTERM, then SIGKILL: no final summary, the
run in flight dies with it). Checks: the summary left behind says ``state: running`` and lists
the finished run(s); each has a completion manifest written by attempt 1's Ray job.

Attempt 2: the same sweep and ``--out`` (``--gpus-per-task 0``), polled until it ends. Checks:
the job failed *only* because of the broken run (exit 1, summary says 2 of 3 succeeded, state
finished), both good runs wrote checkpoints, encodings and reports; the runs attempt 1 finished
are ``reused`` (driver log and summary), their manifests and artifacts were not rewritten
(LastModified/ETag unchanged) and attempt 2 ran a task for exactly the other runs (state API,
by job id), each a CPU task (no GPU in its required resources); the dashboard API lists both jobs
and the tasks by name (``ptq:<run>``); the Prometheus endpoint exports the sweep's metrics.
``ray stop --force`` and moto are stopped in ``finally``. Prints ``RAY E2E OK`` and exits 0 on
success; otherwise exits 1 with the reason.
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
from typing import Any, Dict, List, Optional, Tuple

from tiny_data import make_images  # this script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "qc-ray-e2e"
SUBMISSION_ID = "quantcore-sweep-e2e"
ATTEMPT1_ID = SUBMISSION_ID + "-attempt1"
MANIFEST = "_SUCCESS.json"
VARIANTS = {"vit-a": "tiny_a_w8a8", "vit-b": "tiny_b_w8a8"}  # the good runs and their recipe


class E2EFailure(AssertionError):
    pass


def check(cond: Any, msg: str) -> None:
    if not cond:
        raise E2EFailure(msg)


def log(msg: str) -> None:
    print(f"[ray_e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


_GIVEN: set = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768+) and above Ray's worker ports
    (10002-19999): a port the kernel handed out (bind to 0) can be handed out again to one of the many
    Ray processes that bind port 0 before the component it was picked for binds it (seen: the
    dashboard's port taken, "address already in use"). Never the same port twice per process."""
    import random

    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32768)
        if port in _GIVEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free loopback port in 20000-32767")


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


# --- shared by the Ray end-to-end scripts (this one and ray_qat_e2e.py) ------------------------
_AWS_ENV_DROP = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "HTTP_PROXY", "HTTPS_PROXY",
                 "http_proxy", "https_proxy", "RAY_ADDRESS")


def start_moto(work: Path, drop_env: Tuple[str, ...] = ()) -> Tuple[subprocess.Popen, str]:
    """moto_server on a free 127.0.0.1 port (log in ``work/moto.log``) and this process's AWS
    environment pointed at it, nothing inherited from the caller's; returns (process, endpoint)."""
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
    for k in _AWS_ENV_DROP + drop_env:
        os.environ.pop(k, None)
    return moto, endpoint


def ray_head(work: Path, num_cpus: int, extra_env: Optional[Dict[str, str]] = None
             ) -> Tuple[List[str], Dict[str, str], int, int]:
    """The `ray start --head` command (loopback only, dashboard and metrics on free ports, temp dir in
    ``work``) and the environment for it and the jobs; returns (command, env, dashboard port,
    metrics port)."""
    gcs, dash, metrics_port = free_port(), free_port(), free_port()
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    })
    env.update(extra_env or {})
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--metrics-export-port", str(metrics_port), "--num-cpus", str(num_cpus), "--num-gpus", "0",
           "--object-store-memory", str(100 * 1024 * 1024), "--temp-dir", str(work / "ray"),
           "--disable-usage-stats"]
    return cmd, env, dash, metrics_port


def stop_cluster(moto: Optional[subprocess.Popen], ray_start: Optional[subprocess.Popen], ray_started: bool,
                 env: Dict[str, str]) -> None:
    """Stop what the script started, by PID (and `ray stop --force`, inside the test's PID namespace)."""
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
        moto, endpoint = start_moto(work)
        # --- Ray cluster, started in the background while the data is packed -------------------
        ray_cmd, env, dash, metrics_port = ray_head(work, num_cpus=2)
        ray = ray_cmd[0]
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
                # fails inside its task (a recipe that does not load is refused before Ray starts)
                {"name": "broken", "recipe": f"s3://{BUCKET}/recipes/a.yaml",
                 "calib_data": f"s3://{BUCKET}/missing-data"},
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

        from ray.job_submission import JobStatus, JobSubmissionClient
        from ray.util.state import list_tasks

        client = JobSubmissionClient(url)
        entry = ["python", "-m", "jobs.ray_sweep", "--sweep", sweep_uri, "--out", out, "--gpus-per-task", "0"]

        def s3_get(key: str) -> bytes:
            return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()

        def stamps(key: str) -> tuple:
            head = s3.head_object(Bucket=BUCKET, Key=key)
            return head["LastModified"], head["ETag"]

        def wait_terminal(sub_id: str) -> Any:
            deadline = time.monotonic() + args.timeout
            status = client.get_job_status(sub_id)
            while not status.is_terminal():
                check(time.monotonic() < deadline, f"job {sub_id} still {status} after {args.timeout:.0f} s")
                time.sleep(1)
                status = client.get_job_status(sub_id)
            return status

        # --- attempt 1: one run at a time (2 CPUs per task), killed once the summary shows a finished run
        t_submit = time.monotonic()
        run([ray, "job", "submit", "--address", url, "--submission-id", ATTEMPT1_ID, "--no-wait", "--"]
            + entry + ["--cpus-per-task", "2"], env, timeout=120)
        deadline, first = time.monotonic() + args.timeout, None
        while first is None:
            check(time.monotonic() < deadline, f"no run finished within {args.timeout:.0f} s")
            check(not client.get_job_status(ATTEMPT1_ID).is_terminal(),
                  f"attempt 1 ended before a run finished:\n{client.get_job_logs(ATTEMPT1_ID)[-4000:]}")
            try:
                partial = json.loads(s3_get("runs/e2e/summary.json"))
                first = partial if partial["runs_succeeded"] >= 1 else None
            except s3.exceptions.NoSuchKey:
                pass
            if first is None:
                time.sleep(0.5)
        client.stop_job(ATTEMPT1_ID)  # the driver gets SIGTERM, then SIGKILL: no final summary
        status1 = wait_terminal(ATTEMPT1_ID)
        job1 = client.get_job_info(ATTEMPT1_ID).job_id
        check(status1 == JobStatus.STOPPED, f"attempt 1: expected STOPPED, got {status1} (finished before the kill)")
        # a retried RayJob starts once the old cluster is gone: wait until no task of attempt 1 runs
        deadline = time.monotonic() + 90
        while list_tasks(address=url, filters=[("job_id", "=", job1), ("state", "=", "RUNNING")], limit=100):
            check(time.monotonic() < deadline, "tasks of the stopped attempt 1 still running after 90 s")
            time.sleep(1)
        killed = json.loads(s3_get("runs/e2e/summary.json"))
        check(killed["schema"] == "quantcore.sweep-summary/2" and killed["state"] == "running",
              f"summary after the kill: {killed.get('schema')} {killed.get('state')}")
        finished = sorted(r["name"] for r in killed["runs"] if r["status"] == "succeeded")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/e2e/").get("Contents", [])]
        complete = sorted(k.split("/")[2] for k in keys if k.endswith("/" + MANIFEST))
        check(finished and set(finished) <= set(complete),
              f"summary says {finished} finished, manifests exist for {complete}")
        check("broken" not in complete, "a failed run has a completion manifest")
        damaged = None
        if len(complete) == len(VARIANTS):
            # tiny runs are quick: both may have finished before the kill. Then the one finished last
            # loses an artifact, as if the head had died during its uploads: it must be recomputed.
            damaged = max(complete, key=lambda n: json.loads(s3_get(f"runs/e2e/{n}/{MANIFEST}"))["finished_at"])
            s3.delete_object(Bucket=BUCKET, Key=f"runs/e2e/{damaged}/{VARIANTS[damaged]}/encodings.json")
            log(f"both runs finished before the kill: deleted {damaged}/{VARIANTS[damaged]}/encodings.json")
        reused = [n for n in complete if n != damaged]
        before = {}
        for name in reused:
            manifest = json.loads(s3_get(f"runs/e2e/{name}/{MANIFEST}"))
            check(manifest["ray_job_id"] == job1, f"{name}: manifest written by job {manifest['ray_job_id']}")
            for key in [f"runs/e2e/{name}/{MANIFEST}"] + [f"runs/e2e/{name}/{a['path']}"
                                                          for a in manifest["artifacts"]]:
                before[key] = stamps(key)
        log(f"attempt 1 killed after {complete} finished (summary state {killed['state']}, "
            f"{killed['runs_succeeded']} succeeded, {killed['runs_pending']} pending)")

        # --- attempt 2: the same sweep and --out, resubmitted -------------------------------------
        run([ray, "job", "submit", "--address", url, "--submission-id", SUBMISSION_ID, "--no-wait", "--"]
            + entry, env, timeout=120)
        status = wait_terminal(SUBMISSION_ID)
        logs = client.get_job_logs(SUBMISSION_ID)
        log(f"job {SUBMISSION_ID}: {status} after {time.monotonic() - t_submit:.0f} s; driver log tail:\n"
            + logs[-6000:])

        # --- checks ---------------------------------------------------------------------------------
        # The broken run makes the sweep exit 1 (FAILED) after the others finished.
        check(status == JobStatus.FAILED, f"expected the job to fail because of run 'broken', got {status}")
        check("1 of 3 runs failed: broken" in logs, "driver log lacks '1 of 3 runs failed: broken'")
        info = client.get_job_info(SUBMISSION_ID)
        check("exit code 1" in (info.message or ""), f"job message does not say exit code 1: {info.message!r}")
        job2 = info.job_id

        summary = json.loads(s3_get("runs/e2e/summary.json"))
        check(summary["schema"] == "quantcore.sweep-summary/2" and summary["state"] == "finished",
              f"summary schema/state {summary.get('schema')} {summary.get('state')}")
        check((summary["runs_total"], summary["runs_succeeded"], summary["runs_failed"], summary["runs_pending"])
              == (3, 2, 1, 0), f"summary counts {summary['runs_total']}/{summary['runs_succeeded']}/"
              f"{summary['runs_failed']}/{summary['runs_pending']}")
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
        check(broken["status"] == "failed" and "missing-data" in (broken["error"] or ""),
              f"broken run: {broken['status']} {broken['error']}")
        md = s3_get("runs/e2e/summary.md").decode()
        check("| vit-a | succeeded | tiny_a_w8a8 |" in md and "**broken**" in md, "summary.md content:\n" + md)
        log("bucket: reports, checkpoints, encodings and summary present")

        # Resume: the runs attempt 1 completed were reused, untouched; the others were computed by attempt 2.
        computed = [n for n in by_name if n not in reused]
        check(summary["runs_reused"] == len(reused) and all(by_name[n]["reused"] is (n in reused) for n in by_name),
              f"reused flags {[(n, r['reused']) for n, r in by_name.items()]}, complete after attempt 1 {reused}")
        for name in reused:
            check(f"] {name}: reused, complete since" in logs, f"attempt 2 log does not say {name} was reused")
        if damaged:
            needle = f"{damaged}: recomputing: artifact {out}/{damaged}/{VARIANTS[damaged]}/encodings.json is missing"
            check(needle in logs, f"attempt 2 log lacks {needle!r}")
        for key, stamp in before.items():
            check(stamps(key) == stamp, f"{key} was rewritten by attempt 2: {stamp} -> {stamps(key)}")
        for name in computed:
            if by_name[name]["status"] == "succeeded":
                manifest = json.loads(s3_get(f"runs/e2e/{name}/{MANIFEST}"))
                check(manifest["ray_job_id"] == job2, f"{name}: manifest of job {manifest['ray_job_id']}, not {job2}")
        tasks = list_tasks(address=url, filters=[("name", "!=", "")], limit=1000, detail=True)
        ptq = [t for t in tasks if t.name.startswith("ptq:")]
        ran2 = sorted(t.name[4:] for t in ptq if t.job_id == job2)
        check(ran2 == sorted(computed), f"attempt 2 ran tasks for {ran2}, expected exactly {sorted(computed)}")
        for t in ptq:
            if t.job_id == job2:
                check(t.state == "FINISHED", f"task {t.name} of attempt 2: {t.state}")
                check(not (t.required_resources or {}).get("GPU"),
                      f"--gpus-per-task 0 but {t.name} asked {t.required_resources}")
        for name in reused:
            check(any(t.name == f"ptq:{name}" and t.job_id == job1 and t.state == "FINISHED" for t in ptq),
                  f"no finished task ptq:{name} in attempt 1")
        log(f"attempt 2 reused {reused} and computed {computed}")
        log("resume: finished runs not recomputed (no task in attempt 2, artifacts and manifests untouched)")

        # Dashboard: both jobs in the job list, the tasks by name.
        jobs = json.loads(http_get(url + "/api/jobs/"))
        mine = [j for j in jobs if j.get("submission_id") == SUBMISSION_ID]
        check(len(mine) == 1 and "jobs.ray_sweep" in mine[0]["entrypoint"] and mine[0]["status"] == "FAILED",
              f"/api/jobs/ does not list {SUBMISSION_ID} as expected: {json.dumps(jobs)[:2000]}")
        check(any(j.get("submission_id") == ATTEMPT1_ID and j["status"] == "STOPPED" for j in jobs),
              f"/api/jobs/ does not list {ATTEMPT1_ID} as STOPPED")
        names = sorted({t.name for t in ptq})
        check(names == ["ptq:broken", "ptq:vit-a", "ptq:vit-b"], f"ptq tasks in the state API: {names}")
        log(f"dashboard lists job {SUBMISSION_ID} and tasks {names}")

        # Prometheus endpoint of the node: the sweep's metrics (exported every few seconds).
        wanted = ("ray_quantcore_sweep_images_processed", "ray_quantcore_sweep_top1")
        metric_run = next(n for n in computed if by_name[n]["status"] == "succeeded")  # attempt 1's workers are gone
        text, deadline = "", time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                text = http_get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
            except OSError:
                text = ""
            if all(w in text for w in wanted) and f'run="{metric_run}"' in text:
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
        stop_cluster(moto, ray_start, ray_started, env)
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
