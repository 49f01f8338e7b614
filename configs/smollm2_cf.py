"""MeG on the embedded default host: SmolLM2-135M-Instruct (GGUF, CPU) with CounterFact.

Variants: `configs/smollm2_cf.py:n=256` sets the number of edits; `:smoke` is a minutes-long
run of every stage on 16 edits. The edit and pseudo-edit files are the EasyEdit CounterFact edit
split and its disjoint train split, found under the data directory (`$MEG_JAX_DATA` or
../shared/data, see `meg_jax.data.locate`); point `data.edits` at any other file or dataset name.
`data.add=FILE` (or a larger `n`) extends a trained work directory with more facts.

Choices for SmolLM2 (METHOD.md §3.3b): the neuron sits at layer 14 as the shared reference bank;
the Llama form is a linear unit; with a true reset per edit the reference's Llama lr (0.02)
fits nothing, lr 0.5 for 50 steps fits every edit.
"""

import ml_collections

from meg_jax.infra.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    v = parse_arg(arg, n=64, smoke=False)
    smoke = v.smoke
    c = ml_collections.ConfigDict()
    c.workdir = "runs/smollm2_cf" + ("_smoke" if smoke else "")
    c.seed = 0
    c.evaluate = True  # the main job ends with the evaluation table
    c.host = dict(name="smollm2", neuron_layer=14, neuron_activation="identity", template="smollm2")
    c.data = dict(
        edits="counterfact/counterfact-edit.json",
        kind="counterfact",
        n_edits=16 if smoke else v.n,
        pseudo="counterfact/counterfact-train.json",
        n_pseudo_pairs=300 if smoke else 2000,
        n_val_pairs=50 if smoke else 200,
        n_calibration=64 if smoke else 256,
    )
    c.encoder = dict(
        path="minilm",
        infonce=dict(
            num_steps=20 if smoke else 300, eval_every=10 if smoke else 50, batch_size=128
        ),
    )
    c.router = dict(train=dict(num_epochs=60 if smoke else 300, batch_size=256))
    c.collect = dict(fit=dict(learning_rate=0.5, steps=50, batch_size=16, chunk_size=32))
    c.generator = dict(preset="fast")
    if smoke:
        c.generator.overrides = dict(
            train=dict(num_steps=300, eval_every=150, checkpoint_every=150)
        )
    c.evaluation = dict(batch_size=32, tf_mode="reference")
    return c
