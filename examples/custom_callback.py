"""A user callback whose state survives a preemption and resume.

``LossEMA`` keeps an exponential moving average of the training loss and adds it to every
epoch's logs (so it lands in ``History`` and ``metrics.csv``). Its state lives in the callback,
so it implements ``state_dict`` / ``load_state_dict``: ``ModelCheckpoint`` saves that state
with the model, and ``fit(..., resume=True)`` hands it back.

The script trains once without interruption, then again with a SIGTERM in the middle of an
epoch (as a cluster scheduler would send): the Trainer finishes the step in flight, saves,
and raises ``TrainingInterrupted``; a fresh Trainer, module and callback resume from the
checkpoint. The end checks that both runs logged exactly the same averages.

    python examples/custom_callback.py                # about 15 seconds on 2 CPU cores
    NNXFIT_FAST=1 python examples/custom_callback.py  # seconds, for the tests

Writes ``runs/custom_callback/`` under the current folder.
"""

import os
import shutil
import signal

import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import nnxfit
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.data import ArrayLoader

FAST = os.environ.get("NNXFIT_FAST") == "1"
WORKDIR = "runs/custom_callback"
EPOCHS = 2 if FAST else 6


class LossEMA(nnxfit.Callback):
    """Exponential moving average of the training loss, logged per epoch as ``loss_ema``."""

    # Its hooks only record (the EMA, a log key): the device may run a few steps ahead of
    # them, and the Trainer never writes its state back to the module for them. Leave it False
    # for a callback that reads the module, changes the training or stops it.
    records_only = True

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.ema: float | None = None
        self.updates = 0

    def on_train_batch_end(self, trainer, module, step, logs):
        if "loss" in logs:  # logs carry values on log steps only (log_every_n_steps)
            loss = logs["loss"]
            self.ema = loss if self.ema is None else self.decay * self.ema + (1 - self.decay) * loss
            self.updates += 1

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        logs["loss_ema"] = self.ema  # keys added here reach History and the loggers

    def state_dict(self):
        return {"ema": self.ema, "updates": self.updates}

    def load_state_dict(self, state):
        self.ema = state["ema"]
        self.updates = state["updates"]


class Preempt(nnxfit.Callback):
    """Sends this process a SIGTERM once, at ``at_step``."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, module, step, logs):
        if step == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)


class MLP(nnxfit.TrainModule):
    def __init__(self, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 64, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)  # RNG state is checkpointed too
        self.l2 = nnx.Linear(64, 10, rngs=rngs)

    def training_step(self, batch):
        x, y = batch
        logits = self.l2(self.drop(nnx.relu(self.l1(x))))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def configure_optimizers(self):
        return optax.adam(1e-3)


def run(workdir: str, resume: bool = False, preempt_at: int | None = None):
    digits = load_digits()
    data = ArrayLoader(
        ((digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)),
        batch_size=64,
        shuffle=True,
        seed=0,
    )
    ema = LossEMA()
    callbacks = [ema, ModelCheckpoint(every_n_steps=5)]
    if preempt_at is not None:
        callbacks.append(Preempt(preempt_at))
    trainer = nnxfit.Trainer(
        max_epochs=EPOCHS,
        workdir=workdir,
        log_every_n_steps=5,
        callbacks=callbacks,
        limit_train_batches=10 if FAST else None,
    )
    history = trainer.fit(MLP(rngs=nnx.Rngs(0)), data, resume=resume)
    return history, ema


def main() -> bool:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    reference, ref_ema = run(os.path.join(WORKDIR, "uninterrupted"))

    workdir = os.path.join(WORKDIR, "preempted")
    try:
        run(workdir, preempt_at=15 if FAST else 45)  # epoch 1: 29 steps per epoch (fast: 10)
        raise AssertionError("the SIGTERM did not interrupt training")
    except nnxfit.TrainingInterrupted as e:
        print(f"interrupted: {e}")
    resumed, ema = run(workdir, resume=True)  # a new Trainer, module and LossEMA

    same = resumed.history["loss_ema"] == reference.history["loss_ema"]
    print(f"loss_ema per epoch, uninterrupted: {np.round(reference.history['loss_ema'], 5)}")
    print(f"loss_ema per epoch, resumed:       {np.round(resumed.history['loss_ema'], 5)}")
    assert same and ema.state_dict() == ref_ema.state_dict(), (
        ema.state_dict(),
        ref_ema.state_dict(),
    )
    print(
        f"result: callback state survived the resume: {same} (ema={ema.ema:.5f}, "
        f"{ema.updates} updates)"
    )
    return same


if __name__ == "__main__":
    main()
