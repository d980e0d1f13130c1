"""TorchX components for quantcore: ``calibrate``, ``evaluate``, ``ptq``, ``ddp`` and ``qat``.

Each component is a pure function returning a :class:`torchx.specs.AppDef`; its docstring is the
``--help`` of ``torchx run``. The container command always starts with the :mod:`jobs.launch`
entrypoint, which loads S3 credentials from the Kubernetes Secret named by ``--s3_secret`` when
they are not in the environment already (TorchX's kubernetes scheduler cannot reference Secrets
itself), and ends in the ``quantcore`` CLI: ``python -m jobs.launch quantcore <command> ...``;
``ddp`` puts torchrun in between, ``qat`` :mod:`jobs.torchrun` (torchrun keeping the ranks' exit
status: 2 for a user error, 143 after SIGTERM).

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
import shlex
from typing import Dict, List, Optional

import torchx.specs as specs

DEFAULT_IMAGE = "ghcr.io/quantcore/quantcore:0.1.0"
# The container command: the launcher, then the quantcore CLI.
LAUNCHER = ["python", "-m", "jobs.launch"]
SECRET_ENV = "QUANTCORE_S3_SECRET"
ENDPOINT_ENV = "AWS_ENDPOINT_URL"


def _as_list(value: Optional[List[str]], what: str) -> List[str]:
    """A fresh list (never the caller's) of non-empty strings; a lone string counts as one item."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    items = [str(v).strip() for v in items]
    if any(not v for v in items):
        raise ValueError(f"{what}: empty value in {items!r}")
    return items


def _check(gpus: int, cpu: int, memMB: int, workers: int, max_retries: int) -> None:
    for name, value in (("gpus", gpus), ("cpu", cpu), ("memMB", memMB), ("workers", workers),
                        ("max_retries", max_retries)):
        if value < 0:
            raise ValueError(f"--{name} must be >= 0, got {value}")


def _env(env: Optional[Dict[str, str]], s3_endpoint: Optional[str], s3_secret: Optional[str]) -> Dict[str, str]:
    """A new env dict: the caller's extra variables, then the S3 endpoint and the Secret name."""
    out = {str(k): str(v) for k, v in (env or {}).items()}
    out.setdefault("PYTHONUNBUFFERED", "1")
    if s3_endpoint:
        out[ENDPOINT_ENV] = s3_endpoint
    if s3_secret:
        out[SECRET_ENV] = s3_secret
    return out


def _common_flags(workers: int, gpus: int, cache_dir: Optional[str], skip_bad: bool) -> List[str]:
    flags = ["--workers", str(workers), "--device", "cuda" if gpus > 0 else "cpu", "--no-progress"]
    if cache_dir:
        flags += ["--cache-dir", cache_dir]
    if skip_bad:
        flags.append("--skip-bad")
    return flags


def _app(command: str, cli_args: List[str], image: str, gpus: int, cpu: int, memMB: int,
         env: Dict[str, str], max_retries: int, mounts: Optional[List[str]]) -> specs.AppDef:
    role = specs.Role(
        name=command,
        image=image,
        entrypoint=LAUNCHER[0],
        args=LAUNCHER[1:] + ["quantcore", command] + cli_args,
        num_replicas=1,
        resource=specs.Resource(cpu=cpu, gpu=gpus, memMB=memMB),
        env=env,
        max_retries=max_retries,
        retry_policy=specs.RetryPolicy.APPLICATION,
        mounts=specs.parse_mounts(_as_list(mounts, "mounts")) if mounts else [],
    )
    return specs.AppDef(name=f"quantcore-{command}", roles=[role])


def calibrate(
    recipe: List[str],
    data: str,
    out: str,
    split: str = "train",
    checkpoint: Optional[str] = None,
    image: str = DEFAULT_IMAGE,
    gpus: int = 1,
    cpu: int = 8,
    memMB: int = 32768,
    workers: int = 4,
    cache_dir: Optional[str] = None,
    skip_bad: bool = False,
    s3_endpoint: Optional[str] = None,
    s3_secret: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """Calibrate recipes on a dataset: `quantcore calibrate` in one container (one replica).

    Writes <out>/<recipe>/model.qc.pt, encodings.json, ranges.png and report.json for every
    recipe, without evaluating them (use the ptq component for calibration + evaluation).

    Args:
        recipe: recipe(s) to calibrate, comma-separated: built-in names, YAML paths inside the
            image, or s3:// URIs; all must describe the same model
        data: calibration dataset URI (s3://bucket/prefix or a path inside the container)
        out: output URI prefix for checkpoints, encodings and reports (s3://bucket/prefix)
        split: dataset split to draw the calibration images from
        checkpoint: FP32 weights URI (s3:// or path) overriding the recipe's model weights
        image: container image with quantcore and the jobs/ package
        gpus: GPUs for the container; 0 runs on the CPU (--device cpu), otherwise --device cuda
        cpu: CPU cores for the container (Kubernetes limit; the request is 100m lower)
        memMB: memory in MB for the container (Kubernetes limit; the request is 1024 MB lower)
        workers: DataLoader worker processes decoding images (quantcore --workers)
        cache_dir: local directory caching remote zip shards (quantcore --cache-dir); unset: no cache
        skip_bad: skip corrupt or missing images and list them in the report instead of failing
        s3_endpoint: S3 endpoint URL for MinIO/Ceph etc., exported as AWS_ENDPOINT_URL; unset: AWS
        s3_secret: name of a Kubernetes Secret (same namespace) with AWS_ACCESS_KEY_ID and
            AWS_SECRET_ACCESS_KEY; jobs.launch reads it at start-up (the pod's service account
            needs `get` on it) unless the credentials are already in the environment
        env: extra environment variables, K1=V1,K2=V2
        mounts: volumes to mount, e.g. type=volume,src=PVC_NAME,dst=/data[,readonly] or
            type=bind,src=/host/path,dst=/data (see torchx.specs.parse_mounts)
        max_retries: times the scheduler restarts a failed job (Volcano RestartJob policy)
    """
    _check(gpus, cpu, memMB, workers, max_retries)
    recipes = _as_list(recipe, "recipe")
    if not recipes:
        raise ValueError("--recipe: at least one recipe is needed")
    args: List[str] = []
    for r in recipes:
        args += ["--recipe", r]
    args += ["--data", data, "--split", split, "--out", out]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    args += _common_flags(workers, gpus, cache_dir, skip_bad)
    return _app("calibrate", args, image, gpus, cpu, memMB, _env(env, s3_endpoint, s3_secret),
                max_retries, mounts)


def evaluate(
    checkpoint: str,
    data: str,
    out: str,
    split: str = "val",
    limit: int = 0,
    batch_size: int = 64,
    image: str = DEFAULT_IMAGE,
    gpus: int = 1,
    cpu: int = 8,
    memMB: int = 32768,
    workers: int = 4,
    cache_dir: Optional[str] = None,
    skip_bad: bool = False,
    s3_endpoint: Optional[str] = None,
    s3_secret: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """Evaluate a calibrated checkpoint against its own float path: `quantcore evaluate`, one replica.

    Writes <out>/report.json, report.md and per_class.png (quantized vs. FP32 top-1/top-5,
    agreement, logit SQNR).

    Args:
        checkpoint: calibrated checkpoint URI (<calibrate out>/<recipe>/model.qc.pt)
        data: evaluation dataset URI (s3://bucket/prefix or a path inside the container)
        out: output URI prefix for the report (s3://bucket/prefix)
        split: dataset split to evaluate on
        limit: evaluate on the first N images only; 0 evaluates the whole split
        batch_size: evaluation batch size
        image: container image with quantcore and the jobs/ package
        gpus: GPUs for the container; 0 runs on the CPU (--device cpu), otherwise --device cuda
        cpu: CPU cores for the container (Kubernetes limit; the request is 100m lower)
        memMB: memory in MB for the container (Kubernetes limit; the request is 1024 MB lower)
        workers: DataLoader worker processes decoding images (quantcore --workers)
        cache_dir: local directory caching remote zip shards (quantcore --cache-dir); unset: no cache
        skip_bad: skip corrupt or missing images and list them in the report instead of failing
        s3_endpoint: S3 endpoint URL for MinIO/Ceph etc., exported as AWS_ENDPOINT_URL; unset: AWS
        s3_secret: name of a Kubernetes Secret (same namespace) with AWS_ACCESS_KEY_ID and
            AWS_SECRET_ACCESS_KEY; jobs.launch reads it at start-up (the pod's service account
            needs `get` on it) unless the credentials are already in the environment
        env: extra environment variables, K1=V1,K2=V2
        mounts: volumes to mount, e.g. type=volume,src=PVC_NAME,dst=/data[,readonly] or
            type=bind,src=/host/path,dst=/data (see torchx.specs.parse_mounts)
        max_retries: times the scheduler restarts a failed job (Volcano RestartJob policy)
    """
    _check(gpus, cpu, memMB, workers, max_retries)
    if limit < 0 or batch_size < 1:
        raise ValueError(f"--limit must be >= 0 and --batch_size >= 1, got {limit} and {batch_size}")
    args = ["--checkpoint", checkpoint, "--data", data, "--split", split, "--out", out,
            "--batch-size", str(batch_size)]
    if limit:
        args += ["--limit", str(limit)]
    args += _common_flags(workers, gpus, cache_dir, skip_bad)
    return _app("evaluate", args, image, gpus, cpu, memMB, _env(env, s3_endpoint, s3_secret),
                max_retries, mounts)


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
    image: str = DEFAULT_IMAGE,
    gpus: int = 1,
    cpu: int = 8,
    memMB: int = 32768,
    workers: int = 4,
    cache_dir: Optional[str] = None,
    skip_bad: bool = False,
    s3_endpoint: Optional[str] = None,
    s3_secret: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """Post-training quantization end to end: `quantcore ptq` (calibrate + evaluate + report), one replica.

    Calibrates every recipe, evaluates FP32 and all variants in one pass and writes
    <out>/report.json, report.md, per_class.png and <out>/<recipe>/model.qc.pt, encodings.json.

    Args:
        recipe: recipe(s) to calibrate, comma-separated: built-in names, YAML paths inside the
            image, or s3:// URIs; all must describe the same model
        calib_data: calibration dataset URI (s3://bucket/prefix or a path inside the container)
        out: output URI prefix for checkpoints, encodings and reports (s3://bucket/prefix)
        calib_split: dataset split to draw the calibration images from
        eval_data: evaluation dataset URI; unset: the calibration dataset
        eval_split: dataset split to evaluate on
        checkpoint: FP32 weights URI (s3:// or path) overriding the recipe's model weights
        limit: evaluate on the first N images only; 0 evaluates the whole split
        batch_size: evaluation batch size (calibration uses the recipe's)
        image: container image with quantcore and the jobs/ package
        gpus: GPUs for the container; 0 runs on the CPU (--device cpu), otherwise --device cuda
        cpu: CPU cores for the container (Kubernetes limit; the request is 100m lower)
        memMB: memory in MB for the container (Kubernetes limit; the request is 1024 MB lower)
        workers: DataLoader worker processes decoding images (quantcore --workers)
        cache_dir: local directory caching remote zip shards (quantcore --cache-dir); unset: no cache
        skip_bad: skip corrupt or missing images and list them in the report instead of failing
        s3_endpoint: S3 endpoint URL for MinIO/Ceph etc., exported as AWS_ENDPOINT_URL; unset: AWS
        s3_secret: name of a Kubernetes Secret (same namespace) with AWS_ACCESS_KEY_ID and
            AWS_SECRET_ACCESS_KEY; jobs.launch reads it at start-up (the pod's service account
            needs `get` on it) unless the credentials are already in the environment
        env: extra environment variables, K1=V1,K2=V2
        mounts: volumes to mount, e.g. type=volume,src=PVC_NAME,dst=/data[,readonly] or
            type=bind,src=/host/path,dst=/data (see torchx.specs.parse_mounts)
        max_retries: times the scheduler restarts a failed job (Volcano RestartJob policy)
    """
    _check(gpus, cpu, memMB, workers, max_retries)
    if limit < 0 or batch_size < 1:
        raise ValueError(f"--limit must be >= 0 and --batch_size >= 1, got {limit} and {batch_size}")
    recipes = _as_list(recipe, "recipe")
    if not recipes:
        raise ValueError("--recipe: at least one recipe is needed")
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
    args += _common_flags(workers, gpus, cache_dir, skip_bad)
    return _app("ptq", args, image, gpus, cpu, memMB, _env(env, s3_endpoint, s3_secret),
                max_retries, mounts)


def ddp(
    *script_args: str,
    m: str = "quantcore.cli",
    script: Optional[str] = None,
    nnodes: int = 1,
    min_nnodes: int = 0,
    nproc_per_node: int = 1,
    name: str = "quantcore-ddp",
    image: str = DEFAULT_IMAGE,
    gpus: int = 1,
    cpu: int = 8,
    memMB: int = 32768,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    s3_endpoint: Optional[str] = None,
    s3_secret: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """Data-parallel launch on several GPUs and nodes with torchrun (torch.distributed.run).

    Built on torchx.components.dist.ddp: nnodes containers (one Volcano gang) each run
    `python -m jobs.launch torchrun ... -m MODULE ARGS` (S3 credentials are loaded once per node,
    then torchrun starts nproc_per_node ranks with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT set; rank 0's host is the c10d rendezvous point). The default module is the
    quantcore CLI, whose calibrate, evaluate and ptq commands are data-parallel under torchrun:
    calibration statistics are merged exactly, evaluation is sharded and merged, rank 0 writes
    (e.g. `-- evaluate --checkpoint C --data D --out O` splits a 50k-image validation set over the
    ranks). For QAT use the qat component (it keeps user errors fatal across restarts). Example:
    torchx run -s kubernetes -cfg queue=default jobs/components.py:ddp --nnodes 2 --nproc_per_node 4
    --gpus 4 -- evaluate --checkpoint s3://b/run/model.qc.pt --data s3://b/imagenet --out s3://b/eval

    Args:
        script_args: arguments for the module or script (after `--` on the command line)
        m: python module each rank runs (python -m M); ignored when --script is given
        script: python script (path inside the image, relative to its working directory) each
            rank runs instead of a module
        nnodes: number of nodes (containers); with min_nnodes < nnodes the job is elastic
        min_nnodes: minimum number of nodes for an elastic job; 0 means nnodes (fixed size)
        nproc_per_node: processes (ranks) per node, normally one per GPU
        name: job name
        image: container image with quantcore and the jobs/ package
        gpus: GPUs per node (0: CPU ranks with the gloo backend, chosen by the script)
        cpu: CPU cores per node (Kubernetes limit; the request is 100m lower)
        memMB: memory in MB per node (Kubernetes limit; the request is 1024 MB lower)
        rdzv_backend: torchrun rendezvous backend (c10d, or static with fixed node ranks)
        rdzv_port: port of the c10d rendezvous store on rank 0's host (multi-node only)
        s3_endpoint: S3 endpoint URL for MinIO/Ceph etc., exported as AWS_ENDPOINT_URL; unset: AWS
        s3_secret: name of a Kubernetes Secret (same namespace) with AWS_ACCESS_KEY_ID and
            AWS_SECRET_ACCESS_KEY; jobs.launch reads it at start-up (the pod's service account
            needs `get` on it) unless the credentials are already in the environment
        env: extra environment variables, K1=V1,K2=V2
        mounts: volumes to mount, e.g. type=volume,src=PVC_NAME,dst=/data[,readonly] or
            type=bind,src=/host/path,dst=/data (see torchx.specs.parse_mounts)
        max_retries: times the scheduler restarts the failed job (Volcano RestartJob policy)
    """
    from torchx.components import dist

    _check(gpus, cpu, memMB, 0, max_retries)
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"--nnodes and --nproc_per_node must be >= 1, got {nnodes} and {nproc_per_node}")
    if not 0 <= min_nnodes <= nnodes:
        raise ValueError(f"--min_nnodes must be between 0 and --nnodes ({nnodes}), got {min_nnodes}")
    if gpus and nproc_per_node > gpus:
        raise ValueError(f"--nproc_per_node ({nproc_per_node}) exceeds the GPUs per node (--gpus {gpus})")
    j = f"{min_nnodes}:{nnodes}x{nproc_per_node}" if 0 < min_nnodes < nnodes else f"{nnodes}x{nproc_per_node}"
    app = dist.ddp(
        *[str(a) for a in script_args],
        script=script,
        m=None if script else m,
        image=image,
        name=name,
        cpu=cpu,
        gpu=gpus,
        memMB=memMB,
        j=j,
        env=_env(env, s3_endpoint, s3_secret),  # a fresh dict: dist.ddp adds keys to it
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend=rdzv_backend,
        mounts=_as_list(mounts, "mounts") or None,
    )
    (role,) = app.roles
    shell, torchrun_cmd = role.args
    if role.entrypoint != "bash" or shell != "-c" or not torchrun_cmd.startswith("torchrun "):
        raise RuntimeError(f"unexpected torchx.components.dist.ddp command: {role.entrypoint} {role.args}")
    # `exec` keeps one process tree: bash expands the rank-0 host, the launcher loads the Secret
    # and execs torchrun, torchrun starts the ranks (environment inherited).
    launch = " ".join(shlex.quote(a) for a in LAUNCHER)
    role = dataclasses.replace(role, name="ddp", args=["-c", f"exec {launch} {torchrun_cmd}"],
                              retry_policy=specs.RetryPolicy.APPLICATION)
    return specs.AppDef(name=app.name, roles=[role], metadata=dict(app.metadata))


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
    workers: int = -1,
    cache_dir: Optional[str] = None,
    skip_bad: bool = False,
    nnodes: int = 1,
    nproc_per_node: int = 0,
    max_restarts: int = 3,
    name: str = "quantcore-qat",
    image: str = DEFAULT_IMAGE,
    gpus: int = 1,
    cpu: int = 8,
    memMB: int = 32768,
    rdzv_port: int = 29500,
    s3_endpoint: Optional[str] = None,
    s3_secret: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """Quantization-aware training, data-parallel on nnodes x nproc_per_node ranks: `quantcore qat` under torchrun.

    nnodes containers (one Volcano gang) each run `python -m jobs.launch python -m jobs.torchrun
    --nnodes N --nproc_per_node P --max_restarts R --rdzv_backend c10d ... -m quantcore.cli qat ARGS`:
    jobs.launch loads the S3 credentials, jobs.torchrun is torchrun (c10d rendezvous on rank 0's
    host) that keeps the ranks' exit status: 2 (a user error: bad recipe, URI, data) stops at once,
    with no restart; any other failure restarts all ranks in place up to max_restarts times, and
    the training loop resumes from its latest checkpoint under <out>/checkpoints by itself.
    With gpus > 0 each rank gets --device cuda and uses its own GPU (cuda:LOCAL_RANK); with gpus 0
    the ranks run on the CPU (gloo). Writes <out>/checkpoints/, metrics.jsonl, ptq/model.qc.pt,
    <recipe name>/model.qc.pt + encodings.json and report.json/report.md/training.png.
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
        workers: DataLoader worker processes per rank; -1: the recipe's qat.num_workers
        cache_dir: directory caching remote zip shards between epochs (quantcore --cache-dir): put
            it on a mounted PersistentVolumeClaim (see mounts), the container's own filesystem has
            no ephemeral-storage request; unset: no cache
        skip_bad: skip corrupt or missing images and list them in the report instead of failing
        nnodes: number of nodes (containers, scheduled together as one gang)
        nproc_per_node: ranks per node; 0: one per GPU (gpus), or 1 when gpus is 0. Must not
            exceed gpus when gpus > 0 (each rank needs a GPU of its own)
        max_restarts: times torchrun restarts all ranks in place after a failure other than a user
            error (exit 2); each restart resumes from the latest checkpoint
        name: job name
        image: container image with quantcore and the jobs/ package
        gpus: GPUs per node; 0 runs the ranks on the CPU (--device cpu, gloo), otherwise --device cuda
        cpu: CPU cores per node (Kubernetes limit; the request is 100m lower)
        memMB: memory in MB per node (Kubernetes limit; the request is 1024 MB lower)
        rdzv_port: port of the c10d rendezvous store on rank 0's host (multi-node only)
        s3_endpoint: S3 endpoint URL for MinIO/Ceph etc., exported as AWS_ENDPOINT_URL; unset: AWS
        s3_secret: name of a Kubernetes Secret (same namespace) with AWS_ACCESS_KEY_ID and
            AWS_SECRET_ACCESS_KEY; jobs.launch reads it at start-up (the pod's service account
            needs `get` on it) unless the credentials are already in the environment
        env: extra environment variables, K1=V1,K2=V2
        mounts: PersistentVolumeClaims to mount, type=volume,src=PVC_NAME,dst=/data[,readonly]
            (host paths are not allowed on the cluster: no type=bind)
        max_retries: times the scheduler restarts the whole job after a node/pod failure that
            torchrun's in-place restarts cannot cover (Volcano RestartJob policy); it resumes
            from the latest checkpoint too. TorchX 0.7 restarts on any failed pod, exit 2 (user
            error) included, so each retry of a user error costs one more quick start
    """
    from torchx.components import dist

    _check(gpus, cpu, memMB, 0, max_retries)
    for flag, value, low in (("nnodes", nnodes, 1), ("nproc_per_node", nproc_per_node, 0),
                             ("max_restarts", max_restarts, 0), ("epochs", epochs, 0), ("max_steps", max_steps, 0),
                             ("batch_size", batch_size, 0), ("eval_limit", eval_limit, 0), ("workers", workers, -1)):
        if value < low:
            raise ValueError(f"--{flag} must be >= {low}, got {value}")
    nproc = nproc_per_node or max(gpus, 1)
    if gpus and nproc > gpus:
        raise ValueError(f"--nproc_per_node ({nproc}) exceeds the GPUs per node (--gpus {gpus}): "
                         f"each rank needs a GPU of its own")
    recipe_ref = str(recipe).strip()
    if not recipe_ref:
        raise ValueError("--recipe: a recipe is needed")
    args = ["qat", "--recipe", recipe_ref, "--data", data, "--split", split, "--out", out,
            "--eval-data", eval_data or data, "--eval-split", eval_split]
    for flag, value in (("--checkpoint", checkpoint), ("--init", init), ("--cache-dir", cache_dir)):
        if value:
            args += [flag, value]
    for flag, number, unset in (("--epochs", epochs, 0), ("--max-steps", max_steps, 0), ("--batch-size", batch_size, 0),
                                ("--eval-limit", eval_limit, 0), ("--workers", workers, -1)):
        if number != unset:
            args += [flag, str(number)]
    args += ["--device", "cuda" if gpus > 0 else "cpu", "--no-progress"]
    if skip_bad:
        args.append("--skip-bad")
    app = dist.ddp(
        *args,
        m="quantcore.cli",
        image=image,
        name=name,
        cpu=cpu,
        gpu=gpus,
        memMB=memMB,
        j=f"{nnodes}x{nproc}",
        env=_env(env, s3_endpoint, s3_secret),  # a fresh dict: dist.ddp adds keys to it
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend="c10d",
        mounts=_as_list(mounts, "mounts") or None,
    )
    (role,) = app.roles
    shell, torchrun_cmd = role.args
    if role.entrypoint != "bash" or shell != "-c" or not torchrun_cmd.startswith("torchrun "):
        raise RuntimeError(f"unexpected torchx.components.dist.ddp command: {role.entrypoint} {role.args}")
    # jobs.torchrun instead of torchrun: the same launcher, keeping a rank's exit 2 (user error) as the
    # container's status and not restarting after it. read_timeout: how long the other nodes wait for
    # rank 0's store to come up (its image pull may be slower than theirs).
    launch = " ".join(shlex.quote(a) for a in LAUNCHER + ["python", "-m", "jobs.torchrun"])
    torchrun_args = torchrun_cmd[len("torchrun "):]
    cmd = f"exec {launch} --max_restarts {max_restarts} --rdzv_conf read_timeout=300 {torchrun_args}"
    role = dataclasses.replace(role, name="qat", args=["-c", cmd], retry_policy=specs.RetryPolicy.APPLICATION)
    return specs.AppDef(name=app.name, roles=[role], metadata=dict(app.metadata))
