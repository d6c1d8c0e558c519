"""Hyper-parameter search with Ray Tune over the project's TorchTrainer (DESIGN.md §5).

Ray 2.60 runs Train V2: every Tune trial is a small *driver function*
(``_trial``, ~0 CPU) that builds the usual ``TorchTrainer`` (``build_trainer``)
with its own storage under the trial directory and calls ``fit()``; Ray Train's
``TuneReportCallback`` forwards rank 0's per-epoch report (``epoch``,
``loss``, ``valid/*``, ``test/*``) to Tune, where ASHA compares trials on
``valid/<metric>`` at epoch milestones. Test metrics are reported but never
used to choose.

``run_search`` (driver side):

1. base config = preset (``base:`` of the space file or ``--config``) + fixed
   overrides; the space = the YAML ``space:`` + distribution overrides, minus
   what the variant does not use; a space that could draw an invalid
   combination is refused before anything starts (``tune_space``);
2. items are clustered once per distinct C in the space (``prepare_clusters``
   with the search directory as run dir), shipped to trials by object ref;
3. Optuna (TPE, through ``ray.tune.search.optuna``) when importable, else
   random search; ASHA; per-trial resources from the cluster's CPUs/GPUs,
   ``max_concurrent_trials`` so that trials never starve Ray Data's reads;
4. same ``--name`` + ``--storage`` → ``Tuner.restore`` continues the search
   (finished trials kept, unfinished ones resume from their Train checkpoint);
5. writes under the search directory: ``best_config.yaml`` (a preset for
   ``jobs/train_ldiffrec.py``), ``trials.csv``, ``metric_vs_params.png``,
   ``metric_over_epochs.png``, ``summary.json``; Tune writes per-trial
   TensorBoard events; per-trial metrics are also exported as Ray metrics
   (dashboard → Metrics / Grafana), and each trial's Train run shows in the
   dashboard's Train view.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from ray.tune.schedulers import ASHAScheduler

from distributed.config import SELECT_METRICS, RunConfig, load_preset
from distributed.tune_space import SearchSpace, SpaceError, canonical_key, check_constraints

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = REPO / "jobs" / "configs" / "tune-space.yaml"
TRIAL_DRIVER_CPUS = 0.01     # the trial's driver function only waits on fit()
STATE_FILE = "search_state.json"   # the search's base config + space, reused on resume


def _log(msg: str) -> None:
    print(f"[tune] {msg}", flush=True)


@dataclass
class SearchOptions:
    data_dir: str
    space: str | None = None               # YAML (default jobs/configs/tune-space.yaml)
    variant: str | None = None             # --model (default: the space file's model:)
    config: str | None = None              # base preset (default: the space file's base:)
    samples: int | None = None             # trials (default: the space file's samples:)
    metric: str | None = None              # ndcg@20 | recall@20 (default: the space file's metric:)
    storage: str = "runs/tune"
    name: str | None = None
    overrides: list[str] = field(default_factory=list)
    workers: int = 1                       # Train workers per trial
    cpus_per_worker: float | None = None
    gpus_per_worker: int = 0
    max_concurrent: int | None = None      # default: what the cluster holds
    searcher: str = "auto"                 # auto (optuna if installed) | optuna | random
    seed: int = 0
    grace_period: int | None = None        # ASHA, epochs
    reduction_factor: float | None = None
    time_budget_s: float | None = None


# ---------------------------------------------------------------- storage -----
def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def _fs(path: str):
    import pyarrow.fs
    return pyarrow.fs.FileSystem.from_uri(path)


def read_text(path: str) -> str | None:
    if not is_uri(path):
        return Path(path).read_text() if Path(path).exists() else None
    fs, p = _fs(path)
    import pyarrow.fs
    if fs.get_file_info(p).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def upload_dir(local: Path, dest: str) -> None:
    """Copy the files of ``local`` into ``dest`` (a URI; local dest: no-op)."""
    if not is_uri(dest):
        return
    import pyarrow.fs
    fs, p = _fs(dest)
    pyarrow.fs.copy_files(str(local), p, destination_filesystem=fs)


# ---------------------------------------------------------------- resources ---
def plan_resources(cluster_cpus: float, cluster_gpus: float, workers: int, cpus_per_worker: float | None,
                   gpus_per_worker: int, max_concurrent: int | None):
    """(max_concurrent_trials, trainer Resources): one CPU always left to Ray Data,
    trial drivers hold ~0 CPU; on 2 CPUs one trial runs at a time."""
    from distributed.trainer import Resources
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {workers})")
    free = max(cluster_cpus - 1.0, 0.1)
    per_trial_cpus = workers * (cpus_per_worker or 1.0)
    fits = max(1, int(free // per_trial_cpus + 1e-9))
    if gpus_per_worker:
        if cluster_gpus < workers * gpus_per_worker:
            raise ValueError(f"a trial needs {workers * gpus_per_worker} GPUs; the cluster has {cluster_gpus:g}")
        fits = min(fits, int(cluster_gpus // (workers * gpus_per_worker)))
    concurrent = max(1, min(fits, max_concurrent or fits))
    cpus = cpus_per_worker
    if cpus is None:
        cpus = max(0.1, min(1.0, (free - TRIAL_DRIVER_CPUS * concurrent) / (workers * concurrent)))
    threads = max(1, (os.cpu_count() or 1) // (workers * concurrent))
    return concurrent, Resources(workers, cpus, gpus_per_worker, threads, max_failures=1)


# ---------------------------------------------------------------- the trial ---
def _trial(params: dict, ctx: dict) -> None:
    """One Tune trial: a Train V2 driver function around the project's TorchTrainer."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from distributed.trainer import build_trainer
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    space = SearchSpace.from_spec(ctx["space"])
    base = RunConfig.from_dict(ctx["base"])
    values = space.resolve(params, base)
    config = base.with_overrides(values)
    check_constraints(config)             # last guard: an invalid combination is never trained
    config.validate(ctx["meta"]["n_items"])
    trial_dir = Path(ray.tune.get_context().get_trial_dir())
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "trial_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    _maybe_fail(trial_dir)
    assignment, clusters_dir = None, None
    if config.model.is_latent:
        entry = ctx["clusters"].get(config.model.n_clusters)
        if entry is None:
            raise RuntimeError(f"no clustering was prepared for C={config.model.n_clusters}")
        assignment, clusters_dir = entry
    _wait_for_free_cpus(ctx["resources"], ctx.get("concurrent", 1))
    storage = join(ctx["search_path"], trial_dir.name)   # the Train run lives in the trial's directory
    trainer = build_trainer(ctx["data_dir"], config, ctx["resources"], storage, "train", ctx["meta"],
                            assignment, clusters_dir)
    trainer.run_config.callbacks = list(trainer.run_config.callbacks or []) + [
        _report_callback(TuneReportCallback, trainer.train_run_context.run_id)]
    trainer.fit()


