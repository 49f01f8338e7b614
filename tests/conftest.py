"""Shared pytest fixtures: CPU backend, the shared data folder, and a fake-multi-device runner."""

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole run: the xdist workers and every process a
# test starts (`python -m meg_jax.train`, fake-device runs) inherit this environment, so a tiny
# pipeline program compiled once is loaded, not compiled again, by the next process or by the
# other worker (a full `-n 2` run: 28.6 min without, 27.0 with; with -O0 below as well, 24.8).
# Programs of another topology (two processes) miss it. A new folder per run (set in the
# controller before the workers start); removed at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="meg_jax_test_xla_cache_")
    os.environ["MEG_JAX_TEST_OWNS_XLA_CACHE"] = "1"
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# Cheap XLA:CPU code generation for every process of the run: the suite's programs run on tiny
# shapes, where compiling them costs far more than running them (the workers of a full run spend
# about half their CPU time in XLA's backend compile, on some 2,300 distinct programs that the
# persistent cache above cannot share: 65 hits). What a program computes is held to the suite's
# own tolerances under these flags. LLVM at -O0 (a compile-bound file 90 -> 71 s); then XLA's
# elemental IR emitters instead of its MLIR fusion emitters, LLVM's expensive passes off and one
# codegen module per program: one tiny trained run in one process, backend compile 16.7 -> 7.1 s
# and process CPU 51 -> 35 s; the execution-bound SmolLM2 fit, MEMIT and AlphaEdit tests alone
# within +-12%; a full `-n 2` run on an idle 2-core machine 768 -> 577 s. XLA refuses a flag it
# does not know: these are jaxlib 0.10's (pyproject pins jax <0.11). Processes with fake devices
# add their device count to these (`xla_flags`).
TEST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    " --xla_llvm_disable_expensive_passes=true --xla_cpu_parallel_codegen_split_count=1"
)
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit it
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(n_devices: int) -> str:
    """XLA_FLAGS for a test's own process with `n_devices` fake CPU devices."""
    return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={n_devices}"


# Seconds per test file in a full `-n 2` run on an idle 2-core machine (575 s in all,
# 2026-12-05), rounded to 5 s; files not named take under 5 s. Only the order of the run depends
# on them, never what a test checks.
SLOW_FILES = {
    "test_baseline_pipeline.py": 135,
    "test_distributed.py": 130,
    "test_pipeline.py": 115,
    "test_collect.py": 90,
    "test_baselines_smollm2.py": 85,
    "test_configs.py": 60,
    "test_evaluator.py": 55,
    "test_sharded_stages.py": 55,
    "test_seeds.py": 50,
    "test_all_prompts.py": 40,
    "test_diffusion_train.py": 40,
    "test_encoder.py": 35,
    "test_baselines_parity.py": 35,
    "test_collect_fast.py": 25,
    "test_generation.py": 20,
    "test_routing_breakdown.py": 20,
    "test_router.py": 15,
    "test_zero_augmentation.py": 10,
    "test_faults_generator.py": 10,
    "test_faults_checkpoints.py": 10,
    "test_smollm2.py": 5,
    "test_plan.py": 5,
    "test_router_nearest.py": 5,
    "test_diffusion_dit.py": 5,
    "test_locality_readings.py": 5,
    "test_decoder_parity.py": 5,
    "test_diffusion_capacity.py": 5,
    "test_bert.py": 5,
}


# Files that build and run the same programs, run one after another by one worker, which keeps
# what the first compiled and traced (see `_release_compiled_programs`): the tiny trained run
# (tiny Llama, MiniLM, router, tiny DiT, the evaluator) and test_evaluator's tiny Llama runner.
# Back to back in one process, with the programs dropped after each file and kept: the three
# tiny-run files 240 s and 177 s, the three tiny-Llama-runner files 163 s and 148 s. A full
# `-n 2` run on an idle 2-core machine: 1,296 s before this grouping and reuse, 1,131 and 1,120 s
# with them.
SHARED_PROGRAMS = {
    "test_pipeline.py": "tiny trained run",
    "test_routing_breakdown.py": "tiny trained run",
    "test_seeds.py": "tiny trained run",
    "test_evaluator.py": "tiny Llama runner",
    "test_all_prompts.py": "tiny Llama runner",
    "test_locality_readings.py": "tiny Llama runner",
}


