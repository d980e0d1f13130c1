"""Fast image decoding: JPEG through ``torchvision.io.decode_jpeg`` (libjpeg-turbo on the CPU, nvJPEG on a
GPU), then the model's own eval transform applied to the ``uint8`` tensor; every other format through PIL.

Two ways in, one set of rules:

* per sample (DataLoader workers, CPU): :meth:`quantcore.data.transforms.EvalTransform.from_bytes`, which
  datasets call instead of decoding with PIL when their transform has it (see
  :meth:`quantcore.data.base.ImageDataset.__getitem__`);
* per batch, on any device: :class:`BatchDecoder` (``decode_jpeg(list, device=...)``: nvJPEG for
  ``device='cuda'``, a loop over libjpeg-turbo for ``'cpu'``), fed by :func:`device_loader`, whose workers
  only read bytes. The same code runs with ``device='cpu'`` in the tests.

Which decoder is used for a file (the same rule on both ways):
  JPEG whose header says ``L`` or ``RGB`` (PIL's header parser, ~20 us) -> torchvision; CMYK/YCCK JPEGs, every
  other format, and any JPEG torchvision refuses -> :func:`quantcore.data.base.decode_image` (PIL), which
  then either decodes it (libjpeg-turbo's PIL build tolerates some corrupt data that torchvision refuses)
  or raises the very :class:`DataError` the PIL path raises. So a corrupt or truncated file fails, or is
  skipped under ``skip_bad``, exactly as before, naming the file. EXIF orientation is not applied on either
  path (torchvision's ``apply_exif_orientation=False``, as PIL's ``Image.open``).

Tolerance against the PIL path (measured on generated 500x375 photos and Fashion-MNIST re-encoded as 224x224
JPEGs, ``tests/test_decode.py`` and ``bench/decode.py``):
  * decode: bit-identical ``uint8`` pixels on the CPU (torchvision and Pillow wheels both use libjpeg-turbo
    with the same defaults: islow IDCT, fancy upsampling), for baseline, progressive and grayscale JPEGs;
    ``'L'`` from an RGB JPEG uses PIL's own integer luma formula, so it is bit-identical too;
  * transform: torch's antialiased bilinear/bicubic resize on ``uint8`` rounds a few values differently from
    Pillow's: on 75 M resized values (generated photos and Fashion-MNIST JPEGs, 6 output sizes) 99.7% are
    identical, 0.2-0.3% differ by 1 level of 255, 2e-6 by 2, none by more (:data:`MAX_LEVEL_DIFF`; one
    extreme squash, a 20x900 strip to 384x384 bicubic, reaches 3 levels on 3 values); so the
    normalized tensors differ by at most ``2/(255*std)`` per value, by < 2e-4 in mean (:data:`MEAN_ABS_TOL`;
    measured 3-6e-5), in under 1% of values (:data:`FRAC_DIFFER_TOL`) - on photo-sized images downscaled to
    the model's size; the share grows with the scale factor (measured 2026-12-03: 64x64 upscaled to 224 or
    50x40 downscaled to 32: 4-8% of values 1-2 levels apart; 50x40 or 300x40 to 224: 1.1-1.5%) and for
    portraits downscaled ~2x or more (60x200 to 32: up to ~22%, 40x300 to 32 bicubic: 28%, 1 level: the
    vertical pass rounds differently; transposing around the resize matches those but breaks landscape
    ones, so it is not done); top-1 of a trained Fashion-MNIST CNN
    agrees on >= 99% of images (measured: ``docs/benchmarks.md``, image decoding);
  * nvJPEG (``device='cuda'``): a different IDCT/upsampling, and the resize runs on the GPU: measured on an
    H200 (2026-12-04, torchvision 0.26, 256 photo-like 500x375 JPEGs, ``bench/gpu_check.sh``): at most 12
    levels of 255 apart from the PIL path, 0.7 level on average (bilinear; bicubic 0.75), 56% of values
    differ; ``tests/test_decode.py`` bounds the mean below 1 level and the maximum at 16. Top-1 agreement
    of a trained model was not measured on a GPU (``python -m bench.decode --device cuda`` does it where
    Fashion-MNIST is installed).

Only ``Resize`` (bilinear/bicubic), ``CenterCrop``, ``ToTensor``/``MaybeToTensor``, ``Normalize`` and the
torchvision ``ImageClassification`` preset are translated (what timm and torchvision eval transforms are made
of); any other step keeps the whole transform on PIL, and the transform's ``config["decoder"]`` says why.
"""
from __future__ import annotations

