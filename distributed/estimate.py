"""Start-up estimate of a run: parameters, bytes per device, memory per worker.

``estimate_run(config, meta, clusters, resources)`` is printed by
``jobs/train_ldiffrec.py`` (also alone with ``--dry-run``) and by
``distributed.trainer.train`` before any worker starts;
``RunEstimate.check(device_memory)`` refuses, with the fix named, a
configuration that cannot fit the devices it was given.

- Parameters are exact: they are counted from the same shapes
  ``models.recommender.DiffusionRecommender`` builds (tests compare them to
  ``sum(p.numel() for p in model.parameters())`` for every variant).
- Bytes per device: for latent variants the cluster placement planner
  (``clustering.placement.plan_placement``: parameters + gradients + Adam
  moments + activations ∝ batch × cluster size, fp32) with the model's own
  latent slices; for DiffRec, everything on the first device, dominated at
  large N by the N-wide weights and the dense batch × N tensors
  (``diffrec_memory_bytes``).
- Memory per worker adds the cached user shard (int64 CSR of the worker's
  train/valid/test interactions, doubled for the copy made while loading) and
  the process itself (Python, torch, Ray, pyarrow and Ray Data's read-ahead).

Estimates are for refusing hopeless configurations and sizing clusters, not
allocator-exact figures.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from clustering.placement import GIB, MIB, LatentModelDims, PlacementPlan, plan_placement

BYTES = 4                      # fp32
STATE_COPIES = 4               # weights + gradients + two Adam moments
DIFFREC_ACTIVATIONS_PER_ITEM = 8   # x0, noise, x_t, dropout mask, dropped x, output, its gradient, loss terms
EVAL_ACTIVATIONS_PER_ITEM = 3      # scores, mask, top-k workspace
SHARD_BYTES_PER_INTERACTION = 8    # int64 item ids in the cached CSR
SHARD_LOAD_COPIES = 2              # batches + their concatenation while the shard loads
GPU_USABLE = 0.9               # CUDA context, allocator slack
CPU_USABLE = 0.8               # the OS, Ray's object store, the driver
# A train worker's own host memory before any model or data: interpreter, torch,
# Ray, pyarrow, Ray Data's prefetched blocks (bench/scale.py measured 0.5 GiB RSS
# at 10k items and ~1.1 GiB above the model + shard estimate at 1M items).
WORKER_RUNTIME_BYTES = 768 * MIB

# Memory of the GPUs Ray reports as "accelerator_type:<name>" (GiB, the common SKU).
ACCELERATOR_MEMORY_GIB = {
    "T4": 15, "V100": 16, "A10G": 22, "L4": 22, "L40S": 44, "A100": 40, "A100-40G": 40,
    "A100-80G": 80, "H100": 80, "H200": 140, "K80": 12, "M60": 8,
}


# ----------------------------------------------------------------------------
# exact parameter counts (mirror the module shapes)
# ----------------------------------------------------------------------------

def _chain(widths: Sequence[int]) -> int:
    """Parameters of Linear layers width[0] -> width[1] -> ... (weights + biases)."""
    return int(sum(a * b + b for a, b in zip(widths[:-1], widths[1:])))


def denoiser_parameters(n_in: int, dims: Sequence[int], emb_size: int) -> int:
    """``models.denoiser.Denoiser``: time projection, the split first layer on
    [x, emb], mirrored hidden layers, linear output of width n_in."""
    dims = [int(d) for d in dims]
    hidden = dims[::-1]
    first = n_in * hidden[0] + hidden[0] + emb_size * hidden[0]     # input_layer + time_layer (no bias)
    return emb_size * emb_size + emb_size + first + _chain(hidden) + _chain(dims + [n_in])


def split_sizes(total: int, counts) -> list[int]:
    from models.vae import split_sizes as _split
    return _split(total, counts)


def parameter_counts(model_cfg, n_items: int, cluster_sizes: Sequence[int] | None = None) -> dict[str, int]:
    """Exact parameter counts by part: ``encoders``, ``decoders`` (per-cluster or
    the shared one) and ``denoiser``; ``cluster_params`` lists each cluster's
    encoder + own decoder."""
    if not model_cfg.is_latent:
        return {"denoiser": denoiser_parameters(n_items, model_cfg.dims, model_cfg.emb_size),
                "encoders": 0, "decoders": 0, "cluster_params": []}
    sizes = [int(s) for s in cluster_sizes]
    latents = split_sizes(model_cfg.latent_size, sizes)
    hidden = [split_sizes(int(h), sizes) for h in model_cfg.vae_hidden_dims]
    enc, dec, per_cluster = 0, 0, []
    for c, (n_c, l_c) in enumerate(zip(sizes, latents)):
        hidden_c = [h[c] for h in hidden]
        e = _chain([n_c, *hidden_c, 2 * l_c])
        d = 0 if model_cfg.shared_decoder else _chain([l_c, *hidden_c[::-1], n_c])
        enc, dec = enc + e, dec + d
        per_cluster.append(e + d)
    if model_cfg.shared_decoder:
        dec = _chain([model_cfg.latent_size, *[int(h) for h in model_cfg.vae_hidden_dims][::-1], n_items])
    return {"denoiser": denoiser_parameters(model_cfg.latent_size, model_cfg.dims, model_cfg.emb_size),
            "encoders": enc, "decoders": dec, "cluster_params": per_cluster}


# ----------------------------------------------------------------------------
# DiffRec (no latent): dense N-wide tensors
# ----------------------------------------------------------------------------

def diffrec_memory_bytes(n_items: int, dims: Sequence[int] = (1000,), batch: int = 400, emb_size: int = 10,
                         eval_batch: int | None = None) -> int:
    """Training bytes of DiffRec on one device: parameters + gradients + Adam
    moments of the N-wide denoiser, plus the larger of the training activations
    (~8 dense batch × N tensors) and the scoring ones (~3 × eval_batch × N)."""
    state, per_sample = _diffrec_parts(n_items, dims, batch, emb_size, eval_batch)
    return state + per_sample * batch if eval_batch is None else state + max(
        per_sample * batch, EVAL_ACTIVATIONS_PER_ITEM * n_items * BYTES * eval_batch)


def _diffrec_parts(n_items, dims, batch, emb_size, eval_batch):
    state = denoiser_parameters(n_items, dims, emb_size) * BYTES * STATE_COPIES
    per_sample = (DIFFREC_ACTIVATIONS_PER_ITEM * n_items + 2 * sum(int(d) for d in dims) * 2) * BYTES
    return state, per_sample


def diffrec_max_batch(n_items: int, dims: Sequence[int], emb_size: int, capacity_bytes: int) -> int:
    """Largest training batch whose DiffRec estimate fits ``capacity_bytes`` (0: not even the weights)."""
    state, per_sample = _diffrec_parts(n_items, dims, 1, emb_size, None)
    return max(0, int((capacity_bytes - state) // per_sample))


# ----------------------------------------------------------------------------
# the run estimate
# ----------------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / MIB:,.1f} MiB"


class EstimateDoesNotFit(ValueError):
    """The estimated memory of a run exceeds what its devices offer."""


@dataclass
class RunEstimate:
    variant: str
    n_items: int
    n_users: int
    n_interactions: int
    workers: int
    gpus_per_worker: int
    batch_size: int
    total_params: int
    params_by_part: dict[str, int]
    devices: tuple[str, ...]
    bytes_per_device: dict[str, int]            # model training bytes on each device of one worker
    params_per_device: dict[str, int]
    shard_bytes: int                            # cached user shard, host RAM of one worker
    cluster_sizes: list[int] | None = None
    clusters_assumed_equal: bool = False
    largest_cluster_bytes: int = 0
    plan: PlacementPlan | None = field(default=None, repr=False)
    model_cfg: object = field(default=None, repr=False)

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def model_bytes(self) -> int:
        return int(sum(self.bytes_per_device.values()))

    @property
    def worker_bytes(self) -> int:
        """Expected memory of one worker: its devices, the cached users and the process."""
        return self.model_bytes + self.process_bytes

    @property
    def process_bytes(self) -> int:
        """Host memory of a worker besides the model: the cached users and the process."""
        return self.shard_bytes + WORKER_RUNTIME_BYTES

    def describe(self) -> str:
        name = {"diffrec": "DiffRec", "tdiffrec": "T-DiffRec", "ldiffrec": "L-DiffRec",
                "ltdiffrec": "LT-DiffRec"}.get(self.variant, self.variant)
        parts = ", ".join(f"{k} {v:,}" for k, v in self.params_by_part.items() if isinstance(v, int) and v)
        lines = [f"estimate: {name}, {self.n_items:,} items, {self.n_users:,} users, "
                 f"{self.n_interactions:,} interactions, batch {self.batch_size}",
                 f"  parameters      {self.total_params:,} ({parts})"]
        if self.cluster_sizes is not None:
            sizes = sorted(self.cluster_sizes, reverse=True)
            lines.append(f"  clusters        {len(sizes)} (largest {sizes[0]:,} items"
                         + (", sizes assumed equal until k-means runs" if self.clusters_assumed_equal else "")
                         + ")")
        lines.append(f"  {'device':<14}{'params':>14}{'est. MiB':>12}")
        for d in self.devices:
            mark = " (denoiser)" if self.plan is not None and d == self.plan.denoiser_device else ""
            lines.append(f"  {d:<14}{self.params_per_device[d]:>14,}{self.bytes_per_device[d] / MIB:>12.1f}{mark}")
        lines.append(f"  user shard      {self.shard_bytes / MIB:,.1f} MiB host RAM per worker")
        lines.append(f"  process         {WORKER_RUNTIME_BYTES / MIB:,.0f} MiB host RAM per worker (Python, torch, Ray)")
        lines.append(f"  per worker      {_size(self.worker_bytes)} expected "
                     f"({len(self.devices)} device(s){' + host RAM' if self.on_gpu else ''}); "
                     f"{self.workers} worker(s): {_size(self.workers * self.worker_bytes)} in all")
        return "\n".join(lines)

    def check(self, device_memory: int | Mapping[str, int] | None, workers_per_machine: int = 1,
              usable_fraction: float | None = None) -> None:
        """Raise ``EstimateDoesNotFit`` naming what to change when a device would
        need more than it has. ``device_memory``: bytes of each GPU (one value or
        per device), or of the machine's RAM for CPU runs (shared by
        ``workers_per_machine`` workers). ``None``: unknown, nothing checked."""
        if device_memory is None:
            return
        frac = usable_fraction if usable_fraction is not None else (GPU_USABLE if self.on_gpu else CPU_USABLE)

        def usable(d: str) -> int:
            cap = device_memory[d] if isinstance(device_memory, Mapping) else device_memory
            return int(cap * frac)

        if self.on_gpu:
            need = dict(self.bytes_per_device)
        else:
            need = {"cpu": self.worker_bytes * max(1, workers_per_machine)}
        problems = [f"{d} needs ~{b / GIB:.2f} GiB, has {usable(d) / GIB:.2f} GiB usable"
                    for d, b in need.items() if b > usable(d)]
        if not problems:
            return
        cap = min(usable(d) for d in need)
        raise EstimateDoesNotFit(f"{self.variant} does not fit its devices: " + "; ".join(problems)
                                 + ".\nFix: " + self._fix(cap, workers_per_machine) + "\n" + self.describe())

    def _fix(self, cap: int, workers_per_machine: int) -> str:
        cfg = self.model_cfg
        hints = []
        if not self.on_gpu and workers_per_machine > 1:
            hints.append(f"fewer workers per machine (the {workers_per_machine} workers share its RAM) or more machines")
        if self.plan is None:   # DiffRec: N-wide weights and dense B x N tensors on one device
            dims = list(getattr(cfg, "dims", [1000]))
            emb = getattr(cfg, "emb_size", 10)
            per_dev = cap if self.on_gpu else cap // max(1, workers_per_machine) - self.process_bytes
            best = diffrec_max_batch(self.n_items, dims, emb, per_dev)
            if best >= 1:
                hints.append(f"a smaller train.batch_size (at most ~{best} fits; now {self.batch_size})")
            else:
                hints.append(f"the {self.n_items:,}-item weights alone do not fit: smaller model.dims (now {dims})")
            hints.append("or the latent variant (--model ldiffrec / ltdiffrec with model.n_clusters=C), whose "
                         "per-cluster VAEs spread over several GPUs and whose activations follow the largest "
                         "cluster instead of N")
            if not self.on_gpu:
                hints.append("or GPUs (--gpus-per-worker)")
        else:
            if self.largest_cluster_bytes > cap:
                hints.append(f"more clusters (model.n_clusters, now {len(self.cluster_sizes)}): the largest "
                             f"cluster alone needs ~{self.largest_cluster_bytes / GIB:.2f} GiB")
            elif self.on_gpu:
                hints.append(f"more GPUs per worker (--gpus-per-worker, now {self.gpus_per_worker}) so the "
                             f"clusters spread further")
            hints.append(f"a smaller train.batch_size (now {self.batch_size})")
            hints.append("or a smaller model.latent_size / model.vae_hidden_dims")
        return "; ".join(hints) + "."


def _cluster_sizes(model_cfg, n_items: int, clusters) -> tuple[list[int] | None, bool]:
    if not model_cfg.is_latent:
        return None, False
    c = model_cfg.n_clusters
    if clusters is None:      # before k-means: equal sizes
        base, extra = divmod(n_items, c)
        return [base + (1 if i < extra else 0) for i in range(c)], True
    arr = np.asarray(clusters)
    if arr.shape == (n_items,) and (n_items != c or int(arr.sum()) != n_items):   # an item -> cluster array
        return np.bincount(arr.astype(np.int64), minlength=c).astype(int).tolist(), False
    sizes = [int(s) for s in arr.reshape(-1)]
    if sum(sizes) != n_items:
        raise ValueError(f"cluster sizes sum to {sum(sizes)}, not n_items={n_items}")
    return sizes, False


def worker_devices(gpus_per_worker: int) -> list[str]:
    """The device names one worker places its model on (no CUDA needed to plan)."""
    return [f"cuda:{i}" for i in range(gpus_per_worker)] if gpus_per_worker > 0 else ["cpu"]


def estimate_run(config, meta: Mapping, clusters=None, resources=None) -> RunEstimate:
    """The start-up estimate of ``config`` (``distributed.config.RunConfig``) on
    the dataset described by ``meta`` (``n_items``, ``n_users``, ``n_train``...).
    ``clusters``: the item -> cluster array or the cluster sizes (latent
    variants; None = equal sizes until k-means ran). ``resources``: an object
    with ``workers`` and ``gpus_per_worker`` (``distributed.trainer.Resources``)."""
    model_cfg, train_cfg = config.model, config.train
    n_items, n_users = int(meta["n_items"]), int(meta.get("n_users", 0))
    n_inter = int(sum(int(meta.get(k, 0) or 0) for k in ("n_train", "n_valid", "n_test")))
    workers = int(getattr(resources, "workers", 1) or 1)
    gpus = int(getattr(resources, "gpus_per_worker", 0) or 0)
    devices = worker_devices(gpus)
    sizes, assumed = _cluster_sizes(model_cfg, n_items, clusters)
    counts = parameter_counts(model_cfg, n_items, sizes)
    total = counts["denoiser"] + counts["encoders"] + counts["decoders"]
    by_part = {k: v for k, v in counts.items() if k != "cluster_params"}

    users_per_worker = math.ceil(n_users / workers) if n_users else 0
    shard = (SHARD_BYTES_PER_INTERACTION * math.ceil(n_inter / workers) * SHARD_LOAD_COPIES
             + 3 * 8 * (users_per_worker + 1))

    plan, largest = None, 0
    if model_cfg.is_latent:
        dims = LatentModelDims(latent_total=model_cfg.latent_size,
                               encoder_hidden=tuple(model_cfg.vae_hidden_dims),
                               denoiser_dims=tuple(model_cfg.dims), time_emb_size=model_cfg.emb_size,
                               batch_size=train_cfg.batch_size)
        plan = plan_placement(sizes, devices, dims, latents=split_sizes(model_cfg.latent_size, sizes))
        bytes_per_device = dict(plan.bytes_per_device)
        # Exact parameters per device (the planner's hidden split is approximate).
        params_per_device = {d: 0 for d in devices}
        params_per_device[plan.denoiser_device] += counts["denoiser"]
        for c, d in enumerate(plan.device_of_cluster):
            params_per_device[d] += counts["cluster_params"][c]
        largest = int(plan.cluster_bytes.max())
        if model_cfg.shared_decoder:
            # One latent -> N decoder on the first device instead of per-cluster ones: its state and
            # the B x N logits kept for backward land there.
            extra = (counts["decoders"] * BYTES * STATE_COPIES + 2 * n_items * train_cfg.batch_size * BYTES)
            bytes_per_device[plan.denoiser_device] += int(extra)
            params_per_device[plan.denoiser_device] += counts["decoders"]
    else:
        first = devices[0]
        need = diffrec_memory_bytes(n_items, model_cfg.dims, train_cfg.batch_size, model_cfg.emb_size,
                                    train_cfg.eval_batch_size)
        devices = devices[:1]      # DiffRec uses only the first device of a worker
        bytes_per_device = {first: need}
        params_per_device = {first: total}
    return RunEstimate(variant=model_cfg.variant, n_items=n_items, n_users=n_users, n_interactions=n_inter,
                       workers=workers, gpus_per_worker=gpus, batch_size=train_cfg.batch_size,
                       total_params=total, params_by_part=by_part, devices=tuple(devices),
                       bytes_per_device=bytes_per_device, params_per_device=params_per_device,
                       shard_bytes=int(shard), cluster_sizes=sizes, clusters_assumed_equal=assumed,
                       largest_cluster_bytes=largest, plan=plan, model_cfg=model_cfg)


# ----------------------------------------------------------------------------
# device memory discovery
# ----------------------------------------------------------------------------

def host_memory_bytes() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:     # pragma: no cover - psutil is a dependency
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def accelerator_memory_bytes(cluster_resources: Mapping[str, float]) -> int | None:
    """Smallest known GPU memory among Ray's ``accelerator_type:<name>`` resources."""
    known = [ACCELERATOR_MEMORY_GIB[k.split(":", 1)[1]] for k in cluster_resources
             if k.startswith("accelerator_type:") and k.split(":", 1)[1] in ACCELERATOR_MEMORY_GIB]
    return min(known) * GIB if known else None


