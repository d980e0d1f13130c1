"""Accuracy of several models on the same data in ONE pass: top-1/top-5, per-class accuracy, and
agreement / logit SQNR of each model against a reference (the FP32 model).

Data parallel: :class:`EvalAccumulator` holds only sums (integer counts, float64 signal/noise
energies), so shards evaluated by different ranks merge exactly (:meth:`EvalAccumulator.merge`,
:meth:`EvalAccumulator.all_reduce`). :func:`evaluate_models` all-reduces by itself when a
``torch.distributed`` group is active, so K ranks that each pass their shard of the data all return
the figures of one process that saw everything.

Many variants in one pass: the data path (reading, decoding, copying to the device) is paid once per
batch whatever the number of models; each model adds its forward. :class:`EvalCost` measures both
(so a report says what one more variant costs), and :class:`WeightSharing` makes prepared variants
hold the FP32 model's tensors instead of copies wherever they are bit-identical, so N variants cost
one set of weights plus what each really changes (BatchNorm-folded convs, quantizer ranges).
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import UserError
from .models import output_logits


@dataclass
class ModelScore:
    name: str
    count: int = 0
    top1: float = 0.0
    top5: float = 0.0
    per_class: list[float] = field(default_factory=list)
    agreement: float | None = None  # top-1 agreement with the reference, %
    sqnr_db: float | None = None  # logit SQNR against the reference, dB
    top5_k: int = 5  # the k of "top-5": the class count when there are fewer than 5 classes
    nonfinite: int = 0  # images whose logits hold inf/NaN (scored wrong and disagreeing)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: every float64 is an integer multiple of 2**-1074 (the smallest subnormal): sums kept as such
#: integers are exact, so they do not depend on the order of the additions
_EXACT_SHIFT = 1074


def _exact_sum(values: torch.Tensor) -> int:
    """The exact sum of float64 ``values`` (finite) as an integer multiple of ``2**-1074``."""
    total = 0
    for v in values.tolist():
        num, den = v.as_integer_ratio()  # den is a power of two
        total += num << (_EXACT_SHIFT + 1 - den.bit_length())
    return total


def _from_exact(total: int) -> float:
    """The float64 nearest to ``total * 2**-1074`` (correctly rounded; inf beyond float64's range)."""
    try:
        return total / (1 << _EXACT_SHIFT)
    except OverflowError:
        return math.inf


def _stable_rank(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's position of its label's logit in a stable descending sort of the row: the logits above
    it, plus the equal ones at a lower class index (``argmax``'s tie rule). Shape (N,), int64."""
    v = out.gather(1, labels[:, None].long())
    lower = torch.arange(out.shape[1], device=out.device)[None, :] < labels[:, None]
    return (out > v).sum(1) + ((out == v) & lower).sum(1)


def label_outside(labels: torch.Tensor, num_classes: int) -> int | None:
    """The first label outside ``[0, num_classes)``, or None when all are inside."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        return int(labels[(labels < 0) | (labels >= num_classes)][0])
    return None


class EvalAccumulator:
    """Mergeable statistics of one evaluation pass of several models (named ``names``).

    Integer counts (CPU int64): ``total`` images, ``class_count[c]``, and per model (rows in
    ``names`` order) ``correct1``, ``correct5``, ``agree`` (top-1 equal to the reference's),
    ``class_correct[m, c]`` and ``nonfinite`` (images with an inf/NaN logit: never correct, never in
    agreement, and the model's SQNR is -inf). Ranks are those of a stable descending sort: among tied
    logits the lower class index comes first (``argmax``'s rule), so top-1, top-5 and agreement agree
    with each other and do not depend on the device's ``topk`` order.
    Energies per model: ``sig`` (reference logit energy) and ``noise``
    (energy of the difference to the reference), float64 views of exact sums (each image's energy is
    added as an exact multiple of 2**-1074). All are sums over samples, so accumulators of disjoint
    shards merge by addition, exactly: K ranks, any batch size or shard split report bit for bit what
    one process reports (each image's own energy being the same float64).
    """

    def __init__(self, names: Sequence[str], num_classes: int, reference: str | None = None) -> None:
        names = list(names)
        if reference is not None and reference not in names:
            raise ValueError(f"reference model {reference!r} is not among {names}")
        m, c = len(names), int(num_classes)
        self.names, self.num_classes, self.reference = names, c, reference
        self.total = torch.zeros(1, dtype=torch.int64)
        self.class_count = torch.zeros(c, dtype=torch.int64)
        self.correct1 = torch.zeros(m, dtype=torch.int64)
        self.correct5 = torch.zeros(m, dtype=torch.int64)
        self.agree = torch.zeros(m, dtype=torch.int64)
        self.class_correct = torch.zeros(m, c, dtype=torch.int64)
        self.nonfinite = torch.zeros(m, dtype=torch.int64)
        self.sig = torch.zeros(m, dtype=torch.float64)
        self.noise = torch.zeros(m, dtype=torch.float64)
        self.sig_exact = [0] * m
        self.noise_exact = [0] * m

    def _sync_floats(self) -> None:
        for i in range(len(self.names)):
            self.sig[i] = _from_exact(self.sig_exact[i])
            self.noise[i] = _from_exact(self.noise_exact[i])

    def _ints(self) -> list[torch.Tensor]:
        return [self.total, self.class_count, self.correct1, self.correct5, self.agree, self.class_correct,
                self.nonfinite]

    def _floats(self) -> list[torch.Tensor]:
        return [self.sig, self.noise]

    def _check_labels(self, labels: torch.Tensor) -> None:
        c = self.num_classes
        bad = label_outside(labels, c)
        if bad is not None:
            raise UserError(f"evaluation data: label {bad} is outside [0, {c}) (the dataset's classes)")

    @torch.no_grad()
    def update(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Add one batch: ``logits[name]`` of shape ``(N, num_classes)`` for every model (or the model's raw
        output: a Hugging Face ``ModelOutput`` / tuple, see :func:`quantcore.models.output_logits`),
        ``labels`` (N,)."""
        c = self.num_classes
        self._check_labels(labels)
        # a model's raw output: Hugging Face classifiers return a ModelOutput, distilled heads a tuple
        logits = {n: output_logits(v) for n, v in logits.items()}
        for n, out in logits.items():
            if out.shape[-1] != c:
                raise UserError(f"model.num_classes: model {n!r} gives {out.shape[-1]} logits, but the evaluation "
                                f"data has {c} classes (class folders/names in this split). A split that lacks some "
                                f"of the model's classes can only be scored when the model knows its class names "
                                f"(a Hugging Face id2label, or a quantcore checkpoint, which keeps the names of "
                                f"its calibration data) and the folders carry them; else set model.num_classes: "
                                f"{c} (and weights trained for them)")
        ref = logits[self.reference].double() if self.reference is not None else None
        ref_ok = torch.isfinite(ref).all(1) if ref is not None else None
        ref_top1 = ref.argmax(1) if ref is not None else None
        ref_energy = _exact_sum(torch.where(ref_ok, (ref ** 2).sum(1), 0.0).cpu()) if ref is not None else 0
        k = min(5, c)
        labels_cpu = labels.cpu()
        self.class_count += torch.bincount(labels_cpu, minlength=c)
        self.total += labels.numel()
        for i, n in enumerate(self.names):
            out = logits[n].float()
            ok = torch.isfinite(out).all(1)
            rank = _stable_rank(out, labels.to(out.device))
            hit1 = (rank == 0) & ok
            self.correct1[i] += int(hit1.sum())
            self.correct5[i] += int(((rank < k) & ok).sum())
            self.class_correct[i] += torch.bincount(labels_cpu[hit1.cpu()], minlength=c)
            self.nonfinite[i] += int((~ok).sum())
            if ref is not None:
                both = ok & ref_ok
                self.agree[i] += int(((out.argmax(1) == ref_top1) & both).sum())
                self.sig_exact[i] += ref_energy
                self.noise_exact[i] += _exact_sum(torch.where(both, ((out.double() - ref) ** 2).sum(1), 0.0).cpu())
        self._sync_floats()

    def _check_compatible(self, other: "EvalAccumulator") -> None:
        if (other.names, other.num_classes, other.reference) != (self.names, self.num_classes, self.reference):
            raise ValueError(f"cannot merge evaluations of different models/classes: {self.names}/"
                             f"{self.num_classes}/{self.reference} vs {other.names}/{other.num_classes}/"
                             f"{other.reference}")

    def merge(self, other: "EvalAccumulator") -> "EvalAccumulator":
        """Add ``other`` (a disjoint shard of the same evaluation) into this accumulator; returns self."""
        self._check_compatible(other)
        for a, b in zip(self._ints(), other._ints()):
            a += b
        self.sig_exact = [a + b for a, b in zip(self.sig_exact, other.sig_exact)]
        self.noise_exact = [a + b for a, b in zip(self.noise_exact, other.noise_exact)]
        self._sync_floats()
        return self

    def all_reduce(self) -> "EvalAccumulator":
        """Sum this accumulator over all ranks of the active process group, in place (the identity
        without one). Every rank must call it, with accumulators of the same models and classes.
        One int64 and one float64 collective; returns self."""
        from . import distributed

        if not distributed.active():
            return self
        parts = self._ints()
        flat = torch.cat([p.reshape(-1) for p in parts]).to(torch.int64)
        distributed.all_reduce(flat, "sum")
        offset = 0
        for p in parts:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        # the exact energies are integers beyond int64: gathered as Python ints (a few per model)
        every = distributed.all_gather_object((self.sig_exact, self.noise_exact))
        self.sig_exact = [sum(e[0][i] for e in every) for i in range(len(self.names))]
        self.noise_exact = [sum(e[1][i] for e in every) for i in range(len(self.names))]
        self._sync_floats()
        return self

    def state_dict(self) -> dict[str, Any]:
        """Plain-tensor state (e.g. to send with ``all_gather_object`` or store in a checkpoint)."""
        return {"names": list(self.names), "num_classes": self.num_classes, "reference": self.reference,
                "ints": [t.clone() for t in self._ints()], "floats": [t.clone() for t in self._floats()],
                "exact": [[str(v) for v in self.sig_exact], [str(v) for v in self.noise_exact]]}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "EvalAccumulator":
        acc = cls(d["names"], d["num_classes"], d["reference"])
        ints = list(d["ints"])
        if len(ints) == len(acc._ints()) - 1:  # a state from before the non-finite counts
            ints.append(torch.zeros_like(acc.nonfinite))
        for a, b in zip(acc._ints() + acc._floats(), ints + list(d["floats"])):
            a.copy_(b)
        if "exact" in d:  # (decimal strings: integers beyond int64)
            acc.sig_exact, acc.noise_exact = ([int(v) for v in vals] for vals in d["exact"])
        else:  # a state from before the exact sums: its float64 sums, exactly
            acc.sig_exact = [_exact_sum(acc.sig[i:i + 1]) for i in range(len(acc.names))]
            acc.noise_exact = [_exact_sum(acc.noise[i:i + 1]) for i in range(len(acc.names))]
        acc._sync_floats()
        return acc

    def scores(self) -> dict[str, ModelScore]:
        """Percentages (and SQNR in dB) from the sums; per-class NaN for a class without images."""
        total = int(self.total)
        counts = self.class_count.tolist()
        out = {}
        for i, n in enumerate(self.names):
            s = ModelScore(n, total, 100.0 * int(self.correct1[i]) / max(total, 1),
                           100.0 * int(self.correct5[i]) / max(total, 1), top5_k=min(5, self.num_classes),
                           nonfinite=int(self.nonfinite[i]))
            s.per_class = [100.0 * float(c) / float(t) if t else float("nan")
                           for c, t in zip(self.class_correct[i].tolist(), counts)]
            if self.reference is not None:
                sig, noise = float(self.sig[i]), float(self.noise[i])
                s.agreement = 100.0 * int(self.agree[i]) / max(total, 1)
                s.sqnr_db = math.inf if noise == 0 else 10.0 * math.log10(sig / noise) if sig else -math.inf
                if s.nonfinite and n != self.reference:
                    s.sqnr_db = -math.inf  # an inf/NaN logit is an unbounded error
            out[n] = s
        return out


class EvalCost:
    """Where the time of one evaluation pass goes, per image: the data path vs. each model's forward.

    Filled by :func:`evaluate_models` (``cost=``). Seconds (wall clock, ``time.perf_counter``):
    ``data_s`` the loop waited for the next batch and copied it to the device (with loader workers,
    decoding that overlaps the forwards is hidden and not counted); ``forward_s[name]`` each model's
    forward; ``score_s`` the accumulator updates of all models; ``wall_s`` the whole loop. On CUDA the
    device is synchronized after the copy and after every forward, so each span holds its own kernels
    (the scoring already synchronizes on every batch, so this adds little). Under a process group
    :meth:`all_reduce` sums seconds and images over the ranks: seconds per image are then
    device-seconds per image, the cost to plan capacity with.
    """

    def __init__(self, names: Sequence[str], device: str | torch.device = "cpu") -> None:
        self.names = list(names)
        self.device = str(device)
        self.ranks = 1
        self.images = 0
        self.batches = 0
        self.data_s = 0.0
        self.score_s = 0.0
        self.wall_s = 0.0
        self.forward_s = {n: 0.0 for n in self.names}

    def all_reduce(self) -> "EvalCost":
        """Sum over the ranks of the active process group (in place; one float64 collective). Every
        rank must call it, with costs of the same models."""
        from . import distributed

        if not distributed.active():
            return self
        flat = torch.tensor([self.images, self.batches, self.data_s, self.score_s, self.wall_s,
                             *(self.forward_s[n] for n in self.names)], dtype=torch.float64)
        distributed.all_reduce(flat, "sum")
        v = flat.tolist()
        self.images, self.batches = int(round(v[0])), int(round(v[1]))
        self.data_s, self.score_s, self.wall_s = v[2], v[3], v[4]
        self.forward_s = dict(zip(self.names, v[5:]))
        self.ranks = distributed.world_size()
        return self

    def ms_per_image(self, seconds: float) -> float | None:
        return 1000.0 * seconds / self.images if self.images else None

    def as_dict(self, reference: str | None = None) -> dict[str, Any]:
        """JSON-able figures. ``extra_variant_ms_per_image``: what one more model adds to every image
        (its forward plus its share of the scoring), the mean over the models other than
        ``reference``; ``None`` when there are none or no images were seen."""
        share = self.score_s / max(len(self.names), 1)
        models = {n: {"s": s, "ms_per_image": self.ms_per_image(s),
                      "with_scoring_ms_per_image": self.ms_per_image(s + share)} for n, s in self.forward_s.items()}
        extra = [models[n]["with_scoring_ms_per_image"] for n in self.names if n != reference]
        extra = [e for e in extra if e is not None]
        return {"device": self.device, "ranks": self.ranks, "images": self.images, "batches": self.batches,
                "data": {"s": self.data_s, "ms_per_image": self.ms_per_image(self.data_s)},
                "scoring": {"s": self.score_s, "ms_per_image": self.ms_per_image(self.score_s)},
                "models": models,
                "total": {"s": self.wall_s, "ms_per_image": self.ms_per_image(self.wall_s)},
                "extra_variant_ms_per_image": sum(extra) / len(extra) if extra else None}


def _storages(model: nn.Module) -> list[tuple[tuple[str, int], int]]:
    """``((device, storage address), bytes)`` of every parameter and buffer of ``model``."""
    out = []
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        out.append(((str(t.device), st.data_ptr()), st.nbytes()))
    return out


def model_memory(models: dict[str, nn.Module]) -> dict[str, Any]:
    """Bytes the models hold in parameters and buffers, each storage counted once.

    ``models_bytes``: all models together as they are (shared tensors once); ``separate_bytes``: what
    the same models would hold as independent copies; ``own_bytes[name]``: storages of that model not
    held by a model before it in ``models`` order (put the FP32 reference first: a variant's own bytes
    are then what it changes — folded weights, ranges). Exact, independent of the allocator."""
    seen: set[tuple[str, int]] = set()
    own: dict[str, int] = {}
    separate = 0
    for name, m in models.items():
        mine = dict(_storages(m))
        separate += sum(mine.values())
        own[name] = sum(b for k, b in mine.items() if k not in seen)
        seen.update(mine)
    return {"models_bytes": sum(own.values()), "separate_bytes": separate, "own_bytes": own}


def peak_memory(device: str | torch.device) -> dict[str, Any]:
    """Peak memory of this process so far: ``torch.cuda.max_memory_allocated`` on a CUDA device,
    else the peak resident set size (``getrusage`` ``ru_maxrss``, Linux kB -> bytes), which covers
    the whole process (interpreter, libraries, data), not only the models."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(dev)), "source": "torch.cuda.max_memory_allocated"}
    return {"peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
            "source": "process peak RSS, ru_maxrss"}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical tensors of the same kind (``torch.equal`` alone takes -0.0 for 0.0; NaN never
    matches, so such a tensor simply stays unshared)."""
    if (type(a) is not type(b) or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device
            or a.requires_grad != b.requires_grad or not torch.equal(a, b)):
        return False
    return not a.is_floating_point() or torch.equal(torch.signbit(a), torch.signbit(b))


class WeightSharing:
    """Make prepared variants hold the tensors of the FP32 model (and of earlier variants) instead of
    their own copies, wherever the two are bit-identical.

    A variant is prepared on a ``copy.deepcopy`` of the FP32 model (BatchNorm folding changes conv
    weights in place, so the copy is needed while preparing); :meth:`share` then replaces each of its
    parameters/buffers that is bit-identical to the tensor of the same name already held by the FP32
    model or an earlier variant by that very tensor, and the copy is freed. What a variant changes
    (folded convs, new biases) stays its own, and is shared with later variants that changed it the
    same way (W4 and W8 of one folded CNN). Quantizer state (``amin``/``amax``, learnable scales) is
    never shared: it is per variant by nature and small. Fake-quantized weights are computed in each
    forward from the shared FP32 values, so outputs are exactly those of separate copies.

    Peak memory while preparing N variants: the FP32 model, one transient copy, and what the variants
    change. Shared tensors are the same objects in several models: change them in place (training, a
    second ``fold_batchnorm``) only after ``copy.deepcopy`` of the model you change.
    """

    def __init__(self, reference: nn.Module) -> None:
        self._pool: dict[str, list[torch.Tensor]] = {}
        self.share(reference)

    @staticmethod
    def _slots(model: nn.Module):
        from .quantizer import TensorQuantizer

        for mname, mod in model.named_modules(remove_duplicate=False):
            if isinstance(mod, TensorQuantizer):
                continue
            for table in (mod._parameters, mod._buffers):
                for key, t in list(table.items()):
                    if t is not None:
                        yield table, key, f"{mname}.{key}" if mname else key, t

    @torch.no_grad()
    def share(self, model: nn.Module) -> int:
        """Point ``model``'s bit-identical tensors at the pooled ones; returns the bytes no longer
        held twice (by this model's own copies)."""
        saved = 0
        for table, key, name, t in self._slots(model):
            pool = self._pool.setdefault(name, [])
            if any(c is t for c in pool):
                continue
            match = next((c for c in pool if _same_bits(c, t)), None)
            if match is None:
                pool.append(t)
            else:
                table[key] = match
                saved += t.untyped_storage().nbytes()
        return saved


@torch.no_grad()
def evaluate_models(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], batches: Iterable,
                    num_classes: int, reference: str | None = None, device: str | torch.device = "cpu",
                    progress: Callable[[int], None] | None = None, *, sync: bool | None = None,
                    accumulator: EvalAccumulator | None = None,
                    cost: EvalCost | None = None) -> dict[str, ModelScore]:
    """Evaluate every model on each batch as it arrives (one pass over the data).

    ``models`` maps a name to a callable returning logits (a module, or a closure that toggles
    quantization on a shared prepared model). ``batches`` yields ``(images, labels[, ...])``.

    Data parallel: with ``sync`` (default: whenever a ``torch.distributed`` group of more than one
    rank is active) every rank passes ITS OWN shard of the data and the statistics are all-reduced
    after the pass, so every rank returns the scores of the union of the shards: top-1, top-5,
    per-class accuracy, agreement and ``count`` are computed from identical integer counts (exactly
    the single-process figures), SQNR from float64 energy sums that equal the single-process ones up
    to summation order (relative difference ~1e-15). "Exactly" presumes each image gets the logits it
    would get in the single process: the same batches (kernels may round in the last bit differently
    for another batch size; :mod:`quantcore.pipeline` shards whole batches for this reason), or a
    model whose rounding does not change a top-k decision. Every rank must call it
    (a rank with an empty shard passes no batches); ``sync=False`` evaluates only the local data.
    ``accumulator``: add into this :class:`EvalAccumulator` (e.g. several passes merged later)
    instead of a fresh one; it is all-reduced in place when syncing.
    ``cost``: an :class:`EvalCost` for the same models, filled with the time spent waiting for data
    and in each model (added to what it holds; summed over the ranks when syncing).
    """
    if reference is not None and reference not in models:
        raise ValueError(f"reference model {reference!r} is not among {list(models)}")
    for m in models.values():
        if isinstance(m, nn.Module):
            m.eval()
    acc = accumulator if accumulator is not None else EvalAccumulator(list(models), num_classes, reference)
    if (acc.names, acc.num_classes, acc.reference) != (list(models), int(num_classes), reference):
        raise ValueError("accumulator was made for other models/classes/reference")
    if cost is not None and cost.names != list(models):
        raise ValueError(f"cost was made for models {cost.names}, not {list(models)}")
    dev = torch.device(device)
    cuda = cost is not None and dev.type == "cuda"
    clock = time.perf_counter

    def mark() -> float:
        if cuda:  # attribute queued kernels to the span that launched them
            torch.cuda.synchronize(dev)
        return clock()

    it = iter(batches)
    start = t0 = clock()
    for batch in it:
        images, labels = batch[0].to(device), batch[1].to(device)
        acc._check_labels(labels)
        if cost is None:
            acc.update({n: fn(images) for n, fn in models.items()}, labels)
        else:
            t = mark()
            cost.data_s += t - t0
            logits = {}
            for n, fn in models.items():
                logits[n] = fn(images)
                t1 = mark()
                cost.forward_s[n] += t1 - t
                t = t1
            acc.update(logits, labels)
            t0 = clock()
            cost.score_s += t0 - t
            cost.images += labels.numel()
            cost.batches += 1
        if progress is not None:
            progress(labels.numel())
        if cost is not None:
            t0 = clock()  # the progress bar is nobody's cost
    if cost is not None:
        cost.wall_s += clock() - start
    from . import distributed

    if sync if sync is not None else distributed.active():
        acc.all_reduce()
        if cost is not None:
            cost.all_reduce()
    return acc.scores()


def quant_toggle(model: nn.Module, quantized: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running a prepared model with fake quantization on or off (one copy of weights)."""
    from .api import set_quantization

    def run(x: torch.Tensor) -> torch.Tensor:
        set_quantization(model, quantized)
        return model(x)

    return run


def _mb(b: int | None) -> str:
    if b is None:
        return "–"
    return f"{b / 2 ** 20:.1f} MB" if b >= 2 ** 20 else f"{b / 2 ** 10:.1f} kB"


def cost_markdown(ec: dict[str, Any], reference: str | None = "fp32") -> str:
    """The "Evaluation cost" section of report.md from ``report["evaluation_cost"]`` (``time``: an
    :meth:`EvalCost.as_dict`, ``memory``: :func:`model_memory` plus :func:`peak_memory`)."""
    t, mem = ec.get("time") or {}, ec.get("memory") or {}
    if not t:
        return ""

    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    ranks = t.get("ranks", 1)
    lines = ["## Evaluation cost", "",
             f"{t['images']} images in {t['batches']} batches on {t['device']}"
             + (f", summed over {ranks} ranks (device-seconds)" if ranks > 1 else "") + ". "
             "The data path is paid once per image whatever the number of variants; each variant adds "
             "its forward (and its share of the scoring).", "",
             "| part | ms / image | s |", "|---|---|---|",
             f"| data path (wait for batch + copy to device) | {ms(t['data']['ms_per_image'])} | "
             f"{t['data']['s']:.2f} |"]
    for n, m in t["models"].items():
        lines.append(f"| forward `{n}`{' (reference)' if n == reference else ''} | {ms(m['ms_per_image'])} | "
                     f"{m['s']:.2f} |")
    lines += [f"| scoring (all models) | {ms(t['scoring']['ms_per_image'])} | {t['scoring']['s']:.2f} |",
              f"| **total** | {ms(t['total']['ms_per_image'])} | {t['total']['s']:.2f} |", ""]
    if t.get("extra_variant_ms_per_image") is not None:
        lines += [f"One more variant costs about **{t['extra_variant_ms_per_image']:.2f} ms per image** "
                  f"(mean forward + scoring share of the variants).", ""]
    if mem:
        own = mem.get("own_bytes") or {}
        lines += [f"Memory: the models hold {_mb(mem.get('models_bytes'))} of weights and buffers "
                  f"(as separate copies: {_mb(mem.get('separate_bytes'))}); each variant's own tensors "
                  "(what it changes, e.g. folded BatchNorm, ranges): "
                  + ", ".join(f"`{n}` {_mb(b)}" for n, b in own.items() if n != reference)
                  + (f". Peak: {_mb(mem.get('peak_bytes'))} ({mem.get('source')})." if mem.get("peak_bytes") else "."),
                  ""]
    return "\n".join(lines) + "\n"
