"""TorchX on Kubernetes: what `torchx run -s kubernetes` builds from jobs/components.py.

Every component goes through the real `torchx run --dryrun` CLI; the Volcano Job it prints is
validated strictly (project Volcano schema + core pod schemas, tests/k8s_tools.py) and checked for
what a shared GPU cluster needs: the chart's `restricted` pod security (compared with the pods that
`helm template` renders), GPU tolerations, scratch volumes with an ephemeral-storage request, PVC-only
mounts, one pinned image, retry rules that end the job on a user error (exit 2), priority, deadline,
labels. What `torchx run` really submits (not a dryrun) is caught by a loopback Kubernetes API
stand-in. Each defect of plain TorchX 0.7 is shown by rendering the same AppDef without
jobs.components.QuantcoreRole, and asserting that the checks catch it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # jobs/ is shipped as source, not installed
    sys.path.insert(0, str(REPO))

import k8s_tools as kt  # noqa: E402
from jobs import components  # noqa: E402
from test_jobs import TORCHX, _assert_cli_accepts, _subprocess_env  # noqa: E402
from test_k8s import security_problems  # noqa: E402

COMPONENT_NAMES = ("calibrate", "evaluate", "ptq", "ddp", "qat", "export")
VOLCANO_SCHEMA = REPO / "tests" / "k8s_schemas" / "job-batch.volcano.sh-v1alpha1.json"
CHART = REPO / "charts" / "quantcore"
DIGEST = "sha256:" + "0123456789abcdef" * 4
CFG = "queue=default,namespace=quantcore,service_account=quantcore,priority_class=batch-high"

DRYRUN_ARGS = {
    "calibrate": ["--recipe", "vit_b16_int8,s3://cfg/recipes/site.yaml", "--data", "s3://datasets/imagenet-zip",
                  "--out", "s3://runs/calib", "--s3_endpoint", "http://minio.minio:9000",
                  "--s3_secret", "quantcore-s3-credentials", "--max_retries", "3", "--env", "OMP_NUM_THREADS=4",
                  "--cache_dir", "/cache/shards", "--cache_gb", "40", "--tolerations", "dedicated=ml:NoSchedule",
                  "--node_selector", "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3",
                  "--labels", "kueue.x-k8s.io/queue-name=team-a,team=vision", "--annotations", "owner=ml@example.com",
                  "--deadline_s", "21600", "--image_pull_secrets", "regcred"],
    "evaluate": ["--checkpoint", "s3://runs/calib/vit_b16_int8/model.qc.pt", "--data", "s3://datasets/imagenet-zip",
                 "--out", "s3://runs/eval", "--limit", "1000", "--gpus", "0", "--max_retries", "0",
                 "--image", f"registry.example.com/ml/quantcore@{DIGEST}"],
    "export": ["--checkpoint", "s3://runs/ptq/vit_b16_384_ft2/model.qc.pt", "--out", "s3://runs/export",
               "--check_data", "s3://datasets/imagenet-zip", "--check_limit", "500", "--max_retries", "1",
               "--s3_secret", "quantcore-s3-credentials"],
    "ptq": ["--recipe", "vit_b16_384_ft1,vit_b16_384_ft2", "--calib_data", "s3://datasets/imagenet-zip",
            "--out", "s3://runs/ptq", "--gpus", "2", "--s3_secret", "quantcore-s3-credentials", "--mounts",
            "type=volume,src=imagenet-pvc,dst=/data,readonly,type=volume,src=shard-cache,dst=/shards",
            "--cache_dir", "/shards/imagenet"],
    "ddp": ["--nnodes", "2", "--gpus", "2", "--s3_secret", "quantcore-s3-credentials",
            "--", "calibrate", "--recipe", "vit_b16_int8", "--data", "s3://datasets/imagenet-zip",
            "--out", "s3://runs/ddp/rank_$RANK", "--device", "cuda"],
    "qat": ["--recipe", "vit_b16_384_ft2", "--data", "s3://datasets/imagenet-zip", "--out", "s3://runs/qat",
            "--init", "s3://runs/ptq/vit_b16_384_ft2/model.qc.pt", "--epochs", "5", "--batch_size", "32",
            "--nnodes", "2", "--gpus", "4", "--max_restarts", "2", "--s3_secret", "quantcore-s3-credentials",
            "--mounts", "type=volume,src=imagenet-pvc,dst=/data,readonly", "--cache_dir", "/cache/shards"],
}


def _torchx(args: List[str]) -> List[str]:
    return [str(TORCHX), "run", "-s", "kubernetes", "--dryrun", "--workspace=", "-cfg", CFG] + args


def _dryrun_cmd(name: str) -> List[str]:
    return _torchx([f"jobs/components.py:{name}"] + DRYRUN_ARGS[name])


def _run(cmd: List[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_subprocess_env(**env), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def _job_of(out: str) -> Dict[str, Any]:
    assert "=== SCHEDULER REQUEST ===" in out, out[-2000:]
    return yaml.safe_load(out.split("=== SCHEDULER REQUEST ===", 1)[1])


@pytest.fixture(scope="module")
def dryruns(tmp_path_factory) -> Dict[str, Tuple[int, str, str]]:
    """`torchx run -s kubernetes --dryrun` of every component, run concurrently (a few s each)."""
    tmp = tmp_path_factory.mktemp("torchx-dryrun")
    procs = {}
    for name in COMPONENT_NAMES:
        out, err = open(tmp / f"{name}.out", "w+"), open(tmp / f"{name}.err", "w+")
        procs[name] = (subprocess.Popen(_dryrun_cmd(name), cwd=REPO, env=_subprocess_env(), stdout=out, stderr=err,
                                        stdin=subprocess.DEVNULL, text=True), out, err)
    results = {}
    for name, (proc, out, err) in procs.items():
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.seek(0)
        err.seek(0)
        results[name] = (proc.returncode, out.read(), err.read())
        out.close()
        err.close()
    return results


@pytest.fixture(scope="module")
def jobs(dryruns) -> Dict[str, Dict[str, Any]]:
    out = {}
    for name, (rc, stdout, stderr) in dryruns.items():
        assert rc == 0, f"{' '.join(_dryrun_cmd(name))}\n{stdout[-3000:]}\n{stderr[-3000:]}"
        out[name] = _job_of(stdout)
    return out


def kubelet_expand(arg: str, env: Dict[str, str]) -> str:
    """What the container receives for a command/args entry: the kubelet's expansion
    (k8s.io/kubernetes third_party/forked/golang/expansion): ``$$`` is one ``$``, ``$(VAR)`` the
    value of a variable of the container's env (left as written when it has none), any other
    ``$`` stays."""
    out, i = [], 0
    while i < len(arg):
        if arg[i] == "$" and i + 1 < len(arg):
            if arg[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if arg[i + 1] == "(":
                end = arg.find(")", i + 2)
                if end != -1:
                    name = arg[i + 2:end]
                    out.append(env.get(name, arg[i:end + 1]))
                    i = end + 1
                    continue
        out.append(arg[i])
        i += 1
    return "".join(out)


def container_command(c: Dict[str, Any]) -> List[str]:
    """A container's command + args as its process gets them (kubelet expansion applied)."""
    env = {e["name"]: e.get("value", "") for e in c.get("env") or []}
    return [kubelet_expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]


