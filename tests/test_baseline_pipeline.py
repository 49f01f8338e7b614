"""Weight-editing baselines in the pipeline: `editor` = ft | memit | alphaedit trains the edits and
the baseline stage (`python -m meg_jax.train`), then `python -m meg_jax.evaluate` evaluates the
edited weights in the same evaluation stage as MeG; reruns skip; `load_editor` serves the result.

The CLI modules' main function (`meg_jax.pipeline.cli.main` with `run` / `evaluate`, what
`python -m meg_jax.train|evaluate` call) is run in-process. The plumbing runs on a tiny random
GPT-J (configs/baseline_gptj.py:tiny); that the evaluator sees the edits is shown on SmolLM2
(configs/baseline_smollm2.py:tiny), a model that can learn a fact.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hf_tiny import tiny_gptj
from tiny_run import make_tiny_host

from meg_jax.evaluate import evaluate
from meg_jax.inference.edited_model import EDITED_LAYERS, EditedLayers, load_editor
from meg_jax.infra.fingerprint import StageRecord
from meg_jax.pipeline import run
from meg_jax.pipeline.cli import main
from tests.conftest import REPO_ROOT

GPTJ = REPO_ROOT / "configs" / "baseline_gptj.py"
SMOLLM2 = REPO_ROOT / "configs" / "baseline_smollm2.py"


@pytest.fixture(scope="module")
def tiny_host(shared_data, tmp_path_factory) -> Path:
    """A tiny random GPT-J HF directory with the GPT-2 tokenizer."""
    return make_tiny_host(tmp_path_factory.mktemp("tiny_gptj"), shared_data, build=tiny_gptj)


def _args(spec: str, workdir: Path, *more: str) -> list[str]:
    return ["--config", spec, f"--config.workdir={workdir}", *more]


def _mtimes(workdir: Path) -> dict[str, int]:
    files = (EDITED_LAYERS, "baseline/stage.json", "baseline/info.json", "edits/stage.json")
    return {name: (workdir / name).stat().st_mtime_ns for name in files}


@pytest.fixture(scope="module")
def trained(tiny_host, tmp_path_factory):
    """`trained(method)`: (args, workdir) of the method's tiny GPT-J run after
    `python -m meg_jax.train`, run once per module; the first caller checks what train wrote
    before anything evaluates it (the test below; the rerun test reuses its MEMIT run)."""
    runs = {}

    def train(method: str) -> tuple[list[str], Path]:
        if method not in runs:
            workdir = tmp_path_factory.mktemp(f"gptj_{method}") / "run"
            args = _args(f"{GPTJ}:tiny,method={method},host={tiny_host}", workdir)
            assert main(args, run) == 0  # python -m meg_jax.train
            runs[method] = args, workdir
        return runs[method]

    return train


@pytest.mark.parametrize("method", ["ft", "memit", "alphaedit"])
def test_tiny_gptj_baseline_trains_evaluates_and_loads(method, trained, capsys):
    args, workdir = trained(method)
    # train ran the edits and baseline stages only, and wrote the edited layers.
    assert (workdir / "baseline" / "stage.json").is_file()
    assert not any((workdir / s).exists() for s in ("encoder", "router", "collect", "generator"))
    assert not (workdir / "summary.json").exists()  # train evaluates only when asked
    edited = EditedLayers.load(workdir / EDITED_LAYERS)
    assert edited.layers == ((1,) if method == "ft" else (0, 1))
    assert edited.param == "layers/mlp/fc_out/kernel"
    manifest = json.loads((workdir / "editor.json").read_text())
    assert manifest["editor"] == method

    before = _mtimes(workdir)
    capsys.readouterr()
    assert main(args, evaluate) == 0, capsys.readouterr()  # python -m meg_jax.evaluate
    out = capsys.readouterr().out
    label = {"ft": "FT-L", "memit": "MEMIT", "alphaedit": "AlphaEdit"}[method]
    assert f"edited model ({label})" in out and "unedited model" in out
    summaries = json.loads((workdir / "summary.json").read_text())
    assert set(summaries) == {"unedited", method}
    assert summaries[method]["n_records"] == 4 and "classic" in summaries[method]
    if method != "ft":  # the edited row ran the edited weights (FT-L's 5e-5 box may not show)
        assert summaries[method]["classic"] != summaries["unedited"]["classic"]
    assert (workdir / "evaluation" / method / "summary.json").is_file()
    assert _mtimes(workdir) == before  # evaluate read the baseline stage back, edited nothing

    # load_editor: the host with the edited layers, every query with the zero neuron.
    model = load_editor(workdir, batch_size=8)
    kernel = np.asarray(model.runner.params["layers"]["mlp"]["fc_out"]["kernel"])
    for k, layer in enumerate(edited.layers):
        np.testing.assert_array_equal(kernel[layer], edited.values[k])
    prompts = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of"]
    assert not model.routed(prompts).any()
    assert not np.asarray(model.neurons(prompts).w_in).any()
    assert len(model.generate(prompts, max_new_tokens=3)) == 2


def test_rerun_skips_and_changed_settings_are_refused(trained, capsys):
    # The MEMIT run of the test above (trained, then evaluated: train and evaluate in one
    # command, `--config.evaluate=true`, is the SmolLM2 test's below).
    args, workdir = trained("memit")
    if not (workdir / "summary.json").exists():  # this test alone
        assert main(args, evaluate) == 0, capsys.readouterr()
    first = json.loads((workdir / "summary.json").read_text())
    before = _mtimes(workdir) | {"summary.json": (workdir / "summary.json").stat().st_mtime_ns}
    capsys.readouterr()
    assert main([*args, "--config.evaluate=true"], run) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") >= 3, out  # edits, baseline, evaluation
    after = _mtimes(workdir) | {"summary.json": (workdir / "summary.json").stat().st_mtime_ns}
    assert after == before
    assert json.loads((workdir / "summary.json").read_text()) == first
    # A changed setting of the method is a changed input: refused, then redone with retrain.
    changed = [*args, "--config.baseline.memit.mom2_update_weight=10.0"]
    assert main(changed, run) == 1
    assert "baseline" in capsys.readouterr().err
    assert main([*changed, "--config.baseline.retrain=true"], run) == 0
    record = StageRecord.read(workdir / "baseline")
    assert record.finished and record.inputs.config["memit"]["mom2_update_weight"] == 10.0
    # Another method's section is not an input of this one.
    assert main([*changed, "--config.baseline.alphaedit.l2=1.0"], run) == 0


def test_editors_of_the_same_edits_share_one_unedited_evaluation(trained, tmp_path, capsys):
    """With `evaluation.unedited_cache`, the second editor's evaluation reads the unedited
    model's readings the first one computed (a marker planted in the cache shows it read them,
    not recomputed equal ones); a changed evaluator setting is another entry."""
    cache = tmp_path / "unedited"

    def evaluate_copy(method: str, *more: str) -> dict:
        args, workdir = trained(method)
        copy = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        shutil.copytree(workdir, copy)
        shutil.rmtree(copy / "evaluation", ignore_errors=True)  # evaluated afresh
        cached = [f"--config.evaluation.unedited_cache={cache}", *more]
        assert main([*args, f"--config.workdir={copy}", *cached], evaluate) == 0
        capsys.readouterr()
        return json.loads((copy / "summary.json").read_text())

    first = evaluate_copy("ft")
    (entry,) = cache.iterdir()
    assert first["unedited"] == json.loads((entry / "summary.json").read_text())
    planted = first["unedited"] | {"planted": 1.0}
    (entry / "summary.json").write_text(json.dumps(planted))
    second = evaluate_copy("alphaedit")
    assert second["unedited"] == planted
    assert second["alphaedit"] != first["ft"]  # the edited rows are each editor's own
    other = evaluate_copy("ft", "--config.evaluation.match_rule=startswith")
    assert "planted" not in other["unedited"] and len(list(cache.iterdir())) == 2


def test_a_meg_stage_is_refused_for_a_baseline_editor(tiny_host, tmp_path, capsys):
    args = _args(f"{GPTJ}:tiny,host={tiny_host}", tmp_path / "run", "--config.stage=router")
    assert main(args, run) == 2
    assert "editor memit" in capsys.readouterr().err
    assert main(["--config", str(GPTJ), "--config.editor=rome"], run) == 2


def test_smollm2_memit_tiny_edits_are_seen_by_the_evaluator(shared_data, tmp_path, capsys):
    from meg_jax.checkpoints.hosts import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    workdir = tmp_path / "run"
    # Train and evaluate in one command (`python -m meg_jax.train --config.evaluate=true`): one
    # host load and one runner for the edits stage's answers and the evaluation (the separate
    # `python -m meg_jax.evaluate` is the tiny GPT-J test's above).
    args = _args(f"{SMOLLM2}:tiny,method=memit", workdir, "--config.evaluate=true")
    assert main(args, run) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "edited model (MEMIT)" in out and "unedited model" in out
    summaries = json.loads((workdir / "summary.json").read_text())
    before, after = summaries["unedited"], summaries["memit"]
    assert before["rel_ag"] == 0.0  # CounterFact's targets are counterfactual
    # The edited weights read the new targets under teacher forcing (the tiny variant's short
    # fit reaches about 60 % on SmolLM2), and the classic protocol agrees.
    assert after["rel_tf"] >= before["rel_tf"] + 25, summaries
    assert after["classic"]["EM"] > before["classic"]["EM"], summaries


def test_edited_layers_round_trip_and_guards(tmp_path):
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    params = {
        "embed": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
        "layers": {"mlp": {"down": {"kernel": jnp.asarray(rng.normal(size=(3, 6, 4)))}}},
    }
    kernel = params["layers"]["mlp"]["down"]["kernel"]
    new = kernel.at[1].add(1.0)
    edited = {**params, "layers": {"mlp": {"down": {"kernel": new}}}}
    layers = EditedLayers.between(params, edited, "layers/mlp/down/kernel", [1])
    assert not layers.same_as(params) and layers.same_as(edited)
    layers.save(tmp_path / "e.msgpack")
    back = EditedLayers.load(tmp_path / "e.msgpack")
    assert back.layers == (1,) and back.param == "layers/mlp/down/kernel"
    applied = back.apply(params)
    np.testing.assert_array_equal(applied["layers"]["mlp"]["down"]["kernel"], new)
    assert applied["embed"] is params["embed"]  # shared, not copied
    # An edit that also changed another parameter is not representable: refused.
    with pytest.raises(ValueError, match="embed"):
        EditedLayers.between(params, {**edited, "embed": params["embed"] + 1}, back.param, [1])
    with pytest.raises(ValueError, match="another host"):
        back.apply({**params, "layers": {"mlp": {"down": {"kernel": kernel[:1]}}}})
    with pytest.raises(FileNotFoundError, match="baseline stage"):
        EditedLayers.load(tmp_path / "missing.msgpack")
