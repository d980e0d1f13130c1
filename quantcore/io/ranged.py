"""Seekable read-only file object over an S3 object, served by ranged GETs.

``zipfile.ZipFile(RangedReader("s3://b/shard-000.zip"))`` reads the end-of-central-directory
record, the central directory and the requested members only, never the whole object.

Two ways bytes arrive:

* **blocks** (on demand): a read that nothing covers fetches the ``block_size``-aligned blocks
  around it (LRU in memory, optionally persisted in ``cache_dir``);
* **spans** (planned): :meth:`RangedReader.prefetch` starts one GET per byte range in a
  per-process thread pool (at most ``S3Settings.max_concurrency`` GETs in flight), so a data
  loader can ask for the members of a whole batch in one request and for the next batch while
  the current one decodes; reads inside a span wait for it instead of issuing their own GET.

GETs go through a *transport* chosen by name (:data:`TRANSPORTS`, extended with
:func:`register_transport`): ``boto3`` (default: ``quantcore.io._s3``, If-Match on the ETag,
our retries), ``s3torchconnector`` or ``fsspec`` (``s3fs``), both optional imports.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from . import _s3
from .uri import URI, parse_uri

DEFAULT_BLOCK_SIZE = 1024 * 1024
DEFAULT_MAX_BLOCKS = 16
#: Spans kept in memory per reader (bytes); the oldest finished spans are dropped beyond it.
DEFAULT_MAX_SPAN_BYTES = 256 * 1024 * 1024

# ------------------------------------------------------------------------------ transports
#: ``get(bucket, key, uri, start, end, etag) -> bytes`` for ``[start, end)``.
RangeGet = Callable[[str, str, str, int, int, Optional[str]], bytes]
#: name -> factory building a :data:`RangeGet` (called once per process, lazily).
TRANSPORTS: Dict[str, Callable[[], RangeGet]] = {}
_transport_cache: Dict[Tuple[str, int], RangeGet] = {}
_transport_lock = threading.Lock()


def register_transport(name: str) -> Callable[[Callable[[], RangeGet]], Callable[[], RangeGet]]:
    """Decorator: register a factory of ranged-GET functions under ``name``."""
    def deco(factory: Callable[[], RangeGet]) -> Callable[[], RangeGet]:
        TRANSPORTS[name] = factory
        return factory
    return deco


def get_transport(name: str) -> RangeGet:
    """The ranged-GET function of transport ``name``, built once per process (fork-safe)."""
    key = (name, os.getpid())
    fn = _transport_cache.get(key)
    if fn is None:
        if name not in TRANSPORTS:
            raise ValueError(f"unknown S3 transport {name!r}; known: {sorted(TRANSPORTS)}")
        with _transport_lock:
            fn = _transport_cache.get(key)
            if fn is None:
                fn = _transport_cache[key] = TRANSPORTS[name]()
    return fn


@register_transport("boto3")
def _boto3_transport() -> RangeGet:
    def get(bucket: str, key: str, uri: str, start: int, end: int, etag: Optional[str]) -> bytes:
        return _s3.get_bytes(bucket, key, uri, start, end, etag=etag)  # looked up per call (bench wraps it)
    return get


def _endpoint() -> Optional[str]:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@register_transport("s3torchconnector")
def _s3tc_transport() -> RangeGet:
    """AWS's CRT-based client (``pip install quantcore[s3torch]``). No If-Match: a replaced object
    is detected only by its size."""
    try:
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client
    except ImportError as e:
        raise ImportError("transport 's3torchconnector' needs `pip install s3torchconnector`") from e
    ep = _endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    client = S3Client(region, endpoint=ep, s3client_config=S3ClientConfig(force_path_style=bool(ep)))

    def get(bucket: str, key: str, uri: str, start: int, end: int, etag: Optional[str]) -> bytes:
        try:  # the reader objects HEAD the object first; the stream underneath is one ranged GET
            return b"".join(client._get_object_stream(bucket, key, start, end))
        except Exception as e:  # S3Exception carries no type: keep the message, name the object
            raise _s3.StorageError(f"s3torchconnector GET {uri} [{start}, {end}) failed: {e}", uri=uri) from e
    return get


@register_transport("fsspec")
def _fsspec_transport() -> RangeGet:
    """``s3fs`` (async aiobotocore under fsspec). No If-Match either."""
    try:
        import s3fs
    except ImportError as e:
        raise ImportError("transport 'fsspec' needs `pip install s3fs`") from e
    fs = s3fs.S3FileSystem(endpoint_url=_endpoint(), skip_instance_cache=True)

    def get(bucket: str, key: str, uri: str, start: int, end: int, etag: Optional[str]) -> bytes:
        try:
            return fs.cat_file(f"{bucket}/{key}", start=start, end=end)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise _s3.StorageError(f"s3fs GET {uri} [{start}, {end}) failed: {e}", uri=uri) from e
    return get


_pool: Optional[ThreadPoolExecutor] = None
_pool_pid: Optional[int] = None


def _get_pool() -> ThreadPoolExecutor:
    """Process-wide pool for span GETs; rebuilt after fork (threads do not survive it)."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        with _transport_lock:
            if _pool is None or _pool_pid != os.getpid():
                _pool = ThreadPoolExecutor(_s3.get_settings().max_concurrency, thread_name_prefix="qc-s3-span")
                _pool_pid = os.getpid()
    return _pool


