"""A prepared, calibrated model as ONNX with QuantizeLinear/DequantizeLinear pairs (explicit quantization).

Layout (what TensorRT's explicit-quantization ONNX parser and onnxruntime's QDQ transformers expect):
every active integer quantizer becomes one ``QuantizeLinear -> DequantizeLinear`` pair on the tensor it
quantized (an op input, a weight initializer, an op output, the attention q/k/logits/probabilities/v or
a residual), with scale and zero point as named initializers; symmetric grids use a signed type and
zero point 0, asymmetric grids an unsigned type and their zero point; per-channel weights carry
``axis`` (the output channel, 0 for Linear/Conv weights); FP16/BF16 quantizers become a ``Cast`` pair.

Names (so every row of ``encodings.json`` is found in the graph): for quantizer ``Q`` the nodes are
``Q/QuantizeLinear`` and ``Q/DequantizeLinear`` (``Q/Cast_to``, ``Q/Cast_back`` for casts) and the
initializers ``Q.scale`` / ``Q.zero_point`` (and ``Q.clip_min``/``Q.clip_max`` where a ``Clip`` keeps a
narrow-range grid off the type's most negative code). :func:`graph_quantizers` reads them back.

How: ``torch.onnx.export`` (TorchScript exporter) traces the model while each active quantizer's
forward is switched to an autograd Function whose ONNX symbolic is the Q/DQ pair (:func:`qdq_export`);
the model's own forward, hooks and attention interception run unchanged, so attention quantizers sit
where quantcore applies them (fused SDPA is decomposed while its quantizers act). Quantizer kinds
without an ONNX form (log2 / twin grids, FP8 here) are refused with :class:`ExportError` naming the
quantizer and its format.
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..placement import quantizers, unwrap
from ..quantizer import TensorQuantizer
from ..quantizer_kinds.affine import _fixed_fake_quant

#: TorchScript exporter's newest opset; 4/16-bit Q/DQ need 21 (the graph is exported at 20 and its
#: opset raised: opset 21 changed Q/DQ and a few shape ops only by adding types).
_TS_MAX_OPSET = 20
DEFAULT_OPSET = 17  # TensorRT 8.6+ and every onnxruntime >= 1.14 read it; 21 when a 4/16-bit grid needs it
MIN_OPSET = 13  # per-axis QuantizeLinear


class ExportError(UserError):
    """A model or quantizer that cannot be exported as asked (message names the quantizer/option)."""


# ONNX element types by (bits, signed). int4/uint4/int16/uint16 Q/DQ need opset 21.
_ONNX_TYPES = {(8, True): ("INT8", 13), (8, False): ("UINT8", 13), (4, True): ("INT4", 21),
               (4, False): ("UINT4", 21), (16, True): ("INT16", 21), (16, False): ("UINT16", 21)}
_FLOAT_CASTS = {"fp16": "FLOAT16", "bf16": "BFLOAT16"}


@dataclass
class QdqSpec:
    """How one quantizer is written: ``op`` 'qdq' or 'cast'; for 'qdq' the ONNX element type, scale
    (float32, shape () or (C,)), zero point (int64, same shape), axis, the integer range and whether a
    Clip is needed (narrow range: the grid does not span its type)."""

    name: str
    op: str
    kind: str  # weight / activation
    format: str
    dtype: str = ""  # ONNX element type name: INT8, UINT8, INT4, ... or FLOAT16 / BFLOAT16 for casts
    scale: Optional[np.ndarray] = None
    zero_point: Optional[np.ndarray] = None
    axis: Optional[int] = None
    qmin: int = 0
    qmax: int = 0
    clip: bool = False
    min_opset: int = MIN_OPSET
    notes: list[str] = field(default_factory=list)

    @property
    def bits(self) -> int:
        return {"INT8": 8, "UINT8": 8, "INT4": 4, "UINT4": 4, "INT16": 16, "UINT16": 16}.get(self.dtype, 0)

    @property
    def signed(self) -> bool:
        return self.dtype.startswith("INT")

    def trt_native(self) -> bool:
        """TensorRT explicit quantization: symmetric signed INT8 (zero point 0), per-tensor activations,
        per-tensor or per-output-channel weights; FP16 casts. INT4 is weight-only in TensorRT 10."""
        if self.op == "cast":
            return self.dtype == "FLOAT16"
        if self.dtype == "INT4":
            return self.kind == "weight" and not self.clip
        return self.dtype == "INT8" and not self.clip and (self.axis is None or self.kind == "weight")


def quantizer_qdq(name: str, q: TensorQuantizer) -> Optional[QdqSpec]:
    """The ONNX form of quantizer ``name`` (None when it does not change the tensor: disabled,
    switched off or uncalibrated). Raises :class:`ExportError` for a format ONNX cannot express."""
    if not q.active:
        return None
    spec = q.spec
    if spec.kind.is_float:
        if spec.format not in _FLOAT_CASTS:
            raise ExportError(f"quantizer {name}: format {spec.format!r} has no export in any --format (onnx, "
                              f"aimet and trt-table are all built from the ONNX graph, whose casts here are "
                              f"{sorted(_FLOAT_CASTS)}; FP8 needs opset 19 float8 types TensorRT/onnxruntime "
                              f"do not run as Q/DQ on CPU); the checkpoint itself keeps the FP8 fake quantization")
        return QdqSpec(name, "cast", q.kind, spec.format, dtype=_FLOAT_CASTS[spec.format], min_opset=MIN_OPSET)
    if spec.format != "int" and spec.kind.supports_blocks:
        raise ExportError(f"quantizer {name}: format {spec.format!r} computes its scale and zero point at run time "
                          f"(per slice or block of what the consuming product contracts): every export format "
                          f"holds static scales "
                          f"(ONNX QuantizeLinear/DequantizeLinear, AIMET encodings, the TensorRT range table). Its "
                          f"rule and clip bound are in encodings.json; for a static deployment calibrate it as "
                          f"format int or keep it float (an override)")
    if spec.format != "int":
        raise ExportError(f"quantizer {name}: format {spec.format!r} is not a uniform affine grid; every export "
                          f"format expresses format 'int' only (ONNX QuantizeLinear/DequantizeLinear, AIMET "
                          f"encodings and the TensorRT range table are all scale/zero-point grids). Its "
                          f"parameters are in encodings.json; for deployment calibrate it as format int or "
                          f"keep it float (an override)")
    if spec.learnable and q.scale is not None:
        raise ExportError(f"quantizer {name} still has learnable (QAT) scale/zero point: run quantcore.convert(model) "
                          f"first (quantcore export does this for a checkpoint)")
    qmin, qmax = spec.qrange()
    signed = qmin < 0
    key = (spec.bits, signed)
    if key not in _ONNX_TYPES:
        raise ExportError(f"quantizer {name}: {spec.bits}-bit {'signed' if signed else 'unsigned'} grid "
                          f"({spec.short()}) has no ONNX QuantizeLinear type (8 bits at opset >= 13; 4 and "
                          f"16 bits at opset >= 21)")
    dtype, min_opset = _ONNX_TYPES[key]
    scale, zp = q.scale_zero_point()
    full = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if signed else (0, 2**spec.bits - 1)
    clip = (qmin, qmax) != full
    out = QdqSpec(name, "qdq", q.kind, spec.format, dtype=dtype,
                  scale=scale.detach().cpu().float().numpy().astype(np.float32),
                  zero_point=zp.detach().cpu().numpy().astype(np.int64),
                  axis=spec.axis, qmin=qmin, qmax=qmax, clip=clip, min_opset=min_opset)
    if clip:
        out.notes.append(f"narrow range [{qmin}, {qmax}]: Clip before QuantizeLinear")
    if out.scale.size > 1 and spec.axis is None:
        raise ExportError(f"quantizer {name}: {out.scale.size} ranges but no axis")
    return out


def grid_plans(model: nn.Module) -> dict[str, QdqSpec]:
    """``{quantizer name: QdqSpec}`` of every active quantizer, each grid as the quantizer defines it
    (no ONNX-only rewrite such as :func:`_as_uint8`): what the TensorRT range table and AIMET
    encodings describe."""
    plans = {}
    mods = dict(unwrap(model).named_modules())
    for name, q in quantizers(unwrap(model)).items():
        p = quantizer_qdq(name, q)
        if p is not None:
            _check_weight_axis(name, p, mods.get(name.rpartition(".")[0]))
            plans[name] = p
    return plans


def _check_weight_axis(name: str, p: QdqSpec, owner: Optional[nn.Module]) -> None:
    """A per-channel weight grid must run along the layer's output channels: an integer GEMM/convolution
    factors one scale per output channel out of its sums (onnxruntime's MatMulInteger/ConvInteger fusions
    take exactly that); per input channel, every product would need its own scale. Such a graph is valid
    ONNX, but onnxruntime's default session refuses it for a MatMul (its MatMulIntegerToFloat fusion) and
    runs a convolution in float."""
    if p.op != "qdq" or p.kind != "weight" or p.axis is None or p.scale.size <= 1:
        return
    if isinstance(owner, nn.modules.conv._ConvTransposeNd):
        out_axis = 1  # (in, out / groups, *kernel)
    elif isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)):
        out_axis = 0
    else:
        return
    ndim = owner.weight.dim()
    if p.axis % ndim != out_axis:
        raise ExportError(f"quantizer {name}: per-channel weight ranges on axis {p.axis} of "
                          f"{type(owner).__name__} weight {tuple(owner.weight.shape)}, not its output channels: an "
                          f"integer GEMM/convolution factors one scale per output channel (axis {out_axis}) out of "
                          f"its sums, so no integer kernel runs it (onnxruntime's default session refuses such a "
                          f"MatMul and runs such a convolution in float). Calibrate it with axis {out_axis} or per "
                          f"tensor (an override) to export it; the checkpoint's fake quantization is unaffected")


def plan_export(model: nn.Module, opset: Optional[int] = None) -> tuple[dict[str, QdqSpec], int]:
    """``({quantizer name: QdqSpec} for every active quantizer, opset)``; ``opset`` None picks
    :data:`DEFAULT_OPSET`, or 21 when a 4/16-bit grid needs it. Raises :class:`ExportError` naming
    the option (``--opset``) or quantizer."""
    plans = grid_plans(model)
    need = max([p.min_opset for p in plans.values()], default=MIN_OPSET)
    if opset is None:
        opset = max(DEFAULT_OPSET, need)
    if opset < MIN_OPSET or opset > 21:
        raise ExportError(f"--opset: {opset} is outside {MIN_OPSET}..21 (per-axis QuantizeLinear needs 13; "
                          f"int4/int16 need 21)")
    if opset < need:
        first = next(p for p in plans.values() if p.min_opset > opset)
        raise ExportError(f"--opset {opset}: quantizer {first.name} is {first.dtype} ({first.bits}-bit), "
                          f"which QuantizeLinear supports from opset {first.min_opset}")
    if opset >= 21:
        for p in plans.values():
            if p.op == "qdq" and p.kind == "activation" and p.dtype == "INT8":
                _as_uint8(p)
    return plans, opset


def _as_uint8(p: QdqSpec) -> None:
    """Write a signed 8-bit activation grid as UINT8 with the zero point moved up by 128: the same
    values (q - zp is unchanged). At opset 21 onnxruntime's default optimizations rewrite INT8
    activation Q/DQ to UINT8 themselves and fail on it ("output_dtype INT8 does not match y_zero_point
    type UINT8", onnxruntime 1.2x); a graph already in UINT8 is left alone and loads at every level."""
    p.dtype, p.qmin, p.qmax = "UINT8", p.qmin + 128, p.qmax + 128
    p.zero_point = np.asarray(p.zero_point + 128, dtype=np.int64)
    p.notes.append("int8 grid written as uint8, zero point + 128 (same values; opset 21: onnxruntime's "
                   "default int8 -> uint8 rewrite fails on int8 activations there)")


# -- tracing ------------------------------------------------------------------------------------------
class _QDQ(torch.autograd.Function):
    """Fake quantization whose ONNX symbolic is ``[Clip ->] QuantizeLinear -> DequantizeLinear``. The
    scale/zero point arrive as buffers of the quantizer, so their initializers carry its name."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, lo, hi, qmin, qmax, axis, clip):  # noqa: D102
        # symmetric left to be read from the zero point: the opset-21 uint8 rewrite gives a symmetric
        # grid the zero point 128 (_as_uint8), so the spec's symmetric flag would be wrong here
        return _fixed_fake_quant(x, scale, zero_point.to(torch.int32), qmin, qmax, axis)

    @staticmethod
    def symbolic(g, x, scale, zero_point, lo, hi, qmin, qmax, axis, clip):  # noqa: D102
        kw = {} if axis is None else {"axis_i": axis}
        if clip:
            x = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", x, scale, zero_point, **kw)
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class _Cast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype_name):  # noqa: D102
        return x.to({"FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}[dtype_name]).to(x.dtype)

    @staticmethod
    def symbolic(g, x, dtype_name):  # noqa: D102
        import onnx

        y = g.op("Cast", x, to_i=getattr(onnx.TensorProto, dtype_name))
        return g.op("Cast", y, to_i=onnx.TensorProto.FLOAT)


_BUF = ("_qdq_scale", "_qdq_zero_point", "_qdq_lo", "_qdq_hi")


def _export_forward(self: TensorQuantizer, x: torch.Tensor, dims=None) -> torch.Tensor:
    # ``dims`` (what the consuming product contracts) only moves run-time block scales, which
    # quantizer_qdq refuses before the graph is traced
    p: QdqSpec = self._qdq_plan
    if p.op == "cast":
        return _Cast.apply(x, p.dtype)
    axis = None if p.axis is None else p.axis % x.dim()
    zp = self._qdq_zero_point
    return _QDQ.apply(x, self._qdq_scale, zp, self._qdq_lo, self._qdq_hi, p.qmin, p.qmax, axis, p.clip)


@contextlib.contextmanager
def qdq_export(model: nn.Module, plans: dict[str, QdqSpec]) -> Iterator[nn.Module]:
    """While active, each planned quantizer of ``model`` computes through :class:`_QDQ`/:class:`_Cast`
    (same values as its fake quantization; exported as Q/DQ or Cast pairs). Per instance, undone on
    exit: other models and threads are not affected."""
    qs = quantizers(unwrap(model))
    touched = []
    try:
        for name, p in plans.items():
            q = qs[name]
            if p.op == "qdq":
                scale = torch.from_numpy(p.scale.copy())
                # torch has no int4 tensor: the exporter sees int8/uint8/int16 containers, retyped after export
                zdt = torch.int8 if p.signed else torch.uint8
                if p.bits == 16:
                    zdt = torch.int16 if p.signed else torch.int32  # uint16 has no torch export type either
                zp = torch.from_numpy(p.zero_point.copy()).to(zdt)
                lo = ((p.qmin - zp.float()) * scale).float()
                hi = ((p.qmax - zp.float()) * scale).float()
                for b, v in zip(_BUF, (scale, zp, lo, hi)):
                    q.register_buffer(b, v)  # persistent: the exporter names state_dict tensors
            q._qdq_plan = p
            q.forward = types.MethodType(_export_forward, q)
            touched.append(q)
        yield model
    finally:
        for q in touched:
            for b in _BUF:
                q._buffers.pop(b, None)
            q.__dict__.pop("forward", None)
            q.__dict__.pop("_qdq_plan", None)


class _Logits(nn.Module):
    """The classifier's logits tensor whatever the model returns (tensor, tuple, HF ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):  # noqa: D102
        from ..models import output_logits

        return output_logits(self.model(x))


@dataclass
class OnnxExport:
    """Result of :func:`export_onnx`: the model, its opset, each quantizer's plan, and per quantizer the
    graph's node names (``graph`` from :func:`graph_quantizers`)."""

    model: Any  # onnx.ModelProto
    opset: int
    plans: dict[str, QdqSpec]
    graph: dict[str, dict[str, Any]]
    # the FP32 values of the weights model.onnx writes on their grid (initializer name -> array):
    # float_graph puts them back
    float_weights: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model.SerializeToString()


def export_onnx(model: nn.Module, example_input: torch.Tensor, opset: Optional[int] = None,
                dynamic_batch: bool = True) -> OnnxExport:
    """Export a prepared, calibrated model as a QDQ ONNX model (see the module docstring).

    ``example_input``: a float tensor ``(N, C, H, W)`` (its shape fixes C/H/W; N is dynamic with
    ``dynamic_batch``). Input ``input``, output ``logits``. The model is deep-copied (learnable QAT
    ranges converted on the copy), never changed. Raises :class:`ExportError` naming the quantizer or
    option that cannot be exported, or if the graph misses a quantizer."""
    import onnx

    model = copy.deepcopy(unwrap(model)).eval().float()
    for q in quantizers(model).values():
        q.convert()  # QAT: learned scale/zero point back into the ranges (no-op otherwise)
    plans, opset = plan_export(model, opset)
    wrapper = _Logits(model)
    example_input = example_input.detach().float().cpu()
    buf = io.BytesIO()
    dyn = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    import warnings

    with qdq_export(model, plans), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the models' shape asserts; deprecation notices
        try:
            torch.onnx.export(wrapper, (example_input,), buf, dynamo=False, opset_version=min(opset, _TS_MAX_OPSET),
                              input_names=["input"], output_names=["logits"], dynamic_axes=dyn,
                              # the exporter would fold a weight's Cast pair into its initializer (nodes gone)
                              do_constant_folding=not any(p.op == "cast" and p.kind == "weight"
                                                          for p in plans.values()))
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - torch's exporter: an op of the model it cannot write
            raise ExportError(_exporter_failure(e, opset)) from e
    proto = onnx.load_from_string(buf.getvalue())
    _strip_wrapper_prefix(proto)
    qs = quantizers(model)

    def weight_fq(name: str, arr: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return qs[name](torch.from_numpy(arr.copy())).numpy()

    float_weights: dict[str, np.ndarray] = {}
    graph = _rename_and_retype(proto, plans, prefix="", weight_fq=weight_fq, originals=float_weights)
    if opset > _TS_MAX_OPSET:
        for imp in proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = opset
    proto.producer_name = "quantcore"
    missing = sorted(set(plans) - set(graph))
    if missing:
        raise ExportError(f"ONNX export lost {len(missing)} quantizer(s) (e.g. {missing[:3]}): their ops were not "
                          f"traced (data-dependent control flow?)")
    return OnnxExport(proto, opset, plans, graph, float_weights)


def _exporter_failure(e: BaseException, opset: int) -> str:
    """One message for a failure inside ``torch.onnx.export``: the operator when torch names it, and
    what may help (a later opset; a configuration of the model without the operator)."""
    text = " ".join(str(e).split())
    op = re.search(r"operator '?([\w:.]+)'?", text) or re.search(r"when translating (\w+)", text)
    what = f"operator {op.group(1)}" if op else "an operator it cannot translate"
    higher = f"; a later --opset ({opset + 1}..21) may have it" if op and opset < 21 else ""
    return (f"the ONNX exporter (torch.onnx, opset {opset}) cannot write this model: {what}{higher}. The "
            f"operator is in the model's own forward (F.fold, antialiased resampling of a dynamic image size, "
            f"...): export a configuration of the model without it (torch: {type(e).__name__}: {text[:200]})")


_WRAPPER = "model"  # the attribute :class:`_Logits` holds the user's model under


def _strip_wrapper_prefix(proto, attr: str = _WRAPPER) -> None:
    """Names as if the user's model had been exported itself: ``model.blocks.0.attn.qkv.weight`` ->
    ``blocks.0.attn.qkv.weight``, ``/model/blocks/...`` -> ``/blocks/...`` (:class:`_Logits` adds them)."""
    g = proto.graph

    def new(name: str) -> str:
        if name.startswith(attr + "."):
            return name[len(attr) + 1:]
        if name.startswith(f"/{attr}/"):
            return name[len(attr) + 1:]
        return name

    for t in list(g.initializer) + list(g.value_info) + list(g.input) + list(g.output):
        t.name = new(t.name)
    for n in g.node:
        n.name = new(n.name)
        for i, v in enumerate(n.input):
            n.input[i] = new(v)
        for i, v in enumerate(n.output):
            n.output[i] = new(v)


def _scope_name(node_name: str, prefix: str) -> str:
    """``/model/blocks/blocks.0/attn/q_quantizer/Cast`` -> ``blocks.0.attn.q_quantizer`` (the TorchScript
    exporter names nodes by module scope; a component is either a child's name or, for a
    ModuleList/Sequential item, the container's own component extended: ``.../f/a/a.0/...`` is
    ``f.a.0``, ``.../block/block.0/block.0.1/...`` is ``block.0.1``; a top-level Sequential's items
    keep the wrapper's name after :func:`_strip_wrapper_prefix`: ``/model.1/model.1.0/...`` is ``1.0``)."""
    parts = [p for p in node_name.strip("/").split("/")[:-1] if p]
    full, prev = "", None
    for i, p in enumerate(parts):
        if i == 0 and p.startswith(_WRAPPER + "."):  # the user's model is itself a Sequential: item N
            full, prev = p[len(_WRAPPER) + 1:], p  # of the wrapper's ``model`` attribute
        elif prev is not None and p.startswith(prev + "."):
            full += p[len(prev):]
        else:
            full = f"{full}.{p}" if full else p
        prev = p
    return full[len(prefix):] if prefix and full.startswith(prefix) else full


def _resolve_scope(scoped: str, names: dict[str, Any]) -> str:
    """The quantizer ``scoped`` names: itself, or the one name that holds its components in order.
    A scope leaves out modules whose forward never ran (a plain ``nn.Module`` used only as a
    namespace, ``self.f.a(x)``); several candidates stay unresolved (``scoped`` is returned)."""
    if scoped in names:
        return scoped
    want = scoped.split(".")

    def holds(name: str) -> bool:
        it = iter(name.split("."))
        return name.split(".")[-1] == want[-1] and all(c in it for c in want)

    found = [n for n in names if holds(n)]
    return found[0] if len(found) == 1 else scoped


def _rename_and_retype(proto, plans: dict[str, QdqSpec], prefix: str,
                       weight_fq: Optional[Callable[[str, np.ndarray], np.ndarray]] = None,
                       originals: Optional[dict[str, np.ndarray]] = None) -> dict[str, dict[str, Any]]:
    """Give each quantizer's nodes and initializers its name, write scale/zero point as typed named
    initializers (int4/uint4/int16/uint16 included), and drop what the exporter's deduplication left."""
    import onnx
    from onnx import helper, numpy_helper

    g = proto.graph
    producers = {o: n for n in g.node for o in n.output}
    # The exporter deduplicates equal initializers into Identity nodes; resolve them to the quantizer name.
    def quantizer_of(tensor: str) -> Optional[str]:
        name = tensor
        if name.endswith("._qdq_scale"):
            name = name[: -len("._qdq_scale")]
            return name[len(prefix):] if name.startswith(prefix) else name
        return None

    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in g.initializer}
    originals = {} if originals is None else originals
    out: dict[str, dict[str, Any]] = {}
    new_inits = []
    for n in list(g.node):
        if n.op_type != "QuantizeLinear":
            continue
        qname = quantizer_of(n.input[1])
        if qname is None or qname not in plans:
            continue
        p = plans[qname]
        rec = out.setdefault(qname, {"op": "qdq", "uses": []})
        # a module called more than once (a shared block) puts one pair per call: _1, _2, ... after the first
        sfx = f"_{len(rec['uses'])}" if rec["uses"] else ""
        dqs = [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
        if len(dqs) != 1:
            raise ExportError(f"quantizer {qname}: QuantizeLinear without exactly one DequantizeLinear")
        dq = dqs[0]
        use = {"nodes": [], "input": n.input[0], "output": dq.output[0]}
        src = producers.get(n.input[0])
        clip = src if src is not None and src.op_type == "Clip" and p.clip else None
        raw_in = clip.input[0] if clip is not None else n.input[0]
        if weight_fq is not None and p.kind == "weight" and raw_in in inits and len(consumers.get(raw_in, [])) == 1:
            # A constant weight read by this quantizer alone is written on its grid, with the values
            # quantcore's fake quantization gives it: QuantizeLinear then recovers exactly its integer
            # codes (it divides by the scale where torch multiplies by 1/scale: a weight on a rounding
            # tie would otherwise get the other code), and a narrow grid needs no Clip.
            if raw_in not in originals:
                arr = numpy_helper.to_array(inits[raw_in])
                originals[raw_in] = arr
                inits[raw_in].CopyFrom(numpy_helper.from_array(weight_fq(qname, arr).astype(arr.dtype), raw_in))
            n.input[0], clip = raw_in, None  # an unread Clip is dropped with the dead nodes
            use["prerounded"] = True
        if clip is not None:
            clip.name = f"{qname}/Clip{sfx}"
            clip.input[1], clip.input[2] = f"{qname}.clip_min", f"{qname}.clip_max"
            use["nodes"].append(clip.name)
            use["input"] = clip.input[0]
        else:
            use["input"] = n.input[0]
        for node, role in ((n, "QuantizeLinear"), (dq, "DequantizeLinear")):
            node.name = f"{qname}/{role}{sfx}"
            node.input[1], node.input[2] = f"{qname}.scale", f"{qname}.zero_point"
            use["nodes"].append(node.name)
        rec["uses"].append(use)
    for qname in out:
        p = plans[qname]
        dtype = getattr(onnx.TensorProto, p.dtype)
        dims = list(p.scale.shape)
        new_inits.append(numpy_helper.from_array(p.scale.astype(np.float32), f"{qname}.scale"))
        new_inits.append(helper.make_tensor(f"{qname}.zero_point", dtype, dims, p.zero_point.reshape(-1).tolist()))
        if p.clip and not all(u.get("prerounded") for u in out[qname]["uses"]):
            lo = ((p.qmin - p.zero_point) * p.scale.astype(np.float64)).astype(np.float32)
            hi = ((p.qmax - p.zero_point) * p.scale.astype(np.float64)).astype(np.float32)
            if lo.size > 1:
                raise ExportError(f"quantizer {qname}: a narrow-range per-channel grid on a computed tensor needs a "
                                  f"per-channel Clip, which ONNX Clip does not take; use narrow_range: false")
            new_inits.append(numpy_helper.from_array(lo.reshape(()), f"{qname}.clip_min"))
            new_inits.append(numpy_helper.from_array(hi.reshape(()), f"{qname}.clip_max"))
    # Casts: found by the quantizer's module scope (a Cast to the format's type followed by one back).
    cast_plans = {n: p for n, p in plans.items() if p.op == "cast"}
    for n in list(g.node) if cast_plans else []:
        if n.op_type != "Cast":
            continue
        qname = _resolve_scope(_scope_name(n.name, prefix), cast_plans)
        p = cast_plans.get(qname)
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        if p is None or to != getattr(onnx.TensorProto, p.dtype):
            continue
        back = [c for c in consumers.get(n.output[0], []) if c.op_type == "Cast"]
        if len(back) != 1:
            continue
        rec = out.setdefault(qname, {"op": "cast", "uses": []})
        sfx = f"_{len(rec['uses'])}" if rec["uses"] else ""
        n.name, back[0].name = f"{qname}/Cast_to{sfx}", f"{qname}/Cast_back{sfx}"
        rec["uses"].append({"nodes": [n.name, back[0].name], "input": n.input[0], "output": back[0].output[0]})
    for rec in out.values():
        _summarize(rec)
    _drop_dead(proto, new_inits)
    return out


def _drop_dead(proto, new_inits) -> None:
    """Replace the exporter's scale/zero-point initializers by ``new_inits`` and remove nodes and
    initializers nothing reads any more (the Identity copies of deduplicated buffers)."""
    g = proto.graph
    keep_inits = [i for i in g.initializer if "._qdq_" not in i.name]
    del g.initializer[:]
    g.initializer.extend(keep_inits + list(new_inits))
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | outputs
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)


def _summarize(rec: dict[str, Any]) -> dict[str, Any]:
    rec["nodes"] = [n for u in rec["uses"] for n in u["nodes"]]
    rec["input"], rec["output"] = rec["uses"][0]["input"], rec["uses"][0]["output"]
    return rec


_ROLE = re.compile(r"(Clip|QuantizeLinear|DequantizeLinear|Cast_to|Cast_back)(?:_(\d+))?")


def graph_quantizers(proto) -> dict[str, dict[str, Any]]:
    """Quantizers found in a QDQ model written by :func:`export_onnx`, by the node names it gives them:
    ``{name: {"op": "qdq"|"cast", "uses": [{"nodes", "input", "output"}, ...], "nodes": [...], "input",
    "output"}}`` (one use per call of the quantizer; ``input``/``output`` those of the first)."""
    out: dict[str, dict[str, Any]] = {}
    names = {n.name for n in proto.graph.node}
    for n in proto.graph.node:
        if "/" not in n.name:
            continue
        qname, role = n.name.rsplit("/", 1)
        m = _ROLE.fullmatch(role)
        if m is None:
            continue
        kind, k = m.group(1), int(m.group(2) or 0)
        if kind == "Clip" and f"{qname}/QuantizeLinear{'_' + m.group(2) if m.group(2) else ''}" not in names:
            continue  # the model's own clamp (ReLU6, hardtanh, F.normalize): torch names it "/<scope>/Clip"
        rec = out.setdefault(qname, {"op": "cast" if kind.startswith("Cast") else "qdq", "uses": []})
        while len(rec["uses"]) <= k:
            rec["uses"].append({"nodes": [], "input": None, "output": None})
        use = rec["uses"][k]
        use["nodes"].append(n.name)
        if kind in ("Clip", "Cast_to") or (kind == "QuantizeLinear" and use["input"] is None):
            use["input"] = n.input[0]
        if kind in ("DequantizeLinear", "Cast_back"):
            use["output"] = n.output[0]
    return {q: _summarize(rec) for q, rec in out.items()}


def check_model(proto) -> dict[str, Any]:
    """``onnx.checker`` (full check, with shape inference) on ``proto``; returns ``{"ok": True}`` or
    raises :class:`ExportError` with the checker's message."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise ExportError(f"exported ONNX model fails onnx.checker: {e}") from e
    return {"ok": True, "onnx": onnx.__version__, "opset": next(i.version for i in proto.opset_import
                                                                  if i.domain in ("", "ai.onnx"))}


#: onnxruntime graph rewrites that change a QDQ model's values (measured on this repo's models, CPU EP):
#: ``QDQS8ToU8Transformer`` rewrites int8 activations to uint8 (zero point +128) for ORT's u8s8 GEMM
#: kernels, whose 16-bit pair sums saturate on x86 (the ORT-documented u8s8 caveat): 0.3-0.4 % of top-1
#: flips on the demo ViT (fmnist_w8a8_ft2). ``WeightBiasQuantization`` adds an int32-quantized bias
#: (scale s_x * s_w) to each DQ->Conv/Gemm: random-weight ResNet-18 logits at 32 dB SQNR against the
#: fake-quant model with it, 133 dB without (no int32 overflow: max |b| / (s_x s_w) was 2.6e4; cause not
#: pinned down). With both disabled every other fusion and integer kernel still runs.
VALUE_CHANGING_REWRITES = ("QDQS8ToU8Transformer", "WeightBiasQuantization")


def ort_session(model_bytes: bytes, threads: int = 1, optimization: str = "all", provider: str = "cpu",
                save_optimized: Optional[str] = None):
    """An onnxruntime session on ``model_bytes``. ``optimization``: disable / basic / extended / all
    (``all`` fuses QDQ pairs into integer kernels: QLinearConv, QLinearMatMul, MatMulInteger...).
    ``provider``: cpu, cuda or tensorrt (the provider must be installed). ``save_optimized``: a path
    the optimized graph is written to (what the optimizer fused)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "all-exact": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "no-qdq-fusion": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ExportError(f"optimization: {optimization!r} is not one of {sorted(levels)}")
    so.graph_optimization_level = levels[optimization]
    if optimization == "no-qdq-fusion":  # every other fusion, but Q/DQ stay float ops (no integer kernels)
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if save_optimized:
        so.optimized_model_filepath = save_optimized
        so.log_severity_level = 3  # the hardware-specific-serialization notice
    disabled = list(VALUE_CHANGING_REWRITES) if optimization == "all-exact" else None
    providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}[provider]
    return ort.InferenceSession(model_bytes, so, providers=providers, disabled_optimizers=disabled)


