"""Data inputs (dicts, dataclasses, jax arrays, factories, one-shot iterators) and the run
options that shape an epoch: limit_*_batches, overfit_batches, fast_dev_run, val_every_n_steps,
estimated_stepping_batches seen from configure_optimizers."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.data import ArrayLoader, epoch_batches, take_batches


def trainer(**kw):
    kw.setdefault("progress_bar", False)
    return nnxfit.Trainer(**kw)


def batches(n=64, bs=16, seed=0):
    x, y = toy_data(n, seed=seed)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


class StepCounter(nnxfit.Callback):
    def __init__(self):
        self.val_steps = []
        self.val_logs = []

    def on_validation_end(self, trainer, module, logs):
        self.val_steps.append(trainer.global_step)
        self.val_logs.append(dict(logs))


# ================================================================================ inputs ===
class DictClassifier(Classifier):
    def training_step(self, batch):
        return super().training_step((batch["image"], batch["label"]))

    def validation_step(self, batch):
        return super().validation_step((batch["image"], batch["label"]))


def test_dict_batches_like_tfds_as_numpy():
    data = [{"image": x, "label": y} for x, y in batches()]
    h = trainer(max_epochs=2).fit(DictClassifier(), data, val_data=data)
    assert len(h.history["val_loss"]) == 2
    assert h.history["loss"][1] < h.history["loss"][0]


@dataclasses.dataclass
class Batch:
    image: np.ndarray
    label: np.ndarray
    split: str = "train"  # a Python string: static metadata, equal in every batch


def test_dataclass_batches_arrive_as_the_same_dataclass():
    seen = []

    class DCClassifier(Classifier):
        def training_step(self, batch):
            seen.append((type(batch).__name__, batch.split, type(batch.image).__name__))
            return super().training_step((batch.image, batch.label))

    data = [Batch(x, y) for x, y in batches()]
    tr = trainer(max_epochs=2)
    tr.fit(DCClassifier(), data)
    assert tr.global_step == 8
    name, split, leaf = seen[0]  # recorded while tracing: fields hold tracers
    assert (name, split) == ("Batch", "train") and "Tracer" in leaf


def test_jax_array_batches():
    data = [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches()]
    h = trainer(max_epochs=1).fit(Classifier(), data, val_data=data)
    assert np.isfinite(h.history["val_loss"][0])


def test_one_shot_generator_named_and_factory_accepted():
    data = batches()
    with pytest.raises(nnxfit.ConfigError, match="one-shot generator.*each epoch needs a fresh"):
        trainer(max_epochs=2).fit(Classifier(), (b for b in data))
    with pytest.raises(nnxfit.ConfigError, match="val data is a one-shot"):
        trainer(max_epochs=2).fit(Classifier(), data, val_data=iter(data))

    calls = []

    def factory():
        calls.append(1)
        return (b for b in data)  # a fresh generator per epoch

    tr = trainer(max_epochs=3)
    tr.fit(Classifier(), factory, val_data=factory)
    assert tr.global_step == 12
    assert tr.steps_per_epoch is None  # a factory has no len
    assert len(calls) >= 3 + 3  # one per epoch for training, one per validation


def test_epoch_batches_limit_and_start():
    x, y = toy_data(100)
    loader = ArrayLoader((x, y), 10)
    got = list(epoch_batches(loader, 0, start=2, limit=5))
    assert [int(b[0].shape[0]) for b in got] == [10, 10, 10]
    np.testing.assert_array_equal(got[0][0], x[20:30])
    plain = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 100, 10)]
    got = list(epoch_batches(plain, 0, start=1, limit=3))
    np.testing.assert_array_equal(got[1][0], x[20:30])
    assert list(epoch_batches(plain, 0, start=4, limit=3)) == []


# ================================================================ estimated stepping ===
class ScheduleClassifier(Classifier):
    seen = None
    outside = "unset"

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches
        type(self).seen = (total, self.trainer.steps_per_epoch)
        return optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 1, total))


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(max_epochs=3), (12, 4)),
        (dict(max_epochs=3, grad_accum_steps=2), (6, 2)),
        (dict(max_epochs=3, max_steps=5), (5, 4)),
        (dict(max_epochs=3, limit_train_batches=3), (9, 3)),
        (dict(max_epochs=2, overfit_batches=1), (2, 1)),
    ],
)
def test_estimated_stepping_batches_known_in_configure_optimizers(kw, expected):
    x, y = toy_data(64)
    m = ScheduleClassifier()
    assert m.trainer is None
    tr = trainer(**kw)
    tr.fit(m, ArrayLoader((x, y), 16, shuffle=True))
    assert ScheduleClassifier.seen == expected
    assert tr.global_step == expected[0]
    assert m.trainer is None  # only bound while fit/validate/predict run


def test_module_trainer_is_not_in_the_graph():
    m = ScheduleClassifier()
    before = nnxfit.Trainer  # the graphdef must not mention a Trainer object
    trainer(max_epochs=1).fit(m, batches())
    assert "Trainer" not in repr(jax.tree.structure(m)) and before is nnxfit.Trainer


# ======================================================================== run options ===
def test_limit_train_and_val_batches():
    x, y = toy_data(160)
    train = ArrayLoader((x, y), 16)
    val = ArrayLoader((x, y), 16)
    rec = StepCounter()
    tr = trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, callbacks=[rec])
    h = tr.fit(Classifier(), train, val_data=val)
    assert tr.global_step == 6 and tr.steps_per_epoch == 3
    # limit_val_batches also applies to validate; the epoch's value is over 2 batches only
    first_two = trainer(max_epochs=1).validate(tr.module, take_batches(val, 2))
    assert h.history["val_loss"][-1] == pytest.approx(first_two["val_loss"], rel=1e-6)
    everything = trainer(max_epochs=1).validate(tr.module, val)
    assert everything["val_loss"] != pytest.approx(first_two["val_loss"], rel=1e-6)


def test_overfit_batches_trains_and_validates_on_the_same_first_batches():
    x, y = toy_data(160)
    train = ArrayLoader((x, y), 16, shuffle=True, seed=3)
    other_val = ArrayLoader(toy_data(64, seed=9), 32)
    tr = trainer(max_epochs=40, overfit_batches=2)
    m = Classifier(lr=3e-2)
    h = tr.fit(m, train, val_data=other_val)
    assert tr.global_step == 80 and tr.steps_per_epoch == 2
    same = trainer(max_epochs=1).validate(m, take_batches(train, 2))
    assert h.history["val_loss"][-1] == pytest.approx(same["val_loss"], rel=1e-6)
    assert h.history["val_accuracy"][-1] == 1.0  # 32 examples, memorised
    assert h.history["loss"][-1] < 0.1 * h.history["loss"][0]


def test_fast_dev_run_runs_one_step_one_val_batch_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    rec = StepCounter()
    tr = nnxfit.Trainer(fast_dev_run=True, workdir=workdir, callbacks=[rec], progress_bar=False)
    assert tr.fast_dev_run and tr.max_epochs == 1
    x, y = toy_data(96)
    val = ArrayLoader((x, y), 16)
    h = tr.fit(Classifier(), ArrayLoader((x, y), 16), val_data=val)
    assert tr.global_step == 1 and h.epoch == [0]
    assert rec.val_steps == [1]
    one = trainer(max_epochs=1).validate(tr.module, take_batches(val, 1))
    assert rec.val_logs[0]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    assert not os.path.exists(workdir)
    assert nnxfit.Trainer(fast_dev_run=3, grad_accum_steps=2).limit_train_batches == 6
    with pytest.raises(nnxfit.ConfigError, match="fast_dev_run"):
        nnxfit.Trainer(fast_dev_run=-1)


def test_val_every_n_steps_validates_mid_epoch_but_history_keeps_epoch_values():
    rec = StepCounter()
    tr = trainer(max_epochs=2, val_every_n_steps=3, callbacks=[rec])
    h = tr.fit(Classifier(), batches(64), val_data=batches(32))  # 4 steps per epoch
    # mid-epoch at 3 and 6; epoch ends at 4 and 8 (step 8 is not run twice)
    assert rec.val_steps == [3, 4, 6, 8]
    assert len(h.history["val_loss"]) == 2
    assert h.history["val_loss"][1] == rec.val_logs[-1]["val_loss"]
    assert tr.logged_metrics["val_loss"] == rec.val_logs[2]["val_loss"]  # the step-6 run


def test_val_every_n_steps_with_steps_per_execution():
    rec = StepCounter()
    tr = trainer(max_steps=8, val_every_n_steps=2, steps_per_execution=4, callbacks=[rec])
    tr.fit(Classifier(), batches(128), val_data=batches(32))
    assert rec.val_steps == [4, 8]  # hooks fire per call of 4 steps; the last is epoch-end


@pytest.mark.parametrize(
    "kw", [dict(limit_train_batches=0), dict(overfit_batches=-2), dict(val_every_n_steps=1.5)]
)
def test_run_options_out_of_range(kw):
    with pytest.raises(nnxfit.ConfigError, match=next(iter(kw))):
        nnxfit.Trainer(max_epochs=1, **kw)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_array_loader_runs_are_the_batches_stacked_without_copies(shuffle, drop_last):
    """``iter_runs`` (what steps_per_execution feeds on) yields exactly ``iter_leaves``'s
    batches, in runs of at most k counted from ``start``, up to ``stop``; stacks are views."""
    x = np.arange(100 * 3, dtype=np.float32).reshape(100, 3)
    loader = ArrayLoader((x, np.arange(100)), 16, shuffle=shuffle, seed=1, drop_last=drop_last)
    for k, start, stop in [(3, 0, None), (4, 1, None), (32, 2, 5), (2, 6, None), (5, 7, None)]:
        n = len(loader) if stop is None else stop
        want = list(loader.iter_leaves(4, start))[: n - start]
        runs = list(loader.iter_runs(4, start, k, stop))
        got = [[leaf[j] for leaf in leaves] for leaves, m in runs for j in range(m)]
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            for u, v in zip(a, b, strict=True):
                np.testing.assert_array_equal(u, v)
        full = [m for leaves, m in runs if leaves[0].shape[1] == 16]
        assert all(m == k for m in full[:-1]) and all(m <= k for m in full)
        assert all(leaves[0].base is not None for leaves, _ in runs)  # views, not copies


@pytest.mark.parametrize("shuffle", [False, True])
def test_array_loader_shard_by_process_splits_every_global_batch(monkeypatch, shuffle):
    """Process i of n yields rows i/n to (i+1)/n of each global batch (the short last one
    too), in the global order, one batch at a time and in K-batch runs alike."""
    x = np.arange(44, dtype=np.float32)[:, None]  # 5 batches of 8 and a last batch of 4

    def batches(pid, runs):
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda: pid)
        loader = ArrayLoader((x,), 8, shuffle=shuffle, seed=1, shard_by_process=True)
        assert len(loader) == 6
        if not runs:
            return [b[0] for b in loader.iter_leaves(1, start=1)]
        return [b for leaves, m in loader.iter_runs(1, 1, 3) for b in leaves[0]]

    whole = [b[0] for b in ArrayLoader((x,), 8, shuffle=shuffle, seed=1).iter_leaves(1, 1)]
    for runs in (False, True):
        mine = [batches(pid, runs) for pid in (0, 1)]
        joined = [np.concatenate(parts) for parts in zip(*mine, strict=True)]
        assert len(joined) == len(whole) == 5
        for got, want in zip(joined, whole, strict=True):
            np.testing.assert_array_equal(got, want)
        assert [len(b) for b in mine[1]] == [4, 4, 4, 4, 2]


def test_array_loader_shard_by_process_needs_divisible_batches(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    x = np.zeros((40, 2), np.float32)
    with pytest.raises(nnxfit.BatchError, match="batch_size of 6 examples does not split"):
        ArrayLoader((x,), 6, shard_by_process=True)
    with pytest.raises(nnxfit.BatchError, match="short last batch of 2 examples.*drop_last"):
        ArrayLoader((x[:38],), 4, shard_by_process=True)
    ArrayLoader((x[:38],), 4, shard_by_process=True, drop_last=True)  # the short one dropped