def _work_unit(file_name: str) -> str:
    """What one xdist worker runs whole: a group of SHARED_PROGRAMS, else the file."""
    return SHARED_PROGRAMS.get(file_name, file_name)


def _unit_seconds(unit: str) -> int:
    return sum(s for f, s in SLOW_FILES.items() if _work_unit(f) == unit)


_GROUPED = pytest.StashKey[bool]()  # set when pytest_configure chose the scheduling below


def pytest_configure(config):
    """Under xdist (`-n 2`), whole work units (`_work_unit`) go to a worker, the slowest first.

    A file's module-scoped fixtures (a trained tiny run, a loaded SmolLM2) are built once, not
    once per worker that happens to get one of its tests; and starting the longest units first
    lets the two workers finish together instead of one waiting on a late long file. An explicit
    `--dist` is left as given.
    """
    explicit = any(
        a in ("-d", "--dist") or a.startswith("--dist=") for a in config.invocation_params.args
    )
    if getattr(config.option, "dist", "no") == "load" and not explicit:
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False  # keep the order below, not "most tests first"
        config.stash[_GROUPED] = True


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's file scheduling, with each group of SHARED_PROGRAMS as one unit."""
    if not config.stash.get(_GROUPED, False):
        return None  # xdist's own scheduler for the --dist given
    from xdist.scheduler import LoadFileScheduling

    class WorkUnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return _work_unit(Path(file).name)

    return WorkUnitScheduling(config, log)


def pytest_unconfigure(config):
    """The run's compilation cache goes when the run ends (by the process that made it)."""
    if os.environ.get("MEG_JAX_TEST_OWNS_XLA_CACHE") and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The slowest work units first (a stable sort: a unit's files, and each file's tests, stay
    together and in order)."""

    def order(item) -> tuple[int, str]:
        unit = _work_unit(item.path.name)
        return -_unit_seconds(unit), unit

    items.sort(key=order)


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _memory_mappings() -> int | None:
    """How many memory mappings this process holds; None where /proc does not say."""
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def _mapping_limit() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530  # Linux's default


# The mappings a worker may fill with compiled programs before it drops them (read once).
MAPPING_BUDGET = _mapping_limit() // 2


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After a test file, drop every compiled program this process holds once they fill half of
    the kernel's limit on memory mappings; until then the next file reuses them.

    Each XLA:CPU executable keeps about a dozen memory mappings until it is freed. An xdist
    worker that kept every program of its files reached 65,464 mappings near the end of a full
    run, 66 short of the kernel's limit (vm.max_map_count, 65,530), past which a compile's mmap
    fails; two full runs (one in CI) lost a worker to a segmentation fault inside an XLA:CPU
    compile at that stage of the suite. Dropping them after every file cost each file its own
    tracing and compiling of programs the file before had (the persistent cache saves only the
    backend compile): half the limit leaves a file room for thousands of programs. Torn down
    after the file's own module fixtures (autouse fixtures are set up first), so nothing of the
    file is still in use.
    """
    yield
    mappings = _memory_mappings()
    if mappings is not None and mappings < MAPPING_BUDGET:
        return
    import jax  # here, not at the top: JAX_PLATFORMS is set above before jax is first imported

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip with the reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (CI always has it)")
    return SHARED_DATA


def run_with_fake_devices(code: str, n_devices: int = 8, timeout: int = 600) -> str:
    """Runs `code` in a fresh Python with `n_devices` fake CPU devices; returns its stdout.

    XLA reads the device count once at backend start, so multi-device checks need their own
    process rather than the test process's already-initialised single-device backend.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(n_devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout
