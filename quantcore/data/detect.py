"""Layout detection and the one entry point :func:`open_dataset`."""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable

from . import _fs
from .base import IMG_EXTS
from .errors import DataError

log = logging.getLogger(__name__)

LAYOUTS = ("folder", "zip", "resisc")
_ALIASES = {
    "folder": "folder", "imagefolder": "folder", "imagenet": "folder", "imagenet-folder": "folder",
    "zip": "zip", "zipped": "zip", "shards": "zip", "zip-shards": "zip", "imagenet-zip": "zip",
    "resisc": "resisc", "resisc45": "resisc", "imagepaths": "resisc",
}


def normalize_layout(layout: str) -> str:
    key = str(layout).lower().replace("_", "-")
    if key == "auto":
        return "auto"
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset layout {layout!r}; use 'auto' or one of {LAYOUTS}")
    return _ALIASES[key]


def detect_layout(uri: str, split: str) -> str:
    """``'zip'``, ``'resisc'`` or ``'folder'`` for ``split`` under ``uri`` (see :func:`open_dataset`)."""
    uri = str(uri)
    j = lambda *p: _fs.join(uri, *p)  # noqa: E731
    if _fs.exists(j("index.json")):
        return "zip"
    for name in (f"{split}.zip", f"{split}-00000.zip", f"{split}_map.txt", f"{split}-00000_map.txt"):
        if _fs.exists(j(name)):
            return "zip"
    if _fs.exists(j(f"{split}_imagepaths.txt")):
        return "resisc"
    lp = _fs.local_path(uri)
    if lp is not None:
        if os.path.isdir(os.path.join(lp, split)):
            return "folder"
        if os.path.isdir(lp):
            pat = re.compile(rf"^{re.escape(split)}-\d+\.zip$")
            if any(pat.match(n) for n in os.listdir(lp)):
                return "zip"
        raise DataError(
            f"cannot detect a dataset layout for split {split!r} under {uri}: looked for index.json, "
            f"{split}.zip / {split}-NNNNN.zip (+ _map.txt), {split}_imagepaths.txt (resisc45) and a "
            f"{split}/<class>/ folder", file=uri)
    return "folder"  # S3: a folder prefix is the remaining possibility; FolderDataset reports if empty


def open_dataset(uri: str, split: str = "val", transform: Callable | None = None, layout: str = "auto",
                 skip_bad: bool = False, cache_dir: str | None = None, **kwargs: Any):
    """Open ``split`` of the dataset at ``uri`` (local path, ``file://`` or ``s3://``).

    Layouts (``layout='auto'`` detects in this order):
      * ``zip``: ``index.json`` or ``<split>.zip``/``<split>-NNNNN.zip`` with ``*_map.txt`` beside them
      * ``resisc``: ``<split>_imagepaths.txt`` + ``label_map.json`` + ``images/<class>/``
      * ``folder``: ``<split>/<class>/*.jpg`` (ImageNet style, sorted class names = labels)
    ``cache_dir`` is used for zip shards on remote storage; extra ``kwargs`` go to the dataset class
    (e.g. ``classes=``, ``num_classes=``, ``block_size=``).
    """
    from .folder import FolderDataset
    from .resisc import ImagePathsDataset
    from .zipped import ZipShardDataset

    lay = normalize_layout(layout)
    if lay == "auto":
        lay = detect_layout(uri, split)
    if lay == "zip":
        return ZipShardDataset(uri, split, transform, skip_bad=skip_bad, cache_dir=cache_dir, **kwargs)
    if lay == "resisc":
        return ImagePathsDataset(uri, split, transform, skip_bad=skip_bad, **kwargs)
    ds = FolderDataset(uri, split, transform, skip_bad=skip_bad, **kwargs)
    if ds.ignored and ds.root not in _WARNED_IGNORED:  # once per folder and process (it is opened per phase)
        _WARNED_IGNORED.add(ds.root)
        exts = sorted({f.rsplit("/", 1)[-1].rpartition(".")[2].lower() if "." in f.rsplit("/", 1)[-1].lstrip(".")
                       else "(no extension)" for f in ds.ignored})
        log.warning("%d file(s) under %s are not used (hidden, or not an image extension %s; found: %s), e.g. %s",
                    len(ds.ignored), ds.root, "/".join(sorted({e.lstrip(".").lower() for e in IMG_EXTS})),
                    ", ".join(exts[:8]), ", ".join(ds.ignored[:3]))
    return ds


_WARNED_IGNORED: set[str] = set()
