"""Batch scoring (DESIGN.md §5 Scoring): every user's top-K recommendations to Parquet.

    score_batch(checkpoint, users, output, ScoreOptions(k=100)) -> summary dict

Pipeline (Ray Data):

1. **histories** — a prepared dataset is read as it is (history = ``train_items``,
   or train+valid, ... with ``history=("train", "valid")``); other Parquet input is
   turned into per-user histories of item indices through the checkpoint's item
   id map in Ray tasks: either one row per user with a list column of original
   item ids, or raw interactions (``user_id``, ``item_id``, optional timestamp),
   grouped by user with a hash shuffle like data preparation. Unknown items are
   dropped and counted; users left without any known item get the popularity
   fallback (flagged in the ``fallback`` column) or, with ``fallback="none"``,
   no row (counted).
2. **score** — ``map_batches`` with a callable class (``TopKScorer``) that loads
   the checkpoint once per actor (GPU actors when the cluster has GPUs, else CPU
   actors holding a fraction of a CPU so Ray Data's read/write tasks are never
   starved) and calls the model's own ``score_topk`` (full catalog, per-cluster
   top-K merge for latent variants, the history masked): memory per actor
   follows batch × largest cluster.
3. **write** — Parquet with the original ids into a temporary sibling of the
   output directory, renamed into place when complete (with ``summary.json``);
   a failed or interrupted job leaves no finished-looking output.

Output (``format="lists"``): ``user_id``, ``item_ids: list<item id>``,
``scores: list<float32>`` (best first), ``fallback: bool``. ``format="rows"``:
``user_id``, ``rank`` (1-based), ``item_id``, ``score``, ``fallback``. A list is
shorter than K only for a user with fewer than K unseen items. Fallback scores are
the items' share of training interactions (not model scores).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed.checkpoint import ITEMS_FILE, check_same_dataset, load_item_ids, read_checkpoint_config
from distributed.dataset_format import (USER_LIST_COLUMNS, atomic_output_dir, read_meta,
                                        user_files, versions, write_json)
from distributed.prepare import flat_list_column, hash_partition
from distributed.sources import row_group_chunks

FORMATS = ("lists", "rows")
FALLBACKS = ("popular", "none")
HISTORY_SPLITS = tuple(c.removesuffix("_items") for c in USER_LIST_COLUMNS)   # train, valid, test
LIST_COLUMN_CANDIDATES = ("item_ids", "items", "history")


class ScoringError(ValueError):
    """Bad scoring input or options; the message says what and how to fix it."""


@dataclass
class ScoreOptions:
    k: int = 100
    format: str = "lists"                 # lists | rows
    overwrite: bool = False
    history: tuple[str, ...] = ("train",)  # prepared input: splits that form the history (= the mask)
    fallback: str = "popular"             # users without known history: popular | none
    batch_size: int = 256                 # users per model call (memory ~ batch x largest cluster)
    concurrency: int | None = None        # scoring actors; None: #GPUs, else cluster CPUs - 1 (>= 1)
    cpus_per_actor: float | None = None   # None: 0.5 on CPU (leaves room to Ray Data's tasks), 1 with GPUs
    gpus_per_actor: float | None = None   # None: 1 when the cluster has GPUs, else 0
    threads_per_actor: int | None = None  # torch threads; None: cluster CPUs / actors
    user_col: str = "user_id"             # raw / user-history Parquet input columns
    item_col: str = "item_id"
    time_col: str | None = None           # None: "timestamp" if present, else input order
    items_col: str | None = None          # list column of a user-history Parquet; None: auto
    rows_per_file: int | None = None      # Parquet rows per output file (None: Ray Data's choice)
    # test hooks (not on the command line's help): fail / slow the scoring actors
    fail_after_batches: int | None = None
    delay_per_batch_s: float = 0.0

    def validate(self, n_items: int | None = None) -> "ScoreOptions":
        if not isinstance(self.k, (int, np.integer)) or self.k <= 0:
            raise ScoringError(f"--k must be a positive integer (got {self.k})")
        if n_items is not None and self.k > n_items:
            raise ScoringError(f"--k {self.k} is more than the {n_items:,} items the model knows; "
                               f"use --k {n_items} or less")
        if self.format not in FORMATS:
            raise ScoringError(f"--format must be one of {FORMATS} (got {self.format!r})")
        if self.fallback not in FALLBACKS:
            raise ScoringError(f"--fallback must be one of {FALLBACKS} (got {self.fallback!r})")
        bad = [h for h in self.history if h not in HISTORY_SPLITS]
        if bad or not self.history or len(set(self.history)) != len(self.history):
            raise ScoringError(f"--history must be distinct splits among {','.join(HISTORY_SPLITS)}, "
                               f"e.g. train or train,valid (got {','.join(self.history)})")
        if self.batch_size < 1:
            raise ScoringError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.concurrency is not None and self.concurrency < 1:
            raise ScoringError(f"--concurrency must be >= 1 (got {self.concurrency})")
        for name in ("cpus_per_actor", "gpus_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ScoringError(f"--{name.replace('_', '-')} must be >= 0 (got {value})")
        return self


PROGRESS_EVERY_S = 30.0   # an actor's progress line at most this often


def _log(msg: str) -> None:
    print(f"[score] {msg}", flush=True)


# ---------------------------------------------------------------- small vectorised helpers

_flat = flat_list_column   # (int64 offsets from 0, Arrow values) of a list column


def _list_array(offsets: np.ndarray, values) -> pa.Array:
    values = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if offsets[-1] >= 2**31 - 1:
        return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def concat_lists(columns: list) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise concatenation of several int list columns → CSR (offsets, int64 values)."""
    parts = []
    for col in columns:
        offsets, values = _flat(col)
        parts.append((offsets, values.to_numpy(zero_copy_only=False).astype(np.int64)))
    if len(parts) == 1:
        return parts[0]
    lengths = sum(np.diff(o) for o, _ in parts)
    out_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = np.empty(int(out_offsets[-1]), dtype=np.int64)
    base = out_offsets[:-1].copy()
    for offsets, values in parts:
        n = np.diff(offsets)
        rows = np.repeat(np.arange(n.size), n)
        out[base[rows] + np.arange(values.size) - offsets[:-1][rows]] = values
        base += n
    return out_offsets, out


