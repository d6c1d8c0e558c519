"""Unit tests for clustering/placement.py (pure planning, no devices needed)."""
from __future__ import annotations

import numpy as np
import pytest

from models.fused_output import CHUNK_ELEMENTS
from clustering.placement import (GIB, OUTPUT_CHUNK_BUFFERS, LatentModelDims, PlacementDoesNotFit, available_devices,
                                  check_fits, estimate_cluster_memory, estimate_denoiser_memory,
                                  latent_sizes, plan_placement)

DEVICE_COUNTS = [1, 2, 4, 8]


def zipf_sizes(n_clusters, exponent, n_items=200_000, seed=0):
    """Skewed cluster sizes (rank^-exponent), shuffled so the planner must sort."""
    sizes = np.maximum(1, np.rint(n_items / np.arange(1, n_clusters + 1) ** exponent)).astype(np.int64)
    return np.random.default_rng(seed).permutation(sizes)


def gpus(n):
    return [f"cuda:{i}" for i in range(n)]


def test_latent_sizes_are_proportional_and_at_least_one():
    assert latent_sizes([100, 100, 200], 300).tolist() == [75, 75, 150]
    assert latent_sizes([1, 10_000], 300).tolist() == [1, 300]


def test_cluster_memory_matches_hand_count():
    dims = LatentModelDims(latent_total=10, encoder_hidden=(), batch_size=2, activation_copies=1.0)
    memory = estimate_cluster_memory([30, 70], dims)
    # cluster 0: l=3; encoder 30->6 (30*6+6), decoder 3->30 (3*30+30)
    assert memory.params.tolist() == [30 * 6 + 6 + 3 * 30 + 30, 70 * 14 + 14 + 7 * 70 + 70]
    np.testing.assert_array_equal(memory.state_bytes, memory.params * 4 * 4)  # w + grad + 2 Adam moments
    workspace = OUTPUT_CHUNK_BUFFERS * CHUNK_ELEMENTS * 4        # the output layer's chunk, not N_c wide
    assert memory.activation_bytes.tolist() == [(3 * 3) * 2 * 4 + workspace, (3 * 7) * 2 * 4 + workspace]
    np.testing.assert_array_equal(memory.total_bytes, memory.state_bytes + memory.activation_bytes)


def test_hidden_layers_and_explicit_latents_change_the_estimate():
    base = estimate_cluster_memory([500, 1500], LatentModelDims(latent_total=100))
    hidden = estimate_cluster_memory([500, 1500], LatentModelDims(latent_total=100, encoder_hidden=(400,)))
    assert (hidden.params > base.params).all()
    explicit = estimate_cluster_memory([500, 1500], LatentModelDims(latent_total=100), latents=[25, 75])
    np.testing.assert_array_equal(explicit.params, base.params)
    with pytest.raises(ValueError, match="latent sizes"):
        estimate_cluster_memory([500, 1500], latents=[25])


def test_denoiser_memory_mirrors_reference_dnn():
    dims = LatentModelDims(latent_total=300, denoiser_dims=(300,), time_emb_size=10)
    # (300+10)->300, 300->300, plus the 10->10 time layer
    assert int(estimate_denoiser_memory(dims).params) == 310 * 300 + 300 + 300 * 300 + 300 + 10 * 10 + 10


@pytest.mark.parametrize("n_clusters", [32, 48, 64])
@pytest.mark.parametrize("n_devices", DEVICE_COUNTS)
def test_balanced_within_ten_percent_on_skewed_sizes(n_clusters, n_devices):
    sizes = zipf_sizes(n_clusters, exponent=0.5, seed=n_clusters)
    plan = plan_placement(sizes, gpus(n_devices))
    loads = np.array(list(plan.bytes_per_device.values()), dtype=np.float64)
    if plan.cluster_bytes.max() <= loads.mean():
        assert plan.balance <= 1.10, plan.describe()
    else:   # a cluster's latent slice grows with N_c, so its bytes grow ~N_c²: one can outweigh a device's share
        assert loads.max() <= 1.10 * plan.cluster_bytes.max(), plan.describe()
    assert sum(plan.bytes_per_device.values()) == plan.cluster_bytes.sum() + plan.denoiser_bytes


