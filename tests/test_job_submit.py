"""End to end as a user runs it on a cluster: `ray start --head`, then
`ray job submit --working-dir . -- python jobs/train_ldiffrec.py ...`, job
SUCCEEDED. The head runs in its own process group with its own temp dir and
token, and only that group is stopped (never `ray stop`, which would stop
every Ray on the machine)."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    import ray
    if ray.is_initialized():
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    gcs_port, dash_port = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    for name in ("RAY_ADDRESS", "DIFFREC_DEVICE_MEMORY_GIB"):   # a user's shell would not carry these
        env.pop(name, None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("the Ray head did not come up")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(2)
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_ray_job_submit_trains_and_succeeds(ray_head, tmp_path):
    from distributed.prepare import prepare_dataset
    from distributed.sources import SourceSpec
    from distributed.synthetic import SyntheticSpec
    address, env = ray_head
    data = tmp_path / "data"
    prepare_dataset(SourceSpec("synthetic", synthetic=SyntheticSpec(n_users=200, n_items=120,
                                                                    n_interactions=5000, seed=2)), data)
    import ray
    ray.shutdown()   # prepare_dataset started a local Ray in this process; the job uses the cluster
    storage = tmp_path / "runs"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           "python", "jobs/train_ldiffrec.py", "--data", str(data), "--model", "ldiffrec", "--workers", "2",
           "--storage", str(storage), "--name", "submitted", "train.epochs=1", "model.n_clusters=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr)
    summary = json.loads((storage / "submitted" / "summary.json").read_text())
    assert summary["epochs"] == 1 and Path(summary["checkpoint"]).exists()
