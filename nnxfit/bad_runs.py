"""The device side of rolling back (``rollback.py``): runs of consecutive bad steps, counted in
the train step with no host sync.

With ``NaNGuard(action="rollback", max_consecutive=K)`` (kind ``"nonfinite"``) or
``SpikeGuard(action="rollback", max_consecutive=K)`` (kind ``"spike"``) the fit's health
counters (``step.Carry.health``, read at log steps) gain two entries per kind:

* ``<kind>_run_steps``: how many steps in a row, up to the latest, were bad (0 after a good
  one). Its name ends in ``_steps`` so that a resume point's clean record zeroes it
  (``resume_point.capture``);
* ``<kind>_rollback_at``: the first step at which such a run reached K (-1: none since the
  last rollback). The host rolls back when it sees one, and puts both back to 0 / -1.

Bad steps themselves are skipped as ``NaNGuard("skip")`` skips them: the run counter only
says when skipping is no longer enough.
"""

from __future__ import annotations

import jax.numpy as jnp

KINDS = ("nonfinite", "spike")


def run_key(kind: str) -> str:
    return f"{kind}_run_steps"


def at_key(kind: str) -> str:
    return f"{kind}_rollback_at"


def init_health(kind: str) -> dict:
    return {run_key(kind): jnp.zeros((), jnp.int32), at_key(kind): jnp.full((), -1, jnp.int32)}


def count(health: dict, kind: str, bad, step, k: int) -> dict:
    """The run counters after a step (``step``: its 1-based number) that was ``bad``."""
    run = jnp.where(bad, health[run_key(kind)] + 1, 0)
    at = health[at_key(kind)]
    return {
        run_key(kind): run,
        at_key(kind): jnp.where((at < 0) & (run >= k), step, at).astype(jnp.int32),
    }
