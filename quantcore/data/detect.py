"""Layout detection and the one entry point :func:`open_dataset`."""
from __future__ import annotations

import logging
import os
import re
import unicodedata
from typing import Any, Callable

from . import _fs
from .base import IMG_EXTS, is_image_name
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
        raise DataError(f"layout (--layout) {layout!r}: unknown dataset layout; use 'auto' or one of "
                        f"{', '.join(LAYOUTS)} (or an alias: {', '.join(sorted(set(_ALIASES) - set(LAYOUTS)))})")
    return _ALIASES[key]


def detect_layout(uri: str, split: str) -> str:
    """``'zip'``, ``'resisc'`` or ``'folder'`` for ``split`` under ``uri`` (see :func:`open_dataset`)."""
    uri = str(uri)
    lay = _detect_layout(uri, split)
    if lay != "folder" and _has_split_folder(uri, split):
        # shards packed into the folder dataset's own root: either could be meant, and they may differ
        raise DataError(f"{uri} holds both {lay} files for split {split!r} and a {split}/ folder: which one to read "
                        f"is ambiguous (shards packed into their source folder go stale when images are added); "
                        f"pass --layout {lay} or --layout folder, or pack into another folder", file=uri)
    return lay


def _has_split_folder(uri: str, split: str) -> bool:
    """Whether ``<uri>/<split>/`` holds anything: a non-empty directory, or on S3 any object under that
    prefix (one LIST request, :func:`s3_prefix_has_objects`), so S3 is as ambiguous as a local root."""
    lp = _fs.local_path(uri)
    if lp is None:
        return s3_prefix_has_objects(_fs.join(uri, split))
    folder = os.path.join(lp, split)
    return os.path.isdir(folder) and any(True for _ in os.scandir(folder))


def _detect_layout(uri: str, split: str) -> str:
    j = lambda *p: _fs.join(uri, *p)  # noqa: E731
    listed: list[str] = []  # the splits an index.json lists (named when the asked one is nowhere)
    if _fs.exists(j("index.json")):
        from .zipped import load_index

        splits = (load_index(uri) or {}).get("splits", {})
        if split in splits:
            return "zip"
        listed = sorted(map(str, splits))
    named = (f"; its index.json lists the split(s) {', '.join(map(repr, listed))} (--split)" if listed else "")
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
        if not os.path.exists(lp):
            raise DataError(f"dataset {uri}: no such directory ({os.path.abspath(lp)})", file=uri)
        hint = ""
        if os.path.basename(os.path.normpath(lp)) == split or any(
                os.path.isdir(os.path.join(lp, e)) and any(is_image_name(f) for f in os.listdir(os.path.join(lp, e))[:20])
                for e in os.listdir(lp)[:50]):
            hint = (f"; {uri} holds class folders itself: give the dataset root that holds {split}/ "
                    f"(e.g. {os.path.dirname(os.path.normpath(uri)) or '.'}), or --split for its name")
        raise DataError(f"cannot detect a dataset layout for split {split!r} under {uri}: looked for "
                        f"{layouts_looked_for(split)}{named}{hint}", file=uri)
    if listed and not s3_prefix_has_objects(j(split)):  # packed shards of other splits only
        raise DataError(f"dataset {uri} has no split {split!r}{named}", file=uri)
    return "folder"  # S3: a folder prefix is the remaining possibility; FolderDataset reports if empty


def layouts_looked_for(split: str) -> str:
    """What layout detection looks for, in the words every "nothing there" message uses."""
    return (f"index.json, {split}.zip / {split}-NNNNN.zip (+ _map.txt), {split}_imagepaths.txt (resisc45) and "
            f"{split}/<class>/ images")


def s3_prefix_has_objects(prefix_uri: str) -> bool:
    """Whether any object lies under the S3 "folder" ``prefix_uri``: one LIST request, where listing
    a folder split (what :class:`FolderDataset` does) takes one per 1,000 images. A missing bucket
    raises the storage layer's FileNotFoundError, naming it."""
    from ..io import _s3
    from ..io.uri import parse_uri

    p = parse_uri(prefix_uri)
    prefix = p.key if p.key.endswith("/") else p.key + "/"
    # page of 2: an empty folder's own marker key ("train/") is not an object of the split
    for key in _s3.list_keys(p.bucket, prefix, p.original, page_size=2):
        if key != prefix:
            return True
    return False


