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
kernel of another size, skips a head of another class count, ignores keys it has no place for and
flattens the (width, heads, head_dim) attention kernels, so another head count loads without a word. So
before loading, the archive is checked against the model completely: block count, hybrid units, head,
position embedding and patch kernel shapes, then every key timm's loader reads for this model must be
there with exactly the shape the model needs (attention kernels ``(width, num_heads, head_dim)``, MLP
widths, norms, hybrid convolutions; input channels are not adapted) and every other key under the
checkpoint's prefix (``pre_logits``, a stray ``encoderblock_0/extra/...``) is refused, because the loader
would drop it. Only the ``.npy`` headers are read for this (no tensor data). After loading every
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
    archive is exactly this architecture (every key the loader reads present with the model's shape, no
    other key); raises ModelError naming ``uri`` and the key/field."""
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
        shapes = _npz_shapes(npz, uri)
    _check_layout(model, shapes, uri, name)
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


def _npz_shapes(npz, uri: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of every array in the open archive, from the ``.npy`` headers only (a ViT-L
    archive is over a gigabyte); ModelError for a member that is not a plain numeric array."""
    import numpy as np

    from ..models import ModelError

    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    shapes: dict[str, tuple[int, ...]] = {}
    for key in npz.files:
        try:
            with npz.zip.open(key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                reader = readers.get(version)
                if reader is None:  # newer header format: let numpy read the array
                    arr = npz[key]
                    shape, dtype = arr.shape, arr.dtype
                else:
                    shape, _, dtype = reader(f)
        except Exception as err:  # truncated member, bad header
            raise ModelError(f"model.checkpoint {uri}: array {key!r} is not readable ({err})") from None
        if dtype.hasobject:
            raise ModelError(f"model.checkpoint {uri}: array {key!r} holds pickled Python objects, not numbers")
        shapes[key] = tuple(int(d) for d in shape)
    return shapes


def _hwio(w: torch.Tensor) -> tuple[int, ...]:
    """Flax kernel shape (H, W, in, out) of a torch conv weight (out, in, H, W)."""
    return (int(w.shape[2]), int(w.shape[3]), int(w.shape[1]), int(w.shape[0]))


def _vec(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _attn_shapes(out: dict, pre: str, attn: nn.Module, q: nn.Linear, proj: nn.Linear, what: str) -> None:
    """Flax MultiHeadDotProductAttention keys: query/key/value kernels (width, heads, head_dim), biases
    (heads, head_dim), out kernel (heads, head_dim, width); the head count is part of the shape."""
    heads, hd = int(attn.num_heads), int(attn.head_dim)
    hint = f"{what} has num_heads {heads} of head_dim {hd}"
    for n in ("query", "key", "value"):
        out[f"{pre}{n}/kernel"] = ([(int(q.in_features), heads, hd)], hint)
        out[f"{pre}{n}/bias"] = ([(heads, hd)], hint)
    out[f"{pre}out/kernel"] = ([(heads, hd, int(proj.out_features))], hint)
    out[f"{pre}out/bias"] = ([(int(proj.out_features),)], "")


def _mlp_shapes(out: dict, pre: str, mlp: nn.Module) -> None:
    for r, fc in enumerate((mlp.fc1, mlp.fc2)):
        hint = f"MLP {fc.in_features} -> {fc.out_features}"
        out[f"{pre}Dense_{r}/kernel"] = ([(int(fc.in_features), int(fc.out_features))], hint)
        out[f"{pre}Dense_{r}/bias"] = ([(int(fc.out_features),)], hint)


def _norm_shapes(out: dict, pre: str, norm: nn.Module, flat_ok: bool = False) -> None:
    c = int(norm.weight.shape[0])
    shapes = [(c,), (1, 1, 1, c)] if flat_ok else [(c,)]  # old ResNet archives keep (1, 1, 1, C) GroupNorm params
    out[f"{pre}scale"] = (shapes, "")
    out[f"{pre}bias"] = (shapes, "")


def expected_keys(model: nn.Module, rel: set[str], prefix: str = "") -> dict[str, tuple[list[tuple[int, ...]], str]]:
    """Every key (relative to the archive's prefix) timm's ``_load_weights`` reads for ``model``, with the
    shapes it must have for the model to come out exactly as built (``rel``: the archive's keys without
    ``prefix``, which together tell the vision_transformer, big_vision and scanned layouts apart, as timm
    does) and a hint naming the dimension."""
    big_vision = (prefix.startswith("params/") or "pos_embedding" in rel
                  or "Transformer/encoderblock/LayerNorm_0/scale" in rel)
    scan = "Transformer/encoderblock/LayerNorm_0/scale" in rel
    out: dict[str, tuple[list[tuple[int, ...]], str]] = {}
    pe = model.patch_embed
    out["embedding/kernel"] = ([_hwio(pe.proj.weight)], "patch size and width")
    out["embedding/bias"] = ([_vec(pe.proj.bias)], "")
    if getattr(model, "cls_token", None) is not None:
        out["cls"] = ([_vec(model.cls_token)], "")
    out["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = (
        [_vec(model.pos_embed)], "image size / patch grid")
    if hasattr(model.norm, "weight"):
        _norm_shapes(out, "Transformer/encoder_norm/", model.norm)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        out["head/kernel"] = ([(int(head.in_features), int(head.out_features))], "classes")
        out["head/bias"] = ([(int(head.out_features),)], "classes")
    backbone = getattr(pe, "backbone", None)
    if backbone is not None:
        stem = backbone.stem if hasattr(backbone, "stem") else backbone
        out["conv_root/kernel"] = ([_hwio(stem.conv.weight)], "stem")
        _norm_shapes(out, "gn_root/", stem.norm, flat_ok=True)
        for i, stage in enumerate(getattr(backbone, "stages", [])):
            for j, blk in enumerate(stage.blocks):
                bp = f"block{i + 1}/unit{j + 1}/"
                for r in (1, 2, 3):
                    out[f"{bp}conv{r}/kernel"] = ([_hwio(getattr(blk, f"conv{r}").weight)], "ResNet widths")
                    _norm_shapes(out, f"{bp}gn{r}/", getattr(blk, f"norm{r}"), flat_ok=True)
                if blk.downsample is not None:
                    out[f"{bp}conv_proj/kernel"] = ([_hwio(blk.downsample.conv.weight)], "ResNet widths")
                    _norm_shapes(out, f"{bp}gn_proj/", blk.downsample.norm, flat_ok=True)
    pool = getattr(model, "attn_pool", None)
    if pool is not None and hasattr(pool, "latent"):  # AttentionPoolLatent (MAP head)
        mp = "MAPHead_0/"
        out[f"{mp}probe"] = ([_vec(pool.latent)], "")
        _attn_shapes(out, f"{mp}MultiHeadDotProductAttention_0/", pool, pool.q, pool.proj, "the MAP head")
        _norm_shapes(out, f"{mp}LayerNorm_0/", pool.norm)
        _mlp_shapes(out, f"{mp}MlpBlock_0/", pool.mlp)
    mha, mlp_i, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    blocks: dict[str, tuple[list[tuple[int, ...]], str]] = {}
    for i, blk in enumerate(model.blocks.children()):
        one: dict[str, tuple[list[tuple[int, ...]], str]] = {}
        _norm_shapes(one, "LayerNorm_0/", blk.norm1)
        _attn_shapes(one, f"MultiHeadDotProductAttention_{mha}/", blk.attn, blk.attn.qkv, blk.attn.proj,
                     f"block {i}")
        _norm_shapes(one, f"LayerNorm_{ln2}/", blk.norm2)
        _mlp_shapes(one, f"MlpBlock_{mlp_i}/", blk.mlp)
        if scan:  # one stacked array per key, blocks along the first axis
            depth = len(model.blocks)
            for k, (shapes, hint) in one.items():
                blocks.setdefault(f"Transformer/encoderblock/{k}", ([(depth, *s) for s in shapes], hint))
        else:
            blocks.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in one.items()})
    out.update(blocks)
    return out


