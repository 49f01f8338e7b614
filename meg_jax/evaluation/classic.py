"""The MEMIT/ROME metrics (protocols P1 and P2 of BENCHMARKS.md), model-agnostic.

P1, MEMIT zsRE (`experiments/py/eval_utils_zsre.py`): teacher-forced token top-1 accuracy, the
same steps as MeG's reference TF (`teacher_forcing.build_tf_queries`), on raw prompts (no
template): Efficacy on `src` -> `answers[0]`, Paraphrase on every rephrase -> `answers[0]`,
Specificity on `loc + "?"` (the `"nq question: "` prefix kept) -> the GOLD `loc_ans`, not the
pre-edit model's answer. Per case the tokens of all its prompts are averaged; then the mean over
cases. Score = harmonic mean of the three.

P2, MEMIT CounterFact (`eval_utils_counterfact.py`, `summarize.py`): for each prompt the mean
per-token NLL of `" " + target_new` and of `" " + target_true`.
  ES: NLL(new) < NLL(true) on the edit prompt;  PS: the same on each paraphrase;
  NS: NLL(true) < NLL(new) on each neighbourhood prompt (strict inequalities, as ROME).
  EM/PM/NM (the `*_diff` keys): exp(-NLL(new)) - exp(-NLL(true)), sign flipped for NM.
  Per case the mean over its prompts; then the mean over cases. Score = HM(ES, PS, NS).
  ROME tokenises `prompt + " " + target` as one string and reads the target at the prompt's
  token length; we concatenate prompt ids and target ids (`build_target_query`), which is the
  same whenever BPE does not merge across the boundary (it does not for GPT-2 prompts that end
  in a word), and never misaligns when it would.
Fluency (generation entropy): ROME's `compute_n_gram_entropy`, per text the weighted mean of the
bigram and trigram entropies in bits, weights 2/3 and 4/3, averaged over texts and multiplied by
100 as `summarize.py` reports it (an unedited GPT-J scores about 620). ROME splits words with
`nltk.word_tokenize`; we use a regex that splits words, numbers and punctuation the same way for
plain English but does not reproduce every Treebank rule (nltk needs a separate data download).

All aggregates are percentages.
"""

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from meg_jax.data.preprocess import NQ_PREFIX
from meg_jax.data.records import EditRecord
from meg_jax.evaluation.metrics import harmonic_mean
from meg_jax.evaluation.teacher_forcing import (
    TargetQuery,
    TFQuery,
    build_target_query,
    build_tf_queries,
)

PROMPT_GROUPS = ("rewrite", "paraphrase", "neighborhood")
# contractions first, as Treebank splits "don't" into "do" + "n't" and "it's" into "it" + "'s"
_WORDS = re.compile(
    r"\w+(?=n't\b)|n't\b|'(?:s|m|d|ll|re|ve)\b|\w+(?:[-.]\w+)*|[^\w\s]", re.IGNORECASE
)


def memit_zsre_queries(
    tokenizer: PreTrainedTokenizerBase, record: EditRecord
) -> dict[str, list[tuple[str, list[TFQuery]]]]:
    """P1 TF steps of a zsRE record: per `PROMPT_GROUPS` key, (prompt text, its steps) pairs.

    The prompt text is what an editor sees (one neuron per prompt). The record must be as read
    (`zsre_target="answers"`): P1 keeps the `"nq question: "` prefix of the locality question
    and appends "?". A MeG-preprocessed record (the pipeline's edit set) has the question
    already normalised ("Who is x?", the prefix gone and the case folded, which cannot be
    undone); it is asked as it stands rather than as "Who is x??".
    """
    if len(record.locality_answers) != 1:
        raise ValueError(
            f"{record.source.describe('loc_ans')}: MEMIT zsRE needs exactly one gold locality "
            f"answer, found {len(record.locality_answers)}"
        )
    loc = record.locality_prompts[0]
    loc = loc + "?" if NQ_PREFIX in loc else loc
    return {
        "rewrite": [(record.prompt, build_tf_queries(tokenizer, record.prompt, record.target_new))],
        "paraphrase": [
            (p, build_tf_queries(tokenizer, p, record.target_new)) for p in record.paraphrases
        ],
        "neighborhood": [(loc, build_tf_queries(tokenizer, loc, record.locality_answers[0]))],
    }


