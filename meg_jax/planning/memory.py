"""Memory plans: per stage and per device, what a run will hold, before paying for hardware.

A plan compiles each stage's programs (`programs.py`) from shapes alone and reads XLA's buffer
assignment of one device's share of the SPMD program (`Compiled.memory_analysis()`):

    parameters   the host LLM's (or DiT's) weights on one device, from their shardings
    optimizer    AdamW moments (and the EMA copy) on one device; SGD keeps none
    inputs       the rest of the arguments: batch, neurons being fitted, KV cache
    (these three from the inputs' shapes and shardings: a program that leaves some parameters
    unused, like the prefix below the neuron layer, still has them resident)
    activations  XLA's temporaries (intermediate values, saved activations, gradients)
    outputs      results not written in place of a donated argument
    peak         inputs + parameters + optimizer + activations + outputs, the device's need

The compiler is the host's (XLA:CPU with fake devices when planning for 8 chips on a CPU). TPU
and GPU compilers fuse differently and reserve some memory of their own, so a stage is said to
fit a device when its peak is at most `USABLE` of the device's memory, and to be "tight" up to
all of it. On a CPU, start JAX with `cpu_xla_flags(n)` in XLA_FLAGS (`meg_jax.plan` does): XLA:CPU
computes bfloat16 matmuls in float32 and its loop-invariant code motion then hoists the
conversion of the whole stacked layer weights out of the layer loop, a float32 copy of the model
that no TPU or GPU run makes (GPT-J's prefix: 22 GiB of temporaries with it, 0.8 without).
Nothing is allocated: inputs are `ShapeDtypeStruct`s, and a test checks
`jax.live_arrays()` before and after.
"""

import dataclasses
import time

from meg_jax.diffusion.config import GeneratorConfig, generator_config
from meg_jax.models.config import LMConfig
from meg_jax.planning.flops import matmul_flops
from meg_jax.planning.programs import (
    Program,
    StageSizes,
    collection_programs,
    evaluation_programs,
    generator_programs,
    mesh_of,
)

GIB = 2**30
# Fraction of a device's memory a plan may count on. JAX on GPU preallocates 75% unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (the launch script sets 0.95); runtimes and
# collectives keep a few percent.
USABLE = 0.9


@dataclasses.dataclass(frozen=True)
class DeviceSet:
    """A machine to plan for: `chips` JAX devices of `bytes_per_chip` each."""

    name: str
    chips: int
    bytes_per_chip: int
    description: str


DEVICE_SETS: dict[str, DeviceSet] = {
    "tpu-v4-8": DeviceSet("tpu-v4-8", 4, 32 * GIB, "Cloud TPU v4-8: 4 chips x 32 GiB HBM"),
    "tpu-v5e-8": DeviceSet("tpu-v5e-8", 8, 16 * GIB, "Cloud TPU v5e-8: 8 chips x 16 GiB HBM"),
    "gpu-80gb": DeviceSet("gpu-80gb", 1, 80 * 10**9, "one 80 GB GPU (A100/H100 80GB)"),
    "gpu-141gb": DeviceSet("gpu-141gb", 1, 141 * 10**9, "one 141 GB GPU (H200)"),
}

STAGES = ("collect", "generator", "evaluate")


def cpu_xla_flags(n_devices: int) -> str:
    """XLA_FLAGS for planning (or running bfloat16 models) on a CPU with `n_devices` fake devices:
    no hoisting of per-layer float32 weight conversions out of the layer loop (module doc)."""
    return (
        f"--xla_force_host_platform_device_count={n_devices} "
        "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
    )


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """Per-device bytes of one compiled program, plus its matmul FLOPs (all devices together,
    `flops.matmul_flops`)."""

    name: str
    param_bytes: int
    optimizer_bytes: int
    input_bytes: int
    activation_bytes: int
    output_bytes: int
    flops: float
    tokens: int
    compile_s: float
    note: str = ""

    @property
    def peak_bytes(self) -> int:
        return (
            self.param_bytes
            + self.optimizer_bytes
            + self.input_bytes
            + self.activation_bytes
            + self.output_bytes
        )

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}


def analyze(program: Program) -> ProgramMemory:
    """Compiles `program` (shapes only) and splits its per-device memory as the module says."""
    start = time.perf_counter()
    compiled = program.traced.lower().compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return ProgramMemory(
        name=program.name,
        param_bytes=program.param_bytes,
        optimizer_bytes=program.optimizer_bytes,
        input_bytes=program.input_bytes,
        activation_bytes=int(mem.temp_size_in_bytes),
        output_bytes=max(int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes), 0),
        flops=matmul_flops(program.traced),
        tokens=program.tokens,
        compile_s=round(seconds, 2),
        note=program.note,
    )


@dataclasses.dataclass
class StagePlan:
    """A stage's programs on one mesh; the stage needs the largest of their peaks."""

    stage: str
    mesh: tuple[int, int]
    programs: list[ProgramMemory]

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.programs)

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "mesh": f"{self.mesh[0]}x{self.mesh[1]}",
            "peak_bytes": self.peak_bytes,
            "programs": [p.to_dict() for p in self.programs],
        }


def generator_mesh_shape(mesh_shape: tuple[int, int]) -> tuple[int, int]:
    """The generator is data-parallel only (replicated DiT): every device of the host's mesh
    goes on the "data" axis."""
    return (mesh_shape[0] * mesh_shape[1], 1)