def _label_note(ds: Any, msg: str, *args: Any) -> None:
    """Log a warning about how the data's labels map to the model's classes, and keep it on ``ds``
    (``ds.label_notes``, see :func:`label_notes`) for the run's report: a console line alone is lost."""
    text = msg % args if args else msg
    log.warning("%s", text)
    ds.label_notes = [*getattr(ds, "label_notes", []), text]


def label_notes(ds: Any) -> list[str]:
    """The label-mapping warnings :func:`open_dataset` gave for ``ds`` (empty when none)."""
    return list(getattr(ds, "label_notes", []))


def _no_shared_name(ds: Any, where: str, order: str, names: list[str]) -> None:
    """Not one class of the data is named as one of the model's labels: labels go by position."""
    _label_note(ds, "the classes of %s share no name with the model's labels (e.g. %r is label 0 here, the "
                "model's class 0 is %r): labels are taken by position (%s), so the data's class i is scored as "
                "the model's class i; right if they are the same classes under other names, otherwise top-1 is "
                "scored against other labels", where, ds.classes[0] if ds.classes else None, names[0], order)


def open_dataset(uri: str, split: str = "val", transform: Callable | None = None, layout: str = "auto",
                 skip_bad: bool = False, cache_dir: str | None = None, **kwargs: Any):
    """Open ``split`` of the dataset at ``uri`` (local path, ``file://`` or ``s3://``).

    Layouts (``layout='auto'`` detects in this order):
      * ``zip``: ``index.json`` or ``<split>.zip``/``<split>-NNNNN.zip`` with ``*_map.txt`` beside them
      * ``resisc``: ``<split>_imagepaths.txt`` + ``label_map.json`` + ``images/<class>/``
      * ``folder``: ``<split>/<class>/*.jpg`` (ImageNet style, sorted class names = labels)
    ``cache_dir`` is used for zip shards on remote storage; extra ``kwargs`` go to the dataset class
    (e.g. ``classes=``, ``num_classes=``, ``block_size=``). ``label_names`` (folder layout; see
    :func:`model_label_names`): class folders named exactly as the model's labels take the model's
    label order; folders that share only some names are warned about.
    """
    from .folder import FolderDataset
    from .resisc import ImagePathsDataset
    from .zipped import ZipShardDataset

    names = kwargs.pop("label_names", None)
    if not str(split).strip():  # '' would look for class folders right under the dataset root
        raise DataError(f"split: empty name for the dataset at {uri}; give one such as train, val or test",
                        file=uri)
    lay = normalize_layout(layout)
    if lay == "auto":
        lay = detect_layout(uri, split)
    if cache_dir and lay != "zip":
        _warn_once(("cache", uri), f"--cache-dir {cache_dir}: only zip shards are cached; {uri} ({lay} layout) is "
                   "read without it (`quantcore pack` makes shards)")
    if lay in ("zip", "resisc"):
        ds = (ZipShardDataset(uri, split, transform, skip_bad=skip_bad, cache_dir=cache_dir, **kwargs) if lay == "zip"
              else ImagePathsDataset(uri, split, transform, skip_bad=skip_bad, **kwargs))
        # compared up to letter case and Unicode form ("Tench" packed beside a model's "tench" is the same
        # class), then word separators (match_names)
        from .folder import class_name_key as key

        if not ds.classes_named:  # made-up names "0".."K-1": the map's label numbers are used as given
            names = None
        keyed = [key(n) for n in names or []]
        off = next(((i, c) for i, c in enumerate(ds.classes) if i >= len(keyed) or key(c) != keyed[i]), None)
        # also a split holding the model's first classes only (off is None: no position differs)
        moved = off is not None or len(ds.classes) != len(keyed)
        if names and moved and _take_model_labels(ds, list(names)):
            if ds.absent_classes:
                _label_note(ds, "split %r of %s has no images of %d of the model's %d classes (e.g. %r): the others "
                            "keep the model's label indices, and the absent ones are scored with no images", split,
                            uri, len(ds.absent_classes), len(names), ds.absent_classes[0])
            else:
                _label_note(ds, "the classes of %s are the model's in another order: labels follow the model's order "
                            "(id2label), not the order packed in its index", uri)
        elif names and off is not None and not {key(c) for c in ds.classes} & set(keyed):
            _no_shared_name(ds, uri, "label order of its index", list(names))
        elif names and off is not None and {key(c) for c in ds.classes} & set(keyed):
            i, c = off
            where = f"class {keyed.index(key(c))} in the model" if key(c) in keyed else "not a label of the model"
            _label_note(ds, "the class names of %s (label order of its index) differ from the model's label order: "
                        "e.g. %r is label %d there, %s; only a split whose classes are all the model's "
                        "labels is mapped by name, so its labels are used as packed", uri, c, i, where)
        _warn_unused(ds)
        return ds
    ds = FolderDataset(uri, split, transform, skip_bad=skip_bad, label_names=names, **kwargs)
    if names and "classes" not in kwargs and ds.classes == list(names) and ds.classes != sorted(ds.classes):
        _label_note(ds, "class folders under %s carry the model's label names: labels follow the model's order "
                    "(id2label), not the sorted folder names", ds.root)
    elif names and ds.absent_classes:
        _label_note(ds, "split %s has no class folder for %d of the model's %d classes (e.g. %r): the others keep the "
                    "model's label indices%s, and the absent ones are scored with no images", ds.root,
                    len(ds.absent_classes), len(names), ds.absent_classes[0],
                    " (folders matched to its labels up to letter case, Unicode form or word separators)"
                    if getattr(ds, "label_match", None) else "")
    elif names and getattr(ds, "label_match", None):
        i = next((i for i, (c, n) in enumerate(zip(ds.classes, names)) if c != n), 0)
        _label_note(ds, "class folders under %s carry the model's label names up to letter case, Unicode form or "
                    "word separators (spaces, _, -, /) "
                    "(e.g. folder %r is the model's %r, class %d): labels follow the model's order (id2label), "
                    "not the sorted folder names", ds.root, ds.classes[i], names[i], i)
    elif names and ds.classes != list(names) and not set(ds.classes) & set(names):
        _no_shared_name(ds, ds.root, "sorted folder names", list(names))
    elif names and ds.classes != list(names) and set(ds.classes) & set(names):
        _label_note(ds, "class folders under %s share names with the model's labels but are not the same set: "
                    "label i is the i-th sorted folder, which may not be the model's class i (e.g. folder %r is "
                    "label %d, the model's %r is class %d)", ds.root, *_first_mismatch(ds.classes, list(names)))
    _warn_unused(ds)
    return ds


