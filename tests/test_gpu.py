"""GPU code paths: CUDA training and scoring of every variant with the cluster
VAEs placed across the visible GPUs, the start-up plan, FAISS GPU k-means,
and bench/gpu_check.py. CUDA tests skip cleanly where no CUDA device exists
(FAISS GPU ones also where the installed FAISS is a CPU build); the gpu_check
smoke test runs everywhere (on the CPU here).

    pytest tests/test_gpu.py -v        # on a GPU node of the cluster
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clustering.placement import LatentModelDims, plan_placement
from models.batch import HistoryBatch
from models.config import ModelConfig
from models.recommender import DiffusionRecommender

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available() and torch.cuda.device_count() > 0
N_GPUS = torch.cuda.device_count() if CUDA else 0
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
needs_2_gpus = pytest.mark.skipif(N_GPUS < 2, reason="needs >= 2 CUDA devices")


def _faiss_gpu() -> bool:
    try:
        from clustering.kmeans import faiss_gpu_available
        return faiss_gpu_available()
    except ImportError:
        return False


needs_faiss_gpu = pytest.mark.skipif(not (CUDA and _faiss_gpu()), reason="no FAISS GPU build or no CUDA device")

VARIANTS = ["diffrec", "tdiffrec", "ldiffrec", "ltdiffrec"]
N_ITEMS, C = 600, 4


def config(variant: str, **kw) -> ModelConfig:
    base = dict(variant=variant, dims=[48], steps=10, noise_scale=0.1, noise_min=0.0001, noise_max=0.02,
                latent_size=32, n_clusters=C, vae_hidden_dims=[64] if variant.startswith("l") else [])
    base.update(kw)
    return ModelConfig(**base)


def clusters(n_items=N_ITEMS, c=C) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.permutation(np.concatenate([np.arange(c), rng.integers(0, c, n_items - c)]))


def batch(n_users=64, n_items=N_ITEMS, seed=0) -> HistoryBatch:
    rng = np.random.default_rng(seed)
    return HistoryBatch.from_lists([rng.choice(n_items, rng.integers(1, 30), replace=False)
                                    for _ in range(n_users)], n_items)


def placed(model: DiffusionRecommender, devices: list[str], batch_size=64):
    if model.vae is None:
        return model.place(None, devices[0]), None
    cfg = model.config
    plan = plan_placement(model.vae.cluster_sizes, devices, LatentModelDims(
        latent_total=cfg.latent_size, encoder_hidden=tuple(cfg.vae_hidden_dims), denoiser_dims=tuple(cfg.dims),
        time_emb_size=cfg.emb_size, batch_size=batch_size), latents=model.vae.latent_sizes)
    return model.place(plan.device_of_cluster, plan.denoiser_device), plan


def cuda_devices() -> list[str]:
    return [f"cuda:{i}" for i in range(N_GPUS)]


# ---- CUDA training and scoring --------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_training_steps_with_clusters_across_the_gpus(variant):
    torch.manual_seed(0)
    model, plan = placed(DiffusionRecommender(config(variant), N_ITEMS, clusters()), cuda_devices())
    if plan is not None:      # every cluster's encoder/decoder sits where the plan put it
        for c, device in enumerate(plan.device_of_cluster):
            assert {str(p.device) for p in model.vae.encoders[c].parameters()} == {device}
            assert {str(p.device) for p in model.vae.decoders[c].parameters()} == {device}
    assert str(model.device) == cuda_devices()[0]     # denoiser, latent and loss on the first GPU
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(8):
        out = model(batch(seed=step % 2), step)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        model.record_step_losses(out.timesteps, out.step_losses)
        losses.append(float(out.loss.detach()))
    assert np.isfinite(losses).all()
    assert out.loss.device == torch.device(cuda_devices()[0])
    if CUDA:
        torch.cuda.synchronize()


@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_score_topk_equals_cpu(variant):
    torch.manual_seed(1)
    cpu_model = DiffusionRecommender(config(variant), N_ITEMS, clusters())
    gpu_model = DiffusionRecommender(config(variant), N_ITEMS, clusters())
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model, _ = placed(gpu_model, cuda_devices())
    b, exclude = batch(seed=3), batch(seed=4)
    v_cpu, i_cpu = cpu_model.score_topk(b, 20, exclude)
    v_gpu, i_gpu = gpu_model.score_topk(b, 20, exclude)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=1e-4, atol=1e-4)
    # ids agree except where two scores are within the numerical tolerance of each other
    same = (i_gpu.cpu() == i_cpu).float().mean().item()
    assert same > 0.98, f"only {same:.3f} of the top-20 ids agree"
    torch.testing.assert_close(gpu_model.scores(b).cpu(), cpu_model.scores(b), rtol=1e-4, atol=1e-4)


@needs_2_gpus
def test_clusters_are_spread_over_several_gpus():
    model, plan = placed(DiffusionRecommender(config("ldiffrec", n_clusters=8, latent_size=64), N_ITEMS,
                                              clusters(c=8)), cuda_devices())
    used = {str(p.device) for p in model.vae.parameters()}
    assert len(used) >= 2 and used == set(plan.device_of_cluster)
    out = model(batch(), 0)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.device == p.device for p in model.vae.encoders.parameters())


@needs_cuda
def test_train_loop_build_model_prints_the_cuda_plan():
    pytest.importorskip("ray")
    from distributed.config import RunConfig
    from distributed.train_loop import build_model
    run = RunConfig()
    run.model = config("ltdiffrec")
    logged = []
    model, devices = build_model(run, N_ITEMS, clusters(), N_GPUS, log=logged.append)
    assert devices == cuda_devices()
    assert logged and "L-DiffRec placement" in logged[0] and "cuda:0" in logged[0]
    assert str(model.device) == "cuda:0"


@needs_cuda
def test_estimate_reads_the_visible_gpu_memory():
    from distributed.estimate import device_memory
    memory, source = device_memory(1)
    assert memory == min(torch.cuda.get_device_properties(i).total_memory for i in range(N_GPUS))
    assert "seen by this process" in source


# ---- FAISS GPU ----------------------------------------------------------------------------

@needs_faiss_gpu
def test_faiss_gpu_kmeans_is_deterministic_and_valid():
    from clustering.kmeans import cluster_items
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (16, 32))
    points = (centres[rng.integers(0, 16, 50_000)] + rng.normal(0, 1, (50_000, 32))).astype(np.float32)
    first = cluster_items(points, 16, seed=3, niter=15, use_gpu=True)
    again = cluster_items(points, 16, seed=3, niter=15, use_gpu=True)
    assert first.backend == "faiss-gpu"
    np.testing.assert_array_equal(first.assignment, again.assignment)
    np.testing.assert_array_equal(first.centroids, again.centroids)
    assert (first.sizes >= 1).all() and first.sizes.sum() == 50_000
    cpu = cluster_items(points, 16, seed=3, niter=15, use_gpu=False)
    assert first.objective == pytest.approx(cpu.objective, rel=0.1)   # same quality as the CPU path


@needs_faiss_gpu
def test_auto_backend_picks_the_gpu():
    from clustering.kmeans import cluster_items
    points = np.random.default_rng(1).normal(size=(2000, 8)).astype(np.float32)
    assert cluster_items(points, 4, use_gpu="auto").backend == "faiss-gpu"


# ---- bench/gpu_check.py ---------------------------------------------------------------------

def _run_gpu_check(tmp_path, *args):
    out = tmp_path / "gpu_check.json"
    # In a fresh interpreter, and it must not import Ray (a GPU node with only CUDA PyTorch runs it);
    # scipy and scikit-learn are hidden too: FAISS k-means must not need them.
    code = ("import runpy, sys; sys.argv = ['gpu_check.py'] + sys.argv[1:]\n"
            "sys.modules.update(scipy=None, sklearn=None)\n"
            "try:\n    runpy.run_path('bench/gpu_check.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'imported Ray'\n")
    proc = subprocess.run([sys.executable, "-c", code, *args, "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_gpu_check_smoke_without_ray(tmp_path):
    stdout, result = _run_gpu_check(tmp_path, "--items", "400", "--clusters", "4", "--steps", "3", "--warmup", "1",
                                    "--batch", "16", "--per-user", "5", "--latent", "16", "--dims", "16",
                                    "--kmeans-dim", "8")
    assert "L-DiffRec placement" in stdout and "steps/s" in stdout and "users/s" in stdout
    assert result["steps"] == 3 and result["steps_per_s"] > 0 and len(result["cluster_sizes"]) == 4
    assert result["kmeans_backend"] in ("faiss-cpu", "faiss-gpu")   # FAISS is installed here; no scipy needed
    if not CUDA:
        assert "no CUDA device: running on CPU" in stdout and result["devices"] == ["cpu"]


@needs_cuda
def test_gpu_check_on_cuda(tmp_path):
    stdout, result = _run_gpu_check(tmp_path, "--items", "50000", "--steps", "100")
    assert result["devices"] == cuda_devices()
    assert set(result["device_of_cluster"]) <= set(cuda_devices())
    assert result["kmeans_backend"] == ("faiss-gpu" if _faiss_gpu() else "faiss-cpu")
    for device, peak in result["peak_bytes_per_device"].items():
        assert peak is not None and peak > 0
