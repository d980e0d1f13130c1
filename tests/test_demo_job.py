"""The demo's cluster-entrypoint variant: pack + train here, PTQ via the TorchX `ptq` component on
TorchX's local scheduler (the same component and entrypoint as a Kubernetes run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantcore.demo import FMNIST_DIR

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_demo_runs_ptq_and_qat_through_torchx_local_scheduler(tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "jobs.demo", "--store", str(store), "--epochs", "1",
                           "--train-limit", "1500", "--eval-limit", "500"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torchx.cli.main run -s local_cwd" in proc.stdout and "jobs/components.py:ptq" in proc.stdout
    reports = list(store.glob("runs/ptq-*/report.json"))
    assert len(reports) == 1
    rep = json.loads(reports[0].read_text())
    assert set(rep["results"]) == {"fp32", "fmnist_w8a8_ft1", "fmnist_w8a8_ft2", "fmnist_w4a4_ft1"}
    assert rep["results"]["fp32"]["count"] == 500
    for name in ("fmnist_w8a8_ft1", "fmnist_w8a8_ft2", "fmnist_w4a4_ft1"):
        assert (reports[0].parent / name / "model.qc.pt").is_file()
        assert f"{name} " in proc.stdout  # the summary table was printed
    assert any(store.glob("torchx-logs/**/ptq/0/stdout.log")) or any(store.glob("torchx-logs/**/*.log"))
    # QAT: the TorchX qat component, torchrun with 2 ranks, one report per recipe
    assert "jobs/components.py:qat" in proc.stdout and "--nproc_per_node 2" in proc.stdout
    for name in ("fmnist_w4a4_ft1", "fmnist_w8a8_ft2"):
        (qrep_path,) = store.glob(f"runs/qat-*/{name}/report.json")
        qrep = json.loads(qrep_path.read_text())
        assert qrep["qat"]["world_size"] == 2 and qrep["qat"]["steps"] > 0
        assert set(qrep["results"]) == {"fp32", f"{name}:ptq", name} and qrep["results"]["fp32"]["count"] == 500
        assert (qrep_path.parent / name / "model.qc.pt").is_file()
        assert f"{name} QAT" in proc.stdout
