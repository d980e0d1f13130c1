"""Mixed-precision search to an accuracy budget, with reused calibration statistics.

Statistics do not depend on bit width: the activation collectors of one calibration pass
(:func:`quantcore.api.calibration_state`) give the range of any candidate spec
(:class:`RangeBank`: ``set_spec`` + ``load_calibration_state`` + ``finalize`` on the quantizer, or
the weight itself), so no candidate recollects activations. Every configuration the search reports
is verified by an actual evaluation, and the recipe it writes (the base recipe plus ``overrides``)
gives the same ranges when run through ``quantcore ptq`` on the same calibration images. A float cast
(fp16, ...) acts during calibration and changes what the quantizers after it collect: a configuration
whose casts differ from the model's gets statistics collected as its recipe calibrates
(:func:`collect_statistics_as`, one pass per set of casts).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Iterable, Sequence

import torch
from pydantic import ValidationError
from torch import nn

from .. import api
from ..calib.histogram import HistogramState
from ..calib.registry import calibrator
from ..config import Override, Recipe, SpecPatch
from ..errors import UserError
from ..formats import FLOAT_DTYPES, QuantSpec
from ..io import storage
from ..placement import quantizers, unwrap
from .engine import Engine
from .groups import group_matches, make_groups

log = logging.getLogger(__name__)

FLOAT = "float"  # the quantizers pass their tensor through (override enabled: false)
_FLOAT_BITS = {"fp16": 16, "bf16": 16, "fp8_e4m3": 8, "fp8_e5m2": 8}
BUDGET_METRICS = {"delta_top1": "--budget-top1", "agreement": "--budget-agreement", "sqnr_db": "--budget-sqnr"}
#: how errors name the budget's options by default (the CLI's flags); the API passes its own (``Budget.names``)
BUDGET_OPTION_NAMES = {**BUDGET_METRICS, "confidence": "--budget-confidence", "images": "--search-limit"}


# -- statistics and ranges ----------------------------------------------------------------------------
def collect_statistics(model: nn.Module, batches: Iterable,
                       casts: dict[str, QuantSpec] | None = None) -> dict[str, dict[str, Any]]:
    """Collect calibration statistics of a calibrated (e.g. loaded) model without changing its ranges;
    returns :func:`quantcore.api.calibration_state`. Use the images the recipe calibrates on.

    ``casts``: float-cast activation quantizers (fp16, ...: they collect nothing) -> the integer spec
    whose statistics to collect for them as well, so a search can put them on an integer grid; they
    keep casting during the pass, as in the recipe's calibration."""
    qs = quantizers(model)
    saved = {n: (q.amin, q.amax) for n, q in qs.items()}
    extra, hooks = {}, []
    for n, spec in (casts or {}).items():
        q = qs[n]
        extra[n] = calibrator(spec.calibrator).new_state(spec, q.bins)
        hooks.append(q.register_forward_pre_hook(lambda mod, args, st=extra[n]: st.update(args[0].detach())))
    try:
        api.collect(model, batches)
    finally:
        for h in hooks:
            h.remove()
    state = api.calibration_state(model)
    for n, st in extra.items():
        state[n] = {"type": "hist" if isinstance(st, HistogramState) else "max", **st.to_dict()}
    for n, q in qs.items():
        q.calibrating, q.observe = False, False
        q.amin, q.amax = saved[n]
    return state


def acting_casts(eng: Engine, specs: dict[str, QuantSpec | None]) -> frozenset[tuple[str, str]]:
    """The activation quantizers that act as float casts (fp16, ...) while a recipe giving ``specs``
    (quantizer -> spec, None = no quantizer) calibrates, with their formats: the only quantizers that
    change what the others downstream collect (integer ones collect and pass values through, weights are
    off). Statistics depend on this set, not on bit widths."""
    return frozenset((n, s.format) for n, s in specs.items()
                     if s is not None and s.is_float and s.enabled and eng.qs[n].kind == "activation")


def collect_statistics_as(eng: Engine, batches: Iterable, specs: dict[str, QuantSpec | None]
                          ) -> dict[str, dict[str, Any]]:
    """:func:`collect_statistics` as a recipe giving ``specs`` calibrates: its float casts act, every
    other activation quantizer collects (under its integer spec in ``specs``, else its own, else as an
    integer grid of its cast: any integer spec of one calibrator collects the same statistics). The
    model's specs are restored after."""
    saved = {n: (q.spec, q.collector) for n, q in eng.qs.items()}
    try:
        for n, q in eng.qs.items():
            if q.kind != "activation" or n not in specs:
                continue
            s = specs[n]
            if s is not None and (s.is_float or not q.spec.is_float):
                q.spec = s
            elif q.spec.is_float:  # a cast in the model, not in this recipe: collects as the grid it gets
                q.spec = choice_spec("8", q.spec)
        return collect_statistics(eng.model, batches)
    finally:
        for n, q in eng.qs.items():
            q.spec, q.collector = saved[n]


