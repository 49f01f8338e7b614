"""The MeG editor: query text -> the neuron the host model runs that query with.

Axes: Q queries, E encoder width, P flat neuron length, D host model width.

For each query (METHOD.md §4.5):
  1. the router reads the InfoNCE-tuned [CLS] of the *raw* query (not normalised) and scores it
     (the familiarity entropy, or with a nearest-query gate the distance to the nearest edit
     query); at or above the threshold the query is unrelated and gets the all-zero neuron,
     which is exactly the unedited model;
  2. otherwise the generator samples the neuron from the L2-normalised [CLS] of the *templated*
     query, with noise named by the query's text, and it is unflattened into the host's layout.
Only routed queries are sent to the diffusion sampler, so unrelated traffic costs no sampling.
"""

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from meg_jax.diffusion.config import GeneratorConfig
from meg_jax.diffusion.generate import generate
from meg_jax.encoder.text_encoder import TextEncoder
from meg_jax.models.neuron import Neuron, unflatten_neuron
from meg_jax.router.gate import Gate

# Any function from raw queries to one neuron per query; the all-zero neuron is "no edit".
Editor = Callable[[Sequence[str]], Neuron]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MeGEditor:
    """Callable `editor(queries) -> Neuron [Q]`, composing router and generator.

    A query's neuron depends on the query and the seed only: its sampling noise is named by a
    hash of the query text (not its position among the routed queries), and sampling always runs
    in chunks of `sample_chunk` rows, so one compiled program computes it alone or in any batch.
    Generated neurons that are not finite are replaced by the zero neuron (the unedited model)
    and counted in `non_finite`.
    """

    router_encoder: TextEncoder  # raw queries, not normalised
    condition_encoder: TextEncoder  # templated queries (the generator normalises them)
    router: Gate | None  # None: every query gets a generated neuron ("w/o FN" ablation)
    generator_params: object
    generator_config: GeneratorConfig
    d_model: int
    with_bias: bool
    seed: int = 0
    sample_chunk: int = 64
    mesh: Mesh | None = None
    non_finite: int = 0  # generated neurons replaced by zero so far

    def routed(self, queries: Sequence[str]) -> np.ndarray:
        """bool [Q]: which queries the familiarity network sends to the generator."""
        if self.router is None:
            return np.ones(len(queries), bool)
        return np.asarray(self.router.route(self.router_encoder.encode(queries)))

    def flat(self, queries: Sequence[str]) -> np.ndarray:
        """Flat neurons [Q, P] (zero rows for unrouted queries)."""
        queries = list(queries)
        size = 2 * self.d_model + int(self.with_bias)
        flat = np.zeros((len(queries), size), np.float32)
        routed = np.flatnonzero(self.routed(queries))
        if len(routed):
            texts = [queries[i] for i in routed]
            sampled = np.asarray(
                generate(
                    self.generator_params,
                    self.condition_encoder.encode(texts),
                    jax.random.PRNGKey(self.seed),
                    self.generator_config,
                    mesh=self.mesh,
                    ids=np.asarray([query_id(t) for t in texts], np.uint32),
                    chunk_size=self.sample_chunk,
                )
            )
            bad = ~np.isfinite(sampled).all(axis=1)
            if bad.any():
                self.non_finite += int(bad.sum())
                log.warning("%d generated neuron(s) not finite: given the zero neuron", bad.sum())
                sampled[bad] = 0.0
            flat[routed] = sampled
        return flat

    def __call__(self, queries: Sequence[str]) -> Neuron:
        return unflatten_neuron(self.flat(queries), self.d_model, self.with_bias)


def query_id(text: str) -> int:
    """A stable 32-bit name of a query's text: it picks the query's sampling noise."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "little")


def zero_editor(d_model: int) -> Editor:
    """The unedited model: every query gets the all-zero neuron."""

    def editor(queries: Sequence[str]) -> Neuron:
        q = len(queries)
        return Neuron(
            np.zeros((q, d_model), np.float32),
            np.zeros((q,), np.float32),
            np.zeros((q, d_model), np.float32),
        )

    return editor
