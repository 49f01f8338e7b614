"""The command line: config files laid over the defaults, overrides of any field, clear errors."""

import subprocess
import sys
import textwrap

import pytest

from meg_jax.pipeline.cli import ConfigError, load_config
from meg_jax.pipeline.config import PipelineConfig


def _file(tmp_path, body: str):
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


MINIMAL = """
    def get_config(arg=None):
        n = int(arg.split("=")[1]) if arg else 4
        return {"workdir": "runs/x", "data": {"n_edits": n}}
"""


def test_fields_the_file_does_not_set_can_be_overridden(tmp_path):
    spec = _file(tmp_path, MINIMAL)
    cfg, verbosity = load_config(
        [
            "--config",
            spec + ":n=7",
            "--config.host.dtype=bfloat16",
            "--config.router.enabled=false",
            "--config.evaluation.stop_at_cut=False",
            "--config.evaluation.reuse_generation=0",
            "--config.mesh_data=2",
            "--config.generator.overrides={'train': {'num_steps': 3}}",
            "--verbosity=1",
        ]
    )
    assert isinstance(cfg, PipelineConfig) and verbosity == 1
    assert cfg.data.n_edits == 7 and cfg.host.dtype == "bfloat16"
    assert cfg.router.enabled is False and cfg.mesh_data == 2
    assert cfg.evaluation.stop_at_cut is False and cfg.evaluation.reuse_generation is False
    assert cfg.generator.overrides == {"train": {"num_steps": 3}}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.host.dtpye=float32"], r"config.host has no key 'dtpye'; expected one of"),
        (["--config.data.n_edits=many"], r"data.n_edits: expected a int"),
        (["--config.router.enabled=perhaps"], r"expected true or false"),
        (["--config.data.n_edits=0"], r"config.data.n_edits: expected at least 1"),
        (["--config.data.kind=wiki"], r"config.data.kind: expected one of"),
        (["--config.stage=everything"], r"config.stage: expected one of"),
        (["--config.evaluation.tf_mode=bogus"], r"tf_mode"),
        (["stray"], r"unexpected argument 'stray'"),
    ],
)
def test_bad_overrides_are_named(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", _file(tmp_path, MINIMAL), *args])


def test_unknown_key_in_the_file_is_named(tmp_path):
    spec = _file(tmp_path, 'def get_config(arg=None):\n    return {"colect": {}}\n')
    with pytest.raises(ConfigError, match=r"cfg.py: unknown config key 'colect'"):
        load_config(["--config", spec])


def test_train_answers_a_bad_config_in_one_line_before_any_work(tmp_path):
    spec = _file(tmp_path, MINIMAL)
    proc = subprocess.run(
        [sys.executable, "-m", "meg_jax.train", "--config", spec, "--config.bogus=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --config.bogus: config has no key 'bogus'")
    assert "Traceback" not in proc.stderr


def test_shipped_configs_load(tmp_path):
    for spec in (
        "configs/smollm2_cf.py",
        "configs/smollm2_cf.py:smoke",
        "configs/smollm2_cf.py:n=256",
    ):
        cfg, _ = load_config(["--config", spec])
        assert cfg.data.n_edits >= 1