def plan_stages(
    config: LMConfig,
    mesh_shape: tuple[int, int],
    sizes: StageSizes | None = None,
    generator: GeneratorConfig | None = None,
    stages=STAGES,
    devices=None,
) -> list[StagePlan]:
    """The memory plan of `config`'s stages on a DATA x MODEL mesh, from shapes alone.

    `generator` defaults to the reference recipe with DiT-B and bfloat16 compute. The generator
    stage runs on `generator_mesh_shape(mesh_shape)`. `devices` (default: `jax.devices()`)
    must hold data * model of them.
    """
    sizes = StageSizes() if sizes is None else sizes
    if generator is None:
        generator = generator_config({"dit": {"compute_dtype": "bfloat16"}}, dit_preset="DiT-B")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; expected some of {STAGES}")
    plans = []
    for stage in stages:
        if stage == "generator":
            shape = generator_mesh_shape(mesh_shape)
            progs = generator_programs(generator, config, mesh_of(shape, devices), sizes)
        else:
            shape = mesh_shape
            build = collection_programs if stage == "collect" else evaluation_programs
            progs = build(config, mesh_of(shape, devices), sizes)
        plans.append(StagePlan(stage, shape, [analyze(p) for p in progs]))
    return plans


def verdict(peak_bytes: int, device: DeviceSet) -> str:
    """ "fits" (within USABLE of a chip), "tight" (within all of it) or "no"."""
    if peak_bytes <= USABLE * device.bytes_per_chip:
        return "fits"
    if peak_bytes <= device.bytes_per_chip:
        return "tight"
    return "no"


def device_mesh(device: DeviceSet, mesh_shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """The mesh a device set is planned on: `mesh_shape` when it uses exactly its chips, else
    all chips on "model" (the host's weights split as far as they go, one batch)."""
    if mesh_shape is not None and mesh_shape[0] * mesh_shape[1] == device.chips:
        return mesh_shape
    return (1, device.chips)


def plan_devices(
    config: LMConfig,
    device_sets=tuple(DEVICE_SETS),
    mesh_shape: tuple[int, int] | None = None,
    sizes: StageSizes | None = None,
    generator: GeneratorConfig | None = None,
    devices=None,
    stages=STAGES,
    known: dict[tuple[int, int], list[StagePlan]] | None = None,
) -> dict:
    """Per named device set: its mesh, each stage's per-device plan and whether it fits.

    Plans of the same mesh are shared between device sets (one GPU of 80 or 141 GB); `known`
    holds plans already made (by mesh shape) for the same config, sizes and stages.
    """
    sizes = StageSizes() if sizes is None else sizes
    cache: dict[tuple[int, int], list[StagePlan]] = dict(known or {})
    out = {}
    for name in device_sets:
        if name not in DEVICE_SETS:
            raise ValueError(f"unknown device set {name!r}; known: {sorted(DEVICE_SETS)}")
        device = DEVICE_SETS[name]
        shape = device_mesh(device, mesh_shape)
        if shape not in cache:
            cache[shape] = plan_stages(config, shape, sizes, generator, stages, devices)
        out[name] = {
            "device": dataclasses.asdict(device),
            "mesh": f"{shape[0]}x{shape[1]}",
            "stages": {
                p.stage: {
                    "peak_bytes": p.peak_bytes,
                    "peak_gib": round(p.peak_bytes / GIB, 3),
                    "fits": verdict(p.peak_bytes, device),
                }
                for p in cache[shape]
            },
            "plans": [p.to_dict() for p in cache[shape]],
        }
    return out


def _gib(n: int) -> str:
    return f"{n / GIB:9.3f}"


def format_plan(plans: list[StagePlan]) -> str:
    """A table: one row per program, per-device GiB."""
    head = (
        f"{'stage/program':24} {'mesh':>5} {'params':>9} {'optim':>9} {'inputs':>9} "
        f"{'activ.':>9} {'outputs':>9} {'peak':>9} {'GFLOP':>10}"
    )
    lines = [head + "   (GiB per device; GFLOP: matmuls, all devices)", "-" * len(head)]
    for plan in plans:
        for p in plan.programs:
            lines.append(
                f"{p.name:24} {plan.mesh[0]}x{plan.mesh[1]:<3} {_gib(p.param_bytes)} "
                f"{_gib(p.optimizer_bytes)} {_gib(p.input_bytes)} {_gib(p.activation_bytes)} "
                f"{_gib(p.output_bytes)} {_gib(p.peak_bytes)} {p.flops / 1e9:10.1f}"
            )
            if p.note:
                lines.append(f"{'':24}   note: {p.note}")
    return "\n".join(lines)


def format_verdicts(model: str, per_device: dict) -> str:
    """One line per device set: the mesh and each stage's peak and verdict."""
    lines = []
    for name, entry in per_device.items():
        cells = ", ".join(
            f"{stage} {s['peak_gib']:.2f} GiB {s['fits']}" for stage, s in entry["stages"].items()
        )
        lines.append(f"{model:>12} on {name:10} (mesh {entry['mesh']}): {cells}")
    return "\n".join(lines)


def required_devices(mesh_shape: tuple[int, int], device_sets=()) -> int:
    """How many JAX devices a plan of `mesh_shape` and of `device_sets` needs."""
    counts = [mesh_shape[0] * mesh_shape[1]] + [DEVICE_SETS[d].chips for d in device_sets]
    return max(counts)
