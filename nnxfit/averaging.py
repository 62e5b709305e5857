"""The exponential moving average of the trainable parameters (``callbacks.EMA``), as the
train step keeps it.

The average lives in the fit's device carry (``step.Carry.extra["ema"]``), next to the
optimizer state: a pure ``State`` of the parameters' structure, dtypes and (on a mesh)
shardings, starting as a copy of the parameters before the first step. The train step
updates it inside its update, after the optimizer step, so a gated step (NaNGuard,
SpikeGuard) that leaves the parameters untouched leaves the average untouched too, and
``steps_per_execution=K`` averages every one of the K steps. One fused multiply-add per
parameter per step; checkpointed and resumed with the rest of the carry.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def init(params: Any) -> Any:
    """The average before the first step: a copy of ``params`` (donation must not alias)."""
    return jax.tree.map(jnp.copy, params)


def update(ema: Any, params: Any, decay: float) -> Any:
    """``decay * ema + (1 - decay) * params`` for every floating leaf; other leaves follow
    the parameters."""

    def one(e, p):
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        return (decay * e + (1.0 - decay) * p).astype(p.dtype)

    return jax.tree.map(one, ema, params)
