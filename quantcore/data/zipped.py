"""Zipped ImageNet layout, single or sharded.

``<root>/<split>.zip`` + ``<root>/<split>_map.txt``, or shards ``<root>/<split>-00000.zip`` +
``<root>/<split>-00000_map.txt`` ... . Each map line is ``relative/path<TAB>label`` (the path as written,
so names may start with ``#`` or spaces; whitespace instead of the tab is also accepted, the path then
stripped); blank lines and ``#`` comment lines without a tab are ignored. Map paths are zip member names
(a leading ``<split>/`` directory inside the zip is tolerated). An optional ``<root>/index.json`` written
by :func:`quantcore.data.pack` lists the shards and the class names of every split; without it the
shards are found by listing and class names default to ``"0".."K-1"``.

Members are read with :mod:`zipfile` over ``storage.open_read`` (ranged GETs on S3), so only the
central directory and the members actually used are transferred. Zip handles are opened lazily, once
per process (DataLoader workers each open their own, from the size, ETag and central directory the
parent read while indexing: no request to open a shard).

Batches (``__getitems__``, what ``DataLoader`` calls) on S3 are planned: the byte extents of the
batch's members in each shard are merged (:data:`MAX_GAP`, :data:`MAX_SPAN`) and fetched with one GET
per run, concurrently, and the batch that :func:`quantcore.data.make_loader` says comes next to this
worker (``indices.ahead``) is requested before this one decodes, so its GETs overlap the decoding.
Every member is then read and checked by :mod:`zipfile` exactly as for a single item.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
import zlib
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import _fs
from .base import ImageDataset
from .errors import DataError, SkipRecord

INDEX_NAME = "index.json"
INDEX_FORMAT = "quantcore-zip-shards"
#: Members of a batch at most this many bytes apart are fetched in one GET (the gap is read too).
MAX_GAP = 32 * 1024
#: Longest single planned GET, bytes (longer runs are split, and fetched concurrently).
MAX_SPAN = 16 * 1024 * 1024


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
        idx = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{uri}: not valid JSON: {e}", file=uri) from e
    if not isinstance(idx, dict) or not isinstance(idx.get("splits", {}), dict):
        raise DataError(f"{uri}: expected an object with a 'splits' mapping", file=uri)
    return idx


def members_sha256(zf: zipfile.ZipFile) -> str:
    """Digest of a zip's central directory entries (name, CRC-32, size), in name order: what the
    shard holds, from the directory a reader fetches anyway (no member read)."""
    h = hashlib.sha256()
    for zi in sorted(zf.infolist(), key=lambda z: z.filename):
        h.update(f"{zi.filename}\0{zi.CRC:08x}\0{zi.file_size}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def map_name_for(zip_name: str) -> str:
    return zip_name[: -len(".zip")] + "_map.txt"


def find_shards(root: str, split: str, index: dict | None = None) -> list[Shard]:
    """Shards of ``split`` under ``root``: from ``index.json`` if it lists the split, else by listing."""
    if index is not None and split in index.get("splits", {}):
        ent = index["splits"][split]
        if not isinstance(ent, dict) or ent.get("incomplete"):
            uri = _fs.join(root, INDEX_NAME)
            raise DataError(f"{root}: split {split!r} was not packed completely ({uri} marks it incomplete: "
                            "a quantcore pack that failed or is still running); run the pack again", file=uri)
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
    nums = sorted(int(pat.match(z).group(1)[1:]) for z in zips if pat.match(z).group(1))
    if nums and nums != list(range(len(nums))):
        # "test-2019.zip", "test-2020.zip" are splits of their own, not shards of "test"; and a shard
        # missing from 0..N-1 would leave its images out silently
        gaps = sorted(set(range(nums[-1] + 1)) - set(nums))[:3]
        twice = sorted({k for k in nums if nums.count(k) > 1})[:3]
        raise DataError(f"{root}: split {split!r} has zip files {', '.join(zips[:4])}{' ...' if len(zips) > 4 else ''} "
                        f"that are not shards numbered 0..N-1 ({split}-00000.zip, {split}-00001.zip, ...)"
                        + (f": {', '.join(f'{split}-{g:05d}.zip' for g in gaps)} missing" if nums[0] == 0 and gaps else "")
                        + (f": shard number(s) {', '.join(map(str, twice))} written twice" if twice else "")
                        + f"; if they are splits of their own, give one as the split (e.g. {zips[0][:-4]!r})",
                        file=_fs.join(root, zips[0]))
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


def _made_up(classes: list) -> bool:
    """Whether ``classes`` are the names made up for a split whose map gives label numbers only
    ("0".."K-1" in numeric order). With more than 10 no folder dataset lists them so (folders sort as text:
    "0", "1", "10", ...); with 10 or fewer, name and number give the same label, so nothing changes."""
    return len(classes) > 10 and [str(c) for c in classes] == [str(i) for i in range(len(classes))]


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
    """``(path, label)`` of one map line. With a tab, the path is everything before the last tab, as
    written (names may start with ``#`` or a space: ``quantcore pack`` writes every line so); without
    one, the last whitespace-separated field is the label and the path is stripped."""
    if "\t" in line:
        path, lab = line.rsplit("\t", 1)
    else:
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise ValueError("expected 'relative/path<TAB>label'")
        path, lab = parts
        path = path.strip()
    if not path.strip():
        raise ValueError("empty path")
    return path, int(lab.strip())


_LEFT_OUT = "left out when packing: "


class ZipShardDataset(ImageDataset):
    """All shards of one split of a zipped dataset (see module doc).

    ``cache_dir``/``block_size``: passed to ``storage.open_read`` (persistent block cache / ranged GET
    size on S3). ``transport``: the S3 GET client (``boto3``, ``s3torchconnector``, ``fsspec``; see
    :data:`quantcore.io.ranged.TRANSPORTS`). ``batch_reads=False`` turns batch planning and read-ahead
    off (every member read on demand, block by block). At most ``max_open_shards`` zip handles are
    kept open per process (LRU; a batch touching more shards keeps them all open while it is read).
    """

    layout = "zip"

    def __init__(self, uri: str, split: str = "train", transform: Callable | None = None, skip_bad: bool = False,
                 cache_dir: str | None = None, classes: list[str] | None = None,
                 num_classes: int | None = None, block_size: int | None = None, max_open_shards: int = 8,
                 transport: str = "boto3", batch_reads: bool = True) -> None:
        super().__init__(uri, split, transform, skip_bad)
        self.cache_dir = cache_dir
        self.block_size = block_size
        self.transport = transport
        self.batch_reads = bool(batch_reads)
        # per shard: ((size, etag), (central directory offset, bytes)) from the indexing pass (S3 only)
        self._seeds: dict[int, tuple] = {}
        self._extents: dict[int, dict[str, tuple[int, int]]] = {}  # indexing only, then per-sample arrays
        self._keep_open = 0  # shards of the batch being read: never evicted under it
        self.max_open_shards = max(1, int(max_open_shards))
        self.index = load_index(self.uri)
        self.shards = find_shards(self.uri, split, self.index)
        if not self.shards:
            raise DataError(f"no zip shards for split {split!r} under {self.uri} "
                            f"(expected {split}.zip or {split}-00000.zip with *_map.txt)", file=self.uri)
        ent = (self.index or {}).get("splits", {}).get(split, {})
        for r in ent.get("skipped") or ():  # left out by `quantcore pack --skip-bad`: reported, not lost
            if isinstance(r, dict) and "name" in r:
                why = str(r.get("reason", "?"))  # a repacked pack's reasons carry the prefix already
                self.skipped.add(SkipRecord(str(r["name"]), why if why.startswith(_LEFT_OUT) else _LEFT_OUT + why))
        # files of the packed folder that were not samples (hidden, no image extension): said again here
        self.ignored = [str(f) for f in ent.get("unused_files") or ()]
        if classes is None:  # "classes": null in a split's entry: packed from a split without class names
            classes = ent.get("classes") if "classes" in ent else (self.index or {}).get("classes")
        if classes is not None and _made_up(classes):
            classes = None  # written by a pack before made-up names were told apart: numbers, not names
        if classes is not None:
            self.classes = [str(c) for c in classes]
            if num_classes is not None and num_classes != len(self.classes):
                raise DataError(f"num_classes={num_classes} but {len(self.classes)} class names are known",
                                file=self.uri)
        # what the index recorded per shard: a shard or map rewritten since (another pack into the same
        # folder, a copy cut short) must not be read as this dataset
        self._recorded = {str(x.get("zip")): x for x in ent.get("shards") or () if isinstance(x, dict)}
        self._shard_of: list[int] = []
        self._member: list[str] = []
        self._handles: dict[int, zipfile.ZipFile] = {}
        self._pid = os.getpid()
        entries = []  # (shard, lineno, path, member, label)
        for k, sh in enumerate(self.shards):
            entries.extend(self._index_shard(k, sh))
        k_classes = len(self.classes) if self.classes else num_classes
        if k_classes is None:  # a pack of a split without class names recorded how many classes it had
            k_classes = ent.get("num_classes") if isinstance(ent.get("num_classes"), int) else None
        if k_classes is None:
            k_classes = (max(e[4] for e in entries) + 1) if entries else 0
        if not self.classes:  # the map's label numbers are the labels; these names are only for display
            self.classes = [str(i) for i in range(k_classes)]
            self.classes_named = False
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
        # byte extent of every sample's member in its shard: local header .. next member / directory
        ext = [self._extents.get(k, {}).get(m, (-1, -1)) for k, m in zip(self._shard_of, self._member)]
        self._ext_start = array("q", (e[0] for e in ext))
        self._ext_end = array("q", (e[1] for e in ext))
        self._extents = {}
        self._check()

    # ------------------------------------------------------------------------------------ indexing
    def _index_shard(self, k: int, sh: Shard) -> list[tuple]:
        raw = _fs.read_or_data_error(sh.map_uri, "map file")
        rec = self._recorded.get(sh.name)
        try:
            text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the path
        except UnicodeDecodeError as e:
            raise DataError(f"map file {sh.map_uri} is not UTF-8: {e}", file=sh.map_uri, shard=sh.zip_uri) from e
        rows, seen, claimed = [], {}, set()
        # lines end at \n (\r\n too) only: str.splitlines would also break names at \x0c, \x85, \u2028 ...
        for lineno, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")
            s = line.strip()
            if not s or (s.startswith("#") and "\t" not in line):  # a tab-separated line is a sample
                continue
            try:
                path, label = parse_map_line(line)
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
        if rec is not None and isinstance(rec.get("count"), int) and rec["count"] != len(rows):
            raise DataError(f"map file {sh.map_uri} lists {len(rows)} samples, index.json recorded {rec['count']} for "
                            f"shard {sh.name}: the folder holds files of another pack; pack it again",
                            file=sh.map_uri, shard=sh.zip_uri)
        if rec is not None and isinstance(rec.get("map_sha256"), str) and \
                hashlib.sha256(raw).hexdigest() != rec["map_sha256"]:
            raise DataError(f"map file {sh.map_uri} differs from the one index.json recorded for shard {sh.name} "
                            "(sha256): the folder holds files of another pack; pack it again",
                            file=sh.map_uri, shard=sh.zip_uri)
        try:
            zf = self._open_zip(sh)
            try:
                members = [n for n in zf.namelist() if not n.endswith("/")]
                self._remember_layout(k, zf)
                size = zf.fp.size if hasattr(zf.fp, "size") else zf.fp.seek(0, os.SEEK_END)
                digest = members_sha256(zf) if rec is not None and rec.get("members_sha256") else None
            finally:
                _close_zip(zf)
        except DataError as e:
            if not self.skip_bad:
                raise
            for _lineno, path, _ in rows:
                self.skipped.add(SkipRecord(f"{sh.zip_uri}:{path}", str(e)))
            return []
        if rec is not None and isinstance(rec.get("bytes"), int) and rec["bytes"] != size:
            raise DataError(f"zip shard {sh.zip_uri} is {size} bytes, index.json recorded {rec['bytes']}: the folder "
                            "holds files of another pack (or a copy cut short); pack it again",
                            file=sh.zip_uri, shard=sh.zip_uri)
        if digest is not None and digest != rec["members_sha256"]:
            raise DataError(f"zip shard {sh.zip_uri} holds other members (names, CRC-32s or sizes) than index.json "
                            f"recorded for it: the folder holds files of another pack; pack it again",
                            file=sh.zip_uri, shard=sh.zip_uri)
        mset = set(members)
        if len(mset) < len(members):  # zipfile reads the last of same-named members: the others are unreachable
            dupes = sorted({m for m in members if members.count(m) > 1})
            raise DataError(f"zip shard {sh.zip_uri} holds {len(members) - len(mset)} member(s) under a name another "
                            f"member has (e.g. {dupes[0]!r}): only the last of each could be read; pack it again "
                            "(quantcore pack writes each name once)", file=sh.zip_uri, shard=sh.zip_uri)
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

    def _remember_layout(self, k: int, zf: zipfile.ZipFile) -> None:
        """Keep what a worker needs to open shard ``k`` without a request (size, ETag, central
        directory) and each member's byte extent, when the shard is read over ranged GETs."""
        fp = zf.fp
        start_dir = getattr(zf, "start_dir", None)
        if not hasattr(fp, "tail_bytes") or not isinstance(start_dir, int):
            return
        self._seeds[k] = ((fp.size, fp.etag), (start_dir, fp.tail_bytes(start_dir)))
        infos = sorted(zf.infolist(), key=lambda z: z.header_offset)
        ends = [z.header_offset for z in infos[1:]] + [start_dir]
        self._extents[k] = {z.filename: (z.header_offset, e) for z, e in zip(infos, ends)}

    def _open_zip(self, sh: Shard, k: int | None = None) -> zipfile.ZipFile:
        kw: dict[str, Any] = {"cache_dir": self.cache_dir}
        if self.block_size:
            kw["block_size"] = self.block_size
        if _fs.is_s3(sh.zip_uri):
            kw["transport"] = self.transport
            seed = self._seeds.get(k) if k is not None else None
            if seed is not None:
                kw["known"], kw["tail"] = seed
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
            # LRU: bound memory of remote block caches (``keep``: the shards of the batch being read)
            while len(self._handles) >= max(self.max_open_shards, self._keep_open):
                _close_zip(self._handles.pop(next(iter(self._handles))))
            zf = self._open_zip(self.shards[k], k)
        self._handles[k] = zf  # (re)insert as most recently used
        return zf

    def _plan(self, indices: Sequence[int]) -> list[tuple[Any, list]]:
        """Start the GETs of the members of ``indices`` (one per run of neighbouring members per
        shard); returns ``[(reader, span keys)]`` to release once read."""
        by_shard: dict[int, list[tuple[int, int]]] = {}
        n = len(self)
        for i in indices:
            i = int(i)
            if 0 <= i < n and self._ext_start[i] >= 0:
                by_shard.setdefault(self._shard_of[i], []).append((self._ext_start[i], self._ext_end[i]))
        held = []
        for k, ranges in by_shard.items():
            try:
                fp = self._zip(k).fp
            except DataError:
                continue  # reported, per sample, when the batch reads it
            if hasattr(fp, "prefetch"):
                from quantcore.io.ranged import coalesce

                held.append((fp, fp.prefetch(coalesce(ranges, MAX_GAP, MAX_SPAN))))
        return held

    def __getitems__(self, indices: Sequence[int]) -> list:
        """``[self[i] for i in indices]`` (same results and errors), with the batch's S3 reads
        planned and the next batch (``indices.ahead``, set by ``make_loader``) requested first."""
        if not self.batch_reads or not _fs.is_s3(self.uri):
            held = []
        else:
            ahead = list(getattr(indices, "ahead", None) or ())
            self._keep_open = len({self._shard_of[int(i)] for i in list(indices) + ahead if 0 <= int(i) < len(self)})
            held = self._plan(indices)
            if ahead:
                self._plan(ahead)  # its spans are released when that batch is read
        try:
            get = getattr(super(), "__getitems__", None)
            return get(list(indices)) if get is not None else [self[i] for i in indices]
        finally:
            self._keep_open = 0
            for fp, keys in held:
                fp.release(keys)

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
