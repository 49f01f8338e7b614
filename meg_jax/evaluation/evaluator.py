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

`EvalConfig.all_prompts` evaluates EVERY paraphrase and locality prompt a record has (MEMIT's
multi_counterfact: 2 and 10), each locality prompt against the unedited model's own answer to
it. Each reading is then the mean over prompts (every prompt counts once; `n_gen`, `n_loc` count
prompts), and the first-prompt readings of MeG's protocol stay beside it (`first_prompt`).
A row keeps its first prompt of each kind in the usual fields (`gen_query`, `gen_ag`, ...) and
the others in `gen_extra` / `loc_extra` (a dict per prompt); `kind_entries` reads both.

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
    # Every paraphrase and locality prompt, not only the first (see the module docstring):
    # `loc_labels` and `loc_reference` then hold one entry per locality prompt of each record.
    all_prompts: bool = False

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
    slot: int = 0  # which paraphrase / locality prompt of its record (0: the first)


# Per record: the first locality prompt's label, or (all_prompts) one label per locality prompt.
LocLabels = Sequence[str] | Sequence[Sequence[str]]


def _record_labels(record: EditRecord, label, all_prompts: bool) -> list[str]:
    """The labels of the locality prompts a record is evaluated on, checked against them."""
    if not all_prompts:  # the first prompt only; a per-prompt tuple gives its first label
        return [label if isinstance(label, str) else label[0]]
    if isinstance(label, str) or len(label) != len(record.locality_prompts):
        got = "one label (the first-prompt form)" if isinstance(label, str) else len(label)
        raise ValueError(
            f"{record.source.describe('locality_prompts')}: evaluation.all_prompts needs one "
            f"pre-edit label per locality prompt ({len(record.locality_prompts)}), got {got}"
        )
    return list(label)


def _queries(
    records: Sequence[EditRecord], loc_labels: LocLabels | None, all_prompts: bool = False
) -> list[_Query]:
    out = []
    for i, record in enumerate(records):
        out.append(_Query(i, "rel", record.prompt, record.target_new))
        paraphrases = record.paraphrases if all_prompts else record.paraphrases[:1]
        out += [_Query(i, "gen", p, record.target_new, j) for j, p in enumerate(paraphrases)]
        if record.locality_prompts and loc_labels is not None:
            prompts = record.locality_prompts if all_prompts else record.locality_prompts[:1]
            labels = _record_labels(record, loc_labels[i], all_prompts)
            out += [
                _Query(i, "loc", p, a, j)
                for j, (p, a) in enumerate(zip(prompts, labels, strict=True))
            ]
    return out


def kind_entries(rows: Sequence[dict], kind: str) -> list[dict]:
    """Every evaluated query of `kind` in `rows`, in order: per record the first prompt (the
    row's own `{kind}_*` fields), then its `{kind}_extra` ones (all_prompts). Each entry is a
    dict with `query`, `prediction`, `ag`, `tf` (and `generated`, `tf_self` for loc when known)."""
    out = []
    for row in rows:
        if f"{kind}_query" not in row:
            continue
        first = {
            field: row[f"{kind}_{field}"]
            for field in ("query", "prediction", "ag", "tf", "generated", "tf_self")
            if f"{kind}_{field}" in row
        }
        out += [first, *row.get(f"{kind}_extra", [])]
    return out


