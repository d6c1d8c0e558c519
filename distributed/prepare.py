"""Data preparation: raw interactions → the prepared dataset (DESIGN.md §3).

Pipeline (Ray tasks over Arrow blocks, written with Ray Data; every step is
vectorised with numpy/pyarrow, nothing loops per user or item):

1. read      chunks of the input in parallel tasks → canonical tables, with the
             min-rating filter applied and the distinct ids of each chunk;
2. encode    ids → dense codes (sorted original-id order), and each block cut
             into P partitions by a hash of the user (the map side of a
             shuffle);
3. group     one task per partition concatenates its pieces — whole users —
             and turns them into one row per user (items in time order,
             repeated user-item pairs removed, earliest kept) with one sort.
             Ray Data's ``groupby(user).map_groups`` does the same about 200x
             slower, and even its hash shuffle by partition costs ~20 s of
             fixed overhead on a small set;
4. k-core    iterated on the user rows until every user and item has >= k;
5. split     per user by time: ``n_test = floor(n*test)``, ``n_valid =
             floor(n*valid)``, the oldest ``n - n_valid - n_test`` train
             (every user keeps at least one training item);
6. index     items that occur in train get ``item_idx`` (sorted original id
             order); valid/test items never seen in train are dropped and
             counted; users get ``user_idx`` the same way;
7. write     ``users/*.parquet`` via Ray Data, ``items.parquet``,
             ``meta.json``, ``summary.json`` into a temporary directory that
             is renamed into place at the end.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed import sources
from distributed.dataset_format import SCHEMA_VERSION, atomic_output_dir, versions, write_json
from distributed.sources import InputError, SourceSpec

SPLIT_RULE = ("per-user temporal: interactions sorted by (timestamp, input order); the newest "
              "floor(n*test) go to test, the floor(n*valid) before them to valid, the rest to train")


@dataclass
class PrepareOptions:
    min_rating: float | None = None
    kcore: int = 0
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)
    overwrite: bool = False
    partitions: int = 0          # hash buckets of users; 0 = one per ~2M interactions

    def validate(self) -> None:
        if len(self.split) != 3:
            raise InputError(f"--split needs three ratios train,valid,test (got {self.split})")
        if any(r < 0 for r in self.split) or self.split[0] <= 0:
            raise InputError(f"--split ratios must be >= 0 with train > 0 (got {self.split})")
        if abs(sum(self.split) - 1.0) > 1e-6:
            raise InputError(f"--split ratios {','.join(map(str, self.split))} sum to "
                             f"{sum(self.split):.4g}; they must sum to 1, e.g. 0.7,0.2,0.1")
        if self.kcore < 0:
            raise InputError(f"--kcore must be >= 0 (got {self.kcore})")


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


# ---------------------------------------------------------------- per-chunk work (in tasks)

def _read_chunk_task(spec: SourceSpec, chunk, cols, types, min_rating):
    if spec.kind == "synthetic":
        from distributed.synthetic import generate_block
        raw = generate_block(spec.synthetic, chunk.index)
        n = raw.num_rows
        seq = (np.int64(chunk.index) << np.int64(40)) + np.arange(n, dtype=np.int64)
        table = pa.table({"user_id": raw["user_id"], "item_id": raw["item_id"],
                          "time": raw["timestamp"], "seq": pa.array(seq),
                          "rating": pc.cast(raw["rating"], pa.float64())})
    else:
        table = sources.read_chunk(spec, chunk, cols, types)
    n_rows = table.num_rows
    if min_rating is not None:
        table = table.filter(pc.greater_equal(table["rating"], min_rating))
    table = table.drop_columns([c for c in ("rating",) if c in table.column_names])
    stats = {"rows": n_rows, "rows_kept": table.num_rows,
             "users": pc.unique(table["user_id"]), "items": pc.unique(table["item_id"])}
    return table, stats


def _codes(values: pa.ChunkedArray | pa.Array, sorted_ids: pa.Array) -> np.ndarray:
    if pa.types.is_integer(sorted_ids.type):
        return np.searchsorted(sorted_ids.to_numpy(), values.to_numpy()).astype(np.int32)
    return pc.index_in(values, value_set=sorted_ids).to_numpy(zero_copy_only=False).astype(np.int32)


def _encode_and_partition(batch: pa.Table, user_ids, item_ids, n_buckets: int):
    """ids → codes, rows → ``n_buckets`` tables by a hash of the user (the map
    side of the shuffle that brings each user's rows together)."""
    users = _codes(batch["user_id"], user_ids)
    items = _codes(batch["item_id"], item_ids)
    table = pa.table({"user": users, "item": items, "time": batch["time"], "seq": batch["seq"]})
    return hash_partition(table, users, n_buckets)


def hash_partition(table: pa.Table, user_codes: np.ndarray, n_buckets: int):
    """``table`` itself for one bucket, else a tuple of ``n_buckets`` tables, a
    user's rows all in the same one (order within a bucket kept)."""
    if n_buckets == 1:
        return table
    # Multiplicative hash so buckets stay balanced whatever the id pattern.
    bucket = ((user_codes.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(n_buckets)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
    table = table.take(pa.array(order))
    return tuple(table.slice(bounds[b], bounds[b + 1] - bounds[b]) for b in range(n_buckets))


def _bucket_histories(*pieces: pa.Table) -> pa.Table:
    """The reduce side: all rows of one bucket → one row per user."""
    return _histories(pa.concat_tables(pieces))


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32)))


