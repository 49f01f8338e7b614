"""The whole MeG run: each stage in MeG's order (ARCHITECTURE.md), each skipping, resuming or
extending from what the work directory records. `cfg.stage` runs one stage, the others must be
finished for the same inputs (their artefacts are read)."""

import dataclasses

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
    the training stages' lineage ids. `evaluate` overrides `cfg.evaluate`."""
    ctx = RunContext.create(cfg)
    write_json_atomic(ctx.workdir / "config.json", dataclasses.asdict(cfg))
    edits = run_edits_stage(ctx)
    encoder, encoder_id = run_encoder_stage(ctx)
    _, router_id = run_router_stage(ctx, edits, encoder, encoder_id)
    bank, collect_id = run_collect_stage(ctx, edits)
    lineages = {"encoder": encoder_id, "router": router_id, "collect": collect_id}
    run_generator_stage(ctx, edits, bank, encoder, lineages)
    ctx.manifest().write(ctx.workdir)
    if evaluate if evaluate is not None else (cfg.evaluate or cfg.stage == "evaluation"):
        return run_evaluation_stage(ctx, edits, lineages)
    return lineages
