"""Multi-process runs: launch detection, and two local CPU processes equal one process.

Two levels: a toy sharded program, and the whole MeG pipeline (every stage, weight collection
fitted for real, then evaluation; then collection resumed) on the tiny run of tests/tiny_run.py,
as `python -m meg_jax.train` in two processes of one CPU device each against one process of two
devices: the same global ("data" 2 x "model" 1) mesh, so the same compiled programs, only the
transport of the collectives differs.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from meg_jax.infra.distributed import Launch, detect_launch
from tests.conftest import REPO_ROOT, xla_flags

# One sharded jitted computation over a global DATA x MODEL = 2 x 2 mesh: a tanh layer with the
# batch over "data" and the output features over "model", then a mean over everything (a
# cross-process reduction when the mesh spans processes); results gathered to process 0.
PROGRAM = """
    import json
    import sys

    from meg_jax.infra.distributed import (
        barrier, broadcast_from_main, gather_to_main, initialize_if_multiprocess, is_main_process,
    )

    launch = initialize_if_multiprocess()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from meg_jax.infra.sharding import make_mesh

    mesh = make_mesh(data=2, model=2)
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 40.0
    w = (np.arange(6 * 4, dtype=np.float32).reshape(6, 4) - 12.0) / 10.0

    def place(value, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    @jax.jit
    def step(x, w):
        y = jnp.tanh(x @ w)  # [8, 4]
        return y, jnp.mean(y)

    y, mean = step(place(x, P("data", None)), place(w, P(None, "model")))
    seed = broadcast_from_main(np.int32(7 + jax.process_index()))
    out = gather_to_main({"y": y, "mean": mean})
    barrier("done")
    if is_main_process():
        print("RESULT " + json.dumps({
            "kind": launch.kind,
            "processes": jax.process_count(),
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "seed": int(seed),
            "y": out["y"].tolist(),
            "mean": float(out["mean"]),
        }))
"""


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEG_")}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(devices),
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        **extra,
    )
    return env


def _start(env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PROGRAM)],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen, timeout: float) -> dict | None:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"process timed out:\n{out}\n{err}") from None
    if proc.returncode:
        raise AssertionError(f"process failed ({proc.returncode}):\n{out}\n{err}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[0][len("RESULT ") :]) if lines else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process():
    single = _result(_start(_env(4)), timeout=120)
    coordinator = f"localhost:{_free_port()}"
    procs = [
        _start(
            _env(
                2,
                MEG_COORDINATOR=coordinator,
                MEG_NUM_PROCESSES="2",
                MEG_PROCESS_ID=str(i),
            )
        )
        for i in range(2)
    ]
    results = [_result(p, timeout=120) for p in procs]
    assert results[1] is None  # only process 0 reports
    multi = results[0]
    assert single["kind"] == "single" and single["processes"] == 1
    assert (multi["kind"], multi["processes"], multi["devices"], multi["local_devices"]) == (
        "explicit",
        2,
        4,
        2,
    )
    assert multi["seed"] == 7  # process 0's value reached every process
    x = np.arange(48, dtype=np.float32).reshape(8, 6) / 40.0
    w = (np.arange(24, dtype=np.float32).reshape(6, 4) - 12.0) / 10.0
    expected = np.tanh(x @ w)
    np.testing.assert_allclose(single["y"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(multi["y"], single["y"])
    assert multi["mean"] == pytest.approx(single["mean"], rel=1e-6)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, Launch("single")),
        ({"SLURM_NTASKS": "1"}, Launch("single")),
        ({"SLURM_NTASKS": "4"}, Launch("auto")),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, Launch("auto")),
        ({"TPU_WORKER_HOSTNAMES": "a,b"}, Launch("auto")),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, Launch("single")),
        ({"MEG_DISTRIBUTED": "auto"}, Launch("auto")),
        ({"MEG_DISTRIBUTED": "0", "SLURM_NTASKS": "4"}, Launch("single")),
        (
            {"MEG_COORDINATOR": "h:1", "MEG_NUM_PROCESSES": "2", "MEG_PROCESS_ID": "1"},
            Launch("explicit", "h:1", 2, 1),
        ),
        (
            {"MEG_COORDINATOR": "h:1", "MEG_NUM_PROCESSES": "1", "MEG_PROCESS_ID": "0"},
            Launch("single"),
        ),
    ],
)
def test_detect_launch(env, expected):
    assert detect_launch(env) == expected


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MEG_COORDINATOR": "h:1"}, "MEG_NUM_PROCESSES, MEG_PROCESS_ID unset"),
        (
            {"MEG_COORDINATOR": "h:1", "MEG_NUM_PROCESSES": "2", "MEG_PROCESS_ID": "2"},
            "outside",
        ),
        ({"MEG_DISTRIBUTED": "maybe"}, "MEG_DISTRIBUTED"),
        ({"SLURM_NTASKS": "many"}, "SLURM_NTASKS"),
    ],
)
def test_detect_launch_errors(env, message):
    with pytest.raises(ValueError, match=message):
        detect_launch(env)


# The whole pipeline, two processes against one. Every stage of tests/tiny_run.py with fewer
# steps (each stage still saves and resumes through orbax twice), and weight collection fitted for
# real instead of the given bank, on a host that one neuron can move (`_fittable_llama`): seconds
# of compute each, so the run is dominated by start-up and compilation.
N_EDITS = 6
QUICKER = {
    "encoder": {"infonce": {"num_steps": 2, "eval_every": 1, "batch_size": 32}},
    "router": {"train": {"num_epochs": 6, "batch_size": 32, "save_every": 3}},
    "generator": {"overrides": {"train": {"num_steps": 8, "eval_every": 4, "checkpoint_every": 4}}},
}
# Collection: plain SGD at a large rate (the tiny host's logits are flat next to a real model's),
# 40 steps in one call. Two slots and chunks of two edits: each chunk puts one real edit on each
# device, so each of the two processes fits a real edit in every chunk (with more slots than
# edits per device, process 1 could hold only padding rows and a fault of its own would not
# show); two slots cannot be compacted on two devices. The bank after the first chunk is the
# resume point of the resume check.
COLLECT_FIT = {
    "learning_rate": 5.0,
    "steps": 40,
    "check_every": 40,
    "batch_size": 2,
    "min_batch": 2,
    "chunk_size": 2,
    "max_new_tokens": 8,
}
COLLECT = "--config.stage=collect"  # the stage alone: its upstream is finished in the workdir
PIPELINE_TIMEOUT = 900  # s, for each launch (three processes, or two resuming) on 2 loaded cores


def _fittable_llama(path: Path, vocab: int):
    """tests/hf_tiny's Llama with weights drawn 25x wider (initializer_range 0.5).

    At HF's default 0.02 the tiny random model's logits are nearly flat: no neuron makes it
    say an answer (every fit fails, so every bank row is NaN). At 0.5, with the neuron in
    layer 1, `COLLECT_FIT` fits some edits and fails others (2 of the first 6 CounterFact
    edits): a bank of fitted and failed rows, whose success flags could disagree between two
    runs.
    """
    from tests.hf_tiny import tiny_llama

    return tiny_llama(path, vocab=vocab, init_range=0.5)


@pytest.fixture(scope="module")
def tiny_config_file(shared_data, tmp_path_factory) -> Path:
    """A config file (`get_config`) of the shortened tiny run; the work directory is overridden."""
    from tiny_run import make_tiny_host, tiny_run_config

    root = tmp_path_factory.mktemp("dist")
    host = make_tiny_host(root / "host", shared_data, build=_fittable_llama)
    config = tiny_run_config(shared_data, host, Path(""), root / "unused", N_EDITS)
    for section, values in QUICKER.items():
        config[section].update(values)
    config["collect"] = {"bank": "", "fit": COLLECT_FIT}
    path = root / "tiny_config.py"
    path.write_text(f"def get_config(variant):\n    return {config!r}\n")
    return path


def _train(config: Path, workdir: Path, env: dict, log: Path, *more: str) -> subprocess.Popen:
    """`python -m meg_jax.train` (every stage, then evaluation; `more`: further flags such as
    `--config.stage=collect`) writing stdout+stderr to `log`.

    Output goes to files, not pipes: a process blocked on a full pipe would stall the other
    process at its next collective, and the test would hang instead of failing.
    """
    args = ["-m", "meg_jax.train", "--config", str(config), f"--config.workdir={workdir}", *more]
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, *args], env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT
        )


def _two_processes(config: Path, workdir: Path, logs: dict, *more: str) -> dict:
    """`_train` in two processes x 1 device on `workdir` (logs["process0"], logs["process1"])."""
    coordinator = f"localhost:{_free_port()}"
    procs = {}
    for i in range(2):
        env = _env(1, MEG_COORDINATOR=coordinator, MEG_NUM_PROCESSES="2", MEG_PROCESS_ID=str(i))
        procs[f"process{i}"] = _train(config, workdir, env, logs[f"process{i}"], *more)
    return procs


def _wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float) -> None:
    """Waits for every process; on a failure or the timeout kills the rest and shows the logs."""
    deadline = time.monotonic() + timeout
    failed = None
    while failed is None and any(p.poll() is None for p in procs.values()):
        failed = next((n for n, p in procs.items() if p.poll() not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = "timeout"
        time.sleep(0.5)
    failed = failed or next((n for n, p in procs.items() if p.returncode != 0), None)
    if failed is None:
        return
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    tails = "\n".join(
        f"--- {name} (exit {procs[name].returncode}), end of {path}:\n"
        + path.read_text(errors="replace")[-4000:]
        for name, path in logs.items()
    )
    reason = f"timed out after {timeout} s" if failed == "timeout" else f"{failed} failed"
    raise AssertionError(f"pipeline run {reason}\n{tails}")


def _assert_close_tree(multi, single, where: str, rel: float) -> None:
    """Same structure; strings, bools and ints equal; floats within `rel` (relative)."""
    if isinstance(single, dict):
        assert isinstance(multi, dict) and multi.keys() == single.keys(), where
        for key in single:
            _assert_close_tree(multi[key], single[key], f"{where}.{key}", rel)
    elif isinstance(single, list):
        assert isinstance(multi, list) and len(multi) == len(single), where
        for i, (m, s) in enumerate(zip(multi, single, strict=True)):
            _assert_close_tree(m, s, f"{where}[{i}]", rel)
    elif isinstance(single, float) and not isinstance(multi, bool):
        assert multi == pytest.approx(single, rel=rel, abs=rel), where
    else:
        assert multi == single, where


@pytest.mark.slow
def test_pipeline_in_two_processes_equals_one_process(tiny_config_file, tmp_path):
    """Train (every stage) and evaluate in two processes x 1 device, and in 1 process x 2; then
    collection (`--config.stage=collect`) resumed in two processes from its first saved chunk.

    Tolerance. Both runs compile the same programs for the same 2-device mesh with the same
    seeds and inputs; only the collectives differ (XLA's in-process all-reduce against gloo
    between processes). A sum over two shards is the same in either order, and each slot's fit
    stays on one device (rows never interact), so the results are expected bit for bit, and
    everything discrete (predictions, routing decisions, bank case ids and success flags, the
    shared initial neuron, file lists) is compared exactly. Floating-point artefacts (fitted
    neurons and losses, router entropies, generated neurons, summary figures) are allowed 1e-5
    relative, a few float32 ulps through a handful of training steps, should a backend reorder
    a reduction: a real fault (a process training on its half of a batch or fitting its slots
    on the other's inputs, a shard read twice, a seed per process) moves them by far more.
    Failed fits are NaN rows by design (`Collector.fit`), compared as NaN.
    """
    import dataclasses

    from meg_jax.collect.bank import load_bank, save_bank

    single, multi = tmp_path / "single", tmp_path / "multi"
    logs = {name: tmp_path / f"{name}.log" for name in ("single", "process0", "process1")}
    procs = {
        "single": _train(tiny_config_file, single, _env(2), logs["single"]),
        **_two_processes(tiny_config_file, multi, logs),
    }
    _wait_all(procs, logs, PIPELINE_TIMEOUT)

    # Process 0 alone wrote files and printed the report.
    assert "edited model (MeG)" in logs["process0"].read_text()
    assert "edited model (MeG)" not in logs["process1"].read_text()
    files = {p.relative_to(single).as_posix() for p in single.rglob("*") if p.is_file()}
    multi_files = {p.relative_to(multi).as_posix() for p in multi.rglob("*") if p.is_file()}

    # orbax names a data file per writing process inside a checkpoint: compare all else.
    def outside_checkpoints(names):
        return {n for n in names if "/checkpoints/" not in n}

    assert outside_checkpoints(multi_files) == outside_checkpoints(files)
    for name in files:  # one copy of each metric line, not one per process
        if name.endswith("metrics.jsonl"):
            count = len((single / name).read_text().splitlines())
            assert len((multi / name).read_text().splitlines()) == count, name

    # The bank: the fits ran, some succeeded (their neurons left the shared start), some failed.
    bank, multi_bank = load_bank(single / "collect/bank.npz"), load_bank(multi / "collect/bank.npz")
    _assert_same_bank(multi_bank, bank, "two processes")
    assert len(bank) == N_EDITS
    assert bank.success.any() and not bank.success.all(), (bank.success, bank.final_loss)
    moved = np.abs(bank.weights[bank.success] - bank.init).max(axis=1)
    assert moved.min() > 1e-2, moved
    assert np.isnan(bank.weights[~bank.success]).all() and np.isfinite(bank.final_loss).all()
    collect_record = json.loads((multi / "collect/stage.json").read_text())
    single_record = json.loads((single / "collect/stage.json").read_text())
    assert collect_record["finished"] and collect_record["inputs"] == single_record["inputs"]
    assert collect_record["summary"] == single_record["summary"]

    # The summary figures of the unedited and the edited model.
    summary = json.loads((single / "summary.json").read_text())
    _assert_close_tree(json.loads((multi / "summary.json").read_text()), summary, "summary", 1e-5)
    # Every query's prediction and reading (a generated neuron's effect, query by query).
    for model in ("unedited", "meg"):
        rows = (single / "evaluation" / model / "examples.jsonl").read_text().splitlines()
        multi_rows = (multi / "evaluation" / model / "examples.jsonl").read_text().splitlines()
        _assert_close_tree(
            [json.loads(r) for r in multi_rows], [json.loads(r) for r in rows], model, 1e-5
        )
    # Router decisions and generated neurons, read back from each run's artefacts.
    import meg_jax

    queries = [json.loads(r)[f"{k}_query"] for r in rows for k in ("rel", "gen", "loc")]
    readings = {}
    for name, workdir in (("single", single), ("multi", multi)):
        editor = meg_jax.load_editor(workdir, batch_size=8).editor
        entropy = editor.router.entropy(editor.router_encoder.encode(queries))
        readings[name] = (entropy, editor.routed(queries), editor.flat(queries))
    (h1, routed1, flat1), (h2, routed2, flat2) = readings["single"], readings["multi"]
    assert routed1.any() and not routed1.all()  # decisions that could differ
    np.testing.assert_array_equal(routed2, routed1)
    np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-6)
    assert np.abs(flat1).max() > 0
    np.testing.assert_allclose(flat2, flat1, rtol=1e-5, atol=1e-6)
    print(
        "largest differences: fitted weights",
        float(np.nanmax(np.abs(multi_bank.weights - bank.weights))),
        "entropy",
        float(np.abs(h2 - h1).max()),
        "neurons",
        float(np.abs(flat2 - flat1).max()),
    )

    # Resume: the collect stage unfinished and its run directory holding the first chunk only,
    # with losses marked so that a refit of that chunk (instead of its reuse) would show.
    (run_bank,) = [f for f in files if f.startswith("collect/runs/") and f.endswith("bank.npz")]
    chunk = COLLECT_FIT["chunk_size"]
    first = load_bank(multi / run_bank).select(np.arange(chunk))
    marked = dataclasses.replace(first, final_loss=first.final_loss + 1000.0)
    save_bank(marked, multi / run_bank)
    (multi / "collect/bank.npz").unlink()
    collect_record["finished"] = False
    (multi / "collect/stage.json").write_text(json.dumps(collect_record))
    logs = {name: tmp_path / f"resume-{name}.log" for name in ("process0", "process1")}
    _wait_all(_two_processes(tiny_config_file, multi, logs, COLLECT), logs, PIPELINE_TIMEOUT)
    assert "collect    resumed" in logs["process0"].read_text()
    assert "collect    resumed" not in logs["process1"].read_text()
    resumed = load_bank(multi / "collect/bank.npz")
    _assert_same_bank(resumed.select(np.arange(chunk)), marked, "resumed, kept chunk")
    rest = np.arange(chunk, N_EDITS)
    _assert_same_bank(resumed.select(rest), bank.select(rest), "resumed, refitted chunks")
    assert json.loads((multi / "collect/stage.json").read_text())["finished"]


def _assert_same_bank(multi, single, where: str) -> None:
    """Case ids, success flags and init exactly; weights and losses to 1e-5 relative."""
    np.testing.assert_array_equal(multi.case_id, single.case_id, f"{where}: case_id")
    np.testing.assert_array_equal(multi.success, single.success, f"{where}: success")
    np.testing.assert_array_equal(multi.init, single.init, f"{where}: init")
    for field in ("weights", "final_loss"):
        np.testing.assert_allclose(
            getattr(multi, field),
            getattr(single, field),
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"{where}: {field}",
        )
