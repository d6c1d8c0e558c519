"""Baselines through the shared protocol code; on the shared ML-1M split they
must reproduce the independent reference figures."""
import pyarrow as pa
import pytest
import torch

from models.baselines import EASE, MostPop, gram_matrix
from models.batch import HistoryBatch
from models.evaluation import evaluate


def small_users():
    return pa.table({
        "train_items": pa.array([[0, 1], [0, 2], [1, 2, 3], [0]], pa.list_(pa.int32())),
        "valid_items": pa.array([[2], [1], [0], [1]], pa.list_(pa.int32())),
        "test_items": pa.array([[3], [3], [4], [2]], pa.list_(pa.int32())),
    })


def test_mostpop_ranks_by_train_counts_and_masks_history():
    users = small_users()
    model = MostPop(users, 5)
    batch = HistoryBatch.from_lists([[0]], 5)
    # counts: item0=3, item1=2, item2=2, item3=1, item4=0; item 0 is masked
    assert model.rank_topk(batch, 4).tolist() == [[1, 2, 3, 4]]


def test_ease_closed_form_matches_definition():
    users = small_users()
    gram = gram_matrix(users, 5)
    b = EASE.fit(gram, 1.0).double()
    assert torch.allclose(b.diagonal(), torch.zeros(5, dtype=torch.float64))
    # B minimises ||X - XB||² + λ||B||² subject to diag(B)=0: the KKT condition is
    # (G + λI) B = G - diag(μ) for some μ, i.e. off-diagonal of (G+λI)B - G vanishes.
    lhs = (gram + torch.eye(5, dtype=torch.float64)) @ b - gram
    off = lhs - torch.diag(lhs.diagonal())
    assert off.abs().max() < 1e-4


@pytest.mark.shared_data
def test_ml1m_reference_figures(tmp_path, ml1m_path):
    from distributed.dataset_format import read_users
    from distributed.prepare import prepare_dataset
    from distributed.sources import SourceSpec
    prepare_dataset(SourceSpec("diffrec-npy", str(ml1m_path)), tmp_path / "ml1m")
    users = read_users(tmp_path / "ml1m")
    pop = evaluate(MostPop(users, 2810).rank_topk, users, 2810, splits=("test",))["test"]
    assert pop["recall@20"] == pytest.approx(0.0993, abs=0.002)
    # λ = 1000 is what validation recall@20 picks from the grid (bench/accuracy.py tunes it)
    ease = evaluate(EASE(users, 2810, 1000).rank_topk, users, 2810, splits=("test",))["test"]
    assert ease["recall@20"] == pytest.approx(0.1816, abs=0.002)
    assert ease["ndcg@20"] == pytest.approx(0.1165, abs=0.002)
