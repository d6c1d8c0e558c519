"""Checkpoint directories (DESIGN.md §3): everything scoring needs, nothing else.

    model.pt         the model's state_dict (torch.load(weights_only=True) works)
    train_state.pt   optimizer state, epoch, step, best-so-far, metric history (for resuming)
    config.json      the run config, n_items and the dataset's fingerprint
    items.parquet    item_idx → original item_id
    clusters/        item → cluster assignment and centroids (latent variants)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from distributed.config import RunConfig
from distributed.dataset_format import DatasetError
from models.recommender import DiffusionRecommender

MODEL_FILE, STATE_FILE, CONFIG_FILE, ITEMS_FILE, CLUSTERS_DIR = (
    "model.pt", "train_state.pt", "config.json", "items.parquet", "clusters")


def dataset_fingerprint(meta: dict) -> dict:
    """What must match between a checkpoint and the data it is used with."""
    return {"n_users": meta["n_users"], "n_items": meta["n_items"], "n_train": meta["n_train"],
            "source_sha256": (meta.get("source") or {}).get("sha256")}


def save_checkpoint(directory: Path, model: torch.nn.Module, config: RunConfig, meta: dict,
                    data_dir: str, clusters_dir: str | None, train_state: dict | None = None,
                    cluster_files: dict[str, bytes] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / MODEL_FILE)
    if train_state is not None:
        torch.save(train_state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps({
        "config": config.to_dict(), "n_items": meta["n_items"], "dataset": dataset_fingerprint(meta),
        "data_dir": str(data_dir)}, indent=2))
    shutil.copyfile(Path(data_dir) / "items.parquet", directory / ITEMS_FILE)
    if cluster_files:
        (directory / CLUSTERS_DIR).mkdir(exist_ok=True)
        for file_name, content in cluster_files.items():
            (directory / CLUSTERS_DIR / file_name).write_bytes(content)
    elif clusters_dir is not None:
        shutil.copytree(clusters_dir, directory / CLUSTERS_DIR, dirs_exist_ok=True)
    return directory


def read_checkpoint_config(directory: str | Path) -> dict:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists() or not (directory / MODEL_FILE).exists():
        raise FileNotFoundError(f"{directory} is not a checkpoint (needs {MODEL_FILE} and {CONFIG_FILE}); "
                                f"pass the checkpoint path printed at the end of training")
    return json.loads((directory / CONFIG_FILE).read_text())


def check_same_dataset(checkpoint_info: dict, meta: dict, where: str) -> None:
    expected, actual = checkpoint_info["dataset"], dataset_fingerprint(meta)
    if expected != actual:
        raise DatasetError(f"checkpoint {where} was trained on another dataset ({expected}) than the one "
                           f"given ({actual}); use the dataset it was trained on or train a new model")


def load_item_clusters(directory: str | Path) -> np.ndarray | None:
    path = Path(directory) / CLUSTERS_DIR
    if not path.exists():
        return None
    from clustering.io import load_clusters
    return np.asarray(load_clusters(path).assignment, dtype=np.int64)


# Model options added after checkpoints were first written, with the behaviour those
# checkpoints were trained with (their defaults have since changed).
LEGACY_MODEL_OPTIONS = {"vae_tanh_out": False, "vae_recon_target": "input"}


def load_model(directory: str | Path, device="cpu") -> tuple[DiffusionRecommender, RunConfig, dict]:
    """(model in eval mode, its run config, checkpoint info) from a checkpoint directory."""
    info = read_checkpoint_config(directory)
    model_options = info["config"].setdefault("model", {})
    for key, value in LEGACY_MODEL_OPTIONS.items():
        model_options.setdefault(key, value)
    config = RunConfig.from_dict(info["config"])
    model = DiffusionRecommender(config.model, info["n_items"], load_item_clusters(directory))
    state = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.place(None, device).eval()
    return model, config, info


def load_item_ids(directory: str | Path):
    return pq.read_table(Path(directory) / ITEMS_FILE).sort_by("item_idx")["item_id"]
