"""The first hour of a Keras or Lightning user: their habits work, or fail at once saying what
to write instead. Arrays to fit/validate/predict, dict losses, a single callback, monitors
of callback metrics in any order, dict batches in predict, the validation sanity check,
warnings at the user's line, a second fit on one Trainer, and models ported from the Flax
guide (train flags, callbacks that call the module)."""

from __future__ import annotations

import io
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from models import Classifier, toy_data
from rich.console import Console

import nnxfit
from nnxfit.callbacks import EarlyStopping, ModelCheckpoint
from nnxfit.callbacks.grad_norm import GradNormMonitor, GradNormWarning
from nnxfit.data import ArrayLoader

X, Y = toy_data(100)


def arrays(m):
    return [np.asarray(_data(x)) for x in jax.tree.leaves(nnx.state(m))]


def _data(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def console():
    out = io.StringIO()
    return out, Console(file=out, force_terminal=True, width=100)


def trainer(**kw):
    kw.setdefault("progress_bar", False)
    kw.setdefault("max_epochs", 2)
    return nnxfit.Trainer(**kw)


class Recorder(nnxfit.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, step, logs):
        self.steps.append(step)


# ------------------------------------------------------------------ arrays, Keras style ---
class AutoEncoder(nnxfit.TrainModule):
    def __init__(self):
        self.l = nnx.Linear(8, 8, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.l(x)

    def training_step(self, x):  # a bare array batch
        return ((self(x) - x) ** 2).mean()

    def configure_optimizers(self):
        return optax.adam(1e-2)


def test_fit_takes_a_tuple_of_arrays_as_a_shuffled_keras_dataset():
    t = trainer(seed=3)
    m = Classifier()
    history = t.fit(m, (X, Y))
    assert t.global_step == 2 * 4  # 100 rows in batches of 32 (Keras's default)
    # The same as an ArrayLoader shuffled from the Trainer's seed, bit for bit.
    ref = Classifier()
    ref_history = trainer(seed=3).fit(ref, ArrayLoader((X, Y), 32, shuffle=True, seed=3))
    assert history.history == ref_history.history
    assert same(arrays(m), arrays(ref))


def test_fit_takes_a_bare_array_and_a_dict_of_arrays_and_batch_size():
    t = trainer(max_epochs=1)
    ae = AutoEncoder()
    t.fit(ae, X, batch_size=25)
    assert t.global_step == 4
    assert t.predict(ae, X).shape == (100, 8)

    class DictModule(Classifier):
        def training_step(self, batch):
            return super().training_step((batch["image"], batch["label"]))

    t.fit(DictModule(), {"image": X, "label": Y}, shuffle=False)
    assert t.global_step == 4


def test_validation_split_holds_out_the_last_part_before_shuffling():
    t = trainer(max_epochs=1)
    m = Classifier()
    history = t.fit(m, (X, Y), validation_split=0.2)
    assert t.global_step == 3  # 80 rows
    held_out = t.validate(m, (X[80:], Y[80:]))
    assert history.history["val_loss"] == [held_out["val_loss"]]
    # val_data as arrays too; validate and predict take arrays (Keras evaluate / predict).
    t.fit(m, (X[:80], Y[:80]), val_data=(X[80:], Y[80:]))
    assert set(t.validate(m, (X, Y), batch_size=7)) == {"val_loss", "val_accuracy"}
    assert t.predict(m, (X,)).shape == (100, 3)


def test_arrays_resume_exactly(tmp_path):
    def run(max_epochs, workdir=None, resume=False):
        cbs = [ModelCheckpoint()] if workdir else []
        t = trainer(max_epochs=max_epochs, seed=4, workdir=workdir, callbacks=cbs)
        m = Classifier()
        t.fit(m, (X, Y), batch_size=16, resume=resume)
        return m

    ref = run(2)
    run(1, tmp_path)  # the resumed epoch must draw epoch 1's order from the Trainer's seed
    assert same(arrays(run(2, tmp_path, resume=True)), arrays(ref))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda t, m: t.fit(m, X, Y), nnxfit.ConfigError, r"third argument of fit is val_data"),
        (
            lambda t, m: t.fit(m, ((X[:8], Y[:8]), (X[8:16], Y[8:16]))),
            nnxfit.ConfigError,
            r"tuple of 2 batches.*list of batches.*ArrayLoader",
        ),
        (lambda t, m: t.fit(m, [X, Y]), nnxfit.ConfigError, r"pass a tuple.*ArrayLoader"),
        (lambda t, m: t.fit(m, (X, Y[:99])), nnxfit.BatchError, r"100 rows.*99 rows"),
        (lambda t, m: t.fit(m, (X, list(Y))), nnxfit.ConfigError, r"data\[1\] is a list"),
        (
            lambda t, m: t.fit(m, ArrayLoader((X, Y), 10), batch_size=10),
            nnxfit.ConfigError,
            r"batch_size=\.\.\.\) applies to arrays",
        ),
        (
            lambda t, m: t.fit(m, (X, Y), val_data=(X, Y), validation_split=0.1),
            nnxfit.ConfigError,
            "both val_data and validation_split",
        ),
        (lambda t, m: t.fit(m, (X, Y), validation_split=1.5), nnxfit.ConfigError, "fraction"),
        (lambda t, m: t.predict(m, [(X,)], batch_size=8), nnxfit.ConfigError, "applies to arr"),
    ],
)
def test_ambiguous_or_wrong_arrays_fail_before_any_step(call, error, match):
    t, m = trainer(), Classifier()
    with pytest.raises(error, match=match):
        call(t, m)
    assert t.global_step == 0


