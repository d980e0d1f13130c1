"""The model zoo quantcore is checked on: timm, torchvision and Hugging Face classifiers built with
random weights at small input sizes (no hub), plus the checks each one must pass.

Used by ``tests/test_model_zoo.py`` (the acceptance) and ``scripts/model_zoo.py`` (writes
``docs/model-zoo.md``). Random init is made realistic first (:func:`realistic_init`): zero-initialised
heads, residual-branch BatchNorms (LeViT, EfficientNet ``zero_init_last``) and LayerScales would
otherwise make whole branches contribute nothing, so their quantizers could not be seen to act.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

#: W8A8 logit SQNR floor (dB) for max, percentile, mse and tf_enhanced. 8-bit uniform quantization of
#: a tensor whose range fits its data gives ~40 dB per tensor, and errors from tens of quantized layers
#: add up to 20-35 dB at the logits of these random-weight models. A broken placement or range (a
#: quantizer on the wrong axis, a calibrator clipping at 1/12 of the data as the old entropy search
#: did on zero-heavy activations, a dead quantizer letting another collapse) costs most of the signal
#: and lands below 10 dB.
SQNR_FLOOR_DB = 12.0
#: Entropy (TensorRT's KL) clips tails by design; on softmax probabilities of these random-weight
#: ViTs it keeps ~1/8 of the range (PiT: 0.023 of 0.17, the same as ModelOpt's entropy on the same
#: activations), which no calibrator bug explains. So entropy is held to the reference instead: its
#: SQNR must be within ENTROPY_REFERENCE_TOL_DB of the model calibrated with ModelOpt's entropy
#: ranges on the same activations, and above a floor a broken placement cannot reach either.
ENTROPY_FLOOR_DB = 0.0  # below SQNR_FLOOR_DB, entropy must match the reference (see run_entry)
ENTROPY_REFERENCE_TOL_DB = 1.0
CALIBRATORS = ("max", "percentile", "mse", "entropy", "tf_enhanced")


@dataclass(frozen=True)
class ZooModel:
    name: str  # "<library>:<architecture>"
    build: Callable[[], nn.Module]
    size: int  # input height = width


def _timm(arch: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, **kw)

    return build


def _bit_one_block_per_stage() -> nn.Module:
    from timm.models.resnetv2 import _create_resnetv2_bit

    return _create_resnetv2_bit("resnetv2_50x1_bit", pretrained=False, layers=[1, 1, 1, 1], width_factor=1)


def _tv(arch: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, **kw)

    return build


def _tv_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=48, mlp_dim=96,
                             num_classes=10)


def _tv_swin() -> nn.Module:
    from torchvision.models import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10)


def _hf(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as T

        small = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=96, num_labels=10,
                     # HF's 0.02 init makes q.k ~ 0: softmax is uniform and k/q quantizers cannot act.
                     initializer_range=0.2)
        if kind == "vit":
            return T.ViTForImageClassification(T.ViTConfig(**small, attn_implementation="eager"))
        if kind == "vit_sdpa":
            return T.ViTForImageClassification(T.ViTConfig(**small, attn_implementation="sdpa"))
        if kind == "deit":
            return T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**small))
        if kind == "beit":
            return T.BeitForImageClassification(T.BeitConfig(**small, use_relative_position_bias=True))
        if kind == "mobilevit":
            return T.MobileViTForImageClassification(T.MobileViTConfig(
                image_size=96, num_channels=3, hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                num_attention_heads=2, num_labels=10, initializer_range=0.2))
        if kind == "swin":
            return T.SwinForImageClassification(T.SwinConfig(
                image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                window_size=4, num_labels=10, initializer_range=0.2))
        if kind == "convnext":
            return T.ConvNextForImageClassification(T.ConvNextConfig(
                num_channels=3, hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 1, 1], num_labels=10, initializer_range=0.2))
        raise KeyError(kind)

    return build


ZOO: list[ZooModel] = [
    # timm transformers
    ZooModel("timm:vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32),
    ZooModel("timm:deit_tiny_patch16_224", _timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32),
    ZooModel("timm:deit_tiny_distilled_patch16_224",
             _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2), 32),
    ZooModel("timm:swin_tiny_patch4_window7_224",
             _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=4, depths=(1, 1, 1, 1)), 64),
    ZooModel("timm:eva02_tiny_patch14_224", _timm("eva02_tiny_patch14_224", img_size=28, depth=2), 28),
    ZooModel("timm:beit_base_patch16_224",
             _timm("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2), 32),
    ZooModel("timm:cait_xxs24_224", _timm("cait_xxs24_224", img_size=32, patch_size=8, depth=2), 32),
    ZooModel("timm:xcit_nano_12_p16_224", _timm("xcit_nano_12_p16_224", img_size=32, depth=2), 32),
    ZooModel("timm:vit_tiny_r_s16_p8_224", _timm("vit_tiny_r_s16_p8_224", img_size=64, depth=2), 64),
    # Large enough that the last stage attends over more than one token (softmax over one key is
    # constant: its q/k quantizers could not act).
    ZooModel("timm:levit_128s", _timm("levit_128s", img_size=160), 160),
    ZooModel("timm:pit_ti_224", _timm("pit_ti_224", img_size=64), 64),
    ZooModel("timm:coat_lite_tiny", _timm("coat_lite_tiny", img_size=64), 64),
    ZooModel("timm:twins_svt_small", _timm("twins_svt_small", img_size=64, depths=(1, 1, 1, 1)), 64),
    # timm conv nets / hybrids / MLPs
    ZooModel("timm:mobilevit_xxs", _timm("mobilevit_xxs"), 128),
    ZooModel("timm:mobilevitv2_050", _timm("mobilevitv2_050"), 64),
    ZooModel("timm:convnext_atto", _timm("convnext_atto"), 64),
    ZooModel("timm:efficientnet_b0", _timm("efficientnet_b0"), 64),
    ZooModel("timm:tf_efficientnet_b0", _timm("tf_efficientnet_b0"), 64),
    ZooModel("timm:mobilenetv3_small_050", _timm("mobilenetv3_small_050"), 64),
    ZooModel("timm:tf_mobilenetv3_small_minimal_100", _timm("tf_mobilenetv3_small_minimal_100"), 64),
    ZooModel("timm:regnetx_002", _timm("regnetx_002"), 64),
    ZooModel("timm:resnet18", _timm("resnet18"), 64),
    ZooModel("timm:resnext26ts", _timm("resnext26ts"), 64),
    # One block per stage: a random-weight 50-layer pre-activation net is chaotic (one 8-bit input
    # quantizer on the stem alone costs 30 dB), which says nothing about quantization.
    ZooModel("timm:resnetv2_50x1_bit", _bit_one_block_per_stage, 64),
    ZooModel("timm:densenet121", _timm("densenet121"), 64),
    ZooModel("timm:inception_v3", _timm("inception_v3"), 96),
    ZooModel("timm:poolformer_s12", _timm("poolformer_s12"), 64),
    ZooModel("timm:ghostnet_100", _timm("ghostnet_100"), 64),
    ZooModel("timm:mixer_s16_224", _timm("mixer_s16_224", img_size=64), 64),
    ZooModel("timm:resmlp_12_224", _timm("resmlp_12_224", img_size=64), 64),
    ZooModel("timm:edgenext_xx_small", _timm("edgenext_xx_small"), 64),
    ZooModel("timm:dla34", _timm("dla34"), 64),
    ZooModel("timm:repvgg_a0", _timm("repvgg_a0"), 64),
    ZooModel("timm:rexnet_100", _timm("rexnet_100"), 64),
    ZooModel("timm:fastvit_t8", _timm("fastvit_t8"), 64),
    ZooModel("timm:efficientvit_b0", _timm("efficientvit_b0"), 64),
    # relative-position logits q @ rel_k^T (quantized as a GEMM); MaxViT TF attention (bias-table einsums in
    # its own forward: skipped as constants, the attention quantized)
    ZooModel("timm:botnet26t_256", _timm("botnet26t_256", img_size=64), 64),
    ZooModel("timm:maxvit_tiny_tf_224", _timm("maxvit_tiny_tf_224", img_size=64, depths=(1, 1, 1, 1)), 64),
    # torchvision
    ZooModel("torchvision:resnet18", _tv("resnet18"), 64),
    ZooModel("torchvision:resnext50_32x4d", _tv("resnext50_32x4d"), 64),
    ZooModel("torchvision:mobilenet_v3_small", _tv("mobilenet_v3_small"), 64),
    ZooModel("torchvision:mobilenet_v2", _tv("mobilenet_v2"), 64),  # ReLU6: Clip nodes in the export
    ZooModel("torchvision:efficientnet_b0", _tv("efficientnet_b0"), 64),
    ZooModel("torchvision:regnet_y_400mf", _tv("regnet_y_400mf"), 64),
    ZooModel("torchvision:densenet121", _tv("densenet121"), 64),
    ZooModel("torchvision:shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), 64),
    ZooModel("torchvision:mnasnet0_5", _tv("mnasnet0_5"), 64),
    ZooModel("torchvision:googlenet", _tv("googlenet", aux_logits=False, init_weights=True), 64),
    ZooModel("torchvision:squeezenet1_1", _tv("squeezenet1_1"), 64),
    ZooModel("torchvision:convnext_tiny", _tv("convnext_tiny"), 64),
    ZooModel("torchvision:vit (MultiheadAttention)", _tv_vit, 32),
    ZooModel("torchvision:swin (shifted windows)", _tv_swin, 32),
    # Hugging Face transformers, built from a config
    ZooModel("hf:ViTForImageClassification (eager)", _hf("vit"), 32),
    ZooModel("hf:ViTForImageClassification (sdpa)", _hf("vit_sdpa"), 32),
    ZooModel("hf:DeiTForImageClassificationWithTeacher", _hf("deit"), 32),
    ZooModel("hf:BeitForImageClassification", _hf("beit"), 32),
    ZooModel("hf:MobileViTForImageClassification", _hf("mobilevit"), 96),
    ZooModel("hf:SwinForImageClassification", _hf("swin"), 32),
    ZooModel("hf:ConvNextForImageClassification", _hf("convnext"), 32),
]


@torch.no_grad()
def realistic_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking statistics for random weights: BatchNorm scale/shift/running stats spread
    around their usual values, and every all-zero or all-constant parameter (zero-init heads,
    residual BNs, LayerScale) given small random values."""
    g = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(t.shape, generator=g) * (hi - lo) + lo).to(t.dtype)

    for mod in model.modules():
        if isinstance(mod, _BatchNorm) or type(mod).__name__ == "FrozenBatchNorm2d":
            if getattr(mod, "weight", None) is not None:
                mod.weight.copy_(rand(mod.weight, 0.5, 1.5))
                mod.bias.copy_(rand(mod.bias, -0.2, 0.2))
            if getattr(mod, "running_mean", None) is not None:
                mod.running_mean.copy_(rand(mod.running_mean, -0.2, 0.2))
                mod.running_var.copy_(rand(mod.running_var, 0.5, 1.5))
    for mod in model.modules():
        # timm/HF init Linear weights with std 0.02 whatever the width: attention logits ~0 and a
        # uniform softmax hide q/k quantization in float rounding. Trained weights are closer to
        # 1/sqrt(fan_in).
        if isinstance(mod, nn.Linear) and mod.weight.numel() > 1:
            want = 1.0 / math.sqrt(mod.in_features)
            std = float(mod.weight.std())
            if 0 < std < 0.5 * want:
                mod.weight.mul_(want / std)
    for name, p in model.named_parameters():
        if p.numel() <= 1 or not bool((p == p.reshape(-1)[0]).all()):
            continue
        v = abs(float(p.reshape(-1)[0]))
        if v == 0.0:  # zero-init head / bias / residual branch
            fan = p.shape[1] if p.dim() > 1 else p.shape[0]
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) / math.sqrt(max(fan, 1)))
        elif v < 0.2:  # LayerScale-style init (CaiT 1e-5, BEiT 0.1): branches would barely count
            p.copy_(rand(p, 0.3, 1.0))
    return model


