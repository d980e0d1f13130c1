"""RESISC45-style layout: ``<root>/images/<class>/*.jpg``, ``<root>/{train,val,test}_imagepaths.txt``
(one relative image path per line) and ``<root>/label_map.json`` (``{class_name: id}``).

Paths in the imagepaths files may be relative to ``<root>`` (``images/airplane/airplane_001.jpg``), to
``<root>/images`` (``airplane/airplane_001.jpg``), or bare file names ``<class>_<n>.jpg``
(``airplane_001.jpg``); the label is the id of the image's class folder.
"""
from __future__ import annotations

import json
from typing import Callable

from . import _fs
from .base import ImageDataset
from .errors import DataError


def load_label_map(root: str) -> list[str]:
    """Class names ordered by id from ``<root>/label_map.json`` (ids must be exactly 0..K-1)."""
    uri = _fs.join(root, "label_map.json")
    raw = _fs.read_or_data_error(uri, "label map")
    try:
        m = json.loads(raw.decode("utf-8-sig"))  # a byte-order mark (Windows editors) is no content
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{uri}: not valid JSON: {e}", file=uri) from e
    if not isinstance(m, dict) or not m:
        raise DataError(f"{uri}: expected a non-empty object {{class_name: id}}", file=uri)
    by_id: dict[int, str] = {}
    for name, i in m.items():
        if isinstance(i, bool) or not isinstance(i, int) and not (isinstance(i, str) and i.strip().isdigit()):
            raise DataError(f"{uri}: id of class {name!r} is not an integer: {i!r}", file=uri)
        i = int(i)
        if i in by_id:
            raise DataError(f"{uri}: classes {by_id[i]!r} and {name!r} share id {i}", file=uri)
        by_id[i] = str(name)
    if sorted(by_id) != list(range(len(by_id))):
        raise DataError(f"{uri}: class ids must be 0..{len(by_id) - 1}, got {sorted(by_id)[:10]}...", file=uri)
    return [by_id[i] for i in range(len(by_id))]


def _names_class(p: str, ids: dict[str, int]) -> bool:
    """Whether list line ``p`` names a file in a class folder of the label map, as the parser reads it."""
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if parts and parts[0] == "images":
        parts = parts[1:]
    return len(parts) >= 2 and parts[-2] in ids


class ImagePathsDataset(ImageDataset):
    """RESISC45 layout (see module doc). ``samples`` are paths relative to ``<root>/images``."""

    layout = "resisc"

    def __init__(self, uri: str, split: str = "train", transform: Callable | None = None,
                 skip_bad: bool = False) -> None:
        super().__init__(uri, split, transform, skip_bad)
        self.classes = load_label_map(self.uri)
        ids = {c: i for i, c in enumerate(self.classes)}
        self.list_uri = _fs.join(self.uri, f"{split}_imagepaths.txt")
        raw = _fs.read_or_data_error(self.list_uri, "image list")
        try:
            text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the first path
        except UnicodeDecodeError as e:
            raise DataError(f"{self.list_uri} is not UTF-8: {e}", file=self.list_uri) from e
        seen: dict[str, int] = {}
        # lines end at \n (\r\n too) only, as in the zip maps: str.splitlines also breaks at \x0c, \x85 ...
        for lineno, line in enumerate(text.split("\n"), 1):
            p = line.strip().replace("\\", "/")
            if not p or (p.startswith("#") and not _names_class(p, ids)):
                continue  # a comment; a class folder may itself start with '#' ('#1 priority/0.png')
            parts = [x for x in p.split("/") if x not in ("", ".")]
            if parts and parts[0] == "images":
                parts = parts[1:]
            where = f"{self.list_uri}:{lineno}"
            if len(parts) == 1 and "_" in parts[0] and parts[0].rsplit("_", 1)[0] in ids:
                parts = [parts[0].rsplit("_", 1)[0], parts[0]]  # bare 'airplane_001.jpg' (torchgeo split files)
            if len(parts) < 2 or ".." in parts:
                self._problem(f"{where}: {p!r} is not '<class>/<file>' under {self.uri}/images", where,
                              file=self.list_uri, line=lineno)
                continue
            cls = parts[-2]
            if cls not in ids:
                self._problem(f"{where}: class folder {cls!r} of {p!r} is not in "
                              f"{_fs.join(self.uri, 'label_map.json')}", where, file=self.list_uri, line=lineno)
                continue
            name = "/".join(parts)
            if name in seen:
                self._problem(f"{where}: {p!r} already listed at line {seen[name]}", where,
                              file=self.list_uri, line=lineno)
                continue
            seen[name] = lineno
            self.samples.append(name)
            self.labels.append(ids[cls])
        if not self.samples and not self.skipped:
            raise DataError(f"{self.list_uri} lists no images", file=self.list_uri)
        self._check()

    def where(self, index: int) -> str:
        return _fs.join(self.uri, "images", self.samples[index])

    def read_raw(self, index: int) -> bytes:
        return _fs.read_or_data_error(self.where(index), "image")
