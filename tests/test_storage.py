"""Storage layer tests against the real S3 HTTP API (moto_server on 127.0.0.1) and local disk."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import botocore.exceptions as bexc
import pytest
from botocore.awsrequest import AWSResponse
from botocore.response import StreamingBody

from quantcore.io import MiB, StorageError
from quantcore.io import storage as st
from quantcore.io import _s3

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_storage_config() -> Iterator[None]:
    """Each test starts and ends with default settings and a new client (no stray hooks)."""
    st.reset_config()
    yield
    st.reset_config()


def _rand(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


@contextlib.contextmanager
def hook(event: str, handler: Callable) -> Iterator[None]:
    """Register a botocore event handler on the shared client for the duration of a block."""
    events = st.get_client().meta.events
    uid = f"test-{id(handler)}-{event}"
    events.register(event, handler, unique_id=uid)
    try:
        yield
    finally:
        events.unregister(event, unique_id=uid)


class Counter:
    """before-call handler counting calls and recording request headers."""

    def __init__(self) -> None:
        self.calls = 0
        self.headers: List[Dict[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, params=None, **kwargs):
        with self.lock:
            self.calls += 1
            self.headers.append(dict((params or {}).get("headers", {})))


class _RawBody:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, *args, **kwargs):
        yield self._body

    def read(self, *args, **kwargs) -> bytes:
        b, self._body = self._body, b""
        return b


class FailFirst:
    """before-send handler that fails the first ``n`` sends (``n=None``: all of them),
    either with an HTTP error response or by raising an exception."""

    def __init__(self, n, status: int = 503, code: str = "ServiceUnavailable", exc=None) -> None:
        self.n, self.status, self.code, self.exc = n, status, code, exc
        self.sends = 0
        self.failures = 0

    def __call__(self, request=None, **kwargs):
        self.sends += 1
        if self.n is not None and self.failures >= self.n:
            return None  # let the real request through
        self.failures += 1
        if self.exc is not None:
            raise self.exc
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.code}</Code>"
                f"<Message>injected</Message></Error>").encode()
        if request is not None and request.method == "HEAD":
            body = b""
        return AWSResponse(request.url, self.status, {"Content-Type": "application/xml"}, _RawBody(body))


# ---------------------------------------------------------------------------- URIs


def test_join_and_is_s3():
    assert st.join("s3://bkt/a/", "/x/", "y.bin") == "s3://bkt/a/x/y.bin"
    assert st.join("s3://bkt", "dir/") == "s3://bkt/dir/"
    assert st.join("/data", "/x", "y") == "/data/x/y"
    assert st.join("file:///data", "a b") == "file:///data/a%20b"
    assert st.is_s3("s3://bkt/k") and st.is_s3("S3://bkt/k")
    assert not st.is_s3("/tmp/x") and not st.is_s3("file:///x") and not st.is_s3("gs://b/k")
    assert st.parse_uri("file:///tmp/a%20b").path == "/tmp/a b"
    assert st.parse_uri("file://localhost/tmp/x").path == "/tmp/x"


@pytest.mark.parametrize("bad", ["s3://", "s3:///key", "s3://bkt", "s3://bkt/dir/", "gs://bkt/key",
                                 "http://h/x", "", "file://relative/x", "s3:/bkt/key", "S3:/bkt/key", "gs:/bkt/x"])
def test_bad_uris_raise_value_error_naming_uri(bad):
    """Malformed URIs are refused by every operation (a scheme with one slash is a typo, not the local
    folder 's3:'), never read or written locally."""
    for fn in (st.read_bytes, st.size, st.exists, st.open_read,
               lambda u: st.write_bytes(u, b"x"), lambda u: st.read_range(u, 0, 1)):
        with pytest.raises(ValueError) as ei:
            fn(bad)
        assert repr(bad) in str(ei.value) or (bad == "" and "empty URI" in str(ei.value))
    if bad.startswith(("gs:", "http:", "s3:", "S3:", "file://relative")) and bad not in ("s3://bkt", "s3://bkt/dir/"):
        with pytest.raises(ValueError, match="bkt|s3|gs|http|file"):
            st.list_uris(bad)


# ---------------------------------------------------------------------- round trips


def test_round_trip_all_backends(tmp_store, tmp_path):
    data = _rand(300_000, seed=1)
    a = st.join(tmp_store, "a", "blob.bin")
    assert not st.exists(a)
    st.write_bytes(a, data)
    assert st.exists(a)
    assert st.size(a) == len(data)
    assert st.read_bytes(a) == data
    assert st.read_range(a, 1000, 5000) == data[1000:6000]
    assert st.read_range(a, len(data) - 10, 100) == data[-10:]  # short at EOF
    assert st.read_range(a, len(data) + 5, 10) == b""  # past EOF
    assert st.read_range(a, 0, 0) == b""

    st.write_bytes(a, b"replaced")  # overwrite
    assert st.read_bytes(a) == b"replaced"

    src = tmp_path / "src.bin"
    src.write_bytes(data)
    b = st.join(tmp_store, "b", "c", "up.bin")
    st.upload_file(src, b)
    assert st.read_bytes(b) == data
    dst = tmp_path / "out" / "down.bin"
    st.download_file(b, dst)
    assert dst.read_bytes() == data
    assert [p.name for p in dst.parent.iterdir()] == ["down.bin"]  # no temp leftovers

    st.write_bytes(st.join(tmp_store, "b", "note.txt"), b"hi")
    st.write_bytes(st.join(tmp_store, "empty.bin"), b"")
    assert st.read_bytes(st.join(tmp_store, "empty.bin")) == b""
    assert st.size(st.join(tmp_store, "empty.bin")) == 0
    listed = st.list_uris(tmp_store)
    assert listed == sorted([a, b, st.join(tmp_store, "b", "note.txt"), st.join(tmp_store, "empty.bin")])
    assert st.list_uris(tmp_store, suffix=".bin") == sorted([a, b, st.join(tmp_store, "empty.bin")])
    assert st.list_uris(st.join(tmp_store, "b"), suffix=(".txt",)) == [st.join(tmp_store, "b", "note.txt")]

    with st.open_read(a) as f:
        assert f.read() == b"replaced"
        f.seek(2)
        assert f.read(3) == b"pla"


def test_s3_list_pagination_and_directory_semantics_moto_mock(s3_bucket):
    root = f"s3://{s3_bucket}/data"
    keys = [f"data/{i:02d}/part.bin" for i in range(7)]
    for k in keys:
        st.write_bytes(f"s3://{s3_bucket}/{k}", b"x")
    st.write_bytes(f"s3://{s3_bucket}/data2/other.bin", b"y")
    st.get_client().put_object(Bucket=s3_bucket, Key="data/dir-marker/", Body=b"")
    counter = Counter()
    with hook("before-call.s3.ListObjectsV2", counter):
        got = st.list_uris(root, page_size=2)
    assert got == [f"s3://{s3_bucket}/{k}" for k in keys]
    assert counter.calls >= 4  # 8 keys (incl. marker) with 2 per page
    assert f"s3://{s3_bucket}/data2/other.bin" in st.list_uris(f"s3://{s3_bucket}")
    assert st.list_uris(f"s3://{s3_bucket}/nothing-here") == []


# -------------------------------------------------------------------- ranged reads


def _make_zip(n_members: int, member_size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(n_members):
            zf.writestr(f"img/{i:04d}.bin", _rand(member_size, seed=i))
    return buf.getvalue()


def test_zip_member_via_ranged_reads_moto_mock(s3_bucket, tmp_path):
    blob = _make_zip(40, 100_000)  # ~4 MB shard
    uri = f"s3://{s3_bucket}/shards/shard-000.zip"
    st.write_bytes(uri, blob)
    counter = Counter()
    with hook("before-call.s3.GetObject", counter):
        with st.open_read(uri, block_size=64 * 1024) as f:
            assert f.seekable()
            with zipfile.ZipFile(f) as zf:
                assert len(zf.namelist()) == 40
                assert zf.read("img/0017.bin") == _rand(100_000, seed=17)
            fetched, requests = f.bytes_fetched, f.requests
    assert counter.calls == requests >= 2
    assert all(h.get("Range", "").startswith("bytes=") for h in counter.headers)  # never a full GET
    assert fetched < len(blob) // 10, (fetched, len(blob))

    # persistent block cache: a second reader of the same member does no GETs at all
    cache = tmp_path / "blocks"
    with st.open_read(uri, block_size=64 * 1024, cache_dir=cache) as f:
        with zipfile.ZipFile(f) as zf:
            zf.read("img/0003.bin")
        assert f.requests > 0
    counter2 = Counter()
    with hook("before-call.s3.GetObject", counter2):
        with st.open_read(uri, block_size=64 * 1024, cache_dir=cache) as f:
            with zipfile.ZipFile(f) as zf:
                assert zf.read("img/0003.bin") == _rand(100_000, seed=3)
            assert f.requests == 0
    assert counter2.calls == 0


def test_ranged_reader_semantics_moto_mock(s3_bucket):
    data = _rand(1_000_003, seed=5)
    uri = f"s3://{s3_bucket}/r.bin"
    st.write_bytes(uri, data)
    r = st.open_read(uri, block_size=100_000, max_blocks=3)
    assert r.read(10) == data[:10]
    assert r.tell() == 10
    r.seek(-7, io.SEEK_END)
    assert r.read() == data[-7:]
    assert r.read(5) == b""
    r.seek(250_000)
    assert r.read(450_000) == data[250_000:700_000]  # spans blocks, larger than the LRU
    r.seek(123, io.SEEK_SET)
    r.seek(877, io.SEEK_CUR)
    buf = bytearray(300_000)
    assert r.readinto(buf) == 300_000 and bytes(buf) == data[1000:301_000]
    with pytest.raises(OSError):
        r.seek(-1)
    r.close()
    with pytest.raises(ValueError):
        r.read(1)


def test_ranged_reader_detects_object_replaced_mid_read_moto_mock(s3_bucket):
    uri = f"s3://{s3_bucket}/changing.bin"
    st.write_bytes(uri, _rand(300_000, seed=1))
    with st.open_read(uri, block_size=100_000, max_blocks=1) as r:
        r.read(10)
        st.write_bytes(uri, _rand(300_000, seed=2))
        r.seek(200_000)
        with pytest.raises(StorageError, match="changed"):
            r.read(10)


# ------------------------------------------------------------------------ multipart


def test_multipart_write_and_upload_moto_mock(s3_bucket, tmp_path, s3_client):
    data = _rand(12 * MiB + 123, seed=7)
    parts = Counter()
    with hook("before-call.s3.UploadPart", parts):
        uri = f"s3://{s3_bucket}/big/w.bin"
        st.write_bytes(uri, data, multipart_threshold=5 * MiB, part_size=5 * MiB)
    assert parts.calls == 3
    assert s3_client.head_object(Bucket=s3_bucket, Key="big/w.bin")["ETag"].strip('"').endswith("-3")
    assert st.read_bytes(uri) == data

    st.configure(multipart_threshold=5 * MiB, part_size=5 * MiB, max_concurrency=2)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    parts = Counter()
    with hook("before-call.s3.UploadPart", parts):
        st.upload_file(src, f"s3://{s3_bucket}/big/u.bin")
    assert parts.calls == 3
    assert s3_client.head_object(Bucket=s3_bucket, Key="big/u.bin")["ETag"].strip('"').endswith("-3")
    st.download_file(f"s3://{s3_bucket}/big/u.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data

    # below the threshold: one PutObject, no multipart
    parts = Counter()
    with hook("before-call.s3.UploadPart", parts):
        st.write_bytes(f"s3://{s3_bucket}/small.bin", data[: 4 * MiB])
    assert parts.calls == 0
    assert "-" not in s3_client.head_object(Bucket=s3_bucket, Key="small.bin")["ETag"]


def test_failed_multipart_upload_is_aborted_moto_mock(s3_bucket, s3_client):
    calls = {"n": 0}

    def boom(**kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure in part 2")

    uri = f"s3://{s3_bucket}/big/fail.bin"
    with hook("before-call.s3.UploadPart", boom):
        with pytest.raises(RuntimeError, match="injected"):
            st.write_bytes(uri, _rand(12 * MiB, seed=1), multipart_threshold=5 * MiB,
                           part_size=5 * MiB, max_concurrency=1)
    assert not st.exists(uri)
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert st.list_uris(f"s3://{s3_bucket}") == []


def test_settings_validation_and_env(monkeypatch):
    with pytest.raises(ValueError, match="5 MiB"):
        st.configure(part_size=1 * MiB)
    with pytest.raises(TypeError):
        st.configure(no_such_setting=1)
    monkeypatch.setenv("QUANTCORE_S3_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("QUANTCORE_S3_RETRY_BASE_DELAY", "0.5")
    s = st.get_settings()
    assert (s.max_attempts, s.base_delay) == (7, 0.5)
    st.reset_client()
    assert st.get_client().meta.config.retries["total_max_attempts"] == 7
    assert st.configure(max_attempts=2).max_attempts == 2  # explicit override beats env
    st.configure(retry_mode="adaptive")
    assert st.get_client().meta.config.retries == {"mode": "adaptive", "total_max_attempts": 2}
    with pytest.raises(ValueError, match="retry_mode"):
        st.configure(retry_mode="fast")
    st.configure(retry_mode=None)
    # AWS_RETRY_MODE reaches the client for each of botocore's modes (the chart offers all three);
    # a value botocore does not know is an error naming the variable, not silently "standard"
    for mode in ("legacy", "standard", "adaptive"):
        monkeypatch.setenv("AWS_RETRY_MODE", mode)
        st.reset_client()
        assert st.get_client().meta.config.retries["mode"] == mode
    monkeypatch.setenv("AWS_RETRY_MODE", "fast")
    with pytest.raises(ValueError, match="AWS_RETRY_MODE='fast'"):
        st.get_settings()
    monkeypatch.delenv("AWS_RETRY_MODE")
    monkeypatch.setenv("QUANTCORE_S3_MAX_ATTEMPTS", "lots")
    st.reset_config()
    with pytest.raises(ValueError, match="QUANTCORE_S3_MAX_ATTEMPTS"):
        st.get_settings()


def test_single_client_per_process_thread_safe_moto_mock(s3_server):
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(st.get_client())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen}) == 1 and seen[0] is st.get_client()


# -------------------------------------------------------------------------- retries


def test_retry_on_503_and_throttling_moto_mock(s3_bucket):
    uri = f"s3://{s3_bucket}/r/x.bin"
    st.configure(max_attempts=4)
    fail = FailFirst(2, status=503, code="ServiceUnavailable")
    with hook("before-send.s3.PutObject", fail):
        st.write_bytes(uri, b"payload")
    assert (fail.failures, fail.sends) == (2, 3)

    fail = FailFirst(1, status=503, code="SlowDown")  # throttling
    with hook("before-send.s3.GetObject", fail):
        assert st.read_bytes(uri) == b"payload"
    assert (fail.failures, fail.sends) == (1, 2)

    fail = FailFirst(3, status=500, code="InternalError")
    with hook("before-send.s3.HeadObject", fail):
        assert st.size(uri) == 7
    assert fail.sends == 4


def test_retry_on_connection_errors_moto_mock(s3_bucket):
    uri = f"s3://{s3_bucket}/r/c.bin"
    st.write_bytes(uri, b"abc")
    st.configure(max_attempts=4)
    for exc in (bexc.ConnectionClosedError(endpoint_url="http://127.0.0.1"),
                bexc.EndpointConnectionError(endpoint_url="http://127.0.0.1"),
                bexc.ReadTimeoutError(endpoint_url="http://127.0.0.1")):
        fail = FailFirst(2, exc=exc)
        with hook("before-send.s3.GetObject", fail):
            assert st.read_bytes(uri) == b"abc"
        assert fail.sends == 3, type(exc).__name__


def test_retries_exhausted_gives_clear_error_moto_mock(s3_bucket):
    uri = f"s3://{s3_bucket}/r/e.bin"
    st.write_bytes(uri, b"abc")
    st.configure(max_attempts=2)
    fail = FailFirst(None, status=503, code="ServiceUnavailable")
    with hook("before-send.s3.GetObject", fail):
        with pytest.raises(StorageError) as ei:
            st.read_bytes(uri)
    assert fail.sends == 2
    msg = str(ei.value)
    assert uri in msg and "2 attempt" in msg and "ServiceUnavailable" in msg
    assert ei.value.uri == uri and isinstance(ei.value, OSError)

    fail = FailFirst(None, exc=bexc.ConnectionClosedError(endpoint_url="http://127.0.0.1"))
    with hook("before-send.s3.HeadObject", fail):
        with pytest.raises(StorageError, match="max_attempts=2") as ei:
            st.size(uri)
    assert fail.sends == 2 and uri in str(ei.value)


@pytest.fixture
def flaky_body(monkeypatch):
    """Make the first ``state['fail']`` GetObject bodies deliver 100 bytes and then fail
    mid-stream with a connection-level error (what a reset socket looks like)."""
    state = {"fail": 0, "bodies": 0, "always": False}
    real_iter = StreamingBody.iter_chunks

    def iter_chunks(self, chunk_size=1024):
        state["bodies"] += 1
        if state["always"] or state["bodies"] <= state["fail"]:
            yield self.read(100)
            raise bexc.ResponseStreamingError(error="Connection broken: injected reset")
        yield from real_iter(self, chunk_size)

    monkeypatch.setattr(StreamingBody, "iter_chunks", iter_chunks)
    return state


def test_mid_stream_failures_are_retried_and_resumed_moto_mock(s3_bucket, flaky_body, tmp_path):
    data = _rand(3 * MiB + 17, seed=3)
    uri = f"s3://{s3_bucket}/s/data.bin"
    st.write_bytes(uri, data)
    st.configure(max_attempts=5, base_delay=0.001)
    flaky_body["fail"] = 3
    counter = Counter()
    with hook("before-call.s3.GetObject", counter):
        assert st.read_bytes(uri) == data
    assert counter.calls == 4  # 3 broken bodies + 1 good
    ranges = [h.get("Range") for h in counter.headers]
    assert ranges == [None, "bytes=100-", "bytes=200-", "bytes=300-"]  # resumed, not restarted
    assert all(h.get("If-Match") for h in counter.headers[1:])  # pinned to the first ETag

    flaky_body.update(fail=0, bodies=0)
    flaky_body["fail"] = 2
    st.download_file(uri, tmp_path / "d.bin")
    assert (tmp_path / "d.bin").read_bytes() == data


def test_mid_stream_failures_exhausted_moto_mock(s3_bucket, flaky_body, tmp_path):
    uri = f"s3://{s3_bucket}/s/x.bin"
    st.write_bytes(uri, _rand(10_000))
    st.configure(max_attempts=3, base_delay=0.001)
    flaky_body["always"] = True
    with pytest.raises(StorageError, match="after 3 attempt") as ei:
        st.read_range(uri, 0, 5000)
    assert uri in str(ei.value)
    # a failed download leaves neither the target nor a temp file
    dst = tmp_path / "dl" / "x.bin"
    with pytest.raises(StorageError):
        st.download_file(uri, dst)
    assert not dst.exists() and list(dst.parent.iterdir()) == []


def test_retry_call_helper_counts():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionResetError("reset")
        return "ok"

    sleeps: List[float] = []
    assert _s3.retry_call(flaky, description="op", max_attempts=3, base_delay=0.01, sleep=sleeps.append) == "ok"
    assert calls["n"] == 3 and len(sleeps) == 2 and all(0 <= d <= 0.02 for d in sleeps)
    with pytest.raises(StorageError, match="after 2 attempt"):
        _s3.retry_call(lambda: (_ for _ in ()).throw(TimeoutError("t")), description="op",
                       uri="s3://bkt/k", max_attempts=2, base_delay=0, sleep=lambda d: None)


# ---------------------------------------------------------------- kill mid-write


# Load only quantcore.io in the writer subprocess: a namespace stub for the top-level package
# skips quantcore/__init__.py (which imports torch & co. and would dominate the test time).
_LIGHT_IMPORT = f"""
import sys, types
_pkg = types.ModuleType("quantcore")
_pkg.__path__ = [{str(REPO_ROOT / "quantcore")!r}]
sys.modules["quantcore"] = _pkg
"""


def _run_until_marker(script: str, args: List[str], marker: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = _LIGHT_IMPORT + textwrap.dedent(script)
    proc = subprocess.Popen([sys.executable, "-c", code, *args],
                            env=env, cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early ({proc.returncode}): {proc.stdout.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("writer never reached the kill point")
        time.sleep(0.02)
    return proc


_S3_KILL_SCRIPT = """
    import sys, time
    from quantcore.io import storage as st, MiB
    src, uri, marker = sys.argv[1:4]
    st.configure(multipart_threshold=5 * MiB, part_size=5 * MiB, max_concurrency=1)
    def after_first_part(**kwargs):
        open(marker, "w").write("part sent")
        time.sleep(300)  # wait here to be SIGKILLed
    st.get_client().meta.events.register("after-call.s3.UploadPart", after_first_part)
    st.upload_file(src, uri)
    print("UPLOAD COMPLETED")
