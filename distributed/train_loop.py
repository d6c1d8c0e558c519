"""The per-worker training loop run by Ray Train (DDP across workers).

data → model → loop: each worker caches its shard of users (UserShard), builds
the model (clusters placed on its devices by the planner), trains with the
same number of steps as every other worker, keeps the importance-sampling
history identical everywhere (all-gathered losses), evaluates its own users
and all-reduces metric sums, and reports metrics + checkpoints through Ray
Train. A re-run with the same name/storage resumes from the last checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from distributed.checkpoint import MODEL_FILE, STATE_FILE, save_checkpoint
from distributed.config import RunConfig
from distributed.data import UserShard
from models.batch import HistoryBatch
from models.evaluation import evaluate_batch
from models.metrics import RankingMetrics
from models.recommender import DiffusionRecommender

PROGRESS_EVERY_S = 60.0    # rank 0 prints a progress line this often within a long epoch


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _gather_step_losses(t: torch.Tensor, losses: torch.Tensor, width: int):
    """All workers' (timestep, loss) pairs of this step, padding dropped."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t, losses
    pad_t = torch.full((width,), -1, dtype=torch.long, device=t.device)
    pad_l = torch.zeros(width, dtype=losses.dtype, device=t.device)
    pad_t[:t.numel()], pad_l[:losses.numel()] = t, losses
    ts = [torch.empty_like(pad_t) for _ in range(dist.get_world_size())]
    ls = [torch.empty_like(pad_l) for _ in range(dist.get_world_size())]
    dist.all_gather(ts, pad_t)
    dist.all_gather(ls, pad_l)
    ts, ls = torch.cat(ts), torch.cat(ls)
    keep = ts >= 0
    return ts[keep], ls[keep]


def build_model(run: RunConfig, n_items: int, item_clusters, gpus_per_worker: int, log=print):
    """The model on this worker's devices: clusters placed by the planner."""
    from clustering.placement import LatentModelDims, available_devices, plan_placement
    devices = available_devices(gpus_per_worker) if gpus_per_worker > 0 else ["cpu"]
    model = DiffusionRecommender(run.model, n_items, item_clusters)
    if model.vae is None:
        return model.place(None, devices[0]), devices
    sizes = torch.bincount(torch.as_tensor(item_clusters), minlength=run.model.n_clusters).tolist()
    plan = plan_placement(sizes, devices, LatentModelDims(
        latent_total=run.model.latent_size, encoder_hidden=tuple(run.model.vae_hidden_dims),
        denoiser_dims=tuple(run.model.dims), time_emb_size=run.model.emb_size,
        batch_size=run.train.batch_size), latents=model.vae.latent_sizes)
    log(plan.describe())
    return model.place(plan.device_of_cluster, plan.denoiser_device), devices


def make_optimizer(model: DiffusionRecommender, run: RunConfig) -> torch.optim.Optimizer:
    groups = []
    for group in model.param_groups():
        lr = run.train.lr
        if group["name"] == "denoiser" and model.vae is not None and run.train.lr_denoiser:
            lr = run.train.lr_denoiser
        groups.append({"params": group["params"], "lr": lr, "name": group["name"]})
    try:   # the single-kernel Adam is much faster on CPU (bench/train_step.py)
        return torch.optim.Adam(groups, weight_decay=run.train.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups, weight_decay=run.train.weight_decay)


@torch.no_grad()
def evaluate_shard(model: DiffusionRecommender, shard: UserShard, run: RunConfig) -> dict:
    """Validation and test metrics of this worker's users, all-reduced."""
    metrics = {"valid": RankingMetrics(), "test": RankingMetrics()}
    device = model.device
    rank_fn = lambda batch, k: model.score_topk(batch, k)[1]   # noqa: E731
    for rows in torch.arange(len(shard)).split(run.train.eval_batch_size):
        evaluate_batch(rank_fn, shard.history(rows).to(device),
                       tuple(t.to(device) for t in shard.targets(rows, "valid")),
                       tuple(t.to(device) for t in shard.targets(rows, "test")),
                       metrics, run.train.test_input)
    out = {}
    for split, m in metrics.items():
        total = RankingMetrics.from_tensor(_all_reduce(m.as_tensor()), m.ks)
        out[split] = total.result()
        out[f"{split}_users"] = total.n_users
    return out


