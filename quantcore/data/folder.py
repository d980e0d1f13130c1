"""ImageNet-style folder layout: ``<root>/<split>/<class>/*.{JPEG,jpg,png,...}``; classes sorted -> label."""
from __future__ import annotations

import os
import re
import unicodedata
from typing import Callable

from . import _fs
from .base import IMG_EXTS, ImageDataset, is_image_name
from .errors import DataError, SkipRecord


class FolderDataset(ImageDataset):
    """Class-per-folder dataset on a local path, ``file://`` or ``s3://`` prefix.

    Samples are sorted by (class, relative path). Non-image files (by extension) and hidden files or
    folders are not used but listed in ``ignored`` (:func:`~quantcore.data.open_dataset` warns); an image outside any class folder or an empty class folder is a :class:`DataError`
    (``skip_bad``: the empty class keeps its label index and is recorded in ``skipped``).
    ``classes`` may be given to fix the label order (every listed class must exist, no others may);
    ``label_names`` (the model's, :func:`~quantcore.data.model_label_names`) fix it only when the
    folders carry exactly those names.
    """

    layout = "folder"

    def __init__(self, uri: str, split: str | None = "train", transform: Callable | None = None,
                 skip_bad: bool = False, classes: list[str] | None = None,
                 label_names: list[str] | None = None) -> None:
        super().__init__(uri, split or "", transform, skip_bad)
        self.root = _fs.join(self.uri, split) if split else self.uri
        per_class: dict[str, list[str]] = {}
        for d in self._local_class_dirs():
            per_class.setdefault(d, [])
        listed = _fs.list_files(self.root)
        for f in listed:
            r = _fs.rel(f, self.root)
            parts = [p for p in r.split("/") if p]
            if "" in r.rstrip("/").split("/"):  # an S3 key with '//': read under its collapsed name, it is
                msg = (f"object key {f!r} has an empty path segment ('//'): it would be read as another key; "
                       "rename it")  # another object, or none
                if not self.skip_bad:
                    raise DataError(msg, file=f)
                self.skipped.add(SkipRecord(f, msg))
                continue
            if r.endswith("/"):  # S3 "folder" marker
                if parts and not any(p.startswith(".") for p in parts):
                    per_class.setdefault(parts[0], [])
                continue
            if not parts or any(p.startswith(".") for p in parts):
                self.ignored.append(f)  # hidden files/dirs (.DS_Store, .ipynb_checkpoints): not data, but said
                continue
            if not is_image_name(r):
                self.ignored.append(f)
                if len(parts) > 1:  # a class folder exists whatever it holds (as a local directory does):
                    per_class.setdefault(parts[0], [])  # one holding no images is then named, not dropped
                continue
            if len(parts) == 1:
                raise DataError(f"image {f} is not inside a class folder of {self.root}", file=f)
            per_class.setdefault(parts[0], []).append("/".join(parts))
        if not per_class:
            sp = split or "<split>"
            if not listed and _fs.local_path(self.uri) is None and _names_object(self.uri):
                raise DataError(f"{self.uri} is a file, not a dataset: give the folder or S3 prefix that holds "
                                f"{split or '<split>'}/<class>/ or the zip shards", file=self.uri)
            if not listed:
                from .detect import layouts_looked_for

                raise DataError(f"nothing found under {self.root}: no file or object has that prefix (dataset "
                                f"layouts looked for under {self.uri}: {layouts_looked_for(sp)})", file=self.root)
            raise DataError(f"no class folders found under {self.root} (expected <root>/<split>/<class>/*.jpg)",
                            file=self.root)
        if classes is not None:
            missing = [c for c in classes if c not in per_class]
            extra = sorted(set(per_class) - set(classes))
            if extra:
                raise DataError(f"class folders {extra[:10]} under {self.root} are not in the given class list",
                                file=self.root)
            for c in missing:
                per_class[c] = []
            self.classes = list(classes)
        elif label_names and set(per_class) == set(label_names):
            # folders named exactly as the model's labels: folder "cat" is the model's "cat", whatever the
            # sorted order says (sorting would score a correct model near 0 %)
            twice = sorted({n for n in label_names if label_names.count(n) > 1})
            if twice:
                where = {n: [i for i, m in enumerate(label_names) if m == n] for n in twice[:3]}
                raise DataError(f"the class folders under {self.root} are named by the model's labels, and the "
                                f"model names {len(twice)} label(s) more than once ({where}; ImageNet-1k has two "
                                "'crane' and two 'maillot'): a folder of such a name cannot say which class its "
                                "images are. Name the folders uniquely (e.g. by WordNet id, sorted as the "
                                "model's classes)", file=self.root)
            self.classes = list(label_names)
        elif label_names and set(per_class) < set(label_names) and len(set(label_names)) == len(label_names):
            # a split lacking some of the model's classes (a small val split, a subset): the folders present
            # keep the model's indices; sorted, every label after the first gap would shift by one
            self.classes = list(label_names)
            self.absent_classes = [c for c in label_names if c not in per_class]
        elif label_names and (matched := _match_ignoring_case_and_form(list(per_class), list(label_names))):
            # the same names up to letter case, word separators or Unicode form (macOS NFD): the model's
            # order too - sorted order would relabel every class without a word ("Tench" sorts after
            # "Cock", "tench" is class 0); also for a split holding only some of the model's classes
            self.classes, self.absent_classes = matched
            self.label_match = "case/Unicode-insensitive"
        else:
            self.classes = sorted(per_class)
        absent = set(self.absent_classes)
        for label, c in enumerate(self.classes):
            files = sorted(per_class.get(c, []))
            if not files and c not in absent:
                where = _fs.join(self.root, c)
                msg = f"class folder {where} is empty (no files with extensions {', '.join(IMG_EXTS)})"
                if not self.skip_bad:
                    raise DataError(msg, file=where)
                self.skipped.add(SkipRecord(where + "/", msg))
            self.samples.extend(files)
            self.labels.extend([label] * len(files))
        self._check()

    def _local_class_dirs(self) -> list[str]:
        p = _fs.local_path(self.root)
        if p is None:
            return []
        if not os.path.isdir(p):
            raise DataError(f"split folder {self.root} does not exist", file=self.root)
        return sorted(e.name for e in os.scandir(p) if e.is_dir() and not e.name.startswith("."))

    def where(self, index: int) -> str:
        return _fs.join(self.root, self.samples[index])

    def read_raw(self, index: int) -> bytes:
        return _fs.read_or_data_error(self.where(index), "image")


