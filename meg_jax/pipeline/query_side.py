"""Stages "encoder" and "router": the query side of MeG (METHOD.md §2.2-§2.3).

The encoder is tuned on pseudo-edits disjoint from the edit set, so it does not depend on the
edits: adding facts never retrains it. The router memorises the edit queries (raw text, tuned
encoder) plus held-out pseudo-edits whose paraphrases and neighbourhood prompts calibrate its
threshold. Adding edits retrains it on the union from its seeded initialisation (what a
from-scratch run trains), or with `router.extend_warm` continues from the trained router for
`router.extend_epochs`; either way it is then recalibrated. `router.kind = "nearest"` memorises
the same queries in a nearest-query gate instead (`router.nearest`), calibrated the same way.
"""

import dataclasses

import numpy as np

from meg_jax.data.preprocess import meg_preprocess_config, normalize_locality_prompts
from meg_jax.data.records import EditRecord
from meg_jax.data.sources import check_disjoint, pseudo_split
from meg_jax.encoder.infonce import pseudo_edit_pairs, split_pairs
from meg_jax.encoder.text_encoder import TextEncoder, load_top_layers, save_top_layers
from meg_jax.encoder.train import train_infonce
from meg_jax.infra.fingerprint import StageInputs, without_legacy
from meg_jax.pipeline.context import RunContext, StageRun
from meg_jax.pipeline.edits import EditSet, read_edit_records, read_records, source_id
from meg_jax.router.calibrate import calibrate, write_calibration
from meg_jax.router.gate import Router, load_router, save_router
from meg_jax.router.nearest import NearestGate
from meg_jax.router.train import train_router

# Bump when the pseudo-edit split's rule changes: the encoder and router then retrain.
PSEUDO_SPLIT_VERSION = 1


def _by_subject(ctx: RunContext) -> bool:
    """Whether the pseudo-edits are split from the edits by subject: with MeG's zsRE dedup."""
    return meg_preprocess_config(ctx.cfg.data.kind, ctx.cfg.host.template).dedup_by_subject


def pseudo_records(ctx: RunContext) -> list[EditRecord]:
    """`data.pseudo` as the encoder and router use it (METHOD.md §1.4).

    Merged like `data.edits` ("a+b"), with `data.rephrases` put in; for zsRE, split from every
    record of the `data.edits` files by subject and prompt, deduplicated by subject
    (`meg_jax.data.sources.pseudo_split`); every locality prompt NQ-normalised as the edit
    set's are, so the router's calibration negatives are the questions evaluation asks.
    """
    d = ctx.cfg.data
    records = read_edit_records(ctx, d.pseudo)
    if _by_subject(ctx):
        records = pseudo_split(records, read_records(d.edits), by_subject=True)
    return normalize_locality_prompts(records)


def _pseudo(ctx: RunContext):
    """(InfoNCE pool, calibration records) from `data.pseudo`, both disjoint from the edits."""
    d = ctx.cfg.data
    if not d.pseudo:
        return [], []
    pseudo = pseudo_records(ctx)
    calibration = pseudo[-d.n_calibration :] if ctx.cfg.router.calibrate and d.n_calibration else []
    pool = pseudo[: len(pseudo) - len(calibration)][-d.n_pseudo_pairs :]
    return pool, calibration


def calibration_records(ctx: RunContext) -> list[EditRecord]:
    """The held-out pseudo-edits whose paraphrases and neighbourhood prompts calibrate the
    router's threshold (empty when calibration is off or there are no pseudo-edits)."""
    return _pseudo(ctx)[1]


def router_queries(
    encoder: TextEncoder, calibration: list[EditRecord], edits: list[EditRecord]
) -> np.ndarray:
    """[C + N, E] what the router memorises: the calibration pseudo-edits' queries first, then
    the edits' (labels are prefix-stable, so appended edits keep the earlier labels)."""
    return np.concatenate(
        [encoder.encode([r.prompt for r in calibration]), encoder.encode([r.prompt for r in edits])]
    )


def calibration_queries(
    encoder: TextEncoder, calibration: list[EditRecord]
) -> tuple[np.ndarray, np.ndarray]:
    """([C, E] positives, [C, E] negatives) of the threshold's calibration: each calibration
    pseudo-edit's first paraphrase (to be routed) and first neighbourhood prompt (not)."""
    return (
        encoder.encode([r.paraphrases[0] for r in calibration]),
        encoder.encode([r.locality_prompts[0] for r in calibration]),
    )


def _pseudo_id(ctx: RunContext) -> str:
    """What the pseudo-edits are made of: their files and, when they shape them, the edit files
    (the zsRE split) and the rephrase file. A single CounterFact file keeps its plain hash."""
    d = ctx.cfg.data
    if not d.pseudo:
        return ""
    ident = source_id(d.pseudo)
    if _by_subject(ctx):
        ident += f"|split{PSEUDO_SPLIT_VERSION}:{source_id(d.edits)}"
    if d.rephrases:
        ident += f"|rephrases:{d.rephrases_mode}:{source_id(d.rephrases)}"
    return ident


