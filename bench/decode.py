"""SmolLM2 forward and greedy-decode throughput on CPU: ours (JAX) vs transformers (PyTorch).

    python bench/decode.py [--runs 5] [--new-tokens 20] [--batch-sizes 1 32]

Both sides run the same float32 weights (the GGUF dequantized once, by our reader; the PyTorch
`LlamaForCausalLM` is filled from our parameters through the inverse of the HF key map) on the
same left-padded batch of templated CounterFact prompts:
  - forward: one pass over the padded batch [B, T], full logits; tokens/s counts B*T;
  - decode: greedy, exactly N new tokens with a KV cache (ours: `greedy_generate` with no stop
    ids; PyTorch: `generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`); tokens/s
    counts B*N and the time includes the prompt pass.
Each measurement is the median of `--runs` runs after one warm-up run (JAX compiles there), whose
time is reported separately. Ours and PyTorch's runs alternate, so background load on a shared
machine falls on both (PyTorch's OpenMP threads wait passively, see below). Results go to
bench/results/decode.json; `ratio` is ours / PyTorch's batched greedy-decode tokens/s.
"""

# ruff: noqa: E402  (torch must see OMP_WAIT_POLICY, and meg_jax the repo on sys.path)

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# PyTorch's OpenMP threads spin while waiting; on a shared (oversubscribed) CPU a spinning thread
# starves the one it waits for, and PyTorch ran 10x slower than with passive waiting. Passive
# waiting is the fair baseline here; it must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meg_jax.checkpoints.convert import flatten_tree, transpose
from meg_jax.checkpoints.hf_decoder import decoder_rules
from meg_jax.data.jsonio import read_records, write_json_atomic
from meg_jax.data.templates import get_template
from meg_jax.hosts import load_host
from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder
from meg_jax.models.generate import greedy_generate, left_pad

PROMPTS = REPO.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def torch_llama(config: LMConfig, params) -> LlamaForCausalLM:
    """transformers' Llama holding exactly our weights (the HF key map run backwards)."""
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids),
        pad_token_id=config.pad_token_id,
    )
    flat = flatten_tree(params)
    state = {}
    for rule in decoder_rules(config):
        if rule.target not in flat:
            continue  # the untied head of a tied model
        value = np.asarray(flat[rule.target])
        invert = (lambda a: a.T) if rule.transform is transpose else (lambda a: a)
        layers = [(rule.source.format(i=i), value[i]) for i in range(config.n_layers)]
        for name, array in layers if rule.stacked else [(rule.source, value)]:
            state[name] = torch.from_numpy(np.array(invert(array)))  # a writable copy
    model = LlamaForCausalLM(hf_config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model


def prompt_batch(tokenizer, config: LMConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `batch` CounterFact prompts in the SmolLM2 template, left-padded."""
    template = get_template("smollm2")
    records = read_records(PROMPTS)[:batch]
    ids = tokenizer([template.format_query(r["prompt"]) for r in records])["input_ids"]
    return left_pad(ids, config.pad_token_id)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(ours, theirs, runs: int) -> dict:
    """Warm-up then `runs` alternating timings of two zero-argument callables."""
    warm = {"ours": timed(ours), "torch": timed(theirs)}
    times = {"ours": [], "torch": []}
    for _ in range(runs):
        times["ours"].append(timed(ours))
        times["torch"].append(timed(theirs))
    return {
        "warmup_s": warm,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "runs_s": times,
    }


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        # The machine may be shared: the load average says how much of it the runs had.
        "load_average_1_5_15min": os.getloadavg(),
    }


def bench_batch(config, params, model, tokens, mask, new_tokens, runs) -> dict:
    b, t = tokens.shape
    jt, jm = jnp.asarray(tokens), jnp.asarray(mask)
    tt, tm = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    forward = jax.jit(lambda p, x, m: Decoder(config).apply({"params": p}, x, m))

    def ours_forward():
        forward(params, jt, jm).block_until_ready()

    def torch_forward():
        with torch.inference_mode():
            model(input_ids=tt, attention_mask=tm)

    def ours_decode():
        return np.asarray(
            greedy_generate(config, params, jt, jm, max_new_tokens=new_tokens, stop_ids=())
        )

    def torch_decode(min_new_tokens=new_tokens):
        with torch.inference_mode():
            out = model.generate(
                input_ids=tt,
                attention_mask=tm,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=min_new_tokens,
                eos_token_id=list(config.eos_token_ids),
                pad_token_id=config.pad_token_id,
            )
        return out[:, t:].numpy()

    def same_answers() -> float:
        """Fraction of rows whose greedy answers (up to EOS, as both stop) are identical."""
        ours = np.asarray(
            greedy_generate(
                config, params, jt, jm, max_new_tokens=new_tokens, stop_ids=config.eos_token_ids
            )
        )
        theirs = np.full_like(ours, config.pad_token_id)
        out = torch_decode(min_new_tokens=0)  # HF stops early when every row has ended
        theirs[:, : out.shape[1]] = out
        return float(np.mean(np.all(ours == theirs, axis=1)))

    fwd = measure(ours_forward, torch_forward, runs)
    dec = measure(ours_decode, torch_decode, runs)
    for result, n_tokens in ((fwd, b * t), (dec, b * new_tokens)):
        med = result["median_s"]
        result["tokens_per_s"] = {k: n_tokens / v for k, v in med.items()}
        result["ratio"] = med["torch"] / med["ours"]
    return {
        "batch": b,
        "prompt_len": t,
        "forward": fwd,
        "decode": dec,
        "same_greedy_answers": same_answers(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decode.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    start = time.perf_counter()
    config, params, tokenizer = load_host("smollm2")
    load_s = time.perf_counter() - start
    model = torch_llama(config, params)
    load_before = os.getloadavg()
    results = {}
    for batch in args.batch_sizes:
        tokens, mask = prompt_batch(tokenizer, config, batch)
        r = bench_batch(config, params, model, tokens, mask, args.new_tokens, args.runs)
        results[f"batch_{batch}"] = r
        for kind in ("forward", "decode"):
            tps = r[kind]["tokens_per_s"]
            print(
                f"B={batch:3d} T={r['prompt_len']:3d} {kind:7s} ours {tps['ours']:9.1f} tok/s  "
                f"torch {tps['torch']:9.1f} tok/s  ratio {r[kind]['ratio']:.2f}  "
                f"(warm-up ours {r[kind]['warmup_s']['ours']:.1f}s)",
                flush=True,
            )
        print(f"B={batch:3d} identical greedy answers {r['same_greedy_answers']:.3f}", flush=True)

    largest = results[f"batch_{max(args.batch_sizes)}"]
    report = {
        "what": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32) forward and greedy "
        "decode tokens/s, meg_jax (JAX) over transformers (PyTorch), CPU",
        "ratio": largest["decode"]["ratio"],
        "ratios": {
            f"{kind}_b{b}": results[f"batch_{b}"][kind]["ratio"]
            for b in args.batch_sizes
            for kind in ("forward", "decode")
        },
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "load_s": load_s,
        "results": results,
        "load_average_at_start": load_before,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(args.out, report)
    print(f"ratio (batched decode, ours / torch) = {report['ratio']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
