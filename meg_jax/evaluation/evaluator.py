"""The evaluator: MeG's six readings (protocol P5) and the classic P1/P2 metrics, batched.

Axes: N records, Q queries (up to 3 per record: Rel, Gen, Loc), D model width.

An *editor* is any function from raw query strings to one neuron per query (`Neuron` of host
numpy arrays [Q, D]): the MeG pipeline (router, then generator or the zero neuron), a fixed
bank lookup, or `zero_editor` for the unedited model. The evaluator asks the editor once for all
queries, then runs every model computation through `ModelRunner` in large jitted batches, so
thousands of records cost a few compiled programs. The neuron of a query is used for the whole
of that query's generation and for all its teacher-forced steps (METHOD.md §2.1).

Per record (METHOD.md §1.3): Rel on the edit prompt, Gen on the first paraphrase, Loc on the
first locality prompt against the unedited model's greedy answer (`loc_labels`). AG is the
processed greedy continuation compared as a string; TF is the reference's re-tokenised token
accuracy ("reference") or the single-forward variant ("fast").

Two shortcuts change no reading (`EvalConfig.stop_at_cut`, `reuse_generation`, both on by
default; a test compares them with the plain path): generations end at their first token that
holds a cut every kind applies (so stored predictions stop there too), and reference-TF steps that
the greedy generation already took are read off it, so most queries cost no TF forward at all.
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from meg_jax.data.records import EditRecord
from meg_jax.data.templates import PromptTemplate
from meg_jax.evaluation import classic
from meg_jax.evaluation.metrics import (
    answer_ag_correct,
    locality_ag_correct,
    meg_score,
    percent,
)
from meg_jax.evaluation.teacher_forcing import (
    TargetQuery,
    build_target_query,
    build_tf_queries,
    tf_accuracy,
)
from meg_jax.inference.editor import Editor
from meg_jax.inference.runner import ModelRunner, take_rows
from meg_jax.models.neuron import Neuron

KINDS = ("rel", "gen", "loc")
TF_MODES = ("reference", "fast")
MATCH_RULES = ("exact", "startswith")
SIX = ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings (the `evaluation` section of a config file)."""

    batch_size: int = 32
    max_new_tokens: int = 20
    tf_mode: str = "reference"  # or "fast"
    match_rule: str = "exact"  # or "startswith" (the reference's lenient baseline path)
    classic: bool = False  # also compute MEMIT zsRE / CounterFact metrics
    limit: int = 0  # evaluate only the first `limit` records (0: all)
    # End a query's generation at its first token containing a one-character cut that every
    # query kind applies (a newline for GPT-J/Llama templates): AG discards the rest anyway.
    stop_at_cut: bool = True
    # Reference TF: a step whose re-tokenised input is the prompt plus the tokens the greedy
    # generation already produced is read from the generation (the same argmax), not re-run.
    reuse_generation: bool = True
    # Largest share of empty pre-edit locality answers: above it Loc compares "" with "" and
    # measures nothing, so the run stops (`check_locality_labels`).
    max_empty_labels: float = 0.1

    def __post_init__(self):
        # Checked when the config is built, not when evaluation reaches them after all training.
        choices = {"tf_mode": TF_MODES, "match_rule": MATCH_RULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"evaluation.{name}: expected one of {allowed}, got {getattr(self, name)!r}"
                )
        for name, least in (("batch_size", 1), ("max_new_tokens", 1), ("limit", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(
                    f"evaluation.{name}: expected an integer >= {least}, got {value!r}"
                )
        if not 0.0 <= self.max_empty_labels <= 1.0:
            raise ValueError(
                f"evaluation.max_empty_labels: expected a share in [0, 1], got "
                f"{self.max_empty_labels!r}"
            )


class EmptyLabelsError(ValueError):
    """Too many pre-edit locality answers are empty for Loc to measure anything."""


def check_locality_labels(labels: Sequence[str], source: str, bound: float) -> float:
    """The share of empty pre-edit locality answers; raises `EmptyLabelsError` above `bound`."""
    if not labels:
        return 0.0
    empty = sum(1 for a in labels if not a)
    share = empty / len(labels)
    if share > bound:
        raise EmptyLabelsError(
            f"{source}: {empty} of {len(labels)} pre-edit locality answers are empty "
            f"({100 * share:.1f}% > evaluation.max_empty_labels={100 * bound:.0f}%): the unedited "
            "model gives no answer to these prompts under this template, so Loc would compare "
            "nothing. Use a prompt template the host answers (host.template), or raise the bound."
        )
    return share


@dataclasses.dataclass
class _Query:
    record: int
    kind: str  # rel | gen | loc
    text: str  # the raw query (what the editor sees)
    target: str  # target_new, or the pre-edit answer for loc


def _queries(records: Sequence[EditRecord], loc_labels: Sequence[str] | None) -> list[_Query]:
    out = []
    for i, record in enumerate(records):
        out.append(_Query(i, "rel", record.prompt, record.target_new))
        if record.paraphrases:
            out.append(_Query(i, "gen", record.paraphrases[0], record.target_new))
        if record.locality_prompts and loc_labels is not None:
            out.append(_Query(i, "loc", record.locality_prompts[0], loc_labels[i]))
    return out


def _tf_flags(
    runner: ModelRunner,
    prompts: Sequence[str],
    queries: Sequence[_Query],
    neurons: Neuron,
    mode: str,
    generated: Sequence[Sequence[int]] | None = None,
) -> list[np.ndarray]:
    """Per query the bool flags of its target tokens under teacher forcing (`prompts`: each
    query in the host's template).

    `generated` (reference mode): each query's greedy new tokens under the same neuron. Step i
    runs the re-tokenised prompt + t_<i; when those ids are the prompt's ids followed by the
    first k generated tokens (k < their count), the model's argmax there IS generated token k,
    so the step is read off instead of run. Only steps after the generation left the target's
    path (or where re-tokenisation merged across the boundary) cost a forward pass.
    """
    tok = runner.tokenizer
    if mode == "fast":
        tq = [build_target_query(tok, p, q.target) for p, q in zip(prompts, queries, strict=True)]
        scores = runner.scores([t.input_ids for t in tq], neurons)
        return [
            argmax[t.target_start - 1 : t.target_start - 1 + len(t.target_ids)]
            == np.asarray(t.target_ids)
            for t, (argmax, _) in zip(tq, scores, strict=True)
        ]
    if mode != "reference":
        raise ValueError(f"evaluation.tf_mode: expected 'reference' or 'fast', got {mode!r}")
    steps = [build_tf_queries(tok, p, q.target) for p, q in zip(prompts, queries, strict=True)]
    predicted: list[list[int | None]] = [[None] * len(s) for s in steps]
    if generated is not None:
        for q, query_steps in enumerate(steps):
            prompt_ids = tuple(query_steps[0].input_ids)  # step 1 is the prompt alone
            for i, step in enumerate(query_steps):
                k = len(step.input_ids) - len(prompt_ids)
                new = tuple(generated[q][:k])
                if 0 <= k < len(generated[q]) and step.input_ids == prompt_ids + new:
                    predicted[q][i] = generated[q][k]
    todo = [(q, i) for q, p in enumerate(predicted) for i, v in enumerate(p) if v is None]
    if todo:
        owners = np.asarray([q for q, _ in todo])
        argmax = runner.last_argmax(
            [steps[q][i].input_ids for q, i in todo], take_rows(neurons, owners)
        )
        for (q, i), token in zip(todo, argmax, strict=True):
            predicted[q][i] = token
    return [
        np.asarray([p == s.expected_id for p, s in zip(pred, query_steps, strict=True)])
        for pred, query_steps in zip(predicted, steps, strict=True)
    ]


def evaluate_meg(
    runner: ModelRunner,
    records: Sequence[EditRecord],
    template: PromptTemplate,
    editor: Editor,
    loc_labels: Sequence[str] | None,
    cfg: EvalConfig = EvalConfig(),
    loc_reference: Sequence[Sequence[int]] | Literal["own"] | None = None,
) -> tuple[list[dict], dict]:
    """MeG P5 over `records`: (per-record rows, summary with the six readings and Score).

    `loc_reference`: per record, the unedited model's generated ids for its locality prompt
    (stop token included; "own": this call's generation, for the unedited model itself). With
    it, `loc_tf_self` is the teacher-forced accuracy on those very tokens (no re-tokenisation),
    so the unedited model scores exactly 100; `loc_tf` stays the reference's re-tokenised form.
    Rows keep each locality generation's ids (`loc_generated`) to serve as that reference.
    """
    if cfg.limit:
        records = records[: cfg.limit]
        loc_labels = None if loc_labels is None else loc_labels[: cfg.limit]
    queries = _queries(records, loc_labels)
    neurons = editor([q.text for q in queries])
    if len(neurons.w_in) != len(queries):
        raise ValueError(f"editor returned {len(neurons.w_in)} neurons for {len(queries)} queries")
    prompts = [template.format_query(q.text) for q in queries]
    stop_texts = template.generation_stops if cfg.stop_at_cut else ()
    generated = runner.generate_ids(prompts, neurons, cfg.max_new_tokens, stop_texts)
    continuations = runner.tokenizer.batch_decode(generated, skip_special_tokens=True)
    reuse = generated if cfg.reuse_generation else None
    tf = _tf_flags(runner, prompts, queries, neurons, cfg.tf_mode, reuse)
    loc_idx = [i for i, q in enumerate(queries) if q.kind == "loc"]
    self_flags = None
    if loc_reference is not None and loc_idx:
        own = [generated[i] for i in loc_idx]
        refs = (
            own
            if isinstance(loc_reference, str)
            else [loc_reference[queries[i].record] for i in loc_idx]
        )
        self_flags = _self_tf_flags(
            runner,
            [prompts[i] for i in loc_idx],
            take_rows(neurons, np.asarray(loc_idx)),
            refs,
            own,
        )

    rows = [{"id": r.id, "prompt": r.prompt, "target": r.target_new} for r in records]
    by_kind: dict[str, list[int]] = {k: [] for k in KINDS}
    for i, q in enumerate(queries):
        by_kind[q.kind].append(i)
    summary: dict = {"n_records": len(records)}
    for kind, idx in by_kind.items():
        if not idx:
            continue
        conts = [continuations[i] for i in idx]
        targets = [queries[i].target for i in idx]
        if kind == "loc":
            ag = locality_ag_correct(conts, targets, template.locality_cuts)
        else:
            ag = answer_ag_correct(conts, targets, template.answer_cuts, cfg.match_rule)
        flags = [tf[i] for i in idx]
        summary[f"{kind}_ag"] = percent(ag)
        summary[f"{kind}_tf"] = tf_accuracy(flags)
        summary[f"n_{kind}"] = len(idx)
        for i, ok, f, c in zip(idx, ag, flags, conts, strict=True):
            row = rows[queries[i].record]
            row[f"{kind}_query"] = queries[i].text
            row[f"{kind}_prediction"] = c
            row[f"{kind}_ag"] = bool(ok)
            row[f"{kind}_tf"] = float(np.mean(f))
    for n, i in enumerate(loc_idx):
        row = rows[queries[i].record]
        row["loc_generated"] = list(generated[i])
        if self_flags is not None:
            row["loc_tf_self"] = float(np.mean(self_flags[n]))
    if loc_labels is not None:
        summary["empty_label_share"] = sum(not a for a in loc_labels) / max(len(loc_labels), 1)
    if all(k in summary for k in SIX):
        summary["score"] = meg_score(*(summary[k] for k in SIX))
    if self_flags is not None:
        summary["loc_tf_self"] = tf_accuracy(self_flags)
        if "score" in summary:
            readings = [summary[k] if k != "loc_tf" else summary["loc_tf_self"] for k in SIX]
            summary["score_loc_tf_self"] = meg_score(*readings)
    return rows, summary


def _self_tf_flags(
    runner: ModelRunner,
    prompts: Sequence[str],
    neurons: Neuron,
    references: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
) -> list[np.ndarray]:
    """Per query, whether the model's argmax after prompt + reference[:k] is reference[k].

    Token ids throughout (no re-tokenisation). Where the query's own greedy generation still
    follows the reference up to k, its k-th token IS that argmax and is read off; only steps
    after it left the reference cost a forward pass.
    """
    predicted: list[list[int | None]] = []
    for ref, gen in zip(references, generated, strict=True):
        ref, gen = list(ref), list(gen)
        predicted.append(
            [gen[k] if k < len(gen) and gen[:k] == ref[:k] else None for k in range(len(ref))]
        )
    todo = [(q, k) for q, row in enumerate(predicted) for k, v in enumerate(row) if v is None]
    if todo:
        prompt_ids = [runner.tokenizer(p)["input_ids"] for p in prompts]
        argmax = runner.last_argmax(
            [prompt_ids[q] + list(references[q][:k]) for q, k in todo],
            take_rows(neurons, np.asarray([q for q, _ in todo])),
        )
        for (q, k), token in zip(todo, argmax, strict=True):
            predicted[q][k] = token
    return [
        np.asarray([p == r for p, r in zip(row, ref, strict=True)])
        for row, ref in zip(predicted, references, strict=True)
    ]


def evaluate_classic(
    runner: ModelRunner, records: Sequence[EditRecord], editor: Editor, dataset: str
) -> dict:
    """MEMIT's P1 (zsRE token accuracy) or P2 (CounterFact ES/PS/NS) on raw prompts.

    Every prompt of a record is scored with the neuron the editor gives that prompt.
    """
    tok = runner.tokenizer
    if dataset == "zsre":
        per_record = [classic.memit_zsre_queries(tok, r) for r in records]
    elif dataset == "counterfact":
        per_record = [classic.counterfact_queries(tok, r) for r in records]
    else:
        raise ValueError(f"classic: dataset must be 'zsre' or 'counterfact', not {dataset!r}")
    # Every (prompt, query) pair flattened to sequences, each tagged with its prompt's neuron.
    texts = list(
        dict.fromkeys(text for q in per_record for group in q.values() for text, _ in group)
    )
    index = {t: i for i, t in enumerate(texts)}
    neurons = editor(texts)
    flat, labels, owners = [], [], []
    for queries in per_record:
        for group in queries.values():
            for text, item in group:
                for q in item:
                    flat.append(q.input_ids)
                    labels.append(_labels(q))
                    owners.append(index[text])
    scores = iter(runner.scores(flat, take_rows(neurons, np.asarray(owners)), labels))
    cases = []
    for queries in per_record:
        if dataset == "zsre":
            cases.append(
                {
                    key: [
                        bool(next(scores)[0][-1] == step.expected_id)
                        for _, steps in group
                        for step in steps
                    ]
                    for key, group in queries.items()
                }
            )
        else:
            logprobs = {
                key: [
                    tuple(_target_logprobs(q, next(scores)[1]) for q in pair) for _, pair in group
                ]
                for key, group in queries.items()
            }
            cases.append(classic.counterfact_case(logprobs))
    if dataset == "zsre":
        return classic.memit_zsre_summary(cases)
    return classic.counterfact_summary(cases)


def _labels(query) -> tuple[int, ...]:
    """The token scored at each position: the next input token, and the last target token at
    the end of a target query (a TF step query scores nothing: its labels are unused)."""
    if isinstance(query, TargetQuery):
        return (*query.input_ids[1:], query.target_ids[-1])
    return query.input_ids


def _target_logprobs(query: TargetQuery, label_logp: np.ndarray) -> np.ndarray:
    """Log-probs [m] of a target query's target tokens from its per-position label log-probs."""
    first = query.target_start - 1
    return label_logp[first : first + len(query.target_ids)]
