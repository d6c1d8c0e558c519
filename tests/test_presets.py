"""Every training preset under jobs/configs/ loads and validates for every variant."""
from pathlib import Path

import pytest
import yaml

from distributed.config import load_preset
from models.config import VARIANTS

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
PRESETS = [p for p in sorted(CONFIGS.glob("*.yaml")) if "space" not in yaml.safe_load(p.read_text())]   # not tune spaces


def test_the_presets_are_found():
    assert {p.name for p in PRESETS} >= {"demo.yaml", "ml-1m.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads_and_validates(path):
    for variant in VARIANTS:
        config = load_preset(str(path), variant)
        assert config.model.variant == variant
        config.validate(5000)


def test_ml1m_latent_presets_follow_the_reference_run():
    for variant in ("ldiffrec", "ltdiffrec"):
        m = load_preset(str(CONFIGS / "ml-1m.yaml"), variant).model
        assert m.shared_decoder and m.vae_tanh_out and m.vae_recon_target == "dropped"
        assert m.diffusion_weight(0) == pytest.approx(0.03) and m.diffusion_weight(10 ** 6) == pytest.approx(0.005)
