"""S3 backend: settings, the process-wide boto3 client, retries, error mapping, and the
primitive object operations used by :mod:`quantcore.io.storage`.

Retries happen on two layers, without multiplying each other:

1. **Request layer (botocore).** The client is built with
   ``Config(retries={"mode": <standard|adaptive>, "max_attempts": N})``. botocore retries
   throttling (``SlowDown``, ``Throttling``...), 500/502/503/504, ``RequestTimeout`` and
   connection-level failures (``EndpointConnectionError``, ``ConnectionClosedError``,
   ``ReadTimeoutError``, urllib3 ``ProtocolError`` which botocore wraps) with exponential
   backoff and full jitter (botocore's own schedule: 50 ms base for transient errors, 1 s
   for throttling, capped at 20 s).
2. **Body layer (ours).** Once botocore has returned a ``GetObject`` response, reading the
   streaming body can still fail mid-stream (reset, timeout, truncated body). Those
   failures are retried by :func:`retry_call` with exponential backoff + full jitter
   (``base_delay * 2**k``, capped at ``max_delay``); downloads resume from the last byte
   received and pin the object's ETag with ``If-Match`` so a concurrently replaced object
   is detected instead of silently mixed.

Both layers use the same ``max_attempts`` (``QUANTCORE_S3_MAX_ATTEMPTS``, else the standard
``AWS_MAX_ATTEMPTS``, else 5; or :func:`configure`).
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import logging
import math
import os
import random
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

import botocore.exceptions as bexc
from botocore.config import Config

try:  # urllib3 is a botocore dependency
    import urllib3.exceptions as u3exc
except Exception:  # pragma: no cover
    u3exc = None  # type: ignore[assignment]

logger = logging.getLogger("quantcore.io")

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3 minimum for every part but the last
MAX_PARTS = 10_000
_CHUNK = 1 * MiB  # body read granularity

T = TypeVar("T")


class StorageError(OSError):
    """An S3 operation failed for a reason other than a missing object or bad URI
    (e.g. retries exhausted, object changed while being read). ``uri`` names the object."""

    def __init__(self, message: str, uri: str = "", attempts: Optional[int] = None):
        super().__init__(message)
        self.uri = uri
        self.attempts = attempts

    def __str__(self) -> str:  # OSError's __str__ would otherwise show args tuple oddly
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class S3Settings:
    """Tunables for the S3 backend. Resolution order: :func:`configure` overrides >
    environment (``QUANTCORE_S3_MAX_ATTEMPTS``, ``QUANTCORE_S3_RETRY_BASE_DELAY``, and the
    standard ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE``) > these defaults."""

    max_attempts: int = 5
    retry_mode: str = "standard"  # one of RETRY_MODES (botocore's retry modes)
    base_delay: float = 0.2  # seconds, our body-layer backoff base
    max_delay: float = 20.0  # seconds, backoff cap
    multipart_threshold: int = 64 * MiB
    part_size: int = 16 * MiB
    max_concurrency: int = 4  # parallel UploadPart requests; parallel planned ranged GETs per process
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_pool_connections: int = 16


_overrides: Dict[str, Any] = {}
_settings_lock = threading.Lock()


def _env_number(name: str, cast: Callable[[str], Any]) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return cast(raw.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from None


RETRY_MODES = ("legacy", "standard", "adaptive")  # botocore's (Config(retries={"mode": ...}))


def _validate(s: S3Settings) -> S3Settings:
    if s.max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1 (got {s.max_attempts})")
    if s.retry_mode not in RETRY_MODES:
        raise ValueError(f"retry_mode must be one of {', '.join(RETRY_MODES)} (got {s.retry_mode!r})")
    if s.base_delay < 0 or s.max_delay < 0:
        raise ValueError("base_delay and max_delay must be >= 0")
    if s.part_size < MIN_PART_SIZE:
        raise ValueError(f"part_size must be >= 5 MiB ({MIN_PART_SIZE}) (got {s.part_size})")
    if s.multipart_threshold < 1:
        raise ValueError(f"multipart_threshold must be >= 1 (got {s.multipart_threshold})")
    if s.max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 (got {s.max_concurrency})")
    return s


def get_settings() -> S3Settings:
    """Return the effective :class:`S3Settings` (overrides > env > defaults)."""
    vals: Dict[str, Any] = {}
    attempts = _env_number("QUANTCORE_S3_MAX_ATTEMPTS", int)
    if attempts is None:
        attempts = _env_number("AWS_MAX_ATTEMPTS", int)
    if attempts is not None:
        vals["max_attempts"] = attempts
    base = _env_number("QUANTCORE_S3_RETRY_BASE_DELAY", float)
    if base is not None:
        vals["base_delay"] = base
    mode = os.environ.get("AWS_RETRY_MODE", "").strip().lower()
    if mode:
        # botocore refuses an unknown mode too; our explicit Config would otherwise hide the variable
        if mode not in RETRY_MODES:
            raise ValueError(f"environment variable AWS_RETRY_MODE={mode!r} is not a botocore retry mode "
                             f"({', '.join(RETRY_MODES)})")
        vals["retry_mode"] = mode
    with _settings_lock:
        vals.update(_overrides)
    return _validate(S3Settings(**vals))


def configure(**overrides: Any) -> S3Settings:
    """Override S3 settings for this process (any :class:`S3Settings` field, e.g.
    ``configure(max_attempts=3, base_delay=0.01, multipart_threshold=8 * MiB)``).
    A value of ``None`` removes that override. Drops the cached client so the next call
    builds one with the new retry/timeouts config. Returns the effective settings."""
    fields = {f.name for f in dataclasses.fields(S3Settings)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown S3 setting(s): {sorted(unknown)}; valid: {sorted(fields)}")
    with _settings_lock:
        new = dict(_overrides)
        for k, v in overrides.items():
            if v is None:
                new.pop(k, None)
            else:
                new[k] = v
        _validate(dataclasses.replace(S3Settings(), **new))
        _overrides.clear()
        _overrides.update(new)
    _drop_client(keep_session=True)
    return get_settings()


def reset_config() -> None:
    """Remove all :func:`configure` overrides (the cached client is rebuilt if any were set)."""
    with _settings_lock:
        had = bool(_overrides)
        _overrides.clear()
    if had:
        _drop_client(keep_session=True)


# ------------------------------------------------------------------------------- client

_client: Any = None
_client_pid: Optional[int] = None
_session: Any = None  # boto3 Session reused when only the client config changes
_loader: Any = None  # botocore data loader (parsed service models), inherited by forked workers
_client_lock = threading.Lock()


def get_client() -> Any:
    """The process-wide boto3 S3 client (thread-safe; created lazily; after a fork the child keeps
    it with fresh connections, see :func:`_adopt_forked_client`).

    Endpoint comes from boto3's native ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
    handling, region and credentials from boto3's standard chain.
    """
    global _client, _client_pid, _session, _loader
    c = _client
    if c is not None and _client_pid == os.getpid():
        return c
    with _client_lock:
        if _client is not None and _client_pid != os.getpid() and _adopt_forked_client(_client):
            _client_pid = os.getpid()
            return _client
        if _client is None or _client_pid != os.getpid():
            import boto3.session  # local import keeps `import quantcore.io` cheap

            s = get_settings()
            if _session is None or _client_pid != os.getpid():
                import botocore.session

                core = botocore.session.get_session()
                if _loader is not None:
                    # Forked DataLoader workers would otherwise re-read and parse the S3 model and
                    # endpoint rules on every pass; the parent's parsed copy is read-only data.
                    core.register_component("data_loader", _loader)
                else:
                    _loader = core.get_component("data_loader")
                _session = boto3.session.Session(botocore_session=core)
            cfg = Config(
                retries={"mode": s.retry_mode, "total_max_attempts": s.max_attempts},
                connect_timeout=s.connect_timeout,
                read_timeout=s.read_timeout,
                max_pool_connections=max(s.max_pool_connections, s.max_concurrency + 2),
            )
            _client = _session.client("s3", config=cfg)
            _client_pid = os.getpid()
        return _client


def _adopt_forked_client(client: Any) -> bool:
    """In a forked child (a DataLoader worker), keep the parent's client - built once, not once per
    worker per pass - but drop its pooled connections: they are the parent's sockets. Closing them
    here only closes the child's copies of the descriptors. False (build a new client) if botocore's
    layout is not the one expected."""
    try:
        client._endpoint.http_session.close()  # urllib3 PoolManager.clear(): new pools on demand
    except Exception:
        return False
    return True


def reset_client() -> None:
    """Forget the cached client and boto3 session (the next :func:`get_client` re-reads the
    environment: endpoint, credentials, retry settings)."""
    _drop_client(keep_session=False)


def _drop_client(keep_session: bool) -> None:
    global _client, _client_pid, _session
    with _client_lock:
        _client = None
        if not keep_session:
            _session = None
            _client_pid = None


# ------------------------------------------------------------------------------ retries

def _stream_error_types() -> Tuple[type, ...]:
    types: List[type] = [
        bexc.ResponseStreamingError,
        bexc.IncompleteReadError,
        bexc.ReadTimeoutError,
        bexc.ConnectionClosedError,
        bexc.EndpointConnectionError,
        ConnectionError,  # builtin: ConnectionResetError, BrokenPipeError, ...
        socket.timeout,
        TimeoutError,
        http.client.IncompleteRead,
    ]
    flex = getattr(bexc, "FlexibleChecksumError", None)
    if flex is not None:
        types.append(flex)
    if u3exc is not None:
        types += [u3exc.ProtocolError, u3exc.ReadTimeoutError, u3exc.IncompleteRead]
    return tuple(types)


#: Exceptions retried by :func:`retry_call` (failures while a response body is streamed).
RETRYABLE_STREAM_ERRORS: Tuple[type, ...] = _stream_error_types()


def backoff_delay(attempt: int, base_delay: float, max_delay: float) -> float:
    """Full-jitter exponential backoff: uniform(0, min(max_delay, base_delay * 2**(attempt-1)))."""
    cap = min(max_delay, base_delay * (2 ** max(attempt - 1, 0)))
    return random.uniform(0.0, cap)


def retry_call(
    fn: Callable[[], T],
    *,
    description: str,
    uri: str = "",
    retry_on: Tuple[type, ...] = RETRYABLE_STREAM_ERRORS,
    max_attempts: Optional[int] = None,
    base_delay: Optional[float] = None,
    max_delay: Optional[float] = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn()`` retrying ``retry_on`` exceptions with exponential backoff + jitter.

    After ``max_attempts`` failures raises :class:`StorageError` (chained to the last
    error) naming ``uri`` and the attempt count. Defaults come from :func:`get_settings`.
    """
    s = get_settings()
    attempts = s.max_attempts if max_attempts is None else max_attempts
    base = s.base_delay if base_delay is None else base_delay
    cap = s.max_delay if max_delay is None else max_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except retry_on as e:
            if attempt >= attempts:
                raise StorageError(
                    f"{description} failed for {uri} after {attempt} attempt(s): "
                    f"{type(e).__name__}: {e}",
                    uri=uri,
                    attempts=attempt,
                ) from e
            delay = backoff_delay(attempt, base, cap)
            logger.warning(
                "%s %s: %s: %s; retrying in %.3fs (attempt %d/%d)",
                description, uri, type(e).__name__, e, delay, attempt + 1, attempts,
            )
            sleep(delay)


