"""The learning-rate range test: pick the rate from a plot, then train with it.

``nnxfit.lr_find`` trains a copy of the module for up to 100 steps with learning rates rising
exponentially from 1e-7 to 10, records the smoothed training loss, stops once it diverges,
and suggests the rate where the loss falls fastest. The module itself is left exactly as it
was (the script checks it, bit for bit), so the real fit then starts from the same weights,
with the suggested rate as the peak of its warmup-cosine schedule.

The model is an MLP with BatchNorm and Dropout on scikit-learn's digits; its
``configure_optimizers`` reads the peak rate from ``self.peak_lr``, the attribute the script
sets from the suggestion, as Lightning's ``lr_find(update_attr=True)`` sets ``model.lr``.

    python examples/lr_find.py                # under a minute on 2 CPU cores
    NNXFIT_FAST=1 python examples/lr_find.py  # a few seconds, for the tests

Writes ``runs/lr_find/lr_find.png`` (loss against learning rate, the suggestion marked).
"""

import os
import shutil

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import nnxfit
from nnxfit.data import ArrayLoader

FAST = os.environ.get("NNXFIT_FAST") == "1"
WORKDIR = "runs/lr_find"


class Digits(nnxfit.TrainModule):
    def __init__(self, peak_lr: float = 1e-3, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 256, rngs=rngs)
        self.bn = nnx.BatchNorm(256, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(256, 10, rngs=rngs)
        self.peak_lr = peak_lr  # a plain float: a static attribute of the module

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))

    def training_step(self, batch):
        x, y = batch
        logits = self(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": (logits.argmax(-1) == y).mean()}

    def validation_step(self, batch):
        x, y = batch
        logits = self(x)
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            "accuracy": (logits.argmax(-1) == y).mean(),
        }

    def configure_optimizers(self):
        # Any optimizer LearningRateMonitor can read works in the range test, this schedule
        # too: the test rescales each update from the schedule's rate to its own.
        total = self.trainer.estimated_stepping_batches
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=self.peak_lr,
            warmup_steps=max(1, total // 10),
            decay_steps=total,
        )
        return optax.adamw(schedule, weight_decay=1e-4)


def load_data(seed: int = 0):
    digits = load_digits()  # 1797 images of 8x8 pixels, flattened to 64 values in [0, 1]
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:360], order[360:]
    return (x[train], y[train]), (x[val], y[val])


def snapshot(module) -> list[np.ndarray]:
    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)  # the dropout RNG state
        return np.array(x)

    return [host(x) for x in jax.tree.leaves(nnx.state(module))]


def main() -> float:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    train, val = load_data()
    train_loader = ArrayLoader(train, batch_size=64, shuffle=True, seed=0)
    module = Digits(rngs=nnx.Rngs(0))
    before = snapshot(module)

    found = nnxfit.lr_find(
        module,
        train_loader,
        num_steps=30 if FAST else 100,
        path=f"{WORKDIR}/lr_find.png",
        grad_clip_norm=1.0,  # the options the real fit uses
    )
    untouched = all(np.array_equal(a, b) for a, b in zip(before, snapshot(module), strict=True))
    how = "diverged and stopped" if found.diverged else "ran every step"
    print(
        f"range test: {len(found.lrs)} steps from {found.lrs[0]:.0e} to {found.lrs[-1]:.2g} "
        f"({how}); suggested lr {found.suggestion:.3g}; module untouched: {untouched}"
    )

    module.peak_lr = found.suggestion
    trainer = nnxfit.Trainer(
        max_epochs=1 if FAST else 8,
        limit_train_batches=4 if FAST else None,
        grad_clip_norm=1.0,
        log_every_n_steps=10,
    )
    history = trainer.fit(module, train_loader, val_data=ArrayLoader(val, batch_size=360))
    acc = history.history["val_accuracy"][-1]
    print(
        f"result: suggested lr={found.suggestion:.3g}, val_accuracy={acc:.4f} after "
        f"{len(history.epoch)} epochs; wrote {found.plot_path}; module untouched: {untouched}"
    )
    return acc


if __name__ == "__main__":
    main()
