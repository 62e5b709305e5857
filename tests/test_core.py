"""The core contract: hook order, compile counts, host syncs, exact equivalences, state flow."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models import Classifier, toy_data

import nnxfit
from nnxfit.data import ArrayLoader


def params_of(m):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]


class Recorder(nnxfit.Callback):
    def __init__(self):
        self.calls = []

    def on_fit_start(self, trainer, module):
        self.calls.append("fit_start")

    def on_fit_end(self, trainer, module):
        self.calls.append("fit_end")

    def on_train_epoch_start(self, trainer, module, epoch):
        self.calls.append(f"epoch_start:{epoch}")

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        self.calls.append(f"epoch_end:{epoch}:{'val_loss' in logs}")

    def on_train_batch_end(self, trainer, module, step, logs):
        self.calls.append(f"batch_end:{step}:{'loss' in logs}")

    def on_validation_start(self, trainer, module):
        self.calls.append("val_start")

    def on_validation_end(self, trainer, module, logs):
        self.calls.append(f"val_end:{sorted(logs)}")

    def on_exception(self, trainer, module, error):
        self.calls.append(f"exception:{type(error).__name__}")


def test_hook_order_golden():
    x, y = toy_data(48)
    rec = Recorder()
    trainer = nnxfit.Trainer(max_epochs=2, callbacks=[rec], progress_bar=False, log_every_n_steps=2)
    trainer.fit(Classifier(), ArrayLoader((x, y), 16), val_data=ArrayLoader((x, y), 32))
    val = "val_end:['val_accuracy', 'val_loss']"
    assert rec.calls == [
        "fit_start",
        "epoch_start:0",
        "batch_end:1:False",
        "batch_end:2:True",
        "batch_end:3:False",
        "val_start",
        val,
        "epoch_end:0:True",
        "epoch_start:1",
        "batch_end:4:True",
        "batch_end:5:False",
        "batch_end:6:True",
        "val_start",
        val,
        "epoch_end:1:True",
        "fit_end",
    ]


def test_exception_reaches_on_exception_and_fit_end():
    class Boom(nnxfit.Callback):
        def on_train_batch_end(self, trainer, module, step, logs):
            if step == 2:
                raise RuntimeError("boom at 2")

    rec = Recorder()
    x, y = toy_data(64)
    trainer = nnxfit.Trainer(max_epochs=1, callbacks=[rec, Boom()], progress_bar=False)
    m = Classifier()
    with pytest.raises(RuntimeError, match="boom at 2") as info:
        trainer.fit(m, ArrayLoader((x, y), 16))
    assert any("Boom.on_train_batch_end" in n for n in info.value.__notes__)
    assert rec.calls[-2:] == ["exception:RuntimeError", "fit_end"]
    # The module holds the state of step 2 and is usable.
    assert all(np.isfinite(p).all() for p in params_of(m))


def test_compiles_once_per_shape():
    x, y = toy_data(100)  # 6 full batches of 16 and a short one of 4
    trainer = nnxfit.Trainer(max_epochs=4, progress_bar=False, log_every_n_steps=3)
    trainer.fit(Classifier(), ArrayLoader((x, y), 16, shuffle=True))
    assert trainer.global_step == 28
    assert trainer.programs.trace_count == 2


class Slow(nnxfit.TrainModule):
    """A step heavy enough (~tens of ms) that a host running ahead is observable."""

    def __init__(self):
        self.w = nnx.Param(jax.random.normal(jax.random.key(0), (384, 384)) / 20.0)

    def training_step(self, batch):
        h = batch[0]
        for _ in range(12):
            h = jnp.tanh(h @ self.w[...])
        return (h**2).mean()

    def configure_optimizers(self):
        return optax.sgd(1e-3)


class ReadyProbe(nnxfit.Callback):
    def __init__(self, sync=False):
        self.sync, self.ready = sync, []

    def on_train_batch_end(self, trainer, module, step, logs):
        if self.sync:
            jax.block_until_ready(trainer.carry.leaves)
        # On CPU transfer guards do not see device-to-host copies, so observe the effect
        # of a sync instead: without one, the step just dispatched is still running.
        self.ready.append(trainer.carry.leaves[0].is_ready())


def test_no_host_sync_between_log_intervals():
    data = [
        (np.random.default_rng(i).normal(size=(256, 384)).astype(np.float32),) for i in range(8)
    ]
    probe, control = ReadyProbe(), ReadyProbe(sync=True)
    for cb in (probe, control):
        t = nnxfit.Trainer(max_epochs=2, progress_bar=False, log_every_n_steps=1000, callbacks=[cb])
        t.fit(Slow(), data)
    assert all(control.ready)
    # Most steps are still in flight when their hook runs (the last of an epoch is fetched).
    assert sum(not r for r in probe.ready) >= 10, probe.ready


def test_steps_per_execution_matches_single_steps():
    x, y = toy_data(100)

    def run(spe):
        m = Classifier(dropout=0.2, batchnorm=True)
        t = nnxfit.Trainer(max_epochs=3, progress_bar=False, steps_per_execution=spe)
        h = t.fit(m, ArrayLoader((x, y), 16, shuffle=True), val_data=ArrayLoader((x, y), 30))
        return m, h, t

    m1, h1, t1 = run(1)
    m4, h4, t4 = run(4)
    for a, b in zip(jax.tree.leaves(nnx.state(m1)), jax.tree.leaves(nnx.state(m4)), strict=False):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    for k in h1.history:
        np.testing.assert_allclose(h1.history[k], h4.history[k], rtol=1e-6)
    assert t4.global_step == t1.global_step == 21


def test_steps_per_execution_larger_than_epoch_and_max_steps():
    x, y = toy_data(100)
    t = nnxfit.Trainer(max_steps=10, progress_bar=False, steps_per_execution=32)
    seen = []
    t.callbacks.append(
        type(
            "S",
            (nnxfit.Callback,),
            {"on_train_batch_end": lambda self, tr, m, step, logs: seen.append(step)},
        )()
    )
    h = t.fit(Classifier(), ArrayLoader((x, y), 16))
    assert t.global_step == 10
    assert seen == [6, 7, 10]  # 6 full batches scanned, the short one alone, 3 more scanned
    assert h.epoch == [0, 1]


def test_grad_accumulation_equals_big_batch():
    x, y = toy_data(128)
    m_big, m_acc = Classifier(opt="sgd", lr=0.1), Classifier(opt="sgd", lr=0.1)
    nnxfit.Trainer(max_epochs=2, progress_bar=False).fit(m_big, ArrayLoader((x, y), 64))
    t = nnxfit.Trainer(max_epochs=2, progress_bar=False, grad_accum_steps=2)
    h = t.fit(m_acc, ArrayLoader((x, y), 32))
    assert t.global_step == 4
    for a, b in zip(params_of(m_big), params_of(m_acc), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(h.history["loss"]) == 2


def test_frozen_params_stay_bitwise_equal():
    class Frozen(Classifier):
        trainable = nnx.All(nnx.Param, nnx.PathContains("l2"))

    m = Frozen()
    before_l1 = np.array(m.net.l1.kernel[...])
    before_l2 = np.array(m.net.l2.kernel[...])
    x, y = toy_data(64)
    nnxfit.Trainer(max_epochs=2, progress_bar=False).fit(m, ArrayLoader((x, y), 16))
    assert np.array_equal(np.asarray(m.net.l1.kernel[...]), before_l1)
    assert not np.array_equal(np.asarray(m.net.l2.kernel[...]), before_l2)


def test_batchnorm_and_dropout_state_advance_and_predict_is_deterministic():
    m = Classifier(dropout=0.5, batchnorm=True)
    mean0 = np.array(m.net.bn.mean[...])
    count0 = int(m.net.drop.rngs.count[...])
    x, y = toy_data(64)
    nnxfit.Trainer(max_epochs=1, progress_bar=False).fit(m, ArrayLoader((x, y), 16))
    assert not np.array_equal(np.asarray(m.net.bn.mean[...]), mean0)
    assert int(m.net.drop.rngs.count[...]) == count0 + 4
    trainer = nnxfit.Trainer(max_epochs=1, progress_bar=False)
    p1 = trainer.predict(m, ArrayLoader((x,), 24))
    p2 = trainer.predict(m, ArrayLoader((x,), 24))
    assert p1.shape == (64, 3)
    np.testing.assert_array_equal(p1, p2)
    # eval mode after fit: dropout off, running stats used
    np.testing.assert_allclose(p1, np.asarray(m(jnp.asarray(x))), rtol=1e-5, atol=1e-6)


def test_history_and_validation_are_example_weighted():
    x, y = toy_data(70)
    m = Classifier()
    trainer = nnxfit.Trainer(max_epochs=2, progress_bar=False)
    h = trainer.fit(m, ArrayLoader((x, y), 16), val_data=ArrayLoader((x, y), 32))
    assert h.epoch == [0, 1]
    assert set(h.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    # val over 32+32+6 examples equals one big batch of 70
    full = trainer.validate(m, [(x, y)])
    split = trainer.validate(m, ArrayLoader((x, y), 32))
    assert split["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)
    assert h.history["val_loss"][-1] == pytest.approx(full["val_loss"], rel=1e-5)
    # validate/predict on a module that was never fitted
    fresh = Classifier(seed=3)
    assert set(trainer.validate(fresh, [(x, y)])) == {"val_loss", "val_accuracy"}


def test_callback_sees_and_changes_module_mid_fit():
    x, y = toy_data(64)

    class Zero(nnxfit.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, module, step, logs):
            self.seen.append(np.array(module.net.l1.bias[...]))
            if step == 2:
                module.net.l1.bias[...] = jnp.full_like(module.net.l1.bias[...], 7.0)

        def on_train_epoch_end(self, trainer, module, epoch, logs):
            self.end = np.array(module.net.l1.bias[...])

    cb = Zero()
    m = Classifier(opt="sgd", lr=0.0)  # lr 0: only the callback changes the bias
    nnxfit.Trainer(max_epochs=1, progress_bar=False, callbacks=[cb]).fit(m, ArrayLoader((x, y), 16))
    assert np.all(cb.seen[2] == 7.0) and np.all(cb.end == 7.0)
    assert np.all(np.asarray(m.net.l1.bias[...]) == 7.0)


def test_should_stop_and_max_steps():
    x, y = toy_data(64)

    class Stop(nnxfit.Callback):
        def on_train_batch_end(self, trainer, module, step, logs):
            if step == 5:
                trainer.should_stop = True

    t = nnxfit.Trainer(max_epochs=10, progress_bar=False, callbacks=[Stop()])
    h = t.fit(Classifier(), ArrayLoader((x, y), 16))
    assert t.global_step == 5 and h.epoch == [0, 1]
    t = nnxfit.Trainer(max_steps=6, max_epochs=10, progress_bar=False)
    t.fit(Classifier(), ArrayLoader((x, y), 16))
    assert t.global_step == 6 and t.current_epoch == 2


def test_bfloat16_keeps_f32_state_and_trains():
    x, y = toy_data(96)
    m = Classifier(batchnorm=True, lr=3e-2)
    h = nnxfit.Trainer(max_epochs=5, progress_bar=False, precision="bfloat16").fit(
        m, ArrayLoader((x, y), 32)
    )
    assert all(p.dtype == np.float32 for p in params_of(m))
    assert m.net.bn.mean[...].dtype == jnp.float32
    assert h.history["loss"][-1] < h.history["loss"][0]


def test_grad_clip_norm_limits_update():
    x, y = toy_data(32)
    m0, m1 = Classifier(opt="sgd", lr=1.0), Classifier(opt="sgd", lr=1.0)
    start = params_of(m0)
    nnxfit.Trainer(max_steps=1, progress_bar=False, grad_clip_norm=1e-3).fit(
        m1, ArrayLoader((x, y), 32)
    )
    delta = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(params_of(m1), start, strict=False)))
    assert delta == pytest.approx(1e-3, rel=1e-3)


def test_caller_arrays_survive_donation():
    m = Classifier()
    held = nnx.state(m, nnx.Param)
    x, y = toy_data(32)
    nnxfit.Trainer(max_epochs=1, progress_bar=False).fit(m, ArrayLoader((x, y), 16))
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(held))


def test_optimizer_dict_and_lr_schedule_accepted():
    class WithSchedule(Classifier):
        def configure_optimizers(self):
            sched = optax.linear_schedule(1e-2, 0.0, 10)
            return {"optimizer": optax.sgd(sched), "lr_schedule": sched}

    x, y = toy_data(32)
    t = nnxfit.Trainer(max_steps=2, progress_bar=False)
    t.fit(WithSchedule(), ArrayLoader((x, y), 16))
    assert t.programs.config.lr_fn is not None


def test_prefetch_gives_same_result_and_propagates_errors():
    x, y = toy_data(100)

    def run(prefetch):
        m = Classifier(dropout=0.2)
        t = nnxfit.Trainer(max_epochs=2, progress_bar=False, prefetch=prefetch)
        t.fit(m, ArrayLoader((x, y), 16, shuffle=True))
        return params_of(m)

    for a, b in zip(run(0), run(2), strict=False):
        np.testing.assert_array_equal(a, b)

    class Broken:
        def __iter__(self):
            yield (x[:16], y[:16])
            raise OSError("disk gone at batch 1")

    with pytest.raises(OSError, match="disk gone"):
        nnxfit.Trainer(max_epochs=1, progress_bar=False, prefetch=2).fit(Classifier(), Broken())


def test_device_runs_ahead_of_recording_hooks_and_waits_for_the_others(tmp_path):
    x, y = toy_data(100)

    class Lag(nnxfit.Callback):  # records only: the device may run ahead of it
        records_only = True

        def __init__(self):
            self.seen, self.lags = [], []  # what the hooks saw; dispatched steps ahead of them

        def on_train_batch_end(self, trainer, module, step, logs):
            self.seen.append(("batch", step, trainer.current_epoch, sorted(logs)))
            self.lags.append(trainer.dispatch_step - step)

        def on_train_epoch_end(self, trainer, module, epoch, logs):
            self.seen.append(("epoch", trainer.global_step, epoch, sorted(logs)))

    class EpochBarrier(nnxfit.Callback):  # an ordinary callback: may read or stop at epoch end
        def on_train_epoch_end(self, trainer, module, epoch, logs):
            self.lags.append(trainer.dispatch_step - trainer.global_step)

    class EveryThird(nnxfit.Callback):  # needs the device in step at steps 3, 6, ... only
        def needs_sync(self, trainer, event, step, n_steps):
            return event == "batch" and step % 3 == 0

        def on_train_batch_end(self, trainer, module, step, logs):
            if step % 3 == 0:
                self.lags.append(trainer.dispatch_step - step)

    def run(extra, workdir):
        m = Classifier(dropout=0.2, batchnorm=True)
        lag = Lag()
        for cb in extra:
            cb.lags = []
        t = nnxfit.Trainer(
            max_epochs=4,
            progress_bar=False,
            workdir=workdir,
            callbacks=[lag, *extra],
            log_every_n_steps=3,
        )
        h = t.fit(m, ArrayLoader((x, y), 16, shuffle=True))
        return m, h, t, lag

    runs = [
        run([], tmp_path / "a"),  # CSVLogger and Lag only record
        run([barrier := EpochBarrier()], tmp_path / "b"),
        run([third := EveryThird()], tmp_path / "c"),
    ]
    (m1, h1, t1, lag1), (m2, h2, t2, lag2), (m3, h3, t3, lag3) = runs
    assert t1.lookahead > 0 and max(lag1.lags) > 0  # the device really ran ahead
    assert max(lag2.lags) > 0 and barrier.lags == [0, 0, 0, 0]  # ... but not past its hooks
    assert max(lag3.lags) > 0 and third.lags == [0] * 9
    # ... and the hooks saw the same steps, epochs and logs, in the same order.
    assert lag1.seen == lag2.seen == lag3.seen and len(lag1.seen) == 28 + 4
    assert h1.history == h2.history == h3.history and t1.global_step == 28
    for a, b, c in zip(params_of(m1), params_of(m2), params_of(m3), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    rows1 = (tmp_path / "a" / "metrics.csv").read_text()
    assert rows1 == (tmp_path / "b" / "metrics.csv").read_text()
    assert rows1 == (tmp_path / "c" / "metrics.csv").read_text()


def test_signal_while_the_device_runs_ahead_stops_where_every_hook_has_run():
    import os
    import signal

    x, y = toy_data(100)

    class SignalAt(nnxfit.Callback):  # records only, so the device runs ahead of it
        records_only = True

        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, module, step, logs):
            self.steps.append(step)
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    cb = SignalAt()
    t = nnxfit.Trainer(max_epochs=5, progress_bar=False, callbacks=[cb])
    with pytest.raises(nnxfit.TrainingInterrupted) as err:
        t.fit(Classifier(), ArrayLoader((x, y), 16))
    assert t.lookahead > 0
    # The calls already dispatched when the signal came all had their hooks, in order, and
    # the interruption names the step the device state is at.
    assert err.value.step == t.global_step == t.dispatch_step > 3
    assert cb.steps == list(range(1, t.global_step + 1))