def cast_specs(eng: Engine, groups: Any, choices: Sequence[str | int],
               stats: dict[str, dict[str, Any]] | None) -> dict[str, QuantSpec]:
    """Searched activation quantizers that are float casts without statistics in ``stats`` -> the
    integer spec an integer choice gives them (its statistics do not depend on the bit width): what
    :func:`collect_statistics` must collect before the search can try them on an integer grid."""
    ints = [c for c in parse_choices(choices) if c.isdigit()]
    if not ints:
        return {}
    out = {}
    for members in make_groups(eng, groups, field="search_groups").values():
        for n in members:
            q = eng.qs[n]
            if q.kind == "activation" and q.spec.is_float and not (stats or {}).get(n, {}).get("total"):
                out[n] = choice_spec(ints[0], q.spec)
    return out


class RangeBank:
    """Range of quantizer ``name`` under any spec, from stored statistics (cached per spec)."""

    def __init__(self, model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
        self.model = unwrap(model)
        self.qs = quantizers(self.model)
        self.state = state
        self._cache: dict[tuple[str, str], tuple[QuantSpec, torch.Tensor, torch.Tensor]] = {}

    def get(self, name: str, spec: QuantSpec) -> tuple[QuantSpec, torch.Tensor, torch.Tensor]:
        key = (name, spec.model_dump_json())
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        q = self.qs[name]
        if spec.is_float:
            empty = torch.empty(0, device=q.amax.device)
            res = (spec, empty, empty)
        else:
            saved = (q.spec, q.collector, q.amin, q.amax, q.calibrating)
            try:
                q.set_spec(spec)
                if q.kind == "activation":
                    if not self.state.get(name, {}).get("total") and saved[0].is_float:
                        raise UserError(f"no calibration statistics for {name!r} (a {saved[0].format} cast in "
                                        "the recipe: casts collect none): collect them with "
                                        "analysis.collect_statistics(..., casts=search.cast_specs(...)), or pass "
                                        "the calibration images (quantcore.api.analyze(..., calib_batches=...))")
                    if name not in self.state:
                        raise UserError(f"no calibration statistics for {name!r}: pass the calibration images "
                                        "(quantcore.api.analyze(..., calib_batches=...)) or collect them first "
                                        "(analysis.collect_statistics)")
                    api.load_calibration_state(self.model, {name: self.state[name]})
                    if not q.finalize():
                        raise UserError(f"calibration statistics of {name!r} are empty")
                else:
                    src = (getattr(self.model.get_submodule(name.rpartition(".")[0]), q.weight_attr)
                           if q.weight_attr else self.state.get(name, {}).get("tensor"))
                    if src is None:
                        raise UserError(f"weight quantizer {name!r} has no weight to calibrate from")
                    q.calibrate_tensor(src.detach())
                res = (spec, q.amin.detach().clone(), q.amax.detach().clone())
            finally:
                q.spec, q.collector, q.amin, q.amax, q.calibrating = saved
        self._cache[key] = res
        return res


# -- choices, budget, cost ----------------------------------------------------------------------------
def parse_choices(choices: Sequence[str | int], field: str = "choices") -> list[str]:
    """``4``, ``"6"`` (integer bits), ``"fp16"``/``"bf16"``/``"fp8_e4m3"`` (float casts), ``"float"``
    (no quantizer), returned cheapest first whatever the order given (the search starts from the
    first); a string is comma-separated (``"4,8,float"``, as ``--choices``). Raises UserError naming
    ``field``."""
    if isinstance(choices, str):  # not its characters: "4,8" is ['4', ',', '8'] as a sequence
        choices = choices.split(",")
    out, given = [], {}
    for raw in choices:
        c = str(raw).strip().lower()
        if c.isdigit():
            if not 2 <= int(c) <= 16:
                raise UserError(f"{field}: {c} bits is outside 2..16")
            c = str(int(c))  # "04" is 4 bits
        elif c != FLOAT and c not in FLOAT_DTYPES:
            raise UserError(f"{field}: unknown choice {c!r} (integer bits, {sorted(FLOAT_DTYPES)} or 'float')")
        if c in given:
            raise UserError(f"{field}: choice {c!r} is given twice ({given[c]!r} and {raw!r}); give each once")
        given[c] = raw
        out.append(c)
    if not out:
        raise UserError(f"{field}: give at least one choice (got {list(choices)})")
    return sorted(out, key=_choice_bits)


def _choice_bits(c: str) -> float:
    """Storage bits of a choice, for ordering: integers by their bits, a float cast just after the
    integer grid of its width (fp8 after int8), no quantizer last."""
    if c.isdigit():
        return float(c)
    if c == FLOAT:
        return 32.0
    return (8.0 if c.startswith("fp8") else 16.0) + 0.5


def choice_patch(choice: str, base: QuantSpec | None = None) -> SpecPatch | None:
    """The override a choice makes of a quantizer whose spec is ``base``: None for 'float' (no
    quantizer); for integer bits only the bit width when ``base`` is already an integer grid (a
    registered kind such as twin_int or log2 keeps its kind), else ``format: int`` too; a float cast
    sets the format."""
    if choice == FLOAT:
        return None
    if choice.isdigit():
        if base is not None and not base.is_float:
            return SpecPatch(bits=int(choice))
        return SpecPatch(format="int", bits=int(choice))
    return SpecPatch(format=choice)


def choice_spec(choice: str, base: QuantSpec) -> QuantSpec | None:
    """``base`` under ``choice`` (None = float); see :func:`choice_patch`."""
    patch = choice_patch(choice, base)
    return None if patch is None else patch.apply(base)


@dataclass(frozen=True)
class Budget:
    """Accuracy budget measured against FP32 on the search images: ``delta_top1`` (max drop of top-1,
    points), ``agreement`` (min top-1 agreement with FP32, %) or ``sqnr_db`` (min logit SQNR).

    ``confidence`` (e.g. 0.9; ``delta_top1`` and ``agreement`` only): the budget must hold for the
    one-sided lower confidence bound of the metric, not only for its value on the search images. A
    top-1 difference measured on N images moves by about sqrt(gained + lost) / N from one sample of
    images to another (at W4A4 on 5,000 images ~0.2 point: a point estimate that just meets a 0.1
    budget is a coin toss on other images). Bounds: the paired difference of per-image correctness
    (values -1/0/+1, normal approximation of its mean: McNemar's setting) for ``delta_top1``; Wilson's
    score interval for ``agreement``."""

    metric: str
    value: float
    confidence: float | None = None
    # how errors name the options (CLI flags, or the API's keys): not part of the budget's value
    names: tuple[tuple[str, str], ...] = field(default=(), compare=False, hash=False, repr=False)

    @classmethod
    def from_options(cls, delta_top1: float | None = None, agreement: float | None = None,
                     sqnr_db: float | None = None, confidence: float | None = None,
                     names: dict[str, str] | None = None) -> "Budget":
        """Checked budget; ``names``: how errors call each option (default: the CLI flags;
        :func:`quantcore.api.analyze` passes its dict keys). Raises UserError."""
        names = names or BUDGET_OPTION_NAMES
        given = {k: v for k, v in (("delta_top1", delta_top1), ("agreement", agreement), ("sqnr_db", sqnr_db))
                 if v is not None}
        if len(given) != 1:
            raise UserError(f"budget: give exactly one of {', '.join(names[k] for k in BUDGET_METRICS)} "
                            f"(got {', '.join(names[k] for k in given) or 'none'})")
        (k, v), = given.items()
        opt, copt = names[k], names["confidence"]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{opt}: must be a number, got {v!r}")
        if not math.isfinite(v):
            raise UserError(f"{opt}: must be a finite number, got {v}")
        if k == "delta_top1" and not 0 <= v <= 100:
            raise UserError(f"{opt}: the allowed top-1 drop is in points, 0..100; got {v}")
        if k == "agreement" and not 0 < v <= 100:
            raise UserError(f"{opt}: agreement with FP32 is a percentage in (0, 100]; got {v}")
        if confidence is not None:
            if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
                raise UserError(f"{copt}: a probability in [0.5, 1), e.g. 0.9; got {confidence!r}")
            if k == "sqnr_db":
                raise UserError(f"{copt}: applies to {names['delta_top1']} and {names['agreement']} (counts of "
                                f"images), not to {names['sqnr_db']}")
            if not (math.isfinite(confidence) and 0.5 <= confidence < 1):
                raise UserError(f"{copt}: a probability in [0.5, 1), e.g. 0.9; got {confidence}")
        return cls(k, float(v), None if confidence is None else float(confidence), tuple(names.items()))

    def option_name(self, key: str) -> str:
        """How errors name option ``key`` (a metric, ``confidence`` or ``images``) for this budget's caller."""
        return dict(self.names).get(key) or BUDGET_OPTION_NAMES[key]

    def bound(self, m: dict[str, Any]) -> float | None:
        """The value the budget is checked on: the metric itself, or its lower confidence bound
        (points / %; ``None`` = identical logits for ``sqnr_db``). Raises UserError for a top-1
        budget on unlabelled images."""
        if self.metric == "delta_top1":
            if m.get("delta_top1") is None:
                opt = self.option_name("delta_top1")
                raise UserError(f"{opt} needs labelled data (the search images have no labels)")
            if self.confidence is None:
                return m["delta_top1"]
            return delta_lower_bound(m["gained"], m["lost"], m["count"], self.confidence)
        if self.metric == "agreement":
            if self.confidence is None:
                return m["agreement"]
            return wilson_lower_bound(m["agreement"], m["count"], self.confidence)
        return m["sqnr_db"]

    def ok(self, m: dict[str, Any]) -> bool:
        v = self.bound(m)
        if self.metric == "delta_top1":
            return v >= -self.value - 1e-9
        if self.metric == "agreement":
            return v >= self.value - 1e-9
        return v is None or v >= self.value

    def check_reachable(self, count: int, images_option: str | None = None) -> None:
        """Refuse a budget checked on its confidence bound that no configuration can meet on ``count``
        images: even outputs identical to FP32 (100 % agreement; no image gained or lost for top-1)
        have a lower bound below it (UserError naming the options and the image count that would do).
        (A top-1 budget could in principle be met by a configuration that gains more images than it
        loses against FP32: a search cannot plan on that.)"""
        if self.confidence is None or self.metric not in ("agreement", "delta_top1"):
            return
        if self.metric == "agreement":
            def best(n: int) -> float:
                return wilson_lower_bound(100.0, n, self.confidence)
            need_ok = lambda v: v >= self.value - 1e-9  # noqa: E731
            what = f"even 100% agreement has a lower bound of {best(count):.3f}%"
        else:
            def best(n: int) -> float:
                return delta_lower_bound(0, 0, n, self.confidence)
            need_ok = lambda v: v >= -self.value - 1e-9  # noqa: E731
            what = f"even outputs identical to FP32 have a Δ top-1 lower bound of {best(count):+.3f} points"
        if need_ok(best(count)):
            return
        opt, copt = self.option_name(self.metric), self.option_name("confidence")
        images_option = images_option or self.option_name("images")
        head = (f"{opt} {self.value:g} with {copt} {self.confidence:g} cannot be met on {count} "
                f"search images: {what}")
        if self.metric == "delta_top1" and self.value <= 0:
            raise UserError(f"{head}; on any number of images the bound of no change stays below 0: give a "
                            f"positive {opt}, or no {copt}")
        need = max(int(count), 1)
        while not need_ok(best(need)) and need < 10**9:
            need *= 2
        lo, hi = need // 2, need
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if not need_ok(best(mid)) else (lo, mid)
        raise UserError(f"{head}; it needs at least {hi} search images ({images_option}), or a lower confidence or "
                        "a looser budget")

    def describe(self) -> str:
        text = {"delta_top1": f"top-1 drop <= {self.value:g} points", "agreement": f"agreement >= {self.value:g}%",
                "sqnr_db": f"logit SQNR >= {self.value:g} dB"}[self.metric]
        if self.confidence is not None:
            text += f", on its lower {100 * self.confidence:g}% confidence bound"
        return text

    def bound_text(self, m: dict[str, Any]) -> str:
        """'Δ top-1 lower 90% bound -0.041 >= -0.1 points' (empty without ``confidence``)."""
        if self.confidence is None:
            return ""
        v, c = self.bound(m), f"{100 * self.confidence:g}%"
        if self.metric == "delta_top1":
            return f"Δ top-1 lower {c} bound {v:+.3f} {'>=' if self.ok(m) else '<'} {-self.value:g} points"
        return f"agreement lower {c} bound {v:.3f}% {'>=' if self.ok(m) else '<'} {self.value:g}%"


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def delta_lower_bound(gained: int, lost: int, count: int, confidence: float) -> float:
    """One-sided lower confidence bound of the top-1 difference (points) from paired counts: of
    ``count`` images, ``gained`` became right and ``lost`` became wrong (the discordant cells of the
    paired 2x2 table of FP32-correct x quantized-correct).

    Agresti & Min (2005, "Simple improved confidence intervals for comparing matched proportions"):
    add 0.5 to each of the four cells, then the Wald bound ``(b - c)/n - z sqrt((b + c) - (b - c)^2/n)/n``
    with the adjusted ``b``, ``c``, ``n``. The adjustment keeps the bound below 0 when no image
    changed on a small sample (plain Wald would give exactly 0), and vanishes on thousands of images."""
    b, c, n = gained + 0.5, lost + 0.5, max(int(count), 0) + 2.0
    mean = (b - c) / n
    var = max((b + c) - (b - c) ** 2 / n, 0.0)
    return 100.0 * (mean - _z(confidence) * math.sqrt(var) / n)


def wilson_lower_bound(agreement_pct: float, count: int, confidence: float) -> float:
    """Lower end (%) of Wilson's score interval for a proportion ``agreement_pct`` % of ``count``
    images (one-sided at ``confidence``); stays inside [0, 100] near 100 % where the normal
    approximation does not."""
    n = max(int(count), 1)
    p, z = agreement_pct / 100.0, _z(confidence)
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(max(100.0 * (centre - half) / (1 + z * z / n), 0.0), agreement_pct)  # rounding at 0 %


class CostModel:
    """Cost of a configuration. ``bits``: effective bits, the average bits per element over every
    quantized weight (elements x bits) and activation (elements per image x bits);
    ``bops``: sum over every product op of one forward (linear, conv, the attention matmuls, einsum:
    :class:`~.engine.Trace` ``macs``) of MACs per image x the bits of its two operands, in GBOPs
    (van Baalen et al. 2020). An operand no quantizer feeds, or a float one, counts ``float_bits``
    (16: deployed in FP16). A quantizer that is no product's operand (a residual add, the softmax
    input, a GEMM output) costs nothing in BOPs: :meth:`uncosted` names them. In ``bits``, a grid
    whose scales are computed at run time per block (``int_dynamic``) also pays for them: a scale of
    its ``scale_format``'s bits (16 unless set; fp8_e4m3's per-tensor float32 scale is not counted)
    (and, asymmetric, a ``bits``-bit zero point) per block of ``block_size`` elements of the
    slice the consuming product contracts (``ceil(K / block_size)`` blocks per slice of K; one per
    slice without block_size); BOPs count the operands' bits only.

    Choice ``fp16``: a cast acts during calibration too, so the ranges downstream of it come from
    statistics collected with it acting (:func:`search` with ``calib_batches``)."""

    def __init__(self, engine: Engine, kind: str = "bits") -> None:
        if kind not in ("bits", "bops"):
            raise UserError(f"cost: unknown cost model {kind!r} (bits or bops)")
        self.kind, self.eng = kind, engine
        self.numel = {}
        for n in engine.active:
            q = engine.qs[n]
            self.numel[n] = engine.trace.numel_per_image.get(n, 0.0)

    float_bits = 16.0  # a float (unquantized) tensor is deployed in FP16

    def bits_of(self, spec: QuantSpec | None) -> float:
        """Bits of one element of the operand (the grid's code bits; a cast's width; float_bits)."""
        if spec is None:
            return self.float_bits
        return float(_FLOAT_BITS.get(spec.format, 16)) if spec.is_float else float(spec.bits)

    def stored_bits(self, name: str, spec: QuantSpec | None) -> float:
        """Bits per element of quantizer ``name``'s tensor: :meth:`bits_of` plus, for run-time block
        scales, the scale (its ``scale_format``'s bits) and zero point (asymmetric) shared by each block."""
        b = self.bits_of(spec)
        if spec is not None and spec.on_grid and spec.kind.supports_blocks:
            from ..quantizer_kinds.dynamic import SCALE_FORMATS, spec_scale_format

            per_block = SCALE_FORMATS[spec_scale_format(spec)] + (0 if spec.symmetric else spec.bits)  # scale (+ zp)
            k = self.eng.trace.last_dim.get(name, 0)  # the slice one scale (per block) covers
            if k:
                blocks = math.ceil(k / spec.block_size) if spec.block_size else 1  # a shorter last block too
                b += blocks * per_block / k
            elif spec.block_size:
                b += per_block / spec.block_size
        return b

    def uncosted(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` whose precision does not change this cost model's figure."""
        if self.kind == "bits":
            return [n for n in names if not self.numel.get(n)]
        operands = {n for pair in self.eng.trace.macs for n in pair}
        return [n for n in names if n not in operands]

    def __call__(self, specs: dict[str, QuantSpec | None]) -> float:
        if self.kind == "bits":
            tot = sum(self.numel.values())
            return sum(self.numel[n] * self.stored_bits(n, specs.get(n)) for n in self.numel) / max(tot, 1)
        total = 0.0
        for (a, b), macs in self.eng.trace.macs.items():
            total += macs * self.bits_of(specs.get(a) if a else None) * self.bits_of(specs.get(b) if b else None)
        return total / 1e9


# -- the search ----------------------------------------------------------------------------------------
def _pareto(points: list[dict[str, Any]], key: str, higher: bool) -> list[dict[str, Any]]:
    pts = sorted(points, key=lambda p: (p["cost"], -p["score"] if higher else p["score"]))
    front, best = [], -math.inf
    for p in pts:
        s = p["score"] if higher else -p["score"]
        if s > best:
            front.append(p)
            best = s
    return front


def config_ranges(eng: Engine, bank: RangeBank, specs: dict[str, QuantSpec | None]) -> dict:
    """The engine configuration that acts as a recipe giving ``specs`` (quantizer -> spec, None = float)
    would after prepare + calibrate: each changed quantizer's range from ``bank`` for its new spec, and
    every member of a share group with a changed member on the union of the members' *own* ranges (as
    api.finalize unifies them, leaving out float members); the model's members hold the old union, which
    a member now float or on another grid took part in. Unchanged quantizers are left out, so the engine
    reuses the forward up to the first change."""
    out = {}
    for n, s in specs.items():
        st = None if s is None else bank.get(n, s)
        q = eng.qs[n]
        if st is not None and st[0] == q.spec and torch.equal(st[1], q.amin) and torch.equal(st[2], q.amax):
            continue
        out[n] = st
    for group in eng.share_groups:
        if any(n in out for n in group):
            for n in group:
                if n not in out and n in eng.qs and eng.base_on[n]:
                    s = specs.get(n, eng.qs[n].spec)
                    out[n] = None if s is None else bank.get(n, s)
    return out


def search(model: nn.Module, batches: Iterable | Engine, budget: Budget, stats: dict[str, dict[str, Any]], *,
           groups: Any = "quantizer", choices: Sequence[str | int] = ("4", "6", "8", "float"), cost: str = "bits",
           workers: int = 1, progress=None, calib_batches: Iterable | None = None) -> dict[str, Any]:
    """Cheapest per-group precision among ``choices`` that meets ``budget`` on ``batches``.

    1. every group at the cheapest choice; 2. sensitivity: each group alone at the most precise choice
    (the others cheapest), ordered by KL gain per unit of cost; 3. raise groups in that order to the
    most precise choice until the budget is met; 4. try each raised group at every cheaper choice
    (least sensitive first) and keep the cheapest that still meets it. Every step is an evaluation.

    ``stats``: :func:`quantcore.api.calibration_state` of the calibration (ranges of every candidate
    spec come from it). ``calib_batches``: those calibration images; a configuration whose float casts
    (fp16, ...) differ from the model's calibrates differently upstream of the rest (a cast acts during
    calibration), so its statistics are collected from them once per such set of casts, and the figure is
    the one its recipe gives; without them the model's statistics serve (downstream ranges then differ
    slightly from the recipe's). Returns ``config`` (group -> choice), ``specs`` (quantizer -> spec dict or
    None = float), ``metrics`` and ``cost`` of the chosen configuration, ``met`` (budget met),
    ``evaluated`` (every configuration tried: cost, metrics, ok) and ``pareto`` (its front), and
    ``fraction_above_lowest`` (of the quantizers). Raises UserError naming the field on bad input."""
    t0 = time.perf_counter()
    ch = parse_choices(choices)
    calib_batches = list(calib_batches) if calib_batches is not None else None  # read once per set of casts
    eng = batches if isinstance(batches, Engine) else Engine(model, batches)
    eng.require_quantized()
    budget.check_reachable(sum(x.shape[0] for x, _ in eng.batches))
    grp = make_groups(eng, groups, field="search_groups")
    where: dict[str, str] = {}
    for g, members in grp.items():
        for n in members:
            if n in where:  # one precision per quantizer: which group's would apply is not defined
                raise UserError(f"search_groups: {n!r} is in two groups, {where[n]!r} and {g!r}; make the "
                                "globs disjoint")
            where[n] = g
    bank = RangeBank(eng.model, stats)
    costf = CostModel(eng, cost)
    uncosted = costf.uncosted(where)
    if uncosted:
        log.warning("cost %s: %d searched quantizer(s) change no cost (%s%s); the search may keep them at the "
                    "most precise choice for free", cost, len(uncosted), ", ".join(uncosted[:4]),
                    ", ..." if len(uncosted) > 4 else "")
    higher = True  # every budget metric is better when larger
    score_key = budget.metric

    def specs_of(cfg: dict[str, str]) -> dict[str, QuantSpec | None]:
        out = {}
        for g, members in grp.items():
            for n in members:
                try:
                    out[n] = choice_spec(cfg[g], eng.qs[n].spec)
                except ValidationError as err:
                    msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
                    raise UserError(f"choices: {cfg[g]!r} cannot apply to {n} ({eng.qs[n].spec.short()}): "
                                    f"{msg}") from None
        return out

    # quantizers outside every group keep their own spec, and cost what it costs
    own = {n: eng.qs[n].spec for n in eng.active}

    def cost_of(cfg: dict[str, str]) -> float:
        return costf({**own, **specs_of(cfg)})

    base_casts = acting_casts(eng, own)
    banks = {base_casts: bank}

    def engine_config(cfg: dict[str, str]) -> dict:
        specs = specs_of(cfg)
        full = {**own, **specs}
        casts = acting_casts(eng, full)
        if casts == base_casts or calib_batches is None:
            return config_ranges(eng, bank, specs)
        if casts not in banks:  # one more pass over the calibration images per set of casts
            banks[casts] = RangeBank(eng.model, collect_statistics_as(eng, calib_batches, full))
        # every quantizer's range as this recipe calibrates it, the unsearched ones' too
        return config_ranges(eng, banks[casts], full)

    evaluated: list[dict[str, Any]] = []
    seen: dict[tuple, dict[str, Any]] = {}

    def run(batch_cfgs: dict[str, dict[str, str]], step: str, par: int = 1) -> dict[str, dict[str, Any]]:
        todo = {k: c for k, c in batch_cfgs.items() if tuple(sorted(c.items())) not in seen}
        res = eng.evaluate({k: engine_config(c) for k, c in todo.items()}, workers=par) if todo else {}
        out = {}
        for k, c in batch_cfgs.items():
            key = tuple(sorted(c.items()))
            if key not in seen:
                m = res[k]
                rec = {"label": k, "step": step, "config": dict(c), "cost": cost_of(c), "metrics": m,
                       "ok": budget.ok(m), "score": _score({score_key: budget.bound(m)}, score_key)}
                seen[key] = rec
                evaluated.append(rec)
            out[k] = seen[key]
        if progress:
            progress(len(evaluated))
        return out

    low, top = ch[0], ch[-1]
    cfg = {g: low for g in grp}
    cur = run({"all-" + low: cfg}, "start")["all-" + low]
    order: list[str] = []
    if not cur["ok"] and len(ch) > 1:
        sens = run({f"{g}={top}": {**cfg, g: top} for g in grp}, "sensitivity", workers)
        gain = {g: (cur["metrics"]["kl"] - sens[f"{g}={top}"]["metrics"]["kl"])
                / max(sens[f"{g}={top}"]["cost"] - cur["cost"], 1e-12) for g in grp}
        order = sorted(grp, key=lambda g: -gain[g])
        raised = []
        for g in order:
            cfg = {**cfg, g: top}
            raised.append(g)
            cur = run({f"raise {g}": cfg}, "raise")[f"raise {g}"]
            if cur["ok"]:
                break
        if cur["ok"]:
            for g in reversed(raised):
                for c in ch[:-1]:
                    trial = {**cfg, g: c}
                    r = run({f"lower {g}={c}": trial}, "lower")[f"lower {g}={c}"]
                    if r["ok"]:
                        cfg, cur = trial, r
                        break
    ok = [e for e in evaluated if e["ok"]]
    if ok:  # the cheapest verified configuration (an earlier step may have found a cheaper one)
        best = min(ok, key=lambda e: (e["cost"], -e["score"]))
        cfg, cur = dict(best["config"]), best
    specs = specs_of(cfg)
    n_above = sum(1 for g, members in grp.items() for _ in members if cfg[g] != low)
    return {"budget": {"metric": budget.metric, "value": budget.value, "confidence": budget.confidence,
                       "text": budget.describe(), "bound": budget.bound(cur["metrics"]),
                       "bound_text": budget.bound_text(cur["metrics"])},
            "choices": ch, "cost_model": cost, "group_by": groups if isinstance(groups, str) else list(groups),
            "groups": grp, "config": cfg, "specs": {n: None if s is None else s.model_dump() for n, s in specs.items()},
            "metrics": cur["metrics"], "cost": cur["cost"], "met": cur["ok"],
            "fraction_above_lowest": n_above / max(len(specs), 1), "quantizers_above_lowest": n_above,
            "uncosted": uncosted,
            "order": order, "evaluated": evaluated, "pareto": _pareto(evaluated, score_key, higher),
            "images": sum(x.shape[0] for x, _ in eng.batches), "seconds": time.perf_counter() - t0}


def _score(m: dict[str, Any], key: str) -> float:
    v = m.get(key)
    if key == "sqnr_db" and v is None:
        return math.inf
    return -math.inf if v is None else float(v)


# -- the result as a recipe ------------------------------------------------------------------------------
def search_recipe(base: Recipe, model: nn.Module, result: dict[str, Any], name: str | None = None,
                  checkpoint: str | None = None) -> Recipe:
    """``base`` plus one override per group whose choice changes its quantizers' specs (``enabled:
    false`` for 'float', else ``spec: {format, bits}``), matched by the group's owner module when it
    holds exactly those quantizers, else by each quantizer name. ``checkpoint``: FP32 weights to
    record as ``model.checkpoint``."""
    qs = quantizers(model)
    eng_like = type("E", (), {"qs": qs})()
    overrides = list(base.overrides)
    for g, members in result["groups"].items():
        choice = result["config"][g]
        if choice != FLOAT and all(choice_spec(choice, qs[n].spec) == qs[n].spec for n in members):
            continue  # already so in the base recipe
        if choice == FLOAT:
            # enabled: false, not float: true -- a removed attention quantizer lets its module run
            # fused SDPA during calibration, and the ulp-level change moves ranges downstream of it
            overrides += [Override(match=m, enabled=False) for m in group_matches(eng_like, members)]
            continue
        patches = {n: choice_patch(choice, qs[n].spec).model_dump(exclude_unset=True) for n in members}
        if all(p == patches[members[0]] for p in patches.values()):  # one override for the group
            overrides += [Override(match=m, spec=SpecPatch(**patches[members[0]]))
                          for m in group_matches(eng_like, members)]
        else:  # integer and float-cast members mixed: each keeps its own kind
            overrides += [Override(match=n, spec=SpecPatch(**patches[n])) for n in members]
    d = base.model_dump(mode="json")
    # exclude_unset keeps each override's meaning (an explicit float: false re-quantizes)
    d["overrides"] = [o.model_dump(mode="json", exclude_unset=True) for o in overrides]
    d["name"] = name or f"{base.name}_mp"
    d["description"] = (f"{base.name} + mixed precision ({result['budget']['text']}, {result['cost_model']} "
                        f"cost {result['cost']:.4g})")
    if not result["met"]:  # written for review, but never mistaken for a recipe that meets its budget
        if result.get("reproduced") and result.get("reproduced_met") is False:
            why = ("the search's figure met it, this recipe run through prepare + calibrate does not "
                   f"({result['budget']['metric']} {_fmt(result['reproduced'].get(result['budget']['metric']))} "
                   f"vs {_fmt(result['metrics'].get(result['budget']['metric']))} measured by the search)")
        else:
            why = ("no configuration tried met it on the search images; this is the most precise one the "
                   "choices allow")
        d["description"] = f"BUDGET NOT MET ({why}): " + d["description"]
    if checkpoint and d.get("model") is not None:
        d["model"].update(checkpoint=checkpoint, pretrained=False)
    for key in ("checkpoint", "pretrained_file"):
        # the recipe is written into OUT, where a relative path would be read against OUT (recipe files
        # resolve model files against their own folder): the weights it was searched with, absolute
        if (d.get("model") or {}).get(key):
            d["model"][key] = storage.absolute(d["model"][key])
    return Recipe.model_validate(d)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def verify_recipe(recipe: Recipe, fp32: nn.Module, calib_batches: Iterable, eval_batches: Iterable,
                  workers: int = 1) -> dict[str, Any]:
    """Run ``recipe`` through the normal PTQ path (``api.prepare`` on a copy of ``fp32`` +
    ``api.calibrate`` on ``calib_batches``) and return its metrics on ``eval_batches``."""
    m = api.prepare(copy.deepcopy(fp32), recipe)
    api.calibrate(m, calib_batches)
    return Engine(m, eval_batches).evaluate({"m": {}}, workers=workers)["m"]
