"""Quantization-aware training on a Ray cluster: Ray Train's ``TorchTrainer`` runs
:func:`quantcore.qat.run_qat` as ``train_loop_per_worker``, one rank per worker.

    python -m jobs.ray_qat --recipe R --data D --out OUT [--split train] [--eval-data D2]
        [--eval-split val] [--checkpoint W] [--init C] [--num-workers N] [--use-gpu]
        [--storage-path s3://...] [--max-failures N] [--no-resume] [--epochs N] [--max-steps N] [--batch-size N]
        [--eval-limit N] [--workers N]

Usually the ``entrypoint`` of a KubeRay ``RayJob`` (or ``ray job submit -- python -m jobs.ray_qat ...``).

* **Process group.** ``TorchConfig`` starts gloo (CPU) or NCCL (``--use-gpu``) on the workers
  before the loop runs; :func:`quantcore.distributed.setup` joins that group as it is. With
  ``--use-gpu`` each worker trains on the device Ray assigned to it (``ray.train.torch.get_device()``,
  an explicit ``cuda:N``), so two workers on one node never share a GPU.
* **Checkpoints and resume.** ``run_qat`` writes its own checkpoints (model, quantizer state,
  optimizer, scheduler, RNG states, data position) atomically to ``OUT/checkpoints/`` and resumes
  from the newest one that verifies, exactly as under torchrun or a Kubernetes Job retry. When a
  worker dies (OOM kill, node lost), ``FailureConfig(max_failures)`` makes Ray start a new worker
  group, whose loop resumes there by itself: one source of truth for every launcher, bit-identical
  to an uninterrupted run on CPU. Ray Train's own ``Checkpoint`` objects are not used;
  ``--storage-path`` (default ``OUT/ray`` when OUT is on S3) holds Ray Train's run state.
  A custom S3 endpoint (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``: MinIO, moto, Ceph) is
  passed to Ray as a pyarrow ``S3FileSystem``.
* **Visible in the Ray dashboard.** Rank 0 sets the Prometheus gauges ``quantcore_qat_loss``,
  ``quantcore_qat_lr``, ``quantcore_qat_images_per_s``, ``quantcore_qat_val_top1`` and
  ``quantcore_qat_step`` (tag ``run``; exported as ``ray_quantcore_qat_*``) at every log step and
  logs one line per step to the job log. The metrics also go to Ray Train with ``ray.train.report``
  (all workers, from a background thread: Train V2's report waits for the controller, which polls
  every 2 s, so the loop never waits for it; log steps that arrive meanwhile are merged into the next
  report). The run appears on the dashboard's Train page with its attempts and workers
  (``RAY_TRAIN_ENABLE_STATE_TRACKING=1`` is set for this driver unless you set it). Metrics also go to
  ``OUT/metrics.jsonl``; the report to ``OUT/report.md`` (printed at the end).

Exit status: 0 done; 2 user error (arguments, recipe, data or checkpoint URIs: checked before Ray
starts where possible; a user error raised in the workers is still retried ``--max-failures``
times by Ray, then reported as exit 2); 1 otherwise (workers failed more than ``--max-failures``
times, ...). KubeRay: retry on 1, not on 2.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

from jobs._args import parse_once
from jobs._tags import ascii_tag
from quantcore.errors import UserError

USER_ERROR = 2
STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"
log = logging.getLogger(__name__)


class RayQATError(UserError):
    """A bad argument of this entrypoint (exit 2)."""


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs (``train_loop_config``): plain data, pickled to the workers."""

    recipe: Dict[str, Any]  # validated on the driver, re-validated (cheaply) on each worker
    data: str
    split: str
    eval_data: str
    eval_split: str
    out: str
    run_name: str
    checkpoint: Optional[str] = None
    init: Optional[str] = None
    use_gpu: bool = False
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    eval_limit: Optional[int] = None
    workers: Optional[int] = None
    layout: str = "auto"
    skip_bad: bool = False
    cache_dir: Optional[str] = None


