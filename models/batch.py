"""A batch of user histories in CSR form: the one input type of every model.

``items`` holds item indices (0..n_items-1) of each user's history, oldest
first, so time weights can be computed at batch time (T-DiffRec) and tuned
without re-preparing data. Only per-batch dense tensors are ever built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HistoryBatch:
    indptr: torch.Tensor   # (B+1,) int64
    items: torch.Tensor    # (nnz,) int64, each user's items in time order
    n_items: int

    @property
    def size(self) -> int:
        return self.indptr.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.indptr[1:] - self.indptr[:-1]

    @property
    def rows(self) -> torch.Tensor:
        """Row (user-in-batch) index of every interaction."""
        return torch.repeat_interleave(torch.arange(self.size, device=self.indptr.device), self.lengths)

    def to(self, device) -> "HistoryBatch":
        return HistoryBatch(self.indptr.to(device), self.items.to(device), self.n_items)

    def weights(self, w_min: float | None = None, w_max: float | None = None) -> torch.Tensor:
        """Per-interaction weights: 1 everywhere, or (T-variants) rising linearly
        with time order from ``w_min`` (oldest) to ``w_max`` (newest); a user
        with one item gets ``w_max``."""
        if w_min is None or w_max is None:
            return torch.ones(self.items.numel(), device=self.items.device)
        lengths = self.lengths
        starts = torch.repeat_interleave(self.indptr[:-1], lengths)
        position = torch.arange(self.items.numel(), device=self.items.device) - starts
        denom = torch.repeat_interleave((lengths - 1).clamp(min=1), lengths)
        frac = position.double() / denom.double()
        frac = torch.where(torch.repeat_interleave(lengths, lengths) == 1, torch.ones_like(frac), frac)
        return (w_min + (w_max - w_min) * frac).float()

    def dense(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, n_items)`` float tensor of this batch (per batch only)."""
        out = torch.zeros(self.size, self.n_items, device=self.items.device)
        if values is None:
            values = torch.ones(self.items.numel(), device=self.items.device)
        out.index_put_((self.rows, self.items), values.to(out.dtype), accumulate=False)
        return out

    @classmethod
    def from_lists(cls, lists, n_items: int) -> "HistoryBatch":
        from models.metrics import csr_from_lists
        indptr, items = csr_from_lists(lists)
        return cls(indptr, items, n_items)
