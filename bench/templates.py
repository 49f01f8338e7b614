"""Prompt forms for SmolLM2: which one gives short, non-empty pre-edit answers (issue 11, item 1).

    python bench/templates.py [--records 256] [--candidates smollm2,qa_2shot,...] [--merge]

Under the "smollm2" template (the Llama-3 short-answer form) SmolLM2-135M-Instruct answers most
CounterFact neighbourhood prompts with an immediate end of text or a newline, so MeG's locality
label (the unedited model's processed greedy answer) is "" and Loc AG compares empty with empty.
This script asks the unedited model (zero neuron, greedy, 20 new tokens, ended at the templates'
shared newline cut or EOS, as the evaluator generates) under each candidate form, on the first
`--records` CounterFact edit-split records and zsRE records of ../shared/data:

  locality prompts (`locality_prompts[0]`; zsRE's "nq question: ..." normalised as preprocessing
  does) -> processed as pre-edit labels (`postprocess_locality_answer`, the template's
  `locality_cuts`): the empty-answer share (target <= 5%), mean length in words, share longer
  than 10 words;
  edit prompts (`record.prompt`) -> processed as Rel AG predictions (`postprocess_answer`,
  `answer_cuts`): empty share, length, and the share that already states the target: by MeG's
  exact AG rule (prediction == " " + target, so a missing leading space fails it), by the same
  rule after stripping (what a space-insensitive reading would give) and by preprocessing's
  known-fact rule (the zsRE filter).
For both: the share of raw continuations that start with a space (the fitted answer is
`" {target}." + eos`, and AG compares with `" " + target`), and how generations ended (EOS,
newline, or the 20-token limit): a form whose short answers end in EOS is the one the fitted
answer imitates; how varied the answers are (distinct share, the most common answers), since a
near-constant label ("None") would hardly test locality. A few example answers per cell.

The result is rewritten after every candidate; `--merge` keeps the candidates of an existing
result (same `--records`) that this run does not measure. Timing is not the point here; seconds
per candidate are recorded only to size the run (3.5-5 minutes each at 256 records on the shared
2-core machine under a load average of 10-14).
"""

import argparse
import collections
import json
import time

import common  # noqa: F401  (first: sets up sys.path and the thread settings)
import numpy as np
from common import RESULTS, SHARED, write_result

from meg_jax.checkpoints.hosts import load_host
from meg_jax.data.answers import (
    answer_matches,
    postprocess_answer,
    postprocess_locality_answer,
)
from meg_jax.data.preprocess import normalize_nq_question
from meg_jax.data.readers import read_edits
from meg_jax.data.templates import PromptTemplate, get_template
from meg_jax.inference.editor import zero_editor
from meg_jax.inference.runner import ModelRunner

MAX_NEW_TOKENS = 20
LONG_WORDS = 10
EXAMPLES = 6
TOP_ANSWERS = 5
CUTS = ("\\", "\n")  # Rel/Gen: backslash then newline, as every GPT-J-style template
LOC_CUTS = ("\n",)
EOS = "<|im_end|>"


def _chat(user: str, system: str | None = None) -> str:
    """A ChatML prompt (SmolLM2's own chat format) ending at the assistant tag."""
    opening = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    return f"{opening}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def _candidate(name: str, query: str) -> PromptTemplate:
    return PromptTemplate(name, query, EOS, CUTS, LOC_CUTS)


# The few-shot forms' two worked examples: a sentence to complete (CounterFact's form) and a
# question (zsRE's).
_SHOTS_PLAIN = "The capital of France is Paris.\nWho wrote Hamlet? William Shakespeare.\n"
_SHOTS_QA = (
    "Q: The capital of France is\nA: Paris.\nQ: Who wrote Hamlet?\nA: William Shakespeare.\n"
)

# In the order they run: the current form, the two few-shot forms (the promising ones, so an
# interrupted run has them), then the chat forms and the bare sentence.
CANDIDATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        get_template("smollm2"),
        _candidate("plain_2shot", _SHOTS_PLAIN + "{query}"),
        _candidate("qa_2shot", _SHOTS_QA + "Q: {query}\nA:"),
        get_template("smollm2_chat"),
        _candidate("chat_5words", _chat("Answer in less than 5 words: {query}")),
        _candidate("chat_complete", _chat("Complete the sentence in a few words: {query}")),
        _candidate(
            "chat_system",
            _chat("{query}", system="Complete the sentence or answer the question in a few words."),
        ),
        _candidate("plain", "{query}"),
    )
}


