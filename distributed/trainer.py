"""Launching a training run on Ray Train (the driver side).

Checks everything that can be checked before a worker starts (dataset,
config, resources), clusters the items once per run directory (reused on
resume and by Tune trials with the same C), starts the TorchTrainer, and at the
end writes the run directory's ``summary.json``, ``metrics.csv``,
``metrics.jsonl``, TensorBoard events and ``training_curves.png``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distributed.config import RunConfig
from distributed.dataset_format import read_meta, versions, write_json


@dataclass
class Resources:
    workers: int = 2
    cpus_per_worker: float | None = None    # None: leave one CPU of the cluster to Ray Data
    gpus_per_worker: int = 0
    threads_per_worker: int | None = None   # torch threads; None: this machine's cores / workers
    max_failures: int = 2                   # worker restarts (from the last checkpoint)

    def resolve(self, cluster_cpus: float) -> "Resources":
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1 (got {self.workers})")
        if self.gpus_per_worker < 0:
            raise ValueError("--gpus-per-worker must be >= 0")
        cpus = self.cpus_per_worker
        if cpus is None:
            # Workers hold fractional CPUs so Ray Data's read tasks are never starved.
            cpus = max(0.1, min(1.0, (cluster_cpus - 1.0) / self.workers))
        if cpus <= 0:
            raise ValueError("--cpus-per-worker must be > 0")
        threads = self.threads_per_worker or max(1, (os.cpu_count() or 1) // self.workers)
        return Resources(self.workers, cpus, self.gpus_per_worker, threads, self.max_failures)


def _log(msg: str) -> None:
    print(f"[train] {msg}", flush=True)


def resolve_embedding(path: str, data_dir: str, meta: dict) -> str | None:
    """``svd`` → None; a relative path is looked for in the cwd, the dataset
    directory and the prepared source's directory (e.g. the DiffRec split)."""
    if path in (None, "", "svd"):
        return None
    candidates = [Path(path), Path(data_dir) / path]
    source = (meta.get("source") or {}).get("path")
    if source:
        candidates.append(Path(source) / path)
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    raise FileNotFoundError(f"clustering.embedding={path!r} was found in none of {[str(c) for c in candidates]}; "
                            f"give a .npy/.parquet path or 'svd'")


def prepare_clusters(data_dir: str, config: RunConfig, meta: dict, run_dir: Path) -> tuple[np.ndarray, str]:
    """Cluster assignment for a latent run, computed once and kept in the run
    directory (``clusters-C<n>-<embedding>``) so resumes and trials reuse it."""
    from clustering.io import load_clusters, save_clusters
    from clustering.kmeans import cluster_prepared_dataset
    c, emb = config.model.n_clusters, config.clustering
    tag = "svd%d" % emb.svd_dim if emb.embedding in (None, "", "svd") else Path(emb.embedding).stem
    directory = run_dir / f"clusters-C{c}-{tag}-s{emb.seed}"
    if (directory / "clusters.json").exists():
        result = load_clusters(directory)
        if result.n_items == meta["n_items"]:
            return np.asarray(result.assignment, dtype=np.int64), str(directory)
    t0 = time.time()
    result = cluster_prepared_dataset(data_dir, c, embedding_path=resolve_embedding(emb.embedding, data_dir, meta),
                                      dim=emb.svd_dim, seed=emb.seed, niter=emb.niter)
    save_clusters(result, directory)
    _log(f"clustered {meta['n_items']:,} items into {c} clusters ({result.backend}, sizes "
         f"{sorted(result.sizes.tolist(), reverse=True)[:8]}{'...' if c > 8 else ''}) in {time.time() - t0:.1f}s")
    return np.asarray(result.assignment, dtype=np.int64), str(directory)


def validate_run(data_dir: str, config: RunConfig, resources: Resources) -> dict:
    """Every check that needs no worker; returns the dataset's meta."""
    meta = read_meta(data_dir)
    config.validate(meta["n_items"])
    if resources.workers > meta["n_users"]:
        raise ValueError(f"--workers {resources.workers} is more than the {meta['n_users']} users of {data_dir}; "
                         f"use at most {meta['n_users']} workers")
    return meta


