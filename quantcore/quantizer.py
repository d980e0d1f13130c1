"""TensorQuantizer: one fake-quantization point in a model.

The range lives in buffers (``amin``/``amax``) so it travels in the state_dict; calibration and
quantization are separate switches; the collector (histogram or max state) is plain data that can be
exported, merged across workers and loaded back before ranges are finalized.
"""
from __future__ import annotations

import torch
from torch import nn

from .calib.histogram import DEFAULT_BINS, HistogramState, memory_order
from .calib.maxcal import MaxState, all_finite
from .calib.registry import calibrator
from .errors import CalibrationError, UserError
from .formats import QuantSpec
from .plugins import PluginError, is_plugin
from .quantizer_kinds.affine import MIN_SCALE as _MIN_SCALE
from .quantizer_kinds.base import contracted_size
from .quantizer_kinds.affine import LSQFakeQuant, _fixed_fake_quant  # noqa: F401 - public here since 0.1


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x`` covers its memory without gaps in some dimension order (contiguous, channels-last,
    permuted), i.e. whether a copy would only change the layout."""
    return x.is_contiguous() or memory_order(x).is_contiguous()


def _range_of_grid(scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
                   symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amin, amax)`` (float32, shaped like ``scale``) from which :meth:`TensorQuantizer.scale_zero_point`
    derives exactly ``scale`` and ``zp`` again: ``scale * qmax`` divided by ``qmax`` can be one ulp
    off in float32, which would move outputs after ``convert``; ``amax`` is stepped by ulps until the
    division returns ``scale`` bit for bit (a few steps at most)."""
    lo = torch.zeros_like(scale) if symmetric else (qmin - zp) * scale
    hi = scale * qmax if symmetric else (qmax - zp) * scale
    span = qmax if symmetric else qmax - qmin
    for _ in range(16):
        got = hi / span if symmetric else (hi - lo) / span
        if torch.equal(got, scale):
            break
        hi = torch.where(got < scale, torch.nextafter(hi, torch.full_like(hi, float("inf"))),
                         torch.where(got > scale, torch.nextafter(hi, torch.zeros_like(hi)), hi))
    return (-hi if symmetric else lo), hi


