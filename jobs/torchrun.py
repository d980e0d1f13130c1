"""``python -m jobs.torchrun [torchrun options] -m MODULE [ARGS...]``: torchrun that keeps the exit status.

torchrun (``torch.distributed.run``) exits 1 whenever a rank fails, whatever the rank's own exit
status, and restarts all local ranks (``--max_restarts``) after any failure. The launchers above it
decide on that status: quantcore exits 2 for a user mistake (bad recipe, URI or data: retrying
cannot help, so the Kubernetes ``podFailurePolicy`` fails the Job at once) and 143 after SIGTERM
once a checkpoint is written (retry: the run resumes from it). This wrapper runs torchrun in this
process, with the same options and the same environment for the ranks, and:

* stops restarting the ranks as soon as one of them exits 2 (a user error, the same on every
  restart);
* exits 2 when any rank exited 2; otherwise with the status of the first rank that failed
  (a rank killed by signal N: 128+N), never 0 after a failure;
* exits 128+N when this agent itself got signal N (SIGTERM on pod eviction: 143), after torchrun
  has forwarded it to the ranks and waited ``--shutdown_timeout`` seconds for them.

On success (every rank exited 0) it exits 0, like torchrun.
"""
from __future__ import annotations

import functools
import sys
from typing import Mapping, Optional, Sequence

USER_ERROR = 2


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    args = list(sys.argv[1:] if argv is None else argv)
    stop_restarts_after_user_error()
    try:
        torchrun_main(args)
    except ChildFailedError as err:
        first_rank, _ = err.get_first_failure()
        code = exit_status({rank: f.exitcode for rank, f in err.failures.items()}, first_rank)
        log(f"{err}\nexit status {code}")
        return code
    except SignalException as err:
        code = 128 + int(err.sigval)
        log(f"got {getattr(err.sigval, 'name', err.sigval)}: ranks stopped; exit status {code}")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
