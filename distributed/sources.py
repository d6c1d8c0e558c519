"""Raw interaction sources → canonical Arrow tables, read in parallel Ray tasks.

Canonical columns: ``user_id``, ``item_id`` (int64 or string), ``time`` (int64
seconds, or the input order when the source has no timestamp), ``seq`` (int64
input order: chunk << 40 | row, the tie-breaker for equal times) and, when the
source has one, ``rating`` (float64).

Schemas are checked on the driver before any task starts; values (nulls) are
checked where they are read. Every error names the file, the column or flag,
and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from distributed.synthetic import SyntheticSpec

SOURCES = ("parquet", "csv", "movielens", "diffrec-npy", "synthetic")
ROWS_PER_CHUNK = 4_000_000   # parquet row groups are read in chunks of about this many rows


class InputError(ValueError):
    """Bad input data or options; the message says where and how to fix it."""


@dataclass
class SourceSpec:
    kind: str
    path: str | None = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str | None = None      # None: use "timestamp" if present, else input order
    rating_col: str | None = None    # None: use "rating" if present (only needed for --min-rating)
    synthetic: SyntheticSpec | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        out = {"kind": self.kind, "path": str(Path(self.path).resolve()) if self.path else None}
        if self.kind in ("parquet", "csv"):
            out.update(user_col=self.user_col, item_col=self.item_col,
                       time_col=self.time_col, rating_col=self.rating_col)
        if self.synthetic is not None:
            out["synthetic"] = self.synthetic.to_dict()
        return out


@dataclass(frozen=True)
class Chunk:
    """One unit of reading work: a file, or a range of a Parquet file's row groups."""
    index: int
    path: str
    row_groups: tuple[int, ...] | None = None


# ---------------------------------------------------------------- file discovery

def list_files(spec: SourceSpec) -> list[str]:
    if not spec.path:
        raise InputError(f"--input is required for --source {spec.kind}")
    path = Path(spec.path)
    if not path.exists():
        raise InputError(f"--input {path} does not exist")
    if spec.kind == "movielens":
        if path.is_dir():
            for name in ("ratings.dat", "ratings.csv"):
                if (path / name).exists():
                    return [str(path / name)]
            raise InputError(f"{path} holds neither ratings.dat nor ratings.csv (MovieLens); "
                             f"point --input at the ratings file")
        return [str(path)]
    if path.is_file():
        return [str(path)]
    suffixes = {"parquet": (".parquet", ".pq"), "csv": (".csv", ".csv.gz", ".tsv")}[spec.kind]
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes)
                   and not p.name.startswith((".", "_")))
    if not files:
        raise InputError(f"--input {path} holds no {spec.kind} files ({', '.join(suffixes)})")
    return files


def row_group_chunks(path: str, rows_per_chunk: int = ROWS_PER_CHUNK) -> list[tuple[int, ...]]:
    """A Parquet file's row groups in consecutive runs of about ``rows_per_chunk``
    rows (one empty run for a file without row groups)."""
    meta = pq.ParquetFile(path).metadata
    runs, group, rows = [], [], 0
    for rg in range(meta.num_row_groups):
        group.append(rg)
        rows += meta.row_group(rg).num_rows
        if rows >= rows_per_chunk:
            runs.append(tuple(group))
            group, rows = [], 0
    if group or not runs:
        runs.append(tuple(group))
    return runs


def plan_chunks(spec: SourceSpec, files: list[str]) -> list[Chunk]:
    chunks: list[Chunk] = []
    for path in files:
        if spec.kind != "parquet":
            chunks.append(Chunk(len(chunks), path))
            continue
        for run in row_group_chunks(path):
            chunks.append(Chunk(len(chunks), path, run))
    return chunks


# ---------------------------------------------------------------- schema checks

def _csv_schema(path: str, spec: SourceSpec) -> pa.Schema:
    try:
        reader = pacsv.open_csv(path, **_csv_options(spec))
        return reader.schema
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise InputError(f"{path} is empty; give a CSV with a header row and interactions") from None
        raise InputError(f"{path}: cannot parse as CSV ({exc}); check the delimiter and header") from None


def _csv_options(spec: SourceSpec) -> dict:
    if spec.kind == "movielens" and spec.path and str(_ml_file(spec)).endswith(".dat"):
        # ratings.dat is "user::item::rating::time"; ':' splits it into 7 fields, every other empty.
        return dict(read_options=pacsv.ReadOptions(column_names=[f"f{i}" for i in range(7)]),
                    parse_options=pacsv.ParseOptions(delimiter=":"))
    return {}


def _ml_file(spec: SourceSpec) -> str:
    return list_files(spec)[0]


