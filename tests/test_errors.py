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
