"""The chunked output layer equals the materialised one: logsumexp values and
gradients, and the masked top-k."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models.fused_output as fused_output
from models.fused_output import RunningTopK, linear_logsumexp, linear_topk
from models.metrics import topk
from models.vae import ClusterVAE
from tests.test_denoiser_vae import full_multinomial_nll, random_batch


@pytest.fixture
def small_chunks(monkeypatch):
    # 7 logits per chunk for a batch of 3: two columns per chunk, many chunks, a ragged last one
    monkeypatch.setattr(fused_output, "CHUNK_ELEMENTS", 7)


def test_gradcheck_over_many_chunks(small_chunks):
    torch.manual_seed(0)
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_logsumexp, (h, w, b))


@pytest.mark.parametrize("scale", [1.0, 200.0])     # 200: logits far outside exp's fp32 range
def test_matches_materialised_logsumexp(scale):
    torch.manual_seed(1)
    h = (torch.randn(64, 16) * scale).requires_grad_()
    w = torch.randn(5000, 16, requires_grad=True)
    b = torch.randn(5000, requires_grad=True)
    upstream = torch.rand(64)
    fused = linear_logsumexp(h, w, b)
    (fused * upstream).sum().backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    reference = torch.logsumexp(F.linear(h, w, b), 1)
    (reference * upstream).sum().backward()
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-4 * scale)
    for got, (name, t) in zip(grads, zip("hwb", (h, w, b))):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("shared", [False, True])
def test_vae_loss_gradients_equal_full_log_softmax(shared, small_chunks):
    torch.manual_seed(0)
    N = 60
    clusters = np.random.default_rng(1).integers(0, 3, N)
    clusters[:3] = np.arange(3)
    vae = ClusterVAE(clusters, latent_size=12, hidden_dims=[24], shared_decoder=shared).eval()
    batch = random_batch(11, N, seed=2)
    values = batch.weights(0.1, 1.0)
    parts = vae.split(batch, values)
    z = (vae.encode(parts).z * 3).detach()

    def grads(loss):
        vae.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}

    fused = grads(vae.multinomial_nll(z, parts))
    reference = grads(full_multinomial_nll(vae, z, batch, values))
    assert fused.keys() == reference.keys() and len(fused) > 0
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")



@pytest.mark.parametrize("k", [1, 5, 37])
def test_running_topk_over_chunks_equals_full_topk(small_chunks, k):
    torch.manual_seed(3)
    B, N = 3, 40
    h, w, b = torch.randn(B, 4), torch.randn(N, 4), torch.randn(N)
    ids = torch.randperm(1000)[:N]                        # global ids of the columns
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    cols = torch.tensor([39, 3, 17, 0, 1, 20])
    full = F.linear(h, w, b)
    full[rows, cols] = float("-inf")
    expected = topk(full, k, item_ids=ids)
    running = RunningTopK(B, k, "cpu")
    linear_topk(h, w, b, ids, running, rows, cols)
    values, got = running.result()
    torch.testing.assert_close(values, expected[0])
    assert torch.equal(got, expected[1])


def test_running_topk_ties_by_lower_id_and_short_rows():
    running = RunningTopK(2, 4, "cpu")
    scores = torch.tensor([[1.0, 2.0, 2.0], [float("-inf"), 0.5, float("-inf")]])
    running.add(scores, torch.tensor([10, 7, 3]))
    running.add(torch.tensor([[2.0, 0.0], [float("-inf"), float("-inf")]]), torch.tensor([1, 5]))
    values, ids = running.result()
    assert ids.tolist() == [[1, 3, 7, 10], [7, -1, -1, -1]]
    assert values[0].tolist() == [2.0, 2.0, 2.0, 1.0]
