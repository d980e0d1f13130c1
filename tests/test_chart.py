"""The Helm chart on a shared GPU cluster (issue #9), rendered with the real helm and validated
strictly (tests/k8s_tools.py), each defect with a test that fails on the old templates:

* RBAC never binds the namespace's `default` ServiceAccount (and says which value is wrong);
* final object names are unique and valid for their kind (DNS-1123 subdomain / label, DNS-1035 for
  Services, RayJobs and KubeRay's derived names), release names that break them are refused, and
  long names are cut with a hash suffix that keeps the run name readable;
* no Job or RayJob reads what another one of the same release writes (they start together);
* a pod with G > 1 GPUs runs G data-parallel ranks (jobs.torchrun), not one process;
* a CPU sweep asks no GPU per Ray task; a task no worker can hold is refused;
* labels, pod annotations, priority classes, Kueue and Volcano on every Job, RayJob and pod;
* no default GPU node label; `helm test` pods that run here against the real code (and a mock S3);
* Ray pods: HTTP probes without wget (the documented KubeRay minimum depends on it), an object
  store that Ray itself places into /dev/shm, and an optional PodMonitor for the metrics port;
* local paths only on mounted PersistentVolumeClaims; every pod's emptyDirs fit its memory and
  ephemeral-storage requests and limits; sweep settings jobs.ray_sweep would refuse, and settings
  the chart would ignore, are refused when rendering.
"""
from __future__ import annotations

import copy
import inspect
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from unittest import mock

import pytest
import yaml

import k8s_tools as kt
from test_k8s import (  # noqa: F401  (fixtures: used by name; _hermetic_helm is autouse)
    CHART, GOOD_QAT, GOOD_RUN, K8S, REPO, TORCHRUN, _cli_parse, _gpu_limit, _hermetic_helm, _jobs_module, _run,
    all_rendered, bins, by_run, chart_renders, helm_template, is_qat_job, kustomize_qat_render, kustomize_render,
    of_kind, qat_torchrun_args, quantcore_argv, rbac_problems, render, security_problems,
)

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
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


