"""Stage "edits": the edit set as MeG prepares it, with the unedited model's locality answers.

Reads `data.edits` (one file, or several merged: "a+b", `meg_jax.data.sources`; and `data.add`,
appended), puts in the paraphrases of `data.rephrases` when given, bounds every prompt's length
with the host's tokenizer before any model runs, and applies MeG's preprocessing
(`meg_jax.data.preprocess`: zsRE deduplicates by subject across the merged files, NQ-normalises
the locality prompts, and drops what the unedited model already answers): `n_edits` counts the
records kept after deduplication and the zsRE wrong-answer filter, so raw records are read in
growing blocks until that many are kept.

The unedited model's answers are memoised per host, template and decoding settings
(`edits/answers-<id>.json`), so growing the edit set asks the model only about the new prompts
and the earlier answers stay exactly as they were.
"""

import dataclasses
import json
from pathlib import Path

from meg_jax.data.locate import locate
from meg_jax.data.preprocess import meg_preprocess_config, pre_edit_answers, prepare_edits
from meg_jax.data.records import DataFormatError, EditRecord
from meg_jax.data.rephrases import apply_rephrases, read_rephrases
from meg_jax.data.sources import read_spec, split_spec
from meg_jax.evaluation.evaluator import check_locality_labels
from meg_jax.inference.editor import zero_editor
from meg_jax.infra.files import write_json_atomic
from meg_jax.infra.fingerprint import StageInputs, digest, file_digest, items_of
from meg_jax.pipeline.context import RunContext, log


@dataclasses.dataclass(frozen=True)
class EditSet:
    """The records to edit (with their dataset ids) and their pre-edit locality answers."""

    records: tuple[EditRecord, ...]
    locality_labels: tuple[str, ...] | None

    @property
    def ids(self) -> list[int]:
        return [r.id for r in self.records]

    @property
    def items(self) -> tuple[tuple[int, str], ...]:
        """(dataset id, content hash) per edit: what item-based stages fingerprint."""
        return items_of(self.ids, [r.content() for r in self.records])

    def to_json(self) -> dict:
        return {
            "records": [r.to_json() for r in self.records],
            "locality_labels": self.locality_labels,
        }

    @staticmethod
    def from_json(obj: dict) -> "EditSet":
        labels = obj["locality_labels"]
        return EditSet(
            tuple(EditRecord.from_json(r) for r in obj["records"]),
            None if labels is None else tuple(labels),
        )


def read_records(name: str, limit: int | None = None) -> list[EditRecord]:
    """An edit file, or several merged ("a+b", `meg_jax.data.sources`), by the one resolution
    order (`meg_jax.data.locate`), saying where each was found."""
    return read_spec(name, limit=limit)


def read_edit_records(ctx: RunContext, name: str, limit: int | None = None) -> list[EditRecord]:
    """`read_records`, then the paraphrases of `data.rephrases` (when given) put in."""
    records = read_records(name, limit)
    d = ctx.cfg.data
    if not d.rephrases:
        return records
    rephrases = read_rephrases(locate(d.rephrases)[0])
    records, matched = apply_rephrases(records, rephrases, d.rephrases_mode)
    log.info("data: %s: rephrases for %d of %d records", d.rephrases, matched, len(records))
    return records


def _renumbered(records: list[EditRecord], added: list[EditRecord], file: str) -> list[EditRecord]:
    """`added`, renumbered past the largest id of `records` if any of their ids clash."""
    taken = {r.id for r in records}
    if not any(r.id in taken for r in added):
        return added
    base = max(taken) + 1
    log.info("data: %s ids clash with data.edits; numbered from %d", file, base)
    return [dataclasses.replace(r, id=base + i) for i, r in enumerate(added)]


def check_lengths(records: list[EditRecord], tokenizer, template, limit: int) -> None:
    """Every templated prompt a stage will run fits `limit` tokens (named record otherwise)."""
    for r in records:
        for field, texts in (
            ("prompt", [r.prompt]),
            ("paraphrases", r.paraphrases[:1]),
            ("locality_prompts", r.locality_prompts[:1]),
        ):
            for text in texts:
                n = len(tokenizer(template.format_query(text))["input_ids"])
                if n > limit:
                    raise DataFormatError(
                        f"{r.source.describe(field)}: the templated prompt has {n} tokens, more "
                        f"than data.max_prompt_tokens={limit}; shorten it or raise the bound"
                    )


class AnswerMemo:
    """Greedy answers of the unedited model, remembered across runs by templated prompt."""

    def __init__(self, ctx: RunContext):
        e = ctx.cfg.evaluation
        key = {"host": ctx.host_id, "max_new_tokens": e.max_new_tokens, "stop": e.stop_at_cut}
        self.model_id = digest(key)[:16]
        self.path = ctx.workdir / "edits" / f"answers-{self.model_id}.json"
        self.answers: dict[str, str] = {}
        if self.path.is_file():
            self.answers = json.loads(self.path.read_text(encoding="utf-8"))
        self.ctx = ctx

    def __call__(self, prompts: list[str]) -> list[str]:
        todo = list(dict.fromkeys(p for p in prompts if p not in self.answers))
        if todo:
            runner, stops = self.ctx.runner(), self.ctx.template.generation_stops
            zero = zero_editor(self.ctx.host().config.d_model)
            stop_texts = stops if self.ctx.cfg.evaluation.stop_at_cut else ()
            answers = runner.generate(
                todo, zero(todo), self.ctx.cfg.evaluation.max_new_tokens, stop_texts
            )
            self.answers.update(zip(todo, answers, strict=True))
            write_json_atomic(self.path, self.answers)
        return [self.answers[p] for p in prompts]


