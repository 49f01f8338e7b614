"""The paper's settings (METHOD.md §1.4-§4), shared by configs/{gptj,phi2,llama3}_*.py.

Each of those files is one line over `paper_config(model, dataset, variant)`; the variants are

    n=1024|2048|4096|10000   the number of edits (the paper's four scales; default 1024)
    generator=reference|fast the generator recipe (`meg_jax.diffusion.config.GENERATOR_PRESETS`)
    gen_batch=N              the generator's minibatch (default: the reference's, at most 1024;
                             lower it where `python -m meg_jax.plan` finds it too big)
    calibrate=true|false     false: gate with the reference's entropy threshold instead of ours
    dtype=bfloat16|float16|float32   the host's dtype (the paper: float16; TPUs: bfloat16)
    tiny                     the same code path on a tiny random model of the same architecture
    host=PATH, bank=PATH     (tiny only) the tiny model directory and its given weight bank
    rephrases=PATH           a rephrase file (`meg_jax.data.rephrases`: paraphrases by record
                             prompt or id, e.g. GLM-4's) replacing the dataset's own; for zsRE
                             the pseudo-edits then take 2000 records with 2 rephrases each

What comes from where, per model and dataset (tables below, each with its METHOD.md section):
neuron layer and activation (§2.1), prompt template (§1.3), collection schedule and stopping rule
(§3.2), router epochs and batch (§2.3), the reference's entropy threshold ε (§2.3,
`classifier_test.py`) beside our calibrated one, the encoder and its InfoNCE temperature (§2.2),
DiT-B and the generator batch and length (§4.3-§4.4).

What the reference does that these configs cannot:
  * zsRE rephrases: the paper regenerates 10 rephrases per record with GLM-4-9B-Chat (§1.4); that
    model cannot run here and its output is not published, so by default Generality and the
    encoder's pseudo-edit pairs use the dataset's own MEND rephrase (one per record), and the
    zsRE pseudo-edit set takes 4000 records (one pair each) where the reference takes 2000 with
    two rephrases each: the same 4000 pairs. Whoever has GLM-4 (or other) rephrases passes them
    with the `rephrases=PATH` variant (or `--config.data.rephrases=PATH`): they replace the
    MEND rephrase of every record they name, edits and pseudo-edits alike.
  * zsRE as the paper prepares it (§1.4), which these configs do: the edits are
    `zsre_mend_eval.json` + `zsre_mend_train_10000.json` merged (29,086 records; the second
    file's ids follow the first's), deduplicated by subject across both (19,964), the NQ
    locality questions normalised ("nq question: who is x" -> "Who is x?") wherever they are
    asked (evaluation, the router's calibration), and the wrong-answer filter run per model:
    `n_edits` counts the records kept after it. The pseudo-edits are `zsre_mend_train.json` less
    every subject and question of the two edit files, deduplicated by subject: disjoint from
    any edit set of any size. The reference takes the first 4000 of these and uses the last
    2000; we take the file's last records (before the calibration records), also disjoint.
    `zsre_mend_eval.json` and `zsre_mend_train.json` download from the ROME data host; the
    EasyEdit file `zsre_mend_train_10000.json` has no pinned public URL: place it at
    `$MEG_JAX_DATA/zsre/zsre_mend_train_10000.json` (the error says so when it is missing).
  * GPT-J's collection patience (CounterFact: 10 steps under the loss threshold before the
    greedy test) has no `CollectConfig` field; a fit stops as soon as every answer token is the
    argmax and the loss is below the threshold (a test the reference's greedy test would also
    pass), and `retry_steps=10` gives the fits that fail the test the reference's 10 more steps.
  * Llama-3's carry-over of the neuron's input half from edit to edit (a bug of the reference,
    METHOD.md §3.3b) is not available: every fit starts from the same initial neuron (a true
    reset), which with the reference's lr 0.02 fitted 0 of 32 edits on SmolLM2. The Llama-3
    configs keep lr 0.02 for 50 steps as the reference states; sweep it on a few hundred edits
    (`--config.collect.fit.learning_rate=...`) before a full run.
  * InfoNCE: the reference never zeroes its gradients, so its epoch counts do not transfer; with
    zeroed gradients step k of the reference applies about k(k+1)/2 plain gradients, hence 5000
    steps for its 100 zsRE epochs. Its CounterFact counts (5100-9600 epochs) would give tens of
    millions; 10000 steps are used, with the best step kept by held-out retrieval.

Model weights, encoder and data are named by Hugging Face hub name or local path; nothing is
downloaded by a run. A hub name is read from the local Hugging Face cache
(`huggingface-cli download NAME` once, on a machine with network); otherwise the error says what
to place where. Datasets resolve through `meg_jax.data.locate` (named canonical files are
downloaded once when online).

The `:tiny` variant keeps every section and switch of the paper config and shrinks the sizes:
`host=PATH` (else `$MEG_JAX_TINY_HOSTS/<model>`, e.g. a directory written by tests/hf_tiny.py
with a GPT-2 tokenizer saved beside it), the embedded MiniLM encoder, the shared data
(../shared/data: CounterFact edit/train splits; zsRE's 1k MEND file for the edits and, from its
other end, the pseudo-edits), DiT "tiny" and a few steps. A random model cannot be made to state
a fact by one neuron, so the tiny run takes a given bank (`bank=PATH`, else
`$MEG_JAX_TINY_HOSTS/<model>/bank-<dataset>.npz` when it exists); without one it collects with
the paper's schedule cut to a few steps (every fit then fails, and the generator has nothing to
learn from).
"""

