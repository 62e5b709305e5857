"""Whole-dataset metrics (``nnxfit.metrics``) in validate, fit and test, against scikit-learn."""

import csv
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from models import Classifier, toy_data
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

import nnxfit
from nnxfit import metrics
from nnxfit.callbacks import EarlyStopping, ModelCheckpoint
from nnxfit.data import ArrayLoader

X, Y = toy_data(101)  # 101 = 6 batches of 16 + a last batch of 5


class Scored(Classifier):
    def validation_step(self, batch):
        x, y = batch
        logits = self.net(x)
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            "f1": metrics.F1Score(logits, y, num_classes=3),
            "f1_weighted": metrics.F1Score(logits, y, num_classes=3, average="weighted"),
            "f1_per_class": metrics.F1Score(logits, y, num_classes=3, average=None),
            "precision": metrics.Precision(logits, y, num_classes=3),
            "recall": metrics.Recall(logits, y, num_classes=3),
            "micro_f1": metrics.F1Score(logits, y, num_classes=3, average="micro"),
            "binary_f1": metrics.F1Score(logits.argmax(-1) == 1, y == 1),
            "confusion": metrics.ConfusionMatrix(logits, y, num_classes=3),
        }

    def test_step(self, batch):
        return self.validation_step(batch)


def _trainer(**kw):
    return nnxfit.Trainer(max_epochs=1, progress_bar=False, **kw)


def test_whole_set_scores_equal_sklearn_with_an_uneven_last_batch():
    module = Scored(seed=3)
    trainer = _trainer()
    logs = trainer.validate(module, ArrayLoader((X, Y), batch_size=16))
    arrays = trainer.array_metrics
    pred = trainer.predict(module, ArrayLoader((X, Y), batch_size=16)).argmax(-1)
    assert len(set(pred.tolist())) > 1  # a model that predicts more than one class
    sk = {
        "val_f1": f1_score(Y, pred, average="macro"),
        "val_f1_weighted": f1_score(Y, pred, average="weighted"),
        "val_precision": precision_score(Y, pred, average="macro", zero_division=0),
        "val_recall": recall_score(Y, pred, average="macro", zero_division=0),
        "val_micro_f1": f1_score(Y, pred, average="micro"),
        "val_binary_f1": f1_score(Y == 1, pred == 1),
    }
    for k, v in sk.items():
        assert logs[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    np.testing.assert_allclose(arrays["val_f1_per_class"], f1_score(Y, pred, average=None), 1e-6)
    np.testing.assert_array_equal(arrays["val_confusion"], confusion_matrix(Y, pred))
    assert set(logs) == {"val_loss", *sk}  # arrays stay out of the logs
    # Counts add up exactly: one batch of 101 gives the same floats as 7 uneven batches.
    assert trainer.validate(module, ArrayLoader((X, Y), batch_size=101)) == logs


def test_macro_average_skips_classes_that_never_occur():
    class Absent(Classifier):  # 5 classes declared, labels and predictions use 3
        def validation_step(self, batch):
            x, y = batch
            return {"f1": metrics.F1Score(self.net(x).argmax(-1), y, num_classes=5)}

    module = Absent(seed=3)
    logs = _trainer().validate(module, ArrayLoader((X, Y), batch_size=32))
    pred = _trainer().predict(module, ArrayLoader((X, Y), batch_size=32)).argmax(-1)
    assert logs["val_f1"] == pytest.approx(f1_score(Y, pred, average="macro"), rel=1e-6)


def test_auroc_is_the_exact_auroc_of_the_binned_scores():
    rng = np.random.default_rng(0)
    n, t = 203, 50
    scores = rng.uniform(size=(n, 3)).astype(np.float32)
    scores /= scores.sum(-1, keepdims=True)
    y = rng.integers(0, 3, n).astype(np.int32)
    binary = (rng.uniform(size=n) < 0.3 + 0.4 * scores[:, 1]).astype(np.int32)

    class Scores(Classifier):
        def validation_step(self, batch):
            _, s, y, b = batch
            return {
                "auc": metrics.AUROC(s[:, 1], b, num_thresholds=t),
                "auc_ovr": metrics.AUROC(s, y, num_classes=3, num_thresholds=t),
            }

    data = ArrayLoader((X[:1].repeat(n, 0), scores, y, binary), batch_size=64)
    logs = _trainer().validate(Scores(), data)
    binned = np.floor(scores * t)  # what the histogram keeps of each score
    assert logs["val_auc"] == pytest.approx(roc_auc_score(binary, binned[:, 1]), rel=1e-6)
    ovr = np.mean([roc_auc_score(y == c, binned[:, c]) for c in range(3)])
    assert logs["val_auc_ovr"] == pytest.approx(ovr, rel=1e-6)
    # ... and close to the unbinned AUROC.
    assert abs(logs["val_auc"] - roc_auc_score(binary, scores[:, 1])) < 1 / t


def test_generic_sums_mean_and_flax_metrics():
    class Custom(Classifier):
        def validation_step(self, batch):
            x, y = batch
            logits = self.net(x)
            right = logits.argmax(-1) == y
            acc = nnx.metrics.Accuracy()
            acc.update(logits=logits, labels=y)
            both = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), margin=nnx.metrics.Average())
            both.update(logits=logits, labels=y, values=logits.max(-1))
            return {
                "counts": metrics.Sums(
                    lambda r, n, hist: {"acc": r / n, "hits": r, "hist": hist},
                    right.sum(),  # the batch's part, reduced: a count
                    n=y.size,
                    hist=jax.nn.one_hot(y, 3).sum(0),
                ),
                "weighted": metrics.Mean(logits[:, 0], weights=y == 0),
                "flax_acc": acc,
                "both": both,
            }

    trainer = _trainer()
    module = Custom(seed=3)
    logs = trainer.validate(module, ArrayLoader((X, Y), batch_size=16))
    logits = trainer.predict(module, ArrayLoader((X, Y), batch_size=16))
    acc = float(np.mean(logits.argmax(-1) == Y))
    assert logs["val_counts_acc"] == pytest.approx(acc) and logs["val_counts_hits"] == acc * 101
    assert logs["val_flax_acc"] == pytest.approx(acc) == logs["val_both_accuracy"]
    assert logs["val_both_margin"] == pytest.approx(logits.max(-1).mean(), rel=1e-5)
    assert logs["val_weighted"] == pytest.approx(logits[Y == 0, 0].mean(), rel=1e-5)
    np.testing.assert_array_equal(trainer.array_metrics["val_counts_hist"], np.bincount(Y))


