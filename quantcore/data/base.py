"""Common map-style dataset base: names/labels known up front, images decoded lazily per item."""
from __future__ import annotations

import io
from collections import Counter
from typing import Any, Callable

from torch.utils.data import Dataset

from .errors import DataError, SkipLog, Skipped, SkipRecord

IMG_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTS)


def decode_image(data: bytes, where: str):
    """Fully decode ``data`` with PIL (so truncation is caught here, not in the transform)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise DataError(f"cannot decode image {where}: {type(e).__name__}: {e}", file=where) from e
    return img


class ImageDataset(Dataset):
    """Base of all quantcore datasets. ``dataset[i]`` -> ``(transform(image), label)``.

    Attributes known without decoding any image:
      * ``samples``: list of relative sample names (``class/file.jpg`` style; the zip member for shards)
      * ``labels``: list of int labels, ``0 <= label < num_classes``
      * ``classes``: class names, index = label
      * ``skipped``: :class:`SkipLog` of everything not turned into a sample / skipped while reading
        (only in ``skip_bad`` mode; otherwise the first problem raises :class:`DataError`)
    """

    layout: str = "?"

    def __init__(self, uri: str, split: str, transform: Callable | None = None, skip_bad: bool = False) -> None:
        self.uri = str(uri)
        self.split = split
        self.transform = transform
        self.skip_bad = bool(skip_bad)
        self.classes: list[str] = []
        self.samples: list[str] = []
        self.labels: list[int] = []
        self.skipped = SkipLog()
        self.ignored: list[str] = []  # non-image files seen and ignored (folder layout)

    # -------------------------------------------------------------------------------- to implement
    def read_raw(self, index: int) -> bytes:
        """Encoded bytes of sample ``index``; raises :class:`DataError` naming the file."""
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Full location of sample ``index`` for messages (file URI, or ``shard.zip:member``)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------- helpers
    def _problem(self, msg: str, name: str, *, file: str | None = None, shard: str | None = None,
                 line: int | None = None) -> None:
        """Raise, or (skip_bad) record a problem found while indexing."""
        if not self.skip_bad:
            raise DataError(msg, file=file or name, shard=shard, line=line)
        self.skipped.add(SkipRecord(name, msg))

    def _check(self) -> None:
        if len(self.samples) != len(self.labels):
            raise AssertionError("samples/labels length mismatch")
        k = len(self.classes)
        for i, y in enumerate(self.labels):
            if not (0 <= y < k):
                raise AssertionError(f"label {y} of {self.where(i)} out of range")

    # -------------------------------------------------------------------------------- Dataset API
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return self.labels

    def class_counts(self) -> dict[int, int]:
        c = Counter(self.labels)
        return {k: c.get(k, 0) for k in range(self.num_classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int):
        """Decoded PIL image of sample ``index`` (no transform); raises :class:`DataError`."""
        return decode_image(self.read_raw(index), self.where(index))

    def __getitem__(self, index: int) -> tuple[Any, int] | Skipped:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        try:
            img = self.load_image(index)
        except DataError as e:
            if not self.skip_bad:
                raise
            marker = Skipped(index, self.where(index), str(e))
            self.skipped.add(marker)
            return marker
        if self.transform is not None:
            try:
                img = self.transform(img)
            except Exception as e:
                e.add_note(f"while transforming {self.where(index)}")
                raise
        return img, self.labels[index]

    def describe(self) -> dict[str, Any]:
        """Small JSON-able summary for reports."""
        return {"layout": self.layout, "uri": self.uri, "split": self.split, "num_samples": len(self),
                "num_classes": self.num_classes, "skipped": self.skipped.as_list()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(uri={self.uri!r}, split={self.split!r}, samples={len(self)}, "
                f"classes={self.num_classes}, skipped={len(self.skipped)})")