def build_trainer(data_dir: str, config: RunConfig, resources: Resources, storage: str, name: str,
                  meta: dict, item_clusters=None, clusters_dir=None, **loop_extras):
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from distributed.data import AllUsersDataConfig, users_dataset
    from distributed.train_loop import train_loop_per_worker

    loop_config = {"run": config.to_dict(), "meta": meta, "data_dir": str(Path(data_dir).resolve()),
                   "gpus_per_worker": resources.gpus_per_worker, "threads": resources.threads_per_worker,
                   "item_clusters": item_clusters, "clusters_dir": clusters_dir,
                   # The cluster files travel with the config: rank 0 may run on a node that
                   # cannot see the driver's disk, and it writes them into every checkpoint.
                   "cluster_files": ({p.name: p.read_bytes() for p in Path(clusters_dir).iterdir() if p.is_file()}
                                     if clusters_dir else None),
                   **loop_extras}
    dataset = users_dataset(data_dir)
    dataset = dataset.repartition(max(8 * resources.workers, 1))   # several blocks per worker to balance shards
    resources_per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        resources_per_worker["GPU"] = resources.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpus_per_worker > 0,
                                     resources_per_worker=resources_per_worker),
        datasets={"train": dataset}, dataset_config=AllUsersDataConfig(),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints,
                                               checkpoint_score_attribute=f"valid/{config.train.select_metric}"
                                               if config.train.eval_every else "epoch",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=resources.max_failures)))


def _start(data_dir: str, config: RunConfig, resources: Resources | None):
    import ray

    from distributed.ray_env import ensure_ray
    resources = resources or Resources()
    meta = validate_run(data_dir, config, resources)
    ensure_ray()
    # Worker prints go to the console once (Ray Train would also re-log them).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return meta, resources.resolve(ray.cluster_resources().get("CPU", 1.0))


def _storage(storage: str | None) -> str:
    return storage if "://" in str(storage or "") else str(Path(storage or "runs").resolve())


def train(data_dir: str, config: RunConfig, resources: Resources | None = None, storage: str | None = None,
          name: str | None = None, kill_worker: str | None = None) -> dict:
    """Train and evaluate; returns the run summary (also ``<run dir>/summary.json``).
    Re-running with the same ``storage``/``name`` resumes from the last checkpoint.
    ``kill_worker`` ("epoch:rank:marker") is fault injection for the recovery tests."""
    meta, resources = _start(data_dir, config, resources)
    storage = _storage(storage)
    name = name or f"{config.model.variant}-{Path(data_dir).resolve().name}"
    # Run files (summary, metrics, plots, cluster cache) are written locally and, for an
    # object-store storage path, uploaded next to Ray Train's checkpoints at the end.
    run_dir = (Path("runs") if "://" in storage else Path(storage)) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    item_clusters, clusters_dir = None, None
    if config.model.is_latent:
        item_clusters, clusters_dir = prepare_clusters(data_dir, config, meta, run_dir)
    _log(f"run {run_dir}: {config.model.variant} on {data_dir} with {resources.workers} worker(s) x "
         f"{resources.cpus_per_worker:g} CPU, {resources.gpus_per_worker} GPU, {resources.threads_per_worker} threads")
    # --- start-up estimate (distributed/estimate.py): printed; what cannot fit is refused before workers start ---
    from distributed.estimate import startup_estimate
    startup_estimate(config, meta, item_clusters, resources, log=_log)
    trainer = build_trainer(data_dir, config, resources, storage, name, meta, item_clusters, clusters_dir,
                            kill_worker=kill_worker, resume_dir=newest_checkpoint(run_dir, storage))
    result = trainer.fit()
    summary = finish_run(result, config, run_dir, time.time() - started)
    publish_run_files(run_dir, storage, name)
    return summary


def newest_checkpoint(run_dir: Path, storage: str) -> str | None:
    """The newest complete checkpoint directory of a local run, the fallback resume point
    when Ray's own snapshot lacks it (object stores: Ray's snapshot only)."""
    from distributed.checkpoint import MODEL_FILE, STATE_FILE
    if "://" in storage:
        return None
    complete = [d for d in sorted(run_dir.glob("checkpoint_*"))      # timestamped names: oldest first
                if (d / MODEL_FILE).is_file() and (d / STATE_FILE).is_file()]
    return str(complete[-1].resolve()) if complete else None


def publish_run_files(run_dir: Path, storage: str, name: str) -> None:
    """Copy the driver's run files to an object-store storage path (no-op for a local path)."""
    if "://" not in storage:
        return
    import pyarrow.fs as pafs
    pafs.copy_files(str(run_dir.resolve()), f"{storage.rstrip('/')}/{name}",
                    source_filesystem=pafs.LocalFileSystem())
    _log(f"run files uploaded to {storage.rstrip('/')}/{name}")


