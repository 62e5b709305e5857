"""Whole-set metrics on a 4-device CPU mesh against one device; prints one JSON line.

Run by tests/test_metrics.py (the device count is fixed when jax starts).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/models.py

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from models import Classifier, toy_data  # noqa: E402
from sklearn.metrics import confusion_matrix, f1_score  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit import metrics  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402


class Scored(Classifier):
    def validation_step(self, batch):
        x, y = batch
        logits = self.net(x)
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            "f1": metrics.F1Score(logits, y, num_classes=3),
            "auc": metrics.AUROC(jax.nn.softmax(logits), y, num_classes=3),
            "confusion": metrics.ConfusionMatrix(logits, y, num_classes=3),
        }

    def test_step(self, batch):
        return self.validation_step(batch)


def main() -> dict:
    x, y = toy_data(101)
    val = ArrayLoader((x, y), batch_size=30)  # 30, 30, 30, 11: 28 sharded + 2 (or 3) replicated
    mesh = jax.make_mesh((4,), ("data",))
    module = Scored(seed=3)
    one, four = nnxfit.Trainer(max_epochs=1), nnxfit.Trainer(max_epochs=1, mesh=mesh)
    v1 = one.validate(module, val)
    v4 = four.validate(module, val)
    programs = four.eval_programs(module)
    traces = programs.eval_trace_count
    v4_again = four.validate(module, val)
    assert four.eval_programs(module) is programs  # one set of programs per module structure
    repeat_traces = programs.eval_trace_count - traces
    t4 = four.test(module, val)
    pred = one.predict(module, val).argmax(-1)
    # A fit on the mesh validates with the same program every epoch.
    fit = nnxfit.Trainer(max_epochs=2, mesh=mesh, progress_bar=False)
    history = fit.fit(
        Scored(seed=3), ArrayLoader((x, y), batch_size=20, drop_last=True), val_data=val
    )
    return {
        "v1": v1,
        "v4": v4,
        "sklearn_f1": float(f1_score(y, pred, average="macro")),
        "confusion_equal": bool(
            np.array_equal(one.array_metrics["val_confusion"], four.array_metrics["val_confusion"])
            and np.array_equal(four.array_metrics["val_confusion"], confusion_matrix(y, pred))
        ),
        "traces_first": traces,
        "traces_repeat": repeat_traces,
        "repeat_equal": v4 == v4_again,
        "test_f1": t4["test_f1"],
        "fit_val_f1": history.history["val_f1"],
        "fit_eval_traces": fit.programs.eval_trace_count,
    }


if __name__ == "__main__":
    print("RESULTS " + json.dumps(main()))