import math
import os
from pathlib import Path

import ml_collections

from meg_jax.infra.config import parse_arg

PAPER_N = (1024, 2048, 4096, 10000)
DATASETS = ("zsre", "counterfact")
TINY_HOSTS_ENV = "MEG_JAX_TINY_HOSTS"

# §2.1: hub id, neuron layer (0-indexed), the neuron's activation ("model": the MLP's own
# gelu_new for GPT-J and Phi-2; "identity": the reference's linear Llama `extra_proj`), template.
# Llama-3 is the Instruct model, as the reference's code loads (§2.1 [C]).
MODELS = {
    "gptj": dict(hub="EleutherAI/gpt-j-6B", layer=9, activation="model", template="gptj"),
    "phi2": dict(hub="microsoft/phi-2", layer=29, activation="model", template="phi2"),
    "llama3": dict(
        hub="meta-llama/Meta-Llama-3-8B-Instruct",
        layer=14,
        activation="identity",
        template="llama3",
    ),
}

# §3.2: the reference's collection (plain SGD, batch of one edit there; fits are independent
# rows here, so `batch_size` only sets how many run at once).
COLLECT = {
    # lr 0.07, CosineAnnealingLR(T_max=500); zsRE: at most 500 steps, stop once loss < 0.35,
    # then the greedy test, 10 more steps if it fails.
    ("gptj", "zsre"): dict(
        learning_rate=0.07,
        schedule="cosine",
        cosine_period=500,
        steps=500,
        early_stop=True,
        stop_loss=0.35,
        retry_steps=10,
    ),
    # CounterFact: at most 200 steps, loss threshold 0.2 (patience 10: not available).
    ("gptj", "counterfact"): dict(
        learning_rate=0.07,
        schedule="cosine",
        cosine_period=500,
        steps=200,
        early_stop=True,
        stop_loss=0.2,
        retry_steps=10,
    ),
    # lr 0.01 constant; greedy test at step 80, the failed fits continue to 160 and are retested.
    ("phi2", "zsre"): dict(learning_rate=0.01, steps=80, retry_steps=80),
    ("phi2", "counterfact"): dict(learning_rate=0.01, steps=80, retry_steps=80),
    # lr 0.02 for 50 steps, one test.
    ("llama3", "zsre"): dict(learning_rate=0.02, steps=50),
    ("llama3", "counterfact"): dict(learning_rate=0.02, steps=50),
}

# §2.3: router epochs per N in PAPER_N.
ROUTER_EPOCHS = {
    ("gptj", "zsre"): (1800, 3600, 3700, 4000),
    ("gptj", "counterfact"): (1300, 1600, 1300, 4000),
    ("phi2", "zsre"): (1800, 1400, 2100, 4000),
    ("phi2", "counterfact"): (1200, 2200, 3000, 4000),
    ("llama3", "zsre"): (1000, 4000, 3100, 3800),
    ("llama3", "counterfact"): (1400, 1300, 1900, 3800),
}

# §2.3: the reference's entropy thresholds (evaluate/classifier_test.py).
THRESHOLDS = {
    ("gptj", "zsre"): 0.3,
    ("gptj", "counterfact"): 0.7,
    ("phi2", "zsre"): 0.1,
    ("phi2", "counterfact"): 0.1,
    ("llama3", "zsre"): 0.3,
    ("llama3", "counterfact"): 0.6,
}

