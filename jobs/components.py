"""TorchX components for quantcore: ``calibrate``, ``evaluate``, ``ptq``, ``ddp`` and ``qat``.

Each component is a pure function returning a :class:`torchx.specs.AppDef`; its docstring is the
``--help`` of ``torchx run`` (the options every component shares are declared once, in
:class:`PodOptions`, and their help is added to each docstring by :func:`component`). The
container command always starts with the :mod:`jobs.launch` entrypoint, which loads S3
credentials from the Kubernetes Secret named by ``--s3_secret`` when they are not in the
environment already (TorchX's kubernetes scheduler cannot reference Secrets itself), and ends in
the ``quantcore`` CLI: ``python -m jobs.launch quantcore <command> ...``. ``ddp``, ``qat``, and
``calibrate``/``evaluate``/``ptq`` with ``gpus`` > 1 (one data-parallel rank per GPU, as the Helm
chart's Jobs) put :mod:`jobs.torchrun` in between (torchrun keeping the ranks' exit status: 2 for a
user error, 143 after SIGTERM; per-rank ``$RANK`` references expanded; each rank on its own GPU).
Every component runs one rank per GPU: ``nproc_per_node`` is ``gpus`` whenever ``gpus`` > 0.

On ``-s kubernetes`` the Volcano Job that TorchX 0.7 builds is completed by :class:`QuantcoreRole`
(see :func:`complete_volcano_job`): the Kubernetes ``restricted`` Pod Security context, writable
``/tmp`` and ``/cache`` emptyDirs with an ephemeral-storage request, GPU tolerations, node
selector, image-pull secrets, labels/annotations, the priority class on the pods, a deadline, and
retry rules that end the job on exit status 2 (a user error) but restart it after infrastructure
failures. ``-cfg priority_class=NAME`` (TorchX's own option) sets the job's and its pods' priority;
``-cfg queue=NAME`` the Volcano queue.

Examples (from the repository root)::

    # on this machine, CPU only, data and results in S3 (credentials from the environment)
    torchx run -s local_cwd jobs/components.py:calibrate \\
        --recipe vit_b16_384_ft1 --data s3://datasets/imagenet-zip --out s3://runs/ft1 --gpus 0

    # on Kubernetes + Volcano (print the Volcano Job without submitting it: --dryrun)
    torchx run -s kubernetes --dryrun --workspace="" -cfg queue=default,service_account=quantcore \\
        jobs/components.py:ptq --recipe vit_b16_384_ft1,vit_b16_384_ft2 \\
        --calib_data s3://datasets/imagenet-zip --out s3://runs/ptq --s3_secret quantcore-s3-credentials

List arguments take comma-separated values (``--recipe a,b``), dict arguments ``K=V,K2=V2``, and
booleans ``True``/``False``. ``--workspace=""`` stops TorchX from building and pushing a docker
image of the working directory: the job runs the released ``--image`` as it is.

Note: no ``from __future__ import annotations`` here; TorchX reads the annotations at runtime.
"""
import dataclasses
import posixpath
import re
import shlex
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torchx.specs as specs
from torchx.specs.finder import ComponentValidationException

# The one image reference of the project: README.md, images/Makefile's example, the Helm chart's
# image.repository:tag (= Chart.yaml appVersion) and the kustomize `images:` entries use the same,
# tests/test_torchx_k8s.py checks that they agree.
DEFAULT_IMAGE = "registry.example.com/ml/quantcore:0.1.0"
# The container command: the launcher, then the quantcore CLI (with torchrun in between for ranks).
LAUNCHER = ["python", "-m", "jobs.launch"]
TORCHRUN = ["python", "-m", "jobs.torchrun"]
SECRET_ENV = "QUANTCORE_S3_SECRET"
ENDPOINT_ENV = "AWS_ENDPOINT_URL"

# Pod security, as the Helm chart's pods (charts/quantcore: podSecurity, _helpers.tpl): the image's
# non-root user and group (images/Dockerfile), the Kubernetes "restricted" profile.
RUN_AS = 10001
USER_ERROR_EXIT = 2  # quantcore, jobs.launch and jobs.torchrun exit 2 for a user mistake
TMP_GB = 4  # /tmp emptyDir (HOME, torchrun's logs, temporary files)
LOG_GB = 1  # container logs, counted against the pod's ephemeral-storage too
# Writable paths of the pod (the root filesystem is read-only): HOME and the caches of the image.
SCRATCH = {"tmp": "/tmp", "cache": "/cache"}
RESERVED_PATHS = ("/", "/tmp", "/cache", "/dev/shm")
# The image's own files (images/Dockerfile: /opt/venv, /opt/python, /opt/quantcore on PYTHONPATH) and
# the system directories: a volume mounted at or under one hides what every pod runs ("No module
# named jobs", "quantcore: not found"). Data and run volumes go elsewhere (/mnt, /data, ...). The
# Helm chart refuses the same list (charts/quantcore/templates/_helpers.tpl, quantcore.checkVolumes).
SYSTEM_PATHS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/opt", "/proc", "/root", "/run",
                "/sbin", "/sys", "/usr", "/var")
# `quantcore export`'s formats and opsets (quantcore.export.run.FORMATS, onnx_qdq.MIN_OPSET..21), here
# without importing torch; tests/test_jobs.py checks they agree
EXPORT_FORMATS = ("onnx", "aimet", "trt-table")
EXPORT_OPSETS = (13, 21)
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# Dataset layouts of `quantcore --layout` (quantcore.data.detect: "auto", LAYOUTS and their aliases),
# here without importing torch; tests/test_component_inputs.py checks they agree
LAYOUTS = ("auto", "folder", "imagefolder", "imagenet", "imagenet-folder", "zip", "zipped", "shards", "zip-shards",
           "imagenet-zip", "resisc", "resisc45", "imagepaths")
# The S3 endpoint, as the Helm chart's schema (values.schema.json, s3.endpoint) takes it (the scheme in
# any case, as boto3 does); also for an endpoint given by --env
S3_ENDPOINT = re.compile(r"^(?i:https?)://[^\s/]+(/[^\s]*)?$")
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# Environment variable names Kubernetes takes (a C identifier, or with '.' and '-' too)
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# Labels TorchX (kubernetes_scheduler.LABEL_*: all of torchx.pytorch.org/ and three app.kubernetes.io/
# keys) and Volcano (batch/v1alpha1 pod labels) set on the job's pods and select them by: a user label
# with one of these keys would re-label them. tests/test_component_inputs.py checks TorchX's list.
RESERVED_LABEL_PREFIXES = ("torchx.pytorch.org/",)
RESERVED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance",
                   "volcano.sh/job-name", "volcano.sh/job-namespace", "volcano.sh/queue-name", "volcano.sh/task-spec",
                   "volcano.sh/task-index", "volcano.sh/job-version", "volcano.sh/job-retry-count")
# Ports an unprivileged rank can serve the c10d rendezvous on (the pods drop every capability)
RDZV_PORTS = (1024, 65535)
RDZV_PORT = 29500  # the multi-node rendezvous port when none is given (one node uses a free local port)
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# TorchX 0.7 requests memMB - 1024 MB (its node reservation; never below 0) under a limit of memMB:
# from 2048 on, the request is at least 1 GiB, about what Python with torch needs before any model.
MIN_MEM_MB = 2048