@pytest.mark.parametrize("n_clusters", [16, 32, 64])
@pytest.mark.parametrize("n_devices", DEVICE_COUNTS)
def test_steep_skew_is_within_ten_percent_of_the_lower_bound(n_clusters, n_devices):
    # With Zipf exponent 1 one cluster can outweigh a whole device's share; no
    # plan beats max(largest cluster, mean load), and LPT stays near it.
    plan = plan_placement(zipf_sizes(n_clusters, exponent=1.0), gpus(n_devices))
    loads = np.array(list(plan.bytes_per_device.values()), dtype=np.float64)
    lower_bound = max(plan.cluster_bytes.max(), loads.sum() / n_devices)
    assert loads.max() <= 1.10 * lower_bound, plan.describe()


def test_lpt_beats_round_robin():
    sizes = zipf_sizes(32, exponent=0.7)
    plan = plan_placement(sizes, gpus(4))
    naive = np.zeros(4)
    np.add.at(naive, np.arange(32) % 4, plan.cluster_bytes)
    naive[0] += plan.denoiser_bytes
    assert max(plan.bytes_per_device.values()) < naive.max()


def test_denoiser_on_first_device_and_counted_there():
    plan = plan_placement([1000, 10, 10, 10], ["cuda:0", "cuda:1"])
    assert plan.denoiser_device == "cuda:0"
    on_first = plan.clusters_on("cuda:0")
    assert plan.bytes_per_device["cuda:0"] == plan.denoiser_bytes + plan.cluster_bytes[on_first].sum()
    # the denoiser already weighs on cuda:0, so the big cluster goes to cuda:1
    # and the small ones fill up cuda:0
    assert plan.device_of_cluster == ["cuda:1", "cuda:0", "cuda:0", "cuda:0"]
    assert plan.denoiser_bytes < plan.cluster_bytes[0]


def test_plan_fields_and_single_cpu_device():
    plan = plan_placement(zipf_sizes(16, 0.8), ["cpu"])
    assert plan.device_of_cluster == ["cpu"] * 16 and plan.denoiser_device == "cpu"
    assert set(plan.bytes_per_device) == {"cpu"} and plan.balance == 1.0
    text = plan.describe()
    assert "cpu*" in text and "denoiser" in text and f"{plan.total_params:,}" in text


def test_plan_is_deterministic():
    sizes = zipf_sizes(40, 0.6)
    assert plan_placement(sizes, gpus(4)).device_of_cluster == plan_placement(sizes, gpus(4)).device_of_cluster


def test_invalid_inputs():
    with pytest.raises(ValueError, match="devices is empty"):
        plan_placement([10, 20], [])
    with pytest.raises(ValueError, match="duplicates"):
        plan_placement([10, 20], ["cuda:0", "cuda:0"])
    with pytest.raises(ValueError, match="no empty clusters"):
        plan_placement([10, 0], ["cpu"])


def test_check_fits():
    plan = plan_placement(zipf_sizes(16, 0.8), gpus(2))
    check_fits(plan, 80 * GIB)  # plenty
    check_fits(plan, {"cuda:0": 80 * GIB, "cuda:1": 80 * GIB})
    too_small = int(max(plan.bytes_per_device.values()) / 0.9) - 1
    with pytest.raises(PlacementDoesNotFit, match="does not fit.*cuda:.*gpus_per_worker"):
        check_fits(plan, too_small)
    with pytest.raises(PlacementDoesNotFit, match="largest cluster alone.*n_clusters"):
        check_fits(plan, int(plan.cluster_bytes.max() / 2))
    with pytest.raises(PlacementDoesNotFit, match="cuda:1"):
        check_fits(plan, {"cuda:0": 80 * GIB, "cuda:1": 1})


def test_available_devices_cpu_and_too_many_gpus():
    assert available_devices(0) == ["cpu"]
    torch = pytest.importorskip("torch")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(RuntimeError, match="gpus_per_worker"):
        available_devices(visible + 1)
    if visible:
        assert available_devices(visible) == gpus(visible)
