"""Stage 3, knowledge-weight collection: one fitted neuron per edit, saved as a weight bank.

Axes: N edits, B edits per batch, T tokens, P flat neuron length.

The procedure is the reference's (METHOD.md §3.2) with the fix of §3.3b: every fit starts from
the same initial neuron (a true reset of both halves), the training sequence is
`query + " {answer}." + eos` with the prompt tokens masked out of the loss, plain SGD, then a
greedy success test (and optionally more steps for the fits that failed it). Edits are fitted B
at a time (see `fit.py`) and the bank is saved after every chunk, so an interrupted run resumes
from the last saved chunk without refitting anything.
"""

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from meg_jax.collect.bank import WeightBank, load_bank, save_bank
from meg_jax.collect.fit import learning_rate_schedule, sgd_fit, torch_linear_init
from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder
from meg_jax.models.generate import greedy_generate, left_pad
from meg_jax.models.neuron import Neuron, flatten_neuron, unflatten_neuron

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    """Weight-collection settings; the defaults are the SmolLM2 choice (METHOD.md §3.3b)."""

    learning_rate: float = 0.5
    steps: int = 50
    # More steps for the fits that fail the first greedy test (the reference's Phi-2 recipe:
    # test at 80, continue failed ones to 160). 0 disables the second round.
    retry_steps: int = 0
    schedule: str = "constant"  # or "cosine" (the reference's GPT-J CosineAnnealingLR)
    cosine_period: int = 500
    batch_size: int = 16
    max_new_tokens: int = 20
    seed: int = 42
    # Start every fit from this bank's `init` (e.g. to compare with the shared reference bank);
    # empty: the seeded PyTorch-Linear-style initial neuron.
    init_from_bank: str = ""
    # Edits per saved chunk: the resume granularity.
    chunk_size: int = 64


@dataclasses.dataclass(frozen=True)
class EditToFit:
    """One edit as the collection stage sees it: already templated text."""

    case_id: int
    query: str  # the templated prompt
    answer: str  # the fitting continuation, `" {target}." + eos`
    target: str  # the bare target, for the success test


def _training_batch(tokenizer, edits: Sequence[EditToFit], pad_id: int, bucket: int = 8):
    """Right-padded (tokens, mask, next-token targets, answer-loss mask), each [B, T]."""
    rows, prompt_lens = [], []
    for edit in edits:
        prompt_ids = tokenizer(edit.query)["input_ids"]
        full_ids = tokenizer(edit.query + edit.answer)["input_ids"]
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
    """Fits neurons for batches of edits on one frozen host model."""

    def __init__(self, config: LMConfig, params, tokenizer, cfg: CollectConfig, success_fn):
        self.config, self.params, self.tokenizer, self.cfg = config, params, tokenizer, cfg
        self.success_fn = success_fn
        if cfg.init_from_bank:
            init = load_bank(cfg.init_from_bank).init
            self.init = unflatten_neuron(
                jnp.asarray(init[None]), config.d_model, config.neuron_has_bias
            )
        else:
            self.init = torch_linear_init(config, cfg.seed)
        self.stop_ids = tuple(config.eos_token_ids)

    def _answers(self, edits: Sequence[EditToFit], neuron: Neuron) -> list[bool]:
        prompts = [self.tokenizer(e.query)["input_ids"] for e in edits]
        tokens, mask = left_pad(prompts, self.config.pad_token_id)
        out = greedy_generate(
            self.config,
            self.params,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            neuron,
            max_new_tokens=self.cfg.max_new_tokens,
            stop_ids=self.stop_ids,
        )
        texts = self.tokenizer.batch_decode(np.asarray(out), skip_special_tokens=True)
        return list(self.success_fn(texts, [e.target for e in edits]))

    def fit_batch(self, edits: Sequence[EditToFit]) -> WeightBank:
        """Fits up to `batch_size` edits; short batches are padded (by repeating the last edit)
        so that every call has the same shapes and reuses one compiled step."""
        n_real = len(edits)
        edits = list(edits) + [edits[-1]] * (self.cfg.batch_size - n_real)
        return self._fit(edits).select(np.arange(n_real))

    def _fit(self, edits: Sequence[EditToFit]) -> WeightBank:
        cfg, config = self.cfg, self.config
        tokens, mask, targets, loss_mask = _training_batch(
            self.tokenizer, edits, config.pad_token_id
        )
        batch = len(edits)
        hidden = Decoder(config).apply(
            {"params": self.params},
            jnp.asarray(tokens),
            jnp.asarray(mask),
            method=Decoder.hidden_before,
        )
        neuron = Neuron(*(jnp.repeat(x, batch, axis=0) for x in self.init))
        active = jnp.ones((batch,), bool)
        args = (
            config,
            self.params,
            hidden,
            jnp.asarray(mask),
            jnp.asarray(targets),
            jnp.asarray(loss_mask),
        )
        lrs = learning_rate_schedule(
            cfg.learning_rate, cfg.schedule, 0, cfg.steps, cfg.cosine_period
        )
        neuron, loss = sgd_fit(*args, neuron, active, jnp.asarray(lrs))
        success = np.asarray(self._answers(edits, neuron))
        if cfg.retry_steps and not success.all():
            lrs = learning_rate_schedule(
                cfg.learning_rate, cfg.schedule, cfg.steps, cfg.retry_steps, cfg.cosine_period
            )
            neuron, loss = sgd_fit(*args, neuron, jnp.asarray(~success), jnp.asarray(lrs))
            success = np.asarray(self._answers(edits, neuron))
        weights = np.array(flatten_neuron(neuron, config.neuron_has_bias), np.float32)
        weights[~success] = np.nan  # failed fits are kept as rows, unusable as targets
        return WeightBank(
            np.asarray([e.case_id for e in edits], np.int64),
            weights,
            success,
            np.asarray(loss, np.float32),
            np.asarray(flatten_neuron(self.init, config.neuron_has_bias)[0], np.float32),
        )


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
            for b in range(0, len(chunk), cfg.batch_size):
                part = collector.fit_batch(chunk[b : b + cfg.batch_size])
                parts.append(part)
                bar.update(len(part))
                bar.set_postfix(
                    success=f"{np.mean(np.concatenate([p.success for p in parts])):.3f}"
                )
            bank = WeightBank.concatenate(parts)
            save_bank(bank, out_path)
            if on_chunk is not None:
                on_chunk(bank)
    bank = WeightBank.concatenate(parts) if parts else None
    if bank is None:
        raise ValueError("no edits to collect")
    log.info("collected %d neurons, %d successful", len(bank), int(bank.success.sum()))
    return bank
