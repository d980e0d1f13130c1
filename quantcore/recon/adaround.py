"""AdaRound weight rounding, layer by layer (Nagel et al. 2020) or per block (BRECQ, Li et al. 2021).

For every integer weight quantizer of a calibrated model, a rounding variable ``V`` (one per weight)
chooses between the grid points below and above the weight:

    W~ = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),        zeta = 1.1, gamma = -0.1
    loss = ||f~(x~) - f(x)||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)

``f`` is the unit (one layer, or a block of layers) of the FP32 model on the FP32 model's input
``x``; ``f~`` the same unit with soft-rounded weights (and, with ``act_quant``, its activation
quantizers) on the input ``x~`` that the quantized-so-far model gives it ("asymmetric
reconstruction", AdaRound section 4 / AIMET). The reconstruction error is squared error summed over
channels (dim 1 of 4-D conv outputs, the last dim otherwise) and averaged over samples and positions,
as BRECQ/QDrop's ``lp_loss`` for which their lambda = 0.01 was chosen. ``beta`` anneals linearly
from ``beta_start`` to ``beta_end`` after ``warmup`` (no regularizer) so ``h`` ends at 0 or 1.

Result (as AIMET): each weight parameter is replaced by its hard-rounded grid points
``s * (clamp(floor(W / s) + [V >= 0] + z, qmin, qmax) - z)``, with the quantizer's range unchanged,
so round-to-nearest fake quantization reproduces them bit for bit and the checkpoint,
``encodings.json`` and any export see them; nothing else in the engine changes. The parameter object
is replaced, never written in place: variants share FP32 tensors (:class:`~quantcore.evaluate.WeightSharing`).
Re-calibrating the weights afterwards (``quantcore.calibrate`` again) would recompute their ranges from
the rounded weights: reconstruct after the last calibration.

Data parallel: under an active ``torch.distributed`` group every rank passes its own shard of the
calibration images; the global image set is the ranks' images in rank order, every step draws the
same global batch on every rank (shared seed), each rank computes the loss of the samples it holds
normalized by the global batch size, and the gradients of ``V`` are summed across ranks, so K ranks
take the steps one process would on the union of the shards (up to float summation order).
"""
from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .. import distributed
from ..api import _images, quantization_disabled
from ..errors import UserError
from ..placement import quantizers, unwrap
from ..quantizer import TensorQuantizer
from .config import ReconstructionConfig

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


# -- the paper's formulas ------------------------------------------------------------------------------
def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (AdaRound eq. 23), elementwise."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding(frac: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = frac`` for ``frac`` in [0, 1) (the weight's position between its two grid
    points), so optimization starts from the float weights."""
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2 h(V) - 1|^beta)`` (AdaRound eq. 24): 0 when every ``h`` is 0 or 1. Scalar."""
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, cfg: ReconstructionConfig) -> float | None:
    """The regularizer exponent at optimizer step ``step`` (0-based), or None during warm-up."""
    start = int(cfg.warmup * cfg.iterations)
    if step < start:
        return None
    t = (step - start) / max(1, cfg.iterations - start)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - t)


def reconstruction_error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample reconstruction error, shape ``(N,)``: squared error (times ``weight``, shaped like
    ``out``, if given) summed over channels (dim 1 of a 4-D conv output, the last dim otherwise),
    averaged over the remaining positions."""
    err = (out.float() - target.float()).pow(2)
    if weight is not None:
        err = err * weight
    ch = 1 if err.dim() == 4 else err.dim() - 1
    err = err.sum(ch) if err.dim() > 1 else err
    return err.reshape(err.shape[0], -1).mean(1)


# -- one weight ------------------------------------------------------------------------------------------
class _Rounding:
    """The soft rounding of one weight quantizer's parameter (``owner.<attr>``)."""

    def __init__(self, name: str, owner: nn.Module, attr: str, wq: TensorQuantizer) -> None:
        self.name, self.owner, self.attr, self.wq = name, owner, attr, wq
        w = getattr(owner, attr).detach().float()
        self.original = getattr(owner, attr)
        scale, zp = wq.scale_zero_point()
        self.qmin, self.qmax = wq.spec.qrange()
        shape = [1] * w.dim()
        if wq.spec.axis is not None and scale.numel() > 1:
            shape[wq.spec.axis % w.dim()] = -1
        self.s = scale.reshape(shape).to(w.device)
        self.z = zp.float().reshape(shape).to(w.device)
        x = w * self.s.reciprocal()  # as the fake-quant op computes it
        self.floor = torch.floor(x)
        self.rtn = torch.clamp(torch.round(x) + self.z, self.qmin, self.qmax)
        self.v = nn.Parameter(init_rounding((x - self.floor).clamp(0.0, 1.0 - 1e-6)))
        self._hook = None

    def soft(self) -> torch.Tensor:
        q = torch.clamp(self.floor + rectified_sigmoid(self.v) + self.z, self.qmin, self.qmax)
        return (q - self.z) * self.s

    def codes(self) -> torch.Tensor:
        """Hard integer codes (with zero point), ``V >= 0`` rounds up."""
        return torch.clamp(self.floor + (self.v.detach() >= 0).float() + self.z, self.qmin, self.qmax)

    def attach(self) -> None:
        # The op calls the weight quantizer on the parameter; its output becomes the soft weight.
        self._hook = self.wq.register_forward_hook(lambda _m, _i, _o: self.soft())

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @torch.no_grad()
    def write_back(self) -> float:
        """Replace the parameter by the hard-rounded grid points; returns the fraction of weights whose
        code differs from round-to-nearest."""
        codes = self.codes()
        new = ((codes - self.z) * self.s).to(self.original.dtype)
        old = self.original
        # a new Parameter object: the old one may be shared with the FP32 model and other variants
        self.owner._parameters[self.attr] = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
        return float((codes != self.rtn).float().mean())


