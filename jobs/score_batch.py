"""Write every user's top-K recommendations to Parquet (Ray Data batch scoring).

    python jobs/score_batch.py --checkpoint runs/demo/checkpoint_... --users runs/demo-data --k 100 --output recs/
    python jobs/score_batch.py --checkpoint CKPT --users data/ml-1m --history train,valid --k 50 --output recs/
    python jobs/score_batch.py --checkpoint CKPT --users logs/today/ --item-col sku --format rows --output recs/
    ray job submit --working-dir . -- python jobs/score_batch.py --checkpoint /shared/ckpt --users /shared/data \
        --k 100 --output /shared/recs --overwrite

--users is a prepared dataset (history = its train items, or --history train,valid), a user-history
Parquet (one row per user: user id + a list column of original item ids) or raw interaction Parquet
(user id, item id, optional timestamp). Output: Parquet files + summary.json in --output, written to a
temporary directory and renamed when complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.dataset_format import DatasetError  # noqa: E402
from distributed.scoring import FALLBACKS, FORMATS, ScoreOptions, score_batch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (printed at the end of training)")
    p.add_argument("--users", required=True, help="prepared dataset, user-history Parquet or interaction Parquet")
    p.add_argument("--k", type=int, default=100, help="recommendations per user")
    p.add_argument("--output", required=True, help="output directory (Parquet files + summary.json)")
    p.add_argument("--format", choices=FORMATS, default="lists",
                   help="lists: one row per user (item_ids, scores); rows: one row per user-item with rank")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--history", default="train",
                   help="prepared input: splits forming the history (and the mask), e.g. train,valid")
    p.add_argument("--fallback", choices=FALLBACKS, default="popular",
                   help="users with no known item: most popular items (flagged) or no row")
    p.add_argument("--batch-size", type=int, default=256, help="users per model call (memory ~ batch x cluster)")
    p.add_argument("--concurrency", type=int, default=None, help="scoring actors (default: GPUs, or CPUs - 1)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="default 0.5 on CPU")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default 1 when the cluster has GPUs")
    p.add_argument("--threads-per-actor", type=int, default=None, help="torch threads (default CPUs / actors)")
    p.add_argument("--rows-per-file", type=int, default=None, help="minimum rows per output Parquet file")
    g = p.add_argument_group("Parquet input (not a prepared dataset)")
    g.add_argument("--user-col", default="user_id")
    g.add_argument("--item-col", default="item_id", help="item id column of raw interactions")
    g.add_argument("--time-col", default=None, help="default: 'timestamp' if present, else input order")
    g.add_argument("--items-col", default=None, help="list column of a user-history Parquet (default: auto)")
    p.add_argument("--test-fail-after-batches", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--test-delay-per-batch", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = ScoreOptions(
        k=args.k, format=args.format, overwrite=args.overwrite,
        history=tuple(h.strip() for h in args.history.split(",") if h.strip()), fallback=args.fallback,
        batch_size=args.batch_size, concurrency=args.concurrency, cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor, threads_per_actor=args.threads_per_actor,
        user_col=args.user_col, item_col=args.item_col, time_col=args.time_col, items_col=args.items_col,
        rows_per_file=args.rows_per_file, fail_after_batches=args.test_fail_after_batches,
        delay_per_batch_s=args.test_delay_per_batch)
    try:
        score_batch(args.checkpoint, args.users, args.output, options)
    except (ValueError, FileNotFoundError, FileExistsError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
