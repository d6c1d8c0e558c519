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


def _lse_and_grads(fn, h, w, b, upstream):
    h, w, b = (t.detach().clone().requires_grad_() for t in (h, w, b))
    out = fn(h, w, b)
    return (out.detach(), *torch.autograd.grad(out, (h, w, b), upstream.to(out.dtype)))


def _materialised(h, w, b):
    return torch.logsumexp(F.linear(h, w, b), 1)


@pytest.mark.parametrize("scale", [1.0, 200.0])     # 200: logits far outside exp's fp32 range
def test_matches_materialised_logsumexp(scale):
    # fp32 rounds logits of size L by ~1e-7·L either way, so both fp32 paths are held
    # to float64. The fused path subtracts its shift inside the matmul's (k+2)-term
    # sums rather than once after it: a few times the materialised rounding (4.4x here)
    torch.manual_seed(1)
    h, w, b = torch.randn(64, 16) * scale, torch.randn(5000, 16), torch.randn(5000)
    upstream = torch.rand(64)
    fused = _lse_and_grads(linear_logsumexp, h, w, b, upstream)
    plain = _lse_and_grads(_materialised, h, w, b, upstream)
    exact = _lse_and_grads(_materialised, h.double(), w.double(), b.double(), upstream)
    assert torch.isfinite(fused[0]).all()
    for name, got, ref, want in zip(["lse", "grad h", "grad w", "grad b"], fused, plain, exact):
        err, ref_err = (got.double() - want).abs().max(), (ref.double() - want).abs().max()
        assert err <= 10 * ref_err + 1e-6 * want.abs().max(), f"{name}: error {err:.3g}, materialised fp32 {ref_err:.3g}"


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



def assert_running_topk_is_full_topk(h, w, b, ids, rows, cols, k):
    full = F.linear(h, w, b)
    full[rows, cols] = float("-inf")
    expected = topk(full, k, item_ids=ids)
    running = RunningTopK(h.shape[0], k, "cpu")
    linear_topk(h, w, b, ids, running, rows, cols)
    values, got = running.result()
    torch.testing.assert_close(values, expected[0])
    assert torch.equal(got, expected[1])


@pytest.mark.parametrize("k", [1, 5, 37])
def test_running_topk_over_chunks_equals_full_topk(small_chunks, k):
    torch.manual_seed(3)
    B, N = 3, 40
    h, w, b = torch.randn(B, 4), torch.randn(N, 4), torch.randn(N)
    ids = torch.randperm(1000)[:N]                        # global ids of the columns
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    cols = torch.tensor([39, 3, 17, 0, 1, 20])
    assert_running_topk_is_full_topk(h, w, b, ids, rows, cols, k)


def test_block_prefilter_equals_full_topk_with_ties(monkeypatch):
    # integer scores tie often; blocks of 2 columns and 8-column chunks make most
    # chunks take the block-max path once the threshold is tight, the rest the plain mask
    monkeypatch.setattr(fused_output, "CHUNK_ELEMENTS", 16 * 9)    # step 9 -> 8: whole blocks
    monkeypatch.setattr(fused_output, "CANDIDATE_BLOCK", 2)
    taken = []
    sparse_above = fused_output._sparse_above

    def recording_sparse_above(scores, floor):
        found = sparse_above(scores, floor)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(fused_output, "_sparse_above", recording_sparse_above)
    torch.manual_seed(5)
    B, N, k = 16, 403, 3
    h, w = torch.randint(-3, 4, (B, 3)).float(), torch.randint(-3, 4, (N, 3)).float()
    b = torch.zeros(N)
    ids = torch.randperm(5000)[:N]
    rows, cols = torch.randint(0, B, (30,)), torch.randint(0, N, (30,))
    assert_running_topk_is_full_topk(h, w, b, ids, rows, cols, k)
    assert True in taken and False in taken            # both paths ran


def test_running_topk_ties_by_lower_id_and_short_rows():
    running = RunningTopK(2, 4, "cpu")
    scores = torch.tensor([[1.0, 2.0, 2.0], [float("-inf"), 0.5, float("-inf")]])
    running.add(scores, torch.tensor([10, 7, 3]))
    running.add(torch.tensor([[2.0, 0.0], [float("-inf"), float("-inf")]]), torch.tensor([1, 5]))
    values, ids = running.result()
    assert ids.tolist() == [[1, 3, 7, 10], [7, -1, -1, -1]]
    assert values[0].tolist() == [2.0, 2.0, 2.0, 1.0]


def test_logits_far_above_the_running_value_fall_back_exactly(small_chunks):
    # fp32: the first chunks' logits are ~0, a late one 500 higher (exp overflows past ~88)
    h = torch.ones(3, 1, requires_grad=True)
    w = torch.zeros(20, 1)
    w[15:] = torch.tensor([500.0, 499.0, 0.0, 501.0, 3.0])[:, None]
    w.requires_grad_()
    b = torch.zeros(20, requires_grad=True)
    fused = linear_logsumexp(h, w, b)
    reference = torch.logsumexp(F.linear(h, w, b), 1)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, reference)
    fused.sum().backward()
    softmax = torch.softmax(F.linear(h.double(), w.double(), b.double()), 1).sum(0)
    torch.testing.assert_close(w.grad[:, 0].double(), softmax.detach(), rtol=1e-4, atol=1e-6)


def test_negative_and_zero_upstream_gradients(small_chunks):
    # the upstream gradient usually rides in the shift as log(g); g <= 0 must still be exact
    torch.manual_seed(3)
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    for upstream in (torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64),
                     torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)):
        got = torch.autograd.grad(linear_logsumexp(h, w, b), (h, w, b), upstream)
        want = torch.autograd.grad(torch.logsumexp(F.linear(h, w, b), 1), (h, w, b), upstream)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r)