def _pods(job: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [t["template"]["spec"] for t in job["spec"]["tasks"]]


@pytest.fixture(scope="module")
def helm_gpu_pod(tmp_path_factory) -> Dict[str, Any]:
    """The pod spec of the GPU Job that `helm template` renders from the chart's minimal values."""
    try:
        bins = kt.k8s_binaries()
    except kt.ToolError as exc:
        pytest.fail(f"helm unavailable: {exc}")
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "c"), "HELM_CONFIG_HOME": str(home / "f"),
           "HELM_DATA_HOME": str(home / "d"), "KUBECONFIG": os.devnull}
    proc = subprocess.run([str(bins.helm), "template", "qc", str(CHART), "--namespace", "quantcore", "-f",
                           str(CHART / "ci" / "minimal-values.yaml")], capture_output=True, text=True, env=env,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    (job,) = [o for o in kt.load_docs(proc.stdout) if o.get("kind") == "Job"]
    return job["spec"]["template"]["spec"]


def _plain_torchx_job(app) -> Dict[str, Any]:
    """What TorchX 0.7 alone makes of ``app``: its roles as plain specs.Role (no pre_proc)."""
    import dataclasses

    from torchx import specs
    from torchx.schedulers.kubernetes_scheduler import create_scheduler, sanitize_for_serialization

    roles = [specs.Role(**{f.name: getattr(r, f.name) for f in dataclasses.fields(specs.Role)}) for r in app.roles]
    plain = specs.AppDef(name=app.name, roles=roles, metadata=dict(app.metadata))
    info = create_scheduler("test").submit_dryrun(plain, {"queue": "default"})
    return sanitize_for_serialization(info.request.resource)


def _ours(app, cfg: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    from torchx.schedulers.kubernetes_scheduler import create_scheduler, sanitize_for_serialization

    info = create_scheduler("test").submit_dryrun(app, {"queue": "default", **(cfg or {})})
    return sanitize_for_serialization(info.request.resource)


# Names a Volcano Job brings onto the cluster (volcano-sh/volcano): the job itself (admission webhook:
# a qualified name, <= 63); its svc plugin's headless Service (a DNS-1035 label) and NetworkPolicy,
# both named after the job, and ConfigMap <job>-svc; the pods <job>-<task>-<index> (jobhelpers.MakePodName),
# whose hostname is the pod name and subdomain the job name (DNS-1123 labels). kubernetes-validate
# does not check metadata.name, so this does.
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def final_names(job: Dict[str, Any]) -> List[Tuple[str, str, "re.Pattern[str]", int]]:
    """(what, name, pattern, max length) of every name derived from a Volcano Job's name."""
    jn = job["metadata"]["name"]
    names = [("Volcano Job", jn, DNS_1123_LABEL, 63), ("Service (svc plugin)", jn, DNS_1035_LABEL, 63),
             ("pod subdomain", jn, DNS_1123_LABEL, 63), ("ConfigMap (svc plugin)", f"{jn}-svc", DNS_SUBDOMAIN, 253)]
    for task in job["spec"]["tasks"]:
        for i in range(int(task.get("replicas", 1))):
            names.append(("pod name and hostname", f"{jn}-{task['name']}-{i}", DNS_1123_LABEL, 63))
    return names


def name_problems(job: Dict[str, Any]) -> List[str]:
    return [f"{what} {name!r}: " + (f"{len(name)} characters (> {most})" if len(name) > most else "invalid")
            for what, name, pattern, most in final_names(job) if len(name) > most or not pattern.match(name)]


# ------------------------------------------------------------------------------ every component

@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_dryrun_is_a_strictly_valid_volcano_job(name, jobs):
    assert VOLCANO_SCHEMA.is_file(), f"project-owned Volcano schema missing: {VOLCANO_SCHEMA}"
    job = jobs[name]
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    errors = kt.validate_object(job)  # Volcano schema + each task's pod template, strictly
    assert errors == [], "\n".join(errors)
    assert len(kt.embedded_pod_templates(job)) == (2 if name in ("ddp", "qat") else 1)
    spec = job["spec"]
    assert spec["queue"] == "default" and spec["schedulerName"] == "volcano"
    assert spec["priorityClassName"] == "batch-high"
    for pod in _pods(job):
        (container,) = pod["containers"]
        assert pod["serviceAccountName"] == "quantcore" and pod["restartPolicy"] == "Never"
        assert pod["priorityClassName"] == "batch-high"  # -cfg priority_class reaches the pods too
        assert not any("hostPath" in v for v in pod["volumes"])
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if name != "evaluate":
            assert env["QUANTCORE_S3_SECRET"] == "quantcore-s3-credentials"
            assert pod["automountServiceAccountToken"] is True  # jobs.launch reads the Secret with it
        else:
            assert pod["automountServiceAccountToken"] is False and "QUANTCORE_S3_SECRET" not in env


@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_dryrun_final_names_are_valid(name, jobs):
    job = jobs[name]
    assert job["metadata"]["name"].startswith(("quantcore-" + name + "-"))
    assert name_problems(job) == []


@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_dryrun_pods_are_restricted_like_the_helm_pods(name, jobs, helm_gpu_pod):
    """Pod and container securityContext are the chart's (rendered by helm, not restated here); the
    root filesystem is read-only, so /tmp and /cache are emptyDirs with a size and the container asks
    for the ephemeral storage they may fill."""
    job = jobs[name]
    assert security_problems(job) == []
    (helm_container,) = helm_gpu_pod["containers"]
    for pod in _pods(job):
        (container,) = pod["containers"]
        assert helm_gpu_pod["securityContext"].items() <= pod["securityContext"].items()
        assert container["securityContext"] == helm_container["securityContext"]
        assert pod["enableServiceLinks"] is False
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        cache_gb = 40 if name == "calibrate" else components.OPTS.cache_gb
        assert vols[mounts["/tmp"]]["emptyDir"] == {"sizeLimit": f"{components.TMP_GB}Gi"}
        assert vols[mounts["/cache"]]["emptyDir"] == {"sizeLimit": f"{cache_gb}Gi"}
        total = f"{cache_gb + components.TMP_GB + components.LOG_GB}Gi"
        res = container["resources"]
        assert res["requests"]["ephemeral-storage"] == res["limits"]["ephemeral-storage"] == total


@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_dryrun_gpu_pods_tolerate_the_gpu_taint_like_the_helm_pods(name, jobs, helm_gpu_pod):
    gpu_tolerations = helm_gpu_pod["tolerations"]
    assert components.GPU_TOLERATION in gpu_tolerations
    for pod in _pods(jobs[name]):
        gpus = pod["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu")
        if name in ("evaluate", "export"):  # no GPU: a CPU pod needs no GPU toleration
            assert gpus is None and "tolerations" not in pod
            continue
        assert int(gpus) > 0 and components.GPU_TOLERATION in pod["tolerations"]
        if name == "calibrate":  # plus the user's own
            own = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
            assert own in pod["tolerations"]
            assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        else:
            assert "nodeSelector" not in pod  # the GPU request alone selects GPU nodes


@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_dryrun_commands(name, jobs):
    """The container commands: the quantcore CLI accepts every option; ddp/qat run jobs.torchrun."""
    from torch.distributed.run import get_args_parser

    job = jobs[name]
    spec = job["spec"]
    hosts = []
    for t in spec["tasks"]:
        (c,) = t["template"]["spec"]["containers"]
        cmd = container_command(c)
        if name == "ptq":  # --gpus 2: one data-parallel rank per GPU, as the Helm chart's Jobs
            assert cmd[:6] == ["python", "-m", "jobs.launch", "python", "-m", "jobs.torchrun"], cmd
            a = get_args_parser().parse_args(cmd[6:])
            assert (a.standalone, a.nproc_per_node, a.max_restarts, a.module, a.training_script) == (
                True, "2", 0, True, "quantcore.cli")
            assert a.training_script_args[0] == "ptq" and "--device" in a.training_script_args
            _assert_cli_accepts(a.training_script_args)
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
            continue
        if name not in ("ddp", "qat"):
            assert cmd[:4] == ["python", "-m", "jobs.launch", "quantcore"] and cmd[4] == name
            _assert_cli_accepts(cmd[4:])
            continue
        assert cmd[:2] == ["bash", "-c"]
        words = shlex.split(cmd[2])
        assert words[:7] == ["exec", "python", "-m", "jobs.launch", "python", "-m", "jobs.torchrun"], words
        a = get_args_parser().parse_args(words[7:])
        assert a.module and a.training_script == "quantcore.cli" and a.rdzv_id == job["metadata"]["name"]
        _assert_cli_accepts(a.training_script_args)
        assert a.training_script_args[a.training_script_args.index("--device") + 1] == "cuda"
        hosts.append(a.rdzv_endpoint)
        if name == "ddp":  # quoted: no shell expands it; jobs.torchrun does, for each rank
            assert "s3://runs/ddp/rank_$RANK" in a.training_script_args and "'s3://runs/ddp/rank_$RANK'" in cmd[2]
            assert a.nproc_per_node == "2"  # --nproc_per_node unset: one rank per GPU (--gpus 2)
        else:
            assert (a.nnodes, a.nproc_per_node, a.max_restarts, a.rdzv_backend) == ("2", "4", 2, "c10d")
            # SIGTERM: the ranks get grace - 15 s to checkpoint, within the pod's grace period
            assert t["template"]["spec"]["terminationGracePeriodSeconds"] == 180 and a.shutdown_timeout == 165
    if name in ("ddp", "qat"):
        role = name.upper()
        assert hosts == ["${TORCHX_RANK0_HOST:=localhost}:29500", f"${{VC_{role}_0_HOSTS:=localhost}}:29500"]
    if name == "calibrate":
        (c,) = spec["tasks"][0]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://minio.minio:9000" and env["OMP_NUM_THREADS"] == "4"
        cmd = container_command(c)
        assert cmd[cmd.index("--cache-dir") + 1] == "/cache/shards"


# ------------------------------------------------------------------------------ plain TorchX 0.7: the defects

def test_plain_torchx_pods_fail_the_checks_that_ours_pass():
    """The same AppDef through TorchX 0.7 alone: `securityContext: {}`, no toleration, no scratch
    volumes, no ephemeral-storage request, a bind mount as hostPath. The checks above catch each."""
    from torchx import specs

    app = components.calibrate(recipe=["r"], data="s3://b/d", out="s3://b/o", cache_dir="/cache/shards")
    old = _plain_torchx_job(app)
    problems = "\n".join(security_problems(old))
    for expected in ("runAsNonRoot is not true", "readOnlyRootFilesystem is not true",
                     "allowPrivilegeEscalation is not false", "capabilities.drop is not [ALL]",
                     "seccompProfile is not RuntimeDefault", "/tmp is not a writable emptyDir"):
        assert expected in problems, problems
    (pod,) = _pods(old)
    assert pod["containers"][0]["securityContext"] == {} and "tolerations" not in pod
    assert "ephemeral-storage" not in pod["containers"][0]["resources"]["requests"]
    # a bind mount, which the components refuse, renders as hostPath in TorchX 0.7
    app.roles[0].mounts = [specs.BindMount(src_path="/mnt/imagenet", dst_path="/data")]
    assert "hostPath volume mount-0" in "\n".join(security_problems(_plain_torchx_job(app)))
    # ours, from the same component
    new = _ours(components.calibrate(recipe=["r"], data="s3://b/d", out="s3://b/o", cache_dir="/cache/shards"))
    assert security_problems(new) == [] and kt.validate_object(new) == []


# Volcano's choice of action for a pod event (volcano-sh/volcano, pkg/controllers/job/job_controller_util.go,
# applyPolicies): the task's policies in order, the first whose event list holds the event (or "*") or whose
# exitCode equals the exit code of the pod's (first) container wins; else the job's; else a plain sync.
def volcano_action(job: Dict[str, Any], task: str, event: str, exit_code: int = 0) -> str:
    tasks = {t["name"]: t for t in job["spec"]["tasks"]}
    for policy in tasks[task].get("policies", []) + job["spec"].get("policies", []):
        events = list(policy.get("events", [])) + ([policy["event"]] if policy.get("event") else [])
        if events and (event in events or "*" in events):
            return policy["action"]
        if policy.get("exitCode") is not None and policy["exitCode"] == exit_code:
            return policy["action"]
    return "SyncJob"


@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_user_errors_end_the_job_and_infrastructure_failures_restart_it(name, jobs):
    job = jobs[name]
    retries = job["spec"]["maxRetry"]
    assert retries == {"calibrate": 3, "evaluate": 0, "export": 1}.get(name, components.OPTS.max_retries)
    for task in job["spec"]["tasks"]:
        t = task["name"]
        assert volcano_action(job, t, "PodFailed", 2) == "TerminateJob"  # user error: no retry
        if retries:
            assert task["maxRetry"] == retries
            assert volcano_action(job, t, "PodFailed", 1) == "RestartJob"  # crash, OOM (137), ...
            assert volcano_action(job, t, "PodFailed", 143) == "RestartJob"  # SIGTERM (preempted, deadline)
            assert volcano_action(job, t, "PodEvicted") == "RestartJob"
        else:  # no retries: Volcano's own handling of a failed pod (the job fails)
            assert volcano_action(job, t, "PodFailed", 1) == "SyncJob"


def test_plain_torchx_retries_a_user_error():
    """TorchX 0.7 maps max_retries to RestartJob on any PodFailed: an exit-2 user error restarts."""
    app = components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", max_retries=2)
    old = _plain_torchx_job(app)
    assert volcano_action(old, "ptq-0", "PodFailed", 2) == "RestartJob"
    new = _ours(app)
    assert volcano_action(new, "ptq-0", "PodFailed", 2) == "TerminateJob"
    assert kt.validate_object(new) == []


def test_volcano_schema_refuses_a_policy_with_both_event_and_exit_code():
    new = _ours(components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o"))
    new["spec"]["tasks"][0]["policies"][0]["event"] = "PodFailed"
    assert any("policies" in e for e in kt.validate_object(new))


# ------------------------------------------------------------------------------ names

def _longest_id(monkeypatch) -> None:
    """TorchX's job ids as long as they get: random_id() of the largest 64-bit number."""
    from torchx.schedulers import ids

    monkeypatch.setattr(ids, "random_uint64", lambda: 2 ** 64 - 1)
    assert len(ids.random_id()) == components.TORCHX_ID_MAX


@pytest.mark.parametrize("fn,nnodes", [("qat", 2), ("qat", 10), ("qat", 11), ("ddp", 10)])
def test_job_names_stay_within_the_dns_limits(fn, nnodes, monkeypatch):
    """The longest --name accepted gives 63-character pod names with TorchX's longest id; one more
    character is refused, naming the limit. Rendered without the check, that name breaks the pods'
    hostnames (before: no limit at all)."""
    _longest_id(monkeypatch)

    def make(name):
        if fn == "qat":
            return components.qat(recipe="r", data="s3://b/d", out="s3://b/o", nnodes=nnodes, name=name)
        return components.ddp("evaluate", nnodes=nnodes, name=name)

    limit = 63 - len(f"-{'x' * components.TORCHX_ID_MAX}-{fn}-{nnodes - 1}-0")
    assert limit == (39 if nnodes > 10 else 40)  # the help says: at most 40 characters with nnodes <= 10
    longest = ("team-a-" + "v" * 63)[:limit]
    job = _ours(make(longest))
    assert name_problems(job) == [] and kt.validate_object(job) == []
    assert max(len(n) for _, n, _, _ in final_names(job)) == 63
    with pytest.raises(ValueError, match=re.escape(f"--name '{longest}x': {limit + 1} characters, at most {limit} "
                                                   f"with --nnodes {nnodes}")):
        make(longest + "x")
    import dataclasses

    old = _ours(dataclasses.replace(make(longest), name=longest + "x"))  # the name without the check
    assert any(p.startswith("pod name and hostname") and "64 characters" in p for p in name_problems(old))


def test_the_reviewers_long_qat_name_is_refused(monkeypatch):
    _longest_id(monkeypatch)
    long = "vit-b16-384-ft2-w8a8-qat-imagenet-full-5-epochs-kd"
    with pytest.raises(ValueError, match=re.escape(f"--name '{long}': 50 characters, at most 40 with --nnodes 2")):
        components.qat(recipe="r", data="s3://b/d", out="s3://b/o", nnodes=2, name=long)
    import dataclasses

    app = components.qat(recipe="r", data="s3://b/d", out="s3://b/o", nnodes=2)
    problems = name_problems(_ours(dataclasses.replace(app, name=long)))
    assert "Volcano Job 'vit-b16-384-ft2-w8a8-qat-imagenet-full-5-epochs-kd-" in problems[0]
    assert "65 characters" in problems[0]


@pytest.mark.parametrize("bad", ["Vit_B16_QAT", "vit.b16", "team/run", "1st-run", "-run", "qat ft2"])
def test_names_that_torchx_would_rewrite_or_kubernetes_refuse_are_refused(bad):
    """TorchX lower-cases a name and drops what is not [a-z0-9-] (Vit_B16_QAT: job vitb16qat-<id>),
    dist.ddp takes `a/b` as experiment a, run b; a Service name needs a letter first."""
    for make in (lambda: components.qat(recipe="r", data="s3://b/d", out="s3://b/o", name=bad),
                 lambda: components.ddp("evaluate", name=bad)):
        with pytest.raises(ValueError, match=re.escape(f"--name {bad!r}: use lower-case letters, digits and '-'")):
            make()
    import dataclasses

    from torchx.components import dist

    app = components.qat(recipe="r", data="s3://b/d", out="s3://b/o")
    old = _ours(dataclasses.replace(app, name=bad))
    job_name = old["metadata"]["name"]
    # without the check: the job is not called what the user asked for, or its Service is invalid
    assert not job_name.startswith(bad + "-") or name_problems(old), job_name
    assert dist.ddp(m="x", name="team/run").name == "run"  # TorchX's own reading of a `/`
    with pytest.raises(ValueError, match="--name 'run-': use"):  # a DNS label ends with a letter or digit
        components.qat(recipe="r", data="s3://b/d", out="s3://b/o", name="run-")


# ------------------------------------------------------------------------------ resources

def test_resource_floors_match_the_help_and_the_requests():
    """--cpu and --memMB: the help states the minimum, the components refuse one less, and the
    minimum still gives the pod a real request (TorchX requests memMB - 1024 MB and cpu - 100m)."""
    import dataclasses

    from torchx import specs
    from torchx.components import dist

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(components.PodOptions)}
    floors = {k: int(re.search(r"at least (\d+)", helps[k]).group(1)) for k in ("cpu", "memMB")}
    assert floors == {"cpu": 1, "memMB": components.MIN_MEM_MB}
    for key, low in floors.items():
        for make in (lambda **kw: components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", **kw),
                     lambda **kw: components.ddp("evaluate", **kw)):
            with pytest.raises(ValueError, match=re.escape(f"--{key} must be >= {low}")):
                make(**{key: low - 1})
    (pod,) = _pods(_ours(components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", cpu=1, memMB=2048)))
    res = pod["containers"][0]["resources"]
    assert (res["requests"]["cpu"], res["limits"]["cpu"]) == ("900m", "1000m")
    assert (res["requests"]["memory"], res["limits"]["memory"]) == ("1024M", "2048M")
    # before: what TorchX makes of the values the components now refuse
    app = components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o")
    app.roles[0].resource = specs.Resource(cpu=0, gpu=0, memMB=100)
    (old,) = _pods(_plain_torchx_job(app))
    assert old["containers"][0]["resources"]["requests"] == {"memory": "0M"}  # no CPU, no memory request
    assert dist.ddp(m="x", cpu=0).roles[0].resource.cpu == 2  # --cpu 0 silently became 2 cores


# ------------------------------------------------------------------------------ mounts

def test_mounts_are_pvcs_only():
    app = components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o",
                         mounts=["type=volume", "src=imagenet-pvc", "dst=/data", "readonly"])
    job = _ours(app)
    (pod,) = _pods(job)
    assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "imagenet-pvc"}} in pod["volumes"]
    bad = [(["type=bind", "src=/mnt/imagenet", "dst=/data"], "--mounts: type=bind (a host path) is not allowed"),
           (["type=device", "src=/dev/fuse"], "--mounts: type=device"),
           (["type=volume", "src=pvc", "dst=/tmp"], "--mounts dst='/tmp'"),
           (["type=volume", "src=pvc", "dst=/cache/"], "--mounts dst='/cache/'"),
           (["type=volume", "src=pvc", "dst=/opt/quantcore"], "--mounts dst='/opt/quantcore': inside /opt"),
           (["type=volume", "src=pvc", "dst=/opt"], "--mounts dst='/opt': inside /opt"),
           (["type=volume", "src=pvc", "dst=/usr/lib/x"], "inside /usr"),
           (["type=volume", "src=Bad_Name", "dst=/data"], "not a PersistentVolumeClaim name"),
           (["src=pvc", "dst=/data"], "--mounts src=pvc,dst=/data: type must be specified first"),
           (["type=volume", "src=a", "dst=/d", "type=volume", "src=b", "dst=/d"], "two volumes mounted at /d")]
    for mounts, message in bad:
        for fn in (components.calibrate, components.qat):
            with pytest.raises(ValueError) as info:
                fn(recipe="r", data="s3://b/d", out="s3://b/o", mounts=mounts)
            assert message in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="--mounts: type=bind"):
        components.ddp(mounts=["type=bind", "src=/x", "dst=/y"])


