"""Stage "generator": the conditional diffusion model from query conditions to fitted neurons.

Conditions are the tuned encoder's [CLS] of the templated edit prompts; targets the bank's
fitted rows. The stage exports `generator/generator.json` and `generator/params.msgpack` (what
`load_editor` reads). Adding edits continues from the trained generator on the union, keeping its
weight map (`generator.extend_steps`, the stopping criterion still applies).
"""

import dataclasses

from meg_jax.collect.bank import WeightBank
from meg_jax.diffusion.generate import load_generator_params, save_generator
from meg_jax.diffusion.train import train_generator
from meg_jax.encoder.text_encoder import TextEncoder
from meg_jax.infra.files import write_json_atomic
from meg_jax.infra.fingerprint import StageInputs
from meg_jax.pipeline.context import RunContext
from meg_jax.pipeline.edits import EditSet


def run_generator_stage(
    ctx: RunContext, edits: EditSet, bank: WeightBank, encoder: TextEncoder, lineages: dict
) -> tuple[dict, str]:
    """Trains (resumes, extends or skips) the generator; returns (its summary, its lineage)."""
    g = ctx.cfg.generator
    gen_cfg = g.build()
    inputs = StageInputs(
        config={"generator": dataclasses.asdict(gen_cfg), "template": ctx.template.query},
        upstream=lineages,
        items=edits.items,
    )
    stage = ctx.stage("generator", inputs, g.retrain)
    if stage.skip:
        summary = stage.summary()
        stage.report(_figure(summary))
        return summary, inputs.lineage
    stage.start()
    conditions = encoder.with_view(template=ctx.template.query).encode(
        [r.prompt for r in edits.records]
    )
    params_path = stage.folder / "params.msgpack"
    warm = None
    if stage.verdict == "extend":
        warm = load_generator_params(params_path)
        train = dataclasses.replace(gen_cfg.train, num_steps=g.extend_steps)
        gen_cfg = dataclasses.replace(gen_cfg, train=train)
    result = train_generator(
        bank.weights,
        conditions,
        gen_cfg,
        stage.run_dir,
        success=bank.success,
        init=bank.init,
        mesh=ctx.mesh,
        warm_start=warm,
    )
    save_generator(result.state, params_path)
    write_json_atomic(stage.folder / "generator.json", {"config": dataclasses.asdict(gen_cfg)})
    summary = {"steps": result.step, "stopped": result.stopped, "criterion": result.criterion}
    stage.finish(summary, _figure(summary))
    return summary, inputs.lineage


def _figure(summary: dict) -> str:
    crit = summary.get("criterion")
    crit = "never evaluated" if crit is None else f"{crit:.4f}"
    stop = ", below the stopping criterion" if summary.get("stopped") else ""
    return f"{summary.get('steps')} steps, criterion {crit}{stop}"
