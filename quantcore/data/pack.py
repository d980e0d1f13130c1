"""Pack a dataset into zip shards + maps (+ ``index.json``) on any storage URI.

Output for split ``S`` (``shard_size=None`` writes the classic single ``S.zip`` + ``S_map.txt``)::

    <dst>/S-00000.zip  <dst>/S-00000_map.txt  <dst>/S-00001.zip ...  <dst>/index.json

Members are stored uncompressed (images are already compressed; stored members are read with one
ranged GET each), with fixed timestamps/attributes and in the source dataset's (sorted, deterministic)
order, so packing the same data twice gives byte-identical shards, maps and index. Original encoded
bytes are copied, not re-encoded, so pixels round-trip exactly. Each shard is written to a local
temporary file, uploaded atomically, and ``index.json`` is written last (it is what readers trust).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from typing import Any, Callable, Sequence

import numpy as np

from . import _fs
from .base import decode_image
from .errors import DataError, SkipLog, SkipRecord
from .zipped import INDEX_FORMAT, INDEX_NAME, load_index, map_name_for, members_sha256

log = logging.getLogger(__name__)

ZIP_DATE = (1980, 1, 1, 0, 0, 0)
INDEX_VERSION = 1


def _zipinfo(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    zi.compress_type = zipfile.ZIP_STORED
    zi.create_system = 3
    zi.external_attr = (0o100644 & 0xFFFF) << 16
    return zi


def _shard_names(split: str, n: int, shard_size: int | None) -> list[tuple[str, int, int]]:
    """(zip name, start, stop) per shard."""
    if not shard_size:
        return [(f"{split}.zip", 0, n)]
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(f"{split}-{k:05d}.zip", s, min(s + shard_size, n)) for k, s in enumerate(range(0, n, shard_size))]


def unpackable_name(member: str) -> str | None:
    """Why ``member`` cannot be a zip member and one map line (None: it can). The map splits lines on
    ``\n`` only and the path ends at the last tab; a leading/trailing ``/`` is no file name."""
    if any(c in member for c in "\t\r\n"):
        return "a tab or line break in the name cannot be written to the map file"
    if member.startswith("/") or member.endswith("/"):
        return "not a relative file name"
    try:
        member.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode's surrogates: the file system name is not UTF-8
        raw = member.encode("utf-8", "surrogateescape")
        return f"the file name is not valid UTF-8 ({raw!r}); a zip member name must be: rename the file"
    return None


def write_shards(n: int, get: Callable[[int], tuple[str, bytes, int] | None], dst_uri: str, split: str,
                 classes: Sequence[str], shard_size: int | None = 10000, *, tmp_dir: str | None = None,
                 skipped: SkipLog | None = None, extra: dict | None = None) -> dict[str, Any]:
    """Low-level writer: ``get(i) -> (member_name, encoded_bytes, label)`` or ``None`` (skipped, already
    recorded by the caller). Returns the ``index.json`` entry written for ``split``."""
    if n <= 0:
        raise DataError(f"nothing to pack for split {split!r} into {dst_uri}", file=str(dst_uri))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", split):
        raise ValueError(f"split name {split!r} must be a plain file-name fragment")
    if re.fullmatch(r".+-\d+", split):  # val-00001.zip is shard 1 of split val
        raise DataError(f"split name {split!r} ends in -<digits>: its files would read as a shard of split "
                        f"{split.rsplit('-', 1)[0]!r}; choose another name", file=str(dst_uri))
    st = _fs.storage()
    dst_uri = str(dst_uri)
    # Until the last shard is written the split is marked incomplete in index.json: a pack that fails
    # half-way (or is still running) never reads as a dataset, and never mixes with an older pack's
    # entry for the split (whose shards it may already have overwritten).
    _write_index_entry(st, dst_uri, split, {"incomplete": True})
    shards, seen, total = [], set(), 0
    for zip_name, start, stop in _shard_names(split, n, shard_size):
        map_lines = []
        fd, tmp = tempfile.mkstemp(suffix=".zip", dir=tmp_dir)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for i in range(start, stop):
                    item = get(i)
                    if item is None:
                        continue
                    member, data, label = item
                    why = unpackable_name(member)
                    if why:
                        raise DataError(f"sample name {member!r}: {why}", file=member)
                    if member in seen:
                        raise DataError(f"duplicate sample name {member!r} while packing {split!r}", file=member)
                    seen.add(member)
                    zf.writestr(_zipinfo(member), data)
                    map_lines.append(f"{member}\t{int(label)}\n")
                members_digest = members_sha256(zf)  # the writer's own directory: no re-read
            if not map_lines:
                continue
            h = hashlib.sha256()
            with open(tmp, "rb") as f:
                for blk in iter(lambda: f.read(1 << 20), b""):
                    h.update(blk)
            nbytes = os.path.getsize(tmp)
            st.upload_file(tmp, _fs.join(dst_uri, zip_name))
        finally:
            os.unlink(tmp)
        map_name = map_name_for(zip_name)
        map_bytes = "".join(map_lines).encode("utf-8")
        st.write_bytes(_fs.join(dst_uri, map_name), map_bytes)
        shards.append({"zip": zip_name, "map": map_name, "count": len(map_lines), "bytes": nbytes,
                       "sha256": h.hexdigest(), "map_sha256": hashlib.sha256(map_bytes).hexdigest(),
                       "members_sha256": members_digest})
        total += len(map_lines)
    if total == 0:
        raise DataError(f"every sample of split {split!r} was skipped; nothing packed into {dst_uri}",
                        file=dst_uri)
    entry: dict[str, Any] = {"count": total, "num_classes": len(classes), "classes": [str(c) for c in classes],
                             "shard_size": shard_size, "shards": shards}
    if skipped:
        entry["skipped"] = skipped.as_list()
    entry.update(extra or {})
    _write_index_entry(st, dst_uri, split, entry)
    _remove_stale_shards(st, dst_uri, split, {n for sh in shards for n in (sh["zip"], sh["map"])})
    return entry


def _remove_stale_shards(st, dst_uri: str, split: str, keep: set[str]) -> None:
    """An earlier pack of ``split`` into the same place with more shards left ``split-0000N.zip`` files
    the new ``index.json`` no longer lists: pack's own superseded output, removed (and said) so the
    folder holds one dataset."""
    pattern = re.compile(rf"{re.escape(split)}(-\d{{5}})?(\.zip|_map\.txt)")
    # listed and compared as the one spelling of the place the shards were written to (storage.location):
    # the destination as typed ('file:///a b', 'd//', 'S3://...') is not how a listing spells its files
    root = st.location(dst_uri)
    stale = []
    for uri in st.list_uris(root):
        rel = _fs.rel(uri, root)
        if "/" not in rel and pattern.fullmatch(rel) and rel not in keep:
            stale.append(uri)
    for uri in stale:
        st.delete(uri)
    if stale:
        log.warning("pack %s: removed %d file(s) of an earlier pack of split %r that the new index.json does not "
                    "list (e.g. %s)", dst_uri, len(stale), split, stale[0])


def _write_index_entry(st, dst_uri: str, split: str, entry: dict[str, Any]) -> None:
    index = load_index(dst_uri) or {}
    index.setdefault("format", INDEX_FORMAT)
    index["version"] = INDEX_VERSION
    index.setdefault("splits", {})[split] = entry
    st.write_bytes(_fs.join(dst_uri, INDEX_NAME), (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


def pack(src_uri: str, dst_uri: str, split: str, layout: str = "auto", shard_size: int | None = 10000, *,
         verify: bool = True, skip_bad: bool = False, tmp_dir: str | None = None,
         dst_split: str | None = None, **open_kwargs: Any) -> dict[str, Any]:
    """Convert ``split`` of the folder / resisc / zip dataset at ``src_uri`` into zip shards at ``dst_uri``.

    ``verify`` decodes every image first so a corrupt file fails the pack (naming it) instead of the
    later evaluation; with ``skip_bad`` such samples are left out and listed under ``skipped`` in the
    index entry (which is returned). ``dst_split`` renames the split in the output.
    """
    from .detect import open_dataset

    ds = open_dataset(src_uri, split, transform=None, layout=layout, skip_bad=skip_bad, **open_kwargs)
    if ds.layout == "zip" and (dst_split or split) == split and _fs.storage().same_location(src_uri, dst_uri):
        # the new shards would overwrite the ones still being read (a smaller --shard-size loses the split)
        raise DataError(f"pack {src_uri} -> {dst_uri}: the destination is the source; repacking split {split!r} in "
                        "place would overwrite the shards it reads. Write to another folder or prefix, then replace "
                        "the old one", file=dst_uri)
    skipped = SkipLog(ds.skipped)

    def get(i: int):
        try:
            bad_name = unpackable_name(ds.samples[i])
            if bad_name:
                raise DataError(f"{ds.where(i)}: {bad_name}", file=ds.where(i))
            data = ds.read_raw(i)
            if verify:
                decode_image(data, ds.where(i))
        except DataError as e:
            if not skip_bad:
                raise
            skipped.add(SkipRecord(ds.where(i), str(e), i))
            return None
        return ds.samples[i], data, ds.labels[i]

    from .detect import class_names, unused_files

    extra: dict[str, Any] = {"source_layout": ds.layout}
    if unused_files(ds):  # not samples (hidden, no image extension): recorded, as skipped ones are
        extra["unused_files"] = unused_files(ds)
    if class_names(ds) is None:  # a map's label numbers only: no names are made up for them
        extra["classes"] = None
    return write_shards(len(ds), get, dst_uri, dst_split or split, ds.classes, shard_size, tmp_dir=tmp_dir,
                        skipped=skipped, extra=extra)


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name)).strip("._")
    return s or "class"


def pack_arrays(images: Any, labels: Any, dst_uri: str, split: str, class_names: Sequence[str],
                shard_size: int | None = 10000, *, image_format: str = "png", jpeg_quality: int = 95,
                tmp_dir: str | None = None) -> dict[str, Any]:
    """Pack in-memory ``uint8`` images (``N x H x W`` grayscale or ``N x H x W x C``, C in 1/3/4) with int
    ``labels`` into zip shards. Members are ``<class>/<index>.png`` (class names made file-safe), in
    array order, so ``dataset[i]`` of the packed split is ``images[i]`` (PNG: bit-exact)."""
    from PIL import Image

    arr = np.asarray(images)
    lab = np.asarray(labels).reshape(-1)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"images must be N x H x W or N x H x W x C (C in 1,3,4), got shape {arr.shape}")
    if len(lab) != len(arr):
        raise ValueError(f"{len(arr)} images but {len(lab)} labels")
    if lab.dtype.kind == "f":
        off = np.flatnonzero(~(np.isfinite(lab) & (lab == np.round(lab))))
        if len(off):
            raise DataError(f"labels must be whole class indices: labels[{off[0]}] is {lab[off[0]]!r}",
                            file=f"labels[{off[0]}]")
    elif lab.dtype.kind not in "iu":
        raise DataError(f"labels must be whole class indices, got dtype {lab.dtype}", file="labels")
    k = len(class_names)
    bad = np.flatnonzero((lab < 0) | (lab >= k))
    if len(bad):
        raise DataError(f"label {int(lab[bad[0]])} at index {int(bad[0])} out of range for {k} classes",
                        file=f"labels[{int(bad[0])}]")
    fmt = image_format.lower()
    if fmt not in ("png", "jpeg", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    ext = "png" if fmt == "png" else "jpg"
    safe = [_safe(c) for c in class_names]
    width = max(5, len(str(len(arr) - 1)))

    def get(i: int):
        import io

        im = Image.fromarray(arr[i])
        buf = io.BytesIO()
        if ext == "png":
            im.save(buf, format="PNG", compress_level=6)
        else:
            im.convert("RGB" if im.mode == "RGBA" else im.mode).save(buf, format="JPEG", quality=jpeg_quality)
        y = int(lab[i])
        return f"{safe[y]}/{i:0{width}d}.{ext}", buf.getvalue(), y

    return write_shards(len(arr), get, dst_uri, split, list(class_names), shard_size, tmp_dir=tmp_dir,
                        extra={"source_layout": "arrays", "image_format": ext})