def _histories(batch: pa.Table) -> pa.Table:
    """Rows of whole users → one row per user, items in time order, repeats removed."""
    user = batch["user"].to_numpy()
    item = batch["item"].to_numpy()
    t = batch["time"].to_numpy()
    seq = batch["seq"].to_numpy()
    key = user.astype(np.int64) << np.int64(32) | item.astype(np.int64)
    order = np.lexsort((seq, t, key))
    first = np.ones(order.size, dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    kept = order[first]
    kept = kept[np.lexsort((seq[kept], t[kept], user[kept]))]
    users, starts = np.unique(user[kept], return_index=True)
    offsets = np.append(starts, kept.size)
    return pa.table({"user": pa.array(users.astype(np.int32)),
                     "items": _list_array(offsets, item[kept])})


def flat_list_column(lists) -> tuple[np.ndarray, pa.Array]:
    """(int64 offsets from 0, Arrow values) of a list column (array or chunked)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks() if lists.num_chunks != 1 else lists.chunk(0)
    if len(lists) == 0:
        return np.zeros(1, dtype=np.int64), lists.values.slice(0, 0)
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
    return offsets - offsets[0], values


def _flat(lists) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, values as numpy) of a list column."""
    offsets, values = flat_list_column(lists)
    return offsets, values.to_numpy(zero_copy_only=False)


def _count_items(batch: pa.Table, column: str, n_items: int) -> tuple[np.ndarray, int, int]:
    _, values = _flat(batch[column])
    return np.bincount(values, minlength=n_items).astype(np.int64), batch.num_rows, len(values)


def _sum_counts(refs, column, n_items) -> tuple[np.ndarray, int, int]:
    import ray
    count = ray.remote(_count_items)
    total, users, interactions = np.zeros(n_items, dtype=np.int64), 0, 0
    for counts, n_users, n_inter in ray.get([count.remote(r, column, n_items) for r in refs]):
        total += counts
        users += n_users
        interactions += n_inter
    return total, users, interactions


def _map(fn, refs, *args):
    """Apply ``fn(block, *args)`` to every block in a Ray task; large args are put once."""
    import ray
    task = ray.remote(fn)
    args = [ray.put(a) if isinstance(a, (np.ndarray, pa.Array)) else a for a in args]
    return [task.remote(r, *args) for r in refs]


def _kcore_filter(batch: pa.Table, keep_item: np.ndarray, k: int) -> pa.Table:
    """Drop items below k, then users left with fewer than k items."""
    offsets, values = _flat(batch["items"])
    rows = np.repeat(np.arange(batch.num_rows), np.diff(offsets))
    keep = keep_item[values]
    lengths = np.bincount(rows[keep], minlength=batch.num_rows)
    new_offsets = np.concatenate([[0], np.cumsum(lengths)])
    table = pa.table({"user": batch["user"], "items": _list_array(new_offsets, values[keep])})
    return table.filter(pa.array(lengths >= k))


def _split(batch: pa.Table, ratios) -> pa.Table:
    """Per-user temporal split of the time-ordered item lists (SPLIT_RULE)."""
    offsets, values = _flat(batch["items"])
    n = np.diff(offsets)
    n_test = np.floor(n * ratios[2] + 1e-9).astype(np.int64)
    n_valid = np.floor(n * ratios[1] + 1e-9).astype(np.int64)
    n_train = n - n_valid - n_test
    pos = np.arange(len(values)) - np.repeat(offsets[:-1], n)
    part = (pos >= np.repeat(n_train, n)).astype(np.int8) + (pos >= np.repeat(n_train + n_valid, n))
    out = {"user": batch["user"]}
    for code, name, count in ((0, "train", n_train), (1, "valid", n_valid), (2, "test", n_test)):
        out[name] = _list_array(np.concatenate([[0], np.cumsum(count)]), values[part == code])
    return pa.table(out)


def _finalize(batch: pa.Table, user_index, user_ids, item_index) -> pa.Table:
    """Codes → final indices and original user ids; drops never-trained items."""
    user = batch["user"].to_numpy()
    out = {"user_idx": pa.array(user_index[user].astype(np.int32)),
           "user_id": user_ids.take(pa.array(user))}
    dropped = np.zeros(batch.num_rows, dtype=np.int64)
    for name in ("train", "valid", "test"):
        offsets, values = _flat(batch[name])
        mapped = item_index[values]
        keep = mapped >= 0
        rows = np.repeat(np.arange(batch.num_rows), np.diff(offsets))
        lengths = np.bincount(rows[keep], minlength=batch.num_rows)
        dropped += np.diff(offsets) - lengths
        out[f"{name}_items"] = _list_array(np.concatenate([[0], np.cumsum(lengths)]), mapped[keep])
    out["_dropped_unseen"] = pa.array(dropped)
    return pa.table(out)


def _user_codes(batch: pa.Table) -> np.ndarray:
    return batch["user"].to_numpy()


def _dropped_unseen(batch: pa.Table) -> int:
    return int(pc.sum(batch["_dropped_unseen"]).as_py() or 0)


def _drop_bookkeeping(batch: pa.Table) -> pa.Table:
    return batch.drop_columns(["_dropped_unseen"])


# ---------------------------------------------------------------- driver

def _sorted_unique(arrays: list[pa.Array]) -> pa.Array:
    merged = pc.unique(pa.chunked_array(arrays).combine_chunks()) if arrays else pa.array([])
    return pc.take(merged, pc.sort_indices(merged))


def _checksum(paths: list[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def prepare_dataset(source: SourceSpec, output: str | Path, options: PrepareOptions | None = None) -> dict:
    """Prepare ``source`` into ``output``; returns the summary (also written)."""
    options = options or PrepareOptions()
    options.validate()
    if source.kind not in sources.SOURCES:
        raise InputError(f"--source {source.kind!r} is not one of {', '.join(sources.SOURCES)}")
    output = Path(output)
    if output.exists() and not options.overwrite:
        raise FileExistsError(f"output directory {output} already exists; pass --overwrite to replace it")
    started = time.time()
    if source.kind == "diffrec-npy":
        if options.kcore or options.min_rating is not None:
            raise InputError("--kcore and --min-rating do not apply to --source diffrec-npy "
                             "(it is imported as already split and filtered)")
        from distributed.prepare_npy import prepare_diffrec_npy
        return prepare_diffrec_npy(source, output, options, started)
    return _prepare_with_ray(source, output, options, started)


def _get(refs):
    """ray.get that turns an InputError raised in a task back into a plain one."""
    import ray
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, InputError):
            raise InputError(str(cause)) from None
        raise


def _prepare_with_ray(source: SourceSpec, output: Path, options: PrepareOptions, started: float) -> dict:
    import ray

    from distributed.ray_env import ensure_ray

    timings = {}
    if source.kind == "synthetic":
        source.synthetic.validate()
        chunks = [sources.Chunk(b, "synthetic") for b in range(source.synthetic.n_blocks)]
        cols, types, input_files = {"rating": "rating"}, {}, []
    else:
        input_files = sources.list_files(source)
        cols = sources.resolve_columns(source, input_files)
        types = sources.id_types(source, input_files, cols)
        chunks = sources.plan_chunks(source, input_files)
    if options.min_rating is not None and "rating" not in cols:
        raise InputError(f"--min-rating needs a rating column; pass --rating-col (input {source.path})")
    ensure_ray()

    # 1. read
    t0 = time.time()
    read = ray.remote(num_returns=2)(_read_chunk_task)
    pairs = [read.remote(source, c, cols, types, options.min_rating) for c in chunks]
    raw_refs = [p[0] for p in pairs]
    stats = _get([p[1] for p in pairs])
    del pairs
    n_raw = sum(s["rows"] for s in stats)
    n_rated = sum(s["rows_kept"] for s in stats)
    where = source.path or "synthetic"
    if n_raw == 0:
        raise InputError(f"input {where} has no rows; give a file with interactions")
    if n_rated == 0:
        raise InputError(f"no interaction in {where} has rating >= {options.min_rating}; lower --min-rating")
    user_ids = _sorted_unique([s["users"] for s in stats])
    item_ids = _sorted_unique([s["items"] for s in stats])
    del stats
    for name, ids, flag in (("user", user_ids, "--user-col"), ("item", item_ids, "--item-col")):
        if len(ids) < 2:
            raise InputError(f"the {name} id column of {where} holds a single value ({ids[0]}) in "
                             f"{n_rated} rows; is {flag} the right column?")
    timings["read_s"] = time.time() - t0
    _log(f"read {n_raw:,} interactions ({n_rated:,} kept by rating) of {len(user_ids):,} users, "
         f"{len(item_ids):,} items in {timings['read_s']:.1f}s")

    # 2-3. encode, hash-partition by user, group each partition into histories
    t0 = time.time()
    n_buckets = options.partitions or max(1, min(256, math.ceil(n_rated / 2_000_000)))
    user_ref, item_ref = ray.put(user_ids), ray.put(item_ids)
    partition = ray.remote(num_returns=n_buckets)(_encode_and_partition)
    pieces = [partition.remote(r, user_ref, item_ref, n_buckets) for r in raw_refs]
    if n_buckets == 1:
        pieces = [[p] for p in pieces]
    del raw_refs
    group = ray.remote(_bucket_histories)
    blocks = [group.remote(*[p[b] for p in pieces]) for b in range(n_buckets)]
    del pieces
    counts, n_users, n_inter = _sum_counts(blocks, "items", len(item_ids))
    repeats = n_rated - n_inter
    timings["group_s"] = time.time() - t0
    _log(f"grouped into {n_users:,} user histories in {n_buckets} partitions "
         f"({repeats:,} repeated user-item pairs removed) in {timings['group_s']:.1f}s")

    # 4. k-core
    t0 = time.time()
    kcore_log = []
    if options.kcore > 1:
        while True:
            before = (n_users, n_inter)
            blocks = _map(_kcore_filter, blocks, counts >= options.kcore, options.kcore)
            counts, n_users, n_inter = _sum_counts(blocks, "items", len(item_ids))
            kcore_log.append({"users": n_users, "interactions": n_inter, "items": int((counts > 0).sum())})
            if n_inter == 0:
                raise InputError(f"--kcore {options.kcore} removed every interaction of {where}; lower --kcore")
            if (n_users, n_inter) == before:
                break
        _log(f"{options.kcore}-core: {n_users:,} users, {n_inter:,} interactions after "
             f"{len(kcore_log)} passes in {time.time() - t0:.1f}s")
    timings["kcore_s"] = time.time() - t0

    # 5-6. split, index
    t0 = time.time()
    blocks = _map(_split, blocks, options.split)
    train_counts, _, n_train = _sum_counts(blocks, "train", len(item_ids))
    item_index = np.full(len(item_ids), -1, dtype=np.int64)
    trained = np.flatnonzero(train_counts > 0)
    item_index[trained] = np.arange(len(trained))
    user_codes = np.sort(np.concatenate(_get(_map(_user_codes, blocks))))
    user_index = np.full(len(user_ids), -1, dtype=np.int64)
    user_index[user_codes] = np.arange(len(user_codes))
    blocks = _map(_finalize, blocks, user_index, user_ref, item_index)
    dropped_unseen = sum(_get(_map(_dropped_unseen, blocks)))
    _, _, n_valid = _sum_counts(blocks, "valid_items", len(trained))
    _, _, n_test = _sum_counts(blocks, "test_items", len(trained))
    timings["split_s"] = time.time() - t0

    # 7. write
    t0 = time.time()
    import ray.data
    with atomic_output_dir(output, options.overwrite, "output") as tmp:
        users_ds = ray.data.from_arrow_refs(_map(_drop_bookkeeping, blocks))
        users_ds.write_parquet(str(tmp / "users"), mode="overwrite")
        pq.write_table(pa.table({"item_idx": pa.array(np.arange(len(trained), dtype=np.int32)),
                                 "item_id": item_ids.take(pa.array(trained)),
                                 "n_train": pa.array(train_counts[trained])}), tmp / "items.parquet")
        meta = {
            "schema_version": SCHEMA_VERSION,
            "n_users": int(len(user_codes)), "n_items": int(len(trained)),
            "n_train": int(n_train), "n_valid": int(n_valid), "n_test": int(n_test),
            "split": {"rule": SPLIT_RULE, "ratios": list(options.split)},
            "filters": {"min_rating": options.min_rating, "kcore": options.kcore, "kcore_passes": kcore_log},
            "dropped": {
                "rows_below_min_rating": int(n_raw - n_rated),
                "repeated_user_item_pairs": int(repeats),
                "kcore_users": int(len(user_ids) - len(user_codes)),
                "kcore_items": int(len(item_ids) - int((counts > 0).sum())),
                "items_only_in_valid_test": int((counts > 0).sum() - len(trained)),
                "valid_test_interactions_with_those_items": int(dropped_unseen),
            },
            "source": {**source.describe(), "files": input_files,
                       "sha256": _checksum(input_files) if input_files else None},
            "id_types": {"user_id": str(user_ids.type), "item_id": str(item_ids.type)},
        }
        write_json(tmp / "meta.json", meta)
        timings["write_s"] = time.time() - t0
        timings["total_s"] = time.time() - started
        summary = {"job": "prepare_data", "output": str(output.resolve()),
                   "counts": {k: meta[k] for k in ("n_users", "n_items", "n_train", "n_valid", "n_test")},
                   "dropped": meta["dropped"], "options": asdict(options), "timings": timings,
                   "versions": versions()}
        write_json(tmp / "summary.json", summary)
    _log(f"wrote {output}: {meta['n_users']:,} users, {meta['n_items']:,} items, "
         f"{n_train:,}/{n_valid:,}/{n_test:,} train/valid/test in {timings['total_s']:.1f}s")
    return summary