def resolve_columns(spec: SourceSpec, files: list[str]) -> dict:
    """Map canonical names → source column names, checking names and types."""
    if spec.kind == "movielens":
        if _ml_file(spec).endswith(".dat"):
            return {"user_id": "f0", "item_id": "f2", "rating": "f4", "time": "f6"}
        return {"user_id": "userId", "item_id": "movieId", "rating": "rating", "time": "timestamp"}
    schemas = {}
    for path in files:
        schema = pq.read_schema(path) if spec.kind == "parquet" else _csv_schema(path, spec)
        schemas[path] = schema
    first = schemas[files[0]]
    cols = {"user_id": spec.user_col, "item_id": spec.item_col}
    time_col = spec.time_col or ("timestamp" if "timestamp" in first.names else None)
    rating_col = spec.rating_col or ("rating" if "rating" in first.names else None)
    if time_col:
        cols["time"] = time_col
    if rating_col:
        cols["rating"] = rating_col
    flags = {"user_id": "--user-col", "item_id": "--item-col", "time": "--time-col", "rating": "--rating-col"}
    for path, schema in schemas.items():
        for canon, name in cols.items():
            if name not in schema.names:
                raise InputError(
                    f"{path}: no column '{name}' (for {canon}); it has {schema.names}. "
                    f"Pass {flags[canon]} with the right column name")
            typ = schema.field(name).type
            if pa.types.is_dictionary(typ):
                typ = typ.value_type
            if canon in ("user_id", "item_id") and not (pa.types.is_integer(typ) or pa.types.is_string(typ)
                                                        or pa.types.is_large_string(typ)):
                raise InputError(
                    f"{path}: column '{name}' ({canon}) has type {typ}; ids must be integers or strings. "
                    f"Cast it, or pass {flags[canon]} naming the id column")
            if canon == "time" and not (pa.types.is_integer(typ) or pa.types.is_floating(typ)
                                        or pa.types.is_timestamp(typ) or pa.types.is_date(typ)):
                raise InputError(
                    f"{path}: column '{name}' (timestamp) has type {typ}; it must be integer seconds "
                    f"or a timestamp type. Convert it, or pass --time-col naming another column")
            if canon == "rating" and not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
                raise InputError(f"{path}: column '{name}' (rating) has type {typ}; it must be numeric. "
                                 f"Pass --rating-col naming the rating column")
    return cols


def id_types(spec: SourceSpec, files: list[str], cols: dict) -> dict:
    """int64 when every file has integer ids, else string (ids are compared as text)."""
    if spec.kind == "movielens":
        return {"user_id": pa.int64(), "item_id": pa.int64()}
    out = {}
    for canon in ("user_id", "item_id"):
        types = []
        for path in files:
            schema = pq.read_schema(path) if spec.kind == "parquet" else _csv_schema(path, spec)
            typ = schema.field(cols[canon]).type
            types.append(typ.value_type if pa.types.is_dictionary(typ) else typ)
        out[canon] = pa.int64() if all(pa.types.is_integer(t) for t in types) else pa.string()
    return out


# ---------------------------------------------------------------- reading

def read_chunk(spec: SourceSpec, chunk: Chunk, cols: dict, types: dict) -> pa.Table:
    """Read one chunk into the canonical schema, checking values."""
    if spec.kind == "parquet":
        pf = pq.ParquetFile(chunk.path)
        names = sorted(set(cols.values()))
        table = (pf.read_row_groups(list(chunk.row_groups), columns=names) if chunk.row_groups
                 else pf.schema_arrow.empty_table().select(names))
    else:
        table = pacsv.read_csv(chunk.path, **_csv_options(spec))
    n = table.num_rows
    out = {}
    for canon in ("user_id", "item_id"):
        column = table.column(cols[canon])
        nulls = column.null_count
        if nulls:
            raise InputError(f"{chunk.path}: column '{cols[canon]}' ({canon}) has {nulls} null value(s) "
                             f"of {n}; drop or fill those rows before preparing")
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        out[canon] = column.cast(types[canon])
    seq = (np.int64(chunk.index) << np.int64(40)) + np.arange(n, dtype=np.int64)
    if "time" in cols:
        column = table.column(cols["time"])
        if column.null_count:
            raise InputError(f"{chunk.path}: column '{cols['time']}' (timestamp) has {column.null_count} "
                             f"null value(s); fill them or pass --time-col for another column")
        if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
            column = pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
        out["time"] = pc.cast(column, pa.int64(), safe=False)
    else:
        out["time"] = pa.array(seq)
    out["seq"] = pa.array(seq)
    if "rating" in cols:
        out["rating"] = pc.cast(table.column(cols["rating"]), pa.float64())
    return pa.table(out)


def read_diffrec_npy(path: str) -> dict[str, np.ndarray]:
    """The DiffRec split format: ``train_list.npy``, ``valid_list.npy``,
    ``test_list.npy`` of ``[user, item]`` rows, each user's rows in time order."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"--input {root} must be a directory with train_list.npy, valid_list.npy, test_list.npy")
    out = {}
    for split in ("train", "valid", "test"):
        file = root / f"{split}_list.npy"
        if not file.exists():
            raise InputError(f"{root} has no {file.name}; the diffrec-npy source needs "
                             f"train_list.npy, valid_list.npy and test_list.npy")
        arr = np.load(file, allow_pickle=False)
        if arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{file}: expected an integer array of [user, item] rows, got "
                             f"shape {arr.shape} dtype {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise InputError(f"{file}: negative ids found; user and item ids must be >= 0")
        out[split] = arr.astype(np.int64)
    if len(out["train"]) == 0:
        raise InputError(f"{root}/train_list.npy is empty")
    return out