def images(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth, image-like normalized inputs: low-resolution noise upsampled (spatially correlated,
    like photos) plus fine detail, about zero-mean / unit-std per channel as after ImageNet
    normalization."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.25 * torch.randn(n, channels, size, size, generator=g)
    return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)


def logits(out) -> torch.Tensor:
    from quantcore.models import output_logits

    return output_logits(out)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = (test - ref).pow(2).mean()
    return float(10 * torch.log10(ref.pow(2).mean() / noise)) if noise > 0 else math.inf


def build(entry: ZooModel) -> nn.Module:
    torch.manual_seed(0)
    return realistic_init(entry.build().eval())


def recipe_for(calibrator: str) -> dict:
    return {"name": f"zoo_w8a8_{calibrator}", "model": {"name": "zoo"},
            "placement": {"family": "auto"},
            "quant": {"weights": {"bits": 8, "symmetric": True, "per_channel": True},
                      "activations": {"bits": 8, "symmetric": True}},
            "calibration": {"method": calibrator, "num_batches": 1, "batch_size": 4}}


def layer_modules(model: nn.Module) -> list[str]:
    """Names of every Linear/Conv module (what must be quantized or listed float)."""
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, _ConvNd))]


def attention_modules(model: nn.Module) -> list[str]:
    """Names of modules whose class says they are attention (independent of how quantcore finds it)."""
    out = []
    for n, m in model.named_modules():
        cls = type(m).__name__
        if n and ("Attention" in cls or "Attn" in cls) and not isinstance(m, (nn.Linear, _ConvNd)):
            out.append(n)
    return out


