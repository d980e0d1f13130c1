"""QAT benchmark: the cost of a quantization-aware training step, and data-parallel scaling.

    python -m bench.qat [--quick] [--device cpu|cuda] [--threads N] [--batch N] [--reps N]

1. **Step-time ratio** (ViT-S/16 timm ``vit_small_patch16_224`` and ResNet-50 torchvision, random
   weights, random 224x224 images and labels): one training step (forward, cross-entropy, backward,
   SGD+momentum step) of the QAT model divided by the same step of the FP32 model, same batch. The
   QAT model is ``quantcore.prepare(model, W8A8 recipe)`` (ViT: ft1; ResNet-50: cnn with BatchNorm
   folded, as ``qat.bn: fold`` trains it), calibrated on two random batches, then every calibrated
   integer quantizer made learnable (LSQ scale: what ``qat.ranges: learned`` trains); its step also
   clamps the learned ranges as the QAT loop does (variant *frozen*: calibrated ranges kept, STE).
   FP32 is the same architecture, unprepared (BN kept). Each repetition times every model once, the
   order rotating; the median of the per-repetition ratios is reported. On CPU the ratio is read on
   the process's CPU time (``--clock``): with one intra-op thread that is what the step costs, while
   wall time on a shared machine also counts what other jobs take. When a ratio misses the target,
   one step of each is profiled (``torch.profiler``) and the ops that make the difference are listed.
2. **Data-parallel throughput** (gloo on CPU; NCCL with >= 2 GPUs): the same QAT step under
   ``DistributedDataParallel`` on the demo ViT (``quantcore.models.vit_fmnist``, 1x28x28, W8A8 ft1,
   batch 64 per rank) in one ``torchrun --standalone --nproc_per_node 2`` launch, each rank with
   ``--ddp-threads`` intra-op threads (default 1). Three phases alternate inside it: rank 0 alone
   (the others idle in a barrier), both ranks under DDP, both ranks stepping without DDP (contention
   only). Images/s over all ranks, the scaling efficiency ``ips(2) / (2 x ips(1))`` paired per
   repetition, and the CPU time per image of all ranks (the work DDP adds, whatever the noise).

Results: ``bench/results/qat-<device>.json`` and the section between the ``bench:qat`` markers in
``docs/benchmarks.md``. Nothing here asserts a threshold; targets are written in the report only.
"""
from __future__ import annotations

from bench._docs import finish, markers, new_record, write_marked

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import quantcore

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
START, END = markers("qat")  # CPU runs; GPU runs own bench:qat-gpu
TARGET_RATIO = 1.3
NOISY_SPREAD = 1.2  # per-repetition ratios further apart than this (max/min): the run was disturbed

MODELS = {
    # key: (label, recipe placement)
    "vit_small_patch16_224": ("ViT-S/16 (timm)", {"family": "vit", "mode": "ft1"}),
    "resnet50": ("ResNet-50 (torchvision)", {"family": "cnn", "fold_bn": True}),
}
FAKE_QUANT_OPS = ("fake_quantize",)  # substring of every torch fake-quant op name (forward and backward)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def w8a8_recipe(placement: dict, name: str) -> dict:
    # The calibrator does not change the cost of a training step (every range becomes a learned LSQ
    # scale); max keeps the set-up short.
    return {"name": name, "placement": placement, "calibration": {"method": "max"},
            "quant": {"weights": {"bits": 8, "symmetric": True, "per_channel": True},
                      "activations": {"bits": 8, "symmetric": True}}}


def build_fp32(key: str) -> nn.Module:
    torch.manual_seed(0)
    if key == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None)
    import timm

    return timm.create_model(key, pretrained=False)


def _learnable(model: nn.Module) -> list[str]:
    """Every calibrated integer quantizer -> learnable LSQ scale: the QAT loop's own function when the
    tree has it, else the same steps here."""
    with contextlib.suppress(ImportError, AttributeError):
        from quantcore.qat import learnable_quantizers

        return learnable_quantizers(model)
    names = []
    for name, q in quantcore.quantizers(model).items():
        if not q.spec.enabled or q.spec.is_float or q.amax.numel() == 0 or q.spec.learnable:
            continue
        q.make_learnable()
        q.zero_point.requires_grad_(not q.spec.symmetric)
        names.append(name)
    return names


def _clamp_fn() -> Callable[[nn.Module], None]:
    """The per-step range clamp of the QAT loop (its own function when the tree has it)."""
    with contextlib.suppress(ImportError, AttributeError):
        from quantcore.qat import _clamp_ranges

        return _clamp_ranges
    from quantcore.quantizer import _MIN_SCALE, TensorQuantizer

    @torch.no_grad()
    def clamp(model: nn.Module) -> None:
        for q in model.modules():
            if isinstance(q, TensorQuantizer) and q.scale is not None:
                q.scale.clamp_(min=_MIN_SCALE)
                lo, hi = q.spec.qrange()
                q.zero_point.clamp_(lo, hi)

    return clamp


