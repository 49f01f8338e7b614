"""What every benchmark shares: the machine description, timing, and the atomic JSON result."""

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# PyTorch's OpenMP threads spin while waiting; on a shared (oversubscribed) CPU a spinning thread
# starves the one it waits for, and PyTorch ran 10x slower than with passive waiting. Passive
# waiting is the fair baseline. Torch reads this when it starts, so benchmarks that use torch
# `import common` before it (plain imports sort first).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "data"


def machine() -> dict:
    """Platform, processor, core count and library versions, for the result file."""
    import jax

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        # The machine may be shared: the load average says how much of it the runs had.
        "load_average_1_5_15min": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def seconds(fn) -> float:
    """Wall seconds of one call of `fn()`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(ours, theirs, runs: int) -> dict:
    """A warm-up of each, then `runs` alternating timings of both (so background load falls on
    both alike): medians, all runs and warm-up times, in seconds."""
    warm = {"ours": seconds(ours), "torch": seconds(theirs)}
    times = {"ours": [], "torch": []}
    for _ in range(runs):
        times["ours"].append(seconds(ours))
        times["torch"].append(seconds(theirs))
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "runs_s": times,
        "warmup_s": warm,
    }


def median(values) -> float:
    return float(statistics.median(values))


def write_result(name: str, result: dict) -> Path:
    """bench/results/<name>.json, atomically, with the machine and the date added."""
    from meg_jax.infra.files import write_json_atomic

    result = {
        **result,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    path = RESULTS / f"{name}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return path


def earlier_result(path: Path) -> tuple[dict, dict]:
    """(the results file at `path`, {} when there is none; its {"date", "machine"}): for a
    bench that keeps what an earlier run measured, each kept entry stamped with that stamp
    unless it records its own when and where."""
    if not path.is_file():
        return {}, {}
    old = json.loads(path.read_text(encoding="utf-8"))
    return old, {"date": old.get("date"), "machine": old.get("machine")}