# Names on Kubernetes. TorchX 0.7 names the Volcano Job normalize_str(f"{app.name}-{random_id()}")
# (torchx.schedulers.ids.random_id: a 64-bit number written in at most 14 letters and digits) and
# each task normalize_str(f"{role}-{replica}"); Volcano names a task's pod f"{job}-{task}-0", and
# its svc plugin uses the job name for a headless Service and as the pods' subdomain, and the pod
# name as each pod's hostname. Service names are DNS-1035 labels, subdomains and hostnames DNS-1123
# labels: at most 63 characters each.
TORCHX_ID_MAX = 14
DNS_LABEL_MAX = 63
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# Container image reference (distribution/reference grammar): [HOST[:PORT]/]PATH[:TAG][@sha256:HEX]
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REF = re.compile(rf"^(?:{_HOST}/)?{_PATH}(?:/{_PATH})*"
                       r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_PART = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


class ComponentError(ValueError, ComponentValidationException):
    """A component argument that cannot work; the message starts with the option (``--name``) and
    says what would work. A :class:`torchx.specs.finder.ComponentValidationException` too: the
    ``torchx run`` CLI reports those as one error line (``Failed to run component ... got
    errors: <message>``, exit status 1) instead of a traceback."""


# ------------------------------------------------------------------------------ argument checks

def _as_list(value: Optional[List[str]], what: str) -> List[str]:
    """A fresh list (never the caller's) of non-empty strings; a lone string counts as one item."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    items = [str(v).strip() for v in items]
    if any(not v for v in items):
        raise ComponentError(f"{what}: empty value in {items!r}")
    return items


def _qualified_name(key: str) -> bool:
    """A label/annotation key or a toleration key: [DNS-subdomain prefix/]name (name <= 63)."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_NAME_PART.match(name))


def _string_map(value: Optional[Dict[str, str]], flag: str, label_values: bool) -> Dict[str, str]:
    out = {str(k).strip(): str(v) for k, v in (value or {}).items()}
    for k, v in out.items():
        if not _qualified_name(k):
            raise ComponentError(f"{flag}: {k!r} is not a valid key ([prefix/]name, name: letters, digits, "
                                 f"'-', '_', '.', at most 63 characters)")
        if label_values and v and (len(v) > 63 or not _NAME_PART.match(v)):
            raise ComponentError(f"{flag}: value {v!r} of {k} is not a valid label value (at most 63 letters, "
                                 f"digits, '-', '_', '.', starting and ending alphanumeric)")
    return out


def _key_values(value: Any, flag: str) -> Dict[str, str]:
    """``value`` (None, a dict, or TorchX's K1=V1,K2=V2 text, parsed as TorchX parses its Dict
    arguments) as a new dict; ComponentError naming ``flag`` when the text holds no K=V pair.

    The components declare these options ``Optional[str]`` so that TorchX hands over the text and a
    malformed one is refused here, naming the flag: TorchX's own Dict decoding ended in a ValueError
    traceback (``--env FOO``). Python callers may pass a dict."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    from torchx.util.types import to_dict

    try:
        return to_dict(str(value))
    except ValueError:
        raise ComponentError(f"{flag} {value!r}: expected KEY=VALUE pairs separated by commas (K1=V1,K2=V2; a "
                             f"value cannot hold '=', an empty value is written \"\")") from None


def check_image(image: str) -> str:
    """``image`` if it is a pinned reference: REPO:TAG, REPO@sha256:HEX or REPO:TAG@sha256:HEX;
    refused: malformed references, no tag and no digest (that is `latest`) and the `latest` tag."""
    ref = str(image).strip()
    m = IMAGE_REF.match(ref)
    if not m:
        raise ComponentError(f"--image {image!r}: not a container image reference "
                             f"([registry/]repository:tag or [registry/]repository@sha256:<64 hex>)")
    if not m.group("digest") and m.group("tag") in (None, "latest"):
        raise ComponentError(f"--image {image!r}: pin a release tag or a digest (repository@sha256:...); "
                             f"`latest` (or no tag) changes under a running job and its retries")
    return ref


def check_job_name(name: str, role: str, nnodes: int) -> str:
    """``name`` if TorchX uses it as it is and every name derived from it on Kubernetes is valid.

    Refused: names that TorchX's ``normalize_str`` would change behind the user's back (upper
    case, ``_``, ``/`` ...) or that cannot start a Service name (a DNS-1035 label: a lower-case
    letter first), and names too long for the Volcano Job name ``NAME-<id>`` (id: at most
    :data:`TORCHX_ID_MAX` characters) or the longest pod name ``NAME-<id>-ROLE-<nnodes - 1>-0`` to
    stay within :data:`DNS_LABEL_MAX` characters (see the comment at :data:`TORCHX_ID_MAX`)."""
    ref = str(name)
    if not _DNS_1035_LABEL.match(ref):
        from torchx.util.strings import normalize_str

        raise ComponentError(f"--name {name!r}: use lower-case letters, digits and '-', starting with a letter "
                             f"and ending with a letter or digit (TorchX would name the job "
                             f"{normalize_str(ref)}-<id>; a Kubernetes Service name starts with a letter)")
    longest_pod = f"-{'x' * TORCHX_ID_MAX}-{role}-{nnodes - 1}-0"
    limit = DNS_LABEL_MAX - len(longest_pod)
    if len(ref) > limit:
        raise ComponentError(f"--name {name!r}: {len(ref)} characters, at most {limit} with --nnodes {nnodes} "
                             f"(TorchX names the Volcano Job and its Service NAME-<id of up to {TORCHX_ID_MAX} "
                             f"characters>, Volcano the pods <job>-{role}-<node>-0; each must be a DNS label of at "
                             f"most {DNS_LABEL_MAX} characters)")
    return ref


def ranks_per_node(nproc_per_node: int, gpus: int) -> int:
    """torchrun's ``--nproc_per_node``: one rank per GPU (``nproc_per_node`` 0 or ``gpus``); with
    no GPUs, ``nproc_per_node`` CPU ranks, 1 when 0. Any other count with GPUs is refused: fewer
    ranks leave GPUs idle, more put two ranks on one GPU (rank i uses cuda:LOCAL_RANK)."""
    if nproc_per_node < 0:
        raise ComponentError(f"--nproc_per_node must be >= 0, got {nproc_per_node}")
    if gpus and nproc_per_node not in (0, gpus):
        raise ComponentError(f"--nproc_per_node {nproc_per_node} with --gpus {gpus}: each node runs one rank per "
                             f"GPU; leave --nproc_per_node at 0 (one per GPU) or set it to {gpus}, or change --gpus")
    return nproc_per_node or max(gpus, 1)


def parse_tolerations(items: Optional[List[str]]) -> List[Dict[str, str]]:
    """Tolerations from ``KEY[=VALUE][:EFFECT]`` strings (the syntax of ``kubectl taint``): no VALUE
    tolerates any value (operator Exists), no EFFECT every effect."""
    out = []
    for item in _as_list(items, "--tolerations"):
        key_value, _, effect = item.partition(":")
        key, eq, value = key_value.partition("=")
        if not _qualified_name(key) or (eq and (len(value) > 63 or not _NAME_PART.match(value))):
            raise ComponentError(f"--tolerations {item!r}: expected KEY[=VALUE][:EFFECT], e.g. "
                                 f"nvidia.com/gpu:NoSchedule or dedicated=ml:NoSchedule")
        if effect and effect not in TAINT_EFFECTS:
            raise ComponentError(f"--tolerations {item!r}: effect must be one of {', '.join(TAINT_EFFECTS)}")
        tol = {"key": key, "operator": "Equal", "value": value} if eq else {"key": key, "operator": "Exists"}
        if effect:
            tol["effect"] = effect
        out.append(tol)
    return out


def parse_pvc_mounts(mounts: Optional[List[str]]) -> List[specs.VolumeMount]:
    """PersistentVolumeClaim mounts from torchx's ``type=volume,src=PVC,dst=PATH[,readonly]`` groups.

    Host paths (``type=bind``) and devices (``type=device``) are refused: they become hostPath
    volumes (and a privileged container for devices), which the namespace's ``restricted`` Pod
    Security profile rejects. So are mount points that hide the pod's own scratch volumes."""
    items = _as_list(mounts, "--mounts")
    if not items:
        return []
    try:
        parsed = specs.parse_mounts(items)
    except (KeyError, ValueError) as err:
        raise ComponentError(f"--mounts {','.join(items)}: {err.args[0] if err.args else err} "
                             f"(expected type=volume,src=PVC_NAME,dst=/path[,readonly])") from None
    out: List[specs.VolumeMount] = []
    for m in parsed:
        if not isinstance(m, specs.VolumeMount):
            kind = "type=bind (a host path)" if isinstance(m, specs.BindMount) else "type=device (a host device)"
            raise ComponentError(f"--mounts: {kind} is not allowed: the namespace enforces the restricted "
                                 f"Pod Security profile (no hostPath volumes, no privileged containers); mount "
                                 f"a PersistentVolumeClaim with type=volume,src=PVC_NAME,dst=/path[,readonly]")
        dst = posixpath.normpath(m.dst_path) if m.dst_path else ""
        if not dst.startswith("/") or dst in RESERVED_PATHS:
            raise ComponentError(f"--mounts dst={m.dst_path!r}: needs an absolute path other than "
                                 f"{', '.join(RESERVED_PATHS)} (the pod's own volumes)")
        system = next((p for p in SYSTEM_PATHS if dst == p or dst.startswith(p + "/")), None)
        if system is not None:
            raise ComponentError(f"--mounts dst={m.dst_path!r}: inside {system}, the image's own files and system "
                                 f"directories ({', '.join(SYSTEM_PATHS)}) would be hidden; mount it elsewhere, "
                                 f"e.g. under /mnt or /data")
        if len(m.src) > 253 or not _DNS_SUBDOMAIN.match(m.src):
            raise ComponentError(f"--mounts src={m.src!r}: not a PersistentVolumeClaim name")
        if dst in (o.dst_path for o in out):
            raise ComponentError(f"--mounts: two volumes mounted at {dst}")
        out.append(specs.VolumeMount(src=m.src, dst_path=dst, read_only=m.read_only))
    return out


# ------------------------------------------------------------------------------ shared options

def _opt(default: Any, help: str) -> Any:  # noqa: A002 - the help of a CLI option
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class PodOptions:
    """The options every component shares: declared once here (type, default, help). Components
    repeat the parameters in their signatures (TorchX builds the CLI from them) with these
    defaults (``image: str = OPTS.image``); :func:`component` adds the help text to their
    docstrings and :meth:`of` collects and checks them."""

    image: str = _opt(DEFAULT_IMAGE, "container image with quantcore and the jobs/ package: REPO:TAG, "
                      "or REPO@sha256:DIGEST to pin the exact build; `latest` and untagged references are "
                      "refused")
    gpus: int = _opt(1, "GPUs per container (per node), one rank each: with more than 1, the command "
                     "runs under torchrun (jobs.torchrun), one data-parallel rank per GPU; 0: CPU only. Pods "
                     "with GPUs tolerate the nvidia.com/gpu:NoSchedule taint")
    cpu: int = _opt(8, "CPU cores per container, at least 1 (Kubernetes limit; the request is 100m lower)")
    memMB: int = _opt(32768, f"memory in MB per container, at least {MIN_MEM_MB} (Kubernetes limit; the "
                      f"request is 1024 MB lower)")
    cache_gb: int = _opt(16, "GiB of node-local disk at /cache, an emptyDir of that sizeLimit (model "
                         "weights: TORCH_HOME/HF_HOME, and the zip shard cache when cache_dir is under "
                         "/cache); the pod requests and is limited to cache_gb + 5 GiB of ephemeral "
                         "storage (4 for /tmp, 1 for logs) and is evicted if it writes more")
    s3_endpoint: Optional[str] = _opt(None, "S3 endpoint URL for MinIO/Ceph etc., exported as "
                                      "AWS_ENDPOINT_URL; unset: AWS")
    s3_secret: Optional[str] = _opt(None, "name of a Kubernetes Secret (same namespace) with "
                                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; jobs.launch reads it at "
                                    "start-up (the pod's service account needs `get` on it) unless the "
                                    "credentials are already in the environment. Unset: the pod mounts no "
                                    "service-account token")
    env: Optional[str] = _opt(None, "extra environment variables, K1=V1,K2=V2")
    mounts: Optional[List[str]] = _opt(None, "PersistentVolumeClaims to mount, "
                                       "type=volume,src=PVC_NAME,dst=/data[,readonly] (more: repeat from "
                                       "type=volume); host paths (type=bind) and devices are refused, the "
                                       "namespace enforces the restricted Pod Security profile")
    image_pull_secrets: Optional[List[str]] = _opt(None, "docker-registry Secrets (same namespace) to pull a "
                                                   "private image with, comma-separated")
    tolerations: Optional[List[str]] = _opt(None, "extra tolerations, comma-separated KEY[=VALUE][:EFFECT] "
                                            "(kubectl taint syntax; no value: any value, no effect: every "
                                            "effect), e.g. dedicated=ml:NoSchedule")
    node_selector: Optional[str] = _opt(None, "node labels the pods must match, K=V,K2=V2 (e.g. "
                                                   "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3); the GPU "
                                                   "request alone already keeps pods with GPUs on GPU nodes")
    labels: Optional[str] = _opt(None, "labels of the Volcano Job and its pods, K=V,K2=V2 (e.g. "
                                            "team=vision; kueue.x-k8s.io/queue-name only matters with Kueue's "
                                            "pod integration)")
    annotations: Optional[str] = _opt(None, "annotations of the Volcano Job and its pods, K=V,K2=V2")
    deadline_s: int = _opt(0, "activeDeadlineSeconds of every pod: the kubelet stops a pod that runs longer, "
                           "which counts as an infrastructure failure (restarted while max_retries last, so "
                           "the bound is per attempt); 0: no deadline")
    max_retries: int = _opt(2, "times Volcano restarts the whole job after an infrastructure failure (a pod "
                            "evicted, or failed with any exit status but 2); exit status 2, a user error (bad "
                            "recipe, URI, data, Secret), ends the job at once, without retries")

    @classmethod
    def of(cls, args: Mapping[str, Any]) -> "PodOptions":
        """The shared options among a component's arguments (its ``locals()`` on entry), checked;
        new lists and dicts, the caller's are never kept."""
        opts = cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)})
        # the K=V options arrive as text from the CLI (see _key_values) and leave as dicts
        opts = dataclasses.replace(opts, **{name: _key_values(getattr(opts, name), f"--{name}") for name in
                                            ("env", "node_selector", "labels", "annotations")})
        for name, low, why in (("gpus", 0, ""), ("cpu", 1, " (CPU cores of the container's limit)"),
                               ("memMB", MIN_MEM_MB, " (the memory limit; the pod requests 1024 MB less)"),
                               ("deadline_s", 0, ""), ("max_retries", 0, "")):
            if getattr(opts, name) < low:
                raise ComponentError(f"--{name} must be >= {low}{why}, got {getattr(opts, name)}")
        if opts.cache_gb < 1:
            raise ComponentError(f"--cache_gb must be >= 1 (/cache holds the model weights), got {opts.cache_gb}")
        parse_pvc_mounts(opts.mounts)
        parse_tolerations(opts.tolerations)
        if opts.s3_endpoint is not None and not S3_ENDPOINT.match(str(opts.s3_endpoint)):
            raise ComponentError(f"--s3_endpoint {opts.s3_endpoint!r}: not an endpoint URL (http(s)://host[:port][/path], "
                                 f"as the Helm chart's s3.endpoint)")
        bad_env = [k for k in (opts.env or {}) if not ENV_NAME.match(str(k))]
        if bad_env:
            raise ComponentError(f"--env: {bad_env[0]!r} is not an environment variable name (letters, digits, '_', "
                                 f"'.' and '-', not starting with a digit)")
        for var in ENDPOINT_ENVS:
            val = (opts.env or {}).get(var)
            if val is not None and not S3_ENDPOINT.match(str(val)):
                raise ComponentError(f"--env {var}={val!r}: not an endpoint URL (http(s)://host[:port][/path])")
        reserved = [k for k in (opts.labels or {})
                    if str(k).strip().startswith(RESERVED_LABEL_PREFIXES) or str(k).strip() in RESERVED_LABELS]
        if reserved:
            raise ComponentError(f"--labels: {reserved[0]!r} is set by TorchX or Volcano, which select the job's pods "
                                 f"by it; choose another key")
        for flag, var, given in (("--s3_endpoint", ENDPOINT_ENV, opts.s3_endpoint), ("--s3_secret", SECRET_ENV,
                                                                                   opts.s3_secret)):
            if given and var in (opts.env or {}):  # one value only: which would win is not obvious
                raise ComponentError(f"--env sets {var}, which {flag} sets too; give it once")
        pull_secrets = _as_list(opts.image_pull_secrets, "--image_pull_secrets")
        secrets = [("--image_pull_secrets", n) for n in pull_secrets]
        if opts.s3_secret:
            secrets.append(("--s3_secret", opts.s3_secret))
        for flag, name in secrets:
            if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
                raise ComponentError(f"{flag}: {name!r} is not a Secret name")
        return dataclasses.replace(
            opts, image=check_image(opts.image), env=dict(opts.env or {}), mounts=_as_list(opts.mounts, "--mounts"),
            image_pull_secrets=pull_secrets, tolerations=_as_list(opts.tolerations, "--tolerations"),
            node_selector=_string_map(opts.node_selector, "--node_selector", label_values=True),
            labels=_string_map(opts.labels, "--labels", label_values=True),
            annotations=_string_map(opts.annotations, "--annotations", label_values=False))

    def volume_mounts(self) -> List[specs.VolumeMount]:
        """The PersistentVolumeClaim mounts (see :func:`parse_pvc_mounts`)."""
        return parse_pvc_mounts(self.mounts)

    def environment(self) -> Dict[str, str]:
        """A new env dict: the extra variables, then the S3 endpoint and the Secret name."""
        out = {str(k): str(v) for k, v in (self.env or {}).items()}
        out.setdefault("PYTHONUNBUFFERED", "1")
        if self.s3_endpoint:
            out[ENDPOINT_ENV] = self.s3_endpoint
        if self.s3_secret:
            out[SECRET_ENV] = self.s3_secret
        return out