def representable_scale(scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> torch.Tensor:
    """The scale a range written by ``convert`` gives back: ``scale`` itself for almost every value;
    for the few float32 scales no range reproduces (about 0.5 % at 8 bits, 7 % at 4 bits), the nearest
    one that does. QAT moves its learned scales onto this set after its last step, so converting
    never moves an output."""
    lo, hi = _range_of_grid(scale, zp, qmin, qmax, symmetric)
    return hi / qmax if symmetric else (hi - lo) / (qmax - qmin)


class TensorQuantizer(nn.Module):
    """Fake-quantizes a tensor according to a :class:`QuantSpec`.

    Modes: ``calibrating`` (collect statistics, pass through), ``quantize`` (apply fake quant once a
    range exists). ``kind`` is ``"weight"`` or ``"activation"``; weights are calibrated from the
    parameter itself, never from data.
    """

    def __init__(self, spec: QuantSpec, kind: str = "activation", bins: int = DEFAULT_BINS) -> None:
        super().__init__()
        if kind not in ("weight", "activation"):
            raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
        self.spec = spec
        self.kind = kind
        self.bins = bins
        self.calibrating = False
        self.quantize = True
        self.collector: HistogramState | MaxState | None = None
        self.register_buffer("amin", torch.empty(0))
        self.register_buffer("amax", torch.empty(0))
        # Weights: ``weight_attr`` names the parameter on the owning module the range comes from; a
        # weight computed in forward (weight_attr None) is calibrated from what the op received
        # (``observed``), recorded while ``observe`` is set (during a calibration pass).
        self.weight_attr: str | None = None
        self.observe = False
        self.observed: torch.Tensor | None = None
        # Learnable (QAT) parameters are created on demand by make_learnable().
        self.scale: nn.Parameter | None = None
        self.zero_point: nn.Parameter | None = None
        self.floored_from: tuple[torch.Tensor, torch.Tensor] | None = None  # see set_range
        # the model's name for this quantizer (api.start_calibration sets it): errors raised while it
        # collects inside a forward pass name it
        self.qname: str | None = None

    # -- state --------------------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        return self.spec.is_float or self.amax.numel() > 0

    @property
    def active(self) -> bool:
        """Whether forward changes the tensor."""
        return self.spec.enabled and self.quantize and not self.calibrating and self.is_calibrated

    def set_spec(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.collector = None

    def reset_range(self) -> None:
        self.amin = torch.empty(0, device=self.amin.device)
        self.amax = torch.empty(0, device=self.amax.device)

    def set_range(self, lo: torch.Tensor | float, hi: torch.Tensor | float) -> None:
        """Set the calibrated range; the grid always contains zero."""
        dev = self.amax.device
        lo_t = torch.as_tensor(lo, dtype=torch.float32).detach().clone().to(dev)
        hi_t = torch.as_tensor(hi, dtype=torch.float32).detach().clone().to(dev)
        # the grids work in float32: a range (or its width, asymmetric) beyond float32's would give an
        # infinite scale and NaN outputs
        width = (hi_t.double() - lo_t.double()).abs().max() if lo_t.numel() else 0.0
        if not (torch.isfinite(lo_t).all() and torch.isfinite(hi_t).all()) or width > torch.finfo(torch.float32).max:
            raise ValueError(f"range [{float(torch.as_tensor(lo).min()):.4g}, {float(torch.as_tensor(hi).max()):.4g}] "
                             f"does not fit the float32 grid (|values| and the range's width must stay below "
                             f"{torch.finfo(torch.float32).max:.3g})")
        if self.spec.axis is None and (lo_t.numel() != 1 or hi_t.numel() != 1):
            raise ValueError(f"range of {lo_t.numel()} / {hi_t.numel()} values for a per-tensor quantizer "
                             "(it takes one lo and one hi)")
        if self.spec.symmetric:
            a = torch.maximum(lo_t.abs(), hi_t.abs())
            lo_t, hi_t = -a, a
        else:
            lo_t, hi_t = torch.clamp(lo_t, max=0.0), torch.clamp(hi_t, min=0.0)
        g_lo, g_hi, at_floor = self.spec.kind.grid_range(lo_t, hi_t, self.spec)
        # a range at the grid's floor is reported by calibration (api.finalize names the quantizer);
        # channels whose range is exactly zero (all-zero data, pruned weights) lose nothing
        at_floor = at_floor & (torch.maximum(lo_t.abs(), hi_t.abs()) > 0)
        self.floored_from = (lo_t, hi_t) if bool(at_floor.any()) else None
        self.amin, self.amax = g_lo, g_hi

    # -- calibration ----------------------------------------------------------------------------
    def start_calibration(self) -> None:
        """Begin a fresh collection (activations) — previous statistics are dropped."""
        self.collector = self.new_collector()
        self.calibrating = self.kind == "activation" and not self.spec.is_float
        if self.kind == "weight" and self.weight_attr is None:
            self.observe, self.observed = True, None

    def new_collector(self) -> HistogramState | MaxState:
        cal = calibrator(self.spec.calibrator)
        if self.spec.axis is not None and cal.statistics != "max" and self.kind == "activation":
            raise ValueError(f"per-channel activation ranges support calibrator 'max' only, not "
                             f"{self.spec.calibrator!r}")
        return cal.new_state(self.spec, self.bins)

    def collect(self, x: torch.Tensor) -> None:
        if self.collector is None:
            self.collector = self.new_collector()
        self.collector.update(x)

    def finalize(self) -> bool:
        """Turn collected statistics into a range. Returns False when nothing was collected."""
        self.calibrating = False
        if self.spec.is_float:
            return True
        c = self.collector
        if c is None:
            return False
        if c.total == 0:
            # a collection ran and never reached this quantizer: it passes data through (a range
            # from an earlier calibration would describe other data and still act)
            self.reset_range()
            self.floored_from = None
            return False
        if isinstance(c, HistogramState):
            from .calib.search import find_range  # local: search depends on formats only

            lo, hi = self._plugin_range(lambda: find_range(c, self.spec))
        elif self.spec.enabled and is_plugin(cal := calibrator(self.spec.calibrator)):
            # a plug-in calibrator computes its own range from the min/max statistics too (per channel:
            # tensors), as it does from a histogram; built-in ones take the observed extremes
            lo, hi = self._plugin_range(lambda: cal.compute_range(c, self.spec))
            lo, hi = self.spec.kind.extremes_range(lo, hi, self.spec)  # what the grid can carry, as for max
        else:
            # (a disabled quantizer never applies its grid: nothing to refuse)
            lo, hi = self.spec.kind.extremes_range(c.min, c.max, self.spec) if self.spec.enabled else (c.min, c.max)
        self.set_range(lo, hi)
        return True

    def calibrate_tensor(self, x: torch.Tensor) -> None:
        """One-shot calibration from a tensor (weights): max, or MSE searched on the tensor itself."""
        if self.spec.is_float:
            return
        if not all_finite(x):
            raise ValueError("non-finite values (inf/nan) in the weight")
        rng = self._plugin_range(lambda: self.spec.kind.tensor_range(x.detach(), self.spec), may_be_none=True)
        if rng is not None:
            self.set_range(*rng)
            return
        self.collector = self.new_collector()
        self.collector.update(x)
        self.finalize()

    # -- quantization parameters ----------------------------------------------------------------
    def scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and integer zero point derived from the range (shape () or (C,))."""
        qmin, qmax = self.spec.qrange()
        # float32 whatever model.to(dtype) did to the range buffers: torch's fake-quant ops need it
        amin, amax = self.amin.float(), self.amax.float()
        if self.spec.symmetric:
            scale = (amax / qmax).clamp_min(_MIN_SCALE)
            zp = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = ((amax - amin) / (qmax - qmin)).clamp_min(_MIN_SCALE)
            zp = torch.clamp(torch.round(qmin - amin / scale), qmin, qmax).to(torch.int32)
        return scale, zp

    def make_learnable(self) -> None:
        """Create scale/zero-point parameters from the calibrated range (QAT starts here)."""
        if self.spec.is_float or not self.is_calibrated or not self.spec.kind.supports_learnable:
            raise RuntimeError(f"make_learnable needs a calibrated quantizer whose format has a learnable range "
                               f"(format {self.spec.format!r})")
        scale, zp = self.scale_zero_point()
        self.scale = nn.Parameter(scale.reshape(-1).clone())
        self.zero_point = nn.Parameter(zp.reshape(-1).float())
        self.spec = self.spec.model_copy(update={"learnable": True})

    @torch.no_grad()
    def convert(self) -> None:
        """Write learned scale/zero point back into the range (``amin``/``amax``) and go back to the
        fixed-range ops: encodings, checkpoints and export then see the trained values. The output is
        unchanged bit for bit (the range reproduces the scale exactly, :func:`_range_of_grid`; the
        learnable op rounds and clamps the zero point as the fixed one does) when the scale is
        representable, as QAT leaves it (:func:`representable_scale`); otherwise the nearest one is used.
        No-op for a quantizer that is not learnable."""
        if not self.spec.learnable or self.scale is None:
            return
        qmin, qmax = self.spec.qrange()
        scale = self.scale.detach().abs().clamp_min(_MIN_SCALE).float()
        zp = self.zero_point.detach().round().clamp(qmin, qmax).float()
        shape = self.amax.shape if self.amax.numel() == scale.numel() else scale.shape
        amin, amax = _range_of_grid(scale, zp, qmin, qmax, self.spec.symmetric)
        self.amin, self.amax = amin.reshape(shape), amax.reshape(shape)
        self.scale, self.zero_point = None, None
        self.spec = self.spec.model_copy(update={"learnable": False})

    # -- plug-in code: failures and wrong results named by quantizer ---------------------------------
    def _who(self) -> str:
        s = self.spec
        k = type(s.kind)
        cal = "" if s.is_float else f", calibrator {s.calibrator!r}"
        return f"quantizer {self.qname or '(unnamed)'!r} (format {s.format!r} = {k.__module__}.{k.__qualname__}{cal})"

    def _plugin_code(self) -> bool:
        if is_plugin(self.spec.kind):
            return True
        return not self.spec.is_float and is_plugin(calibrator(self.spec.calibrator))

    def _plugin_fake_quant(self, _q: "TensorQuantizer", x: torch.Tensor, **kw) -> torch.Tensor:
        try:
            y = self.spec.kind.fake_quant(self, x, **kw)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a plug-in's failure, named
            raise PluginError(f"{self._who()}: fake_quant raised {type(e).__name__}: {e}") from e
        if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
            got = (f"a {y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor)
                   else type(y).__name__)
            raise PluginError(f"{self._who()}: fake_quant returned {got} for a {x.dtype} input of shape "
                              f"{tuple(x.shape)}; it must return the input's shape and dtype")
        if y.is_floating_point() and not bool(torch.isfinite(y).all()) and bool(torch.isfinite(x).all()):
            raise PluginError(f"{self._who()}: fake_quant returned inf/NaN for finite input")
        return y

    def _plugin_range(self, compute, may_be_none: bool = False) -> tuple:
        """``compute()`` (a range search) with a plug-in's failures and malformed results named."""
        if not self._plugin_code():
            return compute()
        try:
            rng = compute()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            raise PluginError(f"{self._who()}: its range computation raised {type(e).__name__}: {e}") from e
        if (rng is not None or not may_be_none) and (not isinstance(rng, (tuple, list)) or len(rng) != 2):
            raise PluginError(f"{self._who()}: its range computation returned {type(rng).__name__} {rng!r:.80}; "
                              "it must return (lo, hi)")
        if rng is not None:
            try:
                lo, hi = (torch.as_tensor(v, dtype=torch.float32) for v in rng)
                inverted = bool((lo > hi).any())
                finite = bool(torch.isfinite(lo).all() and torch.isfinite(hi).all())
            except (TypeError, ValueError, RuntimeError) as e:
                raise PluginError(f"{self._who()}: its range computation returned {rng!r:.80}, not numbers or "
                                  f"tensors of numbers ({e})") from None
            if not finite:
                raise PluginError(f"{self._who()}: its range computation returned inf/NaN ({rng!r:.80})")
            if inverted:  # a grid from it would be empty or flipped, and reported as calibrated
                raise PluginError(f"{self._who()}: its range computation returned lo > hi ({rng!r:.80}); it "
                                  f"must return (lo, hi) with lo <= hi")
        return rng

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, dims: tuple[int, ...] | int | None = None) -> torch.Tensor:
        """Fake-quantize ``x`` (or collect its statistics while calibrating). ``dims``: the dimension(s)
        of ``x`` that the product op consuming it contracts (a Linear input's features, a conv input's or
        weight's channels), given by the placement's call sites; only kinds with run-time block scales
        (``supports_blocks``) read it, and None means the last dimension."""
        if self.spec.on_grid and self.spec.kind.supports_blocks:  # while collecting too: before a checkpoint
            self._check_slices(x, dims)
        if self.calibrating:
            if x.device.type == "cpu" and not _dense(x):
                # A strided view (q/k/v sliced from a fused qkv output): the collector would copy it
                # to read it fast, and the matmul that follows would copy it again; one copy serves both.
                x = x.contiguous()
            try:
                self.collect(x)
            except ValueError as e:
                if self.qname is None or isinstance(e, CalibrationError):
                    raise
                raise CalibrationError(f"quantizer {self.qname!r} (format {self.spec.format!r}, calibrator "
                                       f"{self.spec.calibrator!r}): {e}") from None
            return x
        if not self.active:
            return x
        kind = self.spec.kind
        fq = kind.fake_quant if not is_plugin(kind) else self._plugin_fake_quant
        if kind.supports_blocks and dims is not None:
            fq = (lambda q, t, f=fq: f(q, t, dims=dims))
        if kind.is_float:
            return fq(self, x)
        orig = x.dtype
        y = fq(self, x.float() if orig != torch.float32 else x)  # grids work in float32
        if orig == torch.float32:
            return y
        if orig.is_floating_point and torch.finfo(orig).max < torch.finfo(torch.float32).max:
            # an asymmetric grid's end can lie just past the dtype's largest value (fp16: 65504):
            # the nearest value the dtype holds, not inf
            fi = torch.finfo(orig)
            y = y.clamp(fi.min, fi.max)
        return y.to(orig)

    def _check_slices(self, x: torch.Tensor, dims) -> None:
        """Run-time scales over slices of one value would reproduce every value exactly: a quantizer in
        the tables that does nothing (a 1-channel image, a conv on one channel). Refused by name."""
        k = contracted_size(dims, x.shape)
        if x.dim() and k < 2:
            raise CalibrationError(
                f"quantizer {self.qname or '(unnamed)'!r} (format {self.spec.format!r}): its run-time scales cover "
                f"slices of {k} value of a {tuple(x.shape)} tensor (what the product consuming it contracts), so "
                f"every value would be its own scale and nothing would be quantized; give it format int (an "
                f"override) or leave it float")

    # -- persistence -------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook
        # Ranges are empty before calibration and sized by it: adopt the stored shape.
        for name in ("amin", "amax"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                setattr(self, name, nn.Parameter(torch.empty_like(state_dict[key])))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        if not self.spec.enabled:
            return "disabled"
        rng = ""
        if self.amax.numel() == 1:
            rng = f" range=[{float(self.amin):.4g}, {float(self.amax):.4g}]"
        elif self.amax.numel() > 1:
            rng = f" amax=[{float(self.amax.min()):.4g}..{float(self.amax.max()):.4g}]x{self.amax.numel()}"
        state = "calib" if self.calibrating else ("on" if self.quantize else "off")
        return f"{self.spec.short()} {self.kind} {state}{rng}"
