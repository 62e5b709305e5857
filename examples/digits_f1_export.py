"""Whole-set F1 on the digits, a held-out test, and the best weights shipped to inference.

1. An MLP with BatchNorm and Dropout learns scikit-learn's handwritten digits. Its
   ``validation_step`` returns batch means (loss, accuracy) and two whole-set metrics from
   ``nnxfit.metrics``: the macro F1 of the whole validation set (confusion counts summed on
   the device over every batch, turned into F1 at the end) and the confusion matrix.
   ``ModelCheckpoint`` keeps the best epoch by ``val_f1``; ``EarlyStopping`` watches it too.
2. ``trainer.test(module, test_loader)`` runs ``test_step`` over a held-out test split:
   ``test_f1`` (checked against scikit-learn's ``f1_score``) and the test confusion matrix in
   ``trainer.array_metrics``.
3. The best checkpoint is loaded back (``nnxfit.load_checkpoint``) and its network exported
   with ``nnxfit.export_weights(module.net, path)``: a plain orbax checkpoint. This same file,
   run with ``--infer`` in a fresh Python process, loads it with flax and orbax only (it
   checks that nnxfit was never imported) and writes its predictions, which must equal the
   trained module's.

    python examples/digits_f1_export.py                # about a minute on 2 CPU cores
    NNXFIT_FAST=1 python examples/digits_f1_export.py  # a few seconds, for the tests

Writes ``runs/digits_f1/`` (checkpoints, ``metrics.csv``, ``weights/``) under the current
folder.
"""

import os
import subprocess
import sys

import numpy as np
import optax
from flax import nnx

FAST = os.environ.get("NNXFIT_FAST") == "1"
WORKDIR = "runs/digits_f1"


class MLP(nnx.Module):
    """The network: plain flax, all an inference script needs."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.bn = nnx.BatchNorm(128, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def infer(weights: str, inputs: str, out: str) -> None:
    """The inference script: flax and orbax, no nnxfit."""
    import orbax.checkpoint as ocp

    abstract = nnx.eval_shape(lambda: MLP(rngs=nnx.Rngs(0)))  # shapes only, no allocation
    graphdef, state = nnx.split(abstract)
    state = ocp.StandardCheckpointer().restore(weights, state)
    model = nnx.merge(graphdef, state)
    model.eval()  # BatchNorm's running statistics, no dropout
    np.save(out, np.asarray(model(np.load(inputs))))
    assert not any(m.startswith("nnxfit") for m in sys.modules), "nnxfit was imported"


def main() -> None:
    import shutil

    from sklearn.datasets import load_digits
    from sklearn.metrics import f1_score

    import nnxfit
    from nnxfit import metrics
    from nnxfit.callbacks import EarlyStopping, ModelCheckpoint
    from nnxfit.data import ArrayLoader

    class DigitsClassifier(nnxfit.TrainModule):
        def __init__(self, *, rngs: nnx.Rngs):
            self.net = MLP(rngs=rngs)

        def __call__(self, x):  # what predict_step calls
            return self.net(x)

        def training_step(self, batch):
            x, y = batch
            logits = self.net(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def validation_step(self, batch):
            x, y = batch
            logits = self.net(x)
            return {
                "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
                "accuracy": (logits.argmax(-1) == y).mean(),  # a batch mean
                "f1": metrics.F1Score(logits, y, num_classes=10),  # of the whole set
                "confusion": metrics.ConfusionMatrix(logits, y, num_classes=10),  # an array
            }

        def test_step(self, batch):
            return self.validation_step(batch)

        def configure_optimizers(self):
            return optax.adamw(1e-3)

    shutil.rmtree(WORKDIR, ignore_errors=True)
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    tr, va, te = order[:1200], order[1200:1500], order[1500:]  # 1200 / 300 / 297
    train = ArrayLoader((x[tr], y[tr]), batch_size=64, shuffle=True, seed=0)
    val = ArrayLoader((x[va], y[va]), batch_size=128)  # 128 + 128 + 44: F1 counts add up
    test = ArrayLoader((x[te], y[te]), batch_size=128)

    module = DigitsClassifier(rngs=nnx.Rngs(0))
    trainer = nnxfit.Trainer(
        max_epochs=2 if FAST else 20,
        limit_train_batches=4 if FAST else None,
        workdir=WORKDIR,
        progress_bar=False,
        callbacks=[
            ModelCheckpoint(monitor="val_f1", mode="max"),
            EarlyStopping(monitor="val_f1", mode="max", patience=4),
        ],
    )
    history = trainer.fit(module, train, val_data=val)

    info = nnxfit.load_checkpoint(module, WORKDIR, "best")  # the best epoch by val_f1
    logs = trainer.test(module, test)
    pred = trainer.predict(module, test).argmax(-1)
    sk_f1 = f1_score(y[te], pred, average="macro")
    assert abs(logs["test_f1"] - sk_f1) < 1e-6, (logs["test_f1"], sk_f1)
    print("test confusion matrix (rows: true digit, columns: predicted):")
    print(trainer.array_metrics["test_confusion"])

    weights = nnxfit.export_weights(module.net, os.path.join(WORKDIR, "weights"))
    np.save(os.path.join(WORKDIR, "test_x.npy"), x[te])
    out = os.path.join(WORKDIR, "test_logits.npy")
    # A fresh process, as an inference service would be: it never imports nnxfit.
    subprocess.run(
        [sys.executable, __file__, "--infer", weights, os.path.join(WORKDIR, "test_x.npy"), out],
        check=True,
    )
    same = bool(np.array_equal(np.load(out), np.asarray(module.net(x[te]))))
    f1s = history.history["val_f1"]
    print(
        f"result: val_f1={info.metrics['val_f1']:.4f} (best of {len(f1s)} epochs, step "
        f"{info.step}); test_f1={logs['test_f1']:.4f} (scikit-learn {sk_f1:.4f}); "
        f"exported to {weights}; fresh-process predictions equal: {same}"
    )
    if not same:
        raise SystemExit("the exported weights gave different predictions")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--infer"]:
        infer(*sys.argv[2:5])
    else:
        main()
