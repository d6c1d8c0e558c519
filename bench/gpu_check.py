"""GPU check: L-DiffRec with C clusters placed across this machine's CUDA devices.

Plain PyTorch over models/ and clustering/ (no Ray), so it runs on any machine
with a CUDA build of PyTorch, e.g. one GPU node of the cluster:

    python bench/gpu_check.py [--json PATH] [--steps 300] [--items 200000] [--clusters 4]
    python bench/gpu_check.py --steps 20 --items 5000          # a quick smoke test (also on CPU)

It (1) clusters synthetic item embeddings with FAISS k-means (on the GPU when
the installed FAISS is a GPU build and sees a device; the backend is printed),
(2) plans the placement of the C cluster VAEs over the visible devices (one
device is fine: everything lands there) and prints the plan, refusing a plan
that cannot fit, (3) trains a few hundred Adam steps on random sparse
histories and prints steps/s and users/s, peak memory per device, and
(4) scores a batch over the full catalog. Without a CUDA device it says so and
runs the same on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.placement import (GIB, LatentModelDims, check_fits, device_total_memory,  # noqa: E402
                                  plan_placement)
from models.batch import HistoryBatch  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.recommender import DiffusionRecommender  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=200_000, help="catalog size N")
    p.add_argument("--clusters", type=int, default=4, help="C, item clusters (one VAE each)")
    p.add_argument("--steps", type=int, default=300, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=400)
    p.add_argument("--per-user", type=int, default=50, help="mean interactions per user")
    p.add_argument("--latent", type=int, default=300, help="total latent size")
    p.add_argument("--dims", type=int, nargs="+", default=[300], help="denoiser hidden dims")
    p.add_argument("--devices", type=int, default=None, help="use this many CUDA devices (default: all)")
    p.add_argument("--kmeans-dim", type=int, default=64, help="dimension of the synthetic item embeddings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def pick_devices(limit: int | None) -> tuple[list[str], str]:
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return ["cpu"], "no CUDA device: running on CPU"
    n = torch.cuda.device_count() if limit is None else max(1, min(limit, torch.cuda.device_count()))
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    return [f"cuda:{i}" for i in range(n)], f"{n} CUDA device(s): {', '.join(names)}"


def synthetic_embeddings(n_items: int, dim: int, groups: int, rng) -> np.ndarray:
    """Items around `groups` centres with Zipf-like group sizes (clusters to find, unequal)."""
    p = 1.0 / np.arange(1, groups + 1)
    label = rng.choice(groups, n_items, p=p / p.sum())
    centres = rng.normal(0, 3, (groups, dim))
    return (centres[label] + rng.normal(0, 1, (n_items, dim))).astype(np.float32)


def run_kmeans(n_items: int, clusters: int, dim: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    points = synthetic_embeddings(n_items, dim, clusters, rng)
    try:
        import faiss  # noqa: F401
    except ImportError as exc:          # no FAISS at all: a random assignment keeps the check going
        print(f"FAISS not importable ({exc}); random item clusters", flush=True)
        assignment = np.concatenate([np.arange(clusters), rng.integers(0, clusters, n_items - clusters)])
        return {"backend": "none", "faiss_gpu": False, "seconds": 0.0, "assignment": assignment}
    from clustering.kmeans import cluster_items, faiss_gpu_available
    gpu = faiss_gpu_available()
    t0 = time.perf_counter()
    result = cluster_items(points, clusters, seed=seed, niter=20, use_gpu="auto")
    seconds = time.perf_counter() - t0
    print(f"k-means: {n_items:,} items x {dim} dims into {clusters} clusters with {result.backend} in "
          f"{seconds:.2f}s (FAISS GPU {'available' if gpu else 'not available'}); sizes "
          f"{sorted(result.sizes.tolist(), reverse=True)[:8]}", flush=True)
    return {"backend": result.backend, "faiss_gpu": gpu, "seconds": seconds,
            "assignment": result.assignment.astype(np.int64)}


def random_batches(n_items: int, batch: int, per_user: int, count: int, seed: int) -> list[HistoryBatch]:
    """Sparse histories with popularity skew, built vectorised (no per-user loop)."""
    rng = np.random.default_rng(seed + 1)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    out = []
    for _ in range(count):
        lengths = rng.poisson(per_user, batch).clip(1, n_items)
        items = rng.choice(n_items, int(lengths.sum()), p=popularity)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        out.append(HistoryBatch(torch.from_numpy(indptr).long(), torch.from_numpy(items).long(), n_items))
    return out


def sync(devices: list[str]) -> None:
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    devices, note = pick_devices(args.devices)
    print(note, flush=True)
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})", flush=True)

    km = run_kmeans(args.items, args.clusters, args.kmeans_dim, args.seed)
    config = ModelConfig(variant="ldiffrec", n_clusters=args.clusters, latent_size=args.latent,
                         dims=list(args.dims), steps=40, noise_scale=0.1, noise_min=0.0001, noise_max=0.02)
    model = DiffusionRecommender(config, args.items, km["assignment"])
    sizes = model.vae.cluster_sizes
    plan = plan_placement(sizes, devices, LatentModelDims(
        latent_total=args.latent, denoiser_dims=tuple(args.dims), time_emb_size=config.emb_size,
        batch_size=args.batch), latents=model.vae.latent_sizes)
    print(plan.describe(), flush=True)
    memory = {d: device_total_memory(d) for d in devices}
    check_fits(plan, memory)       # PlacementDoesNotFit names the fix
    model.place(plan.device_of_cluster, plan.denoiser_device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters on {', '.join(devices)}", flush=True)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pool = random_batches(args.items, args.batch, args.per_user, min(32, args.steps + args.warmup), args.seed)
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(d)

    def step(i: int) -> float:
        out = model(pool[i % len(pool)], i)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        model.record_step_losses(out.timesteps, out.step_losses)
        return out.loss.detach()

    model.train()
    for i in range(args.warmup):
        step(i)
    sync(devices)
    t0 = time.perf_counter()
    loss = None
    for i in range(args.steps):
        loss = step(args.warmup + i)
    sync(devices)
    train_s = time.perf_counter() - t0
    final_loss = float(loss) if loss is not None else float("nan")
    if not math.isfinite(final_loss):
        print(f"FAIL: training loss is {final_loss}", flush=True)
        return 1
    steps_per_s = args.steps / train_s
    print(f"training: {args.steps} steps of {args.batch} users in {train_s:.2f}s: {steps_per_s:.1f} steps/s, "
          f"{steps_per_s * args.batch:,.0f} users/s, final loss {final_loss:.3f}", flush=True)

    t0 = time.perf_counter()
    values, ids = model.score_topk(pool[0], 20)
    sync(devices)
    score_s = time.perf_counter() - t0
    assert ids.shape == (args.batch, 20) and bool(torch.isfinite(values).all())
    print(f"scoring: top-20 over {args.items:,} items for {args.batch} users in {score_s * 1000:.1f} ms "
          f"({args.batch / score_s:,.0f} users/s)", flush=True)

    peak = {d: (torch.cuda.max_memory_allocated(d) if d.startswith("cuda") else None) for d in devices}
    for d in devices:
        if peak[d] is not None:
            print(f"{d}: peak {peak[d] / GIB:.2f} GiB allocated, planned {plan.bytes_per_device[d] / GIB:.2f} GiB, "
                  f"total {memory[d] / GIB:.1f} GiB", flush=True)
    result = {
        "note": note, "devices": devices, "torch": torch.__version__, "cuda": torch.version.cuda,
        "items": args.items, "clusters": args.clusters, "batch": args.batch, "steps": args.steps,
        "kmeans_backend": km["backend"], "faiss_gpu": km["faiss_gpu"], "kmeans_s": round(km["seconds"], 3),
        "params": n_params, "cluster_sizes": sizes, "device_of_cluster": plan.device_of_cluster,
        "planned_bytes_per_device": plan.bytes_per_device, "peak_bytes_per_device": peak,
        "train_s": round(train_s, 3), "steps_per_s": round(steps_per_s, 2),
        "users_per_s": round(steps_per_s * args.batch, 1), "final_loss": final_loss,
        "score_ms": round(score_s * 1000, 2), "score_users_per_s": round(args.batch / score_s, 1),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
