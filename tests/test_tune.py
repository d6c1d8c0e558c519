"""Ray Tune search (jobs/tune_ldiffrec.py, distributed/tune.py, distributed/tune_space.py).

The space tests need no Ray. The integration test runs a 3-trial search on
small synthetic data on the module's local Ray (2 CPUs, one trial at a time):
the search is interrupted after its first trial (as Ctrl+C would) and resumed
by re-running the job; ASHA stops a weak trial early; every launched trial's
config keeps noise_min < noise_max and w_min < w_max; best_config.yaml is a
preset the training job trains from.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import random
from pathlib import Path

import pytest
import yaml

from distributed.config import load_preset
from distributed.tune_space import InvalidTrialConfig, SearchSpace, SpaceError, check_constraints

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
SPACE = REPO / "jobs" / "configs" / "tune-space.yaml"


def _job(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _default_space() -> SearchSpace:
    return SearchSpace.from_spec(yaml.safe_load(SPACE.read_text())["space"])


def test_default_space_covers_the_paper_knobs_and_never_draws_invalid_pairs():
    space = _default_space()
    for key in ("model.lambda_start", "model.kl_cap", "model.noise_scale", "model.noise_min", "model.noise_max",
                "model.w_min", "model.w_max", "train.lr", "train.lr_denoiser", "model.steps", "model.n_clusters"):
        assert key in space.params, key
    base = load_preset(DEMO, "ltdiffrec")
    space.check(base, n_items=200)
    rng = random.Random(0)
    for _ in range(2000):
        values = space.resolve({p.tune_key: p.dist.draw(rng) for p in space.params.values()}, base)
        assert values["model.noise_min"] < values["model.noise_max"]
        assert values["model.w_min"] < values["model.w_max"]
        check_constraints(base.with_overrides(values))


def test_space_refuses_what_could_draw_an_invalid_combination():
    base = load_preset(DEMO, "ltdiffrec")
    space = _default_space()
    overlapping, fixed = space.split_overrides(["model.w_max={uniform: [0.3, 1.0]}"])
    with pytest.raises(SpaceError, match="w_min >= model.w_max"):
        overlapping.check(base.with_overrides(fixed))
    low_max, fixed = space.split_overrides(["noise_max=0.001"])     # fixed below noise_min's range
    with pytest.raises(SpaceError, match="noise_min >= model.noise_max"):
        low_max.check(base.with_overrides(fixed))
    with pytest.raises(SpaceError, match="factor must be > 1"):
        SearchSpace.from_spec({"model.noise_max": {"above": "model.noise_min", "factor": {"uniform": [0.5, 2]}}})
    too_many_clusters, fixed = space.split_overrides(["n_clusters={choice: [2, 500]}"])
    with pytest.raises(SpaceError, match="n_clusters"):
        too_many_clusters.check(base.with_overrides(fixed), n_items=200)
    disjoint, fixed = space.split_overrides(["w_min={uniform: [0.1, 0.4]}", "w_max={uniform: [0.5, 1.0]}"])
    disjoint.check(base.with_overrides(fixed))                      # disjoint ranges are fine
    with pytest.raises(InvalidTrialConfig):                          # the in-trial guard
        check_constraints(base.with_overrides({"model.w_min": 0.9, "model.w_max": 0.5}))


def test_overrides_fix_or_replace_and_irrelevant_knobs_are_dropped():
    space, fixed = _default_space().split_overrides(["steps=20", "lr={choice: [0.001, 0.002]}"])
    assert "model.steps" not in space.params and fixed == {"model.steps": 20}
    assert space.params["train.lr"].dist.values() == [0.001, 0.002]
    diffrec = space.restrict_to(load_preset(DEMO, "diffrec"), log=lambda m: None)
    assert not {"model.n_clusters", "model.kl_cap", "model.w_min", "model.w_max", "train.lr_denoiser"} \
        & set(diffrec.params)


def test_trials_fit_a_two_cpu_machine_one_at_a_time():
    from distributed.tune import plan_resources
    concurrent, res = plan_resources(2.0, 0.0, workers=1, cpus_per_worker=None, gpus_per_worker=0,
                                     max_concurrent=None)
    assert concurrent == 1 and 0 < res.cpus_per_worker <= 0.99          # one CPU stays with Ray Data
    concurrent, res = plan_resources(16.0, 4.0, workers=2, cpus_per_worker=None, gpus_per_worker=1,
                                     max_concurrent=None)
    assert concurrent == 2                                               # 4 GPUs / (2 workers x 1 GPU)


@pytest.fixture(scope="module")
def tiny_data(ray_local, tmp_path_factory):
    from distributed.prepare import PrepareOptions, prepare_dataset
    from distributed.sources import SourceSpec
    from distributed.synthetic import SyntheticSpec
    out = tmp_path_factory.mktemp("tune") / "data"
    prepare_dataset(SourceSpec("synthetic", synthetic=SyntheticSpec(n_users=300, n_items=200, n_interactions=6000,
                                                                    seed=0)), out, PrepareOptions(overwrite=True))
    return out


def test_search_interrupted_resumed_asha_best_config_trains(ray_local, tiny_data, tmp_path, monkeypatch):
    storage, name = tmp_path / "tune", "lt"
    # 3 trials: a grid over the autoencoder's rate (a good one first, then two that can barely
    # learn, which ASHA stops at its first rung), the rest drawn from the default space.
    argv = ["--data", str(tiny_data), "--model", "ltdiffrec", "--samples", "1", "--metric", "ndcg@20",
            "--storage", str(storage), "--name", name, "--grace-period", "1", "--reduction-factor", "2",
            "epochs=2", "batch_size=100", "patience=5",
            "lr={grid: [0.003, 1.0e-6, 2.0e-6]}", "steps={choice: [5, 10]}", "n_clusters={choice: [1, 2]}"]
    job = _job("tune_ldiffrec")
    monkeypatch.setenv("DIFFREC_TUNE_INTERRUPT_AFTER", f"1:{tmp_path / 'interrupted'}")
    assert job.main(argv) == 0
    search = storage / name
    first = json.loads((search / "summary.json").read_text())
    assert (tmp_path / "interrupted").exists() and not first["complete"] and first["finished"] >= 1
    done_before = {r["trial_id"] for r in first["ranking"] if r["status"] in ("DONE", "STOPPED_EARLY")}

    assert job.main(argv) == 0                                         # same name + storage: resume
    summary = json.loads((search / "summary.json").read_text())
    assert summary["resumed"] and summary["complete"]
    assert summary["trials"] == 3 and summary["errors"] == 0
    assert done_before <= {r["trial_id"] for r in summary["ranking"]}
    assert summary["stopped_early"] >= 1                                # ASHA
    # Chosen by validation only; the test metrics are those of the chosen epoch.
    ranked = [r for r in summary["ranking"] if r["valid/ndcg@20"] is not None]
    assert ranked[0]["valid/ndcg@20"] == max(r["valid/ndcg@20"] for r in ranked)
    # Every launched trial: the ordered pairs hold.
    launched = list(search.glob("*/trial_config.yaml"))
    assert len(launched) == 3
    for path in launched:
        model = yaml.safe_load(path.read_text())["model"]
        assert model["noise_min"] < model["noise_max"] and model["w_min"] < model["w_max"]
    with open(search / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    for png in ("metric_vs_params.png", "metric_over_epochs.png"):
        assert (search / png).stat().st_size > 1000
    assert list(search.glob("*/events.out.tfevents*"))                  # TensorBoard, per trial

    best = search / "best_config.yaml"
    config = load_preset(best)
    assert "--config best_config.yaml --workers 1" in best.read_text()       # the trials' workers
    assert config.model.variant == "ltdiffrec" and config.train.select_metric == "ndcg@20"
    monkeypatch.delenv("DIFFREC_TUNE_INTERRUPT_AFTER")
    train_job = _job("train_ldiffrec")
    assert train_job.main(["--data", str(tiny_data), "--config", str(best), "--workers", "1",
                           "--storage", str(tmp_path / "runs"), "--name", "best", "epochs=1"]) == 0
    assert json.loads((tmp_path / "runs" / "best" / "summary.json").read_text())["epochs"] == 1
