"""What ``fit`` does before its first step: its inputs checked and batched, its callbacks
merged, and the device state (``FitCarry``), plan, schedule and counters built anew."""

from __future__ import annotations

from nnxfit import interrupt, multihost
from nnxfit.callbacks.base import CallbackList
from nnxfit.callbacks.defaults import default_callbacks, module_callbacks
from nnxfit.callbacks.merge import merge_callbacks
from nnxfit.carry import FitCarry
from nnxfit.data import BatchSpec, check_reiterable, first_batch, take_batches
from nnxfit.errors import ConfigError
from nnxfit.eval_api import check_module
from nnxfit.history import History
from nnxfit.inputs import fit_inputs
from nnxfit.loop import Progress, Schedule
from nnxfit.module import TrainModule, has_validation_step
from nnxfit.plan import Plan, epoch_size
from nnxfit.resume_point import Trail


def fit_data(trainer, module: TrainModule, train_data, val_data, **arrays) -> tuple:
    """``(train_data, val_data, first_batch)``: arrays batched Keras style (``inputs.py``),
    the first training batch read, ``overfit_batches`` applied. ``arrays``: ``fit``'s
    ``batch_size``, ``shuffle`` and ``validation_split``."""
    check_module(module)
    train_data, val_data = fit_inputs(train_data, val_data, seed=trainer.seed, **arrays)
    if val_data is not None and not has_validation_step(module):
        raise ConfigError(
            f"val_data was given but {type(module).__name__} defines no validation_step; "
            "define validation_step(self, batch) -> dict, or drop val_data."
        )
    first = first_batch(train_data, "train")
    if val_data is not None:
        check_reiterable(val_data, "val")
    if trainer.overfit_batches:  # the same first N batches every epoch, validated on too
        train_data = take_batches(train_data, trainer.overfit_batches)
        val_data = train_data if has_validation_step(module) else None
    multihost.check_batch_counts(train_data, val_data)  # several processes: equal counts
    return train_data, val_data, first


def fit_callbacks(trainer, module: TrainModule) -> CallbackList:
    """The default callbacks, the Trainer's, then the module's: a module's callback replaces
    the Trainer's of its type (Lightning's rule)."""
    user = trainer.callbacks
    merged = merge_callbacks(
        default_callbacks(trainer.config, user) + user, module_callbacks(module)
    )
    return CallbackList(merged)


def setup_fit(trainer, module: TrainModule, train_data, val_data, first) -> None:
    """Resets the Trainer's counters and History and builds the fit's parts for ``module``."""
    t = trainer
    t.module, t.train_data, t.val_data = module, train_data, val_data
    t.history, t.should_stop, t._seen = History(), False, Progress()
    t.logged_metrics = {}
    t.resumed_from = t.resume_info = t._resume_point = None
    t._signals = interrupt.Signals()
    t._spec = spec = BatchSpec(first, "train")
    t.placement.check_batch_size(spec.batch_size, "train")
    c = t.config
    sizes = epoch_size(
        train_data, c.limit_train_batches, c.grad_accum_steps, c.max_epochs, c.max_steps
    )
    t._n_train_batches, t.steps_per_epoch, t.estimated_stepping_batches = sizes
    t._plan = Plan(train_data, spec, t.placement.put_batch, c)
    t._schedule = Schedule(c, t._n_train_batches, validates=val_data is not None)
    carry = FitCarry.build(
        module,
        config=c,
        features=t.cb.step_features(),
        spec=spec,
        first_batch=first,
        placement=t.placement,
    )
    # Under NaNGuard("stop") (or SpikeGuard("stop")) the resume point is the last good
    # step's: where calls ended since about the last two logs (``resume_point.py``).
    halts = carry.programs.config.features.freezes
    t._trail = Trail(keep_calls=2 * c.log_every_n_steps + 4 if halts else 0)
    t._carry = carry
    t._sync_to_module()
