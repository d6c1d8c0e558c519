"""distributed/estimate.py: exact parameter counts, bytes per device, refusal messages."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clustering.placement import GIB, MIB
from distributed.config import RunConfig
from distributed.estimate import (WORKER_RUNTIME_BYTES, EstimateDoesNotFit, accelerator_memory_bytes, device_memory,
                                  diffrec_max_batch, diffrec_memory_bytes, estimate_run, parameter_counts)
from distributed.trainer import Resources
from models.recommender import DiffusionRecommender

N_ITEMS = 157


def run_config(**model) -> RunConfig:
    config = RunConfig()
    for k, v in model.items():
        setattr(config.model, k, v)
    return config


def skewed_clusters(n_items: int, c: int, seed: int = 0) -> np.ndarray:
    """Item -> cluster labels with very unequal sizes, every cluster non-empty."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, c + 1) ** 1.2
    labels = np.concatenate([np.arange(c), rng.choice(c, n_items - c, p=p / p.sum())])
    return rng.permutation(labels)


CONFIGS = [
    dict(variant="diffrec", dims=[64]),
    dict(variant="diffrec", dims=[32, 48], emb_size=7),
    dict(variant="tdiffrec", dims=[200, 600], emb_size=10),
    dict(variant="ldiffrec", dims=[50], n_clusters=1, latent_size=40),
    dict(variant="ldiffrec", dims=[50], n_clusters=4, latent_size=40),
    dict(variant="ldiffrec", dims=[30, 60], n_clusters=5, latent_size=37, vae_hidden_dims=[90]),
    dict(variant="ltdiffrec", dims=[50], n_clusters=3, latent_size=33, vae_hidden_dims=[120, 80], emb_size=9),
    dict(variant="ldiffrec", dims=[50], n_clusters=4, latent_size=40, shared_decoder=True),
    dict(variant="ldiffrec", dims=[50], n_clusters=1, latent_size=40, shared_decoder=True,
         vae_hidden_dims=[64]),
    dict(variant="ltdiffrec", dims=[20], n_clusters=6, latent_size=30, vae_hidden_dims=[60],
         shared_decoder=True),
]


