"""Sets hyperparameters during a fit on a 4-device CPU mesh; prints OK when the train and
validation programs never compile after the first epoch (run by tests/test_hyperparams.py).

The device count must be fixed before jax starts, which is why this runs in its own process.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/models.py

import warnings  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from jax import monitoring  # noqa: E402
from models import Classifier, toy_data  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.callbacks.reduce_lr import ReduceLROnPlateau  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402

COMPILES: list[str] = []
monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: (
        COMPILES.append(kw.get("fun_name", ""))
        if event == "/jax/core/compile/backend_compile_duration"
        else None
    )
)


class Injected(Classifier):
    def configure_optimizers(self):
        return optax.inject_hyperparams(optax.adam)(learning_rate=0.1)


class Record(nnxfit.Callback):
    def __init__(self):
        self.per_epoch = []

    def on_train_epoch_start(self, trainer, module, epoch):
        trainer.set_hyperparameter("b2", 0.99 - 0.01 * epoch)

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        train = sum(n in ("jit(_single)", "jit(_multi)") for n in COMPILES)
        self.per_epoch.append((train, COMPILES.count("jit(_eval)")))


def main():
    mesh = jax.make_mesh((4,), ("data",))
    rec = Record()
    reduce = ReduceLROnPlateau(monitor="val_loss", patience=0, min_delta=1e9, verbose=False)
    trainer = nnxfit.Trainer(max_epochs=4, mesh=mesh, progress_bar=False, callbacks=[reduce, rec])
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnxfit.RecompileWarning)
        history = trainer.fit(
            Injected(),
            ArrayLoader(toy_data(32), batch_size=8),
            val_data=ArrayLoader(toy_data(24, seed=1), batch_size=16),
        )
    lr = trainer.train_state()["opt"].hyperparams["learning_rate"]
    print("per epoch", rec.per_epoch, "lr", history.history["lr"], lr.sharding, lr.committed)
    assert [e for e, _ in reduce.reductions] == [1, 2, 3], reduce.reductions
    assert rec.per_epoch == [rec.per_epoch[0]] * 4, rec.per_epoch
    assert isinstance(lr.sharding, jax.sharding.NamedSharding) and lr.committed
    assert abs(trainer.get_hyperparameter("b2") - 0.96) < 1e-6
    print("OK")


if __name__ == "__main__":
    main()