@pytest.mark.parametrize("args,message", [
    (["ptq", "--recipe", "r", "--calib_data", "s3://b/d", "--out", "s3://b/o", "--mounts", "type=bind,src=/mnt/imagenet,dst=/data"],
     "--mounts: type=bind (a host path) is not allowed"),
    (["ddp", "--nnodes", "2", "--gpus", "4", "--nproc_per_node", "1", "--", "evaluate"],
     "--nproc_per_node 1 with --gpus 4: each node runs one rank per GPU"),
    (["qat", "--recipe", "r", "--data", "s3://b/d", "--out", "s3://b/o", "--cache_dir", "/var/cache/qc"],  # from the pre_proc
     "--cache_dir /var/cache/qc: not on a writable volume"),
])
def test_torchx_cli_reports_a_component_error_as_one_line(args, message):
    """A ComponentError is torchx's ComponentValidationException: the CLI prints the message after
    `got errors:`, with no traceback (before: ~20 lines of torchx's stack first), and exits 1 (torchx's
    status for a component error; a CLI of ours would exit 2)."""
    proc = _run(_torchx([f"jobs/components.py:{args[0]}"] + args[1:]))
    assert proc.returncode == 1 and "=== SCHEDULER REQUEST ===" not in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("torchx ") and ln.endswith(" ERROR"))
    assert lines[at + 1:at + 3] == [f"Failed to run component `jobs/components.py:{args[0]}` got errors:",
                                    lines[at + 2]] and lines[at + 2].startswith(message), lines
    assert len(lines) == at + 3  # the message ends the output


