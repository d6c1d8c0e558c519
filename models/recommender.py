"""DiffRec, T-DiffRec, L-DiffRec and LT-DiffRec as one module (DESIGN.md §4).

``DiffusionRecommender(config, n_items, item_clusters=None)``; the variant only
switches two things: time weights (``t``) and the latent cluster-VAE path (``l``).

Training step (one worker)::

    out = model(batch, step)                 # == model.training_loss(batch, step)
    out.loss.backward(); optimizer.step(); optimizer.zero_grad()
    model.record_step_losses(out.timesteps, out.step_losses)

With DDP, call the wrapper (``ddp(batch, step)``: forward is the training loss),
all-gather ``out.timesteps`` and ``out.step_losses`` from every worker and call
``ddp.module.record_step_losses(all_t, all_losses)`` on every worker, so all
importance-sampling histories stay identical (they are buffers; set
``broadcast_buffers=False`` or keep them identical this way).

Evaluation: ``model.score_topk(batch, k, exclude)`` -> (values, ids), best
first, the batch's own history masked (plus ``exclude``); it switches to eval
mode and back by itself.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from models.batch import HistoryBatch
from models.config import ModelConfig
from models.denoiser import Denoiser
from models.fused_output import RunningTopK, linear_topk
from models.diffusion import GaussianDiffusion
from models.metrics import topk
from models.vae import ClusterVAE


class LossOutput(NamedTuple):
    loss: torch.Tensor                 # scalar to backpropagate
    parts: dict[str, torch.Tensor]     # detached scalars for logging (float() them when needed)
    timesteps: torch.Tensor            # (B,) sampled diffusion steps, 0-based
    step_losses: torch.Tensor          # (B,) detached weighted losses for the IS history


class DiffusionRecommender(nn.Module):
    def __init__(self, config: ModelConfig, n_items: int, item_clusters=None):
        super().__init__()
        if config.is_latent and item_clusters is None:
            raise ValueError(f"variant={config.variant!r} needs item_clusters (an item->cluster array)")
        if config.is_latent and len(item_clusters) != n_items:
            raise ValueError(f"item_clusters has {len(item_clusters)} entries for n_items={n_items}")
        config.validate(n_items)
        self.config, self.n_items = config, n_items
        self.vae = None
        if config.is_latent:
            self.vae = ClusterVAE(item_clusters, config.latent_size, config.vae_hidden_dims,
                                  config.vae_dropout, config.shared_decoder, n_clusters=config.n_clusters,
                                  tanh_out=config.vae_tanh_out)
        width = config.latent_size if config.is_latent else n_items
        self.denoiser = Denoiser(width, list(config.dims), config.emb_size, config.dropout, config.norm)
        self.diffusion = GaussianDiffusion(config.steps, config.noise_scale, config.noise_min, config.noise_max,
                                           config.mean_type, config.reweight, config.history_per_step,
                                           config.uniform_floor)

    # ---- devices ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The first device: denoiser, diffusion buffers, latent and losses."""
        return self.denoiser.input_layer.weight.device

    def place(self, plan: list | None, first) -> "DiffusionRecommender":
        """Put cluster c's encoder/decoder on ``plan[c]`` and the rest on ``first``.
        ``plan=None`` (or a non-latent variant) puts everything on ``first``."""
        first = torch.device(first)
        self.denoiser.to(first)
        self.diffusion.to(first)
        if self.vae is not None:
            self.vae.place([torch.device(d) for d in plan] if plan is not None
                           else [first] * self.vae.n_clusters, first)
        return self

    def param_groups(self) -> list[dict]:
        """Optimizer groups ("autoencoder", "denoiser"): the reference trains them with
        separate learning rates; pass ``lr`` per group as needed."""
        groups = [{"name": "denoiser", "params": list(self.denoiser.parameters())}]
        if self.vae is not None:
            groups.insert(0, {"name": "autoencoder", "params": list(self.vae.parameters())})
        return groups

    # ---- inputs --------------------------------------------------------------------
    def interaction_values(self, batch: HistoryBatch) -> torch.Tensor:
        """1 per interaction, or (T-variants) time weights from w_min to w_max."""
        if self.config.is_temporal:
            return batch.weights(self.config.w_min, self.config.w_max)
        return batch.weights()

    # ---- training --------------------------------------------------------------------
    def forward(self, batch: HistoryBatch, step: int = 0) -> LossOutput:
        return self.training_loss(batch, step)

    def training_loss(self, batch: HistoryBatch, step: int = 0) -> LossOutput:
        """Loss of one batch at optimisation step ``step`` (drives the γ and λ
        annealing of L-variants). Does not touch the IS history."""
        batch = batch.to(self.device)
        values = self.interaction_values(batch)
        if self.vae is None:
            x0 = batch.dense(values)            # (B, N), per batch only
            terms = self.diffusion.training_terms(self.denoiser, x0)
            loss = terms.loss.mean()
            parts = {"diffusion": loss.detach()}
        else:
            cfg = self.config
            inputs = self.vae.split(batch, values)
            encoded = self.vae.encode(inputs)
            terms = self.diffusion.training_terms(self.denoiser, encoded.z)
            diffusion_loss = terms.loss.mean()
            # decode the denoised latent; the reference scores it against the
            # dropped-out input (dropped items are not targets, kept ones weigh 1/(1-p))
            target = encoded.inputs if cfg.vae_recon_target == "dropped" else inputs
            recon = self.vae.multinomial_nll(terms.x0_pred, target)
            gamma, lam = cfg.kl_weight(step), cfg.diffusion_weight(step)
            loss = recon + gamma * encoded.kl + lam * diffusion_loss
            parts = {"recon": recon.detach(), "kl": encoded.kl.detach(),
                     "diffusion": diffusion_loss.detach()}
        parts["loss"] = loss.detach()
        return LossOutput(loss, parts, terms.timesteps, terms.step_losses)

    def record_step_losses(self, timesteps: torch.Tensor, step_losses: torch.Tensor) -> None:
        """Update the importance-sampling history (after an all-gather under DDP)."""
        self.diffusion.record_step_losses(timesteps, step_losses)

    # ---- inference ---------------------------------------------------------------------
    @torch.no_grad()
    def denoised(self, batch: HistoryBatch) -> torch.Tensor:
        """The reverse process output: (B, N) for DiffRec, (B, latent) for L-variants."""
        batch = batch.to(self.device)
        values = self.interaction_values(batch)
        if self.vae is None:
            start = batch.dense(values)
        else:
            start = self.vae.encode(self.vae.split(batch, values)).z   # mean in eval mode
        return self.diffusion.sample(self.denoiser, start, self.config.sampling_steps)

    @torch.no_grad()
    def scores(self, batch: HistoryBatch) -> torch.Tensor:
        """(B, N) unmasked scores in global item order (tests, small catalogs only)."""
        with _eval_mode(self):
            out = self.denoised(batch)
            if self.vae is None:
                return out
            h = self.vae.decoder_input(out)
            full = torch.empty(out.shape[0], self.n_items, device=out.device)
            for c in range(self.vae.n_clusters):
                full[:, self.vae.encoders[c].global_ids.to(out.device)] = self.vae.cluster_logits(c, h).to(out.device)
            return full

    @torch.no_grad()
    def score_topk(self, batch: HistoryBatch, k: int, exclude: HistoryBatch | None = None):
        """Full-catalog top-``k`` (values, global item ids), best first, ties by lower id.

        The batch's own items are masked, and ``exclude``'s items too (e.g. train +
        valid at test time). L-variants rank cluster by cluster, in cache-sized item
        chunks, and merge the candidates, so peak memory follows batch × k × chunks.
        """
        with _eval_mode(self):
            out = self.denoised(batch)
            masked = [batch.to(out.device)] + ([exclude.to(out.device)] if exclude is not None else [])
            if self.vae is None:
                for m in masked:
                    out[m.rows, m.items] = float("-inf")
                return topk(out, k)
            h = self.vae.decoder_input(out)
            mask_parts = [self.vae.split(m) for m in masked]
            # one running top-k over every cluster's item chunks: the (B, N_c) logits are never stored
            running = RunningTopK(batch.size, min(k, self.n_items), h.device)
            for c in range(self.vae.n_clusters):
                hidden, weight, bias = self.vae.cluster_head(c, h)
                rows = torch.cat([parts[c].rows for parts in mask_parts])
                cols = torch.cat([parts[c].local for parts in mask_parts])
                linear_topk(hidden, weight, bias, self.vae.encoders[c].global_ids, running, rows, cols)
            return running.result()


class _eval_mode:
    """Context manager: eval mode inside, the previous mode restored after."""

    def __init__(self, module: nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)