def _report_callback(base, run_id: str):
    """Ray Train's TuneReportCallback, with the Train run's id in every report so
    the search driver can release the run's resources if Tune stops the trial."""

    class ReportWithRunId(base):
        def after_report(self, run_context, metrics, checkpoint):
            metrics = [{**m, "train_run_id": run_id} for m in metrics] if metrics else metrics
            super().after_report(run_context, metrics, checkpoint)

    return ReportWithRunId()


def release_train_run(run_id: str, worker_bundle: dict | None, only_run: bool) -> None:
    """Free what a Train run killed with its Tune trial leaves behind: its
    resource request to Ray's AutoscalingCoordinator (else Ray Data's reads of the
    next trial starve until it expires, 180 s) and, when no other trial runs, its
    workers' placement group (Train's detached cleaner does this on a normal
    cluster; it cannot on a machine running several Ray instances)."""
    import ray
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)
        ray.get(get_or_create_autoscaling_coordinator().cancel_request.remote(requester_id=f"train-{run_id}"),
                timeout=10)
    except Exception as exc:   # noqa: BLE001 - best effort, the request expires anyway
        _log(f"could not cancel the resource request of Train run {run_id}: {exc!r}")
    if not (only_run and worker_bundle):
        return
    try:
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
        for pg_id, info in placement_group_table().items():
            bundles = list((info.get("bundles") or {}).values())
            if info.get("state") == "CREATED" and bundles and all(
                    {k: v for k, v in b.items() if v} == worker_bundle for b in bundles):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    except Exception as exc:   # noqa: BLE001
        _log(f"could not remove the placement group of Train run {run_id}: {exc!r}")


