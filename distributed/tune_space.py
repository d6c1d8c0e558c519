"""The hyper-parameter search space of ``jobs/tune_ldiffrec.py`` (DESIGN.md §5).

A space is a mapping ``config key → distribution`` written in YAML
(``jobs/configs/tune-space.yaml``)::

    model.lambda_start: {log: [0.005, 0.1]}          # log-uniform
    model.kl_cap:       {uniform: [0.05, 0.5]}        # uniform
    model.steps:        {choice: [10, 20, 40]}        # categorical
    model.latent_size:  {int: [64, 256]}              # integer, both ends included
    train.batch_size:   {logint: [64, 1024]}          # log-scaled integer
    train.lr:           {grid: [1.0e-3, 3.0e-3]}      # every value (random search only)
    model.noise_max:    {above: model.noise_min, factor: {log: [1.5, 20]}}   # = noise_min * factor
    model.w_max:        {above: model.w_min, gap: {uniform: [0.1, 0.9]}}     # = w_min + gap

Ordered pairs (``noise_min < noise_max``, ``w_min < w_max``) are expressed so
that an invalid combination cannot be drawn: the upper end is derived from the
lower one by a factor > 1 or a gap > 0 (or both ends have disjoint ranges).
A space that could draw an invalid combination is refused before any trial
starts (``SearchSpace.check``), and every trial re-checks its own config
(``check_constraints``) as a last guard.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from distributed.config import RunConfig, _resolve_key

KINDS = ("log", "uniform", "choice", "int", "logint", "grid")
DERIVED_OPS = ("factor", "gap")
# (lower, upper): the upper end must stay strictly above the lower one.
ORDERED_PAIRS = (("model.noise_min", "model.noise_max"), ("model.w_min", "model.w_max"))
# Parameters that only matter for some variants (dropped from the space otherwise).
LATENT_ONLY = {"model.n_clusters", "model.latent_size", "model.vae_hidden_dims", "model.vae_dropout",
               "model.shared_decoder", "model.kl_cap", "model.kl_anneal_steps", "model.lambda_start",
               "model.lambda_floor", "model.lambda_anneal_steps", "train.lr_denoiser"}
TEMPORAL_ONLY = {"model.w_min", "model.w_max"}


class SpaceError(ValueError):
    """The search space is malformed or could produce an invalid config."""


class InvalidTrialConfig(ValueError):
    """A trial's config breaks a constraint (the last guard: never trained)."""


def canonical_key(key: str) -> str:
    section, name = _resolve_key(key)
    return f"{section}.{name}"


def is_distribution(value) -> bool:
    return isinstance(value, dict) and len(value) >= 1 and (
        set(value) & set(KINDS) or "above" in value)


