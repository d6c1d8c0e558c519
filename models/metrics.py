"""Full-ranking top-K metrics (DESIGN.md §6), vectorised over a batch of users.

Protocol: every item is a candidate; items of the user's input history are
masked before ranking; per user

- recall@K    = hits@K / |targets|             (not capped at K)
- ndcg@K      = DCG@K / IDCG over min(|targets|, K) positions, gain 1/log2(rank+1)
- precision@K = hits@K / K
- mrr@K       = 1 / rank of the first hit within K, else 0

averaged over the users that have targets (the others are counted, not scored).

Targets are passed as CSR (``indptr``, ``indices``) so a batch never needs a
dense users x items matrix. Sums (not means) are accumulated so that workers
can all-reduce them and divide once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_KS = (10, 20, 50, 100)
METRIC_NAMES = ("recall", "ndcg", "precision", "mrr")


def metric_keys(ks=DEFAULT_KS) -> list[str]:
    """Lower-case names used everywhere: ``recall@20``, ``ndcg@20``, ..."""
    return [f"{name}@{k}" for k in ks for name in METRIC_NAMES]


def topk(scores: torch.Tensor, k: int, item_ids: torch.Tensor | None = None):
    """Top-``k`` of each row as (values, item ids), best first.

    Among equal scores the lower item id ranks first, so a ranking does not
    depend on batch composition or worker count. Masked entries should be
    ``-inf``; rows with fewer than ``k`` finite scores get ``-1`` ids at the end.
    """
    k = min(k, scores.shape[1])
    if item_ids is None:
        item_ids = torch.arange(scores.shape[1], device=scores.device)
    return _topk_by_score_then_id(scores, k, item_ids)


def _topk_by_score_then_id(scores: torch.Tensor, k: int, item_ids: torch.Tensor):
    """``torch.topk`` picks arbitrarily among scores tied with the k-th; the rows
    where such a tie crosses the cut (rare with float scores) are redone to keep
    the lowest ids. ``item_ids``: one id per column ``(N,)`` or per entry ``(B, N)``."""
    values, pos = torch.topk(scores, k, dim=1)
    ids = item_ids[pos] if item_ids.dim() == 1 else item_ids.gather(1, pos)
    if k == 0:
        return _order(values, ids)
    kth = values[:, -1:]
    inside = (values == kth).sum(1)                     # tied slots are the last ones
    crossing = ((scores == kth).sum(1) > inside) & torch.isfinite(kth[:, 0])
    bad = crossing.nonzero().flatten()
    if bad.numel():
        tied_ids = torch.where(scores[bad] == kth[bad], item_ids if item_ids.dim() == 1 else item_ids[bad],
                               torch.iinfo(ids.dtype).max)
        lowest = torch.topk(tied_ids, int(inside[bad].max()), dim=1, largest=False).values
        slot = torch.arange(k, device=ids.device) - (k - inside[bad])[:, None]
        ids[bad] = torch.where(slot >= 0, lowest.gather(1, slot.clamp(min=0)),
                               ids[bad])
    return _order(values, ids)


def _order(values: torch.Tensor, ids: torch.Tensor):
    # Two stable sorts = lexicographic (-score, id) order; -inf slots become id -1.
    by_id = torch.argsort(ids, dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.argsort(values, dim=1, descending=True, stable=True)
    values, ids = values.gather(1, by_score), ids.gather(1, by_score)
    ids = torch.where(torch.isneginf(values), torch.full_like(ids, -1), ids)
    return values, ids


def merge_topk(values: list[torch.Tensor], ids: list[torch.Tensor], k: int):
    """Merge per-cluster candidate lists (each ``(B, k_c)`` with global item ids)
    into the global top-``k``. Equal to a top-``k`` over the whole catalog when
    every list holds its cluster's own top-``k``."""
    all_values = torch.cat([v.to(values[0].device) for v in values], dim=1)
    all_ids = torch.cat([i.to(values[0].device) for i in ids], dim=1)
    k = min(k, all_values.shape[1])
    return _topk_by_score_then_id(all_values, k, all_ids)


