"""Stage 4: the conditional diffusion weight generator (condition vector -> neuron weights).

Public API:
    GeneratorConfig, generator_config, GENERATOR_PRESETS, DIT_PRESETS   settings and presets
    train_generator(weights, conditions, config, workdir, ...) -> TrainResult
    generate(params_or_state, conditions, rng, config) -> raw weights [B, P]
    load_generator(workdir) -> (GeneratorParams, GeneratorConfig)
"""

from meg_jax.diffusion.config import (
    DIT_PRESETS,
    GENERATOR_PRESETS,
    DiffusionConfig,
    DiTConfig,
    GeneratorConfig,
    NormalizationConfig,
    OptimConfig,
    SamplerConfig,
    TrainConfig,
    generator_config,
)
from meg_jax.diffusion.generate import GeneratorParams, generate
from meg_jax.diffusion.train import TrainResult, l2_criterion, load_generator, train_generator
from meg_jax.diffusion.train_step import TrainState

__all__ = [
    "DIT_PRESETS",
    "GENERATOR_PRESETS",
    "DiTConfig",
    "DiffusionConfig",
    "GeneratorConfig",
    "GeneratorParams",
    "NormalizationConfig",
    "OptimConfig",
    "SamplerConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "generate",
    "generator_config",
    "l2_criterion",
    "load_generator",
    "train_generator",
]
