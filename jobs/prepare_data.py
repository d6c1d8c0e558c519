"""Prepare interactions into the dataset format every job reads.

    python jobs/prepare_data.py --source parquet --input logs/ --output data/shop \
        --user-col customer --item-col sku --time-col ts --kcore 5
    python jobs/prepare_data.py --source movielens --input ml-1m/ratings.dat --output data/ml-1m --min-rating 4
    python jobs/prepare_data.py --source diffrec-npy --input ml-1m_clean/ --output data/ml-1m-diffrec
    python jobs/prepare_data.py --source synthetic --users 2000 --items 1000 --interactions 60000 --output data/demo
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.prepare import PrepareOptions, prepare_dataset  # noqa: E402
from distributed.sources import SOURCES, InputError, SourceSpec  # noqa: E402
from distributed.synthetic import SyntheticSpec  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--input", help="file or directory (not for synthetic)")
    p.add_argument("--output", required=True, help="prepared dataset directory to write")
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default=None, help="default: 'timestamp' if present, else input order")
    p.add_argument("--rating-col", default=None, help="default: 'rating' if present")
    p.add_argument("--min-rating", type=float, default=None, help="keep interactions rated at least this")
    p.add_argument("--kcore", type=int, default=0, help="iterated k-core on users and items (0 = off)")
    p.add_argument("--split", default="0.7,0.2,0.1", help="train,valid,test ratios per user, by time")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--partitions", type=int, default=0, help="user hash buckets (0 = auto)")
    g = p.add_argument_group("synthetic")
    g.add_argument("--users", type=int, default=2000)
    g.add_argument("--items", type=int, default=1000)
    g.add_argument("--interactions", type=int, default=60000)
    g.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        split = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        print(f"error: --split {args.split!r} must be three numbers like 0.7,0.2,0.1", file=sys.stderr)
        return 2
    synthetic = None
    if args.source == "synthetic":
        synthetic = SyntheticSpec(n_users=args.users, n_items=args.items,
                                  n_interactions=args.interactions, seed=args.seed)
    spec = SourceSpec(kind=args.source, path=args.input, user_col=args.user_col, item_col=args.item_col,
                      time_col=args.time_col, rating_col=args.rating_col, synthetic=synthetic)
    options = PrepareOptions(min_rating=args.min_rating, kcore=args.kcore, split=split,
                             overwrite=args.overwrite, partitions=args.partitions)
    try:
        prepare_dataset(spec, args.output, options)
    except (InputError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