def class_names(ds: Any) -> list[str] | None:
    """``ds.classes`` when they are the data's own class names; None when they were made up
    (``classes_named`` False: a zip split whose map gives label numbers only), so that they are neither
    recorded as the model's class names nor compared with another split's."""
    return list(ds.classes) if getattr(ds, "classes_named", True) else None


def class_mismatch(a: list[str], b: list[str]) -> str | None:
    """None when two datasets' label orders agree (``a``/``b``: their ``classes``, label i = item i),
    else the first difference in words: a class only one of them has (said when the two names are
    the same text in another Unicode normalization, e.g. macOS's NFD folder names beside Linux's NFC),
    or the same classes in another order."""
    a, b = list(a), list(b)
    if a == b:
        return None
    sb, sa = set(b), set(a)
    only_a, only_b = [c for c in a if c not in sb], [c for c in b if c not in sa]
    if only_a or only_b:
        x, y = (only_a or [None])[0], (only_b or [None])[0]
        what = ", ".join(f"{c!r} (label {lst.index(c)}) only in the {side}" for c, lst, side in
                         ((x, a, "first"), (y, b, "second")) if c is not None)
        if x is not None and y is not None and unicodedata.normalize("NFC", x) == unicodedata.normalize("NFC", y):
            what += " - the same name in two Unicode normalizations (NFD, as macOS writes it, and NFC)"
        elif x is not None and y is not None and x.casefold() == y.casefold():
            what += " - the same name in another letter case"
        return f"{len(a)} vs {len(b)} classes, {what}"
    i = next(i for i, (p, q) in enumerate(zip(a, b)) if p != q)
    return f"the same {len(a)} classes in another order: label {i} is {a[i]!r} in the first, {b[i]!r} in the second"


