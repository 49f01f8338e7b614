"""The paper's configs (configs/{gptj,phi2,llama3}_{zsre,counterfact}.py): settings, variants,
hub names offline, `python -m meg_jax.plan --config`, and each `:tiny` variant end to end.

The tiny runs use random GPT-J, Phi and Llama models of the same architecture as the paper's
hosts (tests/hf_tiny.py, GPT-2 vocabulary and tokenizer). A random model cannot be made to state a
fact by one neuron, so each run is given a bank of random neurons marked fitted (as
test_pipeline.py does); every other stage runs with the config's own switches.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from hf_tiny import tiny_gptj, tiny_llama, tiny_phi
from transformers import AutoTokenizer

from meg_jax.checkpoints.errors import CheckpointError
from meg_jax.checkpoints.hosts import encoder_path, load_host
from meg_jax.collect.bank import WeightBank, save_bank
from meg_jax.data.readers import read_edits
from meg_jax.evaluate import evaluate
from meg_jax.pipeline import run
from meg_jax.pipeline.cli import ConfigError, load_config
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
MODELS = ("gptj", "phi2", "llama3")
DATASETS = ("zsre", "counterfact")
PAPER = [(m, d) for m in MODELS for d in DATASETS]
GPT2_VOCAB = 50257

# METHOD.md, written out again here so that a wrong table in configs/paper.py fails:
# (neuron layer, activation, template, hub id) per model (§2.1);
HOSTS = {
    "gptj": (9, "model", "gptj", "EleutherAI/gpt-j-6B"),
    "phi2": (29, "model", "phi2", "microsoft/phi-2"),
    "llama3": (14, "identity", "llama3", "meta-llama/Meta-Llama-3-8B-Instruct"),
}
# (lr, schedule, steps, retry_steps, early_stop, stop_loss) (§3.2);
COLLECT = {
    ("gptj", "zsre"): (0.07, "cosine", 500, 10, True, 0.35),
    ("gptj", "counterfact"): (0.07, "cosine", 200, 10, True, 0.2),
    ("phi2", "zsre"): (0.01, "constant", 80, 80, False, None),
    ("phi2", "counterfact"): (0.01, "constant", 80, 80, False, None),
    ("llama3", "zsre"): (0.02, "constant", 50, 0, False, None),
    ("llama3", "counterfact"): (0.02, "constant", 50, 0, False, None),
}
# the reference's entropy threshold and router epochs at N = 1024, 2048, 4096, 10000 (§2.3).
ROUTER = {
    ("gptj", "zsre"): (0.3, (1800, 3600, 3700, 4000)),
    ("gptj", "counterfact"): (0.7, (1300, 1600, 1300, 4000)),
    ("phi2", "zsre"): (0.1, (1800, 1400, 2100, 4000)),
    ("phi2", "counterfact"): (0.1, (1200, 2200, 3000, 4000)),
    ("llama3", "zsre"): (0.3, (1000, 4000, 3100, 3800)),
    ("llama3", "counterfact"): (0.6, (1400, 1300, 1900, 3800)),
}
SCALES = (1024, 2048, 4096, 10000)


def _spec(model: str, dataset: str, variant: str = "") -> str:
    path = str(CONFIGS / f"{model}_{dataset}.py")
    return f"{path}:{variant}" if variant else path


@pytest.mark.parametrize("model,dataset", PAPER)
def test_paper_config_loads_every_scale_with_the_papers_settings(model, dataset):
    layer, activation, template, hub = HOSTS[model]
    lr, schedule, steps, retry, early, stop_loss = COLLECT[model, dataset]
    threshold, epochs = ROUTER[model, dataset]
    for i, n in enumerate(SCALES):
        cfg, _ = load_config(["--config", _spec(model, dataset, f"n={n}")])
        assert cfg.host.name == hub and cfg.host.template == template
        assert (cfg.host.neuron_layer, cfg.host.neuron_activation) == (layer, activation)
        assert cfg.data.kind == dataset and cfg.data.n_edits == n
        fit = cfg.collect.fit
        assert (fit.learning_rate, fit.schedule, fit.steps, fit.retry_steps) == (
            lr,
            schedule,
            steps,
            retry,
        )
        assert fit.optimizer == "sgd" and fit.early_stop == early
        if early:
            assert fit.stop_loss == stop_loss
        if schedule == "cosine":
            assert fit.cosine_period == 500
        assert cfg.router.train.threshold == threshold
        assert cfg.router.train.num_epochs == epochs[i]
        assert cfg.router.train.batch_size == (2000 if n == 10000 else 1024)
        assert cfg.router.calibrate  # ours by default, the reference's with calibrate=false
        assert cfg.encoder.path == "bert-base-uncased"
        assert cfg.encoder.infonce.temperature == 1.0
        gen = cfg.generator.build()
        assert cfg.generator.preset == "reference" and cfg.generator.dit_preset == "DiT-B"
        assert (gen.dit.hidden, gen.dit.depth, gen.dit.heads, gen.dit.patch_size) == (
            768,
            12,
            12,
            100,
        )
        # Minibatches, never the whole 10,000-row bank: the reference's (255 / 512, and 1000
        # for Phi-2 zsRE at 10k) up to 1024 (its global 5000 fits no device, configs/paper.py).
        reference = {"gptj": 255, "phi2": 512, "llama3": 255}[model]
        if n == 10000 and model != "llama3":
            reference = 1000 if (model, dataset) == ("phi2", "zsre") else 1024
        assert gen.train.batch_size == reference
        assert gen.train.num_steps % -(-n // reference) == 0  # whole epochs
    small, _ = load_config(["--config", _spec(model, dataset, "n=4096,gen_batch=128")])
    train = small.generator.build().train
    epochs = {"gptj": 50_000, "phi2": 30_000, "llama3": 50_000}[model]  # §4.4
    assert train.batch_size == 128 and train.num_steps == epochs * 4096 // 128
    fast, _ = load_config(["--config", _spec(model, dataset, "generator=fast,calibrate=false")])
    assert fast.generator.build().diffusion.prediction == "x0"
    assert not fast.router.calibrate


def test_variants_that_do_not_exist_are_refused():
    with pytest.raises(ConfigError, match=r"n in \(1024, 2048, 4096, 10000\)"):
        load_config(["--config", _spec("gptj", "zsre", "n=1000")])
    with pytest.raises(ConfigError, match="unknown config variant 'nn'"):
        load_config(["--config", _spec("phi2", "zsre", "nn=1024")])
    with pytest.raises(ConfigError, match="belong to the :tiny variant"):
        load_config(["--config", _spec("phi2", "zsre", "host=/x")])


def test_main_job_fit_variant_picks_the_collection_recipe():
    default, _ = load_config(["--config", _spec("smollm2", "cf")])
    nsgd, _ = load_config(["--config", _spec("smollm2", "cf", "fit=nsgd")])
    assert (default.collect.fit.optimizer, default.collect.fit.learning_rate) == ("adam", 0.1)
    assert (nsgd.collect.fit.optimizer, nsgd.collect.fit.learning_rate) == ("nsgd", 1.0)
    assert nsgd.collect.fit.early_stop and nsgd.collect.fit.stop_loss == 0.2
    assert nsgd.workdir != default.workdir  # another bank: never the default's stages
    with pytest.raises(ConfigError, match="fit='lbfgs'"):
        load_config(["--config", _spec("smollm2", "cf", "fit=lbfgs")])


def test_main_job_ctx_variant_fits_behind_contexts_in_its_own_workdir():
    default, _ = load_config(["--config", _spec("smollm2", "cf")])
    ctx, _ = load_config(["--config", _spec("smollm2", "cf", "ctx=2")])
    assert tuple(default.collect.fit.context_seeds) == ()
    assert tuple(ctx.collect.fit.context_seeds) == ("The", "Therefore")
    assert ctx.collect.fit.optimizer == "adam" and ctx.workdir.endswith("_ctx2")
    with pytest.raises(ConfigError, match="ctx=6"):
        load_config(["--config", _spec("smollm2", "cf", "ctx=6")])


def test_main_job_gate_and_condition_noise_variants_in_their_own_workdir():
    default, _ = load_config(["--config", _spec("smollm2", "cf")])
    both, _ = load_config(["--config", _spec("smollm2", "cf", "gate=nearest,cn=0.3")])
    off, _ = load_config(["--config", _spec("smollm2", "cf", "cn=0")])
    # The recipe's condition noise (the reference's condition dropout, in Gaussian form).
    assert default.router.kind == "familiarity" and default.generator.build().dit.cond_noise == 0.5
    assert both.router.kind == "nearest" and both.generator.build().dit.cond_noise == 0.3
    assert both.workdir == default.workdir + "_nearest_cn0.3"
    assert off.generator.build().dit.cond_noise == 0 and off.workdir == default.workdir + "_cn0"
    smoke, _ = load_config(["--config", _spec("smollm2", "cf", "smoke,cn=0.3")])
    assert smoke.generator.build().dit.cond_noise == 0.3
    assert smoke.generator.build().train.num_steps == 300  # the smoke budget is kept
    with pytest.raises(ConfigError, match="router.kind: expected one of"):
        load_config(["--config", _spec("smollm2", "cf", "gate=knn")])


def test_tiny_without_a_model_says_where_to_put_one(monkeypatch):
    monkeypatch.delenv("MEG_JAX_TINY_HOSTS", raising=False)
    with pytest.raises(ConfigError, match=r"host=PATH.*\$MEG_JAX_TINY_HOSTS.*llama3/"):
        load_config(["--config", _spec("llama3", "counterfact", "tiny")])


def test_hub_names_offline_name_what_to_place_where(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        load_host("EleutherAI/gpt-j-6B")
    message = str(err.value)
    assert "hf download EleutherAI/gpt-j-6B" in message
    assert "--config.host.name=DIR" in message and "config.json" in message
    with pytest.raises(CheckpointError, match=r"--config\.encoder\.path=DIR"):
        encoder_path("bert-base-uncased")
    # A path that is not a hub name keeps its own message.
    with pytest.raises(CheckpointError, match="not a registered host"):
        load_host(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# Tiny hosts and banks, then every config's :tiny variant trained and evaluated.

BUILDERS = {"gptj": tiny_gptj, "phi2": tiny_phi, "llama3": tiny_llama}


@pytest.fixture(scope="module")
def tiny_hosts(shared_data, tmp_path_factory):
    """A folder with gptj/, phi2/, llama3/ (tiny random HF models, GPT-2 tokenizer) and, in
    each, bank-zsre.npz and bank-counterfact.npz: random neurons for the first edits, fitted."""
    root = tmp_path_factory.mktemp("tiny_hosts")
    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2", local_files_only=True)
    files = {
        "zsre": shared_data / "zsre" / "zsre_mend_train-1k.json",
        "counterfact": shared_data / "counterfact" / "counterfact-edit.json",
    }
    ids = {
        d: np.asarray([r.id for r in read_edits(f, limit=32)], np.int64) for d, f in files.items()
    }
    rng = np.random.default_rng(0)
    for model, build in BUILDERS.items():
        path = root / model
        build(path, vocab=GPT2_VOCAB)
        tok.save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        config.update(eos_token_id=50256, bos_token_id=50256, pad_token_id=50256)
        (path / "config.json").write_text(json.dumps(config))
        width = 2 * config.get("hidden_size", config.get("n_embd")) + (model != "llama3")
        for dataset, case_ids in ids.items():
            save_bank(
                WeightBank(
                    case_ids,
                    rng.normal(size=(len(case_ids), width)).astype(np.float32) * 0.1,
                    np.ones(len(case_ids), bool),
                    np.zeros(len(case_ids), np.float32),
                    np.zeros(width, np.float32),
                ),
                path / f"bank-{dataset}.npz",
            )
    return root


def _tiny_config(model, dataset, tiny_hosts, workdir):
    """The `:tiny` variant's config, after checking that it keeps the paper config's switches
    and swaps only the sizes and the model."""
    cfg, _ = load_config(["--config", _spec(model, dataset, "tiny"), f"--config.workdir={workdir}"])
    assert cfg.host.name == str(tiny_hosts / model)
    assert cfg.host.template == HOSTS[model][2]
    assert cfg.host.neuron_activation == HOSTS[model][1]
    assert cfg.collect.bank == str(tiny_hosts / model / f"bank-{dataset}.npz")
    assert cfg.data.kind == dataset and cfg.generator.dit_preset == "tiny"
    assert cfg.router.train.threshold == ROUTER[model, dataset][0]
    return cfg


@pytest.mark.parametrize("model,dataset", PAPER)
def test_tiny_variant_keeps_the_paper_switches(model, dataset, tiny_hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("MEG_JAX_TINY_HOSTS", str(tiny_hosts))
    _tiny_config(model, dataset, tiny_hosts, tmp_path / "run")


# Trained and evaluated end to end: each architecture once, each dataset at least once (zsRE,
# whose reading and preprocessing are the longer path, twice). A (model, dataset) pair runs the
# model's code path and the dataset's, nothing of their combination: under :tiny the pair's
# collection recipe goes unused (the bank is given), its generator overrides are replaced by the
# tiny ones, and its router threshold is checked above for all six pairs. The other three pairs
# repeated programs already run (measured back to back: 178 s -> 120 s for this file).
TINY_RUNS = [("gptj", "zsre"), ("phi2", "counterfact"), ("llama3", "zsre")]


@pytest.mark.parametrize("model,dataset", TINY_RUNS)
def test_tiny_variant_trains_then_evaluates(model, dataset, tiny_hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("MEG_JAX_TINY_HOSTS", str(tiny_hosts))
    cfg = _tiny_config(model, dataset, tiny_hosts, tmp_path / "run")
    lineages = run(cfg, evaluate=False)  # python -m meg_jax.train
    assert {"encoder", "router", "collect"} <= set(lineages)
    summaries = evaluate(cfg)  # python -m meg_jax.evaluate
    assert summaries["unedited"]["loc_ag"] == 100.0  # the unedited model agrees with itself
    assert summaries["meg"]["n_records"] == cfg.data.n_edits
    for key in ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf"):
        assert 0.0 <= summaries["meg"][key] <= 100.0
    workdir = Path(cfg.workdir)
    assert (workdir / "generator" / "params.msgpack").is_file()
    assert (workdir / "router" / "calibration.json").is_file()
    edits = json.loads((workdir / "edits" / "edits.json").read_text())
    ids = [r["id"] for r in edits["records"]]
    if dataset == "zsre":
        # zsRE preprocessing ran: NQ locality prompts normalised (no "nq question:" prefix).
        assert all(not r["locality_prompts"][0].startswith("nq question") for r in edits["records"])
    assert len(ids) == cfg.data.n_edits


# ---------------------------------------------------------------------------------------------
# The weight-editing baselines' configs (trained and evaluated in test_baseline_pipeline.py).


@pytest.mark.parametrize("name", ["baseline_smollm2", "baseline_gptj"])
@pytest.mark.parametrize("variant", ["", "tiny", "method=ft", "method=alphaedit,n=8"])
def test_baseline_configs_load_in_the_pipeline_shape(name, variant):
    spec = str(CONFIGS / f"{name}.py") + (f":{variant}" if variant else "")
    cfg, _ = load_config(["--config", spec])
    method = "ft" if "ft" in variant else "alphaedit" if "alphaedit" in variant else "memit"
    b = cfg.baseline
    assert cfg.editor == method
    assert cfg.data.kind == "counterfact"
    default = 256 if name == "baseline_smollm2" else 1000
    assert cfg.data.n_edits == {"tiny": 4, "method=alphaedit,n=8": 8}.get(variant, default)
    assert b.memit.layers == tuple(sorted(b.memit.layers))
    assert b.edited_layers(method) == ((b.ft.layer,) if method == "ft" else b.memit.layers)
    if name == "baseline_gptj" and variant == "":  # the MEMIT / AlphaEdit papers' GPT-J settings
        assert b.memit.layers == (3, 4, 5, 6, 7, 8) and b.memit.mom2_update_weight == 15000.0
        t = b.memit.targets
        assert (t.lr, t.steps, t.weight_decay, t.clamp_norm_factor, t.kl_factor) == (
            0.5,
            25,
            0.5,
            0.75,
            0.0625,
        )
        assert (b.alphaedit.nullspace_threshold, b.alphaedit.l2) == (2e-2, 10.0)
        assert b.ft.layer == 21
    if name == "baseline_smollm2" and variant == "":  # the value the recorded sweep chose
        assert b.memit.layers == (4, 5, 6, 7, 8) and b.memit.mom2_update_weight == 1000.0
    with pytest.raises(ConfigError, match="lerning_rate"):
        load_config(["--config", spec, "--config.baseline.memit.targets.lerning_rate=1"])
    with pytest.raises(ConfigError, match=f"editor {method}"):
        load_config(["--config", spec, "--config.stage=generator"])  # a MeG stage


# ---------------------------------------------------------------------------------------------
# python -m meg_jax.plan --config


def test_plan_reads_host_and_sizes_from_a_paper_config():
    from meg_jax.plan import from_config

    planned = from_config(_spec("gptj", "zsre", "n=10000"))
    assert planned["name"] == "gpt-j-6b"  # the preset of the hub id, nothing loaded
    config = planned["lm_config"]
    assert (config.d_model, config.n_layers, config.neuron_layer) == (4096, 28, 9)
    assert planned["bank_edits"] == 10000
    assert planned["flags"]["generator_batch"] == 1024
    assert planned["flags"]["dit"] == "DiT-B" and planned["flags"]["mesh"] == (1, 1)
    llama = from_config(_spec("llama3", "counterfact"))
    assert llama["name"] == "llama-3-8b-instruct"
    assert llama["lm_config"].neuron_activation == "identity"


def test_plan_of_a_tiny_config_counts_the_tiny_models_parameters(tiny_hosts, tmp_path):
    from transformers import AutoModelForCausalLM

    from meg_jax.plan import main

    out = tmp_path / "plan.json"
    spec = _spec("gptj", "counterfact", f"tiny,host={tiny_hosts / 'gptj'}")
    assert main(["--config", spec, "--devices=", "--stages=collect", f"--json={out}"]) == 0
    plan = json.loads(out.read_text())
    assert plan["mesh"] == "1x1" and plan["dtype"] == "float32"
    assert plan["sizes"]["edits_batch"] == 4 and plan["sizes"]["cond_width"] == 384  # MiniLM
    model = AutoModelForCausalLM.from_pretrained(tiny_hosts / "gptj")
    n_params = sum(p.numel() for p in model.parameters())
    for program in plan["plan"][0]["programs"]:
        assert program["param_bytes"] == 4 * n_params, program["name"]