import copy
import io
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from .errors import DataError, SkipLog, Skipped, SkipRecord

MAX_LEVEL_DIFF = 2  # uint8 levels: torch vs Pillow antialiased resize rounding (decode itself is exact)
MEAN_ABS_TOL = 2e-4  # mean abs difference of normalized tensors, tensor path vs PIL path (measured 3-6e-5)
FRAC_DIFFER_TOL = 0.01  # fraction of values that differ at all (measured 0.2-0.4%)
_TENSOR_INTERP = ("bilinear", "bicubic")  # same kernels as Pillow's with antialias=True; nearest differs


# ------------------------------------------------------------------------------------------------ decoders
def _tv_decode_jpeg(data: Any, device: Any = "cpu"):
    return decode_jpeg(data, mode=ImageReadMode.UNCHANGED, device=device)


def as_uint8_tensor(data: bytes | bytearray | memoryview | torch.Tensor) -> torch.Tensor:
    """Encoded bytes as the 1-D ``uint8`` CPU tensor torchvision's decoders take (a copy of ``bytes``)."""
    if isinstance(data, torch.Tensor):
        return data
    if not len(data):  # frombuffer refuses empty buffers; an empty file must still reach PIL's error
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _as_bytes(data: Any) -> bytes:
    return data.numpy().tobytes() if isinstance(data, torch.Tensor) else bytes(data)


def torchvision_can_decode(data: Any) -> bool:
    """True for a JPEG whose header (read by PIL, no pixel decoding) says 8-bit ``L`` or ``RGB``.

    CMYK/YCCK JPEGs go to PIL (torchvision returns 4 channels or its own CMYK conversion); files PIL cannot
    identify, or too large (PIL's decompression-bomb limit), go to PIL too, which raises its usual error."""
    try:
        with Image.open(io.BytesIO(memoryview(data.numpy()) if isinstance(data, torch.Tensor) else data)) as img:
            return img.format == "JPEG" and img.mode in ("L", "RGB")
    except Exception:  # unidentified/truncated header/bomb: PIL's decode_image reports it, naming the file
        return False


def try_torchvision(data: Any, device: Any = "cpu") -> torch.Tensor | None:
    """``uint8`` ``C x H x W`` (C = 1 or 3) from torchvision for a JPEG it should decode (see
    :func:`torchvision_can_decode`), else None: the caller then decodes with PIL, which gives the same pixels
    or raises the PIL path's error (torchvision refuses some corrupt files PIL's libjpeg-turbo tolerates)."""
    if not torchvision_can_decode(data):
        return None
    try:
        return _tv_decode_jpeg(as_uint8_tensor(data), device)
    except (RuntimeError, ValueError):
        return None


def decode_to_tensor(data: Any, where: str, mode: str | None = None, device: Any = "cpu",
                     alpha: str = "drop") -> tuple[torch.Tensor, str]:
    """Decode one image to a ``uint8`` ``C x H x W`` tensor on ``device`` in ``mode`` (``'L'``/``'RGB'``/None);
    ``alpha``: the transparency policy of :func:`quantcore.data.base.to_8bit` (JPEGs have none).

    Returns ``(tensor, decoder)`` with ``decoder`` ``'torchvision'`` or ``'pil'`` (see the module doc for the
    rule). Raises :class:`DataError` naming ``where`` exactly when the PIL path would."""
    x = try_torchvision(data, device)
    if x is not None:
        return to_mode(x, mode), "torchvision"
    return pil_to_tensor(data, where, mode, alpha).to(device), "pil"


def pil_to_tensor(data: Any, where: str, mode: str | None, alpha: str = "drop") -> torch.Tensor:
    """PIL decode (:func:`decode_image`, its rules and errors, ``alpha`` its transparency policy) ->
    ``uint8`` ``C x H x W`` CPU tensor in ``mode``."""
    from .base import decode_image

    img = decode_image(_as_bytes(data), where, alpha, mode)
    if mode and img.mode != mode:
        img = img.convert(mode)
    return F.pil_to_tensor(img)


