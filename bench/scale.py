"""Large catalogs: L-DiffRec (and LT-DiffRec) cost against catalog size.

For each catalog size N (synthetic data: N/2 users (--users-per-item), 100
interactions per user, so 1,000,000 items means 500,000 users and 50,000,000
interactions):

  1. prepare the dataset (jobs/prepare_data.py's pipeline; kept in --workdir and
     reused by later runs, with the time it took the first time);
  2. cluster the items (SVD + FAISS k-means, C = --clusters);
  3. train one full epoch with Ray Train (1 worker, no evaluation pass);
  4. score every user's top-K to Parquet (jobs/score_batch.py's pipeline);
  5. count the matmul FLOPs of one training step of the same model in this
     process (torch's FlopCounterMode) and time an fp32 GEMM here, so the
     training rate can be put against the machine's matrix-multiply rate
     measured in the same run;
  6. ask the start-up estimator whether DiffRec (no latent space) would fit;
     where it cannot, the refusal it raises is printed instead of a crash;
  7. (--probe-widths) at the largest catalog, time a few in-process training
     steps for other decoder widths: the FLOP/s fraction is bounded by the
     per-cluster width of the N-wide output layer (its arithmetic intensity),
     so the probe shows what a wider model buys and costs per step.

    python bench/scale.py --items 10000,100000,1000000 [--workdir DIR] [--json PATH]
                          [--models ldiffrec,ltdiffrec] [--lt-max-items 100000] [--clusters 16]

Prints one table and writes --json ({items: {train_users_per_s, score_users_per_s,
peak_rss_gib, gemm_fraction, n_users, n_interactions, ...}}) and a PNG (users/s
and peak memory against catalog size) next to it (or in --workdir).
LT-DiffRec costs the same per user as L-DiffRec (time weights only change the
input values); it runs at sizes up to --lt-max-items to keep the run short.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.memory import PeakMemory, RayProcessPeaks  # noqa: E402
from distributed.config import RunConfig  # noqa: E402
from distributed.dataset_format import read_meta  # noqa: E402
from distributed.ray_env import ensure_ray  # noqa: E402

GIB = 2**30


def scale_config(variant: str, clusters: int, latent: int, vae_hidden: int, batch: int) -> RunConfig:
    """The benchmark's model: C clusters, each with a latent slice and decoder
    hidden layer proportional to its item count (at C = 16 and 512 hidden: 32 per
    cluster, the inner size of the N-wide output layer's matmuls; wider means a
    larger share of matmul time, and a slower epoch)."""
    config = RunConfig()
    m, t = config.model, config.train
    m.variant, m.n_clusters, m.latent_size = variant, clusters, latent
    m.vae_hidden_dims = [vae_hidden] if vae_hidden else []
    m.dims, m.steps = [latent], 20
    if variant.startswith("lt"):
        m.w_min, m.w_max = 0.1, 1.0
    t.epochs, t.eval_every, t.batch_size, t.keep_checkpoints = 1, 0, batch, 1
    config.clustering.svd_dim, config.clustering.niter = 64, 20
    return config


def n_users(items: int, args) -> int:
    return max(1, int(items * args.users_per_item))      # 0.5: exactly items // 2


def data_dir(workdir: Path, items: int, users: int) -> Path:
    """Where the synthetic set of this size lives: the default items / 2 users
    keep the plain name, so other user counts never overwrite it."""
    return workdir / (f"synthetic-{items}" if users == items // 2 else f"synthetic-{items}-{users}u")


def prepared(items: int, users: int, interactions: int, workdir: Path, log) -> tuple[Path, float]:
    """The prepared synthetic set (reused when its counts match) and its preparation time."""
    from distributed.prepare import PrepareOptions, prepare_dataset
    from distributed.sources import SourceSpec
    from distributed.synthetic import SyntheticSpec
    out = data_dir(workdir, items, users)
    timing = out.with_name(out.name + ".prepare.json")
    if (out / "meta.json").exists() and timing.exists():
        record = json.loads(timing.read_text())
        if record["spec"] == [users, items, interactions]:
            log(f"reusing {out} (prepared in {record['prepare_s']:.1f}s)")
            return out, record["prepare_s"]
    spec = SourceSpec(kind="synthetic", synthetic=SyntheticSpec(
        n_users=users, n_items=items, n_interactions=interactions))
    t0 = time.time()
    prepare_dataset(spec, out, PrepareOptions(overwrite=True))
    seconds = time.time() - t0
    timing.write_text(json.dumps({"spec": [users, items, interactions], "prepare_s": seconds}))
    return out, seconds


def gemm_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matrix-multiply rate (best of ``repeats``) at ``threads``."""
    import torch

    from bench.train_step import make_gemm
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    gemm = make_gemm(size, size, size)
    gemm()                                              # warm-up
    best = min(gemm() for _ in range(repeats))
    torch.set_num_threads(before)
    return 2 * size**3 / best / 1e9


