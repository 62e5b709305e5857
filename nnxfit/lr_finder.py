"""``nnxfit.lr_find`` (this module is ``lr_finder``, so that the function does not shadow it
as an attribute of the package): the learning-rate range test (Leslie Smith's, as Lightning's
``Tuner.lr_find`` runs it), on a copy of the module, so that nothing of the caller's changes.

The test trains a copy for up to ``num_steps`` optimizer steps whose learning rates rise
exponentially from ``min_lr`` to ``max_lr`` (``lr_i = min_lr * (max_lr / min_lr) ** (i /
(num_steps - 1))``, evenly spaced in log lr), records each step's loss and its exponentially
smoothed value (``beta`` = 0.98, bias-corrected), and stops at the step whose smoothed loss
exceeds ``early_stop_threshold`` (4) times the lowest so far, or is not finite. The suggestion
is the rate where the smoothed loss falls fastest: the most negative derivative of the
smoothed loss with respect to log(lr), the x axis of the plot, skipping the first 10 points
and the last one (Lightning's defaults). Lightning 2.x differentiates with respect to lr
itself, which on a log-spaced ladder divides by spacings a million times smaller at the low
end and picks the first rates for their noise (Lightning-AI/pytorch-lightning#21141, #21171).

How the rate is driven through the module's own optimizer: ``configure_optimizers`` is the
module's, run inside the test's fit (so ``self.trainer.estimated_stepping_batches`` is
``num_steps``). Its optimizer is wrapped so that each update is multiplied, inside the jitted
step, by ``lr_i / own_i``, where ``own_i`` is the rate the optimizer itself just used, read by
``nnxfit.hyperparams.learning_rate_of`` as ``LearningRateMonitor`` reads it (an
``optax.inject_hyperparams`` state, a ``{"optimizer": tx, "lr_schedule": schedule}``, or the
structure of optax's own optimizers, constant or scheduled). optax's optimizers (``sgd``,
``adam``, ``adamw``, ``lion``, ...) end in ``scale_by_learning_rate`` and keep no trace of
the rate in their state (moments, counts), so their update is linear in the rate and the
product is the update at ``lr_i`` (to float32 rounding of the ratio). One that also uses its
rate inside its state (``optax.contrib``'s schedule-free optimizers, read through
``inject_hyperparams``) is rescaled at its output only: an approximation. A step whose own
rate is 0 (a warmup from 0 has it at step 0) has no direction to scale and makes no update;
the result counts it (``unapplied_steps``) and, past the first step (whose rate, ``min_lr``,
is meant to move almost nothing), a warning says so. An optimizer whose rate none of the
three shows (a hand-written ``GradientTransformation``) gets a ``ConfigError`` naming the
fix. One compile; the rates are device arithmetic on the wrapper's own step count.

The ladder is evenly spaced from its first rung (Lightning's skips ``i = 1``,
Lightning-AI/pytorch-lightning#21931); ``lrs[i]`` pairs with the loss step ``i`` computed
before its update, as Lightning pairs them.

The copy: ``nnx.clone`` of the module (new Variables; the arrays, immutable, shared until the
Trainer's own copies, which it donates). The copy's class is a subclass of the module's that
swaps in the wrapped optimizer and drops ``configure_callbacks`` (an ``EarlyStopping`` on
``val_accuracy`` has nothing to watch here; Lightning also runs its finder with its own
callback alone). The fit has no workdir, so nothing is written but the PNG, when asked.

The losses reach the host at every step (``log_every_n_steps=1``): the divergence stop needs
each one, and a hundred small fetches cost little next to the steps.

Two stop-gaps stand in for Trainer hooks that do not exist yet: the subclass swap, for a
``fit`` option that wraps the optimizer ``configure_optimizers`` returns and leaves out the
module's ``configure_callbacks``; and ``hyperparams.fit_optimizer`` in ``on_fit_end``, for a
public read of the fit's final optimizer state (``unapplied_steps`` is counted there).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError
from nnxfit.hyperparams import (
    INJECT_FIX,
    describe_tx,
    fit_optimizer,
    learning_rate_of,
    learning_rate_source,
)
from nnxfit.module import TrainModule
from nnxfit.optimizers import parse_output
from nnxfit.trainer import Trainer
from nnxfit.warn import warn

SKIP_BEGIN, SKIP_END = 10, 1  # points the suggestion ignores, as Lightning's defaults
PNG_NAME = "lr_find.png"
# Trainer options the range test sets itself; every other one is passed on to its Trainer.
OWNED = (
    "max_epochs",
    "max_steps",
    "callbacks",
    "workdir",
    "log_every_n_steps",
    "steps_per_execution",
    "val_every_n_epochs",
    "val_every_n_steps",
    "limit_val_batches",
    "num_sanity_val_steps",
    "fast_dev_run",
    "overfit_batches",
)


class LRFindWarning(UserWarning):
    """The range test ran, but its result is weaker than it looks (no suggestion, steps
    without an update)."""


# -- the result ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LRFindResult:
    """What ``lr_find`` measured. ``lrs[i]`` is the rate of step ``i``'s update and
    ``step_losses[i]`` the loss step ``i`` computed (before its update, as Lightning pairs
    them); ``losses`` is the smoothed loss, the curve the suggestion and the plot use."""

    lrs: np.ndarray
    losses: np.ndarray
    step_losses: np.ndarray
    suggestion: float | None
    suggestion_index: int | None
    diverged: bool  # stopped before num_steps: the smoothed loss blew up or was not finite
    num_steps: int
    min_lr: float
    max_lr: float
    unapplied_steps: int = 0
    plot_path: Path | None = None

    def plot(self, path: str | os.PathLike) -> Path:
        """Writes a PNG of loss against learning rate (log x axis), the suggestion marked;
        returns its path. Parent folders are created."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from matplotlib.figure import Figure  # Agg canvas, no pyplot: never needs a display

        fig = Figure(figsize=(7, 4.5), layout="constrained")
        _draw(fig.add_subplot(), self)
        fig.savefig(path, dpi=100)
        return path