def to_mode(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """``uint8`` ``C x H x W`` with C in 1/3 -> ``mode``: ``'L'`` by PIL's integer ITU-R 601 luma
    (``(19595 R + 38470 G + 7471 B + 2**15) >> 16``, bit-identical to ``Image.convert('L')``), ``'RGB'`` by
    replicating a grey channel (as PIL); None leaves it."""
    c = x.shape[-3]
    if mode == "L" and c == 3:
        w = x.to(torch.int32)
        y = (w[..., 0:1, :, :] * 19595 + w[..., 1:2, :, :] * 38470 + w[..., 2:3, :, :] * 7471 + 0x8000) >> 16
        return y.to(torch.uint8)
    if mode == "RGB" and c == 1:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return x


# ------------------------------------------------------------------------------------------------ transform
@dataclass(frozen=True)
class TensorPlan:
    """A model's eval transform as ops on ``uint8`` tensors: ``geometry`` (resize/center crop, per image,
    ``uint8`` in and out) then ``finish`` (to float in [0, 1], normalize; works on a batch). Picklable."""

    geometry: tuple[tuple, ...]  # ("resize", size, interpolation, max_size) | ("center_crop"[_floor], size)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8`` ``C x H x W`` -> ``uint8`` ``C x h x w`` (antialias on, as Pillow always is)."""
        for op in self.geometry:
            if op[0] == "resize":
                x = F.resize(x, op[1], interpolation=InterpolationMode(op[2]), max_size=op[3], antialias=True)
            elif op[0] == "center_crop_floor":  # Hugging Face processors: offsets rounded down
                from .transforms import FloorCenterCrop

                x = FloorCenterCrop(op[1])(x)
            else:
                x = F.center_crop(x, op[1])
        return x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8`` ``[B x] C x h x w`` -> ``float32`` ``x / 255``, normalized by the transform's mean/std."""
        x = F.to_dtype(x, torch.float32, scale=True)
        return F.normalize(x, list(self.mean), list(self.std)) if self.mean is not None else x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.resize_crop(x))

    def describe(self) -> list[str]:
        out = [f"resize({op[1]}, {op[2]}, antialias)" if op[0] == "resize" else f"{op[0]}({op[1]})"
               for op in self.geometry]
        return out + ["to_float/255"] + (["normalize"] if self.mean is not None else [])


def _size(s: Any) -> list[int]:
    return [int(s)] if isinstance(s, int) else [int(v) for v in s]


def _interp(x: Any) -> str:
    return str(getattr(x, "value", x))


def tensor_plan(transform: Callable) -> tuple[TensorPlan | None, str]:
    """Translate a PIL eval transform into a :class:`TensorPlan`; ``(None, reason)`` when a step has no exact
    tensor counterpart here (the caller then keeps the PIL transform)."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    from .transforms import FloorCenterCrop

    try:
        from torchvision.transforms._presets import ImageClassification
    except ImportError:  # private module moved: presets then stay on PIL
        ImageClassification = ()
    try:
        from timm.data.transforms import MaybeToTensor
    except ImportError:
        MaybeToTensor = ()

    steps = list(getattr(transform, "transforms", None) or [transform])
    geometry: list[tuple] = []
    mean = std = None
    stage = "uint8"
    for s in steps:
        name = type(s).__name__
        if ImageClassification and isinstance(s, ImageClassification):
            if stage != "uint8":
                return None, f"{name} after ToTensor"
            interp = _interp(s.interpolation)
            if interp not in _TENSOR_INTERP:
                return None, f"{name} interpolation {interp!r} (tensor resize matches Pillow only for {_TENSOR_INTERP})"
            geometry += [("resize", _size(s.resize_size), interp, None), ("center_crop", _size(s.crop_size))]
            mean, std, stage = tuple(s.mean), tuple(s.std), "done"
        elif isinstance(s, (T.Resize, v2.Resize)) and stage == "uint8":
            interp = _interp(s.interpolation)
            if interp not in _TENSOR_INTERP:
                return None, f"Resize interpolation {interp!r} (tensor resize matches Pillow only for {_TENSOR_INTERP})"
            geometry.append(("resize", _size(s.size), interp, s.max_size))
        elif isinstance(s, FloorCenterCrop) and stage == "uint8":
            geometry.append(("center_crop_floor", _size(s.size)))
        elif isinstance(s, (T.CenterCrop, v2.CenterCrop)) and stage == "uint8":
            geometry.append(("center_crop", _size(s.size)))
        elif isinstance(s, T.ToTensor) or (MaybeToTensor and isinstance(s, MaybeToTensor)):
            if stage != "uint8":
                return None, f"a second {name}"
            stage = "float"
        elif isinstance(s, (T.Normalize, v2.Normalize)) and stage == "float":
            mean, std, stage = tuple(float(v) for v in s.mean), tuple(float(v) for v in s.std), "done"
        else:
            return None, f"step {name} has no tensor counterpart here"
    if stage == "uint8":
        return None, "no ToTensor step"
    return TensorPlan(tuple(geometry), mean, std), ""


# ------------------------------------------------------------------------------------------------ registry
DECODERS: dict[str, str] = {}


def register_decoder(name: str, description: str) -> None:
    """Make ``name`` a valid ``decoder=`` choice of :func:`quantcore.data.eval_transform`."""
    DECODERS[name] = description


register_decoder("pil", "PIL decode + the model's PIL transform for every format (the reference)")
register_decoder("torchvision", "JPEG: torchvision.io.decode_jpeg (libjpeg-turbo) + the model's transform on the "
                 "uint8 tensor (torchvision.transforms.v2.functional); other formats, CMYK and files torchvision "
                 "refuses: PIL")


def resolve_decoder(decoder: str) -> str:
    """``'auto'`` -> ``'torchvision'`` when torchvision's image extension loads, else ``'pil'``; other
    names are checked against :data:`DECODERS` (``ValueError`` listing them)."""
    if decoder == "auto":
        try:
            from torchvision.io.image import _has_image_ops

            return "torchvision" if _has_image_ops() else "pil"
        except ImportError:
            return "pil"
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: choose one of {['auto', *DECODERS]}")
    return decoder


# ------------------------------------------------------------------------------------------------ batches
@dataclass
class Encoded:
    """One sample's encoded bytes (1-D ``uint8`` CPU tensor) and its location for messages."""

    data: torch.Tensor
    where: str


