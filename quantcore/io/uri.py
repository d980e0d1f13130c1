"""URI parsing for the storage layer: local paths, ``file://`` URIs and ``s3://bucket/key``.

Pure functions, no I/O. Anything that is not a recognised URI raises
:class:`UriError` (a :class:`~quantcore.errors.UserError`) naming the offending string.

Grammar (a ``file://`` URI names exactly the file its plain path names):

* **Plain path** (no ``scheme://``): used as is; nothing is decoded.
* **file URI** (RFC 8089): ``file:///abs/path``, ``file://localhost/abs/path`` or ``file:/abs/path``.
  The path is percent-decoded to bytes and then to a file name with ``os.fsdecode`` (UTF-8, any
  byte round-trips), so ``%20`` is a space and a literal ``%`` must be written ``%25``. Characters
  that a strict URI would need encoded (space, non-ASCII, ``#``, ``?``) are accepted raw and taken
  literally: there is no query or fragment. Other hosts, relative paths and ``%00`` are refused.
  URIs that quantcore *produces* (:func:`join`, ``storage.list_uris``) are always in the canonical
  fully-encoded form of :func:`file_uri`, so feeding them back is exact.
* **s3://bucket/key**: the key is taken verbatim (never percent-decoded or encoded), so keys with
  spaces, ``%``, ``#``, ``?`` or non-ASCII characters round-trip exactly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Union
from urllib.parse import quote_from_bytes, unquote_to_bytes

from ..errors import UserError


class UriError(UserError):
    """A malformed URI or an unsupported scheme; the message names the URI."""

URI = Union[str, "os.PathLike[str]"]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# a scheme of 2+ characters followed by one slash (one letter would be a drive letter)
_ONE_SLASH_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/(?!/)")
# Deliberately permissive (legacy buckets allow upper case / underscores); it only
# rejects strings that can never be a bucket name.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{2,254}$")

SUPPORTED_SCHEMES = ("s3", "file")


@dataclass(frozen=True)
class ParsedURI:
    """A parsed storage location.

    ``scheme`` is ``"local"`` for plain paths, ``"file"`` for ``file://`` URIs (both have
    ``path`` set), or ``"s3"`` (``bucket`` and ``key`` set; ``key`` may be ``""``).
    """

    scheme: str
    path: str = ""
    bucket: str = ""
    key: str = ""
    original: str = ""

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"


def _as_str(uri: URI) -> str:
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if isinstance(uri, bytes):
        raise UriError(f"URI must be str or os.PathLike[str], got bytes: {uri!r}")
    if not isinstance(uri, str):
        raise UriError(f"URI must be str or os.PathLike[str], got {type(uri).__name__}: {uri!r}")
    if not uri:
        raise UriError("empty URI ''")
    return uri


def scheme_of(uri: URI) -> str:
    """Return ``"s3"``, ``"file"`` or ``"local"``; raise ValueError for unknown schemes."""
    s = _as_str(uri)
    m = _SCHEME_RE.match(s)
    if not m:
        if _is_short_file_uri(s):
            return "file"
        typo = _ONE_SLASH_RE.match(s)
        if typo and typo.group(1).lower() != "file":  # 's3:/bucket/x' is a typo, not a local folder 's3:'
            raise UriError(f"{s!r} looks like a {typo.group(1)}:// URI with one slash missing; write "
                           f"'{typo.group(1)}://{s[len(typo.group(0)):]}' (or './{s}' for a local directory)")
        return "local"
    scheme = m.group(1).lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise UriError(
            f"unsupported URI scheme {scheme + '://'!r} in {s!r} "
            f"(supported: local paths, file://, s3://)"
        )
    return scheme


def _is_short_file_uri(s: str) -> bool:
    """RFC 8089's minimal form ``file:/abs/path`` (no authority)."""
    return s[:6].lower() == "file:/" and s[6:7] != "/"


def _decode_file_path(rest: str, original: str) -> str:
    """Percent-decode the path of a file URI to a file name (exact inverse of :func:`file_uri`)."""
    raw = unquote_to_bytes(rest.encode("utf-8", "surrogateescape"))
    if b"\0" in raw:
        raise UriError(f"file URI {original!r} contains a NUL byte (%00)")
    return os.fsdecode(raw)


