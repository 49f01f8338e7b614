"""Evaluation throughput on SmolLM2: the batched evaluator vs batch-1 loops like the reference's.

    python bench/evaluation.py [--edits 256] [--loop-edits 32] [--runs 3]

Workload: the first `--edits` CounterFact edits of ../shared/data, all six MeG readings (Rel,
Gen, Loc x AG and the reference's re-tokenised TF). The editor is a bank lookup: Rel and Gen
queries of an edit get its fitted neuron from the shared SmolLM2 bank, Loc queries the zero
neuron, so every neuron path is exercised and Rel is high. The locality labels are the unedited
model's answers.

Ours: `evaluate_meg` as users run it, with the runner's defaults: batches of `--batch-size`
(prompt lengths bucketed by 8), the template's shared opening run once per batch below the neuron
layer (through all layers for the zero-neuron Loc batches), decoding batches compacted as rows
stop, generations ended at the template's newline cut, TF steps read off the greedy generation
where it took the same path.

Baselines, one query at a time over the first `--loop-edits` edits, as the MeG reference
evaluates (its `evaluate_*` loops): a greedy `generate` of up to 20 new tokens (stopping at EOS),
then one forward pass per TF step over the re-tokenised prefix, argmax at the last position.
  - "torch" (the headline): that loop in PyTorch transformers on the same float32 weights, with
    the neuron added to layer 14's MLP by a forward hook, as the reference patches its model;
  - "jax_batch1": the same loop through our own code (`evaluate_meg` at batch 1 with both
    shortcuts off), which isolates what batching and the shortcuts buy on this machine.
Running the loops over all edits would take most of an hour here, so they run on the first
`--loop-edits`; throughput is queries per second either way. Every run's per-example readings
(AG flags and per-query TF) on the loop edits must be identical across the three.
`ratio` = ours / torch queries/s; medians of `--runs` alternating runs after a warm-up run each.
"""

import argparse

import common  # noqa: F401  (first: it configures torch's thread pool)
import numpy as np
import torch
from common import SHARED, median, timed, write_result
from torch_reference import neuron_attached, torch_llama

from meg_jax.checkpoints.hosts import load_host
from meg_jax.collect.bank import load_bank
from meg_jax.data.preprocess import pre_edit_answers
from meg_jax.data.readers import read_edits
from meg_jax.data.templates import get_template
from meg_jax.evaluation.evaluator import (
    KINDS,
    EvalConfig,
    evaluate_meg,
    zero_editor,
)
from meg_jax.evaluation.metrics import answer_ag_correct, locality_ag_correct
from meg_jax.evaluation.teacher_forcing import build_tf_queries
from meg_jax.inference.runner import ModelRunner
from meg_jax.models.neuron import unflatten_neuron

LAYER = 14


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


def readings(rows) -> list[dict]:
    """The per-example results every path must agree on: AG flags and TF per query."""
    return [{f"{k}_{m}": row[f"{k}_{m}"] for k in KINDS for m in ("ag", "tf")} for row in rows]


