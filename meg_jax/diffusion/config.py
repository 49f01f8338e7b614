"""Settings of the weight generator (stage 4) as frozen dataclasses, with named presets.

Every dataclass is hashable, so a config can be a static argument of a jitted function. A
user's ml_collections `ConfigDict` becomes a `GeneratorConfig` through `generator_config`, which
starts from a named preset and applies the overrides; an unknown key anywhere is an error that
names its section (`generator.optim: unknown config key(s) ['lerning_rate'] ...`).

Two recipes are provided (see `GENERATOR_PRESETS`):
- "reference": what the MeG code does: x100 global weight scale, v-prediction with the learned
  variance range and the hybrid loss, AdamW at a constant 1e-4, no EMA, the whole bank in every
  batch, and a stopping check by the full 1000-step ancestral sampler from one shared noise vector.
- "fast": our recipe, found on the SmolLM2 CounterFact bank (bench/generator.py): weights
  standardised by one global scale around the bank mean, centred conditions at unit scale,
  x0-prediction with a fixed-variance MSE loss, a larger patch, a higher warmed-up cosine
  learning rate, an EMA of the parameters, and a 50-step DDIM check.
"""

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meg_jax.infra.config import dataclass_from_dict


def _at_least(section: str, obj: Any, bound: int, *names: str) -> None:
    """Each named field of `obj` is an integer >= `bound`, else an error naming it."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < bound:
            raise ValueError(f"{section}.{name}: expected an integer >= {bound}, got {value!r}")


def _number(section: str, obj: Any, name: str, low: float, *, open_low: bool = False) -> None:
    """`obj.name` is a finite number >= `low` (> `low` with `open_low`), else a named error."""
    value = getattr(obj, name)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (open_low and value == low):
        bound = f"> {low}" if open_low else f">= {low}"
        raise ValueError(f"{section}.{name}: expected a finite number {bound}, got {value!r}")


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of the 1-D DiT denoiser (`dit.py`)."""

    patch_size: int = 100  # neuron values per token (the reference's patch)
    hidden: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    cond_dropout: float = 0.2  # dropout on c = t_emb + cond during training (reference: 0.2)
    # adaLN-Zero init (DiT paper: zeroed modulation and output layers, xavier elsewhere). The
    # reference leaves it commented out and uses PyTorch's default Linear init; so do we by default.
    adaln_zero: bool = False
    frequency_dim: int = 256  # sinusoidal timestep features before the timestep MLP
    # The unit-normalised condition is multiplied by this before its projection. At 1 (the
    # reference) its entries are ~1/sqrt(E), an order of magnitude below the timestep
    # embedding's, and the network is slow to learn to tell conditions apart; sqrt(E) gives them
    # unit scale.
    cond_scale: float = 1.0
    # Training only: Gaussian noise of expected L2 length `cond_noise` added to the unit
    # condition before it is renormalised (0: off, the reference). Paraphrases lie about 0.3
    # from their edit's condition and edits about 1.1 from each other (CounterFact-256, MiniLM).
    cond_noise: float = 0.0
    # Also add a projection of the scaled condition to every token, so the network reads the
    # query in its token stream as well as through the adaLN modulations, where it is summed
    # with the timestep embedding and what is memorised at one noise level need not hold at
    # another (False: the reference).
    cond_tokens: bool = False
    compute_dtype: str = "float32"  # "float32" | "bfloat16"; parameters stay float32

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"dit: hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"dit.compute_dtype: expected 'float32' or 'bfloat16', got {self.compute_dtype!r}"
            )
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"dit.cond_dropout: expected [0, 1), got {self.cond_dropout}")
        _at_least("dit", self, 1, "patch_size", "hidden", "depth", "heads", "frequency_dim")
        _number("dit", self, "mlp_ratio", 0.0, open_low=True)
        _number("dit", self, "cond_scale", 0.0, open_low=True)
        _number("dit", self, "cond_noise", 0.0)


DIT_PRESETS: dict[str, DiTConfig] = {
    # The paper's "DiT-B/2": for the 8B-class hosts (neuron length ~8192, 82 tokens).
    "DiT-B": DiTConfig(hidden=768, depth=12, heads=12),
    # Sized for SmolLM2-135M (neuron length 1152, 12 tokens) on a CPU budget.
    "smollm2": DiTConfig(hidden=256, depth=4, heads=4),
    # Unit tests.
    "tiny": DiTConfig(patch_size=32, hidden=64, depth=2, heads=4, frequency_dim=32),
}