def loc_references(rows: Sequence[dict], all_prompts: bool) -> list:
    """The unedited model's locality generations in `rows`, as `evaluate_meg`'s `loc_reference`
    expects them: per record the first prompt's ids, or (all_prompts) a list per prompt."""
    if not all_prompts:
        return [row.get("loc_generated", []) for row in rows]
    return [[e.get("generated", []) for e in kind_entries([row], "loc")] for row in rows]


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
    loc_labels: LocLabels | None,
    cfg: EvalConfig = EvalConfig(),
    loc_reference: Sequence | Literal["own"] | None = None,
) -> tuple[list[dict], dict]:
    """MeG P5 over `records`: (per-record rows, summary with the six readings and Score).

    `loc_labels`: per record the unedited model's answer to its first locality prompt, or with
    `cfg.all_prompts` a sequence of answers, one per locality prompt. None: no Loc readings.
    `loc_reference`: per record, the unedited model's generated ids for its locality prompt
    (with `cfg.all_prompts` a list of them, one per prompt: `loc_references(rows, True)`),
    stop token included; "own": this call's generation, for the unedited model itself. With
    it, `loc_tf_self` is the teacher-forced accuracy on those very tokens (no re-tokenisation),
    so the unedited model scores exactly 100; `loc_tf` stays the reference's re-tokenised form.
    Rows keep each locality generation's ids (`loc_generated`) to serve as that reference.
    """
    if cfg.limit:
        records = records[: cfg.limit]
        loc_labels = None if loc_labels is None else loc_labels[: cfg.limit]
    queries = _queries(records, loc_labels, cfg.all_prompts)
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
        if isinstance(loc_reference, str):
            refs = own
        elif cfg.all_prompts:
            refs = [loc_reference[queries[i].record][queries[i].slot] for i in loc_idx]
        else:
            refs = [loc_reference[queries[i].record] for i in loc_idx]
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
    ag_flags: dict[int, bool] = {}  # query -> its AG verdict
    for kind, idx in by_kind.items():
        if not idx:
            continue
        conts = [continuations[i] for i in idx]
        targets = [queries[i].target for i in idx]
        if kind == "loc":
            ag = locality_ag_correct(conts, targets, template.locality_cuts)
        else:
            ag = answer_ag_correct(conts, targets, template.answer_cuts, cfg.match_rule)
        ag_flags.update(zip(idx, (bool(ok) for ok in ag), strict=True))
    self_of = {} if self_flags is None else dict(zip(loc_idx, self_flags, strict=True))
    for i, q in enumerate(queries):
        entry = {
            "query": q.text,
            "prediction": continuations[i],
            "ag": ag_flags[i],
            "tf": float(np.mean(tf[i])),
        }
        if q.kind == "loc":
            entry["generated"] = list(generated[i])
            if i in self_of:
                entry["tf_self"] = float(np.mean(self_of[i]))
        row = rows[q.record]
        if q.slot == 0:
            row.update({f"{q.kind}_{field}": value for field, value in entry.items()})
        else:
            row.setdefault(f"{q.kind}_extra", []).append(entry)
    summary: dict = {"n_records": len(records)}
    summary.update(_readings(by_kind, ag_flags, tf, self_of))
    if loc_labels is not None:
        labels = [queries[i].target for i in by_kind["loc"]]
        summary["empty_label_share"] = sum(not a for a in labels) / max(len(labels), 1)
    if cfg.all_prompts:  # MeG's first-prompt protocol beside the all-prompt readings
        summary["all_prompts"] = True
        first = {k: [i for i in idx if queries[i].slot == 0] for k, idx in by_kind.items()}
        summary["first_prompt"] = _readings(first, ag_flags, tf, self_of)
    return rows, summary


def _readings(
    by_kind: dict[str, list[int]],
    ag: dict[int, bool],
    tf: Sequence[np.ndarray],
    self_of: dict[int, np.ndarray],
) -> dict:
    """The six readings (each a mean over the given queries), counts, Score and Loc TF self."""
    out: dict = {}
    for kind, idx in by_kind.items():
        if idx:
            out[f"{kind}_ag"] = percent([ag[i] for i in idx])
            out[f"{kind}_tf"] = tf_accuracy([tf[i] for i in idx])
            out[f"n_{kind}"] = len(idx)
    if all(k in out for k in SIX):
        out["score"] = meg_score(*(out[k] for k in SIX))
    own = [self_of[i] for i in by_kind.get("loc", []) if i in self_of]
    if own:
        out["loc_tf_self"] = tf_accuracy(own)
        if "score" in out:
            readings = [out[k] if k != "loc_tf" else out["loc_tf_self"] for k in SIX]
            out["score_loc_tf_self"] = meg_score(*readings)
    return out


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