"""


def test_s3_upload_killed_midway_leaves_no_object_moto_mock(s3_bucket, s3_client, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(_rand(12 * MiB, seed=9))
    uri = f"s3://{s3_bucket}/artifacts/model.bin"
    marker = tmp_path / "marker"
    proc = _run_until_marker(_S3_KILL_SCRIPT, [str(src), uri, str(marker)], marker)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert b"UPLOAD COMPLETED" not in proc.stdout.read()

    assert not st.exists(uri)
    with pytest.raises(bexc.ClientError) as ei:
        s3_client.head_object(Bucket=s3_bucket, Key="artifacts/model.bin")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert st.list_uris(f"s3://{s3_bucket}") == []
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
    # the killed upload really was mid-multipart: its (invisible) parts can be reclaimed
    uploads = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["artifacts/model.bin"]
    assert st.cleanup_incomplete_writes(f"s3://{s3_bucket}/artifacts", older_than_s=0) == 1
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


_LOCAL_KILL_SCRIPT = """
    import sys, time
    from quantcore.io import storage as st
    target, marker = sys.argv[1:3]
    def stuck_fsync(fd):
        open(marker, "w").write("temp written")
        time.sleep(300)  # wait here to be SIGKILLed before the rename
    st._fsync = stuck_fsync
    st.write_bytes(target, b"NEW" * 1_000_000)
    print("WRITE COMPLETED")
