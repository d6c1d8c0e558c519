"""Cluster -> device placement for L-DiffRec (DESIGN.md §5 "Placement").

Pure planning: devices are strings ('cpu', 'cuda:0', ...). Each cluster's
encoder+decoder goes to one device; clusters are placed largest first onto
the least-loaded device (LPT), where load = estimated training bytes of
parameters + gradients + Adam state + activations. The denoiser sits on the
first device and its bytes count there.

Model shape assumed (L-DiffRec, fp32), for cluster c with N_c of N items:
  latent slice  l_c = max(1, round(latent_total * N_c / N))   (hidden widths split alike)
  encoder       N_c -> hidden_c... -> 2*l_c  (mean and log-variance)
  decoder       l_c -> reversed(hidden_c)... -> N_c
  denoiser      (L + emb) -> reversed(dims)... -> dims[1:]... -> L, plus an emb -> emb time layer
These are estimates for balancing and for refusing hopeless configurations,
not exact allocator figures.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from models.fused_output import CHUNK_ELEMENTS

OUTPUT_CHUNK_BUFFERS = 3   # a chunk's logits, its softmax, one temporary

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class LatentModelDims:
    """The L-DiffRec sizes that drive memory (totals over all clusters)."""

    latent_total: int = 300
    encoder_hidden: tuple[int, ...] = ()  # hidden layer widths before the latent, split across clusters ∝ N_c
    denoiser_dims: tuple[int, ...] = (300,)
    time_emb_size: int = 10
    batch_size: int = 400
    bytes_per_value: int = 4  # fp32
    optimizer_copies: int = 2  # Adam keeps two moments per parameter
    activation_copies: float = 2.0  # activations saved for backward + their gradients


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-cluster (arrays of length C) or per-module (0-d) byte estimates."""

    params: np.ndarray
    state_bytes: np.ndarray  # parameters + gradients + optimizer moments
    activation_bytes: np.ndarray

    @property
    def total_bytes(self) -> np.ndarray:
        return self.state_bytes + self.activation_bytes


def split_proportionally(cluster_sizes: Sequence[int], total: int) -> np.ndarray:
    """max(1, round(total * N_c / N)) per cluster (round half to even, as np.rint)."""
    sizes = np.asarray(cluster_sizes, dtype=np.float64)
    return np.maximum(1, np.rint(total * sizes / sizes.sum())).astype(np.int64)


def latent_sizes(cluster_sizes: Sequence[int], latent_total: int) -> np.ndarray:
    """Latent slice width l_c of each cluster."""
    return split_proportionally(cluster_sizes, latent_total)


def _linear_params(widths: list[np.ndarray]) -> np.ndarray:
    """Weights + biases of a chain of linear layers; widths are per-cluster arrays."""
    return sum(w_in * w_out + w_out for w_in, w_out in zip(widths[:-1], widths[1:]))


def estimate_cluster_memory(cluster_sizes: Sequence[int], dims: LatentModelDims = LatentModelDims(),
                            latents: Sequence[int] | None = None) -> MemoryEstimate:
    """Training bytes of each cluster's encoder + decoder (vectorised over clusters)."""
    n_c = _validated_sizes(cluster_sizes)
    l_c = latent_sizes(n_c, dims.latent_total) if latents is None else np.asarray(latents, dtype=np.int64)
    if l_c.shape != n_c.shape or (l_c < 1).any():
        raise ValueError(f"latent sizes must be >= 1, one per cluster ({n_c.size}), got {l_c.tolist()[:8]}")
    hidden_c = [split_proportionally(n_c, h) for h in dims.encoder_hidden]
    encoder = [n_c, *hidden_c, 2 * l_c]
    decoder = [l_c, *hidden_c[::-1], n_c]
    params = _linear_params(encoder) + _linear_params(decoder)
    # Per sample: hidden layers both ways, mean/logvar/z. Nothing N_c wide: the history
    # enters sparsely and the N_c logits only ever exist one cache-sized chunk at a time
    # (models/fused_output.py), a per-cluster workspace independent of N_c.
    activation_values = 2 * sum(hidden_c, np.zeros_like(n_c)) + 3 * l_c
    memory = _memory(params, activation_values, dims)
    workspace = OUTPUT_CHUNK_BUFFERS * CHUNK_ELEMENTS * dims.bytes_per_value
    return MemoryEstimate(memory.params, memory.state_bytes, memory.activation_bytes + workspace)


