"""``TrainModule``: an ``nnx.Module`` that says how to train, validate and predict itself."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Mapping
from typing import Any

import optax
from flax import nnx

from nnxfit.hparams import HParams, collect

# The keys the default ``predict_step`` takes a dict batch's inputs from, in this order.
INPUT_KEYS = ("x", "inputs", "input", "image", "images", "features", "data")


class TrainModule(nnx.Module):
    """Subclass and define ``training_step`` and ``configure_optimizers``.

    The step methods are traced inside the Trainer's jitted step: write them as ordinary
    NNX code (dropout keys come from the module's own ``nnx.Rngs``; BatchNorm statistics
    update in train mode). ``trainable`` is the ``nnx`` filter of what the optimizer updates;
    everything else (frozen params, batch statistics, RNG state) is carried but never
    touched by it.

    Several optimizers: ``configure_optimizers`` returns ``{name: tx}`` and ``trainable`` is
    ``{name: filter}`` (disjoint filters); ``training_step`` returns ``{name: loss}`` and each
    optimizer steps on its own loss's gradient. With ``automatic_optimization = False``,
    ``training_step`` updates the module itself through ``self.optimizers()``.
    """

    trainable: Any = nnx.Param
    # False: training_step updates the module itself with ``self.optimizers()``.
    automatic_optimization: bool = True

    @property
    def hparams(self) -> HParams:
        """The module's hyperparameters: a dict of plain data with attribute access
        (``self.hparams.lr``), empty until ``save_hyperparameters()`` fills it or you set
        entries (``self.hparams["lr"] = 1e-3``, ``self.hparams = {...}``). It is a static
        attribute of the module (part of its graph definition, so ``training_step`` reads it
        too) and goes into every checkpoint, ``workdir/hparams.yaml`` and the trackers
        (TensorBoard's HParams tab, MLflow params, W&B config). See ``nnxfit.hparams``."""
        hp = vars(self).get("hparams")
        if not isinstance(hp, HParams):
            hp = vars(self)["hparams"] = HParams(hp or {})
        return hp

    @hparams.setter
    def hparams(self, value: Any) -> None:
        # Stored directly: a static attribute nnx's graph flattening finds in vars(self).
        vars(self)["hparams"] = HParams(value or {})

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "hparams":  # made plain data first: nnx refuses arrays or Rngs in statics
            TrainModule.hparams.fset(self, value)
        else:
            super().__setattr__(name, value)

    def save_hyperparameters(self, *args: Any, ignore: Any = None) -> None:
        """Fills ``self.hparams`` from the arguments of ``__init__`` (call it there), as
        Lightning's does: every argument but ``self`` and the names in ``ignore``;
        ``save_hyperparameters("lr", "depth")`` only those; ``save_hyperparameters(d)`` the
        dict (or ``argparse.Namespace``) ``d``. Values that are not plain data (an
        ``nnx.Rngs``, a module, a function) are stored as a short description string."""
        frame = inspect.currentframe().f_back
        try:
            values = collect(self, args, ignore, frame)
        finally:
            del frame
        self.hparams.update(values)

    @property
    def trainer(self):
        """The ``Trainer`` running ``fit``/``validate``/``predict`` on this module, else None.

        Read it in ``configure_optimizers`` (``self.trainer.estimated_stepping_batches``) or
        ``configure_callbacks``. It is a class-level property backed by a context variable,
        not an attribute, so the Trainer never enters the module's graph definition. Values
        read while ``training_step`` is traced are baked into the compiled step.
        """
        active = _ACTIVE.get()
        return active[1] if active is not None and active[0] is self else None

    def training_step(self, batch: Any):
        """Return a scalar loss, ``(loss, {"metric": scalar, ...})``, or Lightning's
        ``{"loss": loss, "metric": scalar, ...}`` (every key but ``"loss"`` is a metric)."""
        raise NotImplementedError(
            f"{type(self).__name__} must define training_step(self, batch) returning a scalar "
            "loss or (loss, metrics_dict)."
        )

    def validation_step(self, batch: Any) -> dict[str, Any]:
        """Return a dict of scalars (means over the batch); logged as ``val_<name>``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no validation_step; define validation_step(self, batch) "
            "returning a dict of scalars to use val_data or Trainer.validate."
        )

    def test_step(self, batch: Any) -> dict[str, Any]:
        """Like ``validation_step``, for ``Trainer.test``; logged as ``test_<name>``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no test_step; define test_step(self, batch) returning a "
            "dict like validation_step's to use Trainer.test (to test with the validation "
            "metrics: def test_step(self, batch): return self.validation_step(batch))."
        )

    def predict_step(self, batch: Any):
        """Default: the module called on the batch's inputs: the first element of a tuple or
        list batch (Keras's ``(x, y)``), the first of the keys ``INPUT_KEYS`` (``"x"``,
        ``"inputs"``, ``"input"``, ``"image"``, ...) of a dict batch, else the batch itself.
        Override it for anything else."""
        if isinstance(batch, tuple | list):
            return self(batch[0])
        if isinstance(batch, Mapping):
            key = next((k for k in INPUT_KEYS if k in batch), None)
            if key is None:
                raise NotImplementedError(
                    f"{type(self).__name__}.predict_step got a dict batch with keys "
                    f"{sorted(map(str, batch))}; the default predict_step calls the module on "
                    f"the first of the keys {list(INPUT_KEYS)} and finds none. Define "
                    "predict_step(self, batch), e.g. return self(batch['my_input'])."
                )
            return self(batch[key])
        return self(batch)

    def configure_optimizers(self) -> optax.GradientTransformation:
        raise NotImplementedError(
            f"{type(self).__name__} must define configure_optimizers(self) returning an "
            "optax.GradientTransformation, e.g. optax.adamw(1e-3)."
        )

    def configure_callbacks(self) -> list:
        return []

    def optimizers(self):
        """With ``automatic_optimization = False``, inside ``training_step``: the fit's
        ``nnx.Optimizer``s, made from ``configure_optimizers`` (a dict by name when it
        returned several, else the one) and holding their current state. Compute gradients
        with ``nnx.value_and_grad(f, argnums=nnx.DiffState(0, filter))`` (``filter`` the
        optimizer's entry of ``trainable``) and apply them with ``opt.update(self, grads)``,
        on any optimizer, as often and in any order::

            def training_step(self, batch):
                opt = self.optimizers()
                loss_d, g = nnx.value_and_grad(d_loss, argnums=nnx.DiffState(0, D))(self, batch)
                opt["disc"].update(self, g)
                loss_g, g = nnx.value_and_grad(g_loss, argnums=nnx.DiffState(0, G))(self, batch)
                opt["gen"].update(self, g)
                return loss_d + loss_g, {"loss_d": loss_d, "loss_g": loss_g}

        Anywhere else, a ``ConfigError``."""
        from nnxfit.manual_step import optimizers_of

        return optimizers_of(self)


def has_validation_step(module: TrainModule) -> bool:
    return type(module).validation_step is not TrainModule.validation_step


def has_test_step(module: TrainModule) -> bool:
    return type(module).test_step is not TrainModule.test_step


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("nnxfit_active_trainer", default=None)


@contextlib.contextmanager
def attached(module: Any, trainer: Any):
    """Makes ``module.trainer`` return ``trainer`` inside the block."""
    token = _ACTIVE.set((module, trainer))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
