"""Zipped ImageNet layout, single or sharded.

``<root>/<split>.zip`` + ``<root>/<split>_map.txt``, or shards ``<root>/<split>-00000.zip`` +
``<root>/<split>-00000_map.txt`` ... . Each map line is ``relative/path<TAB>label`` (whitespace also
accepted before the label); blank lines and ``#`` comments are ignored. Map paths are zip member names
(a leading ``<split>/`` directory inside the zip is tolerated). An optional ``<root>/index.json`` written
by :func:`quantcore.data.pack` lists the shards and the class names of every split; without it the
shards are found by listing and class names default to ``"0".."K-1"``.

Members are read with :mod:`zipfile` over ``storage.open_read`` (ranged GETs on S3), so only the
central directory and the members actually used are transferred. Zip handles are opened lazily, once
per process (DataLoader workers each open their own).
"""
from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable

from . import _fs
from .base import ImageDataset
from .errors import DataError, SkipRecord

INDEX_NAME = "index.json"
INDEX_FORMAT = "quantcore-zip-shards"


try:
    from quantcore.io.storage import StorageError as _StorageError
except ImportError:  # pragma: no cover
    class _StorageError(Exception):
        pass


@dataclass(frozen=True)
class Shard:
    zip_uri: str
    map_uri: str

    @property
    def name(self) -> str:
        return _fs.basename(self.zip_uri)


def load_index(root: str) -> dict | None:
    """Parsed ``<root>/index.json`` or ``None`` when absent."""
    uri = _fs.join(root, INDEX_NAME)
    if not _fs.exists(uri):
        return None
    raw = _fs.read_or_data_error(uri, "index")
    try:
        idx = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{uri}: not valid JSON: {e}", file=uri) from e
    if not isinstance(idx, dict) or not isinstance(idx.get("splits", {}), dict):
        raise DataError(f"{uri}: expected an object with a 'splits' mapping", file=uri)
    return idx


def map_name_for(zip_name: str) -> str:
    return zip_name[: -len(".zip")] + "_map.txt"


def find_shards(root: str, split: str, index: dict | None = None) -> list[Shard]:
    """Shards of ``split`` under ``root``: from ``index.json`` if it lists the split, else by listing."""
    if index is not None and split in index.get("splits", {}):
        ent = index["splits"][split]
        return [Shard(_fs.join(root, s["zip"]), _fs.join(root, s.get("map") or map_name_for(s["zip"])))
                for s in ent.get("shards", [])]
    pat = re.compile(rf"^{re.escape(split)}(-\d+)?\.zip$")
    names = set()
    for u in _fs.list_files(root):
        r = _fs.rel(u, root)
        if "/" not in r:
            names.add(r)
    zips = sorted(n for n in names if pat.match(n))
    if f"{split}.zip" in zips and len(zips) > 1:
        raise DataError(f"{root}: both {split}.zip and sharded {split}-NNNNN.zip files exist; remove one set",
                        file=_fs.join(root, f"{split}.zip"))
    map_pat = re.compile(rf"^{re.escape(split)}(-\d+)?_map\.txt$")
    for m in sorted(n for n in names if map_pat.match(n)):
        z = m[: -len("_map.txt")] + ".zip"
        if z not in names:
            raise DataError(f"map file {_fs.join(root, m)} has no zip {z} beside it", file=_fs.join(root, m))
    shards = []
    for z in zips:
        m = map_name_for(z)
        if m not in names:
            raise DataError(f"zip shard {_fs.join(root, z)} has no map file {m} beside it", file=_fs.join(root, z))
        shards.append(Shard(_fs.join(root, z), _fs.join(root, m)))
    return shards


def _close_zip(zf: zipfile.ZipFile) -> None:
    fp = zf.fp
    try:
        zf.close()
    finally:
        if fp is not None:
            try:
                fp.close()
            except Exception:
                pass