def _coordinator_requests() -> dict:
    """What Ray's AutoscalingCoordinator holds (Train reservations take Ray Data's CPUs)."""
    try:
        import ray
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)
        coord = get_or_create_autoscaling_coordinator()
        return ray.get(coord.__ray_call__.remote(
            lambda self: {k: (v.priority, v.requested_resources) for k, v in self._ongoing_reqs.items()}), timeout=10)
    except Exception as exc:   # noqa: BLE001 - diagnostics only
        return {"error": repr(exc)}


def _wait_for_free_cpus(resources, concurrent: int, timeout_s: float = 60.0) -> None:
    """Start a trial's Train run only once the previous trial's workers are gone
    (their CPUs back), so this run's Ray Data reads find a free CPU."""
    import ray
    need = resources.workers * resources.cpus_per_worker + 1.0 / max(concurrent, 1)
    deadline = time.time() + timeout_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free + 1e-6 >= need or time.time() > deadline:
            break
        time.sleep(1.0)
    if os.environ.get("DIFFREC_TUNE_DEBUG"):
        print(f"[tune] trial start: {free:.2f} CPU free (need {need:.2f}); coordinator {_coordinator_requests()}",
              flush=True)


def _maybe_fail(trial_dir: Path) -> None:
    """Test hook: DIFFREC_TUNE_FAIL_ONCE=<marker> makes the first trial to see it raise once."""
    marker = os.environ.get("DIFFREC_TUNE_FAIL_ONCE")
    if marker and not Path(marker).exists():
        Path(marker).write_text(str(trial_dir))
        raise RuntimeError("DIFFREC_TUNE_FAIL_ONCE: simulated trial failure")


def _tune_callback_class():
    from ray.tune import Callback

    class SearchMonitor(Callback):
        """Driver-side bookkeeping: which trials ASHA stopped early (kept in a
        file so it survives a resume), Ray metrics for the dashboard, and the
        interruption test hook (DIFFREC_TUNE_INTERRUPT_AFTER=<n>:<marker>:
        after n finished trials, stop the search as Ctrl+C would, once)."""

        def __init__(self, events_path: str, metric: str, max_epochs: int, worker_bundle: dict | None = None):
            self.events_path, self.metric, self.max_epochs = events_path, metric, max_epochs
            self.worker_bundle = worker_bundle
            self._gauges = None
            self._finished = 0
            self._runs = {}

        def _release(self, trial, trials) -> None:
            run_id = self._runs.pop(trial.trial_id, None)
            if run_id:
                others = [t for t in trials if t is not trial and t.status == "RUNNING"]
                release_train_run(run_id, self.worker_bundle, only_run=not others)

        def _gauge(self):
            if self._gauges is None:
                try:
                    from ray.util.metrics import Gauge
                    self._gauges = {k: Gauge(f"diffrec_tune_{k}", description=f"Tune trial {k}",
                                             tag_keys=("experiment", "trial"))
                                    for k in ("valid_metric", "loss", "epoch")}
                except Exception:   # noqa: BLE001 - metrics are best effort
                    self._gauges = {}
            return self._gauges

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("train_run_id"):
                self._runs[trial.trial_id] = result["train_run_id"]
            tags = {"experiment": Path(self.events_path).parent.name, "trial": trial.trial_id}
            for k, v in (("valid_metric", result.get(self.metric)), ("loss", result.get("loss")),
                         ("epoch", result.get("epoch"))):
                g = self._gauge().get(k)
                if g is not None and isinstance(v, (int, float)) and math.isfinite(v):
                    try:
                        g.set(float(v), tags=tags)
                    except Exception:   # noqa: BLE001
                        pass
            if result.get("done") and result.get("epoch", self.max_epochs) < self.max_epochs:
                self._event({"event": "stopped_early", "trial_id": trial.trial_id, "epoch": result.get("epoch")})

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial, trials)
            self._finished += 1
            self._maybe_interrupt()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial, trials)
            self._finished += 1
            self._maybe_interrupt()

        def _event(self, record: dict) -> None:
            try:
                with open(self.events_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError:
                pass

        def _maybe_interrupt(self) -> None:
            spec = os.environ.get("DIFFREC_TUNE_INTERRUPT_AFTER")
            if not spec:
                return
            n, marker = spec.split(":", 1)
            if self._finished >= int(n) and not Path(marker).exists():
                Path(marker).write_text("interrupted")
                os.kill(os.getpid(), signal.SIGUSR1)    # Tune's own SIGINT/SIGUSR1 handler stops the run

    return SearchMonitor


class PersistentASHA(ASHAScheduler):
    """ASHA whose rung records survive a resume: Tune restores the searcher but
    not the scheduler, so a resumed search would compare new trials with nobody.
    The records (trial id → metric per milestone) are kept in a JSON file."""

    def __init__(self, state_path: str, **kwargs):
        super().__init__(**kwargs)
        self._state_path = state_path
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self._state_path)
        if path.exists():
            saved = json.loads(path.read_text())
            for bracket, rungs in zip(self._brackets, saved):
                for (_, recorded), values in zip(bracket._rungs, rungs):
                    recorded.update(values)

    def _save(self) -> None:
        try:
            Path(self._state_path).write_text(json.dumps([[dict(recorded) for _, recorded in b._rungs]
                                                          for b in self._brackets]))
        except OSError:
            pass

    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