def evaluate_checkpoint(data_dir: str, checkpoint: str, resources: Resources | None = None,
                        storage: str | None = None, name: str | None = None) -> dict:
    """Validation and test metrics of a checkpoint, computed by ``workers``
    Ray Train workers on their own users and all-reduced (no training)."""
    import uuid

    from distributed.checkpoint import (CLUSTERS_DIR, check_same_dataset, load_item_clusters,
                                        read_checkpoint_config)
    info = read_checkpoint_config(checkpoint)
    config = RunConfig.from_dict(info["config"])
    meta, resources = _start(data_dir, config, resources)
    check_same_dataset(info, meta, checkpoint)
    clusters = Path(checkpoint) / CLUSTERS_DIR
    trainer = build_trainer(data_dir, config, resources, _storage(storage), name or f"eval-{uuid.uuid4().hex[:8]}",
                            meta, load_item_clusters(checkpoint), str(clusters) if clusters.exists() else None,
                            evaluate_only=str(Path(checkpoint).resolve()))
    result = trainer.fit()
    if result.error:
        raise result.error
    return dict(result.metrics)


def _state_of(checkpoint) -> dict:
    import torch
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False)


def finish_run(result, config: RunConfig, run_dir: Path, wall_s: float) -> dict:
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training in {run_dir} reported no checkpoint")
    state = _state_of(result.checkpoint)
    history = state["history"]
    select = f"valid/{config.train.select_metric}"
    best = state["best"]
    best_path = None if best else result.checkpoint.path   # no evaluation: the last epoch
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if select in m]
    if candidates:
        best_path = max(candidates, key=lambda cm: cm[1][select])[0].path
    pick = lambda prefix: {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith(prefix)}  # noqa: E731
    evaluated = [h for h in history if "score_s" in h]
    summary = {
        "job": "train_ldiffrec", "run_dir": str(run_dir), "variant": config.model.variant,
        "epochs": state["epoch"], "best_epoch": best["epoch"] if best else None,
        "best_valid": pick("valid/") if best else None, "test": pick("test/") if best else None,
        "test_protocol": "input=train, mask=train+valid" if config.train.test_input == "train"
        else "input=train+valid, mask=train+valid",
        "wall_s": round(wall_s, 2),
        "train_s_per_epoch": round(float(np.mean([h["train_s"] for h in history])), 3),
        "score_s": round(float(np.mean([h["score_s"] for h in evaluated])), 3) if evaluated else None,
        "users_per_s": round(float(np.mean([h["users_per_s"] for h in history])), 1),
        "checkpoint": best_path, "last_checkpoint": result.checkpoint.path,
        "config": config.to_dict(), "versions": versions(),
    }
    write_metrics(run_dir, history)
    write_json(run_dir / "summary.json", summary)
    if best:
        _log(f"best epoch {best['epoch']}: valid recall@20 {best['valid/recall@20']:.4f} ndcg@20 "
             f"{best['valid/ndcg@20']:.4f} | test recall@20 {best['test/recall@20']:.4f} ndcg@20 "
             f"{best['test/ndcg@20']:.4f}")
    else:
        _log("not evaluated (train.eval_every=0): rank with jobs/score_batch.py")
    _log(f"checkpoint: {best_path}")
    _log(f"summary: {run_dir / 'summary.json'}")
    return summary


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.csv / metrics.jsonl, TensorBoard events (when tensorboard is
    installed) and a PNG of the training curves."""
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    try:
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(str(run_dir / "tensorboard")) as tb:
            for h in history:
                for k, v in h.items():
                    if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                        tb.add_scalar(k, v, h["epoch"])
    except ImportError:
        pass
    plot_curves(run_dir / "training_curves.png", history)


def plot_curves(path: Path, history: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [h["epoch"] for h in history]
    axes[0].plot(epochs, [h["loss"] for h in history], marker=".")
    axes[0].set(title="training loss", xlabel="epoch")
    ev = [h for h in history if "valid/recall@20" in h]
    for key in ("valid/recall@20", "valid/ndcg@20", "test/recall@20", "test/ndcg@20"):
        axes[1].plot([h["epoch"] for h in ev], [h[key] for h in ev], marker=".", label=key,
                     linestyle="-" if key.startswith("valid") else "--")
    axes[1].set(title="ranking metrics", xlabel="epoch")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