@dataclass(frozen=True)
class DiffusionConfig:
    """The Gaussian diffusion: schedule, what the network predicts, and its variance."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "v"  # "v" | "eps" | "x0"
    # True: the reference's learned variance range (2 output channels) and hybrid MSE + VLB loss.
    # False: fixed variance and MSE only.
    learn_variance: bool = True
    fixed_variance: str = "small"  # without learned variance: "small" (beta tilde) | "large" (beta)

    def __post_init__(self):
        if self.prediction not in ("v", "eps", "x0"):
            raise ValueError(
                f"diffusion.prediction: expected 'v', 'eps' or 'x0', got {self.prediction!r}"
            )
        if self.fixed_variance not in ("small", "large"):
            raise ValueError(
                "diffusion.fixed_variance: expected 'small' or 'large', got "
                f"{self.fixed_variance!r}"
            )
        _at_least("diffusion", self, 2, "num_timesteps")
        _number("diffusion", self, "beta_start", 0.0, open_low=True)
        _number("diffusion", self, "beta_end", 0.0, open_low=True)
        if not self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"diffusion: expected 0 < beta_start <= beta_end < 1, got beta_start="
                f"{self.beta_start}, beta_end={self.beta_end}"
            )

    @property
    def out_channels(self) -> int:
        return 2 if self.learn_variance else 1


@dataclass(frozen=True)
class SamplerConfig:
    """How weights are drawn from a trained generator."""

    kind: str = "ancestral"  # "ancestral" (IDDPM p_sample, the reference) | "ddim"
    steps: int = 50  # respaced steps, round(i * (T - 1) / (steps - 1))
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic)
    # One initial noise vector for every item, as the reference's training-time check does.
    shared_noise: bool = False
    chunk_size: int = 1024  # items per compiled sampler call

    def __post_init__(self):
        if self.kind not in ("ancestral", "ddim"):
            raise ValueError(f"sampler.kind: expected 'ancestral' or 'ddim', got {self.kind!r}")
        if self.steps < 2:
            raise ValueError(f"sampler.steps: expected >= 2, got {self.steps}")
        if self.chunk_size < 1:
            raise ValueError(f"sampler.chunk_size: expected >= 1, got {self.chunk_size}")
        _number("sampler", self, "eta", 0.0)

    def describe(self) -> str:
        """A short label for logs, e.g. 'ancestral-1000-shared'."""
        label = f"{self.kind}-{self.steps}"
        if self.kind == "ddim" and self.eta:
            label += f"-eta{self.eta:g}"
        return label + ("-shared" if self.shared_noise else "")


@dataclass(frozen=True)
class NormalizationConfig:
    """Map from raw neuron weights to the diffusion's x0 space (`normalization.py`)."""

    kind: str = "scale"  # "scale": x0 = w / scale (reference) | "standardize": per dimension
    scale: float = 0.01
    # "standardize" centre: "mean" (per-dim mean of the bank) or "init" (the shared initial
    # neuron, so that x0 = 0 is the unfitted neuron).
    center: str = "mean"
    std_floor: float = 1e-4  # keeps constant dimensions (std 0) from dividing by zero
    # "standardize" scale: per dimension, or one global std (which keeps the loss's weighting of
    # dimensions proportional to the raw-space L2 that the stopping criterion measures).
    per_dimension: bool = True
    # Subtract the bank's mean condition before the network's L2 normalisation (reference: no).
    center_conditions: bool = False

    def __post_init__(self):
        if self.kind not in ("scale", "standardize"):
            raise ValueError(
                f"normalization.kind: expected 'scale' or 'standardize', got {self.kind!r}"
            )
        if self.center not in ("mean", "init"):
            raise ValueError(
                f"normalization.center: expected 'mean' or 'init', got {self.center!r}"
            )
        if self.scale <= 0 or self.std_floor <= 0:
            raise ValueError("normalization: scale and std_floor must be positive")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with an optional warmup + cosine schedule and gradient clipping."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" | "cosine" (decays to end_lr_ratio * lr at decay_steps)
    warmup_steps: int = 0
    decay_steps: int = 0  # cosine length including warmup; 0 = train.num_steps
    end_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # global-norm clip; 0 = off

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(
                f"optim.schedule: expected 'constant' or 'cosine', got {self.schedule!r}"
            )
        _number("optim", self, "learning_rate", 0.0, open_low=True)
        for name in ("weight_decay", "grad_clip", "end_lr_ratio"):
            _number("optim", self, name, 0.0)
        if self.end_lr_ratio > 1.0:
            raise ValueError(f"optim.end_lr_ratio: expected [0, 1], got {self.end_lr_ratio}")
        _at_least("optim", self, 0, "warmup_steps", "decay_steps")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: batches, EMA, checkpoints and the stopping criterion."""

    num_steps: int = 100_000
    batch_size: int = 0  # 0 = the whole bank in every batch (the reference for N <= 255)
    shuffle: bool = False  # reference: DataLoader(shuffle=False)
    ema_decay: float = 0.0  # 0 = no EMA (reference)
    seed: int = 84
    log_every: int = 100
    eval_every: int = 1000  # stopping criterion check
    checkpoint_every: int = 1000
    max_to_keep: int = 2
    stop_threshold: float = 0.5  # stop when mean + std of raw-space L2 < this
    criterion_sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(kind="ancestral", steps=1000, shared_noise=True)
    )

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay: expected [0, 1), got {self.ema_decay}")
        for name in ("num_steps", "log_every", "eval_every", "checkpoint_every", "max_to_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: expected >= 1, got {getattr(self, name)}")
        if self.batch_size < 0:
            raise ValueError(f"train.batch_size: expected >= 0, got {self.batch_size}")
        _at_least("train", self, 0, "seed")
        # A NaN threshold would make `criterion < threshold` silently never true.
        _number("train", self, "stop_threshold", 0.0)


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything stage 4 needs; `sampler` is what `generate` uses at inference."""

    dit: DiTConfig = field(default_factory=lambda: DIT_PRESETS["smollm2"])
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self):
        steps = self.diffusion.num_timesteps
        for name, sampler in (
            ("sampler", self.sampler),
            ("train.criterion_sampler", self.train.criterion_sampler),
        ):
            if sampler.steps > steps:
                raise ValueError(
                    f"{name}.steps: expected at most diffusion.num_timesteps={steps}, got "
                    f"{sampler.steps}"
                )