# ------------------------------------------------------------------------------ inside a worker

class _Reporter:
    """``QATOptions.on_log`` of one worker: Prometheus gauges and a log line (rank 0), and
    ``ray.train.report`` from a background thread.

    Ray Train V2's ``report`` waits until the controller has taken the previous report, which it
    polls every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s): reporting from the loop would cap training
    at one log step per 2 s. So the loop never waits: metrics of log steps accumulate (newer
    values win; ``val_top1`` keeps its ``val_step``) and are handed to the reporting thread when no
    worker's thread is still busy. Ray needs every worker to call ``report`` the same number of
    times, so that decision is all-reduced (max of the busy flags) at the log step, where
    ``run_qat`` calls ``on_log`` on every rank with the same metrics: all ranks hand over the same
    reports. :meth:`close` hands over what is left and waits for the thread."""

    GAUGES = {"loss": "Training loss (mean over the last log window, all ranks).",
              "lr": "Learning rate of the first parameter group.",
              "images_per_s": "Training images per second, all ranks together.",
              "val_top1": "Validation top-1 (%) of the model being trained.",
              "step": "Optimizer steps done."}

    def __init__(self, run: str, rank: int) -> None:
        import queue
        import threading

        self.run, self.rank = run, rank
        self.gauges: Dict[str, Any] = {}
        if rank == 0:
            try:
                from ray.util.metrics import Gauge

                self.gauges = {k: Gauge(f"quantcore_qat_{k}", d, tag_keys=("run",)) for k, d in self.GAUGES.items()}
            except Exception as err:  # noqa: BLE001 - metrics must never fail training
                log.warning("[%s] Prometheus gauges unavailable: %s", run, err)
        self.pending: Dict[str, Any] = {}
        self.reported = 0
        self.last_reported: Dict[str, Any] = {}
        self._inflight = 0
        self._lock = threading.Lock()
        self._queue: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="quantcore-ray-report", daemon=True)
        self._thread.start()

    def __call__(self, metrics: Dict[str, Any]) -> None:
        import torch

        from quantcore import distributed

        m = {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.rank == 0:
            self._rank0_outputs(m)
        if "val_top1" in m:
            m["val_step"] = m["step"]
        self.pending.update(m)
        with self._lock:
            busy = torch.tensor([float(self._inflight > 0)])
        if distributed.all_reduce(busy, "max").item() == 0:
            self._hand_over()

    def _rank0_outputs(self, m: Dict[str, Any]) -> None:
        for k, g in self.gauges.items():
            if k in m:
                try:
                    g.set(m[k], tags={"run": self.run})
                except Exception:  # noqa: BLE001
                    pass
        if "loss" in m:
            log.info("[%s] step %d epoch %.2f loss %.4f lr %.3g %.0f img/s", self.run, m["step"], m["epoch"],
                     m["loss"], m["lr"], m["images_per_s"])
        elif "val_top1" in m:
            log.info("[%s] step %d validation top-1 %.2f%%", self.run, m["step"], m["val_top1"])

    def _hand_over(self) -> None:
        if not self.pending:
            return
        with self._lock:
            self._inflight += 1
        self._queue.put(self.pending)
        self.pending = {}

    def _loop(self) -> None:
        import ray.train

        while True:
            m = self._queue.get()
            if m is None:
                return
            try:
                ray.train.report(m)
                self.reported += 1
                self.last_reported = m
            except Exception as err:  # noqa: BLE001 - reporting must never fail training
                log.warning("[%s] ray.train.report failed: %s", self.run, err)
            finally:
                with self._lock:
                    self._inflight -= 1

    def close(self, flush: bool = True, timeout_s: float = 120.0) -> None:
        if flush:
            self._hand_over()  # pending is the same on every rank: the same final report everywhere
        self._queue.put(None)
        if flush:
            self._thread.join(timeout_s)


def _configure_logging() -> None:
    """Ray Train V2 routes the workers' root logger (INFO) to the job log; elsewhere (Train V1,
    tests) this module's and quantcore's messages get a stderr handler of their own."""
    if logging.getLogger().handlers:
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("quantcore", __name__):
        lg = logging.getLogger(name)
        if not lg.handlers:
            lg.addHandler(h)
            lg.setLevel(logging.INFO)


def train_loop_per_worker(config: Dict[str, Any]) -> Dict[str, Any]:
    """Ray Train's loop: one rank of :func:`quantcore.qat.run_qat`. Returns (rank 0's is kept by Ray)
    a short summary of the report."""
    import ray.train

    from quantcore.config import Recipe
    from quantcore.pipeline import DataSpec
    from quantcore.qat import QATOptions, run_qat

    from quantcore.plugins import load_plugins

    load_plugins()  # this worker's process: the plug-ins the recipe's kinds/calibrators/family need
    c = LoopConfig(**config)
    _configure_logging()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = "cpu"
    if c.use_gpu:
        import ray.train.torch

        device = str(ray.train.torch.get_device())  # cuda:N, the GPU Ray gave this worker
    log.info("[%s] rank %d/%d (local %d) pid %d device %s", c.run_name, rank, ctx.get_world_size(),
             ctx.get_local_rank(), os.getpid(), device)
    recipe = Recipe.model_validate(c.recipe)
    reporter = _Reporter(c.run_name, rank)
    opts = QATOptions(device=device, num_workers=c.workers, progress=False, checkpoint=c.checkpoint, init=c.init,
                      resume=True, epochs=c.epochs, max_steps=c.max_steps, batch_size=c.batch_size,
                      eval_limit=c.eval_limit, on_log=reporter,
                      handle_sigterm=False)  # Ray owns the worker's signals (the loop runs in a thread)
    ok = False
    try:
        rep = run_qat(recipe, DataSpec(c.data, c.split, c.layout, c.skip_bad, c.cache_dir),
                      DataSpec(c.eval_data, c.eval_split, c.layout, c.skip_bad, c.cache_dir), c.out, opts)
        ok = True
    finally:
        reporter.close(flush=ok)
    out = summarize(rep, c.out)
    out.update(ray_reports=reporter.reported, last_reported=reporter.last_reported)
    return out


def summarize(rep: Dict[str, Any], out: str) -> Dict[str, Any]:
    """The few numbers the driver prints: top-1 per model, agreement, steps."""
    from quantcore.io import storage

    results = {name: {k: r.get(k) for k in ("top1", "top5", "delta_top1", "agreement", "sqnr_db")}
               for name, r in (rep.get("results") or {}).items()}
    qat = rep.get("qat") or {}
    return {"results": results, "steps": qat.get("steps"), "world_size": qat.get("world_size"),
            "train_s": qat.get("train_s"), "report": storage.join(out, "report.md"),
            "report_json": storage.join(out, "report.json"), "warnings": list(rep.get("warnings") or [])}


# ------------------------------------------------------------------------------ driver

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.ray_qat",
        description="Quantization-aware training with Ray Train (TorchTrainer, one rank per worker): calibrate "
                    "(or --init), train with the recipe's qat: section, convert, report. Checkpoints in "
                    "OUT/checkpoints/; a restarted worker group resumes there by itself.")
    a = p.add_argument
    a("--recipe", "-r", required=True, help="Recipe (built-in name, YAML path or s3:// URI); its qat: section "
                                            "drives training.")
    a("--data", "-d", required=True, help="Training dataset URI (calibration images come from it too).")
    a("--split", default="train", help="Training split. Default train.")
    a("--eval-data", default=None, help="Validation dataset URI (default: --data).")
    a("--eval-split", default="val", help="Validation split (periodic validation and the final report). Default val.")
    a("--out", "-o", required=True, help="Output URI prefix (s3://bucket/prefix, or a path every node shares): "
                                         "checkpoints/, metrics.jsonl, ptq/, <recipe>/, report.*")
    a("--checkpoint", default=None, help="FP32 weights (local/s3) overriding the recipe's.")
    a("--init", default=None, help="Start from this PTQ checkpoint (model.qc.pt) instead of calibrating.")
    a("--num-workers", type=int, default=2, help="Ray Train workers = data-parallel ranks. Default 2.")
    a("--use-gpu", action="store_true", help="One GPU per worker, NCCL (default: CPU, gloo). Refused when the "
                                             "Ray cluster has fewer GPUs than workers 2 minutes after start.")
    a("--wait-for-gpus", action="store_true", help="With --use-gpu: wait for GPU nodes an autoscaler adds instead "
                                                   "of refusing a cluster with too few GPUs.")
    a("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves (also its torch threads). "
                                                          "Default 1.")
    a("--storage-path", default=None,
      help="Ray Train's run storage (s3://bucket/prefix or a shared path). Default: OUT/ray when OUT is on "
           "S3, else Ray's default (~/ray_results).")
    a("--no-resume", action="store_true",
      help="Start over: delete OUT/checkpoints/ of an earlier run before the workers start (a worker group "
           "Ray restarts still resumes from this run's own checkpoints).")
    a("--name", default=None, help="Ray Train run name (default: qat-<recipe name>-<last part of OUT>).")
    a("--max-failures", type=int, default=3,
      help="Worker-group failures Ray recovers from (each restart resumes from the newest checkpoint); "
           "-1: unlimited. Default 3.")
    a("--epochs", type=int, default=None, help="Override qat.epochs.")
    a("--max-steps", type=int, default=None, help="Override qat.max_steps (optimizer steps in all).")
    a("--batch-size", "-b", type=int, default=None, help="Override qat.batch_size (per rank).")
    a("--eval-limit", type=int, default=None,
      help="Final evaluation on a seeded, class-stratified sample of N images.")
    a("--workers", "-j", type=int, default=None, help="DataLoader workers per rank (default: qat.num_workers).")
    a("--layout", default="auto", choices=("auto", "folder", "zip", "resisc"), help="Dataset layout. Default auto.")
    a("--skip-bad", action="store_true", help="Skip undecodable images (listed in the report) instead of failing.")
    a("--cache-dir", default=None, help="Local cache for dataset shards.")
    a("--address", default=None,
      help="Ray cluster address (auto, ray://host:10001, host:6379). Default: $RAY_ADDRESS as set by "
           "`ray job submit`, else a local Ray instance.")
    return p


