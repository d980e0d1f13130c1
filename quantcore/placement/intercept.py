"""Quantization by intercepting ops, not by replacing modules.

A prepared model keeps every one of its modules and their ``forward`` methods. Quantizers are
registered as submodules of the module that owns the weight (``blocks.0.attn.qkv.input_quantizer``)
or of the module whose forward computes attention (``blocks.0.attn.q_quantizer``), and a
``TorchFunctionMode`` is active while such a module runs. The mode sees the torch ops the module's own
forward calls, whatever that forward looks like:

* weighted ops (``F.linear``, ``F.conv1d/2d/3d``): input, weight and (optionally) output quantizers
  are applied to the tensors the op really receives, so a ``Linear`` subclass that scales its weight,
  timm's ``StdConv2d`` (standardized weight) or ``Conv2dSame`` (padding in forward) are quantized as
  they compute;
* attention: ``F.scaled_dot_product_attention`` is decomposed (only while one of its quantizers acts)
  into ``softmax(q k^T * scale + mask) v`` with quantizers on q, k, the logits, the probabilities (as
  softmax makes them, before any dropout) and v; the explicit form (an activation x activation matmul
  or two-operand einsum, a softmax, a second one, as timm's non-fused path, Hugging Face's eager
  attention, torchvision Swin and MaxViT, LeViT) gets the same quantizers;
* ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) is run with torch's own code while
  the mode stays active inside it, so its in/out projections and attention are seen as above.

Which op of which module gets which quantizers is decided once, by a probe forward on an example
input (:mod:`quantcore.placement.probe`), and stored on each calling module as a small plan of names
(``_qc_plan``): plain data, so ``copy.deepcopy``, pickling and ``state_dict`` are unaffected.

While none of a module's quantizers changes or observes a tensor, its forward runs without the mode
(bit-identical to the float model, fused kernels included).
"""
from __future__ import annotations

import math
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..quantizer import TensorQuantizer

#: Attention quantizer attribute names, in execution order.
ATTENTION_QUANTIZERS = ("q_quantizer", "k_quantizer", "softmax_input_quantizer", "attn_quantizer",
                        "v_quantizer")

# -- op classification -----------------------------------------------------------------------------
WEIGHTED_OPS: dict[Callable, str] = {F.linear: "linear", torch.conv1d: "conv1d", torch.conv2d: "conv2d",
                                      torch.conv3d: "conv3d"}
TRANSPOSED_CONV_OPS = {torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}
MATMUL_OPS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
              torch.mm, torch.Tensor.mm}
BADDBMM_OPS = {torch.baddbmm, torch.Tensor.baddbmm}
SOFTMAX_OPS = {F.softmax, torch.softmax, torch.Tensor.softmax}
SDPA_OPS = {F.scaled_dot_product_attention}
EINSUM_OPS = {torch.einsum}
# Python-level torch functions whose body the mode must see into (they dispatch __torch_function__ on
# entry, which would otherwise hide their inner ops).
SEE_THROUGH = {F.multi_head_attention_forward}


def _no_torch_function(*_a, **_k) -> bool:
    return False


_see_through_cache: dict[Callable, Callable] = {}


def see_through(func: Callable) -> Callable:
    """``func`` with its entry ``has_torch_function`` checks answering False (a copy of the function
    object with patched globals; torch's own code, nothing else changes). Inner ops still dispatch to
    the active mode."""
    out = _see_through_cache.get(func)
    if out is None:
        g = dict(func.__globals__)
        for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
            g[name] = _no_torch_function
        out = types.FunctionType(func.__code__, g, func.__name__, func.__defaults__, func.__closure__)
        out.__kwdefaults__ = func.__kwdefaults__
        _see_through_cache[func] = out
    return out


def is_param_like(t: Any) -> bool:
    """A parameter or a view of one (``weight.T``)."""
    if isinstance(t, nn.Parameter):
        return True
    base = getattr(t, "_base", None)
    return isinstance(base, nn.Parameter)


def module_tensors(module: nn.Module, prefix: str = "") -> dict[int, str]:
    """Ids of the tensors ``module`` and its submodules hold that are not parameters: buffers, and plain
    tensor attributes (a lookup table cached on a first call, ``self.lut = ...``), mapped to the holding
    module's name (``prefix``-qualified). What an attention's forward may multiply as a constant."""
    out: dict[int, str] = {}
    for name, m in module.named_modules(prefix=prefix):
        for b in m._buffers.values():
            if b is not None:
                out.setdefault(id(b), name)
        for attr, v in vars(m).items():
            if not attr.startswith("_") and isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                out.setdefault(id(v), name)
    return out