# §4.4: the reference's DiT batch for N <= 4096 and for N = 10000 (global, over its GPUs).
GENERATOR_BATCH = {
    ("gptj", "zsre"): (255, 5000),
    ("gptj", "counterfact"): (255, 5000),
    ("phi2", "zsre"): (512, 1000),
    ("phi2", "counterfact"): (512, 5000),
    ("llama3", "zsre"): (255, 255),
    ("llama3", "counterfact"): (255, 255),
}
MAX_GENERATOR_BATCH = 1024
# §4.4: the epoch of the checkpoint the reference evaluates (Phi-2: 30000, GPT-J: 50000; none
# is named for Llama-3, which gets GPT-J's); training stops earlier at the criterion.
GENERATOR_EPOCHS = {"gptj": 50_000, "phi2": 30_000, "llama3": 50_000}
FAST_EPOCHS = 3000  # the fast recipe's length on the SmolLM2 bank (whole bank per step)

# §2.2: bert-base-uncased with the reference's temperature; steps as the module docstring says.
ENCODER = "bert-base-uncased"
INFONCE_STEPS = {"zsre": 5000, "counterfact": 10_000}

# §1.4: the edit sets and the disjoint pseudo-edit sets.
DATA = {
    "zsre": dict(
        # Merged, then deduplicated by subject (meg_jax.data.sources, DataConfig).
        edits="zsre/zsre_mend_eval.json+zsre/zsre_mend_train_10000.json",
        # Less every subject of the edit files (meg_jax.data.sources.pseudo_split).
        pseudo="zsre/zsre_mend_train.json",
        n_pseudo_pairs=4000,  # one MEND rephrase per record (the docstring)
    ),
    "counterfact": dict(
        # The MEMIT split (20,877 records): the first N are edited, the last 2000 (before the
        # calibration records) are the pseudo-edits.
        edits="counterfact/multi_counterfact.json",
        pseudo="counterfact/multi_counterfact.json",
        n_pseudo_pairs=2000,
    ),
}
TINY_DATA = {
    "zsre": dict(edits="zsre/zsre_mend_train-1k.json", pseudo="zsre/zsre_mend_train-1k.json"),
    "counterfact": dict(
        edits="counterfact/counterfact-edit.json", pseudo="counterfact/counterfact-train.json"
    ),
}
TINY_EDITS = 4