def test_a_bare_multimetric_is_its_members():
    class Multi(Classifier):
        def validation_step(self, batch):
            x, y = batch
            m = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average())
            m.update(logits=self.net(x), labels=y, values=jax.numpy.ones(y.shape))
            return m

    logs = _trainer().validate(Multi(), ArrayLoader((X, Y), batch_size=16))
    assert set(logs) == {"val_accuracy", "val_loss"} and logs["val_loss"] == 1.0


def test_monitors_and_history_see_whole_set_metrics(tmp_path):
    trainer = nnxfit.Trainer(
        max_epochs=3,
        progress_bar=False,
        callbacks=[
            ModelCheckpoint(monitor="val_f1", mode="max"),
            EarlyStopping(monitor="val_f1", mode="max", patience=5),
        ],
        workdir=str(tmp_path),
    )
    module = Scored(seed=1)
    history = trainer.fit(
        module, ArrayLoader((X, Y), batch_size=16), val_data=ArrayLoader((X, Y), batch_size=16)
    )
    assert len(history.history["val_f1"]) == 3
    assert "val_confusion" not in history.history
    assert (
        history.history["val_f1"][-1] == trainer.validate(module, ArrayLoader((X, Y), 16))["val_f1"]
    )
    # A typo is caught at fit start, before any step, naming the metric it meant.
    bad = nnxfit.Trainer(
        max_epochs=1,
        progress_bar=False,
        workdir=str(tmp_path / "bad"),
        callbacks=[ModelCheckpoint(monitor="val_f2", mode="max")],
    )
    with pytest.raises(nnxfit.ConfigError, match="val_f1"):
        bad.fit(Scored(), ArrayLoader((X, Y), 16), val_data=ArrayLoader((X, Y), 16))
    assert bad.global_step == 0
    # The best checkpoint by val_f1 is the epoch with the highest val_f1.
    info = nnxfit.load_checkpoint(Scored(), tmp_path, "best")
    assert info.metrics["val_f1"] == max(history.history["val_f1"])


def test_the_eval_program_traces_once_per_batch_shape():
    traced = []

    class Counted(Scored):
        def validation_step(self, batch):  # runs only when jax traces it
            traced.append(batch[0].shape[0])
            return super().validation_step(batch)

    trainer = _trainer()
    module = Counted(seed=1)
    data = ArrayLoader((X, Y), batch_size=16)
    first = trainer.validate(module, data)
    programs = trainer.eval_programs(module)
    assert programs.eval_trace_count == 2  # batches of 16 and the last of 5
    assert traced == [16, 16, 5]  # the names and sums (once), then the two programs
    assert trainer.validate(module, data) == first
    assert traced == [16, 16, 5] and programs.eval_trace_count == 2
    trainer.test(module, data)
    trainer.test(module, data)
    assert programs.eval_trace_count == 4 and len(programs._eval_specs) == 2
    # In a fit, every epoch's validation reuses the fit's eval program.
    fit = nnxfit.Trainer(max_epochs=3, progress_bar=False)
    fit.fit(Scored(), data, val_data=data)
    assert fit.programs.eval_trace_count == 2