OPTS = PodOptions()  # the defaults, for the components' signatures
#: Shared options a component does not take because they cannot apply to it (export runs on CPU).
OPTIONS_NOT_TAKEN: Dict[str, Tuple[str, ...]] = {"export": ("gpus",)}


def component(fn: Callable[..., specs.AppDef]) -> Callable[..., specs.AppDef]:
    """Add the help of the :class:`PodOptions` the component takes to its docstring's ``Args:``
    (after the component's own; an option the docstring documents itself keeps its own text)."""
    doc = fn.__doc__ or ""
    documented = set(re.findall(r"^ {8}(\w+):", doc, flags=re.M))
    lines = [f"        {f.name}: {f.metadata['help']}" for f in dataclasses.fields(PodOptions)
             if f.name not in documented]
    fn.__doc__ = doc.rstrip() + "\n" + "\n".join(lines) + "\n    "
    return fn


# ------------------------------------------------------------------------------ Kubernetes

@dataclasses.dataclass
class QuantcoreRole(specs.Role):
    """A :class:`torchx.specs.Role` that completes its pods on ``-s kubernetes``.

    Why a Role and its ``pre_proc``: TorchX 0.7's kubernetes scheduler has no pod overlay (it
    emits ``securityContext: {}``, no tolerations, no pull secrets, ...), and ``Role.pre_proc`` is
    TorchX's own hook for changing the scheduler request: ``Scheduler.submit_dryrun`` calls it for
    every role, and both ``torchx run`` (which submits ``dryrun_info.request``) and ``torchx run
    --dryrun`` (which prints it) go through ``submit_dryrun``. So what ``--dryrun`` shows is what
    is submitted, with no scheduler to register (a scheduler entry point would replace TorchX's
    whole scheduler table and need ``jobs`` installed as a package) and no patching of TorchX.
    Other schedulers (local_cwd, local_docker) get the role unchanged.
    """

    pod: PodOptions = dataclasses.field(default_factory=PodOptions)
    cache_dir: Optional[str] = None  # quantcore --cache-dir: must be on a writable volume of the pod
    grace_s: int = 0  # the pods' terminationGracePeriodSeconds; 0: Kubernetes' default (30 s)
    # (option, URI, written): the data, checkpoint and out URIs; on Kubernetes a local path must lie
    # on a mounted PersistentVolumeClaim (a writable one for out), as the Helm chart checks
    paths: Tuple[Tuple[str, Optional[str], bool], ...] = ()
    # quantcore --no-resume: each retry of the job (Volcano, docker) would delete the checkpoints the
    # run wrote; local_cwd does not retry
    starts_over: bool = False

    def pre_proc(self, scheduler: str, dryrun_info: specs.AppDryRunInfo) -> specs.AppDryRunInfo:
        if self.starts_over and self.max_retries and scheduler != "local":
            raise ComponentError(f"--resume False with --max_retries {self.max_retries} on -s {scheduler}: every "
                                 f"retry of the job would delete the checkpoints it wrote and start over; set "
                                 f"--max_retries 0, or keep resuming and give a new --out")
        if scheduler == "kubernetes":
            complete_volcano_job(dryrun_info.request.resource, self)
        elif scheduler in NOT_APPLIED:
            check_options_apply(self.pod, scheduler)
        return dryrun_info


