"""MeG on Llama-3-8B-Instruct with zsRE: the paper's and the reference's settings.

    python -m meg_jax.train --config configs/llama3_zsre.py:n=4096
    python -m meg_jax.plan --config configs/llama3_zsre.py --mesh=1x8

Variants (configs/paper.py): n=1024|2048|4096|10000, generator=reference|fast, calibrate=false,
dtype=..., and tiny (with host=PATH, bank=PATH) for the same code path on a tiny random model.

Settings: neuron at layer 14 (linear unit, 8192 values); collection SGD lr 0.02 for 50 steps with a
true reset per edit (the reference's carry-over of the input half is not available; sweep the lr
first, see configs/paper.py); router threshold 0.3 (reference) or calibrated.
zsRE as the paper prepares it (METHOD.md §1.4, configs/paper.py): eval + train_10000 merged,
deduplicated, NQ questions normalised; the dataset's rephrases unless `:rephrases=PATH`.
"""

from meg_jax.infra.config import load_sibling

_paper = load_sibling(__file__, "paper.py")


def get_config(arg: str | None = None):
    return _paper.paper_config("llama3", "zsre", arg)
