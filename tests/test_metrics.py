"""Hand-computed checks of the metric protocol (DESIGN.md §6)."""
import math

import pyarrow as pa
import pytest
import torch

from models.evaluation import drop_items, evaluate
from models.metrics import RankingMetrics, csr_from_lists, hit_matrix, merge_topk, metric_keys, topk


def csr(lists):
    return csr_from_lists(lists)


def dcg(ranks):
    return sum(1 / math.log2(r + 1) for r in ranks)


def test_metric_names_are_lower_case():
    assert metric_keys((20,)) == ["recall@20", "ndcg@20", "precision@20", "mrr@20"]


def test_fewer_targets_than_k():
    # user 0: targets {1, 7}; ranking hits 7 at rank 2, 1 at rank 4 (of k=5)
    m = RankingMetrics(ks=(2, 5))
    ranked = torch.tensor([[3, 7, 9, 1, 4]])
    m.update(ranked, *csr([[1, 7]]))
    r = m.result()
    assert r["recall@2"] == pytest.approx(0.5)
    assert r["recall@5"] == pytest.approx(1.0)
    assert r["precision@5"] == pytest.approx(2 / 5)
    assert r["ndcg@2"] == pytest.approx(dcg([2]) / dcg([1, 2]))
    assert r["ndcg@5"] == pytest.approx(dcg([2, 4]) / dcg([1, 2]))
    assert r["mrr@2"] == pytest.approx(0.5)
    assert r["mrr@5"] == pytest.approx(0.5)


def test_more_targets_than_k_recall_not_capped():
    m = RankingMetrics(ks=(2,))
    m.update(torch.tensor([[0, 1]]), *csr([[0, 1, 2, 3]]))
    r = m.result()
    assert r["recall@2"] == pytest.approx(2 / 4)         # not capped at k
    assert r["ndcg@2"] == pytest.approx(1.0)             # IDCG over min(|targets|, k) positions
    assert r["precision@2"] == pytest.approx(1.0)


def test_users_without_targets_are_counted_not_scored():
    m = RankingMetrics(ks=(1,))
    m.update(torch.tensor([[5], [5]]), *csr([[5], []]))
    assert m.n_users == 1 and m.n_users_without_targets == 1
    assert m.result()["recall@1"] == 1.0


def test_average_over_users_and_all_reduce_round_trip():
    a, b = RankingMetrics(ks=(1,)), RankingMetrics(ks=(1,))
    a.update(torch.tensor([[1]]), *csr([[1]]))
    b.update(torch.tensor([[2]]), *csr([[3]]))
    merged = RankingMetrics.from_tensor(a.as_tensor() + b.as_tensor(), ks=(1,))
    assert merged.result()["recall@1"] == pytest.approx(0.5)
    assert merged.n_users == 2


def test_ties_break_toward_lower_item_id():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    values, ids = topk(scores, 4)
    assert ids.tolist() == [[1, 3, 0, 2]]


def lexicographic_topk(scores, k, item_ids):
    # reference: sort every entry by (-score, id), finite entries only
    out = []
    for row in scores.tolist():
        ranked = sorted((-v, int(i)) for v, i in zip(row, item_ids.tolist()) if v != float("-inf"))
        out.append([i for _, i in ranked[:k]] + [-1] * (k - len(ranked[:k])))
    return out


@pytest.mark.parametrize("k", [1, 4, 9])
def test_ties_at_the_cut_keep_the_lowest_ids(k):
    # few distinct scores: ties straddle the k-th place in most rows, and torch.topk alone
    # would keep any of the tied items
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (40, 30), generator=g).float()
    scores[torch.rand(40, 30, generator=g) < 0.2] = float("-inf")
    item_ids = torch.randperm(1000, generator=g)[:30]
    assert topk(scores, k, item_ids=item_ids)[1].tolist() == lexicographic_topk(scores, k, item_ids)
    clusters = [torch.arange(0, 30, 2), torch.arange(1, 30, 2)]
    parts = [topk(scores[:, c], k, item_ids=item_ids[c]) for c in clusters]
    _, merged = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
    assert merged.tolist() == lexicographic_topk(scores, k, item_ids)


def test_masked_items_never_ranked_and_padding():
    scores = torch.tensor([[1.0, float("-inf"), 0.5]])
    _, ids = topk(scores, 3)
    assert ids.tolist() == [[0, 2, -1]]
    m = RankingMetrics(ks=(3,))
    m.update(ids, *csr([[1]]))                          # a masked item can never be a hit
    assert m.result()["recall@3"] == 0.0


def test_merge_topk_equals_full_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 50, generator=g)
    clusters = [torch.arange(0, 50, 3), torch.arange(1, 50, 3), torch.arange(2, 50, 3)]
    parts = [topk(scores[:, c], 10, item_ids=c) for c in clusters]
    values, ids = merge_topk([p[0] for p in parts], [p[1] for p in parts], 10)
    full_values, full_ids = topk(scores, 10)
    assert torch.equal(ids, full_ids)
    assert torch.allclose(values, full_values)


def test_hit_matrix_and_drop_items():
    ranked = torch.tensor([[4, 2, 9, 1], [0, 1, 2, 3]])
    ptr, idx = csr([[9, 4], [7]])
    assert hit_matrix(ranked, ptr, idx).tolist() == [[True, False, True, False], [False] * 4]
    assert drop_items(ranked, ptr, idx).tolist() == [[2, 1, -1, -1], [0, 1, 2, 3]]


def test_shared_scoring_pass_equals_separate_masks():
    """Valid and test from one ranking equal test ranked with train+valid masked."""
    g = torch.Generator().manual_seed(1)
    n_items = 30
    weights = torch.randn(n_items, generator=g)
    users = pa.table({
        "train_items": pa.array([[0, 1, 2], [5, 6], [7]], pa.list_(pa.int32())),
        "valid_items": pa.array([[3, 4], [8], []], pa.list_(pa.int32())),
        "test_items": pa.array([[10, 11], [12, 3], [13]], pa.list_(pa.int32())),
    })

    def rank(batch, k):
        scores = weights.expand(batch.size, -1).clone()
        scores[batch.rows, batch.items] = float("-inf")
        return topk(scores, k)[1]

    shared = evaluate(rank, users, n_items, ks=(5, 10))
    # reference: test with the union masked explicitly
    ref = RankingMetrics(ks=(5, 10))
    scores = weights.expand(3, -1).clone()
    for u in range(3):
        masked = users["train_items"][u].as_py() + users["valid_items"][u].as_py()
        scores[u, masked] = float("-inf")
    ref.update(topk(scores, 10)[1], *csr(users["test_items"].to_pylist()))
    for key, value in ref.result().items():
        assert shared["test"][key] == pytest.approx(value)