def constant_operand(t: Any, held: dict[int, str]) -> Optional[tuple[str, str]]:
    """``("p", "")`` for a parameter or a view of one, ``("b", holder)`` for a tensor in ``held``
    (:func:`module_tensors`) or a view of one, else None: what an attention's run-time interception can
    tell of a matmul operand, and what the probe records of it, so that both call the same ops constant
    (:class:`ModulePlan`.skip_constant)."""
    if is_param_like(t):
        return ("p", "")
    owner = held.get(id(t))
    if owner is None:
        owner = held.get(id(getattr(t, "_base", None)))
    return ("b", owner) if owner is not None else None


def param_of(t: Any) -> Optional[nn.Parameter]:
    """The parameter ``t`` is or views (``p.transpose(-1, -2)``), else None."""
    if isinstance(t, nn.Parameter):
        return t
    base = getattr(t, "_base", None)
    return base if isinstance(base, nn.Parameter) else None


def output_axis(view: torch.Tensor) -> Optional[int]:
    """The axis of the parameter that ``view`` (the second operand of ``x @ view``) puts last, i.e. the
    matmul's output channels (0 for ``x @ p.T``, as ``F.linear``; -1 for ``x @ p``), or None when no
    single axis of a contiguous parameter does. A per-channel weight range must be on that axis: an
    integer GEMM can rescale output channels, not the reduction axis."""
    p = param_of(view)
    if p is None or not p.is_contiguous() or view.dim() < 2:
        return None  # x @ u with a vector u reduces over u's only axis: no output channel is u's
    if view is p:
        return p.dim() - 1
    axes = [d for d in range(p.dim()) if p.stride(d) == view.stride(-1) and p.size(d) == view.size(-1)]
    return axes[0] if len(axes) == 1 else None


