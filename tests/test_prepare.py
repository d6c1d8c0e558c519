"""Data preparation on a local Ray: sources, the split rule, filters, and every
kind of bad input (clear error, nothing written)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from distributed.dataset_format import read_items, read_meta, read_users
from distributed.prepare import PrepareOptions, prepare_dataset
from distributed.sources import InputError, SourceSpec
from distributed.synthetic import SyntheticSpec, generate

pytestmark = pytest.mark.usefixtures("ray_local")


def write_parquet(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def history(users: pa.Table, user_id) -> dict:
    items = read_items_cache["items"]
    row = users.filter(pa.compute.equal(users["user_id"], user_id)).to_pylist()[0]
    id_of = items["item_id"].to_pylist()
    return {k: [id_of[i] for i in row[f"{k}_items"]] for k in ("train", "valid", "test")}


read_items_cache: dict = {}


def prepared(out: Path):
    read_items_cache["items"] = read_items(out)
    return read_meta(out), read_users(out)


def no_leftovers(parent: Path, name: str) -> bool:
    return not any(p.name.startswith(f".{name}.") for p in parent.iterdir()) and not (parent / name).exists()


# ----------------------------------------------------------------------------- sources and rules

def test_parquet_string_ids_time_order_split_and_repeats(tmp_path):
    # user "a": 10 items given out of time order, plus one repeated item (earliest kept)
    ts = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    items = ["i5", "i1", "i9", "i3", "i7", "i2", "i8", "i4", "i6", "i10", "i1"]
    rows = {"customer": ["a"] * 11 + ["b"] * 3, "sku": items + ["i8", "i9", "i10"],
            "ts": ts + [1, 2, 3]}
    src = write_parquet(tmp_path / "in" / "log.parquet", pa.table(rows))
    out = tmp_path / "out"
    summary = prepare_dataset(SourceSpec("parquet", str(src.parent), user_col="customer", item_col="sku",
                                         time_col="ts"), out)
    meta, users = prepared(out)
    a = history(users, "a")
    assert a["train"] == ["i1", "i2", "i3", "i4", "i5", "i6", "i7"]
    assert a["valid"] == ["i8", "i9"] and a["test"] == ["i10"]
    b = history(users, "b")   # 3 items: floor(0.3)=0 test, floor(0.6)=0 valid
    assert b == {"train": ["i8", "i9", "i10"], "valid": [], "test": []}
    assert meta["dropped"]["repeated_user_item_pairs"] == 1
    assert (meta["n_users"], meta["n_train"], meta["n_valid"], meta["n_test"]) == (2, 10, 2, 1)
    assert users.schema.field("train_items").type == pa.list_(pa.int32())
    assert users.schema.field("user_idx").type == pa.int32()
    assert json.loads((out / "summary.json").read_text())["counts"]["n_users"] == 2
    assert summary["counts"]["n_items"] == meta["n_items"]


def test_csv_without_timestamp_uses_input_order_and_split_ratios(tmp_path):
    src = tmp_path / "log.csv"
    pacsv.write_csv(pa.table({"u": [1] * 10 + [2] * 10, "i": list(range(10)) + list(range(9, -1, -1))}), src)
    out = tmp_path / "out"
    prepare_dataset(SourceSpec("csv", str(src), user_col="u", item_col="i"), out,
                    PrepareOptions(split=(0.5, 0.3, 0.2)))
    meta, users = prepared(out)
    assert history(users, 1) == {"train": [0, 1, 2, 3, 4], "valid": [5, 6, 7], "test": [8, 9]}
    assert history(users, 2)["test"] == [1, 0]
    assert meta["split"]["ratios"] == [0.5, 0.3, 0.2]


def test_movielens_dat_min_rating_and_unseen_items_dropped(tmp_path):
    lines = []
    for u in (1, 2):
        for k in range(10):
            lines.append(f"{u}::{100 + k}::{5 if k != 3 else 2}::{1000 + k}")
    lines.append("3::999::5::5000")   # item 999 only ever appears ... as user 3's train item
    lines += [f"3::{100 + k}::5::{5001 + k}" for k in range(9)]
    path = tmp_path / "ratings.dat"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    prepare_dataset(SourceSpec("movielens", str(tmp_path)), out, PrepareOptions(min_rating=4))
    meta, users = prepared(out)
    assert meta["dropped"]["rows_below_min_rating"] == 2
    assert 103 not in history(users, 1)["train"] + history(users, 1)["valid"] + history(users, 1)["test"]
    # items 108/109 are only ever in valid/test of users 1, 2 and user 3's valid/test: never trained
    trained = set(read_items(out)["item_id"].to_pylist())
    assert 109 not in trained
    assert meta["dropped"]["valid_test_interactions_with_those_items"] > 0
    assert meta["n_items"] == len(trained)


def test_kcore_iterates_until_stable(tmp_path):
    # 3-core: user z has 2 items → removed; then item 'rare' drops below 3 → removed; then user y drops to 2.
    rows = [("x", i) for i in ("a", "b", "c", "d")] + [("w", i) for i in ("a", "b", "c", "d")] + \
           [("v", i) for i in ("a", "b", "c", "d")] + [("y", i) for i in ("a", "b", "rare")] + \
           [("z", i) for i in ("rare", "a")] + [("q", "rare"), ("q", "a"), ("q", "b"), ("q", "c")]
    src = write_parquet(tmp_path / "k.parquet", pa.table({"user_id": [r[0] for r in rows],
                                                            "item_id": [r[1] for r in rows]}))
    out = tmp_path / "out"
    prepare_dataset(SourceSpec("parquet", str(src)), out, PrepareOptions(kcore=3))
    meta, users = prepared(out)
    assert sorted(users["user_id"].to_pylist()) == ["q", "v", "w", "x"]
    assert "rare" not in read_items(out)["item_id"].to_pylist()
    assert meta["dropped"]["kcore_users"] == 2 and len(meta["filters"]["kcore_passes"]) >= 2


def test_synthetic_reproducible_and_partition_count_does_not_matter(tmp_path):
    spec = SyntheticSpec(n_users=300, n_items=200, n_interactions=6000, seed=3, users_per_block=100)
    assert generate(spec).equals(generate(spec))
    one, three = tmp_path / "one", tmp_path / "three"
    prepare_dataset(SourceSpec("synthetic", synthetic=spec), one, PrepareOptions(partitions=1))
    prepare_dataset(SourceSpec("synthetic", synthetic=spec), three, PrepareOptions(partitions=3))
    assert read_meta(one)["n_train"] == read_meta(three)["n_train"] > 0
    assert read_users(one).equals(read_users(three))


def test_diffrec_npy_keeps_split_and_order(tmp_path):
    d = tmp_path / "npy"
    d.mkdir()
    np.save(d / "train_list.npy", np.array([[0, 3], [0, 1], [1, 2], [1, 0], [0, 2]]))
    np.save(d / "valid_list.npy", np.array([[0, 0], [1, 3]]))
    np.save(d / "test_list.npy", np.array([[1, 1], [0, 4]]))    # item 4 never trained → dropped
    out = tmp_path / "out"
    prepare_dataset(SourceSpec("diffrec-npy", str(d)), out)
    meta, users = prepared(out)
    assert users["train_items"].to_pylist() == [[3, 1, 2], [2, 0]]
    assert users["valid_items"].to_pylist() == [[0], [3]]
    assert users["test_items"].to_pylist() == [[], [1]]
    assert meta["dropped"]["test_rows_unknown_user_or_item"] == 1


@pytest.mark.shared_data
def test_ml1m_import_exact_counts(tmp_path, ml1m_path):
    prepare_dataset(SourceSpec("diffrec-npy", str(ml1m_path)), tmp_path / "ml1m")
    meta = read_meta(tmp_path / "ml1m")
    assert (meta["n_users"], meta["n_items"]) == (5949, 2810)
    assert (meta["n_train"], meta["n_valid"], meta["n_test"]) == (403277, 110722, 57532)


# ----------------------------------------------------------------------------- bad input

def _fails(tmp_path, spec, options=None, match=""):
    out = tmp_path / "out"
    with pytest.raises((InputError, FileExistsError), match=match):
        prepare_dataset(spec, out, options)
    assert no_leftovers(tmp_path, "out"), "a failed run left output behind"


def test_missing_column_names_file_and_flag(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", pa.table({"user": [1, 2], "item_id": [1, 2]}))
    _fails(tmp_path, SourceSpec("parquet", str(src)), match=r"x\.parquet.*no column 'user_id'.*--user-col")


def test_misnamed_time_column(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", pa.table({"user_id": [1, 2], "item_id": [1, 2]}))
    _fails(tmp_path, SourceSpec("parquet", str(src), time_col="when"), match="--time-col")


def test_wrong_id_type(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", pa.table({"user_id": [1.5, 2.0], "item_id": [1, 2]}))
    _fails(tmp_path, SourceSpec("parquet", str(src)), match="ids must be integers or strings")


def test_wrong_timestamp_type(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", pa.table({"user_id": [1, 2], "item_id": [1, 2],
                                                          "timestamp": ["x", "y"]}))
    _fails(tmp_path, SourceSpec("parquet", str(src)), match="timestamp.*integer seconds")


def test_null_ids(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", pa.table({"user_id": [1, None, 3], "item_id": [1, 2, 3]}))
    _fails(tmp_path, SourceSpec("parquet", str(src)), match=r"x\.parquet.*'user_id'.*1 null")


def test_empty_input(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", pa.table({"user_id": pa.array([], pa.int64()),
                                                          "item_id": pa.array([], pa.int64())}))
    _fails(tmp_path, SourceSpec("parquet", str(src)), match="has no rows")
    empty_csv = tmp_path / "e.csv"
    empty_csv.write_text("")
    _fails(tmp_path, SourceSpec("csv", str(empty_csv)), match="empty")


def test_constant_id_column(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", pa.table({"user_id": [7, 7, 7], "item_id": [1, 2, 3]}))
    _fails(tmp_path, SourceSpec("parquet", str(src)), match="single value.*--user-col")


def test_ratios_must_sum_to_one(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", pa.table({"user_id": [1, 2], "item_id": [1, 2]}))
    _fails(tmp_path, SourceSpec("parquet", str(src)), PrepareOptions(split=(0.7, 0.2, 0.2)), match="sum to 1")


def test_kcore_removing_everything(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", pa.table({"user_id": [1, 2, 3], "item_id": [1, 2, 3]}))
    _fails(tmp_path, SourceSpec("parquet", str(src)), PrepareOptions(kcore=5), match="removed every interaction")


def test_existing_output_needs_overwrite(tmp_path):
    src = write_parquet(tmp_path / "x.parquet", pa.table({"user_id": [1, 2], "item_id": [1, 2]}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_dataset(SourceSpec("parquet", str(src)), out)
    assert (out / "keep.txt").read_text() == "mine"
    prepare_dataset(SourceSpec("parquet", str(src)), out, PrepareOptions(overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "meta.json").exists()


def test_job_cli_reports_errors_with_exit_code(tmp_path, capsys):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from prepare_data import main
    assert main(["--source", "parquet", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
