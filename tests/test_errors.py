"""One error hierarchy for user mistakes: the jobs' errors belong to it and exit 2 with one line."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # jobs/ is shipped as source, not installed
    sys.path.insert(0, str(REPO))

from jobs import launch, ray_sweep  # noqa: E402
from quantcore.errors import QuantcoreError, UserError  # noqa: E402


def test_jobs_errors_join_the_hierarchy():
    assert issubclass(ray_sweep.SweepError, UserError)
    assert issubclass(launch.SecretError, launch.LaunchError) and issubclass(launch.SecretError, UserError)
    # Not reaching the API server is no user mistake: retrying may help (exit 1).
    assert issubclass(launch.LaunchError, QuantcoreError) and not issubclass(launch.LaunchError, UserError)
    assert launch.LaunchError("x").exit_code == 1 and launch.SecretError("x").exit_code == 2


def test_sweep_mistakes_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "sweep.yaml"
    bad.write_text("runs: [{name: a, recipe: x}]\n")
    assert ray_sweep.main(["--sweep", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "sweep.yaml" in err and "calib_data" in err and "\n" not in err
    assert ray_sweep.main(["--sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_a_bad_uri_is_a_user_mistake(tmp_path, capsys):
    from quantcore.cli import main

    assert ray_sweep.main(["--sweep", "gs://bucket/sweep.yaml", "--out", str(tmp_path / "o")]) == 2
    assert "gs://bucket/sweep.yaml" in capsys.readouterr().err
    assert main(["pack", "gs://bucket/data", str(tmp_path / "shards")]) == 2
    assert "gs://bucket/data" in capsys.readouterr().err


def test_secret_mistakes_exit_2(tmp_path, capsys):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "namespace").write_text("ml")

    def reader(namespace, name):
        return {"AWS_ACCESS_KEY_ID": "a"}

    with pytest.raises(launch.SecretError, match="ml/qc-s3 has no AWS_SECRET_ACCESS_KEY"):
        launch.resolve_env({"QUANTCORE_S3_SECRET": "qc-s3"}, reader, str(sa))
    assert launch.main(["true"], reader=reader, environ={"QUANTCORE_S3_SECRET": "qc-s3"}, sa_dir=str(sa),
                       execvpe=lambda *a: None) == 2
    assert "AWS_SECRET_ACCESS_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("section, field, value", [
    ("quant:\n  weights: {bits: %s}\n", "quant.weights.bits", "true"),
    ("calibration: {method: percentile, percentile: %s}\n", "calibration.percentile", "true"),
    ("calibration: {num_batches: %s}\n", "calibration.num_batches", "true"),
    ("overrides:\n  - match: 'fc.*'\n    spec: {bits: %s}\n", "overrides.0.spec.bits", "false"),
    ("qat: {epochs: 1, optimizer: {lr: %s}}\n", "qat.optimizer.lr", "true"),
    ("reconstruction: {iterations: %s}\n", "reconstruction.iterations", "true"),
    ("qat: {epochs: 1, optimizer: {name: adamw, betas: [%s, 0.999]}}\n", "qat.optimizer.betas", "true"),
    ("qat: {epochs: 1, augment: {kind: model, scale: [%s, 1.0]}}\n", "qat.augment.scale", "false"),
])
def test_a_boolean_where_a_number_is_expected_is_named(tmp_path, capsys, section, field, value):
    """YAML's true/false in a numeric field: pydantic's lax mode read them as 1/0 (``percentile: true`` ran
    as the 1st percentile, ``bits: true`` was told 'should be >= 2'); refused, naming file and field."""
    from quantcore.cli import main

    f = tmp_path / "r.yaml"
    f.write_text("version: 1\nname: r\nmodel: {name: resnet18}\n" + section % value)
    assert main(["show-recipe", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert "r.yaml" in err and field in err and "a boolean (true/false)" in err and "\n" not in err, err
    # the same field with a number is fine (the refusal is about the boolean, not the field)
    number = "8" if "bits" in field else ("0.9" if "betas" in field else ("0.5" if "scale" in field else "1"))
    f.write_text("version: 1\nname: r\nmodel: {name: resnet18}\n" + section % number)
    assert main(["show-recipe", str(f)]) == 0, capsys.readouterr().err
    capsys.readouterr()


@pytest.mark.parametrize("doc, field", [
    ("calib_data: /tmp/x\nruns: [{name: a, recipe: fmnist_w8a8_ft1, limit: true}]\n", "limit"),
    ("version: true\ncalib_data: /tmp/x\nruns: [{name: a, recipe: fmnist_w8a8_ft1}]\n", "version"),  # Literal[1]
])
def test_a_boolean_in_a_sweep_number_is_named(tmp_path, capsys, doc, field):
    bad = tmp_path / "sweep.yaml"
    bad.write_text(doc)
    assert ray_sweep.main(["--sweep", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "sweep.yaml" in err and field in err and "boolean" in err.replace(str(tmp_path), ""), err
