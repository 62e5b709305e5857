"""Tiny models shared by the tests."""

from __future__ import annotations

import os
import signal

import numpy as np
import optax
from flax import nnx

import nnxfit


class MLP(nnx.Module):
    def __init__(self, din=8, dh=16, dout=3, *, rngs: nnx.Rngs, dropout=0.0, batchnorm=False):
        self.l1 = nnx.Linear(din, dh, rngs=rngs)
        self.bn = nnx.BatchNorm(dh, rngs=rngs) if batchnorm else None
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.l2 = nnx.Linear(dh, dout, rngs=rngs)

    def __call__(self, x):
        h = self.l1(x)
        if self.bn is not None:
            h = self.bn(h)
        h = nnx.relu(h)
        if self.drop is not None:
            h = self.drop(h)
        return self.l2(h)


class Classifier(nnxfit.TrainModule):
    def __init__(self, *, seed=0, lr=1e-2, dropout=0.0, batchnorm=False, opt="adam", din=8):
        rngs = nnx.Rngs(seed)
        self.net = MLP(din, 16, 3, rngs=rngs, dropout=dropout, batchnorm=batchnorm)
        self.lr = lr
        self.opt = opt

    def __call__(self, x):
        return self.net(x)

    def training_step(self, batch):
        x, y = batch
        logits = self.net(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": (logits.argmax(-1) == y).mean()}

    def validation_step(self, batch):
        x, y = batch
        logits = self.net(x)
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            "accuracy": (logits.argmax(-1) == y).mean(),
        }

    def configure_optimizers(self):
        return optax.sgd(self.lr) if self.opt == "sgd" else optax.adam(self.lr)


def toy_data(n=100, din=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, din)).astype(np.float32)
    w = rng.normal(size=(din, 3)).astype(np.float32)
    y = (x @ w).argmax(-1).astype(np.int32)
    return x, y


class SignalAt(nnxfit.Callback):
    """Sends this process ``signum`` from the hook of step ``step`` (a real preemption)."""

    def __init__(self, step, signum=signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, module, step, logs):
        if step == self.step:
            os.kill(os.getpid(), self.signum)
