"""Distributed training on a local Ray cluster (one Ray for the module): every
variant on 2 workers, 1- vs 2-worker evaluation, resume after a crash, a
worker killed mid-run, and the checks made before any worker starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed.config import load_preset
from distributed.dataset_format import DatasetError, read_users
from distributed.prepare import prepare_dataset
from distributed.sources import SourceSpec
from distributed.synthetic import SyntheticSpec
from distributed.trainer import Resources, evaluate_checkpoint, train, validate_run
from models.evaluation import evaluate
from models.config import VARIANTS

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
SMALL = ["train.batch_size=64", "model.latent_size=32", "model.dims=[32]", "model.n_clusters=3",
         "clustering.svd_dim=16"]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("data") / "syn"
    # 301 users: not divisible by the worker count
    prepare_dataset(SourceSpec("synthetic", synthetic=SyntheticSpec(n_users=301, n_items=150,
                                                                    n_interactions=9000, seed=4)), out)
    return str(out)


def config(variant, *overrides):
    return load_preset(DEMO, variant).with_overrides(SMALL + list(overrides))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    return {v: train(data, config(v, "train.epochs=2"), Resources(workers=2), storage=str(storage), name=v)
            for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_on_two_workers(runs, variant):
    summary = runs[variant]
    assert summary["epochs"] == 2
    for split in ("best_valid", "test"):
        assert 0.0 < summary[split]["recall@20"] <= 1.0
        assert set(summary[split]) >= {"recall@20", "ndcg@20", "precision@20", "mrr@20", "recall@100"}
    ckpt = Path(summary["checkpoint"])
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert (ckpt / "items.parquet").exists() and (ckpt / "config.json").exists()
    assert (ckpt / "clusters").exists() == variant.startswith("l")
    run_dir = Path(summary["run_dir"])
    for name in ("summary.json", "metrics.csv", "metrics.jsonl", "training_curves.png"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "tensorboard").iterdir())
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert {"best_valid", "test", "epochs", "wall_s", "train_s_per_epoch", "score_s", "checkpoint"} <= set(on_disk)


def test_one_and_two_worker_evaluation_agree(runs, data, tmp_path):
    ckpt = runs["ldiffrec"]["checkpoint"]
    one = evaluate_checkpoint(data, ckpt, Resources(workers=1), storage=str(tmp_path))
    two = evaluate_checkpoint(data, ckpt, Resources(workers=2), storage=str(tmp_path))
    assert one["valid_users"] == two["valid_users"] == 301 - 0  # nobody dropped
    for key in ("valid/recall@20", "valid/ndcg@20", "test/recall@20", "test/ndcg@100", "test/mrr@10"):
        assert one[key] == pytest.approx(two[key], abs=1e-9), key
    # and both equal an in-process evaluation of the same weights
    from distributed.checkpoint import load_model
    model, cfg, info = load_model(ckpt)
    ref = evaluate(lambda b, k: model.score_topk(b, k)[1], read_users(data), info["n_items"])
    assert one["test/recall@20"] == pytest.approx(ref["test"]["recall@20"], abs=1e-9)
    assert one["valid/ndcg@20"] == pytest.approx(ref["valid"]["ndcg@20"], abs=1e-9)


def test_killed_run_resumes_from_its_checkpoint(data, tmp_path):
    cfg = config("tdiffrec", "train.epochs=4")
    marker = tmp_path / "killed"
    with pytest.raises(Exception):   # the whole run dies at the start of epoch 3 (no restarts allowed)
        train(data, cfg, Resources(workers=2, max_failures=0), storage=str(tmp_path), name="r",
              kill_worker=f"3:0:{marker}")
    assert marker.exists()
    saved = sorted(p for p in (tmp_path / "r").glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(saved) <= 2
    before = torch.load(saved[0] / "train_state.pt", weights_only=False)["history"][0]
    # Ray restores only what its controller had registered in this snapshot, which a kill
    # right after a report can leave behind; without it the checkpoints on disk must do.
    (tmp_path / "r" / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
    summary = train(data, cfg, Resources(workers=2), storage=str(tmp_path), name="r")
    history = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and summary["epochs"] == 4
    assert history[0]["train_s"] == before["train_s"]          # epoch 1 was not run again
    assert history[-1]["step"] == 4 * history[0]["step"]       # the step counter continued


def test_worker_killed_during_training_is_restarted(data, tmp_path):
    marker = tmp_path / "killed"
    # eval_every=0: no validation pass, a checkpoint every epoch (what large-catalog runs use)
    summary = train(data, config("diffrec", "train.epochs=3", "train.eval_every=0"),
                    Resources(workers=2, max_failures=2), storage=str(tmp_path), name="f",
                    kill_worker=f"2:1:{marker}")
    assert marker.exists() and summary["epochs"] == 3
    assert summary["best_valid"] is None and summary["test"] is None
    assert summary["checkpoint"] == summary["last_checkpoint"]
    assert torch.load(Path(summary["checkpoint"]) / "train_state.pt", weights_only=False)["epoch"] == 3


@pytest.mark.parametrize("override,match", [
    ("model.w_min=1.0", "w_min"), ("model.noise_min=0.02", "noise_min"), ("train.batch_size=0", "batch_size"),
    ("model.n_clusters=151", "n_clusters"), ("model.bogus=1", "unknown"), ("train.eval_every=-1", "eval_every"),
])
def test_invalid_config_rejected_before_workers(data, override, match):
    with pytest.raises(ValueError, match=match):
        validate_run(data, config("ltdiffrec", override), Resources(workers=1))


def test_bad_dataset_and_too_many_workers(data, tmp_path):
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        validate_run(str(tmp_path), config("diffrec"), Resources(workers=1))
    with pytest.raises(ValueError, match="more than the 301 users"):
        validate_run(data, config("diffrec"), Resources(workers=302))


def test_checkpoint_from_another_dataset_is_refused(runs, tmp_path):
    other = tmp_path / "other"
    prepare_dataset(SourceSpec("synthetic", synthetic=SyntheticSpec(n_users=120, n_items=150,
                                                                    n_interactions=3000, seed=9)), other)
    with pytest.raises(DatasetError, match="another dataset"):
        evaluate_checkpoint(str(other), runs["diffrec"]["checkpoint"], Resources(workers=1))