"""


@pytest.mark.parametrize("preexisting", [False, True])
def test_local_write_killed_midway_leaves_no_partial_file(tmp_path, preexisting):
    target = tmp_path / "out" / "model.bin"
    if preexisting:
        target.parent.mkdir()
        target.write_bytes(b"OLD")
    marker = tmp_path / "marker"
    proc = _run_until_marker(_LOCAL_KILL_SCRIPT, [str(target), str(marker)], marker)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    if preexisting:
        assert target.read_bytes() == b"OLD"
    else:
        assert not target.exists()
    assert st.list_uris(str(tmp_path / "out")) == ([str(target)] if preexisting else [])
    assert st.cleanup_incomplete_writes(str(tmp_path / "out"), older_than_s=0) == 1
    assert [p.name for p in target.parent.iterdir()] == (["model.bin"] if preexisting else [])


def test_local_writer_exception_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "m.bin"

    def broken_fsync(fd):
        raise OSError(5, "injected I/O error")

    monkeypatch.setattr(st, "_fsync", broken_fsync)
    with pytest.raises(OSError, match="injected"):
        st.write_bytes(target, b"data")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- errors


def test_missing_objects_raise_file_not_found_moto_mock(s3_bucket, tmp_path):
    missing = [f"s3://{s3_bucket}/nope/x.bin", f"s3://qc-no-such-bucket-{os.getpid()}/x.bin",
               str(tmp_path / "nope.bin"), (tmp_path / "nope.bin").as_uri()]
    for uri in missing:
        assert st.exists(uri) is False
        for fn in (st.read_bytes, st.size, st.open_read, lambda u: st.read_range(u, 0, 10),
                   lambda u: st.read_range(u, 0, 0),
                   lambda u: st.download_file(u, tmp_path / "dl" / "x")):
            with pytest.raises(FileNotFoundError) as ei:
                fn(uri)
            assert ei.value.filename == uri or uri in str(ei.value), (uri, ei.value)
    assert not (tmp_path / "dl").exists()
    with pytest.raises(FileNotFoundError, match="qc-no-such-bucket"):
        st.list_uris(f"s3://qc-no-such-bucket-{os.getpid()}/p")
    with pytest.raises(FileNotFoundError, match="qc-no-such-bucket"):
        st.write_bytes(f"s3://qc-no-such-bucket-{os.getpid()}/x.bin", b"x")
    with pytest.raises(FileNotFoundError):
        st.upload_file(tmp_path / "not-there", f"s3://{s3_bucket}/y.bin")
    assert st.list_uris(str(tmp_path / "no-dir")) == []


def test_service_specific_endpoint_env_is_honoured_moto_mock(s3_server, s3_bucket, monkeypatch):
    """boto3's native AWS_ENDPOINT_URL_S3 beats AWS_ENDPOINT_URL (no custom variables)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: must not be used
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    st.reset_client()
    try:
        st.write_bytes(f"s3://{s3_bucket}/ep.bin", b"ok")
        assert st.read_bytes(f"s3://{s3_bucket}/ep.bin") == b"ok"
    finally:
        st.reset_client()


def test_one_slash_scheme_typos_name_the_fix_and_drive_letters_stay_local():
    with pytest.raises(ValueError, match=r"'s3:/bkt/k' looks like a s3:// URI with one slash missing; write 's3://bkt/k'"):
        st.parse_uri("s3:/bkt/k")
    assert st.parse_uri("c:/data").scheme == "local" and st.parse_uri("file:/data/x").path == "/data/x"


def test_missing_credentials_are_a_user_error_naming_the_uri():
    """botocore's NoCredentialsError (no keys, no profile, no role) is a set-up mistake: a StorageError
    (the CLI's exit 2) that names the URI and how to provide credentials, not a traceback."""
    from botocore import exceptions as bexc

    from quantcore.io import StorageError
    from quantcore.io._s3 import translate

    err = translate(bexc.NoCredentialsError(), "s3://bkt/k", "head_object")
    assert isinstance(err, StorageError) and "s3://bkt/k" in str(err) and "AWS_ACCESS_KEY_ID" in str(err)