def float_graph(proto, float_weights: Optional[dict[str, np.ndarray]] = None):
    """A copy of a QDQ model with every quantizer's nodes removed (consumers read the quantizer's input
    again): the float model whose tensor names AIMET/QNN encodings and TensorRT range tables refer to.
    Encodings and range tables are keyed by tensor and apply to every reader of it, so a quantizer
    gets a tensor of its own, an ``Identity`` output named ``<quantizer>.input``, where its tensor is
    also read by another quantizer (a block input feeding a conv and its shortcut conv: the second
    one) or by a float op (the residual add beside the block's first conv). ``float_weights``
    (:attr:`OnnxExport.float_weights`) puts back the FP32 values of weights model.onnx writes on their
    grid. Returns ``(model, {quantizer: [tensor name per use]})``."""
    from onnx import helper, numpy_helper

    proto = copy.deepcopy(proto)
    g = proto.graph
    for init in g.initializer:
        if float_weights and init.name in float_weights:
            init.CopyFrom(numpy_helper.from_array(float_weights[init.name], init.name))
    found = graph_quantizers(proto)
    drop_nodes = {n for rec in found.values() for n in rec["nodes"]}
    # tensors a float op reads directly (not through a quantizer), or that the graph outputs
    read_float = {i for n in g.node if n.name not in drop_nodes for i in n.input} | {o.name for o in g.output}
    rename: dict[str, str] = {}
    tensor_of: dict[str, str] = {}
    taken: set[str] = set()
    new_nodes = []
    # a quantizer may read another one's output (a residual add's input quantizer after a GEMM's
    # output quantizer): follow such chains back to the float tensor both stand for
    raw = {use["output"]: use["input"] for rec in found.values() for use in rec["uses"]}

    def source(name: str) -> str:
        seen = set()
        while name in raw and name not in seen:
            seen.add(name)
            name = raw[name]
        return name

    for qname, rec in found.items():
        for use in rec["uses"]:
            src = source(use["input"])
            if src in taken or src in read_float:
                new = f"{qname}.input{'_' + str(len(tensor_of.get(qname, []))) if tensor_of.get(qname) else ''}"
                new_nodes.append(helper.make_node("Identity", [src], [new], name=f"{new}/Identity"))
                src = new
            taken.add(src)
            rename[use["output"]] = src
            tensor_of.setdefault(qname, []).append(src)
    kept = [n for n in g.node if n.name not in drop_nodes]
    for n in kept:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    for o in g.output:
        if o.name in rename:  # a quantizer on the model output: keep the output name via Identity
            new_nodes.append(helper.make_node("Identity", [rename[o.name]], [o.name]))
    del g.node[:]
    g.node.extend(new_nodes + kept)
    _topo_sort(g)
    used = {i for n in g.node for i in n.input}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    del g.value_info[:]
    return proto, tensor_of


def _topo_sort(g) -> None:
    """Order ``g.node`` so every node follows the producers of its inputs (ONNX requires it)."""
    produced = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    nodes = list(g.node)
    out = []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in produced for i in n.input):
                out.append(n)
                produced.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):
            # our own graph surgery left a dangling name: a bug, not a user mistake (exit 1, traceback)
            raise RuntimeError(f"float graph: {len(rest)} nodes with unresolved inputs (first {rest[0].name})")
        nodes = rest
    del g.node[:]
    g.node.extend(out)


def save_model(proto, path: str) -> None:
    """Write ``proto`` to a local path or s3:// URI (one file; weights inline, < 2 GiB)."""
    from ..io import storage

    storage.write_bytes(path, proto.SerializeToString())


__all__ = ["DEFAULT_OPSET", "VALUE_CHANGING_REWRITES", "ExportError", "OnnxExport", "QdqSpec", "check_model", "export_onnx", "float_graph", "grid_plans",
           "graph_quantizers", "ort_session", "plan_export", "qdq_export", "quantizer_qdq", "save_model"]