def suggest(
    lrs: np.ndarray, losses: np.ndarray, skip_begin: int = SKIP_BEGIN, skip_end: int = SKIP_END
) -> int | None:
    """The index of the steepest fall of ``losses`` against log(``lrs``), among the finite
    points after the first ``skip_begin`` and before the last ``skip_end``; ``None`` when
    fewer than two such points are left or the loss falls nowhere."""
    lrs, losses = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
    idx = np.arange(len(losses))[skip_begin : len(losses) - skip_end]
    idx = idx[np.isfinite(losses[idx])]
    if len(idx) < 2:
        return None
    slope = np.gradient(losses[idx], np.log(lrs[idx]))
    best = int(np.argmin(slope))
    return int(idx[best]) if slope[best] < 0 else None


def _draw(ax, r: LRFindResult) -> None:
    ax.plot(r.lrs, r.step_losses, color="C0", lw=1, alpha=0.35, label="loss at each step")
    ax.plot(r.lrs, r.losses, color="C0", lw=1.8, label="smoothed loss")
    ax.set_xscale("log")
    smooth = r.losses[np.isfinite(r.losses)]
    low = np.concatenate([smooth, r.step_losses[np.isfinite(r.step_losses)]])
    if len(smooth):
        # Down to the lowest loss of either curve; up to the smoothed curve's highest, which
        # the stop keeps near the threshold: the raw losses of the diverging steps would
        # flatten everything else.
        lo, hi = float(low.min()), float(smooth.max())
        if lo > 0 and hi / lo >= 100:
            ax.set_yscale("log")
            ax.set_ylim(lo / 2, hi * 2)
        else:
            pad = 0.05 * (hi - lo or abs(hi) or 1.0)
            ax.set_ylim(lo - pad, hi + pad)
    if r.suggestion_index is not None:
        i = r.suggestion_index
        ax.axvline(r.lrs[i], color="C3", ls=":", lw=1)
        ax.plot(
            [r.lrs[i]], [r.losses[i]], "o", color="C3", ms=8, label=f"suggested lr {r.lrs[i]:.3g}"
        )
    end = "stopped: diverged" if r.diverged else "all steps run"
    ax.set_title(f"learning-rate range test: {len(r.lrs)} of {r.num_steps} steps ({end})")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


