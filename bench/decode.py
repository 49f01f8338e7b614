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
machine falls on both (PyTorch's OpenMP threads wait passively, see common.py). Results go to
bench/results/decode.json; `ratio` is ours / PyTorch's batched greedy-decode tokens/s.
"""

import argparse
import os
import time

import common  # noqa: F401  (first: it configures torch's thread pool)
import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import SHARED, alternate, write_result
from torch_reference import torch_llama

from meg_jax.checkpoints.hosts import load_host
from meg_jax.data.jsonio import read_records
from meg_jax.data.templates import get_template
from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder
from meg_jax.models.generate import greedy_generate, left_pad

PROMPTS = SHARED / "counterfact" / "counterfact-edit.json"


def prompt_batch(tokenizer, config: LMConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `batch` CounterFact prompts in the SmolLM2 template, left-padded."""
    template = get_template("smollm2")
    records = read_records(PROMPTS)[:batch]
    ids = tokenizer([template.format_query(r["prompt"]) for r in records])["input_ids"]
    return left_pad(ids, config.pad_token_id)


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

    fwd = alternate(ours_forward, torch_forward, runs)
    dec = alternate(ours_decode, torch_decode, runs)
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
    }
    path = write_result("decode", report)
    print(f"ratio (batched decode, ours / torch) = {report['ratio']:.2f} -> {path}")


if __name__ == "__main__":
    main()
