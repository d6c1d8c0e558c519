"""Hyper-parameter search for DiffRec / L-DiffRec / T-DiffRec / LT-DiffRec with Ray Tune.

    python jobs/tune_ldiffrec.py --data data/ml-1m --model ltdiffrec --samples 32
    python jobs/tune_ldiffrec.py --data DIR --space my-space.yaml --metric recall@20 epochs=30 \\
        'model.steps={choice: [20, 40]}' lr_denoiser=5e-4
    ray job submit --working-dir . -- python jobs/tune_ldiffrec.py --data /shared/data/shop \\
        --storage s3://bucket/tune --name shop-lt --workers 2 --gpus-per-worker 1

Each trial runs the project's TorchTrainer (Train V2: a per-trial driver function
calling fit(); metrics reach Tune through Ray Train's TuneReportCallback). ASHA stops
weak trials early on valid/<metric>; Optuna's TPE is used when `optuna` is installed,
random search otherwise. key=value fixes a setting (steps=20) or, with a distribution
as value, replaces its search range ('lr={log: [1e-4, 1e-2]}').

Writes under <storage>/<name>/: best_config.yaml (a preset: python jobs/train_ldiffrec.py
--config best_config.yaml), trials.csv, metric_vs_params.png, metric_over_epochs.png,
summary.json, and per trial: TensorBoard events, trial_config.yaml, train/ (checkpoints).
Re-running with the same --name and --storage continues an interrupted search.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distributed.dataset_format import DatasetError  # noqa: E402
from distributed.tune import SearchOptions, run_search  # noqa: E402
from models.config import VARIANTS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--model", choices=VARIANTS, default=None, help="variant (default: the space file's)")
    p.add_argument("--space", default=None, help="search-space YAML (default: jobs/configs/tune-space.yaml)")
    p.add_argument("--config", default=None, help="base preset the trials start from (default: the space's base:)")
    p.add_argument("--samples", type=int, default=None, help="number of trials (default: the space's samples:)")
    p.add_argument("--metric", choices=("ndcg@20", "recall@20"), default=None,
                   help="validation metric for ASHA and the ranking (default: the space's metric:)")
    p.add_argument("--storage", default="runs/tune", help="local dir, shared filesystem or URI (s3://, gs://)")
    p.add_argument("--name", default=None, help="search name (same name + storage = resume)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--gpus-per-worker", type=int, default=0)
    p.add_argument("--max-concurrent", type=int, default=None, help="default: as many trials as the cluster holds")
    p.add_argument("--searcher", choices=("auto", "optuna", "random"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="searcher seed")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--reduction-factor", type=float, default=None, help="ASHA reduction factor")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop the search after this long")
    p.add_argument("overrides", nargs="*", help="key=value (fixed) or key='{dist: [...]}' (searched)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = SearchOptions(data_dir=args.data, space=args.space, variant=args.model, config=args.config,
                         samples=args.samples, metric=args.metric, storage=args.storage, name=args.name,
                         overrides=list(args.overrides), workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                         gpus_per_worker=args.gpus_per_worker, max_concurrent=args.max_concurrent,
                         searcher=args.searcher, seed=args.seed, grace_period=args.grace_period,
                         reduction_factor=args.reduction_factor, time_budget_s=args.time_budget_s)
    try:
        summary = run_search(opts)
    except (ValueError, FileNotFoundError, DatasetError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary["best"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
