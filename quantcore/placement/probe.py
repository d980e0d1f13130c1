"""One forward on an example input that records what the model really computes.

Every module gets temporary hooks and a ``TorchFunctionMode`` records each op with the stack of
running modules, the tensors it reads (by identity) and the parameters it uses. Placement
(:mod:`quantcore.placement.core`) derives its plan from this trace, and BatchNorm folding
(:mod:`quantcore.fold`) proves each ``conv -> bn`` pair on the data flow it shows, whatever the
model's Python looks like (shape-dependent branches included; ``torch.fx`` is not needed).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .intercept import (BADDBMM_OPS, EINSUM_OPS, MATMUL_OPS, SDPA_OPS, SEE_THROUGH, SOFTMAX_OPS,
                        TRANSPOSED_CONV_OPS, WEIGHTED_OPS, constant_operand, einsum_operands, is_param_like,
                        module_tensors, output_axis, row_slice_base, see_through, two_operands, weighted_args,
                        weighted_bias)

#: ops a tensor passes through with its values unchanged at inference (dropout is the identity in eval;
#: a cast keeps what a quantizer grid sees; a transpose or reshape only moves them, and a per-tensor
#: grid commutes with moving): softmax output -> these -> attn@v's operand is "the probabilities"
PASS_THROUGH = {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d",
                "to", "type", "type_as", "float", "half", "bfloat16", "contiguous", "clone", "detach",
                "transpose", "transpose_", "permute", "t", "swapaxes", "swapdims", "movedim", "view", "reshape",
                "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "__get__"}

# Ops that read tensor metadata only: never a data-flow use.
_METADATA = {"__get__", "size", "dim", "stride", "numel", "is_contiguous", "__len__", "is_floating_point",
             "element_size", "data_ptr", "storage_offset", "is_complex", "get_device", "__format__",
             "__repr__", "nelement", "ndimension", "has_names", "is_nonzero"}

Frame = tuple[str, int]  # (module name, call index of that module)


@dataclass
class OpEvent:
    kind: str  # weighted | transposed_conv | matmul_act | matmul_param | softmax | sdpa | einsum | other
    func: str
    stack: tuple[Frame, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    op: str = ""
    weight: Optional[str] = None  # parameter name of the weight argument (weighted ops)
    bias: Optional[str] = None
    weight_param_like: bool = False  # weight is a parameter view (weight.T), not the parameter
    seq: int = 0  # position in the trace (calls and ops share one counter)
    operands: tuple[int, ...] = ()  # matmul_act: ids of its two activation operands, in order
    params: tuple[str, ...] = ()  # other ops: the parameters among the inputs, also as views (weight.t())
    storages: tuple[Optional[int], ...] = ()  # storage address of each output (aliases share one)
    mutates: Optional[int] = None  # in-place ops (mul_, copy_, x[i] = ..., out=): the storage they write
    lossless: bool = True  # casts: the output dtype represents every input value (float16 -> float32)
    # an input depends on the model input (not parameters/buffers/constants only); None: not known (an op
    # dynamo traced while compiling, whose tensor ids are fake)
    from_input: Optional[bool] = None
    # matmul_param ``x @ view(p)`` (data first, one parameter second): p's axis that becomes the output's
    # last axis (its output channel), None when no single axis does
    weight_axis: Optional[int] = None
    param_operand: Optional[int] = None  # matmul_param: which operand (0/1) is the parameter
    # two-operand matmul/einsum: each operand as the run-time interception can tell it, ("p", "") (a
    # parameter or a view of one), ("b", holder) (a buffer or plain tensor attribute of module holder, or
    # a view of one) or the tensor's id (see intercept.constant_operand)
    operand_src: tuple = ()


@dataclass
class CallEvent:
    name: str
    index: int
    stack: tuple[Frame, ...]  # enclosing frames, this call's frame last
    inputs: tuple[int, ...]
    outputs: tuple[int, ...] = ()
    seq: int = 0


@dataclass
class Trace:
    ops: list[OpEvent] = field(default_factory=list)
    calls: list[CallEvent] = field(default_factory=list)
    call_counts: dict[str, int] = field(default_factory=dict)
    param_names: dict[int, list[str]] = field(default_factory=dict)  # a tied parameter has several
    model_inputs: tuple[int, ...] = ()
    keep: list[Any] = field(default_factory=list)  # conv outputs kept alive: their ids stay unique
    probs: set[int] = field(default_factory=set)  # softmax outputs and what PASS_THROUGH ops make of them
    # weights computed in forward (no parameter), in call order: (caller, shape, sum, sum of squares);
    # compared across two inputs to tell a weight computed from the input (CondConv) from one
    # computed from parameters only (weight standardization)
    derived: list[tuple[str, tuple[int, ...], float, float]] = field(default_factory=list)
    # ids of tensors computed from the model input (a freed id a later op reuses is set again by it)
    tainted: set[int] = field(default_factory=set)
    buffer_ids: dict[int, str] = field(default_factory=dict)  # intercept.module_tensors of the model
    constant_products: set[int] = field(default_factory=set)  # ids of matmul/einsum products of constants
    # tensors the forward left on a module as a plain attribute (``self.feat = y``, also in a list/dict
    # there), by id and by the id of the tensor they view: read after the forward, by a caller
    stashed: dict[int, str] = field(default_factory=dict)
    counter: int = 0

    def next_seq(self) -> int:
        self.counter += 1
        return self.counter

    def calls_of(self, name: str) -> list[CallEvent]:
        return [c for c in self.calls if c.name == name]


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside ``obj``: pytree containers (tuple, list, dict, namedtuple, registered types)
    and, beyond what pytree sees, dataclasses, mappings and plain objects' attributes, so a model that
    returns ``@dataclass Out(logits, features)`` has its features seen (a fold must not change them)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(o: Any, depth: int) -> None:
        if isinstance(o, torch.Tensor):
            found.append(o)
            return
        if depth > 8 or id(o) in seen or isinstance(o, (str, bytes, int, float, bool, type(None), nn.Module)):
            return
        seen.add(id(o))
        leaves, _ = tree_flatten(o)
        if len(leaves) != 1 or leaves[0] is not o:  # a container pytree knows
            for leaf in leaves:
                walk(leaf, depth + 1)
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            for f in dataclasses.fields(o):
                walk(getattr(o, f.name, None), depth + 1)
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v, depth + 1)
        elif hasattr(o, "__dict__") and not callable(o):
            for v in vars(o).values():
                walk(v, depth + 1)

    walk(obj, 0)
    return found


def _tensor_ids(obj: Any) -> tuple[int, ...]:
    """Tensors of a torch op's arguments/result (pytree containers: what ops take and give)."""
    leaves, _ = tree_flatten(obj)
    return tuple(id(t) for t in leaves if isinstance(t, torch.Tensor))