def _preprocessed(ctx: RunContext, records: list[EditRecord], memo: "AnswerMemo"):
    cfg = ctx.cfg
    check_lengths(records, ctx.host().tokenizer, ctx.template, cfg.data.max_prompt_tokens)
    config = meg_preprocess_config(cfg.data.kind, cfg.host.template)
    return prepare_edits(records, memo.model_id, memo, config)


def prepare(ctx: RunContext, source: str, n: int, add: str = "") -> EditSet:
    """The first `n` edits of `source` kept by MeG's preprocessing, then those of `add`.

    Deduplication keeps a subject's first record and the filter judges each record alone, so
    the first `n` kept are the same however many raw records were read: blocks grow until `n`
    are kept or the file ends. `add` is preprocessed on its own and appended.
    """
    memo = AnswerMemo(ctx)
    block = n
    while True:
        raw = read_edit_records(ctx, source, limit=block)
        prepared = _preprocessed(ctx, raw, memo)
        if len(prepared.records) >= n or len(raw) < block:
            break
        block = max(block + 2 * (n - len(prepared.records)), int(block * 1.5))
    if len(prepared.records) < n:
        log.warning(
            "data: %s holds only %d usable edits (n_edits=%d)", source, len(prepared.records), n
        )
    records = list(prepared.records[:n])
    labels = None if prepared.locality_labels is None else list(prepared.locality_labels[:n])
    if add:
        extra = _preprocessed(ctx, _renumbered(records, read_edit_records(ctx, add), add), memo)
        records += extra.records
        labels = None if labels is None else labels + list(extra.locality_labels)
    return EditSet(tuple(records), None if labels is None else tuple(labels))


def every_locality_label(
    ctx: RunContext, records: list[EditRecord], first: tuple[str, ...]
) -> tuple[tuple[str, ...], ...]:
    """Per record, the unedited model's processed answer to EVERY locality prompt
    (`evaluation.all_prompts`), in the record's order.

    Asked through the same `AnswerMemo` and post-processing as the first-prompt labels of the
    edit set, so only prompts never asked before cost generation, and the memo file stays the
    one prompt -> answer map. The first entry is the edit set's own label (`first`), so the
    first-prompt readings of an all-prompt evaluation are MeG's protocol exactly.
    """
    memo = AnswerMemo(ctx)
    rest = [p for r in records for p in r.locality_prompts[1:]]
    answers = iter(pre_edit_answers(rest, ctx.template, memo))
    return tuple(
        (label, *(next(answers) for _ in r.locality_prompts[1:]))
        for r, label in zip(records, first, strict=True)
    )


def run_edits_stage(ctx: RunContext) -> EditSet:
    """The run's edit set: prepared once, then read back while its inputs are unchanged."""
    d = ctx.cfg.data
    files = {name: source_id(name) for name in (d.edits, d.add) if name}
    if d.rephrases:  # only when given, so runs without one keep their recorded inputs
        files[f"rephrases:{d.rephrases_mode}"] = source_id(d.rephrases)
    inputs = StageInputs(
        config={
            "edits": d.edits,
            "add": d.add,
            "kind": d.kind,
            "n_edits": d.n_edits,
            "max_prompt_tokens": d.max_prompt_tokens,
            "template": ctx.cfg.host.template,
            "max_new_tokens": ctx.cfg.evaluation.max_new_tokens,
        },
        upstream={"host": ctx.host_id, "files": files},
    )
    stage = ctx.stage("edits", inputs, d.retrain, derived=True)
    path = stage.folder / "edits.json"
    if stage.skip and path.is_file():
        edits = EditSet.from_json(json.loads(path.read_text(encoding="utf-8")))
        stage.report(f"{len(edits.records)} edits")
        return edits
    stage.start()
    edits = prepare(ctx, d.edits, d.n_edits, d.add)
    if edits.locality_labels is not None:  # before any training: Loc must measure something
        check_locality_labels(edits.locality_labels, d.edits, ctx.cfg.evaluation.max_empty_labels)
        if ctx.cfg.evaluation.all_prompts:  # every locality prompt is a label then (memoised)
            every = every_locality_label(ctx, list(edits.records), edits.locality_labels)
            flat = [a for labels in every for a in labels]
            check_locality_labels(flat, d.edits, ctx.cfg.evaluation.max_empty_labels)
    write_json_atomic(path, edits.to_json())
    empty = sum(not a for a in edits.locality_labels or ())
    stage.finish(
        {"n_edits": len(edits.records), "empty_locality_labels": empty},
        f"{len(edits.records)} edits",
    )
    return edits


def source_id(name: str) -> str:
    """A data file's content hash (a changed file is a changed input, whatever its name); for
    merged files ("a+b"), theirs joined by "+" in order."""
    parts = split_spec(name)
    return "+".join(file_digest(Path(locate(part)[0]))[:16] for part in parts)