def test_a_list_of_batches_still_means_batches():
    batches = [(X[i : i + 20], Y[i : i + 20]) for i in range(0, 100, 20)]
    t = trainer(max_epochs=1)
    t.fit(Classifier(), batches)
    assert t.global_step == 5
    t.fit(AutoEncoder(), [X[:50], X[50:]])  # bare-array batches of one shape
    assert t.global_step == 2


# ------------------------------------------------------------------ what training_step returns ---
class Returns(Classifier):
    def __init__(self, form):
        super().__init__()
        self.form = form

    def training_step(self, batch):
        loss, metrics = super().training_step(batch)
        if self.form == "lightning":
            return {"loss": loss, "acc": metrics["accuracy"]}
        if self.form == "none":
            return None
        if self.form == "no_loss":
            return {"total": loss, "acc": metrics["accuracy"]}
        if self.form == "triple":
            return loss, metrics, 1
        return "loss"


def test_training_step_may_return_lightnings_dict():
    history = trainer(max_epochs=1).fit(Returns("lightning"), (X, Y))
    assert sorted(history.history) == ["acc", "loss"]
    ref = trainer(max_epochs=1).fit(Classifier(), (X, Y))
    assert history.history["loss"] == ref.history["loss"]
    assert history.history["acc"] == ref.history["accuracy"]


@pytest.mark.parametrize(
    "form, match",
    [
        ("none", r"training_step returned None.*`return` missing"),
        ("no_loss", r"keys \['acc', 'total'\] but no 'loss'"),
        ("triple", r"training_step returned a tuple of length 3"),
        ("str", r"training_step returned a loss of type str"),
    ],
)
def test_other_returns_name_training_step_and_the_forms(form, match):
    with pytest.raises(nnxfit.StepOutputError, match=match) as err:
        trainer(max_epochs=1).fit(Returns(form), (X, Y))
    assert "{'loss': loss" in str(err.value) or form == "none" or form == "str"


# ------------------------------------------------------------------------- callbacks ---
def test_a_single_callback_is_a_list_of_one():
    stopper = EarlyStopping(monitor="loss", patience=0)
    t = trainer(callbacks=stopper)
    assert t.callbacks == [stopper]

    class Declares(Classifier):
        def configure_callbacks(self):
            return Recorder()

    t.fit(Declares(), (X, Y))
    assert any(isinstance(c, Recorder) for c in t.cb)


@pytest.mark.parametrize(
    "value, match",
    [
        (print, r"takes a Callback or a list of Callbacks; got <built-in function print>"),
        ([Recorder(), "csv"], r"item 1 got 'csv' of type str"),
        ([EarlyStopping], r"item 0 is the class EarlyStopping.*EarlyStopping\(\.\.\.\)"),
    ],
)
def test_anything_else_is_refused_when_the_trainer_is_made(value, match):
    with pytest.raises(nnxfit.ConfigError, match=match):
        nnxfit.Trainer(max_epochs=1, callbacks=value)


# ------------------------------------------------------ monitors of callback metrics ---
class LossEMA(nnxfit.Callback):
    def __init__(self, declare=True):
        self.declare, self.ema, self.seen = declare, None, []

    def logged_metrics(self, trainer):
        return ["loss_ema"] if self.declare else []

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        self.ema = logs["loss"] if self.ema is None else 0.5 * (self.ema + logs["loss"])
        logs["loss_ema"] = self.ema


