"""Stage "generator": the conditional diffusion model from query conditions to fitted neurons.

Conditions are the tuned encoder's [CLS] of the templated edit prompts; targets the bank's
fitted rows. The stage exports `generator/generator.json` and `generator/params.msgpack` (what
`load_editor` reads). Adding edits continues from the trained generator on the union, keeping its
weight map (`generator.extend_steps`, the stopping criterion still applies).

Zero-weight augmentation (MeG's "DA", METHOD.md §4.4 and Table 15; `generator.zero_augmentation`,
a ratio, 0 by default as in the paper's main tables): round(N x ratio) pseudo-irrelevant queries
are trained towards the all-zero neuron (the unedited model) beside the N edits, so a locality
query the router lets through still gets (nearly) no edit. They come from the pseudo-edit
records (`query_side.pseudo_records`: the same split, rephrases and NQ normalisation the encoder
and router see) outside the router's calibration tail, taken from the end of that part as the
reference takes "the last" items:
  CounterFact: the first and the last neighbourhood prompt of each item (one if it has one);
  zsRE: each item's NQ locality question, normalised as evaluation asks it ("Who wrote x?").
Their conditions are encoded by the encoder view of the edits (the templated query); the
reference capitalises CounterFact neighbourhood prompts first, we keep them as evaluation asks
them. Growing the edit set takes more items further from the end, so the earlier queries stay.
"""

import dataclasses
import logging

import numpy as np

from meg_jax.collect.bank import WeightBank
from meg_jax.data.records import EditRecord
from meg_jax.diffusion.config import GeneratorConfig
from meg_jax.diffusion.generate import load_generator_params, save_generator
from meg_jax.diffusion.train import train_generator
from meg_jax.encoder.text_encoder import TextEncoder
from meg_jax.infra.files import write_json_atomic
from meg_jax.infra.fingerprint import StageInputs, without_legacy
from meg_jax.pipeline.context import RunContext
from meg_jax.pipeline.edits import EditSet
from meg_jax.pipeline.query_side import _pseudo_id, pseudo_records

log = logging.getLogger("meg_jax.pipeline")


def generator_inputs(ctx: RunContext, edits: EditSet, lineages: dict) -> StageInputs:
    """The generator stage's recorded inputs (what its fingerprint and lineage hash).

    Zero-weight augmentation and condition noise enter only when on, so runs without them keep
    the identity they had before the settings existed; augmentation with the pseudo-edits'
    identity and the calibration tail the zero queries are chosen around.
    """
    g = ctx.cfg.generator
    # cond_noise is left out here, not in `generator_settings`: bench/quality.py's cell keys,
    # which also use `generator_settings`, were made with it present.
    generator = without_legacy(generator_settings(g.build()), {"dit.cond_noise": 0.0})
    config = {"generator": generator, "template": ctx.template.query}
    if g.zero_augmentation > 0:
        config["zero_augmentation"] = {
            "ratio": float(g.zero_augmentation),
            "pseudo": _pseudo_id(ctx),
            "kind": ctx.cfg.data.kind,
            "calibration": _calibration_size(ctx),
        }
    return StageInputs(config=config, upstream=lineages, items=edits.items)


def generator_settings(config: GeneratorConfig) -> dict:
    """A generator configuration as fingerprints record it: settings added since work
    directories were keyed by it are left out while they keep the earlier behaviour."""
    return without_legacy(dataclasses.asdict(config), {"dit.cond_tokens": False})


def _calibration_size(ctx: RunContext) -> int:
    # The router's calibration tail of the pseudo-edits (`query_side._pseudo`): kept out of DA.
    return ctx.cfg.data.n_calibration if ctx.cfg.router.calibrate else 0


