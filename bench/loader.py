"""Loader benchmark: images/s of ``make_loader`` over a local ImageNet folder vs. zip shards on S3.

    python -m bench.loader [--quick] [--images N] [--reps R] [--workers 1,2] [--no-diagnose]

1. Generates N ImageNet-like JPEGs (500x375, smooth random content plus blurred grain so they
   compress like photos to ~100 KB at quality 90; 10 classes) into a temporary local
   ``<root>/val/<class>/*.JPEG`` folder.
2. Starts ``moto_server`` on 127.0.0.1 (a subprocess, stopped by PID at the end), points boto3 at
   it through ``AWS_ENDPOINT_URL`` and test credentials, and packs the folder with
   ``quantcore.data.pack`` into zip shards (100 images each) in a bucket.
3. Iterates ``make_loader(dataset, batch_size=32, num_workers=w)`` over the whole split, images
   decoded and transformed by the eval transform of timm ``resnet50.tv_in1k`` (random weights;
   resize 256 bilinear, center crop 224, normalize), for every worker count ``w`` and:
     * ``local``  : the local folder dataset;
     * ``s3``     : ``open_dataset("s3://...")`` on the shards, default settings, no cache dir;
     * ``s3_cold``: the same with a fresh ``cache_dir`` (first pass, fills the block cache);
     * ``s3_warm``: the same ``cache_dir`` again (second pass, blocks come from local disk);
   plus ``decode``: the same decode + transform in the main process from bytes in memory, no
   loader, one thread (the single-core limit of the pipeline on this machine), and, unless
   ``--no-diagnose``, the same planned S3 reads through the other transports that are installed
   (``s3torchconnector``, ``fsspec``/``s3fs``: ``pip install quantcore[s3torch]`` / ``s3fs``) and
   the previous reader (``batch_reads=False``: 1 MiB blocks on demand) for the before/after.
   One warm-up pass of each is excluded; then every repetition runs all of them in a rotated
   order (interleaved) and the medians over repetitions are reported. The S3/local ratio is taken
   per repetition (paired) and its median reported.

Beside wall-clock img/s it records, per pass, the CPU seconds of the loader (main process +
reaped workers) and of ``moto_server`` (from ``/proc``), and the S3 traffic: GetObject /
HeadObject calls and bytes fetched, counted by wrapping the transports of ``quantcore.io.ranged``
and ``quantcore.io._s3`` in this process before the workers are forked (the ``fork`` start method is used: ``quantcore.io`` re-creates
its boto3 client after a fork and ``ZipShardDataset`` re-opens its zip handles per process).

Results: ``bench/results/loader-cpu.json`` (``loader-cpu-quick.json`` for ``--quick``) and the
section between the ``bench:loader`` markers in ``docs/benchmarks.md`` (the rest of that file
is left alone). Nothing here asserts a timing threshold.
"""
from __future__ import annotations

from bench._docs import finish, new_record, write_section

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
START = "<!-- bench:loader:start -->"
END = "<!-- bench:loader:end -->"

