"""Fine-tuning with a frozen backbone: only the head trains, chosen by ``trainable``.

Step 1 pretrains a small MLP (backbone + head) on the digits 0-4. Step 2 puts the same
backbone under a fresh head for the digits 5-9 and sets

    trainable = nnx.All(nnx.Param, nnx.PathContains("head"))

so the optimizer only sees the head's parameters (its state is sized for the head alone).
The backbone's parameters are still carried through every step, untouched: the example checks
they are bitwise equal before and after fine-tuning.

    python examples/finetune_frozen.py                # about 20 seconds on 2 CPU cores
    NNXFIT_FAST=1 python examples/finetune_frozen.py  # seconds, for the tests
"""

import os

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import nnxfit
from nnxfit.data import ArrayLoader

FAST = os.environ.get("NNXFIT_FAST") == "1"


class Backbone(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.l2 = nnx.Linear(128, 64, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.l2(nnx.relu(self.l1(x))))


class Classifier(nnxfit.TrainModule):
    def __init__(self, backbone: Backbone, num_classes: int, *, rngs: nnx.Rngs):
        self.backbone = backbone
        self.head = nnx.Linear(64, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch):
        x, y = batch
        logits = self(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": (logits.argmax(-1) == y).mean()}

    def validation_step(self, batch):
        x, y = batch
        logits = self(x)
        return {"accuracy": (logits.argmax(-1) == y).mean()}

    def configure_optimizers(self):
        return optax.adam(3e-3)


class FrozenBackbone(Classifier):
    # Only parameters whose path contains "head" are trained; the backbone is carried as is.
    trainable = nnx.All(nnx.Param, nnx.PathContains("head"))


def split(x, y, seed=0):
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = len(x) // 5
    return (x[order[n_val:]], y[order[n_val:]]), (x[order[:n_val]], y[order[:n_val]])


def fit(module, data, epochs):
    train, val = data
    trainer = nnxfit.Trainer(max_epochs=epochs, limit_train_batches=4 if FAST else None)
    history = trainer.fit(
        module,
        ArrayLoader(train, batch_size=32, shuffle=True, seed=0),
        val_data=ArrayLoader(val, batch_size=256),
    )
    return history.history["val_accuracy"][-1]


def snapshot(tree):
    return [np.array(a, copy=True) for a in jax.tree.leaves(tree)]


def main() -> bool:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    low, high = y < 5, y >= 5

    backbone = Backbone(rngs=nnx.Rngs(0))
    pretrained = Classifier(backbone, 5, rngs=nnx.Rngs(1))
    acc_pre = fit(pretrained, split(x[low], y[low]), 2 if FAST else 15)
    print(f"pretrained on digits 0-4: val_accuracy={acc_pre:.4f}")

    finetuned = FrozenBackbone(backbone, 5, rngs=nnx.Rngs(2))  # the same backbone object
    backbone_before = snapshot(nnx.state(backbone, nnx.Param))
    head_before = snapshot(nnx.state(finetuned.head, nnx.Param))
    acc_ft = fit(finetuned, split(x[high], y[high] - 5), 2 if FAST else 40)

    frozen = all(
        np.array_equal(a, b)
        for a, b in zip(backbone_before, snapshot(nnx.state(backbone, nnx.Param)), strict=True)
    )
    head_moved = not all(
        np.array_equal(a, b)
        for a, b in zip(head_before, snapshot(nnx.state(finetuned.head, nnx.Param)), strict=True)
    )
    assert frozen and head_moved, (frozen, head_moved)
    print(
        f"result: val_accuracy={acc_ft:.4f} on digits 5-9 with the head alone; "
        f"backbone bitwise unchanged: {frozen}"
    )
    return frozen


if __name__ == "__main__":
    main()
