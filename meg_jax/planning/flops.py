"""Matrix-multiply FLOPs of a traced step, counted from its jaxpr.

XLA's cost analysis (`Compiled.cost_analysis()`) counts a while loop's body once, whatever its
trip count: the host LLM's layers run as one `lax.scan`, so it reports one layer of GPT-J's
prefix instead of its 17 (and XLA:GPU, which turns matmuls into library calls, reports less
still). Counting on the jaxpr instead sees each `scan`'s length, before any backend rewrites it.

Counted: `dot_general` (2 x the output's elements x the contracted size) and
`conv_general_dilated` (2 x the output's elements x the kernel's input features and window),
the operations that hold a transformer's FLOPs. Elementwise work, softmaxes and norms are left
out. A `while_loop` (an unknown trip count, as in decoding until a stop token) counts its body
once, so a decode loop reads as one decoding step; a `cond` counts its costliest branch.
"""

import math

import jax
from jax.extend import core as jex_core


def _dot_general(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contract)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv(eqn) -> float:
    dims = eqn.params["dimension_numbers"]
    rhs_shape = eqn.invars[1].aval.shape
    # The kernel's spec: (out features, in features, *window); its input features are already
    # divided by the feature groups.
    in_features = rhs_shape[dims.rhs_spec[1]]
    window = math.prod(rhs_shape[d] for d in dims.rhs_spec[2:])
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * in_features * window


def _sub_jaxprs(params) -> list:
    """The jaxprs a higher-order primitive carries in its params (pjit, custom_vjp, remat, ...)."""
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jex_core.Jaxpr):
                found.append(item)
    return found


def jaxpr_matmul_flops(jaxpr) -> float:
    """Matmul FLOPs of `jaxpr` (a Jaxpr or ClosedJaxpr), scans counted `length` times."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general(eqn)
        elif name == "conv_general_dilated":
            total += _conv(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_matmul_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_matmul_flops(b) for b in eqn.params["branches"])
        elif name == "while":
            total += jaxpr_matmul_flops(eqn.params["body_jaxpr"]) + jaxpr_matmul_flops(
                eqn.params["cond_jaxpr"]
            )
        else:
            # Higher-order primitives whose body runs once: jit, custom derivatives (their
            # params hold the primal's jaxpr; the derivative rules are functions), remat.
            total += sum(jaxpr_matmul_flops(s) for s in _sub_jaxprs(eqn.params))
    return total


def matmul_flops(traced: jax.stages.Traced) -> float:
    """Matmul FLOPs of one call of a traced step (`jax.jit(f).trace(*args)`), all devices
    together: the jaxpr is the global program, before any SPMD partitioning."""
    return jaxpr_matmul_flops(traced.jaxpr)
