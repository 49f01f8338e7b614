"""Memory plans of the MeG stages per device, from shapes alone (see `memory`)."""

from meg_jax.planning.memory import (
    DEVICE_SETS,
    STAGES,
    DeviceSet,
    ProgramMemory,
    StagePlan,
    cpu_xla_flags,
    format_plan,
    format_verdicts,
    plan_devices,
    plan_stages,
    verdict,
)
from meg_jax.planning.programs import StageSizes

__all__ = [
    "DEVICE_SETS",
    "STAGES",
    "DeviceSet",
    "ProgramMemory",
    "StagePlan",
    "StageSizes",
    "cpu_xla_flags",
    "format_plan",
    "format_verdicts",
    "plan_devices",
    "plan_stages",
    "verdict",
]