@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_help_documents_pvc_mounts_only(name):
    from torchx.specs.file_linter import get_fn_docstring

    _, args = get_fn_docstring(getattr(components, name))
    assert "type=volume,src=PVC_NAME,dst=" in args["mounts"]
    assert not re.search(r"type=bind,src", " ".join(args.values()))


def test_cache_dir_must_be_on_a_writable_volume():
    """The root filesystem is read-only: a cache outside /cache, /tmp and writable PVC mounts fails
    at submission, not in the pod."""
    ro = ["type=volume", "src=imagenet-pvc", "dst=/data", "readonly"]
    for cache_dir, mounts in (("/data/cache", ro), ("/var/cache/qc", None), ("/cachefoo", None)):
        app = components.qat(recipe="r", data="s3://b/d", out="s3://b/o", cache_dir=cache_dir, mounts=mounts)
        with pytest.raises(ValueError, match=f"--cache_dir {cache_dir}: not on a writable volume"):
            _ours(app)
    for cache_dir, mounts in (("/cache/shards", None), ("/tmp/c", None), ("/shards/x", ["type=volume", "src=c",
                                                                                       "dst=/shards"])):
        _ours(components.qat(recipe="r", data="s3://b/d", out="s3://b/o", cache_dir=cache_dir, mounts=mounts))
    with pytest.raises(ValueError, match="--cache_gb must be >= 1"):
        components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", cache_gb=0)