# ---------------------------------------------------------------- the driver --
def load_space_file(path: str | None) -> tuple[dict, Path]:
    path = Path(path) if path else DEFAULT_SPACE
    if not path.exists():
        raise FileNotFoundError(f"search space {path} does not exist; see {DEFAULT_SPACE}")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(spec) - {"base", "model", "metric", "samples", "asha", "fixed", "space"})
    if unknown:
        raise SpaceError(f"{path}: unknown key(s) {unknown}; known: base, model, metric, samples, asha, "
                         f"fixed, space")
    return spec, path


def build_search(opts: SearchOptions, meta: dict, log=_log) -> dict:
    """Everything decided before Ray starts: base config, space, metric, ASHA."""
    spec, space_path = load_space_file(opts.space)
    base_path = opts.config or spec.get("base")
    if base_path and not opts.config:
        base_path = str((space_path.parent / base_path).resolve())
    variant = opts.variant or spec.get("model")
    base = load_preset(base_path, variant)
    space = SearchSpace.from_spec(spec.get("space"))
    fixed = {canonical_key(k): v for k, v in (spec.get("fixed") or {}).items()}
    space, cli_fixed = space.split_overrides(opts.overrides)
    fixed.update(cli_fixed)
    for key in fixed:
        space.params.pop(key, None)
    base = base.with_overrides(fixed)
    metric = (opts.metric or spec.get("metric") or "ndcg@20").replace("valid/", "")
    if metric not in SELECT_METRICS:
        raise ValueError(f"--metric {metric!r}: use one of {SELECT_METRICS}")
    base.train.select_metric = metric      # checkpoints kept by the same validation metric
    space = space.restrict_to(base, log)
    space.check(base, meta["n_items"])
    asha = dict(spec.get("asha") or {})
    grace = opts.grace_period or int(asha.get("grace_period", 1))
    rf = opts.reduction_factor or float(asha.get("reduction_factor", 3))
    if grace < 1 or rf <= 1:
        raise ValueError("ASHA needs grace_period >= 1 and reduction_factor > 1")
    samples = opts.samples or int(spec.get("samples", 8))
    return {"base": base.to_dict(), "space": space.to_spec(), "metric": metric, "samples": samples,
            "grace_period": min(grace, base.train.epochs), "reduction_factor": rf,
            "space_file": str(space_path), "base_preset": base_path}


def make_searcher(kind: str, metric_key: str, seed: int, has_grid: bool, concurrent: int = 1, log=_log):
    """Optuna's TPE through Ray's integration when installed (``pip install optuna``),
    else random search; returns (search_alg, name)."""
    from ray.tune.search import BasicVariantGenerator
    if kind not in ("auto", "optuna", "random"):
        raise ValueError(f"--searcher {kind!r}: use auto, optuna or random")
    if kind != "random" and not has_grid:
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
            return OptunaSearch(metric=metric_key, mode="max", seed=seed), "optuna-tpe"
        except ImportError:
            if kind == "optuna":
                raise ImportError("--searcher optuna needs `pip install optuna`") from None
            log("optuna is not installed: random search (pip install optuna for TPE)")
    elif has_grid and kind != "random":
        log("the space has grid entries: random search (Optuna takes no grid)")
    # BasicVariantGenerator takes the concurrency limit itself (Tune ignores max_concurrent_trials for it)
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent), "random"