GENERATOR_PRESETS: dict[str, GeneratorConfig] = {
    "reference": GeneratorConfig(),
    "fast": GeneratorConfig(
        # Six tokens of 192 values for SmolLM2's 1152-long neuron: half the work of patch 100,
        # and no wider than the hidden width 256, since the head emits each patch from one
        # Linear(hidden -> patch): with 288-value patches a bank's pooled patches span more
        # directions than it has, and the part outside was a floor under the criterion that no
        # training removed (`capacity.py`: 1.18 on the 256-edit Adam bank, where training
        # levelled off at 1.19; with 192, 0.24 after 500 steps). The condition at unit scale
        # (cond_scale ~ sqrt(384) for MiniLM) and not dropped out: the generator must reproduce
        # each fitted neuron exactly, and dropout on the condition left a floor just above the
        # stopping threshold. The condition also enters the token stream (`cond_tokens`): with it
        # only in the adaLN sum with the timestep embedding, a generator trained on 1,024 edits
        # reproduced each neuron from pure noise (one-shot x0 at t = 999: 0.35) but copied x_t
        # below t ~ 140, so DDIM froze the noise it held there into the sample (criterion 3.76
        # after 3,000 steps); with it, the same bank is at 0.43 after 1,250 steps, 0.25 at 1,500.
        dit=dataclasses.replace(
            DIT_PRESETS["smollm2"],
            patch_size=192,
            cond_scale=20.0,
            cond_dropout=0.0,
            cond_tokens=True,
        ),
        # x0-prediction weighs every timestep's x0 error alike; v-prediction's loss is the x0
        # error over sigma^2, dominated by nearly clean inputs that are easy to denoise, while
        # memorising the bank is learned at high noise.
        diffusion=DiffusionConfig(prediction="x0", learn_variance=False),
        normalization=NormalizationConfig(
            kind="standardize", per_dimension=False, center_conditions=True
        ),
        optim=OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100, grad_clip=1.0),
        train=TrainConfig(
            num_steps=3000,
            # Shuffled batches of 256 rows: the whole bank up to 256 edits; on larger banks
            # (1,024 edits, or 256 with DA's zero rows) more updates per pass than one batch.
            batch_size=256,
            shuffle=True,
            ema_decay=0.99,
            eval_every=500,
            checkpoint_every=500,
            criterion_sampler=SamplerConfig(kind="ddim", steps=50),
        ),
        sampler=SamplerConfig(kind="ddim", steps=50),
    ),
}


def generator_config(
    overrides: Mapping[str, Any] | None = None,
    preset: str = "reference",
    dit_preset: str | None = None,
    where: str = "generator",
) -> GeneratorConfig:
    """A `GeneratorConfig` from a named preset, an optional DiT size preset, and overrides.

    `overrides` is a (possibly nested) mapping or ConfigDict, e.g. `{"optim": {"learning_rate":
    3e-4}}`; keys it does not name keep the preset's values.
    """
    if preset not in GENERATOR_PRESETS:
        raise ValueError(
            f"{where}: unknown preset {preset!r}; expected one of {list(GENERATOR_PRESETS)}"
        )
    base = GENERATOR_PRESETS[preset]
    if dit_preset is not None:
        if dit_preset not in DIT_PRESETS:
            raise ValueError(
                f"{where}: unknown DiT preset {dit_preset!r}; expected one of {list(DIT_PRESETS)}"
            )
        base = dataclasses.replace(base, dit=DIT_PRESETS[dit_preset])
    merged = _deep_merge(dataclasses.asdict(base), _plain(overrides or {}))
    return dataclass_from_dict(GeneratorConfig, merged, where)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _deep_merge(base: dict, overrides: Mapping) -> dict:
    # Unknown keys are carried into the result on purpose: dataclass_from_dict then names them.
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