def _maybe_die(spec: str | None, epoch: int, rank: int) -> None:
    """Fault injection for the recovery tests: ``"<epoch>:<rank>:<marker file>"``
    kills that worker's process at the start of that epoch, once (the marker
    file lets the restarted worker live)."""
    if not spec:
        return
    at, who, marker = spec.split(":", 2)
    if int(at) == epoch and int(who) == rank and not Path(marker).exists():
        Path(marker).write_text("killed")
        os._exit(1)


def _quiet_ray_train() -> None:
    """Ray Train logs every report and checkpoint at INFO on each worker; the
    loop prints its own one-line-per-epoch progress instead."""
    import logging

    from ray.train.v2._internal.execution import context, storage
    for module in (context, storage):
        for name in (module.__name__, module.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)


def load_training_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint's weights and optimizer into ``model``/``optimizer``; returns its
    loop state (epoch, step, best, history)."""
    try:
        model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise RuntimeError(f"cannot resume from {directory}: {e}; delete that directory to resume from an "
                           f"earlier checkpoint, or use another --name to start over") from e
    optimizer.load_state_dict(state.pop("optimizer"))
    return state


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train

    _quiet_ray_train()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = (lambda msg: print(f"[train] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    run = RunConfig.from_dict(cfg["run"])
    meta, n_items = cfg["meta"], cfg["meta"]["n_items"]
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(run.train.seed)            # identical initial weights on every worker

    model, devices = build_model(run, n_items, cfg.get("item_clusters"), cfg["gpus_per_worker"], log)
    optimizer = make_optimizer(model, run)
    state = {"epoch": 0, "step": 0, "best": None, "bad_evals": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if cfg.get("evaluate_only"):
        model.load_state_dict(torch.load(Path(cfg["evaluate_only"]) / MODEL_FILE, map_location="cpu",
                                         weights_only=True))
    elif checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_training_state(Path(d), model, optimizer)
        log(f"resumed from epoch {state['epoch']} (step {state['step']})")
    elif cfg.get("resume_dir"):
        # Ray restores only checkpoints its controller had registered; a run killed just
        # after a report leaves newer ones on disk, which the driver found for us.
        state = load_training_state(Path(cfg["resume_dir"]), model, optimizer)
        log(f"resumed from epoch {state['epoch']} (step {state['step']}) of {cfg['resume_dir']}")
    torch.manual_seed(run.train.seed * 7919 + 104729 * rank + state["epoch"])   # per-worker noise/dropout
    ddp = model
    if world > 1:
        # device_ids=None: the module may span several devices (clusters placed by the planner).
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=None)

    t0 = time.time()
    shard = UserShard.from_iterator(ray.train.get_dataset_shard("train"), n_items)
    if cfg.get("evaluate_only"):
        result = evaluate_shard(model, shard, run)
        report = {f"{split}/{k}": v for split in ("valid", "test") for k, v in result[split].items()}
        report.update(valid_users=result["valid_users"], test_users=result["test_users"])
        # Train V2 keeps only metrics that come with a checkpoint: attach a small one.
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                (Path(tmp) / "evaluation.json").write_text(json.dumps(report, indent=2))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(report, checkpoint=ckpt)
        return
    sizes = torch.tensor([len(shard), len(shard)], dtype=torch.long)
    _all_reduce(sizes[:1], dist.ReduceOp.MAX if world > 1 else None)
    _all_reduce(sizes[1:])
    max_local, total_users = int(sizes[0]), int(sizes[1])
    n_steps = max(1, math.ceil(max_local / run.train.batch_size))
    width = max(1, math.ceil(max_local / n_steps))
    log(f"{world} worker(s), {total_users:,} users (at most {max_local:,} per worker), {n_items:,} items, "
        f"{n_steps} steps per epoch; shard loaded in {time.time() - t0:.1f}s")

    select = f"valid/{run.train.select_metric}"
    while state["epoch"] < run.train.epochs and state["bad_evals"] < run.train.patience:
        epoch = state["epoch"] + 1
        _maybe_die(cfg.get("kill_worker"), epoch, rank)
        model.train()
        t0 = time.time()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        last_note = t0
        for i, rows in enumerate(shard.epoch_batches(n_steps, seed=run.train.seed * 1_000_003 + epoch * 1009 + rank)):
            if len(shard):
                batch, scale = shard.history(rows), 1.0
            else:   # a worker left without users still steps (DDP), contributing nothing
                batch, scale = HistoryBatch(torch.zeros(2, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                            n_items), 0.0
            out = ddp(batch, state["step"])
            optimizer.zero_grad(set_to_none=True)
            (out.loss * scale).backward()
            optimizer.step()
            all_t, all_losses = _gather_step_losses(out.timesteps, out.step_losses, width)
            model.record_step_losses(all_t, all_losses)
            state["step"] += 1
            loss_sum += torch.tensor([float(out.parts["loss"]) * batch.size * scale, batch.size * scale], dtype=torch.float64)
            if time.time() - last_note >= PROGRESS_EVERY_S and i + 1 < n_steps:   # long epochs: show progress
                last_note, done = time.time(), (i + 1) / n_steps
                log(f"epoch {epoch:3d}  step {i + 1}/{n_steps}  loss {float(loss_sum[0] / max(loss_sum[1], 1)):.4f}  "
                    f"{total_users * done / (last_note - t0):,.0f} users/s  "
                    f"~{(last_note - t0) * (1 - done) / done:,.0f}s left in the epoch")
        train_s = time.time() - t0
        _all_reduce(loss_sum)
        metrics = {"epoch": epoch, "step": state["step"], "loss": float(loss_sum[0] / max(loss_sum[1], 1)),
                   "train_s": train_s, "users_per_s": total_users / max(train_s, 1e-9)}
        every = run.train.eval_every
        evaluated = every > 0 and (epoch % every == 0 or epoch == run.train.epochs)
        if evaluated:
            t1 = time.time()
            result = evaluate_shard(model, shard, run)
            metrics["score_s"] = time.time() - t1
            for split in ("valid", "test"):
                metrics.update({f"{split}/{k}": v for k, v in result[split].items()})
            if state["best"] is None or metrics[select] > state["best"][select]:
                state["best"], state["bad_evals"] = dict(metrics), 0
            else:
                state["bad_evals"] += 1
        state["epoch"] = epoch
        state["history"].append(metrics)
        log(f"epoch {epoch:3d}  loss {metrics['loss']:.4f}  {metrics['users_per_s']:,.0f} users/s  "
            f"{train_s:.1f}s" + (f"  valid recall@20 {metrics['valid/recall@20']:.4f} "
                                 f"ndcg@20 {metrics['valid/ndcg@20']:.4f}  ({metrics['score_s']:.1f}s scoring)"
                                 if evaluated else ""))
        report = {k: v for k, v in metrics.items()}
        report["best_" + select] = state["best"][select] if state["best"] else float("nan")
        if evaluated or run.train.eval_every == 0:    # without evaluation, every epoch is kept
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_checkpoint(Path(tmp), model, run, meta, cfg["data_dir"], cfg.get("clusters_dir"),
                                    {**state, "optimizer": optimizer.state_dict()},
                                    cluster_files=cfg.get("cluster_files"))
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(report, checkpoint=ckpt)
        else:
            ray.train.report(report)
    if state["bad_evals"] >= run.train.patience:
        log(f"early stop: no better {select} for {state['bad_evals']} evaluations")
