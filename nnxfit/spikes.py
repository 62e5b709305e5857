"""The loss-spike test of ``callbacks.SpikeGuard``, as the train step runs it.

The step keeps a ring buffer of the last ``window`` accepted values of the monitored
quantity (the loss, or the global gradient norm before clipping) in the fit's device carry
(``step.Carry.extra["spike"]``), with the count of values pushed so far. A step whose value
is above ``mean + threshold * std`` of the buffer is a spike: it joins the step's one gate
(with NaNGuard's finite check), so it is skipped exactly as a non-finite step is skipped,
decided on the device with no host sync. Nothing is a spike before ``window`` values were
seen. Only steps that were applied push their value. The counts (``spike_steps``, the first
spike's step) sit with the non-finite ones in ``Carry.health``, read at log steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

MONITORS = ("loss", "grad_norm")


class SpikeSpec(NamedTuple):
    """What ``SpikeGuard`` asks the step for (``step.StepFeatures.spike``)."""

    monitor: str  # "loss" or "grad_norm"
    window: int
    threshold: float
    halt: bool  # SpikeGuard("stop"): the first spike freezes the state, as NaNGuard("stop")
    # SpikeGuard("rollback", max_consecutive=K): K spikes in a row roll back (``bad_runs.py``)
    rollback_after: int | None = None


def init(spec: SpikeSpec) -> dict:
    return {"values": jnp.zeros((spec.window,), jnp.float32), "seen": jnp.zeros((), jnp.int32)}


def init_health() -> dict:
    return {
        "spike_steps": jnp.zeros((), jnp.int32),
        "first_spike_step": jnp.full((), -1, jnp.int32),
    }


def is_spike(spec: SpikeSpec, state: dict, value) -> Any:
    """Whether ``value`` is above mean + threshold x std of a full buffer (False before)."""
    values = state["values"]
    mean = values.mean()
    std = jnp.sqrt(jnp.mean(jnp.square(values - mean)))
    return (state["seen"] >= spec.window) & (
        value.astype(jnp.float32) > mean + spec.threshold * std
    )


def blocked(spec: SpikeSpec, health: dict) -> Any:
    """Whether a halting guard's first spike has frozen the state."""
    return jnp.bool_(spec.halt) & (health["first_spike_step"] >= 0)


def push(spec: SpikeSpec, state: dict, value, accepted) -> dict:
    """The buffer with ``value`` pushed when the step was ``accepted``."""
    seen, values = state["seen"], state["values"]
    i = seen % spec.window
    new = jnp.where(accepted, value.astype(jnp.float32), values[i])
    return {"values": values.at[i].set(new), "seen": seen + accepted.astype(jnp.int32)}


def count(health: dict, spike, step) -> dict:
    """The health counters after a step (``step``: its 1-based number) that was a ``spike``."""
    first = health["first_spike_step"]
    return {
        "spike_steps": health["spike_steps"] + spike.astype(jnp.int32),
        "first_spike_step": jnp.where((first < 0) & spike, step, first),
    }
