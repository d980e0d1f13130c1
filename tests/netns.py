"""Loopback-only network + PID namespaces for the Ray end-to-end tests: Ray binds 127.0.0.1 only,
`ray stop --force` reaches only the cluster the test started, and nothing outlives the test."""
from __future__ import annotations

import shutil
import subprocess

UNSHARE = ["unshare", "-n", "-p", "-f", "--mount-proc"]


def netns_usable() -> bool:
    """True where this process may create the namespaces (root, or user namespaces allowed)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    try:
        return subprocess.run(UNSHARE + ["sh", "-c", "ip link set lo up"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def in_netns(argv: list) -> list:
    """``argv`` run inside fresh namespaces with the loopback interface up."""
    return UNSHARE + ["sh", "-c", 'ip link set lo up && "$0" "$@"'] + [str(a) for a in argv]
