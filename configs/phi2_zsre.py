"""MeG on Phi-2 (microsoft/phi-2) with zsRE: the paper's and the reference's settings.

    python -m meg_jax.train --config configs/phi2_zsre.py:n=4096
    python -m meg_jax.plan --config configs/phi2_zsre.py --mesh=1x8

Variants (configs/paper.py): n=1024|2048|4096|10000, generator=reference|fast, calibrate=false,
dtype=..., and tiny (with host=PATH, bank=PATH) for the same code path on a tiny random model.

Settings: neuron at layer 29 (gelu_new unit, 5121 values); collection SGD lr 0.01, greedy test at
step 80, failed fits continue to 160; router threshold 0.1 (reference) or calibrated.
zsRE as the paper prepares it (METHOD.md §1.4; configs/paper.py says more): zsre_mend_eval.json
and zsre_mend_train_10000.json merged (data.edits="a+b"), deduplicated by subject, NQ locality
questions normalised everywhere they are asked, the wrong-answer filter run on this model with
n counted after it; pseudo-edits from zsre_mend_train.json less every subject of the edit files.
The GLM-4 rephrases cannot be regenerated offline: Generality and the pseudo-edit pairs use the
dataset's MEND rephrase, unless a rephrase file is given (variant rephrases=PATH, a JSON object
prompt -> [rephrases], see meg_jax/data/rephrases.py).
"""

from meg_jax.infra.config import load_sibling

_paper = load_sibling(__file__, "paper.py")


def get_config(arg: str | None = None):
    return _paper.paper_config("phi2", "zsre", arg)