def _common_id_type(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return pa.int64()
    return pa.string()


def lookup_items(ids, catalog: pa.Array) -> np.ndarray:
    """Original item ids → item indices of ``catalog`` (the checkpoint's id map,
    index = position); -1 for ids the model does not know. Ints and strings are
    compared as int64, mixed types as text."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    common = _common_id_type(ids.type, catalog.type)
    pos = pc.index_in(pc.cast(ids, common), value_set=pc.cast(catalog, common))
    return pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def dedupe_keep_first(rows: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Positions of the first occurrence of every (row, item) pair, in input order."""
    _, first = np.unique(rows.astype(np.int64) * (n_items + 1) + items, return_index=True)
    return np.sort(first)


def user_file_list(path: str | Path) -> list[str]:
    path = Path(path)
    if path.is_file():
        return [str(path)]
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith((".parquet", ".pq"))
                   and not p.name.startswith((".", "_")))
    if not files:
        raise ScoringError(f"--users {path} holds no Parquet files (.parquet/.pq); give a prepared dataset, "
                           f"a user-history Parquet or raw interaction Parquet")
    return files


# ---------------------------------------------------------------- input kinds

@dataclass
class UsersInput:
    kind: str                        # prepared | histories | interactions
    path: str
    files: list[str]
    columns: dict = field(default_factory=dict)   # canonical name → column in the files
    meta: dict | None = None