def zero_queries(
    records: list[EditRecord], kind: str, count: int, exclude: frozenset[str] = frozenset()
) -> list[str]:
    """The last `count` pseudo-irrelevant queries of `records` (module docstring), in order.

    zsRE locality prompts must already be NQ-normalised (`pseudo_records` does it). A query in
    `exclude` (the edit set's own queries) is skipped. Fewer than `count` when the records hold
    fewer.
    """
    picked: list[list[str]] = []
    total = 0
    for record in reversed(records):
        if total >= count:
            break
        prompts = record.locality_prompts
        if not prompts:
            continue
        if kind == "counterfact":
            queries = [prompts[0]] if len(prompts) == 1 else [prompts[0], prompts[-1]]
        else:
            queries = [prompts[0]]
        queries = [q for q in queries if q not in exclude]
        if not queries:
            continue
        picked.append(queries)
        total += len(queries)
    flat = [q for queries in reversed(picked) for q in queries]
    return flat[len(flat) - min(count, len(flat)) :]


def zero_augmentation_queries(ctx: RunContext, edits: EditSet) -> list[str]:
    """The run's DA queries: round(N x generator.zero_augmentation) of them, or as many as the
    pseudo-edits outside the calibration tail hold (logged).

    None is a query of the edit set (its prompt, a paraphrase or a locality prompt): the pseudo
    file may be the edit file's far end (zsRE), and an evaluated locality prompt trained
    towards zero would flatter the Locality reading.
    """
    cfg = ctx.cfg
    ratio = cfg.generator.zero_augmentation  # PipelineConfig refused it without data.pseudo
    records = pseudo_records(ctx)
    records = records[: max(len(records) - _calibration_size(ctx), 0)]
    count = max(1, round(len(edits.records) * ratio))
    own = frozenset(
        q for r in edits.records for q in (r.prompt, *r.paraphrases, *r.locality_prompts)
    )
    queries = zero_queries(records, cfg.data.kind, count, own)
    if not queries:
        raise ValueError(
            f"config.generator.zero_augmentation={ratio}: {cfg.data.pseudo} holds no locality "
            f"prompt outside the router's calibration tail ({_calibration_size(ctx)} records of "
            f"{len(records) + _calibration_size(ctx)}); expected pseudo-edits with locality prompts"
        )
    if len(queries) < count:
        log.warning(
            "generator: zero-weight augmentation wanted %d queries, %s holds %d outside the "
            "calibration tail; using those",
            count,
            cfg.data.pseudo,
            len(queries),
        )
    return queries


def run_generator_stage(
    ctx: RunContext, edits: EditSet, bank: WeightBank, encoder: TextEncoder, lineages: dict
) -> tuple[dict, str]:
    """Trains (resumes, extends or skips) the generator; returns (its summary, its lineage)."""
    g = ctx.cfg.generator
    gen_cfg = g.build()
    inputs = generator_inputs(ctx, edits, lineages)
    stage = ctx.stage("generator", inputs, g.retrain)
    if stage.skip:
        summary = stage.summary()
        stage.report(_figure(summary))
        return summary, inputs.lineage
    stage.start()
    view = encoder.with_view(template=ctx.template.query)
    conditions = view.encode([r.prompt for r in edits.records])
    zero_conditions = None
    if g.zero_augmentation > 0:
        zero_conditions = np.asarray(view.encode(zero_augmentation_queries(ctx, edits)), np.float32)
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
        zero_conditions=zero_conditions,
    )
    save_generator(result.state, params_path)
    write_json_atomic(stage.folder / "generator.json", {"config": dataclasses.asdict(gen_cfg)})
    summary = {"steps": result.step, "stopped": result.stopped, "criterion": result.criterion}
    if zero_conditions is not None:
        last = result.evaluations[-1] if result.evaluations else {}
        summary["zero_rows"] = len(zero_conditions)
        summary["zero_l2_mean"] = last.get("zero_l2_mean")
    stage.finish(summary, _figure(summary))
    return summary, inputs.lineage


def _figure(summary: dict) -> str:
    crit = summary.get("criterion")
    crit = "never evaluated" if crit is None else f"{crit:.4f}"
    stop = ", below the stopping criterion" if summary.get("stopped") else ""
    zero = ""
    if summary.get("zero_rows"):
        l2 = summary.get("zero_l2_mean")
        zero = f"; DA {summary['zero_rows']} zero rows" + ("" if l2 is None else f", L2 {l2:.4f}")
    return f"{summary.get('steps')} steps, criterion {crit}{stop}{zero}"
