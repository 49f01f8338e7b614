"""MeG on GPT-J-6B (EleutherAI/gpt-j-6B) with CounterFact: the paper's and the reference's settings.

    python -m meg_jax.train --config configs/gptj_counterfact.py:n=4096
    python -m meg_jax.plan --config configs/gptj_counterfact.py --mesh=1x8

Variants (configs/paper.py): n=1024|2048|4096|10000, generator=reference|fast, calibrate=false,
dtype=..., and tiny (with host=PATH, bank=PATH) for the same code path on a tiny random model.

Settings: neuron at layer 9 (gelu_new unit, 8193 values); collection SGD lr 0.07, cosine over
500 steps, at most 200 steps, stop below loss 0.2 (the reference's patience of 10 is not
available), 10 more steps for failed fits; router threshold 0.7 (reference) or calibrated.
CounterFact: the MEMIT split multi_counterfact.json; the first N edited, the last 2000 pseudo-edits.
"""

from meg_jax.infra.config import load_sibling

_paper = load_sibling(__file__, "paper.py")


def get_config(arg: str | None = None):
    return _paper.paper_config("gptj", "counterfact", arg)
