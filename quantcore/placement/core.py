"""``place_quantizers``: put TensorQuantizers into a float model, in place.

The plan comes from what the model computes on an example input (:mod:`.probe`), not from class
names: every ``F.linear``/``F.conv*`` op gets input/weight quantizers on the module that owns the
weight (or on the calling module when the weight is computed in forward), every
``softmax(q k^T) v`` (fused or explicit, timm / torchvision / Hugging Face alike) gets attention
quantizers on the module whose forward computes it, and every Linear/Conv/attention that gets none is
listed in :attr:`PlacementResult.float_reasons` with the reason. Modules are never replaced (except
timm ``Block`` for ``quantize_residual``): the ops are intercepted (:mod:`.intercept`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.parametrize import is_parametrized

from ..config import Override, PlacementConfig
from ..errors import PlacementError
from ..fold import FoldError, fold_batchnorm, is_batchnorm
from ..formats import QuantSpec
from ..nn.residual import RESIDUAL_QUANTIZERS, QuantResidualBlock, check_block, is_timm_block
from ..quantizer import TensorQuantizer
from .families import FamilyFacts, detect, family_names, family_plan
from .generic import module_refs, set_module
from .intercept import ATTENTION_QUANTIZERS, ModulePlan, WeightedSite, _apply, install_hooks
from .overrides import (apply_quantizer_rules, build_rules, check_all_matched, decide_float, mark_module_hits,
                        matches, module_aliases)
from .probe import PASS_THROUGH, OpEvent, Trace, input_dependent_weights, run_probe
from .vit import block_weight_spec, mode_settings

ROOT_INPUT_QUANTIZER = "input_quantizer"
_ATTN_OPTIONS = ("mode", "quantize_softmax_input", "quantize_gemm_output", "share_qkv_range")


@dataclass
class PlacementResult:
    """What :func:`place_quantizers` did (also stored as ``model.quantcore_placement``).

    ``quantizers``: full dotted names of every TensorQuantizer, in module order. ``share_groups``:
    quantizers that must end with one common range (the union of their calibrated ranges).
    ``folded_bn``: ``(conv, bn)`` pairs folded; ``unfolded_bn``: BatchNorm name -> why it stayed.
    ``float_reasons``: every Linear/Conv/attention/op left float -> why (``float_modules`` lists the
    names). ``attention``: modules whose ``softmax(q k^T) v`` is quantized. ``notes``: where the
    placement quantizes differently from what ``quant:`` says (e.g. ft2's per-tensor block weights).
    """

    family: str
    mode: str | None
    quantizers: list[str] = field(default_factory=list)
    share_groups: list[list[str]] = field(default_factory=list)
    folded_bn: list[tuple[str, str]] = field(default_factory=list)
    unfolded_bn: dict[str, str] = field(default_factory=dict)
    float_reasons: dict[str, str] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)
    example_input_shape: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: positional inputs of the example input (a multi-input model: calibration batches give as many)
    example_inputs: int = 1

    @property
    def float_modules(self) -> list[str]:
        return list(self.float_reasons)

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "mode": self.mode, "quantizers": len(self.quantizers),
                "attention": list(self.attention), "folded_bn": [list(p) for p in self.folded_bn],
                "unfolded_bn": dict(self.unfolded_bn), "float": dict(self.float_reasons),
                "example_input_shape": list(self.example_input_shape), "notes": list(self.notes)}


def _leading_tensors(example_input: Any) -> int:
    """How many positional inputs a calibration batch must give: the example input's leading tensors
    (``(x, True)`` is one image input and a flag the model's default keeps)."""
    if not isinstance(example_input, tuple):
        return 1
    n = 0
    for t in example_input:
        if not isinstance(t, torch.Tensor):
            break
        n += 1
    return max(n, 1)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers:
    quantizer names, placement, save and load are those of the unwrapped model."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every TensorQuantizer in ``model`` (unwrapped, see :func:`unwrap`) by full dotted name, in
    module order."""
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, TensorQuantizer)}


def unify_shared_ranges(model: nn.Module) -> list[list[str]]:
    """Give each shared group of the placement (``PlacementResult.share_groups``: e.g. one range for
    q/k/v, which one fused kernel reads) the union of its calibrated members' ranges, in place.
    Members without a range yet are left alone, and so are members that do not quantize (``enabled:
    false`` or a float cast, by recipe): their values stay float, so their range must not widen the
    grid of the others (and they keep their own range for analysis). Returns the groups unified
    (quantizer names)."""
    qs = quantizers(model)
    done = []
    for group in getattr(getattr(unwrap(model), "quantcore_placement", None), "share_groups", []) or []:
        members = [qs[n] for n in group if n in qs and qs[n].amax.numel()
                   and qs[n].spec.on_grid]
        if members:
            lo = torch.stack([m.amin.min() for m in members]).min()
            hi = torch.stack([m.amax.max() for m in members]).max()
            for m in members:
                m.set_range(lo, hi)
            done.append(list(group))
    return done


def unequal_shared_ranges(model: nn.Module) -> list[list[str]]:
    """The shared groups (see :func:`unify_shared_ranges`) whose calibrated, quantizing members hold
    different ranges: a checkpoint calibrated before the placement shared them (an older quantcore
    kept q/k/v apart in ft2). Returns their member names; empty when every group holds one range."""
    qs = quantizers(model)
    bad = []
    for group in getattr(getattr(unwrap(model), "quantcore_placement", None), "share_groups", []) or []:
        members = [n for n in group if n in qs and qs[n].amax.numel() and qs[n].spec.on_grid]
        ranges = {(float(qs[n].amin.min()), float(qs[n].amax.max())) for n in members}
        if len(ranges) > 1:
            bad.append(members)
    return bad


def _default_float_reason(plan: Any, site: Any, keep_float_given: bool) -> str | None:
    """``plan.default_float_reason`` (None: quantize the site), a plug-in's failure or non-text result
    named: a reason is recorded in the placement and reported, and any value but None keeps it float."""
    from ..plugins import PluginError, is_plugin

    if not is_plugin(plan):
        return plan.default_float_reason(site, keep_float_given)
    who = f"model family {plan.name!r} ({type(plan).__module__}.{type(plan).__qualname__})"
    try:
        reason = plan.default_float_reason(site, keep_float_given)
    except Exception as e:  # noqa: BLE001 - a plug-in's failure, named
        raise PluginError(f"{who}: default_float_reason() raised {type(e).__name__} on {site.name!r}: {e}") from e
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise PluginError(f"{who}: default_float_reason() returned {type(reason).__name__} {reason!r:.60} for "
                          f"{site.name!r}; it must return None (quantize) or a non-empty reason text (keep float)")
    return reason


def _merge_groups(groups: list[list[str]]) -> list[list[str]]:
    """Groups that have a member in common become one (a GEMM output feeding two attentions)."""
    merged: list[list[str]] = []
    for g in groups:
        g = list(dict.fromkeys(g))
        for m in [m for m in merged if set(m) & set(g)]:
            merged.remove(m)
            g = m + [q for q in g if q not in m]
        merged.append(g)
    return merged


def _quantize_model_input(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: fake-quantize the model's image input with ``module.input_quantizer``: the
    first positional tensor, else the first floating-point tensor keyword (``pixel_values=``)."""
    q = module._modules.get(ROOT_INPUT_QUANTIZER)
    if q is None:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        # an image (N, C, H, W) meets a convolution first, which contracts its channels
        return _apply(q, x, (1,) if x.dim() == 4 else None)

    if args and isinstance(args[0], torch.Tensor):
        return (apply(args[0]),) + tuple(args[1:]), kwargs
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return args, {**kwargs, k: apply(v)}
    return None


def _add_root_input_quantizer(model: nn.Module, act_spec: QuantSpec, bins: int) -> None:
    q = TensorQuantizer(act_spec, "activation", bins)
    # Registered first so that it leads quantizers(model) and the state_dict.
    model._modules = {ROOT_INPUT_QUANTIZER: q, **model._modules}
    model.register_forward_pre_hook(_quantize_model_input, with_kwargs=True)


def _check_fresh(model: nn.Module) -> None:
    scripted = [n or "<root>" for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        # its ops run inside a TorchScript graph: no op interception, no hooks, no BatchNorm folding, so a
        # traced model was "prepared" with no quantizer at all
        raise PlacementError(f"{'the model' if scripted[0] == '<root>' else f'module {scripted[0]!r}'} is TorchScript "
                             "(torch.jit.trace / torch.jit.script): quantcore quantizes the ops of eager "
                             "modules; prepare the nn.Module you traced or scripted, then export")
    if getattr(model, "quantcore_placement", None) is not None:
        raise PlacementError("place_quantizers was already applied to this model")
    found = [n or "<root>" for n, m in model.named_modules() if isinstance(m, (TensorQuantizer, QuantResidualBlock))]
    if found:
        raise PlacementError(f"the model already contains quantizers {found[:5]}; place quantizers on a float model")


# -- example input ---------------------------------------------------------------------------------
def default_example_input(model: nn.Module, img_size: int | None = None, in_chans: int | None = None,
                          batch: int = 2) -> torch.Tensor:
    """A seeded ``(batch, C, H, W)`` normal tensor shaped like the model's input: Hugging Face
    ``config.image_size/num_channels``, else the model's eval transform (timm pretrained_cfg, a
    patch embedding's fixed size, torchvision's 224), with ``img_size``/``in_chans`` winning."""
    c = h = w = None
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "image_size", None)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        c = getattr(cfg, "num_channels", None)
    if h is None:
        from ..data.transforms import describe_transform

        c, h, w = describe_transform(model)["input_size"]
    if img_size is not None:
        h = w = img_size
    if in_chans is not None:
        c = in_chans
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, int(c or 3), int(h), int(w), generator=g).to(dev, dtype)


# -- analysis of the trace -------------------------------------------------------------------------
@dataclass
class _Site:
    name: str  # what rules match: the owner module (or "owner.in_proj" for a prefixed weight)
    kind: str  # "weighted" | "attention"
    owner: str
    prefix: str = ""
    op: str = ""
    weight_attr: Optional[str] = None
    callers: dict[str, Optional[str]] = field(default_factory=dict)  # caller -> param path rel. caller
    order: int = 0
    reads_model_input: bool = False
    probs_at_matmul: bool = False  # attention: the probabilities change after softmax (talking heads)
    probs_operand: int = 0  # attention: attn@v's operand holding the probabilities (1: v @ attn^T)
    # attention: (role, weighted site (owner, prefix)) for each of q/k/v that is that GEMM's output as it
    # is (moved or split only): an output quantizer there and the role's quantizer see the same values
    qkv_from: tuple[tuple[str, tuple[str, str]], ...] = ()
    # weighted "matmul" (data @ parameter): the parameter's axis holding the output channels, or None
    weight_axis: Optional[int] = None
    skip_constant: bool = False  # attention: its calls also multiply constants (ModulePlan.skip_constant)


def _rel(path: str, base: str) -> str:
    if not base:
        return path
    return "" if path == base else path[len(base) + 1:]


def _within(name: str, base: str) -> bool:
    return base == "" or name == base or name.startswith(base + ".")


_ATTN_KINDS = ("matmul_act", "softmax", "sdpa", "einsum")


def _attention_seq(trace: Trace) -> tuple[dict[tuple[str, int], list[tuple[str, str]]], set[tuple[str, int]]]:
    """Per module call: the attention-relevant ops run inside it, as ``(kind, origin)`` where origin is
    the innermost module below it the op ran in ("" = the module's own forward). The innermost one,
    not the child: two sibling blocks under one container are two origins, not one.

    Matmuls/einsums of constants are left out, and the calls where one was are returned too: timm
    RelPosBiasTf's einsum lookups of its bias table, run in MaxViT *_tf attention's own forward, are not
    part of softmax(QK^T)V. "Constant" is what the run-time interception can tell (which finds q @ k^T
    by the order of a call's matmuls and must skip the same ops, :attr:`ModulePlan.skip_constant`): each
    operand a parameter, a buffer, or such a product made earlier in the same call, by an op no
    module with a plan of its own runs (a hooked child's ops are not the call's at run time). A buffer or
    tensor attribute counts only when the called module holds it (the run time knows its own ones)."""
    # modules that may get a plan: callers of F.linear/conv, and of a data @ parameter matmul (a possible
    # site, BoTNet's q @ rel_k^T): a superset is safe (their products just stay data)
    hooked = {op.stack[-1][0] for op in trace.ops if op.stack and (
        op.kind == "weighted" or (op.kind == "matmul_param" and op.param_operand is not None))}
    seqs: dict[tuple[str, int], list[tuple[str, str]]] = {}
    const: dict[tuple[str, int], set[int]] = {}  # per call: ids of its constant products so far
    skipped: set[tuple[str, int]] = set()

    def constant(src: Any, frame: tuple[str, int], known: set[int]) -> bool:
        if isinstance(src, tuple):
            return src[0] == "p" or _within(src[1], frame[0])
        return src in known

    for op in trace.ops:
        if not op.operand_src and op.kind not in _ATTN_KINDS:
            continue
        for depth, frame in enumerate(op.stack):
            if op.operand_src and not any(f[0] in hooked for f in op.stack[depth + 1:]):
                known = const.setdefault(frame, set())
                if all(constant(src, frame, known) for src in op.operand_src):
                    known.update(op.outputs)
                    if op.kind in _ATTN_KINDS:
                        skipped.add(frame)
                    continue
            if op.kind in _ATTN_KINDS:
                origin = op.stack[-1][0] if depth + 1 < len(op.stack) else ""
                seqs.setdefault(frame, []).append((op.kind, origin))
    return seqs, skipped


def _has_attention(seq: list[tuple[str, str]]) -> bool:
    """An SDPA, or a contiguous matmul-softmax-matmul whose ops come from the module's own forward and
    at most one child (``nn.Softmax``): a pattern stitched across blocks is not an attention."""
    kinds = [k for k, _ in seq]
    if "sdpa" in kinds:
        return True
    for i in range(len(seq) - 2):
        if kinds[i:i + 3] == ["matmul_act", "softmax", "matmul_act"]:
            if len({o for _, o in seq[i:i + 3] if o}) <= 1:
                return True
    return False


def _probs_operand(trace: Trace, frame: tuple[str, int]) -> int | None:
    """Which operand of attn@v (0 or 1) is the softmax output itself, through :data:`~.probe.PASS_THROUGH`
    ops only, in this call of an explicit attention module: 0 for ``attn @ v``, 1 for
    ``v @ attn.transpose(-2, -1)`` (timm LeViT's conv mode). None when neither is (talking-heads
    attention, CaiT's ``proj_w`` or EfficientFormerV2's ``talking_head2``, mixes the probabilities
    across heads in between): then the operand the GEMM receives is what must be quantized."""
    ops = [op for op in trace.ops if frame in op.stack]
    soft = next((i for i, op in enumerate(ops) if op.kind == "softmax"), None)
    if soft is None:
        return 0
    same = set(ops[soft].outputs)
    for op in ops[soft + 1:]:
        if op.kind == "matmul_act":
            return next((k for k, o in enumerate(op.operands or ()) if o in same), None)
        if op.func in PASS_THROUGH and op.inputs and op.inputs[0] in same:
            same.update(op.outputs)
    return 0


#: ops that take a part of a tensor as it is: a per-tensor grid on the whole is the grid of each part
_SLICES = {"unbind", "__getitem__", "chunk", "split", "split_with_sizes", "tensor_split", "select", "narrow",
           "unsafe_split", "unsafe_chunk"}


def _weighted_key(op: OpEvent) -> tuple[str, str]:
    """The site key ``(owner, prefix)`` of a weighted op (as :func:`_analyze` names its site)."""
    if op.weight is None:
        return op.stack[-1][0] if op.stack else "", ""
    owner, _, attr = op.weight.rpartition(".")
    base = attr[: -len("_weight")] if attr.endswith("_weight") else attr
    return owner, "" if attr == "weight" else base + "_"


class _Sources:
    """Walks back from a tensor to the weighted op that computed it, through moves, lossless casts and
    slices only (:data:`~.probe.PASS_THROUGH`, :data:`_SLICES`): the GEMM whose output quantizer sees
    the same values as a later quantizer. The latest op before the consumer that returned that tensor
    id is its producer (an id is reused only after its tensor died). A value written in place on the
    way (``q.mul_(s)`` through any alias of the chain's storage) breaks the chain."""

    def __init__(self, trace: Trace) -> None:
        self.ops = trace.ops
        self.producers: dict[int, list[int]] = {}
        for i, op in enumerate(trace.ops):
            for o in op.outputs:
                self.producers.setdefault(o, []).append(i)

    def gemm(self, tid: int, before_seq: int) -> Optional[tuple[str, str]]:
        """The site key of the weighted op whose output ``tid`` (read at ``before_seq``) is, or None."""
        consumer, storages = before_seq, set()
        for _ in range(64):  # a bounded walk: the chains seen are a handful of ops long
            cands = [i for i in self.producers.get(tid, ()) if self.ops[i].seq < before_seq]
            if not cands:
                return None
            p = self.ops[cands[-1]]
            storages.update(st for o, st in zip(p.outputs, p.storages) if o == tid and st is not None)
            if p.kind == "weighted":
                written = any(op.mutates in storages for op in self.ops
                              if p.seq < op.seq < consumer and op.mutates is not None)
                return None if written else _weighted_key(p)
            if (p.func not in PASS_THROUGH and p.func not in _SLICES) or not p.inputs or not p.lossless:
                return None
            tid, before_seq = p.inputs[0], p.seq
        return None


def _qkv_producers(trace: Trace, module: str, src: _Sources, probs_operand: int = 0
                   ) -> tuple[tuple[str, tuple[str, str]], ...]:
    """Which of q, k, v reach attention ``module`` as a weighted op's output as it is (timm's fused
    ``qkv`` -> reshape/permute/unbind; HF's query/key/value -> view/transpose;
    ``nn.MultiheadAttention``'s in-projection): ``(role, site key)`` pairs, role ``"q"``/``"k"``/``"v"``,
    for the roles that do so in every call. A q scaled or normalized on the way (timm's explicit path
    ``q * scale``, ``nn.MultiheadAttention``'s math path, ``q_norm``) is not listed: its values are not
    the GEMM's. In each call, q and k are the operands of the first matmul, v the operand of the
    second that is not the probabilities (``probs_operand``: talking-heads attention mixes them with a
    Linear first, CaiT's ``proj_w``, which is not v)."""
    calls: dict[tuple[str, int], list[OpEvent]] = {}
    for op in trace.ops:
        frame = next((f for f in op.stack if f[0] == module), None)
        if frame is not None and op.kind in ("sdpa", "matmul_act"):
            calls.setdefault(frame, []).append(op)
    seen: dict[str, set] = {"q": set(), "k": set(), "v": set()}
    for ops in calls.values():
        if ops[0].kind == "sdpa":
            reads = [(ops[0], ("q", "k", "v"), ops[0].inputs[:3])]
        elif len(ops) == 2:
            reads = [(ops[0], ("q", "k"), ops[0].operands), (ops[1], ("v",), ops[1].operands[1 - probs_operand:][:1])]
        else:
            continue
        for op, roles, ids in reads:
            for role, tid in zip(roles, ids):
                seen[role].add(src.gemm(tid, op.seq))
    return tuple((role, next(iter(keys))) for role, keys in seen.items()
                 if len(keys) == 1 and None not in keys)


def _branch_producers(trace: Trace, block: str, src: _Sources) -> dict[str, tuple[str, str]]:
    """timm ``Block`` ``block``: for each residual branch (``branch1_quantizer``/``branch2_quantizer``),
    the weighted op whose output reaches the add as it is (no LayerScale, DropPath the identity):
    ft2's proj/fc2 output quantizers see those values."""
    out: dict[str, tuple[str, str]] = {}
    for i, attr in ((1, "branch1_quantizer"), (2, "branch2_quantizer")):
        calls = trace.calls_of(f"{block}.drop_path{i}")
        if not calls or any(not c.inputs or c.outputs[:1] != c.inputs[:1] for c in calls):
            continue  # not called, or not the identity: the branch's values are not the GEMM's
        keys = {src.gemm(c.inputs[0], c.seq) for c in calls}
        if len(keys) == 1 and None not in keys:
            out[attr] = keys.pop()
    return out


#: ops that multiply by a weight parameter but are not F.linear/conv: their weights stay float, said so
_UNQUANTIZED_GEMMS = {"lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell",
                      "rnn_relu_cell", "addmm", "addmm_", "addmv", "mv", "bilinear", "addbmm", "tensordot",
                      "chain_matmul", "multi_dot", "inner", "conv_tbc", "embedding_bag",
                      # the convolution/linear ops below F.conv*/F.linear (torch.convolution, torch.ops.aten.*)
                      "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "linear"}


#: attention kernels quantcore does not intercept: their q@k^T and attn@v run float, said so
_UNQUANTIZED_ATTENTION = {"flex_attention"}
_FLEX_HINT = ("flex_attention, a compiled kernel quantcore does not intercept: its q@k^T and "
              "attn@v run float (build the model with attn_implementation 'sdpa' or 'eager' to quantize them)")


def _feeds_weight(trace: Trace, prod) -> bool:
    """Whether the output of ``prod`` (a product of parameters) reaches, through elementwise ops in
    the same call, the weight argument of a weighted op (``F.linear(x, W + B @ A)``): that op's
    weight quantizer then quantizes the merged weight, this product included."""
    ids, frame = set(prod.outputs), prod.stack[-1] if prod.stack else None
    for op in trace.ops:
        if op.seq <= prod.seq or (op.stack[-1] if op.stack else None) != frame:
            continue
        if op.kind == "weighted":
            if len(op.inputs) > 1 and op.inputs[1] in ids:
                return op.weight is None
            continue
        if op.kind == "other" and any(i in ids for i in op.inputs):
            ids.update(op.outputs)
    return False


def _analyze(model: nn.Module, trace: Trace, input_dependent: frozenset[str] | set[str] = frozenset()
             ) -> tuple[list[_Site], dict[str, str]]:
    """Quantization sites and float reasons from a probe's trace. ``input_dependent``: modules whose
    computed weight depends on the model input (:func:`~.probe.input_dependent_weights`)."""
    mods = dict(model.named_modules())
    sites: dict[tuple[str, str], _Site] = {}
    float_reasons: dict[str, str] = {}
    used_weights: set[str] = set()
    param_matmuls: list[OpEvent] = []

    # Weighted ops. Derived weights are counted per call of their caller.
    derived_per_call: dict[tuple[str, int], int] = {}
    for op in trace.ops:
        if op.kind == "weighted" and op.weight is None and op.stack:
            derived_per_call[op.stack[-1]] = derived_per_call.get(op.stack[-1], 0) + 1
    params = dict(model.named_parameters(remove_duplicate=False))
    weighted = {op.weight for op in trace.ops if op.kind == "weighted" and op.weight}  # F.linear/conv weights
    for op in trace.ops:
        if op.kind == "other" and op.func in _UNQUANTIZED_ATTENTION:
            float_reasons.setdefault((op.stack[-1][0] if op.stack else "") or "<model>", f"attention computed by {_FLEX_HINT}")
            continue
        if op.kind == "other" and op.func in _UNQUANTIZED_GEMMS:  # recurrent layers, HF Conv1D's addmm ...
            names = sorted({n for n in op.params if n in params and params[n].dim() >= 2})
            for owner in dict.fromkeys(n.rpartition(".")[0] for n in names):
                ws = [n.rpartition(".")[2] for n in names if n.rpartition(".")[0] == owner]
                float_reasons.setdefault(owner or "<model>", f"its weight(s) {', '.join(ws)} are used by {op.func}, "
                                         "which quantcore does not intercept (only F.linear/conv and attention "
                                         "matmuls are quantized)")
            used_weights.update(names)
            continue
        if op.kind == "transposed_conv":
            owner = (op.weight or "").rpartition(".")[0]
            float_reasons[owner or op.stack[-1][0]] = "transposed convolution (not quantized)"
            if op.weight:
                used_weights.add(op.weight)
            continue
        if op.kind == "matmul_param":
            if op.weight:
                used_weights.add(op.weight)
                if op.op == "params" and _feeds_weight(trace, op):
                    continue  # merged into a weight that F.linear/conv receives: quantized there, as a whole
                if op.param_operand == 1 and op.from_input and op.func != "baddbmm" and op.stack:
                    param_matmuls.append(op)  # data @ parameter: quantized if inside a quantized attention
                    continue
                if op.from_input is False and op.op != "params":
                    # timm RelPosBiasTf's one-hot einsum lookup of its bias table: no GEMM on data
                    float_reasons.setdefault(op.weight, f"parameter {op.weight!r} enters a matmul with parameters "
                                             "and buffers only (a constant of the model, such as a position-bias "
                                             "lookup), not a GEMM on data: it stays float")
                    continue
                float_reasons.setdefault(op.weight, f"parameter {op.weight!r} is used by a matmul, not by "
                                         "F.linear/conv (only those ops are quantized)")
            continue
        if op.kind != "weighted" or not op.stack:
            continue
        caller = op.stack[-1][0]
        if op.weight is not None:
            owner, _, attr = op.weight.rpartition(".")
            used_weights.add(op.weight)
            if not _within(owner, caller):
                # the op that stays float is the caller's; the owner's own use is still quantized
                float_reasons.setdefault(caller or "<model>", f"its {op.op} uses {op.weight!r}, a weight of a module "
                                         "it does not contain: that op stays float")
                continue
            base = attr[: -len("_weight")] if attr.endswith("_weight") else attr
            if base != attr and f"{owner}.{base}".lstrip(".") in weighted:
                base = attr  # both "gate" and "gate_weight" feed F.linear/conv: one site each ("gate_", "gate_weight_")
            prefix = "" if attr == "weight" else base + "_"
            name = owner if not prefix else (f"{owner}.{base}" if owner else base)
            param = _rel(op.weight, caller)
        else:
            if op.weight_param_like:
                float_reasons.setdefault(caller, f"{op.op} receives a view of a parameter (not quantized)")
                continue
            n = max(v for (c, _), v in derived_per_call.items() if c == caller)
            if n > 1:
                float_reasons[caller] = (f"its forward computes {n} {op.op} weights (quantcore quantizes one "
                                         "computed weight per module)")
                continue
            if not caller:
                float_reasons["<model>"] = "the model's own forward computes a weight (wrap the model)"
                continue
            if caller in input_dependent:
                # one range per position in the calibration batch, sized by it, from its last batch only
                float_reasons[caller] = (f"its {op.op} weight is computed from the input (routed/dynamic "
                                         "kernels such as CondConv): a calibrated range would depend on the "
                                         "calibration batch, so the op stays float")
                continue
            owner, prefix, name, param, attr = caller, "", caller, None, None
        key = (owner, prefix)
        s = sites.get(key)
        if s is not None and s.kind == "weighted" and (s.weight_attr is None) != (attr is None):
            # one module running its own weight and a computed one (a LoRA-style second F.linear/conv on
            # B @ A): one site's quantizers cannot serve both, and the run-time matching gives this op none
            which = "a computed weight" if attr is None else f"its parameter {op.weight!r}"
            other = f"its parameter {owner + '.' + s.weight_attr if owner else s.weight_attr!r}" \
                if s.weight_attr is not None else "a computed weight"
            float_reasons.setdefault(f"{caller or '<model>'} ({op.op} on {'computed weight' if attr is None else attr})",
                                     f"its forward runs a {op.op} on {which} besides the one on {other}, which "
                                     "is quantized (quantcore quantizes one weight per module): this op stays "
                                     "float")
            continue
        if s is None:
            s = sites[key] = _Site(name, "weighted", owner, prefix, op.op, attr, order=op.seq)
            s.reads_model_input = bool(op.inputs) and op.inputs[0] in trace.model_inputs
        s.callers.setdefault(caller, param)

    # Attention: the innermost modules whose calls compute softmax(q k^T) v.
    seqs, skips_constants = _attention_seq(trace)
    qualifying = {name for (name, _), seq in seqs.items() if _has_attention(seq)}
    minimal = [m for m in qualifying if not any(o != m and _within(o, m) for o in qualifying)]
    one = (["sdpa"], ["matmul_act", "softmax", "matmul_act"])
    attn_frames: set[str] = set()
    src = _Sources(trace)
    for m in minimal:
        calls = [[k for k, _ in seq] for (name, _), seq in seqs.items() if name == m]
        attn_frames.add(m)
        label = m or "<model>"
        bad = next((seq for seq in calls if seq not in one), None)
        if bad is not None:
            float_reasons[label] = (f"attention ops {bad} in one forward (quantcore quantizes one "
                                    "softmax(QK^T)V, fused or as matmul-softmax-matmul, per module call)")
            continue
        first = min(op.seq for op in trace.ops if any(f[0] == m for f in op.stack))
        fused = calls[0] == ["sdpa"]
        where = set() if fused else {_probs_operand(trace, f) for f in seqs if f[0] == m}
        if len(where - {None}) > 1:
            float_reasons[label] = ("its calls take the probabilities as different operands of attn@v (first in "
                                    "one call, second in another)")
            continue
        sites[(m, "@attn")] = _Site(m, "attention", m, op="sdpa" if fused else "matmul", callers={m: None},
                                    order=first, probs_at_matmul=None in where,
                                    probs_operand=next(iter(where - {None}), 0),
                                    qkv_from=_qkv_producers(trace, m, src, next(iter(where - {None}), 0)),
                                    skip_constant=any(f[0] == m for f in skips_constants))
    # data @ parameter inside a quantized attention (relative-position logits q @ rel_k^T, BoTNet and
    # HaloNet): a GEMM the deployment runs in int8 next to q @ k^T, so quantized as a linear's input and
    # weight; elsewhere it stays float, said so.
    quantized_attn = {s.owner for s in sites.values() if s.kind == "attention"}
    for op in param_matmuls:
        caller = op.stack[-1][0]
        owner, _, attr = op.weight.rpartition(".")
        inside = next((f[0] for f in op.stack if f[0] in quantized_attn), None)
        if inside is None or not _within(owner, caller):
            float_reasons.setdefault(op.weight, f"parameter {op.weight!r} is used by a matmul, not by "
                                     "F.linear/conv (only those ops are quantized)"
                                     + ("" if inside is None else "; it belongs to a module the calling "
                                        "attention module does not contain"))
            continue
        key = (owner, attr + "_")
        s = sites.get(key)
        if s is not None and s.op != "matmul":  # the same parameter also goes to F.linear/conv: one site each
            # would need two quantizers of one parameter; that use is quantized, this one said float
            float_reasons.setdefault(f"{op.weight} (x @ {attr})", f"parameter {op.weight!r} is also multiplied with "
                                     "data by a matmul, besides the F.linear/conv that quantizes it: that matmul "
                                     "stays float")
            continue
        if s is None:
            s = sites[key] = _Site(op.weight, "weighted", owner, attr + "_", "matmul", attr, order=op.seq,
                                   weight_axis=op.weight_axis)
        elif s.weight_axis != op.weight_axis:
            s.weight_axis = None
        s.callers.setdefault(caller, _rel(op.weight, caller))

    # Activation matmuls / einsums / softmaxes outside any quantized attention.
    for op in trace.ops:
        if op.kind in ("matmul_act", "einsum", "softmax", "sdpa") and op.stack:
            if any(f[0] in attn_frames for f in op.stack):
                continue
            where = op.stack[-1][0] or "<model>"
            what = {"einsum": "einsum", "softmax": "softmax", "sdpa": "scaled_dot_product_attention"}.get(
                op.kind, "activation x activation matmul")
            float_reasons.setdefault(where, f"{what} outside a softmax(QK^T)V pattern (its attention math "
                                     "stays float)")

    # Every Linear/Conv/MultiheadAttention module is quantized or listed.
    owners = {s.owner for s in sites.values()}
    for name, mod in mods.items():
        if not name:
            continue
        if isinstance(mod, (nn.Linear, _ConvNd)):
            w = f"{name}.weight"
            if name in owners or name in float_reasons:
                continue
            if w in used_weights:
                continue
            called = trace.call_counts.get(name, 0)
            float_reasons[name] = ("not called on the example input" if not called else
                                   "its forward runs no F.linear/conv op quantcore can intercept")
        elif isinstance(mod, nn.MultiheadAttention) and name not in attn_frames and name not in float_reasons:
            float_reasons[name] = ("not called on the example input" if not trace.call_counts.get(name)
                                   else "no softmax(QK^T)V seen in its forward")
    # A torch.nn.utils.parametrize parametrization (weight norm, orthogonal, spectral norm, LoRA-style)
    # computes its layer's weight: its own ops are not layers of the network, and a reason such as "matmul
    # outside attention" read as if part of the layer stayed float. Said for what it is.
    for name, mod in mods.items():
        if not name or not is_parametrized(mod):
            continue
        quantized = any(s.owner == name for s in sites.values() if s.kind == "weighted")
        for tensor in mod.parametrizations:
            prefix = f"{name}.parametrizations.{tensor}"
            for n in [n for n in float_reasons if n == prefix or n.startswith(prefix + ".")]:
                float_reasons[n] = (f"computes {name}.{tensor} (a torch.nn.utils.parametrize parametrization)"
                                    + (f"; the weight it produces is quantized by {name}'s weight quantizer"
                                       if quantized and tensor == "weight" else ""))
    return sorted(sites.values(), key=lambda s: s.order), float_reasons


def _block_of(name: str, mods: dict[str, nn.Module]) -> str:
    """The transformer block around attention module ``name``: its nearest ancestor that is an item
    of a ModuleList/Sequential (timm ``blocks.3``, HF ``encoder.layer.3``, torchvision
    ``encoder.layers.encoder_layer_3``), else its parent."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc, parent = ".".join(parts[:i]), ".".join(parts[: i - 1])
        if isinstance(mods.get(parent), (nn.ModuleList, nn.Sequential)) and anc != name:
            return anc
    return name.rpartition(".")[0]


def detect_family(model: nn.Module, example_input: Any = None, *, _sites: list[_Site] | None = None,
                  _had_bn: bool | None = None) -> str:
    """The registered family (:mod:`quantcore.placement.families`, tried in priority order) that
    matches what the model computes on ``example_input``. Built-ins:

    * vit: quantized attention and at most one convolution (the patch embedding);
    * cnn: convolutions and a BatchNorm (or torchvision ResNet); attention inside (MobileViT, hybrids)
      still gets its attention quantizers;
    * generic: anything else.
    """
    if _sites is None:
        if example_input is None:
            example_input = default_example_input(model)
        trace, _ = run_probe(model, example_input)
        _sites, _ = _analyze(model, trace)
    convs = [s for s in _sites if s.kind == "weighted" and s.op.startswith("conv")]
    resnet = any(k.__module__ == "torchvision.models.resnet" and k.__qualname__ == "ResNet"
                 for k in type(model).__mro__)
    had_bn = _had_bn if _had_bn is not None else any(is_batchnorm(m) for m in model.modules())
    return detect(FamilyFacts(has_attention=any(s.kind == "attention" for s in _sites), convolutions=len(convs),
                              had_batchnorm=had_bn, torchvision_resnet=resnet))


def _act_check(name: str, spec: QuantSpec) -> None:
    if spec.axis is not None and not spec.is_float:
        raise PlacementError(f"activation quantizer {name!r} got a per-channel axis {spec.axis}: per-channel "
                             "activation ranges are not supported (axis 0 is the batch: the ranges would depend "
                             "on the batch size); remove per_channel/axis from that override")


def _probe_failed(shape: list[int], during: str, err: Exception) -> PlacementError:
    return PlacementError(f"the model failed on an example input of shape {shape} while {during} "
                          f"({type(err).__name__}: {err}); pass example_input to prepare() (or set "
                          "model.img_size / in_chans)")


def place_quantizers(model: nn.Module, placement: PlacementConfig, weight_spec: QuantSpec,
                     act_spec: QuantSpec, overrides: Iterable[Override] = (), bins: int = 2048,
                     example_input: Any = None, fold_pairs: list | None = None) -> PlacementResult:
    """Fold BatchNorm, then insert quantizers into ``model`` in place; return what was done.

    ``example_input`` (a tensor or tuple of positional inputs; default: :func:`default_example_input`)
    is run through the model to find every op to quantize and to prove and verify BatchNorm folds.
    ``weight_spec`` is used for every weight quantizer (in transformer blocks the ft1/ft2 mode sets
    the axis); ``act_spec`` for every activation quantizer. ``overrides`` (recipe order, later wins)
    can leave modules float or patch quantizer specs. ``fold_pairs``: fold exactly these ``(conv, bn)``
    pairs (a checkpoint's record, see :func:`~quantcore.fold.fold_batchnorm`).

    Raises :class:`~quantcore.errors.PlacementError` naming the recipe field, module or quantizer for
    anything that cannot be done as asked (an override matching nothing, ``mode`` on a model without
    attention, a fold that changes the outputs...). On any error the model is left as it was (a fold
    is undone).
    """
    model = unwrap(model)  # a DataParallel/torch.compile wrapper: its names would miss every shared group
    _check_fresh(model)
    overrides = list(overrides)
    if placement.family != "auto" and placement.family not in family_names():
        raise PlacementError(f"placement.family: unknown family {placement.family!r} (registered: "
                             f"{family_names()} or 'auto')")
    _act_check("activations", act_spec)
    if example_input is None:
        example_input = default_example_input(model)
    shape = list(example_input.shape) if isinstance(example_input, torch.Tensor) else []
    # Options that only apply to attention, set away from their defaults (a saved recipe lists every
    # field, so "set" cannot mean "present").
    defaults = PlacementConfig()
    explicit = {k for k in _ATTN_OPTIONS if getattr(placement, k) != getattr(defaults, k)}

    has_bn = any(is_batchnorm(m) for m in model.modules())
    folded, unfolded, fold_res = [], {}, None
    if placement.fold_bn and has_bn:
        try:
            res = fold_batchnorm(model, example_input, pairs=fold_pairs)
        except FoldError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's model failed on the example input
            raise _probe_failed(shape, "BatchNorm folding was checked", err) from None
        folded, unfolded, fold_res = res.pairs, res.unfolded, res
    elif has_bn:  # every BatchNorm stays: the placement record counts them as the report says ("N kept")
        unfolded = {n: "placement.fold_bn: false" for n, m in model.named_modules() if is_batchnorm(m)}
    try:
        return _place(model, placement, weight_spec, act_spec, overrides, bins, example_input, shape, explicit,
                      has_bn, folded, unfolded)
    except BaseException:
        if fold_res is not None:  # a refusal leaves the model as it was
            fold_res.undo()
        raise


def _place(model, placement, weight_spec, act_spec, overrides, bins, example_input, shape, explicit, has_bn,
           folded, unfolded) -> PlacementResult:
    try:
        trace, _ = run_probe(model, example_input)
    except Exception as err:  # noqa: BLE001 - the user's model failed on the example input
        raise _probe_failed(shape, "its ops were traced", err) from None
    try:
        dynamic = input_dependent_weights(model, example_input, trace)
    except Exception as err:  # noqa: BLE001 - the user's model failed on a second input of that shape
        raise _probe_failed(shape, "its computed weights were compared on a second input", err) from None
    sites, float_reasons = _analyze(model, trace, dynamic)
    mods = dict(model.named_modules())
    family = detect_family(model, _sites=sites, _had_bn=has_bn) if placement.family == "auto" else placement.family
    attn_sites = [s for s in sites if s.kind == "attention"]
    plan = family_plan(family)
    if plan.requires_attention and not attn_sites:
        flex = any(op.func in _UNQUANTIZED_ATTENTION for op in trace.ops)
        raise PlacementError(f"placement.family: {family!r} needs attention (softmax(QK^T)V), and this model "
                             + (f"computes its attention with {_FLEX_HINT}" if flex else
                                "computes none (use family 'generic' or 'auto')"))
    if not attn_sites:
        bad = [k for k in _ATTN_OPTIONS if k in explicit]
        if bad:
            flex = any(op.func in _UNQUANTIZED_ATTENTION for op in trace.ops)
            raise PlacementError(f"placement.{bad[0]}: {getattr(placement, bad[0])!r} applies to attention "
                                 "(transformer) models, and this model "
                                 + (f"computes its attention with {_FLEX_HINT}" if flex else
                                    "computes no softmax(QK^T)V attention; remove it"))
    settings = mode_settings(placement) if attn_sites else None
    blocks = sorted({_block_of(s.owner, mods) for s in attn_sites})

    family_float = list(plan.default_keep_float)
    rules = build_rules(placement.keep_float, family_float, overrides)
    mark_module_hits([n for n in mods if n], rules)
    for conv, bn in folded:  # a folded BatchNorm is now part of its conv: keeping "it" float would do nothing
        r = next((r for r in rules if r.user and r.float and matches(r.pattern, bn) and not matches(r.pattern, conv)),
                 None)
        if r is not None:
            raise PlacementError(f"{r.source} keeps the BatchNorm {bn!r} float, but it is folded into the conv "
                                 f"{conv!r} (its scale and shift are that conv's weights now); keep the conv float "
                                 f"(match: {conv!r}) or leave BatchNorm unfolded (placement.fold_bn: false)")

    # -- plan ------------------------------------------------------------------------------------------
    planned: dict[str, QuantSpec] = {}
    chosen: list[_Site] = []
    moded: list[str] = []  # weight quantizers made per tensor by ft2 instead of quant.weights' granularity
    per_tensor_mm: list[str] = []  # data @ parameter whose output channels are no single parameter axis
    for s in sites:
        default_reason = _default_float_reason(plan, s, placement.keep_float is not None)
        if decide_float(s.name, rules, default_reason is not None):
            src = next((r.source for r in reversed(rules) if r.float and r.hits and s.name in r.hits), None)
            float_reasons[s.name] = f"kept float by {src}" if src else default_reason
            continue
        chosen.append(s)
        base = f"{s.owner}." if s.owner else ""
        if s.kind == "weighted":
            scoped = settings is not None and s.op == "linear" and any(_within(s.owner, b) for b in blocks)
            wspec = block_weight_spec(weight_spec, settings, s.name) if scoped else weight_spec
            if s.op == "matmul" and wspec.axis is not None and wspec.axis != s.weight_axis:
                # per channel on the parameter's output-channel axis; per tensor where no single axis is
                wspec = wspec.model_copy(update={"axis": s.weight_axis})
                if s.weight_axis is None:
                    per_tensor_mm.append(f"{base}{s.prefix}weight_quantizer")
            if scoped and wspec is not weight_spec:  # (a matmul's axis above is its own, not a mode's)
                moded.append(f"{base}{s.prefix}weight_quantizer")
            planned[f"{base}{s.prefix}input_quantizer"] = act_spec
            planned[f"{base}{s.prefix}weight_quantizer"] = wspec
            if scoped and settings.gemm_output:
                planned[f"{base}{s.prefix}output_quantizer"] = act_spec
        else:
            for a in ATTENTION_QUANTIZERS:
                if a != "softmax_input_quantizer" or settings.softmax_input:
                    planned[f"{base}{a}"] = act_spec

    res_blocks: list[str] = []
    if placement.quantize_residual:
        res_blocks = [n for n, m in mods.items() if n and is_timm_block(m) and not decide_float(n, rules)]
        if not res_blocks:
            raise PlacementError("placement.quantize_residual is set, but the model has no timm "
                                 "vision_transformer.Block whose residual adds quantcore can quantize")
        for n in res_blocks:
            check_block(mods[n], n)
            for a in RESIDUAL_QUANTIZERS:
                planned[f"{n}.{a}"] = act_spec

    root_input = False
    if placement.quantize_model_input:
        first = next((s for s in chosen if s.kind == "weighted"), None)
        root_input = not (first is not None and first.reads_model_input and sites and first is sites[0])
        if root_input:
            if ROOT_INPUT_QUANTIZER in model._modules or hasattr(model, ROOT_INPUT_QUANTIZER):
                raise PlacementError(f"the model already has an attribute {ROOT_INPUT_QUANTIZER!r}; cannot add "
                                     "the model-input quantizer (placement.quantize_model_input)")
            if ROOT_INPUT_QUANTIZER in planned:  # the model is itself a layer (an nn.Linear subclass)
                raise PlacementError(f"the model is itself a quantized layer whose own {ROOT_INPUT_QUANTIZER!r} "
                                     "would also be the model-input quantizer (placement.quantize_model_input): one "
                                     "range for two tensors. Wrap the model in a container module, or leave "
                                     "quantize_model_input off")
            planned = {ROOT_INPUT_QUANTIZER: act_spec, **planned}

    try:
        final_specs, remove, spec_hits = apply_quantizer_rules(planned, rules)
        check_all_matched(rules, spec_hits, module_aliases(model))
    except PlacementError:
        raise
    except ValueError as e:
        raise PlacementError(str(e)) from None
    removed = set(remove)
    for qname, source in remove.items():  # a quantizer (not its module) left float: said like a module
        float_reasons[qname] = f"quantizer left float by {source}"
    for qname, spec in final_specs.items():
        if qname not in removed and planned[qname] is act_spec:
            _act_check(qname, spec)
    if not set(planned) - removed:
        # a "quantized" model with nothing quantized would evaluate and export as FP32 under its recipe's name
        why = sorted(set(float_reasons.values()))
        raise PlacementError(
            "no quantizer to place: "
            + ("every quantizable layer stays float" if planned or float_reasons else
               f"the example input (shape {shape}) reached no quantizable op (Linear, Conv, matmul of attention)")
            + (f" ({'; '.join(why[:3])}{'; ...' if len(why) > 3 else ''})" if why else "")
            + "; nothing would be quantized")
    kept = sorted(set(planned) - removed)
    if not any(final_specs[q].enabled for q in kept):
        # placed but all switched off: the same FP32 model under a quantized recipe's name
        why = [f"quant.{w} enabled: false" for w, spec in (("weights", weight_spec), ("activations", act_spec))
               if not spec.enabled]
        why += [r.source for r in rules if r.source and r.hits & set(kept)
                and False in (r.enabled, getattr(r.patch, "enabled", None))]
        raise PlacementError(
            f"every quantizer placed ({len(kept)}, e.g. {kept[0]!r}) is disabled"
            + (f" ({'; '.join(why[:4])}{'; ...' if len(why) > 4 else ''})" if why else "")
            + ": nothing would be quantized; enable some (enabled: true), or evaluate the FP32 model itself")
    for qname in planned:
        owner, _, attr = qname.rpartition(".")
        holder = mods.get(owner) if owner else model
        if holder is not None and attr != ROOT_INPUT_QUANTIZER and hasattr(holder, attr):
            raise PlacementError(f"module {owner or '<model>'!r} already has an attribute {attr!r}; quantcore "
                                 f"cannot add its quantizer (leave it float with an override "
                                 f"{{match: {owner!r}, float: true}})")

    # -- apply -------------------------------------------------------------------------------------------
    def make(qname: str, kind: str, weight_attr: Optional[str] = None) -> Optional[TensorQuantizer]:
        if qname in removed:
            return None
        q = TensorQuantizer(final_specs[qname], kind, bins)
        q.weight_attr = weight_attr
        owner, _, attr = qname.rpartition(".")
        (mods[owner] if owner else model).add_module(attr, q)
        return q

    for s in chosen:  # before any module changes: a per-channel axis the weight does not have
        qname = f"{s.owner + '.' if s.owner else ''}{s.prefix}weight_quantizer"
        spec = final_specs.get(qname)
        if (s.kind != "weighted" or qname in removed or spec is None or spec.axis is None or not s.weight_attr
                or spec.is_float or not spec.enabled):  # a cast or a disabled quantizer reads no axis
            continue
        w = getattr(mods[s.owner] if s.owner else model, s.weight_attr, None)
        if isinstance(w, torch.Tensor) and not -w.dim() <= spec.axis < w.dim():
            raise PlacementError(f"quantizer {qname!r}: axis {spec.axis} is not an axis of "
                                 f"{s.owner or 'the model'}.{s.weight_attr} (shape {tuple(w.shape)}; axes "
                                 f"{-w.dim()}..{w.dim() - 1})")

    plans: dict[str, ModulePlan] = {}
    share_groups: list[list[str]] = []
    unshared: list[list[str]] = []  # share_qkv: q/k/v quantizers whose inputs are not a GEMM's output as is
    moved: list[str] = []  # attn_quantizers on attn@v's operand instead of the softmax output
    for s in chosen:
        base = f"{s.owner}." if s.owner else ""
        if s.kind == "weighted":
            make(f"{base}{s.prefix}input_quantizer", "activation")
            make(f"{base}{s.prefix}weight_quantizer", "weight", s.weight_attr)
            if f"{base}{s.prefix}output_quantizer" in planned:
                make(f"{base}{s.prefix}output_quantizer", "activation")
            for caller, param in s.callers.items():
                plans.setdefault(caller, ModulePlan()).weighted.append(
                    WeightedSite(param, _rel(s.owner, caller), s.prefix, s.op))
        else:
            for a in ATTENTION_QUANTIZERS:
                if f"{base}{a}" in planned:
                    make(f"{base}{a}", "activation")
            plans.setdefault(s.owner, ModulePlan()).attention = True
            plans[s.owner].probs_at_matmul = s.probs_at_matmul
            plans[s.owner].skip_constant = s.skip_constant
            plans[s.owner].probs_operand = s.probs_operand
            if s.probs_at_matmul and f"{base}attn_quantizer" in planned and f"{base}attn_quantizer" not in removed:
                moved.append(f"{base}attn_quantizer")
            if settings.share_qkv:
                # q/k/v as the GEMM(s) wrote them share one range with the GEMM output quantizer(s): one
                # int8 tensor with one scale, as FasterTransformer's fused QKV GEMM writes it (two ranges
                # would round twice). A q scaled or normalized on the way holds other values (timm's
                # explicit path: q * head_dim**-0.5): on the union range it would use ~1/8 of the codes.
                # Transformed on the way (tanh, a norm, a scale; an in-place write to the fused output,
                # which may reach any of them): each keeps its own range.
                as_is = dict(s.qkv_from)
                share_groups.append([f"{base}{r}_quantizer" for r in as_is]
                                    + [f"{o + '.' if o else ''}{p}output_quantizer"
                                       for o, p in dict.fromkeys(as_is.values())])
                own = [f"{base}{r}_quantizer" for r in ("q", "k", "v")
                       if r not in as_is and f"{base}{r}_quantizer" in planned]
                if own:
                    unshared.append(own)
    if res_blocks:  # a branch add reading a GEMM's quantized output as it is: one range, one rounding
        src, keys = _Sources(trace), {(c.owner, c.prefix) for c in chosen if c.kind == "weighted"}
        for n in res_blocks:
            for attr, (o, p) in _branch_producers(trace, n, src).items():
                if (o, p) in keys:
                    share_groups.append([f"{o + '.' if o else ''}{p}output_quantizer", f"{n}.{attr}"])
    # Every module whose forward runs a weighted op gets a context, even with nothing to quantize
    # (kept float): its ops must not be taken for its parent's computed-weight op.
    for op in trace.ops:
        if op.kind in ("weighted", "transposed_conv") and op.stack:
            plans.setdefault(op.stack[-1][0], ModulePlan())
    for caller, plan in plans.items():
        install_hooks(mods[caller] if caller else model, plan)

    refs = module_refs(model)
    for n in res_blocks:
        old = mods[n]
        new = QuantResidualBlock.from_float(old, act_spec, bins=bins, name=n)
        for a in RESIDUAL_QUANTIZERS:
            qname = f"{n}.{a}"
            if qname in removed:
                setattr(new, a, None)
            elif new._modules[a].spec != final_specs[qname]:
                new._modules[a].set_spec(final_specs[qname])
        for ref in refs[id(old)]:
            set_module(model, ref, new)
    if root_input and ROOT_INPUT_QUANTIZER not in removed:
        _add_root_input_quantizer(model, final_specs[ROOT_INPUT_QUANTIZER], bins)

    names = list(quantizers(model))
    present = set(names)
    order = {n: i for i, n in enumerate(names)}
    groups = [sorted(g, key=lambda q: (q.rpartition(".")[2] not in ATTENTION_QUANTIZERS, order[q]))
              for g in _merge_groups([[q for q in g if q in present] for g in share_groups])]
    result = PlacementResult(
        family=family,
        mode=settings.mode if settings is not None else None,
        quantizers=names,
        share_groups=[g for g in groups if len(g) > 1],
        folded_bn=list(folded),
        unfolded_bn=dict(unfolded),
        float_reasons=float_reasons,
        attention=[s.owner for s in chosen if s.kind == "attention"],
        example_input_shape=shape,
        example_inputs=_leading_tensors(example_input),
    )
    if moved:
        result.notes.append(
            f"{len(moved)} attention(s) (e.g. {moved[0].rpartition('.')[0]!r}) change the probabilities after "
            f"softmax before attn@v (talking heads): their attn_quantizer quantizes the operand attn@v "
            f"receives, not the softmax output")
    unshared = [[q for q in g if q in present] for g in unshared]
    unshared = [g for g in unshared if g]
    if unshared:
        result.notes.append(
            f"share_qkv_range: in {len(unshared)} attention(s) (e.g. {', '.join(map(repr, unshared[0]))}) q, k or v "
            f"is not its GEMM's output as it is (scaled, normalized or otherwise transformed on the way: timm's "
            f"explicit path, nn.MultiheadAttention's math path, q/k norm, an in-place write): such a quantizer "
            f"keeps a range of its own; the ones that read the GEMM output as it is share its range")
    kept = [q for q in per_tensor_mm if q in present and final_specs[q].axis is None]
    if kept:
        result.notes.append(
            f"{len(kept)} parameter(s) multiplied with data inside an attention (e.g. {kept[0]!r}) are quantized "
            f"per tensor, not per channel: no single axis of the parameter holds the matmul's output channels")
    kept = [q for q in moded if q in present and final_specs[q].axis != weight_spec.axis]
    if kept:
        result.notes.append(
            f"placement mode {settings.mode}: the weights of {len(kept)} transformer-block Linear(s) (e.g. "
            f"{kept[0]!r}) are quantized per tensor, "
            f"as the mode defines, not as quant.weights ({weight_spec.short()}); an override on "
            f"'*.weight_quantizer' names (spec: {{per_channel: ...}}) sets them")
    if placement.keep_float is not None and family_float:
        # keep_float replaces the family's list (its field says so): say what that quantizes, once
        owners = sorted({q.rpartition(".")[0] for q in names})
        now = [m for m in owners if any(matches(p, m) for p in family_float)
               and not any(matches(p, m) for p in placement.keep_float)]
        if now:
            hit = [p for p in family_float if any(matches(p, m) for m in now)]
            result.notes.append(
                f"placement.keep_float replaces the {family} family's default float list (here "
                f"{', '.join(map(repr, hit))}): {len(now)} module(s) that list keeps float "
                f"are quantized here (e.g. {now[0]!r}); add them to keep_float to keep them float")
    # a module run more than once per forward (a reused conv, a recurrent or tied block) has one
    # quantizer per input/weight for all its calls: one range over values that may differ in scale
    reused = {}
    for q in names:
        owner = q.rpartition(".")[0]
        n = trace.call_counts.get(owner, 0) if owner else 0
        if n > 1:
            reused[owner] = n
    if reused:
        first = next(iter(reused))
        result.notes.append(
            f"{len(reused)} quantized module(s) run more than once per forward (e.g. {first!r}: {reused[first]} "
            f"calls): each of their quantizers has one range for all calls (calibration sees every call); "
            f"give each call its own module for ranges of its own")
    model.quantcore_placement = result
    return result