def _deep_ids(obj: Any) -> tuple[int, ...]:
    """Tensors of a module call's arguments/output, dataclasses and plain objects included."""
    return tuple(id(t) for t in tensor_leaves(obj))


def _func_name(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


def _storage(t: Any) -> Optional[int]:
    if torch.compiler.is_compiling():  # traced by dynamo (flex_attention's kernel): no real storage
        return None
    try:
        return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
    except (RuntimeError, NotImplementedError, TypeError):  # no storage (meta, sparse, wrapper tensors)
        return None


_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                    "__imatmul__"}
_CASTS = {"to", "type", "type_as", "float", "half", "bfloat16", "double"}


def _mutated(name: str, args: tuple, kwargs: dict) -> Optional[int]:
    """The storage an in-place op writes (None for other ops); moves in place (``transpose_``) write no value."""
    if "out" in kwargs and isinstance(kwargs["out"], torch.Tensor):
        return _storage(kwargs["out"])
    inplace = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))
    return _storage(args[0]) if inplace and name not in PASS_THROUGH and args else None


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace, stack: list[Frame]) -> None:
        super().__init__()
        self.trace = trace
        self.stack = stack

    def _src(self, t: Any) -> Any:
        """An operand as the run-time interception tells it (:func:`~.intercept.constant_operand`)."""
        kind = constant_operand(t, self.trace.buffer_ids)
        return kind if kind is not None else id(t)

    def _keep_constant_product(self, ev: OpEvent, out: Any) -> None:
        """A product of parameters, buffers and such products is kept alive: placement follows it by id
        (:func:`~.core._attention_seq`), and a freed id reused by a data tensor would make that one a constant."""
        products = self.trace.constant_products
        if ev.operand_src and all(isinstance(s, tuple) or s in products for s in ev.operand_src):
            self.trace.keep.append(out)
            products.update(ev.outputs)

    def __torch_function__(self, func, types_, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func in SEE_THROUGH:
            with self:
                return see_through(func)(*args, **kwargs)
        out = func(*args, **kwargs)
        name = _func_name(func)
        if name in _METADATA:
            if name == "__get__" and isinstance(out, torch.Tensor) and not torch.compiler.is_compiling():
                # x.T / x.mT / x.data of data is data, of a buffer is not (its id may be a freed tensor's)
                tainted = any(i in self.trace.tainted for i in _tensor_ids(args))
                (self.trace.tainted.add if tainted else self.trace.tainted.discard)(id(out))
            return out
        caller = self.stack[-1][0] if self.stack else ""

        def pname(t: Any) -> Optional[str]:
            """The parameter's name, preferring the one inside the calling module (tied weights)."""
            found = self.trace.param_names.get(id(t))
            if not found:
                return None
            inside = [n for n in found if not caller or n.startswith(caller + ".")]
            return (inside or found)[0]

        ev = OpEvent("other", name, tuple(self.stack), _tensor_ids((args, kwargs)), _tensor_ids(out),
                     seq=self.trace.next_seq())
        ev.storages = tuple(_storage(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        ev.mutates = _mutated(name, args, kwargs)
        if not torch.compiler.is_compiling():  # traced by dynamo (flex_attention's kernel): ids are fake
            ev.from_input = any(i in self.trace.tainted for i in ev.inputs)
            (self.trace.tainted.update if ev.from_input else self.trace.tainted.difference_update)(ev.outputs)
            if ev.from_input and ev.mutates is not None:
                # data written into a tensor (buf[:, :n] = x, out=, add_): the tensor holds data from now on
                written = kwargs.get("out") if isinstance(kwargs.get("out"), torch.Tensor) else (args[0] if args else None)
                if isinstance(written, torch.Tensor):
                    self.trace.tainted.add(id(written))
        if name in _CASTS and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            a, b = args[0].dtype, out.dtype
            ev.lossless = a == b or (a.is_floating_point == b.is_floating_point and torch.promote_types(a, b) == b)
        if func in WEIGHTED_OPS:
            x, w, _, _ = weighted_args(args, kwargs)
            ev.kind, ev.op = "weighted", WEIGHTED_OPS[func]
            ev.inputs = _tensor_ids((x, w, args[2:], kwargs))  # the data input first
            ev.weight = pname(w)
            if ev.weight is None and row_slice_base(w) is not None:  # rows of a parameter: its site
                ev.weight = pname(row_slice_base(w))
            ev.weight_param_like = ev.weight is None and is_param_like(w)
            if ev.weight is None and not ev.weight_param_like and isinstance(w, torch.Tensor):
                w64 = w.detach().double()
                self.trace.derived.append((caller, tuple(w.shape), float(w64.sum()), float((w64 * w64).sum())))
            b = weighted_bias(args, kwargs)
            ev.bias = pname(b) if b is not None else None
        elif func in TRANSPOSED_CONV_OPS:
            ev.kind, ev.op = "transposed_conv", name
            ev.weight = pname(args[1]) if len(args) > 1 else None
        elif func in MATMUL_OPS or func in BADDBMM_OPS:
            i, j = (1, 2) if func in BADDBMM_OPS else (0, 1)
            a, b = args[i], args[j]
            if is_param_like(a) or is_param_like(b):
                ev.kind = "matmul_param"
                p = a if is_param_like(a) else b
                ev.weight = pname(p) or pname(getattr(p, "_base", None))
                if is_param_like(a) and is_param_like(b):
                    ev.op = "params"  # a product of parameters alone (LoRA's B @ A): a weight computation
                else:
                    ev.param_operand = 0 if is_param_like(a) else 1
                    ev.operands = (id(a), id(b))
                    ev.from_input = (None if torch.compiler.is_compiling()
                                     else id(b if ev.param_operand == 0 else a) in self.trace.tainted)
                    if ev.param_operand == 1 and func not in BADDBMM_OPS:
                        ev.weight_axis = output_axis(b)
            else:
                ev.kind = "matmul_act"
                ev.operands = (id(a), id(b))
        elif func in SOFTMAX_OPS:
            ev.kind = "softmax"
            self.trace.keep.append(out)  # followed to the matmul that consumes it: its id stays unique
            self.trace.probs.update(ev.outputs)
        elif ev.func in PASS_THROUGH and ev.inputs and ev.inputs[0] in self.trace.probs:
            self.trace.keep.append(out)  # the probabilities moved or cast: followed too, so kept alive (a
            self.trace.probs.update(ev.outputs)  # freed view's id is reused by a later, unrelated tensor)
        elif func in SDPA_OPS:
            ev.kind = "sdpa"
        elif func in EINSUM_OPS:
            ein = einsum_operands(args)
            if ein is not None and not any(is_param_like(o) for o in ein[1]):
                ev.kind = "matmul_act"  # a two-operand einsum of activations is a batched matmul
                ev.operands = tuple(id(o) for o in ein[1])
            elif ein is not None:
                ev.kind = "matmul_param"
                p = next(o for o in ein[1] if is_param_like(o))
                ev.weight = pname(p) or pname(getattr(p, "_base", None))
            else:
                ev.kind = "einsum"
        ev.operand_src = tuple(self._src(t) for t in two_operands(func, args))
        self._keep_constant_product(ev, out)
        if ev.kind == "other":
            found = []
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    n = pname(t) or (pname(t._base) if t._base is not None else None)
                    if n is not None:
                        found.append(n)
            ev.params = tuple(dict.fromkeys(found))
        self.trace.ops.append(ev)
        return out


def _record_stashed(model: nn.Module, trace: Trace) -> None:
    """:attr:`Trace.stashed`: plain tensor attributes of the modules after the forward (one level into
    lists, tuples and dicts), a hook's or a forward's saved features."""
    for name, mod in model.named_modules():
        for attr, v in vars(mod).items():
            if attr.startswith("_"):
                continue  # _parameters, _buffers, _modules and the module's own bookkeeping
            items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,)
            for t in items:
                if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                    where = f"{name}.{attr}" if name else attr
                    trace.stashed.setdefault(id(t), where)
                    if t._base is not None:
                        trace.stashed.setdefault(id(t._base), where)


@torch.no_grad()
def run_probe(model: nn.Module, example_input: Any) -> tuple[Trace, Any]:
    """Run ``model`` once on ``example_input`` (a tensor, or a tuple of positional inputs) and record
    it. Returns the trace and the model's output."""
    trace = Trace()
    for name, p in model.named_parameters(remove_duplicate=False):
        trace.param_names.setdefault(id(p), []).append(name)
    trace.buffer_ids = module_tensors(model)
    stack: list[Frame] = []
    handles = []
    names = {}
    for name, mod in model.named_modules():
        names[id(mod)] = name

    def pre(mod, args, kwargs):
        name = names.get(id(mod))
        if name is None:
            return None
        idx = trace.call_counts.get(name, 0)
        trace.call_counts[name] = idx + 1
        stack.append((name, idx))
        trace.calls.append(CallEvent(name, idx, tuple(stack), _deep_ids((args, kwargs)), seq=trace.next_seq()))
        if isinstance(mod, _BatchNorm):  # fold matches a BN's input id to a conv output: a freed input's
            trace.keep.append(args)     # address must not be reused by a later conv's output

        return None

    def post(mod, args, kwargs, output):
        name = names.get(id(mod))
        if name is None or not stack:
            return None
        frame = stack.pop()
        for c in reversed(trace.calls):
            if (c.name, c.index) == frame:
                c.outputs = _deep_ids(output)
                break
        if isinstance(mod, _ConvNd):  # fold asks who reads a conv's output: its id must stay unique
            trace.keep.append(output)
        return None

    for mod in model.modules():
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True, always_call=True))
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    trace.model_inputs = _deep_ids(inputs)
    trace.tainted.update(trace.model_inputs)
    try:
        with _Recorder(trace, stack):
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    _record_stashed(model, trace)
    return trace, out


