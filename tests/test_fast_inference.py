"""The re-associated reverse process equals the step-by-step reference."""
import pytest
import torch

from models.denoiser import Denoiser
from models.diffusion import GaussianDiffusion


@pytest.mark.parametrize("mean_type,scale,steps", [("x0", 0.005, 40), ("eps", 0.1, 10), ("x0", 0.0, 5),
                                                   ("x0", 0.01, 1)])
def test_affine_reverse_process_matches_stepwise(mean_type, scale, steps):
    torch.manual_seed(0)
    denoiser = Denoiser(300, [64, 128]).eval()
    diffusion = GaussianDiffusion(steps, scale, 0.005, 0.01, mean_type=mean_type)
    x = (torch.rand(37, 300) < 0.05).float()
    fast = diffusion.sample(denoiser, x)
    slow = diffusion.sample_stepwise(denoiser, x)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-4)


def test_training_mode_uses_stepwise_path():
    denoiser = Denoiser(50, [16]).train()
    assert not denoiser.is_affine_in_x
    assert Denoiser(50, [16], norm=True).eval().is_affine_in_x is False