def parse_uri(uri: URI, *, require_key: bool = False) -> ParsedURI:
    """Parse ``uri``.

    Args:
        uri: local path, ``file:///abs/path`` (or ``file://localhost/abs/path``) or
            ``s3://bucket[/key]``.
        require_key: for S3, reject a bucket-only URI (object operations need a key).

    Raises:
        ValueError: malformed URI or unsupported scheme; the message names the URI.
    """
    s = _as_str(uri)
    scheme = scheme_of(s)
    if scheme == "local":
        return ParsedURI("local", path=s, original=s)
    if scheme == "file":
        rest = s[len("file:"):] if _is_short_file_uri(s) else s[len("file://"):]
        if rest[:10].lower() == "localhost/":
            rest = rest[len("localhost"):]
        if not rest.startswith("/"):
            raise UriError(
                f"file URI must be absolute, e.g. 'file:///data/x' (got {s!r})"
            )
        path = _decode_file_path(rest, s)
        if not path.strip("/") and require_key:
            raise UriError(f"file URI {s!r} names no file")
        return ParsedURI("file", path=path, original=s)
    # s3
    rest = s[len(scheme) + 3:]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UriError(f"S3 URI {s!r} has no bucket (expected 's3://bucket/key')")
    if not _BUCKET_RE.match(bucket):
        raise UriError(f"S3 URI {s!r} has an invalid bucket name {bucket!r}")
    if require_key and (not key or key.endswith("/")):
        raise UriError(f"S3 URI {s!r} names no object key (expected 's3://bucket/key')")
    return ParsedURI("s3", bucket=bucket, key=key, original=s)


def is_s3(uri: URI) -> bool:
    """True if ``uri`` is an ``s3://`` URI (case-insensitive scheme). Never raises for str/PathLike."""
    try:
        s = _as_str(uri)
    except ValueError:
        return False
    return s[:5].lower() == "s3://"


def local_path(uri: URI) -> str:
    """Return the filesystem path for a local path or ``file://`` URI; ValueError for S3/unknown."""
    p = parse_uri(uri)
    if p.is_s3:
        raise UriError(f"expected a local path or file:// URI, got S3 URI {p.original!r}")
    return p.path


def location(uri: URI) -> str:
    """One spelling per storage location, for comparing two URIs: a local path or ``file://`` URI
    becomes its absolute real path (``./d``, ``d/``, ``/x//d``, ``file:///x/d`` and a symlink to it
    are one folder); an S3 URI becomes ``s3://bucket/key`` with the scheme in lower case and trailing
    slashes dropped (the key is otherwise verbatim: ``a//b`` and ``a/b`` are different S3 keys).
    Raises UriError for a malformed URI."""
    p = parse_uri(uri)
    if p.is_s3:
        return s3_uri(p.bucket, p.key.rstrip("/"))
    return os.path.realpath(p.path)


def same_location(a: URI, b: URI) -> bool:
    """Whether two URIs name one location however spelled (``./d``, ``d/``, ``file:///abs/d``, a symlink;
    :func:`location`); URIs it cannot parse are compared as written, trailing slashes aside."""
    try:
        return location(a) == location(b)
    except ValueError:
        return os.fspath(a).rstrip("/") == os.fspath(b).rstrip("/")


def absolute(uri: URI) -> str:
    """``uri`` as it reads from any working directory, for records (reports, stored recipes): a relative
    local path (``~`` expanded) becomes absolute; S3 and ``file://`` URIs and absolute paths are returned
    as given (no symlink resolution, unlike :func:`location`)."""
    s = os.fspath(uri)
    if "://" in s or not s:
        return s
    return os.path.abspath(os.path.expanduser(s))


def s3_uri(bucket: str, key: str) -> str:
    """Format ``s3://bucket/key``."""
    return f"s3://{bucket}/{key}"


def file_uri(path: str) -> str:
    """Format a path as the canonical ``file://`` URI of its absolute path: every byte of the
    (``os.fsencode``-d) path except unreserved characters and ``/`` is percent-encoded, so
    ``parse_uri(file_uri(p)).path == os.path.abspath(p)`` for every file name."""
    return "file://" + quote_from_bytes(os.fsencode(os.path.abspath(path)), safe="/")


def join(uri: URI, *parts: str) -> str:
    """Join path components onto ``uri``, keeping its kind (local path / file:// / s3://).

    Leading slashes in ``parts`` are ignored (a part never resets the base to the root),
    so ``join("s3://b/a", "/x/", "y.bin") == "s3://b/a/x/y.bin"`` and
    ``join("/data", "/x") == "/data/x"``. A trailing slash on the last part is kept.
    """
    p = parse_uri(uri)
    cleaned = [str(x).strip("/") for x in parts]
    cleaned = [c for c in cleaned if c]
    trailing = bool(parts) and str(parts[-1]).endswith("/") and bool(cleaned)
    if p.is_s3:
        segs = ([p.key.rstrip("/")] if p.key.rstrip("/") else []) + cleaned
        key = "/".join(segs)
        if trailing or (not cleaned and p.key.endswith("/") and key):
            key += "/"
        return s3_uri(p.bucket, key)
    joined = os.path.join(p.path, *cleaned) if cleaned else p.path
    if trailing and not joined.endswith(os.sep):
        joined += os.sep
    if p.scheme == "file":
        uri_s = file_uri(joined)
        if trailing and not uri_s.endswith("/"):
            uri_s += "/"
        return uri_s
    return joined
