"""Batch scoring to Parquet (distributed/scoring.py, jobs/score_batch.py) on a local Ray.

One L-DiffRec checkpoint is trained for 1 epoch on small synthetic data whose
original ids differ from the indices (users "u<n>", items 1000 + 7n), then
scored through Ray Data and compared with the model's own in-process scoring.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distributed.dataset_format import DatasetError, read_users
from distributed.scoring import (ScoreOptions, ScoringError, _group_task, _histories_task, check_inputs,
                                 concat_lists, lookup_items, read_recommendations, score_batch)

REPO = Path(__file__).resolve().parents[1]
K = 20


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    from distributed.config import load_preset
    from distributed.prepare import PrepareOptions, prepare_dataset
    from distributed.sources import SourceSpec
    from distributed.synthetic import SyntheticSpec, generate
    from distributed.trainer import Resources, train

    root = tmp_path_factory.mktemp("score")
    log = generate(SyntheticSpec(n_users=300, n_items=200, n_interactions=6000))
    raw = pa.table({"user_id": pc.binary_join_element_wise("u", pc.cast(log["user_id"], pa.string()), ""),
                    "item_id": pc.add(pc.multiply(log["item_id"], 7), 1000),
                    "timestamp": log["timestamp"]})
    pq.write_table(raw, root / "raw.parquet")
    data = root / "data"
    prepare_dataset(SourceSpec("parquet", str(root / "raw.parquet")), data, PrepareOptions())
    cfg = load_preset(str(REPO / "jobs/configs/demo.yaml"), "ldiffrec").with_overrides(["train.epochs=1"])
    summary = train(str(data), cfg, Resources(workers=1), storage=str(root / "runs"), name="s")
    return {"root": root, "data": str(data), "checkpoint": summary["checkpoint"], "raw": raw}


def in_process_topk(checkpoint: str, histories: list, k: int):
    """The reference: the model's own score_topk, ids mapped through the checkpoint."""
    from distributed.checkpoint import load_item_ids, load_model
    from models.batch import HistoryBatch
    model, _, info = load_model(checkpoint)
    values, ids = model.score_topk(HistoryBatch.from_lists(histories, info["n_items"]), k)
    return load_item_ids(checkpoint).combine_chunks(), ids.numpy(), values.numpy()


def test_scores_every_user_like_the_in_process_model(trained, tmp_path):
    out = tmp_path / "recs"
    summary = score_batch(trained["checkpoint"], trained["data"], str(out), ScoreOptions(k=K, batch_size=64))
    recs = read_recommendations(out).sort_by("user_id")
    users = read_users(trained["data"]).sort_by("user_id")
    assert recs["user_id"].to_pylist() == users["user_id"].to_pylist()            # every user once
    assert summary["users_scored"] == 300 and summary["fallback_users"] == 0
    assert json.loads((out / "summary.json").read_text())["users_per_s"] > 0
    assert recs.schema.field("scores").type == pa.list_(pa.float32())
    assert not any(recs["fallback"].to_pylist())
    item_ids, ids, values = in_process_topk(trained["checkpoint"], users["train_items"].to_pylist(), K)
    got_items, got_scores = recs["item_ids"].to_pylist(), recs["scores"].to_pylist()
    catalog = set(item_ids.to_pylist())
    for u, (history, items, scores) in enumerate(zip(users["train_items"].to_pylist(), got_items, got_scores)):
        assert len(items) == K and len(set(items)) == K
        assert set(items) <= catalog                                          # original ids (1000 + 7n)
        assert not set(items) & set(item_ids.take(pa.array(history)).to_pylist())
        assert all(a >= b for a, b in zip(scores, scores[1:]))
    np.testing.assert_array_equal(np.array(got_items), item_ids.take(pa.array(ids.ravel())).to_numpy().reshape(ids.shape))
    np.testing.assert_allclose(np.array(got_scores), values, rtol=1e-5, atol=1e-5)


