"""`python -m meg_jax.plan --model=gptj --mesh=1x4`: per-stage, per-device memory before a run.

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
    parser.add_argument("--model", required=True, help=f"{', '.join(MODELS)} or a preset name")
    parser.add_argument("--mesh", type=_mesh, default=(1, 1), help="DATAxMODEL (default 1x1)")
    parser.add_argument("--dtype", default="bfloat16", help="host LLM dtype (default bfloat16)")
    parser.add_argument("--edits-batch", type=int, default=16, help="edits fitted together")
    parser.add_argument("--collect-tokens", type=int, default=32, help="query + answer tokens")
    parser.add_argument("--eval-batch", type=int, default=32, help="queries per evaluation batch")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--generator-batch", type=int, default=256, help="DiT minibatch")
    parser.add_argument("--generator-preset", default="reference", help="reference | fast")
    parser.add_argument("--dit", default="DiT-B", help="DiT size preset (diffusion/config.py)")
    parser.add_argument(
        "--devices",
        default=",".join(DEVICE_SETS),
        help="device sets to judge the fit on, comma-separated ('' for none)",
    )
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--platform", choices=("cpu", "native"), default="cpu")
    parser.add_argument("--json", default="", help="also write the plan to this JSON file")
    args = parser.parse_args(argv)
    args.devices = [d for d in args.devices.split(",") if d]
    args.stages = [s for s in args.stages.split(",") if s]
    for d in args.devices:
        if d not in DEVICE_SETS:
            parser.error(f"--devices: unknown device set {d!r}; known: {', '.join(DEVICE_SETS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from meg_jax.planning.memory import cpu_xla_flags, required_devices

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

    name = MODELS.get(args.model, args.model)
    config = lm_config(name, dtype=args.dtype)
    sizes = StageSizes(
        edits_batch=args.edits_batch,
        collect_tokens=args.collect_tokens,
        eval_batch=args.eval_batch,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        generator_batch=args.generator_batch,
    )
    generator = generator_config(
        {"dit": {"compute_dtype": "bfloat16"}},
        preset=args.generator_preset,
        dit_preset=args.dit,
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