def paper_config(model: str, dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of MeG on `model` ("gptj", "phi2", "llama3") and `dataset` ("zsre",
    "counterfact") for the variant string `arg` (module docstring)."""
    if model not in MODELS or dataset not in DATASETS:
        raise ValueError(f"paper_config: no settings for {model!r} on {dataset!r}")
    v = parse_arg(
        arg,
        n=PAPER_N[0],
        generator="reference",
        calibrate=True,
        dtype="bfloat16",
        tiny=False,
        gen_batch=0,
        host="",
        bank="",
        rephrases="",
    )
    if v.n not in PAPER_N and not v.tiny:
        raise ValueError(
            f"variant n={v.n}: the paper's settings exist for n in {PAPER_N} (router epochs and "
            "generator batches per scale); choose one of them"
        )
    if (v.host or v.bank) and not v.tiny:
        raise ValueError("variants host= and bank= belong to the :tiny variant")
    key, m = (model, dataset), MODELS[model]
    scale = PAPER_N.index(v.n) if v.n in PAPER_N else 0
    c = ml_collections.ConfigDict()
    c.workdir = f"runs/{model}_{dataset}_n{v.n}" + ("_tiny" if v.tiny else "")
    c.seed = 0
    c.evaluate = True
    c.mesh_data = -1
    c.mesh_model = 1  # `python -m meg_jax.plan --config ...` says when a device needs more
    c.host = dict(
        name=m["hub"],
        neuron_layer=m["layer"],
        neuron_activation=m["activation"],
        dtype=v.dtype,
        template=m["template"],
    )
    c.data = dict(
        kind=dataset,
        n_edits=v.n,
        n_val_pairs=200,
        n_calibration=256,
        max_prompt_tokens=256,
        **DATA[dataset],
    )
    if v.rephrases:
        # Two rephrases per pseudo-edit record, as the reference pairs its GLM rephrases.
        c.data.update(rephrases=v.rephrases, n_pseudo_pairs=2000)
    c.encoder = dict(
        path=ENCODER,
        n_top_layers=1,  # only encoder.layer.11 is trained
        batch_size=256,
        infonce=dict(
            temperature=1.0,
            learning_rate=1e-4,
            # The reference's one 4000-pair batch, less the held-out pairs (a power of two, so
            # it splits over any data axis).
            batch_size=2048,
            num_steps=INFONCE_STEPS[dataset],
            eval_every=100,
        ),
    )
    c.router = dict(
        calibrate=v.calibrate,
        train=dict(
            num_epochs=ROUTER_EPOCHS[key][scale],
            batch_size=2000 if v.n == 10000 else 1024,
            learning_rate=1e-3,
            seed=42,
            threshold=THRESHOLDS[key],
        ),
    )
    c.collect = dict(
        bank="",
        fit=dict(
            optimizer="sgd",
            max_new_tokens=20,
            seed=42,
            batch_size=64,
            min_batch=8,
            check_every=2,
            chunk_size=256,
            **COLLECT[key],
        ),
    )
    c.generator = dict(
        preset=v.generator,
        dit_preset="DiT-B",
        overrides=_generator_overrides(key, v.n, v.generator, v.gen_batch),
    )
    # AG reads at most 20 new tokens (§1.3). Phi-2's reference generates to 200 tokens in all
    # with no cut; a continuation longer than 20 tokens cannot equal a short target either way.
    c.evaluation = dict(batch_size=64, max_new_tokens=20, tf_mode="reference")
    if v.tiny:
        _shrink(c, model, dataset, v)
    return c


def _generator_overrides(key, n: int, preset: str, given_batch: int) -> dict:
    # The reference's global batch of 5000 (1000 per GPU) plans at 462 GiB of activations on one
    # device with DiT-B (57 GiB per chip of a v5e-8): no device set holds it, so the batch is at
    # most 1024, the reference's per-GPU share rounded to a power of two.
    batch = min(GENERATOR_BATCH[key][1 if n == 10000 else 0], MAX_GENERATOR_BATCH)
    batch = given_batch or batch  # the number of epochs stays, so steps follow the batch
    per_epoch = math.ceil(n / batch)
    # Mixed precision as the reference's fp16 autocast: bfloat16 compute, float32 parameters.
    dit = {"compute_dtype": "bfloat16"}
    if preset == "reference":
        epochs, every = GENERATOR_EPOCHS[key[0]], 1000  # the criterion every 1000 epochs
    else:
        # The fast recipe's condition handling with DiT-B's width: unit-scale conditions
        # (sqrt(768)), no dropout on them.
        dit.update(cond_scale=round(math.sqrt(768), 2), cond_dropout=0.0)
        epochs, every = FAST_EPOCHS, 500
    return {
        "dit": dit,
        "train": {
            "batch_size": batch,
            "num_steps": epochs * per_epoch,
            "eval_every": every * per_epoch,
            "checkpoint_every": every * per_epoch,
        },
    }


def _tiny_path(model: str, given: str, name: str) -> str:
    if given:
        return given
    root = os.environ.get(TINY_HOSTS_ENV, "")
    if not root:
        raise ValueError(
            f"the :tiny variant needs a tiny {model} model: give host=PATH, or set "
            f"${TINY_HOSTS_ENV} to a folder holding {model}/ (tests/hf_tiny.py writes one)"
        )
    return str(Path(root) / model / name) if name else str(Path(root) / model)


def _shrink(c: ml_collections.ConfigDict, model: str, dataset: str, v) -> None:
    """The `:tiny` sizes: every section kept, minutes on a CPU (module docstring)."""
    c.host.name = _tiny_path(model, v.host, "")
    c.host.neuron_layer = 1
    c.host.dtype = "float32"
    c.mesh_data = 1
    c.data.update(
        n_edits=TINY_EDITS, n_pseudo_pairs=24, n_val_pairs=8, n_calibration=8, **TINY_DATA[dataset]
    )
    c.encoder.path = "minilm"
    c.encoder.batch_size = 32
    c.encoder.infonce.update(num_steps=2, eval_every=1, batch_size=8)
    c.router.train.update(num_epochs=5, batch_size=32, save_every=5, log_every=5)
    bank = v.bank
    if not bank and os.environ.get(TINY_HOSTS_ENV):
        candidate = Path(_tiny_path(model, "", f"bank-{dataset}.npz"))
        bank = str(candidate) if candidate.is_file() else ""
    c.collect.bank = bank
    fit = c.collect.fit
    fit.update(steps=4, retry_steps=min(fit.get("retry_steps", 0), 2), batch_size=4, min_batch=4)
    fit.update(chunk_size=16, max_new_tokens=4, check_every=2)
    c.generator.dit_preset = "tiny"
    tiny_steps = {"num_steps": 4, "eval_every": 2, "checkpoint_every": 2, "batch_size": 0}
    c.generator.overrides = {
        "train": {**tiny_steps, "criterion_sampler": {"steps": 10}},
        "sampler": {"steps": 10},
    }
    c.evaluation.update(batch_size=8, max_new_tokens=4)
