"""The batched evaluator on a tiny random Llama with the real GPT-2 tokenizer and real records.

The independent reference is a batch-1 loop over the same records that calls the model once per
query with plain numpy post-processing, i.e. the reference's way of evaluating.
"""

import dataclasses
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_with_fake_devices
from hf_tiny import tiny_llama
from transformers import AutoTokenizer

from meg_jax.checkpoints.hf_decoder import load_hf_decoder
from meg_jax.data.preprocess import pre_edit_answers
from meg_jax.data.readers import read_edits
from meg_jax.data.templates import get_template
from meg_jax.evaluation.evaluator import EvalConfig, evaluate_classic, evaluate_meg
from meg_jax.evaluation.metrics import postprocess_answer
from meg_jax.evaluation.report import write_report
from meg_jax.inference.editor import zero_editor
from meg_jax.inference.runner import ModelRunner, shared_prefix
from meg_jax.models import generate as generate_module
from meg_jax.models.decoder import Decoder
from meg_jax.models.generate import greedy_generate
from meg_jax.models.neuron import Neuron

GPT2_VOCAB = 50257
N_RECORDS = 4


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(path, vocab=GPT2_VOCAB)
    config, params = load_hf_decoder(
        path, neuron_layer=1, eos_token_ids=(50256,), pad_token_id=50256
    )
    tokenizer = AutoTokenizer.from_pretrained(
        shared_data / "tokenizers" / "gpt2", local_files_only=True
    )
    records = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=N_RECORDS)
    return config, params, tokenizer, records, path


def _random_editor(d_model: int, seed: int = 0):
    """A deterministic per-query neuron (CRC of the text, stable across processes), large
    enough to change outputs."""

    def editor(queries):
        rows = [np.random.default_rng(zlib.crc32(q.encode()) + seed) for q in queries]
        w_in = np.stack([r.normal(size=d_model) for r in rows]).astype(np.float32)
        w_out = np.stack([r.normal(size=d_model) * 3 for r in rows]).astype(np.float32)
        return Neuron(w_in, np.zeros(len(queries), np.float32), w_out)

    return editor


def test_unedited_model_has_full_locality(setup):
    config, params, tokenizer, records, _ = setup
    template = get_template("smollm2")
    runner = ModelRunner(config, params, tokenizer, batch_size=4, show_progress=False)
    zero = zero_editor(config.d_model)
    labels = pre_edit_answers(
        [r.locality_prompts[0] for r in records],
        template,
        lambda prompts: runner.generate(prompts, zero(prompts), 20),
    )
    rows, summary = evaluate_meg(runner, records, template, zero, labels, EvalConfig(batch_size=4))
    assert summary["loc_ag"] == 100.0
    assert summary["n_rel"] == summary["n_gen"] == summary["n_loc"] == N_RECORDS
    assert len(rows) == N_RECORDS and set(rows[0]) >= {"rel_ag", "gen_tf", "loc_prediction"}


def _logits(config):
    """The plain model's logits of whole rows, `(params, ids[B, T], neuron=None) -> [B, T, V]`:
    `Decoder.apply` compiled once per row length instead of run op by op (a third of the
    time, the same function)."""
    model = Decoder(config)
    return jax.jit(
        lambda params, ids, neuron=None: model.apply({"params": params}, ids, neuron=neuron)
    )


