"""The prepared-dataset directory (DESIGN.md §3) and atomic output directories.

    meta.json        schema version, counts, split rule, filters, drops, source
    users/*.parquet  user_idx:int32, user_id, train_items/valid_items/test_items: list<int32>
    items.parquet    item_idx:int32, item_id, n_train:int64
    summary.json     what ran, counts, timings, versions (every job writes one)
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
USER_LIST_COLUMNS = ("train_items", "valid_items", "test_items")


class DatasetError(ValueError):
    """A prepared dataset is missing, incomplete or of another format."""


def versions() -> dict:
    import numpy
    out = {"python": platform.python_version(), "pyarrow": pa.__version__, "numpy": numpy.__version__}
    for name in ("ray", "torch", "faiss"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool, what: str = "output"):
    """Yield a fresh temporary sibling directory; on success it replaces
    ``output`` in one rename, on failure it is deleted. A crash therefore never
    leaves a half-written directory under the final name."""
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"{what} directory {output} already exists; pass --overwrite to replace it "
            f"or choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(data_dir: str | Path) -> dict:
    """``meta.json`` of a prepared dataset, with a clear error if it is not one."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not data_dir.is_dir():
        raise DatasetError(f"dataset directory {data_dir} does not exist; create it with "
                           f"`python jobs/prepare_data.py --output {data_dir} ...`")
    if not meta_path.exists() or not (data_dir / "users").is_dir() or not (data_dir / "items.parquet").exists():
        raise DatasetError(f"{data_dir} is not a prepared dataset (needs meta.json, users/, items.parquet); "
                           f"prepare it with `python jobs/prepare_data.py --output {data_dir} ...`")
    meta = json.loads(meta_path.read_text())
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{meta_path}: schema_version {meta.get('schema_version')} is not "
                           f"{SCHEMA_VERSION}; re-run jobs/prepare_data.py with this version")
    return meta


def user_files(data_dir: str | Path) -> list[str]:
    files = sorted(str(p) for p in (Path(data_dir) / "users").glob("*.parquet"))
    if not files:
        raise DatasetError(f"{data_dir}/users holds no Parquet files; re-run jobs/prepare_data.py")
    return files


def read_users(data_dir: str | Path, columns=None) -> pa.Table:
    """All user rows, sorted by user_idx (for in-process evaluation and tests)."""
    read_meta(data_dir)
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in user_files(data_dir)])
    if "user_idx" in table.column_names:
        table = table.sort_by("user_idx")
    return table


def read_items(data_dir: str | Path) -> pa.Table:
    return pq.read_table(Path(data_dir) / "items.parquet").sort_by("item_idx")