#: The shared options a local scheduler does not apply, by the scheduler's backend name (TorchX's
#: local_cwd, backend "local", runs processes from the working directory; local_docker, backend
#: "docker", runs the image with its CPU, memory, mounts and retries).
NOT_APPLIED: Dict[str, Tuple[str, ...]] = {
    "local": ("image", "cpu", "memMB", "cache_gb", "mounts", "image_pull_secrets", "tolerations",
              "node_selector", "labels", "annotations", "deadline_s", "max_retries"),
    "docker": ("cache_gb", "image_pull_secrets", "tolerations", "node_selector", "labels", "annotations",
               "deadline_s"),
}
_SCHEDULER_NAMES = {"local": "local_cwd", "docker": "local_docker"}


def check_options_apply(pod: PodOptions, scheduler: str) -> None:
    """Refuse shared options given with another value than their default that ``scheduler`` does not
    apply (a deadline, a mount, a node selector silently ignored would look like it worked)."""
    default = PodOptions()
    given = [name for name in NOT_APPLIED[scheduler]
             if (getattr(pod, name) or None) != (getattr(default, name) or None)
             and not (name == "max_retries" and pod.max_retries == 0)]  # no retries is what local_cwd does
    if given:
        name = _SCHEDULER_NAMES.get(scheduler, scheduler)
        raise ComponentError(f"{', '.join('--' + g for g in given)}: {'does' if len(given) == 1 else 'do'} not apply on "
                             f"-s {name} (Kubernetes pod settings); remove {'it' if len(given) == 1 else 'them'} "
                             f"for this scheduler, or run with -s kubernetes")


def _local_path(flag: str, uri: str) -> Optional[str]:
    """The path a pod's quantcore reads for a local path or ``file:`` URI (every spelling
    :mod:`quantcore.io.uri` takes), None for S3. A relative path or another scheme is refused: in the
    pod it would name the image's read-only working directory (or nothing at all)."""
    from quantcore.io.uri import UriError, local_path, scheme_of

    try:
        if scheme_of(uri) == "s3":
            return None
        path = local_path(uri)
    except UriError as err:
        raise ComponentError(f"{flag}: {err}") from None
    if not posixpath.isabs(path):
        raise ComponentError(f"{flag} {uri!r}: a relative path; in the pod it names the image's read-only working "
                             f"directory, which holds no data or runs: give an absolute path on a --mounts "
                             f"PersistentVolumeClaim, or an s3:// URI")
    return path


def check_pod_paths(paths: Tuple[Tuple[str, Optional[str], bool], ...], mounts: List[specs.VolumeMount]) -> None:
    """Each local path of ``paths`` must lie on a mounted PersistentVolumeClaim, and one written to on
    a writable one: the pod's root filesystem is read-only and its emptyDirs start empty and vanish
    with it (the Helm chart's quantcore.checkLocalPath)."""
    for flag, uri, write in paths:
        if not uri:
            continue  # an option not given
        path = _local_path(flag, uri)
        if path is None:
            continue
        path = posixpath.normpath(path)
        on = [m for m in mounts if path == m.dst_path or path.startswith(m.dst_path.rstrip("/") + "/")]
        if not on:
            mounted = ", ".join(m.dst_path for m in mounts) or "none"
            raise ComponentError(f"{flag} {uri!r}: a local path, but no PersistentVolumeClaim is mounted above it "
                                 f"(mounted: {mounted}); add --mounts type=volume,src=PVC,dst=/mnt/... holding it, or "
                                 f"use an s3:// URI")
        vol = max(on, key=lambda m: len(m.dst_path))
        if write and vol.read_only:
            raise ComponentError(f"{flag} {uri!r}: written to the PersistentVolumeClaim {vol.src}, which --mounts "
                                 f"mounts readonly at {vol.dst_path}; drop readonly from that mount")


def _splits(**given: Optional[str]) -> None:
    """Refuse an empty or blank split name (``--eval_split ''``): the pod would fail looking for class
    folders directly under the dataset root."""
    for name, value in given.items():
        if value is not None and not str(value).strip():
            raise ComponentError(f"--{name}: empty split name; give one such as train, val or test")


def _limit_and_batch(limit: int, batch_size: int) -> None:
    if limit < 0:
        raise ComponentError(f"--limit must be >= 0 (0: the whole split), got {limit}")
    if batch_size < 1:
        raise ComponentError(f"--batch_size must be >= 1, got {batch_size}")


def _unique_recipes(recipes: List[str]) -> None:
    """The same recipe twice would write one output folder twice: quantcore refuses it in the pod."""
    names = [n.strip() for r in recipes for n in r.split(",")]  # quantcore reads --recipe a,b as two
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ComponentError(f"--recipe: {', '.join(dupes)} given more than once; each recipe once per run")


def _uris(**given: Optional[str]) -> None:
    """Refuse an empty or blank URI (``--data ''``): quantcore would read or write the working directory."""
    for name, value in given.items():
        if value is not None and not str(value).strip():
            raise ComponentError(f"--{name}: empty URI; give an s3:// URI or a path")


def _check_layout(layout: str) -> str:
    key = str(layout).lower().replace("_", "-")
    if key not in LAYOUTS:
        raise ComponentError(f"--layout {layout!r}: give one of {', '.join(LAYOUTS)}")
    return key


def _role(role: specs.Role, pod: PodOptions, cache_dir: Optional[str] = None, grace_s: int = 0,
          paths: Tuple[Tuple[str, Optional[str], bool], ...] = (), **changes: Any) -> QuantcoreRole:
    """``role`` as a :class:`QuantcoreRole` (a new object), with ``changes`` applied."""
    fields = {f.name: getattr(role, f.name) for f in dataclasses.fields(specs.Role)}
    fields.update(changes)
    return QuantcoreRole(**fields, pod=pod, cache_dir=cache_dir, grace_s=grace_s, paths=paths)


def _writable(path: str, mounts: List[specs.VolumeMount]) -> bool:
    path = posixpath.normpath(path)
    roots = list(SCRATCH.values()) + [m.dst_path for m in mounts if not m.read_only]
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def volcano_policies(max_retries: int) -> List[Dict[str, Any]]:
    """Task lifecycle policies: exit status 2 (a user error) terminates the job; with retries, an
    evicted or otherwise failed pod restarts it (TorchX's RetryPolicy.APPLICATION). Volcano takes
    the first policy that matches a pod's event or its container's exit code, so order matters."""
    rules: List[Dict[str, Any]] = [{"exitCode": USER_ERROR_EXIT, "action": "TerminateJob"}]
    if max_retries > 0:
        rules += [{"event": "PodEvicted", "action": "RestartJob"}, {"event": "PodFailed", "action": "RestartJob"}]
    return rules


def _add_metadata(meta: Dict[str, Any], pod: PodOptions) -> None:
    for key, extra in (("labels", pod.labels), ("annotations", pod.annotations)):
        if extra:
            meta[key] = {**meta.get(key, {}), **extra}


