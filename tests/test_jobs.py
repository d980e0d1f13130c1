"""jobs/: TorchX components, the jobs.launch entrypoint (S3 credentials from a Kubernetes Secret),
jobs.torchrun, the Ray PTQ sweep. Includes the real `torchx run` CLI (local_cwd against moto; the
kubernetes scheduler's Volcano Jobs are in tests/test_torchx_k8s.py) and a real local Ray cluster in
a loopback-only network namespace (tests/ray_e2e.py)."""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # jobs/ is shipped as source, not installed
    sys.path.insert(0, str(REPO))

from jobs import components, launch  # noqa: E402
from jobs.ray_sweep import SweepError, load_sweep, parse_sweep  # noqa: E402
from tiny_data import TINY_RECIPE as RECIPE, make_images  # noqa: E402

BIN = Path(sys.executable).parent
TORCHX = BIN / "torchx"
COMPONENTS_FILE = REPO / "jobs" / "components.py"
COMPONENT_NAMES = ("calibrate", "evaluate", "ptq", "ddp", "qat", "export")
LAUNCH_PREFIX = ["-m", "jobs.launch", "quantcore"]


def _subprocess_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("TORCHXCONFIG", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ components

def _cli_args(app) -> List[str]:
    (role,) = app.roles
    assert role.entrypoint == "python" and role.args[:3] == LAUNCH_PREFIX, (role.entrypoint, role.args)
    return role.args[3:]


def _assert_cli_accepts(cli_args: List[str]) -> None:
    """The real quantcore CLI knows every option the component passes (click rejects unknown ones
    while parsing, before the eager --help)."""
    from quantcore.cli import main

    assert main(list(cli_args) + ["--help"]) == 0, cli_args


def test_calibrate_component_appdef():
    recipes, env = ["tiny.yaml", "s3://b/r2.yaml"], {"FOO": "bar"}
    recipes_before, env_before = list(recipes), dict(env)
    app = components.calibrate(recipe=recipes, data="s3://b/data", out="s3://b/out", checkpoint="s3://b/fp32.pt",
                               gpus=1, cpu=6, memMB=20000, workers=3, s3_endpoint="http://minio:9000",
                               s3_secret="qc-s3", env=env, max_retries=3, cache_dir="/cache/shards",
                               skip_bad=True)
    assert (recipes, env) == (recipes_before, env_before)  # caller's arguments untouched
    (role,) = app.roles
    args = _cli_args(app)
    assert args == ["calibrate", "--recipe", "tiny.yaml", "--recipe", "s3://b/r2.yaml", "--data", "s3://b/data",
                    "--split", "train", "--out", "s3://b/out", "--checkpoint", "s3://b/fp32.pt", "--workers", "3",
                    "--device", "cuda", "--no-progress", "--cache-dir", "/cache/shards", "--skip-bad"]
    _assert_cli_accepts(args)
    assert (role.resource.gpu, role.resource.cpu, role.resource.memMB) == (1, 6, 20000)
    assert role.env["AWS_ENDPOINT_URL"] == "http://minio:9000" and role.env["QUANTCORE_S3_SECRET"] == "qc-s3"
    assert role.env["FOO"] == "bar" and role.num_replicas == 1 and role.image == components.DEFAULT_IMAGE
    assert role.max_retries == 3 and role.retry_policy.value == "APPLICATION"
    assert role.pod.cache_gb == components.OPTS.cache_gb and role.cache_dir == "/cache/shards"
    # defaults: one GPU, no endpoint/secret env, 2 retries of infrastructure failures; gpus=0 -> --device cpu
    (d,) = components.calibrate(recipe=["r"], data="d", out="o").roles
    assert d.resource.gpu == 1 and "AWS_ENDPOINT_URL" not in d.env and "QUANTCORE_S3_SECRET" not in d.env
    assert d.max_retries == 2 and isinstance(d, components.QuantcoreRole)
    (c,) = components.calibrate(recipe=["r"], data="d", out="o", gpus=0).roles
    assert c.resource.gpu == 0 and c.args[c.args.index("--device") + 1] == "cpu"


def test_evaluate_and_ptq_component_appdefs():
    ev = components.evaluate(checkpoint="s3://b/o/tiny/model.qc.pt", data="s3://b/data", out="s3://b/ev",
                             limit=500, gpus=0, s3_secret="qc-s3")
    args = _cli_args(ev)
    assert args[:9] == ["evaluate", "--checkpoint", "s3://b/o/tiny/model.qc.pt", "--data", "s3://b/data",
                        "--split", "val", "--out", "s3://b/ev"]
    assert args[args.index("--limit") + 1] == "500" and args[args.index("--device") + 1] == "cpu"
    assert ev.roles[0].env["QUANTCORE_S3_SECRET"] == "qc-s3" and ev.roles[0].resource.gpu == 0
    _assert_cli_accepts(args)
    assert "--limit" not in _cli_args(components.evaluate(checkpoint="c", data="d", out="o"))

    pt = components.ptq(recipe=["a", "b"], calib_data="s3://b/train", out="s3://b/ptq", limit=64, max_retries=1)
    args = _cli_args(pt)
    assert args[:5] == ["ptq", "--recipe", "a", "--recipe", "b"]
    pairs = dict(zip(args[5::2], args[6::2]))
    assert pairs["--calib-data"] == pairs["--eval-data"] == "s3://b/train"  # eval data defaults to calib data
    assert (pairs["--eval-split"], pairs["--limit"], pairs["--device"]) == ("val", "64", "cuda")
    assert pt.roles[0].max_retries == 1 and pt.roles[0].resource.gpu == 1
    _assert_cli_accepts(args)
    pt2 = components.ptq(recipe="single", calib_data="c", out="o", eval_data="e", eval_split="test")
    args2 = _cli_args(pt2)
    assert args2[1:3] == ["--recipe", "single"] and args2[args2.index("--eval-data") + 1] == "e"


def test_ddp_component_wraps_torchrun_in_the_launcher():
    env = {"NCCL_DEBUG": "INFO"}
    app = components.ddp("calibrate", "--recipe", "r.yaml", "--data", "s3://b/d", "--out", "s3://b/o",
                         nnodes=2, nproc_per_node=4, gpus=4, s3_endpoint="http://minio:9000", s3_secret="qc-s3",
                         env=env, max_retries=2)
    assert env == {"NCCL_DEBUG": "INFO"}
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    cmd = role.args[1]
    # jobs.torchrun, not torchrun: a rank's exit 2 stays the container's status (Volcano ends the job)
    assert cmd.startswith("exec python -m jobs.launch python -m jobs.torchrun ")
    for part in ("--nnodes 2", "--nproc_per_node 4", "--rdzv_backend c10d", ":29500",
                 "-m quantcore.cli calibrate --recipe r.yaml --data s3://b/d --out s3://b/o"):
        assert part in cmd, (part, cmd)
    assert role.num_replicas == 2 and role.resource.gpu == 4 and role.max_retries == 2
    assert role.env["QUANTCORE_S3_SECRET"] == "qc-s3" and role.env["NCCL_DEBUG"] == "INFO"
    assert role.port_map == {"c10d": 29500}
    elastic = components.ddp(script="qat/train.py", nnodes=4, min_nnodes=2, nproc_per_node=1, gpus=1)
    ecmd = elastic.roles[0].args[1]
    assert "--nnodes 2:4" in ecmd and ecmd.endswith("qat/train.py") and "-m quantcore.cli" not in ecmd
    assert elastic.roles[0].min_replicas == 2 and elastic.roles[0].num_replicas == 4
    with pytest.raises(ValueError, match="nproc_per_node"):
        components.ddp(nproc_per_node=8, gpus=4)
    # rendezvous settings torchrun would refuse only inside the pods (each retry failing again)
    for kw, words in (({"rdzv_backend": "etcdd"}, "--rdzv_backend 'etcdd'"), ({"rdzv_port": 0}, "--rdzv_port 0"),
                      ({"rdzv_backend": "static", "nnodes": 3, "min_nnodes": 2}, "not elastic"),
                      ({"m": ""}, "--m is empty")):
        with pytest.raises(components.ComponentError, match=words):
            components.ddp("evaluate", **kw)
    with pytest.raises(components.ComponentError, match="--rdzv_port 70000"):
        components.qat("r", "s3://b/d", "s3://b/o", rdzv_port=70000)
    assert "--rdzv_backend static" in components.ddp("evaluate", rdzv_backend="static", nnodes=2).roles[0].args[1]


def _torchrun_words(app) -> Tuple[List[str], Any]:
    """A one-container component's command with ranks: (the words up to jobs.torchrun, torchrun's
    parsed arguments)."""
    from torch.distributed.run import get_args_parser

    (role,) = app.roles
    words = [role.entrypoint] + role.args
    prefix = ["python", "-m", "jobs.launch", "python", "-m", "jobs.torchrun"]
    assert words[:6] == prefix, words
    return words[:6], get_args_parser().parse_args(words[6:])


@pytest.mark.parametrize("gpus", [2, 8])
def test_multi_gpu_components_run_one_data_parallel_rank_per_gpu(gpus):
    """calibrate/evaluate/ptq with gpus > 1: jobs.launch (Secret first), then jobs.torchrun with one
    rank per GPU, as the Helm chart's Jobs (before: one process holding every GPU)."""
    apps = {"calibrate": components.calibrate(recipe=["r"], data="d", out="o", gpus=gpus),
            "evaluate": components.evaluate(checkpoint="c", data="d", out="o", gpus=gpus),
            "ptq": components.ptq(recipe=["a", "b"], calib_data="d", out="o", gpus=gpus)}
    for command, app in apps.items():
        _, a = _torchrun_words(app)
        assert (a.standalone, a.nproc_per_node, a.max_restarts) == (True, str(gpus), 0), command
        assert a.module and a.training_script == "quantcore.cli"
        cli = a.training_script_args
        assert cli[0] == command and cli[cli.index("--device") + 1] == "cuda"
        _assert_cli_accepts(cli)
        assert app.roles[0].resource.gpu == gpus and app.roles[0].num_replicas == 1
    for gpus_ in (0, 1):  # one process: no torchrun
        assert _cli_args(components.ptq(recipe=["r"], calib_data="d", out="o", gpus=gpus_))[0] == "ptq"


def test_multi_gpu_component_command_ends_on_a_user_error_with_exit_2(tmp_path):
    """The container command of calibrate --gpus 2, run as it is (jobs.launch -> jobs.torchrun -> 2
    ranks of quantcore): a recipe that does not exist exits 2 (the Volcano job ends, no retry)."""
    missing = tmp_path / "no-such-recipe.yaml"
    (role,) = components.calibrate(recipe=[str(missing)], data=str(tmp_path), out=str(tmp_path / "o"), gpus=2,
                                   workers=0).roles
    assert role.entrypoint == "python"
    proc = subprocess.run([sys.executable] + role.args, cwd=REPO, env=_subprocess_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"recipe '{missing}' not found" in proc.stderr  # quantcore's own user error, on the ranks
    # one line per rank and one from the launcher, not elastic's failure table or a gloo traceback
    assert "FAILED" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith("stopped on the error above, the other ranks with it; exit status 2")


def test_a_bad_image_on_one_rank_ends_with_one_line_per_rank_not_a_peer_traceback(tmp_path):
    """A corrupt image in one rank's calibration shard, no --skip-bad: that rank prints the one-line
    error; the other one's collective then failed with a page of gloo traceback ('Connection closed by
    peer ... GLHF!') and the launcher added elastic's failure table. Now each says one line; exit 2."""
    root = make_images(tmp_path / "imgs", splits=(("train", 4),))
    bad = sorted((root / "train").rglob("*.jpg"))[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rec = tmp_path / "tiny.yaml"
    rec.write_text(yaml.safe_dump(RECIPE))
    cmd = [sys.executable, "-m", "jobs.torchrun", "--standalone", "--nproc_per_node", "2", "--monitor_interval",
           "0.1", "-m", "quantcore.cli", "calibrate", "-r", str(rec), "-d", str(root), "--split", "train",
           "-o", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(OMP_NUM_THREADS="1", LOGLEVEL="WARNING"),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: cannot decode image {bad}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "FAILED" not in proc.stderr, proc.stderr[-3000:]
    # a peer whose collective failed (if it got there before the agent stopped it) says so in one line
    # that keeps the exception's own text (the first failure may itself be a network fault)
    peer = [ln for ln in proc.stderr.splitlines() if "a collective failed" in ln]
    assert all(ln.startswith("error: rank ") and "RuntimeError: " in ln for ln in peer), peer
    assert proc.stderr.rstrip().endswith("the other ranks with it; exit status 2")


@pytest.mark.parametrize("fn", ["ddp", "qat"])
def test_ranks_per_node_is_one_per_gpu(fn):
    """ddp (like qat) defaults --nproc_per_node to --gpus and refuses any other count with GPUs: fewer
    ranks left GPUs idle (ddp's default was 1 rank on 4 GPUs), more share a GPU."""
    def make(**kw):
        if fn == "ddp":
            return components.ddp("evaluate", "--device", "cuda", **kw)
        return components.qat(recipe="r", data="d", out="o", **kw)

    def nproc(app):
        return re.search(r"--nproc_per_node (\d+)", app.roles[0].args[1]).group(1)

    assert nproc(make(nnodes=2, gpus=4)) == "4" and nproc(make(gpus=4, nproc_per_node=4)) == "4"
    assert nproc(make(gpus=0)) == "1" and nproc(make(gpus=0, nproc_per_node=3)) == "3"
    for bad in (1, 2, 8):
        with pytest.raises(ValueError, match=rf"--nproc_per_node {bad} with --gpus 4: each node runs one rank per "
                                             rf"GPU; leave --nproc_per_node at 0 \(one per GPU\) or set it to 4"):
            make(nnodes=2, gpus=4, nproc_per_node=bad)
    with pytest.raises(ValueError, match="--nproc_per_node must be >= 0"):
        make(nproc_per_node=-1)


def _qat_torchrun(app):
    """The qat component's container command: (launcher words, torchrun's parsed arguments)."""
    from torch.distributed.run import get_args_parser

    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c", (role.entrypoint, role.args)
    words = shlex.split(role.args[1])
    prefix = ["exec", "python", "-m", "jobs.launch", "python", "-m", "jobs.torchrun"]
    assert words[:7] == prefix, words
    return words, get_args_parser().parse_args(words[7:])


def test_qat_component_runs_quantcore_qat_under_jobs_torchrun():
    # mounts as torchx's CLI passes `--mounts type=volume,src=imagenet-pvc,dst=/data,readonly`
    env, mounts = {"NCCL_DEBUG": "INFO"}, ["type=volume", "src=imagenet-pvc", "dst=/data", "readonly"]
    app = components.qat(recipe="vit_b16_384_ft2", data="s3://b/train", out="s3://b/qat", eval_data="s3://b/val",
                         init="s3://b/ptq/vit_b16_384_ft2/model.qc.pt", epochs=5, batch_size=32, workers=6,
                         eval_limit=5000, cache_dir="/data/cache", nnodes=2, gpus=4, max_restarts=2,
                         s3_endpoint="http://minio:9000", s3_secret="qc-s3", env=env, mounts=mounts, max_retries=1)
    assert env == {"NCCL_DEBUG": "INFO"} and mounts == ["type=volume", "src=imagenet-pvc", "dst=/data", "readonly"]
    (role,) = app.roles
    words, a = _qat_torchrun(app)
    # torchrun: 2 nodes x 4 ranks (one per GPU), c10d on rank 0's host, in-place restarts
    assert (a.nnodes, a.nproc_per_node, a.max_restarts, a.rdzv_backend) == ("2", "4", 2, "c10d")
    assert a.rdzv_endpoint.endswith(":29500") and "rank0_env" in a.rdzv_endpoint
    assert "read_timeout=300,join_timeout=900" in a.rdzv_conf  # the chart's QAT Job waits as long
    assert a.module and a.training_script == "quantcore.cli"
    cli = a.training_script_args
    assert cli[:9] == ["qat", "--recipe", "vit_b16_384_ft2", "--data", "s3://b/train", "--split", "train",
                       "--out", "s3://b/qat"]
    pairs = dict(zip(cli[1::2], cli[2::2]))
    assert (pairs["--eval-data"], pairs["--init"], pairs["--epochs"], pairs["--batch-size"], pairs["--workers"],
            pairs["--eval-limit"], pairs["--cache-dir"], pairs["--device"]) == (
        "s3://b/val", "s3://b/ptq/vit_b16_384_ft2/model.qc.pt", "5", "32", "6", "5000", "/data/cache", "cuda")
    assert "--max-steps" not in cli and "--checkpoint" not in cli and cli[-1] == "--no-progress"
    _assert_cli_accepts(cli)  # the real `quantcore qat` accepts every option
    assert role.name == "qat" and app.name == "quantcore-qat" and role.num_replicas == 2
    assert (role.resource.gpu, role.port_map, role.max_retries, role.retry_policy.value) == (
        4, {"c10d": 29500}, 1, "APPLICATION")
    assert role.env["QUANTCORE_S3_SECRET"] == "qc-s3" and role.env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert role.env["NCCL_DEBUG"] == "INFO"
    (mount,) = role.mounts
    assert (mount.src, mount.dst_path, mount.read_only) == ("imagenet-pvc", "/data", True)

    # CPU: one rank per node unless asked, gloo, --device cpu; the recipe's values unless overridden
    cpu = components.qat(recipe="r.yaml", data="d", out="o", gpus=0, nproc_per_node=2, max_steps=10, workers=0)
    _, a = _qat_torchrun(cpu)
    assert (a.nnodes, a.nproc_per_node, a.max_restarts, a.rdzv_endpoint) == ("1", "2", 3, "localhost:0")
    pairs = dict(zip(a.training_script_args[1::2], a.training_script_args[2::2]))
    assert (pairs["--device"], pairs["--max-steps"], pairs["--workers"], pairs["--eval-data"]) == (
        "cpu", "10", "0", "d")
    for flag in ("--epochs", "--batch-size", "--eval-limit", "--init", "--cache-dir"):
        assert flag not in a.training_script_args
    _assert_cli_accepts(a.training_script_args)
    _, a = _qat_torchrun(components.qat(recipe="r", data="d", out="o", gpus=8))
    assert a.nproc_per_node == "8"  # default: one rank per GPU


@pytest.mark.parametrize("bad,message", [
    (dict(nproc_per_node=8, gpus=4), "one rank per GPU"), (dict(nnodes=0), "--nnodes"),
    (dict(recipe=" "), "--recipe"), (dict(max_restarts=-1), "--max_restarts"), (dict(workers=-2), "--workers"),
    (dict(epochs=-1), "--epochs"), (dict(gpus=-1), "--gpus"), (dict(mounts=["type=volume", " "]), "mounts"),
    (dict(mounts=["type=bind", "src=/mnt/imagenet", "dst=/data"]), "--mounts: type=bind"),
    (dict(grace_s=10), "--grace_s must be >= 20"),
])
def test_qat_component_rejects_bad_arguments(bad, message):
    kwargs: Dict[str, Any] = dict(recipe="r", data="d", out="o")
    kwargs.update(bad)
    with pytest.raises(ValueError, match=message):
        components.qat(**kwargs)


@pytest.mark.parametrize("bad", [dict(gpus=-1), dict(recipe=[]), dict(recipe=["a", " "]), dict(max_retries=-2)])
def test_components_reject_bad_arguments(bad):
    kwargs: Dict[str, Any] = dict(recipe=["r"], data="d", out="o")
    kwargs.update(bad)
    with pytest.raises(ValueError):
        components.calibrate(**kwargs)


@pytest.mark.parametrize("flag, var", [("s3_endpoint", "AWS_ENDPOINT_URL"), ("s3_secret", "QUANTCORE_S3_SECRET")])
def test_env_may_not_set_what_an_option_sets(flag, var):
    value = "http://minio.ml:9000" if var == "AWS_ENDPOINT_URL" else "x"  # an endpoint is checked as one
    kwargs: Dict[str, Any] = dict(recipe=["r"], data="d", out="o", env={var: value, "OTHER": "1"})
    app = components.calibrate(**kwargs)  # without the option, --env is the only source: kept
    assert app.roles[0].env[var] == value and app.roles[0].env["OTHER"] == "1"
    kwargs[flag] = "http://127.0.0.1:9000" if flag == "s3_endpoint" else "creds"
    with pytest.raises(ValueError, match=f"--env sets {var}, which --{flag} sets too"):
        components.calibrate(**kwargs)


@pytest.mark.parametrize("bad, message", [(dict(check_limit=50), "--check_limit and --check_skip_bad apply to the images of --check_data"),
                                          (dict(check_split="val"), "--check_split, --check_limit and"),
                                          (dict(opset=-1), "--opset")])
def test_export_component_refuses_options_that_would_be_dropped(bad, message):
    with pytest.raises(ValueError, match=message):
        components.export(checkpoint="s3://b/m/model.qc.pt", out="s3://b/x", **bad)
    ok = components.export(checkpoint="s3://b/m/model.qc.pt", out="s3://b/x", check_data="s3://b/d", check_limit=50)
    args = ok.roles[0].args
    assert args[args.index("--check-split") + 1] == "val" and args[args.index("--check-limit") + 1] == "50"


@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_component_passes_torchx_validation_and_documents_every_argument(name):
    import inspect

    from torchx.specs.file_linter import get_fn_docstring, validate

    assert validate(str(COMPONENTS_FILE), name) == []
    fn = getattr(components, name)
    description, arg_help = get_fn_docstring(fn)
    assert len(description) > 40
    params = inspect.signature(fn).parameters
    undocumented = [p for p in params if not arg_help.get(p, "").strip()]
    assert not undocumented, f"{name}: no docstring for {undocumented}"
    # every argument's annotation is one torchx can parse from the command line
    from torchx.specs.builders import _create_args_parser

    help_text = _create_args_parser(fn).format_help()
    for p in params:
        if params[p].kind != inspect.Parameter.VAR_POSITIONAL:
            assert f"--{p}" in help_text


# ------------------------------------------------------------------------------ jobs.launch

def _sa_dir(tmp_path: Path, namespace: str = "ml") -> str:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "namespace").write_text(namespace + "\n")
    (sa / "token").write_text("token-123")
    return str(sa)


class FakeReader:
    def __init__(self, data=None, errors=()):
        self.data, self.errors, self.calls = data or {}, list(errors), []

    def __call__(self, namespace: str, name: str):
        self.calls.append((namespace, name))
        if self.errors:
            raise self.errors.pop(0)
        return dict(self.data)


class ApiError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status, self.reason = status, "Forbidden" if status == 403 else "Error"


CREDS = {"AWS_ACCESS_KEY_ID": "AKIA-SECRET", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}


def test_launch_leaves_env_alone_without_secret_or_with_credentials(tmp_path, capsys):
    reader = FakeReader(CREDS)
    env = {"PATH": "/bin"}
    assert launch.resolve_env(env, reader, _sa_dir(tmp_path)) == env and not reader.calls
    env2 = {"QUANTCORE_S3_SECRET": "s3", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    assert launch.resolve_env(env2, reader, str(tmp_path / "sa")) == env2 and not reader.calls
    assert "already in the environment" in capsys.readouterr().err


def test_launch_outside_a_cluster_skips_the_secret(tmp_path, capsys):
    reader = FakeReader(CREDS)
    env = {"QUANTCORE_S3_SECRET": "s3"}
    assert launch.resolve_env(env, reader, str(tmp_path / "no-sa")) == env and not reader.calls
    assert "not running in a Kubernetes pod" in capsys.readouterr().err


def test_launch_exports_the_secret_keys(tmp_path, capsys):
    reader = FakeReader({**CREDS, "AWS_ENDPOINT_URL": "http://from-secret", "AWS_DEFAULT_REGION": "eu-west-1",
                         "not-a-var": "x"})
    environ = {"QUANTCORE_S3_SECRET": "qc-s3", "AWS_ENDPOINT_URL": "http://from-component",
               "AWS_ACCESS_KEY_ID": "partial", "AWS_SESSION_TOKEN": "stale"}
    before = dict(environ)
    env = launch.resolve_env(environ, reader, _sa_dir(tmp_path, "ml-team"))
    assert environ == before  # a new dict
    assert reader.calls == [("ml-team", "qc-s3")]
    assert env["AWS_ACCESS_KEY_ID"] == "AKIA-SECRET" and env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert env["AWS_ENDPOINT_URL"] == "http://from-component"  # the environment's own setting wins
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1" and "not-a-var" not in env
    assert "AWS_SESSION_TOKEN" not in env  # does not belong to the Secret's key pair
    err = capsys.readouterr().err
    assert "exported AWS_ACCESS_KEY_ID" in err and "ml-team/qc-s3" in err
    assert "s3cr3t" not in err and "AKIA-SECRET" not in err  # values are never logged
    # namespace override
    reader2 = FakeReader(CREDS)
    launch.resolve_env({"QUANTCORE_S3_SECRET": "x", "QUANTCORE_S3_SECRET_NAMESPACE": "other"}, reader2,
                       str(tmp_path / "sa"))
    assert reader2.calls == [("other", "x")]


@pytest.mark.parametrize("status,exit_code,words", [
    (403, 2, ["forbidden", "resourceNames: [qc-s3]", "verbs: [get]"]),
    (404, 2, ["not found"]),
    (401, 2, ["unauthorized"]),
])
def test_launch_secret_errors_are_clear(tmp_path, status, exit_code, words):
    reader = FakeReader(errors=[ApiError(status)])
    with pytest.raises(launch.LaunchError) as info:
        launch.resolve_env({"QUANTCORE_S3_SECRET": "qc-s3"}, reader, _sa_dir(tmp_path), sleep=lambda s: None)
    assert info.value.exit_code == exit_code and len(reader.calls) == 1  # no retry for 4xx
    for w in words:
        assert w in str(info.value)


def test_launch_retries_transient_errors_and_checks_keys(tmp_path):
    sa = _sa_dir(tmp_path)
    sleeps: List[float] = []
    reader = FakeReader(CREDS, errors=[ConnectionError("reset"), ApiError(503)])
    env = launch.resolve_env({"QUANTCORE_S3_SECRET": "qc-s3"}, reader, sa, sleep=sleeps.append)
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and len(reader.calls) == 3 and len(sleeps) == 2
    down = FakeReader(errors=[ConnectionError("down")] * 4)
    with pytest.raises(launch.LaunchError) as info:
        launch.resolve_env({"QUANTCORE_S3_SECRET": "qc-s3"}, down, sa, sleep=lambda s: None)
    assert info.value.exit_code == 1 and "after 4 attempts" in str(info.value)
    incomplete = FakeReader({"AWS_ACCESS_KEY_ID": "a", "other": "b"})
    with pytest.raises(launch.LaunchError, match="has no AWS_SECRET_ACCESS_KEY"):
        launch.resolve_env({"QUANTCORE_S3_SECRET": "qc-s3"}, incomplete, sa)


def test_launch_main_execs_the_command_with_the_new_env(tmp_path, capsys):
    calls = []
    sa = _sa_dir(tmp_path)
    environ = {"QUANTCORE_S3_SECRET": "qc-s3", "PATH": "/usr/bin"}
    rc = launch.main(["--", "quantcore", "calibrate", "-r", "x"], reader=FakeReader(CREDS), environ=environ,
                     sa_dir=sa, execvpe=lambda *a: calls.append(a))
    assert rc == 0 and len(calls) == 1
    file, argv, env = calls[0]
    assert file == "quantcore" and argv == ["quantcore", "calibrate", "-r", "x"]
    assert env["AWS_ACCESS_KEY_ID"] == "AKIA-SECRET" and env["PATH"] == "/usr/bin"
    calls.clear()
    rc = launch.main(["quantcore"], reader=FakeReader(errors=[ApiError(403)]), environ=dict(environ), sa_dir=sa,
                     execvpe=lambda *a: calls.append(a))
    assert rc == 2 and not calls and "forbidden" in capsys.readouterr().err
    assert launch.main([], environ={}) == 2


def test_launch_as_a_process_runs_the_command_unchanged_outside_a_cluster():
    env = _subprocess_env(QUANTCORE_S3_SECRET="qc-s3", MARK="42")
    env.pop("AWS_ACCESS_KEY_ID", None)
    code = "import os, sys; print('mark', os.environ['MARK'], sys.argv[1:]); sys.exit(3)"
    proc = subprocess.run([sys.executable, "-m", "jobs.launch", sys.executable, "-c", code, "a b", "--flag"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr  # the command's own exit status (exec, same process)
    assert "mark 42 ['a b', '--flag']" in proc.stdout
    if not Path(launch.SA_DIR, "namespace").is_file():
        assert "not running in a Kubernetes pod" in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "jobs.launch", "no-such-command-qc"], cwd=REPO,
                             env=_subprocess_env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 127 and "command not found" in missing.stderr


def _self_signed_cert(tmp_path: Path) -> Tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl not available to make a TLS certificate for the API stand-in")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return key, cert


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kubernetes client vs. urllib3 2.x
def test_launch_reads_secret_with_kubernetes_client_from_api_stand_in_mock(tmp_path):
    """The real kubernetes client path (in-cluster config, bearer token, TLS, base64) against a tiny
    HTTPS stand-in of the API server on 127.0.0.1."""
    key, cert = _self_signed_cert(tmp_path)
    seen: List[Tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization", "")))
            if self.path == "/api/v1/namespaces/ml/secrets/qc-s3":
                body = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "qc-s3", "namespace": "ml"},
                        "data": {k: base64.b64encode(v.encode()).decode() for k, v in CREDS.items()}}
                code = 200
            else:
                body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                        "code": 403, "message": "secrets is forbidden"}
                code = 403
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sa = Path(_sa_dir(tmp_path))
        shutil.copy(cert, sa / "ca.crt")
        environ = {"QUANTCORE_S3_SECRET": "qc-s3", "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                   "KUBERNETES_SERVICE_PORT": str(server.server_address[1]), "NO_PROXY": "127.0.0.1"}
        env = launch.resolve_env(environ, sa_dir=str(sa))
        assert env["AWS_ACCESS_KEY_ID"] == "AKIA-SECRET" and env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
        assert seen[0] == ("/api/v1/namespaces/ml/secrets/qc-s3", "bearer token-123")
        with pytest.raises(launch.LaunchError) as info:
            launch.resolve_env({**environ, "QUANTCORE_S3_SECRET": "other"}, sa_dir=str(sa), sleep=lambda s: None)
        assert info.value.exit_code == 2 and "resourceNames: [other]" in str(info.value)
        (sa / "token").unlink()
        with pytest.raises(launch.LaunchError, match="in-cluster"):
            launch.resolve_env(environ, sa_dir=str(sa))
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------ local_cwd + S3

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("imgs"))


def test_torchx_local_cwd_calibrate_to_s3_moto_mock(image_folder, s3_server, s3_bucket, s3_client, tmp_path):
    from quantcore.cli import main

    data, out = f"s3://{s3_bucket}/data", f"s3://{s3_bucket}/runs/torchx"
    assert main(["pack", str(image_folder), data, "--split", "train", "--shard-size", "5"]) == 0
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = _subprocess_env()
    env.pop("AWS_ENDPOINT_URL", None)  # the component's --s3_endpoint must provide it
    cmd = [str(TORCHX), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'torchx-logs'}",
           "jobs/components.py:calibrate", "--recipe", str(recipe), "--data", data, "--out", out, "--gpus", "0",
           "--workers", "0", "--s3_endpoint", s3_server, "--s3_secret", "quantcore-s3-credentials"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-5000:]
    assert "AWS credentials are already in the environment" in logs  # jobs.launch ran first
    assert "tiny_w8a8: " in logs  # quantcore calibrate's summary line
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/torchx/")["Contents"]}
    assert {"runs/torchx/tiny_w8a8/model.qc.pt", "runs/torchx/tiny_w8a8/encodings.json",
            "runs/torchx/tiny_w8a8/report.json", "runs/torchx/report.json"} <= keys, keys
    import quantcore

    model = quantcore.load(f"{out}/tiny_w8a8/model.qc.pt")
    assert quantcore.quantizers(model)
    rep = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="runs/torchx/report.json")["Body"].read())
    assert rep["variants"]["tiny_w8a8"]["calibration"]["images"] == 8
    assert rep["environment"]["AWS_ENDPOINT_URL"] == s3_server