class RangedReader(io.RawIOBase):
    """Read-only, seekable view of ``s3://bucket/key`` backed by ranged GetObject calls.

    * Reads covered by a span (see :meth:`prefetch`) or by the ``tail`` given at construction are
      served from memory; a read still in flight waits for its span.
    * Other reads are aligned to ``block_size`` blocks; the last ``max_blocks`` blocks are kept
      in an in-memory LRU cache. Consecutive missing blocks are fetched in one GET.
    * Unlike a bare ``RawIOBase``, ``read(n)`` returns exactly ``n`` bytes unless EOF is
      reached (it behaves like a buffered reader, which ``zipfile`` relies on).
    * The object's size and ETag are taken once (HEAD) at construction, or from ``known=(size,
      etag)`` (no request: a parent process already took them); every boto3 GET sends
      ``If-Match: <etag>`` so an object replaced mid-read raises :class:`StorageError`
      instead of returning a mix of two versions (other transports: a short read raises).
    * ``cache_dir``: fetched blocks are also persisted there (keyed by URI + ETag + block
      size, written atomically) and reused by later readers, across processes; spans are then
      widened to whole blocks and only blocks missing on disk are fetched.
    * ``requests`` / ``bytes_fetched`` count network GETs and bytes transferred.

    Thread-safe (a lock serialises reads); each instance keeps its own position.
    """

    def __init__(
        self,
        uri: URI,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        cache_dir: Optional[str] = None,
        *,
        transport: str = "boto3",
        known: Optional[Tuple[int, Optional[str]]] = None,
        tail: Optional[Tuple[int, bytes]] = None,
        max_span_bytes: int = DEFAULT_MAX_SPAN_BYTES,
    ) -> None:
        super().__init__()
        p = parse_uri(uri, require_key=True)
        if not p.is_s3:
            raise ValueError(f"RangedReader needs an s3:// URI, got {p.original!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 (got {max_blocks})")
        self.uri = p.original
        self._bucket, self._key = p.bucket, p.key
        self._get = get_transport(transport)
        self.transport = transport
        if known is None:
            meta = _s3.head(p.bucket, p.key, self.uri)
            known = (int(meta["ContentLength"]), meta.get("ETag"))
        self.size: int = int(known[0])
        self.etag: Optional[str] = known[1]
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.max_span_bytes = max_span_bytes
        self._cache: "OrderedDict[int, bytes]" = OrderedDict()
        self._spans: "OrderedDict[Tuple[int, int], Future]" = OrderedDict()
        self._span_bytes = 0
        self._tail: Optional[Tuple[int, bytes]] = None
        if tail is not None:
            if tail[0] < 0 or tail[0] + len(tail[1]) != self.size:
                raise ValueError(f"tail of {self.uri} must end at its size {self.size}")
            self._tail = (int(tail[0]), bytes(tail[1]))
        self._pos = 0
        self._lock = threading.RLock()
        self._count_lock = threading.Lock()
        self.requests = 0
        self.bytes_fetched = 0
        self._disk_dir: Optional[str] = None
        if cache_dir is not None:
            ident = f"{self.uri}\0{self.etag}\0{self.size}".encode()
            self._disk_dir = os.path.join(os.fspath(cache_dir), hashlib.sha256(ident).hexdigest()[:32])
            os.makedirs(self._disk_dir, exist_ok=True)

    def tail_bytes(self, start: int) -> bytes:
        """Bytes ``[start, size)`` (read through the caches), e.g. a zip's central directory to hand
        to readers in other processes as ``tail=(start, bytes)``."""
        with self._lock:
            return self._read_at(start, self.size - start)

    # -- planned reads -------------------------------------------------------------
    def prefetch(self, ranges: Iterable[Tuple[int, int]]) -> List[Tuple[int, int]]:
        """Start one background GET per ``[start, end)`` range not already covered (ranges are used
        as given: merge neighbours with :func:`coalesce` first). Returns the keys of the spans that
        hold them (new or planned earlier), to :meth:`release` once read. GET errors surface when a
        read needs the span."""
        keys: List[Tuple[int, int]] = []
        with self._lock:
            for start, end in ranges:
                start, end = max(0, int(start)), min(int(end), self.size)
                if start >= end or self._tail is not None and start >= self._tail[0]:
                    continue
                have = self._span_key(start, end)
                if have is not None:  # already planned (read-ahead): the caller now owns it
                    keys.append(have)
                    continue
                if self._disk_dir is not None:
                    keys.extend(self._prefetch_blocks(start, end))
                    continue
                self._add_span(start, end, _get_pool().submit(self._fetch_span, start, end, False))
                keys.append((start, end))
        return keys

    def release(self, keys: Iterable[Tuple[int, int]]) -> None:
        """Drop spans returned by :meth:`prefetch` (their bytes are no longer needed)."""
        with self._lock:
            for k in keys:
                fut = self._spans.pop(k, None)
                if fut is not None:
                    self._span_bytes -= k[1] - k[0]

    def _prefetch_blocks(self, start: int, end: int) -> List[Tuple[int, int]]:
        bs = self.block_size
        missing = [i for i in range(start // bs, (end - 1) // bs + 1)
                   if i not in self._cache and not self._on_disk(i)]
        keys = []
        for a, b in _runs(missing):
            s0, e0 = a * bs, min((b + 1) * bs, self.size)
            have = self._span_key(s0, e0)
            if have is None:
                self._add_span(s0, e0, _get_pool().submit(self._fetch_span, s0, e0, True))
                have = (s0, e0)
            keys.append(have)
        return keys

    def _span_key(self, start: int, end: int) -> Optional[Tuple[int, int]]:
        for k in self._spans:
            if k[0] <= start and end <= k[1]:
                return k
        return None

    def _add_span(self, start: int, end: int, fut: Future) -> None:
        self._spans[(start, end)] = fut
        self._span_bytes += end - start
        while self._span_bytes > self.max_span_bytes and len(self._spans) > 1:
            (s0, e0), old = next(iter(self._spans.items()))
            if not old.done():
                break  # never drop an in-flight GET; the bound is exceeded only while it runs
            del self._spans[(s0, e0)]
            self._span_bytes -= e0 - s0

    def _checked_get(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` in one ranged GET (ETag pinned), counted; a short read is an error."""
        data = self._get(self._bucket, self._key, self.uri, start, end, self.etag)
        with self._count_lock:
            self.requests += 1
            self.bytes_fetched += len(data)
        if len(data) != end - start:
            raise _s3.StorageError(
                f"short read from {self.uri}: got {len(data)} of {end - start} bytes at {start} "
                "(object truncated after open?)", uri=self.uri)
        return data

    def _fetch_span(self, start: int, end: int, persist: bool) -> bytes:
        data = self._checked_get(start, end)
        if persist:
            bs = self.block_size
            for idx in range(start // bs, (end - 1) // bs + 1):
                off = idx * bs - start
                self._persist(idx, data[off: off + self._block_len(idx)])
        return data

    def _covered(self, start: int, end: int, wait: bool = True) -> Optional[Tuple[int, bytes]]:
        """``(span_start, span_bytes)`` of a span or the tail holding ``[start, end)``, else None.
        Waits for an in-flight span (re-raising its GET error); ``wait=False`` returns
        ``(span_start, b"")`` for it instead."""
        if self._tail is not None and start >= self._tail[0]:
            return self._tail
        for (s0, e0), fut in self._spans.items():
            if s0 <= start and end <= e0:
                return (s0, fut.result()) if wait else (s0, b"")
        return None

    # -- io protocol ---------------------------------------------------------------
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.uri

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            new = offset
        elif whence == io.SEEK_CUR:
            new = self._pos + offset
        elif whence == io.SEEK_END:
            new = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence!r}")
        if new < 0:
            raise OSError(22, f"negative seek position {new}", self.uri)
        self._pos = new
        return new

    def readinto(self, b) -> int:  # type: ignore[override]
        self._check_open()
        mv = memoryview(b).cast("B")
        with self._lock:
            data = self._read_at(self._pos, len(mv))
            n = len(data)
            mv[:n] = data
            self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        self._check_open()
        with self._lock:
            if size is None or size < 0:
                size = max(self.size - self._pos, 0)
            data = self._read_at(self._pos, size)
            self._pos += len(data)
            return data

    def readall(self) -> bytes:
        return self.read(-1)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed reader for {self.uri}")

    # -- block cache ---------------------------------------------------------------
    def _block_len(self, idx: int) -> int:
        return min(self.block_size, self.size - idx * self.block_size)

    def _disk_path(self, idx: int) -> Optional[str]:
        if self._disk_dir is None:
            return None
        # "c": blocks carry a CRC-32 trailer (files of the older, unchecked "b" form are never read)
        return os.path.join(self._disk_dir, f"c{self.block_size}_{idx}")

    def _on_disk(self, idx: int) -> bool:
        path = self._disk_path(idx)
        return path is not None and os.path.exists(path)

    def _lookup(self, idx: int) -> Optional[bytes]:
        blk = self._cache.get(idx)
        if blk is not None:
            self._cache.move_to_end(idx)
            return blk
        s0 = idx * self.block_size
        span = self._covered(s0, s0 + self._block_len(idx))  # a planned GET brings it: wait for it
        if span is not None:
            return span[1][s0 - span[0]: s0 - span[0] + self._block_len(idx)]
        path = self._disk_path(idx)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    blk = f.read()
            except OSError:
                return None
            blk, crc = blk[:-4], blk[-4:]
            if len(blk) != self._block_len(idx) or zlib.crc32(blk).to_bytes(4, "little") != crc:
                try:  # truncated, damaged or foreign: dropped and fetched again
                    os.unlink(path)
                except OSError:
                    pass
                return None
            self._remember(idx, blk, persist=False)
            return blk
        return None

    def _remember(self, idx: int, blk: bytes, persist: bool = True) -> None:
        self._cache[idx] = blk
        self._cache.move_to_end(idx)
        while len(self._cache) > self.max_blocks:
            self._cache.popitem(last=False)
        if persist:
            self._persist(idx, blk)

    def _persist(self, idx: int, blk: bytes) -> None:
        path = self._disk_path(idx)
        if path is not None:
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(blk)
                    f.write(zlib.crc32(blk).to_bytes(4, "little"))
                os.replace(tmp, path)
                old = os.path.join(os.path.dirname(path), "b" + os.path.basename(path)[1:])
                if os.path.exists(old):  # the unchecked form of earlier versions: superseded
                    os.unlink(old)
            except OSError:  # the disk cache is best effort
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def _fetch_run(self, first: int, last: int) -> Dict[int, bytes]:
        """One ranged GET for blocks ``first..last`` (inclusive)."""
        start = first * self.block_size
        end = min((last + 1) * self.block_size, self.size)
        data = self._checked_get(start, end)
        out: Dict[int, bytes] = {}
        for idx in range(first, last + 1):
            off = (idx - first) * self.block_size
            blk = data[off: off + self._block_len(idx)]
            out[idx] = blk
            self._remember(idx, blk)
        return out

    def _read_at(self, pos: int, n: int) -> bytes:
        end = min(pos + n, self.size)
        if n <= 0 or pos >= end:
            return b""
        span = self._covered(pos, end)
        if span is not None:
            return span[1][pos - span[0]: end - span[0]]
        bs = self.block_size
        first, last = pos // bs, (end - 1) // bs
        blocks: Dict[int, bytes] = {}
        missing: List[int] = []
        for idx in range(first, last + 1):
            blk = self._lookup(idx)
            if blk is None:
                missing.append(idx)
            else:
                blocks[idx] = blk
        for a, b in _runs(missing):
            blocks.update(self._fetch_run(a, b))
        if first == last:
            off = pos - first * bs
            return blocks[first][off: off + (end - pos)]
        parts = [blocks[i] for i in range(first, last + 1)]
        joined = b"".join(parts)
        off = pos - first * bs
        return joined[off: off + (end - pos)]


def coalesce(ranges: Iterable[Tuple[int, int]], max_gap: int, max_len: int) -> List[Tuple[int, int]]:
    """Sorted ``[start, end)`` ranges with neighbours at most ``max_gap`` bytes apart merged, as
    long as a merged range stays within ``max_len`` bytes (a longer single range is kept whole)."""
    out: List[Tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s - out[-1][1] <= max_gap and max(e, out[-1][1]) - out[-1][0] <= max_len:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


def _runs(idxs: List[int]) -> List[Tuple[int, int]]:
    """Group sorted ints into inclusive (start, end) runs of consecutive values."""
    runs: List[Tuple[int, int]] = []
    for i in idxs:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