def complete_volcano_job(job: Dict[str, Any], role: QuantcoreRole) -> None:
    """Complete, in place, the Volcano Job TorchX built (``KubernetesJob.resource``) for ``role``'s tasks.

    Job: ``role.pod.labels``/``annotations`` in its metadata. Each of the role's tasks (matched
    by TorchX's role-name label): lifecycle :func:`volcano_policies`; its pod template (turned into
    a plain dict) gets the ``restricted`` pod and container security context of the Helm chart's
    pods (uid/gid 10001, fsGroup, RuntimeDefault seccomp, read-only root filesystem, no privilege
    escalation, all capabilities dropped), emptyDirs at /tmp (4 GiB) and /cache (``cache_gb``)
    with the matching ephemeral-storage request and limit, the GPU toleration when it has GPUs
    plus ``tolerations``, ``node_selector``, ``image_pull_secrets``, the job's
    ``priorityClassName`` (``-cfg priority_class``), ``activeDeadlineSeconds`` (``deadline_s``),
    ``terminationGracePeriodSeconds`` (``role.grace_s``), no service links, and a service-account
    token only when ``s3_secret`` needs one.
    """
    from torchx.schedulers.kubernetes_scheduler import LABEL_ROLE_NAME, sanitize_for_serialization

    pod = role.pod
    if role.cache_dir and not _writable(role.cache_dir, pod.volume_mounts()):
        raise ComponentError(f"--cache_dir {role.cache_dir}: not on a writable volume of the pod (its root "
                             f"filesystem is read-only): use a path under /cache (sized by --cache_gb) or "
                             f"under a writable --mounts PersistentVolumeClaim")
    check_pod_paths(role.paths, pod.volume_mounts())
    _add_metadata(job.setdefault("metadata", {}), pod)
    spec = job["spec"]
    gb = f"{pod.cache_gb + TMP_GB + LOG_GB}Gi"
    for task in spec["tasks"]:
        tmpl = sanitize_for_serialization(task["template"])
        tmeta = tmpl.setdefault("metadata", {})
        if tmeta.get("labels", {}).get(LABEL_ROLE_NAME) != role.name:
            continue
        task["template"] = tmpl
        task["policies"] = volcano_policies(role.max_retries)
        _add_metadata(tmeta, pod)
        ps = tmpl["spec"]
        if any("hostPath" in v for v in ps.get("volumes", [])):
            raise ComponentError(f"role {role.name}: hostPath volumes are not allowed (use --mounts type=volume)")
        ps["securityContext"] = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                                 "fsGroup": RUN_AS, "fsGroupChangePolicy": "OnRootMismatch",
                                 "seccompProfile": {"type": "RuntimeDefault"}}
        ps["automountServiceAccountToken"] = bool(pod.s3_secret)  # jobs.launch reads the Secret via the API
        ps["enableServiceLinks"] = False
        for v in ps.get("volumes", []):  # TorchX's /dev/shm: unbounded memory of the container
            if v.get("name") == "dshm" and v.get("emptyDir", {}).get("medium") == "Memory":
                v["emptyDir"]["sizeLimit"] = f"{pod.memMB // 2}Mi"  # half the container's memory
        ps["volumes"] = ps.get("volumes", []) + [
            {"name": "tmp", "emptyDir": {"sizeLimit": f"{TMP_GB}Gi"}},
            {"name": "cache", "emptyDir": {"sizeLimit": f"{pod.cache_gb}Gi"}}]
        tolerations = ([dict(GPU_TOLERATION)] if role.resource.gpu > 0 else []) + parse_tolerations(pod.tolerations)
        if tolerations:
            ps["tolerations"] = tolerations
        selector = {**ps.get("nodeSelector", {}), **pod.node_selector}
        if selector:
            ps["nodeSelector"] = selector
        else:
            ps.pop("nodeSelector", None)
        if pod.image_pull_secrets:
            ps["imagePullSecrets"] = [{"name": s} for s in pod.image_pull_secrets]
        if spec.get("priorityClassName"):
            ps["priorityClassName"] = spec["priorityClassName"]
        if pod.deadline_s:
            ps["activeDeadlineSeconds"] = pod.deadline_s
        if role.grace_s:
            ps["terminationGracePeriodSeconds"] = role.grace_s
        for c in ps["containers"]:
            c["securityContext"] = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                                    "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                    "privileged": False, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}}
            # The kubelet expands $(VAR) in command and args ($$ is its escape for $); TorchX has already
            # applied its own macros, so what is left is meant literally, as on the local scheduler: a
            # data or out URI with "$(" must not become another value (or another user's Secret).
            for key in ("command", "args"):
                if c.get(key):
                    c[key] = [a.replace("$", "$$") for a in c[key]]
            for e in c.get("env") or []:  # the kubelet expands $(VAR) in env values too: --env is literal
                if e.get("name") in (pod.env or {}) and isinstance(e.get("value"), str):
                    e["value"] = e["value"].replace("$", "$$")
            # a tag may move (the node must not run a stale copy); a digest is immutable
            c["imagePullPolicy"] = "IfNotPresent" if "@sha256:" in c.get("image", "") else "Always"
            c["volumeMounts"] = c.get("volumeMounts", []) + [
                {"name": name, "mountPath": path} for name, path in SCRATCH.items()]
            res = c.setdefault("resources", {})
            res["requests"] = {**res.get("requests", {}), "ephemeral-storage": gb}
            res["limits"] = {**res.get("limits", {}), "ephemeral-storage": gb}


# ------------------------------------------------------------------------------ components

def _common_flags(workers: int, gpus: int, cache_dir: Optional[str], skip_bad: bool, layout: str) -> List[str]:
    flags = ["--workers", str(workers), "--device", "cuda" if gpus > 0 else "cpu", "--no-progress"]
    if _check_layout(layout) != "auto":
        flags += ["--layout", layout]
    if cache_dir:
        flags += ["--cache-dir", cache_dir]
    if skip_bad:
        flags.append("--skip-bad")
    return flags


def _check_workers(workers: int) -> None:
    if workers < 0:
        raise ComponentError(f"--workers must be >= 0, got {workers}")


def _app(command: str, cli_args: List[str], pod: PodOptions, cache_dir: Optional[str],
         paths: Tuple[Tuple[str, Optional[str], bool], ...] = ()) -> specs.AppDef:
    """One container: ``python -m jobs.launch quantcore COMMAND ARGS``; with ``gpus`` > 1 one rank per
    GPU, as the Helm chart's Jobs: ``... jobs.launch python -m jobs.torchrun --standalone
    --nproc_per_node GPUS --max_restarts 0 -m quantcore.cli COMMAND ARGS`` (calibrate, evaluate and
    ptq are data-parallel under torchrun; jobs.torchrun keeps a rank's exit 2). No in-place
    restarts: there is no checkpoint to resume from, Volcano's retries (max_retries) restart the job."""
    cli = ["quantcore", command] + cli_args
    if pod.gpus > 1:
        cli = TORCHRUN + ["--standalone", "--nproc_per_node", str(pod.gpus), "--max_restarts", "0",
                          "-m", "quantcore.cli", command] + cli_args
    role = QuantcoreRole(
        name=command,
        image=pod.image,
        entrypoint=LAUNCHER[0],
        args=LAUNCHER[1:] + cli,
        num_replicas=1,
        resource=specs.Resource(cpu=pod.cpu, gpu=pod.gpus, memMB=pod.memMB),
        env=pod.environment(),
        max_retries=pod.max_retries,
        retry_policy=specs.RetryPolicy.APPLICATION,
        mounts=pod.volume_mounts(),
        pod=pod,
        cache_dir=cache_dir,
        paths=paths,
    )
    return specs.AppDef(name=f"quantcore-{command}", roles=[role])


def _torchrun_app(app: specs.AppDef, name: str, pod: PodOptions, torchrun_opts: List[str],
                  cache_dir: Optional[str] = None, grace_s: int = 0,
                  paths: Tuple[Tuple[str, Optional[str], bool], ...] = ()) -> specs.AppDef:
    """torchx.components.dist.ddp's app with its ``torchrun`` replaced by ``jobs.launch`` +
    ``jobs.torchrun`` (``torchrun_opts`` put first) and our PVC mounts."""
    (role,) = app.roles
    shell, torchrun_cmd = role.args
    if role.entrypoint != "bash" or shell != "-c" or not torchrun_cmd.startswith("torchrun "):
        raise RuntimeError(f"unexpected torchx.components.dist.ddp command: {role.entrypoint} {role.args}")
    # `exec` keeps one process tree: bash expands the rank-0 host, jobs.launch loads the Secret and
    # execs jobs.torchrun, which is torchrun keeping a rank's exit 2 (user error) as the container's
    # status, not restarting after it, and running each rank through its per-rank shim.
    launch = " ".join(shlex.quote(a) for a in LAUNCHER + TORCHRUN + torchrun_opts)
    cmd = f"exec {launch} {torchrun_cmd[len('torchrun '):]}"
    new = _role(role, pod, cache_dir, grace_s, paths, name=name, args=["-c", cmd],
                retry_policy=specs.RetryPolicy.APPLICATION, mounts=pod.volume_mounts())
    return specs.AppDef(name=app.name, roles=[new], metadata=dict(app.metadata))


@component
def calibrate(
    recipe: List[str],
    data: str,
    out: str,
    split: str = "train",
    checkpoint: Optional[str] = None,
    layout: str = "auto",
    workers: int = 4,
    cache_dir: Optional[str] = None,
    skip_bad: bool = False,
    image: str = OPTS.image,
    gpus: int = OPTS.gpus,
    cpu: int = OPTS.cpu,
    memMB: int = OPTS.memMB,
    cache_gb: int = OPTS.cache_gb,
    s3_endpoint: Optional[str] = OPTS.s3_endpoint,
    s3_secret: Optional[str] = OPTS.s3_secret,
    env: Optional[str] = OPTS.env,
    mounts: Optional[List[str]] = OPTS.mounts,
    image_pull_secrets: Optional[List[str]] = OPTS.image_pull_secrets,
    tolerations: Optional[List[str]] = OPTS.tolerations,
    node_selector: Optional[str] = OPTS.node_selector,
    labels: Optional[str] = OPTS.labels,
    annotations: Optional[str] = OPTS.annotations,
    deadline_s: int = OPTS.deadline_s,
    max_retries: int = OPTS.max_retries,
) -> specs.AppDef:
    """Calibrate recipes on a dataset: `quantcore calibrate` in one container (one replica).

    Writes <out>/<recipe>/model.qc.pt, encodings.json, ranges.png and report.json for every
    recipe, without evaluating them (use the ptq component for calibration + evaluation). With
    gpus > 1 the container runs one rank per GPU under jobs.torchrun: each rank calibrates on its
    share of the images, the statistics are merged exactly and rank 0 writes.

    Args:
        recipe: recipe(s) to calibrate, comma-separated: built-in names, YAML paths inside the
            image, or s3:// URIs; all must describe the same model
        data: calibration dataset URI (s3://bucket/prefix or a path inside the container)
        out: output URI prefix for checkpoints, encodings and reports (s3://bucket/prefix)
        split: dataset split to draw the calibration images from
        checkpoint: FP32 weights URI (s3:// or path) overriding the recipe's model weights
        layout: dataset layout (quantcore --layout): auto, folder (ImageNet class folders), zip (zip
            shards), resisc; auto detects it
        workers: DataLoader worker processes decoding images (quantcore --workers)
        cache_dir: local directory caching remote zip shards (quantcore --cache-dir), e.g.
            /cache/shards (on Kubernetes: under /cache, see cache_gb, or on a writable mount); unset: no cache
        skip_bad: skip corrupt or missing images and list them in the report instead of failing
    """
    pod = PodOptions.of(locals())
    _check_workers(workers)
    _uris(data=data, out=out, checkpoint=checkpoint)
    _splits(split=split)
    recipes = _as_list(recipe, "--recipe")
    if not recipes:
        raise ComponentError("--recipe: at least one recipe is needed")
    _unique_recipes(recipes)
    args: List[str] = []
    for r in recipes:
        args += ["--recipe", r]
    args += ["--data", data, "--split", split, "--out", out]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    args += _common_flags(workers, pod.gpus, cache_dir, skip_bad, layout)
    return _app("calibrate", args, pod, cache_dir,
                (("--data", data, False), ("--checkpoint", checkpoint, False), ("--out", out, True)))


