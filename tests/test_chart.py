"""The Helm chart on a shared GPU cluster (issue #9), rendered with the real helm and validated
strictly (tests/k8s_tools.py), each defect with a test that fails on the old templates:

* RBAC never binds the namespace's `default` ServiceAccount;
* final object names are unique DNS labels, long names are cut with a hash suffix;
* no Job or RayJob reads what another one of the same release writes (they start together);
* a pod with G > 1 GPUs runs G data-parallel ranks (jobs.torchrun), not one process;
* a CPU sweep asks no GPU per Ray task; a task no worker can hold is refused;
* labels, pod annotations, priority classes, Kueue and Volcano on every Job, RayJob and pod;
* no default GPU node label; `helm test` pods that run here against the real code (and a mock S3);
* Ray pods: HTTP probes without wget (the documented KubeRay minimum depends on it), an object
  store that Ray itself places into /dev/shm, and an optional PodMonitor for the metrics port.
"""
from __future__ import annotations

import copy
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from unittest import mock

import pytest
import yaml

import k8s_tools as kt
from test_k8s import (  # noqa: F401  (fixtures: used by name; _hermetic_helm is autouse)
    CHART, GOOD_QAT, GOOD_RUN, K8S, REPO, TORCHRUN, _cli_parse, _gpu_limit, _hermetic_helm, _jobs_module, _run,
    bins, by_run, chart_renders, helm_template, is_qat_job, kustomize_qat_render, kustomize_render, of_kind,
    qat_torchrun_args, quantcore_argv, rbac_problems, render, security_problems,
)

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
GI = 2 ** 30


def values_file(tmp_path: Path, values: Dict[str, Any], name: str = "values.yaml") -> Path:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(values))
    return f


def refused(bins, tmp_path, values: Dict[str, Any], *files: Path, sets=()) -> str:
    """helm's error message for values the chart must refuse (fails the test if it renders)."""
    proc = helm_template(bins, *files, values_file(tmp_path, values), sets=sets)
    assert proc.returncode != 0, f"rendered: {values}"
    return proc.stderr


def pod_templates(obj: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """(location, pod template or Pod) of every pod an object creates: metadata and spec."""
    if obj["kind"] == "Pod":
        return [(f"Pod/{obj['metadata']['name']}", obj)]
    if obj["kind"] == "Job":
        return [(f"Job/{obj['metadata']['name']}", obj["spec"]["template"])]
    return [(f"{obj['kind']}/{obj['metadata']['name']}{p}", t) for p, t in kt.embedded_pod_templates(obj)]


def ray_node_templates(obj: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any], Dict[str, Any]]]:
    """(name, group spec with rayStartParams, pod template) of the head and every worker group."""
    cluster = obj["spec"]["rayClusterSpec"]
    out = [("head", cluster["headGroupSpec"], cluster["headGroupSpec"]["template"])]
    out += [(g["groupName"], g, g["template"]) for g in cluster.get("workerGroupSpecs") or []]
    return out


def all_rayjobs(chart_renders, kustomize_render, kustomize_qat_render):
    objs = [o for docs in chart_renders.values() for o in docs] + kustomize_render + kustomize_qat_render
    return of_kind(objs, "RayJob")


# --- 1. RBAC never binds the namespace's default ServiceAccount ----------------------------------

def test_rbac_refuses_to_bind_the_default_service_account(bins, tmp_path):
    for sa in ({"create": False, "name": ""}, {"create": False, "name": "default"},
               {"create": True, "name": "default"}):
        err = refused(bins, tmp_path, {"serviceAccount": sa, "runs": [GOOD_RUN]})
        assert "`default` ServiceAccount" in err and "serviceAccount.name" in err, err
    # the same values without RBAC: nothing is bound, the pods run as `default` without a token
    objs = render(bins, values_file(tmp_path, {"serviceAccount": {"create": False, "name": ""},
                                                "rbac": {"create": False}, "runs": [GOOD_RUN]}))
    assert not of_kind(objs, "RoleBinding") and not of_kind(objs, "ServiceAccount")
    for o in objs:
        for where, spec in kt.pod_specs(o):
            assert spec["serviceAccountName"] == "default" and spec["automountServiceAccountToken"] is False, where
    # an existing dedicated account is bound as it is
    objs = render(bins, values_file(tmp_path, {"serviceAccount": {"create": False, "name": "ml-runner"}}))
    (rb,) = of_kind(objs, "RoleBinding")
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "ml-runner", "namespace": "ml-batch"}]
    assert not [p for p in rbac_problems(objs, {"quantcore-s3-credentials"}) if "default" in p]


# --- 2. names ------------------------------------------------------------------------------------

LONG_RELEASE = "nightly-quantization-sweep-for-the-vision-team-2024"  # 51 of helm's 53 characters


def _long_name_values() -> Dict[str, Any]:
    prefix = "v" * 36  # 40-character run names that share their first 38 characters
    runs = []
    for mode in ("calibrate", "evaluate", "ptq", "qat"):
        for k in ("a", "b"):
            run = {**GOOD_RUN, "mode": mode, "name": f"{prefix}-{mode[0]}{k}", "out": f"s3://out/{mode}-{k}"}
            if mode == "evaluate":
                run = {**{x: y for x, y in run.items() if x != "recipe"}, "model": "s3://models/x/model.qc.pt"}
            runs.append(run)
    sweep = {"enabled": True, "name": "s" * 18 + "-a", "out": "s3://out/sweep",
             "config": {"runs": [{"name": "one", "recipe": "vit_b16_int8", "calib_data": "s3://data/x"}]}}
    ray_qat = {"enabled": True, "name": "s" * 18 + "-b", "recipe": "vit_b16_int8_qat", "data": "s3://data/x",
               "out": "s3://out/rayqat"}
    return {"runs": runs, "sweep": sweep, "rayQat": ray_qat, "recipes": {"r": {"model": {"name": "m"}}}}