# -------------------------------------------------------------------------- error mapping

_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchUpload"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch"}


def error_code(e: BaseException) -> str:
    if isinstance(e, bexc.ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def _status(e: bexc.ClientError) -> int:
    try:
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    except (TypeError, ValueError):
        return 0


def translate(e: BaseException, uri: str, op: str) -> BaseException:
    """Map a botocore exception from ``op`` on ``uri`` to a clear Python exception."""
    if isinstance(e, bexc.ClientError):
        code, status = error_code(e), _status(e)
        if code in _NOT_FOUND_CODES or status == 404:
            what = "bucket" if code == "NoSuchBucket" else "object"
            return FileNotFoundError(errno.ENOENT, f"No such S3 {what} ({code or status}) during {op}", uri)
        if code in _DENIED_CODES or status == 403:
            return PermissionError(errno.EACCES, f"Access denied ({code or status}) during {op}", uri)
        if code == "PreconditionFailed" or status == 412:
            return StorageError(f"S3 object {uri} changed while it was being read ({op})", uri=uri)
        attempts = e.response.get("ResponseMetadata", {}).get("RetryAttempts")
        n = (attempts or 0) + 1
        return StorageError(
            f"S3 {op} failed for {uri}: {code or 'HTTP ' + str(status)} "
            f"(HTTP {status}) after {n} attempt(s): {e}",
            uri=uri,
            attempts=n,
        )
    if isinstance(e, bexc.NoCredentialsError):  # a set-up mistake the user fixes, not a crash
        return StorageError(f"S3 {op} on {uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                            f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run where an IAM role provides them)", uri=uri)
    if isinstance(e, bexc.ParamValidationError):
        return ValueError(f"invalid S3 request for {uri!r} ({op}): {e}")
    if isinstance(e, (bexc.ConnectionError, bexc.HTTPClientError)):
        n = get_settings().max_attempts
        return StorageError(
            f"S3 {op} failed for {uri} after retries (max_attempts={n}): {type(e).__name__}: {e}",
            uri=uri,
            attempts=n,
        )
    return e


def call(op: str, uri: str, **kwargs: Any) -> Any:
    """Invoke client method ``op`` (snake_case) with botocore's retries; map errors."""
    client = get_client()
    try:
        return getattr(client, op)(**kwargs)
    except (bexc.ClientError, bexc.BotoCoreError) as e:
        mapped = translate(e, uri, op)
        if mapped is e:
            raise
        raise mapped from e


# ---------------------------------------------------------------------------- operations


def head(bucket: str, key: str, uri: str) -> Dict[str, Any]:
    """HeadObject; FileNotFoundError if absent."""
    return call("head_object", uri, Bucket=bucket, Key=key)


def exists(bucket: str, key: str, uri: str) -> bool:
    try:
        head(bucket, key, uri)
        return True
    except FileNotFoundError:
        return False


def stream_get(
    bucket: str,
    key: str,
    uri: str,
    sink: Callable[[bytes], None],
    start: int = 0,
    end: Optional[int] = None,
    etag: Optional[str] = None,
) -> Tuple[int, Optional[str]]:
    """Stream bytes ``[start, end)`` (``end=None``: to EOF) of an object into ``sink``.

    Request failures are retried by botocore; mid-stream body failures are retried here,
    resuming at the first byte not yet delivered and pinning the ETag with ``If-Match``.
    A range starting at/after EOF yields nothing. Returns ``(bytes_delivered, etag)``.
    """
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range [{start}, {end}) for {uri}")
    pos = start
    state = {"etag": etag}

    def attempt() -> None:
        nonlocal pos
        if end is not None and pos >= end:
            return
        kwargs: Dict[str, Any] = {"Bucket": bucket, "Key": key}
        if pos > 0 or end is not None:
            kwargs["Range"] = f"bytes={pos}-" + (str(end - 1) if end is not None else "")
        if state["etag"]:
            kwargs["IfMatch"] = state["etag"]
        try:
            resp = call("get_object", uri, **kwargs)
        except StorageError as e:
            if isinstance(e.__cause__, bexc.ClientError) and error_code(e.__cause__) == "InvalidRange":
                return  # range starts at/after EOF
            raise
        if state["etag"] is None:
            state["etag"] = resp.get("ETag")
        body = resp["Body"]
        try:
            for chunk in body.iter_chunks(_CHUNK):
                if chunk:
                    sink(chunk)
                    pos += len(chunk)
        finally:
            body.close()

    retry_call(attempt, description="GetObject body read", uri=uri)
    return pos - start, state["etag"]


def get_bytes(bucket: str, key: str, uri: str, start: int = 0, end: Optional[int] = None,
              etag: Optional[str] = None) -> bytes:
    buf = bytearray()
    stream_get(bucket, key, uri, buf.extend, start, end, etag)
    return bytes(buf)


def _want_checksum(client: Any) -> bool:
    return getattr(client.meta.config, "request_checksum_calculation", None) == "when_supported"


def put(bucket: str, key: str, uri: str, body: Any) -> None:
    """Single PutObject (atomic: S3 never exposes a partially written object)."""
    call("put_object", uri, Bucket=bucket, Key=key, Body=body)


def effective_part_size(total: int, part_size: int) -> int:
    """``part_size`` grown (in whole MiB) so that ``total`` fits in at most 10 000 parts."""
    if total > part_size * MAX_PARTS:
        part_size = math.ceil(total / MAX_PARTS / MiB) * MiB
    return max(part_size, MIN_PART_SIZE)


def multipart_upload(
    bucket: str,
    key: str,
    uri: str,
    total: int,
    read_part: Callable[[int, int], bytes],
    part_size: int,
    max_concurrency: int,
) -> Dict[str, Any]:
    """Upload ``total`` bytes as a multipart upload; ``read_part(offset, length)`` supplies
    data (called sequentially from this thread). The object becomes visible only on
    CompleteMultipartUpload; on ANY exception (incl. KeyboardInterrupt) the in-flight parts
    are drained and the upload is aborted so no parts linger. Returns the Complete response.
    """
    client = get_client()
    part_size = effective_part_size(total, part_size)
    n_parts = max(1, math.ceil(total / part_size))
    create_kwargs: Dict[str, Any] = {}
    checksum = _want_checksum(client)
    if checksum:
        create_kwargs["ChecksumAlgorithm"] = "CRC32"
    mpu = call("create_multipart_upload", uri, Bucket=bucket, Key=key, **create_kwargs)
    upload_id = mpu["UploadId"]
    logger.debug("multipart upload %s -> %s: %d parts of %d bytes", upload_id, uri, n_parts, part_size)

    def upload_one(number: int, data: bytes) -> Dict[str, Any]:
        kw: Dict[str, Any] = dict(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data)
        if checksum:
            kw["ChecksumAlgorithm"] = "CRC32"
        resp = call("upload_part", uri, **kw)
        part = {"PartNumber": number, "ETag": resp["ETag"]}
        if resp.get("ChecksumCRC32"):
            part["ChecksumCRC32"] = resp["ChecksumCRC32"]
        return part

    executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="qc-s3-part")
    futures: List[Future] = []
    try:
        pending: set = set()
        for i in range(n_parts):
            while len(pending) >= max_concurrency:  # bound memory: <= max_concurrency parts buffered
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()  # re-raise part failure early
            off = i * part_size
            length = min(part_size, total - off)
            data = read_part(off, length)
            if len(data) != length:
                raise StorageError(
                    f"source for {uri} returned {len(data)} bytes at offset {off}, expected {length} "
                    "(file changed during upload?)", uri=uri)
            fut = executor.submit(upload_one, i + 1, data)
            futures.append(fut)
            pending.add(fut)
        parts = [f.result() for f in futures]
        executor.shutdown(wait=True)
        return call(
            "complete_multipart_upload", uri, Bucket=bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
    except BaseException:
        executor.shutdown(wait=True, cancel_futures=True)  # abort only after in-flight parts end
        try:
            call("abort_multipart_upload", uri, Bucket=bucket, Key=key, UploadId=upload_id)
            logger.warning("aborted multipart upload %s for %s", upload_id, uri)
        except Exception as abort_err:  # keep the original error; log the abort failure
            logger.error("could not abort multipart upload %s for %s: %s (parts may linger until "
                         "cleanup_incomplete_writes or a bucket lifecycle rule removes them)",
                         upload_id, uri, abort_err)
        raise


def list_keys(bucket: str, prefix: str, uri: str, page_size: int = 1000) -> Iterator[str]:
    """Yield keys under ``prefix`` (recursive), paginated with ``page_size`` keys per request."""
    client = get_client()
    paginator = client.get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
    try:
        for page in pages:
            for obj in page.get("Contents", ()):
                yield obj["Key"]
    except (bexc.ClientError, bexc.BotoCoreError) as e:
        mapped = translate(e, uri, "list_objects_v2")
        if mapped is e:
            raise
        raise mapped from e


def list_multipart_uploads(bucket: str, prefix: str, uri: str) -> List[Dict[str, Any]]:
    """All in-progress multipart uploads under ``prefix``."""
    client = get_client()
    paginator = client.get_paginator("list_multipart_uploads")
    out: List[Dict[str, Any]] = []
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            out.extend(page.get("Uploads", ()))
    except (bexc.ClientError, bexc.BotoCoreError) as e:
        mapped = translate(e, uri, "list_multipart_uploads")
        if mapped is e:
            raise
        raise mapped from e
    return out
