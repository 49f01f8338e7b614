"""MeG on GPT-J-6B (EleutherAI/gpt-j-6B) with zsRE: the paper's and the reference's settings.

    python -m meg_jax.train --config configs/gptj_zsre.py:n=4096
    python -m meg_jax.plan --config configs/gptj_zsre.py --mesh=1x8

Variants (configs/paper.py): n=1024|2048|4096|10000, generator=reference|fast, calibrate=false,
dtype=..., and tiny (with host=PATH, bank=PATH) for the same code path on a tiny random model.

Settings: neuron at layer 9 (gelu_new unit, 8193 values); collection SGD lr 0.07, cosine over
500 steps, at most 500 steps, stop below loss 0.35 with every answer token the argmax, 10 more
steps for failed fits; router threshold 0.3 (reference) or calibrated (default).
zsRE as the paper prepares it (METHOD.md §1.4, configs/paper.py): eval + train_10000 merged,
deduplicated, NQ questions normalised; the dataset's rephrases unless `:rephrases=PATH`.
"""

from meg_jax.infra.config import load_sibling

_paper = load_sibling(__file__, "paper.py")


def get_config(arg: str | None = None):
    return _paper.paper_config("gptj", "zsre", arg)
