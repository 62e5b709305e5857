"""Manual optimization (``automatic_optimization = False``): ``training_step`` updates the
module itself, with the ``nnx.Optimizer``s that ``self.optimizers()`` returns.

Inside the traced train step (``run``), the module is merged from the carry as usual, and one
``nnx.Optimizer`` per optimizer is made over it (``wrt`` = its filter), holding the carried
optax state and step count. ``training_step`` computes gradients
(``nnx.value_and_grad(..., argnums=nnx.DiffState(0, filter))``) and calls
``opt.update(self, grads)`` on any of them, as often and in the order it likes; after it
returns, the module's variables and the optimizers' states are the step's new state. The
``init`` that ``nnx.Optimizer`` runs on construction is traced and discarded (its result is
replaced by the carried state, so XLA removes it). The optimizers are found through a context
variable set while the step is traced, never through an attribute: nothing enters the module's
graph definition.

The step's gate (``NaNGuard("skip")``, ``SpikeGuard``) cannot decide before the update: it
selects the whole previous state (module, optimizers, counts) when the returned loss or the
new parameters are not finite.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.training.optimizer import to_opt_state

from nnxfit.errors import ConfigError
from nnxfit.optimizers import OptimizerSpec, opt_step_of, opt_steps_init

# (module being traced, what its optimizers() returns) while a manual step is traced.
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("nnxfit_optimizers", default=None)


def optimizers_of(module: Any) -> Any:
    """``TrainModule.optimizers()``: see there."""
    # Not checked against ``module``: inside nnx.value_and_grad the function sees a copy of
    # it, whose optimizers() must answer the same.
    current = _CURRENT.get()
    if current is None:
        manual = not getattr(module, "automatic_optimization", True)
        where = (
            "only inside training_step during a fit"
            if manual
            else "only with automatic_optimization = False (set it as a class attribute), "
            "inside training_step during a fit"
        )
        raise ConfigError(
            f"{type(module).__name__}.optimizers() returns the fit's nnx.Optimizers {where}; "
            "the Trainer makes them from configure_optimizers for each step."
        )
    return current[1]


@contextlib.contextmanager
def _providing(module: Any, handle: Any):
    token = _CURRENT.set((module, handle))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _optimizers(spec: OptimizerSpec, module: Any, opt: Any, steps: Any) -> dict:
    """One ``nnx.Optimizer`` per key over ``module``, holding the carried state."""
    out = {}
    states = spec.states(opt)
    for k in spec.keys:
        o = nnx.Optimizer(module, spec.txs[k], wrt=spec.filters[k])
        o.opt_state = nnx.data(to_opt_state(states[k]))
        o.step[...] = opt_step_of(spec, steps, k)
        out[k] = o
    return out


class Outputs(NamedTuple):
    """``step.py``'s checks of what ``training_step`` returns, and its cast of a new state to
    the old one's dtypes (``step.OUTPUTS``)."""

    split_loss: Callable
    cast_like: Callable


def _step(train_def, trainable, batch_def, spec, params, rest, opt, steps, batch, outputs):
    """``training_step`` on the merged module with its optimizers: ``(loss, metrics, params,
    opt, rest, steps)``, each state in the structure and types it came in."""
    module = nnx.merge(train_def, params, rest)
    opts = _optimizers(spec, module, opt, steps)
    with _providing(module, opts if spec.several else opts[""]):
        out = module.training_step(jax.tree.unflatten(batch_def, batch))
    loss, metrics = outputs.split_loss(out)
    cast = outputs.cast_like
    _, new_params, new_rest = nnx.split(module, trainable, ...)
    new_opt = {k: nnx.as_pure(opts[k].opt_state) for k in spec.keys}
    new_steps = {k: opts[k].step[...] for k in spec.keys}
    if not spec.several:
        new_opt, new_steps = new_opt[""], new_steps[""]
    return (
        loss.astype(jnp.float32),
        metrics,
        cast(nnx.as_pure(new_params), params),
        cast(new_opt, opt),
        cast(nnx.as_pure(new_rest), rest),
        cast(new_steps, steps),
    )


def run(programs: Any, c: Any, batch: list, outputs: Outputs) -> tuple:
    """One manual step on carry ``c``: ``(loss, metrics, (params, opt, rest, extra))``."""
    spec = programs.config.optimizers
    loss, metrics, params, opt, rest, steps = _step(
        programs.train_def, programs.trainable, programs.batch_def, spec,
        c.params, c.rest, c.opt, c.extra["opt_steps"], batch, outputs,
    )  # fmt: skip
    return loss, metrics, (params, opt, rest, {**c.extra, "opt_steps": steps})


def metric_shapes(train_def, trainable, batch_def, spec, params, rest, batch, outputs) -> dict:
    """The metrics ``training_step`` returns (to trace with ``jax.eval_shape``)."""
    opt = spec.tx().init(params)
    steps = opt_steps_init(spec)
    return _step(train_def, trainable, batch_def, spec, params, rest, opt, steps, batch, outputs)[1]


def all_finite(tree: Any) -> jax.Array:
    """Whether every float leaf of ``tree`` is finite (one boolean)."""
    ok = jnp.bool_(True)
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(x))
    return ok
