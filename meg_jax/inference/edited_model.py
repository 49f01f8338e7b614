"""An edited model to load and query: `load_editor(workdir)` -> `EditedModel`.

Axes: Q queries, D host model width, P flat neuron length.

A trained work directory describes itself in `editor.json` (written by the pipeline): the host
model and its neuron slot, the prompt template, the query encoder, whether a router is used, and
the sampling seed. The artefacts beside it are the stages' own exports, not their training
checkpoints:
    encoder/top_layers.msgpack    the InfoNCE-tuned top layers (absent: the encoder as loaded)
    router/router.json, .msgpack  the familiarity network and its calibrated threshold
    generator/generator.json      the generator's config; generator/params.msgpack its weights
A work directory of a weight-editing baseline (`editor.json`'s `editor`: ft, memit, alphaedit)
holds instead the edited layers of the host (`EditedLayers`, baseline/edited_layers.msgpack);
its `EditedModel` runs those weights with the all-zero neuron.

    editor = meg_jax.load_editor("runs/smollm2_cf")
    editor.generate(["The mother tongue of Danielle Darrieux is"])   # -> [" English\\n"]
    editor.routed(prompts), editor.neurons(prompts)                  # research use

Routing, sampling and generation are batched (and split over the mesh's data axis).
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import serialization
from jax.sharding import Mesh

from meg_jax.checkpoints.hosts import Host, encoder_path, load_host
from meg_jax.data.templates import PromptTemplate, get_template
from meg_jax.diffusion.config import GeneratorConfig
from meg_jax.diffusion.generate import load_generator_params
from meg_jax.encoder.text_encoder import TextEncoder, load_top_layers
from meg_jax.inference.editor import MeGEditor, zero_editor
from meg_jax.inference.runner import ModelRunner
from meg_jax.infra.config import dataclass_from_dict
from meg_jax.infra.files import write_bytes_atomic, write_json_atomic
from meg_jax.infra.sharding import DECODER_RULES, make_mesh, param_shardings
from meg_jax.models.neuron import Neuron
from meg_jax.router.gate import load_router

MANIFEST = "editor.json"
EDITED_LAYERS = "baseline/edited_layers.msgpack"  # a weight-editing baseline's result


@dataclasses.dataclass(frozen=True)
class EditorManifest:
    """What `editor.json` holds: enough to rebuild the edited model from its artefacts."""

    host: dict  # load_host's name and overrides: name, neuron_layer, neuron_activation, dtype
    template: str
    encoder: str  # a registered encoder name or a BERT directory
    encoder_top_layers: int
    seed: int
    router: bool  # False: the "w/o FN" ablation, every query gets a generated neuron
    encoder_batch_size: int = 128
    sample_chunk: int = 64
    editor: str = "meg"  # or a weight-editing baseline: ft, memit, alphaedit

    def write(self, workdir: str | Path) -> None:
        write_json_atomic(Path(workdir) / MANIFEST, dataclasses.asdict(self))

    @staticmethod
    def read(workdir: str | Path) -> "EditorManifest":
        path = Path(workdir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not a trained work directory (no {MANIFEST}); train it first with "
                "`python -m meg_jax.train --config ...`"
            )
        return dataclass_from_dict(EditorManifest, json.loads(path.read_text()), str(path))


def host_shardings(mesh: Mesh):
    """The `shardings_fn` that places host weights by the decoder partition rules on `mesh`."""
    return lambda _, abstract: param_shardings(mesh, DECODER_RULES, abstract)


def build_meg_editor(
    workdir: str | Path, manifest: EditorManifest, host: Host, encoder: TextEncoder, mesh: Mesh
) -> MeGEditor:
    """The MeG editor of a trained work directory, on an already loaded host and base encoder."""
    workdir = Path(workdir)
    top = workdir / "encoder" / "top_layers.msgpack"
    if top.is_file():
        encoder = encoder.with_top_layers(load_top_layers(top))
    template = get_template(manifest.template)
    meta_path = workdir / "generator" / "generator.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{meta_path}: no trained generator here ({err})") from None
    return MeGEditor(
        router_encoder=encoder.with_view(template="{query}", normalize=False, fixed_shapes=True),
        condition_encoder=encoder.with_view(
            template=template.query, normalize=False, fixed_shapes=True
        ),
        router=load_router(workdir / "router", mesh) if manifest.router else None,
        generator_params=load_generator_params(workdir / "generator" / "params.msgpack"),
        generator_config=dataclass_from_dict(GeneratorConfig, meta["config"], str(meta_path)),
        d_model=host.config.d_model,
        with_bias=host.config.neuron_has_bias,
        seed=manifest.seed,
        sample_chunk=manifest.sample_chunk,
        mesh=mesh,
    )


@dataclasses.dataclass(frozen=True)
class EditedLayers:
    """A weight editor's result as stored: new values of some layers of one stacked parameter.

    Axes: K edited layers, L host layers. `param` is the parameter's path in the host's tree
    (e.g. `layers/mlp/down/kernel`, stacked [L, F, D]); `values[k]` replaces layer `layers[k]`.
    The values are kept in float32 whatever the host's dtype, so applying them to the host they
    came from gives back the edited parameters exactly.
    """

    param: str
    layers: tuple[int, ...]
    values: np.ndarray  # [K, ...] float32

    @staticmethod
    def between(params, edited, param: str, layers) -> "EditedLayers":
        """The layers `layers` of `param` in `edited`, checking that `edited` shares every other
        parameter with `params` (so these layers are the whole edit)."""
        changed = _leaf_paths(params, edited, param)
        if changed:
            raise ValueError(f"the edit also changed {changed[:5]}, not only {param}")
        stacked = _get(edited, param)
        layers = tuple(int(l) for l in layers)
        values = np.stack([np.asarray(stacked[l], np.float32) for l in layers])
        return EditedLayers(param, layers, values)

    def same_as(self, params) -> bool:
        """Whether these values equal the layers of `params` they replace (a no-op edit)."""
        stacked = _get(params, self.param)
        return all(
            np.array_equal(self.values[k], np.asarray(stacked[layer], np.float32))
            for k, layer in enumerate(self.layers)
        )

    def apply(self, params):
        """`params` with these layers replaced (every other leaf shared, not copied)."""
        stacked = _get(params, self.param)
        if self.values.shape[1:] != stacked.shape[1:] or max(self.layers) >= stacked.shape[0]:
            raise ValueError(
                f"{self.param}: edited layers {self.layers} of shape {self.values.shape[1:]} do "
                f"not fit the host's {stacked.shape}; was it edited on another host?"
            )
        for k, layer in enumerate(self.layers):
            stacked = stacked.at[layer].set(self.values[k].astype(stacked.dtype))
        return _set(params, self.param, stacked)

    def save(self, path: str | Path) -> None:
        tree = {"param": self.param, "layers": np.asarray(self.layers, np.int32)}
        write_bytes_atomic(path, serialization.msgpack_serialize(tree | {"values": self.values}))

    @staticmethod
    def load(path: str | Path) -> "EditedLayers":
        path = Path(path)
        try:
            tree = serialization.msgpack_restore(path.read_bytes())
            return EditedLayers(
                str(tree["param"]),
                tuple(int(l) for l in tree["layers"]),
                np.asarray(tree["values"], np.float32),
            )
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no edited layers here; run the baseline stage first "
                "(`python -m meg_jax.train --config ...`)"
            ) from None
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not an edited-layers file ({err})") from None


def _get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree, path: str, value):
    key, _, rest = path.partition("/")
    return {**tree, key: _set(tree[key], rest, value) if rest else value}


def _leaf_paths(a, b, skip: str) -> list[str]:
    """Paths of the leaves of `b` that are not the very same objects as in `a`, but `skip`."""
    flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(b)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name != skip and flat_a.get(path) is not leaf:
            out.append(name)
    return out


@dataclasses.dataclass
class NoNeuronEditor:
    """The editor of a weight-edited model: the edits are in its weights, so every query runs
    with the all-zero neuron and none is routed."""

    d_model: int

    def routed(self, queries: Sequence[str]) -> np.ndarray:
        return np.zeros(len(queries), bool)

    def __call__(self, queries: Sequence[str]) -> Neuron:
        return zero_editor(self.d_model)(queries)


@dataclasses.dataclass
class EditedModel:
    """A host model with its editor: ask it questions, inspect routing and neurons. A
    weight-editing baseline's runner holds the edited weights and its editor is `NoNeuronEditor`."""

    runner: ModelRunner
    template: PromptTemplate
    editor: MeGEditor | NoNeuronEditor

    def routed(self, prompts: Sequence[str]) -> np.ndarray:
        """bool [Q]: which raw prompts the router treats as edited (they get a generated neuron)."""
        return self.editor.routed(list(prompts))

    def neurons(self, prompts: Sequence[str]) -> Neuron:
        """The neuron each raw prompt runs with (all zero where it is not routed)."""
        return self.editor(list(prompts))

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 20, stop_at_cut: bool = True
    ) -> list[str]:
        """Greedy continuations of raw prompts (each put in the host's template) under their
        neurons: the evaluator's AG predictions. With `stop_at_cut` a continuation ends at its
        first token holding the template's cut (a newline), as the evaluator's do."""
        prompts = list(prompts)
        stops = self.template.generation_stops if stop_at_cut else ()
        templated = [self.template.format_query(p) for p in prompts]
        return self.runner.generate(templated, self.editor(prompts), max_new_tokens, stops)