def _batch1_reference(config, params, tokenizer, records, template, editor):
    """Rel AG and Rel TF (fast form) one query at a time with plain argmax loops."""
    logits_of = _logits(config)
    ag, tf = [], []
    for r in records:
        neuron = editor([r.prompt])
        neuron = Neuron(*(jnp.asarray(x) for x in neuron))
        ids = tokenizer(template.format_query(r.prompt))["input_ids"]
        tokens = jnp.asarray([ids], jnp.int32)
        new = greedy_generate(
            config,
            params,
            tokens,
            jnp.ones_like(tokens, bool),
            neuron,
            max_new_tokens=20,
            stop_ids=(50256,),
        )
        text = tokenizer.decode(np.asarray(new[0]), skip_special_tokens=True)
        pred = postprocess_answer(text, template.answer_cuts)
        ag.append(pred.lower() == (" " + r.target_new).lower())
        target = tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"]
        seq = jnp.asarray([ids + target[:-1]], jnp.int32)
        logits = logits_of(params, seq, neuron)
        pred_ids = np.asarray(jnp.argmax(logits[0, len(ids) - 1 :], axis=-1))
        tf.append(np.mean(pred_ids == np.asarray(target)))
    return ag, tf


def test_batched_equals_batch1_loop(setup):
    config, params, tokenizer, records, _ = setup
    template = get_template("smollm2")
    editor = _random_editor(config.d_model)
    runner = ModelRunner(config, params, tokenizer, batch_size=4, show_progress=False)
    eval_config = EvalConfig(batch_size=4, tf_mode="fast")
    # The random model never states a CounterFact target, so on the real records Rel AG and Rel
    # TF are all 0 and a broken reference could agree: the first half of the records ask for
    # what the edited model answers (its own greedy answer as the target), so both move.
    first, _ = evaluate_meg(runner, records, template, editor, None, eval_config)
    half = N_RECORDS // 2
    own = [
        dataclasses.replace(
            r, target_new=postprocess_answer(row["rel_prediction"], template.answer_cuts).strip()
        )
        for r, row in zip(records[:half], first[:half], strict=True)
    ]
    assert all(r.target_new for r in own)
    records = own + records[half:]
    rows, _ = evaluate_meg(runner, records, template, editor, None, eval_config)
    ag, tf = _batch1_reference(config, params, tokenizer, records, template, editor)
    assert any(ag) and not all(ag) and max(tf) > 0.5 and min(tf) < 0.5
    assert [row["rel_ag"] for row in rows] == ag
    np.testing.assert_allclose([row["rel_tf"] for row in rows], tf)
    # The neuron must matter, or this test could not tell neurons apart.
    zero_rows, _ = evaluate_meg(
        runner,
        records,
        template,
        zero_editor(config.d_model),
        None,
        EvalConfig(batch_size=4, tf_mode="fast"),
    )
    assert [r["rel_prediction"] for r in rows] != [r["rel_prediction"] for r in zero_rows]


def test_runner_generation_equals_whole_prompts_one_at_a_time(setup, monkeypatch):
    """The runner's generation (template opening shared, zero-neuron rows batched apart with no
    neuron, batches compacted as rows stop) gives every prompt the tokens it gets alone."""
    config, params, tokenizer, records, _ = setup
    template = get_template("smollm2")
    texts = [t for r in records for t in (r.prompt, r.paraphrases[0], r.locality_prompts[0])]
    prompts = [template.format_query(t) for t in texts]
    neurons = _random_editor(config.d_model)(texts)
    for i in range(2, len(texts), 3):  # the locality prompts get the zero neuron
        for x in neurons:
            x[i] = 0
    assert len(shared_prefix([tokenizer(p)["input_ids"] for p in prompts])) > 5

    take = generate_module._take_rows
    compactions = []
    monkeypatch.setattr(
        generate_module,
        "_take_rows",
        lambda state, rows: compactions.append(len(rows)) or take(state, rows),
    )
    runner = ModelRunner(
        config, params, tokenizer, batch_size=8, min_decode_rows=2, show_progress=False
    )
    batched = runner.generate_ids(prompts, neurons, 12, stop_texts=("e",))
    assert compactions, "no batch was compacted: the test would not exercise it"
    stops = (50256, *runner._stop_tokens(("e",)))
    for i, prompt in enumerate(prompts):
        ids = jnp.asarray([tokenizer(prompt)["input_ids"]], jnp.int32)
        one = Neuron(*(jnp.asarray(x[i : i + 1]) for x in neurons))
        new = np.asarray(
            greedy_generate(
                config,
                params,
                ids,
                jnp.ones_like(ids, bool),
                one,
                max_new_tokens=12,
                stop_ids=stops,
            )
        )[0].tolist()
        ends = [j for j, t in enumerate(new) if t in stops]
        assert batched[i] == (new[: ends[0] + 1] if ends else new), f"prompt {i}"


