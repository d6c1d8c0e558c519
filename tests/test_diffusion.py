"""Diffusion process: schedule, noising, posterior, loss weights, importance sampling."""
import math

import numpy as np
import pytest
import torch

from models.diffusion import GaussianDiffusion, linear_variance_schedule


def make(steps=5, s=1.0, lo=0.1, hi=0.5, **kw):
    return GaussianDiffusion(steps, s, lo, hi, **kw)


def closed_form_schedule(T, s, lo, hi):
    """Written from the formula, one step at a time."""
    variance = [s * (lo + (t - 1) / (T - 1) * (hi - lo)) if T > 1 else s * lo for t in range(1, T + 1)]
    abar = [1 - v for v in variance]
    betas = [1 - abar[0]] + [min(1 - abar[t] / abar[t - 1], 0.999) for t in range(1, T)]
    betas[0] = 1e-5
    abar_fixed, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        abar_fixed.append(prod)
    return np.array(betas), np.array(abar_fixed)


@pytest.mark.parametrize("T,s,lo,hi", [(5, 1.0, 0.1, 0.5), (40, 0.005, 0.005, 0.01), (1, 0.1, 0.001, 0.02),
                                       (3, 1.0, 0.1, 0.999)])
def test_schedule_matches_closed_form(T, s, lo, hi):
    betas, abar = closed_form_schedule(T, s, lo, hi)
    got = linear_variance_schedule(T, s, lo, hi)
    np.testing.assert_allclose(got["betas"], betas, rtol=1e-12)
    np.testing.assert_allclose(got["alphas_cumprod"], abar, rtol=1e-12)
    assert got["betas"].max() <= 0.999
    d = GaussianDiffusion(T, s, lo, hi)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-6)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(d.posterior_mean_coef1.numpy(), betas * np.sqrt(abar_prev) / (1 - abar), rtol=1e-5)
    np.testing.assert_allclose(d.posterior_mean_coef2.numpy(),
                               (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar), rtol=1e-5)


def test_forward_noising_statistics():
    torch.manual_seed(0)
    d = make()
    x0 = torch.tensor([0.0, 1.0, -2.0, 0.5])
    for t in (0, 2, 4):
        xt = d.q_sample(x0.expand(200_000, 4), torch.full((200_000,), t))
        abar = float(d.alphas_cumprod[t])
        torch.testing.assert_close(xt.mean(0), math.sqrt(abar) * x0, atol=0.01, rtol=0)
        torch.testing.assert_close(xt.var(0), torch.full((4,), 1 - abar), atol=0.01, rtol=0.03)


def test_posterior_matches_bayes():
    d = make(steps=6)
    torch.manual_seed(1)
    x0, xt = torch.randn(6, 3), torch.randn(6, 3)
    t = torch.arange(6)
    mean, var = d.q_posterior(x0, xt, t)
    schedule = linear_variance_schedule(6, 1.0, 0.1, 0.5)   # float64: 1 - abar_1 is 1e-5
    betas = torch.from_numpy(schedule["betas"])
    abar_prev = torch.from_numpy(schedule["alphas_cumprod_prev"])
    # prior x_{t-1} ~ N(sqrt(abar_prev) x0, 1-abar_prev); likelihood x_t ~ N(sqrt(1-beta) x_{t-1}, beta)
    for i in range(1, 6):
        precision = 1 / (1 - abar_prev[i]) + (1 - betas[i]) / betas[i]
        bayes_var = 1 / precision
        bayes_mean = bayes_var * (abar_prev[i].sqrt() * x0[i].double() / (1 - abar_prev[i])
                                  + (1 - betas[i]).sqrt() * xt[i].double() / betas[i])
        torch.testing.assert_close(mean[i].double(), bayes_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var[i].double().flatten()[0], bayes_var, rtol=1e-4, atol=1e-8)
    # first step: the posterior is x0 itself
    torch.testing.assert_close(mean[0], x0[0], atol=1e-5, rtol=0)
    assert float(var[0]) == 0.0


def test_eps_conversion_inverts_noising():
    d = make(mean_type="eps")
    x0, noise, t = torch.randn(5, 4), torch.randn(5, 4), torch.arange(5)
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predicted_x0(noise, xt, t), x0, atol=1e-4, rtol=1e-4)