def name_problems(objs: List[Dict[str, Any]]) -> List[str]:
    """Final names: unique per kind, DNS-1123 labels of at most 63 characters (Services: DNS-1035),
    qat Jobs leave room for the pod index, RayJobs for KubeRay's derived names."""
    problems, seen = [], {}
    for o in objs:
        kind, name = o["kind"], o["metadata"]["name"]
        if (kind, name) in seen:
            problems.append(f"{kind}/{name} rendered twice")
        seen[(kind, name)] = o
        if not DNS1123_LABEL.match(name) or len(name) > 63:
            problems.append(f"{kind}/{name}: not a DNS-1123 label of at most 63 characters")
        if kind == "Service" and not DNS1035_LABEL.match(name):
            problems.append(f"Service/{name}: not a DNS-1035 label")
        if kind == "RayJob" and len(name) > 47:
            problems.append(f"RayJob/{name}: longer than KubeRay's 47 characters")
        if kind == "Job" and is_qat_job(o) and len(f"{name}-{o['spec']['completions'] - 1}") > 63:
            problems.append(f"Job/{name}: pod hostname {name}-<index> longer than 63 characters")
        for v in (o["metadata"].get("labels") or {}).values():
            if len(v) > 63:
                problems.append(f"{kind}/{name}: label value {v!r} longer than 63 characters")
    return problems


def test_long_names_stay_unique_dns_labels(bins, tmp_path):
    f = values_file(tmp_path, _long_name_values())
    proc = _run([bins.helm, "template", LONG_RELEASE, CHART, "--namespace", "ml-batch", "--kube-version", "1.30.0",
                 "-f", f])
    assert proc.returncode == 0, proc.stderr
    objs = kt.load_docs(proc.stdout)
    assert name_problems(objs) == [] and kt.validate_all(objs) == []
    jobs = of_kind(objs, "Job")
    assert len(jobs) == 8 and len({j["metadata"]["name"] for j in jobs}) == 8
    # the run names differ only after the cut: the names end in a hash of the whole name
    assert all(re.search(r"-[0-9a-f]{8}$", j["metadata"]["name"]) for j in jobs)
    assert len(of_kind(objs, "RayJob")) == 2 and len(of_kind(objs, "Service")) == 2
    # plain truncation, as the chart did before, makes them collide: the checker says so
    cut = copy.deepcopy(objs)
    for o in cut:
        if o["kind"] in ("Job", "Service", "RayJob"):
            o["metadata"]["name"] = o["metadata"]["name"][: 47 if o["kind"] == "RayJob" else 52].rstrip("-")
    assert any("rendered twice" in p for p in name_problems(cut))


def test_name_checker_flags_bad_names(chart_renders):
    objs = copy.deepcopy(chart_renders["qat-values.yaml"])
    assert name_problems(objs) == []
    svc = next(o for o in objs if o["kind"] == "Service")
    svc["metadata"]["name"] = "1" + svc["metadata"]["name"]
    job = next(o for o in objs if o["kind"] == "Job")
    job["metadata"]["name"] = "x" * 62
    problems = name_problems(objs)
    assert any("DNS-1035" in p for p in problems) and any("pod hostname" in p for p in problems)


# --- 3. no run reads what another run of the release writes ---------------------------------------

def _flag_values(argv: List[str], flags: Tuple[str, ...]) -> List[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in flags]


def data_flow(objs: List[Dict[str, Any]]) -> List[Tuple[str, List[str], List[str]]]:
    """(workload, the URIs it writes, the URIs it reads) of every Job and RayJob, from the command
    lines as the real parsers read them (quantcore CLI, torchrun, jobs.ray_qat, jobs.ray_sweep + its
    sweep file from the rendered ConfigMap)."""
    reads = ("--checkpoint", "--data", "--calib-data", "--eval-data", "--init", "--recipe")
    cms = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    out = []
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Job":
            argv = qat_torchrun_args(o).training_script_args if is_qat_job(o) else quantcore_argv(o)
            out.append((name, _flag_values(argv, ("--out",)), _flag_values(argv, reads)))
        elif o["kind"] == "RayJob":
            argv = shlex.split(o["spec"]["entrypoint"])
            if argv[:3] == ["python", "-m", "jobs.ray_qat"]:
                out.append((name, _flag_values(argv, ("--out",)), _flag_values(argv, reads)))
            else:
                ray_sweep = _jobs_module("jobs.ray_sweep")
                args = ray_sweep._parser().parse_args(argv[3:])
                head = o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
                vol = next(v for v in head["volumes"] if v["name"] == "sweep")
                sweep = ray_sweep.parse_sweep(yaml.safe_load(cms[vol["configMap"]["name"]]["data"]["sweep.yaml"]))
                inputs = [u for r in sweep.runs for u in (r.checkpoint, r.calib_data, r.eval_data) if u]
                out.append((name, [args.out], inputs))
    return out


