"""`python -m meg_jax.plan --model=gptj --mesh=1x4`: per-stage, per-device memory before a run.

    python -m meg_jax.plan --config configs/gptj_zsre.py:n=10000 [--mesh=1x8]

`--config FILE[:VARIANT]` (instead of `--model`) plans the run a pipeline config describes: the
host from `host.name` (a hub name of a preset, a model in the local Hugging Face cache, or a local
model directory, such as a `:tiny` variant's, read from its config.json; nothing is loaded), its
neuron layer and dtype, the mesh (`mesh_data` x `mesh_model`, -1 data counted as 1), the
collection slots, the evaluation batch and new tokens, the generator recipe (preset, DiT size,
overrides, batch; a batch of 0 is the whole bank), the bank of `data.n_edits` rows, and the
encoder width. Flags given explicitly win over the config's values.

Prints, for the model's collection step, generator training step and evaluation batch, the
bytes of parameters, optimiser state, other inputs and activations on one device of the mesh
(from `jax.eval_shape` and the compiled programs' memory analysis; no array is allocated), then
whether each stage fits a TPU v4-8, a v5e-8, one 80 GB GPU and one 141 GB GPU.

By default the programs are compiled by XLA:CPU with fake devices (the same figures on any
machine); `--platform=native` compiles for this machine's own accelerator instead, for meshes
that fit its devices. The library side is `meg_jax.planning.plan_stages(config, mesh_shape)`.
"""

import argparse
import dataclasses
import os
import sys

MODELS = {"gptj": "gpt-j-6b", "phi2": "phi-2", "llama3_8b": "llama-3-8b"}
# The flags a config can set, and their values without one.
DEFAULTS = {
    "mesh": (1, 1),
    "dtype": "bfloat16",
    "edits_batch": 16,
    "eval_batch": 32,
    "new_tokens": 20,
    "generator_batch": 256,
    "generator_preset": "reference",
    "dit": "DiT-B",
}


def _mesh(text: str) -> tuple[int, int]:
    try:
        data, model = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--mesh: expected DATAxMODEL like 1x4, got {text!r}"
        ) from None
    if data < 1 or model < 1:
        raise argparse.ArgumentTypeError(f"--mesh: sizes must be >= 1, got {text!r}")
    return data, model