def _check_layout(model: nn.Module, shapes: dict[str, tuple[int, ...]], uri: str, name: str) -> None:
    from ..models import ModelError

    keys = set(shapes)
    p = next((p for p in _PREFIXES if f"{p}embedding/kernel" in keys), None)
    if p is None:
        raise ModelError(f"model.checkpoint {uri}: no 'embedding/kernel' key - not a Google ViT checkpoint "
                         f"(keys: {sorted(keys)[:5]})")
    where = f"model.checkpoint {uri}"
    rel = {k[len(p):] for k in keys if k.startswith(p)}
    shape = {k: shapes[p + k] for k in rel}

    # groups timm's loader has no place for would be dropped silently
    extra = sorted({k.split("/")[0] for k in rel} - _GROUPS - {"pos_embedding"}
                   - {g for g in (k.split("/")[0] for k in rel) if re.fullmatch(r"block\d+", g)}
                   - ({"MAPHead_0"} if getattr(model, "attn_pool", None) is not None else set()))
    if extra:
        raise ModelError(f"{where}: key groups {extra} have no place in timm's {name} (e.g. a pre_logits "
                         "representation layer); loading would drop them and change the logits")

    # encoder depth
    if "Transformer/encoderblock/LayerNorm_0/scale" in rel:  # big_vision scan layout: stacked blocks
        depth = int(shape["Transformer/encoderblock/LayerNorm_0/scale"][0])
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
    kshape = shape["embedding/kernel"]
    w = model.patch_embed.proj.weight
    if len(kshape) == 4 and (kshape[3], kshape[0], kshape[1]) != (w.shape[0], w.shape[2], w.shape[3]):
        kh, kw, _, dim = kshape
        raise ModelError(f"{where}: embedding/kernel is a {kh}x{kw} patch kernel of width {dim}, model.name {name} "
                         f"has {w.shape[2]}x{w.shape[3]} of width {w.shape[0]}")
    pos_key = "pos_embedding" if "pos_embedding" in rel else "Transformer/posembed_input/pos_embedding"
    if pos_key in rel and getattr(model, "pos_embed", None) is not None:
        got, want = shape[pos_key], tuple(model.pos_embed.shape)
        if got != want:
            raise ModelError(f"{where}: {pos_key} has shape {list(got)}, model.name {name} expects {list(want)} "
                             "(another image size or patch grid: set model.img_size / pick the architecture the "
                             "checkpoint was trained at; timm would resample it)")

    # classifier head
    head = getattr(model, "head", None)
    n_cls = head.out_features if isinstance(head, nn.Linear) else 0
    if "head/kernel" in rel:
        k = int(shape["head/kernel"][-1])
        if k != n_cls:
            raise ModelError(f"{where}: head/kernel has {k} classes, the model {n_cls}: set model.num_classes: {k}")
    elif n_cls:
        raise ModelError(f"{where} has no head/kernel (a feature extractor): set model.num_classes: 0, or use a "
                         "fine-tuned checkpoint")

    # everything else, key by key: timm flattens attention kernels (so another head count would load) and
    # adapts input channels, and it never looks at keys it has no use for
    want = expected_keys(model, rel, p)
    missing = [k for k in want if k not in rel]
    if missing:
        raise ModelError(f"model.checkpoint {uri}: key {p + missing[0]!r} missing - the archive is not a {name}"
                         f"{f' ({len(missing)} keys missing)' if len(missing) > 1 else ''}")
    for k, (ok, hint) in want.items():
        if shape[k] not in ok:
            why = f" ({hint})" if hint else ""
            if k.endswith(("query/kernel", "key/kernel", "value/kernel")) and len(shape[k]) >= 3:
                why += (f"; the archive has {shape[k][-2]} heads of {shape[k][-1]}: set model.kwargs.num_heads / "
                        "pick the architecture it was trained as")
            raise ModelError(f"{where} does not fit {name}: {p + k} has shape {list(shape[k])}, the model needs "
                             f"{list(ok[0])}{why}")
    unread = sorted(rel - set(want))
    if unread:
        raise ModelError(f"{where}: keys {[p + k for k in unread[:5]]}{' ...' if len(unread) > 5 else ''} are not "
                         f"read by timm's loader for {name}; loading would drop them and change the model")


register_source(NpzSource())