def _warn_once(key: Any, msg: str) -> None:
    if key not in _WARNED_IGNORED:  # once per dataset and process (it is opened per phase)
        _WARNED_IGNORED.add(key)
        log.warning("%s", msg)


def _warn_unused(ds: Any) -> None:
    note = unused_files_warning(ds)
    if note:
        _warn_once(getattr(ds, "root", getattr(ds, "uri", "")), note)


def unused_files(ds: Any) -> list[str]:
    """Files under a folder dataset's split that are not samples: hidden ones and those without an
    image extension (:data:`~quantcore.data.base.IMG_EXTS`); empty for other layouts."""
    return list(getattr(ds, "ignored", None) or [])


def unused_files_warning(ds: Any) -> str | None:
    """The report warning for :func:`unused_files` (None when there are none): runs list the files
    under ``unused_files`` so a dataset that shrank is visible in what they write, not only on stderr."""
    files = unused_files(ds)
    if not files:
        return None
    exts = sorted({f.rsplit("/", 1)[-1].rpartition(".")[2].lower() if "." in f.rsplit("/", 1)[-1].lstrip(".")
                   else "(no extension)" for f in files})
    where = (f"of the folder packed into {ds.uri} were not packed" if getattr(ds, "layout", "") == "zip"
             else f"under {getattr(ds, 'root', ds.uri)} are not used")
    return (f"{len(files)} file(s) {where} (hidden, or not an image extension "
            f"{'/'.join(sorted({e.lstrip('.').lower() for e in IMG_EXTS}))}; found: {', '.join(exts[:8])}), "
            f"e.g. {', '.join(files[:3])}")


_WARNED_IGNORED: set[str] = set()


def _first_mismatch(folders: list[str], names: list[str]) -> tuple[str, int, str, int]:
    for i, f in enumerate(folders):
        if f in names and names.index(f) != i:
            return f, i, f, names.index(f)
    f = next(f for f in folders if f in names)
    return f, folders.index(f), f, names.index(f)


def _take_model_labels(ds: Any, names: list[str]) -> bool:
    """Relabel a zip/resisc split whose class names are all the model's (up to case/Unicode form, else
    word separators: :func:`~quantcore.data.folder.match_names`; every name once on both sides) to the
    model's label indices, as class folders are: another order, or only some of the classes (a small
    validation split, a subset). False, unchanged, otherwise."""
    from .folder import match_names

    matched = match_names(list(ds.classes), names)
    if matched is None:
        return False
    own, keyed = matched
    to_model = [keyed.index(k) for k in own]
    ds.labels = [to_model[y] for y in ds.labels]
    spelled = dict(zip(own, ds.classes))  # a packed class keeps its own spelling ("Tench" for "tench")
    ds.absent_classes = [n for n, k in zip(names, keyed) if k not in spelled]
    ds.classes = [spelled.get(k, n) for n, k in zip(names, keyed)]
    return True


def model_label_names(model: Any) -> list[str] | None:
    """The class names a model carries, in class-index order: Hugging Face ``config.id2label``, else
    those of the data a loaded quantcore checkpoint was calibrated on (its calibration record's
    ``classes``); None when it has none or only the generic ``LABEL_<i>`` ones."""
    cfg = getattr(model, "config", None)
    id2label = getattr(cfg, "id2label", None)
    if not id2label:
        cal = ((getattr(model, "quantcore_meta", None) or {}).get("extra") or {}).get("calibration") or {}
        classes = cal.get("classes")
        from .zipped import _made_up  # a checkpoint calibrated on such a split before they were told apart

        return [str(c) for c in classes] if isinstance(classes, list) and classes and not _made_up(classes) else None
    names = [id2label.get(i, id2label.get(str(i))) for i in range(len(id2label))]
    if any(n is None for n in names) or all(re.fullmatch(r"LABEL_\d+", str(n)) for n in names):
        return None
    return [str(n) for n in names]
