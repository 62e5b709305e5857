"""``NaNGuard``: what to do when a loss or gradient turns NaN or infinite.

The check runs inside the jitted step (``step.py``): ``isfinite(loss) & isfinite(grad
norm)``, and the first bad step is recorded on the device. The host learns it at the next
log interval or epoch end, with no per-step sync, and can still name the exact step:

* ``"stop"`` / ``"raise"``: the step freezes the whole state (parameters, optimizer state,
  BatchNorm statistics, RNG) from the first bad step on, so the steps dispatched before the
  host notices change nothing. The parameters are exactly those after the last good step.
* ``"skip"``: each bad step leaves the state untouched (as ``optax.apply_if_finite``) and
  training goes on; ``nonfinite_steps`` in the logs counts them.
* ``"rollback"``: skips as ``"skip"`` does; after ``max_consecutive`` bad steps in a row the
  fit goes back to the newest good checkpoint, in process, and goes on with the next batch,
  at most ``max_rollbacks`` times a fit (``nnxfit/rollback.py``).

For a state up to 1 MiB the step does not gate its update, which would make it wait for the
whole gradient's check (+33-45 % on a small MLP on 2 CPU cores); the Trainer keeps a copy of
the state and re-runs from it with the bad step undone, before any callback can see the state
(``speculation.py``). Either way the outcome above holds.

The guard runs before checkpoint callbacks (``order``): with "stop", the checkpoint written
when the fit ends holds the last good state.
"""

from __future__ import annotations

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError, NonFiniteError
from nnxfit.rollback import RollsBack
from nnxfit.step import StepFeatures
from nnxfit.warn import warn

ACTIONS = ("stop", "skip", "raise", "rollback")


class NonFiniteWarning(RuntimeWarning):
    """A non-finite loss or gradient was seen (``NaNGuard`` "stop" and "skip")."""


class NaNGuard(RollsBack, Callback):
    """Stops, skips, raises or rolls back on a non-finite loss or gradient.

    Args:
        action: ``"stop"`` ends the fit cleanly (``History`` returned, a warning naming the
            step); ``"skip"`` leaves parameters, optimizer state and other module state
            untouched on such steps and counts them as ``nonfinite_steps``; ``"raise"``
            raises ``nnxfit.NonFiniteError`` (with ``.step``); ``"rollback"`` skips, and
            after ``max_consecutive`` such steps in a row restores the newest good
            checkpoint and goes on with the next batch (``nnxfit/rollback.py``).
        max_consecutive: with ``"rollback"``, bad steps in a row that roll back (default 3).
        max_rollbacks: with ``"rollback"``, rollbacks in a fit call; the next run of bad
            steps raises ``nnxfit.RollbackError`` (default 3).

    After a fit, ``nonfinite_step`` is the first bad step (``None`` if none); with
    ``"rollback"``, ``rollbacks`` counts them and ``rollback_log`` holds a
    ``rollback.RollbackRecord`` for each of this fit call's.
    """

    kind = "nonfinite"

    order = -100  # before checkpoints: the fit is stopped before anything saves
    # No bad update reaches a state anyone sees, so this guard may learn of a non-finite step
    # a few steps late (the Trainer's lookahead): the step gates its update, or, for states
    # up to ``speculation.SPECULATE_MAX_BYTES``, runs ungated and the loop re-runs from a copy
    # it keeps, with that step undone, before any hook sees the state (``speculation.py``).
    records_only = True

    def __init__(
        self,
        action: str = "stop",
        *,
        max_consecutive: int | None = None,
        max_rollbacks: int | None = None,
    ):
        if action not in ACTIONS:
            raise ConfigError(f"NaNGuard action must be one of {ACTIONS}; got {action!r}.")
        self.action = action
        self._rollback_options("NaNGuard", max_consecutive, max_rollbacks)
        if action == "rollback":
            self.step_features = StepFeatures(
                finite=True, on_nonfinite="skip", rollback_after=self.max_consecutive
            )
        else:
            halt = "skip_nonfinite" if action == "skip" else "halt_on_nonfinite"
            self.step_features = frozenset({"finite", halt})
        self.nonfinite_step: int | None = None

    def logged_metrics(self, trainer) -> list[str]:
        return ["nonfinite_steps"] + ["rollbacks"] * (self.action == "rollback")

    def on_fit_start(self, trainer, module) -> None:
        self.nonfinite_step = None
        self._rollback_fit_start(trainer, "NaNGuard")

    def _check(self, trainer) -> None:
        n = trainer.first_nonfinite_step
        if n is None or self.nonfinite_step is not None:
            return
        self.nonfinite_step = n
        seen = trainer.global_step
        if self.action in ("skip", "rollback"):
            warn(
                f"NaNGuard: non-finite loss or gradient at step {n}; that update was skipped "
                "(parameters, optimizer and module state kept) and training goes on. Later "
                f"skips are counted in the logs as nonfinite_steps ({trainer.nonfinite_steps} "
                f"by step {seen}).",
                NonFiniteWarning,
            )
            return
        where = f"first non-finite loss or gradient at step {n}"
        if seen > n:
            # The host checks at log steps; the steps between changed nothing.
            where += f" (seen at step {seen}; steps {n}-{seen} were not applied)"
        msg = (
            f"NaNGuard: {where}; the parameters are those after step {n - 1}. Look at the "
            f"batch of step {n}, the learning rate, or the loss (log of 0, labels outside "
            "[0, num_classes))."
        )
        if self.action == "raise":
            raise NonFiniteError(msg, step=n)
        trainer.should_stop = True
        warn(msg + " Training stopped.", NonFiniteWarning)

    def __repr__(self) -> str:
        if self.action == "rollback":
            return (
                f"NaNGuard(action='rollback', max_consecutive={self.max_consecutive}, "
                f"max_rollbacks={self.max_rollbacks})"
            )
        return f"NaNGuard(action={self.action!r})"