def test_raw_interactions_unknown_items_fallback_and_rows(trained, tmp_path):
    raw = trained["raw"]
    extra = pa.table({"user_id": ["u3", "u3", "new-user", "new-user"], "item_id": [999_999, 999_998, 999_999, 5],
                      "timestamp": [2_000_000_000] * 4})
    pq.write_table(raw.slice(0, 3000), tmp_path / "a.parquet")
    pq.write_table(pa.concat_tables([raw.slice(3000), extra]), tmp_path / "b.parquet")
    out = tmp_path / "rows"
    summary = score_batch(trained["checkpoint"], str(tmp_path), str(out), ScoreOptions(k=K, format="rows"))
    recs = read_recommendations(out)
    known = set(pq.read_table(Path(trained["checkpoint"]) / "items.parquet")["item_id"].to_pylist())
    all_items = raw["item_id"].to_pylist() + extra["item_id"].to_pylist()
    assert summary["items_skipped"] == sum(i not in known for i in all_items) > 0
    assert summary["users_scored"] == 301 and summary["fallback_users"] == 1
    assert recs.num_rows == 301 * K
    fb = recs.filter(pc.field("user_id") == "new-user").sort_by("rank")
    assert fb["fallback"].to_pylist() == [True] * K and fb["rank"].to_pylist() == list(range(1, K + 1))
    counts = pq.read_table(Path(trained["checkpoint"]) / "items.parquet").sort_by(
        [("n_train", "descending"), ("item_idx", "ascending")])
    assert fb["item_id"].to_pylist() == counts["item_id"].to_pylist()[:K]
    # A known user: history = all their interactions (train+valid+test of the prepared split, known items).
    users = read_users(trained["data"]).filter(pc.field("user_id") == "u7")
    history = [sum((users[c].to_pylist()[0] for c in ("train_items", "valid_items", "test_items")), [])]
    item_ids, ids, _ = in_process_topk(trained["checkpoint"], history, K)
    u7 = recs.filter(pc.field("user_id") == "u7").sort_by("rank")
    assert u7["item_id"].to_pylist() == item_ids.take(pa.array(ids[0])).to_pylist()
    assert not u7["fallback"].to_pylist()[0]


def test_failure_part_way_leaves_previous_output_and_no_partial_one(trained, tmp_path):
    out = tmp_path / "recs"
    out.mkdir()
    (out / "summary.json").write_text('{"old": true}')
    with pytest.raises(Exception, match="injected failure"):
        score_batch(trained["checkpoint"], trained["data"], str(out),
                    ScoreOptions(k=5, batch_size=40, overwrite=True, fail_after_batches=1))
    assert json.loads((out / "summary.json").read_text()) == {"old": True}     # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs"]              # no temp dir left


def test_killed_job_leaves_no_finished_looking_output(trained, tmp_path):
    import ray
    out = tmp_path / "recs"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs/score_batch.py"), "--checkpoint", trained["checkpoint"],
                             "--users", trained["data"], "--k", "5", "--output", str(out), "--batch-size", "20",
                             "--test-delay-per-batch", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(tmp_path.glob(".recs.tmp-*")):
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        time.sleep(3)                      # part-way through the (slowed-down) scoring
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()                # only a hidden .recs.tmp-* may remain, never recs/