# ------------------------------------------------------------------------------ image

def _readme_images() -> List[str]:
    text = (REPO / "README.md").read_text()
    return [f"{m.group(1)}:{m.group(2)}" for m in re.finditer(r"IMAGE=(\S+) TAG=(\S+)", text)]


def test_one_image_reference_everywhere():
    """components.DEFAULT_IMAGE is the image of the chart (repository:tag = appVersion), of both
    kustomizations, of the README's and the Makefile's push examples."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    seen = {"chart values.yaml": f"{values['image']['repository']}:{values['image']['tag']}",
            "Chart.yaml appVersion": f"{values['image']['repository']}:{chart['appVersion']}"}
    for kust in ("k8s/kustomization.yaml", "k8s/qat/kustomization.yaml"):
        (img,) = [i for i in yaml.safe_load((REPO / kust).read_text())["images"] if i["name"] == "quantcore"]
        seen[kust] = f"{img['newName']}:{img['newTag']}"
    readme = _readme_images()
    makefile = re.findall(r"IMAGE=(\S+) TAG=(\S+)", (REPO / "images" / "Makefile").read_text())
    assert readme and makefile
    seen.update({f"README.md #{i}": r for i, r in enumerate(readme)})
    seen.update({f"images/Makefile #{i}": f"{n}:{t}" for i, (n, t) in enumerate(makefile)})
    differing = {where: ref for where, ref in seen.items() if ref != components.DEFAULT_IMAGE}
    assert not differing, f"not {components.DEFAULT_IMAGE}: {differing}"
    assert values["image"]["digest"] == ""  # pinned by digest only on purpose (then both must carry it)


def test_image_digest_passes_through_and_pull_secrets(jobs):
    (pod,) = _pods(jobs["evaluate"])
    assert pod["containers"][0]["image"] == f"registry.example.com/ml/quantcore@{DIGEST}"
    assert pod["containers"][0]["imagePullPolicy"] == "IfNotPresent"  # a digest never changes
    assert "imagePullSecrets" not in pod
    (pod,) = _pods(jobs["calibrate"])
    assert pod["containers"][0]["image"] == components.DEFAULT_IMAGE
    assert pod["containers"][0]["imagePullPolicy"] == "Always"  # a tag may move
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    for ref in (f"registry.example.com:5000/ml/quantcore:1.2.3@{DIGEST}", "quantcore:0.1.0", f"qc@{DIGEST}"):
        assert components.calibrate(recipe=["r"], data="s3://b/d", out="s3://b/o", image=ref).roles[0].image == ref


@pytest.mark.parametrize("image,message", [
    ("registry.example.com/ml/quantcore", "pin a release tag or a digest"),
    ("registry.example.com/ml/quantcore:latest", "pin a release tag or a digest"),
    ("registry.example.com/ml/QuantCore:1.0", "not a container image reference"),
    ("registry.example.com/ml/quantcore@sha256:abc", "not a container image reference"),
    ("quantcore:0.1.0 --privileged", "not a container image reference"),
])
def test_unpinned_or_malformed_images_are_refused(image, message):
    with pytest.raises(ValueError, match=re.escape(f"--image {image!r}: {message}")):
        components.qat(recipe="r", data="s3://b/d", out="s3://b/o", image=image)


# ------------------------------------------------------------------------------ queueing, priority, deadline

def test_labels_annotations_deadline_and_priority(jobs):
    job = jobs["calibrate"]
    labels = {"kueue.x-k8s.io/queue-name": "team-a", "team": "vision"}
    assert labels.items() <= job["metadata"]["labels"].items()
    assert job["metadata"]["annotations"] == {"owner": "ml@example.com"}
    (task,) = job["spec"]["tasks"]
    meta = task["template"]["metadata"]
    assert labels.items() <= meta["labels"].items() and meta["annotations"]["owner"] == "ml@example.com"
    assert meta["labels"]["torchx.pytorch.org/role-name"] == "calibrate"  # TorchX's own labels stay
    assert task["template"]["spec"]["activeDeadlineSeconds"] == 21600
    for name in ("evaluate", "ptq", "qat"):
        for pod in _pods(jobs[name]):
            assert "activeDeadlineSeconds" not in pod  # deadline_s 0: none
    # without -cfg priority_class no priority anywhere
    plain = _ours(components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o"))
    assert "priorityClassName" not in plain["spec"] and "priorityClassName" not in _pods(plain)[0]


@pytest.mark.parametrize("kwargs,message", [
    (dict(tolerations=["nvidia.com/gpu:NoScheduling"]), "--tolerations 'nvidia.com/gpu:NoScheduling': effect"),
    (dict(tolerations=["bad key"]), "--tolerations 'bad key': expected KEY[=VALUE][:EFFECT]"),
    (dict(node_selector={"gpu": "a b"}), "--node_selector: value 'a b' of gpu"),
    (dict(labels={"-bad": "x"}), "--labels: '-bad' is not a valid key"),
    (dict(annotations={"a/b/c": "x"}), "--annotations: 'a/b/c' is not a valid key"),
    (dict(image_pull_secrets=["Reg_Cred"]), "--image_pull_secrets: 'Reg_Cred' is not a Secret name"),
    (dict(s3_secret="s3 creds"), "--s3_secret: 's3 creds' is not a Secret name"),
    (dict(deadline_s=-1), "--deadline_s must be >= 0"),
    (dict(max_retries=-1), "--max_retries must be >= 0"),
])
def test_bad_cluster_options_name_the_option(kwargs, message):
    for fn in (lambda **kw: components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", **kw), components.ddp):
        with pytest.raises(ValueError) as info:
            fn(**kwargs)
        assert message in str(info.value)


def test_shared_options_are_declared_once():
    """Every component takes every PodOptions field, with its type and default (TorchX builds the CLI
    from the signature), and its --help carries the one help text unless it documents it itself."""
    import dataclasses
    import inspect
    import typing

    from torchx.specs.file_linter import get_fn_docstring

    for name in COMPONENT_NAMES:
        fn = getattr(components, name)
        params = inspect.signature(fn).parameters
        hints = typing.get_type_hints(fn)
        _, docs = get_fn_docstring(fn)
        for f in dataclasses.fields(components.PodOptions):
            if f.name in components.OPTIONS_NOT_TAKEN.get(name, ()):
                assert f.name not in params, (name, f.name)
                continue
            assert params[f.name].default == f.default, (name, f.name)
            assert hints[f.name] == typing.get_type_hints(components.PodOptions)[f.name], (name, f.name)
            assert docs[f.name].strip(), (name, f.name)


def test_namespace_enforces_restricted():
    (ns,) = kt.load_file(REPO / "k8s" / "namespace.yaml")
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


# ------------------------------------------------------------------------------ what `torchx run` submits

def test_torchx_run_submits_the_completed_job_to_an_api_stand_in_mock(tmp_path):
    """Not a dryrun: `torchx run -s kubernetes` against a Kubernetes API stand-in on 127.0.0.1. The
    Volcano Job it POSTs is the completed one (restricted, tolerations, exit-2 rule), valid strictly."""
    posted: List[Tuple[str, Dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: Dict[str, Any]) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            posted.append((self.path, body))
            self._send(201, body)

        def do_GET(self):  # noqa: N802
            if self.path.endswith("/status"):
                self._send(200, {"apiVersion": "batch.volcano.sh/v1alpha1", "kind": "Job",
                                 "status": {"state": {"phase": "Pending"}}})
            else:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "mock",
            "clusters": [{"name": "mock", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
            "users": [{"name": "mock", "user": {"token": "t"}}],
            "contexts": [{"name": "mock", "context": {"cluster": "mock", "user": "mock", "namespace": "quantcore"}}]}))
        cmd = [str(TORCHX), "run", "-s", "kubernetes", "--workspace=", "-cfg", f"{CFG},namespace=quantcore",
               "jobs/components.py:qat", "--recipe", "vit_b16_384_ft2", "--data", "s3://d", "--out", "s3://o",
               "--nnodes", "2", "--gpus", "2", "--s3_secret", "quantcore-s3-credentials"]
        proc = _run(cmd, KUBECONFIG=str(kubeconfig), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path, job), = posted
    assert path == "/apis/batch.volcano.sh/v1alpha1/namespaces/quantcore/jobs"
    assert f"kubernetes://torchx/quantcore:{job['metadata']['name']}" in proc.stdout
    assert kt.validate_object(job) == [] and security_problems(job) == []
    for task in job["spec"]["tasks"]:
        assert components.GPU_TOLERATION in task["template"]["spec"]["tolerations"]
        assert volcano_action(job, task["name"], "PodFailed", 2) == "TerminateJob"


def test_system_paths_cover_the_image_and_match_the_chart():
    """The directories a volume may not cover hold everything the image runs (its final stage's COPY
    targets and the PATH/PYTHONPATH/VIRTUAL_ENV entries under /), and the chart refuses the same list."""
    root = Path(__file__).resolve().parent.parent
    dockerfile = (root / "images" / "Dockerfile").read_text()
    final = dockerfile[dockerfile.rindex("\nFROM "):]
    targets = re.findall(r"^COPY\s.*\s(/\S+?)/?$", final, flags=re.M)
    targets += [p for v in re.findall(r"\b(?:PATH|PYTHONPATH|VIRTUAL_ENV)=(\S+)", final)
                for p in v.split(":") if p.startswith("/")]
    assert "/opt/quantcore/jobs" in targets and "/opt/venv/bin" in targets, targets
    for t in targets:
        assert any(t == p or t.startswith(p + "/") for p in components.SYSTEM_PATHS), t
    helpers = (root / "charts" / "quantcore" / "templates" / "_helpers.tpl").read_text()
    (chart_list,) = re.findall(r'range list ((?:"/[a-z0-9]+" ?)+) -}}\n\{\{- if or \(eq \$v.mountPath \.\) '
                               r'\(hasPrefix \(printf "%s/" \.\) \$v.mountPath\) -}}', helpers)
    assert tuple(re.findall(r'"([^"]+)"', chart_list)) == components.SYSTEM_PATHS


def test_dollar_signs_reach_the_container_as_torchx_passes_them():
    """`$(VAR)` in a URI would be expanded by the kubelet (another value, or the Secret's name);
    any `$` left after TorchX's own macros reaches the quantcore CLI as written, as it does on the
    local scheduler."""
    weird = {"data": "s3://data-b/img$(TORCHX_JOB_ID)", "out": "s3://out-b/a$(QUANTCORE_S3_SECRET)/$HOME/x$$y"}
    for fn, kw in ((components.calibrate, {"recipe": "r"}), (components.qat, {"recipe": "r", "nnodes": 2})):
        app = fn(**kw, **weird, s3_secret="quantcore-s3-credentials")
        (pod,) = _pods(_ours(app))[:1]
        (c,) = pod["containers"]
        cmd = container_command(c)
        words = shlex.split(cmd[2]) if cmd[:2] == ["bash", "-c"] else cmd
        # TorchX's macros turn $$ into $ on every scheduler; the rest is literal
        assert weird["data"] in words and "s3://out-b/a$(QUANTCORE_S3_SECRET)/$HOME/x$y" in words, words
        if fn is components.qat:  # the shell's own variables still reach bash
            assert "${TORCHX_RANK0_HOST:=localhost}" in cmd[2] or "_0_HOSTS:=localhost}" in cmd[2], cmd[2]