class KeepEncoded:
    """Dataset transform for :func:`device_loader`: samples stay encoded (workers only read bytes)."""

    def from_bytes(self, data: bytes, where: str) -> Encoded:
        return Encoded(as_uint8_tensor(data), where)

    def __call__(self, img: Any) -> Any:
        raise TypeError("KeepEncoded takes encoded bytes (from_bytes), not decoded images")


class BatchDecoder:
    """Decode a batch of encoded images on ``device`` and apply the model's eval transform there.

    ``transform``: an :class:`~quantcore.data.transforms.EvalTransform` whose steps translate to a
    :class:`TensorPlan` (else ``ValueError``). ``device='cuda'``: JPEGs go to nvJPEG in one call
    (``decode_jpeg(list, device='cuda')``); ``'cpu'``: the same call decodes them one by one with
    libjpeg-turbo. If the batched call fails (it returns nothing then), each JPEG is retried alone and
    the ones still refused go to PIL on the CPU, which decodes them or raises the PIL path's
    :class:`DataError`. ``counts`` tallies the decoder that produced each image (``torchvision``, ``pil``).
    A transform for a model that takes neither 1 nor 3 channels is refused (``UserError``), as per sample.
    """

    def __init__(self, transform: Any, device: Any = "cpu", skip_bad: bool = False) -> None:
        plan = getattr(transform, "plan", None)
        if plan is None:
            raise ValueError(f"transform {transform!r} has no tensor plan "
                             f"({getattr(transform, 'config', {}).get('decoder')}): use the per-sample loader")
        config = getattr(transform, "config", {})
        self.mode = config.get("mode")
        if self.mode is None:  # neither 1 nor 3 channels: refused here as on the per-sample path (from_bytes)
            from .transforms import _refuse_channels

            _refuse_channels(config)
        self.plan: TensorPlan = plan
        self.alpha = config.get("alpha", "drop")
        self.device = torch.device(device)
        self.skip_bad = skip_bad
        self.counts: Counter = Counter()

    def decode(self, items: Sequence[Encoded]) -> tuple[list[torch.Tensor | None], list[SkipRecord]]:
        """``uint8`` ``C x H x W`` tensors on the device in ``mode`` (None for a skipped item) and the skips."""
        out: list[torch.Tensor | None] = [None] * len(items)
        jpeg = [i for i, it in enumerate(items) if torchvision_can_decode(it.data)]
        if jpeg:
            try:
                decoded = _tv_decode_jpeg([items[i].data for i in jpeg], self.device)
            except (RuntimeError, ValueError):  # one bad file fails the whole call: find it
                decoded = []
                for i in jpeg:
                    try:
                        decoded.append(_tv_decode_jpeg(items[i].data, self.device))
                    except (RuntimeError, ValueError):
                        decoded.append(None)
            for i, x in zip(jpeg, decoded):
                if x is not None:
                    out[i] = to_mode(x, self.mode)
                    self.counts["torchvision"] += 1
        skipped: list[SkipRecord] = []
        for i, it in enumerate(items):
            if out[i] is not None:
                continue
            try:
                out[i] = pil_to_tensor(it.data, it.where, self.mode, self.alpha).to(self.device)
                self.counts["pil"] += 1
            except DataError as e:
                if not self.skip_bad:
                    raise
                skipped.append(SkipRecord(it.where, str(e)))
        return out, skipped

    def __call__(self, items: Sequence[Encoded]) -> tuple[torch.Tensor | None, list[int], list[SkipRecord]]:
        """``items`` -> ``(images B' x C x H x W float32 on the device or None, kept positions, skips)``."""
        decoded, skipped = self.decode(items)
        keep = [i for i, x in enumerate(decoded) if x is not None]
        if not keep:
            return None, keep, skipped
        batch = torch.stack([self.plan.resize_crop(decoded[i]) for i in keep])
        return self.plan.finish(batch), keep, skipped


