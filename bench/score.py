"""Batch-scoring throughput (jobs/score_batch.py's pipeline): users/s on the
shared ML-1M split and on a 100,000-item synthetic catalog.

For each dataset: prepare it, train L-DiffRec for 1 epoch (ML-1M: the paper's
preset, C=2; synthetic: C=8, SVD clusters), then score every user's top-K to
Parquet through Ray Data (``score_batch``) and, as the baseline in the same
script, with the model's ``score_topk`` in this process (same batch size, no
Ray, no Parquet). Prints users/s of both, their ratio and peak memory.

    python bench/score.py [--json PATH] [--k 100] [--batch-size 256] [--workdir DIR]
                          [--users 20000 --items 100000 --interactions 1000000] [--skip-ml1m] [--skip-synthetic]

ML-1M is skipped (with a note) when ../shared/data/ml-1m_clean is absent.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.memory import PeakMemory  # noqa: E402
from distributed.config import load_preset  # noqa: E402
from distributed.prepare import PrepareOptions, prepare_dataset  # noqa: E402
from distributed.ray_env import ensure_ray  # noqa: E402
from distributed.scoring import ScoreOptions, score_batch  # noqa: E402
from distributed.sources import SourceSpec  # noqa: E402
from distributed.synthetic import SyntheticSpec  # noqa: E402
from distributed.trainer import Resources, train  # noqa: E402

ML1M = REPO.parent / "shared" / "data" / "ml-1m_clean"


def in_process_users_per_s(checkpoint: str, data_dir: str, k: int, batch_size: int) -> dict:
    """Baseline: the model's own score_topk over every user, in this process."""
    import torch

    from distributed.checkpoint import load_model
    from distributed.data import gather_rows
    from distributed.dataset_format import read_users
    from models.batch import HistoryBatch
    from models.metrics import csr_from_lists

    model, _, info = load_model(checkpoint)
    indptr, items = csr_from_lists(read_users(data_dir, columns=["user_idx", "train_items"])["train_items"])
    n_users = indptr.numel() - 1
    model.score_topk(HistoryBatch(*gather_rows(indptr, items, torch.arange(min(batch_size, n_users))),
                                  info["n_items"]), k)                         # warm-up
    t0 = time.perf_counter()
    for rows in torch.arange(n_users).split(batch_size):
        model.score_topk(HistoryBatch(*gather_rows(indptr, items, rows), info["n_items"]), k)
    seconds = time.perf_counter() - t0
    return {"users": n_users, "seconds": round(seconds, 2), "users_per_s": round(n_users / seconds, 1),
            "threads": torch.get_num_threads()}


def run_case(name: str, data_dir: str, config, workdir: Path, args) -> dict:
    t0 = time.time()
    summary = train(data_dir, config, Resources(workers=1), storage=str(workdir / "runs"), name=name)
    train_s = time.time() - t0
    checkpoint = summary["checkpoint"]
    with PeakMemory() as mem:
        scored = score_batch(checkpoint, data_dir, str(workdir / f"recs-{name}"),
                             ScoreOptions(k=args.k, batch_size=args.batch_size, overwrite=True))
    baseline = in_process_users_per_s(checkpoint, data_dir, args.k, args.batch_size)
    result = {
        "users": scored["users_scored"], "n_items": scored["n_items"], "k": args.k, "batch_size": args.batch_size,
        "pipeline_users_per_s": scored["users_per_s"], "pipeline_score_s": scored["score_s"],
        "job_wall_s": scored["wall_s"], "output_mib": round(scored["output_bytes"] / 2**20, 2),
        "in_process_users_per_s": baseline["users_per_s"],
        "pipeline_vs_in_process": round(scored["users_per_s"] / baseline["users_per_s"], 3),
        "peak_mem_gib": round(mem.peak_used_gib, 2), "actors": scored["actors"],
        "train_1_epoch_s": round(train_s, 1),
        "n_clusters": config.model.n_clusters,
    }
    print(f"\n[{name}] {result['users']:,} users x {result['n_items']:,} items, top-{args.k}, batch {args.batch_size}, "
          f"C={config.model.n_clusters}")
    print(f"  Ray Data pipeline  {result['pipeline_users_per_s']:10,.0f} users/s  ({result['pipeline_score_s']:.1f} s "
          f"read+score+write, job {result['job_wall_s']:.1f} s, {result['output_mib']} MiB Parquet)")
    print(f"  in-process model   {result['in_process_users_per_s']:10,.0f} users/s  (score_topk only, "
          f"{baseline['threads']} threads)")
    print(f"  ratio              {result['pipeline_vs_in_process']:10.2f}")
    print(f"  peak memory        {result['peak_mem_gib']:10.2f} GiB (machine-wide, during the pipeline)", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--interactions", type=int, default=1_000_000)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--workdir", default=None, help="kept when given; default a temp dir, removed")
    p.add_argument("--skip-ml1m", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    args = p.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-score-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_ray()   # started before measuring
    results = {}
    preset = REPO / "jobs" / "configs" / "ml-1m.yaml"
    if args.skip_ml1m:
        pass
    elif not (ML1M / "train_list.npy").exists():
        print(f"[ml-1m] skipped: {ML1M} is absent (only on the team's machines)")
        results["ml-1m"] = {"skipped": f"{ML1M} absent"}
    else:
        data = workdir / "ml-1m"
        if not (data / "meta.json").exists():
            prepare_dataset(SourceSpec("diffrec-npy", str(ML1M)), data, PrepareOptions(overwrite=True))
        config = load_preset(preset, "ldiffrec").with_overrides(["train.epochs=1"])
        results["ml-1m"] = run_case("ml-1m", str(data), config, workdir, args)
    if not args.skip_synthetic:
        data = workdir / f"synthetic-{args.items}"
        if not (data / "meta.json").exists():
            prepare_dataset(SourceSpec("synthetic", synthetic=SyntheticSpec(
                n_users=args.users, n_items=args.items, n_interactions=args.interactions)), data,
                PrepareOptions(overwrite=True))
        config = load_preset(preset, "ldiffrec").with_overrides(
            ["train.epochs=1", f"model.n_clusters={args.clusters}", "clustering.embedding=svd"])
        results[f"synthetic-{args.items}"] = run_case(f"synthetic-{args.items}", str(data), config, workdir, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
