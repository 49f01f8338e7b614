"""FT-L, MEMIT and AlphaEdit on GPT-J-6B with the papers' hyperparameters.

    python -m meg_jax.train --config configs/baseline_gptj.py:method=memit,host=DIR
    python -m meg_jax.evaluate --config configs/baseline_gptj.py:method=memit,host=DIR

A pipeline config (`editor` names the method, `baseline` holds every method's settings), trained
and evaluated like MeG's. Variants: `:method=alphaedit,n=2000,host=/models/gpt-j-6b`; `:tiny`
shrinks everything to a seconds-long smoke run (layers 0-1 of a 3-layer tiny model, not a real
GPT-J, given with `host=DIR`: the last edited layer needs a layer above it, or the targets'
gradient is zero and MEMIT's update with it).

Sources (read in the public repositories, not copied):
  MEMIT     kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json: layers 3-8, clamp 0.75,
            25 target steps at lr 0.5, weight decay 0.5, KL 0.0625, mom2_update_weight 15000,
            100,000 Wikipedia samples for the key moments.
  AlphaEdit jianghoucheng/AlphaEdit hparams/AlphaEdit/EleutherAI_gpt-j-6B.json: the same, plus
            nullspace_threshold 2e-2 and L2 10; sequential batches of 100 in the paper's runs.
  FT-L      MEMIT's FT baseline on layer 21, 25 steps at lr 5e-4, with ROME's L-infinity bound
            on the change (5e-5 here).
Departures, both forced by working offline: the key moments come from the "facts" corpus
(`meg_jax.baselines.stats`: 32,000 short CounterFact-train and zsRE sentences, about 330,000
tokens), not Wikipedia; the context prefixes are 5 greedy continuations of MEMIT's openings
instead of 10 sampled ones.
"""

import ml_collections

from meg_jax.infra.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    v = parse_arg(arg, method="memit", n=1000, host="models/gpt-j-6b", tiny=False, batch=100)
    c = ml_collections.ConfigDict()
    c.workdir = f"runs/baseline_gptj_{v.method}" + ("_tiny" if v.tiny else "")
    c.editor = v.method
    # The neuron slot is unused by a weight edit; MeG's GPT-J layer keeps the host valid.
    c.host = dict(name=v.host, template="gptj", neuron_layer=1 if v.tiny else 9)
    c.data = dict(
        edits="counterfact/counterfact-edit.json",  # resolved by meg_jax.data.locate
        kind="counterfact",
        n_edits=4 if v.tiny else v.n,
    )
    targets = dict(
        lr=0.5,
        steps=25,
        weight_decay=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
        n_contexts=5,
        context_tokens=10,
        chunk_size=16,
    )
    c.baseline = dict(
        prompt="template",  # the statistics cache is keyed by the run's host (host_id "")
        ft=dict(layer=21, lr=5e-4, steps=25, norm_constraint=5e-5, batch_size=64),
        memit=dict(layers=[3, 4, 5, 6, 7, 8], mom2_update_weight=15000.0, targets=targets),
        alphaedit=dict(nullspace_threshold=2e-2, l2=10.0, batch_size=v.batch),
        stats=dict(corpus="facts", n_texts=0, max_tokens=64, batch_size=32),
    )
    if v.tiny:
        c.baseline.ft.update(layer=1, steps=2)
        c.baseline.memit.update(layers=[0, 1])
        c.baseline.memit.targets.update(steps=2, n_contexts=1, context_tokens=4)
        c.baseline.alphaedit.update(batch_size=2)
        c.baseline.stats.update(n_texts=64, max_tokens=16)
    c.evaluation = dict(batch_size=16, tf_mode="reference", classic=True)
    if v.tiny:  # a random model's answers may be empty: Loc then measures nothing, allowed here
        c.evaluation.update(batch_size=8, max_empty_labels=1.0)
    return c
