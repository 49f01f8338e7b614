"""The whole MeG run: each stage in MeG's order (ARCHITECTURE.md), each skipping, resuming or
extending from what the work directory records. `cfg.stage` runs that stage alone: the stages
before it must be finished for the same inputs (their artefacts are read), none after it runs."""

import dataclasses

from meg_jax.collect.bank import load_bank
from meg_jax.infra.files import write_json_atomic
from meg_jax.pipeline.collection import run_collect_stage
from meg_jax.pipeline.config import PipelineConfig
from meg_jax.pipeline.context import RunContext
from meg_jax.pipeline.edits import run_edits_stage
from meg_jax.pipeline.evaluation import run_evaluation_stage
from meg_jax.pipeline.generator import run_generator_stage
from meg_jax.pipeline.query_side import run_encoder_stage, run_router_stage


def run(cfg: PipelineConfig, evaluate: bool | None = None) -> dict:
    """Runs (or resumes) the stages; returns the evaluation summaries when it evaluates, else
    the finished stages' lineage ids. `evaluate` overrides `cfg.evaluate`."""
    ctx = RunContext.create(cfg)
    write_json_atomic(ctx.workdir / "config.json", dataclasses.asdict(cfg))
    if cfg.collect.bank:
        load_bank(cfg.collect.bank)  # a damaged given bank fails before anything is trained
    edits = run_edits_stage(ctx)
    lineages: dict = {}
    if cfg.stage == "edits":
        return lineages
    encoder, lineages["encoder"] = run_encoder_stage(ctx)
    if cfg.stage == "encoder":
        return lineages
    _, lineages["router"] = run_router_stage(ctx, edits, encoder, lineages["encoder"])
    if cfg.stage == "router":
        return lineages
    bank, lineages["collect"] = run_collect_stage(ctx, edits)
    if cfg.stage == "collect":
        return lineages
    _, lineages["generator"] = run_generator_stage(ctx, edits, bank, encoder, dict(lineages))
    ctx.manifest().write(ctx.workdir)
    if evaluate if evaluate is not None else (cfg.evaluate or cfg.stage == "evaluation"):
        return run_evaluation_stage(ctx, edits, lineages)
    return lineages