# -- driving the module's optimizer at the test's rates -----------------------------------
class RangeTestState(NamedTuple):
    count: jax.Array  # updates made: the index of the next step's rate
    unapplied: jax.Array  # steps whose own rate was 0 (or not finite): no update made
    last_unapplied: jax.Array  # the latest such step's index, -1 when none
    inner: Any  # the module's optimizer's state


def ladder(min_lr: float, max_lr: float, num_steps: int) -> np.ndarray:
    """The test's rates, step by step: evenly spaced in log lr from ``min_lr`` to ``max_lr``."""
    return min_lr * (max_lr / min_lr) ** (np.arange(num_steps) / (num_steps - 1))


def range_test_optimizer(
    tx: optax.GradientTransformation,
    lr_schedule: Any,
    min_lr: float,
    max_lr: float,
    num_steps: int,
    owner: str = "the module",
) -> optax.GradientTransformationExtraArgs:
    """``tx`` with its updates rescaled from its own learning rate to the test's ladder.

    ``init`` raises a ``ConfigError`` when ``learning_rate_of`` cannot read ``tx``'s rate."""
    tx = optax.with_extra_args_support(tx)
    log_min = math.log(min_lr)
    log_step = (math.log(max_lr) - log_min) / (num_steps - 1)

    def init(params):
        inner = tx.init(params)
        if learning_rate_source(tx, inner, lr_schedule) is None:
            raise ConfigError(
                f"lr_find cannot read the learning rate of {owner}'s optimizer "
                f"{describe_tx(tx)}, so it cannot set its rate to the test's. In "
                f"configure_optimizers, build it with optax.inject_hyperparams, e.g. "
                f"{INJECT_FIX}, or return {{'optimizer': tx, 'lr_schedule': schedule}} with "
                "the schedule the optimizer follows."
            )
        # Two arrays, not one twice: the Trainer donates the state, and a buffer given twice
        # fails the call.
        zeros = [jnp.zeros((), jnp.int32) for _ in range(2)]
        return RangeTestState(*zeros, jnp.full((), -1, jnp.int32), inner)

    def update(updates, state, params=None, **extra):
        updates, inner = tx.update(updates, state.inner, params, **extra)
        # The rate the update just made used (learning_rate_of reads it after the update).
        own = learning_rate_of(tx, inner, lr_schedule=lr_schedule, step=state.count)
        target = jnp.exp(log_min + log_step * state.count.astype(jnp.float32))
        ok = jnp.isfinite(own) & (own > 0)
        ratio = jnp.where(ok, target / jnp.where(ok, own, 1.0), 0.0)
        updates = jax.tree.map(lambda u: (u * ratio).astype(u.dtype), updates)
        return updates, RangeTestState(
            state.count + 1,
            state.unapplied + (~ok).astype(jnp.int32),
            jnp.where(ok, state.last_unapplied, state.count),
            inner,
        )

    return optax.GradientTransformationExtraArgs(init, update)


@dataclasses.dataclass
class _Plan:
    min_lr: float
    max_lr: float
    num_steps: int


_PLAN: contextvars.ContextVar[_Plan | None] = contextvars.ContextVar("nnxfit_lr_find", default=None)
# One per class for the process's life (jax's pytree registry keeps every nnx class anyway).
_RANGE_CLASSES: dict[type, type] = {}


def _split_optimizers(module: Any, out: Any) -> tuple[Any, Any]:
    """``(tx, lr_schedule)`` from what ``configure_optimizers`` returned, as the Trainer
    reads it (``optimizers.parse_output``)."""
    name = type(module).__name__
    try:
        txs, lr_fns, names = parse_output(name, out)
    except TypeError as e:
        raise ConfigError(f"{e} lr_find needs one such optimizer.") from None
    if names:
        raise ConfigError(
            f"{name}.configure_optimizers returned the optimizers {list(names)}; lr_find drives "
            "one optimizer, returned as an optax.GradientTransformation or "
            "{'optimizer': tx, 'lr_schedule': schedule}."
        )
    return txs[""], lr_fns[""]


