"""Multi-process runs: launch detection, and two local CPU processes equal one process."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from meg_jax.infra.distributed import Launch, detect_launch
from tests.conftest import REPO_ROOT

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
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
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
