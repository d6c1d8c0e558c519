"""Training-step throughput of DiffRec and L-DiffRec against this machine's GEMM rate.

Times forward + backward + Adam steps on random sparse histories (batch 400,
2,810 items, ~70 interactions per user), counts the matmul FLOPs actually run
(torch's FlopCounterMode: 2·m·n·k per matmul, forward and backward, so the
first layer's missing input gradient is not counted), and measures the fp32
matmul rate at each model's dominant shape in the same run.

    python bench/train_step.py [--json PATH] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.batch import HistoryBatch  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.recommender import DiffusionRecommender  # noqa: E402

N_ITEMS, BATCH, PER_USER = 2810, 400, 70


def random_batch(rng) -> HistoryBatch:
    lengths = rng.poisson(PER_USER, BATCH).clip(1, N_ITEMS)
    lists = [rng.choice(N_ITEMS, n, replace=False) for n in lengths]
    return HistoryBatch.from_lists(lists, N_ITEMS)


def make_gemm(m: int, k: int, n: int):
    """A timed fp32 (m×k)@(k×n) into a preallocated output; returns seconds."""
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)

    def run() -> float:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        return time.perf_counter() - t0
    return run


def time_training(model, batches, steps: int, gemm_shape) -> tuple[float, float, float]:
    """(seconds per step, matmul GFLOP per step, GEMM GFLOP/s), medians.

    The GEMM is timed between training steps, so both see the same machine
    load (other processes on a shared box skew back-to-back measurements)."""
    try:   # the single-kernel Adam is much faster on CPU; fall back where unsupported
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gemm = make_gemm(*gemm_shape)

    def step(i):
        out = model(batches[i % len(batches)], i)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.record_step_losses(out.timesteps, out.step_losses)

    for i in range(3):
        step(i)                                     # warm-up (allocator, Adam state)
    with FlopCounterMode(display=False) as counter:
        step(0)
    times, gemm_times = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
        gemm()
        gemm_times.append(min(gemm() for _ in range(3)))
    m, k, n = gemm_shape
    return (float(np.median(times)), counter.get_total_flops() / 1e9,
            2 * m * k * n / float(np.median(gemm_times)) / 1e9)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batches = [random_batch(rng) for _ in range(4)]

    setups = {
        "diffrec": (ModelConfig(variant="diffrec", dims=[200, 600], steps=40), None,
                    (BATCH, N_ITEMS + 10, 600)),
        "ldiffrec": (ModelConfig(variant="ldiffrec", dims=[300], steps=40, latent_size=300, n_clusters=2),
                     rng.integers(0, 2, N_ITEMS), (BATCH, 150, N_ITEMS // 2)),
    }
    results = {}
    print(f"threads={torch.get_num_threads()}  batch={BATCH}  items={N_ITEMS}  "
          f"nnz/batch={batches[0].items.numel()}")
    print(f"{'model':<10} {'ms/step':>8} {'GFLOP/step':>11} {'achieved':>9} {'gemm':>8} {'fraction':>9}  gemm shape")
    for name, (cfg, clusters, shape) in setups.items():
        model = DiffusionRecommender(cfg, N_ITEMS, item_clusters=clusters)
        seconds, gflop, gemm = time_training(model, batches, args.steps, shape)
        achieved = gflop / seconds
        results[name] = {"achieved_gflops": round(achieved, 2), "gemm_gflops": round(gemm, 2),
                         "fraction": round(achieved / gemm, 3), "ms_per_step": round(seconds * 1e3, 2),
                         "gflop_per_step": round(gflop, 3), "users_per_s": round(BATCH / seconds, 1),
                         "gemm_shape": list(shape)}
        print(f"{name:<10} {seconds * 1e3:8.1f} {gflop:11.3f} {achieved:9.1f} {gemm:8.1f} "
              f"{achieved / gemm:9.1%}  {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
