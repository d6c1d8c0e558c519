"""Reference baselines, evaluated by the same protocol code as every model.

- MostPop: rank by training popularity.
- EASE (Steck 2019): closed-form item-item model B = I − P·diag(1/diag(P)),
  P = (XᵀX + λI)⁻¹, diag(B) = 0; λ chosen on validation recall@20.
  Optionally it scores a time-weighted history (w_min → w_max, oldest → newest,
  as T-DiffRec weights its input) while still fitted on binary interactions.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from models.batch import HistoryBatch
from models.evaluation import evaluate, rank_dense
from models.metrics import csr_from_lists

EASE_LAMBDAS = (100, 200, 500, 1000, 2000, 5000)
EASE_MAX_ITEMS = 40_000   # the dense item-item matrix takes n_items² floats


class MostPop:
    def __init__(self, users: pa.Table, n_items: int):
        _, items = csr_from_lists(users["train_items"])
        self.counts = torch.bincount(items, minlength=n_items).float()

    def rank_topk(self, batch: HistoryBatch, k: int) -> torch.Tensor:
        return rank_dense(self.counts.expand(batch.size, -1), batch, k)


class EASE:
    def __init__(self, users: pa.Table, n_items: int, lam: float,
                 w_min: float | None = None, w_max: float | None = None):
        if n_items > EASE_MAX_ITEMS:
            raise ValueError(f"EASE needs an n_items x n_items matrix; {n_items:,} items is more than "
                             f"{EASE_MAX_ITEMS:,}. Use it on smaller catalogs only")
        self.lam, self.w_min, self.w_max = lam, w_min, w_max
        self.B = self.fit(gram_matrix(users, n_items), lam)

    @staticmethod
    def fit(gram: torch.Tensor, lam: float) -> torch.Tensor:
        g = gram.clone()
        g.diagonal().add_(lam)
        p = torch.linalg.inv(g)
        b = -p / p.diagonal()[None, :]
        b.diagonal().zero_()
        return b.float()

    def rank_topk(self, batch: HistoryBatch, k: int) -> torch.Tensor:
        history = batch.dense(batch.weights(self.w_min, self.w_max))
        return rank_dense(history @ self.B, batch, k)


def gram_matrix(users: pa.Table, n_items: int) -> torch.Tensor:
    """XᵀX of the binary training matrix, from the sparse rows (float64)."""
    import scipy.sparse as sp
    indptr, items = csr_from_lists(users["train_items"])
    x = sp.csr_matrix((np.ones(len(items)), items.numpy(), indptr.numpy()),
                      shape=(len(indptr) - 1, n_items))
    return torch.from_numpy((x.T @ x).toarray())


def tune_ease(users: pa.Table, n_items: int, lambdas=EASE_LAMBDAS, metric="recall@20", log=print,
              w_min: float | None = None, w_max: float | None = None):
    """EASE with λ chosen on validation ``metric``; returns (model, {λ: valid metrics}).
    ``w_min``/``w_max`` make it score the time-weighted history (fit stays binary)."""
    gram = gram_matrix(users, n_items)
    best, scores = None, {}
    for lam in lambdas:
        model = EASE.__new__(EASE)
        model.lam, model.w_min, model.w_max, model.B = lam, w_min, w_max, EASE.fit(gram, lam)
        valid = evaluate(model.rank_topk, users, n_items, splits=("valid",))["valid"]
        scores[lam] = valid
        log(f"  EASE lambda={lam:<6} valid {metric}={valid[metric]:.4f}")
        if best is None or valid[metric] > scores[best.lam][metric]:
            best = model
    return best, scores