def flops_per_user(config: RunConfig, data_dir: Path, n_items: int, clusters) -> tuple[float, float, int]:
    """(model FLOPs, executed matmul FLOPs, per user of one training step; parameters)
    on the first ``batch_size`` users of the set, counted by torch.

    Model FLOPs are 3 × the forward's matmul FLOPs (forward + the two backward
    products), the usual utilisation convention; executed FLOPs also count the
    backward's recomputation of the output layer's logits (fused_output), which
    is work done but not work the model needs, so the fraction uses the former."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from distributed.dataset_format import user_files
    from models.batch import HistoryBatch
    from models.recommender import DiffusionRecommender

    rows = pq.ParquetFile(user_files(data_dir)[0]).read_row_group(0, columns=["train_items"])
    lists = [np.asarray(x) for x in rows["train_items"].to_pylist()[:config.train.batch_size]]
    batch = HistoryBatch.from_lists(lists, n_items)
    torch.manual_seed(0)
    model = DiffusionRecommender(config.model, n_items, item_clusters=clusters)
    with FlopCounterMode(display=False) as forward:
        loss = model(batch, 0).loss
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    params = sum(p.numel() for p in model.parameters())
    fwd, bwd = forward.get_total_flops(), backward.get_total_flops()
    return 3 * fwd / batch.size, (fwd + bwd) / batch.size, params


def diffrec_check(n_items: int, meta: dict) -> dict:
    """What the start-up estimator says of DiffRec (no latent, dims [1000]) here."""
    from distributed.estimate import EstimateDoesNotFit, diffrec_memory_bytes, startup_estimate
    from distributed.trainer import Resources
    config = RunConfig()
    config.model.variant, config.model.dims = "diffrec", [1000]
    need = diffrec_memory_bytes(n_items, [1000], batch=config.train.batch_size,
                                eval_batch=config.train.eval_batch_size)
    lines = []
    try:
        startup_estimate(config, meta, None, Resources(workers=1).resolve(2), log=lines.append)
        return {"diffrec_need_gib": round(need / GIB, 2), "diffrec_refused": None}
    except EstimateDoesNotFit as e:
        return {"diffrec_need_gib": round(need / GIB, 2), "diffrec_refused": str(e).splitlines()[0]}


def probe_widths(items: int, clusters, widths, args, workdir: Path, log, steps: int = 4) -> dict:
    """In-process training steps (forward + backward + Adam, this process's
    threads) of the L-DiffRec model at each decoder width, on the prepared
    set of ``items`` and its clustering from the main run: seconds per step,
    model GFLOP/s and its fraction of the GEMM rate measured just before."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from distributed.dataset_format import user_files
    from distributed.train_loop import make_optimizer
    from models.batch import HistoryBatch
    from models.recommender import DiffusionRecommender

    data = data_dir(workdir, items, n_users(items, args))
    meta = read_meta(data)
    need = args.batch_size * (steps + 1)
    rows = []
    for path in user_files(data):               # enough users for every timed step's full batch
        rows += pq.read_table(path, columns=["train_items"])["train_items"].to_pylist()[:need - len(rows)]
        if len(rows) == need:
            break
    if len(rows) < need:
        raise SystemExit(f"the width probe needs {need:,} users ({steps + 1} batches of --batch-size "
                         f"{args.batch_size}); {data} has {len(rows):,}")
    threads = torch.get_num_threads()
    out = {}
    for width in widths:
        config = scale_config("ldiffrec", args.clusters, args.latent, width, args.batch_size)
        model_flops, _, params = flops_per_user(config, data, meta["n_items"], clusters)
        torch.manual_seed(0)
        model = DiffusionRecommender(config.model, meta["n_items"], item_clusters=clusters)
        optimizer = make_optimizer(model, config)
        B = args.batch_size
        batches = [HistoryBatch.from_lists([np.asarray(x) for x in rows[i * B:(i + 1) * B]], meta["n_items"])
                   for i in range(steps + 1)]
        gemm = gemm_gflops(threads)
        times = []
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(batch, i).loss.backward()
            optimizer.step()
            if i:                                       # the first step warms the allocator
                times.append(time.perf_counter() - t0)
        per_step = float(np.median(times))
        achieved = model_flops * B / per_step / 1e9
        out[str(width)] = {"n_items": meta["n_items"], "batch_size": B, "vae_hidden": width,
                           "per_cluster_width": round(width / args.clusters, 1),
                           "parameters": params, "s_per_step": round(per_step, 3),
                           "users_per_s": round(B / per_step, 1), "achieved_gflops": round(achieved, 1),
                           "gemm_gflops": round(gemm, 1), "gemm_fraction": round(achieved / gemm, 3),
                           "threads": threads}
        log(f"width probe {items:,} items, decoder {width} ({width / args.clusters:.0f} per cluster): "
            f"{per_step:.2f} s/step, {achieved:.1f} of {gemm:.1f} GFLOP/s ({achieved / gemm:.0%})")
        del model, optimizer
    return out