def build_config(args: argparse.Namespace) -> LoopConfig:
    """Check the arguments and the recipe (no Ray needed, no writes: :func:`check_locations` probes the
    outputs); raises :class:`UserError`."""
    from quantcore.recipe import load_recipe

    for flag, v, low in (("--num-workers", args.num_workers, 1), ("--epochs", args.epochs, 1),
                         ("--max-steps", args.max_steps, 1), ("--batch-size", args.batch_size, 1),
                         ("--eval-limit", args.eval_limit, 1), ("--workers", args.workers, 0),
                         ("--max-failures", args.max_failures, -1)):
        if v is not None and v < low:
            raise RayQATError(f"{flag} must be >= {low}, got {v}")
    cpw = args.cpus_per_worker
    if not math.isfinite(cpw) or cpw <= 0 or (cpw > 1 and not cpw.is_integer()):
        # Ray takes a fraction below 1 or a whole number; NaN got through "<= 0" and aborted the raylet
        raise RayQATError(f"--cpus-per-worker must be a fraction in (0, 1] or a whole number, got {cpw:g}")
    if args.name is not None and ascii_tag(args.name, "") != args.name:
        raise RayQATError(f"--name {args.name!r}: use printable ASCII (Ray's metric tags carry the run name)")
    if args.wait_for_gpus and not args.use_gpu:
        raise RayQATError("--wait-for-gpus applies to --use-gpu workers only: add --use-gpu, or remove it")
    _check_storage_path(args.storage_path)
    from quantcore.qat import check_start

    check_start(args.init, args.checkpoint)
    recipe = load_recipe(args.recipe)
    if recipe.qat is None:
        raise RayQATError(f"recipe {args.recipe}: no qat: section (epochs, batch_size, optimizer ...): there is "
                          f"nothing to train; see the qat recipes shipped with quantcore")
    if recipe.model is None and args.init is None:
        raise RayQATError(f"recipe {args.recipe}: model.name is missing and no --init checkpoint was given: there "
                          f"is no model to train")
    _check_exists("--checkpoint", args.checkpoint)
    _check_exists("--init", args.init)
    _check_data("--data", args.data, args.split, args.layout)
    _check_data("--eval-data", args.eval_data or args.data, args.eval_split, args.layout)
    name = args.name or ascii_tag(f"qat-{recipe.name}-{args.out.rstrip('/').rsplit('/', 1)[-1] or 'run'}", "qat")
    return LoopConfig(recipe=recipe.model_dump(mode="json"), data=args.data, split=args.split,
                      eval_data=args.eval_data or args.data, eval_split=args.eval_split, out=args.out,
                      run_name=name, checkpoint=args.checkpoint, init=args.init, use_gpu=args.use_gpu,
                      epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      eval_limit=args.eval_limit, workers=args.workers, layout=args.layout,
                      skip_bad=args.skip_bad, cache_dir=args.cache_dir)


