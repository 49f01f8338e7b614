"""End to end: every MeG stage on a tiny host, real records, the real MiniLM encoder.

A tiny random Llama with the GPT-2 vocabulary stands in for the LLM (its tokenizer is the real
GPT-2 one, saved beside it), so the run is minutes, not hours; the point is that the stages fit
together, resume, and produce the promised files and numbers, not that a random model edits well.
A random model cannot be made to state a fact by one neuron, so the weight bank is given (random
neurons marked fitted); the collection stage itself is checked on the real SmolLM2 against the
shared reference bank in test_collect.py.
"""

import json

import numpy as np
import pytest
from hf_tiny import tiny_llama
from transformers import AutoTokenizer

from meg_jax.collect.bank import WeightBank, save_bank
from meg_jax.data.readers import read_edits
from meg_jax.data.templates import get_template
from meg_jax.pipeline import _edits_to_fit, pipeline_config, run

GPT2_VOCAB = 50257


@pytest.fixture(scope="module")
def tiny_host(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("host")
    tiny_llama(path, vocab=GPT2_VOCAB)
    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2", local_files_only=True)
    tok.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(eos_token_id=50256, bos_token_id=50256, pad_token_id=50256)
    (path / "config.json").write_text(json.dumps(config))
    return path


N_EDITS = 6


def _given_bank(shared_data, path):
    """Random neurons for the first N_EDITS edits, in the bank layout, all marked fitted."""
    records = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=N_EDITS)
    rng = np.random.default_rng(0)
    save_bank(
        WeightBank(
            np.asarray([r.id for r in records], np.int64),
            rng.normal(size=(N_EDITS, 128)).astype(np.float32) * 0.1,
            np.ones(N_EDITS, bool),
            np.zeros(N_EDITS, np.float32),
            np.zeros(128, np.float32),
        ),
        path,
    )
    return path


def _config(shared_data, host, workdir):
    cf = shared_data / "counterfact"
    return {
        "workdir": str(workdir),
        "host": {"name": str(host), "neuron_layer": 1, "template": "gptj"},
        "data": {
            "edits": str(cf / "counterfact-edit.json"),
            "n_edits": N_EDITS,
            "pseudo": str(cf / "counterfact-train.json"),
            "n_pseudo_pairs": 64,
            "n_val_pairs": 16,
            "n_calibration": 16,
        },
        "encoder": {"infonce": {"num_steps": 4, "eval_every": 2, "batch_size": 32}},
        "router": {"train": {"num_epochs": 20, "batch_size": 32, "save_every": 10}},
        "collect": {"bank": str(_given_bank(shared_data, workdir / "given_bank.npz"))},
        "generator": {
            "preset": "fast",
            "dit_preset": "tiny",
            "overrides": {"train": {"num_steps": 20, "eval_every": 10, "checkpoint_every": 10}},
        },
        "evaluation": {"batch_size": 8, "tf_mode": "fast"},
    }


def test_pipeline_end_to_end_and_resume(shared_data, tiny_host, tmp_path):
    cfg = pipeline_config(_config(shared_data, tiny_host, tmp_path))
    summaries = run(cfg)
    unedited, meg = summaries["unedited"], summaries["meg"]
    assert unedited["loc_ag"] == 100.0  # the unedited model agrees with itself
    for key in ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf"):
        assert 0.0 <= meg[key] <= 100.0
    assert meg["bank_fitted"] == N_EDITS
    for name in (
        "summary.json",
        "router/calibration.json",
        "router/roc.png",
        "eval/meg/summary.json",
        "eval/meg/metrics.png",
        "eval/unedited/examples.jsonl",
    ):
        assert (tmp_path / name).is_file(), name
    # A second run finds every stage's results and reproduces the summary.
    again = run(cfg)
    assert again["meg"] == meg


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="config.collect.fit: unknown config key"):
        pipeline_config({"collect": {"fit": {"lerning_rate": 0.1}}})


def test_collection_inputs_are_keyed_by_dataset_ids(shared_data):
    """Records are re-indexed by preprocessing; collection must key its bank by dataset ids, or
    a bank could not be matched to its edits (`_bank_for`) in a later run."""
    records = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=3)
    template = get_template("gptj")
    case_ids = [1000 + r.id for r in records]
    edits = _edits_to_fit(records, case_ids, template)
    assert [e.case_id for e in edits] == case_ids
    assert edits[0].query == template.format_query(records[0].prompt)
    assert edits[0].answer == template.format_answer(records[0].target_new)
    assert edits[0].target == records[0].target_new
    with pytest.raises(ValueError):
        _edits_to_fit(records, case_ids[:2], template)
