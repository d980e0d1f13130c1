"""The demo through the cluster's job entrypoint: ``python -m jobs.demo``.

Packing and installing the shipped FP32 model (or training one, ``--retrain``) run in this process (quantcore.demo); the PTQ step is the ``ptq`` TorchX
component and the QAT step the ``qat`` component (torchrun, 2 ranks, gloo), both launched on
TorchX's local scheduler (``torchx run -s local_cwd``): the same components, ``jobs.launch``
entrypoint and ``quantcore ptq``/``qat`` commands a Kubernetes run uses, on the embedded default
(local folder as object store, local processes, CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from jobs._args import parse_once

REPO = Path(__file__).resolve().parent.parent


def torchx_ptq_command(data_uri: str, model_uri: str, out: str, recipes: tuple[str, ...],
                       eval_limit: int | None, log_dir: str) -> list[str]:
    cmd = [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", "-cfg", f"log_dir={log_dir}",
           "jobs/components.py:ptq", "--recipe", ",".join(recipes), "--calib_data", data_uri,
           "--eval_data", data_uri, "--eval_split", "test", "--out", out, "--checkpoint", model_uri,
           "--gpus", "0", "--workers", "0", "--batch_size", "500"]
    if eval_limit:
        cmd += ["--limit", str(eval_limit)]
    return cmd


def torchx_qat_command(data_uri: str, model_uri: str, out: str, recipe: str, eval_limit: int | None,
                       log_dir: str, ranks: int = 2) -> list[str]:
    cmd = [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", "-cfg", f"log_dir={log_dir}",
           "jobs/components.py:qat", "--recipe", recipe, "--data", data_uri, "--eval_split", "test",
           "--out", out, "--checkpoint", model_uri, "--gpus", "0", "--nproc_per_node", str(ranks), "--workers", "0"]
    if eval_limit:
        cmd += ["--eval_limit", str(eval_limit)]
    return cmd


def _run(cmd: list[str], what: str, log_dir: str) -> int:
    env = dict(os.environ)
    # `python` in the component's entrypoint must be this interpreter (the project's venv).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH")) if x)
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        print(f"error: the TorchX {what} job failed (exit {proc.returncode}); logs in {log_dir}", file=sys.stderr)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    def at_least(lo: int):
        def conv(v: str) -> int:
            n = int(v)
            if n < lo:
                raise argparse.ArgumentTypeError(f"must be >= {lo} (got {n})")
            return n
        return conv

    p.add_argument("--store", default="demo-store", help="local folder (or s3:// prefix) acting as the object store")
    p.add_argument("--epochs", type=at_least(1), default=None,
                   help="FP32 training epochs; other than the recipe's 12, a model is trained here (as --retrain)")
    p.add_argument("--train-limit", type=at_least(1), default=None,
                   help="first N images of each split only; a model is trained on them here (as --retrain)")
    p.add_argument("--eval-limit", type=at_least(0), default=None,
                   help="evaluate a seeded, class-stratified sample of N test images (default, or 0: all 10,000)")
    p.add_argument("--seed", type=int, default=None,
                   help="FP32 training seed; other than the recipe's 0, a model is trained here (as --retrain)")
    p.add_argument("--retrain", action="store_true",
                   help="use a model trained here (trained now, or cached in the store by an earlier run) "
                        "instead of the one shipped with quantcore")
    args = parse_once(p, argv)

    from quantcore.demo import DemoError, prepare_demo, summary_lines
    from quantcore.io import storage

    t0 = time.perf_counter()
    try:
        plan = prepare_demo(args.store, args.epochs, args.train_limit, seed=args.seed, retrain=args.retrain,
                            eval_limit=args.eval_limit)
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Absolute URIs: the local scheduler runs the component in its own working directory.
    to_abs = (lambda u: u if storage.is_s3(u) else os.path.abspath(u))
    data_uri, model_uri, out = to_abs(plan.data_uri), to_abs(plan.model_uri), to_abs(plan.out)
    log_dir = os.path.join(to_abs(args.store), "torchx-logs")
    cmd = torchx_ptq_command(data_uri, model_uri, out, plan.recipes, args.eval_limit, log_dir)
    print("PTQ through the TorchX component on the local scheduler:\n  " + " ".join(cmd[1:]), flush=True)
    if _run(cmd, "ptq", log_dir):
        return 1
    rep = json.loads(storage.read_bytes(storage.join(out, "report.json")))
    qat_reports = {}
    for name in plan.qat_recipes:
        qout = storage.join(to_abs(plan.qat_out), name)
        cmd = torchx_qat_command(data_uri, model_uri, qout, name, args.eval_limit, log_dir)
        print(f"QAT of {name} through the TorchX qat component (torchrun, 2 ranks):\n  " + " ".join(cmd[1:]),
              flush=True)
        if _run(cmd, "qat", log_dir):
            return 1
        qat_reports[name] = json.loads(storage.read_bytes(storage.join(qout, "report.json")))
    print()
    for line in summary_lines(rep, qat_reports):
        print(line)
    print(f"\nreports: {out}/report.md, {to_abs(plan.qat_out)}/<recipe>/report.md   "
          f"({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