def test_bad_input_gives_clear_errors(trained, tmp_path, capsys):
    ckpt, data = trained["checkpoint"], trained["data"]
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        check_inputs(str(tmp_path / "nope"), data, str(tmp_path / "o"), ScoreOptions(k=5))
    with pytest.raises(ScoringError, match="positive"):
        check_inputs(ckpt, data, str(tmp_path / "o"), ScoreOptions(k=0))
    n_items = json.loads((Path(ckpt) / "config.json").read_text())["n_items"]
    with pytest.raises(ScoringError, match=f"more than the {n_items}"):
        check_inputs(ckpt, data, str(tmp_path / "o"), ScoreOptions(k=n_items + 1))
    other = tmp_path / "other"
    shutil.copytree(data, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["n_train"] += 1
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="another dataset"):
        check_inputs(ckpt, str(other), str(tmp_path / "o"), ScoreOptions(k=5))
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_inputs(ckpt, data, str(tmp_path / "exists"), ScoreOptions(k=5))
    with pytest.raises(ScoringError, match="--users .* does not exist"):
        check_inputs(ckpt, str(tmp_path / "missing"), str(tmp_path / "o"), ScoreOptions(k=5))
    pq.write_table(pa.table({"user_id": [1], "what": [2]}), tmp_path / "odd.parquet")
    with pytest.raises(ScoringError, match="neither a user-history Parquet"):
        check_inputs(ckpt, str(tmp_path / "odd.parquet"), str(tmp_path / "o"), ScoreOptions(k=5))
    sys.path.insert(0, str(REPO / "jobs"))
    from score_batch import main
    assert main(["--checkpoint", ckpt, "--users", data, "--k", "-3", "--output", str(tmp_path / "o")]) == 2
    assert "error: --k must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- pure functions (no Ray) -----------------------------------------------------------

def test_lookup_concat_histories_and_grouping(tmp_path):
    catalog = pa.array([10, 30, 20])
    assert lookup_items(pa.array([20, 11, 10]), catalog).tolist() == [2, -1, 0]
    assert lookup_items(pa.array(["30", "x"]), catalog).tolist() == [1, -1]          # mixed types: as text
    ptr, vals = concat_lists([pa.array([[1, 2], [], [3]]), pa.array([[4], [5], []])])
    assert ptr.tolist() == [0, 3, 4, 5] and vals.tolist() == [1, 2, 4, 5, 3]
    pq.write_table(pa.table({"user_id": ["a", "b"], "item_ids": [[30, 99, 30, 10], [99]]}), tmp_path / "h.parquet")
    table, stats = _histories_task(str(tmp_path / "h.parquet"), (0,), {"user_id": "user_id", "items": "item_ids"},
                                   catalog)
    assert table["history"].to_pylist() == [[1, 0], []] and stats["unknown"] == 2
    piece = pa.table({"user_id": ["b", "a", "a", "a", "c"], "item": pa.array([0, 2, 1, 2, -1], pa.int32()),
                      "time": [5, 9, 3, 1, 0], "seq": [0, 1, 2, 3, 4], "user": [1, 0, 0, 0, 2]})
    grouped = _group_task(3, piece)
    assert grouped["user_id"].to_pylist() == ["a", "b", "c"]
    assert grouped["history"].to_pylist() == [[2, 1], [0], []]                   # time order, first kept


def test_scorer_pads_short_lists_and_masks_history(trained):
    from distributed.scoring import TopKScorer
    n_items = json.loads((Path(trained["checkpoint"]) / "config.json").read_text())["n_items"]
    scorer = TopKScorer(trained["checkpoint"], n_items, "lists", ["history"], "popular")
    everything_but_two = list(range(n_items - 2))
    out = scorer(pa.table({"user_id": ["x"], "history": pa.array([everything_but_two], pa.list_(pa.int32()))}))
    catalog = pq.read_table(Path(trained["checkpoint"]) / "items.parquet").sort_by("item_idx")["item_id"]
    assert sorted(out["item_ids"].to_pylist()[0]) == sorted(catalog.to_pylist()[-2:])
    empty = scorer(pa.table({"user_id": pa.array([], pa.string()), "history": pa.array([], pa.list_(pa.int32()))}))
    assert empty.num_rows == 0 and empty.column_names == ["user_id", "item_ids", "scores", "fallback"]


def test_scorer_prints_progress_with_time_left(trained, monkeypatch, capsys):
    import distributed.scoring as scoring
    scorer = scoring.TopKScorer(trained["checkpoint"], 5, "lists", ["history"], "popular", total_users=40, actors=2)
    monkeypatch.setattr(scoring, "PROGRESS_EVERY_S", 0.0)
    scorer(pa.table({"user_id": ["a", "b"], "history": pa.array([[0, 1], [2]], pa.list_(pa.int32()))}))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[score] this actor: 2 users,") and "left for the 40 users" in line
