"""The data path of training: Ray Data reads ``users/*.parquet``, each worker
gets its own shard (no user dropped), a collate turns Arrow list columns into
CSR tensors, and the shard is kept in worker memory as CSR (4 bytes per
interaction) so every epoch can be reshuffled and cut into the same number of
steps on every worker — DDP hangs if one worker steps more often than another.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.train import DataConfig

from distributed.dataset_format import USER_LIST_COLUMNS, user_files
from models.batch import HistoryBatch
from models.metrics import csr_from_lists

COLUMNS = ("user_idx",) + USER_LIST_COLUMNS


def users_dataset(data_dir: str):
    """Ray Dataset of the prepared users (one row per user)."""
    import ray.data
    return ray.data.read_parquet(user_files(data_dir)).select_columns(list(COLUMNS))


class AllUsersDataConfig(DataConfig):
    """Ray Train's default DataConfig splits with ``equal=True``, which drops up
    to ``world_size - 1`` rows; evaluation must see every user, so split with
    ``equal=False`` and even out the steps per epoch ourselves (UserShard)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i][name] = split
        return output


class UserBatchCollate(ArrowBatchCollateFn):
    """Arrow batch of user rows → dict of int64 CSR tensors (vectorised: the
    list offsets and values are taken as they are, no per-user loop)."""

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        out = {"user_idx": torch.from_numpy(batch["user_idx"].to_numpy().astype(np.int64))}
        for column in USER_LIST_COLUMNS:
            name = column.removesuffix("_items")
            out[f"{name}_indptr"], out[f"{name}_items"] = csr_from_lists(batch[column])
        return out


def _cat_csr(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if not parts:
        return torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    lengths = torch.cat([p[1:] - p[:-1] for p, _ in parts])
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    return indptr, torch.cat([v for _, v in parts])


def gather_rows(indptr: torch.Tensor, values: torch.Tensor, rows: torch.Tensor):
    """CSR rows ``rows`` (any order, repeats allowed) as a new CSR, vectorised."""
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    new_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    offsets = torch.arange(int(new_ptr[-1])) - torch.repeat_interleave(new_ptr[:-1], lengths)
    return new_ptr, values[torch.repeat_interleave(starts, lengths) + offsets]


@dataclass
class UserShard:
    """One worker's users as CSR tensors (train/valid/test), in memory."""
    user_idx: torch.Tensor
    csr: dict[str, tuple[torch.Tensor, torch.Tensor]]
    n_items: int

    @classmethod
    def from_iterator(cls, iterator, n_items: int, batch_size: int = 4096) -> "UserShard":
        users, parts = [], {name: [] for name in ("train", "valid", "test")}
        for batch in iterator.iter_torch_batches(batch_size=batch_size, collate_fn=UserBatchCollate(),
                                                 device="cpu"):
            users.append(batch["user_idx"])
            for name in parts:
                parts[name].append((batch[f"{name}_indptr"], batch[f"{name}_items"]))
        user_idx = torch.cat(users) if users else torch.zeros(0, dtype=torch.long)
        order = torch.argsort(user_idx)   # deterministic order whatever the split delivered
        csr = {name: gather_rows(*_cat_csr(p), order) for name, p in parts.items()}
        return cls(user_idx[order], csr, n_items)

    def __len__(self) -> int:
        return int(self.user_idx.numel())

    def history(self, rows: torch.Tensor, split: str = "train") -> HistoryBatch:
        indptr, items = gather_rows(*self.csr[split], rows)
        return HistoryBatch(indptr, items, self.n_items)

    def targets(self, rows: torch.Tensor, split: str):
        return gather_rows(*self.csr[split], rows)

    def epoch_batches(self, n_steps: int, seed: int) -> list[torch.Tensor]:
        """This epoch's row indices cut into exactly ``n_steps`` batches of
        near-equal size (every local user once; a worker with fewer users than
        steps repeats random users so it still steps ``n_steps`` times)."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        if len(self) < n_steps:
            perm = torch.cat([perm, torch.randint(len(self), (n_steps - len(self),), generator=g)])
        return list(torch.tensor_split(perm, n_steps))
