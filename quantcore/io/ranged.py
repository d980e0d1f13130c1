"""Seekable read-only file object over an S3 object, served by ranged GETs.

``zipfile.ZipFile(RangedReader("s3://b/shard-000.zip"))`` reads the end-of-central-directory
record, the central directory and the requested members only, never the whole object.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from . import _s3
from .uri import URI, parse_uri

DEFAULT_BLOCK_SIZE = 1024 * 1024
DEFAULT_MAX_BLOCKS = 16


class RangedReader(io.RawIOBase):
    """Read-only, seekable view of ``s3://bucket/key`` backed by ranged GetObject calls.

    * Reads are aligned to ``block_size`` blocks; the last ``max_blocks`` blocks are kept
      in an in-memory LRU cache. Consecutive missing blocks are fetched in one GET.
    * Unlike a bare ``RawIOBase``, ``read(n)`` returns exactly ``n`` bytes unless EOF is
      reached (it behaves like a buffered reader, which ``zipfile`` relies on).
    * The object's size and ETag are taken once (HEAD) at construction; every GET sends
      ``If-Match: <etag>`` so an object replaced mid-read raises :class:`StorageError`
      instead of returning a mix of two versions.
    * ``cache_dir``: fetched blocks are also persisted there (keyed by URI + ETag + block
      size, written atomically) and reused by later readers, across processes.
    * ``requests`` / ``bytes_fetched`` count network GETs and bytes transferred.

    Thread-safe (a lock serialises reads); each instance keeps its own position.
    """

    def __init__(
        self,
        uri: URI,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        cache_dir: Optional[str] = None,
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
        meta = _s3.head(p.bucket, p.key, self.uri)
        self.size: int = int(meta["ContentLength"])
        self.etag: Optional[str] = meta.get("ETag")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._cache: "OrderedDict[int, bytes]" = OrderedDict()
        self._pos = 0
        self._lock = threading.RLock()
        self.requests = 0
        self.bytes_fetched = 0
        self._disk_dir: Optional[str] = None
        if cache_dir is not None:
            ident = f"{self.uri}\0{self.etag}\0{self.size}".encode()
            self._disk_dir = os.path.join(os.fspath(cache_dir), hashlib.sha256(ident).hexdigest()[:32])
            os.makedirs(self._disk_dir, exist_ok=True)

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
        return os.path.join(self._disk_dir, f"b{self.block_size}_{idx}")

    def _lookup(self, idx: int) -> Optional[bytes]:
        blk = self._cache.get(idx)
        if blk is not None:
            self._cache.move_to_end(idx)
            return blk
        path = self._disk_path(idx)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    blk = f.read()
            except OSError:
                return None
            if len(blk) != self._block_len(idx):  # truncated/foreign file: refetch
                return None
            self._remember(idx, blk, persist=False)
            return blk
        return None

    def _remember(self, idx: int, blk: bytes, persist: bool = True) -> None:
        self._cache[idx] = blk
        self._cache.move_to_end(idx)
        while len(self._cache) > self.max_blocks:
            self._cache.popitem(last=False)
        path = self._disk_path(idx)
        if persist and path is not None:
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(blk)
                os.replace(tmp, path)
            except OSError:  # the disk cache is best effort
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def _fetch_run(self, first: int, last: int) -> Dict[int, bytes]:
        """One ranged GET for blocks ``first..last`` (inclusive)."""
        start = first * self.block_size
        end = min((last + 1) * self.block_size, self.size)
        data = _s3.get_bytes(self._bucket, self._key, self.uri, start, end, etag=self.etag)
        self.requests += 1
        self.bytes_fetched += len(data)
        if len(data) != end - start:
            raise _s3.StorageError(
                f"short read from {self.uri}: got {len(data)} of {end - start} bytes at {start} "
                "(object truncated after open?)", uri=self.uri)
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


def _runs(idxs: List[int]) -> List[Tuple[int, int]]:
    """Group sorted ints into inclusive (start, end) runs of consecutive values."""
    runs: List[Tuple[int, int]] = []
    for i in idxs:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
