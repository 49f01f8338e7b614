"""A tiny trained-run setup shared by the pipeline tests and bench/faults.py.

A tiny random Llama with the real GPT-2 tokenizer stands in for the LLM, and a given bank of
random neurons (marked fitted) stands in for collection: a random model cannot be made to state a
fact by one neuron. The config keeps every stage but shrinks each to seconds.
"""

import json
from pathlib import Path

import numpy as np
from hf_tiny import tiny_llama
from transformers import AutoTokenizer

from meg_jax.collect.bank import WeightBank, save_bank
from meg_jax.data.readers import read_edits

GPT2_VOCAB = 50257


def make_tiny_host(folder: Path, shared_data: Path, build=tiny_llama) -> Path:
    """A tiny HF directory (`build`: a tests/hf_tiny builder, Llama by default) with the GPT-2
    vocabulary and tokenizer."""
    build(folder, vocab=GPT2_VOCAB)
    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2", local_files_only=True)
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(eos_token_id=50256, bos_token_id=50256, pad_token_id=50256)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_given_bank(path: Path, shared_data: Path, n: int) -> Path:
    """Random neurons for the first `n` CounterFact edits, in the bank layout, all fitted."""
    records = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=n)
    rng = np.random.default_rng(0)
    save_bank(
        WeightBank(
            np.asarray([r.id for r in records], np.int64),
            rng.normal(size=(n, 128)).astype(np.float32) * 0.1,
            np.ones(n, bool),
            np.zeros(n, np.float32),
            np.zeros(128, np.float32),
        ),
        path,
    )
    return path


def tiny_run_config(shared_data: Path, host: Path, bank: Path, workdir: Path, n_edits: int) -> dict:
    """Every stage of the pipeline, each shrunk to seconds (a `pipeline_config` dict)."""
    cf = shared_data / "counterfact"
    return {
        "workdir": str(workdir),
        "evaluate": True,
        "host": {"name": str(host), "neuron_layer": 1, "template": "gptj"},
        "data": {
            "edits": str(cf / "counterfact-edit.json"),
            "n_edits": n_edits,
            "pseudo": str(cf / "counterfact-train.json"),
            "n_pseudo_pairs": 64,
            "n_val_pairs": 16,
            "n_calibration": 16,
        },
        # The editor's encoder views pad every batch to `batch_size` rows (fixed shapes), and
        # the evaluation asks for 8 queries at a time: 8, not the default 128, rows of MiniLM
        # per call (test_pipeline.py 379 -> 283 s on its own).
        "encoder": {
            "batch_size": 8,
            "infonce": {"num_steps": 4, "eval_every": 2, "batch_size": 32},
        },
        "router": {
            "train": {"num_epochs": 20, "batch_size": 32, "save_every": 10},
            "extend_epochs": 5,
        },
        "collect": {"bank": str(bank)},
        "generator": {
            "preset": "fast",
            "dit_preset": "tiny",
            "overrides": {"train": {"num_steps": 20, "eval_every": 10, "checkpoint_every": 10}},
            "extend_steps": 10,
        },
        # A random host's answers may be empty; the guard is tested on its own.
        "evaluation": {"batch_size": 8, "tf_mode": "fast", "max_empty_labels": 1.0},
    }
