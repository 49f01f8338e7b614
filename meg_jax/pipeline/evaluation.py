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
from collections.abc import Callable
from typing import Any

import numpy as np

from meg_jax.evaluation.evaluator import (
    KINDS,
    check_locality_labels,
    evaluate_classic,
    evaluate_meg,
)
from meg_jax.evaluation.report import format_comparison, write_report
from meg_jax.inference.editor import Editor, MeGEditor, zero_editor
from meg_jax.inference.runner import ModelRunner
from meg_jax.infra.files import write_json_atomic
from meg_jax.infra.fingerprint import StageInputs, digest
from meg_jax.pipeline.context import RunContext, log
from meg_jax.pipeline.edits import EditSet, prepare, read_records

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

    @property
    def rows(self) -> dict[str, str]:
        return dict([UNEDITED, (self.name, self.label)])


def evaluated_edits(ctx: RunContext, edits: EditSet) -> tuple[EditSet, str]:
    """The records to evaluate: the run's edit set, or `evaluation.edits` prepared alike."""
    e = ctx.cfg.evaluation
    if not e.edits:
        return edits, ctx.cfg.data.edits
    return prepare(ctx, e.edits, e.n_edits or ctx.cfg.data.n_edits), e.edits


def routing_breakdown(rows: list[dict], routed: dict[str, np.ndarray]) -> dict:
    """Per query kind: the share routed, and AG accuracy among routed and unrouted queries."""
    out = {}
    for kind, flags in routed.items():
        ag = np.asarray([row[f"{kind}_ag"] for row in rows if f"{kind}_ag" in row], bool)
        entry = {"routed": float(flags.mean()) if flags.size else 0.0}
        for name, mask in (("ag_when_routed", flags), ("ag_when_not_routed", ~flags)):
            entry[name] = float(100.0 * ag[mask].mean()) if mask.any() else None
        out[kind] = entry
    return out


def _routed(editor: MeGEditor, rows: list[dict]) -> dict[str, np.ndarray]:
    return {
        kind: editor.routed([row[f"{kind}_query"] for row in rows if f"{kind}_query" in row])
        for kind in KINDS
    }


def run_evaluation_stage(
    ctx: RunContext, edits: EditSet, lineages: dict, edited: EditorUnderTest
) -> dict:
    """Evaluates (or reads back) the unedited and the `edited` model; returns both summaries."""
    e = ctx.cfg.evaluation
    evaluated, source = evaluated_edits(ctx, edits)
    config = dataclasses.asdict(e)
    config.pop("retrain")
    inputs = StageInputs(
        config=config,
        upstream={**lineages, "trained_on": digest(edits.items)[:16]},
        items=evaluated.items,
    )
    stage = ctx.stage("evaluation", inputs, e.retrain, derived=True)
    if stage.skip:
        summaries = stage.summary()
        stage.report(f"Score {summaries[edited.name].get('score', float('nan')):.2f}")
        print(format_comparison(summaries, edited.rows))
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
    summaries, reference = {}, "own"
    models = (
        (UNEDITED[0], zero_editor(host.config.d_model), runner),
        (edited.name, editor, edited_runner),
    )
    for name, edit_fn, model in models:
        rows, summary = evaluate_meg(
            model, records, ctx.template, edit_fn, labels, e, loc_reference=reference
        )
        # Loc TF on the unedited model's own tokens: its generation is the reference.
        reference = [row.get("loc_generated", []) for row in rows]
        if e.classic:
            summary["classic"] = evaluate_classic(model, records, edit_fn, ctx.cfg.data.kind)
        if isinstance(edit_fn, MeGEditor):  # routing is MeG's own reading
            routed = _routed(editor, rows)
            summary["routed"] = {k: float(v.mean()) for k, v in routed.items() if v.size}
            summary["routing"] = routing_breakdown(rows, routed)
            summary["non_finite_neurons"] = editor.non_finite
            if e.unrelated:
                prompts = [r.prompt for r in read_records(e.unrelated)]
                summary["unrelated_routed"] = float(np.mean(editor.routed(prompts)))
        write_report(stage.folder / name, rows, summary, f"{edited.rows[name]}: {source}")
        summaries[name] = summary
    write_json_atomic(ctx.workdir / "summary.json", summaries)
    stage.finish(summaries, f"Score {summaries[edited.name].get('score', float('nan')):.2f}")
    print(format_comparison(summaries, edited.rows))
    log.info("evaluation written to %s", stage.folder)
    return summaries