def test_torchx_local_cwd_ddp_starts_ranks_through_the_launcher(tmp_path):
    """The ddp component's command really runs: bash -> jobs.launch -> jobs.torchrun -> 2 ranks, each
    seeing its own $RANK / ${LOCAL_RANK} in its arguments (torchx quotes them, so no shell expands them)."""
    script = tmp_path / "rank.py"
    script.write_text("import os\nprint('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], "
                      "'secret', os.environ.get('QUANTCORE_S3_SECRET'), 'args', __import__('sys').argv[1:])\n")
    cmd = [str(TORCHX), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}", "jobs/components.py:ddp",
           "--script", str(script), "--nproc_per_node", "2", "--gpus", "0", "--s3_secret", "qc-s3", "--", "--x", "1",
           "--out", "s3://b/o/rank_$RANK", "${LOCAL_RANK}of$WORLD_SIZE"]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-5000:]
    for rank in (0, 1):
        args = ['--x', '1', '--out', f's3://b/o/rank_{rank}', f'{rank}of2']
        assert f"rank {rank} of 2 secret qc-s3 args {args}" in logs, logs[-5000:]


def test_torchx_local_cwd_qat_trains_on_two_ranks_through_the_launcher(image_folder, tmp_path):
    """The qat component's command really runs: bash -> jobs.launch -> jobs.torchrun -> 2 gloo ranks of
    `quantcore qat` (calibrate, 2 optimizer steps, convert, sharded evaluation, report)."""
    recipe = tmp_path / "tiny_qat.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "name": "tiny_qat", "qat": {
        "epochs": 1, "batch_size": 2, "optimizer": {"name": "adamw", "lr": 1e-3}, "checkpoint_every": 1,
        "log_every": 1, "num_workers": 0}}))
    out = tmp_path / "out"
    cmd = [str(TORCHX), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}", "jobs/components.py:qat",
           "--recipe", str(recipe), "--data", str(image_folder), "--out", str(out), "--gpus", "0",
           "--nproc_per_node", "2", "--max_steps", "2", "--workers", "0", "--s3_secret", "qc-s3"]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-6000:]
    rep = json.loads((out / "report.json").read_text())
    assert (rep["qat"]["world_size"], rep["qat"]["steps"], rep["qat"]["global_batch"]) == (2, 2, 4), rep.get("qat")
    assert (out / "tiny_qat" / "model.qc.pt").is_file() and (out / "ptq" / "model.qc.pt").is_file()
    assert list((out / "checkpoints").glob("step-*.pt"))
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2
    assert "AWS credentials" in logs or "not running in a Kubernetes pod" in logs  # jobs.launch ran first