# -- units -----------------------------------------------------------------------------------------------
@dataclass
class _Unit:
    name: str  # module run as a whole ("" = never: root is not a unit)
    layers: list[str]  # weight quantizer names
    first_call: int = 0


@dataclass
class ReconstructionResult:
    """What :func:`reconstruct` did. ``units``: per layer/block, in execution order: ``name``,
    ``layers`` (weight quantizers), ``loss_rtn`` / ``loss`` (reconstruction error of round-to-nearest
    and of the learned rounding on the calibration images, see :func:`reconstruction_error`),
    ``flipped`` (fraction of weights rounded away from nearest), ``seconds``. ``skipped``: weight
    quantizer -> why it was not reconstructed."""

    method: str
    mode: str
    images: int = 0
    seconds: float = 0.0
    units: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "mode": self.mode, "images": self.images, "seconds": self.seconds,
                "units": [dict(u) for u in self.units], "skipped": dict(self.skipped),
                "warnings": list(self.warnings)}


class _Stop(Exception):
    """Ends a forward pass once the unit's inputs/outputs are captured."""


def _block_of(name: str, mods: dict[str, nn.Module]) -> str | None:
    """Nearest strict ancestor of ``name`` that is an item of a ModuleList/Sequential (timm
    ``blocks.3``, torchvision ``encoder.layers.encoder_layer_3``, ResNet ``layer1.0``), else None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc, parent = ".".join(parts[:i]), ".".join(parts[: i - 1])
        if isinstance(mods.get(parent), (nn.ModuleList, nn.Sequential)):
            return anc
    return None


def _select(model: nn.Module, cfg: ReconstructionConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Weight quantizers to reconstruct (name -> owner module name) and the skipped ones with reasons."""
    chosen: dict[str, str] = {}
    skipped: dict[str, str] = {}
    hits = {g: 0 for g in cfg.modules}
    for qname, q in quantizers(model).items():
        if q.kind != "weight":
            continue
        owner = qname.rpartition(".")[0]
        matched = [g for g in cfg.modules if fnmatch.fnmatchcase(owner, g)]
        for g in matched:
            hits[g] += 1
        if not matched:
            skipped[qname] = "not matched by reconstruction.modules"
        elif not q.spec.enabled:
            skipped[qname] = "weight quantizer disabled"
        elif q.spec.is_float:
            skipped[qname] = f"float format {q.spec.format} (no rounding to learn)"
        elif q.spec.format != "int":
            skipped[qname] = (f"format {q.spec.format!r} computes its step at run time (no static grid to round "
                              f"to)" if q.spec.kind.supports_blocks else
                              f"format {q.spec.format!r} is not a uniform integer grid")
        elif q.spec.learnable or q.scale is not None:
            skipped[qname] = "learnable (QAT) range: reconstruct before make_learnable"
        elif q.weight_attr is None:
            skipped[qname] = "weight computed in forward (no parameter to write the rounding into)"
        elif not q.is_calibrated:
            skipped[qname] = "not calibrated"
        else:
            chosen[qname] = owner
    unused = [g for g, n in hits.items() if n == 0]
    if unused:
        raise UserError(f"reconstruction.modules: {unused[0]!r} matches no module with a weight quantizer")
    return chosen, skipped