def _range_class(cls: type) -> type:
    """A subclass of the module's class whose optimizer runs at the test's rates and which
    declares no callbacks. One per class, so that repeated tests reuse it."""
    sub = _RANGE_CLASSES.get(cls)
    if sub is not None:
        return sub

    def configure_optimizers(self):
        plan = _PLAN.get()
        tx, lr_fn = _split_optimizers(self, cls.configure_optimizers(self))
        return range_test_optimizer(
            tx, lr_fn, plan.min_lr, plan.max_lr, plan.num_steps, owner=cls.__name__
        )

    def configure_callbacks(self):
        return []

    sub = type(
        cls.__name__,
        (cls,),
        {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "configure_optimizers": configure_optimizers,
            "configure_callbacks": configure_callbacks,
        },
    )
    _RANGE_CLASSES[cls] = sub
    return sub


# -- recording the losses, stopping on divergence -----------------------------------------
class RangeRecorder(Callback):
    """Takes each step's loss, smooths it, and stops the fit after the step whose smoothed
    loss is not finite or exceeds ``threshold`` times the lowest before it.

    It needs every step's loss on the host when its hook runs (``log_every_n_steps=1``), and
    the device in step with it (it is not ``records_only``): the fit stops right after the
    step that diverged, with no further step dispatched at a yet larger rate."""

    def __init__(self, beta: float, threshold: float | None):
        self.beta, self.threshold = beta, threshold
        self.step_losses: list[float] = []
        self.losses: list[float] = []
        self.diverged = False
        self.unapplied, self.last_unapplied = 0, -1
        self._avg = 0.0
        self._best = math.inf

    def on_train_batch_end(self, trainer, module, step, logs) -> None:
        if "loss" not in logs:
            raise RuntimeError(
                f"lr_find got no loss at step {step}; its Trainer must log every step."
            )
        loss = float(logs["loss"])
        i = len(self.losses)
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta ** (i + 1))
        self.step_losses.append(loss)
        self.losses.append(smooth)
        blown = self.threshold is not None and i > 0 and smooth > self.threshold * self._best
        if not math.isfinite(smooth) or blown:
            self.diverged = True
            trainer.should_stop = True
        self._best = min(self._best, smooth)

    def on_fit_end(self, trainer, module) -> None:
        state = fit_optimizer(trainer)[1]
        if isinstance(state, RangeTestState):
            n, last = jax.device_get((state.unapplied, state.last_unapplied))
            self.unapplied, self.last_unapplied = int(n), int(last)


# -- the entry point ----------------------------------------------------------------------
def lr_find(
    module: Any,
    data: Any,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    *,
    early_stop_threshold: float | None = 4.0,
    beta: float = 0.98,
    path: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    shuffle: bool | None = None,
    **trainer_options: Any,
) -> LRFindResult:
    """Runs the learning-rate range test on a copy of ``module`` (module docstring) and
    returns an ``LRFindResult``: ``suggestion`` (a float, or ``None`` when the loss fell
    nowhere, with a warning), ``lrs``, ``losses`` (smoothed), ``step_losses``, ``plot(path)``.

    ``data`` is what ``Trainer.fit`` takes as training data (a loader, or arrays batched by
    ``batch_size``); it is iterated for as many epochs as ``num_steps`` needs. The PNG of loss
    against rate, the suggestion marked, is written to ``path``, or to
    ``workdir/lr_find.png`` when only ``workdir`` is given; with neither, nothing is written.
    ``early_stop_threshold=None`` runs every step unless the loss stops being finite.
    Other keyword arguments are ``Trainer`` options for the test's fit (``seed``,
    ``precision``, ``grad_clip_norm``, ``grad_accum_steps``, ``mesh``, ``progress_bar``
    (default off), ...): pass those the real fit will use. ``module`` is left exactly as it
    was: parameters, batch statistics, RNG state, train/eval mode.
    """
    if not isinstance(module, TrainModule):
        raise ConfigError(
            f"lr_find needs an nnxfit.TrainModule; got {type(module).__name__}. Subclass "
            "nnxfit.TrainModule and define training_step and configure_optimizers."
        )
    _check_range(min_lr, max_lr, num_steps, early_stop_threshold, beta)
    if getattr(module, "automatic_optimization", True) is False:
        raise ConfigError(
            f"{type(module).__name__} sets automatic_optimization = False: its training_step "
            "applies its own updates, which lr_find cannot rescale. Run the range test on a "
            "module with automatic optimization."
        )
    owned = sorted(set(trainer_options) & set(OWNED))
    if owned:
        raise ConfigError(
            f"lr_find sets the Trainer options {owned} itself (one fit of num_steps steps, a "
            "loss at every step, no callbacks, no workdir); leave them out. To keep the plot, "
            "pass path= or workdir=."
        )
    trainer_options.setdefault("progress_bar", False)

    copy = nnx.clone(module)
    copy.__class__ = _range_class(type(module))
    recorder = RangeRecorder(beta, early_stop_threshold)
    trainer = Trainer(
        max_steps=num_steps,
        log_every_n_steps=1,
        callbacks=[recorder],
        workdir=None,
        **trainer_options,
    )
    token = _PLAN.set(_Plan(float(min_lr), float(max_lr), int(num_steps)))
    try:
        trainer.fit(copy, data, batch_size=batch_size, shuffle=shuffle)
    finally:
        _PLAN.reset(token)

    n = len(recorder.losses)
    lrs = ladder(float(min_lr), float(max_lr), int(num_steps))[:n]
    losses = np.asarray(recorder.losses, np.float64)
    index = suggest(lrs, losses)
    result = LRFindResult(
        lrs=lrs,
        losses=losses,
        step_losses=np.asarray(recorder.step_losses, np.float64),
        suggestion=None if index is None else float(lrs[index]),
        suggestion_index=index,
        diverged=recorder.diverged,
        num_steps=int(num_steps),
        min_lr=float(min_lr),
        max_lr=float(max_lr),
        unapplied_steps=recorder.unapplied,
    )
    _warn_about(result, type(module).__name__, recorder.last_unapplied == 0)
    out = path if path is not None else (Path(workdir) / PNG_NAME if workdir is not None else None)
    if out is not None:
        result = dataclasses.replace(result, plot_path=result.plot(out))
    return result


