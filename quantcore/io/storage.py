"""Uniform storage API over local paths, ``file://`` URIs and ``s3://bucket/key``.

Guarantees:

* **Atomic writes.** :func:`write_bytes`, :func:`upload_file` and :func:`download_file`
  either produce the complete artifact or leave the target untouched (absent, or its
  previous content). Locally: a hidden temp file in the target's directory, fsync,
  ``os.replace``, fsync of the directory. On S3: a single PutObject below the multipart
  threshold; above it a multipart upload, which S3 only makes visible on
  CompleteMultipartUpload and which is aborted on any in-process failure. A process killed
  mid-upload leaves only invisible parts (reclaim them with
  :func:`cleanup_incomplete_writes` or an ``AbortIncompleteMultipartUpload`` lifecycle rule).
* **Clear errors.** Missing object/bucket: :class:`FileNotFoundError` (``filename`` is the
  URI). Malformed URI / unknown scheme: :class:`ValueError` naming it. Retries exhausted or
  object changed while reading: :class:`StorageError` (an ``OSError``).
* **Retries** for S3: see :mod:`quantcore.io._s3` and :func:`configure`.

S3 endpoint/region/credentials come from boto3's standard mechanisms
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION``, env/profile/IRSA/IMDS ...).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
import uuid
from typing import BinaryIO, Iterator, List, Optional, Sequence, Union

from . import _s3
from ._s3 import MiB, S3Settings, StorageError, configure, get_client, get_settings, reset_client, reset_config
from .ranged import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_BLOCKS, RangedReader
from .uri import URI, absolute, file_uri, is_s3, join, local_path, location, parse_uri, s3_uri, same_location
from .uri import local_path as _to_local_path

logger = logging.getLogger("quantcore.io")

__all__ = [
    "URI", "MiB", "S3Settings", "StorageError", "RangedReader",
    "read_bytes", "read_range", "size", "exists", "write_bytes", "upload_file",
    "download_file", "list_uris", "join", "is_s3", "open_read", "delete",
    "cleanup_incomplete_writes", "configure", "reset_config", "get_settings", "get_client",
    "reset_client", "parse_uri", "local_path", "location", "absolute", "same_location",
]

_TMP_SUFFIX = ".qctmp"


# ------------------------------------------------------------------------ local helpers

def _fsync(fd: int) -> None:
    """fsync wrapper (module-level so tests can interpose on the commit point)."""
    os.fsync(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. not supported on this platform/filesystem
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(base: str) -> str:
    """``.<base>.<12 hex>.qctmp``, with ``base`` shortened so the name stays within NAME_MAX (255 bytes
    on common file systems): a target whose own name is legal must be writable."""
    tail = f".{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
    raw = os.fsencode(base)
    room = 255 - 1 - len(tail)
    if len(raw) > room:  # a character split by the cut (or a non-UTF-8 byte) is dropped: fewer bytes still
        base = raw[:room].decode("utf-8", "ignore")
    return f".{base}{tail}"


@contextlib.contextmanager
def _atomic_local_writer(path: str) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit its content atomically replaces ``path``.

    The temp file lives next to the target (same filesystem, so ``os.replace`` is atomic),
    is created with the umask-respecting mode 0o666, fsynced before the rename, and the
    directory is fsynced after it. On exception the temp file is removed and ``path`` is
    left untouched.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "cannot write a file there: a directory of that name exists", path)
    parent = os.path.dirname(path)
    up = parent
    while not os.path.isdir(up):  # the first existing ancestor must be a directory
        if os.path.lexists(up):
            raise NotADirectoryError(errno.ENOTDIR, f"cannot write {path}: {up} is a file, not a directory "
                                     f"(the output location must be a directory or a new path)", up)
        up = os.path.dirname(up)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, _tmp_name(os.path.basename(path)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            _fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


def _check_local_file(path: str, uri: str) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", uri)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "No such file", uri)


# --------------------------------------------------------------------------------- reads

def read_bytes(uri: URI) -> bytes:
    """Return the whole content of ``uri``.

    Raises:
        FileNotFoundError: object/file (or bucket) does not exist.
        ValueError: malformed URI.
    """
    p = parse_uri(uri, require_key=True)
    if p.is_s3:
        return _s3.get_bytes(p.bucket, p.key, p.original)
    _check_local_file(p.path, p.original)
    with open(p.path, "rb") as f:
        return f.read()


def read_range(uri: URI, start: int, length: int) -> bytes:
    """Return up to ``length`` bytes starting at byte ``start`` (fewer at EOF, ``b""`` past it).

    On S3 this is a single ranged GET (``Range: bytes=start-(start+length-1)``).
    """
    if start < 0 or length < 0:
        raise ValueError(f"start and length must be >= 0 (got start={start}, length={length})")
    p = parse_uri(uri, require_key=True)
    if p.is_s3:
        if length == 0:
            _s3.head(p.bucket, p.key, p.original)  # still report a missing object
            return b""
        return _s3.get_bytes(p.bucket, p.key, p.original, start, start + length)
    _check_local_file(p.path, p.original)
    with open(p.path, "rb") as f:
        f.seek(start)
        return f.read(length)


def size(uri: URI) -> int:
    """Size of the object/file in bytes. FileNotFoundError if absent."""
    p = parse_uri(uri, require_key=True)
    if p.is_s3:
        return int(_s3.head(p.bucket, p.key, p.original)["ContentLength"])
    _check_local_file(p.path, p.original)
    return os.stat(p.path).st_size


def exists(uri: URI) -> bool:
    """True iff an object/regular file exists at ``uri`` (directories and S3 "prefixes"
    are not objects). A missing S3 bucket gives False; access denied raises PermissionError."""
    p = parse_uri(uri, require_key=True)
    if p.is_s3:
        return _s3.exists(p.bucket, p.key, p.original)
    return os.path.isfile(p.path)


def open_read(
    uri: URI,
    block_size: int = DEFAULT_BLOCK_SIZE,
    cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
    *,
    transport: str = "boto3",
    known: Optional[tuple] = None,
    tail: Optional[tuple] = None,
) -> BinaryIO:
    """Open ``uri`` for reading as a seekable binary file object (use as a context manager).

    Local/file://: ``open(path, "rb")``. S3: a :class:`RangedReader` serving
    read/seek/tell through ranged GETs of ``block_size`` blocks with an LRU cache of
    ``max_blocks`` blocks (and, with ``cache_dir``, a persistent on-disk block cache), so
    e.g. ``zipfile.ZipFile(open_read("s3://b/shard-000.zip"))`` only fetches the central
    directory and the members it reads. Raises FileNotFoundError immediately if absent.
    S3 only: ``transport`` names the GET client (:data:`quantcore.io.ranged.TRANSPORTS`);
    ``known=(size, etag)`` skips the HEAD and ``tail=(offset, bytes)`` seeds the object's last
    bytes (both taken by another reader of the same object, e.g. in a parent process).
    """
    p = parse_uri(uri, require_key=True)
    if p.is_s3:
        return RangedReader(  # type: ignore[return-value]
            p.original, block_size=block_size, max_blocks=max_blocks,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            transport=transport, known=known, tail=tail)
    _check_local_file(p.path, p.original)
    return open(p.path, "rb")


# -------------------------------------------------------------------------------- writes

def _resolve_multipart(multipart_threshold: Optional[int], part_size: Optional[int],
                       max_concurrency: Optional[int]) -> S3Settings:
    s = get_settings()
    kw = {}
    if multipart_threshold is not None:
        kw["multipart_threshold"] = multipart_threshold
    if part_size is not None:
        kw["part_size"] = part_size
    if max_concurrency is not None:
        kw["max_concurrency"] = max_concurrency
    if kw:
        import dataclasses
        s = _s3._validate(dataclasses.replace(s, **kw))
    return s


def write_bytes(
    uri: URI,
    data: Union[bytes, bytearray, memoryview],
    *,
    multipart_threshold: Optional[int] = None,
    part_size: Optional[int] = None,
    max_concurrency: Optional[int] = None,
) -> None:
    """Atomically write ``data`` to ``uri`` (creating local parent directories).

    S3: one PutObject if ``len(data) < multipart_threshold`` (default 64 MiB, see
    :func:`configure`), else a multipart upload with ``part_size`` parts (>= 5 MiB) that
    is aborted on failure. Either the complete object is visible afterwards or none.
    """
    p = parse_uri(uri, require_key=True)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    if p.is_s3:
        s = _resolve_multipart(multipart_threshold, part_size, max_concurrency)
        mv = memoryview(data).cast("B")
        if len(mv) < s.multipart_threshold:
            _s3.put(p.bucket, p.key, p.original, bytes(mv))
        else:
            _s3.multipart_upload(
                p.bucket, p.key, p.original, len(mv),
                lambda off, n: bytes(mv[off: off + n]), s.part_size, s.max_concurrency)
        return
    with _atomic_local_writer(p.path) as f:
        f.write(data)


def upload_file(
    local_path: Union[str, "os.PathLike[str]"],
    uri: URI,
    *,
    multipart_threshold: Optional[int] = None,
    part_size: Optional[int] = None,
    max_concurrency: Optional[int] = None,
) -> None:
    """Atomically copy the local file ``local_path`` to ``uri`` (S3 or local/file://).

    Same atomicity and multipart rules as :func:`write_bytes`; large files are streamed
    part by part (at most ``max_concurrency`` parts in memory).
    """
    src = _to_local_path(local_path)
    if not os.path.isfile(src):
        raise FileNotFoundError(errno.ENOENT, "No such local file to upload", os.fspath(local_path))
    p = parse_uri(uri, require_key=True)
    if not p.is_s3:
        with open(src, "rb") as fin, _atomic_local_writer(p.path) as fout:
            shutil.copyfileobj(fin, fout, 4 * MiB)
        return
    s = _resolve_multipart(multipart_threshold, part_size, max_concurrency)
    with open(src, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        if total < s.multipart_threshold:
            _s3.put(p.bucket, p.key, p.original, f)  # seekable body: botocore can rewind on retry
            return

        def read_part(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)

        _s3.multipart_upload(p.bucket, p.key, p.original, total, read_part, s.part_size, s.max_concurrency)


def download_file(uri: URI, local_path: Union[str, "os.PathLike[str]"]) -> None:
    """Atomically copy ``uri`` to the local file ``local_path`` (temp file + rename).

    S3 downloads stream in 1 MiB chunks and resume (``Range`` + ``If-Match``) after
    mid-stream failures. The target is never left partially written.
    """
    dst = _to_local_path(local_path)
    p = parse_uri(uri, require_key=True)
    if p.is_s3:
        # HEAD first so a missing object never creates the target's directories / temp file
        meta = _s3.head(p.bucket, p.key, p.original)
        with _atomic_local_writer(dst) as f:
            n, _ = _s3.stream_get(p.bucket, p.key, p.original, f.write, etag=meta.get("ETag"))
            if n != int(meta["ContentLength"]):
                raise StorageError(
                    f"download of {p.original} got {n} bytes, expected {meta['ContentLength']}",
                    uri=p.original)
        return
    _check_local_file(p.path, p.original)
    with open(p.path, "rb") as fin, _atomic_local_writer(dst) as fout:
        shutil.copyfileobj(fin, fout, 4 * MiB)


def delete(uri: URI, missing_ok: bool = True) -> None:
    """Delete the object/file at ``uri`` (no error if absent unless ``missing_ok=False``)."""
    p = parse_uri(uri, require_key=True)
    if p.is_s3:
        if not missing_ok and not _s3.exists(p.bucket, p.key, p.original):
            raise FileNotFoundError(errno.ENOENT, "No such S3 object", p.original)
        _s3.call("delete_object", p.original, Bucket=p.bucket, Key=p.key)
        return
    try:
        os.unlink(p.path)
    except FileNotFoundError:
        if not missing_ok:
            raise


# ------------------------------------------------------------------------------- listing

def list_uris(
    prefix_uri: URI,
    suffix: Optional[Union[str, Sequence[str]]] = None,
    *,
    page_size: int = 1000,
    markers: bool = False,
) -> List[str]:
    """Sorted URIs of all objects/files under ``prefix_uri``, recursively.

    ``prefix_uri`` is treated as a directory (``s3://b/data`` lists ``s3://b/data/...``,
    not ``s3://b/data2/...``); ``s3://b`` lists the whole bucket. Results keep the input's
    form (plain paths, ``file://`` URIs or ``s3://`` URIs). ``suffix`` (str or sequence of
    str) filters by name ending. S3 listing is paginated with ``page_size`` keys per request;
    directory-marker keys ending in ``/`` (an empty S3 "folder"; ``markers=True`` keeps them) and our own
    temp files are skipped. A missing local directory gives ``[]``; a missing bucket raises
    FileNotFoundError.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1 (got {page_size})")
    suffixes = (suffix,) if isinstance(suffix, str) else (tuple(suffix) if suffix is not None else None)
    p = parse_uri(prefix_uri)
    out: List[str] = []
    if p.is_s3:
        prefix = p.key if (not p.key or p.key.endswith("/")) else p.key + "/"
        for key in _s3.list_keys(p.bucket, prefix, p.original, page_size=page_size):
            if key.endswith("/") and (not markers or key == prefix):
                continue
            if suffixes is None or key.endswith(suffixes):
                out.append(s3_uri(p.bucket, key))
        out.sort()
        return out
    root = p.path
    if os.path.isfile(root):
        raise NotADirectoryError(errno.ENOTDIR, "list_uris expects a directory", p.original)
    chains = {root: frozenset([os.path.realpath(root)])}  # real folders on the walk path down to each folder
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # a linked class folder is data too
        chain, kept = chains.pop(dirpath), []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in chain:  # a link to a folder already on this path would loop forever
                chains[os.path.join(dirpath, d)] = chain | {real}
                kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                continue
            if suffixes is not None and not name.endswith(suffixes):
                continue
            full = os.path.join(dirpath, name)
            out.append(file_uri(full) if p.scheme == "file" else full)
    out.sort()
    return out


def cleanup_incomplete_writes(prefix_uri: URI, older_than_s: float = 24 * 3600) -> int:
    """Remove leftovers of writers that were killed mid-write under ``prefix_uri``:
    S3 in-progress multipart uploads (aborted) or local ``.<name>.<id>.qctmp`` temp files,
    initiated more than ``older_than_s`` seconds ago. Returns how many were removed.
    Never touches completed objects/files."""
    p = parse_uri(prefix_uri)
    now = time.time()
    removed = 0
    if p.is_s3:
        prefix = p.key if (not p.key or p.key.endswith("/")) else p.key + "/"
        for up in _s3.list_multipart_uploads(p.bucket, prefix, p.original):
            initiated = up.get("Initiated")
            age = now - initiated.timestamp() if initiated is not None else float("inf")
            if age >= older_than_s:
                with contextlib.suppress(FileNotFoundError):
                    _s3.call("abort_multipart_upload", s3_uri(p.bucket, up["Key"]),
                             Bucket=p.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    removed += 1
        return removed
    for dirpath, _dirs, filenames in os.walk(p.path):
        for name in filenames:
            if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                full = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    if now - os.stat(full).st_mtime >= older_than_s:
                        os.unlink(full)
                        removed += 1
    return removed
