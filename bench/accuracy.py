"""Accuracy table: baselines (and, once trained, the diffusion models) on a
prepared dataset, by the project's own metric code.

    python bench/accuracy.py --data DIR --models ease,mostpop[,ease-tw,diffrec,...] [--json PATH]

ease-tw is EASE fitted on binary interactions but scoring the time-weighted
history (w_min 0.1 → w_max 1.0, as T-DiffRec weights its input).

Prints validation and test metrics (test protocol: input = train items,
mask = train + valid, targets = test) and writes
``{"<model>": {"test": {...}, "valid": {...}}}`` to --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.dataset_format import read_meta, read_users  # noqa: E402
from models.baselines import MostPop, tune_ease  # noqa: E402
from models.evaluation import evaluate  # noqa: E402

BASELINES = ("mostpop", "ease", "ease-tw")
EASE_TW = (0.1, 1.0)   # ease-tw: binary fit, history weighted w_min → w_max as T-DiffRec's input
SHOWN = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def run_baseline(name: str, users, n_items: int) -> dict:
    if name == "mostpop":
        model = MostPop(users, n_items)
        extra = {}
    else:
        w_min, w_max = EASE_TW if name == "ease-tw" else (None, None)
        model, by_lambda = tune_ease(users, n_items, w_min=w_min, w_max=w_max)
        extra = {"lambda": model.lam, "valid_recall@20_by_lambda": {str(k): v["recall@20"]
                                                                    for k, v in by_lambda.items()}}
    return {**evaluate(model.rank_topk, users, n_items), **extra}


def print_table(results: dict) -> None:
    header = f"{'model':<12}" + "".join(f"{'test ' + m:>16}" for m in SHOWN) + f"{'valid recall@20':>17}{'wall s':>8}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<12}" + "".join(f"{r['test'][m]:>16.4f}" for m in SHOWN)
              + f"{r['valid']['recall@20']:>17.4f}{r.get('wall_s', 0):>8.1f}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--models", default="mostpop,ease")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    meta = read_meta(args.data)
    users = read_users(args.data)
    n_items = meta["n_items"]
    results = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.time()
        if name in BASELINES:
            results[name] = run_baseline(name, users, n_items)
        else:
            from bench.accuracy_models import run_model   # diffusion models: trained with the presets
            results[name] = run_model(name, args.data)
        results[name]["wall_s"] = round(time.time() - t0, 1)
        print(f"{name}: test recall@20={results[name]['test']['recall@20']:.4f} "
              f"ndcg@20={results[name]['test']['ndcg@20']:.4f} ({results[name]['wall_s']}s)", flush=True)
    print()
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