def input_dependent_weights(model: nn.Module, example_input: Any, trace: Trace) -> set[str]:
    """The modules whose forward computes a weight from the model's input (CondConv's routed kernels,
    dynamic convolution): the weights ``trace`` recorded, compared with those of a second run on
    another input of the same shape (a weight computed from parameters only, as weight
    standardization, is the same on both). Empty, at no cost, when no weight is computed."""
    if not trace.derived:
        return set()
    g = torch.Generator().manual_seed(1234)

    def other(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return torch.randn(t.shape, generator=g, dtype=torch.float32).to(t) * 1.5 + 0.25
        return t

    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    leaves, spec = tree_flatten(inputs)
    second, _ = run_probe(model, tuple(tree_unflatten([other(t) for t in leaves], spec)))

    def per_caller(tr: Trace) -> dict[str, list[tuple]]:
        out: dict[str, list[tuple]] = {}
        for caller, *fp in tr.derived:
            out.setdefault(caller, []).append(tuple(fp))
        return out

    a, b = per_caller(trace), per_caller(second)
    return {c for c in a if a[c] != b.get(c)}


def model_outputs(out: Any) -> list[torch.Tensor]:
    """Every floating-point tensor of a model output (tensor, tuple, namedtuple, dict, HF ModelOutput):
    a fold must keep features and auxiliary outputs too, not only the logits."""
    if isinstance(out, dict):  # HF ModelOutput is an OrderedDict
        out = list(out.values())
    return [t.detach() for t in tensor_leaves(out) if t.is_floating_point()]