def _names_object(uri: str) -> bool:
    """Whether an S3 URI is one object (``s3://b/x.zip``); a prefix (``s3://b/x/``) or a bare bucket
    never is."""
    key = str(uri).split("://", 1)[-1].partition("/")[2]
    return bool(key) and not key.endswith("/") and _fs.exists(uri)


def class_name_key(name: str, loose: bool = False) -> str:
    """A class name compared up to letter case and Unicode normalization (macOS writes NFD); ``loose``:
    also up to word separators (space, ``_``, ``-``, ``/``: ``'Ankle boot'`` is ``'ankle_boot'``; a
    folder name cannot hold Fashion-MNIST's ``'T-shirt/top'``). Matching tries the strict key first:
    label sets with ``'bottom-feeder'`` and ``'bottom feeder'`` stay apart."""
    key = unicodedata.normalize("NFC", name).casefold()
    return re.sub(r"[\s_\-/]+", "", key) if loose else key


def match_names(own: list[str], labels: list[str]) -> tuple[list[str], list[str]] | None:
    """``(keys of own, keys of labels)`` under the strictest :func:`class_name_key` that makes both
    sides one-to-one with ``own`` among ``labels``; None when neither does."""
    for loose in (False, True):
        a, b = [class_name_key(n, loose) for n in own], [class_name_key(n, loose) for n in labels]
        if own and len(set(a)) == len(a) and len(set(b)) == len(b) and set(a) <= set(b):
            return a, b
    return None


def _match_ignoring_case_and_form(folders: list[str], labels: list[str]) -> tuple[list[str], list[str]] | None:
    """``(classes, absent)`` when each folder is one label's name up to :func:`class_name_key` (one to
    one; labels without a folder allowed): ``classes`` in the labels' order, a folder's own spelling
    where there is one, the label's otherwise; ``absent`` the labels without a folder. None otherwise."""
    matched = match_names(folders, labels)
    if matched is None:
        return None
    by_key, keys = dict(zip(matched[0], folders)), matched[1]
    return ([by_key.get(k, n) for n, k in zip(labels, keys)],
            [n for n, k in zip(labels, keys) if k not in by_key])