def inspect_users_input(path: str | Path, options: ScoreOptions, info: dict, checkpoint: str) -> UsersInput:
    """Which kind of input ``path`` is, with every check that reads no data."""
    path = Path(path)
    if not path.exists():
        raise ScoringError(f"--users {path} does not exist; give a prepared dataset directory or Parquet files")
    if path.is_dir() and (path / "meta.json").exists():
        meta = read_meta(path)
        check_same_dataset(info, meta, checkpoint)
        return UsersInput("prepared", str(path), user_files(path), meta=meta)
    if path.is_dir() and (path / "users").is_dir() and (path / "items.parquet").exists():
        read_meta(path)   # raises the dataset error (no meta.json)
    if tuple(options.history) != ("train",):
        raise ScoringError("--history applies to a prepared dataset only; a Parquet input's history is all "
                           "its items")
    files = user_file_list(path)
    schema = pq.read_schema(files[0])
    names = schema.names
    if options.user_col not in names:
        raise ScoringError(f"{files[0]}: no user column '{options.user_col}' (columns: {names}); "
                           f"pass --user-col")
    list_cols = [n for n in names if pa.types.is_list(schema.field(n).type)
                 or pa.types.is_large_list(schema.field(n).type)]
    items_col = options.items_col or next((c for c in LIST_COLUMN_CANDIDATES if c in list_cols), None)
    if options.items_col and options.items_col not in list_cols:
        raise ScoringError(f"{files[0]}: --items-col {options.items_col} is not a list column "
                           f"(list columns: {list_cols})")
    for f in files[1:]:
        other = pq.read_schema(f)
        if other.names != names:
            raise ScoringError(f"{f} has columns {other.names}, {files[0]} has {names}; "
                               f"give files of one schema")
    if items_col is not None and options.item_col not in names:
        return UsersInput("histories", str(path), files, {"user_id": options.user_col, "items": items_col})
    if options.item_col in names:
        cols = {"user_id": options.user_col, "item_id": options.item_col}
        time_col = options.time_col or ("timestamp" if "timestamp" in names else None)
        if time_col:
            if time_col not in names:
                raise ScoringError(f"{files[0]}: no time column '{time_col}' (columns: {names}); pass --time-col")
            typ = schema.field(time_col).type
            if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_timestamp(typ)
                    or pa.types.is_date(typ)):
                raise ScoringError(f"{files[0]}: time column '{time_col}' has type {typ}; it must be integer "
                                   f"seconds or a timestamp type (or pass --time-col)")
            cols["time"] = time_col
        return UsersInput("interactions", str(path), files, cols)
    raise ScoringError(f"{files[0]} is neither a user-history Parquet (a list column among "
                       f"{LIST_COLUMN_CANDIDATES}, or --items-col) nor raw interactions (an '{options.item_col}' "
                       f"column, or --item-col); its columns are {names}")


# ---------------------------------------------------------------- histories from Parquet (Ray tasks)

def _chunks(files: list[str], rows_per_chunk: int = 2_000_000) -> list[tuple[str, tuple[int, ...]]]:
    return [(path, run) for path in files for run in row_group_chunks(path, rows_per_chunk)]


def _read(path: str, row_groups, columns: list[str]) -> pa.Table:
    return pq.ParquetFile(path).read_row_groups(list(row_groups), columns=columns)


def _histories_task(path, row_groups, cols, catalog, chunk=0):
    """One chunk of a user-history Parquet → (user_id, history item indices), stats."""
    table = _read(path, row_groups, [cols["user_id"], cols["items"]])
    offsets, values = _flat(table[cols["items"]])
    idx = lookup_items(values, catalog)
    rows = np.repeat(np.arange(table.num_rows), np.diff(offsets))
    known = np.flatnonzero(idx >= 0)
    keep = known[dedupe_keep_first(rows[known], idx[known], len(catalog))]
    lengths = np.bincount(rows[keep], minlength=table.num_rows)
    out = pa.table({"user_id": table[cols["user_id"]],
                    "history": _list_array(np.concatenate([[0], np.cumsum(lengths)]), idx[keep].astype(np.int32))})
    stats = {"rows": table.num_rows, "entries": len(values), "unknown": int((idx < 0).sum()),
             "unknown_ids": pc.unique(values.filter(pa.array(idx < 0))),
             "users": pc.unique(table[cols["user_id"]])}
    return out, stats


def _interactions_task(path, row_groups, cols, catalog, chunk=0):
    """One chunk of raw interactions → (user_id, item index or -1, time, seq), stats."""
    table = _read(path, row_groups, sorted(set(cols.values())))
    n = table.num_rows
    idx = lookup_items(table[cols["item_id"]], catalog)
    if "time" in cols:
        t = table[cols["time"]]
        if pa.types.is_timestamp(t.type) or pa.types.is_date(t.type):
            t = pc.cast(pc.cast(t, pa.timestamp("s")) if pa.types.is_date(t.type) else t, pa.int64())
        time_values = pc.cast(t, pa.int64(), safe=False).to_numpy(zero_copy_only=False)
    else:
        time_values = np.zeros(n, dtype=np.int64)
    seq = (np.int64(chunk) << np.int64(40)) + np.arange(n, dtype=np.int64)
    out = pa.table({"user_id": table[cols["user_id"]], "item": pa.array(idx.astype(np.int32)),
                    "time": pa.array(time_values.astype(np.int64)), "seq": pa.array(seq)})
    unknown = idx < 0
    stats = {"rows": n, "entries": n, "unknown": int(unknown.sum()),
             "unknown_ids": pc.unique(table[cols["item_id"]].filter(pa.array(unknown))),
             "users": pc.unique(table[cols["user_id"]])}
    return out, stats