def device_memory(gpus_per_worker: int, override_gib: float | None = None,
                  cluster_resources: Mapping[str, float] | None = None) -> tuple[int | None, str]:
    """(bytes per device, where the figure came from) for the check.

    CPU runs: this machine's RAM. GPU runs: ``override_gib``, else the GPUs this
    process sees (torch), else the GPU type Ray reports, else unknown (None)."""
    if override_gib:
        return int(override_gib * GIB), f"{override_gib:g} GiB per device (given)"
    if gpus_per_worker <= 0:
        return host_memory_bytes(), "RAM of this machine"
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.device_count() >= 1:
            sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
            return int(min(sizes)), f"{torch.cuda.get_device_name(0)} seen by this process"
    except Exception:       # noqa: BLE001 - a broken CUDA setup just means "unknown"
        pass
    if cluster_resources:
        found = accelerator_memory_bytes(cluster_resources)
        if found:
            kinds = [k.split(":", 1)[1] for k in cluster_resources if k.startswith("accelerator_type:")]
            return found, f"Ray accelerator type {'/'.join(kinds)}"
    return None, "GPU memory unknown here (pass --device-memory-gib to check)"


# ----------------------------------------------------------------------------
# start-up: print, then refuse what cannot fit
# ----------------------------------------------------------------------------

