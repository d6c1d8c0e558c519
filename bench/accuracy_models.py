"""Diffusion models for bench/accuracy.py: each variant trained through the
real training job (Ray Train, 1 worker) with the dataset's preset
(``jobs/configs/<dataset>.yaml``; ``ml-1m.yaml`` for the shared split)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def preset_for(data_dir: str) -> Path:
    name = os.environ.get("DIFFREC_BENCH_PRESET")
    if name:
        return Path(name)
    return REPO / "jobs" / "configs" / "ml-1m.yaml"


def run_model(variant: str, data_dir: str, overrides: list[str] | None = None) -> dict:
    from distributed.config import load_preset
    from distributed.trainer import Resources, train

    config = load_preset(preset_for(data_dir), variant).with_overrides(overrides or [])
    storage = os.environ.get("DIFFREC_BENCH_STORAGE") or tempfile.mkdtemp(prefix="bench-acc-")
    summary = train(data_dir, config, Resources(workers=1), storage=storage, name=f"bench-{variant}")
    return {"test": summary["test"], "valid": summary["best_valid"], "epochs": summary["epochs"],
            "best_epoch": summary["best_epoch"], "train_s_per_epoch": summary["train_s_per_epoch"],
            "score_s": summary["score_s"], "checkpoint": summary["checkpoint"]}