def run_size(items: int, variant: str, args, workdir: Path, log, clusters_by_items: dict) -> dict:
    from distributed.scoring import ScoreOptions, score_batch
    from distributed.trainer import Resources, prepare_clusters, train

    users = n_users(items, args)
    interactions = users * args.per_user
    data, prepare_s = prepared(items, users, interactions, workdir, log)
    meta = read_meta(data)
    config = scale_config(variant, args.clusters, args.latent, args.vae_hidden, args.batch_size)
    config.validate(meta["n_items"])
    name = f"scale-{variant}-{items}"
    run_dir = workdir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)       # a fresh run: clustering and training are timed
    run_dir.mkdir(parents=True)
    t0 = time.time()
    clusters, _ = prepare_clusters(str(data), config, meta, run_dir)   # cached there for train()
    cluster_s = time.time() - t0
    clusters_by_items[items] = clusters
    resources = Resources(workers=1)
    threads = resources.resolve(2).threads_per_worker
    gemm_before = gemm_gflops(threads)
    with RayProcessPeaks() as workers, PeakMemory() as machine:
        summary = train(str(data), config, resources, storage=str(workdir / "runs"), name=name)
    train_rss, train_proc = workers.peak("RayTrainWorker")
    train_machine = machine.peak_used_gib
    recs = workdir / f"recs-{variant}-{items}"
    with RayProcessPeaks() as workers, PeakMemory() as machine:
        scored = score_batch(summary["last_checkpoint"], str(data), str(recs),
                             ScoreOptions(k=args.k, batch_size=args.score_batch_size, overwrite=True))
    score_rss, score_proc = workers.peak("MapWorker")
    gemm_after = gemm_gflops(threads)
    per_user, executed_per_user, params = flops_per_user(config, data, meta["n_items"], clusters)
    gemm = max(gemm_before, gemm_after)
    train_ups = summary["users_per_s"]
    achieved = per_user * train_ups / 1e9
    result = {
        "variant": variant, "n_items": meta["n_items"], "n_users": meta["n_users"],
        "n_interactions": meta["n_train"] + meta["n_valid"] + meta["n_test"], "n_train": meta["n_train"],
        "clusters": args.clusters, "cluster_sizes": sorted(int(c) for c in _sizes(clusters)),
        "parameters": params, "prepare_s": round(prepare_s, 1), "cluster_s": round(cluster_s, 1),
        "train_epoch_s": round(summary["train_s_per_epoch"], 1), "train_users_per_s": round(train_ups, 1),
        "score_s": scored["score_s"], "score_users_per_s": scored["users_per_s"],
        "users_scored": scored["users_scored"], "recs_mib": round(scored["output_bytes"] / 2**20, 1),
        "train_worker_peak_rss_gib": round(train_rss, 2), "score_actor_peak_rss_gib": round(score_rss, 2),
        "peak_rss_gib": round(max(train_rss, score_rss), 2),
        "train_machine_used_gib": round(train_machine, 2), "score_machine_used_gib": round(machine.peak_used_gib, 2),
        "train_gflop_per_user": round(per_user / 1e9, 4), "achieved_gflops": round(achieved, 1),
        "executed_gflop_per_user": round(executed_per_user / 1e9, 4),
        "executed_gflops": round(executed_per_user * train_ups / 1e9, 1),
        "gemm_gflops": round(gemm, 1), "gemm_gflops_before_after": [round(gemm_before, 1), round(gemm_after, 1)],
        "gemm_fraction": round(achieved / gemm, 3), "threads": threads,
        "train_worker": train_proc, "score_actor": score_proc,
        **diffrec_check(meta["n_items"], meta),
    }
    log(f"{variant} {items:,} items: train {train_ups:,.0f} users/s, score {scored['users_per_s']:,.0f} users/s, "
        f"peak RSS {result['peak_rss_gib']:.2f} GiB, {achieved:.1f} of {gemm:.1f} GFLOP/s")
    if not args.keep:
        shutil.rmtree(recs, ignore_errors=True)
    return result


