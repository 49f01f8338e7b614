"""FT-L, MEMIT and AlphaEdit on SmolLM2 under MeG's protocol and the classic one.

    nice -n 10 python bench/baselines.py --n 256 [--n 1024] [--methods ft,memit,alphaedit]

For each edit count and method a child process loads SmolLM2, edits the first n CounterFact
edits of ../shared/data with `configs/baseline_smollm2.py:method=...,n=...`, then evaluates
the edited weights with the unchanged evaluator (the all-zero editor): MeG's six readings and
Score (locality labels = the unedited model's answers, as the main job computes them with
`prepare_edits`) and MEMIT's CounterFact ES/PS/NS. Wall time of the editing (key statistics
apart: computed once per host, cached, reported separately) and peak resident memory (the
process's maximum RSS after editing, and after loading the host, so the difference is what
editing added) come from that child, so the methods do not share an allocator's high-water
mark. The unedited model is evaluated the same way for reference.

Writes bench/results/baselines.json (top level `methods` keyed ft / memit / alphaedit, each
with `score` per edit count) and bench/results/baselines.png.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import common

WORK = common.REPO / "runs" / "bench_baselines"
METHODS = ("ft", "memit", "alphaedit")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(method: str, n: int, out: Path) -> None:
    """Edit and evaluate in this process; writes its result to `out`."""
    import importlib.util

    from meg_jax.baselines import baseline_config, run_baseline
    from meg_jax.checkpoints.hosts import load_host
    from meg_jax.data.download import load_edits
    from meg_jax.data.preprocess import meg_preprocess_config, prepare_edits
    from meg_jax.data.templates import get_template
    from meg_jax.evaluation.evaluator import EvalConfig, evaluate_classic, evaluate_meg
    from meg_jax.inference.editor import zero_editor
    from meg_jax.inference.runner import ModelRunner
    from meg_jax.infra.files import write_json_atomic

    spec = importlib.util.spec_from_file_location(
        "cfg", common.REPO / "configs/baseline_smollm2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(f"method={'memit' if method == 'unedited' else method},n={n}")
    edits_path = str(common.SHARED / "counterfact" / "counterfact-edit.json")
    host = load_host(c.host.name)
    rss_host = _peak_rss_mb()
    template = get_template(c.host.template)
    eval_cfg = EvalConfig(batch_size=c.evaluation.batch_size, tf_mode=c.evaluation.tf_mode)
    runner = ModelRunner(host.config, host.params, host.tokenizer, batch_size=eval_cfg.batch_size)
    zero = zero_editor(host.config.d_model)
    stops = template.generation_stops
    prepared = prepare_edits(
        load_edits(edits_path, limit=n),
        "smollm2:float32",  # the main job's model id, so its cache is shared
        lambda prompts: runner.generate(prompts, zero(prompts), eval_cfg.max_new_tokens, stops),
        meg_preprocess_config("counterfact", c.host.template),
        cache_dir=WORK / "cache",
    )
    records = list(prepared.records)
    result: dict = {"method": method, "n_edits": len(records)}
    params = host.params
    if method != "unedited":
        cfg = baseline_config(c.baseline)
        start = time.perf_counter()
        params, info = run_baseline(method, host, records, template, cfg, WORK)
        result["edit_total_seconds"] = time.perf_counter() - start
        result["info"] = info
    result["peak_rss_mb_after_edit"] = _peak_rss_mb()
    result["peak_rss_mb_after_host_load"] = rss_host
    runner = ModelRunner(host.config, params, host.tokenizer, batch_size=eval_cfg.batch_size)
    start = time.perf_counter()
    _, result["meg_protocol"] = evaluate_meg(
        runner, records, template, zero, prepared.locality_labels, eval_cfg
    )
    result["classic"] = evaluate_classic(runner, records, zero, "counterfact")
    result["eval_seconds"] = time.perf_counter() - start
    write_json_atomic(out, json.loads(json.dumps(result, default=float)))


def plot(methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("rel_ag", "gen_ag", "loc_ag", "rel_tf", "gen_tf", "loc_tf", "score")
    counts = sorted({int(k) for m in methods.values() for k in m["score"]})
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4), squeeze=False)
    for ax, n in zip(axes[0], counts, strict=True):
        width = 0.8 / max(len(methods), 1)
        for i, (name, m) in enumerate(methods.items()):
            run = m["runs"].get(str(n))
            if run is None:
                continue
            values = [run["meg_protocol"].get(k, 0.0) for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], values, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
        ax.set_ylim(0, 100)
        ax.set_title(f"SmolLM2, {n} CounterFact edits (MeG protocol)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, action="append")
    parser.add_argument("--methods", default="unedited,ft,memit,alphaedit")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "N", "OUT"))
    args = parser.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]), Path(args.one[2]))
        return
    counts = args.n or [256]
    WORK.mkdir(parents=True, exist_ok=True)
    runs: dict = {}
    for n in counts:
        for method in args.methods.split(","):
            out = WORK / f"result-{method}-{n}.json"
            if not out.is_file():  # finished runs are kept: rerunning resumes
                cmd = [sys.executable, __file__, "--one", method, str(n), str(out)]
                subprocess.run(cmd, check=True)
            runs.setdefault(method, {})[str(n)] = json.loads(out.read_text())
    # Runs of other edit counts finished earlier (e.g. only some methods had time for them).
    for out in sorted(WORK.glob("result-*-*.json")):
        method, n = out.stem.split("-")[1:]
        runs.setdefault(method, {}).setdefault(n, json.loads(out.read_text()))
    methods = {}
    for method, by_n in runs.items():
        methods[method] = {
            "score": {n: r["meg_protocol"].get("score") for n, r in by_n.items()},
            "classic_score": {n: r["classic"].get("score") for n, r in by_n.items()},
            "edit_seconds": {n: r.get("info", {}).get("edit_seconds") for n, r in by_n.items()},
            "peak_rss_mb": {n: r["peak_rss_mb_after_edit"] for n, r in by_n.items()},
            "runs": by_n,
        }
    unedited = methods.pop("unedited", None)
    plot(methods, common.RESULTS / "baselines.png")
    result = {
        "what": "FT-L, MEMIT, AlphaEdit on SmolLM2-135M-Instruct (GGUF Q4_1, float32 compute), "
        "first n CounterFact edits of counterfact-edit.json, configs/baseline_smollm2.py",
        "methods": methods,
        "unedited": unedited,
    }
    print(common.write_result("baselines", result))
    for method, m in methods.items():
        print(method, json.dumps(m["score"]), json.dumps(m["classic_score"]))


if __name__ == "__main__":
    main()