def _under(uri: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return uri.rstrip("/") == prefix or uri.startswith(prefix + "/")


def data_flow_problems(objs: List[Dict[str, Any]]) -> List[str]:
    flow = data_flow(objs)
    problems = []
    for name, outs, _ in flow:
        for other, other_outs, reads in flow:
            if other == name:
                continue
            problems += [f"{other} reads {u}, which {name} writes (out {o}) in the same release"
                         for o in outs for u in reads if _under(u, o)]
            if name < other:
                problems += [f"{name} and {other} both write {o}" for o in outs for p in other_outs
                             if o.rstrip("/") == p.rstrip("/")]
    return problems


def test_no_workload_reads_what_another_of_its_release_writes(chart_renders):
    for name, objs in chart_renders.items():
        assert data_flow_problems(objs) == [], name
    flow = data_flow(chart_renders["sweep-values.yaml"])
    assert len(flow) == 5 and all(outs for _, outs, _ in flow)


def test_data_flow_checker_catches_the_calibrate_then_evaluate_race(chart_renders):
    objs = copy.deepcopy(chart_renders["sweep-values.yaml"])
    jobs = by_run(objs)
    calib_out = _flag_values(quantcore_argv(jobs["vit-site-calib"]), ("--out",))[0]
    args = jobs["vit-site-eval"]["spec"]["template"]["spec"]["containers"][0]["args"]
    args[args.index("--checkpoint") + 1] = f"{calib_out}/vit_b16_w8a8_site/model.qc.pt"  # the old ci file
    (problem,) = data_flow_problems(objs)
    assert "vit-site-eval reads s3://quantcore-runs/site/calib/vit_b16_w8a8_site/model.qc.pt" in problem


def test_chart_refuses_runs_that_read_another_runs_output(bins, tmp_path):
    calib = {**GOOD_RUN, "name": "calib", "out": "s3://runs/site/calib"}
    evaluate = {**{k: v for k, v in GOOD_RUN.items() if k != "recipe"}, "name": "eval", "mode": "evaluate",
                "model": "s3://runs/site/calib/vit_b16_int8/model.qc.pt", "out": "s3://runs/site/eval"}
    err = refused(bins, tmp_path, {"runs": [calib, evaluate]})
    assert ("runs[1] (eval).model reads s3://runs/site/calib/vit_b16_int8/model.qc.pt, which runs[0] (calib) "
            "writes") in err and "mode ptq" in err
    qat = {**GOOD_QAT, "init": "s3://runs/site/calib/vit_b16_int8/model.qc.pt"}
    assert "runs[1] (q1).init reads" in refused(bins, tmp_path, {"runs": [calib, qat]})
    ray_qat = {"enabled": True, "recipe": "vit_b16_int8_qat", "data": "s3://runs/site/calib",
               "out": "s3://runs/ray-qat"}
    assert "rayQat.data reads s3://runs/site/calib" in refused(bins, tmp_path, {"runs": [calib], "rayQat": ray_qat})
    sweep = {"enabled": True, "out": "s3://runs/sweep", "config": {"runs": [
        {"name": "x", "recipe": "vit_b16_int8", "calib_data": "s3://data/x",
         "checkpoint": "s3://runs/site/calib/w.pt"}]}}
    assert "sweep.config.runs[0].checkpoint reads" in refused(bins, tmp_path, {"runs": [calib], "sweep": sweep})
    # a prefix that merely starts the same is another output
    other = {**evaluate, "model": "s3://runs/site/calibration-2024/model.qc.pt"}
    assert data_flow_problems(render(bins, values_file(tmp_path, {"runs": [calib, other]}))) == []


# --- 4. G GPUs = G data-parallel ranks ------------------------------------------------------------

def gpu_process_problems(job: Dict[str, Any]) -> List[str]:
    """A pod with G GPUs must start G ranks, one per GPU (torchrun --nproc_per_node G, --device
    cuda, which each rank maps to cuda:LOCAL_RANK); exit 2 must still reach the podFailurePolicy."""
    from torch.distributed.run import get_args_parser

    name = job["metadata"]["name"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    gpus = int(_gpu_limit(c) or 0)
    if is_qat_job(job):
        a = qat_torchrun_args(job)
        ranks, argv = int(a.nproc_per_node), a.training_script_args
    elif c["command"] == TORCHRUN:
        a = get_args_parser().parse_args(c["args"])
        ranks, argv = int(a.nproc_per_node), a.training_script_args
    else:
        ranks, argv = 1, c["args"]
    problems = []
    if gpus > 1 and ranks != gpus:
        problems.append(f"{name}: {gpus} GPUs but {ranks} process(es): the other GPUs idle")
    device = dict(zip(argv, argv[1:])).get("--device")
    if gpus and device != "cuda":
        problems.append(f"{name}: --device {device} with {gpus} GPUs")
    return problems


def test_every_gpu_of_a_pod_gets_its_own_rank(chart_renders, kustomize_render, kustomize_qat_render):
    jobs = [j for objs in chart_renders.values() for j in of_kind(objs, "Job")]
    jobs += of_kind(kustomize_render, "Job") + of_kind(kustomize_qat_render, "Job")
    assert sum(int(_gpu_limit(j["spec"]["template"]["spec"]["containers"][0]) or 0) > 1 for j in jobs) >= 4
    for job in jobs:
        assert gpu_process_problems(job) == [], job["metadata"]["name"]


def test_eight_gpus_run_eight_ranks_in_every_mode(bins, tmp_path):
    runs = [{**GOOD_RUN, "name": "c", "gpus": 8, "out": "s3://out/c"},
            {**{k: v for k, v in GOOD_RUN.items() if k != "recipe"}, "name": "e", "mode": "evaluate",
             "model": "s3://models/model.qc.pt", "gpus": 8, "out": "s3://out/e"},
            {**GOOD_RUN, "name": "p", "mode": "ptq", "gpus": 8, "out": "s3://out/p"}]
    objs = render(bins, values_file(tmp_path, {"runs": runs}))
    assert kt.validate_all(objs) == []
    for job in of_kind(objs, "Job"):
        c = job["spec"]["template"]["spec"]["containers"][0]
        assert c["command"] == TORCHRUN and gpu_process_problems(job) == []
        assert c["args"][:5] == ["--standalone", "--nproc_per_node", "8", "--max_restarts", "0"]
        _cli_parse(quantcore_argv(job))  # the ranks' command line is one the CLI accepts
        rule = job["spec"]["podFailurePolicy"]["rules"][0]  # jobs.torchrun passes a rank's exit 2 on
        assert rule["onExitCodes"] == {"containerName": c["name"], "operator": "In", "values": [2]}
    # what the chart did before: one process on 8 GPUs
    old = copy.deepcopy(of_kind(objs, "Job")[0])
    c = old["spec"]["template"]["spec"]["containers"][0]
    c["command"], c["args"] = ["quantcore"], quantcore_argv(old)
    assert any("8 GPUs but 1 process" in p for p in gpu_process_problems(old))


# --- 5. the sweep's Ray tasks fit the workers ----------------------------------------------------

def sweep_task_problems(rayjob: Dict[str, Any]) -> List[str]:
    """jobs.ray_sweep's per-task GPUs/CPUs (as its parser reads the entrypoint) must fit a worker
    (KubeRay advertises the container limits), else the tasks wait until activeDeadlineSeconds."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    if argv[:3] != ["python", "-m", "jobs.ray_sweep"]:
        return []
    args = _jobs_module("jobs.ray_sweep")._parser().parse_args(argv[3:])
    problems = []
    for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        c = g["template"]["spec"]["containers"][0]
        gpus = int(_gpu_limit(c) or 0)
        cpu = str(c["resources"]["limits"]["cpu"])
        cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        if args.gpus_per_task > gpus:
            problems.append(f"{g['groupName']}: a task asks {args.gpus_per_task:g} GPU, a worker has {gpus}")
        if args.cpus_per_task > cpus:
            problems.append(f"{g['groupName']}: a task asks {args.cpus_per_task:g} CPU, a worker has {cpus:g}")
    return problems


def test_sweep_tasks_fit_the_workers(bins, tmp_path, chart_renders, kustomize_render):
    rayjobs = [o for objs in chart_renders.values() for o in of_kind(objs, "RayJob")] + of_kind(kustomize_render,
                                                                                                 "RayJob")
    assert sum(shlex.split(r["spec"]["entrypoint"])[2] == "jobs.ray_sweep" for r in rayjobs) >= 3
    for rj in rayjobs:
        assert sweep_task_problems(rj) == [], rj["metadata"]["name"]
    sweep = CHART / "ci" / "sweep-values.yaml"
    (cpu,) = of_kind(render(bins, sweep, sets=["sweep.workers.gpus=0"]), "RayJob")
    args = _jobs_module("jobs.ray_sweep")._parser().parse_args(shlex.split(cpu["spec"]["entrypoint"])[3:])
    assert args.gpus_per_task == 0 and sweep_task_problems(cpu) == []
    # the entrypoint as it was (no --gpus-per-task: jobs.ray_sweep's default of 1) on CPU workers
    old = copy.deepcopy(cpu)
    old["spec"]["entrypoint"] = re.sub(r" --gpus-per-task \S+", "", old["spec"]["entrypoint"])
    assert any("asks 1 GPU, a worker has 0" in p for p in sweep_task_problems(old))
    (half,) = of_kind(render(bins, sweep, values_file(tmp_path, {"sweep": {"gpusPerTask": 0.5}})), "RayJob")
    assert "--gpus-per-task 0.5" in half["spec"]["entrypoint"]
    err = refused(bins, tmp_path, {}, sweep, sets=["sweep.workers.gpus=0", "sweep.gpusPerTask=1"])
    assert "sweep.gpusPerTask (1) exceeds sweep.workers.gpus (0)" in err and "sweep.gpusPerTask: 0" in err
    assert "sweep.cpusPerTask (16) exceeds" in refused(bins, tmp_path, {}, sweep, sets=["sweep.cpusPerTask=16"])


# --- 6. labels, annotations, priority classes, deadlines, Kueue, Volcano ------------------------

def test_every_pod_gets_labels_annotations_and_a_priority_class(chart_renders):
    objs = chart_renders["kueue-values.yaml"]
    pods = [(w, t) for o in objs for w, t in pod_templates(o)]
    assert len(pods) >= 10  # 3 Jobs, 2 RayJobs x (submitter, head, worker), 2 test pods
    for where, tpl in pods:
        meta, spec = tpl["metadata"], tpl["spec"]
        assert spec.get("priorityClassName") in ("batch-low", "batch-high"), where
        assert meta["labels"]["team"] == "vision" and meta["labels"]["cost-center"] == "ml-1234", where
        ann = meta.get("annotations") or {}
        assert ann["sidecar.istio.io/inject"] == "false", where  # a default opt-out
        assert "linkerd.io/inject" not in ann, where  # removed with null
        assert ann["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false", where
        if not where.startswith("Pod/"):
            assert ann["example.com/owner"] == "vision-team", where
    assert all(o["metadata"]["labels"]["team"] == "vision" for o in objs)
    jobs = by_run(objs)
    assert jobs["vit-8gpu-ptq"]["spec"]["template"]["spec"]["priorityClassName"] == "batch-high"  # run override
    rayjobs = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in of_kind(objs, "RayJob")}
    for _, tpl in pod_templates(rayjobs["ray-qat"]):
        assert tpl["spec"]["priorityClassName"] == "batch-high"
    # the chart's own labels stay the chart's
    objs_default = chart_renders["minimal-values.yaml"]
    assert all("team" not in (o["metadata"].get("labels") or {}) for o in objs_default)


def test_kueue_queues_every_job_and_rayjob_suspended(chart_renders):
    objs = chart_renders["kueue-values.yaml"]
    queued = {o["metadata"]["name"]: o for o in objs if o["kind"] in ("Job", "RayJob")}
    assert len(queued) == 5
    for name, o in queued.items():
        labels = o["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] in ("gpu-batch", "cpu-batch") and o["spec"]["suspend"] is True, name
        assert o["spec"]["activeDeadlineSeconds"] > 0, name
        if o["kind"] == "RayJob":
            # Kueue admits a RayJob only if its cluster goes away with the job, and cannot size an autoscaler
            assert o["spec"]["shutdownAfterJobFinishes"] is True, name
            assert o["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is False, name
        else:
            assert labels["kueue.x-k8s.io/priority-class"] == "batch-low", name
            # the queue label is the Job's: Kueue's pod integration must not see the pods as workloads
            assert "kueue.x-k8s.io/queue-name" not in o["spec"]["template"]["metadata"]["labels"], name
    assert by_run(objs)["deit-eval"]["spec"]["activeDeadlineSeconds"] == 43200
    for o in chart_renders["minimal-values.yaml"]:
        assert "kueue.x-k8s.io/queue-name" not in (o["metadata"].get("labels") or {})
        if o["kind"] == "Job":
            assert "suspend" not in o["spec"]


def test_volcano_schedules_the_pods_in_its_queue(chart_renders):
    objs = chart_renders["volcano-values.yaml"]
    jobs = by_run(objs)
    for run, job in jobs.items():
        pod = job["spec"]["template"]
        assert pod["spec"]["schedulerName"] == "volcano", run
        assert pod["metadata"]["annotations"]["scheduling.volcano.sh/queue-name"] == "ml", run
        assert job["metadata"]["annotations"]["scheduling.volcano.sh/queue-name"] == "ml", run
        assert "suspend" not in job["spec"], run
    # the qat gang: Volcano's PodGroup for the Job wants all nnodes pods
    assert jobs["vit-qat"]["metadata"]["annotations"]["scheduling.volcano.sh/group-min-member"] == "2"
    (rj,) = of_kind(objs, "RayJob")
    labels = rj["metadata"]["labels"]
    assert (labels["ray.io/scheduler-name"], labels["volcano.sh/queue-name"], labels["ray.io/priority-class-name"]) \
        == ("volcano", "ml", "batch-high")
    for where, tpl in pod_templates(rj):  # KubeRay sets the scheduler of the Ray pods itself
        assert "schedulerName" not in tpl["spec"], where


def test_queueing_guards(bins, tmp_path):
    err = refused(bins, tmp_path, {"runs": [{**GOOD_RUN, "queueName": "q", "volcanoQueue": "v"}]})
    assert "runs[0]: set queueName (Kueue) or volcanoQueue (Volcano), not both" in err
    sweep = CHART / "ci" / "sweep-values.yaml"
    err = refused(bins, tmp_path, {}, sweep, sets=["sweep.queueName=q", "sweep.shutdownAfterJobFinishes=false"])
    assert "sweep.queueName needs sweep.shutdownAfterJobFinishes: true" in err
    err = refused(bins, tmp_path, {"runs": [{**GOOD_RUN, "labels": {"app.kubernetes.io/instance": "other"}}]})
    assert "runs[0].labels: label app.kubernetes.io/instance is set by the chart" in err
    err = refused(bins, tmp_path, {"labels": {"quantcore.io/run": "x"}, "runs": [GOOD_RUN]})
    assert "labels: label quantcore.io/run is set by the chart" in err


# --- 7. GPU node selection --------------------------------------------------------------------------

def test_gpu_pods_need_no_node_label_unless_configured(bins, tmp_path):
    cpu_run = {**GOOD_RUN, "name": "cpu", "gpus": 0, "out": "s3://out/cpu"}
    objs = render(bins, values_file(tmp_path, {"runs": [GOOD_RUN, cpu_run]}))
    for o in objs:
        for where, spec in kt.pod_specs(o):
            assert "nodeSelector" not in spec, where  # GPU feature discovery labels are not assumed
    objs = render(bins, values_file(tmp_path, {"gpu": {"nodeSelector": {"nvidia.com/gpu.present": "true"}},
                                                "runs": [GOOD_RUN, cpu_run]}))
    jobs = by_run(objs)
    assert jobs["r1"]["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "nodeSelector" not in jobs["cpu"]["spec"]["template"]["spec"]


# --- 8. helm test ----------------------------------------------------------------------------------

def helm_test_pods(objs) -> Dict[str, Dict[str, Any]]:
    """The `helm test` hook pods of a render, by container name."""
    return {p["spec"]["containers"][0]["name"]: p for p in of_kind(objs, "Pod")
            if p["metadata"]["annotations"].get("helm.sh/hook") == "test"}


def test_helm_test_pods_are_rendered_hooks(chart_renders):
    for name, objs in chart_renders.items():
        pods = helm_test_pods(objs)
        has_s3 = name not in ("defaults",)
        assert set(pods) == ({"image", "s3"} if has_s3 else {"image"}), name
        for pod in pods.values():
            spec = pod["spec"]
            assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] == 600, name
            assert spec["automountServiceAccountToken"] is False and security_problems(pod) == [], name
            assert pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation"


def test_helm_tests_can_be_switched_off(bins):
    objs = render(bins, CHART / "ci" / "sweep-values.yaml", sets=["tests.enabled=false"])
    assert not helm_test_pods(objs)


def _run_test_pod(pod: Dict[str, Any], env: Dict[str, str], recipes: Optional[Path] = None,
                  args: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    """Run a test pod's container command here, with this repository's code and interpreter as the
    image's; the inline recipes (mounted at /etc/quantcore/recipes) come from `recipes`."""
    c = pod["spec"]["containers"][0]
    assert c["command"][:2] == ["python", "-c"]
    argv = list(c["args"] if args is None else args)
    if recipes is not None:
        argv = [a.replace("/etc/quantcore/recipes", str(recipes)) for a in argv]
    return subprocess.run([sys.executable, "-c", c["command"][2]] + argv, capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)})


