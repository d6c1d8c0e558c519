"""Unit tests for clustering/: embeddings, FAISS k-means, save/load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

import clustering.io as cluster_io
from clustering.embeddings import (ItemEmbeddings, interaction_matrix, load_item_embeddings,
                                   read_prepared_train_interactions, svd_item_embeddings)
from clustering.io import ClusterFileError, load_clusters, save_clusters
from clustering.kmeans import (cluster_interactions, cluster_items, cluster_prepared_dataset,
                               faiss_gpu_available, fill_empty_clusters)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def planted_blobs(n_per_blob=300, n_blobs=4, dim=8, spread=20.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_blobs, dim)) * spread
    labels = np.repeat(np.arange(n_blobs), n_per_blob)
    points = centers[labels] + rng.normal(size=(labels.size, dim))
    perm = rng.permutation(labels.size)  # blobs interleaved, not in contiguous blocks
    return points[perm].astype(np.float32), labels[perm]


def random_interactions(n_users=60, n_items=40, per_user=6, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, per_user + 1, size=n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, n_items, size=indptr[-1]).astype(np.int64)
    return indptr, indices, n_items


# ----------------------------------------------------------------------------
# SVD embeddings
# ----------------------------------------------------------------------------

def test_svd_embeddings_shape_dtype_and_determinism():
    indptr, indices, n_items = random_interactions()
    first = svd_item_embeddings(indptr, indices, n_items, dim=8, seed=3)
    again = svd_item_embeddings(indptr, indices, n_items, dim=8, seed=3)
    assert first.vectors.shape == (n_items, 8)
    assert first.vectors.dtype == np.float32
    np.testing.assert_array_equal(first.vectors, again.vectors)
    assert first.source["kind"] == "svd" and first.source["dim"] == 8 and first.source["seed"] == 3


def test_svd_embeddings_are_unit_rows_of_v_sqrt_s_of_the_binary_matrix():
    # Full rank: the Gram matrix of the embeddings must equal the cosine form of
    # V S Vᵀ from the exact SVD (sign-free check); every row has unit length.
    indptr, indices, n_items = random_interactions(n_users=30, n_items=12)
    dense = interaction_matrix(indptr, indices, n_items).toarray()
    assert set(np.unique(dense)) <= {0.0, 1.0}  # duplicates counted once
    _, singular, vt = np.linalg.svd(dense, full_matrices=False)
    gram = vt.T @ np.diag(singular) @ vt
    scale = np.sqrt(np.diag(gram))
    expected = gram / scale[:, None] / scale[None, :]
    emb = svd_item_embeddings(indptr, indices, n_items, dim=12, seed=0).vectors.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb @ emb.T, expected, atol=1e-3)


def test_svd_accepts_scipy_sparse_like_csr_arrays():
    indptr, indices, n_items = random_interactions()
    matrix = sp.csr_matrix((np.ones(indices.size), indices, indptr), shape=(indptr.size - 1, n_items))
    from_arrays = svd_item_embeddings(indptr, indices, n_items, dim=5, seed=1).vectors
    from_sparse = svd_item_embeddings(matrix.tocoo(), dim=5, seed=1).vectors
    np.testing.assert_allclose(from_arrays, from_sparse, atol=1e-5)


@pytest.mark.parametrize("dim", [0, 41, 1000])
def test_svd_dim_out_of_range_is_a_clear_error(dim):
    indptr, indices, n_items = random_interactions(n_users=60, n_items=40)
    with pytest.raises(ValueError, match="dim"):
        svd_item_embeddings(indptr, indices, n_items, dim=dim)


def test_interaction_matrix_rejects_bad_indices():
    with pytest.raises(ValueError, match="n_items"):
        interaction_matrix(np.array([0, 2]), np.array([0, 5]), 5)
    with pytest.raises(ValueError, match="user_indptr"):
        interaction_matrix(np.array([0, 3]), np.array([0, 1]), 5)


# ----------------------------------------------------------------------------
# embeddings from files
# ----------------------------------------------------------------------------

def test_load_npy(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    np.save(tmp_path / "emb.npy", vectors)
    loaded = load_item_embeddings(tmp_path / "emb.npy", n_items=10)
    np.testing.assert_array_equal(loaded.vectors, vectors)
    assert loaded.source["kind"] == "file" and len(loaded.source["sha256"]) == 64


def test_load_npy_bad_inputs_name_the_file(tmp_path):
    path = tmp_path / "emb.npy"
    np.save(path, np.ones((10, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"emb\.npy.*10 rows.*n_items=11"):
        load_item_embeddings(path, n_items=11)
    bad = np.ones((10, 4), dtype=np.float32)
    bad[3, 1] = np.nan
    np.save(path, bad)
    with pytest.raises(ValueError, match=r"emb\.npy.*NaN/inf.*\[3\]"):
        load_item_embeddings(path, n_items=10)
    np.save(path, np.ones(10, dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        load_item_embeddings(path, n_items=10)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable .npy"):
        load_item_embeddings(path, n_items=1)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_item_embeddings(tmp_path / "missing.npy", n_items=10)
    (tmp_path / "emb.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_item_embeddings(tmp_path / "emb.csv", n_items=1)


@pytest.mark.parametrize("layout", ["list", "fixed_size_list", "numeric_columns"])
def test_load_parquet_layouts_in_any_row_order(tmp_path, layout):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 3)).astype(np.float32)
    order = rng.permutation(12)  # rows shuffled on disk
    columns = {"item_idx": pa.array(order.astype(np.int32))}
    if layout == "list":
        columns["embedding"] = pa.array(list(vectors[order]), type=pa.list_(pa.float32()))
    elif layout == "fixed_size_list":
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors[order].ravel()), 3)
    else:
        for j in range(3):
            columns[f"e{j}"] = pa.array(vectors[order, j])
    pq.write_table(pa.table(columns), tmp_path / "emb.parquet")
    loaded = load_item_embeddings(tmp_path / "emb.parquet", n_items=12)
    np.testing.assert_array_equal(loaded.vectors, vectors)


def test_load_parquet_bad_inputs(tmp_path):
    path = tmp_path / "emb.parquet"

    def write(**columns):
        pq.write_table(pa.table(columns), path)

    write(item_idx=pa.array([0, 1, 2]), embedding=pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    with pytest.raises(ValueError, match=r"emb\.parquet.*3 rows.*n_items=4"):
        load_item_embeddings(path, n_items=4)
    write(item_idx=pa.array([0, 1, 1]), embedding=pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    with pytest.raises(ValueError, match="exactly 0..2"):
        load_item_embeddings(path, n_items=3)
    write(item_idx=pa.array([0, 1, 2]), embedding=pa.array([[1.0, 2.0], [3.0], [5.0, 6.0]]))
    with pytest.raises(ValueError, match="different lengths"):
        load_item_embeddings(path, n_items=3)
    write(item_idx=pa.array([0, 1, 2]), embedding=pa.array([[1.0, 2.0], [3.0, float("inf")], [5.0, 6.0]]))
    with pytest.raises(ValueError, match=r"NaN/inf.*\[1\]"):
        load_item_embeddings(path, n_items=3)
    write(item_idx=pa.array([0, 1, 2]), embedding=pa.array([[1.0, 2.0], None, [5.0, 6.0]]))
    with pytest.raises(ValueError, match="null"):
        load_item_embeddings(path, n_items=3)
    write(item=pa.array([0, 1, 2]), embedding=pa.array([[1.0], [3.0], [5.0]]))
    with pytest.raises(ValueError, match="no 'item_idx'"):
        load_item_embeddings(path, n_items=3)
    write(item_idx=pa.array([0, 1, 2]), name=pa.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="no embedding column"):
        load_item_embeddings(path, n_items=3)


# ----------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------

def test_finds_planted_clusters():
    points, labels = planted_blobs()
    result = cluster_items(points, 4, seed=0, use_gpu=False)
    assert adjusted_rand_score(labels, result.assignment) > 0.999
    assert result.backend == "faiss-cpu"
    assert result.assignment.dtype == np.int16 and result.assignment.shape == (labels.size,)
    assert result.centroids.dtype == np.float32 and result.centroids.shape == (4, 8)
    assert result.sizes.tolist() == [300, 300, 300, 300]


def test_deterministic_for_a_seed():
    points = np.random.default_rng(1).normal(size=(2000, 16)).astype(np.float32)  # no structure: init matters
    first = cluster_items(points, 10, seed=7, use_gpu=False)
    again = cluster_items(points, 10, seed=7, use_gpu=False)
    np.testing.assert_array_equal(first.assignment, again.assignment)
    np.testing.assert_array_equal(first.centroids, again.centroids)
    other = cluster_items(points, 10, seed=8, use_gpu=False)
    assert not np.array_equal(first.assignment, other.assignment)  # the seed is actually used


def test_all_points_are_used_no_subsampling():
    # 1600 points > 256 * 4: FAISS's default would train on a 1024-point sample,
    # and its centroids would then differ from the means of the full clusters.
    points, _ = planted_blobs(n_per_blob=400)
    result = cluster_items(points, 4, seed=0, niter=20, use_gpu=False)
    member_means = np.stack([points[result.assignment == c].mean(axis=0) for c in range(4)])
    np.testing.assert_allclose(result.centroids, member_means, atol=1e-4)

    # Control: the check above does catch subsampling.
    import faiss
    kmeans = faiss.Kmeans(8, 4, niter=20, seed=0)  # default max_points_per_centroid=256
    kmeans.train(points)
    _, labels = kmeans.index.search(points, 1)
    sampled_means = np.stack([points[labels[:, 0] == c].mean(axis=0) for c in range(4)])
    assert np.abs(kmeans.centroids - sampled_means).max() > 1e-3


@pytest.mark.parametrize("n_clusters", [30, 95, 100])
def test_no_empty_clusters_with_duplicate_points(n_clusters):
    # 100 items but only 5 distinct vectors: k-means must leave clusters empty.
    points = np.repeat(np.random.default_rng(0).normal(size=(5, 4)), 20, axis=0).astype(np.float32)
    result = cluster_items(points, n_clusters, seed=0, use_gpu=False)
    assert result.sizes.min() >= 1 and result.sizes.sum() == 100
    assert result.n_repaired > 0
    np.testing.assert_array_equal(result.sizes, np.bincount(result.assignment, minlength=n_clusters))
    again = cluster_items(points, n_clusters, seed=0, use_gpu=False)
    np.testing.assert_array_equal(result.assignment, again.assignment)


def test_fill_empty_clusters_moves_farthest_points_of_largest_cluster():
    points = np.array([[0.0], [1.0], [2.0], [10.0], [20.0], [21.0]], dtype=np.float32)
    assignment = np.array([0, 0, 0, 0, 1, 1])
    centroids = np.array([[3.25], [20.5], [99.0], [99.0]], dtype=np.float32)
    assert fill_empty_clusters(points, assignment, centroids) == 2
    # cluster 0 (largest) gives its farthest items: 10 (dist 6.75) then 0 (dist 3.25)
    assert assignment.tolist() == [3, 0, 0, 2, 1, 1]
    np.testing.assert_allclose(centroids[:, 0], [1.5, 20.5, 10.0, 0.0])


def test_n_clusters_out_of_range_errors():
    points = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"n_clusters=6 exceeds the number of items \(5\).*n_clusters <= 5"):
        cluster_items(points, 6)
    with pytest.raises(ValueError, match="n_clusters=0.*>= 1"):
        cluster_items(points, 0)
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_items(points, 2.5)


def test_single_cluster():
    points, _ = planted_blobs(n_per_blob=10)
    result = cluster_items(points, 1)
    assert result.assignment.tolist() == [0] * 40 and result.sizes.tolist() == [40]
    np.testing.assert_allclose(result.centroids[0], points.mean(axis=0), atol=1e-5)
    assert result.backend == "trivial"


def test_bad_embeddings_rejected():
    with pytest.raises(ValueError, match="NaN"):
        cluster_items(np.array([[0.0], [np.nan]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        cluster_items(np.zeros(4), 1)


def test_use_gpu_true_without_gpu_is_an_error():
    if faiss_gpu_available():
        pytest.skip("a FAISS GPU is available here")
    with pytest.raises(RuntimeError, match="use_gpu=True"):
        cluster_items(np.zeros((4, 2), dtype=np.float32) + np.arange(4)[:, None], 2, use_gpu=True)


@pytest.mark.skipif(not faiss_gpu_available(), reason="needs faiss-gpu and a visible CUDA device")
def test_gpu_kmeans_finds_planted_clusters_and_is_deterministic():
    points, labels = planted_blobs(n_per_blob=400)
    result = cluster_items(points, 4, seed=0, use_gpu="auto")
    assert result.backend == "faiss-gpu"
    assert adjusted_rand_score(labels, result.assignment) > 0.999
    again = cluster_items(points, 4, seed=0, use_gpu=True)
    np.testing.assert_array_equal(result.assignment, again.assignment)


def test_cluster_interactions_one_call():
    indptr, indices, n_items = random_interactions()
    result = cluster_interactions(indptr, indices, n_items, n_clusters=4, dim=8, seed=0, use_gpu=False)
    assert result.n_items == n_items and result.sizes.min() >= 1
    assert result.embedding_source["kind"] == "svd"


def write_prepared_dataset(root: Path, indptr, indices, n_items):
    (root / "users").mkdir(parents=True)
    n_users = indptr.size - 1
    lists = [indices[indptr[u]:indptr[u + 1]].astype(np.int32) for u in range(n_users)]
    half = n_users // 2  # two files, second written first in user order to test sorting
    for name, users in (("part-1.parquet", range(half, n_users)), ("part-0.parquet", range(half))):
        pq.write_table(pa.table({"user_idx": pa.array(list(users), type=pa.int32()),
                                 "train_items": pa.array([lists[u] for u in users], type=pa.list_(pa.int32()))}),
                       root / "users" / name)
    (root / "meta.json").write_text(json.dumps({"n_items": n_items}))


def test_cluster_prepared_dataset(tmp_path):
    indptr, indices, n_items = random_interactions()
    write_prepared_dataset(tmp_path, indptr, indices, n_items)
    got_indptr, got_indices, got_n_items = read_prepared_train_interactions(tmp_path)
    np.testing.assert_array_equal(got_indptr, indptr)
    np.testing.assert_array_equal(got_indices, indices)
    assert got_n_items == n_items

    from_svd = cluster_prepared_dataset(tmp_path, 3, dim=6, seed=0, use_gpu=False)
    assert from_svd.embedding_source["dim"] == 6 and from_svd.sizes.sum() == n_items
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(n_items, 5)).astype(np.float32))
    from_file = cluster_prepared_dataset(tmp_path, 3, embedding_path=tmp_path / "emb.npy", use_gpu=False)
    assert from_file.embedding_source["kind"] == "file" and from_file.centroids.shape == (3, 5)


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED_DATA / "ml-1m_clean" / "item_emb.npy").is_file(),
                    reason="../shared/data/ml-1m_clean/item_emb.npy absent")
def test_shared_ml1m_item_embeddings_two_clusters():
    path = SHARED_DATA / "ml-1m_clean" / "item_emb.npy"
    n_items = np.load(path, mmap_mode="r").shape[0]
    embeddings = load_item_embeddings(path, n_items)
    result = cluster_items(embeddings, 2, seed=0, use_gpu=False)
    assert result.n_items == n_items and result.sizes.min() >= 1
    assert result.embedding_source["sha256"] == embeddings.source["sha256"]
    again = cluster_items(embeddings, 2, seed=0, use_gpu=False)
    np.testing.assert_array_equal(result.assignment, again.assignment)


# ----------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------

@pytest.fixture
def small_result():
    points, _ = planted_blobs(n_per_blob=20)
    return cluster_items(ItemEmbeddings(points, {"kind": "svd", "dim": 8}), 4, seed=0, use_gpu=False)


def assert_same_result(a, b):
    np.testing.assert_array_equal(a.assignment, b.assignment)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.sizes, b.sizes)
    assert (a.backend, a.seed, a.niter, a.n_repaired, a.embedding_source) == \
           (b.backend, b.seed, b.niter, b.n_repaired, b.embedding_source)
    assert a.objective == pytest.approx(b.objective)


def test_save_load_round_trip(tmp_path, small_result):
    directory = save_clusters(small_result, tmp_path / "run" / "clusters")
    table = pq.read_table(directory / "clusters.parquet")
    assert str(table.schema.field("item_idx").type) == "int32"
    assert str(table.schema.field("cluster").type) == "int16"
    meta = json.loads((directory / "clusters.json").read_text())
    assert meta["n_clusters"] == 4 and meta["sizes"] == small_result.sizes.tolist()
    assert meta["embedding_source"] == {"kind": "svd", "dim": 8}
    loaded = load_clusters(directory)
    assert_same_result(small_result, loaded)
    assert loaded.assignment.dtype == np.int16


def test_save_failure_leaves_nothing_behind(tmp_path, small_result, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cluster_io.np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_clusters(small_result, tmp_path / "clusters")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_set(tmp_path, small_result, monkeypatch):
    directory = save_clusters(small_result, tmp_path / "clusters")
    points = np.random.default_rng(5).normal(size=(80, 8)).astype(np.float32)
    newer = cluster_items(points, 3, seed=1, use_gpu=False)

    real_write = cluster_io.Path.write_text

    def broken_write(self, *args, **kwargs):
        raise OSError("interrupted")

    monkeypatch.setattr(cluster_io.Path, "write_text", broken_write)
    with pytest.raises(OSError, match="interrupted"):
        save_clusters(newer, directory)
    monkeypatch.setattr(cluster_io.Path, "write_text", real_write)
    assert [p.name for p in tmp_path.iterdir()] == ["clusters"]
    assert_same_result(small_result, load_clusters(directory))

    save_clusters(newer, directory)  # a successful overwrite replaces the set
    assert_same_result(newer, load_clusters(directory))
    assert [p.name for p in tmp_path.iterdir()] == ["clusters"]


def test_save_refuses_a_directory_with_other_files(tmp_path, small_result):
    (tmp_path / "checkpoint.pt").write_text("precious")
    with pytest.raises(FileExistsError, match="dedicated sub-directory"):
        save_clusters(small_result, tmp_path)
    assert (tmp_path / "checkpoint.pt").read_text() == "precious"


def test_load_errors(tmp_path, small_result):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clusters(tmp_path / "nowhere")
    directory = save_clusters(small_result, tmp_path / "clusters")

    (directory / "centroids.npy").unlink()
    with pytest.raises(ClusterFileError, match=r"missing \['centroids.npy'\]"):
        load_clusters(directory)

    directory = save_clusters(small_result, tmp_path / "clusters2")
    pq.write_table(pa.table({"item_idx": pa.array(np.arange(80, dtype=np.int32)),
                             "cluster": pa.array(np.zeros(80, dtype=np.int16))}), directory / "clusters.parquet")
    with pytest.raises(ClusterFileError, match="checksum"):
        load_clusters(directory)

    directory = save_clusters(small_result, tmp_path / "clusters3")
    (directory / "clusters.json").write_text("{not json")
    with pytest.raises(ClusterFileError, match="not valid JSON"):
        load_clusters(directory)