def _check_storage_path(path: Optional[str]) -> None:
    """``--storage-path`` as Ray Train (pyarrow) takes it: s3://BUCKET/..., gs://..., file:// or an absolute
    path every node shares; an S3 one must be writable (one probe object, as --out). Checked here, not
    after Ray started its controller (a typo would fail with exit 1, which launchers retry)."""
    if path is None:
        return
    low = path.lower()
    if "://" in path and not low.startswith(("s3://", "gs://", "file://")):
        raise RayQATError(f"--storage-path {path}: use s3://bucket/prefix, gs://... or a shared path")
    if "://" not in path and not path.startswith("/"):
        raise RayQATError(f"--storage-path {path}: a relative path; give an absolute path every node shares, or "
                          f"s3://bucket/prefix")
    if low.startswith(("s3://", "gs://")) and not path.split("://", 1)[1].split("/", 1)[0]:
        raise RayQATError(f"--storage-path {path}: no bucket; give s3://bucket/prefix")


def check_locations(out: str, storage_path: Optional[str]) -> None:
    """``--out`` and an S3 ``--storage-path`` are writable (one probe object each, quantcore's
    ``check_out``): a missing bucket or no permission is said before Ray Train starts its controller,
    not as a worker or controller traceback with exit 1 (which launchers retry)."""
    from quantcore.pipeline import check_out

    check_out(out)
    if storage_path is not None and _s3(storage_path):
        check_out(storage_path, flag="--storage-path")