def quantized_view(quantized: torch.Tensor, view: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``view`` (a view of the parameter ``base``, laid out in memory any way) taken of ``quantized``, the
    quantized ``base``: the same strides and offset, read from a copy laid out as ``base`` is."""
    if view is base:
        return quantized
    if quantized.stride() != base.stride() or quantized.storage_offset() != 0:
        quantized = torch.empty_strided(base.size(), base.stride(), dtype=quantized.dtype,
                                        device=quantized.device).copy_(quantized)
    return quantized.as_strided(view.size(), view.stride(), view.storage_offset() - base.storage_offset())


def row_slice_base(t: Any) -> Optional[nn.Parameter]:
    """The parameter ``t`` is a slice of along its first axis (``w.split``/``chunk``/``w[a:b]`` of a
    contiguous parameter: ``nn.MultiheadAttention``'s packed in-projection when query is not key),
    else None. Such a slice's rows are the parameter's rows, so quantizing the parameter (per tensor,
    or per channel on axis 0) and slicing the result is the slice quantized with the parameter's grid.
    A transposed or otherwise strided view is not one."""
    base = getattr(t, "_base", None)
    if not isinstance(base, nn.Parameter) or not base.is_contiguous() or not t.is_contiguous():
        return None
    if t.dim() != base.dim() or tuple(t.shape[1:]) != tuple(base.shape[1:]):
        return None
    return base


def take_rows(quantized: torch.Tensor, view: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The rows of ``quantized`` (the quantized ``base``) that ``view`` holds (see :func:`row_slice_base`)."""
    start = (view.storage_offset() - base.storage_offset()) // max(1, base.stride(0))
    return quantized.contiguous().narrow(0, start, view.shape[0])


def weighted_args(args: tuple, kwargs: dict) -> tuple[Any, Any, tuple, dict]:
    """``(input, weight, other positional args, other kwargs)`` of a linear/conv call, whether the
    input and weight were passed by position or by keyword (``F.linear(x, weight=w)``)."""
    kwargs = dict(kwargs)
    x = args[0] if len(args) > 0 else kwargs.pop("input", None)
    w = args[1] if len(args) > 1 else kwargs.pop("weight", None)
    return x, w, tuple(args[2:]), kwargs


def weighted_bias(args: tuple, kwargs: dict) -> Any:
    return args[2] if len(args) > 2 else kwargs.get("bias")


def matmul_operands(func: Callable, args: tuple) -> tuple[int, int] | None:
    if func in MATMUL_OPS:
        return (0, 1)
    if func in BADDBMM_OPS:
        return (1, 2)
    return None


def einsum_operands(args: tuple) -> tuple[str, list] | None:
    """``(equation, [a, b])`` of a two-operand ``torch.einsum`` call (either calling form), else None."""
    if not args or not isinstance(args[0], str):
        return None
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if len(ops) != 2 or not all(isinstance(o, torch.Tensor) for o in ops):
        return None
    return args[0], ops


def two_operands(func: Callable, args: tuple) -> tuple:
    """The two operands of a matmul/bmm/baddbmm or two-operand einsum call, else ``()``."""
    ops = matmul_operands(func, args)
    if ops is not None:
        return (args[ops[0]], args[ops[1]]) if len(args) > ops[1] else ()
    if func in EINSUM_OPS:
        ein = einsum_operands(args)
        return tuple(ein[1]) if ein is not None else ()
    return ()


# -- plans ----------------------------------------------------------------------------------------
@dataclass
class WeightedSite:
    """One weighted op of a calling module. ``param``: path of the weight parameter relative to the
    caller (identity match), or None for a derived weight (matched by order among derived ops).
    Quantizers live on ``owner`` (relative path, "" = the caller) as ``{prefix}input_quantizer``,
    ``{prefix}weight_quantizer``, ``{prefix}output_quantizer``."""

    param: Optional[str]
    owner: str
    prefix: str
    op: str


@dataclass
class ModulePlan:
    """What the mode does inside one module's forward (the module is the innermost running one)."""

    weighted: list[WeightedSite] = field(default_factory=list)
    attention: bool = False  # quantizers on the module itself (ATTENTION_QUANTIZERS)
    probs_at_matmul: bool = False  # attn_quantizer on attn@v's operand (the probabilities change after softmax)
    probs_operand: int = 0  # which operand of attn@v holds the probabilities (1: v @ attn^T, LeViT conv mode)
    # the forward also multiplies constants (timm RelPosBiasTf's einsum lookups of its bias table, MaxViT
    # *_tf): a matmul/einsum whose operands are parameters, the module's buffers or such products is run
    # as it is and not counted, so q @ k^T is still the first matmul on data
    skip_constant: bool = False

    def quantizer_refs(self) -> list[tuple[str, str]]:
        refs = [(s.owner, f"{s.prefix}{k}") for s in self.weighted
                for k in ("input_quantizer", "weight_quantizer", "output_quantizer")]
        if self.attention:
            refs += [("", a) for a in ATTENTION_QUANTIZERS]
        return refs


def _get(mod: nn.Module, path: str) -> nn.Module:
    return mod.get_submodule(path) if path else mod


def _quantizer(mod: nn.Module, owner: str, attr: str) -> Optional[TensorQuantizer]:
    q = _get(mod, owner)._modules.get(attr)
    return q if isinstance(q, TensorQuantizer) else None


def _busy(q: Optional[TensorQuantizer]) -> bool:
    return q is not None and (q.calibrating or q.active or q.observe)


# -- runtime contexts -------------------------------------------------------------------------------
class _Ctx:
    """One running call of a hooked module."""

    __slots__ = ("module", "plan", "by_param", "derived", "n_derived", "phase", "cycles", "quant", "buffer_ids",
                 "const")

    def __init__(self, module: nn.Module, plan: Optional[ModulePlan]) -> None:
        self.module = module
        self.plan = plan
        self.by_param: dict[int, WeightedSite] = {}
        self.derived: list[WeightedSite] = []
        self.n_derived = 0
        self.phase = 0  # explicit attention: 0 expect q@k, 1 expect softmax, 2 expect attn@v
        self.cycles = 0
        self.quant: dict[str, Optional[TensorQuantizer]] = {}
        self.buffer_ids: dict[int, str] = {}
        self.const: dict[int, torch.Tensor] = {}  # products of constants in this call (kept alive: ids unique)
        if plan is not None and plan.skip_constant:
            # this module's own tensors only, as placement counts them (_attention_seq)
            self.buffer_ids = module_tensors(module)
        if plan is not None:
            for s in plan.weighted:
                if s.param is None:
                    self.derived.append(s)
                else:
                    # the tensor the forward will read (torch.func.functional_call swaps parameters
                    # for plain tensors, which get_parameter refuses)
                    owner, _, attr = s.param.rpartition(".")
                    self.by_param[id(getattr(module.get_submodule(owner) if owner else module, attr))] = s

    def q(self, owner: str, attr: str) -> Optional[TensorQuantizer]:
        key = owner + "|" + attr
        if key not in self.quant:
            self.quant[key] = _quantizer(self.module, owner, attr)
        return self.quant[key]

    def busy(self) -> bool:
        if self.plan is None:
            return False
        return any(_busy(_quantizer(self.module, o, a)) for o, a in self.plan.quantizer_refs())


class _State(threading.local):
    def __init__(self) -> None:
        self.stack: list[_Ctx] = []
        self.mode: Optional["QuantOpMode"] = None
        self.mode_depth = 0


_state = _State()


def _apply(q: Optional[TensorQuantizer], x: torch.Tensor, dims: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """``q(x)``; ``dims``: what the product consuming ``x`` contracts (read by run-time block scales)."""
    if q is None:
        return x
    # only run-time block scales read dims: every other quantizer is called as before (an export or a
    # user's wrapper that replaces forward keeps its one-argument form)
    return q(x, dims=dims) if dims is not None and q.spec.kind.supports_blocks else q(x)


def _weighted_dims(func, w: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Contracted dimensions of a linear/conv call's input and weight, paired as a block-scaled GEMM
    pairs them: a linear's features; a conv input's channels at each pixel (counted from the end, so
    an unbatched input works too) and its weight's input channels at each kernel tap (K in im2col's
    channels-last order)."""
    if WEIGHTED_OPS.get(func) == "linear":
        return (-1,), (-1,)
    return (-(w.dim() - 1),), (1,)


def _einsum_dims(eq: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Contracted dimensions of a two-operand einsum's operands: the letters both operands carry and
    the output drops, as indices counted from the operand's end (letters after an ellipsis) or from
    its start (letters before one): ``"bhid,bhjd->bhij"`` -> ``((-1,), (-1,))``, ``"bhij,bhjd->bhid"`` ->
    ``((-1,), (-2,))``; no summed letter: the matmul convention ``((-1,), (-2,))``."""
    lhs, arrow, out = eq.replace(" ", "").partition("->")
    a, b = lhs.split(",")
    if not arrow:  # implicit output: the letters that appear once, sorted
        letters = (a + b).replace(".", "")
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))

    def index(op: str, c: str) -> int:
        head, ell, tail = op.partition("...")
        return tail.index(c) - len(tail) if ell and c in tail else head.index(c) - (0 if ell else len(head))

    summed = [c for c in dict.fromkeys(a.replace(".", "")) if c in b and c not in out]
    if not summed:
        return (-1,), (-2,)
    return tuple(index(a, c) for c in summed), tuple(index(b, c) for c in summed)


class QuantOpMode(TorchFunctionMode):
    """Applies the innermost running module's plan to the ops its forward calls."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        stack = _state.stack
        ctx = stack[-1] if stack else None
        if func in SEE_THROUGH:
            with self:
                return see_through(func)(*args, **kwargs)
        if ctx is None or ctx.plan is None:
            return func(*args, **kwargs)
        if func in WEIGHTED_OPS:
            return self._weighted(ctx, func, args, kwargs)
        if ctx.plan.skip_constant:
            pair = two_operands(func, args)
            if pair and all(constant_operand(t, ctx.buffer_ids) or id(t) in ctx.const for t in pair):
                out = func(*args, **kwargs)
                ctx.const[id(out)] = out
                return out
        if ctx.by_param and func in MATMUL_OPS and len(args) >= 2:
            p = param_of(args[1])
            site = ctx.by_param.get(id(p)) if p is not None else None
            if site is not None and site.op == "matmul" and not is_param_like(args[0]):
                return self._param_matmul(ctx, site, func, args, kwargs, p)
        if ctx.plan.attention:
            if func in SDPA_OPS:
                return self._sdpa(ctx, args, kwargs)
            ops = matmul_operands(func, args)
            if ops is not None:
                return self._matmul(ctx, func, args, kwargs, ops)
            if func in EINSUM_OPS:
                ein = einsum_operands(args)
                if ein is not None:
                    eq, (a, b) = ein
                    return self._matmul(ctx, lambda x, y: torch.einsum(eq, x, y), (a, b), {}, (0, 1),
                                        _einsum_dims(eq))
            if func in SOFTMAX_OPS and ctx.phase == 1:
                ctx.phase = 2
                if ctx.plan.probs_at_matmul:  # quantized where attn@v receives them (talking heads)
                    return func(*args, **kwargs)
                # The probabilities are quantized where softmax makes them: before dropout's 1/(1-p)
                # rescale in training, which an eval-calibrated range would clip.
                sm_dim = kwargs.get("dim", args[1] if len(args) > 1 else None)  # attn @ v contracts the keys
                return _apply(self._attn_q(ctx, "attn_quantizer"), func(*args, **kwargs),
                              (sm_dim,) if isinstance(sm_dim, int) else None)
        return func(*args, **kwargs)

    # weighted ------------------------------------------------------------------------------------
    def _weighted(self, ctx: _Ctx, func, args, kwargs):
        x, w, rest, kw = weighted_args(args, kwargs)
        site = ctx.by_param.get(id(w))
        base = row_slice_base(w) if site is None else None
        if base is not None:  # rows of a planned parameter: quantize the parameter, take the rows
            site = ctx.by_param.get(id(base))
            if site is not None:
                iq = ctx.q(site.owner, site.prefix + "input_quantizer")
                wq = ctx.q(site.owner, site.prefix + "weight_quantizer")
                oq = ctx.q(site.owner, site.prefix + "output_quantizer")
                dx, dw = _weighted_dims(func, base)
                wv = take_rows(_apply(wq, base, dw), w, base) if wq is not None else w
                return _apply(oq, func(_apply(iq, x, dx), wv, *rest, **kw))
        if site is None:
            if is_param_like(w):  # another module's (float) weight: never a computed-weight site
                return func(*args, **kwargs)
            if ctx.n_derived < len(ctx.derived):
                site = ctx.derived[ctx.n_derived]
            ctx.n_derived += 1
            if site is None:
                return func(*args, **kwargs)
        iq = ctx.q(site.owner, site.prefix + "input_quantizer")
        wq = ctx.q(site.owner, site.prefix + "weight_quantizer")
        oq = ctx.q(site.owner, site.prefix + "output_quantizer")
        if wq is not None and site.param is None and (wq.observe or not wq.is_calibrated):
            wq.observed = w.detach()  # a derived weight is calibrated from what the op receives
        dx, dw = _weighted_dims(func, w)
        out = func(_apply(iq, x, dx), _apply(wq, w, dw), *rest, **kw)
        return _apply(oq, out)

    def _param_matmul(self, ctx: _Ctx, site: WeightedSite, func, args, kwargs, p: torch.Tensor):
        """``x @ view(p)`` inside an attention (BoTNet/HaloNet relative-position logits ``q @ rel_k^T``):
        x and p quantized as a linear's input and weight (the view is taken of the quantized p)."""
        iq = ctx.q(site.owner, site.prefix + "input_quantizer")
        wq = ctx.q(site.owner, site.prefix + "weight_quantizer")
        b = quantized_view(wq(p), args[1], p) if wq is not None else args[1]
        return func(_apply(iq, args[0], (-1,)), b, *args[2:], **kwargs)

    # attention -----------------------------------------------------------------------------------
    def _attn_q(self, ctx: _Ctx, name: str) -> Optional[TensorQuantizer]:
        return ctx.q("", name) if ctx.cycles == 0 else None

    def _matmul(self, ctx: _Ctx, func, args, kwargs, ops: tuple[int, int],
                dims: tuple[tuple[int, ...], tuple[int, ...]] = ((-1,), (-2,))):
        """An attention product; ``dims``: what it contracts in each operand (a matmul: the first's last
        dimension, the second's second-to-last; an einsum: from its equation)."""
        a, b = args[ops[0]], args[ops[1]]
        if is_param_like(a) or is_param_like(b) or ctx.cycles > 0:
            return func(*args, **kwargs)
        args = list(args)
        if ctx.phase == 0:
            args[ops[0]] = _apply(self._attn_q(ctx, "q_quantizer"), a, dims[0])
            args[ops[1]] = _apply(self._attn_q(ctx, "k_quantizer"), b, dims[1])
            ctx.phase = 1
            sq = self._attn_q(ctx, "softmax_input_quantizer")
            if func in BADDBMM_OPS and _busy(sq):
                # baddbmm(mask, q, k^T) adds an attention mask (-inf where masked) inside the GEMM
                # (nn.MultiheadAttention with need_weights): the logits are quantized, as with SDPA,
                # and the mask added after, so masked keys stay masked
                alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
                logits = torch.bmm(args[1], args[2])
                logits = sq(logits if alpha == 1 else logits * alpha)
                return logits if beta == 0 else logits + (args[0] if beta == 1 else beta * args[0])
            return _apply(sq, func(*args, **kwargs))
        if ctx.phase == 2:  # probabilities already quantized at the softmax, unless they changed since
            p, v = (ops[1], ops[0]) if ctx.plan.probs_operand == 1 else ops
            dp, dv = (dims[1], dims[0]) if ctx.plan.probs_operand == 1 else dims
            if ctx.plan.probs_at_matmul:
                args[p] = _apply(self._attn_q(ctx, "attn_quantizer"), args[p], dp)
            args[v] = _apply(self._attn_q(ctx, "v_quantizer"), args[v], dv)
            ctx.phase = 0
            ctx.cycles += 1
            return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, ctx: _Ctx, args, kwargs):
        names = ATTENTION_QUANTIZERS
        qs = {n: self._attn_q(ctx, n) for n in names}
        if not any(_busy(q) for q in qs.values()):
            ctx.cycles += 1
            return F.scaled_dot_product_attention(*args, **kwargs)
        ctx.cycles += 1
        return quantized_sdpa(qs, *args, **kwargs)


