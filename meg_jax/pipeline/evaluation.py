"""Stage "evaluation": the edited and the unedited model under MeG's protocol (and the classic one).

The edited model is an `EditorUnderTest`: MeG's editor on the host's weights, or the all-zero
neuron on a weight-editing baseline's edited weights; both go through the same evaluation.
Writes `eval/unedited/` and `eval/<editor>/` (per-example JSONL, summary JSON, PNG),
`summary.json` for both, and prints one table whose rows say which model is which.
`evaluation.edits` evaluates another file against the same trained editor (a held-out split);
`evaluation.unrelated` adds the router's false-positive rate on a file of unrelated prompts.
Evaluation trains nothing: a rerun on the same inputs reads the earlier results, and changed
inputs are simply evaluated again.
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from meg_jax.collect.bank import WeightBank, load_bank
from meg_jax.data.records import EditRecord
from meg_jax.evaluation.evaluator import (
    KINDS,
    EvalConfig,
    check_locality_labels,
    evaluate_classic,
    evaluate_meg,
    kind_entries,
    loc_references,
)
from meg_jax.evaluation.report import (
    format_comparison,
    format_routing,
    write_examples,
    write_report,
)
from meg_jax.inference.editor import Editor, MeGEditor, zero_editor
from meg_jax.inference.runner import ModelRunner
from meg_jax.infra.files import write_json_atomic
from meg_jax.infra.fingerprint import StageInputs, digest, file_digest
from meg_jax.models.neuron import Neuron, unflatten_neuron
from meg_jax.pipeline.context import RunContext, log
from meg_jax.pipeline.edits import EditSet, every_locality_label, prepare, read_records

UNEDITED = ("unedited", "unedited model")


@dataclasses.dataclass(frozen=True)
class EditorUnderTest:
    """The edited model the evaluation compares with the unedited one.

    `name` keys its summary (`summary.json`, `eval/<name>/`), `label` is its row in the table.
    `load()` gives (the editor, the host parameters to run it on; None: the host's own). It is
    called only when the evaluation runs, so a rerun that reads earlier results back loads
    neither the encoder nor the generator nor edited weights.
    """

    name: str
    label: str
    load: Callable[[], tuple[Editor, Any]]
    # The files `load` builds the editor from. Their digests enter the evaluation's inputs, so
    # an artefact that changed while its stage's inputs did not (a router extended for more
    # epochs, a stage retrained) is evaluated again rather than read back stale.
    artefacts: tuple[Path, ...] = ()

    def artefacts_digest(self) -> dict:
        """{"artefacts": digest} over the files that exist; empty when none is named."""
        found = [p for p in self.artefacts if p.is_file()]
        if not found:
            return {}
        return {"artefacts": digest([[p.name, file_digest(p)] for p in found])[:16]}

    @property
    def rows(self) -> dict[str, str]:
        return dict([UNEDITED, (self.name, self.label)])


def evaluated_edits(ctx: RunContext, edits: EditSet) -> tuple[EditSet, str]:
    """The records to evaluate: the run's edit set, or `evaluation.edits` prepared alike."""
    e = ctx.cfg.evaluation
    if not e.edits:
        return edits, ctx.cfg.data.edits
    return prepare(ctx, e.edits, e.n_edits or ctx.cfg.data.n_edits), e.edits


def routing_breakdown(
    rows: list[dict], routed: dict[str, np.ndarray], bank_rows: list[dict] | None = None
) -> dict:
    """Where each reading is won or lost, per query kind (every evaluated query, in
    `kind_entries` order, so with `evaluation.all_prompts` every prompt):

      routed              the share of queries the router sends to the generator
      ag_when_routed      AG among them (None when there are none)
      ag_when_not_routed  AG among the queries given the zero neuron (the unedited model)
      ag_bank_neuron      with `bank_rows` (the same records evaluated with their bank neuron,
                          `bank_neuron_editor`): AG of the neuron collection fitted for the
                          edit, the generator's upper bound; also split by routing

    routed x ag_when_routed + (1 - routed) x ag_when_not_routed is the headline `{kind}_ag`.
    """
    out = {}
    for kind, flags in routed.items():
        entries = kind_entries(rows, kind)
        ag = np.asarray([e["ag"] for e in entries], bool)
        entry: dict = {"routed": float(flags.mean()) if flags.size else 0.0, "n": int(flags.size)}
        for name, mask in (("ag_when_routed", flags), ("ag_when_not_routed", ~flags)):
            entry[name] = _percent_or_none(ag, mask)
        if bank_rows is not None and kind != "loc":
            entry.update(_bank_breakdown(rows, bank_rows, kind, flags))
        out[kind] = entry
    return out


def _percent_or_none(flags: np.ndarray, mask: np.ndarray) -> float | None:
    return float(100.0 * flags[mask].mean()) if mask.any() else None


def _bank_breakdown(rows: list[dict], bank_rows: list[dict], kind: str, routed: np.ndarray) -> dict:
    """AG of the bank's neurons on the queries of `kind`, matched by (record id, prompt slot):
    over all queries that have one, and among the routed and the unrouted ones."""
    bank = {
        (row["id"], slot): e["ag"]
        for row in bank_rows
        for slot, e in enumerate(kind_entries([row], kind))
    }
    keys = [(row["id"], slot) for row in rows for slot in range(len(kind_entries([row], kind)))]
    have = np.asarray([k in bank for k in keys], bool)
    ag = np.asarray([bank.get(k, False) for k in keys], bool)
    return {
        "n_bank_neuron": int(have.sum()),
        "ag_bank_neuron": _percent_or_none(ag, have),
        "ag_bank_neuron_when_routed": _percent_or_none(ag, have & routed),
        "ag_bank_neuron_when_not_routed": _percent_or_none(ag, have & ~routed),
    }


def _routed(editor: MeGEditor, rows: list[dict]) -> dict[str, np.ndarray]:
    return {kind: editor.routed([e["query"] for e in kind_entries(rows, kind)]) for kind in KINDS}


def bank_neuron_editor(
    records: list[EditRecord], bank: WeightBank, d_model: int, with_bias: bool
) -> tuple[Editor, list[EditRecord]]:
    """A fixed-neuron editor: a record's edit prompt and paraphrases get the neuron collection
    fitted for it (bank rows matched by case id), any other text the zero neuron.

    Returns (the editor, the records it covers: those with a fitted row; failed fits are NaN).
    A text shared by two records keeps the first record's neuron.
    """
    rows = {int(c): i for i, c in enumerate(bank.case_id)}
    fitted = bank.fitted
    covered = [r for r in records if r.id in rows and fitted[rows[r.id]]]
    by_text: dict[str, int] = {}
    for r in covered:
        for text in (r.prompt, *r.paraphrases):
            by_text.setdefault(text, rows[r.id])
    weights = np.concatenate([bank.weights, np.zeros_like(bank.weights[:1])])  # last: zero
    zero_row = len(bank.weights)

    def editor(queries) -> Neuron:
        picked = weights[[by_text.get(q, zero_row) for q in queries]]
        neuron = unflatten_neuron(picked, d_model, with_bias)
        return Neuron(*(np.asarray(part, np.float32) for part in neuron))

    return editor, covered


def _run_bank(ctx: RunContext) -> WeightBank | None:
    """The collection stage's bank of this work directory, else the given `collect.bank`."""
    path = ctx.workdir / "collect" / "bank.npz"
    if path.is_file():
        return load_bank(path)
    return load_bank(ctx.cfg.collect.bank) if ctx.cfg.collect.bank else None


def bank_neuron_readings(
    ctx: RunContext, runner: ModelRunner, records: list[EditRecord], e: EvalConfig
) -> tuple[list[dict] | None, dict]:
    """Rel and Gen with each record's own bank neuron (rows, summary fields), or (None, {})
    when no bank is at hand or it covers none of `records` (e.g. a held-out split)."""
    bank = _run_bank(ctx)
    if bank is None:
        return None, {}
    config = ctx.host().config
    editor, covered = bank_neuron_editor(records, bank, config.d_model, config.neuron_has_bias)
    if not covered:
        return None, {"n_bank_neuron": 0}
    rows, summary = evaluate_meg(runner, covered, ctx.template, editor, None, e)
    fields = {"n_bank_neuron": len(covered)}
    for kind in ("rel", "gen"):
        for reading in ("ag", "tf"):
            if f"{kind}_{reading}" in summary:
                fields[f"{kind}_{reading}_bank_neuron"] = summary[f"{kind}_{reading}"]
    return rows, fields


def _evaluate(ctx: RunContext, runner, records, labels, editor, loc_reference="own"):
    """(per-record rows, summary) of one model: MeG's readings, and the classic ones if asked."""
    e = ctx.cfg.evaluation
    rows, summary = evaluate_meg(
        runner, records, ctx.template, editor, labels, e, loc_reference=loc_reference
    )
    if e.classic:
        summary["classic"] = evaluate_classic(runner, records, editor, ctx.cfg.data.kind)
    return rows, summary


@dataclasses.dataclass(frozen=True)
class UneditedCache:
    """The unedited model's evaluation kept in `evaluation.unedited_cache` for other work
    directories: every editor evaluated on the same edits (the baselines and MeG, MeG's seeds)
    compares with the same unedited readings, computed once. `folder` is named by a digest of
    all they depend on: the host and how it is run, the template, the evaluated records and
    their locality labels, the data kind and the evaluator's settings."""

    folder: Path

    def read(self) -> tuple[list[dict] | None, dict | None]:
        summary_path = self.folder / "summary.json"  # written last: present means complete
        if not summary_path.is_file():
            return None, None
        lines = (self.folder / "examples.jsonl").read_text(encoding="utf-8").splitlines()
        log.info("evaluation: the unedited model's readings read from %s", self.folder)
        return [json.loads(line) for line in lines], json.loads(summary_path.read_text())

    def write(self, rows: list[dict], summary: dict) -> None:
        write_examples(self.folder, rows, summary)


def unedited_cache(ctx: RunContext, evaluated: EditSet, labels) -> UneditedCache | None:
    """The cache entry of this evaluation's unedited model; None without a cache folder."""
    e = ctx.cfg.evaluation
    if not e.unedited_cache:
        return None
    settings = dataclasses.asdict(e)
    for where in ("retrain", "unedited_cache", "edits", "n_edits", "unrelated"):
        settings.pop(where)  # a flag, a location, and what `items` and `labels` already say
    key = {
        "host": ctx.host_id,
        "template": dataclasses.asdict(ctx.template),
        "kind": ctx.cfg.data.kind,
        "items": evaluated.items,
        "labels": labels,
        "evaluation": settings,
    }
    return UneditedCache(Path(e.unedited_cache) / f"unedited-{digest(key)[:16]}")


def run_evaluation_stage(
    ctx: RunContext, edits: EditSet, lineages: dict, edited: EditorUnderTest
) -> dict:
    """Evaluates (or reads back) the unedited and the `edited` model; returns both summaries."""
    e = ctx.cfg.evaluation
    evaluated, source = evaluated_edits(ctx, edits)
    config = dataclasses.asdict(e)
    for where in ("retrain", "unedited_cache"):  # a flag and a location: not inputs
        config.pop(where)
    if not e.all_prompts:  # absent unless set: earlier work directories keep their inputs
        config.pop("all_prompts")
    inputs = StageInputs(
        config=config,
        upstream={
            **lineages,
            "trained_on": digest(edits.items)[:16],
            **edited.artefacts_digest(),
        },
        items=evaluated.items,
    )
    stage = ctx.stage("evaluation", inputs, e.retrain, derived=True)
    if stage.skip:
        summaries = stage.summary()
        stage.report(f"Score {summaries[edited.name].get('score', float('nan')):.2f}")
        print(format_comparison(summaries, edited.rows))
        _print_routing(summaries[edited.name])
        return summaries
    stage.start()
    host, runner = ctx.host(), ctx.runner()
    editor, params = edited.load()
    edited_runner = runner
    if params is not None:  # a weight edit: the same evaluation on the edited weights
        edited_runner = ModelRunner(
            host.config, params, host.tokenizer, mesh=ctx.mesh, batch_size=e.batch_size
        )
    records, labels = list(evaluated.records), evaluated.locality_labels
    if labels is not None:
        check_locality_labels(labels, source, e.max_empty_labels)
        if e.all_prompts:  # a label per locality prompt, the first one as above
            labels = every_locality_label(ctx, records, labels)
            check_locality_labels([a for r in labels for a in r], source, e.max_empty_labels)
    summaries = {}
    cache = unedited_cache(ctx, evaluated, labels)
    rows, summary = cache.read() if cache else (None, None)
    if rows is None:
        rows, summary = _evaluate(ctx, runner, records, labels, zero_editor(host.config.d_model))
        if cache:
            cache.write(rows, summary)
    write_report(stage.folder / UNEDITED[0], rows, summary, f"{UNEDITED[1]}: {source}")
    summaries[UNEDITED[0]] = summary
    # Loc TF on the unedited model's own tokens: its generation is the reference.
    reference = loc_references(rows, e.all_prompts)
    rows, summary = _evaluate(ctx, edited_runner, records, labels, editor, reference)
    if isinstance(editor, MeGEditor):  # routing is MeG's own reading
        routed = _routed(editor, rows)
        summary["routed"] = {k: float(v.mean()) for k, v in routed.items() if v.size}
        bank_rows, bank_fields = bank_neuron_readings(ctx, runner, records, e)
        summary.update(bank_fields)
        summary["routing"] = routing_breakdown(rows, routed, bank_rows)
        summary["non_finite_neurons"] = editor.non_finite
        if e.unrelated:
            prompts = [r.prompt for r in read_records(e.unrelated)]
            summary["unrelated_routed"] = float(np.mean(editor.routed(prompts)))
    write_report(stage.folder / edited.name, rows, summary, f"{edited.rows[edited.name]}: {source}")
    summaries[edited.name] = summary
    write_json_atomic(ctx.workdir / "summary.json", summaries)
    stage.finish(summaries, f"Score {summaries[edited.name].get('score', float('nan')):.2f}")
    print(format_comparison(summaries, edited.rows))
    _print_routing(summaries[edited.name])
    log.info("evaluation written to %s", stage.folder)
    return summaries


def _print_routing(summary: dict) -> None:
    table = format_routing(summary)
    if table:
        print(table)