def run_search(opts: SearchOptions) -> dict:
    """Run (or resume) a search; returns the summary (also ``summary.json``)."""
    import ray
    from ray import tune
    from distributed.dataset_format import read_meta
    from distributed.ray_env import ensure_ray
    from distributed.trainer import prepare_clusters

    started = time.time()
    meta = read_meta(opts.data_dir)
    storage = opts.storage if is_uri(opts.storage) else str(Path(opts.storage).resolve())
    name = opts.name or f"tune-{opts.variant or 'search'}-{Path(opts.data_dir).resolve().name}"
    search_path = join(storage, name)
    plan = build_search(opts, meta)
    ensure_ray()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    resumed = tune.Tuner.can_restore(search_path)
    if resumed:
        saved = read_text(join(search_path, STATE_FILE))
        if saved:
            old = json.loads(saved)
            if (old["space"], old["base"], old["metric"]) != (plan["space"], plan["base"], plan["metric"]):
                _log("resuming: the saved search's space/base/metric are kept (the new ones differ)")
            plan = {**plan, **{k: old[k] for k in ("base", "space", "metric", "samples", "grace_period",
                                                  "reduction_factor") if k in old}}
    base = RunConfig.from_dict(plan["base"])
    if base.train.eval_every < 1:
        raise ValueError("a search ranks trials on validation: train.eval_every must be >= 1 (got 0)")
    space = SearchSpace.from_spec(plan["space"])
    metric_key = f"valid/{plan['metric']}"
    cluster = ray.cluster_resources()
    concurrent, resources = plan_resources(cluster.get("CPU", 1.0), cluster.get("GPU", 0.0), opts.workers,
                                           opts.cpus_per_worker, opts.gpus_per_worker, opts.max_concurrent)
    if resources.workers > meta["n_users"]:
        raise ValueError(f"--workers {resources.workers} is more than the {meta['n_users']} users")
    # Local files of the search (clusters, events): the search directory, or a local
    # cache when the storage is a URI (the clusters travel to trials by object ref).
    local_dir = Path(search_path) if not is_uri(search_path) else REPO / "runs" / "tune-cache" / name
    local_dir.mkdir(parents=True, exist_ok=True)
    clusters = {}
    if base.model.is_latent:
        for c in space.discrete_values("model.n_clusters", base):
            cfg = base.with_overrides({"model.n_clusters": c})
            assignment, directory = prepare_clusters(opts.data_dir, cfg, meta, local_dir)
            clusters[int(c)] = (assignment, directory)
        _log(f"item clusterings for C in {sorted(clusters)} in {local_dir}")
    state = {**plan, "data_dir": str(Path(opts.data_dir).resolve()), "name": name, "storage": storage}
    ctx = {"space": plan["space"], "base": plan["base"], "meta": meta, "clusters": clusters,
           "resources": resources, "concurrent": concurrent, "search_path": search_path, "data_dir": state["data_dir"]}
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"CPU": TRIAL_DRIVER_CPUS})
    _log(f"search {search_path}: {base.model.variant}, {space.trials_for(plan['samples'])} trials, "
         f"ASHA on {metric_key} "
         f"(grace {plan['grace_period']}, reduction {plan['reduction_factor']:g}, max {base.train.epochs} "
         f"epochs), {concurrent} at a time, {resources.workers} worker(s) x {resources.cpus_per_worker:g} CPU "
         f"per trial")
    if resumed:
        _log(f"resuming the interrupted search in {search_path}")
        tuner = tune.Tuner.restore(search_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        searcher_name = (json.loads(read_text(join(search_path, STATE_FILE)) or "{}")).get("searcher", "?")
    else:
        search_alg, searcher_name = make_searcher(opts.searcher, metric_key, opts.seed, space.has_grid,
                                                    concurrent)
        scheduler = PersistentASHA(str(local_dir / "asha_rungs.json"), time_attr="epoch",
                                   max_t=base.train.epochs, grace_period=plan["grace_period"],
                                   reduction_factor=plan["reduction_factor"])
        bundle = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker}
                                                       if resources.gpus_per_worker else {})}
        monitor = _tune_callback_class()(str(local_dir / "tune_events.jsonl"), metric_key, base.train.epochs,
                                         bundle)
        tuner = tune.Tuner(
            trainable, param_space=space.param_space(),
            tune_config=tune.TuneConfig(metric=metric_key, mode="max", search_alg=search_alg,
                                        scheduler=scheduler, num_samples=plan["samples"],
                                        # the random generator holds the limit itself (see make_searcher)
                                        max_concurrent_trials=None if searcher_name == "random" else concurrent,
                                        time_budget_s=opts.time_budget_s),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[monitor],
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1))
        state["searcher"] = searcher_name
        _write_state(search_path, local_dir, state)
    grid = tuner.fit()
    return finish_search(grid, plan, space, base, search_path, local_dir, searcher_name, resumed,
                         time.time() - started, resources.workers)


