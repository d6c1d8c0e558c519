"""Denoiser MLP and cluster VAE: shapes, sparse encoder, per-cluster softmax loss, placement."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.batch import HistoryBatch
from models.denoiser import Denoiser, timestep_embedding
from models.vae import ClusterVAE, SparseLinear, split_sizes


def random_batch(n_users, n_items, max_len=12, seed=0, allow_empty=True):
    rng = np.random.default_rng(seed)
    lo = 0 if allow_empty else 1
    lists = [rng.choice(n_items, rng.integers(lo, max_len + 1), replace=False) for _ in range(n_users)]
    return HistoryBatch.from_lists(lists, n_items)


def linear_shapes(module):
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_denoiser_layers_mirror_dims():
    N, E = 50, 10
    d = Denoiser(N, [200, 600], emb_size=E)
    # (N+emb -> 600 -> 200) then (200 -> 600 -> N); the first layer is split into x and step parts
    assert tuple(d.input_layer.weight.shape) == (600, N) and tuple(d.time_layer.weight.shape) == (600, E)
    assert [tuple(m.weight.shape) for m in d.in_layers] == [(200, 600)]
    assert [tuple(m.weight.shape) for m in d.out_layers] == [(600, 200), (N, 600)]
    d1 = Denoiser(N, [1000], emb_size=E)
    assert len(d1.in_layers) == 0 and [tuple(m.weight.shape) for m in d1.out_layers] == [(N, 1000)]
    out = d(torch.rand(7, N), torch.randint(0, 5, (7,)))
    assert out.shape == (7, N)


def test_denoiser_equals_concatenated_reference_form():
    torch.manual_seed(0)
    N, E = 30, 10
    d = Denoiser(N, [40, 20], emb_size=E, dropout=0.0).eval()
    x, t = torch.rand(5, N), torch.tensor([0, 1, 2, 3, 39])
    emb = d.time_proj(timestep_embedding(t, E))
    w = torch.cat([d.input_layer.weight, d.time_layer.weight], 1)   # the reference's Linear(N+emb, .)
    h = torch.tanh(F.linear(torch.cat([x, emb], 1), w, d.input_layer.bias))
    for layer in d.in_layers:
        h = torch.tanh(layer(h))
    h = torch.tanh(d.out_layers[0](h))
    expected = d.out_layers[1](h)                                     # linear output
    torch.testing.assert_close(d(x, t), expected)


def test_timestep_embedding_formula():
    t = torch.tensor([0, 3, 17])
    emb = timestep_embedding(t, 10)
    freqs = [math.exp(-math.log(10000) * i / 5) for i in range(5)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0, 3, 17)]
    torch.testing.assert_close(emb, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_split_sizes():
    assert split_sizes(300, [100, 200]) == [100, 200]
    sizes = split_sizes(300, [1, 5000, 3, 17])
    assert sum(sizes) == 300 and min(sizes) >= 1 and sizes[1] == max(sizes)
    assert split_sizes(5, [1, 1, 1, 1, 1]) == [1, 1, 1, 1, 1]
    assert sum(split_sizes(7, [3, 3, 3])) == 7
    with pytest.raises(ValueError):
        split_sizes(2, [1, 1, 1])


def test_sparse_encoder_equals_dense_linear():
    torch.manual_seed(0)
    N, H = 40, 16
    batch = random_batch(9, N)                       # includes users with no items
    values = batch.weights(0.2, 1.0)
    sparse = SparseLinear(N, H)
    dense = torch.nn.Linear(N, H)
    with torch.no_grad():
        dense.weight.copy_(sparse.weight.t())
        dense.bias.copy_(sparse.bias)
    counts = batch.lengths
    offsets = torch.cumsum(counts, 0) - counts
    out = sparse(offsets, batch.items, values)
    expected = dense(batch.dense(values))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad.t(), atol=1e-5, rtol=1e-5)


def full_multinomial_nll(vae, z, batch, values):
    """Reference: concatenate all logits in global order, log_softmax over N."""
    h = vae.decoder_input(z)
    logits = torch.empty(z.shape[0], vae.n_items)
    for c in range(vae.n_clusters):
        logits[:, vae.encoders[c].global_ids] = vae.cluster_logits(c, h)
    return -(F.log_softmax(logits, 1) * batch.dense(values)).sum(1).mean()


@pytest.mark.parametrize("n_clusters", [1, 4])
@pytest.mark.parametrize("shared", [False, True])
def test_per_cluster_lse_loss_equals_full_log_softmax(n_clusters, shared):
    torch.manual_seed(0)
    N = 60
    clusters = np.random.default_rng(1).integers(0, n_clusters, N)
    clusters[:n_clusters] = np.arange(n_clusters)
    vae = ClusterVAE(clusters, latent_size=12, hidden_dims=[24], shared_decoder=shared).eval()
    batch = random_batch(11, N, seed=2)
    values = batch.weights(0.1, 1.0)
    parts = vae.split(batch, values)
    z = vae.encode(parts).z * 3
    torch.testing.assert_close(vae.multinomial_nll(z, parts), full_multinomial_nll(vae, z, batch, values),
                               atol=1e-5, rtol=1e-5)


def test_encoder_latents_and_kl():
    torch.manual_seed(0)
    N = 50
    clusters = np.repeat(np.arange(3), [10, 15, 25])
    vae = ClusterVAE(clusters, latent_size=20)
    assert vae.latent_sizes == [4, 6, 10] and sum(vae.latent_sizes) == 20
    batch = random_batch(8, N, seed=3)
    parts = vae.split(batch)
    # each cluster's encoder sees exactly that cluster's items, in its local index
    cluster_of = torch.from_numpy(clusters)[batch.items]
    for c, part in enumerate(parts):
        mask = cluster_of == c
        assert torch.equal(vae.encoders[c].global_ids[part.local], batch.items[mask])
        assert torch.equal(part.rows, batch.rows[mask])
    vae.eval()
    out = vae.encode(parts)
    assert out.z.shape == (8, 20) and torch.equal(out.z, out.mu)
    kl = -0.5 * (1 + out.logvar - out.mu ** 2 - out.logvar.exp()).sum(1).mean()
    torch.testing.assert_close(out.kl, kl)
    vae.train()
    assert not torch.equal(vae.encode(parts).z, vae.encode(parts).z)     # reparameterised


@pytest.mark.parametrize("tanh_out", [True, False])
def test_encoder_output_activation(tanh_out):
    """The reference encoder ends in tanh: mean and log-variance in (-1, 1)."""
    torch.manual_seed(0)
    clusters = np.arange(30) % 2
    vae = ClusterVAE(clusters, latent_size=8, tanh_out=tanh_out).eval()
    with torch.no_grad():                       # large weights: pre-activations far outside (-1, 1)
        for enc in vae.encoders:
            enc.first.weight.mul_(50)
    out = vae.encode(vae.split(random_batch(10, 30, seed=5)))
    bounded = bool((out.mu.abs() <= 1).all() and (out.logvar.abs() <= 1).all())
    assert bounded == tanh_out


def test_encoder_returns_the_dropped_out_input():
    """encode(...).inputs: what the encoder read: items dropped to 0, kept ones
    scaled by 1/(1-p) in training; the input itself in eval mode."""
    torch.manual_seed(0)
    vae = ClusterVAE(np.arange(40) % 2, latent_size=6, dropout=0.5)
    parts = vae.split(random_batch(12, 40, seed=6))
    dropped = vae.encode(parts).inputs
    for part, seen in zip(parts, dropped):
        assert torch.equal(seen.rows, part.rows) and torch.equal(seen.local, part.local)
        assert set(seen.values.unique().tolist()) == {0.0, 2.0}
    vae.eval()
    assert all(torch.equal(seen.values, part.values) for part, seen in zip(parts, vae.encode(parts).inputs))


def test_placement_plan_on_cpu_devices():
    torch.manual_seed(0)
    N = 40
    clusters = np.arange(N) % 3
    vae = ClusterVAE(clusters, latent_size=9).eval()
    batch = random_batch(6, N, seed=4)
    parts = vae.split(batch)
    z = vae.encode(parts).z
    before = vae.multinomial_nll(z, parts)
    vae.place([torch.device("cpu")] * 3, torch.device("cpu"))
    parts = vae.split(batch)
    assert all(vae.cluster_device(c).type == "cpu" for c in range(3))
    torch.testing.assert_close(vae.multinomial_nll(vae.encode(parts).z, parts), before)
    with pytest.raises(ValueError):
        vae.place(["cpu"] * 2, "cpu")


def test_bad_cluster_arrays():
    with pytest.raises(ValueError, match="no items"):
        ClusterVAE(np.array([0, 0, 2, 2]), latent_size=6)
    with pytest.raises(ValueError):
        ClusterVAE(np.array([0, 1, 5]), latent_size=6, n_clusters=3)


def test_wide_linear_matches_f_linear_with_gradients():
    from models.denoiser import WideLinear
    torch.manual_seed(0)
    h = torch.randn(5, 7, requires_grad=True)
    w = torch.randn(30, 7, requires_grad=True)
    b = torch.randn(30, requires_grad=True)
    target = torch.randn(5, 30)
    out = WideLinear.apply(h, w, b)
    torch.testing.assert_close(out, F.linear(h, w, b))
    grads = torch.autograd.grad(F.mse_loss(out, target), (h, w, b))
    expected = torch.autograd.grad(F.mse_loss(F.linear(h, w, b), target), (h, w, b))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(WideLinear.apply, (h.double(), w.double(), b.double()))
