"""Seeded synthetic interaction logs with structure a recommender can learn.

- Zipf-like item popularity (a few blockbusters, a long tail);
- latent taste groups: every item belongs to one group, every user mostly
  picks items of their groups (so item clustering finds something);
- drifting tastes: each user starts in one group and drifts to a second one
  over their timeline (so weighting recent interactions — T-DiffRec — helps);
- per-user timestamps, increasing.

Users are generated in independent blocks, each seeded from (seed, block), so
the output is identical whatever the parallelism. Everything is vectorised per
block (no Python loop per user or interaction).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class SyntheticSpec:
    n_users: int = 2000
    n_items: int = 1000
    n_interactions: int = 60000
    seed: int = 0
    n_groups: int = 0            # 0: about sqrt(n_items)/2, at least 4
    zipf_exponent: float = 0.9   # item popularity ~ 1 / rank**exponent
    noise: float = 0.15          # share of interactions drawn from global popularity
    min_per_user: int = 5
    users_per_block: int = 20000

    def validate(self) -> None:
        for name in ("n_users", "n_items", "n_interactions"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic: --{name.split('_', 1)[1]} must be >= 1 (got {getattr(self, name)})")
        if self.n_interactions < self.n_users * self.min_per_user:
            raise ValueError(
                f"synthetic: --interactions {self.n_interactions} is below {self.min_per_user} per user "
                f"for {self.n_users} users; raise --interactions or lower --users")
        if self.n_interactions > self.n_users * self.n_items // 2:
            raise ValueError("synthetic: --interactions must be at most half of users x items "
                             "(the matrix would be too dense to sample without duplicates)")
        if not 0 <= self.noise < 1:
            raise ValueError("synthetic: noise must be in [0, 1)")

    @property
    def groups(self) -> int:
        return self.n_groups or max(4, int(np.sqrt(self.n_items) / 2))

    @property
    def n_blocks(self) -> int:
        return -(-self.n_users // self.users_per_block)

    def to_dict(self) -> dict:
        return asdict(self)


class _Catalog:
    """Item groups and popularity, shared by every block (derived from the seed)."""

    def __init__(self, spec: SyntheticSpec):
        rng = np.random.default_rng([spec.seed, 1 << 30])
        n, g = spec.n_items, spec.groups
        popularity = 1.0 / np.arange(1, n + 1) ** spec.zipf_exponent
        self.item_of_rank = rng.permutation(n)          # item at popularity rank r
        group_of_rank = rng.integers(0, g, size=n)
        # Items sorted by (group, popularity rank): each group is a contiguous segment.
        order = np.lexsort((np.arange(n), group_of_rank))
        self.items_by_group = self.item_of_rank[order]
        weights = popularity[order]
        starts = np.searchsorted(group_of_rank[order], np.arange(g))
        sums = np.add.reduceat(weights, starts)
        group_id = group_of_rank[order]
        within = np.cumsum(weights) - np.repeat(np.cumsum(sums) - sums, np.diff(np.append(starts, n)))
        # One global CDF: group k occupies (k, k+1], so one searchsorted samples any group.
        self.group_cdf = group_id + within / sums[group_id]
        self.global_cdf = np.cumsum(popularity) / popularity.sum()
        self.n_groups = g

    def sample_in_groups(self, groups: np.ndarray, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.group_cdf, groups + u, side="left")
        return self.items_by_group[np.minimum(pos, len(self.items_by_group) - 1)]

    def sample_popular(self, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.global_cdf, u, side="left")
        return self.item_of_rank[np.minimum(pos, len(self.item_of_rank) - 1)]


def generate_block(spec: SyntheticSpec, block: int, catalog: _Catalog | None = None) -> pa.Table:
    """Interactions of users ``[block*users_per_block, ...)`` as an Arrow table
    (user_id int64, item_id int64, timestamp int64 seconds, rating int8)."""
    catalog = catalog or _Catalog(spec)
    rng = np.random.default_rng([spec.seed, block])
    first = block * spec.users_per_block
    users = np.arange(first, min(first + spec.users_per_block, spec.n_users), dtype=np.int64)
    n_u = len(users)
    # Activity: log-normal around the mean, at least min_per_user, at most half the catalog.
    # 1.02: makes up for the duplicates and caps lost below (measured at 1M items).
    mean_extra = 1.02 * spec.n_interactions / spec.n_users - spec.min_per_user
    raw = rng.lognormal(mean=0.0, sigma=1.0, size=n_u)
    lengths = spec.min_per_user + np.round(raw / np.exp(0.5) * mean_extra).astype(np.int64)
    lengths = np.minimum(lengths, max(spec.min_per_user, spec.n_items // 2))
    # Oversample to make room for duplicates, dedupe, keep the first `length` per user.
    n_draw = np.ceil(lengths * 1.8 + 4).astype(np.int64)
    owner = np.repeat(np.arange(n_u), n_draw)
    offsets = np.repeat(np.cumsum(n_draw) - n_draw, n_draw)
    position = np.arange(owner.size) - offsets
    progress = position / np.repeat(n_draw, n_draw)            # 0 → 1 over the timeline
    home = rng.integers(0, catalog.n_groups, size=n_u)
    away = (home + rng.integers(1, catalog.n_groups, size=n_u)) % catalog.n_groups
    drifted = rng.random(owner.size) < progress               # later → more often the new taste
    groups = np.where(drifted, away[owner], home[owner])
    items = catalog.sample_in_groups(groups, rng.random(owner.size))
    noisy = rng.random(owner.size) < spec.noise
    items[noisy] = catalog.sample_popular(rng.random(int(noisy.sum())))

    key = owner.astype(np.int64) * spec.n_items + items
    order = np.lexsort((position, key))                        # by (user,item), earliest first
    first_time = np.ones(order.size, dtype=bool)
    first_time[1:] = key[order][1:] != key[order][:-1]
    keep = np.sort(order[first_time])                          # back to (user, position) order
    owner, items = owner[keep], items[keep]
    starts = np.searchsorted(owner, np.arange(n_u))
    rank = np.arange(owner.size) - starts[owner]
    keep = rank < lengths[owner]
    owner, items = owner[keep], items[keep]

    start_time = 1_500_000_000 + rng.integers(0, 200 * 86400, size=n_u)
    gaps = rng.exponential(3600.0, size=owner.size).astype(np.int64) + 1
    starts = np.searchsorted(owner, np.arange(n_u))
    csum = np.cumsum(gaps)
    before = np.where(starts > 0, csum[np.maximum(starts - 1, 0)], 0)
    timestamp = start_time[owner] + csum - before[owner]
    rating = np.clip(np.round(rng.normal(4.0, 0.8, size=owner.size)), 1, 5).astype(np.int8)
    return pa.table({
        "user_id": pa.array(users[owner]),
        "item_id": pa.array(items.astype(np.int64)),
        "timestamp": pa.array(timestamp.astype(np.int64)),
        "rating": pa.array(rating),
    })


def generate(spec: SyntheticSpec) -> pa.Table:
    """The whole log in one process (tests and small demos)."""
    spec.validate()
    catalog = _Catalog(spec)
    return pa.concat_tables([generate_block(spec, b, catalog) for b in range(spec.n_blocks)])