@component
def evaluate(
    checkpoint: str,
    data: str,
    out: str,
    split: str = "val",
    limit: int = 0,
    batch_size: int = 64,
    layout: str = "auto",
    workers: int = 4,
    cache_dir: Optional[str] = None,
    skip_bad: bool = False,
    image: str = OPTS.image,
    gpus: int = OPTS.gpus,
    cpu: int = OPTS.cpu,
    memMB: int = OPTS.memMB,
    cache_gb: int = OPTS.cache_gb,
    s3_endpoint: Optional[str] = OPTS.s3_endpoint,
    s3_secret: Optional[str] = OPTS.s3_secret,
    env: Optional[str] = OPTS.env,
    mounts: Optional[List[str]] = OPTS.mounts,
    image_pull_secrets: Optional[List[str]] = OPTS.image_pull_secrets,
    tolerations: Optional[List[str]] = OPTS.tolerations,
    node_selector: Optional[str] = OPTS.node_selector,
    labels: Optional[str] = OPTS.labels,
    annotations: Optional[str] = OPTS.annotations,
    deadline_s: int = OPTS.deadline_s,
    max_retries: int = OPTS.max_retries,
) -> specs.AppDef:
    """Evaluate a calibrated checkpoint against its own float path: `quantcore evaluate`, one replica.

    Writes <out>/report.json, report.md and per_class.png (quantized vs. FP32 top-1/top-5,
    agreement, logit SQNR). With gpus > 1 the container runs one rank per GPU under
    jobs.torchrun: the split is sharded over the ranks, the results merged and rank 0 writes.

    Args:
        checkpoint: calibrated checkpoint URI (<calibrate out>/<recipe>/model.qc.pt)
        data: evaluation dataset URI (s3://bucket/prefix or a path inside the container)
        out: output URI prefix for the report (s3://bucket/prefix)
        split: dataset split to evaluate on
        limit: evaluate on a seeded, class-stratified sample of N images; 0 evaluates the whole split
        batch_size: evaluation batch size
        layout: dataset layout (quantcore --layout): auto, folder (ImageNet class folders), zip (zip
            shards), resisc; auto detects it
        workers: DataLoader worker processes decoding images (quantcore --workers)
        cache_dir: local directory caching remote zip shards (quantcore --cache-dir), e.g.
            /cache/shards (on Kubernetes: under /cache, see cache_gb, or on a writable mount); unset: no cache
        skip_bad: skip corrupt or missing images and list them in the report instead of failing
    """
    pod = PodOptions.of(locals())
    _check_workers(workers)
    _uris(checkpoint=checkpoint, data=data, out=out)
    _splits(split=split)
    _limit_and_batch(limit, batch_size)
    args = ["--checkpoint", checkpoint, "--data", data, "--split", split, "--out", out,
            "--batch-size", str(batch_size)]
    if limit:
        args += ["--limit", str(limit)]
    args += _common_flags(workers, pod.gpus, cache_dir, skip_bad, layout)
    return _app("evaluate", args, pod, cache_dir,
                (("--checkpoint", checkpoint, False), ("--data", data, False), ("--out", out, True)))


@component
def export(
    checkpoint: str,
    out: str,
    format: str = "all",  # noqa: A002 - the CLI option's name
    opset: int = 0,
    check_data: Optional[str] = None,
    check_split: Optional[str] = None,
    check_limit: int = 0,
    check_skip_bad: bool = False,
    image: str = OPTS.image,
    cpu: int = OPTS.cpu,
    memMB: int = OPTS.memMB,
    cache_gb: int = OPTS.cache_gb,
    s3_endpoint: Optional[str] = OPTS.s3_endpoint,
    s3_secret: Optional[str] = OPTS.s3_secret,
    env: Optional[str] = OPTS.env,
    mounts: Optional[List[str]] = OPTS.mounts,
    image_pull_secrets: Optional[List[str]] = OPTS.image_pull_secrets,
    tolerations: Optional[List[str]] = OPTS.tolerations,
    node_selector: Optional[str] = OPTS.node_selector,
    labels: Optional[str] = OPTS.labels,
    annotations: Optional[str] = OPTS.annotations,
    deadline_s: int = OPTS.deadline_s,
    max_retries: int = OPTS.max_retries,
) -> specs.AppDef:
    """Export a calibrated checkpoint for deployment: `quantcore export`, one replica, no GPU.

    Writes <out>/model.onnx (QuantizeLinear/DequantizeLinear, TensorRT's explicit-quantization layout),
    model_float.onnx + model.encodings (AIMET 2.0.0), trt_ranges.json/.cache and export_report.json.

    Args:
        checkpoint: calibrated checkpoint URI (PTQ or QAT model.qc.pt)
        out: output URI prefix (s3://bucket/prefix)
        format: onnx, aimet, trt-table, a comma-separated list, or all
        opset: ONNX opset 13..21; 0 = quantcore's default (17, or 21 when a 4/16-bit quantizer needs it)
        check_data: dataset URI whose images run through onnxruntime and the fake-quant model
        check_split: split of check_data (default val, as evaluate)
        check_limit: check on a seeded, class-stratified sample of N images of check_data; 0 = the whole split
        check_skip_bad: skip undecodable images of check_data and list them in the export report
    """
    pod = PodOptions.of({**locals(), "gpus": 0})  # OPTIONS_NOT_TAKEN: no GPU
    if check_limit < 0:
        raise ComponentError(f"--check_limit must be >= 0, got {check_limit}")
    lo, hi = EXPORT_OPSETS
    if opset and not lo <= opset <= hi:
        raise ComponentError(f"--opset {opset}: give {lo}..{hi}, or 0 for quantcore's default")
    items = [i.strip() for i in format.split(",") if i.strip()]  # as quantcore.export.run.parse_formats
    if items != ["all"] and (not items or any(i not in EXPORT_FORMATS for i in items)):
        raise ComponentError(f"--format {format!r}: give one of {list(EXPORT_FORMATS)}, a comma-separated list of "
                             f"them, or all")
    _uris(checkpoint=checkpoint, out=out, check_data=check_data)
    _splits(check_split=check_split)
    if not check_data and (check_split or check_limit or check_skip_bad):
        raise ComponentError("--check_split, --check_limit and --check_skip_bad apply to the images of --check_data: "
                             "set --check_data, or remove them")
    args = [checkpoint, "--out", out, "--format", format]
    if opset:
        args += ["--opset", str(opset)]
    if check_data:
        args += ["--check-data", check_data, "--check-split", check_split or "val"]
        if check_limit:
            args += ["--check-limit", str(check_limit)]
        if check_skip_bad:
            args.append("--check-skip-bad")
    return _app("export", args, pod, None, (("--checkpoint", checkpoint, False), ("--out", out, True),
                                             ("--check_data", check_data, False)))


