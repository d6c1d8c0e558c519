"""One typed configuration for a run: model, training, clustering, resources.

Sources, later ones winning: the dataclass defaults → a YAML preset
(``jobs/configs/*.yaml``; either one config, or one section per variant picked
by ``--model``) → command-line ``key=value`` overrides (``model.steps=40``, or
just ``steps=40`` when the name is unique). The same object is saved in every
checkpoint and is what Ray Tune's ``train_loop_config`` carries (``to_dict``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from models.config import VARIANTS, ModelConfig

SELECT_METRICS = ("recall@20", "ndcg@20")


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 400
    lr: float = 1e-3                   # the denoiser's (DiffRec) or the autoencoder's (L-variants)
    lr_denoiser: float | None = None   # L-variants: the denoiser's own rate (None = lr)
    weight_decay: float = 0.0
    eval_every: int = 1                # evaluate on validation every k epochs; 0 = never (train
                                       # only, checkpoint every epoch; rank with the scoring job)
    patience: int = 10                 # stop after this many evaluations without improvement
    select_metric: str = "recall@20"   # model selection on validation, never on test
    eval_batch_size: int = 1024
    test_input: str = "train"          # "train" (paper protocol) or "train+valid" (another protocol)
    seed: int = 1
    keep_checkpoints: int = 2          # best-N by validation are kept

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size={self.batch_size} must be >= 1, e.g. 400")
        if self.epochs < 1:
            raise ValueError(f"train.epochs={self.epochs} must be >= 1")
        if self.lr <= 0 or (self.lr_denoiser is not None and self.lr_denoiser <= 0):
            raise ValueError("train.lr and train.lr_denoiser must be > 0, e.g. 1e-3")
        if self.eval_every < 0 or self.patience < 1:
            raise ValueError("train.eval_every must be >= 0 (0 = never evaluate) and train.patience >= 1")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"train.select_metric={self.select_metric!r}; use one of {SELECT_METRICS}")
        if self.test_input not in ("train", "train+valid"):
            raise ValueError("train.test_input must be 'train' or 'train+valid'")
        if self.keep_checkpoints < 1:
            raise ValueError("train.keep_checkpoints must be >= 1")


@dataclass
class ClusteringConfig:
    embedding: str = "svd"      # "svd" (of the training interactions) or a .npy / .parquet path
    svd_dim: int = 64
    seed: int = 0
    niter: int = 25


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)

    SECTIONS = ("model", "train", "clustering")

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": asdict(self.train),
                "clustering": asdict(self.clustering)}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        unknown = sorted(set(values) - set(cls.SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; sections are {list(cls.SECTIONS)}")
        return cls(model=ModelConfig.from_dict(values.get("model", {})),
                   train=_build(TrainConfig, values.get("train", {}), "train"),
                   clustering=_build(ClusteringConfig, values.get("clustering", {}), "clustering"))

    def validate(self, n_items: int | None = None) -> "RunConfig":
        self.model.validate(n_items)
        self.train.validate()
        return self

    def with_overrides(self, overrides: list[str] | dict) -> "RunConfig":
        """Apply ``key=value`` strings (or a {key: value} dict, as Tune passes)."""
        data = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
        for key, value in items:
            section, name = _resolve_key(key)
            data[section][name] = value
        return RunConfig.from_dict(data)


def _build(cls, values: dict, section: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {section} option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def _split_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value, e.g. model.steps=40 or lr=5e-4")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _section_fields() -> dict[str, set[str]]:
    return {"model": {f.name for f in fields(ModelConfig)}, "train": {f.name for f in fields(TrainConfig)},
            "clustering": {f.name for f in fields(ClusteringConfig)}}


def _resolve_key(key: str) -> tuple[str, str]:
    by_section = _section_fields()
    if "." in key:
        section, name = key.split(".", 1)
        if section not in by_section or name not in by_section[section]:
            raise ValueError(f"unknown option {key!r}; see `python jobs/train_ldiffrec.py --help-config`")
        return section, name
    owners = [s for s, names in by_section.items() if key in names]
    if not owners:
        raise ValueError(f"unknown option {key!r}; see `python jobs/train_ldiffrec.py --help-config`")
    if len(owners) > 1:
        raise ValueError(f"option {key!r} exists in {owners}; write it as {owners[0]}.{key}")
    return owners[0], key


def load_preset(path: str | Path | None, variant: str | None = None) -> RunConfig:
    """A YAML preset: either one config (sections model/train/clustering) or one
    such config per variant (top-level keys diffrec, ldiffrec, ...)."""
    if path is None:
        config = RunConfig()
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config preset {path} does not exist; see jobs/configs/ for presets")
        data = yaml.safe_load(path.read_text()) or {}
        if set(data) & set(VARIANTS):
            chosen = variant or next(iter(data))
            if chosen not in data:
                raise ValueError(f"preset {path} has no section for --model {chosen}; it has {sorted(data)}")
            data = data[chosen]
        config = RunConfig.from_dict(data)
    if variant is not None:
        config.model.variant = variant
    return config