def _check_exists(flag: str, uri: Optional[str]) -> None:
    if uri is None:
        return
    from quantcore.io import storage

    if not storage.exists(uri):
        raise RayQATError(f"{flag} {uri}: not found")


def _check_data(flag: str, uri: str, split: str, layout: str) -> None:
    """The dataset split can be found (a few existence checks, no listing): a missing one is
    reported here, not after Ray restarted the workers ``--max-failures`` times on it (an S3
    folder-layout split: one LIST of its prefix)."""
    if layout != "auto":
        return
    from quantcore.data import detect_layout
    from quantcore.data.detect import layouts_looked_for, s3_prefix_has_objects
    from quantcore.io import storage

    try:
        layout = detect_layout(uri, split)
    except UserError as err:
        raise RayQATError(f"{flag} {uri} (split {split!r}): {err}") from None
    if layout == "folder" and storage.is_s3(uri) and not s3_prefix_has_objects(storage.join(uri, split)):
        raise RayQATError(f"{flag} {uri} (split {split!r}): nothing found under {storage.join(uri, split)}/ (looked "
                          f"for {layouts_looked_for(split)})")


#: how long a --use-gpu run waits for the Ray cluster's GPUs to register (KubeRay's worker pods may join
#: shortly after the head) before it is refused
GPU_WAIT_S = 120.0