def hit_matrix(ranked_ids: torch.Tensor, target_indptr: torch.Tensor,
               target_indices: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, K)``: is ``ranked_ids[u, r]`` one of user ``u``'s targets?

    Works on (row, item) keys with one sort and one binary search, so its cost
    follows B*K + |targets|, never B x n_items.
    """
    device = ranked_ids.device
    n_rows = ranked_ids.shape[0]
    counts = target_indptr[1:] - target_indptr[:-1]
    if target_indices.numel() == 0:
        return torch.zeros_like(ranked_ids, dtype=torch.bool)
    span = int(max(int(target_indices.max()), int(ranked_ids.max()))) + 1
    rows = torch.repeat_interleave(torch.arange(n_rows, device=device), counts.to(device))
    target_keys = torch.sort(rows * span + target_indices.to(device).long()).values
    query = torch.arange(n_rows, device=device)[:, None] * span + ranked_ids.long()
    pos = torch.searchsorted(target_keys, query).clamp(max=target_keys.numel() - 1)
    return (target_keys[pos] == query) & (ranked_ids >= 0)


@dataclass
class RankingMetrics:
    """Running sums of the ranking metrics; ``result()`` gives the averages.

    ``as_tensor``/``from_tensor`` give a flat float64 vector so several workers
    can ``all_reduce(SUM)`` their sums and get exactly the single-worker answer.
    """

    ks: tuple[int, ...] = DEFAULT_KS
    sums: dict[str, float] = field(default_factory=dict)
    n_users: int = 0                 # users with at least one target
    n_users_without_targets: int = 0

    def __post_init__(self):
        self.ks = tuple(sorted(int(k) for k in self.ks))
        for key in metric_keys(self.ks):
            self.sums.setdefault(key, 0.0)

    def update(self, ranked_ids: torch.Tensor, target_indptr: torch.Tensor,
               target_indices: torch.Tensor) -> None:
        """Add one batch: ``ranked_ids`` is ``(B, >= max(ks))``, best first."""
        max_k = max(self.ks)
        if ranked_ids.shape[1] < max_k:
            raise ValueError(f"ranked lists have {ranked_ids.shape[1]} items; "
                             f"metrics up to @{max_k} need at least that many")
        ranked_ids = ranked_ids[:, :max_k]
        n_targets = (target_indptr[1:] - target_indptr[:-1]).to(ranked_ids.device).double()
        has = n_targets > 0
        self.n_users += int(has.sum())
        self.n_users_without_targets += int((~has).sum())
        if not bool(has.any()):
            return
        hits = hit_matrix(ranked_ids, target_indptr, target_indices)[has].double()
        n_targets = n_targets[has]
        ranks = torch.arange(1, max_k + 1, device=hits.device, dtype=torch.float64)
        gains = 1.0 / torch.log2(ranks + 1.0)
        cum_hits = hits.cumsum(1)
        cum_dcg = (hits * gains).cumsum(1)
        ideal = gains.cumsum(0)
        first_hit = torch.where(hits.any(1), hits.argmax(1) + 1, torch.full_like(n_targets, 0, dtype=torch.long))
        for k in self.ks:
            h = cum_hits[:, k - 1]
            idcg = ideal[(n_targets.clamp(max=k) - 1).long()]
            rr = torch.where((first_hit > 0) & (first_hit <= k), 1.0 / first_hit.clamp(min=1).double(),
                             torch.zeros_like(h))
            self.sums[f"recall@{k}"] += float((h / n_targets).sum())
            self.sums[f"ndcg@{k}"] += float((cum_dcg[:, k - 1] / idcg).sum())
            self.sums[f"precision@{k}"] += float((h / k).sum())
            self.sums[f"mrr@{k}"] += float(rr.sum())

    def result(self) -> dict[str, float]:
        n = max(self.n_users, 1)
        return {key: self.sums[key] / n for key in metric_keys(self.ks)}

    def as_tensor(self) -> torch.Tensor:
        keys = metric_keys(self.ks)
        return torch.tensor([self.sums[k] for k in keys] +
                            [self.n_users, self.n_users_without_targets], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, vec: torch.Tensor, ks=DEFAULT_KS) -> "RankingMetrics":
        out = cls(ks=ks)
        keys = metric_keys(out.ks)
        vals = vec.detach().cpu().double().tolist()
        out.sums = dict(zip(keys, vals[:len(keys)]))
        out.n_users, out.n_users_without_targets = int(round(vals[-2])), int(round(vals[-1]))
        return out


def csr_from_lists(lists) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR (indptr, indices) from a pyarrow ListArray / ChunkedArray or a list of
    sequences. Vectorised for Arrow input (the hot path)."""
    import numpy as np
    import pyarrow as pa

    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    if isinstance(lists, (pa.ListArray, pa.LargeListArray)):
        offsets = lists.offsets.to_numpy().astype(np.int64)
        values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
        values = values[offsets[0]:offsets[-1]]
        offsets = offsets - offsets[0]
        return torch.from_numpy(offsets), torch.from_numpy(values)
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if len(lists) else np.zeros(0, np.int64)
    return torch.from_numpy(indptr), torch.from_numpy(flat.astype(np.int64))
