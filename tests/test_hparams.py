"""TrainModule.hparams and save_hyperparameters: what is saved, where it goes (hparams.yaml,
checkpoints, the module's graph), how it survives nnx transforms."""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx
from models import MLP, Classifier, toy_data

import nnxfit
from nnxfit.callbacks import ModelCheckpoint
from nnxfit.data import ArrayLoader
from nnxfit.errors import ConfigError
from nnxfit.hparams import HParams

X, Y = toy_data(64)
HALF = np.float32(2.5)


class Base(nnxfit.TrainModule):
    def __init__(self, width, *, rngs, dropout=0.1, **kwargs):
        self.save_hyperparameters(ignore="debug")
        self.net = MLP(8, width, 3, rngs=rngs, dropout=dropout)

    def training_step(self, batch):
        x, y = batch
        logits = self.net(x) * self.hparams.scale  # read inside the jitted step
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def configure_optimizers(self):
        return optax.sgd(self.hparams.lr)


class Child(Base):
    def __init__(self, width=16, lr=0.05, *, scale=1.0, rngs=None, shape=(2, 3), debug=True):
        super().__init__(width, rngs=rngs or nnx.Rngs(0), extra="kw")


def test_save_hyperparameters_takes_every_init_argument_of_the_object():
    m = Child(lr=0.1, rngs=nnx.Rngs(3))
    assert isinstance(m.hparams, HParams)
    # The subclass's arguments and the base's (kwargs entries as keys), minus self and ignore.
    assert m.hparams == {
        "width": 16,
        "lr": 0.1,
        "scale": 1.0,
        "rngs": "<flax.nnx.rnglib.Rngs>",  # not plain data: a description, not the object
        "shape": [2, 3],
        "dropout": 0.1,
        "extra": "kw",
    }
    assert m.hparams.lr == 0.1 and m.hparams["width"] == 16
    with pytest.raises(AttributeError, match=r"hparams has no 'nope'"):
        _ = m.hparams.nope


def test_names_a_dict_or_a_namespace_select_what_is_saved():
    class Picky(nnxfit.TrainModule):
        def __init__(self, a=1, b=HALF, c=None, *, arr=None):
            self.save_hyperparameters("a", "b")

    assert Picky().hparams == {"a": 1, "b": 2.5}
    m = Picky()
    m.save_hyperparameters({"x": np.arange(3), "big": np.zeros((100, 100))})
    assert m.hparams["x"] == [0, 1, 2]
    assert m.hparams["big"] == "<float64[100, 100] ndarray>"
    m.save_hyperparameters(argparse.Namespace(depth=4))
    assert m.hparams["depth"] == 4

    class Wrong(nnxfit.TrainModule):
        def __init__(self, a=1):
            self.save_hyperparameters("b")

    with pytest.raises(ConfigError, match=r"\['b'\] are not arguments of __init__"):
        Wrong()
    with pytest.raises(ConfigError, match="found no __init__"):
        Picky().save_hyperparameters()  # outside __init__


def test_hparams_are_a_static_part_of_the_graph_and_survive_transforms():
    m = Child(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    hash(graphdef)  # nnx.jit hashes graph definitions: hparams must be hashable
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))  # no data added
    assert nnx.merge(graphdef, state).hparams == m.hparams

    @nnx.jit
    def scaled(module, x):
        return module.net(x) * module.hparams.width

    assert scaled(m, jnp.ones((2, 8))).shape == (2, 3)
    assert nnx.clone(m).hparams == m.hparams
    # Set directly: made plain data (nnx refuses an Rngs in a static attribute).
    m.hparams = {"seed": nnx.Rngs(1), "t": (1, 2)}
    assert m.hparams == {"seed": "<flax.nnx.rnglib.Rngs>", "t": [1, 2]}


def test_hparams_yaml_and_checkpoints_hold_them(tmp_path):
    m = Child(lr=0.05, rngs=nnx.Rngs(0))
    ckpt = ModelCheckpoint()
    trainer = nnxfit.Trainer(max_epochs=1, workdir=tmp_path, progress_bar=False, callbacks=[ckpt])
    trainer.fit(m, ArrayLoader((X, Y), 16))
    assert yaml.safe_load((tmp_path / "hparams.yaml").read_text()) == dict(m.hparams)
    assert nnxfit.read_meta(ckpt.last_model_path)["hparams"] == dict(m.hparams)

    # A fresh fit moves the earlier run's hparams.yaml to version_0 with its other files.
    m2 = Child(lr=0.01, rngs=nnx.Rngs(0))
    nnxfit.Trainer(max_epochs=1, workdir=tmp_path, progress_bar=False).fit(
        m2, ArrayLoader((X, Y), 16)
    )
    assert yaml.safe_load((tmp_path / "version_0" / "hparams.yaml").read_text())["lr"] == 0.05
    assert yaml.safe_load((tmp_path / "hparams.yaml").read_text())["lr"] == 0.01


def test_a_module_without_hparams_writes_no_file(tmp_path):
    nnxfit.Trainer(max_epochs=1, workdir=tmp_path, progress_bar=False).fit(
        Classifier(), ArrayLoader((X, Y), 16)
    )
    assert not os.path.exists(tmp_path / "hparams.yaml")
    assert Classifier().hparams == {}