# ------------------------------------------------------------------------------ jobs.torchrun

def test_torchrun_exit_status_rules():
    from jobs.torchrun import exit_status, only_user_error, status_of

    # elastic's failure table is left out only when it would add nothing to the rank's one-line error
    assert only_user_error({0: 2, 1: 1}) and only_user_error({0: 2, 1: -15}) and only_user_error({1: 2})
    assert not only_user_error({0: 2, 1: -9}) and not only_user_error({0: 2, 1: -11})
    assert not only_user_error({0: 1, 1: -15}) and not only_user_error({0: 3})

    assert exit_status({0: 1, 1: 2}, first_rank=0) == 2  # a user error on any rank: 2, whatever came first
    assert exit_status({3: 143}, first_rank=3) == 143  # preempted rank: retry
    assert exit_status({0: -9, 1: 1}, first_rank=0) == 137  # first failure was killed by SIGKILL
    assert exit_status({0: 1, 1: 5}, first_rank=1) == 5 and exit_status({0: 1, 1: 5}) == 1
    assert exit_status({1: 0}) == 1 and exit_status({}) == 1  # after a failure, never 0
    assert status_of(-15) == 143 and status_of(3) == 3


RANK_SCRIPT = """
import os, signal, sys, time
rank, restart = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
print(f"rank {rank} start {restart}", flush=True)
mode = sys.argv[1]
if mode == "user" and rank == 1:
    sys.exit(2)
if mode == "flaky" and rank == 1 and restart == 0:
    sys.exit(3)
if mode == "crash" and rank == 0:
    sys.exit(5)
if mode == "sigterm":
    signal.signal(signal.SIGTERM, lambda *a: (print(f"rank {rank} checkpoint", flush=True), sys.exit(143)))
    print(f"rank {rank} ready", flush=True)
    time.sleep(120)
"""