def _partition_task(table: pa.Table, user_ids: pa.Array, n_buckets: int):
    """Map side of the shuffle: rows → ``n_buckets`` tables by a hash of the user code."""
    codes = lookup_items(table["user_id"], user_ids)
    return hash_partition(table.append_column("user", pa.array(codes)), codes, n_buckets)


def _group_task(n_items: int, *pieces: pa.Table) -> pa.Table:
    """Reduce side: whole users → one row per user, known items in time order, repeats removed;
    users without any known item keep an empty history."""
    table = pa.concat_tables(pieces)
    user = table["user"].to_numpy()
    item = table["item"].to_numpy().astype(np.int64)
    order = np.lexsort((table["seq"].to_numpy(), table["time"].to_numpy(), user))
    user_sorted = user[order]
    users, starts = np.unique(user_sorted, return_index=True)
    row_of = np.repeat(np.arange(users.size), np.diff(np.append(starts, user_sorted.size)))
    known = np.flatnonzero(item[order] >= 0)
    keep = known[dedupe_keep_first(row_of[known], item[order][known], n_items)]
    lengths = np.bincount(row_of[keep], minlength=users.size)
    first_row = order[starts]
    return pa.table({"user_id": table["user_id"].take(pa.array(first_row)),
                     "history": _list_array(np.concatenate([[0], np.cumsum(lengths)]),
                                            item[order][keep].astype(np.int32))})


def _sorted_unique(arrays: list) -> pa.Array:
    merged = pc.unique(pa.chunked_array(arrays).combine_chunks()) if arrays else pa.array([])
    return pc.take(merged, pc.sort_indices(merged))


def build_histories(users: UsersInput, catalog: pa.Array) -> tuple[list, dict]:
    """Object refs of Arrow tables (``user_id``, ``history: list<int32>``) and stats."""
    import ray

    catalog_ref = ray.put(catalog)
    chunks = _chunks(users.files)
    task = _histories_task if users.kind == "histories" else _interactions_task
    remote = ray.remote(num_returns=2)(task)
    pairs = [remote.remote(p, rg, users.columns, catalog_ref, i) for i, (p, rg) in enumerate(chunks)]
    refs = [p[0] for p in pairs]
    stats = ray.get([p[1] for p in pairs])
    user_ids = _sorted_unique([s["users"] for s in stats])
    rows = sum(s["rows"] for s in stats)
    out = {"input_rows": rows, "input_entries": sum(s["entries"] for s in stats),
           "items_skipped": sum(s["unknown"] for s in stats),
           "unknown_item_ids": len(_sorted_unique([s["unknown_ids"] for s in stats])),
           "input_users": len(user_ids)}
    if rows == 0:
        raise ScoringError(f"--users {users.path} has no rows")
    if out["items_skipped"] == out["input_entries"]:
        raise ScoringError(f"none of the {out['input_entries']:,} items in --users {users.path} is known to the "
                           f"checkpoint (its ids look like {catalog.slice(0, 3).to_pylist()}); is it the "
                           f"checkpoint trained on this data, and --item-col/--items-col the right column?")
    if users.kind == "histories":
        if len(user_ids) != rows:
            raise ScoringError(f"--users {users.path}: {rows:,} rows for {len(user_ids):,} distinct users; a "
                               f"user-history Parquet needs one row per user (give raw interactions instead)")
        return refs, out
    n_buckets = max(1, min(256, math.ceil(rows / 2_000_000)))
    user_ref = ray.put(user_ids)
    partition = ray.remote(num_returns=n_buckets)(_partition_task)
    pieces = [partition.remote(r, user_ref, n_buckets) for r in refs]
    if n_buckets == 1:
        pieces = [[p] for p in pieces]
    group = ray.remote(_group_task)
    return [group.remote(len(catalog), *[p[b] for p in pieces]) for b in range(n_buckets)], out