def _write_state(search_path: str, local_dir: Path, state: dict) -> None:
    text = json.dumps(state, indent=2, default=str)
    if is_uri(search_path):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / STATE_FILE).write_text(text)
            upload_dir(Path(tmp), search_path)
    else:
        (Path(search_path) / STATE_FILE).write_text(text)


# ---------------------------------------------------------------- results -----
def trial_rows(grid, plan: dict, space: SearchSpace, base: RunConfig, stopped: set) -> list[dict]:
    """One row per trial, chosen epoch = best validation (never test)."""
    metric_key = f"valid/{plan['metric']}"
    rows = []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or (Path(r.path).name if r.path else "?")
        df = r.metrics_dataframe
        history = [] if df is None or metric_key not in df else df.to_dict("records")
        evaluated = [h for h in history if isinstance(h.get(metric_key), (int, float))
                     and math.isfinite(h[metric_key])]
        best = max(evaluated, key=lambda h: h[metric_key]) if evaluated else {}
        try:
            values = space.resolve({k.split("config/", 1)[-1]: v for k, v in (r.config or {}).items()}, base)
        except KeyError:
            values = {}
        last_epoch = int(history[-1]["epoch"]) if history else 0
        status = "ERROR" if r.error else ("STOPPED_EARLY" if trial_id in stopped else
                                          ("DONE" if history else "PENDING"))
        rows.append({
            "trial_id": trial_id, "status": status, "epochs": last_epoch,
            "best_epoch": int(best["epoch"]) if best else None,
            metric_key: best.get(metric_key), **{f"valid/{m}": best.get(f"valid/{m}") for m in SELECT_METRICS},
            **{f"test/{m}@best_valid": best.get(f"test/{m}") for m in SELECT_METRICS},
            **values, "path": r.path, "error": str(r.error).splitlines()[0][:200] if r.error else "",
            "_history": [{k: h.get(k) for k in ("epoch", metric_key, "loss")} for h in history],
        })
    rows.sort(key=lambda row: -(row[metric_key] if row[metric_key] is not None else -math.inf))
    for i, row in enumerate(rows, 1):
        row["rank"] = i if row[metric_key] is not None else None
    return rows