def test_classic_counterfact_and_report(setup, tmp_path):
    config, params, tokenizer, records, _ = setup
    runner = ModelRunner(config, params, tokenizer, batch_size=4, show_progress=False)
    summary = evaluate_classic(runner, records, zero_editor(config.d_model), "counterfact")
    assert set(summary) >= {"ES", "PS", "NS", "score"}
    # ES by hand: mean NLL of each target after the prompt, one full forward per target.
    logits_of = _logits(config)
    wins = []
    for r in records:
        nll = []
        for target in (r.target_new, r.target_true):
            p_ids = tokenizer(r.prompt)["input_ids"]
            t_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
            logits = logits_of(params, jnp.asarray([p_ids + t_ids], jnp.int32))
            logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)))
            nll.append(-np.mean([logp[len(p_ids) - 1 + j, t] for j, t in enumerate(t_ids)]))
        wins.append(nll[0] < nll[1])
    assert summary["ES"] == pytest.approx(100.0 * np.mean(wins))
    rows, meg = evaluate_meg(
        runner, records, get_template("smollm2"), zero_editor(config.d_model), None
    )
    table = write_report(tmp_path, rows, meg, "tiny")
    assert "Rel AG" in table
    assert (tmp_path / "metrics.png").stat().st_size > 0
    lines = (tmp_path / "examples.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [r.id for r in records]


def test_sharded_evaluator_matches_single_device(setup):
    """8 fake devices (data 4 x model 2) give the per-example results of one, with batches
    compacted over the data axis (generations cut at "e" stop early)."""
    config, params, tokenizer, records, path = setup
    template = dataclasses.replace(
        get_template("smollm2"), answer_cuts=("e",), locality_cuts=("e",)
    )
    runner = ModelRunner(
        config, params, tokenizer, batch_size=8, min_decode_rows=4, show_progress=False
    )
    editor = _random_editor(config.d_model)
    rows, _ = evaluate_meg(runner, records, template, editor, None, EvalConfig(tf_mode="fast"))
    code = f"""
    import dataclasses, json, sys
    sys.path.insert(0, "tests")
    import numpy as np
    from transformers import AutoTokenizer
    from test_evaluator import _random_editor
    from meg_jax.checkpoints.hf_decoder import load_hf_decoder
    from meg_jax.data.readers import read_edits
    from meg_jax.data.templates import get_template
    from meg_jax.evaluation.evaluator import EvalConfig, evaluate_meg
    from meg_jax.inference.runner import ModelRunner
    from meg_jax.models import generate
    from meg_jax.infra.sharding import DECODER_RULES, make_mesh, param_shardings
    mesh = make_mesh(data=4, model=2)
    config, params = load_hf_decoder(
        {str(path)!r}, neuron_layer=1, eos_token_ids=(50256,), pad_token_id=50256,
        shardings_fn=lambda cfg, abstract: param_shardings(mesh, DECODER_RULES, abstract),
    )
    tok = AutoTokenizer.from_pretrained({str(tokenizer.name_or_path)!r}, local_files_only=True)
    records = read_edits({str(records[0].source.file)!r}, limit={N_RECORDS})
    template = dataclasses.replace(
        get_template("smollm2"), answer_cuts=("e",), locality_cuts=("e",)
    )
    take, compactions = generate._take_rows, []
    generate._take_rows = lambda state, rows: compactions.append(len(rows)) or take(state, rows)
    runner = ModelRunner(config, params, tok, mesh=mesh, batch_size=8, min_decode_rows=4,
                         show_progress=False)
    rows, _ = evaluate_meg(runner, records, template, _random_editor(config.d_model), None,
                           EvalConfig(tf_mode="fast"))
    print(json.dumps([rows, compactions]))
    """
    sharded, compactions = json.loads(run_with_fake_devices(code).strip().splitlines()[-1])
    assert compactions, "no batch was compacted: the test would not exercise it"
    for a, b in zip(rows, sharded, strict=True):
        assert a["rel_prediction"] == b["rel_prediction"]
        assert a["gen_prediction"] == b["gen_prediction"]
        assert a["rel_tf"] == pytest.approx(b["rel_tf"])


def test_last_argmax_and_stopped_generation(setup):
    config, params, tokenizer, records, _ = setup
    runner = ModelRunner(config, params, tokenizer, batch_size=4, show_progress=False)
    editor = _random_editor(config.d_model)
    prompts = [r.prompt for r in records]
    neurons = editor(prompts)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    full = runner.scores(ids, neurons)
    assert runner.last_argmax(ids, neurons) == [int(a[-1]) for a, _ in full]

    # Stopping at the first token that contains an "e" keeps exactly that prefix of the
    # unstopped greedy generation.
    plain = runner.generate_ids(prompts, neurons, 12)
    stopped = runner.generate_ids(prompts, neurons, 12, stop_texts=("e",))
    cut_somewhere = False
    for a, b in zip(plain, stopped, strict=True):
        assert a[: len(b)] == b
        has_e = [i for i, t in enumerate(a) if "e" in tokenizer.decode([t])]
        assert len(b) == (has_e[0] + 1 if has_e else len(a))
        cut_somewhere |= len(b) < len(a)
    assert cut_somewhere
    with pytest.raises(ValueError, match="single characters"):
        runner.generate_ids(prompts, neurons, 4, stop_texts=("ab",))


def test_stop_at_cut_and_generation_reuse_change_no_result(setup, monkeypatch):
    """The evaluator's shortcuts (ending generations at a cut, reading TF steps off the greedy
    generation) give the per-example readings of the plain path, and do skip forward passes."""
    config, params, tokenizer, records, _ = setup
    # Cutting at "e" makes the tiny random model's generations stop early.
    template = dataclasses.replace(
        get_template("smollm2"), answer_cuts=("e",), locality_cuts=("e",)
    )
    runner = ModelRunner(config, params, tokenizer, batch_size=4, show_progress=False)
    zero = zero_editor(config.d_model)
    # Targets that are the model's own greedy answers, so TF steps follow the generation.
    answers = runner.generate([template.format_query(r.prompt) for r in records], zero([""] * 4), 3)
    records = [
        dataclasses.replace(r, target_new=a.strip() or "x")
        for r, a in zip(records, answers, strict=True)
    ]
    labels = pre_edit_answers(
        [r.locality_prompts[0] for r in records],
        template,
        lambda prompts: runner.generate(prompts, zero(prompts), 20),
    )
    forwards = []
    last_argmax = runner.last_argmax
    monkeypatch.setattr(
        runner, "last_argmax", lambda seqs, n: forwards.append(len(seqs)) or last_argmax(seqs, n)
    )

    def readings(**shortcuts):
        forwards.clear()
        cfg = EvalConfig(batch_size=4, **shortcuts)
        rows, summary = evaluate_meg(runner, records, template, zero, labels, cfg)
        keys = [k for k in rows[0] if k.endswith(("_ag", "_tf"))]
        return [{k: row[k] for k in keys} for row in rows], summary, sum(forwards)

    fast_rows, fast_summary, fast_forwards = readings()
    plain_rows, plain_summary, plain_forwards = readings(stop_at_cut=False, reuse_generation=False)
    assert fast_rows == plain_rows and fast_summary == plain_summary
    # Every query's first step is the generation's prompt; later steps were read off too.
    assert plain_forwards - fast_forwards > 3 * len(records), (plain_forwards, fast_forwards)
