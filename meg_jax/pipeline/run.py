"""The whole run: each stage in order, each skipping, resuming or extending from what the work
directory records. MeG's editor (`editor` = meg) runs edits, encoder, router, collect, generator
(ARCHITECTURE.md); a weight-editing baseline (ft | memit | alphaedit) runs edits and baseline
(`pipeline.baseline`). Both end in the same evaluation stage. `cfg.stage` runs that stage alone:
the stages before it must be finished for the same inputs (their artefacts are read), none after
it runs."""

import dataclasses

from meg_jax.collect.bank import load_bank
from meg_jax.inference.edited_model import build_meg_editor
from meg_jax.infra.files import write_json_atomic
from meg_jax.pipeline.baseline import baseline_under_test, run_baseline_stage
from meg_jax.pipeline.collection import run_collect_stage
from meg_jax.pipeline.config import PipelineConfig
from meg_jax.pipeline.context import RunContext
from meg_jax.pipeline.edits import EditSet, run_edits_stage
from meg_jax.pipeline.evaluation import EditorUnderTest, run_evaluation_stage
from meg_jax.pipeline.generator import run_generator_stage
from meg_jax.pipeline.query_side import run_encoder_stage, run_router_stage


def run(cfg: PipelineConfig, evaluate: bool | None = None) -> dict:
    """Runs (or resumes) the stages; returns the evaluation summaries when it evaluates, else
    the finished stages' lineage ids. `evaluate` overrides `cfg.evaluate`."""
    ctx = RunContext.create(cfg)
    write_json_atomic(ctx.workdir / "config.json", dataclasses.asdict(cfg))
    if cfg.editor == "meg" and cfg.collect.bank:
        load_bank(cfg.collect.bank)  # a damaged given bank fails before anything is trained
    edits = run_edits_stage(ctx)
    lineages: dict = {}
    if cfg.stage == "edits":
        return lineages
    stages = _meg_stages if cfg.editor == "meg" else _baseline_stages
    edited = stages(ctx, edits, lineages)
    if edited is None:  # `cfg.stage` stopped before the editor was complete
        return lineages
    ctx.manifest().write(ctx.workdir)
    if evaluate if evaluate is not None else (cfg.evaluate or cfg.stage == "evaluation"):
        return run_evaluation_stage(ctx, edits, lineages, edited)
    return lineages


def _meg_stages(ctx: RunContext, edits: EditSet, lineages: dict) -> EditorUnderTest | None:
    """Encoder, router, collect and generator; fills `lineages`, returns MeG's editor."""
    stage = ctx.cfg.stage
    encoder, lineages["encoder"] = run_encoder_stage(ctx)
    if stage == "encoder":
        return None
    _, lineages["router"] = run_router_stage(ctx, edits, encoder, lineages["encoder"])
    if stage == "router":
        return None
    bank, lineages["collect"] = run_collect_stage(ctx, edits)
    if stage == "collect":
        return None
    _, lineages["generator"] = run_generator_stage(ctx, edits, bank, encoder, dict(lineages))

    def load():
        host = ctx.host()
        editor = build_meg_editor(ctx.workdir, ctx.manifest(), host, ctx.base_encoder(), ctx.mesh)
        return editor, None

    w = ctx.workdir
    artefacts = (
        w / "encoder" / "top_layers.msgpack",
        w / "router" / "router.msgpack",
        w / "router" / "router.json",
        w / "generator" / "params.msgpack",
        w / "generator" / "generator.json",
    )
    return EditorUnderTest("meg", "edited model (MeG)", load, artefacts)


def _baseline_stages(ctx: RunContext, edits: EditSet, lineages: dict) -> EditorUnderTest:
    """The baseline stage; fills `lineages`, returns the edited weights as the editor."""
    edited, lineages["baseline"] = run_baseline_stage(ctx, edits)
    return baseline_under_test(ctx, edited)
