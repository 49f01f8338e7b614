"""Stage 3, knowledge-weight collection: one fitted neuron per edit, saved as a weight bank.

Axes: N edits, B slots (edits optimised at once), T tokens, A answer positions, P flat neuron
length.

The procedure is the reference's (METHOD.md §3.2) with the fix of §3.3b: every fit starts from
the same initial neuron (a true reset of both halves), the training sequence is
`query + " {answer}." + eos` with the prompt tokens masked out of the loss, then a greedy success
test (and optionally more steps for the fits that failed it). The reference's SmolLM2 schedule
(plain SGD, lr 0.5, 50 steps) is the default; `CollectConfig.fast()` is the fast recipe: Adam,
and a per-edit early stop once every answer token is the argmax and the loss is below
`stop_loss` (the reference's GPT-J rule).

With `context_seeds`, each edit is also fitted behind K short texts the host writes itself
(MEMIT's context templates; `Collector.contexts`): its K + 1 sequences share its neuron, its loss
is their mean, and it stops only once its answer is the argmax in all of them. The success test
still asks the query alone.

How it runs (`Collector.fit`): the frozen layers below the neuron layer run once per edit; the
edits then stream through B slots of one compiled step (`fit.fit_steps`: layers from the neuron
layer up, logits at the answer positions only). Each slot is at its own step; between calls of
`check_every` steps, finished fits leave and waiting edits take their slots, and once none waits
the running fits are compacted into B/2, B/4, ... slots. Rows never interact, so none of this
changes a fitted neuron. The bank is saved after every chunk of edits, so an interrupted run
resumes from the last saved chunk without refitting anything.

On a mesh (`Collector(..., mesh=)`), the host's weights are placed by the decoder partition
rules (split over "model", replicated over "data") and everything with a slot axis (token
batches, the hidden states, the neurons, Adam's moments, the per-row counters) is split over
"data": each data shard of devices fits its own B / data slots, with no communication between
shards beyond what the "model" split needs. The slot count is rounded up to a multiple of the
data size, and compaction only goes to slot counts that stay such multiples.
"""

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from meg_jax.collect.bank import WeightBank, load_bank, save_bank
from meg_jax.collect.fit import (
    FitState,
    answer_positions,
    fit_steps,
    hidden_before,
    init_state,
    learning_rate_schedule,
    torch_linear_init,
)
from meg_jax.infra.distributed import device_put_global, gather_to_host
from meg_jax.infra.sharding import DECODER_RULES, param_shardings, shard_batch
from meg_jax.models.config import LMConfig
from meg_jax.models.generate import greedy_generate, left_pad
from meg_jax.models.neuron import Neuron, flatten_neuron, unflatten_neuron

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    """Weight-collection settings.

    The defaults are the reference's procedure with the SmolLM2 learning rate (METHOD.md §3.3b:
    plain SGD, lr 0.5, 50 steps, no early stop). The fast recipe (bench/collection.py) is
    `optimizer="adam"`, a smaller lr, `early_stop=True`; see `CollectConfig.fast()`.
    """

    learning_rate: float = 0.5
    steps: int = 50
    # More steps for the fits that fail the first greedy test (the reference's Phi-2 recipe:
    # test at 80, continue failed ones to 160). 0 disables the second round.
    retry_steps: int = 0
    schedule: str = "constant"  # or "cosine" (the reference's GPT-J CosineAnnealingLR)
    cosine_period: int = 500
    # "sgd" (the reference: no momentum, no decay), "nsgd" (each update a step of L2 length
    # `learning_rate` along the row's gradient) or "adam" (per-row bias correction).
    optimizer: str = "sgd"
    # Stop a fit as soon as every answer token is the argmax and its loss is below `stop_loss`
    # (the reference's GPT-J rule); its slot then takes the next edit.
    early_stop: bool = False
    stop_loss: float = 0.2
    # Optimisation steps per compiled call; stopped rows are replaced between calls.
    check_every: int = 2
    # Slots (edits optimised at once). Once no edit is waiting, the running ones are compacted
    # into B/2, B/4, ... down to `min_batch` slots.
    batch_size: int = 16
    min_batch: int = 4
    # Logits at every position, then gathered (slow; only to measure the answer-only head).
    full_head: bool = False
    max_new_tokens: int = 20
    seed: int = 42
    # Start every fit from this bank's `init` (e.g. to compare with the shared reference bank);
    # empty: the seeded PyTorch-Linear-style initial neuron.
    init_from_bank: str = ""
    # Edits per saved chunk: the resume granularity.
    chunk_size: int = 64
    # Contexts (MEMIT's context templates): each seed's greedy continuation of `context_tokens`
    # tokens by the host, put before the query; each edit is fitted on its query alone and
    # behind each context (`Collector.contexts`), so its neuron states the fact after unrelated
    # text too, as CounterFact's paraphrase prompts begin. Empty: the query alone (reference).
    context_seeds: tuple[str, ...] = ()
    context_tokens: int = 10

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"CollectConfig.{field}: {why}, got {getattr(self, field)!r}")

        if self.schedule not in ("constant", "cosine"):
            bad("schedule", "expected 'constant' or 'cosine'")
        if self.optimizer not in ("sgd", "nsgd", "adam"):
            bad("optimizer", "expected 'sgd', 'nsgd' or 'adam'")
        if not self.learning_rate > 0:
            bad("learning_rate", "must be > 0")
        for name in ("steps", "cosine_period", "check_every", "batch_size", "min_batch"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("chunk_size", "max_new_tokens", "context_tokens"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.retry_steps < 0:
            bad("retry_steps", "must be >= 0")
        if self.early_stop and not self.stop_loss > 0:
            bad("stop_loss", "must be > 0 when early_stop is on")
        if not all(isinstance(x, str) and x.strip() for x in self.context_seeds):
            bad("context_seeds", "expected non-empty strings")

    @classmethod
    def fast(cls, **overrides) -> "CollectConfig":
        """The fast recipe measured by bench/collection.py (Adam, early stop, answer-only head).

        This recipe collects 23.8x faster than the reference-style loop (bench/collection.py,
        256 CounterFact edits, SmolLM2 `smollm2_qa`), each edit stopped once every answer token
        is the argmax with loss below 0.2: 6.1 updates per edit on the first 32 edits. Adam's
        first steps move every weight by about lr whatever its gradient, so those neurons spread
        8.3 from their mean (3.6 in the SGD reference bank) and the generator's criterion, an
        absolute distance, stays at 1.2 after 1,000 steps on the 256-edit bank. Two other
        recipes were measured (bench/results/collection.json, `levers_steps_per_edit`):
          - normalised SGD, `optimizer="nsgd"`, lr 1.0 (configs/smollm2_cf.py:fit=nsgd): 7.0
            updates per edit, spread 3.5, and in the main job the generator stops below 0.5
            after 1,000 steps (0.38); but each neuron answers fewer paraphrases (its own Gen AG
            46.9 against 65.2) and the main job scores 59.4 (Gen AG 32.4) against 68.0 (42.6)
            here (bench/results/default_fitnsgd.json);
          - Adam lr 0.2 with stop_loss 1.0: 4.2 updates per edit, 26.5x, spread 11.4, Score 54.9
            (`rejected_recipe_lr0.2_stop1.0`).
        """
        base = dict(
            optimizer="adam",
            learning_rate=0.1,
            steps=50,
            early_stop=True,
            stop_loss=0.2,
            check_every=1,
            batch_size=32,
            min_batch=4,
            chunk_size=256,
        )
        return cls(**{**base, **overrides})


@dataclasses.dataclass(frozen=True)
class EditToFit:
    """One edit as the collection stage sees it: already templated text."""

    case_id: int
    query: str  # the templated prompt
    answer: str  # the fitting continuation, `" {target}." + eos`
    target: str  # the bare target, for the success test
    # The query behind other text, templated the same (`CollectConfig.context_seeds`): fitted
    # with the same answer; the success test asks `query` alone.
    contexts: tuple[str, ...] = ()

    @property
    def queries(self) -> tuple[str, ...]:
        return (self.query, *self.contexts)


def _training_batch(tokenizer, edits: Sequence[EditToFit], pad_id: int, bucket: int = 8):
    """Right-padded (tokens, mask, next-token targets, answer-loss mask), each [B * K, T]: the
    K = len(queries) sequences of each edit, edit-major (every edit must have the same K)."""
    rows, prompt_lens = [], []
    for edit in edits:
        if len(edit.queries) != len(edits[0].queries):
            raise ValueError(
                f"edit {edit.case_id}: {len(edit.queries)} queries, but edit "
                f"{edits[0].case_id} of the same batch has {len(edits[0].queries)}"
            )
        for query in edit.queries:
            prompt_ids = tokenizer(query)["input_ids"]
            full_ids = tokenizer(query + edit.answer)["input_ids"]
            if len(full_ids) <= len(prompt_ids):
                raise ValueError(f"edit {edit.case_id}: the answer {edit.answer!r} adds no tokens")
            rows.append(full_ids)
            prompt_lens.append(len(prompt_ids))
    length = -(-max(len(r) for r in rows) // bucket) * bucket
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    loss_mask = np.zeros((len(rows), length), bool)
    for i, (row, n_prompt) in enumerate(zip(rows, prompt_lens, strict=True)):
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = True
        # Position t predicts token t+1: answer tokens are predicted from n_prompt-1 on.
        loss_mask[i, n_prompt - 1 : len(row) - 1] = True
    targets = np.concatenate([tokens[:, 1:], np.full((len(rows), 1), pad_id, np.int32)], axis=1)
    return tokens, mask, targets, loss_mask


class Collector:
    """Fits neurons for any number of edits on one frozen host model.

    Edits stream through `batch_size` slots (module docstring of `fit.py` for why a batch is one
    forward/backward pass): each slot holds one fit at its own step; between compiled calls of
    `check_every` steps, finished fits leave and waiting edits take their slots, and once none
    waits the running fits are compacted into fewer slots. A fit's trajectory depends only on
    its own edit, so batching, slot order and compaction change no fitted neuron.

    With `mesh`, the host weights go on its "model" axis and the slots on its "data" axis
    (module docstring); `width` is then `cfg.batch_size` rounded up to a multiple of the data
    size. Without one, everything runs on the default device, as before.
    """

    def __init__(
        self,
        config: LMConfig,
        params,
        tokenizer,
        cfg: CollectConfig,
        success_fn,
        mesh: Mesh | None = None,
    ):
        self.config, self.tokenizer, self.cfg = config, tokenizer, cfg
        self.success_fn = success_fn
        self.mesh = mesh
        self.shards = 1 if mesh is None else int(mesh.shape["data"])
        # Already placed by these rules (the pipeline loads the host so): device_put keeps them.
        self.params = (
            params
            if mesh is None
            else device_put_global(params, param_shardings(mesh, DECODER_RULES, params))
        )
        self.width = -(-cfg.batch_size // self.shards) * self.shards
        if cfg.init_from_bank:
            init = load_bank(cfg.init_from_bank).init
            self.init = unflatten_neuron(
                jnp.asarray(init[None]), config.d_model, config.neuron_has_bias
            )
        else:
            self.init = torch_linear_init(config, cfg.seed)
        self.stop_ids = tuple(config.eos_token_ids)
        self.lr_table = jnp.asarray(
            learning_rate_schedule(
                cfg.learning_rate,
                cfg.schedule,
                0,
                cfg.steps + cfg.retry_steps,
                cfg.cosine_period,
            )
        )
        self.stats = {"steps": 0, "row_steps": 0, "calls": 0}  # slot-steps run, for benchmarks

    def _answers(self, edits: Sequence[EditToFit], neuron: Neuron) -> np.ndarray:
        """[N] the greedy success test, run B at a time (the last batch padded to B rows)."""
        prompts = [self.tokenizer(e.query)["input_ids"] for e in edits]
        batch = self.width
        out = []
        for b in range(0, len(edits), batch):
            rows = prompts[b : b + batch]
            n = len(rows)
            rows = rows + [rows[-1]] * (batch - n)
            take = np.minimum(np.arange(b, b + batch), len(edits) - 1)
            tokens, mask = left_pad(rows, self.config.pad_token_id)
            tokens, mask, rows_neuron = self._place(
                (tokens, mask, Neuron(*(np.asarray(x)[take] for x in neuron)))
            )
            generated = greedy_generate(
                self.config,
                self.params,
                tokens,
                mask,
                rows_neuron,
                max_new_tokens=self.cfg.max_new_tokens,
                stop_ids=self.stop_ids,
                min_rows=self._answer_min_rows(),
            )
            generated = gather_to_host(generated)
            texts = self.tokenizer.batch_decode(generated[:n], skip_special_tokens=True)
            out.extend(self.success_fn(texts, [e.target for e in edits[b : b + n]]))
        return np.asarray(out, bool)

    def contexts(self) -> tuple[str, ...]:
        """The texts put before the queries (`CollectConfig.context_seeds`): each seed and the
        host's greedy continuation of it, at most `context_tokens` new tokens, on one line."""
        seeds = self.cfg.context_seeds
        if not seeds:
            return ()
        # Each seed opens a line, as text does: SmolLM2-Instruct continues a bare "The" with
        # "-the-world-is-a-world", and "\nThe" with "The company's decision to prioritize...".
        rows = [self.tokenizer("\n" + seed)["input_ids"] for seed in seeds]
        width = -(-len(rows) // self.shards) * self.shards  # the data axis splits the rows
        tokens, mask = left_pad(rows + [rows[-1]] * (width - len(rows)), self.config.pad_token_id)
        generated = greedy_generate(
            self.config,
            self.params,
            *self._place((tokens, mask)),
            max_new_tokens=self.cfg.context_tokens,
            stop_ids=self.stop_ids,
        )
        texts = self.tokenizer.batch_decode(
            gather_to_host(generated)[: len(seeds)], skip_special_tokens=True
        )
        pairs = zip(seeds, texts, strict=True)
        return tuple(" ".join(f"{seed}{text}".split()) for seed, text in pairs)

    def _place(self, tree):
        """Slot-major arrays onto the devices: split over the mesh's "data" axis, or (no mesh)
        on the default device."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return shard_batch(self.mesh, tree)

    def _answer_min_rows(self) -> int:
        """The success test's compaction floor (`greedy_generate(min_rows=)`); 0: none.

        Halving B slots keeps them a multiple of the data size only while B / data is a power
        of two and the floor is at least the data size; otherwise the test runs all B rows.
        """
        if self.shards == 1:
            return max(1, self.cfg.min_batch)
        per_shard = self.width // self.shards
        if per_shard & (per_shard - 1):
            return 0
        return max(self.cfg.min_batch, self.shards)

    def fit_batch(self, edits: Sequence[EditToFit]) -> WeightBank:
        """Fits `edits` (any number; the name is kept from when it was one batch)."""
        return self.fit(edits)

    def fit(self, edits: Sequence[EditToFit]) -> WeightBank:
        cfg, config = self.cfg, self.config
        n, k = len(edits), len(edits[0].queries)
        # Lengths rounded to 4, not 8: every padded position costs a full step of work.
        tokens, mask, targets, loss_mask = _training_batch(
            self.tokenizer, edits, config.pad_token_id, bucket=4
        )
        index, answer_targets, weights = answer_positions(loss_mask, targets)

        def per_edit(x: np.ndarray) -> np.ndarray:  # [N * K, ...] -> [N, K, ...]
            return x.reshape(n, k, *x.shape[1:])

        data = {
            "hidden": per_edit(self._hidden(tokens, mask)),
            "mask": per_edit(mask),
            "index": per_edit(index),
            "targets": per_edit(answer_targets),
            "weights": per_edit(weights),
        }
        init = np.asarray(flatten_neuron(self.init, config.neuron_has_bias)[0], np.float32)
        start = np.repeat(init[None], n, axis=0)
        flat, loss, steps = self._optimise(data, np.arange(n), start, np.zeros(n, np.int32))
        success = self._answers(edits, self._unflat(flat))
        if cfg.retry_steps and not success.all():
            # Adam restarts its moments for the second round; SGD continues exactly.
            failed = np.flatnonzero(~success)
            f2, l2, _ = self._optimise(
                data, failed, flat[failed], steps[failed], cfg.steps + cfg.retry_steps
            )
            flat[failed], loss[failed] = f2, l2
            success[failed] = self._answers([edits[i] for i in failed], self._unflat(f2))
        weights_out = flat.copy()
        weights_out[~success] = np.nan  # failed fits are kept as rows, unusable as targets
        return WeightBank(
            np.asarray([e.case_id for e in edits], np.int64),
            weights_out,
            success,
            loss.astype(np.float32),
            init,
        )

    def _unflat(self, flat: np.ndarray) -> Neuron:
        return unflatten_neuron(jnp.asarray(flat), self.config.d_model, self.config.neuron_has_bias)

    def _hidden(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[R, T, D] the residual stream entering the neuron layer of R rows, B per call."""
        batch, n = self.width, len(tokens)
        parts = []
        for b in range(0, n, batch):
            take = np.minimum(np.arange(b, b + batch), n - 1)
            h = hidden_before(self.config, self.params, *self._place((tokens[take], mask[take])))
            parts.append(gather_to_host(h)[: min(batch, n - b)])
        return np.concatenate(parts)

    def _optimise(self, data: dict, rows, start, start_steps, limit: int | None = None):
        """Fits edits `rows` (indices into `data`, whose arrays are [N, K, ...]: K sequences per
        edit) from flat neurons start[R, P] at step counts start_steps[R] up to `limit` updates
        (default `steps`); returns (flat [R, P], final loss [R], updates taken [R])."""
        cfg, config = self.cfg, self.config
        limit = cfg.steps if limit is None else limit
        bias = config.neuron_has_bias
        out_flat = np.array(start, np.float32)
        out_loss = np.full(len(rows), np.inf, np.float32)
        out_steps = np.array(start_steps, np.int32)
        pending = list(range(len(rows)))[::-1]  # a stack: pop() takes the next in order
        width = self.width
        slot = np.full(width, -1)  # which of `rows` each slot holds; -1: empty
        state = jax.device_get(init_state(self.init, width))
        while True:
            # Refill the free slots (host side: the state is small, and placing a fit is a reset
            # of its row). Then the batch inputs are the slots' edits (empty slots repeat one).
            state = _to_numpy(state)
            for s in np.flatnonzero(slot < 0):
                if not pending:
                    break
                j = pending.pop()
                slot[s] = j
                n = unflatten_neuron(out_flat[j], config.d_model, bias)
                for leaf, value in zip(state.neuron, n, strict=True):
                    leaf[s] = np.asarray(value)
                for moments in (state.m, state.v):
                    for leaf in moments:
                        leaf[s] = 0
                state.steps[s] = out_steps[j]
                state.done[s] = False
                state.loss[s] = np.inf
                state.correct[s] = False
            if (slot < 0).all():
                break
            held = rows[np.maximum(slot, 0)]
            keys = ("hidden", "mask", "index", "targets", "weights")
            sequences = [data[k][held].reshape(-1, *data[k].shape[2:]) for k in keys]
            inputs, placed = self._place((sequences, state))
            state = fit_steps(
                config,
                self.params,
                *inputs,
                placed,
                jnp.asarray(limit, jnp.int32),
                self.lr_table,
                jnp.asarray(cfg.stop_loss, jnp.float32),
                optimizer=cfg.optimizer,
                num_steps=cfg.check_every,
                early_stop=cfg.early_stop,
                full_head=cfg.full_head,
                contexts=data["mask"].shape[1],
            )
            self.stats["calls"] += 1
            self.stats["steps"] += cfg.check_every
            self.stats["row_steps"] += cfg.check_every * width
            state = _to_numpy(gather_to_host(state))
            flat = np.asarray(flatten_neuron(Neuron(*state.neuron), bias))
            for s in np.flatnonzero((slot >= 0) & state.done):
                j = slot[s]
                out_flat[j], out_loss[j], out_steps[j] = flat[s], state.loss[s], state.steps[s]
                slot[s] = -1
            running = np.flatnonzero(slot >= 0)
            if not pending and len(running) and len(running) <= width // 2:
                # Compaction: nothing waits, so the running fits move to fewer slots.
                # On a mesh, only to slot counts the data axis still divides.
                new = width
                while new // 2 >= max(len(running), cfg.min_batch, self.shards) and not (
                    (new // 2) % self.shards
                ):
                    new //= 2
                if new < width:
                    keep = np.concatenate([running, np.flatnonzero(slot < 0)[: new - len(running)]])
                    state = jax.tree.map(lambda x: x[keep], state)  # noqa: B023
                    slot, width = slot[keep], new
        return out_flat, out_loss, out_steps


def _to_numpy(state: FitState) -> FitState:
    """A writable host copy of a `FitState`."""
    return jax.tree.map(lambda x: np.array(x), state)


def collect_bank(
    collector: Collector, edits: Sequence[EditToFit], out_path, on_chunk: Callable | None = None
) -> WeightBank:
    """Fits every edit, saving `out_path` after each chunk; resumes from a partial bank there."""
    out_path = Path(out_path)
    cfg = collector.cfg
    parts = []
    if out_path.exists():
        done = load_bank(out_path)
        expected = np.asarray([e.case_id for e in edits[: len(done)]], np.int64)
        if not np.array_equal(done.case_id, expected):
            raise ValueError(f"{out_path}: partial bank does not match the edits being collected")
        parts.append(done)
        log.info("resuming weight collection: %d of %d edits already fitted", len(done), len(edits))
    start = len(parts[0]) if parts else 0
    with tqdm(total=len(edits), initial=start, desc="collect", unit="edit") as bar:
        for chunk_start in range(start, len(edits), cfg.chunk_size):
            chunk = edits[chunk_start : chunk_start + cfg.chunk_size]
            part = collector.fit(chunk)
            parts.append(part)
            bar.update(len(part))
            bar.set_postfix(success=f"{np.mean(np.concatenate([p.success for p in parts])):.3f}")
            bank = WeightBank.concatenate(parts)
            save_bank(bank, out_path)
            if on_chunk is not None:
                on_chunk(bank)
    bank = WeightBank.concatenate(parts) if parts else None
    if bank is None:
        raise ValueError("no edits to collect")
    log.info("collected %d neurons, %d successful", len(bank), int(bank.success.sum()))
    return bank