class Later(LossEMA):
    order = 60  # after ModelCheckpoint (50)


def test_monitors_find_a_declared_callback_metric_whatever_the_order(tmp_path):
    stopper = EarlyStopping(monitor="loss_ema", patience=5, verbose=False)
    ckpt = ModelCheckpoint(monitor="loss_ema")
    ema = LossEMA()
    t = trainer(max_epochs=3, workdir=tmp_path, callbacks=[stopper, ckpt, ema])
    history = t.fit(Classifier(), (X, Y))
    assert history.history["loss_ema"] == [pytest.approx(v) for v in history.history["loss_ema"]]
    assert stopper.best == min(history.history["loss_ema"])
    assert ckpt.best_model_score == min(history.history["loss_ema"])

    class Declares(Classifier):  # the logging callback comes from the module, after both
        def configure_callbacks(self):
            return [LossEMA()]

    stopper = EarlyStopping(monitor="loss_ema", patience=5, verbose=False)
    trainer(callbacks=[stopper]).fit(Declares(), (X, Y))
    assert stopper.best_epoch is not None


def test_an_undeclared_or_late_callback_metric_fails_before_training(tmp_path):
    t = trainer(callbacks=[EarlyStopping(monitor="loss_ema"), LossEMA(declare=False)])
    with pytest.raises(nnxfit.ConfigError, match=r"logged_metrics.*return \['loss_ema'\]"):
        t.fit(Classifier(), (X, Y))
    assert t.global_step == 0
    t = trainer(workdir=tmp_path, callbacks=[ModelCheckpoint(monitor="loss_ema"), Later()])
    with pytest.raises(nnxfit.ConfigError, match=r"Later runs after it \(order 60 > 50\)"):
        t.fit(Classifier(), (X, Y))
    assert t.global_step == 0


# -------------------------------------------------------------- predict on dict batches ---
def test_default_predict_step_takes_the_inputs_of_a_dict_batch():
    t, m = trainer(), Classifier()
    ref = t.predict(m, X)
    assert np.array_equal(t.predict(m, {"x": X, "label": Y}), ref)
    assert np.array_equal(t.predict(m, [{"image": X[:50]}, {"image": X[50:]}]), ref)
    with pytest.raises(NotImplementedError, match=r"keys \['pixels'\].*Define predict_step"):
        t.predict(m, {"pixels": X})


# ------------------------------------------------------------------ sanity check ---
class BadValidation(Classifier):
    def validation_step(self, batch):
        x, _ = batch
        return {"loss": self.net(x)}  # not a scalar


def test_a_broken_validation_step_fails_before_training():
    rec = Recorder()
    t = trainer(callbacks=[rec])
    with pytest.raises(nnxfit.StepOutputError, match="shape") as err:
        t.fit(BadValidation(), (X, Y), val_data=(X, Y))
    assert rec.steps == [] and t.programs.trace_count == 0
    assert any("num_sanity_val_steps=0" in n for n in err.value.__notes__)
    # Turned off, the same error comes after a whole epoch of training.
    rec = Recorder()
    t = trainer(callbacks=[rec], num_sanity_val_steps=0)
    with pytest.raises(nnxfit.StepOutputError, match="shape"):
        t.fit(BadValidation(), (X, Y), val_data=(X, Y))
    assert rec.steps == [1, 2, 3, 4]


def test_empty_validation_data_fails_before_training():
    rec = Recorder()
    with pytest.raises(nnxfit.EmptyDataError, match="val_data"):
        trainer(callbacks=[rec]).fit(Classifier(), (X, Y), val_data=[])
    assert rec.steps == []


def test_the_sanity_check_changes_nothing_and_its_compile_is_reused(tmp_path):
    def run(n, workdir):
        t = trainer(workdir=workdir, num_sanity_val_steps=n, log_every_n_steps=2)
        m = Classifier(dropout=0.3, batchnorm=True)
        history = t.fit(m, (X, Y), val_data=(X[:40], Y[:40]), batch_size=16)
        csv = (workdir / "metrics.csv").read_text()
        return t, m, history, csv

    t1, m1, h1, csv1 = run(2, tmp_path / "on")
    t0, m0, h0, csv0 = run(0, tmp_path / "off")
    assert h1.history == h0.history and csv1 == csv0
    assert same(arrays(m1), arrays(m0))
    # Validation batches of 16 and a short one of 8: two programs either way.
    assert t1.programs.eval_batch._cache_size() == t0.programs.eval_batch._cache_size() == 2
    with pytest.raises(nnxfit.ConfigError, match="num_sanity_val_steps"):
        nnxfit.Trainer(max_epochs=1, num_sanity_val_steps=-2)


