"""TorchX components: inputs the Helm chart refuses are refused at submission too, every option the
CLI has reaches it, and options a scheduler would ignore are errors (found by a platform engineer's
break pass: `torchx run --dryrun` accepted them, the pods failed or ignored them later)."""
import re
from typing import Any, Dict, Optional

import pytest

from jobs import components

BASE = dict(recipe="r", data="s3://b/d", out="s3://b/o")


def _ours(app, cfg: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    from torchx.schedulers.kubernetes_scheduler import create_scheduler, sanitize_for_serialization

    info = create_scheduler("test").submit_dryrun(app, {"queue": "default", **(cfg or {})})
    return sanitize_for_serialization(info.request.resource)


def _local(app) -> None:
    from torchx.schedulers.local_scheduler import create_scheduler

    create_scheduler("test").submit_dryrun(app, {})


def _container(job: Dict[str, Any]) -> Dict[str, Any]:
    (task,) = job["spec"]["tasks"]
    (c,) = task["template"]["spec"]["containers"]
    return c


def _cli(app) -> str:
    (role,) = app.roles
    return " ".join([role.entrypoint] + list(role.args))


def test_s3_endpoint_env_names_and_reserved_labels_are_checked_as_the_chart_does():
    for bad in ("not a url", "minio:9000", "ftp://x"):
        with pytest.raises(ValueError, match=re.escape(f"--s3_endpoint {bad!r}")):
            components.calibrate(recipe=["r"], data="s3://b/d", out="s3://b/o", s3_endpoint=bad)
    for good in ("http://minio.ml:9000", "HTTPS://s3.example.com/prefix"):
        components.calibrate(recipe=["r"], data="s3://b/d", out="s3://b/o", s3_endpoint=good)
    for var in components.ENDPOINT_ENVS:  # the same endpoint given through --env
        with pytest.raises(ValueError, match=re.escape(f"--env {var}='minio:9000': not an endpoint URL")):
            components.qat(**BASE, env={var: "minio:9000"})
    for name in ("1BAD", "A B", "A=B"):
        with pytest.raises(ValueError, match=re.escape(f"--env: {name!r} is not an environment variable name")):
            components.qat(**BASE, env={name: "1"})
    components.qat(**BASE, env={"FOO.BAR": "1", "foo-bar": "2"})  # names Kubernetes takes
    from torchx.schedulers import kubernetes_scheduler as k

    torchx_labels = [getattr(k, n) for n in dir(k) if n.startswith("LABEL_") and n != "LABEL_INSTANCE_TYPE"]
    assert torchx_labels and all(lab.startswith(components.RESERVED_LABEL_PREFIXES) or lab in components.RESERVED_LABELS
                                 for lab in torchx_labels)
    for key in ("torchx.pytorch.org/role-name", "app.kubernetes.io/instance", "volcano.sh/job-name"):
        with pytest.raises(ValueError, match=re.escape(f"--labels: {key!r} is set by TorchX or Volcano")):
            components.qat(**BASE, labels={key: "x"})
    # keys nobody selects on, Volcano's own user labels among them
    components.qat(**BASE, labels={"team": "vision", "app.kubernetes.io/part-of": "quantcore",
                                   "volcano.sh/preemptable": "true"})


@pytest.mark.parametrize("make, flag", [
    (lambda v: components.calibrate(recipe=["r"], data=v, out="s3://b/o"), "--data"),
    (lambda v: components.calibrate(recipe=["r"], data="s3://b/d", out=v), "--out"),
    (lambda v: components.evaluate(checkpoint=v, data="s3://b/d", out="s3://b/o"), "--checkpoint"),
    (lambda v: components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", eval_data=v), "--eval_data"),
    (lambda v: components.export(checkpoint="s3://b/c", out="s3://b/o", check_data=v), "--check_data"),
    (lambda v: components.qat(recipe="r", data="s3://b/d", out="s3://b/o", init=v), "--init"),
])
def test_empty_uris_are_refused(make, flag):
    for value in ("", "  "):
        with pytest.raises(ValueError, match=f"{flag}: empty URI"):
            make(value)


def test_empty_splits_duplicate_recipes_and_bad_counts_are_refused_at_submission():
    """Each would only fail in the pod (helper-126): an empty split looked for class folders under the
    dataset root, a repeated recipe wrote one folder twice; --batch_size 0 named --limit too."""
    with pytest.raises(ValueError, match="--eval_split: empty split name"):
        components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", eval_split="")
    with pytest.raises(ValueError, match="--split: empty split name"):
        components.evaluate(checkpoint="s3://b/c", data="s3://b/d", out="s3://b/o", split=" ")
    with pytest.raises(ValueError, match="--recipe: fmnist_w8a8_ft1 given more than once"):
        components.ptq(recipe=["fmnist_w8a8_ft1,fmnist_w8a8_ft1"], calib_data="s3://b/d", out="s3://b/o")
    with pytest.raises(ValueError, match=r"^--batch_size must be >= 1, got 0$"):
        components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", batch_size=0)
    with pytest.raises(ValueError, match=r"^--limit must be >= 0"):
        components.evaluate(checkpoint="s3://b/c", data="s3://b/d", out="s3://b/o", limit=-1)


def test_local_paths_on_kubernetes_must_lie_on_a_mounted_claim():
    ro = ["type=volume", "src=imagenet", "dst=/data", "readonly"]
    rw = ["type=volume", "src=runs", "dst=/results"]
    cases = [  # (component call, message) that fail when the Volcano Job is built
        (lambda: components.ptq(recipe=["r"], calib_data="/data/imagenet", out="/results/run1"),
         "--calib_data '/data/imagenet': a local path, but no PersistentVolumeClaim is mounted above it"),
        (lambda: components.calibrate(recipe=["r"], data="/data/x", out="/data/out", mounts=ro),
         "--out '/data/out': written to the PersistentVolumeClaim imagenet, which --mounts mounts readonly"),
        (lambda: components.evaluate(checkpoint="file:///ckpt/model.qc.pt", data="s3://b/d", out="s3://b/o"),
         "--checkpoint 'file:///ckpt/model.qc.pt': a local path"),
        (lambda: components.qat(recipe="r", data="/data/../etc/x", out="s3://b/o", mounts=ro),
         "--data '/data/../etc/x': a local path"),
        (lambda: components.export(checkpoint="s3://b/c", out="/results/x", check_data="/mnt/v"),
         "--out '/results/x'"),
        # every file: spelling quantcore reads is a local path too
        (lambda: components.calibrate(recipe=["r"], data="s3://b/d", out="file:/data/out", mounts=ro),
         "--out 'file:/data/out': written to the PersistentVolumeClaim imagenet"),
        (lambda: components.calibrate(recipe=["r"], data="s3://b/d", out="FILE:///data/out", mounts=ro),
         "--out 'FILE:///data/out': written to the PersistentVolumeClaim imagenet"),
        # relative paths name the image's read-only working directory
        (lambda: components.calibrate(recipe=["r"], data="data/imagenet", out="s3://b/o", mounts=ro),
         "--data 'data/imagenet': a relative path"),
        (lambda: components.calibrate(recipe=["r"], data="s3://b/d", out="./out", mounts=rw),
         "--out './out': a relative path"),
        (lambda: components.calibrate(recipe=["r"], data="gs://b/d", out="s3://b/o"),
         "--data: unsupported URI scheme 'gs://'"),
    ]
    for make, message in cases:
        app = make()
        with pytest.raises(ValueError, match=re.escape(message)):
            _ours(app)
    # on the claims: accepted
    _ours(components.ptq(recipe=["r"], calib_data="/data/imagenet", out="/results/run1", mounts=ro + rw))
    _ours(components.qat(recipe="r", data="/data/x", out="file:///results/q", init="/results/p/model.qc.pt",
                         mounts=ro + rw))
    _ours(components.calibrate(recipe=["r"], data="file://localhost/data/x", out="S3://b/o", mounts=ro))


def test_qat_trains_one_recipe_and_says_so_at_submission():
    with pytest.raises(ValueError, match="qat trains one recipe"):
        components.qat(recipe="a,b", data="s3://b/d", out="s3://b/o")


def test_options_that_cannot_apply_are_errors():
    with pytest.raises(ValueError, match=r"--m 'foo.bar' and --script 'train.py'"):
        components.ddp("--x", "1", script="train.py", m="foo.bar")
    for make in (lambda **kw: components.ddp("evaluate", **kw), lambda **kw: components.qat(**BASE, **kw)):
        with pytest.raises(ValueError, match="--rdzv_port 29400 with --nnodes 1"):
            make(rdzv_port=29400)
        for port in (80, 1023, 70000):
            with pytest.raises(ValueError, match=f"--rdzv_port {port}: use 1024..65535"):
                make(rdzv_port=port, nnodes=2)
        make(rdzv_port=29400, nnodes=2)
    with pytest.raises(ValueError, match="--check_skip_bad apply to the images of --check_data"):
        components.export(checkpoint="s3://b/c", out="s3://b/o", check_skip_bad=True)


def test_pod_options_on_a_local_scheduler_are_errors():
    for kw, flags in (({"deadline_s": 1}, "--deadline_s"),
                      ({"node_selector": {"gpu": "h100"}, "tolerations": ["dedicated=ml:NoSchedule"]},
                       "--tolerations, --node_selector"),
                      ({"mounts": ["type=volume", "src=nopvc", "dst=/data"], "cache_gb": 1}, "--cache_gb, --mounts")):
        app = components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", **kw)
        with pytest.raises(ValueError, match=re.escape(f"{flags}: do") + ".*not apply on -s local_cwd"):
            _local(app)
        _ours(app)  # Kubernetes applies them
    _local(components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", s3_secret="creds"))


def test_every_data_option_of_the_cli_reaches_the_command_line():
    for make in (lambda **kw: components.calibrate(recipe=["r"], data="s3://b/d", out="s3://b/o", **kw),
                 lambda **kw: components.evaluate(checkpoint="s3://b/c", data="s3://b/d", out="s3://b/o", **kw),
                 lambda **kw: components.ptq(recipe=["r"], calib_data="s3://b/d", out="s3://b/o", **kw),
                 lambda **kw: components.qat(**BASE, **kw)):
        assert "--layout" not in _cli(make())
        assert "--layout resisc" in _cli(make(layout="resisc"))
        with pytest.raises(ValueError, match="--layout 'tar'"):
            make(layout="tar")
    app = components.export(checkpoint="s3://b/c", out="s3://b/o", check_data="s3://b/d", check_skip_bad=True)
    assert "--check-skip-bad" in _cli(app)


def test_layouts_agree_with_quantcore():
    from quantcore.data import detect

    assert set(components.LAYOUTS) == {"auto"} | set(detect._ALIASES)


def test_resume_false_starts_over_only_without_job_retries():
    app = components.qat(**BASE, resume=False)
    with pytest.raises(ValueError, match="--resume False with --max_retries 2 on -s kubernetes"):
        _ours(app)
    _local(app)  # local_cwd never retries: its default max_retries does not act
    app = components.qat(**BASE, resume=False, max_retries=0)
    assert "--no-resume" in _cli(app)
    _ours(app)
    _local(app)  # max_retries 0 is what local_cwd does: not refused as a pod-only option
    assert "--no-resume" not in _cli(components.qat(**BASE))
    with pytest.raises(ValueError, match="--init s3://b/p.qc.pt and --checkpoint s3://b/w.pt: give one"):
        components.qat(**BASE, init="s3://b/p.qc.pt", checkpoint="s3://b/w.pt")


def test_env_values_are_literal_and_shm_is_half_the_memory_on_kubernetes():
    c = _container(_ours(components.qat(**BASE, env={"B": "$(A)", "C": "x"}, memMB=4096)))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["B"] == "$$(A)" and env["C"] == "x"
    job = _ours(components.calibrate(recipe=["r"], data="s3://b/d", out="s3://b/o", memMB=4096))
    (task,) = job["spec"]["tasks"]
    (shm,) = [v for v in task["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2048Mi"}
    job = _ours(components.qat(**BASE, gpus=8, memMB=512 * 1024))  # eight ranks' DataLoader workers
    (task,) = job["spec"]["tasks"]
    (shm,) = [v for v in task["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["sizeLimit"] == f"{256 * 1024}Mi"


@pytest.mark.parametrize("flag", ["env", "node_selector", "labels", "annotations"])
def test_key_value_options_malformed_on_the_command_line_name_the_flag(flag):
    """`torchx run ... --env FOO` ended in a ValueError traceback from TorchX's own Dict decoding;
    the text is now parsed here (as TorchX parses it) and a malformed one refused naming the flag."""
    from torchx.specs.builders import materialize_appdef

    args = ["--recipe", "r", "--data", "s3://b/d", "--out", "s3://b/o"]
    with pytest.raises(ValueError, match=re.escape(f"--{flag} 'FOO': expected KEY=VALUE pairs")):
        materialize_appdef(components.qat, args + [f"--{flag}", "FOO"])
    text = "team=vision,tier=a" if flag != "env" else "FOO=1,BAR=x"
    from_text = materialize_appdef(components.qat, args + [f"--{flag}", text])
    from_dict = components.qat(**BASE, **{flag: dict(kv.split("=") for kv in text.split(","))})
    same = [(a.roles, a.metadata) for a in (from_text, from_dict, components.qat(**BASE))]
    assert same[0] == same[1] and same[0] != same[2]  # the text gives the dict's job, and the option reaches it
