"""Gaussian diffusion process of DiffRec (DESIGN.md §4), kept apart from the network.

Steps are 0-based in code: index ``t`` = 0..T-1 is the paper's step t+1.

Importance sampling of the training step keeps the last ``history_per_step``
(weighted) losses of every step in a ring buffer (``step_loss_history``,
``step_loss_counts``; both are buffers, so they live in the ``state_dict``).
Recording is separate from the loss: a distributed loop all-gathers
``(timesteps, step_losses)`` from every worker and calls
``record_step_losses`` with the gathered tensors on every worker, so all
workers keep the same history and sample from the same distribution.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MAX_BETA = 0.999
FIRST_BETA = 1e-5   # the reference code's beta_fixed: beta_1 pinned


def linear_variance_schedule(steps: int, noise_scale: float, noise_min: float, noise_max: float) -> dict:
    """float64 numpy arrays of the schedule (all length ``steps``).

    variance_t = s*(min + (t-1)/(T-1)*(max-min)); alpha_bar = 1 - variance;
    beta_1 = 1 - alpha_bar_1, beta_t = min(1 - alpha_bar_t/alpha_bar_{t-1}, 0.999);
    then beta_1 := 1e-5 and alphas_cumprod = cumprod(1 - beta) (as the reference).
    With noise_scale 0 there is no noise: beta = 0, alphas_cumprod = 1.
    """
    if noise_scale == 0:
        betas = np.zeros(steps)
    else:
        variance = np.linspace(noise_scale * noise_min, noise_scale * noise_max, steps, dtype=np.float64)
        alpha_bar = 1.0 - variance
        betas = np.empty(steps)
        betas[0] = 1.0 - alpha_bar[0]
        betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], MAX_BETA)
        betas[0] = FIRST_BETA
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        out = dict(
            betas=betas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
            posterior_variance=betas * (1.0 - abar_prev) / (1.0 - abar),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        )
    if noise_scale == 0:   # no posterior exists; keep finite placeholders
        for k in ("posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
            out[k] = np.zeros(steps)
    return out


class DiffusionTerms(NamedTuple):
    loss: torch.Tensor          # (B,) per-user loss, importance-corrected (divided by p_t*T)
    step_losses: torch.Tensor   # (B,) detached weighted losses, for record_step_losses
    timesteps: torch.Tensor     # (B,) int64, 0-based
    x0_pred: torch.Tensor       # (B, D) the network's estimate of x0 (with gradient)


class GaussianDiffusion(nn.Module):
    """Schedule, forward noising, posterior, x0-ELBO loss, importance sampling and
    deterministic inference. ``denoiser`` arguments are callables ``f(x_t, t)``."""

    def __init__(self, steps: int, noise_scale: float, noise_min: float, noise_max: float,
                 mean_type: str = "x0", reweight: bool = True,
                 history_per_step: int = 10, uniform_floor: float = 0.001):
        super().__init__()
        if mean_type not in ("x0", "eps"):
            raise ValueError(f"mean_type={mean_type!r}; use 'x0' or 'eps'")
        self.steps, self.noise_scale, self.mean_type = steps, noise_scale, mean_type
        self.reweight, self.history_per_step, self.uniform_floor = reweight, history_per_step, uniform_floor
        schedule = linear_variance_schedule(steps, noise_scale, noise_min, noise_max)
        for name, values in schedule.items():   # derived from the config: not saved
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)
        self.register_buffer("snr", self._snr_table(schedule), persistent=False)
        self.register_buffer("step_loss_history", torch.zeros(steps, history_per_step))
        self.register_buffer("step_loss_counts", torch.zeros(steps, dtype=torch.long))  # ever recorded
        self._warm = False   # cached "every step has a full history" (never un-warms by recording)

    @property
    def has_noise(self) -> bool:
        return self.noise_scale > 0

    @staticmethod
    def _snr_table(schedule) -> torch.Tensor:
        abar = schedule["alphas_cumprod"]
        with np.errstate(divide="ignore"):
            snr = abar / (1.0 - abar)
        return torch.tensor(np.where(np.isfinite(snr), snr, 0.0), dtype=torch.float32)

    @staticmethod
    def _take(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, ...) to broadcast against ``like``."""
        return table[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    # ---- forward process and posterior -------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        if not self.has_noise:
            return x0
        if noise is None:
            noise = torch.randn_like(x0)
        abar = self._take(self.alphas_cumprod, t, x0)
        return torch.addcmul(abar.sqrt() * x0, (1.0 - abar).sqrt(), noise)   # one pass fewer

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x0)."""
        mean = (self._take(self.posterior_mean_coef1, t, x_t) * x0
                + self._take(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._take(self.posterior_variance, t, x_t)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self._take(self.alphas_cumprod, t, x_t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def predicted_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model_output if self.mean_type == "x0" else self.x0_from_eps(x_t, t, model_output)

    # ---- importance sampling of t -----------------------------------------
    def is_warm(self) -> bool:
        """True once every step has ``history_per_step`` recorded losses."""
        if not self._warm:
            self._warm = bool((self.step_loss_counts >= self.history_per_step).all())
        return self._warm

    def step_probabilities(self) -> torch.Tensor:
        """(T,) p_t ∝ sqrt(mean(L_t^2)) mixed with the uniform floor (uniform while warming up)."""
        uniform = torch.full((self.steps,), 1.0 / self.steps, device=self.step_loss_history.device)
        if not self.is_warm():
            return uniform
        rms = self.step_loss_history.pow(2).mean(1).sqrt()
        total = rms.sum()
        p = torch.where(total > 0, rms / total.clamp_min(1e-30), uniform)
        return p * (1.0 - self.uniform_floor) + self.uniform_floor / self.steps

    def sample_timesteps(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, p_t*T): the loss of a sample is divided by p_t*T (1 when uniform)."""
        if not self.is_warm():
            t = torch.randint(0, self.steps, (batch_size,), device=device)
            return t, torch.ones(batch_size, device=device)
        p = self.step_probabilities().to(device)
        t = torch.multinomial(p, batch_size, replacement=True)
        return t, p[t] * self.steps

    @torch.no_grad()
    def record_step_losses(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Append ``losses[i]`` to the history of step ``timesteps[i]``, in order.

        Equal to a sequential ring-buffer loop, without one: samples are grouped
        by step (stable sort keeps their order), each gets its rank r in its group
        and writes slot (count_t + r) % H; only the last H of a group can survive,
        so the others are dropped first and the write has no duplicate slots.
        """
        history, counts = self.step_loss_history, self.step_loss_counts
        t = timesteps.to(counts.device).long().reshape(-1)
        values = losses.detach().to(history.device, history.dtype).reshape(-1)
        if t.numel() == 0:
            return
        H = self.history_per_step
        order = torch.sort(t, stable=True).indices
        t, values = t[order], values[order]
        group_size = torch.bincount(t, minlength=self.steps)
        group_start = torch.cumsum(group_size, 0) - group_size
        rank = torch.arange(t.numel(), device=t.device) - group_start[t]
        keep = rank >= group_size[t] - H
        t, values, rank = t[keep], values[keep], rank[keep]
        history[t, (counts[t] + rank) % H] = values
        counts += group_size
        if not self._warm:
            self._warm = bool((counts >= H).all())

    def _newest_first(self, history: torch.Tensor, counts: torch.Tensor):
        """(T, H) values newest first and their validity mask."""
        H = self.history_per_step
        j = torch.arange(H, device=history.device)
        slots = (counts[:, None] - 1 - j[None, :]) % H
        return history.gather(1, slots), j[None, :] < counts.clamp(max=H)[:, None]

    @torch.no_grad()
    def merge_step_loss_histories(self, states: list[dict]) -> None:
        """Replace this history by the merge of several workers' histories.

        ``states`` are dicts with ``step_loss_history`` and ``step_loss_counts``
        (e.g. each worker's ``state_dict()`` or the two tensors gathered).
        Counts add up; the kept values interleave the workers' newest entries
        (newest of worker 0, newest of worker 1, ..., second newest of worker 0, ...).
        """
        device, H = self.step_loss_history.device, self.history_per_step
        values, valid, counts = [], [], []
        for s in states:
            h = s["step_loss_history"].to(device, self.step_loss_history.dtype)
            c = s["step_loss_counts"].to(device).long()
            v, m = self._newest_first(h, c)
            values.append(v), valid.append(m), counts.append(c)
        values = torch.stack(values, 2).reshape(self.steps, -1)   # column j*W + w
        valid = torch.stack(valid, 2).reshape(self.steps, -1)
        position = torch.arange(values.shape[1], device=device).expand_as(values)
        first = torch.sort(torch.where(valid, position, position + values.shape[1]), 1).values[:, :H]
        first = first.clamp(max=values.shape[1] - 1)
        merged = values.gather(1, first)                        # newest first
        total = torch.stack(counts).sum(0)
        n_valid = total.clamp(max=H)
        j = torch.arange(H, device=device)
        slots = (total[:, None] - 1 - j[None, :]) % H
        new_history = torch.zeros_like(self.step_loss_history)
        new_history.scatter_(1, slots, torch.where(j[None, :] < n_valid[:, None], merged, 0.0))
        self.step_loss_history.copy_(new_history)
        self.step_loss_counts.copy_(total)
        self._warm = False

    def _load_from_state_dict(self, *args, **kwargs):
        self._warm = False   # counts may go down on load
        return super()._load_from_state_dict(*args, **kwargs)

    # ---- training loss ------------------------------------------------------
    def training_terms(self, denoiser: Callable, x0: torch.Tensor) -> DiffusionTerms:
        """Per-user x0-ELBO terms for a batch ``x0`` (B, D); does NOT record losses."""
        t, p_scaled = self.sample_timesteps(x0.shape[0], x0.device)
        noise = torch.randn_like(x0) if (self.has_noise or self.mean_type == "eps") else None
        x_t = self.q_sample(x0, t, noise)
        output = denoiser(x_t, t)
        target = x0 if self.mean_type == "x0" else noise
        mse = F.mse_loss(output, target, reduction="none").mean(1)   # fused, also in backward
        loss = mse
        if self.reweight and self.has_noise:
            first = t == 0
            if self.mean_type == "x0":   # SNR(t-1) - SNR(t), 1 at the first step
                weight = self.snr[(t - 1).clamp(min=0)] - self.snr[t]
            else:                        # the reference's eps weighting
                abar, abar_prev, beta = self.alphas_cumprod[t], self.alphas_cumprod_prev[t], self.betas[t]
                weight = (1 - abar) / ((1 - abar_prev).clamp_min(1e-12) ** 2 * (1 - beta))
                x0_pred = self.x0_from_eps(x_t, t, output)
                loss = torch.where(first, (x0 - x0_pred).pow(2).mean(1) / 2.0, mse)
            loss = torch.where(first, torch.ones_like(weight), weight) * loss
        return DiffusionTerms(loss=loss / p_scaled, step_losses=loss.detach(), timesteps=t,
                              x0_pred=self.predicted_x0(output, x_t, t))

    # ---- inference ------------------------------------------------------------
    @torch.no_grad()
    def sample(self, denoiser: Callable, x: torch.Tensor, sampling_steps: int = 0) -> torch.Tensor:
        """Deterministic reverse process: noise ``x`` to step T' (0 = as is), then
        for t = T..1 set x to the posterior mean given x̂0 = f(x, t).
        Without noise (s = 0) the model is simply applied T times."""
        if sampling_steps > 0:
            x = self.q_sample(x, torch.full((x.shape[0],), sampling_steps - 1, device=x.device))
        if getattr(denoiser, "is_affine_in_x", False):
            p, q = self.reverse_affine_coefficients()
            return denoiser.iterate_affine(x, list(reversed(range(self.steps))), p.tolist(), q.tolist())
        return self.sample_stepwise(denoiser, x)

    def reverse_affine_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, q) with one reverse step being x_{t-1} = p_t x_t + q_t f(x_t, t)
        (posterior mean given x̂0; for eps-prediction x̂0 is itself affine in x_t
        and f; without noise x_{t-1} = f)."""
        if not self.has_noise:
            return torch.zeros(self.steps, dtype=torch.float64), torch.ones(self.steps, dtype=torch.float64)
        c1 = self.posterior_mean_coef1.double().cpu()
        c2 = self.posterior_mean_coef2.double().cpu()
        if self.mean_type == "x0":
            return c2, c1
        abar = self.alphas_cumprod.double().cpu()
        return c1 / abar.sqrt() + c2, -c1 * (1.0 - abar).sqrt() / abar.sqrt()

    @torch.no_grad()
    def sample_stepwise(self, denoiser: Callable, x: torch.Tensor) -> torch.Tensor:
        """The reverse process one network call per step (reference form)."""
        for i in reversed(range(self.steps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            if not self.has_noise:
                x = denoiser(x, t)
                continue
            x0_pred = self.predicted_x0(denoiser(x, t), x, t)
            x, _ = self.q_posterior(x0_pred, x, t)
        return x
