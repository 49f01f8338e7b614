"""Evaluation throughput on SmolLM2: the batched evaluator vs a batch-1 loop like the reference's.

    python bench/evaluation.py [--edits 256] [--loop-edits 32] [--runs 3]

Workload: the first `--edits` CounterFact edits of ../shared/data, all six MeG readings (Rel,
Gen, Loc x AG, reference TF). The editor is a bank lookup: Rel and Gen queries of an edit get
its fitted neuron from the shared SmolLM2 bank, Loc queries the zero neuron, so every neuron
path is exercised and Rel is high. The locality labels are the unedited model's answers.

Baseline: the same library code with one query per batch (the reference evaluates one query at
a time). Running it over all edits would take most of an hour on this CPU, so it runs on the
first `--loop-edits` edits; throughput is queries per second either way, and the per-example
results of the overlap must be identical. `ratio` = batched queries/s / batch-1 queries/s,
median of `--runs` runs each (after a warm-up run that compiles).
"""

import argparse

import numpy as np
from common import SHARED, median, timed, write_result

from meg_jax.collect.bank import load_bank
from meg_jax.data.preprocess import pre_edit_answers
from meg_jax.data.readers import read_edits
from meg_jax.data.templates import get_template
from meg_jax.evaluation.evaluator import EvalConfig, evaluate_meg, zero_editor
from meg_jax.evaluation.runner import ModelRunner
from meg_jax.hosts import load_host
from meg_jax.models.neuron import unflatten_neuron


def bank_editor(records, bank, d_model: int):
    """Edit prompts and first paraphrases -> their record's fitted neuron; others -> zero."""
    rows = {int(c): i for i, c in enumerate(bank.case_id)}
    weights = np.nan_to_num(bank.weights)
    by_text = {}
    for r in records:
        for text in (r.prompt, r.paraphrases[0]):
            by_text[text] = weights[rows[r.id]]

    def editor(queries):
        flat = np.stack([by_text.get(q, np.zeros(weights.shape[1], np.float32)) for q in queries])
        return unflatten_neuron(flat, d_model, with_bias=False)

    return editor


def run(runner, records, template, editor, labels, batch_size):
    cfg = EvalConfig(batch_size=batch_size)
    runner.batch_size = batch_size
    return evaluate_meg(runner, records, template, editor, labels, cfg)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=256)
    parser.add_argument("--loop-edits", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    config, params, tokenizer = load_host("smollm2", neuron_layer=14, neuron_activation="identity")
    template = get_template("smollm2")
    bank = load_bank(SHARED / "banks" / "smollm2_cf256" / "bank.npz")
    records = read_edits(SHARED / "counterfact" / "counterfact-edit.json", limit=args.edits)
    runner = ModelRunner(config, params, tokenizer, batch_size=args.batch_size, show_progress=False)
    zero = zero_editor(config.d_model)
    labels = pre_edit_answers(
        [r.locality_prompts[0] for r in records],
        template,
        lambda prompts: runner.generate(prompts, zero(prompts), 20),
    )
    editor = bank_editor(records, bank, config.d_model)
    n_queries = 3 * len(records)
    loop_records = records[: args.loop_edits]

    timings = {"batched": [], "batch1": []}
    (rows, summary), warm_batched = timed(
        run, runner, records, template, editor, labels, args.batch_size
    )
    (loop_rows, _), warm_loop = timed(
        run, runner, loop_records, template, editor, labels[: len(loop_records)], 1
    )
    for _ in range(args.runs):
        timings["batched"].append(
            timed(run, runner, records, template, editor, labels, args.batch_size)[1]
        )
        timings["batch1"].append(
            timed(run, runner, loop_records, template, editor, labels[: len(loop_records)], 1)[1]
        )
    identical = rows[: len(loop_rows)] == loop_rows
    batched_qps = n_queries / median(timings["batched"])
    loop_qps = 3 * len(loop_records) / median(timings["batch1"])
    result = {
        "benchmark": "evaluation",
        "ratio": batched_qps / loop_qps,
        "batched_queries_per_s": batched_qps,
        "batch1_queries_per_s": loop_qps,
        "batched_seconds": timings["batched"],
        "batch1_seconds": timings["batch1"],
        "warmup_seconds": {"batched": warm_batched, "batch1": warm_loop},
        "edits": len(records),
        "loop_edits": len(loop_records),
        "queries_per_edit": 3,
        "batch_size": args.batch_size,
        "readings": "Rel/Gen/Loc x AG + reference TF (re-tokenised prefixes)",
        "identical_per_example_results": bool(identical),
        "summary": summary,
    }
    print(
        f"batched {batched_qps:.2f} q/s, batch-1 {loop_qps:.2f} q/s, ratio {result['ratio']:.1f}x"
    )
    print(f"identical per-example results on the first {len(loop_records)} edits: {identical}")
    print(write_result("evaluation", result))


if __name__ == "__main__":
    main()
