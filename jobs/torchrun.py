"""``python -m jobs.torchrun [torchrun options] -m MODULE [ARGS...]``: torchrun that keeps the exit status.

torchrun (``torch.distributed.run``) exits 1 whenever a rank fails, whatever the rank's own exit
status, and restarts all local ranks (``--max_restarts``) after any failure. The launchers above it
decide on that status: quantcore exits 2 for a user mistake (bad recipe, URI or data: retrying
cannot help, so the Helm Jobs' ``podFailurePolicy`` and the TorchX Volcano Jobs' ``exitCode: 2``
policy end the job at once) and 143 after SIGTERM once a checkpoint is written (retry: the run
resumes from it). This wrapper runs torchrun in this
process, with the same options and the same environment for the ranks, and:

* stops restarting the ranks as soon as one of them exits 2 (a user error, the same on every
  restart);
* exits 2 when any rank exited 2; otherwise with the status of the first rank that failed
  (a rank killed by signal N: 128+N), never 0 after a failure;
* exits 128+N when this agent itself got signal N (SIGTERM on pod eviction: 143), after torchrun
  has forwarded it to the ranks and waited ``--shutdown_timeout`` seconds for them.

On success (every rank exited 0) it exits 0, like torchrun.

Each rank runs through this module too (``python -u -m jobs.torchrun --run-rank (-m MODULE | SCRIPT)
ARGS``, set up by :func:`through_rank_shim`), which, inside the rank's own process:

* expands references to the rank's torchrun variables in ARGS: ``$RANK``/``${RANK}``,
  ``$LOCAL_RANK``, ``$GROUP_RANK``, ``$ROLE_RANK``, ``$WORLD_SIZE``, ``$LOCAL_WORLD_SIZE`` and
  ``$ROLE_WORLD_SIZE`` (e.g. ``--out s3://b/run/rank_$RANK``): a shell on the node cannot, they
  only exist once torchrun has started the rank; other ``$`` text is left alone;
* makes ``cuda:LOCAL_RANK`` the rank's default CUDA device when the node has GPUs
  (:func:`quantcore.distributed.resolve_rank_device`, as ``quantcore --device cuda`` does), so
  ``torch.device("cuda")``/``.cuda()`` in any module or script puts each rank on its own GPU
  instead of all on GPU 0; exit 2 when the node has fewer GPUs than ranks;
* then runs the module or script in the same process (``runpy``, as ``python -m``/``python SCRIPT``
  would: same PID, signals, exit status).

``--no-python`` and ``--run-path`` launches are passed to torchrun unchanged.
"""
from __future__ import annotations

import functools
import os
import re
import runpy
import signal
import sys
from typing import List, Mapping, MutableMapping, Optional, Sequence

USER_ERROR = 2
RUN_RANK = "--run-rank"
# torchrun's per-rank variables that ARGS may refer to (set by the agent for each rank).
RANK_VARS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
             "ROLE_WORLD_SIZE")
_NAMES = "|".join(sorted(RANK_VARS, key=len, reverse=True))
_RANK_REF = re.compile(r"\$(?:\{(%s)\}|(%s)(?![A-Za-z0-9_]))" % (_NAMES, _NAMES))


def log(msg: str) -> None:
    print(f"jobs.torchrun: {msg}", file=sys.stderr, flush=True)


def status_of(exitcode: int) -> int:
    """A process status as a shell reports it: a negative code (killed by signal N) becomes 128+N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def exit_status(codes: Mapping[int, int], first_rank: Optional[int] = None) -> int:
    """The status to exit with, from the failed ranks' exit codes ({global rank: exit code}): 2 when
    any rank reported a user error, else the first failed rank's status (1 if that was 0)."""
    if not codes:
        return 1
    if USER_ERROR in codes.values():
        return USER_ERROR
    rank = first_rank if first_rank in codes else min(codes)
    return status_of(codes[rank]) or 1


def only_user_error(codes: Mapping[int, int]) -> bool:
    """Whether the failed ranks' exit codes ({global rank: exit code}) say one user error and nothing
    else: some rank exited 2 and the others 1 (a peer's collective failing after it) or by the agent's
    SIGTERM. A crash, an OOM kill (-9) or another status is news of its own."""
    return USER_ERROR in codes.values() and all(c in (1, USER_ERROR, -int(signal.SIGTERM)) for c in codes.values())


def stop_restarts_after_user_error() -> bool:
    """Make torchrun's agent give up (no more ``--max_restarts``) when a local rank exits 2.

    Wraps ``LocalElasticAgent._monitor_workers`` in this process only (this process exists to run
    the agent). Returns False, and changes nothing, if this torch has no such method: restarts then
    happen as usual and the exit status is still 2."""
    try:
        from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    except ImportError:
        return False
    original = getattr(LocalElasticAgent, "_monitor_workers", None)
    if original is None:
        return False
    if getattr(original, "_quantcore_user_error_stop", False):
        return True

    @functools.wraps(original)
    def monitor(self, worker_group):
        result = original(self, worker_group)
        failures = getattr(result, "failures", None) or {}
        if any(getattr(f, "exitcode", None) == USER_ERROR for f in failures.values()):
            if getattr(self, "_remaining_restarts", 0):
                ranks = sorted(r for r, f in failures.items() if f.exitcode == USER_ERROR)
                log(f"rank(s) {ranks} exited {USER_ERROR} (user error): not restarting")
            self._remaining_restarts = 0
        return result

    monitor._quantcore_user_error_stop = True  # type: ignore[attr-defined]
    LocalElasticAgent._monitor_workers = monitor
    return True


