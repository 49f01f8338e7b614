"""MeG on Llama-3-8B-Instruct with CounterFact: the paper's and the reference's settings.

    python -m meg_jax.train --config configs/llama3_counterfact.py:n=4096
    python -m meg_jax.plan --config configs/llama3_counterfact.py --mesh=1x8

Variants (configs/paper.py): n=1024|2048|4096|10000, generator=reference|fast, calibrate=false,
dtype=..., and tiny (with host=PATH, bank=PATH) for the same code path on a tiny random model.

Settings: neuron at layer 14 (linear unit, 8192 values); collection SGD lr 0.02 for 50 steps with a
true reset per edit (the reference's carry-over of the input half is not available; sweep the lr
first, see configs/paper.py); router threshold 0.6 (reference) or calibrated.
CounterFact: the MEMIT split multi_counterfact.json; the first N edited, the last 2000 pseudo-edits.
"""

from meg_jax.infra.config import load_sibling

_paper = load_sibling(__file__, "paper.py")


def get_config(arg: str | None = None):
    return _paper.paper_config("llama3", "counterfact", arg)