def test_reweighted_loss_values():
    torch.manual_seed(0)
    d = make(steps=4, reweight=True)
    x0 = torch.randn(64, 3)
    terms = d.training_terms(lambda x, t: torch.zeros_like(x), x0)   # uniform phase: p*T = 1
    mse = x0.pow(2).mean(1)
    abar = torch.from_numpy(linear_variance_schedule(4, 1.0, 0.1, 0.5)["alphas_cumprod"])
    snr = abar / (1 - abar)
    t = terms.timesteps
    weight = torch.where(t == 0, torch.ones(64, dtype=torch.float64), snr[(t - 1).clamp(min=0)] - snr[t])
    torch.testing.assert_close(terms.step_losses.double(), weight * mse.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms.loss, terms.step_losses)
    assert set(t.tolist()) == {0, 1, 2, 3}


def naive_reference_update(history, counts, ts, losses, H):
    """The reference code's sequential FIFO update (shift left, append)."""
    history, counts = history.clone(), counts.clone()
    for t, loss in zip(ts.tolist(), losses.tolist()):
        if counts[t] == H:
            history[t, :-1] = history[t, 1:].clone()
            history[t, -1] = loss
        else:
            history[t, counts[t]] = loss
            counts[t] += 1
    return history, counts


def naive_ring_update(history, counts, ts, losses, H):
    history, counts = history.clone(), counts.clone()
    for t, loss in zip(ts.tolist(), losses.tolist()):
        history[t, counts[t] % H] = loss
        counts[t] += 1
    return history, counts


def test_vectorised_history_update_equals_sequential_loop():
    torch.manual_seed(0)
    T, H = 4, 10
    d = make(steps=T)
    ref_h, ref_c = torch.zeros(T, H), torch.zeros(T, dtype=torch.long)
    ring_h, ring_c = torch.zeros(T, H), torch.zeros(T, dtype=torch.long)
    # repeated steps in a batch, a batch with > H entries of one step, and a tiny batch
    batches = [torch.tensor([1, 1, 1, 3]), torch.full((27,), 2), torch.randint(0, T, (50,)),
               torch.tensor([0]), torch.randint(0, T, (33,))]
    for ts in batches:
        losses = torch.rand(ts.numel())
        d.record_step_losses(ts, losses)
        ref_h, ref_c = naive_reference_update(ref_h, ref_c, ts, losses, H)
        ring_h, ring_c = naive_ring_update(ring_h, ring_c, ts, losses, H)
    torch.testing.assert_close(d.step_loss_history, ring_h)
    assert torch.equal(d.step_loss_counts, ring_c)
    # same kept values as the reference's FIFO (order inside a row is irrelevant to p_t)
    torch.testing.assert_close(torch.sort(d.step_loss_history, 1).values, torch.sort(ref_h, 1).values)
    assert torch.equal(d.step_loss_counts.clamp(max=H), ref_c)


def test_importance_probabilities_hand_computed():
    T, H = 3, 10
    d = make(steps=T, history_per_step=H, uniform_floor=0.001)
    d.record_step_losses(torch.zeros(H, dtype=torch.long), torch.full((H,), 1.0))
    d.record_step_losses(torch.ones(H, dtype=torch.long), torch.full((H,), 2.0))
    d.record_step_losses(torch.full((H - 1,), 2), torch.tensor([0.0, 3.0] * 4 + [0.0]))
    assert not d.is_warm()
    torch.testing.assert_close(d.step_probabilities(), torch.full((T,), 1 / 3))
    t, p_scaled = d.sample_timesteps(8, "cpu")
    assert torch.equal(p_scaled, torch.ones(8))
    d.record_step_losses(torch.tensor([2]), torch.tensor([3.0]))   # step 2: five 0s, five 3s
    assert d.is_warm()
    rms = np.array([1.0, 2.0, math.sqrt(4.5)])
    expected = rms / rms.sum() * 0.999 + 0.001 / 3
    np.testing.assert_allclose(d.step_probabilities().numpy(), expected, rtol=1e-6)
    torch.manual_seed(0)
    t, p_scaled = d.sample_timesteps(20_000, "cpu")
    np.testing.assert_allclose(p_scaled.numpy(), expected[t.numpy()] * T, rtol=1e-6)
    np.testing.assert_allclose(np.bincount(t.numpy(), minlength=T) / 20_000, expected, atol=0.015)


