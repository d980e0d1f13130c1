"""Source ``npz``: Google's ViT ``.npz`` checkpoints (google-research/vision_transformer, the files
FasterTransformer's ViT reads), plain ViT and R50+ViT hybrids.

``model.name`` names the architecture (a timm name such as ``vit_base_patch16_224``/``_384``,
``vit_large_patch16_384``, ``vit_base_r50_s16_384``, or a quantcore builder returning a timm
``VisionTransformer``); ``model.checkpoint`` is the ``.npz`` (local or s3://; ``source: auto`` picks this
source for a ``.npz`` checkpoint). Weights go in through timm's own loader
(``VisionTransformer.load_pretrained`` = ``timm.models.vision_transformer._load_weights``, which also
reads the hybrid's ResNet-v2 root and units). Preprocessing is timm's config for that architecture
(mean/std 0.5 for these checkpoints).

timm's loader is lenient where quantization must not be: it resamples a position embedding or patch
kernel of another size, skips a head of another class count and ignores keys it has no place for. So
before loading, the archive is checked against the model (block count, hybrid units, head, position
embedding and patch kernel shapes, no unread groups such as ``pre_logits``), and after loading every
parameter must have been written (parameters are NaN-filled first). Each refusal is a ModelError naming
the file and the key or recipe field.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Iterator

import torch
from torch import nn

from . import ModelSource, register_source

_PREFIXES = ("", "opt/target/", "params/", "params/img/")
_GROUPS = {"embedding", "cls", "Transformer", "head", "conv_root", "gn_root"}


class NpzSource(ModelSource):
    name = "npz"
    priority = 5
    consumes_checkpoint = True

    def claims(self, cfg, name: str) -> bool:
        return bool(cfg.checkpoint) and cfg.checkpoint.lower().endswith(".npz")

    def build(self, cfg, name: str, load_weights: bool) -> tuple[nn.Module, str | None]:
        from ..models import BUILDERS, ModelError
        from . import SOURCES

        arch_cfg = cfg.model_copy(update={"checkpoint": None, "pretrained": False, "pretrained_file": None})
        model, _ = SOURCES.get("builder" if name in BUILDERS else "timm").build(arch_cfg, name, load_weights=False)
        if not load_weights:
            return model, None
        if not cfg.checkpoint:
            raise ModelError("model.checkpoint: source npz loads a Google ViT .npz file, and none is given")
        with _local_file(cfg.checkpoint) as path:
            load_npz(model, path, cfg.checkpoint, name)
        return model, f"model.checkpoint {cfg.checkpoint} (Google ViT .npz, timm loader)"


@contextlib.contextmanager
def _local_file(uri: str) -> Iterator[str]:
    from ..io import storage
    from ..models import ModelError

    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        if not os.path.isfile(path):
            raise ModelError(f"model.checkpoint {uri}: not found")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="quantcore-npz-") as tmp:
        path = os.path.join(tmp, "checkpoint.npz")
        try:
            storage.download_file(uri, path)
        except FileNotFoundError:
            raise ModelError(f"model.checkpoint {uri}: not found") from None
        yield path


def load_npz(model: nn.Module, path: str, uri: str, name: str) -> None:
    """Load the Google-layout ``.npz`` at local ``path`` (``uri`` for messages) into the timm
    ``VisionTransformer`` ``model`` (built as ``name``) with timm's loader, after checking that the
    archive is exactly this architecture; raises ModelError naming ``uri`` and the key/field."""
    import numpy as np

    from ..models import ModelError

    if not all(hasattr(model, a) for a in ("blocks", "patch_embed", "pos_embed", "load_pretrained")):
        raise ModelError(f"model.name {name}: timm's .npz loader reads into VisionTransformer models (ViT, "
                         f"R50+ViT hybrids); {type(model).__name__} is not one")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ModelError(f"model.checkpoint {uri}: not a readable .npz archive ({err})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ModelError(f"model.checkpoint {uri}: a single .npy array, not a keyed .npz archive")
    with npz:
        _check_layout(model, npz, uri, name)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    try:
        model.load_pretrained(path)
    except KeyError as err:  # numpy says "<key> is not a file in the archive"
        key = str(err.args[0] if err.args else err).removesuffix(" is not a file in the archive")
        raise ModelError(f"model.checkpoint {uri}: key {key!r} missing - the archive is not a {name}") from None
    except (RuntimeError, ValueError) as err:
        msg = " ".join(str(err).split())[:300]
        raise ModelError(f"model.checkpoint {uri} does not fit {name}: {msg}") from None
    unset = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
    if unset:
        raise ModelError(f"model.checkpoint {uri}: timm's loader left {len(unset)} parameters of {name} unset "
                         f"({unset[:5]}{' ...' if len(unset) > 5 else ''}) - not this architecture's checkpoint")


def _check_layout(model: nn.Module, npz, uri: str, name: str) -> None:
    from ..models import ModelError

    keys = set(npz.files)
    p = next((p for p in _PREFIXES if f"{p}embedding/kernel" in keys), None)
    if p is None:
        raise ModelError(f"model.checkpoint {uri}: no 'embedding/kernel' key - not a Google ViT checkpoint "
                         f"(keys: {sorted(keys)[:5]})")
    where = f"model.checkpoint {uri}"
    rel = {k[len(p):] for k in keys if k.startswith(p)}

    # groups timm's loader has no place for would be dropped silently
    extra = sorted({k.split("/")[0] for k in rel} - _GROUPS
                   - {g for g in (k.split("/")[0] for k in rel) if re.fullmatch(r"block\d+", g)}
                   - ({"MAPHead_0"} if getattr(model, "attn_pool", None) is not None else set()))
    if extra:
        raise ModelError(f"{where}: key groups {extra} have no place in timm's {name} (e.g. a pre_logits "
                         "representation layer); loading would drop them and change the logits")

    # encoder depth
    if "Transformer/encoderblock/LayerNorm_0/scale" in rel:  # big_vision scan layout: stacked blocks
        depth = int(npz[f"{p}Transformer/encoderblock/LayerNorm_0/scale"].shape[0])
    else:
        idx = {int(m.group(1)) for k in rel if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
        depth = max(idx) + 1 if idx else 0
    if depth != len(model.blocks):
        raise ModelError(f"{where} has {depth} encoder blocks (Transformer/encoderblock_*), model.name {name} "
                         f"has {len(model.blocks)}: not this architecture's checkpoint")

    # hybrid backbone: same kind, same units per stage
    backbone = getattr(model.patch_embed, "backbone", None)
    npz_hybrid = "conv_root/kernel" in rel
    if npz_hybrid != (backbone is not None):
        kind = "an R50+ViT hybrid (conv_root/...)" if npz_hybrid else "a plain ViT (no conv_root/kernel)"
        raise ModelError(f"{where} is {kind} checkpoint but model.name {name} is "
                         f"{'a hybrid' if backbone is not None else 'a plain ViT'}")
    if backbone is not None:
        npz_units = {(int(m.group(1)), int(m.group(2))) for k in rel
                     if (m := re.match(r"block(\d+)/unit(\d+)/", k))}
        model_units = {(i + 1, j + 1) for i, st in enumerate(getattr(backbone, "stages", []))
                       for j, _ in enumerate(st.blocks)}
        if npz_units != model_units:
            def per_stage(units):
                return [sum(1 for s, _ in units if s == i) for i in range(1, 1 + max((s for s, _ in units), default=0))]
            raise ModelError(f"{where}: ResNet units per stage {per_stage(npz_units)} (block*/unit*), model.name "
                             f"{name} has {per_stage(model_units)}")

    # patch kernel (HWIO) and position embedding: timm would resample other sizes, changing the model
    kh, kw, _, dim = npz[f"{p}embedding/kernel"].shape
    w = model.patch_embed.proj.weight
    if (int(dim), int(kh), int(kw)) != (w.shape[0], w.shape[2], w.shape[3]):
        raise ModelError(f"{where}: embedding/kernel is a {kh}x{kw} patch kernel of width {dim}, model.name {name} "
                         f"has {w.shape[2]}x{w.shape[3]} of width {w.shape[0]}")
    pos_key = "pos_embedding" if "pos_embedding" in rel else "Transformer/posembed_input/pos_embedding"
    if pos_key in rel and getattr(model, "pos_embed", None) is not None:
        got, want = tuple(npz[p + pos_key].shape), tuple(model.pos_embed.shape)
        if got != want:
            raise ModelError(f"{where}: {pos_key} has shape {list(got)}, model.name {name} expects {list(want)} "
                             "(another image size or patch grid: set model.img_size / pick the architecture the "
                             "checkpoint was trained at; timm would resample it)")

    # classifier head
    head = getattr(model, "head", None)
    n_cls = head.out_features if isinstance(head, nn.Linear) else 0
    if "head/kernel" in rel:
        k = int(npz[f"{p}head/kernel"].shape[-1])
        if k != n_cls:
            raise ModelError(f"{where}: head/kernel has {k} classes, the model {n_cls}: set model.num_classes: {k}")
    elif n_cls:
        raise ModelError(f"{where} has no head/kernel (a feature extractor): set model.num_classes: 0, or use a "
                         "fine-tuned checkpoint")


register_source(NpzSource())