def run_encoder_stage(ctx: RunContext) -> tuple[TextEncoder, str]:
    """(the tuned encoder in the raw-query view, the stage's lineage id)."""
    cfg, d = ctx.cfg, ctx.cfg.data
    enc = without_legacy(dataclasses.asdict(cfg.encoder), {"infonce.select": "val_top1"})
    enc.pop("retrain")
    inputs = StageInputs(
        config={
            **enc,
            "template": ctx.template.query,
            "seed": cfg.seed,
            "pseudo": _pseudo_id(ctx),
            "n_pseudo_pairs": d.n_pseudo_pairs,
            "n_val_pairs": d.n_val_pairs,
            "n_calibration": d.n_calibration if cfg.router.calibrate else 0,
        },
        upstream={},
    )
    stage = ctx.stage("encoder", inputs, cfg.encoder.retrain)
    top_path = stage.folder / "top_layers.msgpack"
    encoder = ctx.base_encoder()
    if stage.skip:
        if top_path.is_file():
            encoder = encoder.with_top_layers(load_top_layers(top_path))
        stage.report(_encoder_figure(stage.summary()))
        return encoder, inputs.lineage
    stage.start()
    pool, _ = _pseudo(ctx)
    summary = {"tuned": False}
    if pool:
        train_pairs, val_pairs = split_pairs(pseudo_edit_pairs(pool), d.n_val_pairs, cfg.seed)
        infonce = dataclasses.replace(cfg.encoder.infonce, template=ctx.template.query)
        result = train_infonce(encoder, train_pairs, val_pairs, infonce, stage.run_dir)
        encoder = encoder.with_top_layers(result.top_layers)
        save_top_layers(encoder, top_path)
        summary = {
            "tuned": True,
            "best_step": result.best_step,
            "val_top1": result.best_val_top1,
            "val_loss": result.best_val_loss,
        }
    else:
        top_path.unlink(missing_ok=True)
    stage.finish(summary, _encoder_figure(summary))
    return encoder, inputs.lineage


def _encoder_figure(summary: dict) -> str:
    if not summary.get("tuned"):
        return "untuned (no pseudo-edits)"
    loss = f", loss {summary['val_loss']:.3f}" if "val_loss" in summary else ""
    return f"val top-1 {summary['val_top1']:.3f}{loss} at step {summary['best_step']}"


def run_router_stage(ctx: RunContext, edits: EditSet, encoder: TextEncoder, encoder_lineage: str):
    """The calibrated gate (None when `router.enabled` is False) and its lineage."""
    cfg = ctx.cfg
    rc = dataclasses.asdict(cfg.router)
    for key in ("retrain", "extend_warm", "extend_epochs"):
        rc.pop(key)
    rc = without_legacy(rc, {"kind": "familiarity"}, ("nearest_threshold",))
    if cfg.router.kind != "familiarity":  # nothing is trained
        rc.pop("train")
    inputs = StageInputs(
        config={**rc, "pseudo": _pseudo_id(ctx), "n_calibration": cfg.data.n_calibration},
        upstream={"encoder": encoder_lineage},
        items=edits.items,
    )
    if not cfg.router.enabled:
        return None, inputs.lineage
    stage = ctx.stage("router", inputs, cfg.router.retrain)
    if stage.skip:
        stage.report(_router_figure(stage.summary()))
        return load_router(stage.folder, ctx.mesh), inputs.lineage
    stage.start()
    pool, calibration = _pseudo(ctx)
    # The encoder's pairs and the calibration records must not be edits (a shared file's far
    # end reached by a large n_edits): checked when the router trains, i.e. before collection.
    check_disjoint(edits.records, [*pool, *calibration], _by_subject(ctx))
    conditions = router_queries(encoder, calibration, edits.records)
    if cfg.router.kind == "nearest":  # added edits: rebuilt on the union, as from scratch
        router = NearestGate.build(conditions, cfg.router.nearest_threshold, ctx.mesh)
    else:
        router = _train_familiarity(ctx, stage, conditions)
    summary: dict = {"threshold": router.threshold, "calibrated": False}
    if calibration:
        pos, neg = (router.score(x) for x in calibration_queries(encoder, calibration))
        report = calibrate(pos, neg, cfg.router.calibration)
        write_calibration(report, stage.folder / "calibration.json", stage.folder / "roc.png")
        router = router.with_threshold(report["threshold"])
        summary = {"threshold": report["threshold"], "auc": report["auc"], "calibrated": True}
    if isinstance(router, NearestGate):
        router.save(stage.folder)
    else:
        save_router(router, stage.folder)
    stage.finish(summary, _router_figure(summary))
    return router, inputs.lineage


def _train_familiarity(ctx: RunContext, stage: StageRun, conditions: np.ndarray) -> Router:
    """The Familiarity Network on `conditions`: trained from its seeded initialisation, or
    (`router.extend_warm`, edits added) continued from the trained one."""
    train_cfg, init, run_dir = ctx.cfg.router.train, None, stage.run_dir
    if stage.verdict == "extend" and ctx.cfg.router.extend_warm:
        init = load_router(stage.folder, ctx.mesh).params
        train_cfg = dataclasses.replace(train_cfg, num_epochs=ctx.cfg.router.extend_epochs)
        run_dir = run_dir / "warm"  # never resumed as, nor from, a retraining of the same union
    return train_router(conditions, train_cfg, run_dir, mesh=ctx.mesh, init_params=init)


def _router_figure(summary: dict) -> str:
    if summary.get("calibrated"):
        return f"threshold {summary['threshold']:.4f} (calibration AUC {summary['auc']:.3f})"
    return f"threshold {summary.get('threshold', float('nan')):.4f} (not calibrated)"