def test_ray_clusters_go_soon_after_their_job(chart_renders, kustomize_render, kustomize_qat_render):
    """A finished RayJob's cluster holds its GPUs idle until KubeRay deletes it: it must be deleted
    (shutdownAfterJobFinishes) within minutes; the defaults keep it one minute."""
    rayjobs = all_rayjobs(chart_renders, kustomize_render, kustomize_qat_render)
    assert len(rayjobs) >= 3
    for rj in rayjobs:
        spec = rj["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, rj["metadata"]["name"]
        assert 0 <= spec["ttlSecondsAfterFinished"] <= 600, (rj["metadata"]["name"], spec["ttlSecondsAfterFinished"])
    defaults = of_kind(chart_renders["defaults"], "RayJob") + of_kind(kustomize_render + kustomize_qat_render, "RayJob")
    assert defaults and all(rj["spec"]["ttlSecondsAfterFinished"] <= 60 for rj in defaults)


# --- 1. RBAC never binds the namespace's default ServiceAccount ----------------------------------

def test_rbac_refuses_to_bind_the_default_service_account(bins, tmp_path):
    for sa, says in (({"create": False, "name": ""}, "serviceAccount.create is false and serviceAccount.name is empty"),
                     ({"create": False, "name": "default"}, "serviceAccount.name: default is the namespace's"),
                     ({"create": True, "name": "default"}, "serviceAccount.name: default is the namespace's own")):
        err = refused(bins, tmp_path, {"serviceAccount": sa, "runs": [GOOD_RUN]})
        assert "`default` ServiceAccount" in err and "serviceAccount.name" in err and says in err, err
        assert "set serviceAccount.create: true," not in err.lower() or not sa["create"], err  # not what it had
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
    """Final names as the API server and KubeRay check them, per kind: unique per kind; every name
    a DNS-1123 subdomain (<= 253); Services DNS-1035 labels; Jobs at most 63 characters (the Job
    controller puts the name into a label); a pod subdomain a DNS-1123 label, and qat Jobs (pod
    hostnames <job>-<index>) DNS-1123 labels with room for the index; RayJobs DNS-1035 labels of
    at most 47 characters, and the names KubeRay derives (RayCluster <name>-<5>, Service
    <cluster>-head-svc) DNS-1035 labels too; every label value valid."""
    problems, seen = [], {}
    for o in objs:
        kind, name = o["kind"], o["metadata"]["name"]
        if (kind, name) in seen:
            problems.append(f"{kind}/{name} rendered twice")
        seen[(kind, name)] = o
        if not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
            problems.append(f"{kind}/{name}: not a DNS-1123 subdomain")
        if kind == "Service" and not (DNS1035_LABEL.match(name) and len(name) <= 63):
            problems.append(f"Service/{name}: not a DNS-1035 label")
        if kind == "Job" and len(name) > 63:
            problems.append(f"Job/{name}: longer than 63 characters (the pods' job-name label)")
        if kind == "Job" and is_qat_job(o):
            hostname = f"{name}-{o['spec']['completions'] - 1}"
            if not DNS1123_LABEL.match(hostname) or len(hostname) > 63:
                problems.append(f"Job/{name}: pod hostname {hostname} is not a DNS-1123 label of at most 63 characters")
        if kind == "RayJob":
            if not DNS1035_LABEL.match(name) or len(name) > 47:
                problems.append(f"RayJob/{name}: not a DNS-1035 label of at most KubeRay's 47 characters")
            for derived in (f"{name}-abcde", f"{name}-abcde-head-svc"):
                if not DNS1035_LABEL.match(derived) or len(derived) > 63:
                    problems.append(f"RayJob/{name}: KubeRay's {derived} is not a DNS-1035 label")
        for where, tpl in [(f"{kind}/{name}", o)] + pod_templates(o):
            spec = tpl.get("spec") or {}
            if "subdomain" in spec and not (DNS1123_LABEL.match(spec["subdomain"]) and len(spec["subdomain"]) <= 63):
                problems.append(f"{where}: subdomain {spec['subdomain']} is not a DNS-1123 label")
            for k, v in ((tpl.get("metadata") or {}).get("labels") or {}).items():
                if len(str(v)) > 63 or not LABEL_VALUE.match(str(v)):
                    problems.append(f"{where}: label {k}={v!r} is not a valid label value")
    return problems


def test_every_rendered_name_is_valid_for_its_kind(all_rendered):
    by_source: Dict[str, List[Dict[str, Any]]] = {}
    for src, o in all_rendered:
        by_source.setdefault(src, []).append(o)
    for src, objs in by_source.items():
        assert name_problems(objs) == [], src
    assert len(by_source) >= 9


# The reviewer's releases: a dot (valid for Helm, which only asks for a DNS-1123 subdomain) and a
# leading digit. Fine for most objects; not for a qat Job's Service and pod subdomain, nor for a
# RayJob (KubeRay derives DNS-1035 names from it).
QAT_RUN = {**GOOD_QAT, "name": "vit-qat", "nnodes": 3, "gpus": 2, "out": "s3://out/qat"}
CPU_SWEEP = {"enabled": True, "name": "cpu-sweep", "out": "s3://out/sweep", "workers": {"gpus": 0, "replicas": 1},
             "config": {"version": 1, "runs": [{"name": "a", "recipe": "deit_tiny_fp16_32",
                                                "calib_data": "s3://datasets/tiny"}]}}


def _template(bins, release: str, values: Path) -> subprocess.CompletedProcess:
    return _run([bins.helm, "template", release, CHART, "--namespace", "ml-batch", "--kube-version", "1.30.0",
                 "-f", values])


@pytest.mark.parametrize("release,values,kind", [
    ("vision.team-calibration-june", {"runs": [GOOD_RUN, QAT_RUN]}, "the qat Job and headless Service name"),
    ("2024-sweep", {"runs": [QAT_RUN]}, "the qat Job and headless Service name"),
    ("2024-sweep", {"sweep": CPU_SWEEP}, "the RayJob name of sweep"),
    ("vision.team", {"rayQat": {"enabled": True, "recipe": "vit_b16_int8_qat", "data": "s3://datasets/x",
                                "out": "s3://out/rq"}}, "the RayJob name of rayQat"),
], ids=["dot-qat", "digit-qat", "digit-sweep", "dot-rayqat"])
def test_release_names_the_api_server_or_kuberay_would_reject_are_refused(bins, tmp_path, release, values, kind):
    proc = _template(bins, release, values_file(tmp_path, values))
    assert proc.returncode != 0
    assert f'the release name "{release}": {kind}' in proc.stderr and "DNS-1035 label" in proc.stderr, proc.stderr
    # with fullnameOverride the same values render, and every name is valid
    objs = render(bins, values_file(tmp_path, {**values, "fullnameOverride": "vision-calib"}))
    assert name_problems(objs) == [] and kt.validate_all(objs) == []


def test_dotted_and_digit_release_names_are_fine_where_kubernetes_allows_them(bins, tmp_path):
    """Plain Jobs, ConfigMaps, the ServiceAccount, RBAC, NetworkPolicy and test pods take
    DNS-1123 subdomains: such releases keep working for them."""
    for release in ("vision.team-calibration-june", "2024-sweep"):
        proc = _template(bins, release, values_file(tmp_path, {"runs": [GOOD_RUN], "recipes": {"r": {"model": {
            "name": "m"}}}}))
        assert proc.returncode == 0, proc.stderr
        objs = kt.load_docs(proc.stdout)
        assert name_problems(objs) == [] and kt.validate_all(objs) == []
        assert by_run(objs)["r1"]["metadata"]["name"] == f"{release}-quantcore-r1"


def test_name_checker_flags_names_the_cluster_rejects(chart_renders):
    objs = copy.deepcopy(chart_renders["qat-values.yaml"])
    assert name_problems(objs) == []
    # what the chart rendered for `helm template vision.team-calibration-june` before
    for o in objs:
        if o["kind"] in ("Service", "Job", "RayJob"):
            o["metadata"]["name"] = o["metadata"]["name"].replace("qc-quantcore", "vision.team-quantcore")
            spec = (o["spec"].get("template") or {}).get("spec") or {}
            if "subdomain" in spec:
                spec["subdomain"] = o["metadata"]["name"]
    problems = name_problems(objs)
    for needle in ("Service/vision.team-quantcore-vit-ft2-qat: not a DNS-1035 label", "subdomain vision.team",
                   "pod hostname vision.team", "RayJob/vision.team-quantcore-vit-ft2-ray-qat: not a DNS-1035"):
        assert any(needle in p for p in problems), (needle, problems)
    objs = copy.deepcopy(chart_renders["sweep-values.yaml"])
    (rj,) = of_kind(objs, "RayJob")
    rj["metadata"]["name"] = "2024-sweep-quantcore-vit-sweep"
    assert any("RayJob/2024-sweep" in p and "DNS-1035" in p for p in name_problems(objs))
    job = of_kind(objs, "Job")[0]
    job["spec"]["template"]["metadata"]["labels"]["team"] = "a b"
    assert any("label team='a b'" in p for p in name_problems(objs))


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


def _old_trunc(name: str, max_len: int) -> str:
    """The chart's earlier cut: the first max-9 characters of the whole name plus a hash."""
    import hashlib
    return name if len(name) <= max_len else \
        f"{name[:max_len - 9].rstrip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def unreadable_names(objs: List[Dict[str, Any]], min_keep: int = 20) -> List[str]:
    """Jobs and RayJobs whose name keeps less than min_keep characters of their run / block name
    (the whole name when shorter): after a cut a name must still say which run it is."""
    problems = []
    for o in of_kind(objs, "Job") + of_kind(objs, "RayJob"):
        name, labels = o["metadata"]["name"], o["metadata"]["labels"]
        run = labels.get("quantcore.io/run") or labels["app.kubernetes.io/component"]  # sweep / ray-qat
        part = run[:min_keep].rstrip("-")
        if part not in name:
            problems.append(f"{o['kind']}/{name}: keeps no readable part of {run!r}")
    return problems


def test_cut_names_keep_the_run_readable(bins, tmp_path):
    runs = [{**GOOD_RUN, "name": "vit-b16-384-ft2-w8a8-percentile-imnet-a1", "out": "s3://out/a1"},
            {**GOOD_RUN, "name": "vit-b16-384-ft2-w8a8-percentile-imnet-a2", "out": "s3://out/a2"},
            {**GOOD_QAT, "name": "vit-b16-384-ft2-w8a8-percentile-imnet-q1", "out": "s3://out/q1", "nnodes": 12}]
    sweep = {"enabled": True, "name": "vit-b16-sweep-pct-aa", "out": "s3://out/sweep",
             "config": {"runs": [{"name": "a", "recipe": "vit_b16_int8", "calib_data": "s3://data/x"}]}}
    values = values_file(tmp_path, {"runs": runs, "sweep": {**sweep, "name": "vit-b16-sweep-pct-aa"}})
    proc = _run([bins.helm, "template", LONG_RELEASE, CHART, "--kube-version", "1.30.0", "-f", values])
    assert proc.returncode == 0, proc.stderr
    objs = kt.load_docs(proc.stdout)
    assert name_problems(objs) == [] and unreadable_names(objs) == []
    jobs = by_run(objs)
    assert jobs["vit-b16-384-ft2-w8a8-percentile-imnet-a1"]["metadata"]["name"].startswith(
        "nightly-quant-vit-b16-384-ft2-w8a8-percentile-imnet-a1-")  # release part first, then the whole run
    assert jobs["vit-b16-384-ft2-w8a8-percentile-imnet-q1"]["metadata"]["name"].startswith(
        "nightly-quan-vit-b16-384-ft2-w8a8-percentil-")  # qat: 52 characters, 30 of the run
    # the earlier cut: "<release prefix>-<hash>-vi-<hash>", no trace of the run
    old = copy.deepcopy(objs)
    for o in old:
        if o["kind"] in ("Job", "RayJob"):
            run = o["metadata"]["labels"].get("quantcore.io/run") or "vit-b16-sweep-pct-aa"
            full = _old_trunc(f"{LONG_RELEASE}-quantcore", 40)
            o["metadata"]["name"] = _old_trunc(f"{full}-{run}", 47 if o["kind"] == "RayJob" else 63)
    assert len(unreadable_names(old)) == 3


def test_chart_readme_states_the_name_limits():
    """The schema's name limits are the ones the chart README states."""
    import json
    schema = json.loads((CHART / "values.schema.json").read_text())
    run_max = schema["definitions"]["run"]["properties"]["name"]["maxLength"]
    block_max = {schema["properties"][k]["properties"]["name"]["maxLength"] for k in ("sweep", "rayQat")}
    text = (CHART / "README.md").read_text()
    assert (run_max, block_max) == (40, {20})
    assert "at most 40 characters" in text and "at most 20 characters" in text


# --- 3. no run reads what another run of the release writes ---------------------------------------

def _flag_values(argv: List[str], flags: Tuple[str, ...]) -> List[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in flags]


def data_flow(objs: List[Dict[str, Any]]) -> List[Tuple[str, List[str], List[str]]]:
    """(workload, the URIs it writes, the URIs it reads) of every Job and RayJob, from the command
    lines as the real parsers read them (quantcore CLI, torchrun, jobs.ray_qat, jobs.ray_sweep + its
    sweep file from the rendered ConfigMap)."""
    reads = ("--checkpoint", "--data", "--calib-data", "--eval-data", "--init", "--recipe", "--check-data")
    cms = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    out = []
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Job":
            argv = qat_torchrun_args(o).training_script_args if is_qat_job(o) else quantcore_argv(o)
            positional = [argv[1]] if argv[0] == "export" else []  # export's checkpoint is its argument
            out.append((name, _flag_values(argv, ("--out",)), positional + _flag_values(argv, reads)))
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
    assert len(flow) == 6 and all(outs for _, outs, _ in flow)


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
    export = {"name": "x1", "mode": "export", "model": "s3://runs/site/calib/vit_b16_int8/model.qc.pt",
              "out": "s3://runs/site/export"}
    assert "runs[1] (x1).model reads" in refused(bins, tmp_path, {"runs": [calib, export]})
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


def test_sweep_file_keys_are_checked_when_rendering(bins, tmp_path):
    """The chart's schema for sweep.config names exactly the keys jobs.ray_sweep takes (its pydantic
    models, `recipe` being the alias of `recipes`), so a misspelt key fails `helm template` instead
    of the RayJob after KubeRay brought its GPU cluster up."""
    import json

    ray_sweep = _jobs_module("jobs.ray_sweep")
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["sweep"]["properties"]["config"]
    props = schema["properties"]
    assert set(props) == set(ray_sweep.Sweep.model_fields)
    assert set(props["runs"]["items"]["properties"]) == set(ray_sweep.RunSpec.model_fields) | {"recipe"}
    assert set(props["defaults"]["properties"]) == set(ray_sweep.RunDefaults.model_fields) | {"recipe"}
    sweep = CHART / "ci" / "sweep-values.yaml"
    base = yaml.safe_load(sweep.read_text())["sweep"]["config"]
    run = {**base["runs"][0], "bogus": 1}
    for cfg, where in (({**base, "runs": [run]}, "/sweep/config/runs/0"),
                       ({**base, "defaults": {**(base.get("defaults") or {}), "bogus": 1}}, "/sweep/config/defaults"),
                       ({**base, "run": base["runs"]}, "/sweep/config")):
        err = refused(bins, tmp_path, {"sweep": {"config": cfg}}, sweep)
        assert where in err and ("'bogus'" in err or "'run'" in err), err
        with pytest.raises(ray_sweep.SweepError):  # what the RayJob would have said, too late
            ray_sweep.parse_sweep(cfg)


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


def test_gpu_pods_keep_the_gpu_taint_toleration_when_tolerations_are_added(bins, tmp_path):
    """gpu.tolerations adds to the GPU resource's own taint toleration (a replaced list used to drop
    it: GPU pods Pending on tainted GPU nodes); the toleration follows gpu.resourceName."""
    cpu_run = {**GOOD_RUN, "name": "cpu", "gpus": 0, "out": "s3://out/cpu"}
    spot = {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    for gpu, want_key in (({"tolerations": [spot]}, "nvidia.com/gpu"),
                          ({"resourceName": "amd.com/gpu", "tolerations": [spot]}, "amd.com/gpu"),
                          ({}, "nvidia.com/gpu")):
        jobs = by_run(render(bins, values_file(tmp_path, {"gpu": gpu, "runs": [GOOD_RUN, cpu_run]})))
        tol = jobs["r1"]["spec"]["template"]["spec"]["tolerations"]
        assert {"key": want_key, "operator": "Exists", "effect": "NoSchedule"} in tol, (gpu, tol)
        assert [t["key"] for t in tol].count(want_key) == 1 and ("nvidia.com/gpu" in [t["key"] for t in tol]) == (
            want_key == "nvidia.com/gpu"), tol
        assert (spot in tol) == bool(gpu.get("tolerations")), tol
        assert "tolerations" not in jobs["cpu"]["spec"]["template"]["spec"]
    # an explicit toleration of the GPU taint (e.g. NoExecute too) is kept as given, not doubled
    own = {"key": "nvidia.com/gpu", "operator": "Exists"}
    jobs = by_run(render(bins, values_file(tmp_path, {"gpu": {"tolerations": [own]}, "runs": [GOOD_RUN]})))
    assert jobs["r1"]["spec"]["template"]["spec"]["tolerations"] == [own]


# --- 8. helm test ----------------------------------------------------------------------------------

def helm_test_pods(objs) -> Dict[str, Dict[str, Any]]:
    """The `helm test` hook pods of a render, by container name."""
    return {p["spec"]["containers"][0]["name"]: p for p in of_kind(objs, "Pod")
            if p["metadata"]["annotations"].get("helm.sh/hook") == "test"}


def test_helm_test_pods_are_rendered_hooks(chart_renders):
    for name, objs in chart_renders.items():
        pods = helm_test_pods(objs)
        has_data = name not in ("defaults",)
        assert set(pods) == ({"image", "data"} if has_data else {"image"}), name
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


def test_data_test_pod_against_mock_s3_and_a_volume(chart_renders, s3_server, s3_client, tmp_path):
    """The data test pod checks the s3:// inputs and outputs (against a mock S3 on 127.0.0.1) and
    the local inputs on the release's volumes (a local directory standing in for the claim)."""
    objs = chart_renders["sweep-values.yaml"]
    pod = helm_test_pods(objs)["data"]
    c = pod["spec"]["containers"][0]
    args = c["args"]
    local = [a for a in args if not a.split("=", 1)[1].startswith("s3://")]
    assert local == ["in=/mnt/datasets/imagenet-tiny"]
    assert sorted(a.split("=", 1)[0] for a in args if a not in local) == ["in"] * 4 + ["out"] * 6
    # the claim of resnext-cpu-smoke is mounted read-only where the run's pod mounts it
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/mnt/datasets"]
    assert mount["readOnly"] is True
    assert vols[mount["name"]]["persistentVolumeClaim"] == {"claimName": "imagenet-tiny", "readOnly": True}
    # the container's environment as the kubelet would set it (Secret values from the mock)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for e in c["env"]:
        env[e["name"]] = e.get("value", "testing")
    assert env["AWS_ENDPOINT_URL"] == "http://minio.minio.svc.cluster.local:9000"
    env.update(AWS_ENDPOINT_URL=s3_server, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    env.pop("AWS_SESSION_TOKEN", None)  # moto accepts any credentials; a token needs a real STS
    remote = [a for a in args if a not in local]
    for bucket in {a.split("=", 1)[1][5:].split("/")[0] for a in remote}:
        try:
            s3_client.create_bucket(Bucket=bucket)
        except s3_client.exceptions.BucketAlreadyOwnedByYou:
            pass
    for a in remote:
        kind, uri = a.split("=", 1)
        bucket, _, key = uri[5:].partition("/")
        if kind == "in":  # objects are stored as they are; datasets are prefixes with objects under them
            s3_client.put_object(Bucket=bucket, Key=key if key.endswith(".pt") else f"{key}/train/shard-0.zip",
                                 Body=b"x")
    volume = tmp_path / "volume"
    (volume / "imagenet-tiny" / "train").mkdir(parents=True)
    on_volume = [a.replace("/mnt/datasets", str(volume)) for a in args]
    proc = _run_test_pod(pod, env, args=on_volume)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok  ") == len(args)
    # a missing input (in S3 and on the volume) and a missing output bucket are named
    s3_client.delete_object(Bucket="datasets", Key="imagenet-val-zip/train/shard-0.zip")
    (volume / "imagenet-tiny" / "train").rmdir()
    (volume / "imagenet-tiny").rmdir()
    proc = _run_test_pod(pod, env, args=on_volume + ["out=s3://no-such-bucket-here/x"])
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL")]
    assert proc.returncode == 1 and len(failed) == 3, proc.stdout
    assert "in=s3://datasets/imagenet-val-zip" in failed[0] and f"in={volume}/imagenet-tiny" in failed[1]
    assert "out=s3://no-such-bucket-here/x" in failed[2]


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
            # Ray checks that its fallback directory (the pod's /tmp/ray) exists on this machine: a
            # stand-in that does, so the answer does not depend on an earlier Ray run having made it
            with tempfile.TemporaryDirectory() as fallback:
                try:
                    plasma_dir, _, _ = services.determine_plasma_store_config(store, fallback)
                except ValueError as err:
                    problems.append(f"{group}: Ray does not start: {str(err).replace(fallback, '/tmp/ray')}")
                    continue
                if plasma_dir == fallback:
                    plasma_dir = "/tmp/ray"
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
    assert pm["spec"]["podMetricsEndpoints"][0]["interval"] == "10s"
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


# --- 12. local paths live on PersistentVolumeClaims ------------------------------------------------

PATH_FLAGS = ("--data", "--eval-data", "--calib-data", "--checkpoint", "--init", "--recipe", "--out",
              "--storage-path", "--cache-dir")
WRITTEN = ("--out", "--storage-path", "--cache-dir")


def _local(uri: Any) -> Optional[str]:
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file:///") else uri if uri.startswith("/") else None


def local_path_problems(objs: List[Dict[str, Any]]) -> List[str]:
    """Every local path a Job or RayJob reads or writes (from its command line as the real parsers
    read it, and the sweep file's runs) must be inside a volume its pods mount: a
    PersistentVolumeClaim (read-write for outputs), an emptyDir (scratch) or the recipes
    ConfigMap; the container's root filesystem is read-only and holds none of the user's data."""
    cms = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    problems = []

    def check(where: str, spec: Dict[str, Any], path: str, write: bool) -> None:
        vols = {v["name"]: v for v in spec.get("volumes") or []}
        mounts = [m for c in spec["containers"] for m in c.get("volumeMounts") or []]
        best = None
        for m in mounts:
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
                if best is None or len(m["mountPath"]) > len(best["mountPath"]):
                    best = m
        vol = vols.get(best["name"]) if best else None
        if vol is None or not ({"persistentVolumeClaim", "emptyDir", "configMap"} & set(vol)):
            problems.append(f"{where}: {path} is on no mounted volume")
        elif write and (best.get("readOnly") or "configMap" in vol
                        or (vol.get("persistentVolumeClaim") or {}).get("readOnly")):
            problems.append(f"{where}: {path} is written to read-only volume {vol['name']}")

    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Job":
            argv = qat_torchrun_args(o).training_script_args if is_qat_job(o) else quantcore_argv(o)
            specs = [o["spec"]["template"]["spec"]]
            pairs = [(a, v) for a, v in zip(argv, argv[1:]) if a in PATH_FLAGS]
        elif o["kind"] == "RayJob":
            argv = shlex.split(o["spec"]["entrypoint"])
            cluster = o["spec"]["rayClusterSpec"]
            specs = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                                     for g in cluster["workerGroupSpecs"]]
            pairs = [(a, v) for a, v in zip(argv, argv[1:]) if a in PATH_FLAGS]
            if argv[2] == "jobs.ray_sweep":
                vol = next(v for v in specs[0]["volumes"] if v["name"] == "sweep")
                sweep = _jobs_module("jobs.ray_sweep").parse_sweep(
                    yaml.safe_load(cms[vol["configMap"]["name"]]["data"]["sweep.yaml"]))
                for r in sweep.runs:
                    pairs += [("--checkpoint", r.checkpoint), ("--calib-data", r.calib_data),
                              ("--eval-data", r.eval_data), ("--cache-dir", r.cache_dir)]
                    pairs += [("--recipe", x) for x in r.recipes or [] if isinstance(x, str)]
                specs = specs[1:]  # the tasks run on the workers
        else:
            continue
        for flag, value in pairs:
            path = _local(value) if value else None
            if path:
                for spec in specs:
                    check(f"{name} {flag}", spec, path, flag in WRITTEN)
    return problems


def test_every_local_path_is_on_a_mounted_volume(chart_renders, kustomize_render, kustomize_qat_render):
    for name, objs in list(chart_renders.items()) + [("kustomize", kustomize_render + kustomize_qat_render)]:
        assert local_path_problems(objs) == [], name
    objs = chart_renders["sweep-values.yaml"]
    pod = by_run(objs)["resnext-cpu-smoke"]["spec"]["template"]["spec"]
    assert {"name": "datasets", "persistentVolumeClaim": {"claimName": "imagenet-tiny", "readOnly": True}} \
        in pod["volumes"]
    assert {"name": "datasets", "mountPath": "/mnt/datasets", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert all("hostPath" not in v for o in objs for _, s in kt.pod_specs(o) for v in s.get("volumes") or [])
    # the ci example as it was: data on /mnt/datasets and no volume there
    old = copy.deepcopy(objs)
    job = by_run(old)["resnext-cpu-smoke"]["spec"]["template"]["spec"]
    job["volumes"] = [v for v in job["volumes"] if v["name"] != "datasets"]
    job["containers"][0]["volumeMounts"] = [m for m in job["containers"][0]["volumeMounts"]
                                           if m["name"] != "datasets"]
    problems = local_path_problems(old)
    assert any("--calib-data: /mnt/datasets/imagenet-tiny is on no mounted volume" in p for p in problems)


def test_volumes_reach_every_pod_that_needs_them(bins, tmp_path):
    values = {
        "volumes": [{"name": "datasets", "claimName": "imagenet", "mountPath": "/mnt/datasets"}],
        "runs": [{**GOOD_RUN, "mode": "ptq", "data": "/mnt/datasets/imagenet", "out": "/mnt/runs/r1",
                  "volumes": [{"name": "runs", "claimName": "quantcore-runs", "mountPath": "/mnt/runs",
                               "readOnly": False}]},
                 {**GOOD_QAT, "data": "file:///mnt/datasets/imagenet", "out": "s3://out/q1"}],
        "sweep": {"enabled": True, "out": "/mnt/sweeps/x",
                  "volumes": [{"name": "sweeps", "claimName": "sweeps", "mountPath": "/mnt/sweeps", "readOnly": False}],
                  "config": {"runs": [
                      {"name": "a", "recipe": "vit_b16_int8", "calib_data": "/mnt/datasets/imagenet"}]}},
        "rayQat": {"enabled": True, "recipe": "vit_b16_int8_qat", "data": "/mnt/datasets/imagenet",
                   "out": "s3://out/rq", "storagePath": "/mnt/sweeps/ray-qat",
                   "volumes": [{"name": "sweeps", "claimName": "sweeps", "mountPath": "/mnt/sweeps",
                                "readOnly": False}]},
    }
    objs = render(bins, values_file(tmp_path, values))
    assert kt.validate_all(objs) == [] and local_path_problems(objs) == []
    assert len(of_kind(objs, "Job")) == 2 and len(of_kind(objs, "RayJob")) == 2
    data = helm_test_pods(objs)["data"]
    assert sorted(v["persistentVolumeClaim"]["claimName"] for v in data["spec"]["volumes"]
                  if "persistentVolumeClaim" in v) == ["imagenet", "quantcore-runs", "sweeps"]
    assert [a for a in data["spec"]["containers"][0]["args"] if not a.startswith(("in=s3", "out=s3"))] == [
        "in=/mnt/datasets/imagenet"]
    for o in objs:
        for where, spec in kt.pod_specs(o):
            assert all("hostPath" not in v for v in spec.get("volumes") or []), where


LOCAL_PATH_REFUSALS = {
    "unmounted-data": ({"runs": [{**GOOD_RUN, "data": "/mnt/datasets/imagenet-tiny"}]},
                       "runs[0] (r1).data: /mnt/datasets/imagenet-tiny is a local path, but no volume is mounted "
                       "above it (mounted: none). Add the PersistentVolumeClaim that holds it under volumes (every "
                       "pod) or runs[0].volumes"),
    "dot-dot-out-of-the-volume": (
        {"volumes": [{"name": "d", "claimName": "c", "mountPath": "/mnt/d"}],
         "runs": [{**GOOD_RUN, "data": "/mnt/d/../../etc/x"}]},
        "runs[0] (r1).data: /mnt/d/../../etc/x is a local path, but no volume is mounted above it (mounted: /mnt/d)"),
    "volume-of-another-run": (
        {"runs": [{**GOOD_RUN, "volumes": [{"name": "d", "claimName": "c", "mountPath": "/mnt/d"}]},
                  {**GOOD_RUN, "name": "r2", "out": "s3://out/r2", "data": "file:///mnt/d/x"}]},
        "runs[1] (r2).data: file:///mnt/d/x is a local path, but no volume is mounted above it"),
    "out-on-read-only-volume": (
        {"volumes": [{"name": "d", "claimName": "c", "mountPath": "/mnt/d"}],
         "runs": [{**GOOD_RUN, "out": "/mnt/d/out"}]},
        "runs[0] (r1).out: /mnt/d/out is written to volume d (claim c), which is mounted read-only"),
    "recipe-path": ({"runs": [{**GOOD_RUN, "recipe": "/etc/recipes/x.yaml"}]},
                    "runs[0] (r1).recipe: /etc/recipes/x.yaml is a local path"),
    "sweep-file-path": ({"sweep": {"enabled": True, "out": "s3://out/sweep", "config": {"runs": [
        {"name": "a", "recipe": "vit_b16_int8", "calib_data": "/data/imagenet"}]}}},
        "sweep.config.runs[0].calib_data: /data/imagenet is a local path"),
    "ray-qat-storage-path": ({"rayQat": {"enabled": True, "recipe": "vit_b16_int8_qat", "data": "s3://datasets/x",
                                         "out": "s3://out/rq", "storagePath": "/shared/ray"}},
                             "rayQat.storagePath: /shared/ray is a local path"),
    "volume-over-tmp": ({"volumes": [{"name": "d", "claimName": "c", "mountPath": "/tmp/data"}]},
                        "volumes: volume d's mountPath /tmp/data collides with the chart's /tmp"),
    "volume-over-the-image's-code": ({"volumes": [{"name": "d", "claimName": "c", "mountPath": "/opt/quantcore"}]},
                                     "volumes: volume d's mountPath /opt/quantcore is inside /opt"),
    "volume-over-the-venv's-parent": ({"runs": [{**GOOD_RUN, "volumes": [{"name": "d", "claimName": "c",
                                                                          "mountPath": "/opt"}]}]},
                                      "volume d's mountPath /opt is inside /opt"),
    "volume-over-usr": ({"volumes": [{"name": "d", "claimName": "c", "mountPath": "/usr/local"}]},
                        "volume d's mountPath /usr/local is inside /usr"),
    "volume-named-like-the-chart's": ({"volumes": [{"name": "cache", "claimName": "c", "mountPath": "/mnt/c"}]},
                                      'volume name "cache" is the chart\'s own'),
    "two-volumes-one-path": (
        {"volumes": [{"name": "d", "claimName": "c", "mountPath": "/mnt/d"}],
         "runs": [{**GOOD_RUN, "volumes": [{"name": "e", "claimName": "c2", "mountPath": "/mnt/d"}]}]},
        "volumes d and e are both mounted at /mnt/d"),
    "two-claims-one-path": (
        {"runs": [{**GOOD_RUN, "volumes": [{"name": "d", "claimName": "c1", "mountPath": "/mnt/d"}]},
                  {**GOOD_RUN, "name": "r2", "out": "s3://out/r2",
                   "volumes": [{"name": "d", "claimName": "c2", "mountPath": "/mnt/d"}]}]},
        "runs[1] (r2) mounts claim c2 at /mnt/d, where another workload of the release mounts claim c1"),
}


_SWEEP = {"enabled": True, "out": "s3://out/sweep"}
_NO_QAT = {"version": 1, "name": "myr", "model": {"name": "resnet50"}, "placement": {"family": "cnn"}}
# helper-134: values that rendered, then failed in the API server or in the pod after it was scheduled
RENDER_REFUSALS = {
    "sweep-recipe-relative-file": ({"sweep": {**_SWEEP, "config": {"runs": [
        {"name": "a", "recipes": ["my/recipe.yaml"], "calib_data": "s3://data/x"}]}}},
        "/sweep/config/runs/0/recipes/0"),
    "sweep-recipe-dotdot": ({"sweep": {**_SWEEP, "config": {"runs": [
        {"name": "a", "recipe": "../recipes/foo.yaml", "calib_data": "s3://data/x"}]}}},
        "/sweep/config/runs/0/recipe"),
    "sweep-run-reads-another-runs-output": ({"sweep": {**_SWEEP, "config": {"runs": [
        {"name": "a", "recipe": "vit_b16_int8", "calib_data": "s3://data/x"},
        {"name": "b", "recipe": "vit_b16_int8", "calib_data": "s3://out/sweep/a/data"}]}}},
        "sweep.config.runs[1].calib_data reads s3://out/sweep/a/data, which sweep run a writes"),
    "sweep-default-recipe-relative": ({"sweep": {**_SWEEP, "config": {"defaults": {"recipe": "r/x.yaml"}, "runs": [
        {"name": "a", "calib_data": "s3://data/x"}]}}}, "/sweep/config/defaults/recipe"),
    "node-affinity-typo": ({"runs": [{**GOOD_RUN, "affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpression": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}}}]},
        "additional properties 'matchExpression' not allowed"),
    "node-affinity-field-typo": ({"defaults": {"affinity": {"nodeAffinity": {"requiredDuringScheduling": {}}}},
                                  "runs": [GOOD_RUN]}, "additional properties 'requiredDuringScheduling' not allowed"),
    "affinity-operator": ({"runs": [{**GOOD_RUN, "affinity": {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "kubernetes.io/hostname", "labelSelector": {
            "matchExpressions": [{"key": "app", "operator": "Gt", "values": ["1"]}]}}]}}}]},
        "/runs/0/affinity/podAntiAffinity"),
    "pod-affinity-without-topology": ({"runs": [{**GOOD_RUN, "affinity": {"podAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"a": "b"}}}]}}}]},
        "missing property 'topologyKey'"),
    "extra-ingress-typo": ({"networkPolicy": {"extraIngress": [{"from": [{"podSelectr": {}}]}]}, "runs": [GOOD_RUN]},
                           "additional properties 'podSelectr' not allowed"),
    "dashboard-peer-typo": ({"networkPolicy": {"rayDashboardFrom": [{"namespaceSelectr": {}}]}, "runs": [GOOD_RUN]},
                            "additional properties 'namespaceSelectr' not allowed"),
    "qat-inline-recipe-without-qat": ({"recipes": {"myr": _NO_QAT}, "runs": [
        {"name": "a", "mode": "qat", "model": "recipe", "recipe": "myr", "data": "s3://data/x", "out": "s3://outs/x"}]},
        'runs[0] (a).recipe: inline recipe "myr" (recipes.myr) has no qat: section'),
    "ray-qat-inline-recipe-without-qat": ({"recipes": {"myr": _NO_QAT}, "rayQat": {
        "enabled": True, "recipe": "myr", "data": "s3://data/x", "out": "s3://outs/rq"}},
        'rayQat.recipe: inline recipe "myr" (recipes.myr) has no qat: section'),
}


RENDER_REFUSALS.update({
    "extra-args-unknown-flag": ({"runs": [{**GOOD_RUN, "extraArgs": ["--seed", "3"]}]},
                                "runs[0].extraArgs: --seed is not an option of `quantcore calibrate`"),
    "qat-extra-args-unknown-flag": ({"runs": [{**GOOD_QAT, "extraArgs": ["--limit=5"]}]},
                                    "runs[0].extraArgs: --limit is not an option of `quantcore qat`"),
    "ray-qat-extra-args-unknown-flag": ({"rayQat": {"enabled": True, "recipe": "vit_b16_int8_qat",
                                                    "data": "s3://data/x", "out": "s3://outs/rq",
                                                    "extraArgs": ["--device", "cuda"]}},
                                        "rayQat.extraArgs: --device is not an option of `python -m jobs.ray_qat`"),
})


@pytest.mark.parametrize("case", sorted(RENDER_REFUSALS))
def test_values_the_api_server_or_the_pod_would_refuse_are_refused_when_rendering(bins, tmp_path, case):
    values, message = RENDER_REFUSALS[case]
    assert message in refused(bins, tmp_path, values)


def test_an_inline_qat_recipe_with_an_empty_qat_section_renders(bins, tmp_path):
    """`qat: {}` takes every default (helper-135: refused as "no qat: section"); sweep recipes named
    like a relative .yaml file are refused as the paths they are."""
    values = values_file(tmp_path, {"recipes": {"myr": {**_NO_QAT, "qat": {}}}, "runs": [
        {"name": "a", "mode": "qat", "model": "recipe", "recipe": "myr", "data": "s3://data/x", "out": "s3://outs/x"}]})
    proc = helm_template(bins, values)
    assert proc.returncode == 0, proc.stderr
    err = refused(bins, tmp_path, {"sweep": {**_SWEEP, "config": {"runs": [
        {"name": "a", "recipes": ["my_recipe.yaml"], "calib_data": "s3://data/x"}]}}})
    assert "sweep.config.runs[0].recipes: my_recipe.yaml is a relative path" in err


def test_the_chart_knows_every_commands_options_and_extra_args_it_has_render(bins, tmp_path):
    """files/cli-flags.yaml is what the commands' parsers say today (regenerate: python -m
    scripts.chart_flags), and flags they have render: short and joined forms, an option's value that
    starts with '-' (a negative number, a file name), and '--' (helper-135)."""
    from scripts.chart_flags import FILE, render as current

    assert FILE.read_text() == current(), "charts/quantcore/files/cli-flags.yaml is stale: python -m scripts.chart_flags"
    values = values_file(tmp_path, {"runs": [{**GOOD_RUN, "extraArgs": ["--skip-bad", "--checkpoint", "-w.pt", "--"]},
                                             {**GOOD_QAT, "extraArgs": ["--eval-limit", "-1", "--skip-bad", "-b8"]}]})
    proc = helm_template(bins, values)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", sorted(LOCAL_PATH_REFUSALS))
def test_local_paths_without_a_volume_are_refused(bins, tmp_path, case):
    values, message = LOCAL_PATH_REFUSALS[case]
    assert message in refused(bins, tmp_path, values)


# --- 13. pod storage: /dev/shm in memory, emptyDirs on disk -----------------------------------------

def storage_problems(obj: Dict[str, Any]) -> List[str]:
    """What the kubelet enforces on a pod's emptyDirs: an in-memory one (/dev/shm) counts against
    the memory limit and must stay below it; disk ones count against ephemeral storage, so the pod
    must request ephemeral storage (the scheduler reserves it) and a limit must hold them all."""
    problems = []
    for where, spec in kt.pod_specs(obj):
        containers = spec.get("containers") or []
        disk = [v for v in spec.get("volumes") or [] if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"]
        shm = [v for v in spec.get("volumes") or [] if "emptyDir" in v and v["emptyDir"].get("medium") == "Memory"]

        def total(kind: str, res: str) -> Optional[int]:
            values = [(c.get("resources") or {}).get(kind, {}).get(res) for c in containers]
            return None if any(v is None for v in values) else sum(_bytes(v) for v in values)

        if shm:
            memory = total("limits", "memory")
            size = sum(_bytes(v["emptyDir"]["sizeLimit"]) for v in shm)
            if memory is None or size >= memory:
                problems.append(f"{where}: in-memory emptyDir of {size} bytes, memory limit {memory}")
        if disk:
            if any("sizeLimit" not in v["emptyDir"] for v in disk):
                problems.append(f"{where}: a disk emptyDir without sizeLimit")
            sizes = sum(_bytes(v["emptyDir"].get("sizeLimit", 0)) for v in disk)
            if not any((c.get("resources") or {}).get("requests", {}).get("ephemeral-storage") for c in containers):
                problems.append(f"{where}: disk emptyDirs ({sizes} bytes) but no ephemeral-storage request")
            limit = total("limits", "ephemeral-storage")
            if limit is not None and limit < sizes:
                problems.append(f"{where}: ephemeral-storage limit {limit} below its emptyDirs ({sizes} bytes)")
    return problems


def test_every_pod_reserves_its_emptydirs(all_rendered):
    n = 0
    for src, obj in all_rendered:
        assert storage_problems(obj) == [], f"{src}: {obj['kind']}/{obj['metadata']['name']}"
        n += len(kt.pod_specs(obj))
    assert n >= 40
    # what the reviewer found: resnext-cpu-smoke, the test pods and the submitters had no request
    objs = [o for src, o in all_rendered if src == "chart[sweep-values.yaml]"]
    for o in objs:
        for where, spec in kt.pod_specs(o):
            for c in spec["containers"]:
                assert c["resources"]["requests"]["ephemeral-storage"], where
    old = copy.deepcopy(by_run(objs)["resnext-cpu-smoke"])
    c = old["spec"]["template"]["spec"]["containers"][0]
    c["resources"] = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}
    assert any("no ephemeral-storage request" in p for p in storage_problems(old))
    dshm = next(v for v in old["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    dshm["emptyDir"]["sizeLimit"] = "64Gi"
    assert any("in-memory emptyDir" in p for p in storage_problems(old))


def test_run_resources_merge_with_the_defaults(chart_renders):
    c = by_run(chart_renders["sweep-values.yaml"])["resnext-cpu-smoke"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "16Gi"},
                              "limits": {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "72Gi"}}


STORAGE_REFUSALS = {
    # the reviewer's values: a 64Gi in-memory /dev/shm on a 2Gi memory limit, and a 500Gi cache
    "shm-above-memory": ({"runs": [{**GOOD_RUN, "gpus": 0, "shmSize": "64Gi", "cacheSize": "500Gi",
                                    "resources": {"limits": {"memory": "2Gi"}}}]},
                         "runs[0] (r1).shmSize (64Gi) must be below runs[0] (r1).resources.limits.memory (2Gi)"),
    "qat-shm-above-memory": ({"runs": [{**GOOD_QAT, "shmSize": "32Gi", "resources": {"limits": {"memory": "32Gi"}}}]},
                             "runs[0] (q1).shmSize (32Gi) must be below"),
    "cache-above-ephemeral-limit": ({"runs": [{**GOOD_RUN, "cacheSize": "500Gi"}]},
                                    "runs[0] (r1).resources.limits.ephemeral-storage (72Gi) is below the emptyDir "
                                    "volumes it must hold (tmpSize 4Gi + cacheSize 500Gi)"),
    "no-ephemeral-request": ({"defaults": {"resources": {"requests": {"ephemeral-storage": None}}},
                              "runs": [GOOD_RUN]},
                             "runs[0] (r1).resources.requests.ephemeral-storage is required"),
    "submitter-without-ephemeral-request": (
        {"sweep": {"enabled": True, "out": "s3://out/sweep",
                   "config": {"runs": [{"name": "a", "recipe": "r", "calib_data": "s3://data/x"}]},
                   "submitter": {"resources": {"requests": {"ephemeral-storage": None}}}}},
        "sweep.submitter.resources.requests.ephemeral-storage is required"),
    "test-pods-without-ephemeral-request": ({"tests": {"resources": {"requests": {"ephemeral-storage": None}}}},
                                            "tests.resources.requests.ephemeral-storage is required"),
    "ray-worker-cache-above-limit": (
        {"rayQat": {"enabled": True, "recipe": "vit_b16_int8_qat", "data": "s3://datasets/x", "out": "s3://out/rq",
                    "workers": {"cacheSize": "100Gi"}}},
        "rayQat.workers.resources.limits.ephemeral-storage (72Gi) is below the emptyDir volumes"),
}


@pytest.mark.parametrize("case", sorted(STORAGE_REFUSALS))
def test_pod_storage_is_checked_when_rendering(bins, tmp_path, case):
    values, message = STORAGE_REFUSALS[case]
    assert message in refused(bins, tmp_path, values)


# --- 14. sweep settings refused before the cluster is up ------------------------------------------

def test_sweep_amounts_follow_jobs_ray_sweep(bins, tmp_path):
    sweep = CHART / "ci" / "sweep-values.yaml"
    parser = _jobs_module("jobs.ray_sweep")._parser()
    for key, value in (("gpusPerTask", 1.5), ("cpusPerTask", 2.5)):
        err = refused(bins, tmp_path, {"sweep": {key: value, "workers": {"gpus": 2}}}, sweep)
        assert f"sweep.{key} ({value}): above 1 it must be a whole number" in err
        with pytest.raises(SystemExit):  # the same rule as jobs.ray_sweep's
            parser.parse_args(["--sweep", "s", "--out", "o", f"--{key[:4]}-per-task", str(value)])
    (rj,) = of_kind(render(bins, sweep, sets=["sweep.gpusPerTask=2", "sweep.workers.gpus=2"]), "RayJob")
    args = parser.parse_args(shlex.split(rj["spec"]["entrypoint"])[3:])
    assert args.gpus_per_task == 2 and sweep_task_problems(rj) == []


SWEEP_REFUSALS = {
    "empty-runs": ({"config": {"version": 1, "runs": []}}, "sweep.config.runs: the sweep file needs a non-empty list"),
    "no-runs": ({"config": {"version": 1, "defaults": {"limit": 5}}}, "sweep.config.runs: the sweep file needs"),
    "run-not-a-mapping": ({"config": {"runs": ["vit_b16_int8"]}}, "sweep.config.runs[0]: each run is a mapping"),
    "max-replicas-without-autoscaler": ({"workers": {"replicas": 1, "maxReplicas": 4}},
                                        "sweep.workers.maxReplicas (4) differs from sweep.workers.replicas (1): "
                                        "the chart runs Ray without its autoscaler"),
    "min-replicas-without-autoscaler": ({"workers": {"replicas": 4, "minReplicas": 1}},
                                        "sweep.workers.minReplicas (1) differs"),
    "cuda-on-cpu-tasks": ({"workers": {"gpus": 0}, "config": {"runs": [
        {"name": "a", "recipe": "r", "calib_data": "s3://data/x"},
        {"name": "b", "recipe": "r", "calib_data": "s3://data/x", "device": "cuda"}]}},
        "sweep.config.runs[1].device: cuda (run b) needs a GPU, but the sweep's tasks get none"),
    "cuda-default-on-cpu-tasks": ({"gpusPerTask": 0, "config": {"defaults": {"device": "cuda:0"}, "runs": [
        {"name": "a", "recipe": "r", "calib_data": "s3://data/x"}]}},
        "sweep.config.defaults.device: cuda:0 (run a) needs a GPU"),
    # what jobs.ray_sweep refuses only once the cluster is up (helper-126): names, recipes, types
    "duplicate-run-name": ({"config": {"runs": [{"name": "a", "recipe": "r", "calib_data": "s3://data/x"},
                                                {"name": "a", "recipe": "q", "calib_data": "s3://data/x"}]}},
                           'sweep.config.runs[1].name: duplicate run name "a" (also runs[0])'),
    "run-without-recipe": ({"config": {"runs": [{"name": "a", "calib_data": "s3://data/x"}]}},
                           "sweep.config.runs[0] (a): missing recipe (or recipes)"),
    "odd-run-name": ({"config": {"runs": [{"name": "A b/c", "recipe": "r", "calib_data": "s3://data/x"}]}},
                     "/sweep/config/runs/0/name"),
    "limit-as-string": ({"config": {"defaults": {"limit": "abc"}, "runs": [
        {"name": "a", "recipe": "r", "calib_data": "s3://data/x"}]}}, "/sweep/config/defaults/limit"),
    "batch-size-as-bool": ({"config": {"runs": [{"name": "a", "recipe": "r", "calib_data": "s3://data/x",
                                                 "batch_size": True}]}}, "/sweep/config/runs/0/batch_size"),
    "version-2": ({"config": {"version": 2, "runs": [{"name": "a", "recipe": "r", "calib_data": "s3://data/x"}]}},
                  "/sweep/config/version"),
}


@pytest.mark.parametrize("case", sorted(SWEEP_REFUSALS))
def test_sweep_settings_are_refused_when_rendering(bins, tmp_path, case):
    sweep, message = SWEEP_REFUSALS[case]
    base = {"enabled": True, "out": "s3://out/sweep",
            "config": {"runs": [{"name": "a", "recipe": "r", "calib_data": "s3://data/x"}]}}
    assert message in refused(bins, tmp_path, {"sweep": {**base, **sweep}})


def test_jobs_ray_sweep_refuses_what_the_chart_refuses():
    """The render-time sweep checks are jobs.ray_sweep's own rules, not stricter ones."""
    ray_sweep = _jobs_module("jobs.ray_sweep")
    run = {"name": "a", "recipe": "r", "calib_data": "s3://d/x"}
    for config in ({"version": 1, "runs": []}, {"version": 1}, {"runs": ["vit_b16_int8"]},
                   {"runs": [run, run]}, {"runs": [{"name": "a", "calib_data": "s3://d/x"}]},
                   {"runs": [{**run, "name": "A b/c"}]}, {"runs": [{**run, "limit": "abc"}]},
                   {"runs": [{**run, "batch_size": True}]}, {"version": 2, "runs": [run]}):
        with pytest.raises(ray_sweep.SweepError):
            ray_sweep.parse_sweep(config)
    sweep = ray_sweep.parse_sweep({"runs": [{"name": "b", "recipe": "r", "calib_data": "s3://d/x", "device": "cuda"}]})
    with pytest.raises(ray_sweep.SweepError, match="needs a GPU"):
        ray_sweep._check_devices(sweep, 0.0, "sweep")


# --- 15. settings that would be ignored are refused -----------------------------------------------

def test_settings_that_would_be_ignored_are_refused(bins, tmp_path):
    err = refused(bins, tmp_path, {"monitoring": {"podMonitor": {"enabled": True}}, "runs": [GOOD_RUN]})
    assert "monitoring.podMonitor.enabled is true, but this release has no Ray pods to scrape" in err
    err = refused(bins, tmp_path, {"serviceAccount": {"create": False, "name": "",
                                                       "annotations": {"eks.amazonaws.com/role-arn": "x"}},
                                   "rbac": {"create": False}, "s3": {"secretName": ""}, "runs": [GOOD_RUN]})
    assert "serviceAccount.annotations apply only to a ServiceAccount the chart creates" in err
    assert 'the existing account "default"' in err
    # the same annotations on an account the chart creates are rendered
    irsa = {"eks.amazonaws.com/role-arn": "x"}
    objs = render(bins, values_file(tmp_path, {"serviceAccount": {"create": True, "name": "", "annotations": irsa}}))
    (sa,) = of_kind(objs, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "x"}


def test_extra_args_may_not_repeat_a_flag_the_chart_sets(bins, tmp_path):
    """extraArgs after the chart's own flags: a repeat would leave one silently unused (--device cpu
    on a GPU pod, --epochs 9 beside the run's epochs: 2), so rendering refuses it, in every workload."""
    ptq = {**GOOD_RUN, "mode": "ptq", "gpus": 1, "extraArgs": ["--device", "cpu"]}
    assert "runs[0].extraArgs: --device is set by the chart" in refused(bins, tmp_path, {"runs": [ptq]})
    qat = {**GOOD_QAT, "epochs": 2, "extraArgs": ["--epochs=9"]}
    assert "runs[0].extraArgs: --epochs=9 is set by the chart" in refused(bins, tmp_path, {"runs": [qat]})
    quiet = {**GOOD_RUN, "extraArgs": ["--progress"]}  # the chart's --no-progress
    assert "--progress is set by the chart" in refused(bins, tmp_path, {"runs": [quiet]})
    twice = {**GOOD_RUN, "extraArgs": ["--skip-bad", "--skip-bad"]}
    assert "--skip-bad appears more than once" in refused(bins, tmp_path, {"runs": [twice]})
    ray_qat = {"enabled": True, "recipe": "vit_b16_int8_qat", "data": "s3://datasets/x", "out": "s3://out/rq",
               "epochs": 2, "extraArgs": ["--num-workers", "1"]}
    assert "rayQat.extraArgs: --num-workers" in refused(bins, tmp_path, {"rayQat": ray_qat})
    sweep = {**CPU_SWEEP, "extraArgs": ["--out", "s3://out/other"]}
    assert "sweep.extraArgs: --out" in refused(bins, tmp_path, {"sweep": sweep})
    # the CLI's short forms are the same flags (helper-126: -b 8 and -o passed the render, the pod failed)
    for extra, flag in ((["-b", "8"], "-b"), (["-b8"], "-b8"), (["-o", "s3://outbkt/other"], "-o")):
        short = {**GOOD_RUN, "mode": "ptq", "extraArgs": extra}
        assert f"runs[0].extraArgs: {flag} is set by the chart" in refused(bins, tmp_path, {"runs": [short]})
    # a flag the chart does not set passes through
    ok = render(bins, values_file(tmp_path, {"runs": [{**GOOD_RUN, "extraArgs": ["--skip-bad"]}]}))
    assert any("--skip-bad" in quantcore_argv(j) for j in of_kind(ok, "Job"))


def test_the_shard_cache_is_passed_only_for_data_read_from_s3(bins, tmp_path):
    """quantcore refuses --cache-dir when every dataset is local: the chart passed it to every run,
    so a run on a mounted volume failed in its pod."""
    values = {"volumes": [{"name": "datasets", "claimName": "imagenet", "mountPath": "/mnt/datasets"}],
              "runs": [{**GOOD_RUN, "name": "local", "data": "/mnt/datasets/imagenet", "out": "s3://out/l"},
                       {**GOOD_RUN, "name": "remote", "out": "s3://out/r"},
                       {**GOOD_QAT, "name": "qlocal", "data": "/mnt/datasets/imagenet", "out": "s3://out/q"}]}
    objs = render(bins, values_file(tmp_path, values))
    argv = {j["metadata"]["name"]: " ".join(j["spec"]["template"]["spec"]["containers"][0]["args"])
            for j in of_kind(objs, "Job")}
    assert len(argv) == 3
    for name, args in argv.items():
        assert ("--cache-dir /cache/shards" in args) == name.endswith("remote"), (name, args)


# ------------------------------------------------------------------------------ restarts, exports, monitoring

def _rayqat_entry(objs) -> List[str]:
    (rj,) = [o for o in objs if o.get("kind") == "RayJob" and "jobs.ray_qat" in o["spec"]["entrypoint"]]
    return rj["spec"]["entrypoint"].split()


def test_no_resume_is_refused_where_every_retry_would_discard_the_runs_checkpoints(bins, tmp_path):
    """--no-resume in a qat run's extraArgs made every pod the Job starts (replacements after an
    eviction included) delete the checkpoints the run had written: it could never resume."""
    qat = dict(GOOD_QAT, extraArgs=["--no-resume"])
    assert "--no-resume would delete the run's checkpoints in every pod" in refused(bins, tmp_path, {"runs": [qat]})
    ray_qat = {"enabled": True, "recipe": "vit_b16_int8_qat", "data": "s3://datasets/x", "out": "s3://out/rq",
               "extraArgs": ["--no-resume"]}
    msg = refused(bins, tmp_path, {"rayQat": dict(ray_qat, backoffLimit=2)})
    assert "--no-resume with rayQat.backoffLimit 2" in msg
    # a RayJob that is not retried: the driver discards once, Ray Train's restarts resume
    assert "--no-resume" in _rayqat_entry(render(bins, values_file(tmp_path, {"rayQat": ray_qat})))


def test_ray_qat_workers_cache_remote_shards_as_the_qat_job(bins, tmp_path):
    """The RayJob's workers got a 64Gi /cache that jobs.ray_qat never used (no --cache-dir)."""
    ray_qat = {"enabled": True, "recipe": "vit_b16_int8_qat", "data": "s3://datasets/x", "out": "s3://out/rq"}
    argv = _rayqat_entry(render(bins, values_file(tmp_path, {"rayQat": ray_qat})))
    assert argv[argv.index("--cache-dir") + 1] == "/cache/shards"
    local = dict(ray_qat, data="/mnt/d/x", volumes=[{"name": "d", "claimName": "data", "mountPath": "/mnt/d"}])
    assert "--cache-dir" not in _rayqat_entry(render(bins, values_file(tmp_path, {"rayQat": local})))


def test_export_skip_bad_reaches_the_onnxruntime_check(bins, tmp_path):
    """skipBad on an export run with data was refused with a wrong reason (export decodes those images)."""
    from test_k8s import GOOD_EXPORT

    run = dict(GOOD_EXPORT, data="s3://datasets/imagenet-zip", skipBad=True)
    (job,) = [o for o in render(bins, values_file(tmp_path, {"runs": [run]})) if o.get("kind") == "Job"]
    assert "--check-skip-bad" in " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    msg = refused(bins, tmp_path, {"runs": [dict(GOOD_EXPORT, skipBad=True)]})
    assert "runs[0] (x1).skipBad: export checks the ONNX graph on the images of `data`" in msg


def test_podmonitor_timeout_and_rayjob_ttl_follow_their_operators(bins, tmp_path):
    sweep = CHART / "ci" / "sweep-values.yaml"
    msg = refused(bins, tmp_path, {"monitoring": {"podMonitor": {"enabled": True, "interval": "5s",
                                                                 "scrapeTimeout": "10s"}}}, sweep)
    assert "monitoring.podMonitor.scrapeTimeout (10s) exceeds monitoring.podMonitor.interval (5s)" in msg
    render(bins, sweep, values_file(tmp_path, {"monitoring": {"podMonitor": {"enabled": True, "interval": "1m",
                                                                             "scrapeTimeout": "30s"}}}))
    objs = render(bins, sweep, values_file(tmp_path, {"sweep": {"shutdownAfterJobFinishes": False}}))
    (rj,) = [o for o in objs if o.get("kind") == "RayJob"]
    assert rj["spec"]["shutdownAfterJobFinishes"] is False and rj["spec"]["ttlSecondsAfterFinished"] == 0
    assert kt.validate_all(objs) == []
    rj["spec"]["ttlSecondsAfterFinished"] = 60  # what KubeRay refuses, and so does the project's validator
    assert any("cannot have ttlSecondsAfterFinished" in e for e in kt.validate_object(rj))
    msg = refused(bins, tmp_path, {"sweep": {"shutdownAfterJobFinishes": False, "ttlSecondsAfterFinished": 3600}},
                  sweep)
    assert "sweep.ttlSecondsAfterFinished 3600 with sweep.shutdownAfterJobFinishes false" in msg


def test_local_paths_in_every_spelling_quantcore_reads_and_relative_paths(bins, tmp_path):
    """file:/p, FILE:///p and file://localhost/p were not seen as local paths (a read-only volume took
    an out), relative paths passed (in the pod they name the image's read-only working directory), and
    init beside a model checkpoint rendered a RayJob that quantcore refuses in its pod."""
    ro = [{"name": "datasets", "claimName": "imagenet", "mountPath": "/mnt/datasets", "readOnly": True}]

    def sweep_with(**entry) -> dict:  # the sweep config is free-form: the schema's URI patterns do not reach it
        run = {**CPU_SWEEP["config"]["runs"][0], **entry}
        return {"volumes": ro, "sweep": {**CPU_SWEEP, "config": {**CPU_SWEEP["config"], "runs": [run]}}}

    for uri in ("file:/mnt/datasets/c", "FILE:///mnt/datasets/c", "file://localhost/mnt/datasets/c"):
        msg = refused(bins, tmp_path, sweep_with(cache_dir=uri))
        assert f"{uri} is written to volume datasets (claim imagenet), which is mounted read-only" in msg, msg
        msg = refused(bins, tmp_path, sweep_with(calib_data=uri.replace("datasets", "other")))
        assert "is a local path, but no volume is mounted above it" in msg, msg
    for data in ("imagenet", "./datasets/imagenet"):
        msg = refused(bins, tmp_path, sweep_with(calib_data=data))
        assert f"config.runs[0].calib_data: {data} is a relative path" in msg, msg
    assert "unsupported URI scheme" in refused(bins, tmp_path, sweep_with(calib_data="gs://b/d"))
    render(bins, values_file(tmp_path, sweep_with(calib_data="file://localhost/mnt/datasets/i")))
    # the runs' URIs are held to s3://, file:///, /... by the schema already
    assert "does not match pattern" in refused(bins, tmp_path, {"runs": [{**GOOD_RUN, "data": "imagenet"}]})
    ray_qat = {"enabled": True, "recipe": "vit_b16_int8_qat", "data": "s3://datasets/x", "out": "s3://out/rq",
               "init": "s3://out/ptq/model.qc.pt", "model": "s3://models/fp32.pt"}
    assert "rayQat: init s3://out/ptq/model.qc.pt and model s3://models/fp32.pt: give one" in refused(
        bins, tmp_path, {"rayQat": ray_qat})
    assert "runs[0]: init s3://out/ptq/model.qc.pt and model s3://models/fp32.pt: give one" in refused(
        bins, tmp_path, {"runs": [{**GOOD_QAT, "init": "s3://out/ptq/model.qc.pt", "model": "s3://models/fp32.pt"}]})
    # a shard cache the user set in extraArgs (the only way before the chart set one) is kept, not refused
    mine = {k: v for k, v in ray_qat.items() if k != "model"}
    argv = _rayqat_entry(render(bins, values_file(tmp_path, {"rayQat": dict(mine, extraArgs=["--cache-dir",
                                                                                             "/cache/mine"])})))
    assert argv.count("--cache-dir") == 1 and argv[argv.index("--cache-dir") + 1] == "/cache/mine"
