"""The one configuration of a diffusion recommender (DESIGN.md §4).

A plain dataclass so it can be saved inside a checkpoint (``to_dict``), fed by
Ray Tune (``from_dict`` of a flat dict) and checked before any tensor exists
(``validate``). The four variants share every field: the ``t`` prefix switches
on time weights, the ``l`` prefix the latent (cluster-VAE) path.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

VARIANTS = ("diffrec", "ldiffrec", "tdiffrec", "ltdiffrec")
MEAN_TYPES = ("x0", "eps")
RECON_TARGETS = ("dropped", "input")


@dataclass
class ModelConfig:
    variant: str = "diffrec"

    # Denoiser (time-conditioned MLP). DiffRec uses e.g. [1000] or [200, 600];
    # L-variants run it on the latent, e.g. [300].
    dims: list[int] = field(default_factory=lambda: [1000])
    emb_size: int = 10               # sinusoidal step-embedding size
    dropout: float = 0.5             # input dropout of the denoiser
    norm: bool = False               # L2-normalise the denoiser input (reference flag)

    # Diffusion process: variances ramp linearly from s*noise_min to s*noise_max.
    steps: int = 40                  # T
    noise_scale: float = 0.005       # s; 0 = no noise (the model is applied T times)
    noise_min: float = 0.005
    noise_max: float = 0.01
    sampling_steps: int = 0          # T' at inference: 0 = start from the history itself
    reweight: bool = True            # weight step t by SNR(t-1) - SNR(t)
    mean_type: str = "x0"            # network predicts x0 ("x0") or the noise ("eps")
    history_per_step: int = 10       # importance sampling: losses kept per step
    uniform_floor: float = 0.001     # importance sampling: uniform mixing weight

    # T-variants: weights rising with time order from w_min (oldest) to w_max (newest).
    w_min: float = 0.1
    w_max: float = 1.0

    # L-variants: cluster VAE.
    n_clusters: int = 1              # C; the item->cluster array must use labels 0..C-1
    latent_size: int = 300           # total latent size, shared among clusters by item count
    vae_hidden_dims: list[int] = field(default_factory=list)  # encoder hidden sizes (totals)
    vae_dropout: float = 0.1         # dropout on the encoder's (sparse) input
    vae_tanh_out: bool = True        # tanh after the encoder's last layer too (the reference code):
                                     # mean and log-variance bounded to (-1, 1)
    vae_recon_target: str = "dropped"  # likelihood of the dropped-out input (the reference) or "input"
    shared_decoder: bool = False     # one linear decoder from the full latent to all N items
    kl_cap: float = 0.3              # gamma = min(kl_cap, step / kl_anneal_steps)
    kl_anneal_steps: int = 200       # 0 = gamma is kl_cap from the start
    lambda_start: float = 0.03       # lambda, weight of the diffusion loss
    lambda_floor: float = 0.005      # lambda reached after lambda_anneal_steps
    lambda_anneal_steps: int = 200   # 0 = lambda stays lambda_start

    # ---- derived switches -------------------------------------------------
    @property
    def is_latent(self) -> bool:
        return self.variant in ("ldiffrec", "ltdiffrec")

    @property
    def is_temporal(self) -> bool:
        return self.variant in ("tdiffrec", "ltdiffrec")

    def kl_weight(self, step: int) -> float:
        """gamma at optimisation step ``step`` (annealed up to ``kl_cap``)."""
        if self.kl_anneal_steps <= 0:
            return self.kl_cap
        return min(self.kl_cap, step / self.kl_anneal_steps)

    def diffusion_weight(self, step: int) -> float:
        """lambda at step ``step``: linear from ``lambda_start`` to ``lambda_floor``."""
        if self.lambda_anneal_steps <= 0:
            return self.lambda_start
        frac = min(1.0, max(0, step) / self.lambda_anneal_steps)
        return self.lambda_start + frac * (self.lambda_floor - self.lambda_start)

    # ---- checks -------------------------------------------------------------
    def validate(self, n_items: int | None = None, n_clusters: int | None = None) -> "ModelConfig":
        """Raise ``ValueError`` naming the offending field and the fix; returns self.

        ``n_items`` (catalog size) and ``n_clusters`` (defaults to the field)
        enable the checks that depend on the data.
        """
        def bad(msg):
            raise ValueError(f"ModelConfig: {msg}")

        if self.variant not in VARIANTS:
            bad(f"variant={self.variant!r} is unknown; use one of {VARIANTS}")
        if self.mean_type not in MEAN_TYPES:
            bad(f"mean_type={self.mean_type!r} is unknown; use one of {MEAN_TYPES}")
        for f in fields(self):   # a "false" string from JSON or the command line would be truthy
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                bad(f"{f.name}={getattr(self, f.name)!r} must be true or false")
        if self.vae_recon_target not in RECON_TARGETS:
            bad(f"vae_recon_target={self.vae_recon_target!r} is unknown; use one of {RECON_TARGETS}")
        if not self.dims or any(int(d) < 1 for d in self.dims):
            bad(f"dims={self.dims} must be a non-empty list of positive sizes, e.g. [1000]")
        if self.emb_size < 1:
            bad(f"emb_size={self.emb_size} must be >= 1, e.g. 10")
        for name in ("dropout", "vae_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                bad(f"{name}={p} must lie in [0, 1); e.g. 0.5")
        if self.steps < 1:
            bad(f"steps={self.steps} must be >= 1")
        if not 0 <= self.sampling_steps <= self.steps:
            bad(f"sampling_steps={self.sampling_steps} must lie in [0, steps={self.steps}]; "
                f"lower sampling_steps or raise steps")
        if self.noise_scale < 0:
            bad(f"noise_scale={self.noise_scale} must be >= 0 (0 disables noising)")
        if self.noise_min < 0:
            bad(f"noise_min={self.noise_min} must be >= 0")
        if self.noise_min >= self.noise_max:
            bad(f"noise_min={self.noise_min} must be < noise_max={self.noise_max}; "
                f"swap them or raise noise_max")
        if self.noise_scale * self.noise_max >= 1.0:
            bad(f"noise_scale*noise_max={self.noise_scale * self.noise_max} must be < 1 "
                f"(it is a variance fraction); lower noise_scale or noise_max")
        if self.mean_type == "eps" and self.noise_scale == 0:
            bad("mean_type='eps' needs noise to predict; set noise_scale > 0 or mean_type='x0'")
        if self.history_per_step < 1:
            bad(f"history_per_step={self.history_per_step} must be >= 1, e.g. 10")
        if not 0.0 <= self.uniform_floor <= 1.0:
            bad(f"uniform_floor={self.uniform_floor} must lie in [0, 1], e.g. 0.001")
        if self.w_min < 0:
            bad(f"w_min={self.w_min} must be >= 0")
        if self.w_min >= self.w_max:
            bad(f"w_min={self.w_min} must be < w_max={self.w_max}; swap them or raise w_max")
        if self.latent_size < 1 or any(int(d) < 1 for d in self.vae_hidden_dims):
            bad("latent_size and vae_hidden_dims must be positive")
        for name in ("kl_cap", "kl_anneal_steps", "lambda_start", "lambda_floor", "lambda_anneal_steps"):
            if getattr(self, name) < 0:
                bad(f"{name}={getattr(self, name)} must be >= 0")
        if n_items is not None and n_items < 1:
            bad(f"the catalog has n_items={n_items}; need at least one item")
        c = self.n_clusters if n_clusters is None else n_clusters
        if c < 1:
            bad(f"n_clusters={c} must be >= 1")
        if self.is_latent:
            if n_items is not None and c > n_items:
                bad(f"n_clusters={c} exceeds n_items={n_items}; use at most n_items clusters")
            if c > self.latent_size or any(c > int(d) for d in self.vae_hidden_dims):
                bad(f"n_clusters={c} exceeds latent_size={self.latent_size} (or a vae_hidden_dims "
                    f"entry); every cluster needs >= 1 latent unit: raise latent_size or lower n_clusters")
        return self

    # ---- (de)serialisation ------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Inverse of ``to_dict``; missing keys take defaults, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        values = dict(values)
        for name in ("dims", "vae_hidden_dims"):
            if name in values:
                values[name] = [int(d) for d in values[name]]
        return cls(**values)