def load_editor(
    workdir: str | Path, *, mesh: Mesh | None = None, batch_size: int = 32
) -> EditedModel:
    """The edited model of a trained work directory (see the module docstring)."""
    manifest = EditorManifest.read(workdir)
    mesh = make_mesh() if mesh is None else mesh
    host = load_host(
        manifest.host["name"], shardings_fn=host_shardings(mesh), **_overrides(manifest)
    )
    if manifest.editor != "meg":  # a weight-editing baseline: its weights carry the edits
        params = EditedLayers.load(Path(workdir) / EDITED_LAYERS).apply(host.params)
        runner = ModelRunner(
            host.config,
            params,
            host.tokenizer,
            mesh=mesh,
            batch_size=batch_size,
            show_progress=False,
        )
        editor = NoNeuronEditor(host.config.d_model)
        return EditedModel(runner, get_template(manifest.template), editor)
    encoder = TextEncoder.from_pretrained(
        encoder_path(manifest.encoder),
        n_top_layers=manifest.encoder_top_layers,
        mesh=mesh,
        batch_size=manifest.encoder_batch_size,
    )
    runner = ModelRunner(
        host.config,
        host.params,
        host.tokenizer,
        mesh=mesh,
        batch_size=batch_size,
        show_progress=False,
    )
    editor = build_meg_editor(workdir, manifest, host, encoder, mesh)
    return EditedModel(runner, get_template(manifest.template), editor)


def _overrides(manifest: EditorManifest) -> dict:
    return {k: v for k, v in manifest.host.items() if k != "name"}