def estimate_denoiser_memory(dims: LatentModelDims = LatentModelDims()) -> MemoryEstimate:
    """Training bytes of the denoiser MLP on the concatenated latent (mirrors the reference DNN)."""
    latent, emb, hidden = dims.latent_total, dims.time_emb_size, list(dims.denoiser_dims)
    widths = [latent + emb, *hidden[::-1], *hidden[1:], latent]
    params = _linear_params([np.int64(w) for w in widths]) + emb * emb + emb
    return _memory(np.int64(params), np.int64(sum(widths)), dims)


def _memory(params, activation_values, dims: LatentModelDims) -> MemoryEstimate:
    state = params * dims.bytes_per_value * (2 + dims.optimizer_copies)  # weights + grads + moments
    activations = np.ceil(activation_values * dims.batch_size * dims.bytes_per_value
                          * dims.activation_copies).astype(np.int64)
    return MemoryEstimate(np.asarray(params, dtype=np.int64), np.asarray(state, dtype=np.int64), activations)


def _validated_sizes(cluster_sizes: Sequence[int]) -> np.ndarray:
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    if sizes.ndim != 1 or sizes.size < 1 or (sizes < 1).any():
        raise ValueError("cluster_sizes must be a non-empty list of positive item counts (no empty clusters)")
    return sizes


# ----------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PlacementPlan:
    devices: tuple[str, ...]
    device_of_cluster: list[str]
    denoiser_device: str
    bytes_per_device: dict[str, int]
    params_per_device: dict[str, int]
    cluster_sizes: np.ndarray = field(repr=False)
    cluster_bytes: np.ndarray = field(repr=False)  # estimated training bytes per cluster
    denoiser_bytes: int = 0
    denoiser_params: int = 0

    def clusters_on(self, device: str) -> list[int]:
        return [c for c, d in enumerate(self.device_of_cluster) if d == device]

    @property
    def total_params(self) -> int:
        return int(sum(self.params_per_device.values()))

    @property
    def total_bytes(self) -> int:
        """Expected memory of one worker (all its devices together)."""
        return int(sum(self.bytes_per_device.values()))

    @property
    def balance(self) -> float:
        """max / mean device load (1.0 = perfectly even)."""
        loads = np.array(list(self.bytes_per_device.values()), dtype=np.float64)
        return float(loads.max() / loads.mean())

    def describe(self) -> str:
        """A small table for job start-up logs."""
        header = f"{'device':<10}{'clusters':>9}{'items':>12}{'params':>14}{'est. MiB':>11}"
        lines = ["L-DiffRec placement (params + grads + Adam + activations, fp32)", header, "-" * len(header)]
        for device in self.devices:
            on = self.clusters_on(device)
            mark = "*" if device == self.denoiser_device else ""
            lines.append(f"{device + mark:<10}{len(on):>9}{int(self.cluster_sizes[on].sum()):>12,}"
                         f"{self.params_per_device[device]:>14,}{self.bytes_per_device[device] / MIB:>11.1f}")
        lines.append("-" * len(header))
        lines.append(f"{'worker':<10}{len(self.device_of_cluster):>9}{int(self.cluster_sizes.sum()):>12,}"
                     f"{self.total_params:>14,}{self.total_bytes / MIB:>11.1f}")
        lines.append(f"* denoiser: {self.denoiser_params:,} params, {self.denoiser_bytes / MIB:.1f} MiB; "
                     f"balance max/mean = {self.balance:.3f}")
        return "\n".join(lines)