def _recipes_dir(objs, tmp_path: Path) -> Path:
    d = tmp_path / "recipes"
    d.mkdir(exist_ok=True)
    for cm in of_kind(objs, "ConfigMap"):
        if cm["metadata"]["name"].endswith("-recipes"):
            for key, text in cm["data"].items():
                (d / key).write_text(text)
    return d


def test_image_test_pod_passes_on_this_code_and_names_what_fails(chart_renders, tmp_path):
    objs = chart_renders["sweep-values.yaml"]
    pod = helm_test_pods(objs)["image"]
    args = pod["spec"]["containers"][0]["args"]
    assert "ray=2.60.0" in args and "recipe=vit_b16_int8_mixed" in args
    assert "recipe=/etc/quantcore/recipes/vit_b16_w8a8_site.yaml" in args
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = _run_test_pod(pod, env, _recipes_dir(objs, tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok  ") == len(args) + 4  # 4 imports
    bad = _run_test_pod(pod, env, _recipes_dir(objs, tmp_path), args=["ray=2.0.0", "recipe=vit_b16_int9"] + args)
    assert bad.returncode == 1
    failed = [ln for ln in bad.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(failed) == 2 and "rayVersion 2.0.0" in failed[0] and "vit_b16_int9" in failed[1]


def test_s3_test_pod_against_mock_s3(chart_renders, s3_server, s3_client):
    objs = chart_renders["sweep-values.yaml"]
    pod = helm_test_pods(objs)["s3"]
    c = pod["spec"]["containers"][0]
    args = c["args"]
    assert sorted(a.split("=", 1)[0] for a in args) == ["in"] * 4 + ["out"] * 5
    # the container's environment as the kubelet would set it (Secret values from the mock)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for e in c["env"]:
        env[e["name"]] = e.get("value", "testing")
    assert env["AWS_ENDPOINT_URL"] == "http://minio.minio.svc.cluster.local:9000"
    env.update(AWS_ENDPOINT_URL=s3_server, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    env.pop("AWS_SESSION_TOKEN", None)  # moto accepts any credentials; a token needs a real STS
    for bucket in {a.split("=", 1)[1][5:].split("/")[0] for a in args}:
        try:
            s3_client.create_bucket(Bucket=bucket)
        except s3_client.exceptions.BucketAlreadyOwnedByYou:
            pass
    for a in args:
        kind, uri = a.split("=", 1)
        bucket, _, key = uri[5:].partition("/")
        if kind == "in":  # objects are stored as they are; datasets are prefixes with objects under them
            s3_client.put_object(Bucket=bucket, Key=key if key.endswith(".pt") else f"{key}/train/shard-0.zip",
                                 Body=b"x")
    proc = _run_test_pod(pod, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok  ") == len(args)
    # a missing input and a missing output bucket are named
    s3_client.delete_object(Bucket="datasets", Key="imagenet-val-zip/train/shard-0.zip")
    proc = _run_test_pod(pod, env, args=args + ["out=s3://no-such-bucket-here/x"])
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL")]
    assert proc.returncode == 1 and len(failed) == 2
    assert "in=s3://datasets/imagenet-val-zip" in failed[0] and "out=s3://no-such-bucket-here/x" in failed[1]


# --- 9. KubeRay probes: no wget, and the documented minimum ----------------------------------------

CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
KUBERAY_MIN = CHART_META["annotations"]["quantcore.io/kuberay-min-version"]
RAY_MIN = CHART_META["annotations"]["quantcore.io/ray-min-version"]
# KubeRay injects liveness/readiness probes into a Ray container that declares none. Up to 1.5 they
# are `bash -c "wget ... /api/local_raylet_healthz ..."` exec probes (the image need not have wget);
# from 1.6 on, for Ray >= 2.53, httpGet probes on /api/healthz (kuberay PR #4448).
KUBERAY_HTTP_PROBES = (1, 6)


def _version(v: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def ray_probe_problems(rayjob: Dict[str, Any]) -> List[str]:
    """Probes KubeRay >= KUBERAY_MIN would leave or put on the Ray containers that need a tool the
    image may lack, or that point where Ray serves no health endpoint."""
    problems = []
    for group, spec, tpl in ray_node_templates(rayjob):
        c = tpl["spec"]["containers"][0]
        port = int(spec["rayStartParams"].get("dashboard-agent-listen-port", 52365))
        for kind in ("readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe is None:
                if _version(KUBERAY_MIN)[:2] < KUBERAY_HTTP_PROBES:
                    problems.append(f"{group}: no {kind}: KubeRay {KUBERAY_MIN} would inject a wget exec probe")
                continue
            if "exec" in probe:
                problems.append(f"{group}: {kind} runs {probe['exec']['command']} (the image has no such tools)")
            get = probe.get("httpGet") or {}
            if (get.get("path"), get.get("port")) != ("/api/healthz", port):
                problems.append(f"{group}: {kind} {get} is not Ray's health endpoint :{port}/api/healthz")
    return problems


def test_ray_health_endpoint_is_where_the_probes_look():
    """The probes' endpoint exists in the ray the image installs (the lock pins the same ray)."""
    import ray
    from ray._private import ray_constants
    from ray.dashboard.modules.reporter import healthz_agent

    assert ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT == 52365
    assert '@routes.get("/api/healthz")' in inspect.getsource(healthz_agent.HealthzAgent)
    assert _version(ray.__version__) >= _version(RAY_MIN)
    lock = (REPO / "requirements.lock").read_text()
    assert re.search(rf"^ray=={re.escape(ray.__version__)}$", lock, re.M)


def test_ray_pods_are_probed_without_wget(chart_renders, kustomize_render, kustomize_qat_render, bins, tmp_path):
    rayjobs = all_rayjobs(chart_renders, kustomize_render, kustomize_qat_render)
    assert len(rayjobs) >= 7
    for rj in rayjobs:
        assert ray_probe_problems(rj) == [], rj["metadata"]["name"]
        assert _version(rj["spec"]["rayClusterSpec"]["rayVersion"]) >= _version(RAY_MIN)
    # without them KubeRay 1.2-1.5 injects wget probes; with them as KubeRay 1.5 writes its own:
    bare = copy.deepcopy(rayjobs[0])
    for _, _, tpl in ray_node_templates(bare):
        tpl["spec"]["containers"][0].pop("readinessProbe")
    assert any("would inject a wget exec probe" in p for p in ray_probe_problems(bare))
    wget = copy.deepcopy(rayjobs[0])
    for _, _, tpl in ray_node_templates(wget):
        tpl["spec"]["containers"][0]["livenessProbe"] = {"exec": {"command": [
            "bash", "-c", "wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"]}}
    assert any("wget" in p for p in ray_probe_problems(wget))
    err = refused(bins, tmp_path, {}, CHART / "ci" / "sweep-values.yaml", sets=["sweep.rayVersion=2.52.0"])
    assert "need Ray >= 2.53" in err


def test_documented_kuberay_minimum_matches_the_templates():
    """One KubeRay minimum everywhere, and one the templates can stand: RayJob backoffLimit needs
    1.2; below 1.6 the Ray containers must declare their probes (ray_probe_problems above)."""
    assert _version(KUBERAY_MIN) >= (1, 2, 0)
    short = ".".join(KUBERAY_MIN.split(".")[:2])
    mention = re.compile(r"KubeRay(?:[\s#]+operator)?[\s#]*\(?\s*(?:>=|≥)\s*(\d+\.\d+)")
    files = [CHART / "README.md", K8S / "README.md"] + sorted(K8S.rglob("*.yaml")) + sorted(CHART.rglob("*.yaml"))
    found = {f.relative_to(REPO).as_posix(): set(mention.findall(f.read_text())) for f in files}
    assert found["charts/quantcore/README.md"] and found["k8s/README.md"]
    assert {v for vs in found.values() for v in vs} == {short}, found


# --- 10. the object store fits /dev/shm -------------------------------------------------------------

def _bytes(q: Any) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, q
    return int(float(m[1]) * {None: 1, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "Ki": 2 ** 10,
                              "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40}[m[2]])


def ray_object_store_problems(rayjob: Dict[str, Any]) -> List[str]:
    """Ray's own placement of each node's object store (ray._private.services.
    determine_plasma_store_config, with /dev/shm and the memory as the pod gives them): it must be
    /dev/shm, not the disk under /tmp, and Ray must start at all. The size is set explicitly
    (object-store-memory) so that a new memory limit cannot move it, and /dev/shm (in memory)
    must leave memory for the processes."""
    import ray._common.utils as ray_common
    import ray._private.services as services
    import ray._private.utils as ray_utils

    problems = []
    for group, spec, tpl in ray_node_templates(rayjob):
        pod = tpl["spec"]
        c = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        vols = {v["name"]: v for v in pod.get("volumes") or []}
        shm_vol = vols.get(mounts.get("/dev/shm"), {}).get("emptyDir") or {}
        memory = _bytes(c["resources"]["limits"]["memory"])
        if shm_vol.get("medium") != "Memory" or "sizeLimit" not in shm_vol:
            problems.append(f"{group}: /dev/shm is not an in-memory emptyDir with a sizeLimit")
            continue
        shm = _bytes(shm_vol["sizeLimit"])
        if shm >= memory:
            problems.append(f"{group}: /dev/shm ({shm}) is not below the memory limit ({memory})")
        param = spec["rayStartParams"].get("object-store-memory")
        if param is None:
            problems.append(f"{group}: no object-store-memory: Ray sizes the store from the memory limit")
        with mock.patch.object(ray_utils, "get_shared_memory_bytes", return_value=shm), \
                mock.patch.object(ray_common, "get_system_memory", return_value=memory):
            store = ray_utils.resolve_object_store_memory(memory, None if param is None else int(param))
            try:
                plasma_dir, _, _ = services.determine_plasma_store_config(store, "/tmp/ray")
            except ValueError as err:
                problems.append(f"{group}: Ray does not start: {err}")
                continue
        if plasma_dir != "/dev/shm":
            problems.append(f"{group}: Ray puts its {store}-byte object store into {plasma_dir}, not /dev/shm "
                            f"({shm} bytes)")
    return problems


def test_ray_object_store_fits_dev_shm(chart_renders, kustomize_render, kustomize_qat_render):
    rayjobs = all_rayjobs(chart_renders, kustomize_render, kustomize_qat_render)
    for rj in rayjobs:
        assert ray_object_store_problems(rj) == [], rj["metadata"]["name"]
    (sweep,) = of_kind(chart_renders["sweep-values.yaml"], "RayJob")
    workers = sweep["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["rayStartParams"]["object-store-memory"] == str(8 * GI)  # ci: 8Gi of a 16Gi /dev/shm
    # the sweep as rendered before: Ray's default store (30% of 32Gi) does not fit the 8Gi /dev/shm
    (old,) = of_kind(kustomize_render, "RayJob")
    old = copy.deepcopy(old)
    for _, spec, _ in ray_node_templates(old):
        spec["rayStartParams"].pop("object-store-memory")
    problems = ray_object_store_problems(old)
    assert any("into /tmp/ray, not /dev/shm" in p for p in problems), problems


def test_object_store_sizes_are_checked_when_rendering(bins, tmp_path):
    sweep = CHART / "ci" / "sweep-values.yaml"
    err = refused(bins, tmp_path, {}, sweep, sets=["sweep.workers.objectStoreMemory=32Gi"])
    assert "sweep.workers.objectStoreMemory (32Gi) exceeds sweep.workers.shmSize (16Gi)" in err
    err = refused(bins, tmp_path, {}, sweep, sets=["sweep.head.shmSize=8Gi"])
    assert "sweep.head.shmSize (8Gi) must be below sweep.head.resources.limits.memory (8Gi)" in err
    err = refused(bins, tmp_path, {}, sweep, sets=["sweep.head.objectStoreMemory=64Mi"])
    assert "below Ray's minimum object store of 75Mi" in err
    (rj,) = of_kind(render(bins, sweep, sets=["sweep.workers.objectStoreMemory=1536Mi"]), "RayJob")
    assert rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["object-store-memory"] == \
        str(1536 * 2 ** 20)


# --- 11. PodMonitor ----------------------------------------------------------------------------------

def podmonitor_problems(pm: Dict[str, Any], objs: List[Dict[str, Any]]) -> List[str]:
    """The PodMonitor selects every Ray head/worker pod of the release, and each declares the
    scraped port, which is Ray's metrics-export-port."""
    sel = pm["spec"]["selector"]
    port = pm["spec"]["podMetricsEndpoints"][0]["port"]

    def selected(labels: Dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in (sel.get("matchLabels") or {}).items()):
            return False
        for e in sel.get("matchExpressions") or []:
            if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
                return False
        return True

    problems = []
    for rj in of_kind(objs, "RayJob"):
        for group, spec, tpl in ray_node_templates(rj):
            where = f"{rj['metadata']['name']}/{group}"
            if not selected(tpl["metadata"]["labels"]):
                problems.append(f"{where}: not selected by PodMonitor {pm['metadata']['name']}")
            ports = {p["name"]: p["containerPort"] for p in tpl["spec"]["containers"][0].get("ports") or []}
            if str(ports.get(port)) != spec["rayStartParams"].get("metrics-export-port", "8080"):
                problems.append(f"{where}: port {port} ({ports.get(port)}) is not Ray's metrics-export-port")
    for o in objs:
        if o["kind"] == "Job":
            if selected(o["spec"]["template"]["metadata"]["labels"]):
                problems.append(f"Job/{o['metadata']['name']}: selected, but serves no metrics")
    return problems


def test_podmonitor_scrapes_every_ray_pod(chart_renders, bins):
    objs = chart_renders["kueue-values.yaml"]
    (pm,) = of_kind(objs, "PodMonitor")
    assert kt.validate_object(pm) == []
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["podMetricsEndpoints"][0]["interval"] == "30s"
    assert podmonitor_problems(pm, objs) == []
    for name, docs in chart_renders.items():  # off by default
        assert not of_kind(docs, "PodMonitor") or name == "kueue-values.yaml", name
    objs = render(bins, CHART / "ci" / "sweep-values.yaml", sets=["monitoring.podMonitor.enabled=true"])
    (pm,) = of_kind(objs, "PodMonitor")
    assert podmonitor_problems(pm, objs) == [] and kt.validate_all(objs) == []
    narrow = copy.deepcopy(pm)
    narrow["spec"]["selector"]["matchExpressions"][0]["values"] = ["sweep-head"]
    assert any("/gpu: not selected" in p for p in podmonitor_problems(narrow, objs))
    renamed = copy.deepcopy(pm)
    renamed["spec"]["podMetricsEndpoints"][0]["port"] = "http-metrics"
    assert any("is not Ray's metrics-export-port" in p for p in podmonitor_problems(renamed, objs))


PODMONITOR_MUTATIONS = {
    "unknown-endpoint-field": ("spec.podMetricsEndpoints.0.prot", "metrics", "prot"),
    "bad-interval": ("spec.podMetricsEndpoints.0.interval", "30 seconds", "interval"),
    "bad-scheme": ("spec.podMetricsEndpoints.0.scheme", "ftp", "scheme"),
    "bad-operator": ("spec.selector.matchExpressions.0.operator", "Within", "operator"),
    "unknown-spec-field": ("spec.podMetricEndpoints", [], "podMetricEndpoints"),
    "port-number-as-string": ("spec.podMetricsEndpoints.0.portNumber", "8080", "portNumber"),
}


@pytest.mark.parametrize("case", sorted(PODMONITOR_MUTATIONS))
def test_podmonitor_schema_rejects(chart_renders, case):
    (pm,) = of_kind(chart_renders["kueue-values.yaml"], "PodMonitor")
    path, value, needle = PODMONITOR_MUTATIONS[case]
    bad = copy.deepcopy(pm)
    node = bad
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    errors = kt.validate_object(bad)
    assert errors and any(needle in e for e in errors), errors
    missing = copy.deepcopy(pm)
    del missing["spec"]["selector"]
    assert any("selector" in e for e in kt.validate_object(missing))