def load_prompts(n: int) -> dict[str, dict[str, list[str]]]:
    """Per dataset: the locality prompts, edit prompts and new targets of the first n records."""
    cf = read_edits(SHARED / "counterfact" / "counterfact-edit.json", limit=n)
    zsre = read_edits(SHARED / "zsre" / "zsre_mend_train-1k.json", limit=n)
    return {
        "counterfact": {
            "loc": [r.locality_prompts[0] for r in cf],
            "edit": [r.prompt for r in cf],
            "target": [r.target_new for r in cf],
        },
        "zsre": {
            "loc": [normalize_nq_question(r.locality_prompts[0]) for r in zsre],
            "edit": [r.prompt for r in zsre],
            "target": [r.target_new for r in zsre],
        },
    }


def generate(runner: ModelRunner, template: PromptTemplate, questions: list[str]):
    """(decoded continuations, how each ended: "eos" | "newline" | "length")."""
    prompts = [template.format_query(q) for q in questions]
    neurons = zero_editor(runner.config.d_model)(prompts)
    ids = runner.generate_ids(prompts, neurons, MAX_NEW_TOKENS, template.generation_stops)
    eos = set(runner.config.eos_token_ids)
    texts, ends = [], []
    for row in ids:
        texts.append(runner.tokenizer.decode(row, skip_special_tokens=True))
        last = row[-1] if row else None
        if last in eos:
            ends.append("eos")
        elif last is not None and "\n" in runner.tokenizer.decode([last]):
            ends.append("newline")
        else:
            ends.append("length")
    return texts, ends


def length_stats(answers: list[str]) -> dict:
    words = np.array([len(a.split()) for a in answers])
    nonempty = words[words > 0]
    return {
        "empty_share": float(np.mean(words == 0)),
        "mean_words": float(words.mean()),
        "mean_words_nonempty": float(nonempty.mean()) if len(nonempty) else 0.0,
        f"longer_than_{LONG_WORDS}_words_share": float(np.mean(words > LONG_WORDS)),
    }


def answer_spread(answers: list[str]) -> dict:
    """How varied the answers are: a form that says "None" to everything gives non-empty but
    near-constant labels, which a Loc reading would hardly test."""
    counts = collections.Counter(a.strip().lower() for a in answers)
    n = len(answers)
    return {
        "distinct_share": len(counts) / n,
        "top_answers": [[a, c / n] for a, c in counts.most_common(TOP_ANSWERS)],
    }


def ending_stats(raw: list[str], ends: list[str]) -> dict:
    return {
        "starts_with_space_share": float(np.mean([t.startswith(" ") for t in raw])),
        "ended_by": {
            k: float(np.mean([e == k for e in ends])) for k in ("eos", "newline", "length")
        },
    }


def measure(runner, template, data) -> dict:
    """The locality and edit readings of one template on one dataset."""
    loc_raw, loc_ends = generate(runner, template, data["loc"])
    loc = [postprocess_locality_answer(t, template.locality_cuts) for t in loc_raw]
    edit_raw, edit_ends = generate(runner, template, data["edit"])
    edit = [postprocess_answer(t, template.answer_cuts) for t in edit_raw]
    targets = data["target"]
    return {
        "locality": {
            **length_stats(loc),
            **answer_spread(loc),
            **ending_stats(loc_raw, loc_ends),
            "examples": [
                {"prompt": q, "raw": r, "label": a}
                for q, r, a in list(zip(data["loc"], loc_raw, loc, strict=True))[:EXAMPLES]
            ],
        },
        "edit": {
            **length_stats(edit),
            **answer_spread(edit),
            **ending_stats(edit_raw, edit_ends),
            # MeG's AG rule: the prediction keeps its leading space, compared with " " + target
            "already_target_exact_share": float(
                np.mean([answer_matches(a, t) for a, t in zip(edit, targets, strict=True)])
            ),
            # the same without the leading-space requirement
            "already_target_stripped_share": float(
                np.mean(
                    [answer_matches(" " + a.strip(), t) for a, t in zip(edit, targets, strict=True)]
                )
            ),
            # preprocessing's known-fact rule (zsRE drops these records)
            "already_target_known_fact_share": float(
                np.mean(
                    [
                        postprocess_locality_answer(r, template.locality_cuts).lower() == t.lower()
                        for r, t in zip(edit_raw, targets, strict=True)
                    ]
                )
            ),
            "examples": [
                {"prompt": q, "target": t, "raw": r, "answer": a}
                for q, t, r, a in list(zip(data["edit"], targets, edit_raw, edit, strict=True))[
                    :EXAMPLES
                ]
            ],
        },
    }


