"""The MeG pipeline as stages: edits, encoder, router, collect, generator, evaluation.

    cfg = pipeline_config(config_dict)       typed, validated settings (`config.py`)
    run(cfg)                                 every stage (or `cfg.stage` alone), resumable
    load_config(argv)                        a config file plus `--config.a.b=value` overrides

Each stage is one function in its own module, taking what it needs and returning its artefact;
what a stage was given is recorded beside its outputs (`meg_jax.infra.fingerprint`).
"""

from meg_jax.pipeline.cli import load_config
from meg_jax.pipeline.config import STAGES, PipelineConfig, pipeline_config
from meg_jax.pipeline.run import run

__all__ = ["STAGES", "PipelineConfig", "load_config", "pipeline_config", "run"]
