"""FAISS k-means over item embeddings -> item->cluster assignment.

`cluster_items` runs FAISS k-means on every item (no subsampling), on a GPU
when the installed FAISS has GPU support and a GPU is visible, on the CPU
otherwise, then repairs empty clusters so every cluster owns >= 1 item (an
L-DiffRec cluster with zero items would have a zero-width encoder).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from clustering.embeddings import (DEFAULT_SVD_DIM, ItemEmbeddings, load_item_embeddings,
                                   read_prepared_n_items, read_prepared_train_interactions,
                                   svd_item_embeddings)

MAX_CLUSTERS = int(np.iinfo(np.int16).max)  # assignment is stored as int16
BACKENDS = ("faiss-gpu", "faiss-cpu", "trivial")  # "trivial": n_clusters=1, no k-means run
_SEARCH_CHUNK = 1 << 20  # rows per assignment search / distance chunk: bounds temp memory

UseGpu = Union[bool, Literal["auto"]]


@dataclass(frozen=True)
class ClusterResult:
    """Item->cluster assignment and what produced it.

    assignment: int16 (n_items,), assignment[item_idx] = cluster id in [0, C).
    centroids:  float32 (C, d).
    sizes:      int64 (C,), items per cluster, all >= 1.
    backend:    "faiss-gpu" | "faiss-cpu" | "trivial" (C = 1).
    objective:  sum of squared distances of items to their centroid.
    n_repaired: clusters that came out of k-means empty and were refilled.
    """

    assignment: np.ndarray
    centroids: np.ndarray
    sizes: np.ndarray
    backend: str
    seed: int
    niter: int
    objective: float
    n_repaired: int = 0
    embedding_source: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.assignment.shape[0])

    def items_of(self, cluster: int) -> np.ndarray:
        """item_idx of one cluster, ascending."""
        return np.flatnonzero(self.assignment == cluster)


# ----------------------------------------------------------------------------
# backend choice
# ----------------------------------------------------------------------------

def faiss_gpu_available() -> bool:
    """True when the installed FAISS is a GPU build and it sees a CUDA device.

    faiss.get_num_gpus() asks CUDA, so it honours CUDA_VISIBLE_DEVICES (what
    Ray sets per worker); CPU builds return 0.
    """
    import faiss
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve_use_gpu(use_gpu: UseGpu) -> bool:
    if use_gpu == "auto":
        return faiss_gpu_available()
    if use_gpu is True:
        if not faiss_gpu_available():
            raise RuntimeError("use_gpu=True but FAISS has no usable GPU (CPU-only faiss build or no "
                               "visible CUDA device); install faiss-gpu or pass use_gpu='auto'/False")
        return True
    if use_gpu is False:
        return False
    raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")


# ----------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------

def cluster_items(embeddings: np.ndarray | ItemEmbeddings, n_clusters: int, seed: int = 0,
                  niter: int = 25, use_gpu: UseGpu = "auto", init: str = "kmeans++",
                  nredo: int = 1) -> ClusterResult:
    """k-means of the item embeddings into `n_clusters` non-empty clusters.

    Deterministic for a seed on a given backend. `init` is "kmeans++"
    (default: finds well-separated groups reliably) or "random" (FAISS's
    classic init: cheaper for very large C).
    """
    source: dict[str, Any] = {}
    if isinstance(embeddings, ItemEmbeddings):
        source = dict(embeddings.source)
        embeddings = embeddings.vectors
    points = _validated_points(embeddings)
    n_points, dim = points.shape
    n_clusters = _validated_n_clusters(n_clusters, n_points)
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")

    if n_clusters == 1:  # nothing to cluster: skip FAISS entirely
        assignment = np.zeros(n_points, dtype=np.int64)
        centroids = points.astype(np.float64).mean(axis=0, keepdims=True).astype(np.float32)
        backend = "trivial"
    else:
        on_gpu = _resolve_use_gpu(use_gpu)
        backend = "faiss-gpu" if on_gpu else "faiss-cpu"
        centroids, assignment = _faiss_kmeans(points, n_clusters, seed=seed, niter=niter,
                                              on_gpu=on_gpu, init=init, nredo=nredo)

    n_repaired = fill_empty_clusters(points, assignment, centroids)
    sizes = np.bincount(assignment, minlength=n_clusters).astype(np.int64)
    return ClusterResult(
        assignment=assignment.astype(np.int16),
        centroids=np.ascontiguousarray(centroids, dtype=np.float32),
        sizes=sizes,
        backend=backend,
        seed=int(seed),
        niter=int(niter),
        objective=_sum_squared_distances(points, assignment, centroids),
        n_repaired=n_repaired,
        embedding_source=source,
    )


def _validated_points(embeddings) -> np.ndarray:
    points = np.ascontiguousarray(embeddings, dtype=np.float32)
    if points.ndim != 2 or points.shape[0] < 1 or points.shape[1] < 1:
        raise ValueError(f"embeddings must be a non-empty 2-D array (n_items, d), got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("embeddings contain NaN or inf; fix the embedding source before clustering")
    return points


def _validated_n_clusters(n_clusters, n_items: int) -> int:
    if isinstance(n_clusters, bool) or int(n_clusters) != n_clusters:
        raise ValueError(f"n_clusters must be an integer, got {n_clusters!r}")
    n_clusters = int(n_clusters)
    if n_clusters < 1:
        raise ValueError(f"n_clusters={n_clusters} is invalid: it must be >= 1 "
                         f"(use n_clusters=1 for a single cluster)")
    if n_clusters > n_items:
        raise ValueError(f"n_clusters={n_clusters} exceeds the number of items ({n_items}): every "
                         f"cluster needs at least one item; set n_clusters <= {n_items}")
    if n_clusters > MAX_CLUSTERS:
        raise ValueError(f"n_clusters={n_clusters} exceeds {MAX_CLUSTERS} (assignments are int16); "
                         f"lower n_clusters")
    return n_clusters


def _faiss_kmeans(points: np.ndarray, n_clusters: int, *, seed: int, niter: int, on_gpu: bool,
                  init: str, nredo: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    n_points, dim = points.shape
    params = faiss.ClusteringParameters()
    params.niter = int(niter)
    params.nredo = int(nredo)
    params.seed = int(seed)
    params.verbose = False
    # FAISS subsamples to k * max_points_per_centroid points (default 256):
    # raise the cap to ceil(n / k) so every item takes part in every iteration.
    params.max_points_per_centroid = -(-n_points // n_clusters)
    params.min_points_per_centroid = 1  # few items per cluster is fine here; silences the warning
    if init == "kmeans++":
        params.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    elif init == "random":
        params.init_method = faiss.ClusteringInitMethod_RANDOM
    else:
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")

    gpu_resources = None  # must outlive the GPU index
    if on_gpu:
        gpu_resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = 0
        index = faiss.GpuIndexFlatL2(gpu_resources, dim, config)
    else:
        index = faiss.IndexFlatL2(dim)

    clustering = faiss.Clustering(dim, n_clusters, params)
    clustering.train(points, index)
    centroids = faiss.vector_to_array(clustering.centroids).reshape(n_clusters, dim).astype(np.float32)

    # Final assignment against the final centroids (FAISS leaves them in the index).
    index.reset()
    index.add(centroids)
    assignment = np.empty(n_points, dtype=np.int64)
    for start in range(0, n_points, _SEARCH_CHUNK):
        _, nearest = index.search(points[start:start + _SEARCH_CHUNK], 1)
        assignment[start:start + _SEARCH_CHUNK] = nearest[:, 0]
    del index, gpu_resources
    return centroids, assignment


def fill_empty_clusters(points: np.ndarray, assignment: np.ndarray, centroids: np.ndarray) -> int:
    """Give every empty cluster one item, in place; returns how many were empty.

    Deterministic: empty clusters are filled in id order with the items
    farthest from the centroid of the currently largest cluster (ties: lowest
    cluster id, then lowest item_idx). A moved item becomes its new cluster's
    centroid; the donor's centroid is recomputed from what it keeps. Works
    batch-wise (many empties per donor), not item by item.
    """
    n_clusters = centroids.shape[0]
    sizes = np.bincount(assignment, minlength=n_clusters)
    empty = np.flatnonzero(sizes == 0)
    n_empty = int(empty.size)
    while empty.size:
        donor = int(np.argmax(sizes))
        members = np.flatnonzero(assignment == donor)
        distances = ((points[members] - centroids[donor]) ** 2).sum(axis=1)
        n_move = min(int(empty.size), members.size - 1)  # donor keeps >= 1 (C <= n guarantees size >= 2)
        farthest_first = np.argsort(-distances, kind="stable")
        movers, keepers = members[farthest_first[:n_move]], members[farthest_first[n_move:]]
        targets = empty[:n_move]
        assignment[movers] = targets
        centroids[targets] = points[movers]
        centroids[donor] = points[keepers].astype(np.float64).mean(axis=0)
        sizes[targets] = 1
        sizes[donor] -= n_move
        empty = empty[n_move:]
    return n_empty


def _sum_squared_distances(points: np.ndarray, assignment: np.ndarray, centroids: np.ndarray) -> float:
    total = 0.0
    for start in range(0, points.shape[0], _SEARCH_CHUNK):
        chunk = slice(start, start + _SEARCH_CHUNK)
        total += float(((points[chunk] - centroids[assignment[chunk]]) ** 2).sum(dtype=np.float64))
    return total


# ----------------------------------------------------------------------------
# one-call conveniences
# ----------------------------------------------------------------------------

def cluster_interactions(user_indptr, item_indices=None, n_items: int | None = None, *,
                         n_clusters: int, dim: int = DEFAULT_SVD_DIM, seed: int = 0, niter: int = 25,
                         use_gpu: UseGpu = "auto") -> ClusterResult:
    """SVD embeddings of the training interactions, then k-means (same seed for both)."""
    embeddings = svd_item_embeddings(user_indptr, item_indices, n_items, dim=dim, seed=seed)
    return cluster_items(embeddings, n_clusters, seed=seed, niter=niter, use_gpu=use_gpu)


def cluster_prepared_dataset(prepared_dir: str | Path, n_clusters: int, *,
                             embedding_path: str | Path | None = None, dim: int = DEFAULT_SVD_DIM,
                             seed: int = 0, niter: int = 25, use_gpu: UseGpu = "auto") -> ClusterResult:
    """Clusters for a prepared dataset directory (DESIGN.md §3).

    With `embedding_path` (.npy / .parquet) those vectors are clustered;
    otherwise SVD embeddings of the train split (`dim` components).
    """
    if embedding_path is not None:
        embeddings = load_item_embeddings(embedding_path, read_prepared_n_items(prepared_dir))
        return cluster_items(embeddings, n_clusters, seed=seed, niter=niter, use_gpu=use_gpu)
    user_indptr, item_indices, n_items = read_prepared_train_interactions(prepared_dir)
    return cluster_interactions(user_indptr, item_indices, n_items, n_clusters=n_clusters, dim=dim,
                                seed=seed, niter=niter, use_gpu=use_gpu)