def check_gpus(use_gpu: bool, workers: int, resources: Callable[[], Dict[str, float]], wait_for_gpus: bool,
               wait_s: float = GPU_WAIT_S, sleep: Callable[[float], None] = time.sleep) -> Optional[str]:
    """``--use-gpu`` workers need ``workers`` GPUs in the Ray cluster (``resources()``, e.g.
    ``ray.cluster_resources``). Fewer after ``wait_s`` seconds: :class:`RayQATError` (a cluster without an
    autoscaler never gets them, and the run would wait until its deadline), or with ``wait_for_gpus`` (an
    autoscaling cluster adds GPU nodes) a warning, returned; None when the GPUs are there."""
    if not use_gpu:
        return None
    waited = 0.0
    while (have := resources().get("GPU", 0.0)) < workers:
        said = (f"--use-gpu: the {workers} workers ask one GPU each, but the Ray cluster has "
                f"{'no' if not have else f'{have:g}'} GPU{'' if have == 1 else 's'}")
        if wait_for_gpus:
            return f"{said} now; they wait for GPU nodes (--wait-for-gpus: an autoscaler adds them)"
        if waited >= wait_s:
            raise RayQATError(f"{said} ({wait_s:.0f} s after start): without an autoscaler they would wait until the "
                              f"job's deadline. Use --num-workers <= the GPUs, drop --use-gpu to train on CPUs, or pass "
                              f"--wait-for-gpus when an autoscaler adds GPU nodes")
        sleep(5.0)
        waited += 5.0
    return None


def resolved_storage_path(storage_path: Optional[str], out: str) -> Optional[str]:
    """``--storage-path``, else ``OUT/ray`` when OUT is on S3, else None (Ray's default)."""
    if storage_path is None and _s3(out):
        return "s3://" + out[len("s3://"):].rstrip("/") + "/ray"  # the scheme as Ray and pyarrow spell it
    if storage_path is not None and _s3(storage_path):
        return "s3://" + storage_path[len("s3://"):]
    return storage_path


def _s3(uri: str) -> bool:
    """An s3:// URI, the scheme in any case (as quantcore's storage reads ``S3://``)."""
    from quantcore.io.uri import is_s3

    return is_s3(uri)


def storage_location(storage_path: Optional[str], out: str) -> tuple:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``. S3 with a custom endpoint
    (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) gets an explicit pyarrow ``S3FileSystem`` (the
    path then loses its ``s3://``), so Ray writes where quantcore's own S3 client does."""
    storage_path = resolved_storage_path(storage_path, out)
    if storage_path is None or not _s3(storage_path):
        return storage_path, None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return storage_path, None
    from urllib.parse import urlparse

    import pyarrow.fs

    u = urlparse(endpoint)
    kw: Dict[str, Any] = {"endpoint_override": u.netloc or u.path, "scheme": u.scheme or "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kw.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                  session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return storage_path[len("s3://"):], pyarrow.fs.S3FileSystem(**kw)


def run(cfg: LoopConfig, args: argparse.Namespace) -> Dict[str, Any]:
    """Start (or join) Ray and run the trainer; returns rank 0's summary. Raises Ray Train's
    ``TrainingFailedError`` when the workers failed more than ``--max-failures`` times."""
    os.environ.setdefault(STATE_TRACKING_ENV, "1")  # read by TorchTrainer in this driver: the dashboard's Train page
    check_locations(cfg.out, args.storage_path)
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        from quantcore.plugins import runtime_env

        ray.init(address=args.address, log_to_driver=True, runtime_env=runtime_env() or None)
    warning = check_gpus(args.use_gpu, args.num_workers, ray.cluster_resources, args.wait_for_gpus)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    path, fs = storage_location(args.storage_path, cfg.out)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=args.max_failures)),
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
    )
    print(f"ray_qat: run {cfg.run_name}: {args.num_workers} workers ({'GPU, nccl' if args.use_gpu else 'CPU, gloo'}), "
          f"max_failures {args.max_failures}, out {cfg.out}, Ray Train storage "
          f"{resolved_storage_path(args.storage_path, cfg.out) or 'Ray default (~/ray_results)'}", flush=True)
    result = trainer.fit()
    summary = dict(getattr(result, "return_value", None) or {})  # Train V2: rank 0's return value
    summary.setdefault("report", cfg.out.rstrip("/") + "/report.md")
    # V2 keeps metrics on Result only with a Ray checkpoint (none here); V1 keeps the last report.
    summary["last_metrics"] = summary.get("last_reported") or dict(result.metrics or {})
    summary["ray_path"] = getattr(result, "path", None)
    return summary