@pytest.mark.parametrize("model", CONFIGS, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_total_parameters_equal_the_models(model):
    config = run_config(**model)
    clusters = skewed_clusters(N_ITEMS, config.model.n_clusters) if config.model.is_latent else None
    torch.manual_seed(0)
    actual = sum(p.numel() for p in DiffusionRecommender(config.model, N_ITEMS, clusters).parameters())
    meta = {"n_items": N_ITEMS, "n_users": 50, "n_train": 900, "n_valid": 100, "n_test": 100}
    for workers, gpus in [(1, 0), (2, 2), (3, 4)]:
        est = estimate_run(config, meta, clusters, Resources(workers=workers, gpus_per_worker=gpus))
        assert est.total_params == actual
        assert sum(est.params_per_device.values()) == actual     # exact per device as well
    if config.model.is_latent:    # cluster sizes give the same count as the item array
        sizes = np.bincount(clusters, minlength=config.model.n_clusters)
        assert estimate_run(config, meta, sizes).total_params == actual


def test_parameter_parts_of_diffrec_are_the_denoiser_only():
    counts = parameter_counts(run_config(variant="diffrec", dims=[100]).model, 1000)
    # time_proj 10*10+10, [x, emb] (1010) -> 100, 100 -> 1000
    assert counts["denoiser"] == 110 + 1010 * 100 + 100 + 100 * 1000 + 1000
    assert counts["encoders"] == counts["decoders"] == 0


META = {"n_items": 2_000_000, "n_users": 10_000_000, "n_train": 400_000_000, "n_valid": 50_000_000,
        "n_test": 50_000_000}


def test_latent_bytes_spread_over_the_gpus_of_a_worker():
    config = run_config(variant="ldiffrec", dims=[300], n_clusters=16, latent_size=320)
    config.train.batch_size = 400
    one = estimate_run(config, META, None, Resources(workers=4, gpus_per_worker=1))
    four = estimate_run(config, META, None, Resources(workers=4, gpus_per_worker=4))
    assert one.clusters_assumed_equal and len(one.cluster_sizes) == 16
    assert four.devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    assert one.model_bytes == four.model_bytes       # same model, placed differently
    assert max(four.bytes_per_device.values()) < 0.3 * max(one.bytes_per_device.values())
    # user shard: 8 bytes x interactions / workers, doubled while loading, plus 3 int64 indptrs per user
    assert four.shard_bytes == 2 * 8 * 500_000_000 // 4 + 3 * 8 * (10_000_000 // 4 + 1)
    assert four.worker_bytes == four.model_bytes + four.shard_bytes + WORKER_RUNTIME_BYTES
    text = four.describe()
    for needle in ("parameters", "cuda:3", "per worker", "user shard", "sizes assumed equal"):
        assert needle in text


def test_check_refuses_with_the_fix_named():
    config = run_config(variant="ldiffrec", dims=[300], n_clusters=16, latent_size=320)
    four = estimate_run(config, META, None, Resources(workers=4, gpus_per_worker=4))
    four.check(80 * GIB)                                   # fits an 80 GiB GPU
    need = max(four.bytes_per_device.values())
    with pytest.raises(EstimateDoesNotFit, match="more GPUs per worker"):
        four.check(int(need / 0.9 * 0.8))                  # too small for the busiest device, not for a cluster
    with pytest.raises(EstimateDoesNotFit, match="more clusters"):
        four.check(four.largest_cluster_bytes // 2)
    four.check(None)                                       # unknown memory: nothing to check


def test_diffrec_at_huge_n_is_refused_towards_the_latent_variant():
    config = run_config(variant="diffrec", dims=[1000])
    est = estimate_run(config, META, None, Resources(workers=8, gpus_per_worker=1))
    assert est.devices == ("cuda:0",)
    assert est.bytes_per_device["cuda:0"] == diffrec_memory_bytes(2_000_000, [1000], 400, 10, 1024)
    # 2M x 1000 weights twice over (in and out) x 4 copies x 4 bytes = 64 GB before any activation
    assert est.bytes_per_device["cuda:0"] > 64e9
    with pytest.raises(EstimateDoesNotFit, match="latent variant") as info:
        est.check(24 * GIB)
    assert "do not fit" in str(info.value)                 # not even the weights fit a 24 GiB GPU
    with pytest.raises(EstimateDoesNotFit, match="smaller train.batch_size"):
        est.check(80 * GIB)                                # the weights fit, batch 400 does not
    best = diffrec_max_batch(2_000_000, [1000], 10, int(80 * GIB * 0.9))
    assert 0 < best < 400
    assert diffrec_memory_bytes(2_000_000, [1000], best, 10) <= 80 * GIB * 0.9


def test_diffrec_memory_grows_with_batch_times_items():
    small = diffrec_memory_bytes(10_000, [200], 100)
    assert diffrec_memory_bytes(10_000, [200], 200) - small == pytest.approx(small - diffrec_memory_bytes(
        10_000, [200], 0), rel=1e-9)
    assert diffrec_memory_bytes(10_000, [200], 100, eval_batch=100_000) > small   # scoring peak dominates


def test_cpu_runs_check_the_workers_against_ram():
    config = run_config(variant="ldiffrec", dims=[64], n_clusters=4, latent_size=64)
    meta = {"n_items": 1000, "n_users": 2000, "n_train": 40_000, "n_valid": 10_000, "n_test": 5_000}
    est = estimate_run(config, meta, None, Resources(workers=2))
    assert est.devices == ("cpu",) and est.worker_bytes < WORKER_RUNTIME_BYTES + 64 * MIB
    est.check(16 * GIB, workers_per_machine=2)
    with pytest.raises(EstimateDoesNotFit, match="fewer workers per machine"):
        est.check(int(est.worker_bytes * 1.5), workers_per_machine=2)


def test_device_memory_sources():
    assert device_memory(0)[1] == "RAM of this machine" and device_memory(0)[0] > 0
    assert device_memory(4, override_gib=24)[0] == 24 * GIB
    assert accelerator_memory_bytes({"CPU": 8, "accelerator_type:A10G": 1}) == 22 * GIB
    assert accelerator_memory_bytes({"CPU": 8}) is None
    if not torch.cuda.is_available():
        assert device_memory(4, cluster_resources={"accelerator_type:L4": 1})[0] == 22 * GIB
        assert device_memory(4)[0] is None


def test_cluster_sizes_must_cover_the_catalog():
    config = run_config(variant="ldiffrec", dims=[64], n_clusters=2, latent_size=64)
    with pytest.raises(ValueError, match="sum to"):
        estimate_run(config, {"n_items": 100, "n_users": 10}, [10, 20])


def _fake_dataset(tmp_path, n_items=1000):
    """Enough of a prepared dataset for the dry run (meta.json, users/, items.parquet)."""
    import json
    (tmp_path / "users").mkdir()
    (tmp_path / "items.parquet").write_bytes(b"")
    (tmp_path / "meta.json").write_text(json.dumps({"schema_version": 1, "n_users": 2000, "n_items": n_items,
                                                    "n_train": 40_000, "n_valid": 10_000, "n_test": 5_000}))
    return str(tmp_path)


def test_job_dry_run_prints_the_estimate_and_refuses_what_cannot_fit(tmp_path, capsys, monkeypatch):
    from jobs.train_ldiffrec import main
    monkeypatch.delenv("DIFFREC_DEVICE_MEMORY_GIB", raising=False)
    data = _fake_dataset(tmp_path)
    assert main(["--data", data, "--model", "ldiffrec", "--gpus-per-worker", "2", "--device-memory-gib", "16",
                 "--dry-run", "model.n_clusters=4", "model.latent_size=64"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "cuda:1" in out and "per worker" in out and "fits" in out
    assert main(["--data", data, "--model", "diffrec", "--gpus-per-worker", "1", "--device-memory-gib", "0.045",
                 "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "train.batch_size" in err
    assert main(["--data", data, "--model", "diffrec", "--gpus-per-worker", "1", "--device-memory-gib", "0.01",
                 "--dry-run"]) == 2
    assert "weights alone do not fit" in capsys.readouterr().err
    # the override applied to those calls only: it must not leak into this process's environment
    # (a Ray cluster started later from it would refuse every run)
    import os
    assert "DIFFREC_DEVICE_MEMORY_GIB" not in os.environ