def build_qat(fp32: nn.Module, placement: dict, name: str, calib: list[torch.Tensor],
              device: torch.device, learned: bool = True) -> tuple[nn.Module, int]:
    """Prepared + calibrated copy of ``fp32``; ``learned``: LSQ ranges (else frozen ranges, STE)."""
    model = copy.deepcopy(fp32).eval()
    quantcore.prepare(model, w8a8_recipe(placement, name), example_input=calib[0][:1].cpu())
    model.to(device)
    quantcore.calibrate(model, calib)
    names = _learnable(model) if learned else []
    return model.train(), len(names)


def _compiled(model: nn.Module) -> nn.Module:
    """What ``qat.compile: true`` runs (the loop's own function when the tree has it)."""
    with contextlib.suppress(ImportError):
        from quantcore.qat import compile_for_training

        return compile_for_training(model)
    return torch.compile(model)


class Stepper:
    """forward + cross-entropy + backward + SGD(momentum) step (+ the QAT range clamp)."""

    def __init__(self, model: nn.Module, qat: bool, lr: float = 1e-4, amp: torch.dtype | None = None,
                 compile: bool = False) -> None:
        self.model = model.train()
        self.net = _compiled(model) if compile else model  # the range clamp acts on `model`
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        self.clamp = _clamp_fn() if qat else None
        self.loss_fn = nn.CrossEntropyLoss()
        self.amp = amp  # autocast dtype of forward + loss, as the QAT loop's qat.amp (bf16: no grad scaler)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = self.loss_fn(self.net(x), y)
        loss.backward()
        self.opt.step()
        if self.clamp is not None:
            self.clamp(self.model)
        return float(loss.detach())