def finish_search(grid, plan: dict, space: SearchSpace, base: RunConfig, search_path: str, local_dir: Path,
                  searcher: str, resumed: bool, wall_s: float, workers: int) -> dict:
    metric_key = f"valid/{plan['metric']}"
    stopped = set()
    events = local_dir / "tune_events.jsonl"
    if events.exists():
        stopped = {json.loads(line)["trial_id"] for line in events.read_text().splitlines() if line.strip()}
    rows = trial_rows(grid, plan, space, base, stopped)
    finished = [r for r in rows if r["status"] in ("DONE", "STOPPED_EARLY")]
    expected = space.trials_for(plan["samples"])
    complete = len(rows) >= expected and all(r["status"] != "PENDING" for r in rows) \
        and grid.num_terminated + grid.num_errors >= len(rows)
    out = Path(search_path) if not is_uri(search_path) else Path(tempfile.mkdtemp(prefix="tune-out-"))
    out.mkdir(parents=True, exist_ok=True)
    best = rows[0] if rows and rows[0][metric_key] is not None else None
    best_config = None
    if best is not None:
        values = {k: best[k] for k in space.params}
        best_config = base.with_overrides(values)
        header = (f"# Best of the search {search_path} by {metric_key} (validation only)\n"
                  f"# trial {best['trial_id']}, epoch {best['best_epoch']}: {metric_key} = {best[metric_key]:.5f}; "
                  f"test at that epoch (reported, not used to choose): "
                  + ", ".join(f"{m} {best[f'test/{m}@best_valid']:.5f}" for m in SELECT_METRICS) + "\n"
                  # the trials' worker count: with another, batches differ and so may the result
                  f"# Train it: python jobs/train_ldiffrec.py --data DIR --config best_config.yaml --workers {workers}\n")
        (out / "best_config.yaml").write_text(header + yaml.safe_dump(best_config.to_dict(), sort_keys=False))
    write_trials_csv(out / "trials.csv", rows, list(space.params), metric_key)
    plot_search(out, rows, space, metric_key)
    summary = {
        "job": "tune_ldiffrec", "search_dir": search_path, "complete": complete, "resumed": resumed,
        "metric": metric_key, "searcher": searcher, "scheduler": "asha",
        "trials": len(rows), "finished": len(finished),
        "stopped_early": sum(r["status"] == "STOPPED_EARLY" for r in rows),
        "errors": sum(r["status"] == "ERROR" for r in rows),
        "best": None if best is None else {
            "trial_id": best["trial_id"], "epoch": best["best_epoch"],
            "valid": {m: best[f"valid/{m}"] for m in SELECT_METRICS},
            "test_at_best_valid": {m: best[f"test/{m}@best_valid"] for m in SELECT_METRICS},
            "params": {k: best[k] for k in space.params}, "path": best["path"]},
        "best_config": str(out / "best_config.yaml") if best is not None else None,
        "space": plan["space"], "base": plan["base"], "wall_s": round(wall_s, 1),
        "ranking": [{k: v for k, v in r.items() if k != "_history"} for r in rows],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if is_uri(search_path):
        upload_dir(out, search_path)
        summary["local_copy"] = str(out)
    print_table(rows, list(space.params), metric_key)
    if not complete:
        _log(f"the search is not finished ({len(finished)}/{expected} trials); re-run the same "
             f"command (same --name and --storage) to continue it")
    if best is not None:
        _log(f"best: trial {best['trial_id']} epoch {best['best_epoch']} {metric_key} {best[metric_key]:.4f} "
             f"→ {join(search_path, 'best_config.yaml')}")
    return summary


def write_trials_csv(path: Path, rows: list[dict], params: list[str], metric_key: str) -> None:
    keys = ["rank", "trial_id", "status", "epochs", "best_epoch",
            *[f"valid/{m}" for m in SELECT_METRICS], *[f"test/{m}@best_valid" for m in SELECT_METRICS],
            *params, "path", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict], params: list[str], metric_key: str) -> None:
    short = {p: p.split(".", 1)[1] for p in params}
    header = f"{'#':>3} {'trial':<10} {'status':<14}{'ep':>4}{metric_key:>17}{'test@best':>11}" + \
        "".join(f"{short[p][:12]:>13}" for p in params)
    print(header)
    print("-" * len(header))
    test_key = f"test/{metric_key.split('/', 1)[1]}@best_valid"
    fmt = lambda v: f"{v:>13.4g}" if isinstance(v, (int, float)) else f"{str(v):>13}"   # noqa: E731
    for r in rows:
        val = r[metric_key]
        print(f"{r['rank'] or '-':>3} {r['trial_id']:<10} {r['status']:<14}{r['epochs']:>4}"
              + (f"{val:>17.4f}{r[test_key]:>11.4f}" if val is not None else f"{'-':>17}{'-':>11}")
              + "".join(fmt(r.get(p)) for p in params))


def plot_search(out: Path, rows: list[dict], space: SearchSpace, metric_key: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    params = list(space.params)
    scored = [r for r in rows if r[metric_key] is not None]
    n = max(1, len(params))
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.7 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, params):
        xs = [r.get(key) for r in scored]
        ys = [r[metric_key] for r in scored]
        colors = ["tab:orange" if r["status"] == "STOPPED_EARLY" else "tab:blue" for r in scored]
        ax.scatter(xs, ys, c=colors, s=18)
        p = space.params[key]
        if p.dist.log_scale or (p.above is not None and p.op == "factor"):
            if all(isinstance(x, (int, float)) and x > 0 for x in xs):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(f"best {metric_key}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    fig.suptitle("best validation per trial (orange: stopped early by ASHA)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "metric_vs_params.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        hist = [h for h in r["_history"] if isinstance(h.get(metric_key), (int, float))]
        if hist:
            ax.plot([h["epoch"] for h in hist], [h[metric_key] for h in hist], marker=".",
                    linestyle="--" if r["status"] == "STOPPED_EARLY" else "-",
                    label=f"{r['trial_id']} ({r['status'].lower()})")
    ax.set(xlabel="epoch", ylabel=metric_key, title=f"{metric_key} per trial (dashed: stopped by ASHA)")
    if len(rows) <= 16:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "metric_over_epochs.png", dpi=90)
    plt.close(fig)
