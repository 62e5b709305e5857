"""Convolutions in the dimension order XLA:CPU computes fast, wherever they sit in a program.

XLA:CPU runs a convolution through Eigen only when its operands are in NHWC / HWIO / NHWC order.
Its ``ConvCanonicalization`` pass brings other orders there with transposes, but it walks only
the entry computation (``xla/service/cpu/conv_canonicalization.cc``). A convolution inside a
loop body, which is where every ``lax.scan`` puts it, keeps its order and is emitted as a naive
loop nest (jax#12868). The gradients of an ordinary NHWC convolution (jax's transpose rules) are
in other orders: with them inside the scan of ``steps_per_execution=8``, the seed guide's CNN
trained 18x slower per step than with one step per call (``benchmarks/README.md``).

``canonical_convs(fun)`` traces ``fun`` once and, when its program holds a convolution in
another order, evaluates it with each such convolution replaced by transposes around one in
the canonical order: the same rewrite the XLA pass makes, done before XLA sees the loops. A
program without such a convolution is evaluated from its trace unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core, source_info_util

CONV = lax.conv_general_dilated_p


def canonical_specs(n: int) -> lax.ConvDimensionNumbers:
    """NHWC / HWIO / NHWC dimension numbers for ``n``-dimensional operands."""
    spatial = tuple(range(1, n - 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, n - 1, *spatial),
        rhs_spec=(n - 1, n - 2, *range(n - 2)),
        out_spec=(0, n - 1, *spatial),
    )


def is_canonical(params: dict) -> bool:
    dn = params["dimension_numbers"]
    return dn == canonical_specs(len(dn.lhs_spec))


def canonical_conv(lhs, rhs, **params):
    """``conv_general_dilated`` with ``params``, computed in the canonical order."""
    dn = params["dimension_numbers"]
    ls, rs, os_ = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    n = len(ls)
    lhs = jnp.transpose(lhs, (ls[0], *ls[2:], ls[1]))
    rhs = jnp.transpose(rhs, (*rs[2:], rs[1], rs[0]))
    out = CONV.bind(lhs, rhs, **{**params, "dimension_numbers": canonical_specs(n)})
    # ``out`` is (batch, spatial..., feature); out_spec says where each of those goes.
    perm = [0] * n
    for src, dst in enumerate((os_[0], *os_[2:], os_[1])):
        perm[dst] = src
    return jnp.transpose(out, perm)


def _needs(jaxpr: core.Jaxpr) -> bool:
    """Whether ``jaxpr`` holds a non-canonical convolution, at any depth."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is CONV and not is_canonical(eqn.params):
            return True
        if any(_needs(j) for j in core.jaxprs_in_params(eqn.params)):
            return True
    return False


def _aval_struct(aval) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _rewrite_closed(closed: core.ClosedJaxpr) -> core.ClosedJaxpr:
    structs = [_aval_struct(a) for a in closed.in_avals]
    run = functools.partial(_evaluate, closed.jaxpr, closed.consts)
    return jax.make_jaxpr(lambda *args: run(list(args)))(*structs)


def _rewrite_param(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_rewrite_param(v) for v in value)
    if isinstance(value, core.ClosedJaxpr) and _needs(value.jaxpr):
        new = _rewrite_closed(value)
        # Loop and branch primitives check their bodies' types; keep the old one if they moved.
        return new if new.in_avals == value.in_avals and new.out_avals == value.out_avals else value
    if isinstance(value, core.Jaxpr) and not value.constvars and _needs(value):
        new = _rewrite_closed(core.ClosedJaxpr(value, ()))
        return new.jaxpr if not new.consts and new.in_avals == value.in_avals else value
    return value


def _evaluate(jaxpr: core.Jaxpr, consts: list, args: list) -> list:
    """``jax.core.eval_jaxpr`` with non-canonical convolutions rewritten, at any depth."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        # As jax.core.eval_jaxpr: the user's source lines and name scopes reach the program.
        names = source_info_util.current_name_stack() + eqn.source_info.name_stack
        where = source_info_util.user_context(eqn.source_info.traceback, name_stack=names)
        with where, eqn.ctx.manager:
            if eqn.primitive is CONV and not is_canonical(eqn.params):
                outs = [canonical_conv(*invals, **eqn.params)]
            else:
                params = eqn.params
                if any(_needs(j) for j in core.jaxprs_in_params(params)):
                    params = {k: _rewrite_param(v) for k, v in params.items()}
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def canonical_convs(fun: Callable) -> Callable:
    """``fun``, traced once, with every convolution computed in the canonical order."""

    def wrapper(*args):
        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
        flat = jax.tree.leaves(args)
        if _needs(closed.jaxpr):
            outs = _evaluate(closed.jaxpr, closed.consts, flat)
        else:
            outs = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *flat)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    inner = fun
    while isinstance(inner, functools.partial):
        inner = inner.func
    # jax names the program after this (CompileWatch tells the train programs by it).
    wrapper.__name__ = wrapper.__qualname__ = inner.__name__
    return wrapper


def wanted() -> bool:
    """Only XLA:CPU leaves convolutions in loops in their own order."""
    return jax.default_backend() == "cpu"