def timed_steps(step: Stepper, x: torch.Tensor, y: torch.Tensor, n: int,
                device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds per step. On a shared CPU the process's CPU time is what the step
    costs: time other jobs take from the cores shows in the wall time only."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step(x, y)
    sync(device)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


# --------------------------------------------------------------------------------------------------
# 1. step-time ratio
# --------------------------------------------------------------------------------------------------
VARIANTS = {"learned": "QAT, learned ranges (LSQ)", "frozen": "QAT, frozen ranges (STE)"}
AMP = {"off": None, "bf16": torch.bfloat16}  # FP16 would need a grad scaler in the step: not measured


def bench_ratio(key: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    label, placement = MODELS[key]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    calib = [torch.randn(args.batch, 3, 224, 224, generator=g).to(device) for _ in range(args.calib_batches)]
    x, y = x.to(device), y.to(device)

    fp32 = build_fp32(key)
    name = f"w8a8_{placement.get('mode', 'cnn')}"
    steppers: dict[str, Stepper] = {}
    info: dict[str, dict[str, Any]] = {}
    for v in args.variants:
        t0 = time.perf_counter()
        model, n_learned = build_qat(fp32, placement, name, calib, device, learned=v == "learned")
        info[v] = {"learnable_quantizers": n_learned, "quantizers": len(quantcore.quantizers(model)),
                   "setup_s": time.perf_counter() - t0}
        steppers[v] = Stepper(model, qat=v == "learned", amp=AMP[args.amp], compile=args.compile)
        log(f"{key} {v}: {n_learned} learnable quantizers of {info[v]['quantizers']}, "
            f"set-up {info[v]['setup_s']:.1f}s")
    steppers = {"fp32": Stepper(fp32.to(device), qat=False, amp=AMP[args.amp], compile=args.compile), **steppers}
    log(f"{key}: warm-up")
    for s in steppers.values():
        for _ in range(args.warmup):
            s(x, y)

    names = list(steppers)
    clock = args.clock
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for k in order:
            w, c = timed_steps(steppers[k], x, y, args.steps, device)
            wall[k].append(w)
            cpu[k].append(c)
        log(f"{key} rep {r + 1}/{args.reps}: " + ", ".join(
            f"{k} {wall[k][-1] * 1e3:.0f} ms wall / {cpu[k][-1] * 1e3:.0f} ms cpu" for k in names) + " | " + ", ".join(
            f"{v} x{wall[v][-1] / wall['fp32'][-1]:.3f} wall, x{cpu[v][-1] / cpu['fp32'][-1]:.3f} cpu"
            for v in args.variants))
    times = cpu if clock == "cpu" else wall

    def stats(t: dict[str, list[float]], v: str) -> dict[str, Any]:
        ratios = [a / b for a, b in zip(t[v], t["fp32"])]
        return {"ms": median(t[v]) * 1e3, "best_ms": min(t[v]) * 1e3, "ratio": median(ratios),
                "best_ratio": min(t[v]) / min(t["fp32"]), "ratios": ratios,
                "noisy": max(ratios) / min(ratios) > NOISY_SPREAD, "s": t[v]}

    row = {"model": key, "label": label, "placement": placement, "batch": args.batch, "clock": clock, "amp": args.amp,
           "compile": args.compile,
           "steps_per_rep": args.steps, "fp32_ms": median(times["fp32"]) * 1e3, "fp32_s": times["fp32"],
           "fp32_best_ms": min(times["fp32"]) * 1e3, "fp32_wall_ms": median(wall["fp32"]) * 1e3,
           "fp32_cpu_s": cpu["fp32"], "fp32_wall_s": wall["fp32"],
           "variants": {v: {**info[v], "label": VARIANTS[v], **stats(times, v),
                            "wall": stats(wall, v), "cpu": stats(cpu, v)} for v in args.variants}}
    main_v = "learned" if "learned" in args.variants else args.variants[0]
    row["main"] = main_v
    row["ratio"] = row["variants"][main_v]["ratio"]
    row["best_ratio"] = row["variants"][main_v]["best_ratio"]
    if args.profile == "always" or (args.profile == "auto" and max(row["ratio"], row["best_ratio"]) > TARGET_RATIO):
        row["profile"] = profile_pair(steppers["fp32"], steppers[main_v], x, y, device)
    return row


FQ_MARK = "quantcore::fake_quant"  # record_function around TensorQuantizer.forward while profiling


@contextlib.contextmanager
def _marked_quantizers():
    """Wrap every TensorQuantizer forward in a profiler range named by its kind (bench process only),
    so the fake-quant forward time is measured whatever ops implement it."""
    from torch.profiler import record_function

    from quantcore.quantizer import TensorQuantizer

    orig = TensorQuantizer.forward

    def forward(self, x):
        with record_function(f"{FQ_MARK}[{self.kind}]"):
            return orig(self, x)

    TensorQuantizer.forward = forward
    try:
        yield
    finally:
        TensorQuantizer.forward = orig


def _prof_table(step: Stepper, x: torch.Tensor, y: torch.Tensor,
                device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """(self time per op, inclusive time per op) of one step, ms."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _marked_quantizers(), profile(activities=acts) as prof:
        step(x, y)
        sync(device)
    own: dict[str, float] = {}
    incl: dict[str, float] = {}
    for ev in prof.key_averages():
        if device.type == "cuda":
            t, ti = ev.self_device_time_total, ev.device_time_total
        else:
            t, ti = ev.self_cpu_time_total, ev.cpu_time_total
        own[ev.key] = own.get(ev.key, 0.0) + t / 1e3
        incl[ev.key] = incl.get(ev.key, 0.0) + ti / 1e3
    return own, incl


def _fake_quant_times(incl: dict[str, float]) -> dict[str, float]:
    """Forward per kind (inclusive time of the marked quantizer calls) and backward (inclusive time
    of the autograd nodes of the fake-quant ops: torch's kernels or quantcore's LSQ function)."""
    bwd = sum(v for k, v in incl.items()
              if k.startswith("autograd::engine::evaluate_function:") and ("FakeQuant" in k or "fake_quant" in k))
    return {"forward_activations_ms": incl.get(f"{FQ_MARK}[activation]", 0.0),
            "forward_weights_ms": incl.get(f"{FQ_MARK}[weight]", 0.0), "backward_ms": bwd}


def profile_pair(fp32: Stepper, qat: Stepper, x: torch.Tensor, y: torch.Tensor,
                 device: torch.device) -> dict[str, Any]:
    """Self time per op of one step of each; the ops that make the QAT step longer (and shorter)."""
    log("profiling one step of each")
    fp, _ = _prof_table(fp32, x, y, device)
    qt, qt_incl = _prof_table(qat, x, y, device)
    diff = sorted(((k, qt.get(k, 0.0) - fp.get(k, 0.0), qt.get(k, 0.0), fp.get(k, 0.0))
                   for k in set(fp) | set(qt)), key=lambda r: -r[1])
    fq = _fake_quant_times(qt_incl)
    return {"fp32_total_ms": sum(fp.values()), "qat_total_ms": sum(qt.values()),
            "fake_quant_ms": sum(fq.values()), "fake_quant": fq,
            "fake_quant_ops": {k: v for k, v in qt.items() if any(s in k for s in FAKE_QUANT_OPS)},
            "top_extra": [{"op": k, "extra_ms": d, "qat_ms": q, "fp32_ms": f} for k, d, q, f in diff[:10]],
            "top_saved": [{"op": k, "extra_ms": d, "qat_ms": q, "fp32_ms": f} for k, d, q, f in diff[::-1][:4]
                          if d < 0]}


# --------------------------------------------------------------------------------------------------
# 2. data-parallel throughput (torchrun workers)
# --------------------------------------------------------------------------------------------------
PHASES = ("1", "2", "2-nosync")


def ddp_worker(args: argparse.Namespace) -> int:
    """One torchrun rank (of 2). Every rank holds the prepared demo ViT twice, plainly and wrapped in
    DDP; the phases alternate within the one launch so machine noise hits them alike:

    * ``1``: rank 0 alone steps its plain copy while the other ranks wait in a barrier (idle: their
      CPU time is recorded to show it);
    * ``2``: every rank steps the DDP copy (gradients all-reduced each step);
    * ``2-nosync``: every rank steps its plain copy, no communication (what CPU contention alone costs).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from quantcore import distributed
    from quantcore.models import vit_fmnist

    torch.set_num_threads(args.ddp_threads)
    ctx = distributed.setup(args.device)
    if ctx.world_size < 2:
        raise SystemExit("bench.qat --ddp-worker needs torchrun with >= 2 ranks")
    device = ctx.device
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(args.ddp_batch, 1, 28, 28, generator=g).to(device)]
    qat, n_learned = build_qat(vit_fmnist(), {"family": "vit", "mode": "ft1"}, "w8a8_ft1", calib, device)
    plain = Stepper(copy.deepcopy(qat), qat=True)
    ddp = Stepper(DDP(qat, device_ids=[device.index] if device.type == "cuda" else None), qat=True)
    g = torch.Generator().manual_seed(1000 + ctx.rank)  # each rank its own data
    x = torch.randn(args.ddp_batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.ddp_batch,), generator=g).to(device)
    for st in (plain, ddp):
        for _ in range(args.ddp_warmup):
            st(x, y)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in PHASES}
    for r in range(args.ddp_reps):
        for phase in PHASES[r % 3:] + PHASES[:r % 3]:
            distributed.barrier()
            cpu0, t0 = time.process_time(), time.perf_counter()
            if phase == "2":
                for _ in range(args.ddp_steps):
                    ddp(x, y)
            elif phase == "2-nosync" or ctx.rank == 0:
                for _ in range(args.ddp_steps):
                    plain(x, y)
            sync(device)
            busy = time.perf_counter() - t0
            distributed.barrier()
            wall = time.perf_counter() - t0
            ranks = 1 if phase == "1" else ctx.world_size
            runs[phase].append({"wall_s": wall, "rank_busy_s": busy, "cpu_s": time.process_time() - cpu0,
                                "images_per_s": ranks * args.ddp_batch * args.ddp_steps / wall})
    gathered = distributed.all_gather_object(runs)
    if ctx.rank == 0:
        Path(args.ddp_out).write_text(json.dumps({
            "world_size": ctx.world_size, "steps": args.ddp_steps, "batch_per_rank": args.ddp_batch,
            "threads_per_rank": torch.get_num_threads(), "learnable_quantizers": n_learned,
            "backend": torch.distributed.get_backend(), "device": str(device), "runs": runs,
            "idle_rank_cpu_s_in_1": [x["cpu_s"] for other in gathered[1:] for x in other["1"]],
            # CPU seconds of all ranks per image, per phase and repetition (gloo threads included)
            "cpu_ms_per_image": {k: [sum(g[k][i]["cpu_s"] for g in gathered) * 1e3
                                     / ((1 if k == "1" else ctx.world_size) * args.ddp_batch * args.ddp_steps)
                                     for i in range(len(runs[k]))] for k in PHASES}}))
    distributed.teardown(ctx)
    return 0