@component
def ptq(
    recipe: List[str],
    calib_data: str,
    out: str,
    calib_split: str = "train",
    eval_data: Optional[str] = None,
    eval_split: str = "val",
    checkpoint: Optional[str] = None,
    limit: int = 0,
    batch_size: int = 64,
    layout: str = "auto",
    workers: int = 4,
    cache_dir: Optional[str] = None,
    skip_bad: bool = False,
    image: str = OPTS.image,
    gpus: int = OPTS.gpus,
    cpu: int = OPTS.cpu,
    memMB: int = OPTS.memMB,
    cache_gb: int = OPTS.cache_gb,
    s3_endpoint: Optional[str] = OPTS.s3_endpoint,
    s3_secret: Optional[str] = OPTS.s3_secret,
    env: Optional[str] = OPTS.env,
    mounts: Optional[List[str]] = OPTS.mounts,
    image_pull_secrets: Optional[List[str]] = OPTS.image_pull_secrets,
    tolerations: Optional[List[str]] = OPTS.tolerations,
    node_selector: Optional[str] = OPTS.node_selector,
    labels: Optional[str] = OPTS.labels,
    annotations: Optional[str] = OPTS.annotations,
    deadline_s: int = OPTS.deadline_s,
    max_retries: int = OPTS.max_retries,
) -> specs.AppDef:
    """Post-training quantization end to end: `quantcore ptq` (calibrate + evaluate + report), one replica.

    Calibrates every recipe, evaluates FP32 and all variants in one pass and writes
    <out>/report.json, report.md, per_class.png and <out>/<recipe>/model.qc.pt, encodings.json.
    With gpus > 1 the container runs one rank per GPU under jobs.torchrun (calibration and
    evaluation data-parallel, rank 0 writes).

    Args:
        recipe: recipe(s) to calibrate, comma-separated: built-in names, YAML paths inside the
            image, or s3:// URIs; all must describe the same model
        calib_data: calibration dataset URI (s3://bucket/prefix or a path inside the container)
        out: output URI prefix for checkpoints, encodings and reports (s3://bucket/prefix)
        calib_split: dataset split to draw the calibration images from
        eval_data: evaluation dataset URI; unset: the calibration dataset
        eval_split: dataset split to evaluate on
        checkpoint: FP32 weights URI (s3:// or path) overriding the recipe's model weights
        limit: evaluate on a seeded, class-stratified sample of N images; 0 evaluates the whole split
        batch_size: evaluation batch size (calibration uses the recipe's)
        layout: dataset layout (quantcore --layout): auto, folder (ImageNet class folders), zip (zip
            shards), resisc; auto detects it (of both datasets)
        workers: DataLoader worker processes decoding images (quantcore --workers)
        cache_dir: local directory caching remote zip shards (quantcore --cache-dir), e.g.
            /cache/shards (on Kubernetes: under /cache, see cache_gb, or on a writable mount); unset: no cache
        skip_bad: skip corrupt or missing images and list them in the report instead of failing
    """
    pod = PodOptions.of(locals())
    _check_workers(workers)
    _uris(calib_data=calib_data, out=out, eval_data=eval_data, checkpoint=checkpoint)
    _splits(calib_split=calib_split, eval_split=eval_split)
    _limit_and_batch(limit, batch_size)
    recipes = _as_list(recipe, "--recipe")
    if not recipes:
        raise ComponentError("--recipe: at least one recipe is needed")
    _unique_recipes(recipes)
    args: List[str] = []
    for r in recipes:
        args += ["--recipe", r]
    args += ["--calib-data", calib_data, "--calib-split", calib_split,
             "--eval-data", eval_data or calib_data, "--eval-split", eval_split, "--out", out,
             "--batch-size", str(batch_size)]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    if limit:
        args += ["--limit", str(limit)]
    args += _common_flags(workers, pod.gpus, cache_dir, skip_bad, layout)
    return _app("ptq", args, pod, cache_dir,
                (("--calib_data", calib_data, False), ("--eval_data", eval_data or calib_data, False),
                 ("--checkpoint", checkpoint, False), ("--out", out, True)))


@component
def ddp(
    *script_args: str,
    m: str = "quantcore.cli",
    script: Optional[str] = None,
    nnodes: int = 1,
    min_nnodes: int = 0,
    nproc_per_node: int = 0,
    name: str = "quantcore-ddp",
    rdzv_backend: str = "c10d",
    rdzv_port: int = RDZV_PORT,
    image: str = OPTS.image,
    gpus: int = OPTS.gpus,
    cpu: int = OPTS.cpu,
    memMB: int = OPTS.memMB,
    cache_gb: int = OPTS.cache_gb,
    s3_endpoint: Optional[str] = OPTS.s3_endpoint,
    s3_secret: Optional[str] = OPTS.s3_secret,
    env: Optional[str] = OPTS.env,
    mounts: Optional[List[str]] = OPTS.mounts,
    image_pull_secrets: Optional[List[str]] = OPTS.image_pull_secrets,
    tolerations: Optional[List[str]] = OPTS.tolerations,
    node_selector: Optional[str] = OPTS.node_selector,
    labels: Optional[str] = OPTS.labels,
    annotations: Optional[str] = OPTS.annotations,
    deadline_s: int = OPTS.deadline_s,
    max_retries: int = OPTS.max_retries,
) -> specs.AppDef:
    """Data-parallel launch on several GPUs and nodes with torchrun (through jobs.torchrun).

    Built on torchx.components.dist.ddp: nnodes containers (one Volcano gang) each run
    `python -m jobs.launch python -m jobs.torchrun ... -m MODULE ARGS` (S3 credentials are loaded
    once per node, then torchrun starts nproc_per_node ranks with RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT set; rank 0's host is the c10d rendezvous point). jobs.torchrun
    keeps a rank's exit status 2 (user error: the job ends, no retry), expands $RANK, $LOCAL_RANK,
    $GROUP_RANK, $WORLD_SIZE and $LOCAL_WORLD_SIZE in ARGS for each rank (quote them for your
    shell: --out 's3://b/o/rank_$RANK') and makes cuda:LOCAL_RANK each rank's default CUDA device.
    The default module is the quantcore CLI, whose calibrate, evaluate and ptq commands are
    data-parallel under torchrun: calibration statistics are merged exactly, evaluation is
    sharded and merged, rank 0 writes (e.g. `-- evaluate --checkpoint C --data D --out O --device
    cuda` splits a 50k-image validation set over the ranks, one GPU each); on one node the
    calibrate, evaluate and ptq components with gpus > 1 do the same. For QAT use the qat
    component. Example: torchx run -s kubernetes -cfg queue=default jobs/components.py:ddp
    --nnodes 2 --gpus 4 -- evaluate --checkpoint s3://b/run/model.qc.pt --data s3://b/imagenet
    --out s3://b/eval --device cuda

    Args:
        script_args: arguments for the module or script (after `--` on the command line)
        m: python module each rank runs (python -m M); ignored when --script is given
        script: python script (path inside the image, relative to its working directory) each
            rank runs instead of a module
        nnodes: number of nodes (containers); with min_nnodes < nnodes the job is elastic
        min_nnodes: minimum number of nodes for an elastic job; 0 means nnodes (fixed size)
        nproc_per_node: processes (ranks) per node; 0: one per GPU (gpus), or 1 when gpus is 0.
            With gpus > 0 it must equal gpus (each rank uses its own GPU, cuda:LOCAL_RANK)
        name: job name: lower-case letters, digits and '-', starting with a letter; on Kubernetes
            at most 40 characters with nnodes <= 10 (the Volcano Job, its Service and the pods are
            named after it, see the error for other nnodes)
        rdzv_backend: torchrun rendezvous backend (c10d, or static with fixed node ranks)
        rdzv_port: port of the c10d rendezvous store on rank 0's host (multi-node only)
        gpus: GPUs per node, one rank each (0: CPU ranks with the gloo backend, chosen by the
            script); each rank gets cuda:LOCAL_RANK as its default device
    """
    from torchx.components import dist

    pod = PodOptions.of(locals())
    if nnodes < 1:
        raise ComponentError(f"--nnodes must be >= 1, got {nnodes}")
    if not 0 <= min_nnodes <= nnodes:
        raise ComponentError(f"--min_nnodes must be between 0 and --nnodes ({nnodes}), got {min_nnodes}")
    _check_rdzv(rdzv_backend, rdzv_port, nnodes, elastic=0 < min_nnodes < nnodes)
    if script and m != "quantcore.cli":
        raise ComponentError(f"--m {m!r} and --script {script!r}: each rank runs one of them; give only one")
    if not script and not (m or "").strip():
        raise ComponentError("--m is empty and no --script is given: name the module each rank runs "
                             "(default quantcore.cli) or a script")
    nproc = ranks_per_node(nproc_per_node, pod.gpus)
    name = check_job_name(name, "ddp", nnodes)
    j = f"{min_nnodes}:{nnodes}x{nproc}" if 0 < min_nnodes < nnodes else f"{nnodes}x{nproc}"
    app = dist.ddp(
        *[str(a) for a in script_args],
        script=script,
        m=None if script else m,
        image=pod.image,
        name=name,
        cpu=pod.cpu,
        gpu=pod.gpus,
        memMB=pod.memMB,
        j=j,
        env=pod.environment(),  # a fresh dict: dist.ddp adds keys to it
        max_retries=pod.max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend=rdzv_backend,
    )
    return _torchrun_app(app, "ddp", pod, [])


RDZV_BACKENDS = ("c10d", "static")  # etcd/etcd-v2 need an etcd server the components do not deploy


def _check_rdzv(backend: str, port: int, nnodes: int, elastic: bool = False) -> None:
    """Rendezvous settings torchrun would only reject inside the pods (then retried max_retries times),
    and a port that cannot apply (one node rendezvouses on a free local port)."""
    if backend not in RDZV_BACKENDS:
        raise ComponentError(f"--rdzv_backend {backend!r}: use one of {', '.join(RDZV_BACKENDS)} (c10d: rank 0's "
                             "host serves the rendezvous; etcd needs a server these components do not deploy)")
    lo, hi = RDZV_PORTS
    if not lo <= int(port) <= hi:
        raise ComponentError(f"--rdzv_port {port}: use {lo}..{hi} (the ranks run without privileges, which a port "
                             f"below {lo} needs; the Helm chart's rdzvPort takes the same)")
    if nnodes == 1 and int(port) != RDZV_PORT:
        raise ComponentError(f"--rdzv_port {port} with --nnodes 1: a single node rendezvouses on a free local port, "
                             f"the port applies to multi-node jobs only; remove it")
    if elastic and backend == "static":
        raise ComponentError("--rdzv_backend static with --min_nnodes < --nnodes: a static rendezvous waits for "
                             "all --nnodes nodes, so the job is not elastic; use c10d, or drop --min_nnodes")