def _torchrun_proc(script: Path, mode: str, max_restarts: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.torchrun", "--standalone", "--nproc_per_node", "2", "--max_restarts",
           str(max_restarts), "--monitor_interval", "0.1", str(script), mode]
    return subprocess.Popen(cmd, cwd=REPO, env=_subprocess_env(OMP_NUM_THREADS="1", LOGLEVEL="WARNING"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def test_jobs_torchrun_keeps_the_rank_exit_status_and_never_restarts_a_user_error(tmp_path):
    """torchrun alone exits 1 for any rank failure and restarts user errors; jobs.torchrun exits 2 at
    once (podFailurePolicy FailJob), restarts other failures in place and keeps their status."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = {mode: _torchrun_proc(script, mode) for mode in ("user", "flaky", "crash")}
    outs = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        outs[mode] = (proc.returncode, out, err)
    rc, out, err = outs["user"]
    assert rc == 2, err[-3000:]
    assert "start 1" not in out and "exited 2 (user error): not restarting" in err  # no restart
    rc, out, err = outs["flaky"]
    assert rc == 0 and "rank 1 start 1" in out, err[-3000:]  # restarted in place, then fine
    rc, out, err = outs["crash"]
    assert rc == 5 and "rank 0 start 2" in out and "rank 0 start 3" not in out, err[-3000:]  # 2 restarts, status 5


# one write(2) per line: two ranks share the pipe, and unbuffered print() writes word by word
ARGS_SCRIPT = ("import os, sys\n"
               "os.write(1, f\"rank {os.environ['RANK']} {sys.argv[1:]}\\n\".encode())\n")


@pytest.mark.parametrize("launcher", ["torch.distributed.run", "jobs.torchrun"])
def test_rank_references_reach_each_rank_expanded_only_through_jobs_torchrun(tmp_path, launcher):
    """`--out o/rank_$RANK` as the ddp component passes it (no shell on the way can expand it): plain
    torchrun hands every rank the literal text (all ranks write to one place), jobs.torchrun each rank
    its own value; other `$` text is left alone."""
    script = tmp_path / "args.py"
    script.write_text(ARGS_SCRIPT)
    cmd = [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node", "2", "--monitor_interval", "0.1",
           str(script), "--out", "o/rank_$RANK", "${LOCAL_RANK}/${WORLD_SIZE}", "$RANKS", "$HOME"]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(OMP_NUM_THREADS="1", LOGLEVEL="WARNING"),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        want = ["--out", f"o/rank_{rank}", f"{rank}/2", "$RANKS", "$HOME"]
        if launcher == "torch.distributed.run":
            want = ["--out", "o/rank_$RANK", "${LOCAL_RANK}/${WORLD_SIZE}", "$RANKS", "$HOME"]
        assert f"rank {rank} {want}" in proc.stdout, proc.stdout


def test_through_rank_shim_wraps_the_target_and_keeps_torchrun_options():
    from torch.distributed.run import get_args_parser

    from jobs.torchrun import RUN_RANK, through_rank_shim

    parse = get_args_parser().parse_args
    opts = ["--nnodes", "2", "--nproc_per_node", "4", "--rdzv_endpoint", "h:29500", "--max_restarts", "3"]
    for target in (["-m", "quantcore.cli"], ["train.py"]):
        args = opts + target + ["calibrate", "--out", "o/rank_$RANK", "-m", "x"]
        wrapped = through_rank_shim(args)
        a, before = parse(wrapped), parse(args)
        assert a.module and a.training_script == "jobs.torchrun"
        assert a.training_script_args == [RUN_RANK] + target + ["calibrate", "--out", "o/rank_$RANK", "-m", "x"]
        for key in ("nnodes", "nproc_per_node", "rdzv_endpoint", "max_restarts"):
            assert getattr(a, key) == getattr(before, key)
    assert through_rank_shim(["--no-python", "sh", "-c", "x"]) == ["--no-python", "sh", "-c", "x"]


def test_rank_gpu_is_local_rank_through_quantcore_distributed(monkeypatch):
    """Each rank's default CUDA device is cuda:LOCAL_RANK (quantcore.distributed.resolve_rank_device,
    the same mapping as `quantcore --device cuda`); a node with fewer GPUs than ranks is a user error."""
    import torch

    from jobs.torchrun import USER_ERROR, bind_rank_gpu, run_rank
    from quantcore.errors import UserError

    chosen: List[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert bind_rank_gpu({"LOCAL_RANK": "1"}) == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    with pytest.raises(UserError, match="local rank 2 has no GPU of its own"):
        bind_rank_gpu({"LOCAL_RANK": "2"})
    assert run_rank(["-m", "json.tool"], {"LOCAL_RANK": "2", "RANK": "2"}) == USER_ERROR
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bind_rank_gpu({"LOCAL_RANK": "1"}) is None


def test_jobs_torchrun_forwards_sigterm_and_exits_143(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    proc = _torchrun_proc(script, "sigterm")
    try:
        ready = 0
        while ready < 2:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
            ready += line.startswith("rank ") and line.rstrip().endswith("ready")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "rank 0 checkpoint" in out and "rank 1 checkpoint" in out and "got SIGTERM" in err


def test_jobs_torchrun_fails_fast_on_a_quantcore_user_error(tmp_path):
    """The real CLI under jobs.torchrun: a missing recipe exits 2 on both ranks, no restart, status 2."""
    missing = tmp_path / "no-such-recipe.yaml"
    cmd = [sys.executable, "-m", "jobs.torchrun", "--standalone", "--nproc_per_node", "2", "--max_restarts", "3",
           "-m", "quantcore.cli", "qat", "-r", str(missing), "-d", str(tmp_path), "-o", str(tmp_path / "o"),
           "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "not restarting" in proc.stderr and "Traceback" not in proc.stderr.split("jobs.torchrun:")[0]
    assert proc.stderr.count(str(missing)) <= 3  # each rank said it once (+ torchrun's summary): no restart


# ------------------------------------------------------------------------------ sweep file

def test_example_sweep_file_is_valid():
    from quantcore.recipe import load_recipe

    sweep = load_sweep(str(REPO / "jobs" / "sweep.example.yaml"))
    assert len(sweep.runs) >= 3 and len({r.name for r in sweep.runs}) == len(sweep.runs)
    for run in sweep.runs:
        assert run.calib_data and run.recipes
        for r in run.recipes:
            if not (isinstance(r, str) and r.startswith("s3://")):
                load_recipe(r)  # built-in names and inline recipes are valid recipes
    first = sweep.runs[0]
    assert first.limit == 10000 and first.workers == 4  # from defaults:


@pytest.mark.parametrize("data,message", [
    ({"runs": [{"name": "a", "recipe": "x", "calib_dta": "s3://b"}]}, "runs[0](a).calib_dta: Extra inputs"),
    ({"defaults": {"limt": 3}, "runs": [{"name": "a"}]}, "defaults.limt: Extra inputs"),
    ({"defaults": {"calib_data": "d"}, "runs": [{"name": "a", "recipe": "x"}, {"name": "b"}]},
     "runs[1](b): missing recipes"),
    ({"runs": [{"name": "a", "recipe": "x"}]}, "runs[0](a): missing calib_data"),
    ({"runs": [{"name": "a/b", "recipe": "x", "calib_data": "d"}]}, "runs[0](a/b).name: must be"),
    ({"runs": [{"name": "a", "recipe": "x", "calib_data": "d"}, {"name": "a", "recipe": "y", "calib_data": "d"}]},
     "runs[1].name: duplicate run name 'a'"),
    ({"runs": [{"name": "a", "recipe": "x", "calib_data": "d", "limit": -1}]},
     "runs[0](a).limit: Input should be greater than or equal to 0"),
    ({"runs": [{"name": "a", "recipe": "x", "recipes": ["y"], "calib_data": "d"}]}, "either `recipe` or `recipes`"),
    ({"runs": []}, "runs: List should have at least 1 item"),
    ({"runs": [{"name": "Summary.json", "recipe": "x", "calib_data": "d"}]}, "the sweep's own file in <OUT>/"),
    ([1], "expected a mapping"),
])
def test_sweep_errors_name_the_field(data, message):
    with pytest.raises(SweepError) as info:
        parse_sweep(data, "sweep.yaml")
    assert message in str(info.value) and str(info.value).startswith("sweep.yaml")


def test_sweep_limit_0_is_the_whole_split_as_the_clis_limit_0():
    """`limit: 0` was refused ("greater than 0") although the field is "as --limit", where 0 is the whole split."""
    from jobs.ray_sweep import RunSpec

    assert parse_sweep({"runs": [{"name": "a", "recipe": "x", "calib_data": "d", "limit": 0}]}).runs[0].limit == 0
    assert "0 or unset, the whole split" in RunSpec.model_fields["limit"].description


@pytest.mark.parametrize("text,line,key", [
    ("runs:\n- name: a\n  recipe: x\n  calib_data: d\n  limit: -1\n  limit: 37\n", 6, "limit"),
    ("defaults: {limit: 5}\nruns: [{name: a, recipe: x, calib_data: d}]\ndefaults: {}\n", 3, "defaults"),
    ("runs:\n- {name: a, recipe: x, calib_data: d, name: b}\n", 2, "name"),
])
def test_a_key_repeated_in_a_sweep_file_is_refused_naming_file_key_and_line(tmp_path, text, line, key):
    """yaml.safe_load kept the last of two equal keys: `limit: -1` then `limit: 37` ran with 37, silently."""
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(SweepError, match=rf"^{re.escape(str(path))} line {line}: key '{key}' appears twice in one "
                                         rf"mapping \(first on line \d+\)$"):
        load_sweep(str(path))
    # a key beside a `<<:` merge overrides the merged one (YAML's meaning): no repetition
    path.write_text("defaults: &d {calib_data: d, limit: 5}\nruns:\n- <<: *d\n  name: a\n  recipe: x\n  limit: 6\n")
    assert load_sweep(str(path)).runs[0].limit == 6
    # two merge keys: one would win silently; several merge as a list
    path.write_text("a: &a {limit: 1}\nb: &b {limit: 2}\nruns:\n- {<<: *a, <<: *b, name: r, recipe: x, calib_data: d}\n")
    with pytest.raises(SweepError, match="merge key '<<' appears twice"):
        load_sweep(str(path))


def test_sweep_defaults_merge_and_recipe_alias():
    sweep = parse_sweep({"defaults": {"calib_data": "s3://b/d", "recipe": "base", "limit": 5},
                         "runs": [{"name": "one"}, {"name": "two", "recipes": ["x", {"name": "inline"}], "limit": 7}]})
    one, two = sweep.runs
    assert one.recipes == ["base"] and one.limit == 5 and one.eval_data is None and one.calib_split == "train"
    assert two.recipe_labels() == ["x", "inline"] and two.limit == 7 and two.calib_data == "s3://b/d"


def test_relative_paths_in_a_sweep_file_are_relative_to_the_file(tmp_path, monkeypatch, s3_server, s3_bucket):
    """The tasks run in other working directories (and machines) than the driver: `recipe: r/w4.yaml`,
    `checkpoint: ../w.pt` and `calib_data: data` are the files beside the sweep file, on disk and on S3."""
    from quantcore.io import storage

    sub = tmp_path / "sweeps"
    sub.mkdir()
    doc = {"defaults": {"calib_data": "data", "checkpoint": "../w.pt"},
           "runs": [{"name": "a", "recipes": ["r/w4.yaml", "vit_b16_int8", "plain.YAML", {"name": "inline"}],
                     "eval_data": "s3://b/val"},
                    {"name": "b", "recipe": str(tmp_path / "abs.yaml"), "calib_data": "file:///x/y"}]}
    (sub / "sweep.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(REPO)
    a, b = load_sweep(str(sub / "sweep.yaml")).runs
    assert a.recipes == [str(sub / "r" / "w4.yaml"), "vit_b16_int8", str(sub / "plain.YAML"), {"name": "inline"}]
    assert (a.calib_data, a.checkpoint, a.eval_data) == (str(sub / "data"), str(tmp_path / "w.pt"), "s3://b/val")
    assert (b.recipes, b.calib_data) == ([str(tmp_path / "abs.yaml")], "file:///x/y")
    storage.write_bytes(f"s3://{s3_bucket}/team/sweeps/s.yaml", yaml.safe_dump(doc).encode())
    a, _ = load_sweep(f"s3://{s3_bucket}/team/sweeps/s.yaml").runs
    assert a.recipes[0] == f"s3://{s3_bucket}/team/sweeps/r/w4.yaml"
    assert (a.calib_data, a.checkpoint) == (f"s3://{s3_bucket}/team/sweeps/data", f"s3://{s3_bucket}/team/w.pt")
    storage.write_bytes(f"s3://{s3_bucket}/s.yaml", yaml.safe_dump(doc).encode())
    with pytest.raises(SweepError, match=r"run a: checkpoint '../w.pt' leads above the bucket's root"):
        load_sweep(f"s3://{s3_bucket}/s.yaml")


@pytest.mark.parametrize("src, val, want", [
    ("s3://bkt/team/sweeps/s.yaml", "r/w4.yaml", "s3://bkt/team/sweeps/r/w4.yaml"),
    ("s3://bkt/team/sweeps/s.yaml", "../w.pt", "s3://bkt/team/w.pt"),
    ("s3://bkt/team/sweeps/s.yaml", "./a/./b.pt", "s3://bkt/team/sweeps/a/b.pt"),
    # keys are not paths: an empty segment is a key of its own, kept wherever it is (normpath merged it,
    # so a recipe under rr//exp/ loaded the weights of rr/exp/ - helper-144)
    ("s3://bkt/rr//exp/recipe.yaml", "fp32.pt", "s3://bkt/rr//exp/fp32.pt"),
    ("s3://bkt/rr//exp/recipe.yaml", "../w.pt", "s3://bkt/rr//w.pt"),
    ("s3://bkt/rr//exp/recipe.yaml", "../../w.pt", "s3://bkt/rr/w.pt"),
    ("s3://bkt/r.yaml", "w//x.pt", "s3://bkt/w//x.pt"),
    ("s3://bkt/r.yaml", "w.pt", "s3://bkt/w.pt"),
    ("s3://bkt/team/s.yaml", "data/", "s3://bkt/team/data"),  # a folder's trailing '/' dropped, as on a disk
    ("s3://bkt/team/s.yaml", "..", "s3://bkt/"),
])
def test_a_relative_path_in_a_file_on_s3_keeps_every_key_segment(src, val, want):
    from quantcore.recipe import relative_to_file

    assert relative_to_file(val, src) == want
    folders = src.removeprefix("s3://bkt/").count("/")  # '' segments are folders too
    assert relative_to_file("../" * folders + "x.pt", src) == "s3://bkt/x.pt"
    with pytest.raises(ValueError, match="above the bucket's root"):
        relative_to_file("../" * (folders + 1) + "x.pt", src)


def test_ray_sweep_cli_exits_2_on_a_bad_sweep_file(tmp_path):
    bad = tmp_path / "sweep.yaml"
    bad.write_text(yaml.safe_dump({"runs": [{"name": "a", "recipe": "x", "calib_dta": "d"}]}))
    proc = subprocess.run([sys.executable, "-m", "jobs.ray_sweep", "--sweep", str(bad), "--out", str(tmp_path / "o")],
                          cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "runs[0](a).calib_dta: Extra inputs are not permitted" in proc.stderr
    assert "Traceback" not in proc.stderr


SWEEP_FILES_IN_REPO = [
    (REPO / "k8s" / "config" / "sweep.yaml", None),
    (REPO / "charts" / "quantcore" / "ci" / "sweep-values.yaml", ("sweep", "config")),
]


@pytest.mark.parametrize("path,key", SWEEP_FILES_IN_REPO, ids=lambda v: str(v) if not isinstance(v, Path) else
                         str(v.relative_to(REPO)))
def test_sweep_files_shipped_for_kubernetes_follow_the_sweep_schema(path, key):
    """k8s/ and the Helm chart mount a sweep file read by jobs.ray_sweep: it must validate."""
    assert path.is_file(), f"{path.relative_to(REPO)} is shipped and must exist"
    data = yaml.safe_load(path.read_text())
    for k in key or ():
        data = data[k]
    parse_sweep(data, str(path.relative_to(REPO)))