def expand_rank_refs(args: Sequence[str], environ: Mapping[str, str]) -> List[str]:
    """``args`` with ``$NAME``/``${NAME}`` replaced for every NAME in :data:`RANK_VARS` (a new list)."""
    def sub(m: "re.Match[str]") -> str:
        name = m.group(1) or m.group(2)
        if name not in environ:
            raise KeyError(f"{m.group(0)}: {name} is not set (not started by torchrun?)")
        return environ[name]

    return [_RANK_REF.sub(sub, a) for a in args]


def through_rank_shim(args: Sequence[str]) -> List[str]:
    """torchrun's arguments with the training target wrapped: ``[opts] -m jobs.torchrun --run-rank
    (-m MODULE | SCRIPT) ARGS`` (a new list). ``--no-python``/``--run-path`` launches are returned
    as they are (no Python interpreter of ours to run the target in)."""
    from torch.distributed.run import get_args_parser

    ns = get_args_parser().parse_args(list(args))
    _refuse_repeats(args, len(args) - len(ns.training_script_args))
    if ns.no_python or ns.run_path:
        return list(args)
    tail = list(ns.training_script_args)
    k = len(args) - len(tail) - 1  # argparse REMAINDER: the target, then its arguments, end the list
    if k < 0 or args[k] != ns.training_script:
        raise ValueError(f"cannot find the training script in {list(args)!r}")
    target = ["-m", ns.training_script] if ns.module else [ns.training_script]
    opts = list(args[:k]) + ([] if ns.module else ["-m"])
    return opts + ["jobs.torchrun", RUN_RANK] + target + tail


def _refuse_repeats(args: Sequence[str], end: int) -> None:
    """torchrun's own options (``args[:end]``: up to the training script) given twice exit 2, as every
    quantcore entrypoint does (argparse keeps the last ``--nproc_per_node``, unseen). The target's
    arguments are not looked at: ``-r`` is quantcore's recipe there, torchrun's ``--redirects`` here."""
    from torch.distributed.run import get_args_parser

    from jobs._args import parse_once

    parser = get_args_parser()
    parser.prog = "python -m jobs.torchrun"
    parse_once(parser, list(args[:end]))


def bind_rank_gpu(environ: Mapping[str, str]) -> Optional[object]:
    """Make ``cuda:LOCAL_RANK`` this process's default CUDA device when CUDA is available; the
    device, or None on a node without GPUs. Raises quantcore's UserError (exit 2) when the node
    has no GPU for this local rank."""
    import torch

    if not torch.cuda.is_available():
        return None
    from quantcore.distributed import resolve_rank_device

    return resolve_rank_device("cuda", int(environ.get("LOCAL_RANK") or 0))


def run_rank(argv: Sequence[str], environ: Optional[MutableMapping[str, str]] = None) -> int:
    """The rank side: ``(-m MODULE | SCRIPT) ARGS`` with rank references expanded, on this rank's
    GPU, run in this process. The target's own ``sys.exit`` status propagates as it is."""
    from quantcore.errors import UserError

    environ = os.environ if environ is None else environ
    argv = list(argv)
    module = argv[:1] == ["-m"]
    if module:
        argv = argv[1:]
    if not argv:
        log(f"{RUN_RANK}: no module or script to run")
        return USER_ERROR
    target, rest = argv[0], argv[1:]
    try:
        rest = expand_rank_refs(rest, environ)
        bind_rank_gpu(environ)
    except (KeyError, UserError) as err:
        log(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
        return USER_ERROR
    sys.argv = [target] + rest
    if module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(target))  # as `python SCRIPT` would
        runpy.run_path(target, run_name="__main__")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [RUN_RANK]:
        return run_rank(args[1:])

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    stop_restarts_after_user_error()
    try:
        torchrun_main(through_rank_shim(args))
    except ChildFailedError as err:
        first_rank, _ = err.get_first_failure()
        codes = {rank: f.exitcode for rank, f in err.failures.items()}
        code = exit_status(codes, first_rank)
        # a rank printed its one-line user error and the others stopped with it (exit 1: a peer's failed
        # collective, or SIGTERM from the agent): elastic's failure table adds nothing. A crash, an OOM
        # kill or any other status keeps it.
        if only_user_error(codes):
            bad = min(r for r, c in codes.items() if c == USER_ERROR)
            log(f"rank {bad} stopped on the error above, the other ranks with it; exit status {code}")
        else:
            log(f"{err}\nexit status {code}")
        return code
    except SignalException as err:
        code = 128 + int(err.sigval)
        log(f"got {getattr(err.sigval, 'name', err.sigval)}: ranks stopped; exit status {code}")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