class Recorder(nnxfit.Callback):
    def __init__(self):
        self.calls = []

    def on_test_start(self, trainer, module):
        self.calls.append(("start",))

    def on_test_end(self, trainer, module, logs):
        self.calls.append(("end", sorted(logs)))


def test_test_logs_test_metrics_before_and_after_fit(tmp_path):
    data = ArrayLoader((X, Y), batch_size=16)
    rec = Recorder()
    trainer = nnxfit.Trainer(
        max_epochs=2, progress_bar=False, workdir=str(tmp_path), callbacks=[rec]
    )
    module = Scored(seed=2)
    before = trainer.test(module, data)  # never fitted
    assert set(before) == {k.replace("val_", "test_") for k in trainer.validate(module, data)}
    assert set(trainer.array_metrics) == {
        "test_confusion",
        "test_f1_per_class",
        "val_confusion",
        "val_f1_per_class",
    }  # the latest validation's and the latest test's
    trainer.fit(module, data, val_data=data)
    after = trainer.test(module, data)
    assert after["test_f1"] == trainer.validate(module, data)["val_f1"]
    assert rec.calls == [("start",), ("end", sorted(before))] * 2
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tests = [r for r in rows if r["kind"] == "test"]
    assert len(tests) == 1 and tests[0]["step"] == str(trainer.global_step)  # after the fit's
    assert float(tests[0]["test_f1"]) == after["test_f1"]
    assert [r["kind"] for r in rows].count("epoch") == 2


def test_test_without_test_step_says_what_to_define():
    with pytest.raises(NotImplementedError, match=r"test_step.*validation_step"):
        _trainer().test(Classifier(), ArrayLoader((X, Y), batch_size=16))


def test_step_output_errors_name_the_metric():
    class Growing(Classifier):
        def validation_step(self, batch):  # forgot to reduce: the sums grow with the batch
            x, y = batch
            return {"bad": metrics.Sums(lambda v: v.sum(), self.net(x).argmax(-1) == y)}

    with pytest.raises(nnxfit.StepOutputError, match=r"'bad'.*must not depend on the batch"):
        _trainer().validate(Growing(), ArrayLoader((X, Y), batch_size=16))

    class Welford(Classifier):
        def validation_step(self, batch):
            m = nnx.metrics.Welford()
            m.update(values=self.net(batch[0]).max(-1))
            return {"w": m}

    with pytest.raises(nnxfit.StepOutputError, match=r"Welford.*Sums"):
        _trainer().validate(Welford(), ArrayLoader((X, Y), batch_size=16))

    class Vector(Classifier):
        def validation_step(self, batch):
            return {"v": self.net(batch[0]).max(-1)}

    with pytest.raises(nnxfit.StepOutputError, match=r"'v' has shape \(16,\).*nnxfit.metrics"):
        _trainer().validate(Vector(), ArrayLoader((X, Y), batch_size=16))


def test_labels_outside_the_classes_are_left_out_with_a_warning():
    class Shifted(Classifier):
        def validation_step(self, batch):
            x, y = batch
            return {"f1": metrics.F1Score(self.net(x), y + 1, num_classes=3)}  # label 3: bad

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _trainer().validate(Shifted(), ArrayLoader((X, Y), batch_size=16))
    msgs = [str(x.message) for x in w if "left out" in str(x.message)]
    assert len(msgs) == 1 and f"{int((Y == 2).sum())} example(s)" in msgs[0]
    assert w[0].filename == __file__  # points at the caller's line


MESH_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "metrics_mesh.py")


def test_whole_set_metrics_on_a_4_device_mesh_equal_one_device():
    proc = subprocess.run(
        [sys.executable, MESH_SCRIPT], capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULTS ") :])
    # Batches of 30, 30, 30, 11 split 28 + 2 (8 + 3) over 4 devices: the counts add up exactly.
    assert r["v4"]["val_f1"] == r["v1"]["val_f1"] == r["test_f1"]
    assert r["v4"]["val_auc"] == r["v1"]["val_auc"]
    assert r["v4"]["val_f1"] == pytest.approx(r["sklearn_f1"], rel=1e-6)
    assert r["v4"]["val_loss"] == pytest.approx(r["v1"]["val_loss"], rel=2e-5)
    assert r["confusion_equal"] and r["repeat_equal"]
    assert r["traces_first"] == 4 and r["traces_repeat"] == 0  # 28, 2, 8, 3 examples
    assert len(r["fit_val_f1"]) == 2 and r["fit_eval_traces"] == 4