@dataclass
class Dist:
    kind: str
    args: list

    @classmethod
    def parse(cls, key: str, spec) -> "Dist":
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise SpaceError(f"{key}: {spec!r} is not a distribution; write one of "
                             f"{{log: [lo, hi]}}, {{uniform: [lo, hi]}}, {{choice: [...]}}, {{int: [lo, hi]}}, "
                             f"{{logint: [lo, hi]}}, {{grid: [...]}}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise SpaceError(f"{key}: {kind} needs a non-empty list, got {args!r}")
        if kind in ("log", "uniform", "int", "logint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
                raise SpaceError(f"{key}: {kind} needs [lo, hi] numbers with lo < hi, got {args!r}")
            if kind in ("log", "logint") and args[0] <= 0:
                raise SpaceError(f"{key}: {kind} needs lo > 0 (got {args[0]})")
        return cls(kind, list(args))

    def domain(self):
        from ray import tune
        lo_hi = self.args
        if self.kind == "log":
            return tune.loguniform(float(lo_hi[0]), float(lo_hi[1]))
        if self.kind == "uniform":
            return tune.uniform(float(lo_hi[0]), float(lo_hi[1]))
        if self.kind == "int":
            return tune.randint(int(lo_hi[0]), int(lo_hi[1]) + 1)
        if self.kind == "logint":
            return tune.lograndint(int(lo_hi[0]), int(lo_hi[1]) + 1)
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))

    def values(self) -> list | None:
        """Every value for discrete distributions, else None."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "int":
            return list(range(int(self.args[0]), int(self.args[1]) + 1))
        return None

    def bounds(self) -> tuple[float, float]:
        vals = self.values()
        if vals is not None:
            numeric = [v for v in vals if isinstance(v, (int, float))]
            if len(numeric) != len(vals):
                return (-math.inf, math.inf)
            return float(min(numeric)), float(max(numeric))
        return float(self.args[0]), float(self.args[1])

    def draw(self, rng: random.Random):
        if self.kind in ("choice", "grid"):
            return rng.choice(self.args)
        lo, hi = self.args
        if self.kind == "uniform":
            return rng.uniform(lo, hi)
        if self.kind == "log":
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        if self.kind == "int":
            return rng.randint(int(lo), int(hi))
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    @property
    def log_scale(self) -> bool:
        return self.kind in ("log", "logint")

    def to_spec(self) -> dict:
        return {self.kind: list(self.args)}


@dataclass
class Param:
    key: str                   # canonical "section.name"
    dist: Dist                 # what is sampled (the factor/gap for a derived parameter)
    above: str | None = None   # derived: the lower end this parameter stays above
    op: str | None = None      # "factor" (value = ref * x) or "gap" (value = ref + x)

    @property
    def tune_key(self) -> str:
        """The name Tune samples: the key itself, or ``key~factor`` / ``key~gap``."""
        return self.key if self.above is None else f"{self.key}~{self.op}"

    @classmethod
    def parse(cls, key: str, spec) -> "Param":
        key = canonical_key(key)
        if isinstance(spec, dict) and "above" in spec:
            ops = [o for o in DERIVED_OPS if o in spec]
            if len(ops) != 1 or set(spec) != {"above", ops[0]}:
                raise SpaceError(f"{key}: a derived parameter is {{above: <key>, factor: <dist>}} or "
                                 f"{{above: <key>, gap: <dist>}}, got {spec!r}")
            op = ops[0]
            dist = Dist.parse(f"{key}~{op}", spec[op])
            lo, _ = dist.bounds()
            if op == "factor" and not lo > 1.0:
                raise SpaceError(f"{key}: factor must be > 1 so {key} > {spec['above']} (lowest is {lo})")
            if op == "gap" and not lo > 0.0:
                raise SpaceError(f"{key}: gap must be > 0 so {key} > {spec['above']} (lowest is {lo})")
            return cls(key, dist, canonical_key(spec["above"]), op)
        return cls(key, Dist.parse(key, spec))

    def to_spec(self) -> dict:
        if self.above is None:
            return self.dist.to_spec()
        return {"above": self.above, self.op: self.dist.to_spec()}


@dataclass
class SearchSpace:
    params: dict[str, Param] = field(default_factory=dict)

    # ---- building -------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: dict | None) -> "SearchSpace":
        space = cls()
        for key, value in (spec or {}).items():
            p = Param.parse(key, value)
            space.params[p.key] = p
        space._check_references()
        return space

    def to_spec(self) -> dict:
        return {k: p.to_spec() for k, p in self.params.items()}

    def _check_references(self) -> None:
        for p in self.params.values():
            if p.above is not None:
                ref = self.params.get(p.above)
                if ref is not None and ref.above is not None:
                    raise SpaceError(f"{p.key} is derived from {p.above}, itself derived; derive from a "
                                     f"sampled or fixed parameter")

    def split_overrides(self, overrides: list[str] | dict) -> tuple["SearchSpace", dict]:
        """Command-line ``key=value``: a distribution replaces that key's entry in
        the space; a plain value fixes the key (removed from the space)."""
        items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
        params = dict(self.params)
        fixed = {}
        for key, value in items:
            key = canonical_key(key)
            if is_distribution(value):
                p = Param.parse(key, value)
                params[p.key] = p
            else:
                params.pop(key, None)
                fixed[key] = value
        space = SearchSpace(params)
        space._check_references()
        return space, fixed

    def restrict_to(self, config: RunConfig, log=print) -> "SearchSpace":
        """Drop parameters the variant does not use (e.g. C for DiffRec)."""
        keep = {}
        for key, p in self.params.items():
            if key in LATENT_ONLY and not config.model.is_latent:
                log(f"{key} is not used by {config.model.variant}: not searched")
            elif key in TEMPORAL_ONLY and not config.model.is_temporal:
                log(f"{key} is not used by {config.model.variant}: not searched")
            else:
                keep[key] = p
        return SearchSpace(keep)

    # ---- Tune ---------------------------------------------------------------
    def param_space(self) -> dict:
        return {p.tune_key: p.dist.domain() for p in self.params.values()}

    def trials_for(self, samples: int) -> int:
        """Tune runs ``samples`` x every grid combination."""
        n = samples
        for p in self.params.values():
            if p.dist.kind == "grid":
                n *= len(p.dist.args)
        return n

    @property
    def has_grid(self) -> bool:
        return any(p.dist.kind == "grid" for p in self.params.values())

    def resolve(self, sampled: dict, base: RunConfig) -> dict:
        """Concrete ``{key: value}`` overrides of one trial from Tune's sample."""
        values = {}
        for p in self.params.values():
            if p.above is None:
                values[p.key] = _plain(sampled[p.tune_key])
        base_values = base.to_dict()
        for p in self.params.values():
            if p.above is not None:
                section, name = p.above.split(".", 1)
                ref = values.get(p.above, base_values[section][name])
                x = _plain(sampled[p.tune_key])
                values[p.key] = ref * x if p.op == "factor" else ref + x
        return values

    def discrete_values(self, key: str, base: RunConfig) -> list:
        """Every value ``key`` can take (its fixed value when not searched)."""
        p = self.params.get(key)
        if p is None:
            section, name = key.split(".", 1)
            return [base.to_dict()[section][name]]
        vals = p.dist.values() if p.above is None else None
        if vals is None:
            raise SpaceError(f"{key} must be searched with a discrete distribution (choice/int/grid) so "
                             f"its item clustering can be computed once per value")
        return vals

    # ---- checks -------------------------------------------------------------
    def check(self, base: RunConfig, n_items: int | None = None, samples: int = 300, seed: int = 0) -> None:
        """Refuse a space that could draw an invalid combination: the ordered
        pairs exactly, the rest of ``RunConfig.validate`` on random draws and
        on every value of the discrete parameters."""
        base_values = base.to_dict()

        def span(key):
            p = self.params.get(key)
            if p is None:
                section, name = key.split(".", 1)
                v = base_values[section][name]
                return float(v), float(v)
            if p.above is not None:
                lo_ref, hi_ref = span(p.above)
                lo, hi = p.dist.bounds()
                return (lo_ref * lo, hi_ref * hi) if p.op == "factor" else (lo_ref + lo, hi_ref + hi)
            return p.dist.bounds()

        for low, high in ORDERED_PAIRS:
            p = self.params.get(high)
            if p is not None and p.above == low:
                continue          # derived above its lower end: cannot be crossed
            q = self.params.get(low)
            if q is not None and q.above == high:
                raise SpaceError(f"{low} is derived above {high}, but it must stay below it")
            lo_span, hi_span = span(low), span(high)
            if not lo_span[1] < hi_span[0]:
                raise SpaceError(
                    f"the space could draw {low} >= {high} ({low} in [{lo_span[0]:g}, {lo_span[1]:g}], "
                    f"{high} in [{hi_span[0]:g}, {hi_span[1]:g}]); write "
                    f"{high}: {{above: {low}, factor: {{log: [1.5, 20]}}}} (or gap: ...) instead")
        rng = random.Random(seed)
        draws = [{p.tune_key: p.dist.draw(rng) for p in self.params.values()} for _ in range(samples)]
        for p in self.params.values():     # every value of each discrete parameter at least once
            for v in p.dist.values() or []:
                d = dict(draws[0]) if draws else {}
                d[p.tune_key] = v
                draws.append(d)
        if not self.params:
            draws = [{}]
        for d in draws:
            values = self.resolve(d, base)
            try:
                config = base.with_overrides(values)
                config.validate(n_items)
            except ValueError as exc:
                raise SpaceError(f"the space can draw an invalid config {values}: {exc}") from None


def check_constraints(config: RunConfig) -> None:
    """The last guard in every trial: ordered pairs and ``validate``."""
    m = config.model
    if not m.noise_min < m.noise_max:
        raise InvalidTrialConfig(f"noise_min={m.noise_min} >= noise_max={m.noise_max}: never trained")
    if not m.w_min < m.w_max:
        raise InvalidTrialConfig(f"w_min={m.w_min} >= w_max={m.w_max}: never trained")
    try:
        config.validate()
    except ValueError as exc:
        raise InvalidTrialConfig(str(exc)) from None


def _plain(v):
    """numpy scalars (from searchers) → Python numbers, so YAML/JSON stay clean."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        return v.item()
    return v


def _split(text: str):
    import yaml
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value, e.g. steps=20 or "
                         f"'steps={{choice: [10, 20]}}'")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None
