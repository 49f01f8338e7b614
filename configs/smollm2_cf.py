"""MeG on the embedded default host: SmolLM2-135M-Instruct (GGUF, CPU) with CounterFact.

Variants: `configs/smollm2_cf.py:n=1024` sets the number of edits (default 256); `:smoke` is a
minutes-long run of every stage on 16 edits; `:da=1.0` turns on zero-weight augmentation ("DA",
METHOD.md §4.4, Table 15: N x 1.0 neighbourhood prompts of the pseudo-edits trained towards the
zero neuron) in its own work directory (`runs/smollm2_cf_da1`), since it is another generator;
`--config.collect.bank=runs/smollm2_cf/collect/bank.npz` reuses a bank collected without it.
The edit and pseudo-edit files are the EasyEdit CounterFact edit split and its disjoint train
split, found under the data directory (`$MEG_JAX_DATA` or ../shared/data, see
`meg_jax.data.locate`); point `data.edits` at any other file or dataset name. `data.add=FILE`
(or a larger `n`) extends a trained work directory with more facts.

Choices for SmolLM2 (METHOD.md §3.3b): the neuron sits at layer 14 as the shared reference bank;
the Llama form is a linear unit; with a true reset per edit the reference's Llama lr (0.02)
fits nothing. Collection uses the fast recipe of bench/collection.py (Adam, lr 0.1, up to 50
steps, each edit stopped once its answer is the argmax with loss below 0.2); `:fit=nsgd` fits
with normalised SGD instead (a bank the generator fits better, a lower Score: see
`CollectConfig.fast`), in its own work directory. `:ctx=K` (1 to 5) fits each edit also behind K
texts the host writes from MEMIT's context seeds ("The", "Therefore", ...;
`CollectConfig.context_seeds`), so its neuron states the fact after unrelated text too, as
CounterFact's paraphrase prompts begin; about K + 1 times the collection work, its own work
directory. `:gate=nearest` routes by the cosine distance to the nearest memorised query instead
of the familiarity network (`meg_jax.router.nearest`, README "Router kinds"); `:cn=S` trains the
generator on conditions jittered by noise of norm about S (`DiTConfig.cond_noise`), so a
neighbourhood of each edit's condition, where its paraphrases land, maps to its neuron: 0.5 by
default, the reference's condition dropout in Gaussian form (`COND_NOISE`), `:cn=0` without it.
Each has its own work directory (`_nearest`, `_cn<S>`). Measured over seeds
(bench/results/quality.json, mean ± sample std): the default scores 75.3 ± 1.6 on
CounterFact-256 and 73.0 ± 1.6 on CounterFact-1024 (seeds 0-2 each); without the noise
it scored 69.3 ± 2.4 and 65.6 ± 0.1 (bench/results/quality_before_cond_noise.json), its
generated neurons answering 48.9% of the routed paraphrases at 1,024 edits against 63.9% for the
fitted neurons themselves (with it 61.9%). The best configuration, `:ctx=2,gate=nearest`, scores
85.6 ± 0.4 and 85.8 ± 0.2.

The prompt form is `smollm2_qa` (two-shot Q/A), chosen by the share of EMPTY pre-edit answers of
the unedited model (bench/templates.py, first 256 records, greedy, 20 tokens, cut at a newline):

    form                       CF loc empty  CF words  zsRE loc empty  zsRE words
    smollm2 (Llama-3 short)        96.5%        0.1        66.0%          3.4
    plain two-shot                  0.4%        4.2        48.8%          1.9
    smollm2_chat                    0.0%       13.8         0.0%         14.9   (81-90% > 10 words)
    smollm2_qa (two-shot Q/A)       0.0%        2.3         0.0%          4.2

Under the Llama-3 short-answer form SmolLM2 answers most neighbourhood prompts with an immediate
end of text, so Loc compared "" with ""; under the chat form its answers are sentences.
"""

import dataclasses

import ml_collections

from meg_jax.collect.stage import CollectConfig
from meg_jax.infra.config import parse_arg

# The collection recipe (`:fit=`): the fast recipe's Adam, or normalised SGD, whose tighter bank
# the generator fits well but whose neurons answer fewer paraphrases (CollectConfig.fast).
FITS = {"adam": {}, "nsgd": {"optimizer": "nsgd", "learning_rate": 1.0}}
# `:ctx=K` fits each edit also behind K contexts, the host's continuations of MEMIT's first K
# context seeds (`CollectConfig.context_seeds`).
CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")
# The reference regularises the DiT's condition with Dropout(0.2) on c = t_emb + cond (METHOD.md
# §4.3): on the unit query embedding that is a perturbation of expected relative length
# sqrt(0.2 / 0.8) = 0.5. The fast preset leaves dropout out (it only reaches the adaLN path, and
# left a floor above the stopping threshold), so the recipe puts the same perturbation back as
# Gaussian noise on the unit condition, which reaches the token path too (docstring, above).
COND_NOISE = 0.5


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    v = parse_arg(
        arg, n=256, smoke=False, da=0.0, fit="adam", ctx=0, gate="familiarity", cn=COND_NOISE
    )
    smoke, da, cn = v.smoke, float(v.da), float(v.cn)  # a bare `:da` reads as 1.0
    if v.fit not in FITS:
        raise ValueError(f"configs/smollm2_cf.py: fit={v.fit!r}; expected one of {sorted(FITS)}")
    if not 0 <= v.ctx <= len(CONTEXT_SEEDS):
        raise ValueError(
            f"configs/smollm2_cf.py: ctx={v.ctx!r}; expected 0 to {len(CONTEXT_SEEDS)}"
        )
    c = ml_collections.ConfigDict()
    c.workdir = "runs/smollm2_cf" + ("_smoke" if smoke else "") + (f"_da{da:g}" if da else "")
    c.workdir += ("" if v.fit == "adam" else f"_{v.fit}") + (f"_ctx{v.ctx}" if v.ctx else "")
    c.workdir += ("" if v.gate == "familiarity" else f"_{v.gate}") + (
        f"_cn{cn:g}" if cn != COND_NOISE else ""
    )
    c.seed = 0
    c.evaluate = True  # the main job ends with the evaluation table
    c.host = dict(
        name="smollm2", neuron_layer=14, neuron_activation="identity", template="smollm2_qa"
    )
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
    c.router = dict(kind=v.gate, train=dict(num_epochs=60 if smoke else 300, batch_size=256))
    fit = CollectConfig.fast(chunk_size=64, context_seeds=CONTEXT_SEEDS[: v.ctx], **FITS[v.fit])
    c.collect = dict(fit=dataclasses.asdict(fit))
    c.generator = dict(preset="fast", zero_augmentation=da, overrides={})
    c.generator.overrides.dit = dict(cond_noise=cn)
    if smoke:
        c.generator.overrides.train = dict(num_steps=300, eval_every=150, checkpoint_every=150)
    c.evaluation = dict(batch_size=32, tf_mode="reference")
    return c