DEVICE_MEMORY_ENV = "DIFFREC_DEVICE_MEMORY_GIB"   # GPU memory per device when it cannot be detected here


def _ray_view(workers: int) -> tuple[dict | None, int | None]:
    """(cluster resources, workers per CPU machine) when this process is connected to Ray."""
    import sys
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None, None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        return dict(ray.cluster_resources()), math.ceil(workers / max(1, len(nodes)))
    except Exception:       # noqa: BLE001 - the estimate must never be what breaks a run
        return None, None


def startup_estimate(config, meta: Mapping, clusters=None, resources=None, log=print) -> RunEstimate:
    """Print the estimate and raise ``EstimateDoesNotFit`` (a ValueError, with
    the fix) when it cannot fit. Device memory: ``$DIFFREC_DEVICE_MEMORY_GIB``,
    else detected (CUDA here, Ray's accelerator type, or this machine's RAM
    for CPU runs, shared by the workers that land on one machine)."""
    est = estimate_run(config, meta, clusters, resources)
    override = os.environ.get(DEVICE_MEMORY_ENV)
    cluster_resources, per_machine = _ray_view(est.workers)
    memory, source = device_memory(est.gpus_per_worker, float(override) if override else None, cluster_resources)
    for line in est.describe().splitlines():
        log(line)
    if memory is None:
        log(f"  fits?           not checked: {source}")
        return est
    per_machine = per_machine or (1 if est.on_gpu else est.workers)
    est.check(memory, workers_per_machine=per_machine)
    usable = memory * (GPU_USABLE if est.on_gpu else CPU_USABLE)
    need = max(est.bytes_per_device.values()) if est.on_gpu else est.worker_bytes * per_machine
    log(f"  fits            {need / GIB:,.2f} of {usable / GIB:,.2f} GiB usable "
        f"({'busiest GPU' if est.on_gpu else f'{per_machine} worker(s) in RAM'}; {source})")
    return est