def parse_map_line(line: str) -> tuple[str, int]:
    if "\t" in line:
        path, lab = line.rsplit("\t", 1)
    else:
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise ValueError("expected 'relative/path<TAB>label'")
        path, lab = parts
    path = path.strip()
    if not path:
        raise ValueError("empty path")
    return path, int(lab.strip())


class ZipShardDataset(ImageDataset):
    """All shards of one split of a zipped dataset (see module doc).

    ``cache_dir``/``block_size``: passed to ``storage.open_read`` (persistent block cache / ranged GET
    size on S3). At most ``max_open_shards`` zip handles are kept open per process (LRU).
    """

    layout = "zip"

    def __init__(self, uri: str, split: str = "train", transform: Callable | None = None, skip_bad: bool = False,
                 cache_dir: str | None = None, classes: list[str] | None = None,
                 num_classes: int | None = None, block_size: int | None = None, max_open_shards: int = 8) -> None:
        super().__init__(uri, split, transform, skip_bad)
        self.cache_dir = cache_dir
        self.block_size = block_size
        self.max_open_shards = max(1, int(max_open_shards))
        self.index = load_index(self.uri)
        self.shards = find_shards(self.uri, split, self.index)
        if not self.shards:
            raise DataError(f"no zip shards for split {split!r} under {self.uri} "
                            f"(expected {split}.zip or {split}-00000.zip with *_map.txt)", file=self.uri)
        ent = (self.index or {}).get("splits", {}).get(split, {})
        if classes is None:
            classes = ent.get("classes") or (self.index or {}).get("classes")
        if classes is not None:
            self.classes = [str(c) for c in classes]
            if num_classes is not None and num_classes != len(self.classes):
                raise DataError(f"num_classes={num_classes} but {len(self.classes)} class names are known",
                                file=self.uri)
        self._shard_of: list[int] = []
        self._member: list[str] = []
        self._handles: dict[int, zipfile.ZipFile] = {}
        self._pid = os.getpid()
        entries = []  # (shard, lineno, path, member, label)
        for k, sh in enumerate(self.shards):
            entries.extend(self._index_shard(k, sh))
        k_classes = len(self.classes) if self.classes else num_classes
        if k_classes is None:
            k_classes = (max(e[4] for e in entries) + 1) if entries else 0
        if not self.classes:
            self.classes = [str(i) for i in range(k_classes)]
        for k, lineno, path, member, label in entries:
            if not 0 <= label < k_classes:
                sh = self.shards[k]
                self._problem(f"{sh.map_uri}:{lineno}: label {label} of {path!r} out of range "
                              f"for {k_classes} classes (shard {sh.name})",
                              f"{sh.zip_uri}:{path}", file=sh.map_uri, shard=sh.zip_uri, line=lineno)
                continue
            self.samples.append(path)
            self.labels.append(label)
            self._shard_of.append(k)
            self._member.append(member)
        self._check()

    # ------------------------------------------------------------------------------------ indexing
    def _index_shard(self, k: int, sh: Shard) -> list[tuple]:
        raw = _fs.read_or_data_error(sh.map_uri, "map file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"map file {sh.map_uri} is not UTF-8: {e}", file=sh.map_uri, shard=sh.zip_uri) from e
        rows, seen, claimed = [], {}, set()
        for lineno, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                path, label = parse_map_line(line.rstrip("\r\n"))
            except ValueError as e:
                claimed.add(line.split("\t", 1)[0].strip())  # its member is reported here, not again below
                self._problem(f"{sh.map_uri}:{lineno}: cannot parse map line {line!r} ({e}); shard {sh.name}",
                              f"{sh.map_uri}:{lineno}", file=sh.map_uri, shard=sh.zip_uri, line=lineno)
                continue
            if path in seen:
                self._problem(f"{sh.map_uri}:{lineno}: {path!r} already listed at line {seen[path]}",
                              f"{sh.map_uri}:{lineno}", file=sh.map_uri, shard=sh.zip_uri, line=lineno)
                continue
            seen[path] = lineno
            rows.append((lineno, path, label))
        try:
            zf = self._open_zip(sh)
            try:
                members = [n for n in zf.namelist() if not n.endswith("/")]
            finally:
                _close_zip(zf)
        except DataError as e:
            if not self.skip_bad:
                raise
            for _lineno, path, _ in rows:
                self.skipped.add(SkipRecord(f"{sh.zip_uri}:{path}", str(e)))
            return []
        mset = set(members)
        prefix = self.split + "/"
        used, out = set(), []
        for lineno, path, label in rows:
            member = path if path in mset else (prefix + path if prefix + path in mset else None)
            if member is None:
                self._problem(f"zip shard {sh.zip_uri} has no member {path!r} listed in {sh.map_uri}:{lineno}",
                              f"{sh.zip_uri}:{path}", file=sh.zip_uri, shard=sh.zip_uri, line=lineno)
                continue
            used.add(member)
            out.append((k, lineno, path, member, label))
        claimed |= {prefix + c for c in claimed}
        extra = [m for m in members if m not in used and m not in claimed]
        if extra:
            if not self.skip_bad:
                raise DataError(f"zip shard {sh.zip_uri} has {len(extra)} member(s) not listed in {sh.map_uri}: "
                                f"{extra[:5]}{' ...' if len(extra) > 5 else ''}", file=sh.zip_uri, shard=sh.zip_uri)
            for m in extra:
                self.skipped.add(SkipRecord(f"{sh.zip_uri}:{m}", f"zip member not listed in {sh.map_uri}"))
        return out

    def _open_zip(self, sh: Shard) -> zipfile.ZipFile:
        kw = {"cache_dir": self.cache_dir}
        if self.block_size:
            kw["block_size"] = self.block_size
        try:
            fh = _fs.storage().open_read(sh.zip_uri, **kw)
        except (FileNotFoundError, IsADirectoryError) as e:
            raise DataError(f"zip shard not found: {sh.zip_uri}", file=sh.zip_uri, shard=sh.zip_uri) from e
        try:
            return zipfile.ZipFile(fh)
        except _StorageError:
            fh.close()
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            fh.close()
            raise DataError(f"bad zip file {sh.zip_uri} (truncated or corrupt): {e}",
                            file=sh.zip_uri, shard=sh.zip_uri) from e

    # ------------------------------------------------------------------------------------ reading
    def _zip(self, k: int) -> zipfile.ZipFile:
        if self._pid != os.getpid():  # forked worker: never share a parent's file position
            self._handles, self._pid = {}, os.getpid()
        zf = self._handles.pop(k, None)
        if zf is None:
            while len(self._handles) >= self.max_open_shards:  # LRU: bound memory of remote block caches
                _close_zip(self._handles.pop(next(iter(self._handles))))
            zf = self._open_zip(self.shards[k])
        self._handles[k] = zf  # (re)insert as most recently used
        return zf

    def shard_of(self, index: int) -> Shard:
        return self.shards[self._shard_of[index]]

    def where(self, index: int) -> str:
        return f"{self.shard_of(index).zip_uri}:{self._member[index]}"

    def read_raw(self, index: int) -> bytes:
        k = self._shard_of[index]
        zf = self._zip(k)
        try:
            return zf.read(self._member[index])
        except _StorageError:
            raise
        except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError, zlib.error) as e:
            raise DataError(f"cannot read member {self._member[index]!r} of zip shard {self.shards[k].zip_uri}: "
                            f"{type(e).__name__}: {e}", file=self.where(index), shard=self.shards[k].zip_uri) from e

    def close(self) -> None:
        for zf in self._handles.values():
            _close_zip(zf)
        self._handles = {}

    def __getstate__(self):
        st = self.__dict__.copy()
        st["_handles"] = {}
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._pid = os.getpid()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
