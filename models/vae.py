"""Cluster VAE of L-DiffRec (DESIGN.md §4).

Items are split into C clusters (an item->cluster array given to the
constructor; this module never clusters). Cluster c owns an encoder from its
N_c items to a latent slice (size ∝ N_c, mean and log-variance) and, by
default, a decoder from that slice back to its N_c items; ``shared_decoder``
instead uses one decoder from the full latent to all N items (the reference
ML-1M setting), whose output rows are still taken cluster by cluster.

Memory and compute follow batch × largest cluster:
- the encoder's first layer reads the sparse history (``embedding_bag``), so
  its cost follows the interactions, not N_c;
- the multinomial log-likelihood over all N items is assembled from
  per-cluster log-sum-exps (``fused_output``: computed in cache-sized item chunks,
  the B × N_c logits are never stored) and, for the interacted items' logits,
  one ``embedding_bag`` of decoder rows per user.

Cluster c's encoder/decoder may sit on its own device (``place``); the
latent, the loss and everything shared live on the ``first`` device.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.batch import HistoryBatch
from models.denoiser import xavier_normal_
from models.fused_output import linear_logsumexp


def split_sizes(total: int, counts) -> list[int]:
    """Integer shares of ``total`` proportional to ``counts``: each >= 1, sum == total."""
    counts = np.asarray(counts, dtype=np.float64)
    if total < len(counts):
        raise ValueError(f"cannot give {len(counts)} clusters >= 1 unit each out of {total}")
    raw = total * counts / counts.sum()
    sizes = np.maximum(1, np.floor(raw)).astype(np.int64)
    while sizes.sum() < total:                     # at most C rounds
        sizes[np.argmax(raw - sizes)] += 1
    while sizes.sum() > total:
        sizes[np.argmax(np.where(sizes > 1, sizes - raw, -np.inf))] -= 1
    return sizes.tolist()


class SparseLinear(nn.Module):
    """Linear layer on a sparse input given as (bag offsets, column indices, values).

    ``weight`` is (n_in, n_out), i.e. the transpose of ``nn.Linear.weight``, because
    that is the table layout ``embedding_bag`` reads rows from.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))
        std = (2.0 / (n_in + n_out)) ** 0.5
        nn.init.normal_(self.weight, 0.0, std)
        nn.init.normal_(self.bias, 0.0, 0.001)

    def forward(self, offsets: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        out = F.embedding_bag(indices, self.weight, offsets, mode="sum", per_sample_weights=values)
        return out + self.bias


class ClusterInput(NamedTuple):
    """The part of a batch that falls into one cluster, on that cluster's device."""
    rows: torch.Tensor      # (nnz_c,) user-in-batch of each interaction (sorted)
    local: torch.Tensor     # (nnz_c,) item index within the cluster
    values: torch.Tensor    # (nnz_c,) interaction weight
    offsets: torch.Tensor   # (B,) start of each user's run, for embedding_bag
    items: torch.Tensor     # (nnz_c,) global item index (for the shared decoder's rows)


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with tanh between them (none after the last)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = nn.Linear(a, b)
        xavier_normal_(layer)
        layers += [layer] if i == len(sizes) - 2 else [layer, nn.Tanh()]
    return nn.Sequential(*layers)


class ClusterEncoder(nn.Module):
    """Sparse N_c items -> (hidden, tanh)* -> 2*d_c (mean, log-variance), with a
    last tanh when ``tanh_out`` (as the reference code: both bounded to (-1, 1))."""

    def __init__(self, n_items: int, hidden: list[int], latent: int, tanh_out: bool = True):
        super().__init__()
        sizes = hidden + [2 * latent]
        self.first = SparseLinear(n_items, sizes[0])
        self.rest = mlp(sizes) if len(sizes) > 1 else nn.Sequential()
        self.latent, self.tanh_out = latent, tanh_out

    def forward(self, part: ClusterInput):
        h = self.first(part.offsets, part.local, part.values)
        if len(self.rest):
            h = self.rest(torch.tanh(h))
        if self.tanh_out:
            h = torch.tanh(h)
        return h[:, :self.latent], h[:, self.latent:]


class VAEOutput(NamedTuple):
    z: torch.Tensor        # (B, L) sample in training, mean at inference
    mu: torch.Tensor
    logvar: torch.Tensor
    kl: torch.Tensor       # scalar: mean over users of the KL to N(0, I)
    inputs: list           # the ClusterInputs the encoder read (after input dropout)


class ClusterVAE(nn.Module):
    def __init__(self, item_clusters, latent_size: int = 300, hidden_dims: list[int] | None = None,
                 dropout: float = 0.1, shared_decoder: bool = False, n_clusters: int | None = None,
                 tanh_out: bool = True):
        super().__init__()
        item_clusters = torch.as_tensor(np.asarray(item_clusters), dtype=torch.long).reshape(-1)
        C = int(item_clusters.max()) + 1 if n_clusters is None else int(n_clusters)
        if int(item_clusters.min()) < 0 or int(item_clusters.max()) >= C:
            raise ValueError(f"item_clusters must hold labels in 0..{C - 1}")
        sizes = torch.bincount(item_clusters, minlength=C)
        if bool((sizes == 0).any()):
            empty = torch.nonzero(sizes == 0).flatten().tolist()
            raise ValueError(f"clusters {empty[:10]} have no items; relabel to 0..C'-1 without gaps")
        hidden_dims = list(hidden_dims or [])
        self.n_items, self.n_clusters, self.shared = item_clusters.numel(), C, shared_decoder
        self.cluster_sizes = sizes.tolist()
        self.latent_sizes = split_sizes(latent_size, self.cluster_sizes)
        hidden_per_cluster = [split_sizes(h, self.cluster_sizes) for h in hidden_dims]
        self.latent_offsets = np.concatenate([[0], np.cumsum(self.latent_sizes)]).tolist()
        self.dropout = dropout

        # Item -> (cluster, local index) on the first device; local -> global per cluster.
        order = torch.sort(item_clusters, stable=True).indices
        local = torch.empty_like(item_clusters)
        local[order] = torch.arange(self.n_items) - torch.repeat_interleave(
            torch.cumsum(sizes, 0) - sizes, sizes)
        self.register_buffer("item_cluster", item_clusters, persistent=False)
        self.register_buffer("item_local", local, persistent=False)

        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for c in range(C):
            hidden_c = [h[c] for h in hidden_per_cluster]
            enc = ClusterEncoder(self.cluster_sizes[c], hidden_c, self.latent_sizes[c], tanh_out)
            enc.register_buffer("global_ids", order[self.item_cluster[order] == c].clone(), persistent=False)
            self.encoders.append(enc)
            if not shared_decoder:
                self.decoders.append(mlp([self.latent_sizes[c]] + hidden_c[::-1] + [self.cluster_sizes[c]]))
        if shared_decoder:
            layers = list(mlp([latent_size] + hidden_dims[::-1] + [self.n_items]))
            self.shared_hidden = nn.Sequential(*layers[:-1])   # Linear/Tanh pairs, maybe empty
            self.shared_out = layers[-1]

    # ---- devices ---------------------------------------------------------------
    @property
    def first_device(self) -> torch.device:
        return self.item_cluster.device

    def cluster_device(self, c: int) -> torch.device:
        return self.encoders[c].global_ids.device

    def place(self, plan: list, first) -> "ClusterVAE":
        """Move cluster c's encoder/decoder to ``plan[c]``, the rest to ``first``."""
        if len(plan) != self.n_clusters:
            raise ValueError(f"placement plan has {len(plan)} devices for {self.n_clusters} clusters")
        self.item_cluster = self.item_cluster.to(first)
        self.item_local = self.item_local.to(first)
        if self.shared:
            self.shared_hidden.to(first)
            self.shared_out.to(first)
        for c, device in enumerate(plan):
            self.encoders[c].to(device)
            if not self.shared:
                self.decoders[c].to(device)
        return self

    # ---- batch splitting -----------------------------------------------------------
    def split(self, batch: HistoryBatch, values: torch.Tensor | None = None) -> list[ClusterInput]:
        """Per-cluster interactions of ``batch`` (one sort, then slices; no loop per user)."""
        first = self.first_device
        items = batch.items.to(first)
        rows = batch.rows.to(first)
        values = torch.ones(items.numel(), device=first) if values is None else values.to(first)
        cluster = self.item_cluster[items]
        order = torch.sort(cluster, stable=True).indices   # keeps rows sorted within a cluster
        counts = torch.bincount(cluster, minlength=self.n_clusters).tolist()
        parts = []
        for c, idx in enumerate(torch.split(order, counts)):
            device = self.cluster_device(c)
            rows_c = rows[idx]
            per_user = torch.bincount(rows_c, minlength=batch.size)
            offsets = torch.cumsum(per_user, 0) - per_user
            items_c = items[idx]
            parts.append(ClusterInput(rows_c.to(device), self.item_local[items_c].to(device),
                                      values[idx].to(device), offsets.to(device), items_c.to(device)))
        return parts

    # ---- encoder ---------------------------------------------------------------------
    def encode(self, parts: list[ClusterInput]) -> VAEOutput:
        first = self.first_device
        mus, logvars, dropped = [], [], []
        for c, part in enumerate(parts):
            part = part._replace(values=F.dropout(part.values, self.dropout, self.training))
            mu, logvar = self.encoders[c](part)
            mus.append(mu.to(first)), logvars.append(logvar.to(first)), dropped.append(part)
        mu, logvar = torch.cat(mus, 1), torch.cat(logvars, 1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        return VAEOutput(z, mu, logvar, kl, dropped)

    # ---- decoder -----------------------------------------------------------------------
    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """What ``cluster_logits`` consumes: z itself, or the shared decoder's hidden
        activations (computed once, not once per cluster)."""
        return self.shared_hidden(z) if self.shared else z

    def cluster_head(self, c: int, h: torch.Tensor):
        """Cluster c's decoder up to its output layer: (hidden, weight, bias) such
        that its (B, N_c) logits, in the cluster's local item order, are
        ``hidden @ weightᵀ + bias``; ``h = decoder_input(z)``."""
        if self.shared:
            if self.n_clusters == 1:            # the cluster is the catalog, in order
                return h, self.shared_out.weight, self.shared_out.bias
            ids = self.encoders[c].global_ids.to(h.device)
            return h, self.shared_out.weight[ids], self.shared_out.bias[ids]
        lo, hi = self.latent_offsets[c], self.latent_offsets[c + 1]
        decoder = self.decoders[c]
        hidden = decoder[:-1](h[:, lo:hi].to(self.cluster_device(c)))
        return hidden, decoder[-1].weight, decoder[-1].bias

    def cluster_logits(self, c: int, h: torch.Tensor) -> torch.Tensor:
        """(B, N_c) logits of cluster c's items (columns in the cluster's local order)
        from ``h = decoder_input(z)``."""
        return F.linear(*self.cluster_head(c, h))

    def multinomial_nll(self, z: torch.Tensor, parts: list[ClusterInput]) -> torch.Tensor:
        """Mean over users of -Σ_i x_i log softmax(logits)_i over all N items:
        (Σ_i x_i)·logsumexp(logits) - Σ_i x_i logit_i. The log-normaliser comes
        from per-cluster log-sum-exps (one over all N for the shared decoder);
        Σ_i x_i logit_i from ``interacted_logits``, never a (B, N_c) matrix."""
        first, B = z.device, z.shape[0]
        h = self.decoder_input(z)
        rows = torch.cat([p.rows.to(first) for p in parts])
        values = torch.cat([p.values.to(first) for p in parts])
        mass = torch.zeros(B, device=first, dtype=values.dtype).index_add_(0, rows, values)
        if self.shared:
            weight, bias = self.shared_out.weight, self.shared_out.bias
            log_norm = linear_logsumexp(h, weight, bias)
            # all clusters' interactions in one bag per user: rows back in batch order
            order = torch.sort(rows, stable=True).indices
            items = torch.cat([p.items.to(first) for p in parts])[order]
            per_user = torch.bincount(rows, minlength=B)
            picked = interacted_logits(h, weight, bias, items, rows[order], torch.cumsum(per_user, 0) - per_user,
                                       values[order])
        else:
            lse, picked = [], torch.zeros(B, device=first)
            for c, part in enumerate(parts):
                hidden, weight, bias = self.cluster_head(c, h)
                lse.append(linear_logsumexp(hidden, weight, bias).to(first))
                picked = picked + interacted_logits(hidden, weight, bias, part.local, part.rows, part.offsets,
                                                    part.values).to(first)
            log_norm = torch.logsumexp(torch.stack(lse, 1), 1)
        return (mass * log_norm - picked).mean()


def interacted_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ids: torch.Tensor,
                      rows: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B,) Σ_i x_i logit_i over each user's interactions (``ids`` grouped by user,
    ``offsets`` their starts) = hidden · (Σ_i x_i w_i) + Σ_i x_i b_i: one
    ``embedding_bag`` of output-layer rows per user, no per-interaction gathers."""
    summed_rows = F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=values)
    return (hidden * summed_rows).sum(1).index_add(0, rows, values * bias[ids])