def torch_loop(model, tokenizer, config, template, records, labels, editor) -> list[dict]:
    """The reference's way: per query one `generate` and one forward per TF step, batch 1."""
    out = []
    for record, label in zip(records, labels, strict=True):
        queries = {
            "rel": (record.prompt, record.target_new),
            "gen": (record.paraphrases[0], record.target_new),
            "loc": (record.locality_prompts[0], label),
        }
        row = {}
        for kind, (text, target) in queries.items():
            neuron = editor([text])
            prompt = template.format_query(text)
            with neuron_attached(model, LAYER, neuron.w_in[0], 0.0, neuron.w_out[0]):
                with torch.inference_mode():
                    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
                    new = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=False,
                        max_new_tokens=20,
                        eos_token_id=list(config.eos_token_ids),
                        pad_token_id=config.pad_token_id,
                    )[0, ids.shape[1] :]
                    flags = []
                    for step in build_tf_queries(tokenizer, prompt, target):
                        logits = model(input_ids=torch.tensor([step.input_ids])).logits
                        flags.append(int(logits[0, -1].argmax()) == step.expected_id)
            text_out = tokenizer.decode(new, skip_special_tokens=True)
            if kind == "loc":
                ag = locality_ag_correct([text_out], [target], template.locality_cuts)[0]
            else:
                ag = answer_ag_correct([text_out], [target], template.answer_cuts)[0]
            row[f"{kind}_ag"] = bool(ag)
            row[f"{kind}_tf"] = float(np.mean(flags))
        out.append(row)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=256)
    parser.add_argument("--loop-edits", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)

    config, params, tokenizer = load_host(
        "smollm2", neuron_layer=LAYER, neuron_activation="identity"
    )
    model = torch_llama(config, params)
    template = get_template("smollm2")
    bank = load_bank(SHARED / "banks" / "smollm2_cf256" / "bank.npz")
    records = read_edits(SHARED / "counterfact" / "counterfact-edit.json", limit=args.edits)
    runner = ModelRunner(config, params, tokenizer, batch_size=args.batch_size, show_progress=False)
    runner1 = ModelRunner(config, params, tokenizer, batch_size=1, show_progress=False)
    zero = zero_editor(config.d_model)
    labels = pre_edit_answers(
        [r.locality_prompts[0] for r in records],
        template,
        lambda prompts: runner.generate(prompts, zero(prompts), 20, template.generation_stops),
    )
    editor = bank_editor(records, bank, config.d_model)
    loop_records, loop_labels = records[: args.loop_edits], labels[: args.loop_edits]

    def ours():
        cfg = EvalConfig(batch_size=args.batch_size)
        return evaluate_meg(runner, records, template, editor, labels, cfg)

    def jax_batch1():
        cfg = EvalConfig(batch_size=1, stop_at_cut=False, reuse_generation=False)
        return evaluate_meg(runner1, loop_records, template, editor, loop_labels, cfg)

    def torch_batch1():
        return torch_loop(model, tokenizer, config, template, loop_records, loop_labels, editor)

    paths = {"ours": ours, "jax_batch1": jax_batch1, "torch": torch_batch1}
    seconds = {name: [] for name in paths}
    warmup, identical, summary = {}, True, None
    for run in range(args.runs + 1):  # run 0 is the warm-up (JAX compiles there)
        results = {}
        for name, fn in paths.items():
            results[name], s = timed(fn)
            if run:
                seconds[name].append(s)
            else:
                warmup[name] = s
            print(f"run {run} {name}: {s:.1f} s", flush=True)
        (rows, summary), (loop_rows, _) = results["ours"], results["jax_batch1"]
        reference = results["torch"]
        same = readings(rows[: len(loop_records)]) == readings(loop_rows) == reference
        identical &= same
    queries = {"ours": 3 * len(records), "jax_batch1": 3 * len(loop_records)}
    queries["torch"] = queries["jax_batch1"]
    qps = {name: queries[name] / median(seconds[name]) for name in paths}
    result = {
        "benchmark": "evaluation",
        "ratio": qps["ours"] / qps["torch"],
        "ratio_vs_jax_batch1": qps["ours"] / qps["jax_batch1"],
        "queries_per_s": qps,
        "runs_s": seconds,
        "warmup_s": warmup,
        "queries": queries,
        "edits": len(records),
        "loop_edits": len(loop_records),
        "batch_size": args.batch_size,
        "readings": "Rel/Gen/Loc x AG + reference TF (re-tokenised prefixes)",
        "identical_per_example_results": bool(identical),
        "summary": summary,
    }
    print(
        f"queries/s: ours {qps['ours']:.2f}, torch batch-1 {qps['torch']:.2f}, "
        f"jax batch-1 {qps['jax_batch1']:.2f}; ratio {result['ratio']:.1f}x "
        f"(vs jax batch-1 {result['ratio_vs_jax_batch1']:.1f}x); identical: {identical}"
    )
    print(write_result("evaluation", result))


if __name__ == "__main__":
    main()