def _sizes(clusters):
    import numpy as np
    return np.bincount(np.asarray(clusters)).tolist()


COLUMNS = [("n_items", "items", "{:,}"), ("n_users", "users", "{:,}"), ("n_interactions", "interactions", "{:,}"),
           ("parameters", "params", "{:,}"), ("prepare_s", "prep s", "{:.0f}"), ("cluster_s", "clust s", "{:.0f}"),
           ("train_users_per_s", "train u/s", "{:,.0f}"), ("score_users_per_s", "score u/s", "{:,.0f}"),
           ("peak_rss_gib", "peak RSS GiB", "{:.2f}"), ("achieved_gflops", "GFLOP/s", "{:.1f}"),
           ("gemm_gflops", "GEMM", "{:.1f}"), ("gemm_fraction", "of GEMM", "{:.0%}"),
           ("diffrec_need_gib", "DiffRec GiB", "{:,.1f}")]


def print_table(results: dict) -> None:
    probe = results.get("width_probe", {})
    results = {k: r for k, r in results.items() if k != "width_probe"}
    widths = [max(len(h), 10) for _, h, _ in COLUMNS]
    if results:
        print("model      " + " ".join(f"{h:>{w}}" for (_, h, _), w in zip(COLUMNS, widths)))
    for key, r in results.items():
        print(f"{r['variant']:<10} " + " ".join(f"{f.format(r[k]):>{w}}" for (k, _, f), w in zip(COLUMNS, widths)))
    for key, r in results.items():
        if r["diffrec_refused"]:
            print(f"DiffRec at {r['n_items']:,} items: refused before start: {r['diffrec_refused']}")
    by_items = {r["n_items"]: r for r in results.values() if r["variant"] == "ldiffrec"}
    sizes = sorted(by_items)
    for small, large in zip(sizes, sizes[1:]):
        cost = by_items[small]["train_users_per_s"] / by_items[large]["train_users_per_s"]
        print(f"training cost per user, {small:,} -> {large:,} items: x{cost:.2f} "
              f"(catalog x{large / small:.0f}; linear would be x{large / small:.0f})")
    if probe:
        first = next(iter(probe.values()))
        print(f"\nwidth probe at {first.get('n_items', 0):,} items, batch {first.get('batch_size', '?')} "
              "(in-process steps): decoder width, per cluster, s/step, users/s, GFLOP/s, of GEMM")
        for r in probe.values():
            print(f"  {r['vae_hidden']:>6} {r['per_cluster_width']:>6.0f} {r['s_per_step']:>7.2f} "
                  f"{r['users_per_s']:>7.0f} {r['achieved_gflops']:>7.1f} {r['gemm_fraction']:>7.0%}")


