"""Save / load a ClusterResult as a directory (DESIGN.md §3 "Clusters").

    <directory>/clusters.parquet   item_idx:int32, cluster:int16 (sorted by item_idx)
    <directory>/centroids.npy      float32 (C, d)
    <directory>/clusters.json      n_items, n_clusters, seed, backend, sizes,
                                   embedding source, sha256 of the two files

The directory is built under a temporary name in the same parent and renamed
into place, so readers see either the old complete set or the new one, never
a mix. It must be dedicated to the clusters (e.g. `<run>/clusters`): saving
refuses to replace a directory holding anything else.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from clustering.embeddings import file_sha256
from clustering.kmeans import BACKENDS, ClusterResult

FORMAT_VERSION = 1
ASSIGNMENT_FILE = "clusters.parquet"
CENTROIDS_FILE = "centroids.npy"
META_FILE = "clusters.json"
_OWN_FILES = {ASSIGNMENT_FILE, CENTROIDS_FILE, META_FILE}


class ClusterFileError(ValueError):
    """A saved cluster directory is missing, incomplete or inconsistent."""


def save_clusters(result: ClusterResult, directory: str | Path) -> Path:
    """Write `result` to `directory` atomically; returns the directory path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not a directory; choose another cluster directory")
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in _OWN_FILES)
        if foreign:
            raise FileExistsError(f"{directory} holds files that are not clusters ({foreign[:5]}); "
                                  f"save clusters into a dedicated sub-directory such as {directory / 'clusters'}")
    directory.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        table = pa.table({
            "item_idx": pa.array(np.arange(result.n_items, dtype=np.int32)),
            "cluster": pa.array(np.asarray(result.assignment, dtype=np.int16)),
        })
        pq.write_table(table, staging / ASSIGNMENT_FILE)
        np.save(staging / CENTROIDS_FILE, np.asarray(result.centroids, dtype=np.float32))
        meta = {
            "format_version": FORMAT_VERSION,
            "n_items": result.n_items,
            "n_clusters": result.n_clusters,
            "dim": int(result.centroids.shape[1]),
            "seed": result.seed,
            "niter": result.niter,
            "backend": result.backend,
            "objective": result.objective,
            "n_repaired": result.n_repaired,
            "sizes": [int(s) for s in result.sizes],
            "embedding_source": result.embedding_source,
            "sha256": {name: file_sha256(staging / name) for name in (ASSIGNMENT_FILE, CENTROIDS_FILE)},
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        _fsync_dir_files(staging)
        _swap_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _fsync_dir_files(directory: Path) -> None:
    # Data on disk before the rename makes it visible (crash-safe, not only exception-safe).
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _swap_into_place(staging: Path, directory: Path) -> None:
    """Rename `staging` to `directory`; an existing old set is moved aside first.

    os.replace cannot overwrite a non-empty directory, so replacing is two
    renames; the old set is deleted only after the new one is in place.
    """
    if not directory.exists():
        os.replace(staging, directory)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    os.rmdir(retired)  # only the unique name is wanted
    os.replace(directory, retired)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(retired, directory)  # put the old set back
        raise
    shutil.rmtree(retired, ignore_errors=True)


def load_clusters(directory: str | Path) -> ClusterResult:
    """Read a directory written by `save_clusters`, validating every file."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"cluster directory {directory} does not exist; run the clustering step first")
    missing = sorted(name for name in _OWN_FILES if not (directory / name).is_file())
    if missing:
        raise ClusterFileError(f"cluster directory {directory} is incomplete (missing {missing}); "
                               f"re-run the clustering step")
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ClusterFileError(f"{directory / META_FILE} is not valid JSON ({exc}); re-run the clustering step") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ClusterFileError(f"{directory / META_FILE}: unsupported format_version "
                               f"{meta.get('format_version')!r} (expected {FORMAT_VERSION})")
    for name, expected in meta.get("sha256", {}).items():
        if file_sha256(directory / name) != expected:
            raise ClusterFileError(f"{directory / name} does not match the checksum in {META_FILE} "
                                   f"(modified or corrupt); re-run the clustering step")

    try:
        table = pq.read_table(directory / ASSIGNMENT_FILE)
        centroids = np.load(directory / CENTROIDS_FILE, allow_pickle=False)
    except Exception as exc:
        raise ClusterFileError(f"cannot read cluster files in {directory} ({exc}); re-run the clustering step") from exc

    n_items, n_clusters = int(meta["n_items"]), int(meta["n_clusters"])
    schema = {f.name: str(f.type) for f in table.schema}
    if schema.get("item_idx") != "int32" or schema.get("cluster") != "int16":
        raise ClusterFileError(f"{directory / ASSIGNMENT_FILE} must have item_idx:int32 and cluster:int16, "
                               f"got {schema}")
    item_idx = table.column("item_idx").to_numpy()
    cluster = table.column("cluster").to_numpy()
    if item_idx.size != n_items:
        raise ClusterFileError(f"{directory / ASSIGNMENT_FILE} has {item_idx.size} rows, {META_FILE} says n_items={n_items}")
    order = np.argsort(item_idx, kind="stable")
    if not np.array_equal(item_idx[order], np.arange(n_items)):
        raise ClusterFileError(f"{directory / ASSIGNMENT_FILE}: item_idx must be exactly 0..{n_items - 1}")
    assignment = cluster[order].astype(np.int16)
    if assignment.size and (assignment.min() < 0 or assignment.max() >= n_clusters):
        raise ClusterFileError(f"{directory / ASSIGNMENT_FILE}: cluster ids outside [0, {n_clusters})")
    if centroids.ndim != 2 or centroids.shape[0] != n_clusters:
        raise ClusterFileError(f"{directory / CENTROIDS_FILE} has shape {centroids.shape}, expected ({n_clusters}, d)")
    sizes = np.bincount(assignment, minlength=n_clusters).astype(np.int64)
    if sizes.tolist() != list(meta["sizes"]):
        raise ClusterFileError(f"cluster sizes in {directory / ASSIGNMENT_FILE} disagree with {META_FILE}")
    if sizes.size and sizes.min() < 1:
        raise ClusterFileError(f"{directory / ASSIGNMENT_FILE}: clusters {np.flatnonzero(sizes == 0)[:5].tolist()} "
                               f"are empty; re-run the clustering step")
    if meta["backend"] not in BACKENDS:
        raise ClusterFileError(f"{directory / META_FILE}: unknown backend {meta['backend']!r}")

    return ClusterResult(
        assignment=assignment,
        centroids=np.ascontiguousarray(centroids, dtype=np.float32),
        sizes=sizes,
        backend=meta["backend"],
        seed=int(meta["seed"]),
        niter=int(meta["niter"]),
        objective=float(meta["objective"]),
        n_repaired=int(meta["n_repaired"]),
        embedding_source=dict(meta.get("embedding_source", {})),
    )
