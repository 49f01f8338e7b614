"""Runs over several seeds: one work directory per seed, the aggregate, reruns, shared stages.

The tiny run of tests/tiny_run.py (random tiny Llama, given bank, real MiniLM) twice, seeds 0
and 1; the readings of a random host mean nothing, the bookkeeping is what is checked.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tiny_run import make_given_bank, make_tiny_host, tiny_run_config

from meg_jax.infra.fingerprint import StageRecord
from meg_jax.pipeline import STAGES, pipeline_config, run
from meg_jax.pipeline.seeds import (
    adopt_shared,
    aggregate,
    flatten,
    run_seeds,
    seed_config,
    seed_workdir,
)
from meg_jax.seeds import parse_seeds

N_EDITS = 6  # as the other tiny runs (test_pipeline, test_distributed): the same programs
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def base_cfg(shared_data, tmp_path_factory):
    host = make_tiny_host(tmp_path_factory.mktemp("host"), shared_data)
    bank = make_given_bank(tmp_path_factory.mktemp("bank") / "bank.npz", shared_data, N_EDITS)
    workdir = tmp_path_factory.mktemp("seeds")
    return pipeline_config(tiny_run_config(shared_data, host, bank, workdir, N_EDITS))


@pytest.fixture(scope="module")
def seeded(base_cfg):
    return base_cfg, run_seeds(base_cfg, SEEDS)


def _records(workdir: Path) -> dict[str, bytes]:
    return {s: (workdir / s / "stage.json").read_bytes() for s in STAGES}


def test_seed_config_moves_every_training_seed_but_collection(base_cfg):
    zero, two = seed_config(base_cfg, 0), seed_config(base_cfg, 2)
    assert zero.workdir == str(Path(base_cfg.workdir) / "seed-0")
    # Seed 0 is the config as written (apart from its folder).
    assert dataclasses.replace(zero, workdir=base_cfg.workdir, generator=base_cfg.generator) == (
        base_cfg
    )
    assert zero.generator.build() == base_cfg.generator.build()
    assert two.seed == 2
    assert two.encoder.infonce.seed == base_cfg.encoder.infonce.seed + 2
    assert two.router.train.seed == base_cfg.router.train.seed + 2
    assert two.generator.build().train.seed == base_cfg.generator.build().train.seed + 2
    # The other generator overrides survive.
    assert two.generator.build().train.num_steps == base_cfg.generator.build().train.num_steps
    assert two.collect == base_cfg.collect


def test_two_seeds_two_runs_and_the_aggregate_is_numpy_mean_and_sample_std(seeded):
    cfg, result = seeded
    root = Path(cfg.workdir)
    assert result["seeds"] == list(SEEDS) and len(result["runs"]) == 2
    summaries = []
    for seed in SEEDS:
        workdir = seed_workdir(root, seed)
        assert json.loads((workdir / "config.json").read_text())["seed"] == seed
        summaries.append(json.loads((workdir / "summary.json").read_text()))
    # The unedited model was evaluated once (seed 0) and read back by seed 1.
    assert len(list((root / "unedited").iterdir())) == 1
    assert summaries[0]["unedited"] == summaries[1]["unedited"]
    written = json.loads((root / "seeds.json").read_text())
    assert (root / "seeds.png").stat().st_size > 0
    readings = written["readings"]
    flat = [flatten(s) for s in summaries]
    assert set(readings) == set(flat[0]) | set(flat[1])
    for key in ("meg.score", "meg.gen_ag", "unedited.loc_tf", "meg.routing.loc.routed"):
        assert key in readings
    for key, stat in readings.items():
        values = np.asarray([f[key] for f in flat if key in f])
        assert stat["n"] == len(values)
        assert stat["mean"] == pytest.approx(np.mean(values))
        assert stat["min"] == pytest.approx(values.min()) and stat["max"] == values.max()
        if len(values) == 2:
            assert stat["std"] == pytest.approx(np.std(values, ddof=1))
    # The seed changes the trained query side and generator, not the shared stages.
    d0, d1 = (seed_workdir(root, s) for s in SEEDS)
    for stage in ("encoder", "router", "generator"):
        assert _records(d0)[stage] != _records(d1)[stage]
    p0, p1 = (d / "generator" / "params.msgpack" for d in (d0, d1))
    assert p0.read_bytes() != p1.read_bytes()


def test_seed_free_stages_are_adopted_not_recomputed(seeded):
    cfg, result = seeded
    d0, d1 = (seed_workdir(cfg.workdir, s) for s in SEEDS)
    assert result["runs"][0]["adopted"] == []
    assert result["runs"][1]["adopted"] == ["edits", "collect"]
    for stage in ("edits", "collect"):  # adopted, then skipped by the pipeline: the same record
        assert _records(d0)[stage] == _records(d1)[stage]
    assert (d1 / "collect" / "bank.npz").read_bytes() == (d0 / "collect" / "bank.npz").read_bytes()
    assert not (d1 / "collect" / "runs").exists()  # the donor's checkpoints are not copied


def test_rerun_skips_every_stage(seeded):
    cfg, first = seeded
    before = {s: _records(seed_workdir(cfg.workdir, s)) for s in SEEDS}
    again = run_seeds(cfg, SEEDS)
    after = {s: _records(seed_workdir(cfg.workdir, s)) for s in SEEDS}
    assert before == after  # no stage was run again (a run rewrites its record)
    assert again["readings"] == first["readings"]
    assert again["runs"][1]["adopted"] == ["edits", "collect"]  # still known as adopted


def test_another_config_adopts_only_what_it_shares(seeded, tmp_path):
    cfg, _ = seeded
    donors = [seed_workdir(cfg.workdir, s) for s in SEEDS]
    # Another generator: the edits, the bank and the same seed's encoder are shared (the router
    # is trained per run).
    other = dataclasses.replace(
        cfg,
        workdir=str(tmp_path / "other"),
        generator=dataclasses.replace(cfg.generator, extend_steps=3),
    )
    scfg = seed_config(other, 1)
    workdir = Path(scfg.workdir)
    assert adopt_shared(workdir, dataclasses.asdict(scfg), donors) == [
        "edits",
        "encoder",
        "collect",
    ]
    encoder = (workdir / "encoder" / "stage.json").read_bytes()
    assert encoder == (donors[1] / "encoder" / "stage.json").read_bytes()  # seed 1's, not 0's
    run(dataclasses.replace(scfg, stage="encoder"))  # the pipeline skips what was adopted
    assert (workdir / "encoder" / "stage.json").read_bytes() == encoder
    # Different encoder settings: no encoder; more edits: the bank (extended later) and the
    # encoder, not the edits; fewer edits: no bank (its record would cover edits it lacks).
    infonce = dataclasses.replace(cfg.encoder.infonce, num_steps=5)
    changed = dataclasses.replace(other, encoder=dataclasses.replace(cfg.encoder, infonce=infonce))
    for n, data_change, expected in (
        (N_EDITS, changed, ["edits", "collect"]),
        (N_EDITS + 2, other, ["encoder", "collect"]),
        (N_EDITS - 2, other, ["encoder"]),
    ):
        c = seed_config(dataclasses.replace(data_change, workdir=str(tmp_path / f"n{n}")), 0)
        c = dataclasses.replace(c, data=dataclasses.replace(c.data, n_edits=n))
        got = adopt_shared(Path(c.workdir), dataclasses.asdict(c), donors)
        assert got == expected, (n, got)


def test_adopted_stage_never_replaces_a_different_record(seeded, tmp_path):
    cfg, _ = seeded
    d0 = seed_workdir(cfg.workdir, 0)
    scfg = seed_config(dataclasses.replace(cfg, workdir=str(tmp_path)), 0)
    workdir = Path(scfg.workdir)
    # A finished collect record of other inputs (another lineage) stays as it is.
    (workdir / "collect").mkdir(parents=True)
    donor = StageRecord.read(d0 / "collect")
    mine = dataclasses.replace(
        donor, inputs=dataclasses.replace(donor.inputs, config={**donor.inputs.config, "x": 1})
    )
    mine.write(workdir / "collect")
    assert "collect" not in adopt_shared(workdir, dataclasses.asdict(scfg), [d0])
    assert StageRecord.read(workdir / "collect").inputs.config["x"] == 1


def test_aggregate_handles_missing_readings_and_one_run():
    stats = aggregate([{"a": 1.0, "b": {"c": 2, "d": None, "e": True}}, {"a": 3.0}])
    assert set(stats) == {"a", "b.c"}
    assert stats["a"]["mean"] == 2.0 and stats["a"]["std"] == pytest.approx(np.sqrt(2.0))
    assert stats["b.c"] == {"mean": 2.0, "std": None, "min": 2.0, "max": 2.0, "n": 1,
                            "values": [2.0, None]}  # fmt: skip


def test_parse_seeds():
    assert parse_seeds(["--config", "x.py", "--seeds", "0,1,2"]) == (
        [0, 1, 2],
        ["--config", "x.py"],
    )
    assert parse_seeds(["--seeds=3", "--config.seed=1"]) == ([3], ["--config.seed=1"])
    for bad in (["--seeds", "0,0"], ["--seeds", "a"], ["--config", "x.py"], ["--seeds", "-1"]):
        with pytest.raises(ValueError):
            parse_seeds(bad)