def collate_encoded(batch: Sequence[Any]) -> tuple[list[Encoded] | None, torch.Tensor, list[SkipRecord]]:
    """``[(Encoded, label) | Skipped, ...]`` -> ``(items | None, labels, [SkipRecord, ...])``."""
    good = [b for b in batch if not isinstance(b, Skipped)]
    skipped = [b.record() for b in batch if isinstance(b, Skipped)]
    labels = torch.as_tensor([int(b[1]) for b in good], dtype=torch.long)
    return ([b[0] for b in good] or None), labels, skipped


class DeviceDecodeLoader:
    """Iterable over ``(images on device, labels, skipped_names)`` like :class:`SkipAwareLoader`; workers
    read encoded bytes, :class:`BatchDecoder` decodes and transforms each batch on ``device``. ``skipped``
    is the dataset's :class:`SkipLog` (read errors from workers and decode errors found here)."""

    def __init__(self, loader: Any, decoder: BatchDecoder, skipped: SkipLog) -> None:
        self.loader = loader
        self.decoder = decoder
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        carry: list[str] = []
        for items, labels, names in self.loader:  # SkipAwareLoader: already logged read errors
            bad: list[SkipRecord] = []
            images = None
            if items is not None:
                images, keep, bad = self.decoder(items)
                self.skipped.extend(bad)
                labels = labels[keep]
            names = carry + list(names) + [r.name for r in bad]
            if images is None:
                carry = names
                continue
            carry = []
            yield images, labels, names


def device_loader(dataset: Any, batch_size: int, device: Any = "cpu", num_workers: int = 0,
                  indices: Sequence[int] | None = None, **kw: Any) -> DeviceDecodeLoader:
    """Loader whose batches are decoded and transformed on ``device`` (nvJPEG for ``'cuda'``).

    ``dataset``: an :class:`~quantcore.data.base.ImageDataset` opened with ``eval_transform(model)``; it
    is copied with its transform replaced by :class:`KeepEncoded`, so it is left as it was. Other keyword
    arguments (``shuffle``, ``seed``, ``drop_last``, ``persistent_workers``, ...) go to
    :func:`quantcore.data.make_loader`. Yields ``(B x C x H x W float32 on device, labels (CPU), skipped names)``.
    """
    from torch.utils.data import Subset

    from .loader import make_loader

    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    decoder = BatchDecoder(base.transform, device, skip_bad=base.skip_bad)
    enc = copy.copy(base)  # shares samples/labels and the SkipLog; only the transform differs
    enc.transform = KeepEncoded()
    if base is not dataset:
        if indices is not None:
            raise ValueError("pass either a Subset or indices, not both")
        indices = _subset_indices(dataset)
    loader = make_loader(enc, batch_size, num_workers, indices, **kw)
    loader.loader.collate_fn = collate_encoded  # make_loader's settings, a collate that keeps the bytes
    return DeviceDecodeLoader(loader, decoder, base.skipped)


def _subset_indices(ds: Any) -> list[int]:
    from torch.utils.data import Subset

    idx = list(range(len(ds)))
    chain = []
    while isinstance(ds, Subset):
        chain.append(list(ds.indices))
        ds = ds.dataset
    for sub in chain:
        idx = [sub[i] for i in idx]
    return idx


__all__ = ["decode_to_tensor", "try_torchvision", "to_mode", "pil_to_tensor", "torchvision_can_decode",
           "TensorPlan", "tensor_plan", "DECODERS", "register_decoder", "resolve_decoder", "Encoded", "KeepEncoded",
           "BatchDecoder", "collate_encoded", "DeviceDecodeLoader", "device_loader", "MAX_LEVEL_DIFF",
           "MEAN_ABS_TOL", "FRAC_DIFFER_TOL"]
