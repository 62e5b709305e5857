"""Any attribute an ``nnx.Module`` may hold trains, checkpoints and resumes like the rest:
plain ``jax.Array`` and numpy attributes (flax 0.12 treats them as pytree data), arrays in
``nnx.data`` lists, dicts and tuples, custom ``nnx.Variable`` subclasses holding counters, and
nested ``nnx.List`` / ``nnx.Dict`` of submodules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models import toy_data

import nnxfit
from nnxfit.callbacks import EarlyStopping
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.data import ArrayLoader


class Count(nnx.Variable):
    """A custom Variable kind: not a Param, so never touched by the optimizer."""


class Block(nnx.Module):
    def __init__(self, d, seed):
        self.lin = nnx.Linear(d, d, rngs=nnx.Rngs(seed))
        self.table = jnp.linspace(0.5, 1.5, d)  # a plain array in a submodule

    def __call__(self, x):
        return nnx.relu(self.lin(x)) * self.table


class Attributes(nnxfit.TrainModule):
    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.inp = nnx.Linear(8, 6, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.scale = jnp.asarray([1.0, 2.0, 3.0, 1.0, 0.5, 0.25])  # a constant table
        self.mask = np.array([1, 1, 1, 1, 0, 1], np.float32)  # numpy
        self.consts = nnx.data((jnp.float32(0.5), np.ones(6, np.float32)))  # a tuple
        self.blocks = nnx.List([Block(6, seed + 1)])
        self.heads = nnx.Dict({"out": nnx.Linear(6, 3, rngs=nnx.Rngs(seed + 3))})
        self.calls = Count(jnp.zeros((), jnp.int32))  # a counter the step advances
        self.seen = jnp.zeros((), jnp.float32)  # a plain array the step reassigns

    def __call__(self, x):
        h = self.drop(self.inp(x)) * self.scale * self.mask * self.consts[0] + self.consts[1]
        for b in self.blocks:
            h = b(h)
        return self.heads["out"](h)

    def training_step(self, batch):
        x, y = batch
        self.calls.set_value(self.calls.get_value() + 1)
        self.seen = self.seen + x.shape[0]
        loss = optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()
        return loss

    def validation_step(self, batch):
        x, y = batch
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()}

    def configure_optimizers(self):
        return optax.adam(1e-2)


def host(module):
    out = []
    for x in jax.tree.leaves(nnx.state(module)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.array(x, copy=True))
    return out


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), i


def data():
    x, y = toy_data(64, seed=2)
    return ArrayLoader((x, y), batch_size=16, shuffle=True, seed=3)


class ReadsModule(nnxfit.Callback):
    """Reads the module at every call (so the Trainer writes its state back each time) and
    bumps the counter from the host: what a hook assigns is kept."""

    def __init__(self):
        self.scales = []

    def on_train_batch_end(self, trainer, module, step, logs):
        self.scales.append(np.array(module.scale))
        module.calls.set_value(module.calls.get_value() + 100)


def test_a_module_with_plain_array_attributes_trains_and_writes_every_kind_back(tmp_path):
    module = Attributes()
    scale, mask = np.array(module.scale), module.mask.copy()
    reader = ReadsModule()
    trainer = nnxfit.Trainer(max_steps=6, progress_bar=False, callbacks=[reader])
    history = trainer.fit(module, data(), data())
    assert len(history.history["val_loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    assert int(module.calls.get_value()) == 6 + 600  # 6 steps, 6 host bumps
    assert float(module.seen) == 6 * 16
    np.testing.assert_array_equal(np.asarray(module.scale), scale)
    np.testing.assert_array_equal(np.asarray(module.mask), mask)
    assert len(reader.scales) == 6
    # Never fitted: validate and predict take the same attributes.
    fresh = Attributes(seed=5)
    assert set(trainer.validate(fresh, data())) == {"val_loss"}
    assert trainer.predict(fresh, data()).shape == (64, 3)


def test_plain_array_attributes_checkpoint_resume_and_load_bit_for_bit(tmp_path):
    fit = dict(progress_bar=False, log_every_n_steps=2)
    ref = Attributes()
    nnxfit.Trainer(workdir=tmp_path / "ref", max_epochs=2, **fit).fit(ref, data())

    workdir = tmp_path / "run"
    first = Attributes()
    cb = [ModelCheckpoint()]
    nnxfit.Trainer(workdir=workdir, callbacks=cb, max_epochs=1, **fit).fit(first, data())
    resumed = Attributes(seed=9)  # everything must come from the checkpoint
    trainer = nnxfit.Trainer(workdir=workdir, callbacks=[ModelCheckpoint()], max_epochs=2, **fit)
    trainer.fit(resumed, data(), resume=True)
    assert trainer.resumed_from is not None
    assert_bitwise(host(resumed), host(ref))
    assert int(resumed.calls.get_value()) == 8

    loaded = Attributes(seed=11)
    info = nnxfit.load_checkpoint(loaded, workdir, which="last")
    assert info.step == 8
    assert_bitwise(host(loaded), host(ref))


def test_early_stopping_restores_best_weights_of_a_module_with_array_attributes():
    class Worse(nnxfit.Callback):
        """A validation loss that is best at epoch 0."""

        order = -10

        def on_validation_end(self, trainer, module, logs):
            logs["val_loss"] = float(trainer.current_epoch)

    module = Attributes()
    es = EarlyStopping(patience=1, restore_best_weights=True, verbose=False)
    trainer = nnxfit.Trainer(max_epochs=5, progress_bar=False, callbacks=[Worse(), es])
    trainer.fit(module, data(), data())
    assert es.best_epoch == 0 and es.stopped_epoch == 1
    assert int(module.calls.get_value()) == 4  # the counter of epoch 0's end
    assert float(module.seen) == 64


@pytest.mark.parametrize("spe", [1, 3])
def test_a_tuple_attribute_rebuilt_in_the_step_is_written_back(spe):
    class Pair(Attributes):
        def training_step(self, batch):
            a, b = self.consts
            self.consts = nnx.data((a + 1.0, b))
            return super().training_step(batch)

    module = Pair()
    nnxfit.Trainer(max_steps=5, progress_bar=False, steps_per_execution=spe).fit(module, data())
    assert float(module.consts[0]) == 5.5
    assert isinstance(module.consts, tuple)
