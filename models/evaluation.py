"""The evaluation protocol (DESIGN.md §6) over a table of user histories.

A model is evaluated through one function, ``rank_topk(batch, k) -> ids``: it
ranks the full catalog for each user of ``batch`` with the batch's own items
masked and returns the best ``k`` item ids per user (``-1`` padding allowed).

Validation and test share one scoring pass when their input is the same
(train items): the model ranks ``max_k + |valid items|`` candidates with the
train items masked; validation reads the first ``max_k``; test removes the
valid items from the same list and reads the first ``max_k`` — exactly the
ranking with train + valid masked.
"""
from __future__ import annotations

from typing import Callable, Iterable

import pyarrow as pa
import torch

from models.batch import HistoryBatch
from models.metrics import DEFAULT_KS, RankingMetrics, csr_from_lists, hit_matrix

RankFn = Callable[[HistoryBatch, int], torch.Tensor]

TEST_INPUT_TRAIN = "train"               # the paper's protocol (default)
TEST_INPUT_TRAIN_VALID = "train+valid"   # test with train + valid as input: a different protocol


def drop_items(ranked: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Remove each row's listed items from its ranking, keeping the order;
    freed slots at the end become -1."""
    remove = hit_matrix(ranked, indptr, indices)
    order = torch.argsort(remove.to(torch.int8), dim=1, stable=True)
    out = ranked.gather(1, order)
    n_keep = (~remove).sum(1, keepdim=True)
    slots = torch.arange(ranked.shape[1], device=ranked.device)[None, :]
    return torch.where(slots < n_keep, out, torch.full_like(out, -1))


def iter_batches(users: pa.Table, batch_size: int) -> Iterable[pa.Table]:
    for start in range(0, users.num_rows, batch_size):
        yield users.slice(start, batch_size)


def evaluate_batch(rank_topk: RankFn, train: HistoryBatch, valid, test, metrics: dict[str, RankingMetrics],
                   test_input: str = TEST_INPUT_TRAIN) -> None:
    """Score one batch of users and add it to ``metrics`` (keys among 'valid',
    'test'). ``train`` is the input history; ``valid`` and ``test`` are CSR
    ``(indptr, indices)`` targets on the same device. Works on any slice of
    users, so each worker evaluates its own shard and all-reduces the sums."""
    max_k = max(max(m.ks) for m in metrics.values())
    n_items = train.n_items
    v_ptr, v_idx = valid
    t_ptr, t_idx = test
    need_test = "test" in metrics
    if test_input == TEST_INPUT_TRAIN or not need_test:
        extra = int((v_ptr[1:] - v_ptr[:-1]).max()) if need_test and train.size else 0
        ranked = rank_topk(train, min(max_k + extra, n_items))
        if "valid" in metrics:
            metrics["valid"].update(_pad(ranked[:, :max_k], max_k), v_ptr, v_idx)
        if need_test:
            metrics["test"].update(_pad(drop_items(ranked, v_ptr, v_idx)[:, :max_k], max_k), t_ptr, t_idx)
        return
    if "valid" in metrics:
        metrics["valid"].update(_pad(rank_topk(train, min(max_k, n_items)), max_k), v_ptr, v_idx)
    both = concat_histories(train, v_ptr, v_idx)
    metrics["test"].update(_pad(rank_topk(both, min(max_k, n_items)), max_k), t_ptr, t_idx)


def concat_histories(train: HistoryBatch, ptr: torch.Tensor, idx: torch.Tensor) -> HistoryBatch:
    """Row-wise train + other items (e.g. valid), train first."""
    la, lb = train.lengths, ptr[1:] - ptr[:-1]
    device = train.items.device
    rows = torch.cat([torch.repeat_interleave(torch.arange(len(la), device=device), la),
                      torch.repeat_interleave(torch.arange(len(lb), device=device), lb)])
    order = torch.argsort(rows, stable=True)
    items = torch.cat([train.items, idx.to(device)])[order]
    indptr = torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.cumsum(la + lb, 0)])
    return HistoryBatch(indptr, items, train.n_items)


def table_batch(batch: pa.Table, n_items: int, device="cpu"):
    """(train HistoryBatch, valid CSR, test CSR) of a table of user rows."""
    train = HistoryBatch.from_lists(batch["train_items"], n_items).to(device)
    valid = tuple(t.to(device) for t in csr_from_lists(batch["valid_items"]))
    test = tuple(t.to(device) for t in csr_from_lists(batch["test_items"]))
    return train, valid, test


def _pad(ranked: torch.Tensor, k: int) -> torch.Tensor:
    if ranked.shape[1] >= k:
        return ranked[:, :k]
    pad = torch.full((ranked.shape[0], k - ranked.shape[1]), -1, dtype=ranked.dtype, device=ranked.device)
    return torch.cat([ranked, pad], dim=1)


@torch.no_grad()
def evaluate(rank_topk: RankFn, users: pa.Table, n_items: int, splits=("valid", "test"),
             ks=DEFAULT_KS, batch_size: int = 1024, test_input: str = TEST_INPUT_TRAIN,
             device="cpu") -> dict[str, dict[str, float]]:
    """Metrics per split, e.g. ``{"valid": {"recall@20": ...}, "test": {...}}``."""
    metrics = {s: RankingMetrics(ks=ks) for s in splits}
    for batch in iter_batches(users, batch_size):
        evaluate_batch(rank_topk, *table_batch(batch, n_items, device), metrics, test_input)
    return {s: m.result() for s, m in metrics.items()}


def rank_dense(scores: torch.Tensor, batch: HistoryBatch, k: int) -> torch.Tensor:
    """Top-k ids from a dense ``(B, n_items)`` score matrix with the batch's
    own items masked (for models whose scores fit one batch)."""
    from models.metrics import topk
    scores = scores.clone()
    scores[batch.rows, batch.items] = float("-inf")
    return topk(scores, k)[1]
