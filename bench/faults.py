"""Faults, tried as a hostile but fair user would: each case run end to end, outcome classified.

    python bench/faults.py

Every case is a command (`python -m meg_jax.train ...` in a fresh process, timed from its start)
or a library call, on a tiny Llama with the real GPT-2 tokenizer and a given weight bank (a random
host cannot be fitted), so a training run takes about a minute. Outcomes:
  clear error      non-zero exit (or a raised error) whose last line names the problem, no traceback
  recovered        the command succeeds despite the fault, saying so where it matters
  identical        a rerun changes no result
  ok               a command that must work did
anything else (a traceback, a silent wrong result, an unclear message) is a failure.

bench/results/faults.json: `cases` (how many), `failures` (how many failed) and the table, with
each case's outcome and seconds from the start of the command to its end.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, SHARED, write_result

sys.path.insert(0, str(REPO / "tests"))
from tiny_run import make_given_bank, make_tiny_host, tiny_run_config  # noqa: E402

N_EDITS = 6
CONFIG = """
import json
def get_config(arg=None):
    return json.loads({text!r})
"""


def write_config(root: Path, name: str, config: dict) -> Path:
    path = root / f"{name}.py"
    path.write_text(CONFIG.format(text=json.dumps(config)))
    return path


def train(config: Path, *overrides: str) -> tuple[int, str, float]:
    """(exit code, output, seconds) of `python -m meg_jax.train` in a fresh process."""
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "meg_jax.train", "--config", str(config), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream: the error line is the last thing printed
        text=True,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=1800,
    )
    return proc.returncode, proc.stdout, time.perf_counter() - began


def judge_error(code: int, stderr: str, must_name: str) -> str:
    """clear error / crash / unclear error / silent (exit 0) for a command that must fail."""
    if code == 0:
        return "silent"
    if "Traceback" in stderr:
        return "crash"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return "clear error" if last.startswith("error:") and must_name in last else "unclear error"


def call_error(fn, must_name: str) -> tuple[str, str, float]:
    """(outcome, message, seconds) of a library call that must raise a named error."""
    began = time.perf_counter()
    try:
        fn()
    except Exception as err:  # the point is to classify whatever comes out
        message = f"{type(err).__name__}: {err}"
        outcome = "clear error" if must_name in str(err) else "unclear error"
        return outcome, message, time.perf_counter() - began
    return "silent", "no error", time.perf_counter() - began


def main():
    root = Path(tempfile.mkdtemp(prefix="meg_faults_"))
    host = make_tiny_host(root / "host", SHARED)
    bank = make_given_bank(root / "bank.npz", SHARED, N_EDITS)
    base = tiny_run_config(SHARED, host, bank, root / "run", N_EDITS)
    cfg = write_config(root, "base", base)
    cases = []

    def record(name, finding, outcome, seconds, detail=""):
        cases.append(
            {
                "case": name,
                "finding": finding,
                "outcome": outcome,
                "seconds": round(seconds, 2),
                "detail": detail[-400:],
                "failure": outcome
                not in ("clear error", "recovered", "identical", "ok", "identical result"),
            }
        )
        print(f"{outcome:>14} {seconds:7.1f} s  {name}")

    # 4/5: configuration errors, answered before any work, within seconds.
    for name, override, must in [
        ("neuron_activation=bogus", "--config.host.neuron_activation=bogus", "neuron_activation"),
        ("generator.preset=bogus", "--config.generator.preset=bogus", "preset"),
        ("evaluation.tf_mode=bogus", "--config.evaluation.tf_mode=bogus", "tf_mode"),
        ("data.n_edits=0", "--config.data.n_edits=0", "n_edits"),
        ("unknown key", "--config.collect.fit.lerning_rate=0.1", "lerning_rate"),
        ("mistyped value", "--config.data.n_edits=many", "n_edits"),
    ]:
        code, err, secs = train(cfg, override)
        record(
            name,
            4 if "bogus" in name or "n_edits=0" in name else 5,
            judge_error(code, err, must),
            secs,
            err,
        )

    # 5: every documented field settable, whether or not the file sets it (edits stage only).
    code, err, secs = train(
        cfg,
        f"--config.workdir={root / 'fields'}",
        "--config.stage=edits",
        "--config.host.dtype=float32",
        "--config.router.enabled=true",
        "--config.mesh_data=1",
        "--config.evaluation.stop_at_cut=true",
        "--config.evaluation.reuse_generation=true",
    )
    record(
        "fields absent from the file set on the command line",
        5,
        "ok" if code == 0 else "crash",
        secs,
        err,
    )

    # 1: a finished run, rerun, changes nothing; a changed setting stops with the ways out.
    code, err, secs = train(cfg)
    record("train the tiny run", 1, "ok" if code == 0 else "crash", secs, err)
    summary = (root / "run" / "summary.json").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (root / "run").rglob("*") if p.is_file()}
    code, err, secs = train(cfg)
    touched = [
        str(p.relative_to(root / "run"))
        for p in (root / "run").rglob("*")
        if p.is_file() and stamps.get(p) != p.stat().st_mtime_ns
    ]
    same = code == 0 and (root / "run" / "summary.json").read_bytes() == summary
    same = same and set(touched) <= {"config.json", "editor.json"}
    record(
        "rerun of a finished run",
        1,
        "identical" if same else "silent wrong result",
        secs,
        str(touched),
    )
    for name, override, must in [
        ("changed collect.fit.learning_rate", "--config.collect.fit.learning_rate=0.01", "collect"),
        (
            "changed generator steps",
            "--config.generator.overrides={'train': {'num_steps': 30}}",
            "generator",
        ),
        ("changed router epochs", "--config.router.train.num_epochs=21", "router"),
    ]:
        code, err, secs = train(cfg, override)
        record(name, 1, judge_error(code, err, f"stage '{must}'"), secs, err)

    # 2: a diverging generator stops, keeps the last finite checkpoint, says so.
    steps = "'num_steps': 40, 'eval_every': 10, 'checkpoint_every': 10, 'log_every': 5"
    diverge = (
        f"--config.generator.overrides={{'optim': {{'learning_rate': 1e9}}, 'train': {{{steps}}}}}"
    )
    code, err, secs = train(cfg, f"--config.workdir={root / 'nan'}", diverge)
    record("diverging generator (lr 1e9)", 2, judge_error(code, err, "diverged"), secs, err)

    # 2: a host checkpoint with a NaN tensor.
    nan_host = root / "nan_host"
    shutil.copytree(host, nan_host)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(nan_host / "model.safetensors")
    key = next(k for k in tensors if "mlp" in k)
    tensors[key][0, 0] = np.nan
    save_file(tensors, nan_host / "model.safetensors", metadata={"format": "pt"})
    code, err, secs = train(
        cfg, f"--config.workdir={root / 'nanhost'}", f"--config.host.name={nan_host}"
    )
    record(
        "host checkpoint with a NaN tensor",
        2,
        judge_error(code, err, key.split(".")[-2]),
        secs,
        err,
    )

    # 3: inputs out of bounds, named before any training.
    records = json.loads((SHARED / "counterfact" / "counterfact-edit.json").read_text())[:N_EDITS]
    for name, change, must in [
        ("5,000-character prompt", {"prompt": "x " * 2500}, "record 2"),
        ("case_id 2**70", {"case_id": 2**70}, "record 2"),
    ]:
        bad = [dict(r) for r in records]
        bad[2].update(change)
        path = root / f"bad_{len(cases)}.json"
        path.write_text(json.dumps(bad))
        code, err, secs = train(
            cfg, f"--config.workdir={root / 'bad'}", f"--config.data.edits={path}"
        )
        record(name, 3, judge_error(code, err, must), secs, err)
    path = root / "malformed.json"
    path.write_text(json.dumps(records)[:-40])
    code, err, secs = train(cfg, f"--config.workdir={root / 'bad'}", f"--config.data.edits={path}")
    record("malformed JSON edit file", 3, judge_error(code, err, "malformed JSON"), secs, err)

    # 4: load_edits(limit=-1) no longer drops a record silently.
    from meg_jax.data.download import load_edits

    outcome, message, secs = call_error(
        lambda: load_edits(SHARED / "counterfact" / "counterfact-edit.json", limit=-1), "limit"
    )
    record("load_edits(limit=-1)", 4, outcome, secs, message)

    # 6: damaged files.
    trunc = root / "trunc_host"
    shutil.copytree(host, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err, secs = train(
        cfg, f"--config.workdir={root / 'trunc'}", f"--config.host.name={trunc}"
    )
    record("truncated safetensors", 6, judge_error(code, err, "truncated"), secs, err)
    gguf = root / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(996))
    code, err, secs = train(cfg, f"--config.workdir={root / 'gguf'}", f"--config.host.name={gguf}")
    record("1,000-byte GGUF", 6, judge_error(code, err, "tiny.gguf"), secs, err)
    nolayers = root / "nolayers_host"
    shutil.copytree(host, nolayers)
    conf = json.loads((nolayers / "config.json").read_text())
    del conf["num_hidden_layers"]
    (nolayers / "config.json").write_text(json.dumps(conf))
    code, err, secs = train(
        cfg, f"--config.workdir={root / 'nolayers'}", f"--config.host.name={nolayers}"
    )
    record(
        "config.json without num_hidden_layers",
        6,
        judge_error(code, err, "num_hidden_layers"),
        secs,
        err,
    )
    damaged = root / "damaged_bank.npz"
    damaged.write_bytes(bank.read_bytes()[:300])
    code, err, secs = train(
        cfg, f"--config.workdir={root / 'dbank'}", f"--config.collect.bank={damaged}"
    )
    record("damaged bank.npz", 6, judge_error(code, err, "damaged_bank.npz"), secs, err)

    # 6: a damaged latest generator checkpoint: resume from the newest intact one.
    resumed = root / "resume"
    code, err, secs = train(
        cfg, f"--config.workdir={resumed}", "--config.stage=all", "--config.evaluate=false"
    )
    run_dir = next((resumed / "generator" / "runs").iterdir())
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    record_path = resumed / "generator" / "stage.json"
    record_json = json.loads(record_path.read_text())
    record_json["finished"] = False  # as if the run had been killed after its last checkpoint
    record_path.write_text(json.dumps(record_json))
    latest = run_dir / "checkpoints" / str(steps[-1])
    for f in latest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"damaged")
    (run_dir / "checkpoints" / f"{steps[-1] + 1}.orbax-checkpoint-tmp-123").mkdir()
    code, err, secs = train(cfg, f"--config.workdir={resumed}", "--config.evaluate=false")
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]
    ok = code == 0 and "damaged" in err.lower() and not leftovers
    record(
        "damaged latest checkpoint, orbax temporary left behind",
        6,
        "recovered" if ok else "crash",
        secs,
        err,
    )

    failures = sum(c["failure"] for c in cases)
    config_seconds = max(
        c["seconds"]
        for c in cases
        if c["finding"] in (4, 5) and "fields" not in c["case"] and "limit" not in c["case"]
    )
    result = {
        "benchmark": "faults",
        "cases": len(cases),
        "failures": failures,
        "slowest_config_error_s": config_seconds,
        "table": cases,
    }
    print(
        f"{len(cases)} cases, {failures} failures; "
        f"slowest configuration error {config_seconds:.1f} s"
    )
    print(write_result("faults", result))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