def quantized_sdpa(qs: dict[str, Optional[TensorQuantizer]], query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False
                   ) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` semantics with quantizers on q, k, the logits (before the
    mask: ``-inf`` never reaches a calibrator), the probabilities and v. Shapes ``(..., L, E)``,
    ``(..., S, E)``, ``(..., S, Ev)`` -> ``(..., L, Ev)``. The softmax scale is applied after q is
    quantized, as an integer GEMM would rescale its accumulator."""
    # q @ k^T contracts the head dimension, attn @ v the keys
    q = _apply(qs.get("q_quantizer"), query, (-1,))
    k = _apply(qs.get("k_quantizer"), key, (-1,))
    v = _apply(qs.get("v_quantizer"), value, (-2,))
    if enable_gqa and k.dim() >= 3 and q.size(-3) != k.size(-3):
        rep = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    s = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    logits = (q * s) @ k.transpose(-2, -1)
    logits = _apply(qs.get("softmax_input_quantizer"), logits)
    L, S = logits.size(-2), logits.size(-1)
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    attn = logits.softmax(dim=-1)
    if is_causal or attn_mask is not None:
        # A fully masked row: softmax gives NaN, torch's SDPA gives 0 (no key to attend to). Without a
        # mask no row is masked (two passes over the L x S probabilities saved: ~2% of a ViT-S forward).
        attn = torch.nan_to_num(attn, nan=0.0)
    attn = _apply(qs.get("attn_quantizer"), attn, (-1,))  # before dropout's 1/(1-p) rescale (training)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


# -- hooks --------------------------------------------------------------------------------------------
def _pre_hook(module: nn.Module, args: tuple) -> None:
    plan = module.__dict__.get("_qc_plan")
    ctx = _Ctx(module, plan)
    active = ctx.busy() or (_state.mode is not None)
    _state.stack.append(ctx)
    if active and _state.mode is None:
        _state.mode = QuantOpMode()
        _state.mode.__enter__()
        _state.mode_depth = len(_state.stack)


def _post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    if _state.stack:
        _state.stack.pop()
    if _state.mode is not None and len(_state.stack) < _state.mode_depth:
        mode, _state.mode = _state.mode, None
        mode.__exit__(None, None, None)
    return None


def install_hooks(module: nn.Module, plan: ModulePlan) -> None:
    """Make ``module`` a context of the mode: while it runs (and no inner hooked module does), the
    ops it calls follow ``plan``. Ops of its un-hooked children count as its own (an ``nn.Softmax``
    child of an attention module is part of that attention)."""
    module.__dict__["_qc_plan"] = plan
    if not module.__dict__.get("_qc_hooked", False):
        module.register_forward_pre_hook(_pre_hook)
        module.register_forward_hook(_post_hook, always_call=True)
        module.__dict__["_qc_hooked"] = True


def plan_of(module: nn.Module) -> Optional[ModulePlan]:
    return module.__dict__.get("_qc_plan")