TARGET_RATIO = 0.95  # S3 / local images/s
TARGET_BYTES = 1.05  # bytes fetched / shard bytes
MODEL = "resnet50.tv_in1k"
NUM_CLASSES = 10
IMG_W, IMG_H = 500, 375
BUCKET = "qc-bench-loader"
KINDS = ("local", "s3", "s3_cold", "s3_warm")
# transports compared on the same planned batch reads (quantcore.io.ranged.TRANSPORTS), plus the
# previous reader (no planning: 1 MiB blocks on demand) for the before/after
TRANSPORT_KINDS = {"s3": "boto3", "s3_s3tc": "s3torchconnector", "s3_fsspec": "fsspec"}
DIAG_KINDS = ("s3_s3tc", "s3_fsspec", "s3_blocks")
LABELS = {"local": "local folder", "s3": "S3 shards (boto3, planned)", "s3_cold": "S3 + cache, 1st pass",
          "s3_warm": "S3 + cache, 2nd pass", "decode": "in-process decode, 1 core",
          "s3_s3tc": "S3, s3torchconnector (planned)", "s3_fsspec": "S3, fsspec/s3fs (planned)",
          "s3_blocks": "S3, previous reader (1 MiB blocks on demand)"}

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def make_jpeg(rng: Any) -> bytes:
    """One 500x375 photo-like JPEG: smooth colour fields + mid-frequency blobs + blurred grain."""
    import numpy as np
    from PIL import Image, ImageFilter

    def up(h: int, w: int) -> Any:
        small = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        return np.asarray(small.resize((IMG_W, IMG_H), Image.BICUBIC), np.float32)

    a = 0.6 * up(6, 8) + 0.4 * up(47, 63)
    grain = rng.normal(0.0, float(rng.uniform(38, 52)), (IMG_H, IMG_W))
    g = Image.fromarray(np.clip(grain + 128, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
    a = np.clip(a + (np.asarray(g, np.float32) - 128)[..., None], 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def generate_folder(root: Path, n: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        cls = f"n{i % NUM_CLASSES:08d}"
        d = root / "val" / cls
        d.mkdir(parents=True, exist_ok=True)
        data = make_jpeg(rng)
        (d / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(data)
        sizes.append(len(data))
    return {"images": n, "classes": NUM_CLASSES, "width": IMG_W, "height": IMG_H, "jpeg_quality": 90,
            "mean_kb": sum(sizes) / len(sizes) / 1e3, "min_kb": min(sizes) / 1e3, "max_kb": max(sizes) / 1e3,
            "total_mb": sum(sizes) / 1e6}


# --------------------------------------------------------------------------------------------------
# moto_server
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(log_path: Path):
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        raise SystemExit(f"moto_server not found next to {sys.executable}")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {proc.returncode}; see {log_path}")
                try:
                    with opener.open(endpoint + "/", timeout=2) as r:
                        if r.status < 500:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {endpoint}")
                time.sleep(0.1)
            yield proc, endpoint
        finally:
            proc.terminate()  # by PID
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU of this process plus its reaped children (the DataLoader workers once joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# --------------------------------------------------------------------------------------------------
# S3 traffic counters (shared with forked workers)
# --------------------------------------------------------------------------------------------------
class Traffic:
    """Counts S3 calls, GET bytes and the seconds spent waiting on them, in this process and its
    forked children (DataLoader workers): GETs at the transport level (every factory of
    ``quantcore.io.ranged.TRANSPORTS`` wrapped, so boto3, s3torchconnector and fsspec count alike),
    HEADs by wrapping ``quantcore.io._s3.call``, client creations by wrapping ``_s3.get_client``.
    Times are wall-clock seconds summed over processes/threads (microseconds internally)."""

    FIELDS = ("get_object", "get_bytes", "head_object", "other_calls", "get_us", "head_us",
              "client_inits", "client_init_us")

    def __init__(self) -> None:
        from quantcore.io import _s3, ranged

        self._arr = mp.get_context("fork").Array("q", len(self.FIELDS))
        orig_call, orig_client = _s3.call, _s3.get_client
        arr = self._arr
        ix = {k: i for i, k in enumerate(self.FIELDS)}

        def add(**kv: int) -> None:
            with arr.get_lock():
                for k, v in kv.items():
                    arr[ix[k]] += v

        def call(op: str, uri: str, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig_call(op, uri, **kw)
            finally:
                if op == "head_object":
                    add(head_object=1, head_us=int(1e6 * (time.perf_counter() - t0)))
                elif op != "get_object":
                    add(other_calls=1)

        def counted(factory: Callable) -> Callable:
            def make() -> Callable:
                get = factory()

                def wrapped(*a: Any) -> bytes:
                    t0 = time.perf_counter()
                    data = get(*a)
                    add(get_object=1, get_bytes=len(data), get_us=int(1e6 * (time.perf_counter() - t0)))
                    return data
                return wrapped
            return make

        for name in list(ranged.TRANSPORTS):
            ranged.TRANSPORTS[name] = counted(ranged.TRANSPORTS[name])
        ranged._transport_cache.clear()

        seen: dict[int, int] = {}  # pid -> id of the last client counted

        def get_client() -> Any:
            if _s3._client is not None and _s3._client_pid == os.getpid():
                return orig_client()
            t0 = time.perf_counter()
            c = orig_client()
            with arr.get_lock():  # count each new client once, even if two threads raced for it
                if seen.get(os.getpid()) == id(c):
                    return c
                seen[os.getpid()] = id(c)
            add(client_inits=1, client_init_us=int(1e6 * (time.perf_counter() - t0)))
            return c

        _s3.call, _s3.get_client = call, get_client

    def snapshot(self) -> list[int]:
        with self._arr.get_lock():
            return list(self._arr)

    def delta(self, before: list[int]) -> dict[str, Any]:
        now = self.snapshot()
        d: dict[str, Any] = {k: now[i] - before[i] for i, k in enumerate(self.FIELDS)}
        for k in ("get_us", "head_us", "client_init_us"):
            d[k[:-3] + "_s"] = d.pop(k) / 1e6
        return d


# --------------------------------------------------------------------------------------------------
# passes
# --------------------------------------------------------------------------------------------------
def _available(kind: str) -> bool:
    """Whether the transport of ``kind`` can be imported here (optional extras)."""
    mod = {"s3_s3tc": "s3torchconnector", "s3_fsspec": "s3fs"}.get(kind)
    if mod is None:
        return True
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def loader_pass(ds: Any, workers: int, batch_size: int, traffic: Traffic, moto_pid: int,
                checksum: bool = False) -> dict[str, Any]:
    from quantcore.data import make_loader

    loader = make_loader(ds, batch_size, num_workers=workers,
                         multiprocessing_context="fork" if workers > 0 else None)
    tr0, c0, m0 = traffic.snapshot(), own_cpu_s(), proc_cpu_s(moto_pid)
    t0 = time.perf_counter()
    n, first, sums, labels = 0, None, [], []
    for images, lab, _skipped in loader:
        if first is None:
            first = time.perf_counter() - t0
        n += len(lab)
        if checksum:
            sums.append(float(images.double().sum()))
            labels.extend(int(x) for x in lab)
    dt = time.perf_counter() - t0
    del loader
    out = {"images": n, "seconds": dt, "img_s": n / dt, "first_batch_s": first,
           "cpu_s": own_cpu_s() - c0, "moto_cpu_s": proc_cpu_s(moto_pid) - m0, **traffic.delta(tr0)}
    if checksum:
        out["checksum"] = (sums, labels)
    return out


def decode_pass(blobs: list[bytes], transform: Callable) -> dict[str, Any]:
    from quantcore.data import decode_image

    c0 = own_cpu_s()
    t0 = time.perf_counter()
    for i, b in enumerate(blobs):
        transform(decode_image(b, str(i)))
    dt = time.perf_counter() - t0
    return {"images": len(blobs), "seconds": dt, "img_s": len(blobs) / dt, "cpu_s": own_cpu_s() - c0}


def reader_crosscheck(s3_root: str, transform: Callable, batch_size: int) -> dict[str, Any]:
    """Single process (no workers): read every batch and sum the RangedReaders' own counters."""
    from quantcore.data import open_dataset

    ds = open_dataset(s3_root, "val", transform, max_open_shards=64)
    for a in range(0, len(ds), batch_size):
        ds.__getitems__(list(range(a, min(a + batch_size, len(ds)))))
    readers = [zf.fp for zf in getattr(ds, "_handles", {}).values() if zf.fp is not None]
    res = {"readers": len(readers), "requests": sum(getattr(r, "requests", 0) for r in readers),
           "bytes_fetched": sum(getattr(r, "bytes_fetched", 0) for r in readers),
           }
    ds.close()
    return res


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"cpu": cpu, "logical_cpus": os.cpu_count(),
                            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                            "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("timm", "torchvision", "PIL", "boto3", "botocore", "moto", "s3fs", "s3torchconnector"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    return info


def _f(x: Any, nd: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Medians per (kind, workers) and paired per-repetition ratios vs local."""
    summ: dict[str, Any] = {}
    reps = res["reps"]
    for w in res["workers"]:
        row: dict[str, Any] = {}
        for k in res["kinds"]:
            runs = [r[f"{k}/w{w}"] for r in reps]
            row[k] = {
                "img_s": median([r["img_s"] for r in runs]),
                "img_s_min": min(r["img_s"] for r in runs), "img_s_max": max(r["img_s"] for r in runs),
                "cpu_ms_per_img": median([1e3 * r["cpu_s"] / r["images"] for r in runs]),
                "moto_cpu_ms_per_img": median([1e3 * r["moto_cpu_s"] / r["images"] for r in runs]),
                "first_batch_s": median([r["first_batch_s"] for r in runs]),
                "get_object": median([r["get_object"] for r in runs]),
                "head_object": median([r["head_object"] for r in runs]),
                "get_mb": median([r["get_bytes"] / 1e6 for r in runs]),
                "s3_wait_s": median([r["get_s"] + r["head_s"] for r in runs]),
                "client_init_s": median([r["client_init_s"] for r in runs]),
                "client_inits": median([r["client_inits"] for r in runs]),
                "seconds": median([r["seconds"] for r in runs]),
            }
            if k != "local":
                ratios = [r[f"{k}/w{w}"]["img_s"] / r[f"local/w{w}"]["img_s"] for r in reps]
                row[k]["ratio_vs_local"] = median(ratios)
                row[k]["ratio_min"], row[k]["ratio_max"] = min(ratios), max(ratios)
                row[k]["ratios"] = ratios
                if k != "s3":  # paired: in how many repetitions this variant beat plain S3
                    row[k]["beats_s3"] = sum(r[f"{k}/w{w}"]["img_s"] > r[f"s3/w{w}"]["img_s"] for r in reps)
                row[k]["cpu_ratio_vs_local"] = row[k]["cpu_ms_per_img"] / row["local"]["cpu_ms_per_img"]
        summ[f"w{w}"] = row
    summ["decode_img_s"] = median([r["decode"]["img_s"] for r in reps])
    summ["decode_cpu_ms_per_img"] = median([1e3 * r["decode"]["cpu_s"] / r["decode"]["images"] for r in reps])
    return summ


def interpretation(res: dict[str, Any]) -> list[str]:
    """Short paragraphs, every figure taken from this run's medians."""
    s, out = res["summary"], []
    ws = res["workers"]
    r = {w: s[f"w{w}"] for w in ws}
    shard_mb = res["shards"]["total_mb"]
    ratios = {w: r[w]["s3"]["ratio_vs_local"] for w in ws}
    met = [w for w in ws if ratios[w] >= TARGET_RATIO]
    verdict = ("met" if len(met) == len(ws) else "missed" if not met
               else f"met only at w={','.join(map(str, met))}")
    byt = {w: r[w]["s3"]["get_mb"] / shard_mb for w in ws}
    out.append(
        "**Result.** S3 shards (planned batch reads, boto3) reach " + ", ".join(f"{_f(ratios[w], 2)}x (w={w})" for w in ws)
        + f" of the local folder's images/s: the >= {TARGET_RATIO}x target is {verdict}. Bytes fetched / shard bytes: "
        + ", ".join(f"{_f(byt[w], 2)} (w={w})" for w in ws)
        + f" (target <= {TARGET_BYTES}: {'met' if all(v <= TARGET_BYTES for v in byt.values()) else 'missed'}); "
        + ", ".join(f"{_f(r[w]['s3']['get_object'])} GETs at w={w}" for w in ws)
        + " per pass. A warm cache dir gives " + ", ".join(f"{_f(r[w]['s3_warm']['ratio_vs_local'], 2)}x" for w in ws) + ".")
    if "s3_blocks" in res["kinds"]:
        out.append(
            "**Before/after.** The previous reader (members read on demand through 1 MiB blocks, no read-ahead, "
            "a new boto3 client per worker per pass) measured in the same run: "
            + ", ".join(f"{_f(r[w]['s3_blocks']['ratio_vs_local'], 2)}x with "
                        f"{_f(r[w]['s3_blocks']['get_object'])} GETs and "
                        f"{_f(r[w]['s3_blocks']['get_mb'] / shard_mb, 2)}x the shard bytes (w={w})" for w in ws)
            + ". What changed: one GET per batch and shard (the members of a batch sit together in a shard), the "
            "next batch of the same worker requested before the current one decodes, workers open shards from the "
            "size, ETag and central directory the parent read (no HEAD, no directory GET per worker per pass), "
            "and forked workers keep the parent's boto3 client (fresh connections) instead of building one.")
    tk = [k for k in ("s3", "s3_s3tc", "s3_fsspec") if k in res["kinds"]]
    if len(tk) > 1:
        best = {w: max(tk, key=lambda k: r[w][k]["ratio_vs_local"]) for w in ws}
        out.append(
            "**Transports.** Same planned reads, only the GET client differs: "
            + "; ".join(f"w={w}: " + ", ".join(f"{TRANSPORT_KINDS[k]} {_f(r[w][k]['ratio_vs_local'], 2)}x "
                                               f"({_f(r[w][k]['cpu_ms_per_img'], 2)} ms CPU/img)" for k in tk)
                        for w in ws)
            + ". Fastest median: " + ", ".join(f"{TRANSPORT_KINDS[best[w]]} at w={w}" for w in ws)
            + ". Differences within the per-repetition ranges are noise. boto3 stays the default: it is already a "
            "dependency, it is the only one of the three that pins the object with If-Match on every GET, and it "
            "needs no extra package (s3fs's aiobotocore pins an older botocore than the lock file's"
            + (f"; this run measured all three in one environment with s3fs {res['machine']['s3fs']} and botocore "
               f"{res['machine'].get('botocore')}" if "s3_fsspec" in tk and res["machine"].get("s3fs") else "")
            + ").")
    w0 = ws[-1]
    b = r[w0]
    bound = b["local"]["cpu_ms_per_img"] / (b["s3"]["cpu_ms_per_img"] + b["s3"]["moto_cpu_ms_per_img"])
    out.append(
        f"**CPU.** At w={w0} the S3 loader uses {_f(b['s3']['cpu_ms_per_img'], 2)} vs {_f(b['local']['cpu_ms_per_img'], 2)} "
        f"ms CPU/img locally, and moto_server {_f(b['s3']['moto_cpu_ms_per_img'], 2)} ms/img on the same cores: when "
        f"the CPUs are the limit, S3 can reach about {_f(bound, 2)}x (local CPU per image / S3 loader + moto CPU per image). "
        "Against real S3 the serving CPU is remote.")
    out.append(
        f"**Caveats.** `moto_server` shares the {res['machine']['logical_cpus']} CPUs, and other jobs shared the "
        f"machine (load average {res.get('loadavg_start')} at start, {res.get('loadavg_end')} at the end), so absolute "
        f"img/s are noisy: compare the paired ratios. {res['data']['images']} images per pass make per-pass start-up "
        "weigh more than on the 50,000-image ImageNet val split."
        + (f" Not measured (package not installed): {', '.join(res['transports_missing'])}."
           if res.get("transports_missing") else ""))
    return out


def render(res: dict[str, Any]) -> str:
    s, mc, data, sh = res["summary"], res["machine"], res["data"], res["shards"]
    L = [START, "## Data loader: local folder vs. S3 zip shards (issue: data loading)", ""]
    L.append(f"Generated by `{res['command']}` on {res['date']} ({'quick run, ' if res['quick'] else ''}"
             f"CPU: {mc['cpu']}, {mc['logical_cpus']} logical CPUs, torch {mc['torch']}, timm {mc.get('timm')}, "
             f"Pillow {mc.get('PIL')}, moto {mc.get('moto')}, boto3 {mc.get('boto3')}"
             + "".join(f", {m} {mc[m]}" for m in ("s3fs", "s3torchconnector") if mc.get(m)) + ").")
    L.append("")
    L.append(f"Data: {data['images']} generated ImageNet-like JPEGs ({data['width']}x{data['height']}, "
             f"{_f(data['mean_kb'], 1)} KB mean, {data['classes']} classes), `val/<class>/*.JPEG` on local disk, "
             f"packed by `quantcore.data.pack` into {sh['count']} zip shards of {res['shard_size']} images "
             f"({_f(sh['total_mb'], 1)} MB) on a `moto_server` bucket on 127.0.0.1. Transform: eval transform "
             f"of timm `{MODEL}` ({res['transform_desc']}). `make_loader(ds, batch_size={res['batch_size']}, "
             f"num_workers=w)`, fork start method, whole split per pass, {len(res['reps'])} interleaved "
             "repetitions after one warm-up pass, medians (ratios: median of per-repetition ratios, "
             "range in brackets).")
    L.append("")
    L.append("| workers | local img/s | S3 img/s | **S3 / local** | S3 + cache 1st pass | S3 + cache 2nd pass "
             "| 2nd pass / local |")
    L.append("|---|---|---|---|---|---|---|")
    for w in res["workers"]:
        r = s[f"w{w}"]
        L.append(f"| {w} | {_f(r['local']['img_s'])} | {_f(r['s3']['img_s'])} | "
                 f"**{_f(r['s3']['ratio_vs_local'], 2)}x** "
                 f"({_f(r['s3']['ratio_min'], 2)}-{_f(r['s3']['ratio_max'], 2)}) | "
                 f"{_f(r['s3_cold']['img_s'])} ({_f(r['s3_cold']['ratio_vs_local'], 2)}x) | "
                 f"{_f(r['s3_warm']['img_s'])} | {_f(r['s3_warm']['ratio_vs_local'], 2)}x |")
    L.append("")
    L.append(f"Single-core limit measured in the same run (decode + transform in-process from bytes in memory, "
             f"no loader): {_f(s['decode_img_s'])} img/s ({_f(s['decode_cpu_ms_per_img'], 2)} ms CPU/img).")
    L.append("")
    L.append("CPU and S3 traffic per pass (medians):")
    L.append("")
    L.append("| workers | source | loader CPU ms/img | moto_server CPU ms/img | GETs | HEADs | MB fetched "
             "| fetched / shard bytes | 1st batch s |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for w in res["workers"]:
        r = s[f"w{w}"]
        for k in KINDS:
            x = r[k]
            s3 = k != "local"
            L.append(f"| {w} | {LABELS[k]} | {_f(x['cpu_ms_per_img'], 2)} | "
                     f"{_f(x['moto_cpu_ms_per_img'], 2) if s3 else '-'} | {_f(x['get_object']) if s3 else '-'} | "
                     f"{_f(x['head_object']) if s3 else '-'} | {_f(x['get_mb'], 1) if s3 else '-'} | "
                     f"{_f(x['get_mb'] / sh['total_mb'], 2) if s3 else '-'} | {_f(x['first_batch_s'], 2)} |")
    cc = res.get("reader_crosscheck")
    if cc:
        L.append("")
        L.append(f"Reader's own counters (one process, no workers, batches of {res['batch_size']} read with "
                 f"`__getitems__`): {cc['readers']} `RangedReader`s, {cc['requests']} GETs, "
                 f"{_f(cc['bytes_fetched'] / 1e6, 1)} MB.")
    diag = [k for k in res["kinds"] if k in DIAG_KINDS]
    if diag:
        L.append("")
        L.append("Transports and the previous reader, interleaved with the rows above (same medians). Planned = "
                 "one GET per run of a batch's neighbouring members per shard, next batch requested ahead. GET "
                 "wait is wall time summed over workers and threads.")
        L.append("")
        L.append("| workers | transport | img/s | **S3 / local** (range) | GETs | fetched / shard bytes "
                 "| loader CPU ms/img | moto CPU ms/img | GET wait s/pass | client init s/pass |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for w in res["workers"]:
            r = s[f"w{w}"]
            for k in ("s3",) + tuple(diag):
                x = r[k]
                L.append(f"| {w} | {LABELS[k]} | {_f(x['img_s'])} | **{_f(x['ratio_vs_local'], 2)}x** "
                         f"({_f(x['ratio_min'], 2)}-{_f(x['ratio_max'], 2)}) | {_f(x['get_object'])} | "
                         f"{_f(x['get_mb'] / sh['total_mb'], 2)} | {_f(x['cpu_ms_per_img'], 2)} | "
                         f"{_f(x['moto_cpu_ms_per_img'], 2)} | {_f(x['s3_wait_s'], 2)} | "
                         f"{_f(x['client_init_s'], 2)} ({_f(x['client_inits'])}x) |")
    for para in res["interpretation"]:
        L.append("")
        L.append(para)
    L.append("")
    L.append(f"Raw numbers: `{res['results_file']}`.")
    L.append(END)
    return "\n".join(L) + "\n"


def write_doc(section: str, path: Path = DOC) -> None:
    write_section(section, START, END, path)


# --------------------------------------------------------------------------------------------------
def _summarize_and_interpret(res: dict[str, Any]) -> None:
    res["summary"] = summarize(res)  # first: the interpretation reads it
    res["interpretation"] = interpretation(res)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="120 images, 3 repetitions (smoke run)")
    p.add_argument("--images", type=int, default=None, help="images to generate (default 600, quick 120)")
    p.add_argument("--reps", type=int, default=None, help="measured repetitions (default 7, quick 3)")
    p.add_argument("--workers", default="1,2", help="DataLoader worker counts, comma separated")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=100, help="images per zip shard")
    p.add_argument("--no-diagnose", action="store_true",
                   help="skip the other transports (s3torchconnector, fsspec) and the previous reader")
    p.add_argument("--no-crosscheck", action="store_true", help="skip the single-process reader counter check")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    p.add_argument("--no-write", action="store_true", help="print the section, write no file")
    p.add_argument("--from-json", metavar="PATH", default=None,
                   help="measure nothing: re-render the docs section (and the summary) from a results file")
    args = p.parse_args(argv)
    if args.from_json:
        path = Path(args.from_json)
        res = json.loads(path.read_text())
        res["summary"] = summarize(res)
        res["interpretation"] = interpretation(res)
        section = render(res)
        if not args.no_write:
            path.write_text(json.dumps(res, indent=1, default=str) + "\n")
            write_doc(section)
        print(section)
        return 0
    n = args.images or (120 if args.quick else 600)
    reps = args.reps or (3 if args.quick else 7)
    workers = [int(x) for x in args.workers.split(",") if x.strip()]
    if n < 1 or reps < 1 or not workers or min(workers) < 1:
        p.error("--images, --reps and --workers must be positive")

    # S3 environment first: every boto3 client (here and in forked workers) reads it lazily.
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(k, None)
    os.environ.update(_S3_ENV)

    import torch

    torch.set_num_threads(1)  # the main process only receives batches; workers use 1 thread anyway
    import timm

    from quantcore.data import describe_transform, eval_transform, open_dataset, pack
    from quantcore.io import reset_client, storage

    RESULTS.mkdir(parents=True, exist_ok=True)
    results_file = RESULTS / f"loader-cpu{'-quick' if args.quick else ''}.json"
    res: dict[str, Any] = new_record(
        "loader", argv, results_file, quick=args.quick, machine=machine(), workers=workers,
        batch_size=args.batch_size, shard_size=args.shard_size, target_ratio=TARGET_RATIO, start_method="fork",
        reps=[], kinds=list(KINDS) + ([] if args.no_diagnose else [k for k in DIAG_KINDS if _available(k)]),
        transports_missing=[k for k in DIAG_KINDS if not _available(k)])
    model = timm.create_model(MODEL, pretrained=False)
    transform = eval_transform(model)
    del model
    tdesc = describe_transform(transform)
    res["transform"] = tdesc
    rs = tdesc.get("resize_size")
    rs = rs[0] if isinstance(rs, (list, tuple)) and len(rs) == 1 else rs
    res["transform_desc"] = (f"resize {rs} {tdesc.get('interpolation')}, center crop "
                             f"{tdesc.get('input_size', [0, 0, 0])[1]}, normalize")
    tmp = Path(tempfile.mkdtemp(prefix="qc-bench-loader-"))
    t_start = time.perf_counter()
    try:
        local_root = tmp / "imagenet"
        log(f"generating {n} JPEGs in {local_root}")
        res["data"] = generate_folder(local_root, n)
        log(f"  mean {res['data']['mean_kb']:.1f} KB, total {res['data']['total_mb']:.1f} MB")
        with moto_server(tmp / "moto.log") as (proc, endpoint):
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            reset_client()
            storage.get_client().create_bucket(Bucket=BUCKET)
            s3_root = f"s3://{BUCKET}/imagenet"
            log(f"moto_server pid {proc.pid} on {endpoint}; packing into {s3_root}")
            t0 = time.perf_counter()
            entry = pack(str(local_root), s3_root, "val", shard_size=args.shard_size)
            res["pack_s"] = time.perf_counter() - t0
            res["shards"] = {"count": len(entry["shards"]), "total_mb": sum(s["bytes"] for s in entry["shards"]) / 1e6,
                             "bytes": [s["bytes"] for s in entry["shards"]]}
            traffic = Traffic()
            cache_dir = tmp / "cache"

            def open_s3(cached: bool, **kw: Any) -> Any:
                return open_dataset(s3_root, "val", transform, cache_dir=str(cache_dir) if cached else None, **kw)

            t0 = time.perf_counter()
            ds_local = open_dataset(str(local_root), "val", transform)
            res["open_local_s"] = time.perf_counter() - t0
            tr0 = traffic.snapshot()
            t0 = time.perf_counter()
            ds_s3 = open_s3(False)
            res["open_s3_s"] = time.perf_counter() - t0
            res["open_s3_traffic"] = traffic.delta(tr0)
            ds_cache = open_s3(True)
            datasets = {"local": ds_local, "s3": ds_s3, "s3_cold": ds_cache, "s3_warm": ds_cache}
            for kind in res["kinds"]:
                if kind in ("s3_s3tc", "s3_fsspec"):
                    datasets[kind] = open_s3(False, transport=TRANSPORT_KINDS[kind])
                elif kind == "s3_blocks":
                    datasets[kind] = open_s3(False, batch_reads=False)
            assert len(ds_local) == len(ds_s3) == n, (len(ds_local), len(ds_s3), n)
            blobs = [ds_local.read_raw(i) for i in range(n)]

            def fresh_cache() -> None:
                shutil.rmtree(cache_dir, ignore_errors=True)
                cache_dir.mkdir()

            def run_kind(kind: str, w: int, checksum: bool = False) -> dict[str, Any]:
                ds = datasets.get(kind, ds_s3)
                if kind == "s3_cold":
                    fresh_cache()
                return loader_pass(ds, w, args.batch_size, traffic, proc.pid, checksum)

            # warm-up (excluded) + equality check: the same tensors from every source
            log("warm-up pass")
            ref = None
            for w in workers:
                for kind in res["kinds"]:
                    r = run_kind(kind, w, checksum=True)
                    ck = r.pop("checksum")
                    if ref is None:
                        ref = ck
                    elif ck[1] != ref[1] or any(abs(a - b) > 1e-6 * max(1.0, abs(a)) for a, b in zip(ck[0], ref[0])):
                        raise SystemExit(f"{kind} w={w}: batches differ from the local folder's")
                    log(f"  {kind:20s} w={w}: {r['img_s']:6.1f} img/s (warm-up)")
            decode_pass(blobs[: min(n, 32)], transform)
            res["identical_batches"] = True

            order = [(k, w) for w in workers for k in res["kinds"]] + [("decode", 0)]
            for rep in range(reps):
                rot = rep % len(order)
                seq = order[rot:] + order[:rot]
                # s3_warm must follow its s3_cold pass (same cache dir) for the same worker count
                seq = [x for x in seq if x[0] != "s3_warm"]
                seq = [y for x in seq for y in ([x, ("s3_warm", x[1])] if x[0] == "s3_cold" else [x])]
                out: dict[str, Any] = {}
                for kind, w in seq:
                    if kind == "decode":
                        out["decode"] = decode_pass(blobs, transform)
                    else:
                        out[f"{kind}/w{w}"] = run_kind(kind, w)
                res["reps"].append(out)
                log(f"rep {rep + 1}/{reps}: " + ", ".join(
                    f"{k} {v['img_s']:.0f}" for k, v in out.items()))

            if not args.no_crosscheck:
                res["reader_crosscheck"] = reader_crosscheck(s3_root, transform, args.batch_size)
            for ds in datasets.values():
                if ds is not ds_local:
                    ds.close()
        reset_client()
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return finish(res, t_start, render, results_file, write_doc, args.no_write, log,
                  before_render=_summarize_and_interpret)


if __name__ == "__main__":
    sys.exit(main())