# ---------------------------------------------------------------- the scoring actor

class TopKScorer:
    """Ray Data callable class: loads the checkpoint once per actor and maps a
    pyarrow batch of users (``user_id`` + history list columns of item indices)
    to their top-K with the original item ids, using the model's ``score_topk``."""

    def __init__(self, checkpoint: str, k: int, fmt: str, history_columns: list[str], fallback: str,
                 device: str = "cpu", threads: int | None = None, fail_after_batches: int | None = None,
                 delay_per_batch_s: float = 0.0, total_users: int = 0, actors: int = 1):
        import torch

        from distributed.checkpoint import load_model
        if threads:
            torch.set_num_threads(int(threads))
        self.device = device
        self.model, _, info = load_model(checkpoint, device)
        items = pq.read_table(Path(checkpoint) / ITEMS_FILE).sort_by("item_idx")
        self.item_ids = items["item_id"].combine_chunks()
        self.n_items = int(info["n_items"])
        self.k, self.fmt, self.history_columns, self.fallback = int(k), fmt, list(history_columns), fallback
        counts = (items["n_train"].to_numpy().astype(np.float64) if "n_train" in items.column_names
                  else np.ones(self.n_items))
        popular = np.lexsort((np.arange(self.n_items), -counts))[:self.k]   # most popular, ties by index
        self.popular_ids = popular.astype(np.int64)
        self.popular_scores = (counts[popular] / max(counts.sum(), 1.0)).astype(np.float32)
        self.fail_after, self.delay, self.calls = fail_after_batches, float(delay_per_batch_s), 0
        self.total_users, self.actors, self.users_done = int(total_users), max(1, int(actors)), 0
        self.started = self.last_report = time.time()

    def report_progress(self, n: int) -> None:
        """A progress line every PROGRESS_EVERY_S (Ray forwards actor output to the
        driver); the time left assumes the other actors go at this one's pace."""
        self.users_done += n
        now = time.time()
        if now - self.last_report < PROGRESS_EVERY_S:
            return
        self.last_report = now
        rate = self.users_done / max(now - self.started, 1e-9)
        left = max(0, self.total_users - self.users_done * self.actors) / max(rate * self.actors, 1e-9)
        _log(f"this actor: {self.users_done:,} users, {rate:,.0f} users/s; "
             f"~{left:,.0f}s left for the {self.total_users:,} users")

    def topk(self, indptr: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) item indices (-1 padded) and float32 scores via the model's inference path."""
        import torch

        from models.batch import HistoryBatch
        batch = HistoryBatch(torch.from_numpy(indptr), torch.from_numpy(items), self.n_items)
        values, ids = self.model.score_topk(batch, self.k)
        return ids.cpu().numpy(), values.float().cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError(f"injected failure after {self.fail_after} batch(es) (test hook)")
        indptr, items = concat_lists([batch[c] for c in self.history_columns])
        lengths = np.diff(indptr)
        has = lengths > 0
        n = batch.num_rows
        ids = np.full((n, self.k), -1, dtype=np.int64)
        scores = np.zeros((n, self.k), dtype=np.float32)
        if has.any():
            if has.all():
                sub_ptr, sub_items = indptr, items
            else:
                sub_ptr = np.concatenate([[0], np.cumsum(lengths[has])])
                sub_items = items[np.repeat(has, lengths)]
            ids_h, scores_h = self.topk(sub_ptr, sub_items)
            ids[has, :ids_h.shape[1]], scores[has, :ids_h.shape[1]] = ids_h, scores_h
        self.report_progress(n)
        fallback = ~has
        if self.fallback == "none":
            keep = np.flatnonzero(has)
            batch, ids, scores, fallback = batch.take(pa.array(keep)), ids[keep], scores[keep], fallback[keep]
        else:
            ids[fallback, :self.popular_ids.size] = self.popular_ids
            scores[fallback, :self.popular_ids.size] = self.popular_scores
        valid = ids >= 0
        n_per_user = valid.sum(1)
        flat_ids = self.item_ids.take(pa.array(ids[valid]))
        flat_scores = pa.array(scores[valid], type=pa.float32())
        if self.fmt == "lists":
            offsets = np.concatenate([[0], np.cumsum(n_per_user)])
            return pa.table({"user_id": batch["user_id"], "item_ids": _list_array(offsets, flat_ids),
                             "scores": _list_array(offsets, flat_scores), "fallback": pa.array(fallback)})
        owner = np.repeat(np.arange(batch.num_rows), n_per_user)
        rank = np.arange(owner.size) - np.repeat(np.cumsum(n_per_user) - n_per_user, n_per_user) + 1
        return pa.table({"user_id": batch["user_id"].take(pa.array(owner)), "rank": pa.array(rank.astype(np.int32)),
                         "item_id": flat_ids, "score": flat_scores, "fallback": pa.array(fallback[owner])})