def _check_range(min_lr, max_lr, num_steps, threshold, beta) -> None:
    for name, v in (("min_lr", min_lr), ("max_lr", max_lr)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not (0 < v < math.inf):
            raise ConfigError(f"lr_find's {name} must be a number > 0; got {v!r}.")
    if not max_lr > min_lr:
        raise ConfigError(
            f"lr_find's max_lr ({max_lr!r}) must be above min_lr ({min_lr!r}): the test raises "
            "the rate from min_lr to max_lr."
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ConfigError(
            f"lr_find's num_steps must be an integer >= 2 (the rates from min_lr to max_lr); "
            f"got {num_steps!r}. Lightning's default is 100."
        )
    if threshold is not None and not (isinstance(threshold, int | float) and threshold > 1):
        raise ConfigError(
            f"lr_find's early_stop_threshold must be a number > 1 (a multiple of the lowest "
            f"smoothed loss) or None (never stop early); got {threshold!r}."
        )
    if not (isinstance(beta, int | float) and 0 <= beta < 1):
        raise ConfigError(f"lr_find's beta (loss smoothing) must be in [0, 1); got {beta!r}.")


def _warn_about(result: LRFindResult, name: str, first_only: bool) -> None:
    # A 0 rate at the first step only (a warmup from 0) goes unsaid: that step's rate is
    # min_lr, whose update is negligible by design.
    if result.unapplied_steps > 1 or (result.unapplied_steps and not first_only):
        warn(
            f"lr_find: {name}'s optimizer had a learning rate of 0 at {result.unapplied_steps} "
            "of the test's steps (a warmup from 0 starts there), so they made no update: the "
            "test rescales the optimizer's own step, and a step of size 0 has no direction. "
            "Keep the schedule above 0 after its first step.",
            LRFindWarning,
        )
    if result.suggestion is None:
        n = len(result.losses)
        if n >= SKIP_BEGIN + SKIP_END + 2:
            why = (
                "the smoothed loss fell nowhere between min_lr and max_lr: lower min_lr, "
                "raise max_lr, or check that the model learns at all"
            )
        elif result.diverged:
            why = (
                f"the loss diverged after {n} steps, too few to judge past the first "
                f"{SKIP_BEGIN}: lower min_lr or max_lr"
            )
        else:
            why = (
                f"num_steps={n} leaves too few points to judge past the first {SKIP_BEGIN}: "
                "raise num_steps (Lightning's default is 100)"
            )
        warn(f"lr_find has no suggestion for {name}: {why}.", LRFindWarning)