@component
def qat(
    recipe: str,
    data: str,
    out: str,
    split: str = "train",
    eval_data: Optional[str] = None,
    eval_split: str = "val",
    checkpoint: Optional[str] = None,
    init: Optional[str] = None,
    epochs: int = 0,
    max_steps: int = 0,
    batch_size: int = 0,
    eval_limit: int = 0,
    layout: str = "auto",
    workers: int = -1,
    cache_dir: Optional[str] = None,
    skip_bad: bool = False,
    resume: bool = True,
    nnodes: int = 1,
    nproc_per_node: int = 0,
    max_restarts: int = 3,
    grace_s: int = 180,
    name: str = "quantcore-qat",
    rdzv_port: int = RDZV_PORT,
    image: str = OPTS.image,
    gpus: int = OPTS.gpus,
    cpu: int = OPTS.cpu,
    memMB: int = OPTS.memMB,
    cache_gb: int = OPTS.cache_gb,
    s3_endpoint: Optional[str] = OPTS.s3_endpoint,
    s3_secret: Optional[str] = OPTS.s3_secret,
    env: Optional[str] = OPTS.env,
    mounts: Optional[List[str]] = OPTS.mounts,
    image_pull_secrets: Optional[List[str]] = OPTS.image_pull_secrets,
    tolerations: Optional[List[str]] = OPTS.tolerations,
    node_selector: Optional[str] = OPTS.node_selector,
    labels: Optional[str] = OPTS.labels,
    annotations: Optional[str] = OPTS.annotations,
    deadline_s: int = OPTS.deadline_s,
    max_retries: int = OPTS.max_retries,
) -> specs.AppDef:
    """Quantization-aware training, data-parallel on nnodes x nproc_per_node ranks: `quantcore qat` under torchrun.

    nnodes containers (one Volcano gang) each run `python -m jobs.launch python -m jobs.torchrun
    --max_restarts R --rdzv_conf read_timeout=300,join_timeout=900 --rdzv_backend c10d ... -m quantcore.cli qat
    ARGS` (a gang's pods may start minutes apart, image pulls on fresh GPU nodes: the ranks wait 15 minutes
    for each other, as the chart's QAT Job does):
    jobs.launch loads the S3 credentials, jobs.torchrun is torchrun (c10d rendezvous on rank 0's
    host) that keeps the ranks' exit status: 2 (a user error: bad recipe, URI, data) stops at once,
    with no restart and no retry of the job; any other failure restarts all ranks in place up to
    max_restarts times, and the training loop resumes from its latest checkpoint under
    <out>/checkpoints by itself. With gpus > 0 each rank gets --device cuda and uses its own GPU
    (cuda:LOCAL_RANK); with gpus 0 the ranks run on the CPU (gloo). Writes <out>/checkpoints/,
    metrics.jsonl, ptq/model.qc.pt, <recipe name>/model.qc.pt + encodings.json and
    report.json/report.md/training.png.
    Example: torchx run -s kubernetes -cfg queue=default,service_account=quantcore
    jobs/components.py:qat --recipe vit_b16_384_ft2 --data s3://datasets/imagenet-zip
    --out s3://runs/ft2-qat --nnodes 2 --gpus 4 --s3_secret quantcore-s3-credentials

    Args:
        recipe: the recipe to train (built-in name, YAML path inside the image, or s3:// URI); its
            qat: section sets epochs, optimizer, distillation, checkpointing
        data: training dataset URI (s3://bucket/prefix or a path inside the container); the
            calibration images before training come from it too
        out: output URI prefix for checkpoints, metrics, the QAT model and reports (s3://bucket/prefix);
            rerunning with the same out resumes from its newest valid checkpoint
        split: training split
        eval_data: validation dataset URI; unset: the training dataset
        eval_split: validation split (periodic validation and the final report)
        checkpoint: FP32 weights URI (s3:// or path) overriding the recipe's model weights
        init: start from this PTQ checkpoint (model.qc.pt URI) instead of calibrating first
        epochs: training epochs; 0: the recipe's qat.epochs
        max_steps: stop after this many optimizer steps in all; 0: the recipe's qat.max_steps
        batch_size: batch size per rank (the global batch is batch_size x nnodes x nproc_per_node);
            0: the recipe's qat.batch_size
        eval_limit: final evaluation on a seeded, class-stratified sample of N images; 0: all
        layout: dataset layout (quantcore --layout): auto, folder (ImageNet class folders), zip (zip
            shards), resisc; auto detects it (of both datasets)
        workers: DataLoader worker processes per rank; -1: the recipe's qat.num_workers
        cache_dir: directory caching remote zip shards between epochs (quantcore --cache-dir), e.g.
            /cache/shards with a cache_gb that holds the dataset, or a path on a writable mounted
            PersistentVolumeClaim (see mounts) to keep it across pods; unset: no cache
        skip_bad: skip corrupt or missing images and list them in the report instead of failing
        resume: False: start over (quantcore --no-resume), deleting the checkpoints under
            <out>/checkpoints at the first start; torchrun's in-place restarts still resume from the
            run's own. Needs max_retries 0: a Volcano retry would start over again (or use a new out)
        nnodes: number of nodes (containers, scheduled together as one gang)
        nproc_per_node: ranks per node; 0: one per GPU (gpus), or 1 when gpus is 0. With gpus > 0
            it must equal gpus (each rank uses its own GPU, cuda:LOCAL_RANK)
        max_restarts: times torchrun restarts all ranks in place after a failure other than a user
            error (exit 2); each restart resumes from the latest checkpoint
        grace_s: seconds a pod gets after SIGTERM (eviction, preemption, deadline) to write a
            checkpoint and exit 143 (its terminationGracePeriodSeconds; torchrun waits grace_s - 15
            for the ranks)
        name: job name: lower-case letters, digits and '-', starting with a letter; on Kubernetes
            at most 40 characters with nnodes <= 10 (the Volcano Job, its Service and the pods are
            named after it, see the error for other nnodes)
        rdzv_port: port of the c10d rendezvous store on rank 0's host (multi-node only)
        max_retries: times Volcano restarts the whole job after an infrastructure failure that
            torchrun's in-place restarts cannot cover (a pod evicted or failed with any exit status
            but 2); it resumes from the latest checkpoint too. Exit status 2 (a user error) ends
            the job at once
    """
    from torchx.components import dist

    pod = PodOptions.of(locals())
    for flag, value, low in (("nnodes", nnodes, 1), ("max_restarts", max_restarts, 0), ("grace_s", grace_s, 20),
                             ("epochs", epochs, 0), ("max_steps", max_steps, 0), ("batch_size", batch_size, 0),
                             ("eval_limit", eval_limit, 0), ("workers", workers, -1)):
        if value < low:
            raise ComponentError(f"--{flag} must be >= {low}, got {value}")
    nproc = ranks_per_node(nproc_per_node, pod.gpus)
    name = check_job_name(name, "qat", nnodes)
    recipe_ref = str(recipe).strip()
    if not recipe_ref:
        raise ComponentError("--recipe: a recipe is needed")
    if "," in recipe_ref:
        raise ComponentError(f"--recipe {recipe_ref!r}: qat trains one recipe (a comma separates recipes in the "
                             f"calibrate and ptq components); submit one qat job per recipe")
    _uris(data=data, out=out, eval_data=eval_data, checkpoint=checkpoint, init=init)
    _splits(split=split, eval_split=eval_split)
    if init and checkpoint:  # as quantcore.qat.check_start, at submission rather than in the pod
        raise ComponentError(f"--init {init} and --checkpoint {checkpoint}: give one (--init starts from a "
                             f"calibrated checkpoint and its own FP32 weights; --checkpoint calibrates FP32 weights)")
    args = ["qat", "--recipe", recipe_ref, "--data", data, "--split", split, "--out", out,
            "--eval-data", eval_data or data, "--eval-split", eval_split]
    for flag, value in (("--checkpoint", checkpoint), ("--init", init), ("--cache-dir", cache_dir)):
        if value:
            args += [flag, value]
    for flag, number, unset in (("--epochs", epochs, 0), ("--max-steps", max_steps, 0), ("--batch-size", batch_size, 0),
                                ("--eval-limit", eval_limit, 0), ("--workers", workers, -1)):
        if number != unset:
            args += [flag, str(number)]
    if _check_layout(layout) != "auto":
        args += ["--layout", layout]
    args += ["--device", "cuda" if pod.gpus > 0 else "cpu", "--no-progress"]
    if skip_bad:
        args.append("--skip-bad")
    if not resume:  # refused with job retries by QuantcoreRole.pre_proc (not on local_cwd, which never retries)
        args.append("--no-resume")
    _check_rdzv("c10d", rdzv_port, nnodes)
    app = dist.ddp(
        *args,
        m="quantcore.cli",
        image=pod.image,
        name=name,
        cpu=pod.cpu,
        gpu=pod.gpus,
        memMB=pod.memMB,
        j=f"{nnodes}x{nproc}",
        env=pod.environment(),  # a fresh dict: dist.ddp adds keys to it
        max_retries=pod.max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend="c10d",
    )
    # read_timeout: how long the other nodes wait for rank 0's store to come up (its image pull may
    # be slower than theirs). shutdown_timeout: the ranks' time to checkpoint after SIGTERM, within
    # the pod's grace period (as the Helm chart's qat Jobs).
    opts = ["--max_restarts", str(max_restarts), "--rdzv_conf", "read_timeout=300,join_timeout=900",
            "--shutdown_timeout", str(grace_s - 15)]
    qat_app = _torchrun_app(app, "qat", pod, opts, cache_dir, grace_s,
                            (("--data", data, False), ("--eval_data", eval_data or data, False),
                             ("--checkpoint", checkpoint, False), ("--init", init, False), ("--out", out, True)))
    qat_app.roles[0].starts_over = not resume
    return qat_app