def _close(a: torch.Tensor, b: torch.Tensor, folded: bool) -> tuple[bool, float]:
    if torch.equal(a, b):
        return True, 0.0
    rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    return folded and rel <= 1e-5, rel


def _with_calibrator(model: nn.Module, calibrator: str) -> nn.Module:
    """A copy of a prepared model whose activation quantizers use ``calibrator``."""
    import quantcore

    clone = copy.deepcopy(model)
    for q in quantcore.quantizers(clone).values():
        if q.kind == "activation":
            q.set_spec(q.spec.model_copy(update={"calibrator": calibrator}))
            q.reset_range()
    return clone


def _lossless(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Quantizers that run and return their input unchanged (e.g. a per-channel weight quantizer of
    a 1x1 depthwise conv: one value per channel, represented exactly by its scale)."""
    import quantcore

    seen: dict[str, list[bool]] = {}
    hooks = []
    for name, q in quantcore.quantizers(model).items():
        def hook(mod, inp, outp, name=name):
            # 1-ulp differences: dividing by the scale and multiplying back is not bit-exact
            seen.setdefault(name, []).append(torch.allclose(inp[0], outp, rtol=1e-6, atol=0.0))
        hooks.append(q.register_forward_hook(hook))
    model(x)
    for h in hooks:
        h.remove()
    return {n for n, v in seen.items() if all(v)}


def _acts(model: nn.Module, q, x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether toggling quantizer ``q`` alone changes the logits: at its calibrated 8 bits, else at
    2 bits with the same range (a saturated gate can hide 8-bit rounding)."""
    q.quantize = False
    changed = not torch.equal(logits(model(x)).float(), out)
    q.quantize = True
    if changed or q.spec.is_float:
        return changed
    spec = q.spec
    amin, amax = q.amin.clone(), q.amax.clone()
    q.set_spec(spec.model_copy(update={"bits": 2}))
    q.amin, q.amax = amin, amax
    changed = not torch.equal(logits(model(x)).float(), out)
    q.set_spec(spec)
    q.amin, q.amax = amin, amax
    return changed


def _record_activations(model: nn.Module) -> tuple[dict[str, list[torch.Tensor]], list]:
    import quantcore

    data: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, q in quantcore.quantizers(model).items():
        if q.kind == "activation":
            hooks.append(q.register_forward_hook(
                lambda mod, inp, out, name=name: data.setdefault(name, []).append(inp[0].detach().reshape(-1).clone())))
    return data, hooks


def _reference_entropy_sqnr(model: nn.Module, data: dict[str, list[torch.Tensor]], x_eval: torch.Tensor,
                            ref: torch.Tensor) -> float:
    """Logit SQNR with every activation range set by the TensorRT/ModelOpt KL reference
    (``test_calibrator_reference._ref_entropy``, itself checked against ModelOpt's
    ``_compute_amax_entropy``) on the raw activations our quantizers saw."""
    import quantcore
    from test_calibrator_reference import _ref_entropy, _ref_hist

    clone = copy.deepcopy(model)
    qs = quantcore.quantizers(clone)
    for name, parts in data.items():
        q = qs[name]
        x = torch.cat(parts).float()
        if not bool((x != 0).any()):
            continue
        hist, edges = _ref_hist(x, q.bins)
        try:
            with np.errstate(all="ignore"):  # empty bins: KL terms the reference treats as inf
                amax, _ = _ref_entropy(hist, edges, q.spec.bits)
        except ValueError:  # every KL undefined (a handful of distinct values): keep our range
            continue
        q.set_range(-amax, amax)
    return sqnr_db(ref, logits(clone(x_eval)).float())


def _grid_values(o: torch.Tensor) -> int:
    """Distinct values of ``o``, or of its most varied channel along the last two axes, whichever is
    fewer: a per-channel quantized weight (BoTNet's rel_k, per position) holds at most 256 per channel."""
    n = int(o.unique().numel())
    if n <= 256 or o.dim() < 2:
        return n
    return min(n, *(max(int(c.unique().numel()) for c in o.movedim(ax, 0)) for ax in (-1, -2)))


def _float_attention_operands(model: nn.Module, attention: list[str], x: torch.Tensor) -> list[str]:
    """Independent of the placement's own records: run the calibrated model and spy on every
    activation x activation matmul (matmul/bmm/baddbmm/einsum) inside the modules the placement says
    it quantized as attention; an operand with more distinct values than an 8-bit per-tensor grid
    holds reached the GEMM float. Returns ``"module: op operand i (N values)"`` for each."""
    mods = dict(model.named_modules())
    owners = {id(mods[n]): n for n in attention if n in mods}
    stack: list[str] = []
    found: list[str] = []

    def pre(mod, args):
        stack.append(owners[id(mod)])

    def post(mod, args, out):
        stack.pop()

    hooks = [mods[n].register_forward_pre_hook(pre) for n in owners.values()]
    hooks += [mods[n].register_forward_hook(post) for n in owners.values()]
    names = {"matmul", "__matmul__", "bmm", "baddbmm", "einsum"}

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            fname = getattr(func, "__name__", "")
            if stack and fname in names:
                ops = [a for a in (args[1] if fname == "einsum" and len(args) > 1 and isinstance(args[1], (list, tuple))
                                   else args[1:] if fname == "einsum" else args)
                       if isinstance(a, torch.Tensor)]
                ops = ops[-2:] if fname == "baddbmm" else ops[:2]
                if len(ops) == 2 and not any(isinstance(o, nn.Parameter) for o in ops):
                    for i, o in enumerate(ops):
                        n = _grid_values(o.detach())
                        if n > 256 and o.numel() > 256:
                            found.append(f"{stack[-1]}: {fname} operand {i} ({n} values)")
            return out

    try:
        with Spy():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return found


@torch.no_grad()
def run_entry(entry: ZooModel, calibrators=CALIBRATORS, dead_check: bool = True) -> dict:
    """Prepare ``entry`` once (W8A8), calibrate it with every calibrator and measure what the zoo
    table reports."""
    import quantcore

    fp32 = build(entry)
    x_cal, x_eval = images(4, entry.size, seed=0), images(4, entry.size, seed=1)
    ref = logits(fp32(x_eval)).float()
    row: dict = {"name": entry.name, "sqnr": {}, "fp32_match": [], "dead": [], "unlisted": [],
                 "unlisted_attention": []}
    prepared = quantcore.prepare(copy.deepcopy(fp32), recipe_for(calibrators[0]), example_input=x_cal[:2])
    pl = prepared.quantcore_placement
    folded = bool(pl.folded_bn)
    ok, rel = _close(logits(prepared(x_eval)).float(), ref, folded)
    row["fp32_match"].append(("prepared", ok, rel))
    qs = quantcore.quantizers(prepared)
    row.update(family=pl.family, quantizers=len(qs), attention=len(pl.attention), folded_bn=len(pl.folded_bn),
               unfolded_bn=dict(pl.unfolded_bn), float_reasons=dict(pl.float_reasons))
    owners = {n.rpartition(".")[0] for n in qs}
    listed = set(pl.float_reasons)
    row["unlisted"] = [n for n in layer_modules(prepared) if n not in owners and n not in listed]
    covered = set(pl.attention) | listed
    row["unlisted_attention"] = [n for n in attention_modules(prepared)
                                 if not any(c == n or c.startswith(n + ".") for c in covered)]
    for i, cal in enumerate(calibrators):
        model = prepared if i == 0 else _with_calibrator(prepared, cal)
        raw = _record_activations(model) if cal == "entropy" else None
        quantcore.calibrate(model, [x_cal])
        if raw is not None:
            for h in raw[1]:
                h.remove()
        with quantcore.quantization_disabled(model):
            ok, rel = _close(logits(model(x_eval)).float(), ref, folded)
        row["fp32_match"].append((f"{cal}, quantization off", ok, rel))
        out = logits(model(x_eval)).float()
        row["sqnr"][cal] = sqnr_db(ref, out)
        if raw is not None and row["sqnr"][cal] < SQNR_FLOOR_DB:
            # Below the general floor: it must be the algorithm's clipping, not ours.
            row["sqnr_entropy_reference"] = _reference_entropy_sqnr(model, raw[0], x_eval, ref)
        if i == 0:
            row["float_attention_operands"] = _float_attention_operands(model, list(pl.attention), x_eval[:2])
        if i == 0 and dead_check:  # on two images: half the cost, the same verdicts
            x2 = x_eval[:2]
            out2 = logits(model(x2)).float()
            exact = _lossless(model, x2)
            row["lossless"] = sorted(exact)
            row["dead"] = [n for n, q in quantcore.quantizers(model).items()
                           if n not in exact and not _acts(model, q, x2, out2)]
    return row
