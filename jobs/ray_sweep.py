"""A PTQ sweep on a Ray cluster: one Ray task per run, many runs in parallel.

    python -m jobs.ray_sweep --sweep SWEEP.yaml --out OUT_URI [--address auto] [--gpus-per-task 1]

Usually submitted as a Ray job (``ray job submit -- python -m jobs.ray_sweep ...``, or the
``entrypoint`` of a KubeRay ``RayJob``). The sweep file (local path or s3:// URI; format:
``jobs/sweep.example.yaml``, validated with clear errors naming the field) lists runs. Each run
becomes one task named ``ptq:<name>`` that calls :func:`quantcore.pipeline.ptq` and writes
``<OUT>/<name>/`` (``report.json``, ``report.md``, ``per_class.png``, ``<recipe>/model.qc.pt``,
``<recipe>/encodings.json`` ...).

In the Ray dashboard: the tasks by name, their log lines (``(ptq:<name> pid=...)``), progress
bars (``ray.experimental.tqdm_ray``) and the metrics ``quantcore_sweep_images_processed``
(counter, tags sweep/run/stage), ``quantcore_sweep_progress`` (0..1 per run and stage),
``quantcore_sweep_top1`` (per run and variant, fp32 included), ``quantcore_sweep_run_seconds``
and ``quantcore_sweep_runs_finished`` (tag status) for Prometheus/Grafana.

A failing run is recorded (status ``failed`` with its error) and does not stop the others. At the
end ``<OUT>/summary.json`` and ``<OUT>/summary.md`` are written (per run: status, FP32 and
quantized top-1, delta, agreement, SQNR, artifact URIs, duration, error). Exit status: 0 when every
run succeeded, 1 when any failed, 2 for a bad sweep file or arguments.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
import time
import traceback
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantcore.errors import UserError

SUMMARY_SCHEMA = "quantcore.sweep-summary/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SweepError(UserError):
    """The sweep file or the command line is wrong (exit 2)."""


# ------------------------------------------------------------------------------ sweep file

RecipeRef = Union[str, Dict[str, Any]]


def _recipe_alias(data: Any) -> Any:
    """``recipe: x`` / ``recipe: [x, y]`` -> ``recipes: [...]`` (a new dict; both keys: left to validation)."""
    if isinstance(data, dict) and "recipe" in data and "recipes" not in data:
        data = dict(data)
        one = data.pop("recipe")
        data["recipes"] = one if isinstance(one, list) else [one]
    return data


class _RunFields(BaseModel):
    """Fields a run may set; ``defaults:`` may set the same ones (except ``name``)."""

    model_config = ConfigDict(extra="forbid")

    recipes: Optional[List[RecipeRef]] = Field(
        None, description="Recipes of the run (one model): built-in names, YAML paths, s3:// URIs or "
                          "inline recipe mappings. `recipe:` takes one or a list too.")
    checkpoint: Optional[str] = Field(None, description="FP32 weights overriding the recipes' model weights.")
    calib_data: Optional[str] = Field(None, description="Calibration dataset URI.")
    calib_split: str = "train"
    eval_data: Optional[str] = Field(None, description="Evaluation dataset URI (default: calib_data).")
    eval_split: str = "val"
    limit: Optional[int] = Field(None, gt=0, description="Evaluate on the first N images only.")
    batch_size: int = Field(64, gt=0, description="Evaluation batch size.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes per task.")
    layout: Literal["auto", "folder", "zip", "resisc"] = "auto"
    skip_bad: bool = False
    cache_dir: Optional[str] = None
    device: Optional[str] = Field(None, description="torch device; default cuda with GPUs per task, else cpu.")

    @model_validator(mode="before")
    @classmethod
    def _recipe_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "recipe" in data and "recipes" in data:
            raise ValueError("set either `recipe` or `recipes`, not both")
        return _recipe_alias(data)

    @field_validator("recipes")
    @classmethod
    def _non_empty(cls, v: Optional[List[RecipeRef]]) -> Optional[List[RecipeRef]]:
        if v is not None and (not v or any(isinstance(r, str) and not r.strip() for r in v)):
            raise ValueError("needs at least one recipe, and no empty names")
        return v


class RunDefaults(_RunFields):
    pass


class RunSpec(_RunFields):
    name: str = Field(..., description="Unique run name: the output folder <OUT>/<name>/ and task ptq:<name>.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be 1-100 characters of letters, digits, '.', '_' or '-', starting "
                             "with a letter or digit")
        return v

    @model_validator(mode="after")
    def _complete(self) -> "RunSpec":
        missing = [f for f in ("recipes", "calib_data") if getattr(self, f) is None]
        if missing:
            raise ValueError(f"missing {' and '.join(missing)} (set it in the run or in defaults:)")
        return self

    def recipe_labels(self) -> List[str]:
        return [r if isinstance(r, str) else str(r.get("name", "<inline>")) for r in self.recipes or []]


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    description: Optional[str] = None
    defaults: RunDefaults = Field(default_factory=RunDefaults)
    runs: List[RunSpec] = Field(..., min_length=1)


def _loc(loc: tuple, data: Dict[str, Any]) -> str:
    out = ""
    runs = data.get("runs") if isinstance(data, dict) else None
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            if i == 1 and loc[0] == "runs" and isinstance(runs, list) and part < len(runs) \
                    and isinstance(runs[part], dict) and isinstance(runs[part].get("name"), str):
                out += f"({runs[part]['name']})"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def parse_sweep(data: Any, source: str = "sweep") -> Sweep:
    """Validate a sweep mapping: ``defaults:`` are merged into every run (the run's own fields win)."""
    if not isinstance(data, dict):
        raise SweepError(f"{source}: expected a mapping with `runs:`, got {type(data).__name__}")
    merged = dict(data)
    try:
        defaults = RunDefaults.model_validate(data.get("defaults") or {})
    except ValidationError as err:
        raise SweepError(_format(err, source, {"defaults": data.get("defaults")}, prefix=("defaults",))) from None
    base = defaults.model_dump(exclude_unset=True)
    runs = data.get("runs")
    if isinstance(runs, list):
        merged["runs"] = [{**base, **_recipe_alias(r)} if isinstance(r, dict) else r for r in runs]
    merged["defaults"] = base
    try:
        sweep = Sweep.model_validate(merged)
    except ValidationError as err:
        raise SweepError(_format(err, source, data)) from None
    seen: Dict[str, int] = {}
    for i, run in enumerate(sweep.runs):
        if run.name in seen:
            raise SweepError(f"{source}: runs[{i}].name: duplicate run name {run.name!r} "
                             f"(also runs[{seen[run.name]}])")
        seen[run.name] = i
    return sweep


def _format(err: ValidationError, source: str, data: Dict[str, Any], prefix: tuple = ()) -> str:
    lines = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {_loc(loc, data)}: {msg}")
    return "\n".join(lines)


def load_sweep(uri: str) -> Sweep:
    from quantcore.io import storage

    try:
        text = storage.read_bytes(uri).decode()
    except FileNotFoundError:
        raise SweepError(f"sweep file {uri} not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SweepError(f"{uri} is not valid YAML: {err}") from None
    return parse_sweep(data, uri)


# ------------------------------------------------------------------------------ inside a task

_METRICS: Dict[str, Any] = {}


def _metrics() -> Dict[str, Any]:
    """Ray metrics of this worker process (created once, after Ray is initialised)."""
    if not _METRICS:
        from ray.util.metrics import Counter, Gauge

        _METRICS.update(
            images=Counter("quantcore_sweep_images_processed", "Images calibrated or evaluated, per run and stage.",
                           tag_keys=("sweep", "run", "stage")),
            progress=Gauge("quantcore_sweep_progress", "Fraction of the current stage done (0..1).",
                           tag_keys=("sweep", "run", "stage")),
            top1=Gauge("quantcore_sweep_top1", "Top-1 accuracy (%) per run and variant (fp32 included).",
                       tag_keys=("sweep", "run", "variant")),
            seconds=Gauge("quantcore_sweep_run_seconds", "Duration of a finished run.",
                          tag_keys=("sweep", "run", "status")),
            finished=Counter("quantcore_sweep_runs_finished", "Runs finished, by status.",
                             tag_keys=("sweep", "status")),
        )
    return _METRICS


class _RayBar:
    """Progress sink for quantcore.pipeline (RunOptions.progress_factory): Ray metrics, a tqdm_ray bar, log lines."""

    def __init__(self, sweep: str, run: str, total: Optional[int], desc: str, show: bool) -> None:
        self.tags = {"sweep": sweep, "run": run, "stage": desc.split(" ")[0]}
        self.total, self.done, self.desc, self.run = total, 0, desc, run
        self.metrics = _metrics()
        self.bar = None
        if show:
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(total=total, desc=f"{run}: {desc}", unit="img")
        print(f"[{run}] {desc}: {total if total is not None else '?'} images", flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.metrics["images"].inc(n, tags=self.tags)
        if self.total:
            self.metrics["progress"].set(min(self.done / self.total, 1.0), tags=self.tags)
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> "_RayBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        print(f"[{self.run}] {self.desc}: done, {self.done} images", flush=True)


def _run_record(spec: RunSpec, out: str) -> Dict[str, Any]:
    from quantcore.io import storage

    return {
        "name": spec.name, "status": "failed", "recipes": spec.recipe_labels(), "checkpoint": spec.checkpoint,
        "calib_data": spec.calib_data, "calib_split": spec.calib_split,
        "eval_data": spec.eval_data or spec.calib_data, "eval_split": spec.eval_split, "limit": spec.limit,
        "out": out, "report": storage.join(out, "report.json"), "report_md": storage.join(out, "report.md"),
        "fp32_top1": None, "eval_count": None, "variants": {}, "duration_s": None, "error": None,
        "traceback": None, "node": os.uname().nodename, "device": None, "warnings": [],
    }


def execute_run(run: Dict[str, Any], out: str, sweep_name: str, default_device: str,
                show_progress: bool = True) -> Dict[str, Any]:
    """One run: :func:`quantcore.pipeline.ptq` into ``out``. Never raises for a failing run:
    the returned record says ``status: failed`` with the error."""
    from quantcore import pipeline
    from quantcore.recipe import load_recipe

    spec = RunSpec.model_validate(run)
    rec = _run_record(spec, out)
    device = spec.device or default_device
    rec["device"] = device
    print(f"[{spec.name}] start: recipes {', '.join(rec['recipes'])} -> {out} (device {device})", flush=True)
    t0 = time.perf_counter()
    try:
        recipes = [load_recipe(r) for r in spec.recipes or []]
        calib = pipeline.DataSpec(spec.calib_data or "", spec.calib_split, spec.layout, spec.skip_bad, spec.cache_dir)
        evald = pipeline.DataSpec(spec.eval_data or spec.calib_data or "", spec.eval_split, spec.layout,
                                  spec.skip_bad, spec.cache_dir, spec.limit)
        opts = pipeline.RunOptions(
            batch_size=spec.batch_size, num_workers=spec.workers, device=device, progress=False,
            checkpoint=spec.checkpoint,
            progress_factory=lambda total, desc: _RayBar(sweep_name, spec.name, total, desc, show_progress))
        rep = pipeline.ptq(recipes, calib, evald, out, opts)
        rec.update(_results(rep))
        rec["status"] = "succeeded"
    except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
        rec["error"] = f"{type(err).__name__}: {err}"
        rec["traceback"] = traceback.format_exc()[-6000:]
        print(f"[{spec.name}] FAILED: {rec['error']}", flush=True)
    rec["duration_s"] = round(time.perf_counter() - t0, 3)
    try:
        m = _metrics()
        m["seconds"].set(rec["duration_s"], tags={"sweep": sweep_name, "run": spec.name, "status": rec["status"]})
        m["finished"].inc(1, tags={"sweep": sweep_name, "status": rec["status"]})
        for variant, top1 in [("fp32", rec["fp32_top1"])] + [(k, v["top1"]) for k, v in rec["variants"].items()]:
            if isinstance(top1, (int, float)):
                m["top1"].set(top1, tags={"sweep": sweep_name, "run": spec.name, "variant": variant})
    except Exception as err:  # noqa: BLE001 - metrics must never fail a run
        print(f"[{spec.name}] metrics not recorded: {err}", flush=True)
    if rec["status"] == "succeeded":
        print(f"[{spec.name}] done in {rec['duration_s']:.1f} s: " + _one_line(rec), flush=True)
    return rec


def _results(rep: Dict[str, Any]) -> Dict[str, Any]:
    results = rep.get("results") or {}
    ref = rep.get("reference") or "fp32"
    variants = {}
    for name, v in (rep.get("variants") or {}).items():
        r = results.get(name) or {}
        art = v.get("artifacts") or {}
        variants[name] = {"top1": r.get("top1"), "top5": r.get("top5"), "delta_top1": r.get("delta_top1"),
                          "agreement": r.get("agreement"), "sqnr_db": r.get("sqnr_db"),
                          "checkpoint": art.get("checkpoint"), "encodings": art.get("encodings"),
                          "calibration_images": (v.get("calibration") or {}).get("images")}
    return {"fp32_top1": (results.get(ref) or {}).get("top1"),
            "eval_count": (rep.get("data") or {}).get("eval_count"), "variants": variants,
            "warnings": list(rep.get("warnings") or [])}


def _one_line(rec: Dict[str, Any]) -> str:
    parts = [f"fp32 {_fmt(rec['fp32_top1'])}%"]
    for name, v in rec["variants"].items():
        parts.append(f"{name} {_fmt(v['top1'])}% (Δ {_fmt(v['delta_top1'], '{:+.2f}')}, "
                     f"agreement {_fmt(v['agreement'])}%, SQNR {_fmt(v['sqnr_db'], '{:.1f}')} dB)")
    return "; ".join(parts)


def _fmt(v: Any, fmt: str = "{:.2f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "–"


def _ptq_task(run: Dict[str, Any], out: str, sweep_name: str, default_device: str,
              show_progress: bool) -> Dict[str, Any]:
    return execute_run(run, out, sweep_name, default_device, show_progress)


# ------------------------------------------------------------------------------ summary

def build_summary(sweep: Sweep, records: List[Dict[str, Any]], meta: Dict[str, Any]) -> Dict[str, Any]:
    ok = sum(r["status"] == "succeeded" for r in records)
    return {"schema": SUMMARY_SCHEMA, **meta, "runs_total": len(records), "runs_succeeded": ok,
            "runs_failed": len(records) - ok, "description": sweep.description, "runs": records}


def summary_markdown(summary: Dict[str, Any]) -> str:
    lines = [f"# quantcore PTQ sweep: {summary['out']}", "",
             f"Sweep file `{summary['sweep_file']}`; started {summary['started']}, "
             f"{summary['duration_s']:.0f} s in all. {summary['runs_succeeded']} of {summary['runs_total']} "
             f"runs succeeded" + (f", **{summary['runs_failed']} failed**." if summary["runs_failed"] else "."), "",
             "| run | status | variant | FP32 top-1 % | quantized top-1 % | Δ top-1 | agreement % | "
             "SQNR dB | duration s | artifacts |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        dur = _fmt(r.get("duration_s"), "{:.1f}")
        if not r["variants"]:
            lines.append(f"| {r['name']} | {r['status']} | – | – | – | – | – | – | {dur} | – |")
        for name, v in r["variants"].items():
            arts = f"[report]({r['report_md']}), [checkpoint]({v['checkpoint']}), [encodings]({v['encodings']})"
            lines.append(f"| {r['name']} | {r['status']} | {name} | {_fmt(r['fp32_top1'])} | {_fmt(v['top1'])} | "
                         f"{_fmt(v['delta_top1'], '{:+.2f}')} | {_fmt(v['agreement'])} | "
                         f"{_fmt(v['sqnr_db'], '{:.1f}')} | {dur} | {arts} |")
    failed = [r for r in summary["runs"] if r["status"] != "succeeded"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            err = (r.get("error") or "unknown error").replace("\n", " ")
            lines.append(f"- **{r['name']}**: {err}")
    warned = [(r["name"], w) for r in summary["runs"] for w in r.get("warnings") or []]
    if warned:
        lines += ["", "## Warnings", ""] + [f"- **{name}**: {w}" for name, w in warned]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ driver

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.ray_sweep",
        description="Run a PTQ sweep on a Ray cluster: one task (ptq:<name>) per run of the sweep file, "
                    "results in <OUT>/<name>/, summary in <OUT>/summary.json and summary.md.")
    p.add_argument("--sweep", required=True, help="Sweep file (local path or s3:// URI), see jobs/sweep.example.yaml.")
    p.add_argument("--out", required=True, help="Output URI prefix (s3://bucket/prefix or a path shared by all nodes).")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (auto, ray://host:10001, host:6379). Default: $RAY_ADDRESS as set "
                        "by `ray job submit`, else a local Ray instance.")
    p.add_argument("--gpus-per-task", type=float, default=1.0,
                   help="GPUs each run reserves (0: CPU runs on device cpu; a fraction such as 0.5 lets runs "
                        "share a GPU). Default 1.")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs each run reserves. Default 1.")
    p.add_argument("--max-retries", type=int, default=1,
                   help="Ray retries of a run whose worker died (node lost, OOM kill); run errors are not "
                        "retried. Default 1.")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="Run only the named run(s) of the sweep file (repeatable).")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="No tqdm_ray progress bars (metrics and log lines stay).")
    return p


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _failure(spec: RunSpec, out: str, err: BaseException) -> Dict[str, Any]:
    """Record of a run whose task itself failed (worker died, node lost ...): duration unknown."""
    rec = _run_record(spec, out)
    rec["error"] = f"{type(err).__name__}: {err}"[:4000]
    return rec


def run_sweep(sweep: Sweep, out: str, *, sweep_file: str, address: Optional[str] = None,
              gpus_per_task: float = 1.0, cpus_per_task: float = 1.0, max_retries: int = 1,
              progress: bool = True) -> Dict[str, Any]:
    import ray

    from quantcore.io import storage

    if gpus_per_task < 0 or cpus_per_task < 0 or max_retries < 0:
        raise SweepError("--gpus-per-task, --cpus-per-task and --max-retries must be >= 0")
    started_at, t0 = _now(), time.perf_counter()
    sweep_name = out.rstrip("/").rsplit("/", 1)[-1] or "sweep"
    default_device = "cuda" if gpus_per_task > 0 else "cpu"
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
    task = ray.remote(_ptq_task)
    pending: Dict[Any, RunSpec] = {}
    for spec in sweep.runs:
        ref = task.options(name=f"ptq:{spec.name}", num_gpus=gpus_per_task, num_cpus=cpus_per_task,
                           max_retries=max_retries, retry_exceptions=False).remote(
            spec.model_dump(mode="json", exclude_none=True), storage.join(out, spec.name), sweep_name,
            default_device, progress)
        pending[ref] = spec
    print(f"sweep {sweep_file}: {len(pending)} runs submitted ({gpus_per_task:g} GPU, {cpus_per_task:g} CPU "
          f"each) -> {out}", flush=True)
    records: Dict[str, Dict[str, Any]] = {}
    waiting = list(pending)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        for ref in done:
            spec = pending[ref]
            try:
                rec = ray.get(ref)
            except Exception as err:  # worker died, task cancelled ...: recorded like a failed run
                rec = _failure(spec, storage.join(out, spec.name), err)
            records[spec.name] = rec
            status = rec["status"] if rec["status"] != "succeeded" else "ok"
            detail = _one_line(rec) if rec["status"] == "succeeded" else rec["error"]
            print(f"[{len(records)}/{len(pending)}] {spec.name}: {status} "
                  f"({_fmt(rec.get('duration_s'), '{:.1f}')} s) {detail}", flush=True)
    ordered = [records[s.name] for s in sweep.runs]
    versions: Dict[str, Any] = {"ray": ray.__version__}
    try:
        import quantcore

        versions["quantcore"] = quantcore.__version__
    except Exception:  # noqa: BLE001
        pass
    meta = {"sweep_file": sweep_file, "out": out, "started": started_at, "finished": _now(),
            "duration_s": round(time.perf_counter() - t0, 3), "gpus_per_task": gpus_per_task,
            "cpus_per_task": cpus_per_task, "versions": versions,
            "summary_json": storage.join(out, "summary.json"), "summary_md": storage.join(out, "summary.md")}
    summary = build_summary(sweep, ordered, meta)
    storage.write_bytes(meta["summary_json"], (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    storage.write_bytes(meta["summary_md"], summary_markdown(summary).encode())
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    from quantcore.io import StorageError

    args = _parser().parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        if args.only:
            unknown = sorted(set(args.only) - {r.name for r in sweep.runs})
            if unknown:
                raise SweepError(f"--only: no run named {', '.join(unknown)} in {args.sweep}")
            sweep = sweep.model_copy(update={"runs": [r for r in sweep.runs if r.name in args.only]})
        summary = run_sweep(sweep, args.out, sweep_file=args.sweep, address=args.address,
                            gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                            max_retries=args.max_retries, progress=args.progress)
    except (UserError, StorageError) as err:  # SweepError, a bad URI ...: one line, exit 2
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print("\n" + summary_markdown(summary), flush=True)
    print(f"summary: {summary['summary_json']}", flush=True)
    if summary["runs_failed"]:
        failed = [r["name"] for r in summary["runs"] if r["status"] != "succeeded"]
        print(f"error: {summary['runs_failed']} of {summary['runs_total']} runs failed: {', '.join(failed)}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    # Run through the importable module, not __main__: Ray then pickles the task by reference and
    # workers import jobs.ray_sweep (the image has it on PYTHONPATH) instead of a by-value copy.
    from jobs import ray_sweep as _module

    sys.exit(_module.main())
