"""Policy scan with a real, well-kept scanner: checkov over every manifest we render.

Scanned: the Helm chart with its defaults and with each ``ci/*-values.yaml``, the kustomize bases
(``k8s/``, ``k8s/qat/``), the Volcano Job of every TorchX component (``torchx run --dryrun -s
kubernetes``) and the RayJobs; checkov does not know the custom kinds (RayJob, Volcano Job), so each
pod template inside them is scanned as a core ``PodTemplate`` as well. Every failed check must be
fixed or justified in ``tests/checkov_skips.yaml`` (a reason per check, optionally limited to where it
applies); a skip that no longer matches any finding fails too, so the list cannot rot.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import pytest

import k8s_tools as kt
import policy_tools as pt
# fixtures shared with the render tests (imported, so pytest uses them here too)
from test_k8s import (_hermetic_helm, all_rendered, bins, chart_renders, kustomize_qat_render,  # noqa: F401
                      kustomize_render)
from test_torchx_k8s import dryruns, jobs  # noqa: F401


@pytest.fixture(scope="module")
def checkov():
    try:
        return pt.checkov_binary()
    except kt.ToolError as exc:
        pytest.fail(f"checkov unavailable: {exc}")


def _for_checkov(objs: List[Tuple[str, Dict[str, Any]]]) -> List[Tuple[str, Dict[str, Any]]]:
    """The objects as checkov should see them: custom resources (RayJob, Volcano Job) replaced by
    their pod templates as core PodTemplates (checkov reads a Volcano ``Job`` as a batch/v1 Job and
    would report the checks of a pod spec that is not there)."""
    out = []
    for source, obj in objs:
        custom = obj.get("apiVersion", "").startswith(("ray.io", "batch.volcano.sh"))
        if not custom:
            out.append((source, obj))
            continue
        name = obj["metadata"].get("name", "x")
        for where, tmpl in kt.embedded_pod_templates(obj):
            meta = dict(tmpl.get("metadata") or {}, name=name, namespace=obj["metadata"].get("namespace", "default"))
            out.append((f"{source} {obj['kind']}/{name} {where}",
                        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta,
                         "template": dict(tmpl, metadata=meta)}))
    return out


@pytest.fixture(scope="module")
def groups(all_rendered, jobs) -> Dict[str, List[Tuple[str, Dict[str, Any]]]]:  # noqa: F811
    """One group per deployable unit (a chart render, a kustomization, the TorchX jobs with the
    namespace's objects they run in): checkov's graph checks (NetworkPolicy coverage, RBAC) must
    not connect objects that are never applied together."""
    out: Dict[str, List[Tuple[str, Dict[str, Any]]]] = {}
    for source, obj in all_rendered:
        out.setdefault(source, []).append((source, obj))
    # the TorchX jobs and k8s/qat/ run in the namespace that the base k8s/ sets up
    base = [(s, o) for s, o in out["kustomize"] if o["kind"] in ("Namespace", "NetworkPolicy", "ServiceAccount")]
    out["torchx"] = [(f"torchx[{name}]", job) for name, job in jobs.items()] + base
    out["kustomize[qat]"] = out["kustomize[qat]"] + base
    return {k: _for_checkov(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def findings(groups, checkov):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda objs: pt.scan(objs, checkov), groups.values()))
    return [f for r in results for f in r]


def test_every_rendered_manifest_passes_checkov_or_has_a_justified_exception(groups, findings):
    scanned = [x for g in groups.values() for x in g]
    kinds = {o["kind"] for _, o in scanned}
    assert {"Job", "PodTemplate", "Pod", "Namespace", "Role", "RoleBinding", "NetworkPolicy"} <= kinds
    assert sum(s.startswith("torchx[") for s, _ in scanned) >= 5  # one pod template per component at least
    assert any("RayJob" in s for s, _ in scanned)
    left, stale = pt.unjustified(findings, pt.load_skips())
    assert not left, "checkov findings without a fix or a justification in tests/checkov_skips.yaml:\n" + \
        "\n".join(sorted({str(f) for f in left}))
    assert not stale, f"tests/checkov_skips.yaml: exceptions that match no finding any more: {sorted(stale)}"


def test_every_exception_has_a_reason_and_names_a_real_check():
    skips = pt.load_skips()
    assert skips, "no exceptions listed: then delete the file and this test"
    for cid, s in skips.items():
        assert cid.startswith(("CKV_K8S_", "CKV2_K8S_")), cid
        assert len(s["reason"].split()) >= 8, f"{cid}: say why, in a sentence"


def test_the_scanner_fails_a_weakened_pod(kustomize_render, checkov):  # noqa: F811
    """The same scan catches what we promise not to ship: root, privileged, host namespaces,
    writable root filesystem, no resource limits, a token mounted for nothing."""
    (job,) = [o for o in kustomize_render if o["kind"] == "Job"][:1]
    bad = copy.deepcopy(job)
    bad["metadata"]["name"] = "weakened"
    spec = bad["spec"]["template"]["spec"]
    spec["hostNetwork"] = spec["hostPID"] = True
    spec.pop("securityContext", None)
    for c in spec["containers"]:
        c["securityContext"] = {"privileged": True, "runAsUser": 0, "allowPrivilegeEscalation": True,
                                "readOnlyRootFilesystem": False}
        c.pop("resources", None)
    good_ids = {f.check_id for f in pt.scan([("k8s", job)], checkov)}
    bad_ids = {f.check_id for f in pt.scan([("k8s", bad)], checkov)}
    expected = {"CKV_K8S_16",  # privileged
                "CKV_K8S_19",  # hostNetwork
                "CKV_K8S_17",  # hostPID
                "CKV_K8S_20",  # allowPrivilegeEscalation
                "CKV_K8S_22",  # readOnlyRootFilesystem
                "CKV_K8S_11", "CKV_K8S_13",  # CPU / memory limits
                }
    assert expected <= bad_ids, sorted(expected - bad_ids)
    assert not expected & good_ids, sorted(expected & good_ids)


def test_exceptions_apply_only_where_they_say():
    f = pt.Finding("CKV_K8S_43", "Image should use digest", "chart[defaults]: Job/x", "Job.q.x")
    g = pt.Finding("CKV_K8S_43", "Image should use digest", "kustomize: Job/x", "Job.q.x")
    left, stale = pt.unjustified([f, g], {"CKV_K8S_43": {"reason": "r", "where": ["chart[defaults]"]}})
    assert left == [g] and not stale
    left, stale = pt.unjustified([], {"CKV_K8S_43": {"reason": "r", "where": None}})
    assert left == [] and stale == {"CKV_K8S_43"}


def _matches(selector: Dict[str, Any], labels: Dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # we only write matchLabels
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def test_network_policy_covers_every_pod_of_a_release_and_admits_only_its_own_pods(chart_renders):  # noqa: F811
    for name, objs in chart_renders.items():
        (np,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
        spec = np["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        pods = [(f"{o['kind']}/{o['metadata']['name']}", o["metadata"]) for o in objs if o["kind"] == "Pod"]
        for o in objs:
            for where, tmpl in kt.embedded_pod_templates(o) + ([("template", o["spec"]["template"])]
                                                             if o["kind"] == "Job" else []):
                pods.append((f"{o['kind']}/{o['metadata']['name']} {where}", tmpl["metadata"]))
        assert pods, name
        for where, meta in pods:
            assert _matches(spec["podSelector"], meta.get("labels") or {}), f"{name}: {where} not covered"
        # rule 1: from the release's own pods (all ports); any other rule names its ports
        first, *rest = spec["ingress"]
        assert first == {"from": [{"podSelector": spec["podSelector"]}]}, name
        for rule in rest:
            assert rule.get("ports"), f"{name}: an ingress rule open on every port: {rule}"
        has_ray = any(o["kind"] == "RayJob" for o in objs)
        assert any({"port": 8265, "protocol": "TCP"} in r.get("ports", []) for r in rest) == has_ray, name