def memit_zsre_summary(cases: Sequence[Mapping[str, Sequence[bool]]]) -> dict[str, float]:
    """Efficacy, Paraphrase, Specificity and Score from per-case token flags.

    Each case maps every key of `PROMPT_GROUPS` to the flags of all its TF steps (all prompts of
    the group together).
    """
    if not cases:
        raise ValueError("no cases to summarise")
    means = {}
    for key in PROMPT_GROUPS:
        per_case = []
        for i, case in enumerate(cases):
            flags = case[key]
            if len(flags) == 0:
                raise ValueError(f"case {i} has no {key} tokens")
            per_case.append(np.mean(np.asarray(flags, dtype=np.float64)))
        means[key] = 100.0 * float(np.mean(per_case))
    return {
        "efficacy": means["rewrite"],
        "paraphrase": means["paraphrase"],
        "specificity": means["neighborhood"],
        "score": harmonic_mean([means["rewrite"], means["paraphrase"], means["neighborhood"]]),
    }


def counterfact_queries(
    tokenizer: PreTrainedTokenizerBase, record: EditRecord
) -> dict[str, list[tuple[str, tuple[TargetQuery, TargetQuery]]]]:
    """P2 (prompt text, (new, true) target queries) for the edit prompt, each paraphrase and
    each neighbour, keyed by `PROMPT_GROUPS`."""
    if record.target_true is None:
        raise ValueError(f"{record.source.describe('target_true')}: P2 needs the true object")
    groups = {
        "rewrite": [record.prompt],
        "paraphrase": list(record.paraphrases),
        "neighborhood": list(record.locality_prompts),
    }
    return {
        key: [
            (
                prompt,
                (
                    build_target_query(tokenizer, prompt, record.target_new),
                    build_target_query(tokenizer, prompt, record.target_true),
                ),
            )
            for prompt in prompts
        ]
        for key, prompts in groups.items()
    }


def mean_nll(token_logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood per token of a target."""
    if len(token_logprobs) == 0:
        raise ValueError("a target has no tokens")
    return -float(np.mean(np.asarray(token_logprobs, dtype=np.float64)))


def counterfact_case(
    logprobs: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]],
) -> dict[str, float]:
    """One case's success rates and magnitudes, as fractions, from per-token log-probs.

    `logprobs[key]` (keys `PROMPT_GROUPS`: rewrite, paraphrase, neighborhood) holds, per
    prompt, the (target_new, target_true) per-token log-probabilities. Returns `es, ps, ns` (the
    fraction of prompts that succeed) and `em, pm, nm` (mean probability differences).
    """
    out = {}
    for key, short in zip(PROMPT_GROUPS, ("e", "p", "n"), strict=True):
        pairs = logprobs[key]
        if len(pairs) == 0:
            raise ValueError(f"no {key} prompts in this case")
        nll = np.array([(mean_nll(new), mean_nll(true)) for new, true in pairs])
        new_wins = nll[:, 0] < nll[:, 1]
        gap = np.exp(-nll[:, 0]) - np.exp(-nll[:, 1])
        if key == "neighborhood":  # unrelated prompts should keep preferring the true object
            new_wins, gap = nll[:, 1] < nll[:, 0], -gap
        out[f"{short}s"] = float(np.mean(new_wins))
        out[f"{short}m"] = float(np.mean(gap))
    return out


def counterfact_summary(cases: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Means over `counterfact_case` results as percentages, with Score = HM(ES, PS, NS)."""
    if not cases:
        raise ValueError("no cases to summarise")
    keys = ("es", "ps", "ns", "em", "pm", "nm")
    out = {k.upper(): 100.0 * float(np.mean([case[k] for case in cases])) for k in keys}
    out["score"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    return out


def words(text: str) -> list[str]:
    """Word and punctuation tokens (an approximation of `nltk.word_tokenize`)."""
    return _WORDS.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's per-text n-gram entropy: mean over n of weight_n * entropy (bits) of the n-grams.

    A text with no n-grams of some order contributes 0 bits for that order (as ROME, whose sum
    over an empty distribution is 0).
    """
    tokens = words(text)
    weighted = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
        weighted.append(weight * entropy)
    return float(np.mean(weighted))


def generation_entropy(texts: Sequence[str]) -> float:
    """Fluency as reported by ROME/MEMIT: mean `ngram_entropy` over texts, times 100."""
    if not texts:
        raise ValueError("no generated texts")
    return 100.0 * float(np.mean([ngram_entropy(t) for t in texts]))
