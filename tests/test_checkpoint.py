"""Checkpoints written before an option existed load with the behaviour they were trained with."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distributed.checkpoint import CONFIG_FILE, LEGACY_MODEL_OPTIONS, load_model, save_checkpoint
from distributed.config import RunConfig
from models.recommender import DiffusionRecommender

N_ITEMS = 40


def write_checkpoint(tmp_path, config: RunConfig):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"item_idx": np.arange(N_ITEMS), "item_id": [f"i{i}" for i in range(N_ITEMS)]}),
                   data / "items.parquet")
    model = DiffusionRecommender(config.model, N_ITEMS)
    meta = {"n_items": N_ITEMS, "n_users": 10, "n_train": 100}
    return save_checkpoint(tmp_path / "ckpt", model, config, meta, str(data), None), model


def test_checkpoint_round_trip_keeps_the_options(tmp_path):
    config = RunConfig()
    config.model.vae_tanh_out, config.model.vae_recon_target = False, "input"   # not the defaults
    directory, model = write_checkpoint(tmp_path, config)
    loaded, loaded_config, info = load_model(directory)
    assert loaded_config.model == config.model and info["n_items"] == N_ITEMS
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_checkpoint_without_newer_options_loads_their_old_behaviour(tmp_path):
    directory, _ = write_checkpoint(tmp_path, RunConfig())
    info = json.loads((directory / CONFIG_FILE).read_text())
    for key in LEGACY_MODEL_OPTIONS:
        del info["config"]["model"][key]                      # as written before the options existed
    (directory / CONFIG_FILE).write_text(json.dumps(info))
    _, loaded_config, _ = load_model(directory)
    assert loaded_config.model.vae_tanh_out is False and loaded_config.model.vae_recon_target == "input"
    assert RunConfig().model.vae_tanh_out is True    # what a checkpoint of today gets without the legacy fill