def bench_ddp(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s): need 2 for a 2-rank NCCL run"}
    with tempfile.TemporaryDirectory(prefix="qcbench-ddp-") as tmp:
        out = Path(tmp) / "res.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "bench.qat", "--ddp-worker", "--ddp-out", str(out), "--device", device.type,
               "--ddp-batch", str(args.ddp_batch), "--ddp-steps", str(args.ddp_steps),
               "--ddp-warmup", str(args.ddp_warmup), "--ddp-threads", str(args.ddp_threads),
               "--ddp-reps", str(args.ddp_reps)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.ddp_threads), "PYTHONPATH": str(ROOT)}
        log("ddp: torchrun --standalone --nproc_per_node=2 (phases 1 / 2 / 2-nosync interleaved)")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.ddp_timeout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"torchrun with 2 ranks failed (exit {proc.returncode}):\n{tail}")
        res = json.loads(out.read_text())
        res["launch_s"] = time.perf_counter() - t0
    runs = res["runs"]
    for k in PHASES:
        log(f"ddp {k}: " + ", ".join(f"{r['images_per_s']:.0f}" for r in runs[k]) + " images/s")
    ips = {k: median([r["images_per_s"] for r in runs[k]]) for k in PHASES}
    # paired: each repetition's 2-rank phases against the 1-rank phase run next to them
    effs = [b["images_per_s"] / (2 * a["images_per_s"]) for a, b in zip(runs["1"], runs["2"])]
    effs_nosync = [b["images_per_s"] / (2 * a["images_per_s"]) for a, b in zip(runs["1"], runs["2-nosync"])]
    best = {k: max(r["images_per_s"] for r in runs[k]) for k in PHASES}
    cpi = res["cpu_ms_per_image"]
    cpu_effs = [a / b for a, b in zip(cpi["1"], cpi["2"])]
    return {"model": "quantcore.models.vit_fmnist (1x28x28), W8A8 ft1, learned ranges",
            "batch_per_rank": args.ddp_batch, "steps": args.ddp_steps, "threads_per_rank": args.ddp_threads,
            "reps": args.ddp_reps, "backend": res["backend"], "images_per_s": ips,
            "ms_per_step": {k: median([r["wall_s"] / args.ddp_steps for r in runs[k]]) * 1e3 for k in PHASES},
            "efficiency": median(effs), "efficiency_nosync": median(effs_nosync), "efficiencies": effs,
            "efficiencies_nosync": effs_nosync, "best_images_per_s": best,
            "best_efficiency": best["2"] / (2 * best["1"]), "best_efficiency_nosync": best["2-nosync"] / (2 * best["1"]),
            "cpu_ms_per_image": {k: median(v) for k, v in cpi.items()}, "cpu_ms_per_image_runs": cpi,
            "cpu_efficiency": median(cpu_effs), "cpu_efficiencies": cpu_effs,
            "cpu_efficiency_nosync": median([a / b for a, b in zip(cpi["1"], cpi["2-nosync"])]),
            "idle_rank_cpu_s_in_1": res["idle_rank_cpu_s_in_1"], "launch_s": res["launch_s"], "runs": runs}


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    for mod in ("timm", "torchvision"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _f(x: Any, nd: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _fq_split(prof: dict[str, Any]) -> tuple[float, float, float]:
    """(activation forward, weight forward, backward) fake-quant ms of a profile."""
    fq = prof.get("fake_quant") or {}
    return (fq.get("forward_activations_ms", 0.0), fq.get("forward_weights_ms", 0.0), fq.get("backward_ms", 0.0))


def interpretation(res: dict[str, Any]) -> list[str]:
    out = []
    for row in res.get("ratio", []):
        main = row["variants"][row["main"]]
        ok = row["ratio"] <= TARGET_RATIO
        spread = f"{min(main['ratios']):.2f}-{max(main['ratios']):.2f}"
        line = (f"{row['label']}: {main['label']} step {row['ratio']:.2f}x the FP32 step (per repetition "
                f"{spread}; best times {main['best_ratio']:.2f}x), target <= {TARGET_RATIO}: "
                f"{'met' if ok else 'MISSED'}.")
        if main.get("noisy"):
            line += (" The repetitions disagree by more than the margin to the target: other jobs disturbed "
                     "this run, so it is not conclusive either way.")
        others = [v for k, v in row["variants"].items() if k != row["main"]]
        for v in others:
            line += f" {v['label']}: {v['ratio']:.2f}x (best times {v['best_ratio']:.2f}x)."
        prof = row.get("profile")
        if prof:
            fq = prof["fake_quant_ms"]
            act, wt, bwd = _fq_split(prof)
            extra = prof["qat_total_ms"] - prof["fp32_total_ms"]
            line += (f" Profile of one step: the QAT step adds {extra:.0f} ms; fake quantization takes {fq:.0f} ms "
                     f"of it (forward: {act:.0f} ms activations, {wt:.0f} ms weights - the weights' share is fixed "
                     f"per step, so it shrinks as the batch grows; backward: {bwd:.0f} ms).")
            # ops FP32 never runs are structural; differences in ops both run are mostly noise of one step
            others_top = [t for t in prof["top_extra"] if t["fp32_ms"] == 0 and t["extra_ms"] > 0 and not any(
                m in t["op"] for m in ("fake_quantize", "FakeQuant", FQ_MARK, "evaluate_function"))][:3]
            if others_top:
                why = (" (ft1's explicit attention, quantized at its matmul inputs, instead of the fused kernel)"
                       if row["placement"].get("family") == "vit" else "")
                line += (f" Other ops only QAT runs{why}: "
                         + ", ".join(f"`{_op(t['op'])}` (+{t['extra_ms']:.0f} ms)" for t in others_top))
                saved = prof.get("top_saved") or []
                if saved:
                    line += "; saved: " + ", ".join(f"`{_op(t['op'])}` ({t['extra_ms']:.0f} ms)" for t in saved[:2])
                line += "."
        out.append(line)
    d = res.get("ddp")
    if d and "efficiency" in d:
        cores = res["machine"]["logical_cpus"]
        effs = d.get("efficiencies") or [d["efficiency"]]
        line = (f"2 ranks vs 1: {d['efficiency'] * 100:.0f}% scaling efficiency (per repetition "
                f"{', '.join(f'{e * 100:.0f}%' for e in effs)}; best phases "
                f"{d.get('best_efficiency', d['efficiency']) * 100:.0f}%) on {cores} logical CPUs, "
                f"{d['threads_per_rank']} intra-op thread per rank, so the two ranks take every core and the "
                "gloo all-reduce has no spare one.")
        nos = d.get("efficiency_nosync")
        if nos is not None and nos >= d["efficiency"]:
            line += (f" Two ranks that never communicate reach {nos * 100:.0f}%: the gap up to 100% is CPU "
                     "contention (two ranks on two cores shared with other jobs, memory bandwidth), the gap "
                     f"between {nos * 100:.0f}% and {d['efficiency'] * 100:.0f}% is DDP's all-reduce.")
        elif nos is not None:
            line += (f" Two ranks that never communicate measured {nos * 100:.0f}%, i.e. no faster than with the "
                     "all-reduce: in this run the machine's noise was larger than the cost of communication, "
                     "and the loss is contention for the shared cores.")
        if max(effs) > 1.0 or max(effs) - min(effs) > 0.2:
            line += (" Efficiencies above 100% or this far apart are noise: other jobs took the cores in some "
                     "phases more than in others; the median is only indicative.")
        if d.get("cpu_efficiency") is not None:
            line += (f" In CPU time, which other jobs do not inflate, an image costs {d['cpu_ms_per_image']['1']:.2f} ms "
                     f"with 1 rank and {d['cpu_ms_per_image']['2']:.2f} ms with 2 under DDP (CPU efficiency "
                     f"{d['cpu_efficiency'] * 100:.0f}%; {d['cpu_efficiency_nosync'] * 100:.0f}% without the "
                     "all-reduce): that is the work DDP adds (gradient buckets, gloo's all-reduce) plus two ranks "
                     "sharing caches and memory bandwidth - the efficiency to expect with a core per rank.")
        line += (" This measures the machine more than the loop; what it shows is that the same step runs "
                 "under torchrun/DDP unchanged and that 2 ranks do more work per second than 1.")
        out.append(line)
    return out


def _op(name: str, width: int = 70) -> str:
    """A profiler op name for the docs: CUDA kernels' template signatures run to thousands of characters."""
    return name if len(name) <= width else name[:width] + "…"


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    start, end = markers("qat-compiled" if res.get("compile") else "qat", m["device"])
    gpu = (" on the GPU" if m["device"].split(":")[0] != "cpu" else "") + (", torch.compile" if res.get("compile") else "")
    lines = [start, f"## QAT step cost and data-parallel scaling{gpu} (issue #8)", "",
             f"`{res['command']}` on {m['cpu']}, {m['logical_cpus']} logical CPUs, {res['date']}; "
             f"torch {m['torch']}, timm {m.get('timm', '?')}, torchvision {m.get('torchvision', '?')}; "
             f"device `{m['device']}`" + (f" ({m['gpu']})" if m.get("gpu") else "") + ". "
             f"Load average {res['loadavg_start']} at the start, {res.get('loadavg_end', '?')} at the end.", "",
             "The machine is shared with other jobs and noisy, and the run is kept short (few repetitions): read "
             "the ratios to about ±0.1 and the efficiencies to about ±0.1; the per-repetition spread shows the "
             "noise. The profiles are of a single step (differences in ops both models run are mostly noise). Random weights, "
             "random images and labels; nothing is downloaded.", ""]
    if res.get("ratio"):
        r0 = res["ratio"][0]
        nrep = len(r0["fp32_s"])
        lines += ["### QAT step ÷ FP32 step (target ≤ 1.3)", "",
                  f"Step = forward + cross-entropy + backward + SGD (momentum) step, batch {r0['batch']} at "
                  f"224x224{', forward and loss under bf16 autocast (both models)' if r0.get('amp') == 'bf16' else ''}"
                  f"{', every model under torch.compile (warm-up steps include the compilation)' if r0.get('compile') else ''}, "
                  f"{res['threads']} intra-op thread(s), {r0['steps_per_rep']} step(s) per repetition, "
                  f"{nrep} repetitions with every model timed in each (the order rotates), median of the "
                  "per-repetition ratios. QAT = `quantcore.prepare` with W8A8 (per-channel weights, per-tensor "
                  "activations), calibrated on random batches; *learned*: every integer quantizer made learnable "
                  "(LSQ scale) and the QAT loop's range clamp after each step; *frozen*: calibrated ranges kept, "
                  "weights trained through the straight-through estimator. FP32 = the same architecture "
                  "unprepared (BatchNorm kept; timm's fused attention).", "",
                  f"Times are **{'process CPU' if r0.get('clock') == 'cpu' else 'wall'} time** per step"
                  + (" (with one intra-op thread, what the step costs whatever other jobs take from the cores; "
                     "the wall-time ratio is given beside it)" if r0.get("clock") == "cpu" else "")
                  + ". ms/step are medians (best in brackets); *ratio* is the median of the per-repetition "
                  "ratios (what the target is read on), *best* the ratio of the two best times.", "",
                  "| model | placement | QAT variant | quantizers (learned) | FP32 ms/step | QAT ms/step | ratio | "
                  "best | per repetition | wall-time ratio | target ≤ 1.3 |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
        for row in res["ratio"]:
            pl = row["placement"]
            pls = f"{pl['family']} {pl.get('mode', '')}".strip() + (" (BN folded)" if pl.get("fold_bn") else "")
            for k, v in row["variants"].items():
                bold = "**" if k == row["main"] else ""
                verdict = "met" if v["ratio"] <= TARGET_RATIO else "missed"
                lines.append(f"| {row['label']} | {pls} | {k} | {v['quantizers']} ({v['learnable_quantizers']}) | "
                             f"{row['fp32_ms']:.0f} ({row['fp32_best_ms']:.0f}) | {v['ms']:.0f} ({v['best_ms']:.0f}) | "
                             f"{bold}{v['ratio']:.2f}{bold} | {v['best_ratio']:.2f} | "
                             f"{', '.join(f'{x:.2f}' for x in v['ratios'])} | "
                             f"{v.get('wall', v)['ratio']:.2f} | {verdict + (' (noisy)' if v.get('noisy') else '')} |")
        for row in [r for r in res["ratio"] if r.get("profile")]:
            p = row["profile"]
            act, wt, bwd = _fq_split(p)
            lines += ["", f"Profile of one step, {row['label']}, {row['main']} ranges vs FP32 (`torch.profiler` "
                      f"self CPU time per op in ms, profiler overhead included: FP32 {p['fp32_total_ms']:.0f}, "
                      f"QAT {p['qat_total_ms']:.0f}; fake quantization {p['fake_quant_ms']:.0f}: forward of the "
                      f"activation quantizers {act:.0f}, of the weight quantizers {wt:.0f}, backward {bwd:.0f}):",
                      "", "| op | QAT | FP32 | difference |", "|---|---:|---:|---:|"]
            for t in p["top_extra"][:8] + (p.get("top_saved") or [])[:2]:
                lines.append(f"| `{_op(t['op'])}` | {t['qat_ms']:.1f} | {t['fp32_ms']:.1f} | {t['extra_ms']:+.1f} |")
    d = res.get("ddp")
    if d:
        lines += ["", "### Data parallel: 2 ranks vs 1 (the same QAT step under DDP)", ""]
        if "skipped" in d:
            lines.append(f"Skipped: {d['skipped']}.")
        else:
            idle = d.get("idle_rank_cpu_s_in_1") or []
            lines += [f"{d['model']}, batch {d['batch_per_rank']} per rank, backend {d['backend']}, "
                      f"{d['threads_per_rank']} intra-op thread(s) per rank, {m['logical_cpus']} logical CPUs. One "
                      "`torchrun --standalone --nproc_per_node 2` launch; inside it three phases of "
                      f"{d['steps']} steps alternate, {d['reps']} times each (the order rotates), median: *1 rank* "
                      "(rank 0 steps a plain copy of the model while rank 1 waits in a barrier"
                      + (f", using {max(idle):.2f} s of CPU at most" if idle else "") + "), *2 ranks, DDP*, and "
                      "*2 ranks, no all-reduce* (each rank steps its plain copy: CPU contention alone).", "",
                      "Efficiency = images/s of the 2-rank phase ÷ 2 x images/s of the 1-rank phase next to it, "
                      "median over the repetitions; *best* uses each phase's best repetition.", "",
                      "*CPU ms/image* is the CPU time of all ranks (gloo's threads included) per image; its "
                      "efficiency (1-rank CPU/image ÷ 2-rank CPU/image) is what DDP costs in work, whatever other "
                      "jobs take from the cores.", "",
                      "| ranks | images/s (all ranks), median (best) | ms/step | scaling efficiency | per repetition "
                      "| best | CPU ms/image | CPU efficiency |", "|---|---:|---:|---:|---|---:|---:|---:|",
                      f"| 1 | {d['images_per_s']['1']:.0f} ({d['best_images_per_s']['1']:.0f}) | "
                      f"{d['ms_per_step']['1']:.0f} | (1.00) | | | {d['cpu_ms_per_image']['1']:.2f} | (1.00) |",
                      f"| 2, DDP | {d['images_per_s']['2']:.0f} ({d['best_images_per_s']['2']:.0f}) | "
                      f"{d['ms_per_step']['2']:.0f} | **{d['efficiency']:.2f}** | "
                      f"{', '.join(f'{e:.2f}' for e in d['efficiencies'])} | {d['best_efficiency']:.2f} | "
                      f"{d['cpu_ms_per_image']['2']:.2f} | {d['cpu_efficiency']:.2f} |",
                      f"| 2, no all-reduce | {d['images_per_s']['2-nosync']:.0f} "
                      f"({d['best_images_per_s']['2-nosync']:.0f}) | {d['ms_per_step']['2-nosync']:.0f} | "
                      f"{d['efficiency_nosync']:.2f} | {', '.join(f'{e:.2f}' for e in d['efficiencies_nosync'])} | "
                      f"{d['best_efficiency_nosync']:.2f} | {d['cpu_ms_per_image']['2-nosync']:.2f} | "
                      f"{d['cpu_efficiency_nosync']:.2f} |"]
    if res.get("interpretation"):
        lines += ["", "### Reading", ""] + [f"- {s}" for s in res["interpretation"]]
    for note in res.get("notes") or []:
        lines.append(f"- {note}")
    lines += ["", f"Raw numbers: `{res['results_file']}`.", end]
    return "\n".join(lines) + "\n"


def write_doc(section: str, path: Path = DOC) -> None:
    write_marked(section, path)


# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.qat", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: batch 4, 2 repetitions, short DDP runs")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the ratio (default: 1 on CPU, torch's on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="batch of the ratio runs (default 8, quick 4)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3, quick 2)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="what the ratio is read on: process CPU time (auto on CPU: robust to other jobs on a "
                   "shared machine) or wall time (auto on CUDA)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per repetition and model (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first (default 1)")
    p.add_argument("--calib-batches", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model's training step (FP32 and QAT alike), as qat.compile: true")
    p.add_argument("--amp", choices=tuple(AMP), default="off",
                   help="autocast forward + loss of every model (FP32 and QAT alike) in this dtype (default off)")
    p.add_argument("--models", default=",".join(MODELS), help="comma separated")
    p.add_argument("--variants", default="learned,frozen", help="QAT variants: learned,frozen (first = the target)")
    p.add_argument("--note", action="append", default=[],
                   help="a line added to the docs section (repeatable; with --render: replaces the saved notes)")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="profile one step of each when the ratio misses the target (auto)")
    p.add_argument("--skip", default="", help="parts to skip: ratio,ddp")
    p.add_argument("--ddp-batch", type=int, default=64)
    p.add_argument("--ddp-steps", type=int, default=None, help="timed steps per phase (default 30, quick 10)")
    p.add_argument("--ddp-warmup", type=int, default=3)
    p.add_argument("--ddp-reps", type=int, default=None, help="repetitions of the 3 phases (default 3, quick 1)")
    p.add_argument("--ddp-threads", type=int, default=1, help="intra-op threads per rank (default 1)")
    p.add_argument("--ddp-timeout", type=float, default=600.0)
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ddp-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true", help="print the section, write no file")
    p.add_argument("--render", action="store_true", help="re-render the docs section from the saved results")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.ddp_worker:
        return ddp_worker(args)
    device = torch.device(args.device)
    results_file = RESULTS / f"qat-{device.type}{'-compiled' if args.compile else ''}.json"
    if args.render:
        res = json.loads(results_file.read_text())
        if args.note:  # --render --note ...: replace the saved notes
            res["notes"] = args.note
            if not args.no_write:
                results_file.write_text(json.dumps(res, indent=1, default=str) + "\n")
        res["interpretation"] = interpretation(res)
        section = render(res)
        if not args.no_write:
            write_doc(section)
        print(section)
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    args.threads = args.threads or (1 if device.type == "cpu" else None)
    if args.clock == "auto":
        args.clock = "cpu" if device.type == "cpu" else "wall"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (4 if args.quick else 8)
    args.reps = args.reps or (2 if args.quick else 3)
    args.ddp_steps = args.ddp_steps or (10 if args.quick else 30)
    args.ddp_reps = args.ddp_reps or (1 if args.quick else 3)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    models = [s.strip() for s in args.models.split(",") if s.strip()]
    for mname in models:
        if mname not in MODELS:
            p.error(f"unknown model {mname!r} (choose from {', '.join(MODELS)})")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")

    res: dict[str, Any] = new_record("qat", argv, results_file, quick=args.quick, machine=machine(device),
                                     threads=torch.get_num_threads(), ratio=[], notes=args.note, compile=args.compile)
    t0 = time.perf_counter()
    if "ratio" not in skip:
        for mname in models:
            res["ratio"].append(bench_ratio(mname, args, device))
    if "ddp" not in skip:
        res["ddp"] = bench_ddp(args, device)
    return finish(res, t0, render, results_file, write_doc, args.no_write, log,
                  before_render=lambda r: r.update(interpretation=interpretation(r)))


if __name__ == "__main__":
    sys.exit(main())