def user_error_in(err: BaseException) -> Optional[BaseException]:
    """The user mistake behind a Ray Train failure, if that is what every failed worker raised
    (``WorkerGroupError.worker_failures`` wraps each worker's exception; v1 chains it as the cause)."""
    errors: List[BaseException] = []
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        errors = list(failures.values())
    else:
        errors = [err]
    found = None
    for e in errors:
        hit = None
        seen = set()
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            if isinstance(e, (UserError, FileNotFoundError, PermissionError)):
                hit = e
                break
            e = getattr(e, "_base_exc", None) or getattr(e, "cause", None) or e.__cause__
        if hit is None:
            return None
        found = found or hit
    return found


def main(argv: Optional[List[str]] = None) -> int:
    from quantcore.io import StorageError

    args = parse_once(_parser(), argv)  # exits 2 on usage errors
    try:
        from quantcore.plugins import load_plugins

        load_plugins()  # before the recipe is read: $QUANTCORE_PLUGINS, quantcore.plugins entry points
        cfg = build_config(args)
        if args.no_resume:
            from quantcore.qat import discard_checkpoints

            discard_checkpoints(cfg.out)
    except (UserError, StorageError, FileNotFoundError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR
    t0 = time.perf_counter()
    try:
        summary = run(cfg, args)
    except (UserError, StorageError) as err:  # raised in this driver (storage path, ...)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR
    except Exception as err:  # noqa: BLE001 - Ray Train's TrainingFailedError and friends
        user = user_error_in(err)
        if user is not None:
            print(f"error: {user}", file=sys.stderr, flush=True)
            return USER_ERROR
        print(f"error: QAT failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    for name, r in (summary.get("results") or {}).items():
        parts = [f"top-1 {r['top1']:.2f}%" if isinstance(r.get("top1"), (int, float)) else "top-1 -"]
        if isinstance(r.get("agreement"), (int, float)):
            parts.append(f"agreement {r['agreement']:.2f}%")
        print(f"{name}: " + ", ".join(parts), flush=True)
    for w in summary.get("warnings") or []:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    last = summary.get("last_metrics") or {}
    print(f"ray_qat: done in {time.perf_counter() - t0:.0f} s: {summary.get('steps')} steps on "
          f"{summary.get('world_size')} workers; {summary.get('ray_reports', '?')} ray.train reports, the last "
          f"{ {k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()} }", flush=True)
    print(f"report: {summary['report']}", flush=True)
    return 0


if __name__ == "__main__":
    # Run through the importable module, not __main__: Ray pickles train_loop_per_worker by reference
    # and the workers import jobs.ray_qat (on PYTHONPATH in the image) instead of a by-value copy.
    from jobs import ray_qat as _module

    sys.exit(_module.main())
