"""DiffusionRecommender: config, time weights, top-K, edge configs, and learning on synthetic data."""
import json

import numpy as np
import pytest
import torch

from models.batch import HistoryBatch
from models.config import ModelConfig
from models.metrics import RankingMetrics, topk
from models.recommender import DiffusionRecommender

VARIANTS = ["diffrec", "tdiffrec", "ldiffrec", "ltdiffrec"]


def small_config(variant, **kw):
    latent = variant.startswith("l")
    base = dict(variant=variant, dims=[32] if latent else [64], steps=5, noise_scale=0.1, noise_min=0.0001,
                noise_max=0.02, latent_size=24, n_clusters=3)
    base.update(kw)
    return ModelConfig(**base)


def random_batch(n_users, n_items, seed=0, max_len=15):
    rng = np.random.default_rng(seed)
    return HistoryBatch.from_lists([rng.choice(n_items, rng.integers(1, max_len), replace=False)
                                    for _ in range(n_users)], n_items)


def build(variant, n_items=90, **kw):
    clusters = np.arange(n_items) % kw.get("n_clusters", 3)
    return DiffusionRecommender(small_config(variant, **kw), n_items, item_clusters=clusters)


# ---- config --------------------------------------------------------------------------
@pytest.mark.parametrize("changes,field", [
    (dict(w_min=1.0, w_max=1.0), "w_min"), (dict(noise_min=0.02, noise_max=0.01), "noise_min"),
    (dict(noise_scale=-0.1), "noise_scale"), (dict(steps=0), "steps"),
    (dict(sampling_steps=6, steps=5), "sampling_steps"), (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"), (dict(variant="xdiffrec"), "variant"), (dict(mean_type="v"), "mean_type"),
    (dict(dims=[]), "dims"), (dict(variant="ldiffrec", n_clusters=0), "n_clusters"),
    (dict(variant="ldiffrec", n_clusters=500), "n_clusters"), (dict(mean_type="eps", noise_scale=0.0), "eps"),
    (dict(noise_scale=2.0, noise_max=0.9), "noise_scale"),
    (dict(vae_recon_target="x"), "vae_recon_target"), (dict(vae_tanh_out="false"), "vae_tanh_out"),
    (dict(reweight=1), "reweight"),
])
def test_config_validation_names_the_field(changes, field):
    cfg = ModelConfig(**{**dict(variant="diffrec"), **changes})
    with pytest.raises(ValueError, match=field):
        cfg.validate(n_items=100)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = ModelConfig(variant="ltdiffrec", dims=[300], vae_hidden_dims=[600], shared_decoder=True)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.is_latent and again.is_temporal
    with pytest.raises(ValueError, match="lamda"):
        ModelConfig.from_dict({"lamda": 0.1})


def test_annealing_schedules():
    cfg = ModelConfig(kl_cap=0.2, kl_anneal_steps=100, lambda_start=0.03, lambda_floor=0.01,
                      lambda_anneal_steps=200)
    assert cfg.kl_weight(0) == 0 and cfg.kl_weight(10) == pytest.approx(0.1) and cfg.kl_weight(10_000) == 0.2
    assert cfg.diffusion_weight(0) == 0.03 and cfg.diffusion_weight(100) == pytest.approx(0.02)
    assert cfg.diffusion_weight(10_000) == pytest.approx(0.01)
    flat = ModelConfig(kl_anneal_steps=0, lambda_anneal_steps=0)
    assert flat.kl_weight(5) == flat.kl_cap and flat.diffusion_weight(5) == flat.lambda_start


# ---- inputs and ranking --------------------------------------------------------------------
def test_time_weights_for_one_two_and_many_items():
    model = build("tdiffrec", w_min=0.2, w_max=1.0)
    batch = HistoryBatch.from_lists([[5], [7, 3], [1, 2, 3, 4, 9]], 90)
    w = model.interaction_values(batch)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.2, 1.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    assert torch.equal(build("diffrec").interaction_values(batch), torch.ones(8))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shared", [False, True])
def test_topk_per_cluster_equals_full_topk(variant, shared):
    torch.manual_seed(0)
    model = build(variant, n_clusters=4, shared_decoder=shared)
    batch, exclude = random_batch(16, 90, seed=1), random_batch(16, 90, seed=2)
    values, ids = model.score_topk(batch, 20, exclude=exclude)
    scores = model.scores(batch)
    for m in (batch, exclude):
        scores[m.rows, m.items] = float("-inf")
    full_values, full_ids = topk(scores, 20)
    assert torch.equal(ids, full_ids)
    torch.testing.assert_close(values, full_values)
    assert model.training                      # scoring restores the mode


def test_score_topk_masks_history_and_is_deterministic():
    model = build("ldiffrec")
    batch = random_batch(8, 90, seed=3)
    _, ids = model.score_topk(batch, 30)
    hist = batch.dense().bool()
    assert not hist.gather(1, ids.clamp(min=0)).any()
    assert torch.equal(model.score_topk(batch, 30)[1], ids)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("edge", [dict(noise_scale=0.0), dict(steps=1), dict(steps=1, sampling_steps=1),
                                  dict(mean_type="eps", reweight=True), dict(n_clusters=1)])
def test_edge_configs_train_and_score(variant, edge):
    torch.manual_seed(0)
    model = build(variant, **edge)
    batch = random_batch(12, 90)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for step in range(3):
        out = model(batch, step)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        model.record_step_losses(out.timesteps, out.step_losses)
        assert torch.isfinite(out.loss)
    values, ids = model.score_topk(batch, 10)
    assert ids.shape == (12, 10) and torch.isfinite(values).all()


@pytest.mark.parametrize("shared", [False, True])
def test_recon_target_is_the_dropped_out_input_only_when_asked(shared):
    """With input dropout, "dropped" scores the likelihood against what the encoder
    read and "input" against the full history; without dropout they agree."""
    batch = random_batch(16, 90)

    def recon(target, dropout):
        torch.manual_seed(0)
        model = build("ldiffrec", vae_recon_target=target, vae_dropout=dropout, shared_decoder=shared).train()
        torch.manual_seed(1)   # the same dropout mask, latent noise and timesteps for both targets
        return float(model(batch).parts["recon"])

    assert recon("dropped", 0.5) != pytest.approx(recon("input", 0.5), rel=1e-3)
    assert recon("dropped", 0.0) == pytest.approx(recon("input", 0.0), rel=1e-6)


def test_state_dict_round_trip_reproduces_scores():
    torch.manual_seed(0)
    model = build("ltdiffrec")
    batch = random_batch(10, 90)
    model.record_step_losses(torch.arange(5).repeat(10), torch.rand(50))
    state = model.state_dict()
    clone = build("ltdiffrec")
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.scores(batch), model.scores(batch))
    assert clone.diffusion.is_warm()