def plot(results: dict, path: Path) -> None:
    results = {k: r for k, r in results.items() if k != "width_probe"}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant in sorted({r["variant"] for r in results.values()}):
        rows = sorted((r for r in results.values() if r["variant"] == variant), key=lambda r: r["n_items"])
        x = [r["n_items"] for r in rows]
        speed.plot(x, [r["train_users_per_s"] for r in rows], marker="o", label=f"{variant} train")
        speed.plot(x, [r["score_users_per_s"] for r in rows], marker="s", linestyle="--", label=f"{variant} score")
        memory.plot(x, [r["train_worker_peak_rss_gib"] for r in rows], marker="o", label=f"{variant} train worker")
        memory.plot(x, [r["score_actor_peak_rss_gib"] for r in rows], marker="s", linestyle="--",
                    label=f"{variant} scoring actor")
    speed.set(xscale="log", yscale="log", xlabel="catalog size (items; users = items / 2)", ylabel="users / s",
              title="throughput")
    memory.set(xscale="log", xlabel="catalog size (items)", ylabel="peak RSS (GiB)", title="memory per process")
    memory.axhline(16, color="grey", linewidth=0.8, linestyle=":")
    for ax in (speed, memory):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="10000,100000,1000000", help="comma-separated catalog sizes")
    p.add_argument("--models", default="ldiffrec,ltdiffrec")
    p.add_argument("--lt-max-items", type=int, default=100_000, help="largest catalog LT-DiffRec runs at")
    p.add_argument("--per-user", type=int, default=100, help="interactions per user")
    p.add_argument("--users-per-item", type=float, default=0.5,
                   help="users = items x this (0.5: 1M items, 500k users); fewer users time the same "
                        "catalog's per-user cost in a shorter run")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--latent", type=int, default=256)
    p.add_argument("--vae-hidden", type=int, default=512, help="decoder hidden width in all (0: none)")
    p.add_argument("--batch-size", type=int, default=400)
    p.add_argument("--score-batch-size", type=int, default=256)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--workdir", default=None, help="datasets, runs and recommendations (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the recommendation Parquet")
    p.add_argument("--probe-widths", default="",
                   help="decoder widths (--vae-hidden values) to time in-process at the largest size, e.g. 512,2048")
    p.add_argument("--probe-only", action="store_true",
                   help="only the width probe, on the largest size already prepared and clustered in --workdir "
                        "(its figures replace width_probe in the JSON, the runs' figures are kept)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.items.split(",") if s.strip()]
    variants = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(v not in ("ldiffrec", "ltdiffrec") for v in variants):
        raise SystemExit(f"--models takes ldiffrec and/or ltdiffrec (got {args.models})")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.json) if args.json else workdir / "scale.json"
    log = lambda msg: print(f"[scale] {msg}", flush=True)  # noqa: E731
    widths = [int(w) for w in args.probe_widths.split(",") if w.strip()]
    if args.probe_only:
        return probe_only(args, max(sizes), widths, workdir, out_json, log)
    ensure_ray()
    results, clusters_by_items = {}, {}
    for items in sizes:
        for variant in variants:
            if variant == "ltdiffrec" and items > args.lt_max_items:
                continue
            key = str(items) if variant == "ldiffrec" else f"{items}-{variant}"
            results[key] = run_size(items, variant, args, workdir, log, clusters_by_items)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=2) + "\n")      # partial results survive a crash
    if widths:
        results["width_probe"] = probe_widths(max(sizes), clusters_by_items[max(sizes)], widths, args, workdir, log)
        out_json.write_text(json.dumps(results, indent=2) + "\n")
    return report(results, out_json)


def probe_only(args, items: int, widths: list[int], workdir: Path, out_json: Path, log) -> dict:
    from distributed.trainer import prepare_clusters
    data = data_dir(workdir, items, n_users(items, args))
    if not widths or not (data / "meta.json").exists():
        raise SystemExit(f"--probe-only needs --probe-widths and {data} prepared by an earlier full run "
                         f"with this --workdir")
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    config = scale_config("ldiffrec", args.clusters, args.latent, args.vae_hidden, args.batch_size)
    clusters, _ = prepare_clusters(str(data), config, read_meta(data), workdir / "runs" / f"scale-ldiffrec-{items}")
    results["width_probe"] = probe_widths(items, clusters, widths, args, workdir, log)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    return report(results, out_json)


def report(results: dict, out_json: Path) -> dict:
    print()
    print_table(results)
    if not any(k != "width_probe" for k in results):      # a probe alone: nothing to plot
        print(f"\nfigures: {out_json}")
        return results
    png = out_json.with_suffix(".png")
    plot(results, png)
    print(f"\nfigures: {out_json}  plot: {png}")
    return results


if __name__ == "__main__":
    main()