def _chain(owner: str, mods: dict[str, nn.Module], mode: str) -> list[str]:
    """Candidate units for a layer, first choice first: its block (block mode), itself, its ancestors."""
    parts = owner.split(".")
    chain = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    block = _block_of(owner, mods) if mode == "block" else None
    return chain[chain.index(block):] if block is not None else chain


def _call_order(model: nn.Module, names: Iterable[str], x: torch.Tensor) -> dict[str, list[int]]:
    """Call indices of each module in ``names`` during one forward on ``x``."""
    mods = dict(model.named_modules())
    calls: dict[str, list[int]] = {n: [] for n in names}
    counter = [0]
    handles = []
    for n in calls:
        def pre(_m, _a, n=n):
            calls[n].append(counter[0])
            counter[0] += 1
        handles.append(mods[n].register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


# -- caches ---------------------------------------------------------------------------------------------
class _Batched:
    """A module call's arguments over many forward passes: tensors whose dim 0 is the batch are
    concatenated; everything else is kept from the first call."""

    def __init__(self) -> None:
        self.args: list[Any] | None = None
        self.kwargs: dict[str, Any] | None = None
        self.parts: dict[Any, list[torch.Tensor]] = {}

    def add(self, args: tuple, kwargs: dict, n: int) -> None:
        first = self.args is None
        if first:
            self.args, self.kwargs = list(args), dict(kwargs)
        for key, v in [*enumerate(args), *kwargs.items()]:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
                self.parts.setdefault(key, []).append(v.detach())

    def finish(self) -> None:
        self.full = {k: torch.cat(v) for k, v in self.parts.items()}
        self.parts = {}

    def take(self, idx: torch.Tensor) -> tuple[list[Any], dict[str, Any]]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for k, t in self.full.items():
            if isinstance(k, int):
                args[k] = t[idx]
            else:
                kwargs[k] = t[idx]
        return args, kwargs


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UserError(f"reconstruction: a unit returned {type(out).__name__}; expected a tensor or a tuple "
                    f"starting with one")


def _capture(model: nn.Module, module: nn.Module, images: list[torch.Tensor], *, inputs: bool,
             outputs: bool) -> tuple[_Batched | None, list[torch.Tensor]]:
    """Run ``model`` on ``images`` up to ``module`` only (the rest is cut off by an exception) and
    record ``module``'s inputs (``_Batched``) and/or its first output tensor per batch."""
    ins = _Batched() if inputs else None
    outs: list[torch.Tensor] = []

    def hook(_m, args, kwargs, out=None):
        if ins is not None:
            ins.add(args, kwargs, n)
        if outputs:
            outs.append(_first_tensor(out).detach())
        raise _Stop

    h = (module.register_forward_hook(hook, with_kwargs=True) if outputs
         else module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for x in images:
                n = x.shape[0]
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        h.remove()
    if ins is not None:
        ins.finish()
    return ins, outs


def _capture_inputs(model: nn.Module, module: nn.Module, images: list[torch.Tensor]) -> _Batched:
    return _capture(model, module, images, inputs=True, outputs=False)[0]


def _capture_outputs(model: nn.Module, module: nn.Module, images: list[torch.Tensor],
                     with_inputs: bool, device: torch.device) -> tuple[torch.Tensor, _Batched | None]:
    ins, outs = _capture(model, module, images, inputs=with_inputs, outputs=True)
    return (torch.cat(outs) if outs else torch.empty(0, device=device)), ins


def _fisher(model: nn.Module, module: nn.Module, images: list[torch.Tensor], n_global: int,
            device: torch.device) -> torch.Tensor:
    """Squared gradient of ``CE(f(x), argmax f(x))`` (the FP32 model's own prediction: no labels
    needed) with respect to the unit's output, per element, scaled to mean 1 over all ranks' images."""
    grads: list[torch.Tensor] = []
    box: dict[str, torch.Tensor] = {}

    def post(_m, _a, out):
        t = _first_tensor(out).detach().requires_grad_()
        box["t"] = t
        return t if isinstance(out, torch.Tensor) else (t, *out[1:])

    h = module.register_forward_hook(post)
    try:
        for x in images:
            with torch.enable_grad():
                logits = _first_tensor(model(x))
                nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
            grads.append(box.pop("t").grad.pow(2))
    finally:
        h.remove()
    g = torch.cat(grads) if grads else torch.empty(0, device=device)
    tot = torch.stack([g.double().sum(), torch.tensor(float(g.numel()), dtype=torch.float64, device=g.device)])
    distributed.all_reduce(tot)
    return g / max(float(tot[0] / tot[1].clamp_min(1)), 1e-30)


# -- the driver -------------------------------------------------------------------------------------------
class _FloatPath:
    """While active: the FP32 model (original weights of the layers already rounded, no quantizer)."""

    def __init__(self, model: nn.Module, done: list[_Rounding]) -> None:
        self.model, self.done, self.swapped = model, done, []

    def __enter__(self):
        for r in self.done:
            self.swapped.append(r.owner._parameters[r.attr])
            r.owner._parameters[r.attr] = r.original
        self._q = quantization_disabled(self.model)
        self._q.__enter__()
        return self

    def __exit__(self, *exc):
        self._q.__exit__(*exc)
        for r, p in zip(self.done, self.swapped):
            r.owner._parameters[r.attr] = p
        return False


def _gather_images(batches: Iterable, limit: int, device: torch.device) -> tuple[list[torch.Tensor], int, int]:
    """This rank's images (its share of the global first ``limit``), its global offset, global count."""
    mine: list[torch.Tensor] = []
    for b in batches:
        mine.append(_images(b).to(device))
    n_local = sum(x.shape[0] for x in mine)
    counts = distributed.all_gather_object(n_local)
    off = sum(counts[: distributed.rank()])
    total = min(limit, sum(counts))
    keep = max(0, min(n_local, total - off))
    out, taken = [], 0
    for x in mine:
        if taken >= keep:
            break
        out.append(x[: keep - taken])
        taken += out[-1].shape[0]
    return out, off, total


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    if not distributed.active():
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    distributed.all_reduce(flat)
    i = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[i:i + n].view_as(p.grad))
        i += n


def _mean_error(unit: nn.Module, inputs: _Batched, target: torch.Tensor, weight: torch.Tensor | None,
                n_global: int, bs: int) -> float:
    """Mean reconstruction error over the cached samples of all ranks."""
    tot = torch.zeros(1, dtype=torch.float64, device=target.device)
    with torch.no_grad():
        for i in range(0, target.shape[0], bs):
            idx = torch.arange(i, min(i + bs, target.shape[0]), device=target.device)
            args, kwargs = inputs.take(idx)
            w = weight[idx] if weight is not None else None
            tot += reconstruction_error(_first_tensor(unit(*args, **kwargs)), target[idx], w).double().sum()
    distributed.all_reduce(tot)
    return float(tot) / max(1, n_global)


def reconstruct(model: nn.Module, batches: Iterable, cfg: ReconstructionConfig,
                progress: Callable[[str], None] | None = None) -> ReconstructionResult:
    """Learn the rounding of every selected integer weight quantizer of a calibrated ``model`` and write
    the rounded weights into its parameters (in place on ``model``; ranges unchanged).

    ``batches``: calibration images as for :func:`quantcore.calibrate` (tensors ``(B, C, H, W)``,
    ``(images, ...)`` or ``{"image": ...}``), at most ``cfg.num_images`` of all ranks are used and held
    in memory on the model's device, plus one unit's inputs and FP32 outputs at a time. Under a process
    group each rank passes its own shard (see the module docstring). Returns a
    :class:`ReconstructionResult`, also stored as ``model.quantcore_reconstruction``.

    Raises :class:`~quantcore.errors.UserError` naming ``reconstruction.modules`` for a glob that
    matches nothing, or when there are no calibration images.
    """
    t_start = time.perf_counter()
    inner = unwrap(model)
    res = ReconstructionResult(cfg.method, cfg.mode)
    chosen, res.skipped = _select(inner, cfg)
    p = next(inner.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    images, offset, n_global = _gather_images(batches, cfg.num_images, dev)
    if n_global == 0:
        raise UserError("reconstruction: no calibration images")
    res.images = n_global
    asked = cfg.num_images != type(cfg).model_fields["num_images"].default  # the default means "at most"
    if asked and n_global < cfg.num_images:  # said, not silent: the recipe asked for more than calibration gave
        res.warnings.append(f"reconstruction.num_images is {cfg.num_images}, but only {n_global} calibration images "
                            "were given (all used); raise calibration.num_batches x batch_size to use more")
        log.warning(res.warnings[-1])  # the CLI's warning: line (a Python warning printed file and line)
    mods = dict(inner.named_modules())
    qs = quantizers(inner)

    # units in execution order: the owner (layer mode) or its block, else the nearest ancestor that
    # runs as a module (nn.MultiheadAttention's out_proj is used through F.linear, never called)
    owners = set(chosen.values())
    chains = {o: _chain(o, mods, cfg.mode) for o in owners}
    calls = _call_order(inner, {n for c in chains.values() for n in c}, images[0][:1]) if images else {}
    calls = distributed.broadcast_object(calls)  # a rank without images follows rank 0 (which has some)
    units: dict[str, _Unit] = {}
    for qname, owner in chosen.items():
        u = next((n for n in chains[owner] if calls.get(n)), None)
        if u is None:
            res.skipped[qname] = "not called on the calibration images"
        elif len(calls[u]) > 1 or (u == owner and len(calls[owner]) > 1):
            res.skipped[qname] = f"{u!r} runs {len(calls[u])} times per forward (shared weights)"
        else:
            units.setdefault(u, _Unit(u, [], calls[u][0])).layers.append(qname)
    order = sorted(units.values(), key=lambda u: u.first_call)
    _check_can_act(order, res.skipped, qs, cfg)

    acts = [q for q in qs.values() if q.kind == "activation"]
    act_before = [q.quantize for q in acts]
    grad_before = {n: t.requires_grad for n, t in inner.named_parameters()}
    for t in inner.parameters():
        t.requires_grad_(False)
    if not cfg.act_quant:
        for q in acts:
            q.quantize = False
    done: list[_Rounding] = []
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        for ui, unit in enumerate(order):
            t0 = time.perf_counter()
            module = mods[unit.name]
            q_in = _capture_inputs(inner, module, images)
            with _FloatPath(inner, done):
                target, fp_in = _capture_outputs(inner, module, images, cfg.drop_prob > 0, dev)
                fisher = _fisher(inner, module, images, n_global, dev) if cfg.loss == "fisher" else None
            rounds = [_Rounding(q, mods[chosen[q]], qs[q].weight_attr, qs[q]) for q in unit.layers]
            n_local = target.shape[0]
            loss_rtn = _mean_error(module, q_in, target, fisher, n_global, cfg.batch_size)
            _optimize(module, rounds, q_in, fp_in, target, fisher, cfg, offset, n_global, gen,
                      (cfg.seed * 7919 + 1) * 1009 + ui, qs, unit.name)
            flipped = [r.write_back() for r in rounds]
            done.extend(rounds)
            loss = _mean_error(module, q_in, target, fisher, n_global, cfg.batch_size)
            n_w = [r.v.numel() for r in rounds]
            res.units.append({"name": unit.name, "layers": list(unit.layers), "loss_rtn": loss_rtn, "loss": loss,
                              "flipped": sum(f * n for f, n in zip(flipped, n_w)) / max(1, sum(n_w)),
                              "seconds": time.perf_counter() - t0, "images": n_global})
            for r in rounds:  # drop the optimizer state and the float copy's reference
                r.v = nn.Parameter(torch.empty(0))
            del q_in, fp_in, target, fisher
            if progress is not None:
                progress(f"{unit.name}: loss {loss_rtn:.4g} -> {loss:.4g} ({ui + 1}/{len(order)})")
    finally:
        for q, b in zip(acts, act_before):
            q.quantize = b
        for n, t in inner.named_parameters():
            t.requires_grad_(grad_before.get(n, t.requires_grad))
    res.seconds = time.perf_counter() - t_start
    inner.quantcore_reconstruction = res
    return res


def _step_sizes_to_learn(qs: dict[str, TensorQuantizer], unit_name: str) -> list[TensorQuantizer]:
    """The calibrated integer activation quantizers inside unit ``unit_name`` whose step size
    ``act_ranges: learned`` learns (not already learnable)."""
    return [q for n, q in qs.items() if n.startswith(unit_name + ".") and q.kind == "activation"
            and q.spec.on_grid and q.spec.format == "int" and q.is_calibrated
            and q.scale is None]


def _check_can_act(order: list, skipped: dict[str, str], qs: dict[str, TensorQuantizer],
                   cfg: ReconstructionConfig) -> None:
    """A reconstruction section (or option) with nothing to act on is refused, naming the field: a
    report saying "AdaRound" over round-to-nearest weights would be read as if it ran."""
    if not order:
        reasons = sorted({r for r in skipped.values()})
        raise UserError(f"reconstruction: no weight quantizer can be reconstructed ({len(skipped)} skipped: "
                        f"{'; '.join(reasons[:4])}); AdaRound learns the rounding of calibrated integer "
                        f"weights: drop the reconstruction section, or quantize weights to int "
                        f"(quant.weights / overrides)")
    if cfg.act_ranges == "learned" and not any(_step_sizes_to_learn(qs, u.name) for u in order):
        raise UserError("reconstruction.act_ranges: learned learns the step size of integer activation "
                        "quantizers inside the reconstructed units, and there are none (activations float, "
                        "disabled, or not on format int, whose static step is what is learned; int_dynamic's "
                        "step is computed at run time): set act_ranges: fixed")


def _optimize(module: nn.Module, rounds: list[_Rounding], q_in: _Batched, fp_in: _Batched | None,
              target: torch.Tensor, fisher: torch.Tensor | None, cfg: ReconstructionConfig, offset: int, n_global: int,
              gen: torch.Generator, drop_seed: int, qs: dict[str, TensorQuantizer], unit_name: str) -> None:
    params = [r.v for r in rounds]
    groups: list[dict[str, Any]] = [{"params": list(params), "lr": cfg.lr}]
    learned = []
    if cfg.act_ranges == "learned":
        learned = _step_sizes_to_learn(qs, unit_name)
        for q in learned:
            q.make_learnable()
            q.zero_point.requires_grad_(False)  # the step size only (BRECQ/QDrop)
        groups += [{"params": [q.scale], "lr": cfg.act_lr * float(q.scale.detach().abs().mean())} for q in learned]
        params = params + [q.scale for q in learned]
    opt = torch.optim.Adam(groups)
    n_local = target.shape[0]
    bs = min(cfg.batch_size, n_global)
    dev = target.device
    hooks = []
    # QDrop masks of a step are drawn for the whole global batch from a generator seeded by the step
    # (every rank draws the same numbers), and each rank keeps its own samples' rows: K ranks drop the
    # same elements as one process that holds every image.
    step_masks: dict[str, Any] = {}

    def drop_mask(x: torch.Tensor) -> torch.Tensor:
        pos, g = step_masks["pos"], step_masks["gen"]
        per = x.numel() // pos.numel() if pos.numel() and x.numel() % pos.numel() == 0 else 0
        if not per:  # not batch-major: a mask of its own shape
            return torch.rand(x.shape, generator=g, device=x.device) < cfg.drop_prob
        full = torch.rand((bs, per), generator=g, device=x.device)
        return (full[pos.to(x.device)] < cfg.drop_prob).reshape(x.shape)

    if cfg.drop_prob > 0:
        prefix = unit_name + "."

        def drop(_m, inp, out):  # QDrop: some elements skip the activation quantizer
            x = inp[0]
            return torch.where(drop_mask(x), x, out)

        for n, q in qs.items():
            if q.kind == "activation" and (n.startswith(prefix)):
                hooks.append(q.register_forward_hook(drop))
    for r in rounds:
        r.attach()
    try:
        for step in range(cfg.iterations):
            idx = torch.randperm(n_global, generator=gen)[:bs]
            mine = (idx >= offset) & (idx < offset + n_local)
            local = idx[mine] - offset
            if cfg.drop_prob > 0:
                step_masks["pos"] = mine.nonzero().flatten()
                step_masks["gen"] = torch.Generator(device=dev).manual_seed(drop_seed * 1_000_003 + step)
            opt.zero_grad(set_to_none=False)
            for v in params:
                if v.grad is None:
                    v.grad = torch.zeros_like(v)
            if local.numel():
                local = local.to(dev)
                args, kwargs = q_in.take(local)
                if fp_in is not None:  # QDrop: the unit input mixes the quantized and the FP32 path
                    fa, fk = fp_in.take(local)
                    x = args[0]
                    args[0] = torch.where(drop_mask(x), fa[0], x)
                out = _first_tensor(module(*args, **kwargs))
                w = fisher[local] if fisher is not None else None
                loss = reconstruction_error(out, target[local], w).sum() / bs
                loss.backward()
            _all_reduce_grads(params)
            beta = beta_at(step, cfg)
            if beta is not None and cfg.reg_weight > 0:
                reg = cfg.reg_weight * sum(rounding_regularizer(r.v, beta) for r in rounds)
                reg.backward()
            opt.step()
    finally:
        for q in learned:  # learned step sizes back into amin/amax (the fixed-range ops again)
            q.convert()
        for r in rounds:
            r.detach()
        for h in hooks:
            h.remove()
