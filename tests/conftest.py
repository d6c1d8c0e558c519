"""Shared fixtures: one local Ray per test module (started with its own temp
dir and stopped after — never `ray stop`, which would stop every Ray here),
small synthetic data, and the path of the shared ML-1M split when present."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"
ML1M = SHARED_DATA / "ml-1m_clean"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from distributed.ray_env import quiet_ray_data
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=True, logging_level="WARNING",
             configure_logging=True)
    quiet_ray_data()
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ml1m_path():
    if not (ML1M / "train_list.npy").exists():
        pytest.skip("../shared/data/ml-1m_clean is absent (only on the team's machines)")
    return ML1M
