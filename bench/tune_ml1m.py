"""LT-DiffRec hyper-parameter search on the shared ML-1M split (long-running; not in CI).

    python bench/tune_ml1m.py --json runs/bench/tune_ml1m.json [--samples 8] [--model tdiffrec] \\
        [--space jobs/configs/tune-space-ml1m.yaml] [--storage runs/tune] [--name ml1m-tdiffrec] \\
        [--workers 1] [key=value ...]

Prepares ../shared/data/ml-1m_clean (the DiffRec paper's split) once into runs/ml-1m-diffrec,
then runs jobs/tune_ldiffrec.py's search from the paper's preset (jobs/configs/ml-1m.yaml,
LightGCN item embeddings for the clustering) over a space narrowed around it
(jobs/configs/tune-space-ml1m.yaml: 8 trials of up to 30 epochs) with ASHA on valid Recall@20
(grace 10 epochs). Reports the best trial's validation
metrics and the test metrics *of the epoch chosen on validation* (test is never used to
choose), next to the project's EASE (λ chosen on validation) and EASE scoring the
time-weighted history (ease-tw: w_min 0.1, w_max 1.0) on the same split.
Re-running with the same --name resumes the search.
On a 2-CPU machine a 30-epoch T-DiffRec trial takes 3-5 minutes (scoring every epoch
is most of it); use a GPU cluster (--gpus-per-worker 1) for longer searches.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distributed.tune import SearchOptions, run_search  # noqa: E402

ML1M = REPO.parent / "shared" / "data" / "ml-1m_clean"
PREPARED = REPO / "runs" / "ml-1m-diffrec"


def ensure_ml1m() -> Path:
    if not (ML1M / "train_list.npy").exists():
        raise SystemExit(f"{ML1M} is absent (the shared ML-1M split is only on the team's machines)")
    if not (PREPARED / "meta.json").exists():
        from distributed.prepare import PrepareOptions, prepare_dataset
        from distributed.sources import SourceSpec
        prepare_dataset(SourceSpec("diffrec-npy", str(ML1M)), PREPARED, PrepareOptions(overwrite=True))
    return PREPARED


def ease_baselines(data: Path) -> dict:
    """Test metrics of EASE and time-weighted-history EASE, λ chosen on validation."""
    from bench.accuracy import run_baseline
    from distributed.dataset_format import read_meta, read_users
    users, n_items = read_users(str(data)), read_meta(str(data))["n_items"]
    return {name: run_baseline(name, users, n_items) for name in ("ease", "ease-tw")}


def print_comparison(model: str, best: dict, baselines: dict) -> None:
    rows = [(f"{model} (best on valid)", best.get("test_at_best_valid") or {})]
    rows += [(name, r["test"]) for name, r in baselines.items()]
    print(f"{'test metrics':<28}{'recall@20':>10}{'ndcg@20':>10}")
    for name, test in rows:
        print(f"{name:<28}" + "".join(f"{test.get(m, float('nan')):>10.4f}" for m in ("recall@20", "ndcg@20")))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="where to write the result")
    p.add_argument("--model", default="tdiffrec", choices=("diffrec", "tdiffrec", "ldiffrec", "ltdiffrec"))
    p.add_argument("--space", default=str(REPO / "jobs" / "configs" / "tune-space-ml1m.yaml"))
    p.add_argument("--samples", type=int, default=None, help="trials (default: the space file's)")
    p.add_argument("--metric", default=None, choices=("ndcg@20", "recall@20"),
                   help="validation metric for ASHA and the choice (default: the space file's, recall@20)")
    p.add_argument("--storage", default=str(REPO / "runs" / "tune"))
    p.add_argument("--name", default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=int, default=0)
    p.add_argument("--grace-period", type=int, default=None, help="ASHA grace in epochs (default: the space file's, 10)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. epochs=30 'n_clusters={choice: [1, 2, 3]}'")
    args = p.parse_args(argv)
    data = ensure_ml1m()
    baselines = ease_baselines(data)
    started = time.time()
    summary = run_search(SearchOptions(
        data_dir=str(data), space=args.space, variant=args.model,
        config=str(REPO / "jobs" / "configs" / "ml-1m.yaml"),
        samples=args.samples, metric=args.metric, storage=args.storage,
        name=args.name or f"ml1m-{args.model}", workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        grace_period=args.grace_period,
        overrides=list(args.overrides)))
    best = summary["best"] or {}
    result = {"bench": "tune_ml1m", "model": args.model, "metric": summary["metric"],
              "searcher": summary["searcher"], "trials": summary["trials"],
              "stopped_early": summary["stopped_early"], "complete": summary["complete"],
              "best_valid": best.get("valid"), "test_at_best_valid": best.get("test_at_best_valid"),
              "best_params": best.get("params"), "best_config": summary["best_config"],
              "search_dir": summary["search_dir"], "wall_s": round(time.time() - started, 1),
              "baselines": baselines}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print_comparison(args.model, best, baselines)
    if best:
        print(f"best valid {summary['metric']}: " + ", ".join(f"{k} {v:.4f}" for k, v in best["valid"].items())
              + " | its test: " + ", ".join(f"{k} {v:.4f}" for k, v in best["test_at_best_valid"].items()))
    return result


if __name__ == "__main__":
    main()