def plan_placement(cluster_sizes: Sequence[int], devices: Sequence[str],
                   dims: LatentModelDims = LatentModelDims(), *,
                   latents: Sequence[int] | None = None) -> PlacementPlan:
    """Assign every cluster's encoder+decoder to a device, balancing estimated bytes.

    LPT: clusters in decreasing byte order, each onto the currently least
    loaded device (ties: earlier device; equal clusters: lower id). The first
    device starts with the denoiser's bytes. `latents` overrides the
    proportional latent slices when the model uses others.
    """
    devices = tuple(str(d) for d in devices)
    if not devices:
        raise ValueError("devices is empty; pass at least ['cpu']")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices contains duplicates: {list(devices)}")
    clusters = estimate_cluster_memory(cluster_sizes, dims, latents)
    denoiser = estimate_denoiser_memory(dims)
    cluster_bytes = clusters.total_bytes

    loads = np.zeros(len(devices), dtype=np.int64)
    params = np.zeros(len(devices), dtype=np.int64)
    loads[0], params[0] = int(denoiser.total_bytes), int(denoiser.params)
    device_index = np.empty(cluster_bytes.size, dtype=np.int64)
    for cluster in np.argsort(-cluster_bytes, kind="stable"):  # one step per cluster, not per item
        target = int(np.argmin(loads))
        device_index[cluster] = target
        loads[target] += cluster_bytes[cluster]
        params[target] += clusters.params[cluster]

    return PlacementPlan(
        devices=devices,
        device_of_cluster=[devices[i] for i in device_index],
        denoiser_device=devices[0],
        bytes_per_device={d: int(b) for d, b in zip(devices, loads)},
        params_per_device={d: int(p) for d, p in zip(devices, params)},
        cluster_sizes=np.asarray(cluster_sizes, dtype=np.int64),
        cluster_bytes=cluster_bytes,
        denoiser_bytes=int(denoiser.total_bytes),
        denoiser_params=int(denoiser.params),
    )


class PlacementDoesNotFit(ValueError):
    """The estimated memory of a plan exceeds what a device offers."""


def check_fits(plan: PlacementPlan, device_memory_bytes: int | Mapping[str, int],
               usable_fraction: float = 0.9) -> None:
    """Raise PlacementDoesNotFit when any device would need more than it has.

    `device_memory_bytes` is one capacity for all devices or one per device;
    only `usable_fraction` of it is planned for (CUDA context, allocator slack).
    """
    def usable(device: str) -> int:
        capacity = (device_memory_bytes[device] if isinstance(device_memory_bytes, Mapping)
                    else device_memory_bytes)
        return int(capacity * usable_fraction)

    problems = [f"{d} needs ~{plan.bytes_per_device[d] / GIB:.2f} GiB, has {usable(d) / GIB:.2f} GiB usable"
                for d in plan.devices if plan.bytes_per_device[d] > usable(d)]
    if not problems:
        return
    largest = int(plan.cluster_bytes.max())
    if largest > max(usable(d) for d in plan.devices):
        hint = (f"the largest cluster alone needs ~{largest / GIB:.2f} GiB: raise n_clusters so clusters "
                f"are smaller, or lower batch_size / the latent size")
    else:
        hint = "use more GPUs per worker (gpus_per_worker), a smaller batch_size, or a smaller latent / hidden size"
    raise PlacementDoesNotFit("L-DiffRec placement does not fit: " + "; ".join(problems) + ". Fix: " + hint
                              + "\n" + plan.describe())


# ----------------------------------------------------------------------------
# device discovery (lazy torch)
# ----------------------------------------------------------------------------

def available_devices(gpus_per_worker: int) -> list[str]:
    """Devices a worker places clusters on: ['cpu'] or ['cuda:0', ..., 'cuda:k-1'].

    Under Ray each worker sees only its own GPUs (CUDA_VISIBLE_DEVICES), so
    they are numbered from 0.
    """
    if gpus_per_worker <= 0:
        return ["cpu"]
    import torch  # lazy: clustering stays importable without torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < gpus_per_worker:
        raise RuntimeError(f"gpus_per_worker={gpus_per_worker} but this worker sees {visible} CUDA device(s); "
                           f"lower gpus_per_worker or request GPUs for the workers")
    return [f"cuda:{i}" for i in range(gpus_per_worker)]


def device_total_memory(device: str) -> int:
    """Total memory of a device in bytes (physical RAM for 'cpu')."""
    if device == "cpu":
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    import torch
    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
