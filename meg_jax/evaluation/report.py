"""Evaluation outputs: per-example JSONL, a summary JSON, a printed table and a bar chart.

All files are written atomically (temporary name, then rename), so a crashed run never leaves a
result that looks complete.
"""

import io
import json
from collections.abc import Sequence
from pathlib import Path

from meg_jax.evaluation.evaluator import SIX
from meg_jax.infra.files import write_bytes_atomic, write_json_atomic

LABELS = {
    "rel_ag": "Rel AG",
    "rel_tf": "Rel TF",
    "gen_ag": "Gen AG",
    "gen_tf": "Gen TF",
    "loc_ag": "Loc AG",
    "loc_tf": "Loc TF",
}


def format_table(summary: dict, title: str = "MeG protocol (P5)") -> str:
    """A fixed-width table of the six readings and the Score."""
    keys = [k for k in SIX if k in summary]
    head = " | ".join(f"{LABELS[k]:>7}" for k in keys) + " |   Score"
    cells = " | ".join(f"{summary[k]:7.2f}" for k in keys)
    score = summary.get("score")
    cells += f" | {score:7.2f}" if score is not None else " |       -"
    counts = f"n={summary.get('n_records', '?')}"
    if summary.get("all_prompts"):  # the readings average over prompts, not records
        counts += f"; all prompts: {summary.get('n_gen', 0)} Gen, {summary.get('n_loc', 0)} Loc"
    return f"{title} ({counts})\n{head}\n{cells}"


def plot_six(summary: dict, path: Path, title: str) -> None:
    """Bar chart PNG of the six readings (and the Score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in SIX if k in summary]
    names = [LABELS[k] for k in keys] + (["Score"] if "score" in summary else [])
    values = [summary[k] for k in keys] + ([summary["score"]] if "score" in summary else [])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(names, values, color=["#4c72b0", "#55a868"] * 3 + ["#c44e52"])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()  # through write_bytes_atomic: one writer when several processes run
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def write_examples(out_dir, rows: Sequence[dict], summary: dict) -> None:
    """Writes examples.jsonl (a row per record), then summary.json, under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_bytes_atomic(out_dir / "examples.jsonl", lines.encode("utf-8"))
    write_json_atomic(out_dir / "summary.json", summary)


def write_report(out_dir, rows: Sequence[dict], summary: dict, title: str) -> str:
    """Writes examples.jsonl, summary.json and metrics.png under `out_dir`; returns the table."""
    write_examples(out_dir, rows, summary)
    plot_six(summary, out_dir / "metrics.png", title)
    return format_table(summary, title)


def format_comparison(summaries: dict[str, dict], names: dict[str, str]) -> str:
    """One table, a row per model (`names` maps summary keys to row labels, in order), with the
    six readings and the Score."""
    width = max(len(label) for label in names.values())
    head = f"{'':{width}} | " + " | ".join(f"{LABELS[k]:>7}" for k in SIX) + " |   Score"
    lines = [head, "-" * len(head)]
    for key, label in names.items():
        summary = summaries[key]
        cells = " | ".join(f"{summary[k]:7.2f}" if k in summary else f"{'-':>7}" for k in SIX)
        score = summary.get("score")
        cells += f" | {score:7.2f}" if score is not None else " |       -"
        lines.append(f"{label:{width}} | {cells}")
    return "\n".join(lines)


def format_routing(summary: dict) -> str:
    """Where each AG reading is won or lost (`summary["routing"]`, MeG only; "" without it): per
    query kind the queries, the share routed, AG when routed, AG when given the zero neuron, the
    headline AG they add up to, and AG of the bank's own fitted neuron (the generator's upper
    bound; Rel and Gen)."""
    routing = summary.get("routing")
    if not routing:
        return ""

    def cell(value, width=9):
        return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"

    head = "kind |     n |  routed | AG routed | AG zero n. |        AG | AG bank n."
    lines = ["Routing breakdown (AG, %)", head, "-" * len(head)]
    for kind, entry in routing.items():
        lines.append(
            f"{kind:4} | {entry.get('n', 0):5d} | {cell(100 * entry['routed'], 7)} | "
            f"{cell(entry['ag_when_routed'])} | {cell(entry['ag_when_not_routed'], 10)} | "
            f"{cell(summary.get(f'{kind}_ag'))} | {cell(entry.get('ag_bank_neuron'), 10)}"
        )
    return "\n".join(lines)
