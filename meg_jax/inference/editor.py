"""The MeG editor: query text -> the neuron the host model runs that query with.

Axes: Q queries, E encoder width, P flat neuron length, D host model width.

For each query (METHOD.md §4.5):
  1. the router reads the InfoNCE-tuned [CLS] of the *raw* query (not normalised) and computes
     the familiarity entropy; at or above the threshold the query is unrelated and gets the
     all-zero neuron, which is exactly the unedited model;
  2. otherwise the generator samples the neuron from the L2-normalised [CLS] of the *templated*
     query, one independent noise per query, and it is unflattened into the host's layout.
Only routed queries are sent to the diffusion sampler, so unrelated traffic costs no sampling.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from meg_jax.diffusion.config import GeneratorConfig
from meg_jax.diffusion.generate import generate
from meg_jax.encoder.text_encoder import TextEncoder
from meg_jax.models.neuron import Neuron, unflatten_neuron
from meg_jax.router.gate import Router

# Any function from raw queries to one neuron per query; the all-zero neuron is "no edit".
Editor = Callable[[Sequence[str]], Neuron]


@dataclasses.dataclass
class MeGEditor:
    """Callable `editor(queries) -> Neuron [Q]`, composing router and generator."""

    router_encoder: TextEncoder  # raw queries, not normalised
    condition_encoder: TextEncoder  # templated queries (the generator normalises them)
    router: Router | None  # None: every query gets a generated neuron ("w/o FN" ablation)
    generator_params: object
    generator_config: GeneratorConfig
    d_model: int
    with_bias: bool
    seed: int = 0

    def routed(self, queries: Sequence[str]) -> np.ndarray:
        """bool [Q]: which queries the familiarity network sends to the generator."""
        if self.router is None:
            return np.ones(len(queries), bool)
        return np.asarray(self.router.route(self.router_encoder.encode(queries)))

    def __call__(self, queries: Sequence[str]) -> Neuron:
        queries = list(queries)
        size = 2 * self.d_model + int(self.with_bias)
        flat = np.zeros((len(queries), size), np.float32)
        routed = np.flatnonzero(self.routed(queries))
        if len(routed):
            conditions = self.condition_encoder.encode([queries[i] for i in routed])
            rng = jax.random.PRNGKey(self.seed)
            flat[routed] = np.asarray(
                generate(self.generator_params, conditions, rng, self.generator_config)
            )
        return unflatten_neuron(flat, self.d_model, self.with_bias)


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