def parse_args(argv=None) -> argparse.Namespace:
    # Import-free: the device count must be in XLA_FLAGS before JAX starts.
    from meg_jax.planning.memory import DEVICE_SETS, STAGES

    parser = argparse.ArgumentParser(
        prog="python -m meg_jax.plan", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help=f"{', '.join(MODELS)} or a preset name")
    source.add_argument("--config", help="FILE[:VARIANT], a pipeline config (module docstring)")
    parser.add_argument("--mesh", type=_mesh, default=None, help="DATAxMODEL (default 1x1)")
    # None: the config's value with --config, else the default in DEFAULTS.
    parser.add_argument("--dtype", help="host LLM dtype (default bfloat16)")
    parser.add_argument("--edits-batch", type=int, help="edits fitted together (default 16)")
    parser.add_argument("--collect-tokens", type=int, default=32, help="query + answer tokens")
    parser.add_argument("--eval-batch", type=int, help="queries per evaluation batch (32)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, help="greedy tokens (default 20)")
    parser.add_argument("--generator-batch", type=int, help="DiT minibatch (default 256)")
    parser.add_argument("--generator-preset", help="reference | fast (default reference)")
    parser.add_argument("--dit", help="DiT size preset, diffusion/config.py (default DiT-B)")
    parser.add_argument(
        "--devices",
        default=",".join(DEVICE_SETS),
        help="device sets to judge the fit on, comma-separated ('' for none)",
    )
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--platform", choices=("cpu", "native"), default="cpu")
    parser.add_argument("--json", default="", help="also write the plan to this JSON file")
    args = parser.parse_args(argv)
    if args.model is not None:
        for name, value in DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.devices = [d for d in args.devices.split(",") if d]
    args.stages = [s for s in args.stages.split(",") if s]
    for d in args.devices:
        if d not in DEVICE_SETS:
            parser.error(f"--devices: unknown device set {d!r}; known: {', '.join(DEVICE_SETS)}")
    return args


def _hub_preset(name: str):
    """The preset whose hub id is `name` (case-insensitive), or None."""
    from meg_jax.checkpoints.presets import PRESETS

    for key, preset in PRESETS.items():
        if preset.hf_id.lower() == name.lower():
            return key
    return None


def host_lm_config(host) -> tuple:
    """(name, LMConfig) of a pipeline config's `host` section, read without loading weights:
    a registered host or hub id of a preset, a model in the local Hugging Face cache, or a local
    HF model directory (its config.json)."""
    import json
    from pathlib import Path

    from meg_jax.checkpoints.errors import CheckpointError
    from meg_jax.checkpoints.hf_decoder import lm_config_from_hf
    from meg_jax.checkpoints.hosts import HOSTS, hub_dir
    from meg_jax.checkpoints.presets import lm_config

    fields = {
        "neuron_layer": host.neuron_layer,
        "neuron_activation": host.neuron_activation,
        "dtype": host.dtype,
    }
    registered = {"smollm2": "smollm2-135m-instruct"}
    if host.name in registered:
        return registered[host.name], lm_config(registered[host.name], **fields)
    path = Path(host.name).expanduser()
    if not path.exists() and host.name not in HOSTS:
        preset = _hub_preset(host.name)
        if preset is not None:
            return preset, lm_config(preset, **fields)
        path = hub_dir(host.name, "host.name")  # the cache, or an error naming what to place
    if path.is_file() or not (path / "config.json").is_file():
        raise CheckpointError(
            f"{host.name}: the plan reads a Hugging Face model directory's config.json (or a "
            "preset's hub name); a .gguf or other file is not supported here"
        )
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return str(path), lm_config_from_hf(config, path / "config.json", **fields)


def _encoder_width(name: str) -> int:
    """The [CLS] width of the config's encoder (BERT-base's 768 when it cannot be read)."""
    import json

    from meg_jax.checkpoints.hosts import ENCODERS

    try:
        path = ENCODERS[name]() if name in ENCODERS else None
        if path is None:
            from pathlib import Path

            path = Path(name).expanduser()
        return int(json.loads((path / "config.json").read_text())["hidden_size"])
    except (OSError, KeyError, ValueError):
        return 768


def from_config(spec: str) -> dict:
    """What a plan takes from pipeline config `spec` (FILE[:VARIANT]): the host's name and
    LMConfig, the generator overrides, the bank size, the encoder width, and flag values."""
    from meg_jax.pipeline.cli import load_config

    cfg, _ = load_config(["--config", spec])
    name, config = host_lm_config(cfg.host)
    g = cfg.generator
    generator = g.build()
    return {
        "name": name,
        "lm_config": config,
        "generator_overrides": g.overrides,
        "bank_edits": cfg.data.n_edits,
        "cond_width": _encoder_width(cfg.encoder.path),
        "flags": {
            "mesh": (max(cfg.mesh_data, 1), cfg.mesh_model),
            "dtype": cfg.host.dtype,
            "edits_batch": cfg.collect.fit.batch_size,
            "eval_batch": cfg.evaluation.batch_size,
            "new_tokens": cfg.evaluation.max_new_tokens,
            "generator_batch": generator.train.batch_size or cfg.data.n_edits,
            "generator_preset": g.preset,
            "dit": g.dit_preset or None,
        },
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from meg_jax.planning.memory import cpu_xla_flags, required_devices

    planned = None
    if args.config is not None:
        planned = from_config(args.config)  # no device is touched: XLA_FLAGS come after
        for name, value in planned["flags"].items():
            if getattr(args, name) is None:
                setattr(args, name, value)

    if args.platform == "cpu":
        import jax

        # Both are read when the backend starts, which nothing has done yet.
        jax.config.update("jax_platforms", "cpu")
        count = required_devices(args.mesh, args.devices)
        flags = os.environ.get("XLA_FLAGS", "") + " " + cpu_xla_flags(count)
        os.environ["XLA_FLAGS"] = flags.strip()

    from meg_jax.checkpoints.presets import lm_config
    from meg_jax.diffusion.config import generator_config
    from meg_jax.planning import StageSizes, format_plan, format_verdicts, plan_devices, plan_stages

    sizes = StageSizes(
        edits_batch=args.edits_batch,
        collect_tokens=args.collect_tokens,
        eval_batch=args.eval_batch,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        generator_batch=args.generator_batch,
    )
    if planned is None:
        name = MODELS.get(args.model, args.model)
        config = lm_config(name, dtype=args.dtype)
        generator = generator_config(
            {"dit": {"compute_dtype": "bfloat16"}},
            preset=args.generator_preset,
            dit_preset=args.dit,
        )
    else:
        name = planned["name"]
        config = dataclasses.replace(planned["lm_config"], dtype=args.dtype)
        sizes = dataclasses.replace(
            sizes, cond_width=planned["cond_width"], bank_edits=planned["bank_edits"]
        )
        # The config's own generator (its compute dtype included), unless flags say otherwise.
        generator = generator_config(
            planned["generator_overrides"], args.generator_preset, args.dit
        )
    plans = plan_stages(config, args.mesh, sizes, generator, stages=args.stages)
    print(f"{name} ({args.dtype}), mesh {args.mesh[0]}x{args.mesh[1]} (data x model)")
    print(format_plan(plans))
    per_device = {}
    if args.devices:
        per_device = plan_devices(
            config,
            args.devices,
            args.mesh,
            sizes,
            generator,
            stages=args.stages,
            known={args.mesh: plans},
        )
        print()
        print(format_verdicts(name, per_device))
    if args.json:
        from meg_jax.infra.files import write_json_atomic

        write_json_atomic(
            args.json,
            {
                "model": name,
                "config": args.config,
                "dtype": args.dtype,
                "sizes": dataclasses.asdict(sizes),
                "mesh": f"{args.mesh[0]}x{args.mesh[1]}",
                "plan": [p.to_dict() for p in plans],
                "devices": per_device,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