# ---------------------------------------------------------------- driver

def actor_resources(options: ScoreOptions, cluster: dict) -> dict:
    """Actors, CPUs/GPUs per actor, device and torch threads for this cluster."""
    cpus, gpus = float(cluster.get("CPU", 1.0)), float(cluster.get("GPU", 0.0))
    gpus_per = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if gpus_per > 0:
        if gpus < gpus_per:
            raise ScoringError(f"--gpus-per-actor {gpus_per:g} but the cluster has {gpus:g} GPU(s)")
        concurrency = options.concurrency or max(1, int(gpus // gpus_per))
        cpus_per = options.cpus_per_actor if options.cpus_per_actor is not None else min(1.0, max(0.1, cpus / concurrency / 2))
        device = "cuda"
    else:
        concurrency = options.concurrency or max(1, int(cpus) - 1)
        # Fractional CPUs: whole-CPU actors would starve Ray Data's read and write tasks (a silent hang).
        cpus_per = options.cpus_per_actor if options.cpus_per_actor is not None else 0.5
        device = "cpu"
    if cpus_per > cpus:
        raise ScoringError(f"--cpus-per-actor {cpus_per:g} is more than the cluster's {cpus:g} CPUs")
    threads = options.threads_per_actor or max(1, int(cpus // concurrency))
    return {"concurrency": int(concurrency), "num_cpus": float(cpus_per), "num_gpus": float(gpus_per),
            "device": device, "threads": int(threads)}


def check_inputs(checkpoint: str, users: str, output: str, options: ScoreOptions) -> tuple[dict, UsersInput]:
    """Every check that needs neither Ray nor a pass over the data."""
    info = read_checkpoint_config(checkpoint)
    options.validate(int(info["n_items"]))
    if Path(output).exists() and not options.overwrite:
        raise FileExistsError(f"output directory {output} already exists; pass --overwrite to replace it "
                              f"or choose another --output")
    out, ckpt = Path(output).resolve(), Path(checkpoint).resolve()
    if out == ckpt or ckpt in out.parents or out in ckpt.parents:
        raise ScoringError(f"--output {output} must lie outside the checkpoint {checkpoint}")
    return info, inspect_users_input(users, options, info, checkpoint)


def _output_stats(directory: Path, fmt: str) -> dict:
    files = sorted(directory.glob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    size = sum(f.stat().st_size for f in files)
    if fmt == "lists":
        fallback = sum(int(pc.sum(pq.read_table(f, columns=["fallback"])["fallback"]).as_py() or 0) for f in files)
        users = rows
    else:
        users = fallback = 0
        for f in files:
            t = pq.read_table(f, columns=["rank", "fallback"])
            first = pc.equal(t["rank"], 1)
            users += int(pc.sum(first).as_py() or 0)
            fallback += int(pc.sum(pc.and_(first, t["fallback"])).as_py() or 0)
    return {"files": len(files), "rows": rows, "bytes": size, "users": users, "fallback_users": fallback}


def score_batch(checkpoint: str, users: str, output: str, options: ScoreOptions | None = None) -> dict:
    """Score every user of ``users`` with the model in ``checkpoint`` and write the
    top-K to ``output`` (Parquet + ``summary.json``); returns the summary."""
    import ray
    import ray.data

    from distributed.ray_env import ensure_ray

    options = options or ScoreOptions()
    started = time.time()
    checkpoint = str(Path(checkpoint).resolve())
    info, source = check_inputs(checkpoint, users, output, options)
    ensure_ray()
    res = actor_resources(options, ray.cluster_resources())
    catalog = load_item_ids(checkpoint).combine_chunks()
    stats = {"input_rows": None, "items_skipped": 0, "unknown_item_ids": 0}
    t0 = time.time()
    if source.kind == "prepared":
        history_columns = [f"{h}_items" for h in options.history]
        ds = ray.data.read_parquet(source.files).select_columns(["user_id"] + history_columns)
        stats["input_users"] = int(source.meta["n_users"])
    else:
        history_columns = ["history"]
        refs, stats = build_histories(source, catalog)
        ds = ray.data.from_arrow_refs(refs)
        _log(f"built histories of {stats['input_users']:,} users from {stats['input_rows']:,} rows in "
             f"{time.time() - t0:.1f}s ({stats['items_skipped']:,} entries of {stats['unknown_item_ids']:,} "
             f"unknown items skipped)")
    histories_s = time.time() - t0
    _log(f"scoring {stats['input_users']:,} users ({source.kind} input) with {res['concurrency']} actor(s) x "
         f"{res['num_cpus']:g} CPU, {res['num_gpus']:g} GPU ({res['device']}, {res['threads']} threads), "
         f"top-{options.k}, batch {options.batch_size}")
    scorer_kwargs = dict(checkpoint=checkpoint, k=options.k, fmt=options.format, history_columns=history_columns,
                         fallback=options.fallback, device=res["device"], threads=res["threads"],
                         fail_after_batches=options.fail_after_batches,
                         delay_per_batch_s=options.delay_per_batch_s,
                         total_users=stats["input_users"], actors=res["concurrency"])
    with atomic_output_dir(output, options.overwrite, "output") as tmp:
        t0 = time.time()
        scored = ds.map_batches(TopKScorer, fn_constructor_kwargs=scorer_kwargs, batch_size=options.batch_size,
                                batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=res["concurrency"]),
                                num_cpus=res["num_cpus"],
                                num_gpus=res["num_gpus"] or None)
        write_kwargs = {"min_rows_per_file": options.rows_per_file} if options.rows_per_file else {}
        scored.write_parquet(str(tmp), **write_kwargs)
        score_s = time.time() - t0
        out = _output_stats(tmp, options.format)
        if options.fallback == "popular" and out["users"] != stats["input_users"]:
            raise RuntimeError(f"wrote {out['users']:,} users but the input has {stats['input_users']:,}; "
                               f"output discarded")
        summary = {
            "job": "score_batch", "checkpoint": checkpoint, "users_input": str(users), "input_kind": source.kind,
            "output": str(Path(output).resolve()), "k": options.k, "format": options.format,
            "history": list(options.history) if source.kind == "prepared" else "all input items",
            "fallback": options.fallback,
            "users_scored": out["users"], "fallback_users": out["fallback_users"],
            "users_without_history_dropped": stats["input_users"] - out["users"],
            "items_skipped": stats["items_skipped"], "unknown_item_ids": stats["unknown_item_ids"],
            "input_rows": stats["input_rows"],
            "rows_written": out["rows"], "files": out["files"], "output_bytes": out["bytes"],
            "histories_s": round(histories_s, 3), "score_s": round(score_s, 3),
            "users_per_s": round(out["users"] / max(score_s, 1e-9), 1),
            "wall_s": round(time.time() - started, 3),
            "actors": res, "batch_size": options.batch_size, "n_items": int(info["n_items"]),
            "variant": info["config"]["model"]["variant"], "versions": versions(),
        }
        write_json(tmp / "summary.json", summary)
    _log(f"scored {summary['users_scored']:,} users in {score_s:.1f}s ({summary['users_per_s']:,.0f} users/s); "
         f"{summary['fallback_users']:,} by popularity fallback, {summary['items_skipped']:,} unknown item entries "
         f"skipped; wrote {summary['rows_written']:,} rows in {summary['files']} file(s), "
         f"{summary['output_bytes'] / 2**20:.1f} MiB to {summary['output']}")
    return summary


def read_recommendations(output: str | Path) -> pa.Table:
    """All rows of a scoring output (tests, small outputs)."""
    files = sorted(Path(output).glob("*.parquet"))
    if not files:
        raise ScoringError(f"{output} holds no Parquet files")
    return pa.concat_tables([pq.read_table(f) for f in files])


def load_summary(output: str | Path) -> dict:
    return json.loads((Path(output) / "summary.json").read_text())

