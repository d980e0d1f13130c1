"""Checkov, the Kubernetes policy scanner (Bridgecrew/Prisma, PyPI ``checkov``), for the tests.

checkov pins dependencies that conflict with the project's lock (urllib3, boto3, ...), so it lives in
its own virtual environment under the tools cache (``$QUANTCORE_TOOLS_DIR`` or ``<repo>/.tools``),
installed once from ``tests/checkov.lock`` (exact versions with sha256 hashes, compiled with
``uv pip compile --generate-hashes``). :func:`scan` writes each rendered object to its own file and
returns checkov's failed checks; the project's justified exceptions are in ``tests/checkov_skips.yaml``
and are applied here, not inside checkov, so an exception that no longer matches anything is an
error too (see tests/test_policy.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import yaml

from k8s_tools import REPO, ToolError, _locked, tools_dir

LOCK = REPO / "tests" / "checkov.lock"
SKIPS = REPO / "tests" / "checkov_skips.yaml"


def _version() -> str:
    for line in LOCK.read_text().splitlines():
        if line.startswith("checkov=="):
            return line.split("==", 1)[1].split()[0]
    raise ToolError(f"{LOCK}: no checkov== line")


def checkov_binary(cache: Path | None = None) -> Path:
    """Path of the pinned checkov executable, installing it into its own venv on first use."""
    root = (cache or tools_dir()) / f"checkov-{_version()}"
    exe = root / "bin" / "checkov"
    done = root / ".installed"
    if done.is_file() and exe.is_file():
        return exe
    with _locked(root.parent / f".checkov-{_version()}.lock"):
        if done.is_file() and exe.is_file():
            return exe
        if root.exists():
            shutil.rmtree(root)
        uv = shutil.which("uv")
        try:
            if uv:
                subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(root)], check=True,
                               capture_output=True, text=True, timeout=600)
                subprocess.run([uv, "pip", "sync", "--quiet", "--require-hashes", str(LOCK)], check=True,
                               capture_output=True, text=True, timeout=1200,
                               env=dict(os.environ, VIRTUAL_ENV=str(root)))
            else:
                subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True,
                               text=True, timeout=600)
                subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--quiet",
                                "--disable-pip-version-check", "--require-hashes", "--no-deps", "-r",
                                str(LOCK)], check=True, capture_output=True, text=True, timeout=1200)
        except subprocess.CalledProcessError as exc:
            raise ToolError(f"installing checkov from {LOCK} failed: {(exc.stderr or exc.stdout)[-800:]}")
        done.write_text(_version())
    return exe


@dataclass(frozen=True)
class Finding:
    check_id: str
    check_name: str
    where: str  # "<source>: <Kind>/<name>"
    resource: str  # checkov's resource id, e.g. "Job.default.quantcore-calib"

    def __str__(self) -> str:
        return f"{self.check_id} {self.where} ({self.check_name})"


def scan(objects: Sequence[Tuple[str, Dict[str, Any]]], checkov: Path | None = None) -> List[Finding]:
    """Run checkov over ``(source, object)`` pairs; every failed check as a :class:`Finding`.

    Raises ToolError when checkov does not run or parses fewer objects than it was given (a scanner
    that silently skips a file would make the test pass on nothing).
    """
    exe = checkov or checkov_binary()
    with tempfile.TemporaryDirectory(prefix="checkov-") as tmp:
        names: Dict[str, str] = {}
        for i, (source, obj) in enumerate(objects):
            name = f"obj{i:04d}.yaml"
            (Path(tmp) / name).write_text(yaml.safe_dump(obj, sort_keys=False))
            names[name] = f"{source}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        # through the venv's python: the script's #! line holds the path the venv was created at,
        # which a cache reached through another path (a symlinked .tools) may no longer have
        proc = subprocess.run([str(exe.parent / "python"), str(exe), "-d", tmp, "--framework", "kubernetes", "-o", "json", "--quiet",
                               "--compact", "--skip-download", "--soft-fail"],
                              capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, LOG_LEVEL="ERROR", BC_SKIP_MAPPING="TRUE"))
        if proc.returncode != 0:
            raise ToolError(f"checkov exit {proc.returncode}: {proc.stderr[-1500:]}")
        out = proc.stdout.strip()
        reports = json.loads(out) if out.startswith(("[", "{")) else []
        if isinstance(reports, dict):
            reports = [reports]
        findings: List[Finding] = []
        scanned = set()
        for rep in reports:
            res = rep.get("results", {})
            for key in ("passed_checks", "failed_checks"):
                for c in res.get(key, []):
                    scanned.add(Path(c["file_path"]).name)
            for c in res.get("failed_checks", []):
                fname = Path(c["file_path"]).name
                findings.append(Finding(c["check_id"], c.get("check_name", ""), names.get(fname, fname),
                                        c.get("resource", "")))
        missing = [names[n] for n in names if n not in scanned and _scannable(objects[int(n[3:7])][1])]
        if missing:
            raise ToolError(f"checkov did not scan {len(missing)} object(s), e.g. {missing[:3]}")
        return findings


def _scannable(obj: Dict[str, Any]) -> bool:
    """Kinds with pod specs, which checkov's Kubernetes checks always evaluate (kinds without a
    matching check, e.g. ConfigMap, never appear in its results; custom resources such as RayJob or
    Volcano Job are unknown to it and are scanned through their pod templates, tests/test_policy.py)."""
    return obj.get("kind") in {"Pod", "Job", "CronJob", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet",
                               "PodTemplate"}


def load_skips(path: Path = SKIPS) -> Dict[str, Dict[str, Any]]:
    """``{check_id: {"reason": str, "where": [substring, ...] | None}}`` from the skips file."""
    data = yaml.safe_load(path.read_text()) or {}
    out = {}
    for item in data.get("skips", []):
        if not item.get("reason", "").strip():
            raise ValueError(f"{path}: skip {item.get('id')} has no reason")
        out[item["id"]] = {"reason": item["reason"], "where": item.get("where")}
    return out


def unjustified(findings: Sequence[Finding], skips: Dict[str, Dict[str, Any]]) -> Tuple[List[Finding], set]:
    """Findings no skip covers, and the skip ids that covered nothing."""
    used, left = set(), []
    for f in findings:
        s = skips.get(f.check_id)
        if s and (not s["where"] or any(w in f.where for w in s["where"])):
            used.add(f.check_id)
        else:
            left.append(f)
    return left, set(skips) - used