# ------------------------------------------------------- warnings at the user's line ---
def test_warnings_point_at_the_users_fit_call():
    t = trainer(
        max_epochs=1, callbacks=[GradNormMonitor(min_norm=None, max_norm=1e-9)], log_every_n_steps=1
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(Classifier(), (X, Y))  # the line the warning names
    grad = [w for w in record if issubclass(w.category, GradNormWarning)]
    assert grad and grad[0].filename == __file__, [(w.filename, w.lineno) for w in record]


# ------------------------------------------------------------------ fit twice ---
def test_a_second_fit_says_it_starts_a_fresh_optimizer_from_the_weights():
    out, con = console()
    t = trainer(console=con)
    m = Classifier()
    t.fit(m, (X, Y))
    after_first = Classifier()
    nnx.update(after_first, nnx.state(m))
    assert "fitted this" not in out.getvalue()
    t.fit(m, (X, Y))
    said = out.getvalue()
    assert "this Trainer fitted this Classifier before" in said
    assert "fresh optimizer state" in said and "resume=True" in said
    # What it says is what it does: the same as a new Trainer on the first fit's weights.
    trainer().fit(after_first, (X, Y))
    assert same(arrays(m), arrays(after_first))


# --------------------------------------------------- models ported from the Flax guide ---
class GuideNet(nnx.Module):
    """The Flax guide's way: a train flag passed down to BatchNorm and Dropout."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x, train: bool = False):
        h = self.bn(self.l1(x), use_running_average=not train)
        return self.l2(self.drop(nnx.relu(h), deterministic=not train))


class Ported(Classifier):
    def __init__(self, pass_train):
        super().__init__()
        self.net = GuideNet(nnx.Rngs(0))
        self.pass_train = pass_train

    def training_step(self, batch):
        x, y = batch
        logits = self.net(x, train=True) if self.pass_train else self.net(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_training_in_eval_mode_by_a_forgotten_train_flag_is_reported():
    with pytest.warns(nnxfit.TrainModeWarning, match="train=True") as record:
        trainer(max_epochs=1).fit(Ported(pass_train=False), (X, Y))
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnxfit.TrainModeWarning)
        trainer(max_epochs=1).fit(Ported(pass_train=True), (X, Y))
        trainer(max_epochs=1).fit(Classifier(), (X, Y))  # no BatchNorm: nothing to check


class Peek(nnxfit.Callback):
    """Looks at predictions at each epoch end, as a sample-drawing callback would."""

    def __init__(self, how):
        self.how, self.seen = how, []

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        if self.how == "eval_mode":
            with trainer.eval_mode(module):
                self.seen.append(np.asarray(module(X[:5])))
        elif self.how == "predict":
            self.seen.append(trainer.predict(module, X[:5]))
        else:
            self.seen.append(np.asarray(module(X[:5])))  # train mode: changes the run


def test_callbacks_can_run_the_module_in_eval_mode_without_touching_the_run():
    def run(callbacks):
        m = Classifier(dropout=0.5, batchnorm=True)
        trainer(max_epochs=2, callbacks=callbacks).fit(m, (X, Y))
        return m

    ref = run([])
    in_eval, predicted = Peek("eval_mode"), Peek("predict")
    assert same(arrays(run([in_eval])), arrays(ref))
    assert same(arrays(run([predicted])), arrays(ref))
    np.testing.assert_allclose(in_eval.seen[1], predicted.seen[1], rtol=1e-5, atol=1e-6)
    assert not same(arrays(run([Peek("call")])), arrays(ref))  # the trap eval_mode avoids


def test_eval_mode_restores_variables_and_flags_outside_a_fit():
    m = Classifier(dropout=0.5, batchnorm=True)
    m.train()
    m.net.bn.use_running_average = True  # frozen on purpose: must stay so
    before = arrays(m)
    with nnxfit.eval_mode(m):
        assert m.net.drop.deterministic
        m(X)
        m.net.bn.mean[...] = m.net.bn.mean[...] + 1.0
    assert same(arrays(m), before)
    assert m.net.drop.deterministic is False and m.net.bn.use_running_average is True
