"""Teacher forcing: the reference's re-tokenised steps, batching with padding, a BOS-adding
tokenizer, the fast single-forward variant and target log-probabilities.

The "model" is a bigram table (the argmax after token a is next_of[a]), so every flag can be
worked out by hand.
"""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from meg_jax.evaluation.teacher_forcing import (
    TargetQuery,
    TFQuery,
    build_target_query,
    build_tf_queries,
    fast_tf_token_correct,
    target_logprobs,
    target_token_ids,
    tf_accuracy,
    tf_token_correct,
)
from meg_jax.models.generate import pad_right

PROMPT = "The capital of France is"
PROMPT_IDS = (464, 3139, 286, 4881, 318)  # GPT-2
PARIS, HILTON, EOS = 6342, 31248, 50256


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2", local_files_only=True)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A Llama-like word-level tokenizer whose post-processor prepends <s> (id 0)."""
    words = ["<s>", "</s>", "<unk>", "▁The", "▁capital", "▁is", "▁Paris", "▁Hilton", "The"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def bigram_model(next_of, vocab):
    def logits_fn(input_ids, attention_mask):
        assert input_ids.dtype == np.int32 and attention_mask.shape == input_ids.shape
        predicted = np.vectorize(lambda t: next_of.get(int(t), 0))(input_ids)
        logits = np.zeros(input_ids.shape + (vocab,), np.float32)
        np.put_along_axis(logits, predicted[..., None], 1.0, axis=-1)
        return logits

    return logits_fn


def test_reference_steps_on_gpt2(gpt2):
    assert build_tf_queries(gpt2, PROMPT, "Paris Hilton") == [
        TFQuery(PROMPT_IDS, PARIS),
        TFQuery(PROMPT_IDS + (PARIS,), HILTON),
    ]


def test_batched_reference_tf_reads_the_last_real_position(gpt2):
    queries = [
        build_tf_queries(gpt2, PROMPT, "Paris Hilton"),
        build_tf_queries(gpt2, PROMPT, "Paris"),
    ]
    # after "is" comes " Paris" (right), after " Paris" comes id 0 (wrong: " Hilton" expected);
    # a reader that looked at the padding (EOS) would see 999 and fail the first step
    model = bigram_model({318: PARIS, EOS: 999}, vocab=50257)
    for batch_size, multiple_of in ((2, 1), (1, 1), (3, 8)):
        flags = tf_token_correct(queries, model, EOS, batch_size, multiple_of)
        assert [f.tolist() for f in flags] == [[True, False], [True]]
    assert tf_accuracy(flags) == pytest.approx(75.0)  # (1/2 + 1) / 2


def test_bos_tokenizer_adds_bos_to_prompts_but_not_to_targets(bos_tokenizer):
    assert target_token_ids(bos_tokenizer, "Paris Hilton") == [6, 7]
    assert build_tf_queries(bos_tokenizer, "The capital is", "Paris Hilton") == [
        TFQuery((0, 8, 4, 5), 6),
        TFQuery((0, 8, 4, 5, 6), 7),
    ]
    query = build_target_query(bos_tokenizer, "The capital is", "Paris Hilton")
    assert query == TargetQuery((0, 8, 4, 5, 6), 4, (6, 7))
    model = bigram_model({5: 6, 6: 7}, vocab=9)
    assert fast_tf_token_correct([query], model, pad_id=1)[0].tolist() == [True, True]
    steps = [build_tf_queries(bos_tokenizer, "The capital is", "Paris Hilton")]
    assert tf_token_correct(steps, model, pad_id=1)[0].tolist() == [True, True]


def test_fast_variant_agrees_on_words_and_differs_on_split_characters(gpt2):
    model = bigram_model({318: PARIS, EOS: 999}, vocab=50257)
    fast = fast_tf_token_correct(
        [
            build_target_query(gpt2, PROMPT, "Paris Hilton"),
            build_target_query(gpt2, PROMPT, "Paris"),
        ],
        model,
        EOS,
    )
    assert [f.tolist() for f in fast] == [[True, False], [True]]

    # " 東京" is five byte-level tokens; each decodes alone to U+FFFD, which re-tokenises to
    # another id, so the reference expects those ids instead of the tokens themselves
    tokens = target_token_ids(gpt2, "東京")
    assert tokens == [10545, 251, 109, 12859, 105]
    assert [q.expected_id for q in build_tf_queries(gpt2, PROMPT, "東京")] == [20543] + [4210] * 4
    chain = dict(zip((318, *tokens[:-1]), tokens, strict=True))  # a model that knows the answer
    perfect = bigram_model(chain, vocab=50257)
    assert fast_tf_token_correct([build_target_query(gpt2, PROMPT, "東京")], perfect, EOS)[0].all()
    reference = tf_token_correct([build_tf_queries(gpt2, PROMPT, "東京")], perfect, EOS)[0]
    assert not reference.any()


def test_target_logprobs_are_normalised_log_softmax():
    table = np.log(
        np.array(
            [
                [0.25, 0.25, 0.25, 0.25],
                [0.25, 0.25, 0.25, 0.25],
                [0.1, 0.2, 0.3, 0.4],
                [0.5, 0.25, 0.125, 0.125],
            ]
        )
    )

    def logits_fn(input_ids, attention_mask):
        return table[input_ids] + 7.0  # a shift per row must not matter

    query = TargetQuery(input_ids=(1, 2, 3), target_start=2, target_ids=(3, 0))
    other = TargetQuery(input_ids=(2,), target_start=1, target_ids=(1,))
    got = target_logprobs([query, other], logits_fn, pad_id=0)
    np.testing.assert_allclose(got[0], np.log([0.4, 0.5]))
    np.testing.assert_allclose(got[1], np.log([0.2]))


def test_padding_and_error_paths():
    ids, mask = pad_right([(5, 6, 7), (8,)], pad_id=0, multiple_of=4)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match="empty"):
        pad_right([(1,), ()], pad_id=0)
    with pytest.raises(ValueError, match="logits_fn returned shape"):
        tf_token_correct([[TFQuery((1, 2), 3)]], lambda i, m: np.zeros((1, 5, 4)), pad_id=0)
    with pytest.raises(ValueError, match="an example has no target tokens"):
        tf_accuracy([[True], []])
