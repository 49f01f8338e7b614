"""Stage "collect": one fitted neuron per edit, the weight bank (`collect/bank.npz`).

Fits every edit (`meg_jax.collect`), resumable chunk by chunk in the stage's run directory, or
takes the rows of an existing bank (`collect.bank`). Adding edits fits only the new ones and
appends them: the earlier rows are copied bit for bit.
"""

import dataclasses

import numpy as np

from meg_jax.collect.bank import WeightBank, load_bank, save_bank
from meg_jax.collect.stage import CollectConfig, Collector, EditToFit, collect_bank
from meg_jax.data.records import EditRecord
from meg_jax.data.templates import PromptTemplate
from meg_jax.evaluation.metrics import answer_ag_correct
from meg_jax.infra.fingerprint import StageInputs, file_digest, without_legacy
from meg_jax.pipeline.context import RunContext
from meg_jax.pipeline.edits import EditSet


def edits_to_fit(
    records: list[EditRecord], template: PromptTemplate, contexts: tuple[str, ...] = ()
) -> list[EditToFit]:
    """What collection fits, keyed by the records' dataset ids so banks match across runs; each
    of `contexts` goes before the prompt as a sentence of its own, inside the template."""
    return [
        EditToFit(
            r.id,
            template.format_query(r.prompt),
            template.format_answer(r.target_new),
            r.target_new,
            tuple(template.format_query(f"{c.rstrip(' .')}. {r.prompt}") for c in contexts),
        )
        for r in records
    ]


def fit_settings(fit: CollectConfig) -> dict:
    """The fit settings the stage's identity records: the context settings only when contexts
    are on, so banks collected before they existed keep their identity."""
    return without_legacy(dataclasses.asdict(fit), {"context_seeds": ()}, ("context_tokens",))


def bank_rows(ids: list[int], bank: WeightBank, source: str) -> WeightBank:
    """The rows of `bank` for dataset ids `ids`, in that order."""
    rows = {int(c): i for i, c in enumerate(bank.case_id)}
    missing = [c for c in ids if c not in rows]
    if missing:
        raise ValueError(f"{source}: no fitted neuron for case ids {missing[:10]}")
    return bank.select(np.asarray([rows[c] for c in ids], np.int64))


def run_collect_stage(ctx: RunContext, edits: EditSet) -> tuple[WeightBank, str]:
    """(the bank, rows in edit order; the stage's lineage id)."""
    cfg = ctx.cfg.collect
    fit = fit_settings(cfg.fit)
    given = file_digest(cfg.bank)[:16] if cfg.bank else ""
    inputs = StageInputs(
        config={"fit": fit, "bank": given, "template": ctx.cfg.host.template},
        upstream={"host": ctx.host_id},
        items=edits.items,
    )
    stage = ctx.stage("collect", inputs, cfg.retrain)
    out = stage.folder / "bank.npz"
    if stage.skip:
        bank = load_bank(out)
        stage.report(_figure(bank))
        return bank, inputs.lineage
    stage.start()
    summary: dict = {}
    if cfg.bank:
        bank = bank_rows(edits.ids, load_bank(cfg.bank), cfg.bank)
    else:
        done = load_bank(out) if stage.verdict == "extend" else None
        have = set() if done is None else {int(c) for c in done.case_id}
        todo = [r for r in edits.records if r.id not in have]
        host, template = ctx.host(), ctx.template

        def success(texts, targets):
            return answer_ag_correct(texts, targets, template.answer_cuts)

        # The host is already on the mesh's "model" axis; the edits' slots go on "data".
        collector = Collector(
            host.config, host.params, host.tokenizer, cfg.fit, success, mesh=ctx.mesh
        )
        contexts = collector.contexts()
        if contexts:
            summary["contexts"] = list(contexts)
        to_fit = edits_to_fit(todo, template, contexts)
        new = collect_bank(collector, to_fit, stage.run_dir / "bank.npz")
        union = new if done is None else WeightBank.concatenate([done, new])
        bank = bank_rows(edits.ids, union, str(out))
    save_bank(bank, out)
    summary.update(edits=len(bank), fitted=int(bank.fitted.sum()))
    stage.finish(summary, _figure(bank))
    return bank, inputs.lineage


def _figure(bank: WeightBank) -> str:
    return f"{int(bank.fitted.sum())} of {len(bank)} edits fitted"
