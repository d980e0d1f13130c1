"""Thin access layer over :mod:`quantcore.io.storage` (imported lazily so pickled datasets carry no
module state) plus a few URI helpers the data package needs."""
from __future__ import annotations

import os
import stat


def storage():
    from quantcore.io import storage as _storage  # lazy: keeps datasets light to pickle/import

    return _storage


def is_s3(uri: str) -> bool:
    return storage().is_s3(uri)


def local_path(uri: str) -> str | None:
    """Filesystem path for a local path or ``file://`` URI; ``None`` for S3 URIs."""
    if storage().is_s3(uri):
        return None
    return storage().local_path(uri)


def join(uri: str, *parts: str) -> str:
    return storage().join(str(uri), *parts)


def dir_prefix(uri: str) -> str:
    """``uri`` as a directory prefix (trailing slash) for listing."""
    uri = str(uri)
    return uri if uri.endswith("/") else uri + "/"


def rel(uri: str, prefix: str) -> str:
    """Name of ``uri`` relative to directory ``prefix`` (both as returned by storage), as a plain
    ``/``-separated file name: local paths and ``file://`` URIs are compared as decoded file-system
    paths (a ``file://`` listing is percent-encoded; the names it yields must not be), S3 keys
    verbatim. A trailing ``/`` (S3 directory marker) is kept."""
    uri, prefix = str(uri), dir_prefix(prefix)
    lp, lu = local_path(prefix), local_path(uri)
    if lp is not None and lu is not None:
        lp = dir_prefix(lp)
        if lu.startswith(lp):
            return lu[len(lp):]
        r = os.path.relpath(lu, lp).replace(os.sep, "/")
        if r != ".." and not r.startswith("../"):
            return r
    elif lp is None and lu is None and uri.startswith(prefix):
        return uri[len(prefix):]
    raise ValueError(f"{uri} is not under {prefix}")


def list_files(prefix_uri: str, suffix: str | None = None) -> list[str]:
    """All object/file URIs under directory ``prefix_uri`` (recursive), sorted; directory markers
    (keys ending in '/') are returned too so callers can see empty S3 "folders"."""
    pre = dir_prefix(prefix_uri)
    lp = local_path(pre)
    if lp is not None and not os.path.isdir(lp):
        return []
    out = storage().list_uris(pre, suffix=suffix, markers=True)
    return [u for u in out if _under(u, pre)]


def _under(uri: str, prefix: str) -> bool:
    lp, lu = local_path(prefix), local_path(uri)
    if lp is not None and lu is not None:
        lp = os.path.abspath(lp)
        return os.path.abspath(lu).startswith(lp.rstrip(os.sep) + os.sep)
    return lp is None and lu is None and str(uri).startswith(prefix)


def basename(uri: str) -> str:
    """Last name of ``uri`` (decoded for ``file://`` URIs, verbatim for S3 keys)."""
    lp = local_path(uri)
    return (lp if lp is not None else str(uri)).rstrip("/").rsplit("/", 1)[-1]


def read_or_data_error(uri: str, what: str = "file") -> bytes:
    """``storage.read_bytes`` with a missing file turned into a DataError naming ``uri``.

    Infrastructure failures (retries exhausted, access denied) propagate unchanged: they are not bad
    data and must never be "skipped"."""
    from .errors import DataError

    lp = local_path(uri)
    if lp is not None:
        try:
            mode = os.stat(lp).st_mode
        except OSError:
            mode = None  # missing, a broken or looping link: the read below names it
        if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            # a named pipe would block the read forever; a device could return anything
            raise DataError(f"{what} {uri} is not a regular file (a named pipe, socket or device file); "
                            "only regular files are read", file=uri)
    try:
        return storage().read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise DataError(f"{what} not found: {uri}", file=uri) from e


def exists(uri: str) -> bool:
    return bool(storage().exists(uri))
