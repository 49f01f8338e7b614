"""Key second moments C_l = E[k k^T] [F, F] at the edited layers, from an offline text corpus.

Axes: N texts, B batch, T tokens, F MLP width.

MEMIT and AlphaEdit both need, per edited layer, the uncentred second moment of the keys the
layer sees on ordinary text (MEMIT: 100,000 Wikipedia samples). Nothing can be downloaded here,
so the corpus is one that is on disk (`CORPORA`):

  "facts": the CounterFact *train* split (disjoint from the edit split) and the zsRE file of
      ../shared/data, each record's prompts completed with their true answers as sentences
      ("Toko Yasuda, the guitar.", its paraphrase, its neighbourhood prompt, the zsRE question
      with its answer and its NQ question with its answer). 10,000 CounterFact records x 3 +
      1,000 zsRE x 2 = 32,000 short texts, about 330,000 tokens with SmolLM2's tokenizer.
      Encyclopaedic sentences, like Wikipedia's, but short: the statistics weight the first
      positions of a text more than Wikipedia's 1,024-token samples would.

The sum of k k^T and the token count are accumulated in float64, saved every `save_every`
batches (an interrupted run resumes from there), and the finished moment is cached per (host,
corpus, layer): computing it once serves every later MEMIT and AlphaEdit run. Files are written
atomically, so a partial file never passes for a finished one.
"""

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from meg_jax.baselines.edited_host import EditRows, keys_at_layers
from meg_jax.infra.files import write_npz_atomic
from meg_jax.infra.fingerprint import digest
from meg_jax.models.config import LMConfig

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """Where key statistics come from (the `baseline.stats` section of a config)."""

    corpus: str = "facts"  # a name in CORPORA
    data_dir: str = str(SHARED)
    n_texts: int = 0  # the first n texts of the corpus (0: all)
    max_tokens: int = 64  # texts are cut to this many tokens
    batch_size: int = 64
    save_every: int = 50  # batches between progress saves


def _facts(data_dir: Path) -> list[str]:
    texts = []
    cf = json.loads((data_dir / "counterfact" / "counterfact-train.json").read_text())
    for r in cf:
        texts.append(f"{r['prompt']} {r['ground_truth']}.")
        texts.append(f"{r['rephrase_prompt']} {r['ground_truth']}.")
        texts.append(f"{r['locality_prompt']} {r['locality_ground_truth']}.")
    zsre = json.loads((data_dir / "zsre" / "zsre_mend_train-1k.json").read_text())
    for r in zsre:
        texts.append(f"{r['src']} {r['answers'][0]}.")
        texts.append(f"{r['loc'].removeprefix('nq question: ')}? {r['loc_ans']}.")
    return texts


CORPORA = {"facts": _facts}


def corpus_texts(cfg: StatsConfig) -> list[str]:
    """The corpus texts, first `n_texts` of them when set."""
    if cfg.corpus not in CORPORA:
        raise ValueError(f"baseline.stats.corpus: {cfg.corpus!r} not in {sorted(CORPORA)}")
    texts = CORPORA[cfg.corpus](Path(cfg.data_dir))
    return texts[: cfg.n_texts] if cfg.n_texts else texts


def token_rows(tokenizer, texts, max_tokens: int) -> list[tuple[int, ...]]:
    return [tuple(tokenizer(t)["input_ids"][:max_tokens]) for t in texts]


def accumulate(
    config: LMConfig,
    params,
    sequences: list[tuple[int, ...]],
    layers: tuple[int, ...],
    batch_size: int,
    state: dict | None = None,
    on_progress=None,
    save_every: int = 0,
    desc: str = "key statistics",
) -> dict:
    """Sums {"sum": [len(layers), F, F] float64, "count": tokens, "done": texts} over the
    token `sequences`, continuing from `state` (its "done" texts are skipped). `on_progress`
    gets the state every `save_every` batches."""
    f = config.d_ff
    if state is None:
        state = {"sum": np.zeros((len(layers), f, f)), "count": 0, "done": 0}
    starts = range(state["done"], len(sequences), batch_size)
    for n, start in enumerate(tqdm(starts, desc=desc, leave=False), 1):
        chunk = sequences[start : start + batch_size]
        rows = EditRows(tuple(chunk), (0,) * len(chunk), (0,) * len(chunk), (0,) * len(chunk))
        ids, mask = rows.padded(config.pad_token_id)
        state["sum"] += np.asarray(_batch_moment(config, params, ids, mask, layers), np.float64)
        state["count"] += int(mask.sum())
        state["done"] = start + len(chunk)
        if on_progress is not None and save_every and n % save_every == 0:
            on_progress(state)
    return state


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def _batch_moment(config: LMConfig, params, ids, mask, layers: tuple[int, ...]):
    """sum over the batch's real tokens of k k^T, [len(layers), F, F] (float32 within a batch,
    float64 across batches)."""
    keys = keys_at_layers(config, params, ids, mask, layers)  # [Ly, B, T, F]
    keys = keys * mask[None, :, :, None].astype(keys.dtype)  # padding carries no text
    return jnp.einsum("lbtf,lbtg->lfg", keys, keys)


def key_moments(
    config: LMConfig,
    params,
    tokenizer,
    layers: tuple[int, ...],
    cfg: StatsConfig,
    cache_dir: str | Path | None,
    host_id: str,
) -> dict[int, np.ndarray]:
    """{layer: C_l [F, F] float64}: loaded from `cache_dir`, or computed (resuming any partial
    run there) and cached. `host_id` names the weights; it is part of the cache key."""
    layers = tuple(sorted(layers))
    key = digest([host_id, dataclasses.asdict(cfg) | {"data_dir": ""}])[:16]
    folder = None if cache_dir is None else Path(cache_dir)
    out, todo = {}, []
    for layer in layers:
        path = None if folder is None else folder / f"moments-{key}-layer{layer}.npz"
        if path is not None and path.is_file():
            with np.load(path) as data:
                out[layer] = data["moment"]
        else:
            todo.append(layer)
    if not todo:
        return out
    todo = tuple(todo)
    partial = (
        None if folder is None else folder / f"moments-{key}-partial-{'-'.join(map(str, todo))}.npz"
    )
    state = None
    if partial is not None and partial.is_file():
        with np.load(partial) as data:
            state = {"sum": data["sum"], "count": int(data["count"]), "done": int(data["done"])}

    def save(s):
        write_npz_atomic(partial, sum=s["sum"], count=s["count"], done=s["done"])

    sequences = token_rows(tokenizer, corpus_texts(cfg), cfg.max_tokens)
    state = accumulate(
        config,
        params,
        sequences,
        todo,
        cfg.batch_size,
        state,
        on_progress=save if partial is not None else None,
        save_every=cfg.save_every,
        desc=f"key statistics, layers {list(todo)}",
    )
    for i, layer in enumerate(todo):
        moment = state["sum"][i] / max(state["count"], 1)
        out[layer] = moment
        if folder is not None:
            path = folder / f"moments-{key}-layer{layer}.npz"
            write_npz_atomic(path, moment=moment, count=state["count"], texts=state["done"])
    if partial is not None:
        partial.unlink(missing_ok=True)
    return out
