"""Common map-style dataset base: names/labels known up front, images decoded lazily per item."""
from __future__ import annotations

import io
import re
from collections import Counter
from typing import Any, Callable

from torch.utils.data import Dataset

from .errors import DataError, SkipLog, Skipped, SkipRecord

IMG_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")  # torchvision's


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTS)


def decode_image(data: bytes, where: str, alpha: str = "drop", mode: str | None = None):
    """Fully decode ``data`` with PIL (so truncation is caught here, not in the transform) and bring it
    to 8 bits per channel with :func:`to_8bit` (``alpha``: its policy; ``mode``: the mode the model
    reads, when known): the result is always mode ``'L'`` or ``'RGB'``."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"): a reason must read the same every run
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise DataError(f"cannot decode image {where}: {type(e).__name__}: {why}", file=where) from e
    return to_8bit(img, where, alpha, mode)


# Formats whose 32-bit ``'I'`` images hold at most 16-bit samples (old Pillow's 16-bit PNGs; Netpbm
# files with maxval > 255, which Pillow rescales to 0..65535).
_I_IS_16BIT = ("PNG", "PPM")
_TO_RGB = ("RGBX", "CMYK", "YCbCr", "LAB", "HSV")


ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# What becomes of transparent pixels: "drop" keeps their stored colour (``Image.convert('RGB')``, as
# torchvision's and timm's loaders); "white" composites the image onto white, as transformers'
# ``convert_to_rgb`` does for image processors with ``do_convert_rgb`` (CLIP, DINOv2/Bit, SigLIP).
ALPHA_POLICIES = ("drop", "white")


def alpha_policy(transform: Any) -> str:
    """The transparency policy (:data:`ALPHA_POLICIES`) ``transform`` decodes its images with: its ``alpha``
    (:class:`~quantcore.data.transforms.EvalTransform`, ``TrainTransform``, ``ConvertMode``), else that of
    the first step that has one (a ``Compose`` wrapping them), else ``"drop"``. A dataset must decode with
    it: an image already flattened by ``"drop"`` has lost the transparency ``"white"`` composites."""
    return _declared_alpha(transform) or "drop"


def _declared_mode(transform: Any) -> str | None:
    """The PIL mode ``transform`` converts its images to (its ``ConvertMode``, also inside an
    EvalTransform/TrainTransform or a Compose), None when it declares none."""
    from .transforms import ConvertMode

    for conv in (transform, getattr(transform, "convert", None)):
        if isinstance(conv, ConvertMode):
            return conv.mode
    return next(filter(None, map(_declared_mode, getattr(transform, "transforms", None) or [])), None)


def _declared_alpha(transform: Any) -> str | None:
    alpha = getattr(transform, "alpha", None)  # torchvision's ElasticTransform/MixUp have a numeric alpha
    if isinstance(alpha, str) and alpha in ALPHA_POLICIES:
        return alpha
    return next(filter(None, map(_declared_alpha, getattr(transform, "transforms", None) or [])), None)


def has_alpha(img) -> bool:
    """Whether ``img`` has transparency, as transformers' ``convert_to_rgb`` decides it: an alpha band, or
    a tRNS key (``info["transparency"]``) in any mode (palette, and ``L``/``RGB`` colour-keyed PNGs)."""
    return img.mode in ALPHA_MODES or img.info.get("transparency") is not None


def to_8bit(img, where: str, alpha: str = "drop", mode: str | None = None):
    """``img`` as an 8-bit ``'L'`` (one channel) or ``'RGB'`` image; never clips silently. ``mode``: the
    mode the model reads, when known: a ``YCbCr`` image read as ``'L'`` is its Y band, as
    ``Image.convert('L')`` (timm's ``input_img_mode='L'`` loader) gives, not the luma of its RGB
    conversion (up to 3 levels apart).

    Rules, by PIL mode:
      * ``L``, ``RGB``: unchanged. ``1``: ``L`` with 0/255.
      * ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit grey): ``L``, scaled ``round(v * 255 / 65535)``.
      * ``I`` (32-bit int): from PNG/Netpbm (at most 16-bit samples) scaled like 16-bit; from any other
        format (32-bit TIFF ...) refused, and ``F`` (float) refused: neither has a defined white level,
        so any scaling would be a guess. The :class:`DataError` names the file and the mode.
      * Alpha (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, ``P`` with transparency), ``alpha="drop"``
        (default): dropped, the (un-premultiplied) colour is kept, exactly what ``Image.convert('RGB')``
        in torchvision's and timm's loaders gives, so accuracies stay comparable with theirs.
        ``alpha="white"``: composited onto opaque white (``RGB``), as transformers' ``convert_to_rgb``;
        there a tRNS colour key of an ``L``/``RGB`` PNG counts as transparency too, as it does for it.
      * ``P``: its palette colours (``RGB``). ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's
        conversion to ``RGB``. Any other mode is refused naming the file.
    16-bit RGB(A) PNG/TIFF/PPM files are already reduced to 8 bits by PIL's decoder. EXIF orientation
    and ICC profiles are not applied (as in torchvision/timm), so pixels are the stored ones.
    """
    target, mode = mode, img.mode
    if target == "L" and mode == "YCbCr":
        return img.convert("L")
    if alpha not in ALPHA_POLICIES:
        raise ValueError(f"alpha must be one of {ALPHA_POLICIES} (got {alpha!r})")
    if alpha == "white" and mode in ("1", "L", "P", "RGB", "LA", "La", "PA", "RGBA", "RGBa") and has_alpha(img):
        from PIL import Image

        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("LA", "La"):
        return (img.convert("LA") if mode == "La" else img).convert("L")
    if mode in ("P", "PA"):
        if mode == "PA" or "transparency" in img.info:
            return img.convert("RGBA").convert("RGB")
        return img.convert("RGB")
    if mode in ("RGBA", "RGBa"):
        return (img.convert("RGBA") if mode == "RGBa" else img).convert("RGB")
    if mode in _TO_RGB:
        return img.convert("RGB")
    if mode.startswith("I;16") or (mode == "I" and getattr(img, "format", None) in _I_IS_16BIT):
        return _scale_16bit(img, where)
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise DataError(f"{kind} image (PIL mode {mode!r}, format {getattr(img, 'format', None)}) {where}: "
                        f"no defined white level, refusing to guess a scale; convert it to 8- or 16-bit",
                        file=where)
    raise DataError(f"unsupported image mode {mode!r} in {where}", file=where)


def _scale_16bit(img, where: str):
    import numpy as np
    from PIL import Image

    a = np.asarray(img)
    if a.ndim != 2 or a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
        raise DataError(f"16-bit image {where} (PIL mode {img.mode!r}) has samples outside 0..65535", file=where)
    a = (a.astype(np.uint32) * 255 + 32767) // 65535  # round(v * 255 / 65535), exact in integers
    return Image.fromarray(a.astype(np.uint8))


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
        self.absent_classes: list[str] = []  # the model's classes this split has no folder for (folder layout)
        # False when ``classes`` are made up ("0".."K-1": a zip split whose map gives label numbers and no
        # index names them): such names are never matched against a model's or another split's names
        self.classes_named = True

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

    def load_image(self, index: int, alpha: str | None = None):
        """Decoded PIL image of sample ``index`` (no transform); raises :class:`DataError`. ``alpha``: the
        transparency policy (:data:`ALPHA_POLICIES`); None: the dataset transform's (:func:`alpha_policy`),
        so a model whose preprocessing composites onto white gets that in training as in evaluation."""
        return decode_image(self.read_raw(index), self.where(index), alpha or alpha_policy(self.transform),
                            _declared_mode(self.transform))

    def __getitem__(self, index: int) -> tuple[Any, int] | Skipped:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        try:
            sample = self.decode(index)
        except DataError as e:
            if not self.skip_bad:
                raise
            marker = Skipped(index, self.where(index), str(e))
            self.skipped.add(marker)
            return marker
        return sample, self.labels[index]

    def decode(self, index: int) -> Any:
        """The decode step: sample ``index`` decoded and transformed. A transform with ``from_bytes(data,
        where)`` (:class:`~quantcore.data.transforms.EvalTransform`: JPEG via torchvision, see
        :mod:`quantcore.data.decode`) gets the encoded bytes; any other gets :meth:`load_image`'s PIL image.
        Raises :class:`DataError` naming the file for unreadable or undecodable data (skippable); other
        errors of the transform carry a note naming the file."""
        from_bytes = getattr(self.transform, "from_bytes", None)
        if from_bytes is not None:
            data, where = self.read_raw(index), self.where(index)
            try:
                return from_bytes(data, where)
            except DataError:
                raise
            except Exception as e:
                e.add_note(f"while decoding/transforming {where}")
                raise
        img = self.load_image(index)
        if self.transform is not None:
            try:
                img = self.transform(img)
            except Exception as e:
                e.add_note(f"while transforming {self.where(index)}")
                raise
        return img

    def describe(self) -> dict[str, Any]:
        """Small JSON-able summary for reports."""
        return {"layout": self.layout, "uri": self.uri, "split": self.split, "num_samples": len(self),
                "num_classes": self.num_classes, "skipped": self.skipped.as_list()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(uri={self.uri!r}, split={self.split!r}, samples={len(self)}, "
                f"classes={self.num_classes}, skipped={len(self.skipped)})")