def table_rows(results: dict) -> list[dict]:
    """One flat row per (template, dataset): the figures the recommendation rests on."""
    rows = []
    for name, per_dataset in results.items():
        for dataset, r in per_dataset.items():
            loc, edit = r["locality"], r["edit"]
            rows.append(
                {
                    "template": name,
                    "dataset": dataset,
                    "loc_empty": loc["empty_share"],
                    "loc_words": loc["mean_words"],
                    "loc_gt10": loc[f"longer_than_{LONG_WORDS}_words_share"],
                    "loc_space": loc["starts_with_space_share"],
                    # absent for cells measured before the spread was recorded
                    "loc_top": loc["top_answers"][0][1] if "top_answers" in loc else None,
                    "edit_empty": edit["empty_share"],
                    "edit_words": edit["mean_words"],
                    "edit_gt10": edit[f"longer_than_{LONG_WORDS}_words_share"],
                    "edit_space": edit["starts_with_space_share"],
                    "edit_eos": edit["ended_by"]["eos"],
                    "edit_is_target": edit["already_target_exact_share"],
                    "edit_is_target_stripped": edit["already_target_stripped_share"],
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print(" | ".join(f"{k:>13}" for k in keys))
    for row in rows:
        cells = [f"{v:>13.3f}" if isinstance(v, float) else f"{v!s:>13}" for v in row.values()]
        print(" | ".join(cells))


def summary(records: int, results: dict, seconds: dict) -> dict:
    """The result file's content for the candidates measured so far, in `CANDIDATES` order."""
    results = {n: results[n] for n in CANDIDATES if n in results}
    return {
        "workload": (
            f"SmolLM2-135M-Instruct (GGUF), unedited (zero neuron), greedy, {MAX_NEW_TOKENS} new "
            f"tokens ended at EOS or a newline token; first {records} records of "
            "counterfact-edit.json and zsre_mend_train-1k.json; locality_prompts[0] (zsRE "
            "NQ-normalised) and the edit prompt"
        ),
        "records": records,
        "templates": {
            n: {
                "query": CANDIDATES[n].query,
                "eos_text": CANDIDATES[n].eos_text,
                "answer_cuts": CANDIDATES[n].answer_cuts,
                "locality_cuts": CANDIDATES[n].locality_cuts,
            }
            for n in results
        },
        "table": table_rows(results),
        "results": results,
        "seconds_per_candidate": seconds,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the candidates of the existing result (same --records) not measured now",
    )
    args = parser.parse_args()
    names = args.candidates.split(",")
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidates {unknown}; known: {sorted(CANDIDATES)}")

    config, params, tokenizer = load_host("smollm2")
    runner = ModelRunner(config, params, tokenizer, batch_size=args.batch_size, show_progress=False)
    data = load_prompts(args.records)
    results, seconds = {}, {}
    previous = RESULTS / "templates.json"
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("records") == args.records:
            keep = [n for n in old["results"] if n not in names and n in CANDIDATES]
            results = {n: old["results"][n] for n in keep}
            seconds = {n: old["seconds_per_candidate"][n] for n in keep}
    for name in names:
        start = time.perf_counter()
        results[name] = {ds: measure(runner, CANDIDATES[name], d) for ds, d in data.items()}
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
        # written after every candidate: an interrupted run keeps what it measured
        path = write_result("templates", summary(args.records, results, seconds))
    print_table(table_rows(results))
    print(path)


if __name__ == "__main__":
    main()
