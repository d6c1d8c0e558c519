"""Import of the DiffRec ``.npy`` split as-is: its split and per-user order are
kept, ids stay the paper's (item_idx == item id when the ids are 0..N-1, so
item embeddings shipped with the split stay aligned)."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed.dataset_format import SCHEMA_VERSION, atomic_output_dir, versions, write_json
from distributed.sources import SourceSpec, read_diffrec_npy

USERS_PER_FILE = 250_000


def _lists(users: np.ndarray, items: np.ndarray, n_users: int) -> pa.Array:
    """Per-user lists, keeping each user's row order (stable sort by user)."""
    order = np.argsort(users, kind="stable")
    counts = np.bincount(users, minlength=n_users)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(items[order].astype(np.int32)))


def prepare_diffrec_npy(source: SourceSpec, output: Path, options, started: float) -> dict:
    from distributed.prepare import _checksum, _log

    splits = read_diffrec_npy(source.path)
    train = splits["train"]
    user_ids = np.unique(np.concatenate([s[:, 0] for s in splits.values()]))
    item_ids = np.unique(train[:, 1])                      # items must be seen in training
    dropped = {}
    # Users without training interactions cannot be scored: drop them (counted).
    train_users = np.unique(train[:, 0])
    dropped["users_without_train"] = int(len(user_ids) - len(train_users))
    user_ids = train_users
    encoded = {}
    for name, arr in splits.items():
        u = np.searchsorted(user_ids, arr[:, 0])
        i = np.searchsorted(item_ids, arr[:, 1])
        ok = (u < len(user_ids)) & (i < len(item_ids))
        ok &= (user_ids[np.minimum(u, len(user_ids) - 1)] == arr[:, 0])
        ok &= (item_ids[np.minimum(i, len(item_ids) - 1)] == arr[:, 1])
        dropped[f"{name}_rows_unknown_user_or_item"] = int((~ok).sum())
        encoded[name] = (u[ok], i[ok])
    n_users, n_items = len(user_ids), len(item_ids)
    table = pa.table({
        "user_idx": pa.array(np.arange(n_users, dtype=np.int32)),
        "user_id": pa.array(user_ids),
        **{f"{name}_items": _lists(*encoded[name], n_users) for name in ("train", "valid", "test")},
    })
    files = [str(Path(source.path) / f"{s}_list.npy") for s in ("train", "valid", "test")]
    with atomic_output_dir(output, options.overwrite, "output") as tmp:
        (tmp / "users").mkdir()
        for k, start in enumerate(range(0, n_users, USERS_PER_FILE)):
            pq.write_table(table.slice(start, USERS_PER_FILE), tmp / "users" / f"part-{k:05d}.parquet")
        pq.write_table(pa.table({"item_idx": pa.array(np.arange(n_items, dtype=np.int32)),
                                 "item_id": pa.array(item_ids),
                                 "n_train": pa.array(np.bincount(encoded["train"][1], minlength=n_items))}),
                       tmp / "items.parquet")
        meta = {
            "schema_version": SCHEMA_VERSION, "n_users": int(n_users), "n_items": int(n_items),
            "n_train": int(len(encoded["train"][0])), "n_valid": int(len(encoded["valid"][0])),
            "n_test": int(len(encoded["test"][0])),
            "split": {"rule": "as given by the DiffRec .npy files (train/valid/test lists, rows in time order)",
                      "ratios": None},
            "filters": {"min_rating": None, "kcore": 0},
            "dropped": dropped,
            "source": {**source.describe(), "files": files, "sha256": _checksum(files)},
            "id_types": {"user_id": "int64", "item_id": "int64"},
        }
        write_json(tmp / "meta.json", meta)
        summary = {"job": "prepare_data", "output": str(output.resolve()),
                   "counts": {k: meta[k] for k in ("n_users", "n_items", "n_train", "n_valid", "n_test")},
                   "dropped": dropped, "options": asdict(options),
                   "timings": {"total_s": time.time() - started}, "versions": versions()}
        write_json(tmp / "summary.json", summary)
    _log(f"imported {source.path}: {n_users:,} users, {n_items:,} items, "
         f"{meta['n_train']:,}/{meta['n_valid']:,}/{meta['n_test']:,} train/valid/test")
    return summary
