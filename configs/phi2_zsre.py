"""MeG on Phi-2 (microsoft/phi-2) with zsRE: the paper's and the reference's settings.

    python -m meg_jax.train --config configs/phi2_zsre.py:n=4096
    python -m meg_jax.plan --config configs/phi2_zsre.py --mesh=1x8

Variants (configs/paper.py): n=1024|2048|4096|10000, generator=reference|fast, calibrate=false,
dtype=..., and tiny (with host=PATH, bank=PATH) for the same code path on a tiny random model.

Settings: neuron at layer 29 (gelu_new unit, 5121 values); collection SGD lr 0.01, greedy test at
step 80, failed fits continue to 160; router threshold 0.1 (reference) or calibrated.
zsRE as the paper prepares it (METHOD.md §1.4, configs/paper.py): eval + train_10000 merged,
deduplicated, NQ questions normalised; the dataset's rephrases unless `:rephrases=PATH`.
"""

from meg_jax.infra.config import load_sibling

_paper = load_sibling(__file__, "paper.py")


def get_config(arg: str | None = None):
    return _paper.paper_config("phi2", "zsre", arg)