def test_placement_plan_all_cpu():
    torch.manual_seed(0)
    model = build("ldiffrec", n_clusters=3).place(["cpu", "cpu", "cpu"], "cpu")
    batch = random_batch(10, 90)
    out = model(batch, 0)
    out.loss.backward()
    assert model.score_topk(batch, 5)[1].shape == (10, 5)


# ---- learning on synthetic taste groups ----------------------------------------------------------
def taste_groups(n_users=600, n_items=300, n_groups=5, seed=0):
    """Users mostly pick (popularity-skewed) items of their own group; last 20% is validation."""
    rng = np.random.default_rng(seed)
    group_of_item = rng.integers(0, n_groups, n_items)
    popularity = rng.zipf(1.6, n_items).clip(max=50).astype(float)
    train, valid = [], []
    for _ in range(n_users):
        p = popularity * np.where(group_of_item == rng.integers(n_groups), 1.0, 0.03)
        items = rng.choice(n_items, rng.integers(10, 30), replace=False, p=p / p.sum())
        cut = int(0.8 * len(items))
        train.append(items[:cut])
        valid.append(items[cut:])
    return (HistoryBatch.from_lists(train, n_items), HistoryBatch.from_lists(valid, n_items),
            [np.asarray(x) for x in train], group_of_item)


@pytest.fixture(scope="module")
def data():
    train, valid, train_lists, groups = taste_groups()
    counts = torch.bincount(train.items, minlength=train.n_items).float()
    most_pop = counts.expand(train.size, -1).clone()
    most_pop[train.rows, train.items] = float("-inf")
    return train, valid, train_lists, groups, recall_at_20(topk(most_pop, 20)[1], valid)


def recall_at_20(ids, valid):
    metrics = RankingMetrics(ks=(20,))
    metrics.update(ids, valid.indptr, valid.items)
    return metrics.result()["recall@20"]


def train_model(model, train_lists, n_items, steps=240, batch_size=100, lr=1e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, step = [], 0
    rng = np.random.default_rng(0)
    while step < steps:
        perm = rng.permutation(len(train_lists))
        for i in range(0, len(perm), batch_size):
            batch = HistoryBatch.from_lists([train_lists[j] for j in perm[i:i + batch_size]], n_items)
            out = model(batch, step)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            model.record_step_losses(out.timesteps, out.step_losses)
            losses.append(float(out.parts["loss"]))
            step += 1
    return losses


@pytest.mark.parametrize("variant,clusters", [("diffrec", 1), ("tdiffrec", 1), ("ldiffrec", 1), ("ldiffrec", 4),
                                              ("ltdiffrec", 3)])
def test_variant_learns_and_beats_most_popular(data, variant, clusters):
    train, valid, train_lists, groups, most_pop_recall = data
    torch.manual_seed(0)
    latent = variant.startswith("l")
    cfg = ModelConfig(variant=variant, dims=[64] if latent else [200], steps=5, w_min=0.5,
                      noise_scale=0.1 if latent else 0.01, noise_min=0.0001 if latent else 0.0005,
                      noise_max=0.02 if latent else 0.005, dropout=0.1 if latent else 0.5,
                      n_clusters=clusters, latent_size=48, vae_dropout=0.5, kl_cap=0.2,
                      kl_anneal_steps=100, lambda_anneal_steps=100)
    model = DiffusionRecommender(cfg, train.n_items, item_clusters=groups % clusters)
    losses = train_model(model, train_lists, train.n_items, lr=3e-3 if latent else 1e-3)
    assert np.mean(losses[-12:]) < 0.5 * np.mean(losses[:12])
    recall = recall_at_20(model.score_topk(train, 20)[1], valid)
    assert recall > most_pop_recall + 0.1, (recall, most_pop_recall)
