"""Each variant, trained a few hundred steps in plain PyTorch on the project's
own synthetic generator (distributed/synthetic.py), drives its loss down and
beats MostPop's validation recall@20."""
import numpy as np
import pytest
import torch

from distributed.synthetic import SyntheticSpec, generate
from models.batch import HistoryBatch
from models.config import ModelConfig
from models.metrics import RankingMetrics, topk
from models.recommender import DiffusionRecommender


@pytest.fixture(scope="module")
def histories():
    table = generate(SyntheticSpec(n_users=800, n_items=300, n_interactions=24000, seed=5))
    users, items, ts = (table[c].to_numpy() for c in ("user_id", "item_id", "timestamp"))
    order = np.lexsort((ts, users))
    users, items = users[order], items[order]
    starts = np.searchsorted(users, np.arange(users.max() + 2))
    lengths = np.diff(starts)
    position = np.arange(len(users)) - starts[users]
    is_valid = position >= np.ceil(0.8 * lengths[users])      # the newest 20% of each user
    train = [items[starts[u]:starts[u + 1]][~is_valid[starts[u]:starts[u + 1]]] for u in range(len(lengths))]
    valid = [items[starts[u]:starts[u + 1]][is_valid[starts[u]:starts[u + 1]]] for u in range(len(lengths))]
    train_batch = HistoryBatch.from_lists(train, 300)
    valid_batch = HistoryBatch.from_lists(valid, 300)
    counts = torch.bincount(train_batch.items, minlength=300).float().expand(train_batch.size, -1).clone()
    counts[train_batch.rows, train_batch.items] = float("-inf")
    return train, train_batch, valid_batch, recall20(topk(counts, 20)[1], valid_batch)


def recall20(ids, valid):
    m = RankingMetrics(ks=(20,))
    m.update(ids, valid.indptr, valid.items)
    return m.result()["recall@20"]


@pytest.mark.parametrize("variant", ["diffrec", "tdiffrec", "ldiffrec", "ltdiffrec"])
def test_variant_beats_most_popular_on_project_synthetic_data(histories, variant):
    train, train_batch, valid_batch, most_pop = histories
    torch.manual_seed(0)
    latent = variant.startswith("l")
    clusters = None
    if latent:
        from clustering.kmeans import cluster_interactions
        clusters = cluster_interactions(train_batch.indptr.numpy(), train_batch.items.numpy(), 300,
                                        n_clusters=3, dim=16).assignment
    cfg = ModelConfig(variant=variant, dims=[64] if latent else [200], steps=10, noise_scale=0.01,
                      noise_min=0.001, noise_max=0.01, dropout=0.2 if latent else 0.5, n_clusters=3,
                      latent_size=48, kl_anneal_steps=100, lambda_anneal_steps=100, w_min=0.2)
    model = DiffusionRecommender(cfg, 300, clusters)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3 if latent else 1e-3)
    rng = np.random.default_rng(0)
    losses, step = [], 0
    while step < 300:
        perm = rng.permutation(len(train))
        for i in range(0, len(perm), 100):
            out = model(HistoryBatch.from_lists([train[j] for j in perm[i:i + 100]], 300), step)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            model.record_step_losses(out.timesteps, out.step_losses)
            losses.append(float(out.parts["loss"]))
            step += 1
    assert np.mean(losses[-16:]) < 0.8 * np.mean(losses[:16])
    recall = recall20(model.score_topk(train_batch, 20)[1], valid_batch)
    assert recall > most_pop, (variant, recall, most_pop)