def test_history_is_a_state_dict_buffer():
    d = make(steps=3)
    d.record_step_losses(torch.tensor([0, 1, 2] * 10), torch.rand(30))
    other = make(steps=3)
    assert not other.is_warm()
    other.load_state_dict(d.state_dict())
    assert other.is_warm()
    torch.testing.assert_close(other.step_probabilities(), d.step_probabilities())
    assert set(d.state_dict()) == {"step_loss_history", "step_loss_counts"}


def test_merge_histories():
    T, H = 2, 4
    a, b, merged = (make(steps=T, history_per_step=H) for _ in range(3))
    a.record_step_losses(torch.zeros(3, dtype=torch.long), torch.tensor([1.0, 2.0, 3.0]))
    b.record_step_losses(torch.zeros(3, dtype=torch.long), torch.tensor([10.0, 11.0, 12.0]))
    b.record_step_losses(torch.ones(6, dtype=torch.long), torch.arange(6.0))   # wraps the ring
    merged.merge_step_loss_histories([a.state_dict(), b.state_dict()])
    assert merged.step_loss_counts.tolist() == [6, 6]
    newest_first, valid = merged._newest_first(merged.step_loss_history, merged.step_loss_counts)
    assert newest_first[0].tolist() == [3.0, 12.0, 2.0, 11.0]     # interleaved, newest first
    assert newest_first[1].tolist() == [5.0, 4.0, 3.0, 2.0]       # only b had step 1
    assert bool(valid.all())
    # merging one history is the identity
    same = make(steps=T, history_per_step=H)
    same.merge_step_loss_histories([b.state_dict()])
    torch.testing.assert_close(same.step_loss_history, b.step_loss_history)
    assert torch.equal(same.step_loss_counts, b.step_loss_counts)
    # a new record then lands where a sequential loop would put it
    same.record_step_losses(torch.tensor([1]), torch.tensor([9.0]))
    b.record_step_losses(torch.tensor([1]), torch.tensor([9.0]))
    torch.testing.assert_close(same.step_loss_history, b.step_loss_history)


def test_inference_is_the_deterministic_posterior_chain():
    torch.manual_seed(0)
    d = make(steps=4)
    layer = torch.nn.Linear(3, 3)
    f = lambda x, t: layer(x) * (1 + t[:, None].float() / 10)
    x = torch.randn(5, 3)
    out = d.sample(f, x, sampling_steps=0)
    expected = x
    with torch.no_grad():
        for i in (3, 2, 1, 0):
            t = torch.full((5,), i)
            expected, _ = d.q_posterior(f(expected, t), expected, t)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(d.sample(f, x, 0), out)             # deterministic
    assert torch.isfinite(d.sample(f, x, sampling_steps=4)).all()   # noised start


def test_noise_scale_zero_applies_the_model_T_times():
    d = GaussianDiffusion(steps=5, noise_scale=0.0, noise_min=0.001, noise_max=0.02)
    x = torch.randn(4, 3)
    torch.testing.assert_close(d.sample(lambda x, t: x + 1, x, 0), x + 5)
    torch.testing.assert_close(d.q_sample(x, torch.zeros(4, dtype=torch.long)), x)
    terms = d.training_terms(lambda x, t: torch.zeros_like(x), x)
    torch.testing.assert_close(terms.step_losses, x.pow(2).mean(1))   # weight 1, no noise


@pytest.mark.parametrize("mean_type", ["x0", "eps"])
def test_single_step_works(mean_type):
    d = GaussianDiffusion(steps=1, noise_scale=0.1, noise_min=0.001, noise_max=0.02, mean_type=mean_type)
    x = torch.randn(6, 3)
    terms = d.training_terms(lambda x, t: x * 0.5, x)
    assert torch.isfinite(terms.loss).all() and torch.isfinite(terms.x0_pred).all()
    assert torch.isfinite(d.sample(lambda x, t: x * 0.5, x, 1)).all()
    d.record_step_losses(terms.timesteps, terms.step_losses)
    assert d.is_warm() is False or d.step_probabilities().tolist() == [1.0]
